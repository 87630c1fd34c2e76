// SPDX-License-Identifier: MIT
// Heterogeneous batches on CUDA (cuda/include/deltaw/cuda/serve.cuh): apply_lora_batch with
// both strategies and apply_grouped over a variant of update types, against the CPU's
// deltaw::serve (same stored values) and a per-token dense reference in double; decode
// (interleaved tokens, tokens without an adapter), prefill (consecutive groups), one
// adapter for every token, no tokens; the errors; the scratch high-water mark.
// In the nvcc build it joins test_cuda_lora, whose test_cuda_lora.cu skips (exit 77)
// without a usable device.
#include <deltaw/cuda/cuda.hpp>
#include <deltaw/cuda/serve.cuh>
#include <deltaw/deltaw.hpp>
#include <deltaw/serve/batch.hpp>

#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "cuda_test_util.cuh"
#include "cuda_update_check.cuh"
#include "test_util.hpp"

namespace dw = deltaw;

namespace cuda_serve_test {

using dw::index_t;
using dwcuda::twin;
using dwt::MatD;

template <class C>
constexpr double tol() {
  return std::is_same_v<C, double> ? 1e-12 : 1e-6;
}

/// Adapters of ranks `ranks` over [out, in], held on both sides; scale α/r with α = 2 + a.
template <class T>
struct lora_set : dwcuda::lora_twins<T> {
  lora_set(index_t out, index_t in, const std::vector<index_t>& ranks, std::uint64_t seed)
      : dwcuda::lora_twins<T>(out, in, ranks, seed, [](std::size_t a) { return dw::alpha(2.0 + double(a)); }) {}
};

/// Row t of X·Wᵀ plus X(t, :)·ΔW_aᵀ, in double.
MatD reference(const MatD& W, const std::vector<MatD>& delta, const std::vector<index_t>& aot, const MatD& X) {
  MatD Y = X * W.transpose();
  for (index_t t = 0; t < X.rows(); ++t)
    if (const index_t a = aot[std::size_t(t)]; a >= 0) Y.row(t) += X.row(t) * delta[std::size_t(a)].transpose();
  return Y;
}

struct pattern {
  const char* name;
  std::vector<index_t> aot;
};

std::vector<pattern> patterns() {
  return {
      {"decode, interleaved, some without adapter", {2, 0, -1, 3, 2, 1, -1, 0, 3, 3, 1}},
      {"prefill, consecutive groups", {1, 1, 1, 1, 3, 3, 3, 0, 0, 0, 0, 0, -1, -1, 2, 2, 2, 2, 2, 2, 2}},
      {"one adapter for every token", {2, 2, 2, 2, 2, 2, 2, 2}},
      {"no adapter at all", {-1, -1, -1}},
      {"no tokens", {}},
  };
}

template <class T>
void lora_batch_cases() {
  dw::cuda::context ctx;
  const index_t out = 13, in = 10;
  const lora_set<T> set(out, in, {1, 3, 8, 4}, 300);
  std::uint64_t seed = 400;
  for (const pattern& p : patterns()) {
    for (bool cm : {false, true}) {
      for (auto how : {dw::serve::strategy::segments, dw::serve::strategy::gather, dw::serve::strategy::automatic}) {
        INFO(p.name);
        CAPTURE(cm);
        CAPTURE(int(how));
        seed += 10;
        const index_t tokens = index_t(p.aot.size());
        twin<T> W(dwt::random(out, in, seed), !cm), X(dwt::random(tokens, in, seed + 1), cm);
        auto Yg = dwcuda::nan_output<T>(tokens, out, !cm), Yc = dwcuda::nan_output<T>(tokens, out, !cm);
        dw::serve::batch_options o;
        o.how = how;
        const auto used_g = dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.gpu, p.aot, X.gpu(), Yg.gpu(), o);
        const auto used_c = dw::serve::apply_lora_batch(W.cpu(), set.cpu, p.aot, X.cpu(), Yc.cpu(), o);
        CHECK(used_g == used_c);
        CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= tol<T>());
        CHECK(dwt::rel_err(Yg.dev_d(), reference(W.host_d(), set.delta, p.aot, X.host_d())) <= 2 * tol<T>());
      }
    }
  }
}

}  // namespace cuda_serve_test

TEST_CASE_TEMPLATE("cuda: heterogeneous LoRA batches match the CPU's serve and a per-token reference", T, float,
                   double) {
  cuda_serve_test::lora_batch_cases<T>();
}

