// SPDX-License-Identifier: MIT
// VB-LoRA ("VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks",
// arXiv:2405.15179, the paper PEFT cites; PEFT 0.21's `vblora`): the LoRA factors are cut
// into sub-vectors of length L, and every sub-vector is a softmax-weighted mixture of the
// top-k vectors of a bank shared by all adapted layers:
//     ΔW = B·A,   no scale,
//     A [r, in]:  A[i, t·L : (t+1)·L] = Σ_{j ∈ top_k(ℓᴬ[i, t])} softmax_j(ℓᴬ[i, t])·bank[j, :]
//     B [out, r]: B[t·L + l, i]       = Σ_{j ∈ top_k(ℓᴮ[t, i])} softmax_j(ℓᴮ[t, i])·bank[j, l]
// with the bank [n, L] (PEFT's vblora_vector_bank), the logits ℓᴬ [r, in/L, n]
// (vblora_logits_A) and ℓᴮ [out/L, r, n] (vblora_logits_B), the softmax over the k selected
// logits only. deltaw holds the logits as the matrices PEFT's tensors are when their first
// two dimensions are flattened: logits_A [r·in/L, n] (row i·in/L + t) and logits_B
// [out/L·r, n] (row t·r + i).
//
// Apply forms A and B only (r·(in + out) values, each a k-term mixture) and runs the two
// rank-r products, 2·tokens·r·(in + out) flops; ΔW is never formed (PEFT forms A and B too).
//
// Documented choices:
//  - Ties in the top-k selection go to the larger logit, then to the lower bank index (torch
//    leaves the order of equal values unspecified; random logits do not tie).
//  - Logits may be −∞ (PEFT's save_only_topk_weights files: every logit but the k kept is
//    −∞ and the kept ones are log(weight)); a selected −∞ logit gets weight 0. A row whose
//    k selected logits are all −∞, or any NaN logit, is refused with non_finite_error.
//  - The bank is shared: parameter_count counts this layer's logits and the bank once.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

template <class T, class Device = device::cpu>
class vblora_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "VB-LoRA";

  vblora_update(held_matrix<T, Device> logits_A, held_matrix<T, Device> logits_B, held_matrix<T, Device> bank, index_t r,
                index_t topk)
      : la_(std::move(logits_A)), lb_(std::move(logits_B)), bank_(std::move(bank)), r_(r), k_(topk) {
    constexpr const char* op = "deltaw::vblora";
    const auto &A = la_.view, &B = lb_.view, &V = bank_.view;
    if (r < 1) throw rank_error(std::string(op) + ": the rank r must be at least 1; got " + std::to_string(r));
    if (V.rows() < 1 || V.cols() < 1)
      throw shape_error(std::string(op) + ": the vector bank " + detail::shape_str(V.rows(), V.cols()) +
                        " must hold at least one vector of length at least 1");
    if (topk < 1 || topk > V.rows())
      throw argument_error(std::string(op) + ": topk = " + std::to_string(topk) + " must be in [1, " +
                           std::to_string(V.rows()) + "] (the bank's vector count)");
    if (A.cols() != V.rows() || B.cols() != V.rows() || A.rows() % r != 0 || B.rows() % r != 0)
      throw shape_error(std::string(op) + ": logits_A " + detail::shape_str(A.rows(), A.cols()) + " and logits_B " +
                        detail::shape_str(B.rows(), B.cols()) + " must be [r·in/L, n] and [out/L·r, n] with r = " +
                        std::to_string(r) + " and the bank " + detail::shape_str(V.rows(), V.cols()) + " [n, L]");
  }

  index_t rank() const { return r_; }
  index_t topk() const { return k_; }
  index_t vector_length() const { return bank_.view.cols(); }
  index_t num_vectors() const { return bank_.view.rows(); }
  index_t in_tiles() const { return la_.view.rows() / r_; }
  index_t out_tiles() const { return lb_.view.rows() / r_; }
  index_t rows() const { return out_tiles() * vector_length(); }
  index_t cols() const { return in_tiles() * vector_length(); }
  /// [r·in/L, n]: row i·in/L + t holds PEFT's vblora_logits_A[i, t, :].
  const matrix_view<const T, Device>& logits_A() const { return la_.view; }
  /// [out/L·r, n]: row t·r + i holds PEFT's vblora_logits_B[t, i, :].
  const matrix_view<const T, Device>& logits_B() const { return lb_.view; }
  /// [n, L], shared by every layer of the adapter.
  const matrix_view<const T, Device>& bank() const { return bank_.view; }
  template <class F>
  void for_each_operand(F&& f) const {
    f("logits_A", la_.view);
    f("logits_B", lb_.view);
    f("bank", bank_.view);
  }

  /// The logits of this layer and the (shared) bank.
  index_t parameter_count() const { return (la_.view.rows() + lb_.view.rows()) * num_vectors() + bank_.view.size(); }
  /// The two rank-r products, forming A and B (k-term mixtures) and the top-k selections.
  index_t flop_count(index_t tokens) const {
    const index_t rc = r_ * (rows() + cols());
    return 2 * tokens * rc + 2 * k_ * rc + (la_.view.rows() + lb_.view.rows()) * num_vectors();
  }

 private:
  held_matrix<T, Device> la_, lb_, bank_;
  index_t r_, k_;
};

