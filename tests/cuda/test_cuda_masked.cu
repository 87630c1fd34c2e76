// SPDX-License-Identifier: MIT
// Masked composition on CUDA (cuda/include/deltaw/cuda/serve_masked.cuh): apply_masked and
// masked_backward against the CPU's deltaw::serve (same stored values), a dense per-token
// reference in double and central differences; one-hot masks against apply_lora_batch;
// LoRA of mixed ranks, the pool's sliced_lora, and a std::variant with LoKr and VeRA; zero
// columns, zero tokens, no updates; the errors; the scratch high-water marks.
// In the nvcc build it joins test_cuda_lora, whose test_cuda_lora.cu skips (exit 77)
// without a usable device.
#include <deltaw/cuda/cuda.hpp>
#include <deltaw/cuda/serve_masked.cuh>
#include <deltaw/deltaw.hpp>
#include <deltaw/serve/masked.hpp>

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "cuda_test_util.cuh"
#include "cuda_update_check.cuh"
#include "test_util.hpp"

namespace dw = deltaw;

namespace cuda_masked_test {

using dw::index_t;
using dwcuda::twin;
using dwcuda::vtwin;
using dwt::MatD;
using GPU = dw::device::cuda;

/// Against the CPU's serve on the same stored values, and against a dense double reference.
template <class T>
constexpr double tol() {
  return std::is_same_v<T, double> ? 1e-12 : 1e-5;
}

/// Soft masks with exact zeros (a fraction `zeros` of the entries), some negative or above
/// one, and an all-zero last column when K > 2.
MatD soft_masks(index_t tokens, index_t K, std::uint64_t seed, double zeros = 0.3) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(0, 1);
  MatD M(tokens, K);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t k = 0; k < K; ++k) M(t, k) = u(g) < zeros ? 0.0 : 2 * u(g) - 0.5;
  if (K > 2) M.col(K - 1).setZero();
  return M;
}

/// Y = X·Wᵀ + Σ_k diag(M(:, k))·X·ΔW_kᵀ, dense, in double.
MatD reference(const MatD& W, const std::vector<MatD>& dW, const MatD& M, const MatD& X) {
  MatD Y = X * W.transpose();
  for (std::size_t k = 0; k < dW.size(); ++k) Y += M.col(index_t(k)).asDiagonal() * (X * dW[k].transpose());
  return Y;
}

/// LoRA adapters of ranks `ranks` over [out, in], held on both sides; scales 0.5 + 0.3·a,
/// negative for a = 1.
template <class T>
struct loras : dwcuda::lora_twins<T> {
  loras(index_t out, index_t in, const std::vector<index_t>& ranks, std::uint64_t seed)
      : dwcuda::lora_twins<T>(out, in, ranks, seed,
                              [](std::size_t a) { return dw::scale(a == 1 ? -0.7 : 0.5 + 0.3 * double(a)); }) {}
};

template <class T>
using lokr_gpu_t = decltype(dw::lokr(std::declval<twin<T>&>().gpu(), std::declval<twin<T>&>().gpu(), dw::alpha(8), 4));
template <class T>
using lokr_cpu_t = decltype(dw::lokr(std::declval<twin<T>&>().cpu(), std::declval<twin<T>&>().cpu(), dw::alpha(8), 4));
template <class T>
using vera_gpu_t = decltype(dw::vera(std::declval<const dw::vera_basis&>(), index_t(), index_t(),
                                     std::declval<const vtwin<T>&>().gpu(), std::declval<const vtwin<T>&>().gpu()));
template <class T>
using vera_cpu_t = decltype(dw::vera(std::declval<const dw::vera_basis&>(), index_t(), index_t(),
                                     std::declval<const vtwin<T>&>().cpu(), std::declval<const vtwin<T>&>().cpu()));

/// LoRA (r = 3), LoKr (3 × 2 ⊗ 4 × 5, dense factors), VeRA (r = 6), LoRA (r = 5) over
/// [12, 10], as std::variants on both sides.
template <class T>
struct mixed {
  static constexpr index_t out = 12, in = 10, K = 4;
  loras<T> set{out, in, {3, 5}, 500};
  twin<T> w1{dwt::random(3, 2, 510)}, w2{dwt::random(4, 5, 511), true};
  dw::vera_basis basis = dw::vera_shared_basis(7, 6, out + 3, in + 2);
  vtwin<T> ld{dwt::random(6, 1, 512)}, lb{dwt::random(out, 1, 513)};

