// SPDX-License-Identifier: MIT
// CUDA evaluation of the update types whose evaluators are written once in
// deltaw/backend/cpu/ (templated on the context and the device): B·R·A (core_low_rank),
// Block-LoRA, MiSS (+ mini), Bone bat, LoLDU, DoRA, NOLA, VeRA and RandLoRA, run with a
// cuda::context through shared_evaluator.cuh. Their primitive calls find the CUDA
// overloads (primitives.cuh, elementwise.cuh, vector_ops.cuh) by argument-dependent
// lookup; the few values they read on the host (DoRA's gains, LoLDU's coefficients, VeRA's
// λ, NOLA's coefficients) are downloaded once per call and uploaded back into scratch.
//
// Also here, for every CUDA update (these and LoRA, Kronecker):
//   frobenius_norm([ctx,] u)       ‖ΔW‖_F from panels of rows of ΔW (no closed form on CUDA
//                                  yet), each summed on the device in double; synchronises.
//   merge_checked([ctx,] W, u)     merge, after checking panel by panel on the device that no
//                                  entry becomes NaN/Inf in W's storage type (W untouched then).
//   cuda::dora(ctx, W, lora, m)    DoRA over a device weight: the row norms of W + s·B·A
//                                  computed on the device, panel by panel.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <deltaw/backend/cpu/block_affine.hpp>
#include <deltaw/backend/cpu/block_lora.hpp>
#include <deltaw/backend/cpu/core_low_rank.hpp>
#include <deltaw/backend/cpu/dora.hpp>
#include <deltaw/backend/cpu/ldu.hpp>
#include <deltaw/backend/cpu/low_rank.hpp>
#include <deltaw/backend/cpu/random_basis.hpp>

#include "ops.cuh"
#include "shared_evaluator.cuh"
#include "vector_ops.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

template <class T>
struct evaluator<core_low_rank<T, device::cuda>> : shared_evaluator<core_low_rank<T, device::cuda>> {};
template <class T>
struct evaluator<block_low_rank<T, device::cuda>> : shared_evaluator<block_low_rank<T, device::cuda>> {};
template <class T>
struct evaluator<miss_update<T, device::cuda>> : shared_evaluator<miss_update<T, device::cuda>> {};
template <class T, class TW>
struct evaluator<bone_bat_update<T, TW, device::cuda>> : shared_evaluator<bone_bat_update<T, TW, device::cuda>> {};
template <class T>
struct evaluator<ldu<T, device::cuda>> : shared_evaluator<ldu<T, device::cuda>> {};
template <class T, class TW>
struct evaluator<dora_update<T, TW, device::cuda>> : shared_evaluator<dora_update<T, TW, device::cuda>> {};
template <class T>
struct evaluator<nola_update<T, device::cuda>> : shared_evaluator<nola_update<T, device::cuda>> {};
template <class T>
struct evaluator<vera_update<T, device::cuda>> : shared_evaluator<vera_update<T, device::cuda>> {};
template <class T>
struct evaluator<randlora_update<T, device::cuda>> : shared_evaluator<randlora_update<T, device::cuda>> {};

namespace detail {

/// Rows per panel of the whole-ΔW operations: about `entries` entries (64 K by default),
/// so the scratch stays far below out × in.
inline index_t norm_panel_rows(index_t rows, index_t cols, index_t entries = index_t(1) << 16) {
  return std::max<index_t>(1, std::min<index_t>(rows, entries / std::max<index_t>(cols, 1)));
}

/// The row norms ‖W[o, :] + s·B[o, :]·A‖ (DoRA's n), computed in double on the device.
template <class TW, class T>
std::vector<double> dora_row_norms(context& ctx, const matrix_view<const TW, device::cuda>& W,
                                   const low_rank<T, device::cuda>& l) {
  const context& c = ctx;
  const index_t out = W.rows(), in = W.cols(), step = norm_panel_rows(out, in);
  std::vector<double> norms(static_cast<std::size_t>(out));
  ctx.begin_operation();
  auto P = kernels::make_scratch<double>(c, std::min(step, out), in);
  for (index_t r0 = 0; r0 < out; r0 += step) {
    const index_t n = std::min(step, out - r0);
    const auto Pv = P.view().middle_rows(0, n);
    const auto mark = c.position();
    copy(c, W.middle_rows(r0, n), Pv);
    cpu::evaluator<low_rank<T, device::cuda>>::template merge_rows<double>(c, l, r0, Pv);
    const auto sq = row_sums_of_squares(c, matrix_view<const double, device::cuda>(Pv));
    c.release(mark);
    for (index_t i = 0; i < n; ++i) norms[std::size_t(r0 + i)] = std::sqrt(sq[std::size_t(i)]);
  }
  return norms;
}

}  // namespace detail

