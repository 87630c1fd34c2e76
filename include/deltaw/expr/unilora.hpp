// SPDX-License-Identifier: MIT
// UniLoRA ("Uni-LoRA: One Vector Is All You Need", arXiv:2506.00799; PEFT 0.21's
// `unilora`): every entry of a LoRA's A [r, in] and B [out, r], over all adapted layers, is one
// entry of a single shared trainable vector θ [d] (theta_d_length), picked by a fixed index and
// normalised by 1/√(number of entries that share it):
//     A[i, j] = θ[idx_A[i, j]]·σ_A[i, j],   B[o, i] = θ[idx_B[o, i]]·σ_B[o, i],   ΔW = B·A
// (no α/r scale). σ = 1/√count, the count taken over the whole adapter (every module's A and B),
// so one module cannot compute its own scales: they are given with the indices (PEFT's
// unilora_scales_A / unilora_scales_B next to unilora_indices_A / unilora_indices_B when the
// adapter is saved with save_indices = true).
// The indices and scales are fixed at construction into a shared unilora_pattern (copied once,
// checked in range); the update holds θ. Apply gathers A and B (r·(in + out) values; never
// out × in) and runs the LoRA: 2·tokens·r·(in + out) flops.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// The fixed part of a UniLoRA module: indices into θ and their scales, row-major.
struct unilora_pattern {
  index_t out = 0, in = 0, r = 0, d = 0;  ///< ΔW [out, in], rank r, θ of length d
  std::vector<index_t> idx_A, idx_B;      ///< [r, in] and [out, r]
  std::vector<double> scale_A, scale_B;   ///< σ_A [r, in], σ_B [out, r]
};

namespace detail {
/// Builds a checked unilora_pattern from indices (any integer type, or floating holding
/// integers) and scales (any arithmetic type).
template <class I, class S>
std::shared_ptr<const unilora_pattern> unilora_make_pattern(index_t out, index_t in, index_t r, index_t d,
                                                            std::span<const I> idx_A, std::span<const I> idx_B,
                                                            std::span<const S> scale_A, std::span<const S> scale_B) {
  constexpr const char* op = "deltaw::unilora";
  if (out < 0 || in < 0 || r < 1 || d < 1)
    throw shape_error(std::string(op) + ": ΔW " + shape_str(out, in) + ", r = " + std::to_string(r) + ", θ of length " +
                      std::to_string(d) + " (r and d must be ≥ 1)");
  const auto sizes = [&](const char* what, std::size_t got, index_t rows, index_t cols) {
    if (got != std::size_t(rows * cols))
      throw shape_error(std::string(op) + ": " + what + " has " + std::to_string(got) + " entries; expected " +
                        shape_str(rows, cols));
  };
  sizes("unilora_indices_A", idx_A.size(), r, in);
  sizes("unilora_scales_A", scale_A.size(), r, in);
  sizes("unilora_indices_B", idx_B.size(), out, r);
  sizes("unilora_scales_B", scale_B.size(), out, r);
  auto p = std::make_shared<unilora_pattern>();
  p->out = out;
  p->in = in;
  p->r = r;
  p->d = d;
  const auto fill = [&](const char* what, std::span<const I> src, std::span<const S> sc, std::vector<index_t>& idx,
                        std::vector<double>& scale) {
    idx.resize(src.size());
    scale.resize(src.size());
    for (std::size_t k = 0; k < src.size(); ++k) {
      const double v = double(src[k]);
      if (!(v >= 0) || v >= double(d) || v != double(index_t(v)))
        throw argument_error(std::string(op) + ": " + what + " entry " + std::to_string(k) + " is " + std::to_string(v) +
                             ", outside [0, " + std::to_string(d) + ") (θ's length)");
      idx[k] = index_t(v);
      scale[k] = double(sc[k]);
      if (!std::isfinite(scale[k]))
        throw non_finite_error(std::string(op) + ": scale " + std::to_string(k) + " of " + what + " is not finite");
    }
  };
  fill("unilora_indices_A", idx_A, scale_A, p->idx_A, p->scale_A);
  fill("unilora_indices_B", idx_B, scale_B, p->idx_B, p->scale_B);
  return p;
}
}  // namespace detail