TEST_CASE("cuda: apply_grouped serves a variant of update types like the CPU, with host or device indices") {
  using namespace cuda_serve_test;
  using T = double;
  dw::cuda::context ctx;
  const index_t out = 12, in = 8, tokens = 9;
  twin<T> W(dwt::random(out, in, 1)), X(dwt::random(tokens, in, 2), true);
  twin<T> B(dwt::random(out, 3, 3)), A(dwt::random(3, in, 4), true), Bb(dwt::random(out, 4, 5)),
      A0(dwt::random(2, in, 6)), Dm(dwt::random(4, out, 7));
  using VG = std::variant<dw::low_rank<T, dw::device::cuda>, dw::block_low_rank<T, dw::device::cuda>,
                          dw::miss_update<T, dw::device::cuda>>;
  using VC = std::variant<dw::low_rank<T>, dw::block_low_rank<T>, dw::miss_update<T>>;
  const std::vector<VG> ug = {dw::lora(B.gpu(), A.gpu(), dw::alpha(6)), dw::block_lora(Bb.gpu(), A0.gpu(), dw::scale(0.5)),
                              dw::miss(Dm.gpu(), in)};
  const std::vector<VC> uc = {dw::lora(B.cpu(), A.cpu(), dw::alpha(6)), dw::block_lora(Bb.cpu(), A0.cpu(), dw::scale(0.5)),
                              dw::miss(Dm.cpu(), in)};
  std::vector<MatD> delta;
  for (const auto& u : uc) delta.push_back(std::visit([](const auto& v) { return MatD(dw::materialize(v)); }, u));
  for (const std::vector<index_t>& aot : {std::vector<index_t>{2, 0, -1, 1, 2, 0, 0, 1, 2},  // interleaved
                                          std::vector<index_t>{0, 0, 0, 1, 1, 2, 2, 2, -1}}) {  // consecutive
    auto Yg = dwcuda::nan_output<T>(tokens, out, false), Yc = dwcuda::nan_output<T>(tokens, out, false);
    dw::cuda::serve::apply_grouped(ctx, W.gpu(), ug, aot, X.gpu(), Yg.gpu());
    dw::serve::apply_grouped(W.cpu(), uc, aot, X.cpu(), Yc.cpu());
    CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= 1e-12);
    CHECK(dwt::rel_err(Yg.dev_d(), reference(W.host_d(), delta, aot, X.host_d())) <= 1e-12);
    // The same indices in device memory: grouped by the device sort, the same products.
    const dwcuda::dev_indices daot(aot);
    auto Yd = dwcuda::nan_output<T>(tokens, out, false);
    dw::cuda::serve::apply_grouped(ctx, W.gpu(), ug, daot.gpu(), X.gpu(), Yd.gpu());
    CHECK(dwt::rel_err(Yd.dev_d(), Yg.dev_d()) <= 1e-12);
  }
  const dwcuda::dev_indices bad(std::vector<index_t>{0, 1, 2, 3, 0, 0, 0, 0, 0});
  auto Y = dwcuda::nan_output<T>(tokens, out, false);
  dwt::check_throws_with<dw::argument_error>(
      [&] { dw::cuda::serve::apply_grouped(ctx, W.gpu(), ug, bad.gpu(), X.gpu(), Y.gpu()); },
      {"deltaw::cuda::serve::apply_grouped", "token 3 names adapter 3 but the batch has 3 adapters"});
}

TEST_CASE("cuda: heterogeneous batches refuse bad input with readable errors, and stay below out × in scratch") {
  using namespace cuda_serve_test;
  using T = float;
  dw::cuda::context ctx;
  const index_t out = 256, in = 192, tokens = 6;
  const lora_set<T> set(out, in, {8, 16}, 900);
  twin<T> W(dwt::random(out, in, 1)), X(dwt::random(tokens, in, 2));
  auto Y = dwcuda::nan_output<T>(tokens, out, false);
  const std::vector<index_t> bad = {0, 1, 2, 0, 1, 0};
  dwt::check_throws_with<dw::argument_error>(
      [&] { dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.gpu, bad, X.gpu(), Y.gpu()); },
      {"token 2 names adapter 2 but the batch has 2 adapters"});
  const std::vector<index_t> short_list = {0, 1};
  dwt::check_throws_with<dw::shape_error>(
      [&] { dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.gpu, short_list, X.gpu(), Y.gpu()); },
      {"2 adapter indices for X with 6 tokens"});
  twin<T> Wsmall(dwt::random(out, in - 1, 3));
  dwt::check_throws_with<dw::shape_error>(
      [&] { dw::cuda::serve::apply_lora_batch(ctx, Wsmall.gpu(), set.gpu, bad, X.gpu(), Y.gpu()); }, {"X is [6, 192]"});
  // Y over X's memory.
  twin<T> XY(dwt::random(tokens, out, 4));
  const auto Xalias = dw::cuda::view(static_cast<const T*>(XY.dev.data()), tokens, in);
  const std::vector<index_t> good = {0, 1, 1, 0, -1, 1};
  dwt::check_throws_with<dw::aliasing_error>(
      [&] { dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.gpu, good, Xalias, XY.gpu()); }, {"overlaps the input X"});
  // Scratch: both strategies, interleaved tokens (gathered groups), far below one out × in.
  for (auto how : {dw::serve::strategy::segments, dw::serve::strategy::gather}) {
    dw::cuda::context fresh;
    dw::serve::batch_options o;
    o.how = how;
    dw::cuda::serve::apply_lora_batch(fresh, W.gpu(), set.gpu, good, X.gpu(), Y.gpu(), o);
    CAPTURE(int(how));
    CHECK(fresh.scratch_high_water_bytes() < std::size_t(out * in) * sizeof(T) / 8);
  }
}

// ---- issue 17, CUDA side: grouped GEMM, segments by grouped GEMM, device-side grouping ----

namespace cuda_serve_test {

template <class C>
constexpr double gtol() {
  return std::is_same_v<C, double> ? 1e-12 : 1e-5;
}

/// An array in device memory of any trivially copyable type (buffer<T> holds storage
/// types only): the pointer arrays of the grouped GEMM.
template <class P>
struct dev_array {
  P* p = nullptr;
  explicit dev_array(const std::vector<P>& h) {
    DELTAW_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p), std::max<std::size_t>(1, h.size()) * sizeof(P)));
    if (!h.empty()) DELTAW_CUDA_CHECK(cudaMemcpy(p, h.data(), h.size() * sizeof(P), cudaMemcpyHostToDevice));
  }
  dev_array(const dev_array&) = delete;
  dev_array& operator=(const dev_array&) = delete;
  ~dev_array() { (void)cudaFree(p); }
};

