// SPDX-License-Identifier: MIT
// HRA, DeLoRA, GraLoRA, UniLoRA, VB-LoRA and HiRA on CUDA
// (cuda/include/deltaw/cuda/updates_structured.cuh) against the CPU backend on the same
// stored values: every operation (apply of ΔW alone and of W + ΔW, apply_transposed,
// materialize, frobenius_norm, merge, unmerge, merge_checked) and the VJPs (every gradient
// slot and dX), in float and double, row- and column-major, tokens = 0, 1 and more than the
// rank, odd sizes where the type allows; lazy sums with other types; the scratch high-water
// mark (no out × in scratch).
// In the nvcc build it joins test_cuda_lora, whose test_cuda_lora.cu skips (exit 77)
// without a usable device.
#include <deltaw/cuda/cuda.hpp>
#include <deltaw/cuda/updates_structured.cuh>
#include <deltaw/cuda/vjp.cuh>
#include <deltaw/deltaw.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "cuda_test_util.cuh"
#include "cuda_update_check.cuh"
#include "test_util.hpp"

namespace dw = deltaw;

namespace cuda_structured_test {

using dw::index_t;
using dwcuda::check_update;
using dwcuda::check_vjp;
using dwcuda::random_vec;
using dwcuda::slot;
using dwcuda::twin;
using dwcuda::vtwin;
using dwt::MatD;

/// A UniLoRA pattern over [out, in] at rank r indexing a θ of length d (small, so indices repeat).
struct uni_pattern {
  std::vector<index_t> ia, ib;
  std::vector<double> sa, sb;
  uni_pattern(index_t out, index_t in, index_t r, index_t d, std::uint64_t seed) {
    const MatD a = dwt::random(r * in + out * r, 2, seed);
    for (index_t k = 0; k < a.rows(); ++k) {
      const index_t i = std::min<index_t>(d - 1, index_t((a(k, 0) + 1.0) / 2.0 * double(d)));
      const double s = 0.5 + 0.25 * a(k, 1);
      if (k < r * in) ia.push_back(i), sa.push_back(s);
      else ib.push_back(i), sb.push_back(s);
    }
  }
  template <class V>
  auto update(index_t out, index_t in, index_t r, const V& theta) const {
    return dw::unilora(out, in, r, std::span<const index_t>(ia), std::span<const index_t>(ib), std::span<const double>(sa),
                       std::span<const double>(sb), theta);
  }
};

/// The operands of one update of each type over [out, in] (out and in multiples of 2 and of
/// L for VB-LoRA are arranged by the shapes below), on the host and the device.
template <class T>
struct operands {
  index_t out, in, r;
  bool cm;
  twin<T> W, U, B, A, Bd, Ad, Ag, Bg, Ahg, Bhg, la, lb, bank;
  vtwin<T> lam, wn, theta;
  uni_pattern pat;
  index_t k, hr, L, n, topk, d;
  static constexpr index_t vb_rank = 2;
  operands(index_t out_, index_t in_, index_t r_, index_t k_, index_t hr_, index_t L_, bool cm_, std::uint64_t seed)
      : out(out_), in(in_), r(r_), cm(cm_),
        W(dwt::random(out_, in_, seed + 1), cm_),
        U(dwt::random(in_, r_, seed + 2), !cm_),
        B(MatD(0.3 * dwt::random(out_, r_, seed + 3)), cm_),
        A(MatD(0.3 * dwt::random(r_, in_, seed + 4)), !cm_),
        Bd(dwt::random(out_, r_, seed + 5), !cm_),
        Ad(dwt::random(r_, in_, seed + 6), cm_),
        Ag(dwt::random(in_, 2 * k_, seed + 7), cm_),
        Bg(dwt::random(k_ * 2 * k_, out_ / k_, seed + 8), !cm_),
        Ahg(dwt::random(hr_, in_, seed + 9), !cm_),
        Bhg(dwt::random(out_, hr_, seed + 10), cm_),
        la(dwt::random(vb_rank * in_ / L_, 5, seed + 11), cm_),
        lb(dwt::random(out_ / L_ * vb_rank, 5, seed + 12), !cm_),
        bank(dwt::random(5, L_, seed + 13), cm_),
        lam(random_vec(1, seed + 14, 0.5, 2.0)),
        wn(random_vec(in_, seed + 15, 0.5, 2.0)),
        theta(random_vec(7, seed + 16)),
        pat(out_, in_, r_, 7, seed + 17),
        k(k_), hr(hr_), L(L_), n(5), topk(2), d(7) {}
};

/// out and in multiples of k = 2 and of the VB-LoRA vector length L; odd ranks; tokens 0,
/// 1 and more than the rank (HiRA's two schedules: r-products when tokens·r ≤ tokens + r).
struct shape {
  index_t out, in, r, k, hr, L, tokens;
};
/// The last shape is odd: GraLoRA (k | in, out) and VB-LoRA (L | in, out) skip it.
const shape shapes[] = {{12, 8, 3, 2, 1, 4, 5},   {6, 10, 2, 2, 0, 2, 0}, {10, 6, 1, 2, 2, 2, 1},
                        {16, 24, 4, 2, 3, 8, 33}, {14, 18, 5, 2, 1, 2, 2}, {9, 7, 3, 2, 1, 2, 4}};
bool tiled(const shape& s) { return s.out % s.k == 0 && s.in % s.k == 0 && s.out % s.L == 0 && s.in % s.L == 0; }

template <class T>
void update_cases(dw::cuda::context& ctx, std::uint64_t seed) {
  for (const shape& s : shapes) {
    for (bool cm : {false, true}) {
      seed += 50;
      operands<T> o(s.out, s.in, s.r, s.k, s.hr, s.L, cm, seed);
      for (bool gs : {false, true}) {
        INFO("hra, Gram–Schmidt " << gs);
        const dw::hra_options opt{.gram_schmidt = gs};
        twin<T> W(dwt::random(s.out, s.in, seed + 30 + (gs ? 1 : 0)), cm);  // its own: merged in place
        const auto ug = dw::cuda::hra(ctx, W.gpu(), o.U.gpu(), opt);
        const auto uc = dw::hra(W.cpu(), o.U.cpu(), opt);
        check_update<T>(ctx, ug, uc, s.tokens, cm, seed + 1, &W);
      }
      {
        INFO("delora");
        check_update<T>(ctx, dw::delora(o.Bd.gpu(), o.Ad.gpu(), o.lam.gpu(), o.wn.gpu()),
                        dw::delora(o.Bd.cpu(), o.Ad.cpu(), o.lam.cpu(), o.wn.cpu()), s.tokens, cm, seed + 2);
      }
      if (tiled(s)) {
        INFO("gralora, hybrid rank " << s.hr);
        if (s.hr > 0)
          check_update<T>(ctx, dw::gralora(o.Ag.gpu(), o.Bg.gpu(), s.k, o.Ahg.gpu(), o.Bhg.gpu(), dw::scale(0.75)),
                          dw::gralora(o.Ag.cpu(), o.Bg.cpu(), s.k, o.Ahg.cpu(), o.Bhg.cpu(), dw::scale(0.75)), s.tokens, cm,
                          seed + 3);
        else
          check_update<T>(ctx, dw::gralora(o.Ag.gpu(), o.Bg.gpu(), s.k, dw::scale(0.75)),
                          dw::gralora(o.Ag.cpu(), o.Bg.cpu(), s.k, dw::scale(0.75)), s.tokens, cm, seed + 3);
      }
      {
        INFO("unilora");
        check_update<T>(ctx, o.pat.update(s.out, s.in, s.r, o.theta.gpu()), o.pat.update(s.out, s.in, s.r, o.theta.cpu()),
                        s.tokens, cm, seed + 4);
      }
      if (tiled(s)) {
        INFO("vblora");
        check_update<T>(ctx, dw::vblora(o.la.gpu(), o.lb.gpu(), o.bank.gpu(), o.vb_rank, o.topk),
                        dw::vblora(o.la.cpu(), o.lb.cpu(), o.bank.cpu(), o.vb_rank, o.topk), s.tokens, cm, seed + 5);
      }
      {
        INFO("hira");
        twin<T> W(dwt::random(s.out, s.in, seed + 32), cm);
        const auto ug = dw::hira(W.gpu(), o.B.gpu(), o.A.gpu());
        const auto uc = dw::hira(W.cpu(), o.B.cpu(), o.A.cpu());
        check_update<T>(ctx, ug, uc, s.tokens, cm, seed + 6, &W);
      }
    }
  }
}

template <class T>
void vjp_cases(dw::cuda::context& ctx, std::uint64_t seed) {
  for (const shape& s : shapes) {
    for (bool cm : {false, true}) {
      seed += 50;
      const index_t hr = std::max<index_t>(s.hr, 1);
      operands<T> o(s.out, s.in, s.r, s.k, hr, s.L, cm, seed);
      for (bool gs : {false, true}) {
        INFO("hra, Gram–Schmidt " << gs);
        const dw::hra_options opt{.gram_schmidt = gs};
        check_vjp<T>(ctx, dw::cuda::hra(ctx, o.W.gpu(), o.U.gpu(), opt), dw::hra(o.W.cpu(), o.U.cpu(), opt),
                     {{s.in, s.r}}, s.tokens, cm, seed + 1);
      }
      {
        INFO("delora");
        check_vjp<T>(ctx, dw::delora(o.Bd.gpu(), o.Ad.gpu(), o.lam.gpu(), o.wn.gpu()),
                     dw::delora(o.Bd.cpu(), o.Ad.cpu(), o.lam.cpu(), o.wn.cpu()), {{s.out, s.r}, {s.r, s.in}, {1, 1}},
                     s.tokens, cm, seed + 2);
      }
      if (tiled(s)) {
        INFO("gralora");
        check_vjp<T>(ctx, dw::gralora(o.Ag.gpu(), o.Bg.gpu(), s.k, o.Ahg.gpu(), o.Bhg.gpu(), dw::scale(0.75)),
                     dw::gralora(o.Ag.cpu(), o.Bg.cpu(), s.k, o.Ahg.cpu(), o.Bhg.cpu(), dw::scale(0.75)),
                     {{s.in, 2 * s.k}, {s.k * 2 * s.k, s.out / s.k}, {hr, s.in}, {s.out, hr}}, s.tokens, cm, seed + 3);
      }
      {
        INFO("unilora");
        check_vjp<T>(ctx, o.pat.update(s.out, s.in, s.r, o.theta.gpu()), o.pat.update(s.out, s.in, s.r, o.theta.cpu()),
                     {dwcuda::vector_slot(o.d, !cm)}, s.tokens, cm, seed + 4);
      }
      if (tiled(s)) {
        INFO("vblora");
        check_vjp<T>(ctx, dw::vblora(o.la.gpu(), o.lb.gpu(), o.bank.gpu(), o.vb_rank, o.topk),
                     dw::vblora(o.la.cpu(), o.lb.cpu(), o.bank.cpu(), o.vb_rank, o.topk),
                     {{o.la.rows, o.n}, {o.lb.rows, o.n}, {o.n, s.L}}, s.tokens, cm, seed + 5);
      }
      {
        INFO("hira");
        check_vjp<T>(ctx, dw::hira(o.W.gpu(), o.B.gpu(), o.A.gpu()), dw::hira(o.W.cpu(), o.B.cpu(), o.A.cpu()),
                     {{s.out, s.r}, {s.r, s.in}}, s.tokens, cm, seed + 6);
      }
    }
  }
}

}  // namespace cuda_structured_test