  lokr_gpu_t<T> lokr_g() { return dw::lokr(w1.gpu(), w2.gpu(), dw::alpha(8), 4); }
  lokr_cpu_t<T> lokr_c() { return dw::lokr(w1.cpu(), w2.cpu(), dw::alpha(8), 4); }
  vera_gpu_t<T> vera_g() const { return dw::vera(basis, out, in, ld.gpu(), lb.gpu()); }
  vera_cpu_t<T> vera_c() const { return dw::vera(basis, out, in, ld.cpu(), lb.cpu()); }
  using VG = std::variant<dw::low_rank<T, GPU>, lokr_gpu_t<T>, vera_gpu_t<T>>;
  using VC = std::variant<dw::low_rank<T>, lokr_cpu_t<T>, vera_cpu_t<T>>;
  std::vector<VG> gpu() { return {set.gpu[0], lokr_g(), vera_g(), set.gpu[1]}; }
  std::vector<VC> cpu() { return {set.cpu[0], lokr_c(), vera_c(), set.cpu[1]}; }
  std::vector<MatD> dense() {
    std::vector<MatD> d;
    for (const auto& v : cpu())
      d.push_back(std::visit([](const auto& u) { return MatD(dw::materialize(u).template cast<double>()); }, v));
    return d;
  }
  /// The factor slots of each update (cpu::vjp's order and shapes).
  static std::vector<std::vector<dwcuda::slot>> slots() {
    return {{{out, 3}, {3, in}}, {{3, 2}, {4, 5}}, {dwcuda::vector_slot(6, false), dwcuda::vector_slot(out, false)},
            {{out, 5}, {5, in}}};
  }
};

/// Gradient buffers on both sides with the same starting values.
template <class T>
struct grad_pair {
  std::vector<std::vector<std::unique_ptr<twin<T>>>> g, c;
  dw::cuda::serve::masked_grads<T> gpu;
  dw::serve::masked_grads<T> cpu;
  /// One list per update (`skip[k]`: an empty list for update k); none at all when
  /// !factors. Starting values: random from `seed`, or zeros when seed = 0.
  grad_pair(const std::vector<std::vector<dwcuda::slot>>& shapes, bool factors, const std::vector<bool>& skip,
            std::uint64_t seed) {
    if (!factors) return;
    for (std::size_t k = 0; k < shapes.size(); ++k) {
      g.emplace_back();
      c.emplace_back();
      gpu.factors.emplace_back();
      cpu.factors.emplace_back();
      if (skip[k]) continue;
      for (std::size_t i = 0; i < shapes[k].size(); ++i) {
        const index_t nr = shapes[k][i].rows, nc = shapes[k][i].cols;
        const MatD v0 = seed == 0 ? MatD(MatD::Zero(nr, nc)) : dwt::random(nr, nc, seed + 10 * k + i);
        g[k].push_back(std::make_unique<twin<T>>(v0, i % 2 == 1));
        c[k].push_back(std::make_unique<twin<T>>(v0, i % 2 == 1));
        gpu.factors[k].push_back(g[k].back()->gpu());
        cpu.factors[k].push_back(c[k].back()->cpu());
      }
    }
  }
};

template <class T>
void lora_cases() {
  dw::cuda::context ctx;
  const index_t out = 19, in = 14;
  const loras<T> set(out, in, {1, 4, 7, 2}, 10);
  std::uint64_t seed = 100;
  for (const index_t tokens : {0, 1, 9, 33}) {
    for (const bool cm : {false, true}) {
      CAPTURE(tokens);
      CAPTURE(cm);
      seed += 10;
      twin<T> W(dwt::random(out, in, seed), !cm), X(dwt::random(tokens, in, seed + 1), cm),
          M(soft_masks(tokens, 4, seed + 2), !cm);
      auto Yg = dwcuda::nan_output<T>(tokens, out, cm), Yc = dwcuda::nan_output<T>(tokens, out, cm);
      dw::cuda::serve::apply_masked(ctx, W.gpu(), set.gpu, M.gpu(), X.gpu(), Yg.gpu());
      dw::serve::apply_masked(W.cpu(), set.cpu, M.cpu(), X.cpu(), Yc.cpu());
      CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= tol<T>());
      CHECK(dwt::rel_err(Yg.dev_d(), reference(W.host_d(), set.delta, M.host_d(), X.host_d())) <= tol<T>());
      // All-ones masks: the lazy sum W + ΔW_0 + … + ΔW_3.
      twin<T> ones(MatD::Ones(tokens, 4), cm);
      auto Y1 = dwcuda::nan_output<T>(tokens, out, !cm), Ys = dwcuda::nan_output<T>(tokens, out, !cm);
      dw::cuda::serve::apply_masked(ctx, W.gpu(), set.gpu, ones.gpu(), X.gpu(), Y1.gpu());
      dw::apply(ctx, W.gpu() + set.gpu[0] + set.gpu[1] + set.gpu[2] + set.gpu[3], X.gpu(), Ys.gpu());
      CHECK(dwt::rel_err(Y1.dev_d(), Ys.dev_d()) <= tol<T>());
    }
  }
}

