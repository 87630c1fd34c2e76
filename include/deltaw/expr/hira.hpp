// SPDX-License-Identifier: MIT
// HiRA (Huang et al. 2025, "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large
// Language Models", ICLR 2025; PEFT 0.21's `hira`): the low-rank B·A modulates the frozen
// weight element-wise,
//     ΔW = W ⊙ (B·A),   B [out, r] (hira_B), A [r, in] (hira_A),   no scale
// so ΔW has the rank of W, not r. ΔW reads W, so the update holds W and merges only into it.
// Apply never forms B·A or ΔW whole (backend/cpu/hira.hpp), by one of two exact schedules:
//   products   y += Σ_j b_j ⊙ (W·(a_j ⊙ x)): r products with W (r·tokens·out·in flops and
//              r·tokens·(in + out) scratch), for tokens·r ≤ tokens + r (decoding: one token);
//   panels     W ⊙ (B·A) formed panel_rows rows at a time and multiplied into the output
//              ((tokens + r)·out·in flops, one panel of scratch): every larger batch.
// In a lazy sum over its own W the panels carry W ⊙ (1 + B·A), so the base product is not
// run separately. merge multiplies W by (1 + B·A) in place; unmerge divides by it (exact up
// to rounding; an entry 1 + (B·A)_oi = 0 erased W_oi and is refused). PEFT instead keeps a
// copy of W to unmerge.
#pragma once

#include <string>
#include <type_traits>
#include <utility>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

template <class T, class TW, class Device = device::cpu>
class hira_update {
 public:
  using value_type = T;
  using weight_type = TW;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "HiRA";

  hira_update(held_matrix<TW, Device> W, held_matrix<T, Device> B, held_matrix<T, Device> A)
      : W_(std::move(W)), B_(std::move(B)), A_(std::move(A)) {
    const auto &Wv = W_.view, &Bv = B_.view, &Av = A_.view;
    if (Bv.rows() != Wv.rows() || Av.cols() != Wv.cols() || Bv.cols() != Av.rows())
      throw shape_error("deltaw::hira: W " + detail::shape_str(Wv.rows(), Wv.cols()) + ", B " +
                        detail::shape_str(Bv.rows(), Bv.cols()) + ", A " + detail::shape_str(Av.rows(), Av.cols()) +
                        " are not [out, in], [out, r], [r, in]");
  }

  index_t rows() const { return W_.view.rows(); }
  index_t cols() const { return W_.view.cols(); }
  index_t rank() const { return A_.view.rows(); }
  const matrix_view<const TW, Device>& W() const { return W_.view; }
  const matrix_view<const T, Device>& B() const { return B_.view; }
  const matrix_view<const T, Device>& A() const { return A_.view; }
  template <class F>
  void for_each_operand(F&& f) const {
    f("B", B_.view);
    f("A", A_.view);
  }

  /// r·(out + in) values.
  index_t parameter_count() const { return rank() * (rows() + cols()); }
  /// Extra flops of apply over the base GEMM, for the schedule apply takes.
  index_t flop_count(index_t tokens) const {
    const index_t r = rank(), oi = rows() * cols();
    return tokens * r <= tokens + r ? 2 * r * tokens * oi + tokens * (rows() + cols()) * r : 2 * r * oi + 2 * oi;
  }

 private:
  held_matrix<TW, Device> W_;
  held_matrix<T, Device> B_, A_;
};

/// HiRA over W [out, in] with PEFT's hira_B [out, r] and hira_A [r, in]; each held by view,
/// or owned if a temporary.
template <class WL, class BL, class AL>
auto hira(WL&& W, BL&& B, AL&& A) {
  auto hw = hold(std::forward<WL>(W));
  auto hb = hold(std::forward<BL>(B));
  auto ha = hold(std::forward<AL>(A));
  using TW = std::remove_const_t<typename decltype(hw.view)::element_type>;
  using T = std::remove_const_t<typename decltype(hb.view)::element_type>;
  using D = typename decltype(hw.view)::device_type;
  static_assert(std::is_same_v<T, std::remove_const_t<typename decltype(ha.view)::element_type>>,
                "deltaw::hira: B and A must have one element type");
  return hira_update<T, TW, D>(std::move(hw), std::move(hb), std::move(ha));
}

DELTAW_NAMESPACE_END
