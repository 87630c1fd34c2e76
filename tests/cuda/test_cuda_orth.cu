// SPDX-License-Identifier: MIT
// The rotation update types on CUDA (cuda/include/deltaw/cuda/updates_orth.cuh): OFT, BOFT
// and RoAd through the evaluators and VJPs written once (deltaw/backend/cpu/oft.hpp,
// boft.hpp, road.hpp and their _vjp.hpp run with a cuda::context), against the CPU backend
// on the same stored values. For each: apply (ΔW alone, W + ΔW), apply_transposed,
// materialize, frobenius_norm, merge, unmerge, merge_checked and backward (every gradient
// slot and dX), in float and double, row- and column-major, tokens = 0, 1 and more than the
// block size; OFT with one Q row per block and shared, Cayley and Cayley–Neumann; BOFT with
// 1, 2 and 3 butterfly factors (permutations gathered on the device); RoAd's three variants
// and several group sizes; the rotation blocks computed from device parameters equal the
// CPU's bit for bit; lazy sums with other types; unmerges that cannot be undone refused
// before W is touched; the scratch high-water mark (no out × in scratch).
// In the nvcc build it joins test_cuda_lora, whose test_cuda_lora.cu skips (exit 77)
// without a usable device.
#include <deltaw/cuda/cuda.hpp>
#include <deltaw/cuda/updates_orth.cuh>
#include <deltaw/cuda/vjp.cuh>
#include <deltaw/deltaw.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "cuda_test_util.cuh"
#include "cuda_update_check.cuh"
#include "test_util.hpp"

namespace dw = deltaw;