/// A column-major rows × cols matrix with leading dimension ld in device memory; the
/// entries below row `rows` of each column (ld > rows) hold a sentinel.
template <class T>
struct cm_matrix {
  static constexpr double sentinel = 777.0;
  index_t rows, cols, ld;
  std::vector<T> host;
  dw::cuda::buffer<T> dev;
  cm_matrix(index_t r, index_t c, index_t ld_, std::uint64_t seed, bool nan = false)
      : rows(r), cols(c), ld(ld_), host(std::size_t(std::max<index_t>(1, ld_ * c)), T(sentinel)) {
    const MatD v = dwt::random(r, c, seed);
    for (index_t j = 0; j < c; ++j)
      for (index_t i = 0; i < r; ++i)
        host[std::size_t(j * ld + i)] = nan ? std::numeric_limits<T>::quiet_NaN() : T(v(i, j));
    dev = dw::cuda::buffer<T>(host);
  }
  MatD value(const std::vector<T>& v) const {
    MatD m(rows, cols);
    for (index_t j = 0; j < cols; ++j)
      for (index_t i = 0; i < rows; ++i) m(i, j) = double(v[std::size_t(j * ld + i)]);
    return m;
  }
  MatD initial() const { return value(host); }
  MatD now() const { return value(dev.to_vector()); }
  /// The device holds exactly the initial values (nothing written).
  bool untouched() const {
    const auto v = dev.to_vector();
    for (std::size_t i = 0; i < v.size(); ++i)
      if (!(v[i] == host[i] || (std::isnan(double(v[i])) && std::isnan(double(host[i]))))) return false;
    return true;
  }
  bool padding_kept() const {
    const auto v = dev.to_vector();
    for (index_t j = 0; j < cols; ++j)
      for (index_t i = rows; i < ld; ++i)
        if (v[std::size_t(j * ld + i)] != T(sentinel)) return false;
    return true;
  }
};

/// The grouped GEMM entry point for T (cublasSgemmGroupedBatched or cublasDgemmGroupedBatched).
using dw::cuda::detail::gemm_grouped_batched_call;

struct shape_group {
  cublasOperation_t ta, tb;
  int m, n, k;
  double alpha, beta;
  int size, pad;
};

/// The host arrays and device operands of a grouped GEMM over `groups`, its reference
/// α·op(A)·op(B) + β·C in double per problem.
template <class T>
struct grouped_args {
  std::vector<cublasOperation_t> ta, tb;
  std::vector<int> m, n, k, lda, ldb, ldc, size;
  std::vector<T> alpha, beta;
  int groups() const { return int(m.size()); }
};

template <class T>
struct grouped_setup : grouped_args<T> {
  using grouped_args<T>::ta, grouped_args<T>::tb, grouped_args<T>::m, grouped_args<T>::n, grouped_args<T>::k,
      grouped_args<T>::lda, grouped_args<T>::ldb, grouped_args<T>::ldc, grouped_args<T>::size,
      grouped_args<T>::alpha, grouped_args<T>::beta;
  std::vector<std::unique_ptr<cm_matrix<T>>> A, B, C;
  std::vector<MatD> ref;
  std::vector<T*> pa, pb, pc;

  grouped_setup(const std::vector<shape_group>& groups, std::uint64_t seed) {
    for (const shape_group& g : groups) {
      ta.push_back(g.ta), tb.push_back(g.tb), m.push_back(g.m), n.push_back(g.n), k.push_back(g.k);
      alpha.push_back(T(g.alpha)), beta.push_back(T(g.beta)), size.push_back(g.size);
      const bool na = g.ta == CUBLAS_OP_N, nb = g.tb == CUBLAS_OP_N;
      const index_t ar = na ? g.m : g.k, ac = na ? g.k : g.m, br = nb ? g.k : g.n, bc = nb ? g.n : g.k;
      lda.push_back(std::max(1, int(ar) + g.pad)), ldb.push_back(std::max(1, int(br) + g.pad + 1));
      ldc.push_back(std::max(1, g.m + g.pad));
      for (int p = 0; p < g.size; ++p) {
        seed += 3;
        A.push_back(std::make_unique<cm_matrix<T>>(ar, ac, lda.back(), seed));
        B.push_back(std::make_unique<cm_matrix<T>>(br, bc, ldb.back(), seed + 1));
        C.push_back(std::make_unique<cm_matrix<T>>(g.m, g.n, ldc.back(), seed + 2, g.beta == 0.0));
        const MatD opa = na ? A.back()->initial() : MatD(A.back()->initial().transpose());
        const MatD opb = nb ? B.back()->initial() : MatD(B.back()->initial().transpose());
        MatD r = double(T(g.alpha)) * opa * opb;
        if (g.beta != 0.0) r += double(T(g.beta)) * C.back()->initial();
        ref.push_back(r);
        pa.push_back(A.back()->dev.data()), pb.push_back(B.back()->dev.data()), pc.push_back(C.back()->dev.data());
      }
    }
  }
  bool all_untouched() const {
    for (const auto& c : C)
      if (!c->untouched()) return false;
    return true;
  }
};

