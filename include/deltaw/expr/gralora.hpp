// SPDX-License-Identifier: MIT
// GraLoRA ("GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning",
// arXiv:2505.20355, NeurIPS 2025; PEFT 0.21's `gralora`): W's [out, in] is cut into a k×k grid
// of [out/k, in/k] blocks, each with its own rank-(r/k) update, plus an optional plain LoRA of
// rank hr (PEFT's hybrid_r) over the whole matrix:
//     ΔW[j, n] = s·B_j[n·q : (n+1)·q, :]ᵀ·A_n[:, j·q : (j+1)·q]ᵀ  +  s·(B_h·A_h)[j, n],
//     q = r/k,  s = α/(r + hr)
// with PEFT's tensors gralora_A [k, in/k, r] (A_n = gralora_A[n], the input block n's down
// projection) and gralora_B [k, r, out/k] (B_j = gralora_B[j], the output block j's up
// projection), gralora_A_general.weight [hr, in] = A_h and gralora_B_general.weight
// [out, hr] = B_h. Output block j reads the q columns j·q … of every input block's r-vector:
// the k² blocks together have rank up to k·r while the parameters are those of a rank-r LoRA.
// The type takes gralora_A as the contiguous matrix [in, r] it is in memory (block n's rows
// n·in/k …) and gralora_B as [k·r, out/k] (block j's rows j·r …).
// Apply never forms ΔW or a block of it (backend/cpu/gralora.hpp): Z = X·A_n per input block
// (tokens × k·r), gathered per output block into U_j (tokens × r), Y_j += s·U_j·B_j:
// 2·tokens·r·(in + out) flops plus the hybrid LoRA's 2·tokens·hr·(in + out).
#pragma once

#include <string>
#include <type_traits>
#include <utility>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

template <class T, class Device = device::cpu>
class gralora_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "GraLoRA";

  /// A [in, r] (gralora_A flattened), B [k·r, out/k] (gralora_B flattened), k ≥ 1 dividing r,
  /// A_h [hr, in] and B_h [out, hr] (hr = 0: no hybrid part), s the whole update's scale.
  gralora_update(held_matrix<T, Device> A, held_matrix<T, Device> B, index_t k, held_matrix<T, Device> Ah,
                 held_matrix<T, Device> Bh, double s)
      : A_(std::move(A)), B_(std::move(B)), Ah_(std::move(Ah)), Bh_(std::move(Bh)), k_(k),
        s_(detail::checked_scale(s, "deltaw::gralora")) {
    const auto &Av = A_.view, &Bv = B_.view, &Ahv = Ah_.view, &Bhv = Bh_.view;
    const auto shapes = [&] {
      return "gralora_A as " + detail::shape_str(Av.rows(), Av.cols()) + " [in, r], gralora_B as " +
             detail::shape_str(Bv.rows(), Bv.cols()) + " [k·r, out/k], k = " + std::to_string(k);
    };
    if (k < 1) throw argument_error("deltaw::gralora: k = " + std::to_string(k) + " must be at least 1");
    if (Av.cols() < 1 || Av.cols() % k != 0)
      throw shape_error("deltaw::gralora: r must be a positive multiple of k (PEFT: r % gralora_k == 0); " + shapes());
    if (Av.rows() % k != 0)
      throw shape_error("deltaw::gralora: in must be a multiple of k (PEFT: in_features % gralora_k == 0); " + shapes());
    if (Bv.rows() != k * Av.cols())
      throw shape_error("deltaw::gralora: gralora_B must have k·r rows; " + shapes());
    if (Ahv.rows() != Bhv.cols() || (Ahv.rows() > 0 && (Ahv.cols() != Av.rows() || Bhv.rows() != k * Bv.cols())))
      throw shape_error("deltaw::gralora: the hybrid LoRA A_h " + detail::shape_str(Ahv.rows(), Ahv.cols()) + ", B_h " +
                        detail::shape_str(Bhv.rows(), Bhv.cols()) + " is not [hr, in], [out, hr] for " + shapes());
  }

  index_t rows() const { return k_ * B_.view.cols(); }
  index_t cols() const { return A_.view.rows(); }
  /// PEFT's r (the grid's rank per input block).
  index_t rank() const { return A_.view.cols(); }
  index_t k() const { return k_; }
  /// r/k: the rank of each of the k² blocks.
  index_t block_rank() const { return rank() / k_; }
  /// PEFT's hybrid_r (0: no hybrid part).
  index_t hybrid_rank() const { return Ah_.view.rows(); }
  double scale() const { return s_; }
  const matrix_view<const T, Device>& A() const { return A_.view; }
  const matrix_view<const T, Device>& B() const { return B_.view; }
  const matrix_view<const T, Device>& hybrid_A() const { return Ah_.view; }
  const matrix_view<const T, Device>& hybrid_B() const { return Bh_.view; }
  template <class F>
  void for_each_operand(F&& f) const {
    f("A", A_.view);
    f("B", B_.view);
    f("hybrid_A", Ah_.view);
    f("hybrid_B", Bh_.view);
  }

  /// r·(in + out) + hr·(in + out).
  index_t parameter_count() const { return (rank() + hybrid_rank()) * (rows() + cols()); }
  index_t flop_count(index_t tokens) const { return 2 * tokens * (rank() + hybrid_rank()) * (rows() + cols()); }

 private:
  held_matrix<T, Device> A_, B_, Ah_, Bh_;
  index_t k_;
  double s_;
};