template <class T>
void one_hot_cases() {
  dw::cuda::context ctx;
  const index_t out = 13, in = 10;
  const loras<T> set(out, in, {1, 3, 8, 4}, 300);
  const std::vector<std::vector<index_t>> patterns = {{2, 0, -1, 3, 2, 1, -1, 0, 3, 3, 1},
                                                      {1, 1, 1, 1, 3, 3, 3, 0, 0, 0, 0, 0, -1, -1, 2, 2, 2}};
  std::uint64_t seed = 400;
  for (const auto& aot : patterns) {
    for (auto how : {dw::serve::strategy::segments, dw::serve::strategy::gather}) {
      seed += 10;
      CAPTURE(int(how));
      const index_t tokens = index_t(aot.size());
      MatD H = MatD::Zero(tokens, 4);
      for (index_t t = 0; t < tokens; ++t)
        if (aot[std::size_t(t)] >= 0) H(t, aot[std::size_t(t)]) = 1.0;
      twin<T> W(dwt::random(out, in, seed)), X(dwt::random(tokens, in, seed + 1), true), M(H, true);
      auto Ym = dwcuda::nan_output<T>(tokens, out, false), Yb = dwcuda::nan_output<T>(tokens, out, false);
      dw::serve::batch_options o;
      o.how = how;
      dw::cuda::serve::apply_masked(ctx, W.gpu(), set.gpu, M.gpu(), X.gpu(), Ym.gpu());
      dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), set.gpu, aot, X.gpu(), Yb.gpu(), o);
      CHECK(dwt::rel_err(Ym.dev_d(), Yb.dev_d()) <= tol<T>());
    }
  }
}

template <class T>
void variant_forward_cases() {
  dw::cuda::context ctx;
  mixed<T> f;
  const auto ug = f.gpu();
  const auto uc = f.cpu();
  const auto dense = f.dense();
  std::uint64_t seed = 600;
  for (const index_t tokens : {1, 17}) {
    for (const bool cm : {false, true}) {
      CAPTURE(tokens);
      CAPTURE(cm);
      seed += 10;
      twin<T> W(dwt::random(mixed<T>::out, mixed<T>::in, seed), cm), X(dwt::random(tokens, mixed<T>::in, seed + 1), !cm),
          M(soft_masks(tokens, mixed<T>::K, seed + 2, 0.25), cm);
      auto Yg = dwcuda::nan_output<T>(tokens, mixed<T>::out, cm), Yc = dwcuda::nan_output<T>(tokens, mixed<T>::out, cm);
      dw::cuda::serve::apply_masked(ctx, W.gpu(), ug, M.gpu(), X.gpu(), Yg.gpu());
      dw::serve::apply_masked(W.cpu(), uc, M.cpu(), X.cpu(), Yc.cpu());
      CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= tol<T>());
      CHECK(dwt::rel_err(Yg.dev_d(), reference(W.host_d(), dense, M.host_d(), X.host_d())) <= tol<T>());
    }
  }
}

template <class T>
void backward_cases() {
  dw::cuda::context ctx;
  mixed<T> f;
  const auto ug = f.gpu();
  const auto uc = f.cpu();
  const auto dense = f.dense();
  const auto shapes = f.slots();
  std::uint64_t seed = 700;
  for (const index_t tokens : {1, 17}) {
    for (const bool cm : {false, true}) {
      // mode 0: dM, dX and the factors (the second LoRA's list empty: skipped); mode 1: dM
      // and dX, no factor lists; mode 2: the factors only.
      for (int mode = 0; mode < 3; ++mode) {
        CAPTURE(tokens);
        CAPTURE(cm);
        CAPTURE(mode);
        seed += 30;
        const MatD Md = soft_masks(tokens, mixed<T>::K, seed, 0.3);
        twin<T> W(dwt::random(mixed<T>::out, mixed<T>::in, seed + 1), !cm), X(dwt::random(tokens, mixed<T>::in, seed + 2), cm),
            M(Md, !cm), dY(dwt::random(tokens, mixed<T>::out, seed + 3), cm);
        const MatD dM0 = dwt::random(tokens, mixed<T>::K, seed + 4), dX0 = dwt::random(tokens, mixed<T>::in, seed + 5);
        twin<T> dMg(dM0, cm), dMc(dM0, cm), dXg(dX0, !cm), dXc(dX0, !cm);
        grad_pair<T> gp(shapes, mode != 1, {false, false, false, true}, seed + 6);
        if (mode != 2) {
          gp.gpu.dM = dMg.gpu();
          gp.cpu.dM = dMc.cpu();
          gp.gpu.dX = dXg.gpu();
          gp.cpu.dX = dXc.cpu();
        }
        dw::cuda::serve::masked_backward(ctx, W.gpu(), ug, M.gpu(), X.gpu(), dY.gpu(), gp.gpu);
        dw::serve::masked_backward<T>(W.cpu(), uc, M.cpu(), X.cpu(), dY.cpu(), gp.cpu);
        CHECK(dwt::rel_err(dMg.dev_d(), dMc.host_d()) <= tol<T>());
        CHECK(dwt::rel_err(dXg.dev_d(), dXc.host_d()) <= tol<T>());
        for (std::size_t k = 0; k < gp.g.size(); ++k)
          for (std::size_t i = 0; i < gp.g[k].size(); ++i) {
            INFO("update " << k << ", factor " << i);
            CHECK(dwt::rel_err(gp.g[k][i]->dev_d(), gp.c[k][i]->host_d()) <= tol<T>());
            if (Md.col(index_t(k)).cwiseAbs().maxCoeff() > 0)  // written
              CHECK(dwt::rel_err(gp.g[k][i]->dev_d(), gp.g[k][i]->host_d()) > 0);
          }
        if (mode == 2) {  // dM and dX absent: untouched
          CHECK((dMg.dev_d().array() == dMg.host_d().array()).all());
          CHECK((dXg.dev_d().array() == dXg.host_d().array()).all());
          continue;
        }
        // Dense formulas in double: dM(:, k) += rowdot(dY, X·D_kᵀ); dX += dY·W + Σ diag(M_k)·dY·D_k.
        const MatD Xh = X.host_d(), Gh = dY.host_d(), Mh = M.host_d();
        MatD dM_ref = dMg.host_d(), dX_ref = dXg.host_d() + Gh * W.host_d();
        for (index_t k = 0; k < mixed<T>::K; ++k) {
          dM_ref.col(k) += (Gh.array() * (Xh * dense[std::size_t(k)].transpose()).array()).rowwise().sum().matrix();
          dX_ref += Mh.col(k).asDiagonal() * Gh * dense[std::size_t(k)];
        }
        CHECK(dwt::rel_err(dMg.dev_d(), dM_ref) <= 10 * tol<T>());
        CHECK(dwt::rel_err(dXg.dev_d(), dX_ref) <= 10 * tol<T>());
        // The all-zero last column still has its gradient.
        CHECK(dMg.dev_d().col(mixed<T>::K - 1).cwiseAbs().maxCoeff() > 0);
        CHECK((dMg.dev_d() - dMg.host_d()).col(mixed<T>::K - 1).cwiseAbs().maxCoeff() > 0);
      }
    }
  }
}

