// SPDX-License-Identifier: MIT
// AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient
// Fine-Tuning"; PEFT 0.21's ADALORA, SVDLinear): an SVD-shaped low-rank update
//     ΔW = s·B·diag(E)·A,   B [out, r] (lora_B), E [r] (lora_E [r, 1]), A [r, in] (lora_A)
// with PEFT's s = scaling / (ranknum + 1e-5), scaling = lora_alpha (or r when lora_alpha is 0)
// and ranknum the rank the layer was created with (init_r; rank_pattern keeps it when it
// drops triplets). Pruned triplets have E_i = 0 (PEFT's masking during training) or are
// removed from the tensors (rank_pattern on save); both are plain data here.
//
// Applied lazily as Y += s·((X·Aᵀ)·diag(E))·Bᵀ (2·tokens·r·(in + out) flops over the base
// GEMM), never forming ΔW. The importance-driven rank allocation that trains it is in
// deltaw/train/adalora.hpp.
#pragma once

#include <string>
#include <utility>

#include "low_rank.hpp"

DELTAW_NAMESPACE_BEGIN

/// ΔW = s·B·diag(E)·A. Plain data: three held factors and a scale.
template <class T, class Device = device::cpu>
class adalora_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;

  adalora_update(held_matrix<T, Device> B, held_vector<T, Device> E, held_matrix<T, Device> A, double s)
      : B_(std::move(B)), E_(std::move(E)), A_(std::move(A)), scale_(detail::checked_scale(s, "deltaw::adalora")) {
    if (B_.view.cols() != A_.view.rows() || E_.view.size() != A_.view.rows())
      throw shape_error("deltaw::adalora: B [out, r], E [r] and A [r, in] must share r; got B " +
                        detail::shape_str(B_.view.rows(), B_.view.cols()) + ", E [" + std::to_string(E_.view.size()) +
                        "], A " + detail::shape_str(A_.view.rows(), A_.view.cols()));
  }

  index_t rows() const { return B_.view.rows(); }
  index_t cols() const { return A_.view.cols(); }
  /// r, the number of (kept) triplets (PEFT allows r = 0).
  index_t rank() const { return A_.view.rows(); }
  double scale() const { return scale_; }
  const matrix_view<const T, Device>& B() const { return B_.view; }
  const vector_view<const T, Device>& E() const { return E_.view; }
  const matrix_view<const T, Device>& A() const { return A_.view; }
  template <class F>
  void for_each_operand(F&& f) const {
    f("B", B_.view);
    f("E", E_.view);
    f("A", A_.view);
  }
  /// r·(out + in + 1) trainable values.
  index_t parameter_count() const { return rank() * (rows() + cols() + 1); }
  /// Extra flops of apply over the base GEMM: 2·tokens·r·(in + out) + tokens·r.
  index_t flop_count(index_t tokens) const { return tokens * rank() * (2 * (rows() + cols()) + 1); }
  adalora_update with_scale(double s) const { return adalora_update(B_, E_, A_, s); }

 private:
  held_matrix<T, Device> B_;
  held_vector<T, Device> E_;
  held_matrix<T, Device> A_;
  double scale_;
};

namespace detail {
/// PEFT's SVDLinear scale: scaling / (ranknum + 1e-5), scaling = α, or r when α is 0.
inline double adalora_peft_scale(double alpha, index_t ranknum, index_t r) {
  if (ranknum < 0) throw rank_error("deltaw::adalora: ranknum must be non-negative; got " + std::to_string(ranknum));
  return (alpha > 0 ? alpha : double(r)) / (double(ranknum) + 1e-5);
}
template <class BL, class EL, class AL>
auto make_adalora(BL&& B, EL&& E, AL&& A, double s) {
  auto hb = hold(std::forward<BL>(B));
  auto he = hold_vector(std::forward<EL>(E));
  auto ha = hold(std::forward<AL>(A));
  using T = std::remove_const_t<typename decltype(hb.view)::element_type>;
  using D = typename decltype(hb.view)::device_type;
  static_assert(std::is_same_v<decltype(hb), decltype(ha)> &&
                    std::is_same_v<std::remove_const_t<typename decltype(he.view)::element_type>, T>,
                "deltaw::adalora: B, E and A must have the same element type and device");
  return adalora_update<T, D>(std::move(hb), std::move(he), std::move(ha), s);
}
}  // namespace detail

/// AdaLoRA with an explicit scale s: B [out, r], E [r] (any vector, e.g. PEFT's lora_E
/// [r, 1] flattened), A [r, in].
template <class BL, class EL, class AL>
auto adalora(BL&& B, EL&& E, AL&& A, scale s = scale(1.0)) {
  return detail::make_adalora(std::forward<BL>(B), std::forward<EL>(E), std::forward<AL>(A), s.value);
}
/// AdaLoRA with PEFT's scale α / (ranknum + 1e-5) (ranknum: the layer's init_r).
template <class BL, class EL, class AL>
auto adalora(BL&& B, EL&& E, AL&& A, alpha a, index_t ranknum) {
  auto u = detail::make_adalora(std::forward<BL>(B), std::forward<EL>(E), std::forward<AL>(A), 1.0);
  return u.with_scale(detail::adalora_peft_scale(a.value, ranknum, u.rank()));
}

DELTAW_NAMESPACE_END