TEST_CASE_TEMPLATE("cuda: HRA, DeLoRA, GraLoRA, UniLoRA, VB-LoRA and HiRA match the CPU backend", T, float, double) {
  dw::cuda::context ctx;
  cuda_structured_test::update_cases<T>(ctx, 20000);
}

TEST_CASE_TEMPLATE("cuda backward: HRA, DeLoRA, GraLoRA, UniLoRA, VB-LoRA and HiRA gradients match the CPU backend", T,
                   float, double) {
  dw::cuda::context ctx;
  cuda_structured_test::vjp_cases<T>(ctx, 30000);
}

TEST_CASE_TEMPLATE("cuda: lazy sums of HRA, DeLoRA, GraLoRA, UniLoRA, VB-LoRA and HiRA with other types match the "
                   "CPU backend",
                   T, float, double) {
  using cuda_structured_test::operands;
  using cuda_structured_test::twin;
  using dwt::MatD;
  dw::cuda::context ctx;
  const dw::index_t out = 12, in = 8, r = 3;
  for (dw::index_t tokens : {0, 1, 7}) {
    for (bool cm : {false, true}) {
      CAPTURE(tokens);
      CAPTURE(cm);
      const std::uint64_t seed = 40000 + std::uint64_t(tokens) * 10 + (cm ? 1 : 0);
      operands<T> o(out, in, r, 2, 1, 4, cm, seed);
      twin<T> X(dwt::random(tokens, in, seed + 20), !cm), Bl(dwt::random(out, 2, seed + 21), cm),
          Al(dwt::random(2, in, seed + 22), !cm);
      // W + four additive updates of this group + a LoRA.
      auto Yg = dwcuda::nan_output<T>(tokens, out, cm), Yc = dwcuda::nan_output<T>(tokens, out, cm);
      dw::apply(ctx,
                o.W.gpu() + dw::delora(o.Bd.gpu(), o.Ad.gpu(), o.lam.gpu(), o.wn.gpu()) +
                    dw::gralora(o.Ag.gpu(), o.Bg.gpu(), 2, o.Ahg.gpu(), o.Bhg.gpu(), dw::scale(0.5)) +
                    o.pat.update(out, in, r, o.theta.gpu()) + dw::vblora(o.la.gpu(), o.lb.gpu(), o.bank.gpu(), 2, 2) +
                    dw::lora(Bl.gpu(), Al.gpu(), dw::alpha(2.0)),
                X.gpu(), Yg.gpu());
      dw::apply(o.W.cpu() + dw::delora(o.Bd.cpu(), o.Ad.cpu(), o.lam.cpu(), o.wn.cpu()) +
                    dw::gralora(o.Ag.cpu(), o.Bg.cpu(), 2, o.Ahg.cpu(), o.Bhg.cpu(), dw::scale(0.5)) +
                    o.pat.update(out, in, r, o.theta.cpu()) + dw::vblora(o.la.cpu(), o.lb.cpu(), o.bank.cpu(), 2, 2) +
                    dw::lora(Bl.cpu(), Al.cpu(), dw::alpha(2.0)),
                X.cpu(), Yc.cpu());
      CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= dwcuda::upd_cpu_tol<T>());
      // HiRA and HRA over W (the CPU replaces the base product; CUDA adds ΔW to it), each
      // with a LoRA and a GraLoRA.
      for (int which = 0; which < 2; ++which) {
        CAPTURE(which);
        auto Zg = dwcuda::nan_output<T>(tokens, out, !cm), Zc = dwcuda::nan_output<T>(tokens, out, !cm);
        if (which == 0) {
          dw::apply(ctx,
                    o.W.gpu() + dw::hira(o.W.gpu(), o.B.gpu(), o.A.gpu()) + dw::lora(Bl.gpu(), Al.gpu(), dw::alpha(1.0)) +
                        dw::gralora(o.Ag.gpu(), o.Bg.gpu(), 2, dw::scale(0.25)),
                    X.gpu(), Zg.gpu());
          dw::apply(o.W.cpu() + dw::hira(o.W.cpu(), o.B.cpu(), o.A.cpu()) + dw::lora(Bl.cpu(), Al.cpu(), dw::alpha(1.0)) +
                        dw::gralora(o.Ag.cpu(), o.Bg.cpu(), 2, dw::scale(0.25)),
                    X.cpu(), Zc.cpu());
        } else {
          dw::apply(ctx,
                    o.W.gpu() + dw::cuda::hra(ctx, o.W.gpu(), o.U.gpu()) + dw::lora(Bl.gpu(), Al.gpu(), dw::alpha(1.0)) +
                        dw::gralora(o.Ag.gpu(), o.Bg.gpu(), 2, dw::scale(0.25)),
                    X.gpu(), Zg.gpu());
          dw::apply(o.W.cpu() + dw::hra(o.W.cpu(), o.U.cpu()) + dw::lora(Bl.cpu(), Al.cpu(), dw::alpha(1.0)) +
                        dw::gralora(o.Ag.cpu(), o.Bg.cpu(), 2, dw::scale(0.25)),
                    X.cpu(), Zc.cpu());
        }
        CHECK(dwt::rel_err(Zg.dev_d(), Zc.host_d()) <= dwcuda::upd_cpu_tol<T>());
      }
    }
  }
}

