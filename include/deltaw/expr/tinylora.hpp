// SPDX-License-Identifier: MIT
// TinyLoRA ("Learning to Reason in 13 Parameters", arXiv:2602.04118; PEFT 0.21's TINYLORA
// tuner): LoRA-XS's core form ΔW = s·B·R·A (expr/core_low_rank.hpp) whose r × r core is
// itself a projection of a tiny trained vector v [u] through u fixed random matrices:
//     R = Σᵢ vᵢ·Pᵢ,   B = U_r·√S_r [out, r] (tinylora_B),  A = √S_r·V_rᵀ [r, in] (tinylora_A),
// B and A from the truncated SVD of the frozen W (tinylora_factors_dense, init/tinylora.hpp;
// PEFT stores them),
// P [u, r, r] (tinylora_P; held here as [u, r·r], row i = Pᵢ row-major), v (tinylora_v.<group>,
// shared by the modules of one weight-tying group). PEFT's scale is 1.
//
// Apply forms the r × r core once (one [1, u]·[u, r²] product) and then multiplies as
// core_low_rank does: ((X·Aᵀ)·Rᵀ)·Bᵀ, 2·tokens·r·(in + r + out) flops. Only v is trained; the
// VJP gives dv = P·vec(dR) (and dB, dA for completeness).
#pragma once

#include <string>
#include <type_traits>
#include <utility>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// ΔW = s·B·(Σᵢ vᵢ·Pᵢ)·A. Plain data: B, A, P (matrices), v (vector) and a scale.
template <class T, class Device = device::cpu>
class tinylora_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "TinyLoRA";

  tinylora_update(held_matrix<T, Device> B, held_vector<T, Device> v, held_matrix<T, Device> P,
                  held_matrix<T, Device> A, double s)
      : B_(std::move(B)), v_(std::move(v)), P_(std::move(P)), A_(std::move(A)),
        scale_(detail::checked_scale(s, "deltaw::tinylora")) {
    const auto &Bv = B_.view, &Pv = P_.view, &Av = A_.view;
    const index_t r = Av.rows();
    if (Bv.cols() != r || Pv.cols() != r * r || Pv.rows() != v_.view.size() || r < 1)
      throw shape_error("deltaw::tinylora: B [out, r], v [u], P [u, r·r] and A [r, in] (r ≥ 1) must agree; got B " +
                        detail::shape_str(Bv.rows(), Bv.cols()) + ", v [" + std::to_string(v_.view.size()) + "], P " +
                        detail::shape_str(Pv.rows(), Pv.cols()) + ", A " + detail::shape_str(Av.rows(), Av.cols()));
  }

  index_t rows() const { return B_.view.rows(); }
  index_t cols() const { return A_.view.cols(); }
  /// r, the SVD rank (and the core's size).
  index_t rank() const { return A_.view.rows(); }
  /// u, the length of the trained vector.
  index_t vector_size() const { return v_.view.size(); }
  double scale() const { return scale_; }
  const matrix_view<const T, Device>& B() const { return B_.view; }
  const vector_view<const T, Device>& v() const { return v_.view; }
  /// The projections P [u, r·r]: row i is Pᵢ (r × r) row-major.
  const matrix_view<const T, Device>& P() const { return P_.view; }
  const matrix_view<const T, Device>& A() const { return A_.view; }
  template <class F>
  void for_each_operand(F&& f) const {
    f("B", B_.view);
    f("v", v_.view);
    f("P", P_.view);
    f("A", A_.view);
  }
  /// u trained values (per weight-tying group; a shared v is counted once per module here).
  index_t parameter_count() const { return vector_size(); }
  /// Extra flops of apply over the base GEMM: the core, then three thin products.
  index_t flop_count(index_t tokens) const {
    const index_t r = rank();
    return 2 * (vector_size() * r * r + tokens * r * (cols() + r + rows()));
  }
  tinylora_update with_scale(double s) const { return tinylora_update(B_, v_, P_, A_, s); }

 private:
  held_matrix<T, Device> B_;
  held_vector<T, Device> v_;
  held_matrix<T, Device> P_;
  held_matrix<T, Device> A_;
  double scale_;
};

/// TinyLoRA: B [out, r], v [u], P [u, r·r] (PEFT's [u, r, r] flattened), A [r, in]; scale 1
/// unless given (PEFT has none).
template <class FB, class FV, class FP, class FA>
auto tinylora(FB&& B, FV&& v, FP&& P, FA&& A, scale s = scale(1.0)) {
  auto hb = hold(std::forward<FB>(B));
  auto hv = hold_vector(std::forward<FV>(v));
  auto hp = hold(std::forward<FP>(P));
  auto ha = hold(std::forward<FA>(A));
  using T = std::remove_const_t<typename decltype(hb.view)::element_type>;
  using D = typename decltype(hb.view)::device_type;
  static_assert(std::is_same_v<decltype(hb), decltype(ha)> && std::is_same_v<decltype(hb), decltype(hp)> &&
                    std::is_same_v<std::remove_const_t<typename decltype(hv.view)::element_type>, T>,
                "deltaw::tinylora: B, v, P and A must have the same element type and device");
  return tinylora_update<T, D>(std::move(hb), std::move(hv), std::move(hp), std::move(ha), s.value);
}

DELTAW_NAMESPACE_END