/// sliced_lora (the CUDA pool's adapters) against the same LoRA whole: forward, and every
/// slice's gradients are the whole gradient's blocks.
template <class T>
void sliced_cases() {
  dw::cuda::context ctx;
  const index_t out = 13, in = 11, tokens = 10;
  const loras<T> set(out, in, {5, 3}, 200);
  const double s0 = set.gpu[0].scale();
  const auto B0 = set.B[0]->gpu();
  const auto A0 = set.A[0]->gpu();
  std::vector<dw::serve::sliced_lora<T, GPU>> sl;
  sl.emplace_back(std::vector<dw::low_rank<T, GPU>>{dw::lora(B0.middle_cols(0, 2), A0.middle_rows(0, 2), dw::scale(s0)),
                                                    dw::lora(B0.middle_cols(2, 3), A0.middle_rows(2, 3), dw::scale(s0))});
  sl.emplace_back(std::vector<dw::low_rank<T, GPU>>{set.gpu[1]});
  twin<T> W(dwt::random(out, in, 1)), X(dwt::random(tokens, in, 2), true), M(soft_masks(tokens, 2, 3), true),
      dY(dwt::random(tokens, out, 4));
  auto Ys = dwcuda::nan_output<T>(tokens, out, false), Yw = dwcuda::nan_output<T>(tokens, out, false);
  dw::cuda::serve::apply_masked(ctx, W.gpu(), sl, M.gpu(), X.gpu(), Ys.gpu());
  dw::cuda::serve::apply_masked(ctx, W.gpu(), set.gpu, M.gpu(), X.gpu(), Yw.gpu());
  CHECK(dwt::rel_err(Ys.dev_d(), Yw.dev_d()) <= tol<T>());
  CHECK(dwt::rel_err(Ys.dev_d(), reference(W.host_d(), set.delta, M.host_d(), X.host_d())) <= tol<T>());
  // Backward: slots {dB_a, dA_a, dB_b, dA_b} for the two slices against {dB, dA}.
  const std::vector<std::vector<dwcuda::slot>> sliced_shapes = {{{out, 2}, {2, in}, {out, 3}, {3, in}},
                                                                {{out, 3}, {3, in}}},
                                               whole_shapes = {{{out, 5}, {5, in}}, {{out, 3}, {3, in}}};
  grad_pair<T> gs(sliced_shapes, true, {false, false}, 0), gw(whole_shapes, true, {false, false}, 0);
  twin<T> dMs(MatD::Zero(tokens, 2)), dMw(MatD::Zero(tokens, 2)), dXs(MatD::Zero(tokens, in)),
      dXw(MatD::Zero(tokens, in));
  gs.gpu.dM = dMs.gpu();
  gs.gpu.dX = dXs.gpu();
  gw.gpu.dM = dMw.gpu();
  gw.gpu.dX = dXw.gpu();
  dw::cuda::serve::masked_backward(ctx, W.gpu(), sl, M.gpu(), X.gpu(), dY.gpu(), gs.gpu);
  dw::cuda::serve::masked_backward(ctx, W.gpu(), set.gpu, M.gpu(), X.gpu(), dY.gpu(), gw.gpu);
  CHECK(dwt::rel_err(dMs.dev_d(), dMw.dev_d()) <= tol<T>());
  CHECK(dwt::rel_err(dXs.dev_d(), dXw.dev_d()) <= tol<T>());
  const MatD dB = gw.g[0][0]->dev_d(), dA = gw.g[0][1]->dev_d();
  CHECK(dwt::rel_err(gs.g[0][0]->dev_d(), MatD(dB.leftCols(2))) <= tol<T>());
  CHECK(dwt::rel_err(gs.g[0][1]->dev_d(), MatD(dA.topRows(2))) <= tol<T>());
  CHECK(dwt::rel_err(gs.g[0][2]->dev_d(), MatD(dB.rightCols(3))) <= tol<T>());
  CHECK(dwt::rel_err(gs.g[0][3]->dev_d(), MatD(dA.bottomRows(3))) <= tol<T>());
  CHECK(dwt::rel_err(gs.g[1][0]->dev_d(), gw.g[1][0]->dev_d()) <= tol<T>());
  CHECK(dwt::rel_err(gs.g[1][1]->dev_d(), gw.g[1][1]->dev_d()) <= tol<T>());
  CHECK(dB.cwiseAbs().maxCoeff() > 0);
}