template <class T>
void shim_grouped_cases() {
  dw::cuda::context ctx;
  const cublasHandle_t h = ctx.cublas();
  const std::vector<shape_group> groups = {
      {CUBLAS_OP_N, CUBLAS_OP_N, 5, 4, 3, 1.5, 0.0, 2, 1},    // two problems, padded, C unread
      {CUBLAS_OP_T, CUBLAS_OP_N, 3, 6, 7, -0.5, 1.0, 1, 0},   // accumulate
      {CUBLAS_OP_N, CUBLAS_OP_T, 1, 1, 9, 2.0, 0.25, 3, 2},   // three 1 × 1 problems
      {CUBLAS_OP_C, CUBLAS_OP_T, 4, 2, 5, 1.0, -1.0, 1, 3},   // C = T for real types
      {CUBLAS_OP_N, CUBLAS_OP_N, 6, 3, 2, 0.75, 1.0, 0, 0},   // an empty group
      {CUBLAS_OP_N, CUBLAS_OP_N, 0, 3, 4, 1.0, 0.0, 1, 0},    // m = 0
      {CUBLAS_OP_T, CUBLAS_OP_N, 3, 2, 0, 1.0, 0.0, 1, 0},    // k = 0, β = 0: C = 0
      {CUBLAS_OP_N, CUBLAS_OP_N, 2, 3, 4, 0.0, 0.5, 1, 1},    // α = 0: C = β·C
  };
  grouped_setup<T> s(groups, 1000);
  const dev_array<T*> dA(s.pa), dB(s.pb), dC(s.pc);
  auto call = [&](const grouped_args<T>& g, int count) {
    return gemm_grouped_batched_call<T>(h, g.ta.data(), g.tb.data(), g.m.data(), g.n.data(), g.k.data(),
                                        g.alpha.data(), dA.p, g.lda.data(), dB.p, g.ldb.data(), g.beta.data(), dC.p,
                                        g.ldc.data(), count, g.size.data());
  };

  // Invalid arguments: refused with INVALID_VALUE before anything is written.
  auto refused = [&](auto mutate, cublasStatus_t want) {
    grouped_args<T> bad = s;  // the host arrays, mutated (the operands are shared)
    const int count = mutate(bad);
    CHECK(call(bad, count) == want);
    CHECK(s.all_untouched());
  };
  refused([&](grouped_args<T>&) { return -1; }, CUBLAS_STATUS_INVALID_VALUE);
  refused([&](grouped_args<T>& g) { g.m[2] = -1; return g.groups(); }, CUBLAS_STATUS_INVALID_VALUE);
  refused([&](grouped_args<T>& g) { g.k[1] = -3; return g.groups(); }, CUBLAS_STATUS_INVALID_VALUE);
  refused([&](grouped_args<T>& g) { g.size[3] = -1; return g.groups(); }, CUBLAS_STATUS_INVALID_VALUE);
  refused([&](grouped_args<T>& g) { g.lda[0] = g.m[0] - 1; return g.groups(); }, CUBLAS_STATUS_INVALID_VALUE);
  refused([&](grouped_args<T>& g) { g.lda[1] = g.k[1] - 1; return g.groups(); }, CUBLAS_STATUS_INVALID_VALUE);
  refused([&](grouped_args<T>& g) { g.ldb[2] = g.n[2] - 1; return g.groups(); }, CUBLAS_STATUS_INVALID_VALUE);
  refused([&](grouped_args<T>& g) { g.ldc[3] = g.m[3] - 1; return g.groups(); }, CUBLAS_STATUS_INVALID_VALUE);
  refused([&](grouped_args<T>& g) { g.ta[1] = cublasOperation_t(7); return g.groups(); }, CUBLAS_STATUS_INVALID_VALUE);
  CHECK(gemm_grouped_batched_call<T>(nullptr, s.ta.data(), s.tb.data(), s.m.data(), s.n.data(), s.k.data(),
                                     s.alpha.data(), dA.p, s.lda.data(), dB.p, s.ldb.data(), s.beta.data(), dC.p,
                                     s.ldc.data(), s.groups(), s.size.data()) == CUBLAS_STATUS_NOT_INITIALIZED);
  CHECK(call(s, 0) == CUBLAS_STATUS_SUCCESS);  // no groups: nothing to do
  CHECK(s.all_untouched());
#if defined(DELTAW_CUDA_HOST)
  {
    // Pointer arrays in host memory: a GPU would fault; the shim fails the call and writes nothing.
    CHECK(gemm_grouped_batched_call<T>(h, s.ta.data(), s.tb.data(), s.m.data(), s.n.data(), s.k.data(),
                                       s.alpha.data(), s.pa.data(), s.lda.data(), dB.p, s.ldb.data(), s.beta.data(),
                                       dC.p, s.ldc.data(), s.groups(),
                                       s.size.data()) == CUBLAS_STATUS_EXECUTION_FAILED);
    CHECK(s.all_untouched());
    // Ex: a 16-bit type combination is not implemented here.
    const float one = 1.0f;
    std::vector<float> fa(s.alpha.size(), one);
    CHECK(cublasGemmGroupedBatchedEx(h, s.ta.data(), s.tb.data(), s.m.data(), s.n.data(), s.k.data(), fa.data(),
                                     reinterpret_cast<const void* const*>(dA.p), CUDA_R_16F, s.lda.data(),
                                     reinterpret_cast<const void* const*>(dB.p), CUDA_R_16F, s.ldb.data(), fa.data(),
                                     reinterpret_cast<void* const*>(dC.p), CUDA_R_16F, s.ldc.data(), s.groups(),
                                     s.size.data(), CUBLAS_COMPUTE_32F) == CUBLAS_STATUS_NOT_SUPPORTED);
    CHECK(s.all_untouched());
  }
#endif

  // The products.
  REQUIRE(call(s, s.groups()) == CUBLAS_STATUS_SUCCESS);
  for (std::size_t p = 0; p < s.C.size(); ++p) {
    CAPTURE(p);
    CHECK(dwt::rel_err(s.C[p]->now(), s.ref[p]) <= gtol<T>());
    CHECK(s.C[p]->padding_kept());
  }

  // cublasGemmGroupedBatchedEx with T's own compute type gives the same products.
  grouped_setup<T> e(groups, 1000);
  const dev_array<T*> eA(e.pa), eB(e.pb), eC(e.pc);
  constexpr cudaDataType_t dt = std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_64F;
  REQUIRE(cublasGemmGroupedBatchedEx(h, e.ta.data(), e.tb.data(), e.m.data(), e.n.data(), e.k.data(), e.alpha.data(),
                                     reinterpret_cast<const void* const*>(eA.p), dt, e.lda.data(),
                                     reinterpret_cast<const void* const*>(eB.p), dt, e.ldb.data(), e.beta.data(),
                                     reinterpret_cast<void* const*>(eC.p), dt, e.ldc.data(), e.groups(),
                                     e.size.data(),
                                     std::is_same_v<T, float> ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_64F) ==
          CUBLAS_STATUS_SUCCESS);
  for (std::size_t p = 0; p < e.C.size(); ++p) {
    CAPTURE(p);
    CHECK(dwt::rel_err(e.C[p]->now(), e.ref[p]) <= gtol<T>());
  }
}