/// DoRA over a device weight W [out, in] (held by view) with LoRA factors on the device and
/// magnitude m [out] (a device vector of the factors' type): the row norms of W + s·B·A are
/// computed on the device in double, cached on the host (as the CPU's dora() does).
template <class TW, class T>
auto dora(context& ctx, const matrix_view<TW, device::cuda>& W, const low_rank<T, device::cuda>& l,
          const vector_view<const T, device::cuda>& m) {
  const matrix_view<const std::remove_const_t<TW>, device::cuda> Wv(W);
  ::deltaw::detail::check_same_shape(Wv.rows(), Wv.cols(), l, "deltaw::cuda::dora");
  auto norms = std::make_shared<const std::vector<double>>(detail::dora_row_norms(ctx, Wv, l));
  return dora_update<T, std::remove_const_t<TW>, device::cuda>(held_matrix<std::remove_const_t<TW>, device::cuda>{Wv, nullptr},
                                                               l, held_vector<T, device::cuda>{m, nullptr},
                                                               std::move(norms));
}

}  // namespace cuda

/// ‖ΔW‖_F of a CUDA update: ΔW formed panel by panel (about 32 K entries each) in double in
/// ctx's scratch and summed on the device. Synchronises (the result is a host value).
template <update U>
  requires std::same_as<device_of<U>, device::cuda>
double frobenius_norm(cuda::context& ctx, const U& u) {
  const cuda::context& c = ctx;
  if (u.rows() == 0 || u.cols() == 0) return 0.0;
  cuda::device_guard g(ctx.device());
  ctx.begin_operation();
  // 32 K entries: the panel is double, and add_delta_rows of DoRA and Bone bat takes two more.
  const index_t step = cuda::detail::norm_panel_rows(u.rows(), u.cols(), index_t(1) << 15);
  auto P = kernels::make_scratch<double>(c, std::min(step, u.rows()), u.cols());
  double sq = 0.0;
  for (index_t r0 = 0; r0 < u.rows(); r0 += step) {
    const index_t n = std::min(step, u.rows() - r0);
    const auto Pv = P.view().middle_rows(0, n);
    const auto mark = c.position();
    fill(c, Pv, 0.0);
    cpu::evaluator<U>::template add_delta_rows<double>(c, u, r0, Pv);
    sq += cuda::sum_of_squares(c, matrix_view<const double, device::cuda>(Pv));
    c.release(mark);
  }
  return std::sqrt(sq);
}
template <update U>
  requires std::same_as<device_of<U>, device::cuda>
double frobenius_norm(const U& u) {
  return frobenius_norm(cuda::default_context(), u);
}

/// merge(), but first forms the merged rows panel by panel and throws non_finite_error,
/// leaving W unchanged, if any entry would be NaN or ±Inf once stored in W's type (PEFT's
/// safe_merge); the second pass recomputes the same panels and stores them. Scratch is one
/// panel of about 64 K entries, never out × in. Synchronises once per panel of the check.
template <class WV, update U>
  requires std::same_as<device_of<U>, device::cuda>
void merge_checked(cuda::context& ctx, const WV& W, const U& u) {
  constexpr const char* op = "deltaw::merge_checked";
  static_assert(cuda::detail::is_cuda_view_v<WV>,
                "deltaw::merge_checked: the update lives on CUDA, so W must be a CUDA view (deltaw::cuda::view(ptr, rows, cols))");
  using TW = typename WV::element_type;
  static_assert(!std::is_const_v<TW>, "deltaw::merge_checked: the weight must be a writable (non-const) CUDA view");
  using C = compute_t<TW, typename U::value_type>;
  ::deltaw::detail::check_same_shape(W.rows(), W.cols(), u, op);
  cuda::detail::check_own_weight(W, u, op);
  cuda::detail::check_unit_stride(W, "W", op);
  if (W.rows() == 0 || W.cols() == 0) return;
  const cuda::context& c = ctx;
  cuda::device_guard g(ctx.device());
  ctx.begin_operation();
  const index_t step = cuda::detail::norm_panel_rows(W.rows(), W.cols());
  auto scratch = kernels::make_scratch<C>(c, std::min(step, W.rows()), W.cols());
  for (int pass = 0; pass < 2; ++pass) {
    for (index_t r0 = 0; r0 < W.rows(); r0 += step) {
      const auto mark = c.position();
      const index_t n = std::min(step, W.rows() - r0);
      const auto P = scratch.view().middle_rows(0, n);
      const auto Wp = W.middle_rows(r0, n);
      copy(c, matrix_view<const TW, device::cuda>(Wp), P);
      cpu::evaluator<U>::template merge_rows<C>(c, u, r0, P);
      if (pass == 0) {
        const index_t bad = cuda::count_non_finite_as<TW>(c, matrix_view<const C, device::cuda>(P));
        if (bad > 0)
          throw non_finite_error(std::string(op) + ": merging would make " + std::to_string(bad) + " entries of rows [" +
                                 std::to_string(r0) + ", " + std::to_string(r0 + n) + ") of W " +
                                 detail::shape_str(W.rows(), W.cols()) + " non-finite once stored as " +
                                 dtype_name<TW>() + "; W is left unchanged");
      } else {
        copy(c, matrix_view<const C, device::cuda>(P), Wp);
      }
      c.release(mark);
    }
  }
}
template <class WV, update U>
  requires std::same_as<device_of<U>, device::cuda>
void merge_checked(const WV& W, const U& u) {
  merge_checked(cuda::default_context(), W, u);
}

DELTAW_NAMESPACE_END
