// SPDX-License-Identifier: MIT
// What the weight-rewriting initialisations (PiSSA, OLoRA, …) produce, and the conversion
// of such an adapter into a plain LoRA on the original weight.
//
// These initialisations move a principal part of W into the adapter: W_res = W − s·B₀·A₀,
// so W_res + s·B₀·A₀ = W and the model is unchanged at initialisation. After training
// (B, A), the update relative to the ORIGINAL W is s·B·A − s·B₀·A₀ = s·[B, −B₀]·[A; A₀]: a
// plain rank-2r LoRA that anyone can load on the unmodified base model.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <string>
#include <type_traits>

#include "../backend/cpu/eigen_bridge.hpp"
#include "../core/eigen.hpp"
#include "../core/error.hpp"
#include "../expr/low_rank.hpp"

DELTAW_NAMESPACE_BEGIN

/// LoRA factors owned by value: B [out, r], A [r, in], scale s (ΔW = s·B·A).
template <class T>
struct lora_factors {
  dense<T> B;
  dense<T> A;
  double s = 1.0;

  index_t rank() const { return A.rows(); }
  /// The update over these factors (it views B and A: keep this object alive).
  auto adapter() const { return deltaw::lora(B, A, deltaw::scale(s)); }
};

namespace detail {
/// W ← W − s·B·A in place, row panel by row panel (no m × n temporary), in arithmetic C,
/// from the factors as stored (rounded to T), so that W_res + s·B·A reproduces W up to
/// one rounding of W_res.
template <class C, class TW, class T>
void subtract_scaled_product(const matrix_view<TW>& W, const dense<T>& B, const dense<T>& A, double s) {
  const index_t m = W.rows(), n = W.cols();
  const dense<C> Ac = A.template cast<C>();
  constexpr index_t panel = 256;
  for (index_t r0 = 0; r0 < m; r0 += panel) {
    const index_t nr = std::min(panel, m - r0);
    const dense<C> P = (C(s) * B.middleRows(r0, nr).template cast<C>()) * Ac;
    for (index_t i = 0; i < nr; ++i)
      for (index_t j = 0; j < n; ++j) W(r0 + i, j) = TW(C(W(r0 + i, j)) - P(i, j));
  }
}

/// A writable float/double CPU view of W (an Eigen matrix or a deltaw view).
template <class WL>
auto writable_weight(WL&& W, const char* op) {
  auto v = view(std::forward<WL>(W));
  using T = typename decltype(v)::element_type;
  static_assert(!std::is_const_v<T>, "deltaw initialisations rewrite W in place: pass a writable matrix or view");
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "deltaw initialisations: W must be float or double");
  static_assert(std::same_as<typename decltype(v)::device_type, device::cpu>,
                "deltaw initialisations: W must be a CPU matrix");
  (void)op;
  return v;
}

inline void check_init_rank(index_t r, index_t m, index_t n, const char* op) {
  if (r < 1 || r > std::min(m, n))
    throw rank_error(std::string(op) + ": the rank r must be in [1, min(out, in)] = [1, " +
                     std::to_string(std::min(m, n)) + "] for W " + shape_str(m, n) + "; got r = " + std::to_string(r));
}
}  // namespace detail

/// A weight-rewriting adapter (initial factors B₀, A₀; trained B, A; one scale s) as a plain
/// LoRA on the original W: B' = [B, −B₀] [out, 2r], A' = [A; A₀] [2r, in], same s, so
/// W + s·B'·A' = W_res + s·B·A exactly in exact arithmetic.
template <class T>
lora_factors<T> to_plain_lora(const lora_factors<T>& trained, const lora_factors<T>& initial) {
  constexpr const char* op = "deltaw::to_plain_lora";
  const auto shapes = [&] {
    return " (trained B " + detail::shape_str(trained.B.rows(), trained.B.cols()) + ", A " +
           detail::shape_str(trained.A.rows(), trained.A.cols()) + "; initial B " +
           detail::shape_str(initial.B.rows(), initial.B.cols()) + ", A " +
           detail::shape_str(initial.A.rows(), initial.A.cols()) + ")";
  };
  if (trained.B.cols() != trained.A.rows() || initial.B.cols() != initial.A.rows() ||
      trained.B.rows() != initial.B.rows() || trained.A.cols() != initial.A.cols())
    throw shape_error(std::string(op) + ": the factors must be B [out, r], A [r, in] over the same out and in" +
                      shapes());
  if (trained.s != initial.s)
    throw argument_error(std::string(op) + ": the trained and initial adapters must share the scale; got " +
                         std::to_string(trained.s) + " and " + std::to_string(initial.s));
  const index_t r1 = trained.rank(), r0 = initial.rank();
  lora_factors<T> out;
  out.s = trained.s;
  out.B.resize(trained.B.rows(), r1 + r0);
  out.B.leftCols(r1) = trained.B;
  out.B.rightCols(r0) = -initial.B;
  out.A.resize(r1 + r0, trained.A.cols());
  out.A.topRows(r1) = trained.A;
  out.A.bottomRows(r0) = initial.A;
  return out;
}

DELTAW_NAMESPACE_END
