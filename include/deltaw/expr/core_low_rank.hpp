// SPDX-License-Identifier: MIT
// The core low-rank form ΔW = s·B·R·A: B [out, r1], a small core R [r1, r2], A [r2, in].
// LoRA-XS (Bałazy et al. 2024, arXiv:2405.17604), LoRA-SB (Ponkshe et al. 2024,
// arXiv:2411.19557) and LaMDA (Azizi et al. 2024, arXiv:2406.12832) all use it; they
// differ in which factors are trained and in how B, R, A are initialised (init/ is the
// place for the SVD-based initialisations, not this header).
//
// Which factors are trainable is a small flags struct: it decides parameter_count and
// which gradients the autograd computes; the evaluators ignore it.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// Which of B, R, A are trained.
struct core_trainable {
  bool B = false;
  bool R = true;
  bool A = false;
};

/// The order in which apply multiplies the three factors (all exact; the cheapest for
/// the number of tokens is chosen, see core_low_rank::cheapest_order).
enum class core_order {
  right_to_left,  ///< ((X·Aᵀ)·Rᵀ)·Bᵀ: tokens·(in·r2 + r2·r1 + r1·out)
  fold_B_R,       ///< (X·Aᵀ)·(B·R)ᵀ: out·r1·r2 + tokens·(in·r2 + r2·out)
  fold_R_A,       ///< (X·(R·A)ᵀ)·Bᵀ: r1·r2·in + tokens·(in·r1 + r1·out)
};

/// ΔW = s·B·R·A. Plain data: three held factors, a scale and the trainable flags.
template <class T, class Device = device::cpu>
class core_low_rank {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;

  core_low_rank(held_matrix<T, Device> B, held_matrix<T, Device> R, held_matrix<T, Device> A, double s,
                core_trainable trainable = {}, const char* op = "deltaw::core_lora")
      : B_(std::move(B)), R_(std::move(R)), A_(std::move(A)), scale_(detail::checked_scale(s, op)), tr_(trainable) {
    validate(op);
  }

  index_t rows() const { return B_.view.rows(); }
  index_t cols() const { return A_.view.cols(); }
  /// r1: columns of B (rows of R).
  index_t rank_out() const { return R_.view.rows(); }
  /// r2: rows of A (columns of R).
  index_t rank_in() const { return R_.view.cols(); }
  double scale() const { return scale_; }
  const core_trainable& trainable() const { return tr_; }
  const matrix_view<const T, Device>& B() const { return B_.view; }
  const matrix_view<const T, Device>& R() const { return R_.view; }
  const matrix_view<const T, Device>& A() const { return A_.view; }
  /// Calls f(name, view) for every view ΔW reads (the aliasing checks of the
  /// operations that write).
  template <class F>
  void for_each_operand(F&& f) const {
    f("B", B_.view);
    f("R", R_.view);
    f("A", A_.view);
  }

  /// The sizes of the trainable factors (LoRA-XS, LoRA-SB: r²; LaMDA: r² + out·r).
  index_t parameter_count() const {
    return (tr_.B ? rows() * rank_out() : 0) + (tr_.R ? rank_out() * rank_in() : 0) + (tr_.A ? rank_in() * cols() : 0);
  }

  /// Multiply-adds of apply for `tokens` rows in each order (see core_order).
  index_t order_cost(core_order o, index_t tokens) const {
    const index_t r1 = rank_out(), r2 = rank_in(), out = rows(), in = cols();
    switch (o) {
      case core_order::right_to_left: return tokens * (in * r2 + r2 * r1 + r1 * out);
      case core_order::fold_B_R: return out * r1 * r2 + tokens * (in * r2 + r2 * out);
      case core_order::fold_R_A: return r1 * r2 * in + tokens * (in * r1 + r1 * out);
    }
    return 0;
  }
  /// The cheapest exact order for `tokens` rows (ties go to right_to_left: no scratch of
  /// out or in rows).
  core_order cheapest_order(index_t tokens) const {
    core_order best = core_order::right_to_left;
    for (core_order o : {core_order::fold_B_R, core_order::fold_R_A})
      if (order_cost(o, tokens) < order_cost(best, tokens)) best = o;
    return best;
  }
  /// Extra flops of apply over the base GEMM, in the cheapest order.
  index_t flop_count(index_t tokens) const { return 2 * order_cost(cheapest_order(tokens), tokens); }

  core_low_rank with_scale(double s) const { return core_low_rank(B_, R_, A_, s, tr_); }
  core_low_rank with_trainable(core_trainable t) const { return core_low_rank(B_, R_, A_, scale_, t); }