/// A small case whose loss L = ⟨dY, Y⟩ is evaluated on the device from host parameters.
struct fd_case {
  static constexpr index_t out = 6, in = 4, tokens = 3;
  MatD W = dwt::random(out, in, 1), X = dwt::random(tokens, in, 2), M = dwt::random(tokens, 3, 3),
       B0 = dwt::random(out, 2, 4), A0 = dwt::random(2, in, 5), w1 = dwt::random(2, 2, 6), w2 = dwt::random(3, 2, 7),
       B1 = dwt::random(out, 1, 8), A1 = dwt::random(1, in, 9), dY = dwt::random(tokens, out, 10);
  fd_case() { M(1, 0) = 0.0; }  // a zero weight still gets its gradient

  struct device {
    twin<double> W, X, M, B0, A0, w1, w2, B1, A1;
    explicit device(const fd_case& c)
        : W(c.W), X(c.X, true), M(c.M), B0(c.B0), A0(c.A0, true), w1(c.w1), w2(c.w2, true), B1(c.B1, true), A1(c.A1) {}
    auto updates() {
      using V = std::variant<dw::low_rank<double, GPU>, decltype(dw::lokr(w1.gpu(), w2.gpu(), dw::alpha(2), 1))>;
      return std::vector<V>{dw::lora(B0.gpu(), A0.gpu(), dw::scale(0.7)), dw::lokr(w1.gpu(), w2.gpu(), dw::alpha(2), 1),
                            dw::lora(B1.gpu(), A1.gpu(), dw::scale(-1.1))};
    }
  };

  double loss() const {
    dw::cuda::context ctx;
    device d(*this);
    auto Y = dwcuda::nan_output<double>(tokens, out, false);
    dw::cuda::serve::apply_masked(ctx, d.W.gpu(), d.updates(), d.M.gpu(), d.X.gpu(), Y.gpu());
    return (Y.dev_d().array() * dY.array()).sum();
  }
};

}  // namespace cuda_masked_test

TEST_CASE_TEMPLATE("cuda masked: LoRA of mixed ranks under soft masks matches the CPU's apply_masked and a dense "
                   "reference",
                   T, float, double) {
  cuda_masked_test::lora_cases<T>();
}

TEST_CASE_TEMPLATE("cuda masked: one-hot masks give apply_lora_batch (both strategies)", T, float, double) {
  cuda_masked_test::one_hot_cases<T>();
}

TEST_CASE_TEMPLATE("cuda masked: a variant of LoRA, LoKr, VeRA and LoRA under soft masks matches the CPU", T, float,
                   double) {
  cuda_masked_test::variant_forward_cases<T>();
}

TEST_CASE_TEMPLATE("cuda masked_backward: dM, factor gradients and dX match the CPU's masked_backward and dense "
                   "formulas",
                   T, float, double) {
  cuda_masked_test::backward_cases<T>();
}

TEST_CASE_TEMPLATE("cuda masked: the pool's sliced_lora equals the same LoRA whole, forward and backward", T, float,
                   double) {
  cuda_masked_test::sliced_cases<T>();
}

