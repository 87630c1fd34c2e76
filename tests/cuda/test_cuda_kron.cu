// SPDX-License-Identifier: MIT
// CUDA Kronecker updates (LoKr, DiffuseKronA) through the evaluator written once
// (deltaw/backend/cpu/kron.hpp run with a cuda::context) against the CPU backend on the
// same stored values and a dense double reference: apply (ΔW alone and W + ΔW),
// apply_transposed, merge/unmerge and materialize, over the four factor kinds (dense or
// low-rank w1, w2), odd shapes, tokens = 0, row- and column-major views, float and double,
// bf16 storage; and that no operation takes an out × in scratch from the context.
// In the nvcc build it joins test_cuda_lora, whose test_cuda_lora.cu skips (exit 77)
// without a usable device.
#include <deltaw/cuda/cuda.hpp>
#include <deltaw/deltaw.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cuda_test_util.cuh"
#include "test_util.hpp"

namespace dw = deltaw;
using dw::index_t;
using dwt::MatD;

namespace {

using dwcuda::twin;

/// s·(w1 ⊗ w2) in double.
MatD dense_kron(const MatD& w1, const MatD& w2, double s) {
  MatD D(w1.rows() * w2.rows(), w1.cols() * w2.cols());
  for (index_t i1 = 0; i1 < w1.rows(); ++i1)
    for (index_t j1 = 0; j1 < w1.cols(); ++j1)
      D.block(i1 * w2.rows(), j1 * w2.cols(), w2.rows(), w2.cols()) = s * w1(i1, j1) * w2;
  return D;
}

/// Agreement with the CPU backend (the issue's bar) and with the double reference.
template <class C>
constexpr double cpu_tol() {
  return std::is_same_v<C, double> ? 1e-12 : 1e-6;
}
template <class C>
constexpr double ref_tol() {
  return std::is_same_v<C, double> ? 1e-12 : 1e-5;
}

struct kshape {
  index_t a, b, c, d, r, tokens;
};
const kshape kshapes[] = {{2, 3, 4, 5, 2, 7}, {1, 1, 1, 1, 1, 1}, {4, 8, 2, 16, 3, 0},
                          {3, 5, 7, 2, 1, 33}, {8, 4, 6, 6, 2, 16}, {5, 1, 1, 9, 1, 4}};

std::string kind_name(int k) {
  static const char* n[] = {"dense ⊗ dense", "low-rank ⊗ dense", "dense ⊗ low-rank", "low-rank ⊗ low-rank"};
  return n[k];
}

/// The factors of one case, on both sides, and f(device update, CPU update, w1, w2) with
/// w1, w2 the dense double values actually stored.
template <class T, class F>
void with_kron(const kshape& k, int kind, double s, std::uint64_t seed, bool cm, F&& f) {
  twin<T> w1(dwt::random(k.a, k.c, seed + 1), cm), w2(dwt::random(k.b, k.d, seed + 2), !cm);
  twin<T> l1(dwt::random(k.a, k.r, seed + 3), cm), r1(dwt::random(k.r, k.c, seed + 4), !cm);
  twin<T> l2(dwt::random(k.b, k.r, seed + 5), !cm), r2(dwt::random(k.r, k.d, seed + 6), cm);
  const MatD W1 = (kind & 1) ? MatD(l1.host_d() * r1.host_d()) : w1.host_d();
  const MatD W2 = (kind & 2) ? MatD(l2.host_d() * r2.host_d()) : w2.host_d();
  const auto sc = dw::scale(s);
  switch (kind) {
    case 0: f(dw::kron(w1.gpu(), w2.gpu(), sc), dw::kron(w1.cpu(), w2.cpu(), sc), W1, W2); break;
    case 1:
      f(dw::kron(dw::kron_factor(l1.gpu(), r1.gpu()), w2.gpu(), sc),
        dw::kron(dw::kron_factor(l1.cpu(), r1.cpu()), w2.cpu(), sc), W1, W2);
      break;
    case 2:
      f(dw::kron(w1.gpu(), dw::kron_factor(l2.gpu(), r2.gpu()), sc),
        dw::kron(w1.cpu(), dw::kron_factor(l2.cpu(), r2.cpu()), sc), W1, W2);
      break;
    default:
      f(dw::kron(dw::kron_factor(l1.gpu(), r1.gpu()), dw::kron_factor(l2.gpu(), r2.gpu()), sc),
        dw::kron(dw::kron_factor(l1.cpu(), r1.cpu()), dw::kron_factor(l2.cpu(), r2.cpu()), sc), W1, W2);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("cuda: Kronecker apply, apply_transposed, merge, materialize match the CPU backend", T, float,
                   double) {
  dw::cuda::context ctx;
  std::uint64_t seed = 7000;
  int cases = 0;
  for (const kshape& k : kshapes) {
    for (int kind = 0; kind < 4; ++kind) {
      for (bool cm : {false, true}) {
        seed += 10;
        CAPTURE(k.a);
        CAPTURE(k.b);
        CAPTURE(k.c);
        CAPTURE(k.d);
        CAPTURE(k.tokens);
        CAPTURE(kind_name(kind));
        CAPTURE(cm);
        const index_t out = k.a * k.b, in = k.c * k.d;
        const double s = 0.75;
        with_kron<T>(k, kind, s, seed, cm, [&](const auto& ug, const auto& uc, const MatD& W1, const MatD& W2) {
          static_assert(std::is_same_v<dw::device_of<std::remove_cvref_t<decltype(ug)>>, dw::device::cuda>);
          const MatD D = dense_kron(W1, W2, s);
          twin<T> X(dwt::random(k.tokens, in, seed + 7), cm), G(dwt::random(k.tokens, out, seed + 8), !cm);
          twin<T> W(dwt::random(out, in, seed + 9), cm);
          const MatD W0 = W.host_d();

          // ΔW alone: Y = X·ΔWᵀ (the output is NaN first: apply must not read it).
          auto Yg = dwcuda::nan_output<T>(k.tokens, out, cm), Yc = dwcuda::nan_output<T>(k.tokens, out, cm);
          dw::apply(ctx, ug, X.gpu(), Yg.gpu());
          dw::apply(uc, X.cpu(), Yc.cpu());
          CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= cpu_tol<T>());
          CHECK(dwt::rel_err(Yg.dev_d(), MatD(X.host_d() * D.transpose())) <= ref_tol<T>());

          // W + ΔW, output in the other layout (the scratch-and-add path for strided rows).
          auto Sg = dwcuda::nan_output<T>(k.tokens, out, !cm), Sc = dwcuda::nan_output<T>(k.tokens, out, !cm);
          dw::apply(ctx, W.gpu() + ug, X.gpu(), Sg.gpu());
          dw::apply(W.cpu() + uc, X.cpu(), Sc.cpu());
          CHECK(dwt::rel_err(Sg.dev_d(), Sc.host_d()) <= cpu_tol<T>());
          CHECK(dwt::rel_err(Sg.dev_d(), MatD(X.host_d() * (W0 + D).transpose())) <= ref_tol<T>());

          // O = G·ΔW.
          auto Og = dwcuda::nan_output<T>(k.tokens, in, cm), Oc = dwcuda::nan_output<T>(k.tokens, in, cm);
          dw::apply_transposed(ctx, ug, G.gpu(), Og.gpu());
          dw::apply_transposed(uc, G.cpu(), Oc.cpu());
          CHECK(dwt::rel_err(Og.dev_d(), Oc.host_d()) <= cpu_tol<T>());
          CHECK(dwt::rel_err(Og.dev_d(), MatD(G.host_d() * D)) <= ref_tol<T>());

          // materialize into a caller's view (NaN first).
          auto Mg = dwcuda::nan_output<T>(out, in, !cm);
          dw::materialize(ctx, ug, Mg.gpu());
          CHECK(dwt::rel_err(Mg.dev_d(), dw::materialize(uc)) <= cpu_tol<T>());
          CHECK(dwt::rel_err(Mg.dev_d(), D) <= ref_tol<T>());

          // merge, then unmerge, in place on both sides.
          dw::merge(ctx, W.gpu(), ug);
          dw::merge(W.cpu(), uc);
          CHECK(dwt::rel_err(W.dev_d(), W.host_d()) <= cpu_tol<T>());
          CHECK(dwt::rel_err(W.dev_d(), MatD(W0 + D)) <= ref_tol<T>());
          dw::unmerge(ctx, W.gpu(), ug);
          dw::unmerge(W.cpu(), uc);
          CHECK(dwt::rel_err(W.dev_d(), W.host_d()) <= cpu_tol<T>());
          CHECK(dwt::rel_err(W.dev_d(), W0) <= ref_tol<T>());
          ++cases;
        });
      }
    }
  }
  CHECK(cases == 6 * 4 * 2);
}

TEST_CASE_TEMPLATE("cuda: Kronecker operations take no out × in scratch", T, float, double) {
  // out = in = 512: a dense ΔW would be 1 MiB (float) or 2 MiB (double) of scratch.
  const kshape k{32, 16, 16, 32, 4, 8};
  const index_t out = k.a * k.b, in = k.c * k.d;
  const std::size_t dense_bytes = std::size_t(out * in) * sizeof(T);
  for (int kind = 0; kind < 4; ++kind) {
    for (bool cm : {false, true}) {
      CAPTURE(kind_name(kind));
      CAPTURE(cm);
      const std::uint64_t seed = 9000 + std::uint64_t(kind);
      with_kron<T>(k, kind, 0.5, seed, cm, [&](const auto& ug, const auto&, const MatD& W1, const MatD& W2) {
        dw::cuda::context ctx;
        twin<T> X(dwt::random(k.tokens, in, 1), cm), G(dwt::random(k.tokens, out, 2), cm),
            W(dwt::random(out, in, 3), cm);
        auto Y = dwcuda::nan_output<T>(k.tokens, out, !cm);
        auto O = dwcuda::nan_output<T>(k.tokens, in, !cm);
        auto M = dwcuda::nan_output<T>(out, in, cm);
        ctx.reset_scratch_statistics();
        dw::apply(ctx, ug, X.gpu(), Y.gpu());
        dw::apply(ctx, W.gpu() + ug, X.gpu(), Y.gpu());
        dw::apply_transposed(ctx, ug, G.gpu(), O.gpu());
        dw::merge(ctx, W.gpu(), ug);
        dw::unmerge(ctx, W.gpu(), ug);
        dw::materialize(ctx, ug, M.gpu());
        if (kind == 3 && cm)
          MESSAGE("scratch high-water " << ctx.scratch_high_water_bytes() << " B, largest request "
                                      << ctx.largest_scratch_request_bytes() << " B, dense ΔW " << dense_bytes << " B");
        CHECK(ctx.scratch_high_water_bytes() > 0);  // the statistics do record (apply takes scratch)
        CHECK(ctx.largest_scratch_request_bytes() < dense_bytes / 8);
        CHECK(ctx.scratch_high_water_bytes() < dense_bytes / 4);
        CHECK(dwt::rel_err(M.dev_d(), dense_kron(W1, W2, 0.5)) <= ref_tol<T>());
      });
    }
  }
}

TEST_CASE("cuda: Kronecker over bf16 storage, fp32 compute, matches the CPU backend") {
  dw::cuda::context ctx;
  const kshape k{4, 6, 5, 3, 2, 9};
  const index_t out = k.a * k.b, in = k.c * k.d;
  for (int kind = 0; kind < 4; ++kind) {
    CAPTURE(kind_name(kind));
    with_kron<dw::bf16>(k, kind, 2.0, 500 + std::uint64_t(kind), false,
                        [&](const auto& ug, const auto& uc, const MatD& W1, const MatD& W2) {
      const MatD D = dense_kron(W1, W2, 2.0);
      twin<dw::bf16> X(dwt::random(k.tokens, in, 11)), W(dwt::random(out, in, 12));
      const MatD W0 = W.host_d();
      auto Yg = dwcuda::nan_output<float>(k.tokens, out, false), Yc = dwcuda::nan_output<float>(k.tokens, out, false);
      dw::apply(ctx, ug, X.gpu(), Yg.gpu());
      dw::apply(uc, X.cpu(), Yc.cpu());
      CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= 1e-6);
      CHECK(dwt::rel_err(Yg.dev_d(), MatD(X.host_d() * D.transpose())) <= 1e-5);
      // merge into the bf16 weight: fp32 panels rounded once; the CPU backend does the
      // same, so the two agree but for ties broken by last-bit fp32 differences.
      dw::merge(ctx, W.gpu(), ug);
      dw::merge(W.cpu(), uc);
      const MatD Wg = W.dev_d(), Wc = W.host_d(), exact = W0 + D;
      int bad = 0, differ = 0;
      for (index_t i = 0; i < out; ++i)
        for (index_t j = 0; j < in; ++j) {
          const double spacing = std::ldexp(1.0, int(std::floor(std::log2(std::max(std::abs(exact(i, j)), 1e-2)))) - 7);
          if (std::abs(Wg(i, j) - exact(i, j)) > spacing) ++bad;
          if (Wg(i, j) != Wc(i, j)) ++differ;
        }
      CHECK(bad == 0);
      CHECK(differ <= out * in / 100);
    });
  }
}
