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

TEST_CASE("cuda: apply_grouped serves a variant of update types like the CPU") {
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
  }
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
