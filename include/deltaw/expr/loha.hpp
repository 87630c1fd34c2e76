// SPDX-License-Identifier: MIT
// LoHa (FedPara / LyCORIS; PEFT's LOHA): ΔW = s·(B₁·A₁) ⊙ (B₂·A₂) with B₁ [out, r₁],
// A₁ [r₁, in], B₂ [out, r₂], A₂ [r₂, in] and s = α/r (PEFT: r₁ = r₂ = r).
//
// The Hadamard product of two low-rank matrices has rank ≤ r₁·r₂ and factors exactly as
//     ΔW = s·K_B·K_A,   K_B = B₁ ⊙_r B₂ [out, r₁r₂],   K_A = A₁ ⊙_c A₂ [r₁r₂, in],
// the row-wise (face-splitting) and column-wise Khatri–Rao products:
// K_B[o, a·r₂ + b] = B₁[o, a]·B₂[o, b] and K_A[a·r₂ + b, i] = A₁[a, i]·A₂[b, i]. Apply is then
// a LoRA of rank r₁r₂ (backend/cpu/loha.hpp): X·ΔWᵀ = s·(X·K_Aᵀ)·K_Bᵀ, never the dense ΔW
// PEFT builds on every forward.
#pragma once

#include <string>
#include <type_traits>
#include <utility>

#include "low_rank.hpp"

DELTAW_NAMESPACE_BEGIN

/// ΔW = s·(B₁·A₁) ⊙ (B₂·A₂). Plain data: four held factors and a scale.
template <class T, class Device = device::cpu>
class hadamard_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;

  hadamard_update(held_matrix<T, Device> B1, held_matrix<T, Device> A1, held_matrix<T, Device> B2,
                  held_matrix<T, Device> A2, double s)
      : B1_(std::move(B1)), A1_(std::move(A1)), B2_(std::move(B2)), A2_(std::move(A2)),
        scale_(detail::checked_scale(s, "deltaw::loha")) {
    validate();
  }

  index_t rows() const { return B1_.view.rows(); }
  index_t cols() const { return A1_.view.cols(); }
  index_t rank1() const { return A1_.view.rows(); }
  index_t rank2() const { return A2_.view.rows(); }
  /// r₁·r₂: the inner dimension of the Khatri–Rao factorisation (the rank bound of ΔW).
  index_t kr_rank() const { return rank1() * rank2(); }
  double scale() const { return scale_; }
  const matrix_view<const T, Device>& B1() const { return B1_.view; }
  const matrix_view<const T, Device>& A1() const { return A1_.view; }
  const matrix_view<const T, Device>& B2() const { return B2_.view; }
  const matrix_view<const T, Device>& A2() const { return A2_.view; }
  /// Calls f(name, view) for every view ΔW reads (the aliasing checks of the operations
  /// that write).
  template <class F>
  void for_each_operand(F&& f) const {
    f("B1", B1_.view);
    f("A1", A1_.view);
    f("B2", B2_.view);
    f("A2", A2_.view);
  }

  /// (r₁ + r₂)·(out + in) trainable values.
  index_t parameter_count() const { return (rank1() + rank2()) * (rows() + cols()); }
  /// Extra flops of apply over the base GEMM: forming K_A and K_B (r₁r₂·(in + out)), then
  /// Z = X·K_Aᵀ and Y += s·Z·K_Bᵀ (2·tokens·r₁r₂·(in + out)).
  index_t flop_count(index_t tokens) const { return (2 * tokens + 1) * kr_rank() * (rows() + cols()); }

  hadamard_update with_scale(double s) const { return hadamard_update(B1_, A1_, B2_, A2_, s); }

 private:
  void validate() const {
    auto sh = [](const auto& v) { return detail::shape_str(v.rows(), v.cols()); };
    const std::string all = "B1 " + sh(B1_.view) + ", A1 " + sh(A1_.view) + ", B2 " + sh(B2_.view) + ", A2 " + sh(A2_.view);
    if (B1_.view.cols() != A1_.view.rows() || B2_.view.cols() != A2_.view.rows())
      throw shape_error("deltaw::loha: B1 [out, r1]·A1 [r1, in] and B2 [out, r2]·A2 [r2, in] must share their ranks; got " + all);
    if (B1_.view.rows() != B2_.view.rows() || A1_.view.cols() != A2_.view.cols())
      throw shape_error("deltaw::loha: B1·A1 and B2·A2 must have the same shape [out, in]; got " + all);
    if (A1_.view.rows() < 1 || A2_.view.rows() < 1)
      throw rank_error("deltaw::loha: both ranks must be at least 1; got " + all);
  }

  held_matrix<T, Device> B1_, A1_, B2_, A2_;
  double scale_;
};

namespace detail {
template <class F1, class F2, class F3, class F4>
auto make_hadamard(F1&& B1, F2&& A1, F3&& B2, F4&& A2, double s) {
  auto h1 = hold(std::forward<F1>(B1));
  auto h2 = hold(std::forward<F2>(A1));
  auto h3 = hold(std::forward<F3>(B2));
  auto h4 = hold(std::forward<F4>(A2));
  using H = decltype(h1);
  if constexpr (!(std::is_same_v<H, decltype(h2)> && std::is_same_v<H, decltype(h3)> && std::is_same_v<H, decltype(h4)>)) {
    static_assert(std::is_same_v<H, decltype(h2)> && std::is_same_v<H, decltype(h3)> && std::is_same_v<H, decltype(h4)>,
                  "deltaw::loha: the four factors must have the same element type and device");
  } else {
    using T = std::remove_const_t<typename decltype(h1.view)::element_type>;
    return hadamard_update<T, typename decltype(h1.view)::device_type>(std::move(h1), std::move(h2), std::move(h3),
                                                                       std::move(h4), s);
  }
}
}  // namespace detail

/// LoHa with PEFT's scale s = α/r (r = r₁; PEFT has r₁ = r₂). B1 [out, r], A1 [r, in],
/// B2 [out, r], A2 [r, in] (PEFT's hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b).
template <class F1, class F2, class F3, class F4>
auto loha(F1&& B1, F2&& A1, F3&& B2, F4&& A2, alpha a) {
  auto u = detail::make_hadamard(std::forward<F1>(B1), std::forward<F2>(A1), std::forward<F3>(B2), std::forward<F4>(A2), 1.0);
  return u.with_scale(detail::lora_alpha_scale(a.value, u.rank1(), false, "deltaw::loha"));
}
/// LoHa with an explicit scale s.
template <class F1, class F2, class F3, class F4>
auto loha(F1&& B1, F2&& A1, F3&& B2, F4&& A2, scale s = scale(1.0)) {
  return detail::make_hadamard(std::forward<F1>(B1), std::forward<F2>(A1), std::forward<F3>(B2), std::forward<F4>(A2),
                               s.value);
}

DELTAW_NAMESPACE_END