/// GraLoRA from gralora_A as [in, r], gralora_B as [k·r, out/k], the grid size k, the
/// hybrid LoRA A_h [hr, in], B_h [out, hr] and the scale (PEFT: α/(r + hr)); each held by
/// view, or owned if a temporary.
template <class AL, class BL, class AHL, class BHL>
auto gralora(AL&& A, BL&& B, index_t k, AHL&& Ah, BHL&& Bh, scale s) {
  auto ha = hold(std::forward<AL>(A));
  auto hb = hold(std::forward<BL>(B));
  auto hah = hold(std::forward<AHL>(Ah));
  auto hbh = hold(std::forward<BHL>(Bh));
  using T = std::remove_const_t<typename decltype(ha.view)::element_type>;
  using D = typename decltype(ha.view)::device_type;
  static_assert(std::is_same_v<T, std::remove_const_t<typename decltype(hb.view)::element_type>> &&
                    std::is_same_v<T, std::remove_const_t<typename decltype(hah.view)::element_type>> &&
                    std::is_same_v<T, std::remove_const_t<typename decltype(hbh.view)::element_type>>,
                "deltaw::gralora: A, B, A_h and B_h must have one element type");
  return gralora_update<T, D>(std::move(ha), std::move(hb), k, std::move(hah), std::move(hbh), s.value);
}
/// GraLoRA without the hybrid LoRA (PEFT's hybrid_r = 0).
template <class AL, class BL>
auto gralora(AL&& A, BL&& B, index_t k, scale s) {
  auto ha = hold(std::forward<AL>(A));
  auto hb = hold(std::forward<BL>(B));
  using T = std::remove_const_t<typename decltype(ha.view)::element_type>;
  using D = typename decltype(ha.view)::device_type;
  static_assert(std::is_same_v<T, std::remove_const_t<typename decltype(hb.view)::element_type>>,
                "deltaw::gralora: A and B must have one element type");
  const index_t in = ha.view.rows(), out = k > 0 ? k * hb.view.cols() : 0;
  return gralora_update<T, D>(std::move(ha), std::move(hb), k,
                              held_matrix<T, D>{matrix_view<const T, D>(nullptr, 0, in), nullptr},
                              held_matrix<T, D>{matrix_view<const T, D>(nullptr, out, 0), nullptr}, s.value);
}

DELTAW_NAMESPACE_END
