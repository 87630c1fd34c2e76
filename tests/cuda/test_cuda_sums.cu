// SPDX-License-Identifier: MIT
// LoRA's every operation on CUDA (apply_transposed, materialize, frobenius_norm and
// merge_checked join apply and merge), and lazy sums on CUDA: the transposed apply
// G·(W + ΣΔW) and the VJP through a sum (every update's slots, dX = dY·W + Σ dY·ΔW_k),
// against the CPU backend on the same stored values and a dense double reference.
// In the nvcc build it joins test_cuda_lora, whose test_cuda_lora.cu skips (exit 77)
// without a usable device.
#include <deltaw/cuda/cuda.hpp>
#include <deltaw/cuda/vjp.cuh>
#include <deltaw/deltaw.hpp>

#include <memory>
#include <span>
#include <vector>

#include "cuda_test_util.cuh"
#include "cuda_update_check.cuh"
#include "test_util.hpp"

namespace dw = deltaw;

namespace cuda_sums_test {

using dw::index_t;
using dwcuda::twin;
using dwcuda::vtwin;
using dwt::MatD;

struct shape {
  index_t out, in, r, tokens;
};
const shape shapes[] = {{12, 8, 4, 5}, {6, 10, 2, 0}, {9, 9, 3, 1}, {16, 24, 4, 33}, {5, 7, 1, 3}};

template <class T>
constexpr double tol() {
  return std::is_same_v<T, double> ? 1e-12 : 1e-6;
}
template <class T>
constexpr double ref_tol() {
  return std::is_same_v<T, double> ? 1e-11 : 2e-5;
}

template <class T>
void lora_cases() {
  dw::cuda::context ctx;
  std::uint64_t seed = 700;
  for (const shape& s : shapes)
    for (bool cm : {false, true}) {
      seed += 20;
      twin<T> B(dwt::random(s.out, s.r, seed), cm), A(dwt::random(s.r, s.in, seed + 1), !cm);
      INFO("lora");
      dwcuda::check_update<T>(ctx, dw::lora(B.gpu(), A.gpu(), dw::alpha(3.0)), dw::lora(B.cpu(), A.cpu(), dw::alpha(3.0)),
                              s.tokens, cm, seed + 2);
    }
}

/// W + LoRA + Block-LoRA + MiSS: the transposed apply and the backward through the sum.
template <class T>
void sum_cases() {
  dw::cuda::context ctx;
  const dw::kernels::cpu_context cpu;
  std::uint64_t seed = 900;
  for (const shape& s : shapes)
    for (bool cm : {false, true}) {
      seed += 40;
      CAPTURE(s.out);
      CAPTURE(s.in);
      CAPTURE(s.tokens);
      CAPTURE(cm);
      twin<T> W(dwt::random(s.out, s.in, seed), cm), B(dwt::random(s.out, s.r, seed + 1), !cm),
          A(dwt::random(s.r, s.in, seed + 2), cm), Bb(dwt::random(s.out, 2 * s.r, seed + 3), cm),
          A0(dwt::random(s.r, s.in, seed + 4), !cm), Dm(dwt::random(s.r + 1, s.out, seed + 5), cm);
      const auto lg = dw::lora(B.gpu(), A.gpu(), dw::alpha(2.0));
      const auto lc = dw::lora(B.cpu(), A.cpu(), dw::alpha(2.0));
      const auto bg = dw::block_lora(Bb.gpu(), A0.gpu(), dw::scale(0.8));
      const auto bc = dw::block_lora(Bb.cpu(), A0.cpu(), dw::scale(0.8));
      const auto mg = dw::miss(Dm.gpu(), s.in);
      const auto mc = dw::miss(Dm.cpu(), s.in);
      const auto eg = W.gpu() + lg + bg + mg;
      const auto ec = W.cpu() + lc + bc + mc;
      const MatD D = W.host_d() + MatD(dw::materialize(lc).template cast<double>()) +
                     MatD(dw::materialize(bc).template cast<double>()) + MatD(dw::materialize(mc).template cast<double>());

      // O = G·(W + ΣΔW).
      twin<T> G(dwt::random(s.tokens, s.out, seed + 6), !cm);
      auto Og = dwcuda::nan_output<T>(s.tokens, s.in, cm), Oc = dwcuda::nan_output<T>(s.tokens, s.in, cm);
      dw::apply_transposed(ctx, eg, G.gpu(), Og.gpu());
      dw::apply_transposed(ec, G.cpu(), Oc.cpu());
      CHECK(dwt::rel_err(Og.dev_d(), Oc.host_d()) <= tol<T>());
      CHECK(dwt::rel_err(Og.dev_d(), MatD(G.host_d() * D)) <= ref_tol<T>());

      // The VJP through the sum: 2 + 2 + 1 slots; every slot, or some, with dX or without.
      const std::vector<std::pair<index_t, index_t>> slots = {
          {s.out, s.r}, {s.r, s.in}, {s.out, 2 * s.r}, {s.r, s.in}, {s.r + 1, s.out}};
      twin<T> X(dwt::random(s.tokens, s.in, seed + 7), cm);
      for (int mode = 0; mode < 2; ++mode) {
        CAPTURE(mode);
        std::vector<std::unique_ptr<twin<T>>> gg, gc;
        std::vector<dw::matrix_view<T, dw::device::cuda>> vg;
        std::vector<dw::matrix_view<T>> vc;
        for (std::size_t i = 0; i < slots.size(); ++i) {
          const MatD g0 = dwt::random(slots[i].first, slots[i].second, seed + 20 + i);
          gg.push_back(std::make_unique<twin<T>>(g0, i % 2 == 0));
          gc.push_back(std::make_unique<twin<T>>(g0, i % 2 == 0));
          const bool on = mode == 0 || i % 2 == 1;
          vg.push_back(on ? gg.back()->gpu() : dw::matrix_view<T, dw::device::cuda>());
          vc.push_back(on ? gc.back()->cpu() : dw::matrix_view<T>());
        }
        const MatD dX0 = dwt::random(s.tokens, s.in, seed + 30);
        twin<T> dXg(dX0, !cm), dXc(dX0, !cm);
        const bool want_x = mode == 0;
        dw::cuda::backward<T>(ctx, eg, X.gpu(), G.gpu(), std::span<const dw::matrix_view<T, dw::device::cuda>>(vg),
                              want_x ? dXg.gpu() : dw::matrix_view<T, dw::device::cuda>());
        // CPU: each update's VJP on its slots (dX collects dY·ΔW_k), plus dY·W.
        const std::span<const dw::matrix_view<T>> all(vc);
        const auto dx = want_x ? dXc.cpu() : dw::matrix_view<T>();
        dw::cpu::vjp<std::remove_cvref_t<decltype(lc)>>::template backward<T>(cpu, lc, X.cpu(), G.cpu(), all.subspan(0, 2), dx);
        dw::cpu::vjp<std::remove_cvref_t<decltype(bc)>>::template backward<T>(cpu, bc, X.cpu(), G.cpu(), all.subspan(2, 2), dx);
        dw::cpu::vjp<std::remove_cvref_t<decltype(mc)>>::template backward<T>(cpu, mc, X.cpu(), G.cpu(), all.subspan(4, 1), dx);
        for (std::size_t i = 0; i < slots.size(); ++i) {
          CAPTURE(i);
          CHECK(dwt::rel_err(gg[i]->dev_d(), gc[i]->host_d()) <= tol<T>());
        }
        if (want_x) CHECK(dwt::rel_err(dXg.dev_d(), MatD(dX0 + G.host_d() * D)) <= ref_tol<T>());
        else CHECK((dXg.dev_d().array() == dXg.host_d().array()).all());
      }
    }
}

}  // namespace cuda_sums_test