namespace cuda_orth_test {

using dw::index_t;
using dwcuda::check_update;
using dwcuda::check_vjp;
using dwcuda::random_vec;
using dwcuda::slot;
using dwcuda::twin;
using dwcuda::vtwin;
using dwt::MatD;

/// The cached rotation blocks of the device-built and the CPU-built update: the same bits.
template <class UG, class UC>
bool same_rotations(const UG& ug, const UC& uc) {
  const auto& a = *ug.rotations();
  const auto& b = *uc.rotations();
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
}

struct oft_case {
  index_t out, in, b, tokens;
  bool shared, neumann;
};
// Odd out, b = 2 and 3, one shared row, tokens 0, 1 and more than b.
const oft_case oft_cases[] = {{7, 12, 4, 5, false, true}, {6, 9, 3, 0, false, false}, {5, 8, 2, 1, true, true},
                              {9, 12, 3, 13, true, false}};

struct boft_case {
  index_t out, in, b, m, tokens;
};
// m = 1 with an odd block size, m = 2 and 3 (butterfly permutations); tokens 0, 1, > b.
const boft_case boft_cases[] = {{5, 9, 3, 1, 4}, {6, 8, 2, 2, 0}, {7, 16, 2, 3, 9}, {8, 16, 4, 2, 1}};

struct road_case {
  index_t out, in, g, tokens;
  dw::road_variant v;
};
const road_case road_cases[] = {{8, 5, 4, 6, dw::road_variant::road_1},
                                {6, 7, 2, 0, dw::road_variant::road_2},
                                {12, 3, 6, 1, dw::road_variant::road_4},
                                {12, 9, 4, 17, dw::road_variant::road_2}};

template <class T>
void oft_cases_run(dw::cuda::context& ctx, std::uint64_t seed) {
  for (const oft_case& c : oft_cases) {
    for (bool cm : {false, true}) {
      seed += 20;
      const index_t ne = c.b * (c.b - 1) / 2, nq = c.shared ? 1 : c.in / c.b;
      const dw::oft_options o{c.neumann, 5};
      twin<T> W(dwt::random(c.out, c.in, seed + 1), cm), Q(MatD(0.4 * dwt::random(nq, ne, seed + 2)), !cm);
      INFO("oft b " << c.b << " shared " << c.shared << " neumann " << c.neumann);
      const auto ug = dw::cuda::oft(ctx, W.gpu(), Q.gpu(), o);
      const auto uc = dw::oft(W.cpu(), Q.cpu(), o);
      CHECK(same_rotations(ug, uc));
      check_update<T>(ctx, ug, uc, c.tokens, cm, seed, &W);
      check_vjp<T>(ctx, ug, uc, {{nq, ne}}, c.tokens, cm, seed + 7);
    }
  }
}

template <class T>
void boft_cases_run(dw::cuda::context& ctx, std::uint64_t seed) {
  for (const boft_case& c : boft_cases) {
    for (bool cm : {false, true}) {
      seed += 20;
      const index_t rows = c.m * c.in;  // m·nb·b
      twin<T> W(dwt::random(c.out, c.in, seed + 1), cm), R(MatD(0.4 * dwt::random(rows, c.b, seed + 2)), !cm);
      const vtwin<T> s(random_vec(c.out, seed + 3, 0.5, 1.5));
      INFO("boft b " << c.b << " m " << c.m);
      const auto ug = dw::cuda::boft(ctx, W.gpu(), R.gpu(), s.gpu());
      const auto uc = dw::boft(W.cpu(), R.cpu(), s.cpu());
      CHECK(same_rotations(ug, uc));
      check_update<T>(ctx, ug, uc, c.tokens, cm, seed, &W);
      // The gradient of s as [out, 1] and as [1, out].
      check_vjp<T>(ctx, ug, uc, {{rows, c.b}, dwcuda::vector_slot(c.out, !cm)}, c.tokens, cm, seed + 7);
    }
  }
}

template <class T>
void road_cases_run(dw::cuda::context& ctx, std::uint64_t seed) {
  for (const road_case& c : road_cases) {
    for (bool cm : {false, true}) {
      seed += 20;
      const index_t n = dw::road_parameter_size(c.v, c.out);
      twin<T> W(dwt::random(c.out, c.in, seed + 1), cm);
      const vtwin<T> th(MatD(2.0 * dwt::random(n, 1, seed + 2))), al(random_vec(n, seed + 3, 0.5, 1.5));
      INFO("road " << dw::road_variant_name(c.v) << " g " << c.g);
      const auto ug = dw::road(W.gpu(), th.gpu(), al.gpu(), c.v, c.g);
      const auto uc = dw::road(W.cpu(), th.cpu(), al.cpu(), c.v, c.g);
      check_update<T>(ctx, ug, uc, c.tokens, cm, seed, &W);
      check_vjp<T>(ctx, ug, uc, {dwcuda::vector_slot(n, cm), dwcuda::vector_slot(n, !cm)}, c.tokens, cm, seed + 7);
    }
  }
}

/// The largest single scratch request and the high-water mark of one backward call with
/// every slot and dX present.
template <class T, class UG>
std::pair<std::size_t, std::size_t> backward_scratch(const UG& ug, const std::vector<slot>& slots, index_t tokens,
                                                     std::uint64_t seed) {
  dw::cuda::context ctx;
  const index_t out = ug.rows(), in = ug.cols();
  twin<T> X(dwt::random(tokens, in, seed + 1)), dY(dwt::random(tokens, out, seed + 2)), dX(MatD::Zero(tokens, in));
  std::vector<std::unique_ptr<twin<T>>> g;
  std::vector<dw::matrix_view<T, dw::device::cuda>> v;
  for (const slot& s : slots) {
    g.push_back(std::make_unique<twin<T>>(MatD::Zero(s.rows, s.cols)));
    v.push_back(g.back()->gpu());
  }
  ctx.reset_scratch_statistics();
  dw::cuda::backward<T>(ctx, ug, X.gpu(), dY.gpu(), std::span<const dw::matrix_view<T, dw::device::cuda>>(v), dX.gpu());
  return {ctx.largest_scratch_request_bytes(), ctx.scratch_high_water_bytes()};
}

}  // namespace cuda_orth_test

TEST_CASE_TEMPLATE("cuda: OFT, BOFT and RoAd (and their backward) match the CPU backend", T, float, double) {
  dw::cuda::context ctx;
  cuda_orth_test::oft_cases_run<T>(ctx, 4100);
  cuda_orth_test::boft_cases_run<T>(ctx, 4300);
  cuda_orth_test::road_cases_run<T>(ctx, 4500);
}

