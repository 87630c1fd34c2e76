// SPDX-License-Identifier: MIT
// RoAd (Liao et al. 2024, "2D Rotary Adaptation for Efficient Parameter Fine-Tuning,
// Batching and Interpretability", arXiv:2409.00119; PEFT 0.21's `road`): the layer's output
// features are paired and each pair is rotated and scaled, W' = R·W, y' = R·y:
//     y'[o] = f[o]·y[o] − s[o]·y[o + h]       (o in the first half of its group)
//     y'[q] = f[q]·y[q] + s[q]·y[q − h]       (q in the second half)
// with the output split into groups of g = group_size features, h = g/2, element k of a
// group paired with element k + h (PEFT's layout), and f = α·cos θ, s = α·sin θ:
//     road_1   θ, α [out/2]: one angle and scale per pair, shared by both rows
//     road_2   θ, α [out]:   one per output feature
//     road_4   θ, α [2·out]: per group, g values for f (θ_c, α_c) then g values for s (θ_s, α_s)
// ΔW = (R − I)·W reads W, so the update holds W and merges only into it (as IA³). Apply is
// the base product and a pass over the output (3·tokens·out flops); merge mixes row pairs of
// W in place; unmerge applies the 2 × 2 inverses (det = f_o·f_q + s_o·s_q ≠ 0). PEFT also
// rotates the layer's bias (R·b): it is not part of ΔW (rotate_bias in io/peft_structured.hpp).
#pragma once

#include <string>
#include <type_traits>
#include <utility>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// How many angles / scales RoAd learns (PEFT's RoadConfig.variant).
enum class road_variant : unsigned char { road_1, road_2, road_4 };

inline constexpr const char* road_variant_name(road_variant v) {
  return v == road_variant::road_1 ? "road_1" : v == road_variant::road_2 ? "road_2" : "road_4";
}
/// The length of θ and α for `out` output features.
inline constexpr index_t road_parameter_size(road_variant v, index_t out) {
  return v == road_variant::road_1 ? out / 2 : v == road_variant::road_2 ? out : 2 * out;
}

template <class T, class TW, class Device = device::cpu>
class road_update {
 public:
  using value_type = T;
  using weight_type = TW;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "RoAd";

  road_update(held_matrix<TW, Device> W, held_vector<T, Device> theta, held_vector<T, Device> alpha, road_variant v,
              index_t group_size)
      : W_(std::move(W)), theta_(std::move(theta)), alpha_(std::move(alpha)), v_(v), g_(group_size) {
    const index_t out = W_.view.rows();
    const std::string what = std::string("deltaw::road (") + road_variant_name(v_) + ", group_size " + std::to_string(g_) +
                             ", W " + detail::shape_str(out, W_.view.cols()) + ")";
    if (g_ < 2 || g_ % 2 != 0) throw argument_error(what + ": group_size must be even and at least 2");
    if (out % g_ != 0) throw shape_error(what + ": the output features must be a multiple of group_size");
    const index_t n = road_parameter_size(v_, out);
    if (theta_.view.size() != n || alpha_.view.size() != n)
      throw shape_error(what + ": θ and α must have " + std::to_string(n) + " entries; got " +
                        std::to_string(theta_.view.size()) + " and " + std::to_string(alpha_.view.size()));
  }

  index_t rows() const { return W_.view.rows(); }
  index_t cols() const { return W_.view.cols(); }
  road_variant variant() const { return v_; }
  index_t group_size() const { return g_; }
  const matrix_view<const TW, Device>& W() const { return W_.view; }
  const vector_view<const T, Device>& theta() const { return theta_.view; }
  const vector_view<const T, Device>& alpha() const { return alpha_.view; }
  template <class F>
  void for_each_operand(F&& f) const {
    f("theta", theta_.view);
    f("alpha", alpha_.view);
  }

  /// θ and α.
  index_t parameter_count() const { return 2 * theta_.view.size(); }
  /// Extra flops of apply over the base GEMM: two multiplies and an add per output.
  index_t flop_count(index_t tokens) const { return 3 * tokens * rows(); }

 private:
  held_matrix<TW, Device> W_;
  held_vector<T, Device> theta_, alpha_;
  road_variant v_;
  index_t g_;
};

/// RoAd over W [out, in] (held by view, or owned if a temporary) with PEFT's road_theta and
/// road_alpha (deltaw vector views or Eigen vectors) of the variant's length.
template <class WL, class TL, class AL>
auto road(WL&& W, TL&& theta, AL&& alpha, road_variant v, index_t group_size = 64) {
  auto hw = hold(std::forward<WL>(W));
  auto ht = hold_vector(std::forward<TL>(theta));
  auto ha = hold_vector(std::forward<AL>(alpha));
  using TW = std::remove_const_t<typename decltype(hw.view)::element_type>;
  using T = std::remove_const_t<typename decltype(ht.view)::element_type>;
  using D = typename decltype(hw.view)::device_type;
  static_assert(std::is_same_v<T, std::remove_const_t<typename decltype(ha.view)::element_type>>,
                "deltaw::road: θ and α must have one element type");
  return road_update<T, TW, D>(std::move(hw), std::move(ht), std::move(ha), v, group_size);
}

DELTAW_NAMESPACE_END