TEST_CASE_TEMPLATE("cuda: LoRA's apply_transposed, materialize, frobenius_norm and merge_checked match the CPU", T,
                   float, double) {
  cuda_sums_test::lora_cases<T>();
}

TEST_CASE_TEMPLATE("cuda: lazy sums' transposed apply and backward match the CPU and a dense reference", T, float,
                   double) {
  cuda_sums_test::sum_cases<T>();
}

TEST_CASE("cuda backward: a sum refuses a wrong number of slots and dX over W") {
  using namespace cuda_sums_test;
  dw::cuda::context ctx;
  twin<double> W(dwt::random(6, 5, 1)), B(dwt::random(6, 2, 2)), A(dwt::random(2, 5, 3)), X(dwt::random(3, 5, 4)),
      G(dwt::random(3, 6, 5)), gB(dwt::random(6, 2, 6));
  const auto e = W.gpu() + dw::lora(B.gpu(), A.gpu(), dw::alpha(2.0));
  const std::vector<dw::matrix_view<double, dw::device::cuda>> one = {gB.gpu()};
  dwt::check_throws_with<dw::argument_error>(
      [&] {
        dw::cuda::backward<double>(ctx, e, X.gpu(), G.gpu(), std::span<const dw::matrix_view<double, dw::device::cuda>>(one),
                                   dw::matrix_view<double, dw::device::cuda>());
      },
      {"a sum of 1 updates has 2 gradient slots", "got 1"});
  const std::vector<dw::matrix_view<double, dw::device::cuda>> none = {{}, {}};
  // dX over W's memory (W is 6 × 5 = 30 values; dX 3 × 5 aliases its first rows).
  const auto dXw = dw::cuda::view(W.dev.data(), 3, 5);
  dwt::check_throws_with<dw::aliasing_error>(
      [&] {
        dw::cuda::backward<double>(ctx, e, X.gpu(), G.gpu(),
                                   std::span<const dw::matrix_view<double, dw::device::cuda>>(none), dXw);
      },
      {"the input gradient dX", "the weight W"});
}