TEST_CASE_TEMPLATE("cuda: lazy sums with OFT, BOFT and RoAd match the CPU backend", T, float, double) {
  using namespace cuda_orth_test;
  dw::cuda::context ctx;
  const index_t out = 12, in = 8, r = 2;
  for (index_t tokens : {0, 1, 9}) {
    for (bool cm : {false, true}) {
      CAPTURE(tokens);
      CAPTURE(cm);
      const std::uint64_t seed = 4700 + std::uint64_t(tokens) * 10 + (cm ? 1 : 0);
      twin<T> W(dwt::random(out, in, seed), cm), W2(dwt::random(out, in, seed + 1), !cm), X(dwt::random(tokens, in, seed + 2), !cm);
      twin<T> B(dwt::random(out, r, seed + 3), cm), A(dwt::random(r, in, seed + 4), !cm);
      twin<T> Q(MatD(0.4 * dwt::random(2, 6, seed + 5)), cm), R(MatD(0.4 * dwt::random(2 * in, 2, seed + 6)), !cm);
      const vtwin<T> s(random_vec(out, seed + 7, 0.5, 1.5)), th(random_vec(out / 2, seed + 8)), al(random_vec(out / 2, seed + 9, 0.5, 1.5));
      const vtwin<T> na(random_vec(3, seed + 10)), nb(random_vec(2, seed + 11));
      // W + OFT over W + RoAd over another weight + LoRA.
      auto Yg = dwcuda::nan_output<T>(tokens, out, cm), Yc = dwcuda::nan_output<T>(tokens, out, cm);
      dw::apply(ctx,
                W.gpu() + dw::cuda::oft(ctx, W.gpu(), Q.gpu()) + dw::road(W2.gpu(), th.gpu(), al.gpu(), dw::road_variant::road_1, 4) +
                    dw::lora(B.gpu(), A.gpu(), dw::alpha(2.0)),
                X.gpu(), Yg.gpu());
      dw::apply(W.cpu() + dw::oft(W.cpu(), Q.cpu()) + dw::road(W2.cpu(), th.cpu(), al.cpu(), dw::road_variant::road_1, 4) +
                    dw::lora(B.cpu(), A.cpu(), dw::alpha(2.0)),
                X.cpu(), Yc.cpu());
      CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= dwcuda::upd_cpu_tol<T>());
      // W + BOFT (two butterfly factors) over W + NOLA; W + RoAd over W + OFT over another weight.
      auto Zg = dwcuda::nan_output<T>(tokens, out, !cm), Zc = dwcuda::nan_output<T>(tokens, out, !cm);
      dw::apply(ctx, W.gpu() + dw::cuda::boft(ctx, W.gpu(), R.gpu(), s.gpu()) + dw::nola(out, in, r, seed, na.gpu(), nb.gpu()),
                X.gpu(), Zg.gpu());
      dw::apply(W.cpu() + dw::boft(W.cpu(), R.cpu(), s.cpu()) + dw::nola(out, in, r, seed, na.cpu(), nb.cpu()), X.cpu(), Zc.cpu());
      CHECK(dwt::rel_err(Zg.dev_d(), Zc.host_d()) <= dwcuda::upd_cpu_tol<T>());
      dw::apply(ctx,
                W.gpu() + dw::road(W.gpu(), th.gpu(), al.gpu(), dw::road_variant::road_1, 4) + dw::cuda::oft(ctx, W2.gpu(), Q.gpu()),
                X.gpu(), Zg.gpu());
      dw::apply(W.cpu() + dw::road(W.cpu(), th.cpu(), al.cpu(), dw::road_variant::road_1, 4) + dw::oft(W2.cpu(), Q.cpu()),
                X.cpu(), Zc.cpu());
      CHECK(dwt::rel_err(Zg.dev_d(), Zc.host_d()) <= dwcuda::upd_cpu_tol<T>());
    }
  }
}