TEST_CASE("cuda masked_backward: central differences of ⟨dY, Y⟩ for M, X and every factor (double)") {
  using namespace cuda_masked_test;
  fd_case fc;
  dw::cuda::context ctx;
  fd_case::device d(fc);
  const auto u = d.updates();
  twin<double> dY(fc.dY), dM(MatD::Zero(fd_case::tokens, 3)), dX(MatD::Zero(fd_case::tokens, fd_case::in), true);
  std::vector<std::unique_ptr<twin<double>>> g;
  const std::vector<std::pair<index_t, index_t>> shapes = {{fd_case::out, 2}, {2, fd_case::in}, {2, 2}, {3, 2}, {fd_case::out, 1}, {1, fd_case::in}};
  for (std::size_t i = 0; i < shapes.size(); ++i)
    g.push_back(std::make_unique<twin<double>>(MatD::Zero(shapes[i].first, shapes[i].second), i % 2 == 0));
  dw::cuda::serve::masked_grads<double> grads;
  grads.dM = dM.gpu();
  grads.dX = dX.gpu();
  grads.factors = {{g[0]->gpu(), g[1]->gpu()}, {g[2]->gpu(), g[3]->gpu()}, {g[4]->gpu(), g[5]->gpu()}};
  dw::cuda::serve::masked_backward(ctx, d.W.gpu(), u, d.M.gpu(), d.X.gpu(), dY.gpu(), grads);
  // L is linear in each single entry, so a central difference is exact up to rounding.
  const double h = 1e-4;
  const auto check = [&](const char* name, MatD fd_case::*p, const MatD& grad) {
    INFO(name);
    MatD& P = fc.*p;
    double worst = 0;
    for (index_t i = 0; i < P.rows(); ++i)
      for (index_t j = 0; j < P.cols(); ++j) {
        const double v = P(i, j);
        P(i, j) = v + h;
        const double lp = fc.loss();
        P(i, j) = v - h;
        const double lm = fc.loss();
        P(i, j) = v;
        worst = std::max(worst, std::abs((lp - lm) / (2 * h) - grad(i, j)) / std::max(1.0, std::abs(grad(i, j))));
      }
    CHECK(worst <= 1e-8);
    CHECK(grad.cwiseAbs().maxCoeff() > 0);
  };
  check("M", &fd_case::M, dM.dev_d());
  check("X", &fd_case::X, dX.dev_d());
  check("B0", &fd_case::B0, g[0]->dev_d());
  check("A0", &fd_case::A0, g[1]->dev_d());
  check("w1", &fd_case::w1, g[2]->dev_d());
  check("w2", &fd_case::w2, g[3]->dev_d());
  check("B1", &fd_case::B1, g[4]->dev_d());
  check("A1", &fd_case::A1, g[5]->dev_d());
  CHECK(dM.dev_d()(1, 0) != 0.0);
}

TEST_CASE("cuda masked: zero columns, zero tokens and no updates") {
  using namespace cuda_masked_test;
  using T = double;
  dw::cuda::context ctx;
  mixed<T> f;
  const auto ug = f.gpu();
  const index_t tokens = 11;
  // Column 1 (LoKr) all zero: the same output as without that update, bit for bit.
  MatD Md = soft_masks(tokens, mixed<T>::K, 5, 0.2);
  Md.col(1).setZero();
  MatD M3(tokens, 3);
  M3 << Md.col(0), Md.col(2), Md.col(3);
  twin<T> W(dwt::random(mixed<T>::out, mixed<T>::in, 1)), X(dwt::random(tokens, mixed<T>::in, 2)), M(Md), Mr(M3, true);
  const std::vector<typename mixed<T>::VG> without = {ug[0], ug[2], ug[3]};
  auto Ya = dwcuda::nan_output<T>(tokens, mixed<T>::out, false), Yb = dwcuda::nan_output<T>(tokens, mixed<T>::out, false);
  dw::cuda::serve::apply_masked(ctx, W.gpu(), ug, M.gpu(), X.gpu(), Ya.gpu());
  dw::cuda::serve::apply_masked(ctx, W.gpu(), without, Mr.gpu(), X.gpu(), Yb.gpu());
  CHECK((Ya.dev_d().array() == Yb.dev_d().array()).all());
  // Zero tokens: nothing written, no error; the factor slots keep their values.
  {
    twin<T> X0(MatD(0, mixed<T>::in)), M0(MatD(0, mixed<T>::K)), dY0(MatD(0, mixed<T>::out)), dM0(MatD(0, mixed<T>::K)), dX0(MatD(0, mixed<T>::in));
    auto Y0 = dwcuda::nan_output<T>(0, mixed<T>::out, false);
    dw::cuda::serve::apply_masked(ctx, W.gpu(), ug, M0.gpu(), X0.gpu(), Y0.gpu());
    grad_pair<T> gp(f.slots(), true, {false, false, false, false}, 9);
    gp.gpu.dM = dM0.gpu();
    gp.gpu.dX = dX0.gpu();
    dw::cuda::serve::masked_backward(ctx, W.gpu(), ug, M0.gpu(), X0.gpu(), dY0.gpu(), gp.gpu);
    for (auto& list : gp.g)
      for (auto& t : list) CHECK((t->dev_d().array() == t->host_d().array()).all());
  }
  // No updates (K = 0): Y = X·Wᵀ, as on the CPU.
  {
    const std::vector<typename mixed<T>::VG> none;
    const std::vector<typename mixed<T>::VC> none_c;
    twin<T> Mk(MatD(tokens, 0));
    auto Yg = dwcuda::nan_output<T>(tokens, mixed<T>::out, false), Yc = dwcuda::nan_output<T>(tokens, mixed<T>::out, false);
    dw::cuda::serve::apply_masked(ctx, W.gpu(), none, Mk.gpu(), X.gpu(), Yg.gpu());
    dw::serve::apply_masked(W.cpu(), none_c, Mk.cpu(), X.cpu(), Yc.cpu());
    CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= 1e-12);
    CHECK(dwt::rel_err(Yg.dev_d(), MatD(X.host_d() * W.host_d().transpose())) <= 1e-12);
  }
}