/// A [rows, cols] view into a buffer with strides (rs, cs), the rest of the buffer a sentinel.
template <class T>
struct strided {
  index_t rows, cols, rs, cs;
  std::vector<T> host;
  dw::cuda::buffer<T> dev;
  strided(const MatD& m, index_t rs_, index_t cs_)
      : rows(m.rows()), cols(m.cols()), rs(rs_), cs(cs_),
        host(std::size_t((m.rows() - 1) * rs_ + (m.cols() - 1) * cs_ + 1), T(555)) {
    for (index_t i = 0; i < rows; ++i)
      for (index_t j = 0; j < cols; ++j) host[std::size_t(i * rs + j * cs)] = T(m(i, j));
    dev = dw::cuda::buffer<T>(host);
  }
  auto gpu() { return dw::cuda::view(dev.data(), rows, cols, rs, cs); }
  MatD now() const {
    const auto v = dev.to_vector();
    MatD m(rows, cols);
    for (index_t i = 0; i < rows; ++i)
      for (index_t j = 0; j < cols; ++j) m(i, j) = double(v[std::size_t(i * rs + j * cs)]);
    return m;
  }
};

template <class T>
void gemm_grouped_cases() {
  namespace kn = dw::kernels;
  using P = kn::gemm_problem<T, dw::device::cuda>;
  dw::cuda::context ctx;
  // Operands (shared by both runs) and two copies of every output.
  twin<T> A0(dwt::random(5, 3, 1)), B0(dwt::random(3, 7, 2), true);
  twin<T> A1(dwt::random(4, 6, 3), true), B1(dwt::random(2, 4, 4));
  twin<T> A2(dwt::random(4, 3, 5)), B2(dwt::random(3, 4, 6));
  twin<T> A3(dwt::random(3, 2, 7)), B3(dwt::random(2, 3, 8));
  twin<T> A4(dwt::random(2, 0, 9)), B4(dwt::random(0, 5, 10));
  twin<T> A5(dwt::random(3, 4, 11)), B5(dwt::random(4, 2, 12)), A6(dwt::random(3, 4, 13)), B6(dwt::random(4, 2, 14));
  const MatD C1i = dwt::random(6, 2, 20), C2i = dwt::random(4, 4, 21), C3i = dwt::random(3, 3, 22),
             C4i = dwt::random(2, 5, 23), C5i = dwt::random(3, 2, 24), C6i = dwt::random(3, 2, 25);
  struct outputs {
    twin<T> C0, C1;
    strided<T> C2;
    twin<T> C3, C4, C5, C6;
  };
  auto fresh = [&] {
    return std::make_unique<outputs>(outputs{dwcuda::nan_output<T>(5, 7, false), twin<T>(C1i, true),
                                             strided<T>(C2i, 8, 2), twin<T>(C3i), twin<T>(C4i, true), twin<T>(C5i),
                                             twin<T>(C6i)});
  };
  auto problems = [&](outputs& o) {
    return std::vector<P>{
        {T(1.5), A0.gpu(), kn::op::none, B0.gpu(), kn::op::none, T(0), o.C0.gpu()},      // row-major C, β = 0
        {T(-0.5), A1.gpu(), kn::op::trans, B1.gpu(), kn::op::trans, T(1), o.C1.gpu()},   // both transposed
        {T(2), A2.gpu(), kn::op::none, B2.gpu(), kn::op::none, T(0.5), o.C2.gpu()},      // C without unit stride
        {T(0), A3.gpu(), kn::op::none, B3.gpu(), kn::op::none, T(-2), o.C3.gpu()},       // α = 0
        {T(1), A4.gpu(), kn::op::none, B4.gpu(), kn::op::none, T(0.25), o.C4.gpu()},     // k = 0
        {T(0.75), A5.gpu(), kn::op::none, B5.gpu(), kn::op::none, T(1), o.C5.gpu()},     // two of one shape
        {T(0.75), A6.gpu(), kn::op::none, B6.gpu(), kn::op::none, T(1), o.C6.gpu()}};
  };
  auto grouped = fresh(), single = fresh();
  const auto pg = problems(*grouped), ps = problems(*single);
  dw::cuda::gemm_grouped<T>(ctx, pg);
  for (const P& p : ps) dw::cuda::gemm<T>(ctx, p.alpha, p.A, p.oa, p.B, p.ob, p.beta, p.Cv);
  const double tol = std::is_same_v<T, double> ? 1e-12 : 1e-6;
  CHECK(dwt::rel_err(grouped->C0.dev_d(), single->C0.dev_d()) <= tol);
  CHECK(dwt::rel_err(grouped->C1.dev_d(), single->C1.dev_d()) <= tol);
  CHECK(dwt::rel_err(grouped->C2.now(), single->C2.now()) <= tol);
  CHECK(dwt::rel_err(grouped->C3.dev_d(), single->C3.dev_d()) <= tol);
  CHECK(dwt::rel_err(grouped->C4.dev_d(), single->C4.dev_d()) <= tol);
  CHECK(dwt::rel_err(grouped->C5.dev_d(), single->C5.dev_d()) <= tol);
  CHECK(dwt::rel_err(grouped->C6.dev_d(), single->C6.dev_d()) <= tol);
  // And against the formulas in double.
  CHECK(dwt::rel_err(grouped->C0.dev_d(), MatD(1.5 * A0.host_d() * B0.host_d())) <= gtol<T>());
  CHECK(dwt::rel_err(grouped->C1.dev_d(), MatD(-0.5 * A1.host_d().transpose() * B1.host_d().transpose() +
                                               twin<T>(C1i).host_d())) <= gtol<T>());
  CHECK(dwt::rel_err(grouped->C2.now(), MatD(2.0 * A2.host_d() * B2.host_d() + 0.5 * twin<T>(C2i).host_d())) <=
        gtol<T>());
  CHECK(dwt::rel_err(grouped->C3.dev_d(), MatD(-2.0 * twin<T>(C3i).host_d())) <= gtol<T>());
  CHECK(dwt::rel_err(grouped->C4.dev_d(), MatD(0.25 * twin<T>(C4i).host_d())) <= gtol<T>());
  CHECK(dwt::rel_err(grouped->C6.dev_d(), MatD(0.75 * A6.host_d() * B6.host_d() + twin<T>(C6i).host_d())) <=
        gtol<T>());
  // Around the strided output, the buffer is untouched.
  {
    const auto v = grouped->C2.dev.to_vector();
    std::size_t kept = 0;
    for (const T x : v) kept += x == T(555) ? 1 : 0;
    CHECK(kept == v.size() - 16);
  }

  // Two problems accumulating into one C are not independent: they run in order, as on the CPU.
  twin<T> Cs(C5i);
  const std::vector<P> dependent = {{T(1), A5.gpu(), kn::op::none, B5.gpu(), kn::op::none, T(1), Cs.gpu()},
                                    {T(-3), A6.gpu(), kn::op::none, B6.gpu(), kn::op::none, T(1), Cs.gpu()}};
  dw::cuda::gemm_grouped<T>(ctx, dependent);
  CHECK(dwt::rel_err(Cs.dev_d(), MatD(twin<T>(C5i).host_d() + A5.host_d() * B5.host_d() -
                                      3.0 * A6.host_d() * B6.host_d())) <= gtol<T>());

  // A wrong shape in any problem throws before anything runs.
  auto third = fresh();
  auto bad = problems(*third);
  bad[4].B = B5.gpu();
  dwt::check_throws_with<dw::shape_error>([&] { dw::cuda::gemm_grouped<T>(ctx, bad); },
                                          {"deltaw::cuda::gemm_grouped", "op(A) is [2, 0]"});
  CHECK(dwt::rel_err(third->C1.dev_d(), twin<T>(C1i).host_d()) == 0.0);
}