/// VB-LoRA from logits_A [r·in/L, n], logits_B [out/L·r, n] (PEFT's tensors with their first
/// two dimensions flattened), the bank [n, L], the rank r and k; each held by view, or owned
/// if a temporary.
template <class LA, class LB, class VB>
auto vblora(LA&& logits_A, LB&& logits_B, VB&& bank, index_t r, index_t topk) {
  auto ha = hold(std::forward<LA>(logits_A));
  auto hb = hold(std::forward<LB>(logits_B));
  auto hv = hold(std::forward<VB>(bank));
  using T = std::remove_const_t<typename decltype(ha.view)::element_type>;
  using D = typename decltype(ha.view)::device_type;
  static_assert(std::is_same_v<decltype(ha), decltype(hb)> && std::is_same_v<decltype(ha), decltype(hv)>,
                "deltaw::vblora: the logits and the bank must have one element type and device");
  return vblora_update<T, D>(std::move(ha), std::move(hb), std::move(hv), r, topk);
}

/// The top-k selection of one row of logits: bank indices (largest logit first, ties to the
/// lower index) and their softmax weights, in double.
struct vblora_selection {
  std::vector<index_t> index;
  std::vector<double> weight;
};

namespace detail {
/// Selects the top k of `row` (n logits read through get(j)) into s, with softmax weights.
template <class Get>
void vblora_select(index_t n, index_t k, Get&& get, vblora_selection& s, const char* op, index_t row) {
  s.index.resize(std::size_t(n));
  for (index_t j = 0; j < n; ++j) {
    if (std::isnan(get(j)))
      throw non_finite_error(std::string(op) + ": logit row " + std::to_string(row) + " has a NaN at bank index " +
                             std::to_string(j));
    s.index[std::size_t(j)] = j;
  }
  std::partial_sort(s.index.begin(), s.index.begin() + k, s.index.end(), [&](index_t a, index_t b) {
    const double x = get(a), y = get(b);
    return x > y || (x == y && a < b);
  });
  s.index.resize(std::size_t(k));
  const double top = get(s.index[0]);
  if (!std::isfinite(top) && top < 0)
    throw non_finite_error(std::string(op) + ": logit row " + std::to_string(row) + " has all of its top " +
                           std::to_string(k) + " logits at −∞");
  if (!std::isfinite(top))
    throw non_finite_error(std::string(op) + ": logit row " + std::to_string(row) + " has a +∞ logit");
  s.weight.resize(std::size_t(k));
  double sum = 0;
  for (index_t q = 0; q < k; ++q) sum += s.weight[std::size_t(q)] = std::exp(get(s.index[std::size_t(q)]) - top);
  for (double& w : s.weight) w /= sum;
}
}  // namespace detail

DELTAW_NAMESPACE_END
