// SPDX-License-Identifier: MIT
// IA³ (Liu et al. 2022; PEFT's IA3): a learned vector l rescales a layer's output, or its
// input for the feed-forward modules PEFT lists in `feedforward_modules`:
//     output:  y = (x·Wᵀ)·diag(l)   W' = diag(l)·W   ΔW = diag(l − 1)·W    (l [out])
//     input:   y = (x·diag(l))·Wᵀ   W' = W·diag(l)   ΔW = W·diag(l − 1)    (l [in])
// ΔW reads W (as DoRA and Bone bat do), so the update holds W and merges only into it.
// Apply scales the input or the output of the one base product (backend/cpu/ia3.hpp);
// W' is never formed. PEFT's output IA³ also scales the layer's bias: b' = l ⊙ b (the bias
// is not part of ΔW; ia3_update::scales_bias says when the caller must scale it).
#pragma once

#include <string>
#include <type_traits>
#include <utility>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// Which side of W an IA³ vector scales.
enum class ia3_side : unsigned char {
  output,  ///< y = (x·Wᵀ)·diag(l), l [out] (PEFT: is_feedforward = false)
  input    ///< y = (x·diag(l))·Wᵀ, l [in]  (PEFT: the module is in feedforward_modules)
};

/// IA³ over W [out, in] with the vector l (size out or in by side).
template <class T, class TW, class Device = device::cpu>
class ia3_update {
 public:
  using value_type = T;
  using weight_type = TW;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "IA³";

  ia3_update(held_matrix<TW, Device> W, held_vector<T, Device> l, ia3_side side)
      : W_(std::move(W)), l_(std::move(l)), side_(side) {
    const index_t want = side_ == ia3_side::output ? W_.view.rows() : W_.view.cols();
    if (l_.view.size() != want)
      throw shape_error(std::string("deltaw::ia3: the ") + (side_ == ia3_side::output ? "output" : "input") +
                        " scaling vector must have " + std::to_string(want) + " entries for W " +
                        detail::shape_str(W_.view.rows(), W_.view.cols()) + "; got " + std::to_string(l_.view.size()));
  }

  index_t rows() const { return W_.view.rows(); }
  index_t cols() const { return W_.view.cols(); }
  ia3_side side() const { return side_; }
  /// True for output scaling: PEFT then also scales the layer's bias by l.
  bool scales_bias() const { return side_ == ia3_side::output; }
  const matrix_view<const TW, Device>& W() const { return W_.view; }
  const vector_view<const T, Device>& l() const { return l_.view; }
  /// Calls f(name, view) for every view ΔW reads except the weight W() (the aliasing
  /// checks of the operations that write).
  template <class F>
  void for_each_operand(F&& f) const {
    f("l", l_.view);
  }

  /// The vector: out or in values.
  index_t parameter_count() const { return l_.view.size(); }
  /// Extra flops of apply over the base GEMM: one scaling of the output or of the input.
  index_t flop_count(index_t tokens) const { return tokens * l_.view.size(); }

 private:
  held_matrix<TW, Device> W_;
  held_vector<T, Device> l_;
  ia3_side side_;
};

/// IA³ over W [out, in] (held by view, or owned if a temporary) with the vector l: [out]
/// for ia3_side::output, [in] for ia3_side::input. l: a deltaw vector view or an Eigen
/// vector (PEFT's ia3_l [out, 1] / [1, in] flattened).
template <class WL, class LL>
auto ia3(WL&& W, LL&& l, ia3_side side) {
  auto hw = hold(std::forward<WL>(W));
  auto hl = hold_vector(std::forward<LL>(l));
  using TW = std::remove_const_t<typename decltype(hw.view)::element_type>;
  using T = std::remove_const_t<typename decltype(hl.view)::element_type>;
  using D = typename decltype(hw.view)::device_type;
  static_assert(std::is_same_v<typename decltype(hl.view)::device_type, D>, "deltaw::ia3: W and l must live on the same device");
  return ia3_update<T, TW, D>(std::move(hw), std::move(hl), side);
}

DELTAW_NAMESPACE_END