/// Adapters of given slice ranks over [out, in] (B column-major for even a, A for odd a),
/// scale 1.5/(a + 1): as one low_rank each and as a sliced_lora of column blocks of B and
/// row blocks of A (as the pool hands them out); ΔW_a = s·B·A in double.
template <class T>
struct sliced_set {
  std::vector<std::unique_ptr<twin<T>>> B, A;
  std::vector<dw::low_rank<T, dw::device::cuda>> whole;
  std::vector<dw::serve::sliced_lora<T, dw::device::cuda>> sliced;
  std::vector<MatD> delta;
  sliced_set(index_t out, index_t in, const std::vector<std::vector<index_t>>& slices, std::uint64_t seed) {
    for (std::size_t a = 0; a < slices.size(); ++a) {
      index_t r = 0;
      for (const index_t ri : slices[a]) r += ri;
      const double s = 1.5 / double(a + 1);
      B.push_back(std::make_unique<twin<T>>(dwt::random(out, r, seed + 2 * a), a % 2 == 0));
      A.push_back(std::make_unique<twin<T>>(dwt::random(r, in, seed + 2 * a + 1), a % 2 == 1));
      whole.push_back(dw::lora(B.back()->gpu(), A.back()->gpu(), dw::scale(s)));
      std::vector<dw::low_rank<T, dw::device::cuda>> parts;
      index_t c0 = 0;
      for (const index_t ri : slices[a]) {
        parts.push_back(dw::lora(B.back()->gpu().middle_cols(c0, ri), A.back()->gpu().middle_rows(c0, ri), dw::scale(s)));
        c0 += ri;
      }
      sliced.emplace_back(std::move(parts));
      delta.push_back(s * B.back()->host_d() * A.back()->host_d());
    }
  }
};