 private:
  void validate(const char* op) const {
    const auto& B = B_.view;
    const auto& R = R_.view;
    const auto& A = A_.view;
    const std::string shapes = "B " + detail::shape_str(B.rows(), B.cols()) + ", R " +
                               detail::shape_str(R.rows(), R.cols()) + ", A " + detail::shape_str(A.rows(), A.cols());
    if (B.cols() != R.rows() || R.cols() != A.rows())
      throw shape_error(std::string(op) + ": B [out, r1], R [r1, r2] and A [r2, in] must chain; got " + shapes);
    if (R.rows() < 1 || R.cols() < 1)
      throw rank_error(std::string(op) + ": the ranks r1, r2 must be at least 1; got " + shapes);
  }

  held_matrix<T, Device> B_;
  held_matrix<T, Device> R_;
  held_matrix<T, Device> A_;
  double scale_;
  core_trainable tr_;
};

namespace detail {
template <class FB, class FR, class FA>
auto make_core_low_rank(FB&& B, FR&& R, FA&& A, double s, core_trainable t, const char* op) {
  auto hb = hold(std::forward<FB>(B));
  auto hr = hold(std::forward<FR>(R));
  auto ha = hold(std::forward<FA>(A));
  static_assert(std::is_same_v<decltype(hb), decltype(hr)> && std::is_same_v<decltype(hb), decltype(ha)>,
                "deltaw: B, R and A must have the same element type and device (e.g. all float on the CPU)");
  using T = std::remove_const_t<typename decltype(hb.view)::element_type>;
  return core_low_rank<T, typename decltype(hb.view)::device_type>(std::move(hb), std::move(hr), std::move(ha), s, t,
                                                                   op);
}
inline double core_alpha_scale(double a, index_t r, const char* op) {
  if (!std::isfinite(a)) throw non_finite_error(std::string(op) + ": alpha must be finite, got " + std::to_string(a));
  return a / double(r);
}
}  // namespace detail

/// ΔW = s·B·R·A with explicit scale and trainable flags.
template <class FB, class FR, class FA>
auto core_lora(FB&& B, FR&& R, FA&& A, scale s = scale(1.0), core_trainable t = {}) {
  return detail::make_core_low_rank(std::forward<FB>(B), std::forward<FR>(R), std::forward<FA>(A), s.value, t,
                                    "deltaw::core_lora");
}

/// LoRA-XS: B, A frozen (from the truncated SVD of W), R [r, r] trained; s = α/r, LoRA's
/// convention (UNVERIFIED against LoRA-XS's reference code; pass scale(s) to set s directly).
template <class FB, class FR, class FA>
auto lora_xs(FB&& B, FR&& R, FA&& A, alpha a) {
  auto u = detail::make_core_low_rank(std::forward<FB>(B), std::forward<FR>(R), std::forward<FA>(A), 1.0,
                                      core_trainable{false, true, false}, "deltaw::lora_xs");
  return u.with_scale(detail::core_alpha_scale(a.value, u.rank_out(), "deltaw::lora_xs"));
}
/// LoRA-XS with an explicit scale s.
template <class FB, class FR, class FA>
auto lora_xs(FB&& B, FR&& R, FA&& A, scale s = scale(1.0)) {
  return detail::make_core_low_rank(std::forward<FB>(B), std::forward<FR>(R), std::forward<FA>(A), s.value,
                                    core_trainable{false, true, false}, "deltaw::lora_xs");
}

/// LoRA-SB: B, A frozen, R [r, r] trained; α = r, so s = 1. W is not offset by the init.
template <class FB, class FR, class FA>
auto lora_sb(FB&& B, FR&& R, FA&& A) {
  return detail::make_core_low_rank(std::forward<FB>(B), std::forward<FR>(R), std::forward<FA>(A), 1.0,
                                    core_trainable{false, true, false}, "deltaw::lora_sb");
}

/// LaMDA: A frozen, R trained, B trained (until a schedule freezes it: pass
/// core_trainable{false, true, false} through with_trainable once it is frozen); s = α/r
/// (LoRA's convention, UNVERIFIED for LaMDA).
/// The column-by-column freezing of B is the optimiser's business, not this type's.
template <class FB, class FR, class FA>
auto lamda(FB&& B, FR&& R, FA&& A, alpha a) {
  auto u = detail::make_core_low_rank(std::forward<FB>(B), std::forward<FR>(R), std::forward<FA>(A), 1.0,
                                      core_trainable{true, true, false}, "deltaw::lamda");
  return u.with_scale(detail::core_alpha_scale(a.value, u.rank_out(), "deltaw::lamda"));
}
/// LaMDA with an explicit scale s.
template <class FB, class FR, class FA>
auto lamda(FB&& B, FR&& R, FA&& A, scale s = scale(1.0)) {
  return detail::make_core_low_rank(std::forward<FB>(B), std::forward<FR>(R), std::forward<FA>(A), s.value,
                                    core_trainable{true, true, false}, "deltaw::lamda");
}

DELTAW_NAMESPACE_END