TEST_CASE("cuda: HRA, DeLoRA, GraLoRA, UniLoRA, VB-LoRA and HiRA take no out × in scratch") {
  // out = 1024, in = 256, tokens = 8, float: a dense ΔW is 1 MiB.
  using T = float;
  using cuda_structured_test::operands;
  using cuda_structured_test::twin;
  using dwt::MatD;
  const dw::index_t out = 1024, in = 256, r = 16, tokens = 8;
  const std::size_t dense_bytes = std::size_t(out * in) * sizeof(T);
  // HiRA (tokens·r > tokens + r) works on panels of cpu::panel_rows rows of W: two or three
  // of them (W's rows, their modulation B·A, the gradient's rows), a fixed number of rows: a
  // quarter of ΔW each at this size, 1/16 at 4096 × 4096.
  const std::size_t panel_bytes = std::size_t(dw::cpu::panel_rows * in) * sizeof(T);
  const auto run = [&](const std::string& name, const auto& u, twin<T>& W, std::size_t limit,
                       const std::vector<dwcuda::slot>& slots) {
    CAPTURE(name);
    const auto s = dwcuda::measure_scratch<T>(u, W, tokens, &slots);
    MESSAGE(name << ": scratch high-water (B):" << s.per_op << "; largest request " << s.largest << "; dense ΔW "
                 << dense_bytes << " B");
    CAPTURE(s.per_op);
    CHECK(s.largest < dense_bytes);  // no single request of an out × in matrix
    CHECK(s.per_call > 0);
    CHECK(s.per_call < limit);
    CHECK(s.whole < std::max(limit, dense_bytes));
  };
  operands<T> o(out, in, r, 2, 4, 16, false, 3);
  const dw::index_t d = 7, nv = 5;
  run("hra", dw::cuda::hra(o.W.gpu(), o.U.gpu()), o.W, dense_bytes / 4, {{in, r}});
  run("delora", dw::delora(o.Bd.gpu(), o.Ad.gpu(), o.lam.gpu(), o.wn.gpu()), o.W, dense_bytes / 4,
      {{out, r}, {r, in}, {1, 1}});
  run("gralora (k = 2, r = 4, hybrid 4)", dw::gralora(o.Ag.gpu(), o.Bg.gpu(), 2, o.Ahg.gpu(), o.Bhg.gpu(), dw::scale(0.5)),
      o.W, dense_bytes / 4, {{in, 4}, {8, out / 2}, {4, in}, {out, 4}});
  // UniLoRA's pattern (an index and a scale per entry of A and B: 16 B each, PEFT's
  // r·(in + out) of each) is uploaded per call, and its backward adds the inverse index:
  // scratch linear in r·(in + out), independent of out·in (1/12.8 of it here).
  run("unilora", o.pat.update(out, in, r, o.theta.gpu()), o.W, 32 * std::size_t(r * (in + out)), {{d, 1}});
  run("vblora (L = 16, n = 5, k = 2)", dw::vblora(o.la.gpu(), o.lb.gpu(), o.bank.gpu(), 2, 2), o.W, dense_bytes / 4,
      {{o.la.rows, nv}, {o.lb.rows, nv}, {nv, 16}});
  run("hira (panels)", dw::hira(o.W.gpu(), o.B.gpu(), o.A.gpu()), o.W, 3 * panel_bytes, {{out, r}, {r, in}});
}
