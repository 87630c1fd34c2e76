// SPDX-License-Identifier: MIT
// DeLoRA (Bini et al. 2025, "Decoupling Angles and Strength in Low-rank Adaptation",
// ICLR 2025; PEFT 0.21's `delora`): a LoRA whose rank-one terms are normalised, so that the
// learnable boundary λ bounds ‖ΔW‖, and whose input side is scaled by the frozen column norms
// of the pretrained weight:
//     ΔW = B·diag(c)·A·diag(w),   c_i = λ / (r·max(‖A[i, :]‖, 1e-4)·max(‖B[:, i]‖, 1e-4))
// with B [out, r] (delora_B), A [r, in] (delora_A), λ one value (delora_lambda), w [in]
// (delora_w_norm: ‖W₀[:, j]‖, computed once from the base weight and saved with the adapter).
// ΔW does not read W (w is stored), so it is an additive update applied lazily as
// ((X·diag(w))·Aᵀ·diag(c))·Bᵀ: 2·tokens·r·(in + out) + tokens·in flops, no out × in matrix.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// PEFT's lower bound on the norms of A's rows and B's columns.
inline constexpr double delora_norm_floor = 1e-4;

template <class T, class Device = device::cpu>
class delora_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "DeLoRA";

  delora_update(held_matrix<T, Device> B, held_matrix<T, Device> A, held_vector<T, Device> lambda, held_vector<T, Device> w)
      : B_(std::move(B)), A_(std::move(A)), l_(std::move(lambda)), w_(std::move(w)) {
    const auto &Bv = B_.view, &Av = A_.view;
    if (Bv.cols() != Av.rows() || Av.rows() < 1)
      throw shape_error("deltaw::delora: B " + detail::shape_str(Bv.rows(), Bv.cols()) + " and A " +
                        detail::shape_str(Av.rows(), Av.cols()) + " are not [out, r] and [r, in] with r ≥ 1");
    if (l_.view.size() != 1)
      throw shape_error("deltaw::delora: λ (delora_lambda) has " + std::to_string(l_.view.size()) + " entries; expected 1");
    if (w_.view.size() != Av.cols())
      throw shape_error("deltaw::delora: the weight norms w (delora_w_norm) have " + std::to_string(w_.view.size()) +
                        " entries but A is " + detail::shape_str(Av.rows(), Av.cols()) + " [r, in]");
  }

  index_t rows() const { return B_.view.rows(); }
  index_t cols() const { return A_.view.cols(); }
  index_t rank() const { return A_.view.rows(); }
  const matrix_view<const T, Device>& B() const { return B_.view; }
  const matrix_view<const T, Device>& A() const { return A_.view; }
  const vector_view<const T, Device>& lambda() const { return l_.view; }
  const vector_view<const T, Device>& w_norm() const { return w_.view; }
  template <class F>
  void for_each_operand(F&& f) const {
    f("B", B_.view);
    f("A", A_.view);
    f("lambda", l_.view);
    f("w_norm", w_.view);
  }

  /// r·(out + in) + 1 trainable values (w is frozen).
  index_t parameter_count() const { return rank() * (rows() + cols()) + 1; }
  index_t flop_count(index_t tokens) const { return 2 * tokens * rank() * (rows() + cols()) + tokens * cols(); }

 private:
  held_matrix<T, Device> B_, A_;
  held_vector<T, Device> l_, w_;
};

/// DeLoRA from B [out, r], A [r, in], λ (a one-entry vector: PEFT's delora_lambda) and the
/// weight norms w [in]; each held by view, or owned if a temporary.
template <class BL, class AL, class LL, class WL>
auto delora(BL&& B, AL&& A, LL&& lambda, WL&& w_norm) {
  auto hb = hold(std::forward<BL>(B));
  auto ha = hold(std::forward<AL>(A));
  auto hl = hold_vector(std::forward<LL>(lambda));
  auto hw = hold_vector(std::forward<WL>(w_norm));
  using T = std::remove_const_t<typename decltype(hb.view)::element_type>;
  using D = typename decltype(hb.view)::device_type;
  return delora_update<T, D>(std::move(hb), std::move(ha), std::move(hl), std::move(hw));
}

/// w = the column norms ‖W[:, j]‖ of a base weight W [out, in], in double: PEFT's
/// delora_w_norm (torch.norm(W, dim=0)), computed once when the adapter is created.
template <class WL>
Eigen::Matrix<double, Eigen::Dynamic, 1> delora_weight_norms(const WL& W) {
  const auto v = view(W);
  Eigen::Matrix<double, Eigen::Dynamic, 1> n = Eigen::Matrix<double, Eigen::Dynamic, 1>::Zero(v.cols());
  for (index_t i = 0; i < v.rows(); ++i)
    for (index_t j = 0; j < v.cols(); ++j) {
      const double x = convert<double>(v(i, j));
      n[j] += x * x;
    }
  return n.cwiseSqrt();
}

DELTAW_NAMESPACE_END