TEST_CASE("cuda masked: shape and aliasing errors are readable, and as the CPU words them") {
  using namespace cuda_masked_test;
  using T = float;
  dw::cuda::context ctx;
  mixed<T> f;
  const auto ug = f.gpu();
  const auto uc = f.cpu();
  const index_t tokens = 9;
  twin<T> W(dwt::random(mixed<T>::out, mixed<T>::in, 1)), X(dwt::random(tokens, mixed<T>::in, 2)), M5(MatD::Ones(tokens, 5)),
      M10(MatD::Ones(tokens + 1, 4)), M(MatD::Ones(tokens, 4)), Xbad(dwt::random(tokens, mixed<T>::in + 1, 3)),
      dY(dwt::random(tokens, mixed<T>::out, 4));
  auto Y = dwcuda::nan_output<T>(tokens, mixed<T>::out, false);
  // K ≠ the number of updates: the same words on both sides.
  dwt::check_throws_with<dw::shape_error>(
      [&] { dw::cuda::serve::apply_masked(ctx, W.gpu(), ug, M5.gpu(), X.gpu(), Y.gpu()); },
      {"deltaw::cuda::serve::apply_masked", "the masks are [9, 5]", "there are 4 updates", "M must be [tokens, updates]"});
  dwt::check_throws_with<dw::shape_error>([&] { dw::serve::apply_masked(W.cpu(), uc, M5.cpu(), X.cpu(), Y.cpu()); },
                                          {"deltaw::serve::apply_masked", "the masks are [9, 5]", "there are 4 updates"});
  // M's rows ≠ tokens.
  dwt::check_throws_with<dw::shape_error>(
      [&] { dw::cuda::serve::apply_masked(ctx, W.gpu(), ug, M10.gpu(), X.gpu(), Y.gpu()); },
      {"the masks are [10, 4]", "X has 9 tokens"});
  dwt::check_throws_with<dw::shape_error>(
      [&] { dw::cuda::serve::apply_masked(ctx, W.gpu(), ug, M.gpu(), Xbad.gpu(), Y.gpu()); },
      {"X is [9, 11] but W is [12, 10]"});
  auto Ybad = dwcuda::nan_output<T>(tokens, mixed<T>::out + 1, false);
  dwt::check_throws_with<dw::shape_error>(
      [&] { dw::cuda::serve::apply_masked(ctx, W.gpu(), ug, M.gpu(), X.gpu(), Ybad.gpu()); },
      {"the output is [9, 13] but X·Wᵀ is [9, 12]"});
  // Y over the masks' memory.
  twin<T> MY(MatD::Ones(tokens, mixed<T>::out));
  const auto Malias = dw::cuda::view(static_cast<const T*>(MY.dev.data()), tokens, 4);
  dwt::check_throws_with<dw::aliasing_error>(
      [&] { dw::cuda::serve::apply_masked(ctx, W.gpu(), ug, Malias, X.gpu(), MY.gpu()); }, {"overlaps the masks M"});
  // Backward: dM's shape, the number of slot lists, a LoRA's slot count and shape, dY, aliasing.
  twin<T> dMbad(MatD::Zero(tokens, 3)), dX(MatD::Zero(tokens, mixed<T>::in));
  {
    dw::cuda::serve::masked_grads<T> g;
    g.dM = dMbad.gpu();
    dwt::check_throws_with<dw::shape_error>(
        [&] { dw::cuda::serve::masked_backward(ctx, W.gpu(), ug, M.gpu(), X.gpu(), dY.gpu(), g); },
        {"deltaw::cuda::serve::masked_backward", "dM is [9, 3]; expected [9, 4]"});
  }
  {
    dw::cuda::serve::masked_grads<T> g;
    g.factors.resize(2);
    dwt::check_throws_with<dw::shape_error>(
        [&] { dw::cuda::serve::masked_backward(ctx, W.gpu(), ug, M.gpu(), X.gpu(), dY.gpu(), g); },
        {"2 factor slot lists for 4 updates"});
  }
  twin<T> gB(MatD::Zero(mixed<T>::out, 3)), gA(MatD::Zero(3, mixed<T>::in)), gAbad(MatD::Zero(3, mixed<T>::in + 1));
  {
    dw::cuda::serve::masked_grads<T> g;
    g.factors = {{gB.gpu()}, {}, {}, {}};
    dwt::check_throws_with<dw::argument_error>(
        [&] { dw::cuda::serve::masked_backward(ctx, W.gpu(), ug, M.gpu(), X.gpu(), dY.gpu(), g); },
        {"update 0 takes 2 factor gradient slots", "got 1"});
    g.factors = {{gB.gpu(), gAbad.gpu()}, {}, {}, {}};
    dwt::check_throws_with<dw::shape_error>(
        [&] { dw::cuda::serve::masked_backward(ctx, W.gpu(), ug, M.gpu(), X.gpu(), dY.gpu(), g); },
        {"the gradient of A is [3, 11] but A is [3, 10]"});
  }
  {
    dw::cuda::serve::masked_grads<T> g;
    g.dX = dX.gpu();
    twin<T> dYbad(dwt::random(tokens, mixed<T>::out - 1, 5));
    dwt::check_throws_with<dw::shape_error>(
        [&] { dw::cuda::serve::masked_backward(ctx, W.gpu(), ug, M.gpu(), X.gpu(), dYbad.gpu(), g); },
        {"dY is [9, 11]; expected [9, 12]"});
    g.dX = X.gpu();
    dwt::check_throws_with<dw::aliasing_error>(
        [&] { dw::cuda::serve::masked_backward(ctx, W.gpu(), ug, M.gpu(), X.gpu(), dY.gpu(), g); },
        {"the input gradient dX", "overlaps the input X"});
  }
  // Nothing was written by the refused calls.
  CHECK((dMbad.dev_d().array() == 0).all());
  CHECK((gB.dev_d().array() == 0).all());
}

