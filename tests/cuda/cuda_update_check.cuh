// SPDX-License-Identifier: MIT
// The two checks every CUDA update type goes through, shared by the test_cuda_*.cu files
// (one translation unit, test_cuda_all.cu): check_update runs every operation of one
// update on the CUDA views and on the CPU backend over the same stored values (apply of
// ΔW alone and of W + ΔW, apply_transposed, materialize, frobenius_norm, merge, unmerge,
// merge_checked), check_vjp its backward (every gradient slot and dX).
#pragma once

#include <deltaw/cuda/cuda.hpp>
#include <deltaw/cuda/vjp.cuh>
#include <deltaw/deltaw.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_test_util.cuh"
#include "test_util.hpp"

namespace dwcuda {

/// A vector of n values uniform in [lo, hi].
inline Eigen::VectorXd random_vec(index_t n, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  const MatD m = dwt::random(n, 1, seed);
  return (lo + (hi - lo) * (m.col(0).array() + 1.0) / 2.0).matrix();
}

template <class C>
constexpr double upd_cpu_tol() {
  return std::is_same_v<C, double> ? 1e-12 : 1e-6;
}
/// Against X·Dᵀ with D the CPU's materialised ΔW (a different order of the products).
template <class C>
constexpr double upd_ref_tol() {
  return std::is_same_v<C, double> ? 1e-12 : 2e-5;
}


/// Every operation of one update on both backends. W: the update's own weight (DoRA, Bone
/// bat) or null, in which case a fresh weight is used.
template <class T, class UG, class UC>
void check_update(dw::cuda::context& ctx, const UG& ug, const UC& uc, index_t tokens, bool cm, std::uint64_t seed,
                  twin<T>* own_W = nullptr) {
  static_assert(std::is_same_v<dw::device_of<UG>, dw::device::cuda>);
  const index_t out = uc.rows(), in = uc.cols();
  CAPTURE(out);
  CAPTURE(in);
  CAPTURE(tokens);
  CAPTURE(cm);
  const MatD D = dw::materialize(uc).template cast<double>();
  twin<T> X(dwt::random(tokens, in, seed + 1), cm), G(dwt::random(tokens, out, seed + 2), !cm);

  // ΔW alone (outputs NaN first: apply must not read them).
  auto Yg = dwcuda::nan_output<T>(tokens, out, cm), Yc = dwcuda::nan_output<T>(tokens, out, cm);
  dw::apply(ctx, ug, X.gpu(), Yg.gpu());
  dw::apply(uc, X.cpu(), Yc.cpu());
  CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= upd_cpu_tol<T>());
  CHECK(dwt::rel_err(Yg.dev_d(), MatD(X.host_d() * D.transpose())) <= upd_ref_tol<T>());

  // W + ΔW, output in the other layout.
  twin<T> fresh(dwt::random(out, in, seed + 3), cm);
  twin<T>& W = own_W ? *own_W : fresh;
  const MatD W0 = W.host_d();
  auto Sg = dwcuda::nan_output<T>(tokens, out, !cm), Sc = dwcuda::nan_output<T>(tokens, out, !cm);
  dw::apply(ctx, W.gpu() + ug, X.gpu(), Sg.gpu());
  dw::apply(W.cpu() + uc, X.cpu(), Sc.cpu());
  CHECK(dwt::rel_err(Sg.dev_d(), Sc.host_d()) <= upd_cpu_tol<T>());
  CHECK(dwt::rel_err(Sg.dev_d(), MatD(X.host_d() * (W0 + D).transpose())) <= upd_ref_tol<T>());

  // O = G·ΔW.
  auto Og = dwcuda::nan_output<T>(tokens, in, cm), Oc = dwcuda::nan_output<T>(tokens, in, cm);
  dw::apply_transposed(ctx, ug, G.gpu(), Og.gpu());
  dw::apply_transposed(uc, G.cpu(), Oc.cpu());
  CHECK(dwt::rel_err(Og.dev_d(), Oc.host_d()) <= upd_cpu_tol<T>());
  CHECK(dwt::rel_err(Og.dev_d(), MatD(G.host_d() * D)) <= upd_ref_tol<T>());

  // materialize into a caller's view.
  auto Mg = dwcuda::nan_output<T>(out, in, !cm);
  dw::materialize(ctx, ug, Mg.gpu());
  CHECK(dwt::rel_err(Mg.dev_d(), D) <= upd_cpu_tol<T>());

