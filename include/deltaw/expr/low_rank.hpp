// SPDX-License-Identifier: MIT
// LoRA and rsLoRA: ΔW = s·B·A with B [out, r], A [r, in].
#pragma once

#include <cmath>
#include <string>
#include <type_traits>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// ΔW = s·B·A. Plain data: two held factors and a scale. The dense ΔW is never formed
/// except by materialize().
template <class T, class Device = device::cpu>
class low_rank {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;

  low_rank(held_matrix<T, Device> B, held_matrix<T, Device> A, double s)
      : B_(std::move(B)), A_(std::move(A)), scale_(detail::checked_scale(s, "deltaw::lora")) {
    validate();
  }

  index_t rows() const { return B_.view.rows(); }
  index_t cols() const { return A_.view.cols(); }
  index_t rank() const { return A_.view.rows(); }
  double scale() const { return scale_; }
  const matrix_view<const T, Device>& B() const { return B_.view; }
  const matrix_view<const T, Device>& A() const { return A_.view; }
  /// Calls f(name, view) for every view ΔW reads (the aliasing checks of the
  /// operations that write).
  template <class F>
  void for_each_operand(F&& f) const {
    f("B", B_.view);
    f("A", A_.view);
  }

  /// r·(out + in) trainable values.
  index_t parameter_count() const { return rank() * (rows() + cols()); }
  /// Extra flops of apply over the base GEMM: Z = X·Aᵀ and Y += s·Z·Bᵀ.
  index_t flop_count(index_t tokens) const { return 2 * tokens * rank() * (rows() + cols()); }

  /// The same factors with another scale.
  low_rank with_scale(double s) const { return low_rank(B_, A_, s); }

 private:
  void validate() const {
    const auto& B = B_.view;
    const auto& A = A_.view;
    if (B.cols() != A.rows())
      throw shape_error("deltaw::lora: B [out, r] and A [r, in] must share r; got B " +
                        detail::shape_str(B.rows(), B.cols()) + " and A " + detail::shape_str(A.rows(), A.cols()));
    if (A.rows() < 1)
      throw rank_error("deltaw::lora: the rank r must be at least 1; got B " + detail::shape_str(B.rows(), B.cols()) +
                       " and A " + detail::shape_str(A.rows(), A.cols()));
  }

  held_matrix<T, Device> B_;
  held_matrix<T, Device> A_;
  double scale_;
};

namespace detail {
inline double lora_alpha_scale(double a, index_t r, bool rs, const char* op) {
  if (!std::isfinite(a)) throw non_finite_error(std::string(op) + ": alpha must be finite, got " + std::to_string(a));
  return rs ? a / std::sqrt(double(r)) : a / double(r);
}
template <class FB, class FA>
auto make_low_rank(FB&& B, FA&& A, double s) {
  auto hb = hold(std::forward<FB>(B));
  auto ha = hold(std::forward<FA>(A));
  if constexpr (!std::is_same_v<decltype(hb), decltype(ha)>) {
    static_assert(std::is_same_v<decltype(hb), decltype(ha)>,
                  "deltaw::lora: B and A must have the same element type and device (e.g. both float on the CPU)");
  } else {
    using T = std::remove_const_t<typename decltype(hb.view)::element_type>;
    return low_rank<T, typename decltype(hb.view)::device_type>(std::move(hb), std::move(ha), s);
  }
}
}  // namespace detail

/// LoRA with s = α/r. B [out, r], A [r, in]: deltaw views or Eigen matrices (viewed, or
/// owned when passed as temporaries).
template <class FB, class FA>
auto lora(FB&& B, FA&& A, alpha a) {
  auto u = detail::make_low_rank(std::forward<FB>(B), std::forward<FA>(A), 1.0);  // validates shapes first
  return u.with_scale(detail::lora_alpha_scale(a.value, u.rank(), false, "deltaw::lora"));
}
/// LoRA with an explicit scale s.
template <class FB, class FA>
auto lora(FB&& B, FA&& A, scale s = scale(1.0)) {
  return detail::make_low_rank(std::forward<FB>(B), std::forward<FA>(A), s.value);
}
/// rsLoRA: s = α/√r.
template <class FB, class FA>
auto rslora(FB&& B, FA&& A, alpha a) {
  auto u = detail::make_low_rank(std::forward<FB>(B), std::forward<FA>(A), 1.0);
  return u.with_scale(detail::lora_alpha_scale(a.value, u.rank(), true, "deltaw::rslora"));
}

DELTAW_NAMESPACE_END