/// UniLoRA: ΔW = B·A with A, B gathered from θ through a fixed pattern.
template <class T, class Device = device::cpu>
class unilora_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "UniLoRA";

  unilora_update(std::shared_ptr<const unilora_pattern> p, held_vector<T, Device> theta)
      : P_(std::move(p)), t_(std::move(theta)) {
    if (!P_) throw argument_error("deltaw::unilora: no pattern");
    if (t_.view.size() != P_->d)
      throw shape_error("deltaw::unilora: θ (unilora_theta_d) has " + std::to_string(t_.view.size()) +
                        " entries but the pattern indexes a θ of length " + std::to_string(P_->d));
  }

  index_t rows() const { return P_->out; }
  index_t cols() const { return P_->in; }
  index_t rank() const { return P_->r; }
  const vector_view<const T, Device>& theta() const { return t_.view; }
  const std::shared_ptr<const unilora_pattern>& pattern() const { return P_; }
  template <class F>
  void for_each_operand(F&& f) const {
    f("theta", t_.view);
  }

  /// d: θ is the one trainable vector (shared by every module of the adapter).
  index_t parameter_count() const { return P_->d; }
  index_t flop_count(index_t tokens) const { return 2 * tokens * rank() * (rows() + cols()) + 2 * rank() * (rows() + cols()); }

 private:
  std::shared_ptr<const unilora_pattern> P_;
  held_vector<T, Device> t_;
};

/// UniLoRA over a layer [out, in] of rank r: idx_A / scale_A [r, in] and idx_B / scale_B
/// [out, r] row-major (PEFT's unilora_indices_* and unilora_scales_*), θ a vector of
/// length d (held by view, or owned if a temporary).
template <class I, class S, class VL>
auto unilora(index_t out, index_t in, index_t r, std::span<const I> idx_A, std::span<const I> idx_B,
             std::span<const S> scale_A, std::span<const S> scale_B, VL&& theta) {
  auto ht = hold_vector(std::forward<VL>(theta));
  using T = std::remove_const_t<typename decltype(ht.view)::element_type>;
  using D = typename decltype(ht.view)::device_type;
  auto p = detail::unilora_make_pattern(out, in, r, ht.view.size(), idx_A, idx_B, scale_A, scale_B);
  return unilora_update<T, D>(std::move(p), std::move(ht));
}
/// The same over an existing pattern (shared), e.g. another θ for the same layer.
template <class VL>
auto unilora(std::shared_ptr<const unilora_pattern> p, VL&& theta) {
  auto ht = hold_vector(std::forward<VL>(theta));
  using T = std::remove_const_t<typename decltype(ht.view)::element_type>;
  using D = typename decltype(ht.view)::device_type;
  return unilora_update<T, D>(std::move(p), std::move(ht));
}

/// PEFT's scales for an adapter: 1/√count(i) for each θ index i, counted over the indices of
/// every module (A and B) of the adapter, 0 for an index no entry uses. `indices` lists each
/// module's idx_A and idx_B.
template <class I>
std::vector<double> unilora_inverse_sqrt_counts(index_t d, std::span<const std::span<const I>> indices) {
  std::vector<double> c(std::size_t(std::max<index_t>(d, 0)), 0.0);
  for (const auto& s : indices)
    for (const I v : s) {
      if (!(double(v) >= 0) || double(v) >= double(d))
        throw argument_error("deltaw::unilora_inverse_sqrt_counts: index " + std::to_string(double(v)) + " outside [0, " +
                             std::to_string(d) + ")");
      c[std::size_t(v)] += 1.0;
    }
  for (double& x : c) x = x > 0 ? 1.0 / std::sqrt(x) : 0.0;
  return c;
}

DELTAW_NAMESPACE_END