  // ‖ΔW‖_F (panels on the device; closed forms or panels on the CPU).
  const double fg = dw::frobenius_norm(ctx, ug), fc = dw::frobenius_norm(uc);
  CHECK(std::abs(fg - fc) <= upd_cpu_tol<T>() * std::max(1.0, fc));
  CHECK(std::abs(fg - D.norm()) <= upd_ref_tol<T>() * std::max(1.0, fc));

  // merge, unmerge, merge_checked, unmerge: in place on both sides.
  dw::merge(ctx, W.gpu(), ug);
  dw::merge(W.cpu(), uc);
  CHECK(dwt::rel_err(W.dev_d(), W.host_d()) <= upd_cpu_tol<T>());
  CHECK(dwt::rel_err(W.dev_d(), MatD(W0 + D)) <= upd_ref_tol<T>());
  dw::unmerge(ctx, W.gpu(), ug);
  dw::unmerge(W.cpu(), uc);
  CHECK(dwt::rel_err(W.dev_d(), W.host_d()) <= upd_cpu_tol<T>());
  CHECK(dwt::rel_err(W.dev_d(), W0) <= upd_ref_tol<T>());
  dw::merge_checked(ctx, W.gpu(), ug);
  dw::merge_checked(W.cpu(), uc);
  CHECK(dwt::rel_err(W.dev_d(), W.host_d()) <= upd_cpu_tol<T>());
  dw::unmerge(ctx, W.gpu(), ug);
  dw::unmerge(W.cpu(), uc);
  CHECK(dwt::rel_err(W.dev_d(), W.host_d()) <= upd_cpu_tol<T>());
}

template <class C>
constexpr double vjp_tol() {
  return std::is_same_v<C, double> ? 1e-12 : 1e-6;
}
/// dX against dX₀ + dY·D (D the CPU's materialised ΔW: another order of the products).
template <class C>
constexpr double vjp_ref_tol() {
  return std::is_same_v<C, double> ? 1e-11 : 2e-5;
}

struct slot {
  index_t rows, cols;
};
/// The slot of a vector factor of n values: [n, 1] (column) or [1, n]. A function, not
/// `c ? slot{n, 1} : slot{1, n}` in a braced list: nvcc 13.0's cicc crashes (SIGSEGV) on a
/// conditional of two braced temporaries there.
inline slot vector_slot(index_t n, bool column) {
  if (column) return slot{n, 1};
  return slot{1, n};
}

/// backward of ug (CUDA) and uc (CPU) from the same X, dY and starting gradients: every
/// slot and dX agree, and dX = dX₀ + dY·ΔW. mode 0: every slot and dX; mode 1: only the
/// last slot (no dX); mode 2: only dX.
template <class T, class UG, class UC>
void check_vjp(dw::cuda::context& ctx, const UG& ug, const UC& uc, const std::vector<slot>& slots, index_t tokens,
               bool cm, std::uint64_t seed) {
  static_assert(std::is_same_v<dw::device_of<UG>, dw::device::cuda>);
  using V = dw::cpu::vjp<UC>;
  REQUIRE(int(slots.size()) == V::factor_count);
  const index_t out = uc.rows(), in = uc.cols();
  CAPTURE(out);
  CAPTURE(in);
  CAPTURE(tokens);
  CAPTURE(cm);
  const MatD D = dw::materialize(uc).template cast<double>();
  twin<T> X(dwt::random(tokens, in, seed + 1), cm), dY(dwt::random(tokens, out, seed + 2), !cm);
  const dw::kernels::cpu_context cpu;
  for (int mode = 0; mode < 3; ++mode) {
    CAPTURE(mode);
    std::vector<std::unique_ptr<twin<T>>> gg, gc;
    std::vector<dw::matrix_view<T, dw::device::cuda>> vg;
    std::vector<dw::matrix_view<T>> vc;
    for (std::size_t i = 0; i < slots.size(); ++i) {
      const bool on = mode == 0 || (mode == 1 && i + 1 == slots.size());
      const MatD g0 = dwt::random(slots[i].rows, slots[i].cols, seed + 10 + i);
      gg.push_back(std::make_unique<twin<T>>(g0, (i % 2 == 0) == cm));
      gc.push_back(std::make_unique<twin<T>>(g0, (i % 2 == 0) == cm));
      vg.push_back(on ? gg.back()->gpu() : dw::matrix_view<T, dw::device::cuda>());
      vc.push_back(on ? gc.back()->cpu() : dw::matrix_view<T>());
    }
    const bool want_x = mode != 1;
    const MatD dX0 = dwt::random(tokens, in, seed + 5);
    twin<T> dXg(dX0, cm), dXc(dX0, cm);
    dw::cuda::backward<T>(ctx, ug, X.gpu(), dY.gpu(), std::span<const dw::matrix_view<T, dw::device::cuda>>(vg),
                          want_x ? dXg.gpu() : dw::matrix_view<T, dw::device::cuda>());
    V::template backward<T>(cpu, uc, X.cpu(), dY.cpu(), std::span<const dw::matrix_view<T>>(vc),
                            want_x ? dXc.cpu() : dw::matrix_view<T>());
    for (std::size_t i = 0; i < slots.size(); ++i) {
      INFO("the gradient of " << V::factor_name(int(i)));
      CHECK(dwt::rel_err(gg[i]->dev_d(), gc[i]->host_d()) <= vjp_tol<T>());
    }
    CHECK(dwt::rel_err(dXg.dev_d(), dXc.host_d()) <= vjp_tol<T>());
    // dXg.host holds dX₀ as stored (the device copy is the one written).
    if (want_x) CHECK(dwt::rel_err(dXg.dev_d(), MatD(dXg.host_d() + dY.host_d() * D)) <= vjp_ref_tol<T>());
    else CHECK((dXg.dev_d().array() == dXg.host_d().array()).all());
  }
}