TEST_CASE("cuda: BOFT and RoAd refuse an unmerge that cannot be undone, as on the CPU") {
  using namespace cuda_orth_test;
  using T = double;
  dw::cuda::context ctx;
  const index_t out = 8, in = 8;
  {  // BOFT with s[5] = 0: s is read on the host (downloaded) before anything is written.
    Eigen::VectorXd sv = random_vec(out, 1, 0.5, 1.5);
    sv(5) = 0.0;
    twin<T> W(dwt::random(out, in, 2)), R(MatD(0.4 * dwt::random(2 * in, 2, 3)));
    const vtwin<T> s(sv);
    const auto u = dw::cuda::boft(ctx, W.gpu(), R.gpu(), s.gpu());
    const MatD W0 = W.dev_d();
    CHECK_THROWS_AS(dw::unmerge(ctx, W.gpu(), u), dw::argument_error);
    CHECK((W.dev_d().array() == W0.array()).all());
  }
  {  // RoAd road_2 with α = 0 on both features of a pair: f = s = 0, det = 0.
    Eigen::VectorXd al = random_vec(out, 4, 0.5, 1.5);
    al(1) = al(3) = 0.0;  // group size 4: features 1 and 3 are a pair
    twin<T> W(dwt::random(out, in, 5));
    const vtwin<T> th(random_vec(out, 6)), a(al);
    const auto u = dw::road(W.gpu(), th.gpu(), a.gpu(), dw::road_variant::road_2, 4);
    const MatD W0 = W.dev_d();
    CHECK_THROWS_AS(dw::unmerge(ctx, W.gpu(), u), dw::argument_error);
    CHECK((W.dev_d().array() == W0.array()).all());
  }
}

TEST_CASE("cuda: OFT, BOFT and RoAd take no out × in scratch") {
  using namespace cuda_orth_test;
  using T = float;
  // out = 4096, in = 512, tokens = 8: a dense ΔW is 8 MiB. Merges work 256 rows of W at a
  // time (OFT, BOFT: panel_rows × in, independent of out), RoAd whole groups of about 32 K
  // entries; the whole-ΔW operations panels of 32 K or 64 K entries.
  const index_t out = 4096, in = 512, tokens = 8;
  const std::size_t dense_bytes = std::size_t(out * in) * sizeof(T);
  twin<T> W(dwt::random(out, in, 3));
  const auto run = [&](const std::string& name, const auto& u, std::size_t limit) {
    CAPTURE(name);
    const auto s = dwcuda::measure_scratch<T>(u, W, tokens);
    MESSAGE(name << ": scratch high-water (B):" << s.per_op << "; dense ΔW " << dense_bytes << " B");
    CAPTURE(s.per_op);
    CHECK(s.per_call > 0);
    CHECK(s.largest < dense_bytes / 8);
    CHECK(std::max(s.per_call, s.whole) < limit);
  };
  const auto check_backward = [&](const std::string& name, std::pair<std::size_t, std::size_t> s) {
    MESSAGE(name << " backward: largest scratch request " << s.first << " B, high-water " << s.second << " B; dense ΔW "
                 << dense_bytes << " B");
    CAPTURE(name);
    CHECK(s.second > 0);
    CHECK(s.first < dense_bytes / 8);
    CHECK(s.second < dense_bytes / 4);
  };
  {  // OFT, b = 32 (16 blocks).
    twin<T> Q(MatD(0.1 * dwt::random(16, 32 * 31 / 2, 4)));
    dw::cuda::context c;
    const auto u = dw::cuda::oft(c, W.gpu(), Q.gpu());
    run("oft (b = 32)", u, dense_bytes / 4);
    check_backward("oft (b = 32)", backward_scratch<T>(u, {{16, 32 * 31 / 2}}, tokens, 5));
  }
  {  // BOFT, m = 2, b = 16 (32 blocks per factor).
    twin<T> R(MatD(0.1 * dwt::random(2 * in, 16, 6)));
    const vtwin<T> s(random_vec(out, 7, 0.5, 1.5));
    dw::cuda::context c;
    const auto u = dw::cuda::boft(c, W.gpu(), R.gpu(), s.gpu());
    // Merge: the panel's copy and the butterfly's two buffers (3 × 256 × in) and, in the
    // first merge on this context, the tails of the arena chunks it outgrew (counted in
    // the high-water mark): a third of ΔW at out = 4096, a smaller share for larger out.
    run("boft (m = 2, b = 16)", u, dense_bytes / 3);
    check_backward("boft (m = 2, b = 16)", backward_scratch<T>(u, {{2 * in, 16}, {out, 1}}, tokens, 8));
  }
  {  // RoAd, road_1, group size 64.
    const vtwin<T> th(random_vec(out / 2, 9)), al(random_vec(out / 2, 10, 0.5, 1.5));
    const auto u = dw::road(W.gpu(), th.gpu(), al.gpu(), dw::road_variant::road_1, 64);
    run("road (road_1, g = 64)", u, dense_bytes / 4);
    check_backward("road (road_1, g = 64)", backward_scratch<T>(u, {{1, out / 2}, {1, out / 2}}, tokens, 11));
  }
}