std::vector<pattern> grouped_patterns() {
  return {
      // Every group scattered (at least two tokens, none consecutive), tokens without an adapter.
      {"scattered", {0, 1, 2, 3, -1, 0, 1, 2, 3, 1, -1, 3, 2, 0, 2, 1}},
      // Every group consecutive rows.
      {"consecutive", {3, 3, 3, 3, 3, 0, 0, 1, 1, 1, 1, 1, -1, -1, 2, 2, 2}},
      // Both, single tokens, an adapter unused (1).
      {"mixed", {2, 2, 2, 0, 3, 0, -1, 3, 3, 0, 2, -1, 2, 2}},
  };
}

template <class T>
void segments_grouped_cases() {
  dw::cuda::context ctx;
  const index_t out = 80, in = 72;
  const sliced_set<T> set(out, in, {{8}, {8, 8}, {8, 16, 8}, {32, 32}}, 700);  // ranks 8, 16, 32, 64
  std::uint64_t seed = 800;
  dw::serve::batch_options o;
  o.how = dw::serve::strategy::segments;
  for (const pattern& p : grouped_patterns()) {
    for (bool cm : {false, true}) {
      INFO(p.name);
      CAPTURE(cm);
      seed += 10;
      const index_t tokens = index_t(p.aot.size());
      twin<T> W(dwt::random(out, in, seed), cm), X(dwt::random(tokens, in, seed + 1), cm);
      const MatD ref = reference(W.host_d(), set.delta, p.aot, X.host_d());
      auto Y1 = dwcuda::nan_output<T>(tokens, out, !cm), Y2 = dwcuda::nan_output<T>(tokens, out, cm);
      CHECK(dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.whole, p.aot, X.gpu(), Y1.gpu(), o) ==
            dw::serve::strategy::segments);
      CHECK(dwt::rel_err(Y1.dev_d(), ref) <= gtol<T>());
      dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.sliced, p.aot, X.gpu(), Y2.gpu(), o);  // three waves
      CHECK(dwt::rel_err(Y2.dev_d(), ref) <= gtol<T>());
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    // X stored in bf16 (every group's rows gathered and converted), and bf16 adapters (the
    // per-adapter loop): against the reference from the stored values.
    const auto all = grouped_patterns();
    const pattern& p = all[2];
    const index_t tokens = index_t(p.aot.size());
    twin<T> W(dwt::random(out, in, 1));
    twin<dw::bf16> Xb(dwt::random(tokens, in, 2));
    auto Y = dwcuda::nan_output<T>(tokens, out, false);
    dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.sliced, p.aot, Xb.gpu(), Y.gpu(), o);
    CHECK(dwt::rel_err(Y.dev_d(), reference(W.host_d(), set.delta, p.aot, Xb.host_d())) <= gtol<T>());
    const sliced_set<dw::bf16> b16(out, in, {{8}, {8, 8}, {8, 16, 8}, {32, 32}}, 900);
    auto Yb = dwcuda::nan_output<T>(tokens, out, true);
    dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), b16.sliced, p.aot, Xb.gpu(), Yb.gpu(), o);
    CHECK(dwt::rel_err(Yb.dev_d(), reference(W.host_d(), b16.delta, p.aot, Xb.host_d())) <= gtol<T>());
  }
  // Scratch: far below one out × in matrix at a serving shape (few tokens, wide layers).
  {
    const index_t o2 = 512, i2 = 384;
    const sliced_set<T> big(o2, i2, {{8}, {8, 8}, {8, 16, 8}, {32, 32}}, 950);
    const auto all = grouped_patterns();
    const pattern& p = all[0];
    const index_t tokens = index_t(p.aot.size());
    twin<T> W(dwt::random(o2, i2, 3)), X(dwt::random(tokens, i2, 4));
    auto Y = dwcuda::nan_output<T>(tokens, o2, false);
    dw::cuda::context fresh;
    dw::cuda::serve::apply_lora_batch(fresh, W.gpu(), big.sliced, p.aot, X.gpu(), Y.gpu(), o);
    CHECK(dwt::rel_err(Y.dev_d(), reference(W.host_d(), big.delta, p.aot, X.host_d())) <= gtol<T>());
    CHECK(fresh.scratch_high_water_bytes() < std::size_t(o2 * i2) * sizeof(T) / 4);
  }
}

template <class T>
bool same_bits(const twin<T>& a, const twin<T>& b) {
  return a.dev.to_vector() == b.dev.to_vector();
}