/// The scratch of every operation of one CUDA update, each measured alone (statistics
/// reset before it) on a fresh context: apply of ΔW alone and of W + ΔW, apply_transposed,
/// merge, unmerge, merge_checked (then unmerge), materialize, frobenius_norm and, when
/// `slots` are given, cuda::backward with every slot and dX. W is the update's own weight
/// (DoRA, Bone bat, IA³, …) or any out × in weight; it is restored.
struct scratch_use {
  std::size_t per_call = 0;  ///< the largest high-water mark of the per-call operations (backward included)
  std::size_t whole = 0;     ///< … of merge_checked, materialize and frobenius_norm (panels of ΔW)
  std::size_t largest = 0;   ///< the largest single request of any operation
  std::string per_op;        ///< "op bytes …", for the test's message
};
template <class T, class U>
scratch_use measure_scratch(const U& u, twin<T>& W, index_t tokens, const std::vector<slot>* slots = nullptr) {
  const index_t out = u.rows(), in = u.cols();
  twin<T> X(dwt::random(tokens, in, 1)), G(dwt::random(tokens, out, 2)), dX(MatD::Zero(tokens, in));
  auto Y = nan_output<T>(tokens, out, false);
  auto O = nan_output<T>(tokens, in, false);
  auto M = nan_output<T>(out, in, false);
  dw::cuda::context ctx;
  scratch_use r;
  const auto step = [&](const char* op, bool whole, auto&& f) {
    ctx.reset_scratch_statistics();
    f();
    std::size_t& high = whole ? r.whole : r.per_call;
    high = std::max(high, ctx.scratch_high_water_bytes());
    r.largest = std::max(r.largest, ctx.largest_scratch_request_bytes());
    r.per_op += std::string(" ") + op + " " + std::to_string(ctx.scratch_high_water_bytes());
  };
  step("apply", false, [&] { dw::apply(ctx, u, X.gpu(), Y.gpu()); });
  step("W+u", false, [&] { dw::apply(ctx, W.gpu() + u, X.gpu(), Y.gpu()); });
  step("apply_transposed", false, [&] { dw::apply_transposed(ctx, u, G.gpu(), O.gpu()); });
  step("merge", false, [&] { dw::merge(ctx, W.gpu(), u); });
  step("unmerge", false, [&] { dw::unmerge(ctx, W.gpu(), u); });
  step("merge_checked", true, [&] { dw::merge_checked(ctx, W.gpu(), u); });
  step("unmerge", false, [&] { dw::unmerge(ctx, W.gpu(), u); });
  step("materialize", true, [&] { dw::materialize(ctx, u, M.gpu()); });
  step("frobenius_norm", true, [&] { (void)dw::frobenius_norm(ctx, u); });
  if (slots) {
    std::vector<std::unique_ptr<twin<T>>> g;
    std::vector<dw::matrix_view<T, dw::device::cuda>> v;
    for (const slot& sl : *slots) {
      g.push_back(std::make_unique<twin<T>>(MatD::Zero(sl.rows, sl.cols)));
      v.push_back(g.back()->gpu());
    }
    step("backward", false, [&] {
      dw::cuda::backward<T>(ctx, u, X.gpu(), G.gpu(), std::span<const dw::matrix_view<T, dw::device::cuda>>(v),
                            dX.gpu());
    });
  }
  return r;
}

}  // namespace dwcuda