TEST_CASE("cuda masked: scratch stays at tokens × out (plus the evaluator's own), never out × in") {
  using namespace cuda_masked_test;
  using T = float;
  const index_t out = 256, in = 192, tokens = 6;
  const loras<T> set(out, in, {8, 16}, 900);
  twin<T> W(dwt::random(out, in, 1)), X(dwt::random(tokens, in, 2)), M(soft_masks(tokens, 2, 3)),
      dY(dwt::random(tokens, out, 4)), dM(MatD::Zero(tokens, 2)), dX(MatD::Zero(tokens, in));
  auto Y = dwcuda::nan_output<T>(tokens, out, false);
  const std::size_t tokens_out = std::size_t(tokens * out) * sizeof(T), dense = std::size_t(out * in) * sizeof(T);
  // LoRA: rank-r intermediates only.
  {
    dw::cuda::context ctx;
    dw::cuda::serve::apply_masked(ctx, W.gpu(), set.gpu, M.gpu(), X.gpu(), Y.gpu());
    CHECK(ctx.scratch_high_water_bytes() <= tokens_out);
    std::vector<std::unique_ptr<twin<T>>> g;
    dw::cuda::serve::masked_grads<T> grads;
    grads.dM = dM.gpu();
    grads.dX = dX.gpu();
    for (const index_t r : {8, 16}) {
      g.push_back(std::make_unique<twin<T>>(MatD::Zero(out, r)));
      g.push_back(std::make_unique<twin<T>>(MatD::Zero(r, in)));
      grads.factors.push_back({g[g.size() - 2]->gpu(), g.back()->gpu()});
    }
    ctx.reset_scratch_statistics();
    dw::cuda::serve::masked_backward(ctx, W.gpu(), set.gpu, M.gpu(), X.gpu(), dY.gpu(), grads);
    CHECK(ctx.scratch_high_water_bytes() <= tokens_out);
  }
  // LoKr and VeRA: one tokens × out matrix beside what the update's own operations take
  // (dwcuda::measure_scratch: every per-call operation, backward included, alone).
  const auto basis = dw::vera_shared_basis(11, 32, out, in);
  const vtwin<T> ld(dwt::random(32, 1, 5)), lb(dwt::random(out, 1, 6));
  twin<T> w1(dwt::random(16, 12, 7)), w2(dwt::random(16, 16, 8));
  const auto vera = dw::vera(basis, out, in, ld.gpu(), lb.gpu());
  const auto lokr = dw::lokr(w1.gpu(), w2.gpu(), dw::alpha(4), 4);
  const std::vector<dwcuda::slot> vera_slots = {dwcuda::vector_slot(32, false), dwcuda::vector_slot(out, false)},
                                  lokr_slots = {{16, 12}, {16, 16}};
  const auto run = [&](const char* name, const auto& u, const std::vector<dwcuda::slot>& slots) {
    INFO(name);
    const dwcuda::scratch_use own = dwcuda::measure_scratch<T>(u, W, tokens, &slots);
    INFO("the update's own:" << own.per_op);
    using U = std::remove_cvref_t<decltype(u)>;
    const std::vector<U> ups = {u, u};
    dw::cuda::context ctx;
    dw::cuda::serve::apply_masked(ctx, W.gpu(), ups, M.gpu(), X.gpu(), Y.gpu());
    CHECK(ctx.scratch_high_water_bytes() <= tokens_out + own.per_call + 512);
    CHECK(ctx.largest_scratch_request_bytes() < dense);
    std::vector<std::unique_ptr<twin<T>>> g;
    dw::cuda::serve::masked_grads<T> grads;
    grads.dM = dM.gpu();
    grads.dX = dX.gpu();
    for (int k = 0; k < 2; ++k) {
      grads.factors.emplace_back();
      for (const auto& s : slots) {
        g.push_back(std::make_unique<twin<T>>(MatD::Zero(s.rows, s.cols)));
        grads.factors.back().push_back(g.back()->gpu());
      }
    }
    ctx.reset_scratch_statistics();
    dw::cuda::serve::masked_backward(ctx, W.gpu(), ups, M.gpu(), X.gpu(), dY.gpu(), grads);
    CHECK(ctx.scratch_high_water_bytes() <= tokens_out + own.per_call + 512);
    CHECK(ctx.largest_scratch_request_bytes() < dense);
  };
  run("vera (r = 32)", vera, vera_slots);
  run("lokr (16 × 12 ⊗ 16 × 16)", lokr, lokr_slots);
}