template <class T>
void device_indices_cases() {
  using dw::serve::strategy;
  dw::cuda::context ctx;
  const index_t out = 40, in = 36;
  const sliced_set<T> set(out, in, {{8}, {8, 8}, {8, 16, 8}, {32, 32}}, 1200);
  std::uint64_t seed = 1300;
  for (const pattern& p : grouped_patterns()) {
    const dwcuda::dev_indices daot(p.aot);
    for (bool sliced : {false, true}) {
      for (auto how : {strategy::segments, strategy::gather, strategy::automatic}) {
        INFO(p.name);
        CAPTURE(sliced);
        CAPTURE(int(how));
        seed += 10;
        const index_t tokens = index_t(p.aot.size());
        twin<T> W(dwt::random(out, in, seed)), X(dwt::random(tokens, in, seed + 1), sliced);
        auto Yh = dwcuda::nan_output<T>(tokens, out, false), Yd = dwcuda::nan_output<T>(tokens, out, false);
        dw::serve::batch_options o;
        o.how = how;
        o.segments_min_tokens = 3.5;  // automatic: segments for "consecutive", gather for the others
        strategy uh, ud;
        if (sliced) {
          uh = dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.sliced, p.aot, X.gpu(), Yh.gpu(), o);
          ud = dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.sliced, daot.gpu(), X.gpu(), Yd.gpu(), o);
        } else {
          uh = dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.whole, p.aot, X.gpu(), Yh.gpu(), o);
          ud = dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.whole, daot.gpu(), X.gpu(), Yd.gpu(), o);
        }
        CHECK(uh == ud);
        // The same products run for gather, and for segments when no group is consecutive rows.
        if (ud == strategy::gather || std::string(p.name) == "scattered") CHECK(same_bits(Yd, Yh));
        else CHECK(dwt::rel_err(Yd.dev_d(), Yh.dev_d()) <= (std::is_same_v<T, double> ? 1e-12 : 1e-5));
        CHECK(dwt::rel_err(Yd.dev_d(), reference(W.host_d(), set.delta, p.aot, X.host_d())) <= gtol<T>());
      }
    }
  }
  {
    // A long decode batch: the per-token offsets of gather span several chunks of the scan.
    const index_t tokens = 700;
    std::vector<index_t> aot(tokens);
    for (index_t t = 0; t < tokens; ++t) aot[std::size_t(t)] = (t * 7 + t / 5) % 5 - 1;  // −1 … 3
    const dwcuda::dev_indices daot(aot);
    twin<T> W(dwt::random(out, in, 31)), X(dwt::random(tokens, in, 32));
    auto Yh = dwcuda::nan_output<T>(tokens, out, true), Yd = dwcuda::nan_output<T>(tokens, out, true);
    for (auto how : {strategy::gather, strategy::segments}) {
      CAPTURE(int(how));
      dw::serve::batch_options o;
      o.how = how;
      dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.sliced, aot, X.gpu(), Yh.gpu(), o);
      dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.sliced, daot.gpu(), X.gpu(), Yd.gpu(), o);
      CHECK(same_bits(Yd, Yh));
      CHECK(dwt::rel_err(Yd.dev_d(), reference(W.host_d(), set.delta, aot, X.host_d())) <= gtol<T>());
    }
  }
  CHECK(dw::cuda::serve::apply_lora_batch(ctx, twin<T>(dwt::random(out, in, 1)).gpu(), set.whole,
                                          dwcuda::dev_indices(std::vector<index_t>{}).gpu(),
                                          dwcuda::nan_output<T>(0, in, false).gpu(),
                                          dwcuda::nan_output<T>(0, out, false).gpu()) == strategy::gather);

  // An index outside [−1, N): the host overload's error, before Y is written.
  twin<T> W(dwt::random(out, in, 5)), X(dwt::random(6, in, 6));
  for (const std::vector<index_t>& bad : {std::vector<index_t>{0, 1, 4, 0, 5, 3}, std::vector<index_t>{0, 1, -2, 0, 9, 3}}) {
    const dwcuda::dev_indices dbad(bad);
    const std::string want = "token 2 names adapter " + std::to_string(bad[2]) + " but the batch has 4 adapters";
    for (auto how : {strategy::segments, strategy::gather, strategy::automatic}) {
      CAPTURE(int(how));
      dw::serve::batch_options o;
      o.how = how;
      auto Y = dwcuda::nan_output<T>(6, out, false);
      dwt::check_throws_with<dw::argument_error>(
          [&] { dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.whole, dbad.gpu(), X.gpu(), Y.gpu(), o); },
          {want, "deltaw::cuda::serve::apply_lora_batch"});
      dwt::check_throws_with<dw::argument_error>(
          [&] { dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.whole, bad, X.gpu(), Y.gpu(), o); }, {want});
      CHECK(Y.dev_d().array().isNaN().all());
    }
  }
  const dwcuda::dev_indices short_list(std::vector<index_t>{0, 1});
  auto Y = dwcuda::nan_output<T>(6, out, false);
  dwt::check_throws_with<dw::shape_error>(
      [&] { dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.whole, short_list.gpu(), X.gpu(), Y.gpu()); },
      {"2 adapter indices for X with 6 tokens"});
}

}  // namespace cuda_serve_test

TEST_CASE_TEMPLATE("cuda: the shim's grouped batched GEMM against a double reference, and its argument checks", T,
                   float, double) {
  cuda_serve_test::shim_grouped_cases<T>();
}

TEST_CASE_TEMPLATE("cuda: gemm_grouped in one grouped call equals per-problem gemm", T, float, double) {
  cuda_serve_test::gemm_grouped_cases<T>();
}

TEST_CASE_TEMPLATE("cuda: segments by grouped GEMMs (mixed ranks, sliced adapters) against a per-token reference", T,
                   float, double) {
  cuda_serve_test::segments_grouped_cases<T>();
}

TEST_CASE_TEMPLATE("cuda: adapter indices in device memory give the host overload's results and errors", T, float,
                   double) {
  cuda_serve_test::device_indices_cases<T>();
}

