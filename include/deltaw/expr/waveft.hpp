// SPDX-License-Identifier: MIT
// WaveFT (PEFT 0.21's `waveft`, wavelet-based fine-tuning): n trainable wavelet
// coefficients c_k at positions (r_k, q_k) of an
// [out', in'] coefficient grid (out' = out rounded up to even, likewise in'), ΔW = s·IDWT2 of
// the grid (one level, PEFT's waverec2d) cropped to [out, in], s = PEFT's `scaling`
// (default 25). Only the Haar wavelet (PEFT's default "db1") is supported: there each
// coefficient is one 2 × 2 atom of ΔW. With H = out'/2, Wd = in'/2 and (i, j) = (r mod H,
// q mod Wd), the coefficient sits in quadrant cA (r < H, q < Wd), cH (r < H, q ≥ Wd), cV
// (r ≥ H, q < Wd) or cD (both ≥), and adds
//     s·c/2 · σ_u·τ_w  at  (2i + u, 2j + w),  u, w ∈ {0, 1},
//     σ_1 = −1 in cH and cD (high-pass over rows), τ_1 = −1 in cV and cD (over columns),
// entries past out or in being cropped (checked against PEFT in tests/fourier). With
// use_idwt = false (PEFT's option) ΔW[r_k, q_k] = s·c_k. Apply is O(n) per token (at most 4
// multiply-adds per coefficient), never the [out', in'] grid or ΔW that PEFT forms on every
// forward. The positions are PEFT's torch.randperm draw (fourierft_peft_indices, the same
// generator and algorithm as FourierFT's).
#pragma once

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "fourierft.hpp"

DELTAW_NAMESPACE_BEGIN

template <class T, class Device = device::cpu>
class waveft_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "WaveFT";

  waveft_update(held_vector<T, Device> spectrum, std::shared_ptr<const fourierft_indices> idx, index_t out, index_t in,
                double s, bool use_idwt)
      : c_(std::move(spectrum)), idx_(std::move(idx)), out_(out), in_(in), scale_(detail::checked_scale(s, "deltaw::waveft")),
        idwt_(use_idwt) {
    const std::string shapes = "ΔW [" + std::to_string(out) + ", " + std::to_string(in) + "], " +
                               std::to_string(c_.view.size()) + " coefficients";
    if (out < 1 || in < 1) throw shape_error("deltaw::waveft: out and in must be at least 1; got " + shapes);
    if (!idx_ || idx_->rows.size() != idx_->cols.size() || index_t(idx_->rows.size()) != c_.view.size())
      throw shape_error("deltaw::waveft: one (row, column) position per coefficient is needed; got " + shapes);
    std::vector<std::uint64_t> keys;
    keys.reserve(idx_->rows.size());
    for (std::size_t k = 0; k < idx_->rows.size(); ++k) {
      const index_t r = idx_->rows[k], q = idx_->cols[k];
      if (r < 0 || r >= out || q < 0 || q >= in)
        throw shape_error("deltaw::waveft: position " + std::to_string(k) + " is (" + std::to_string(r) + ", " +
                          std::to_string(q) + "), outside " + shapes);
      keys.push_back(std::uint64_t(r) * std::uint64_t(in) + std::uint64_t(q));
    }
    std::sort(keys.begin(), keys.end());
    if (std::adjacent_find(keys.begin(), keys.end()) != keys.end())
      throw argument_error("deltaw::waveft: a position appears twice (PEFT's indices are distinct); " + shapes);
  }

  index_t rows() const { return out_; }
  index_t cols() const { return in_; }
  index_t size() const { return c_.view.size(); }
  double scale() const { return scale_; }
  /// True for PEFT's use_idwt (Haar synthesis), false for the coefficients placed directly.
  bool use_idwt() const { return idwt_; }
  const vector_view<const T, Device>& spectrum() const { return c_.view; }
  const fourierft_indices& indices() const { return *idx_; }
  template <class F>
  void for_each_operand(F&& f) const {
    if (c_.view.size() > 0)
      f("spectrum", matrix_view<const T, Device>(c_.view.data(), 1, c_.view.size(), c_.view.size() * c_.view.stride(), c_.view.stride()));
  }

  /// The 2 × 2 atom of coefficient k (use_idwt): top-left corner (r0, q0) and the signs of
  /// its second row and second column.
  struct atom {
    index_t r0, q0;
    int row_sign, col_sign;
  };
  atom atom_of(std::size_t k) const {
    const index_t H = (out_ + 1) / 2, Wd = (in_ + 1) / 2;
    const index_t r = idx_->rows[k], q = idx_->cols[k];
    return {2 * (r % H), 2 * (q % Wd), q >= Wd ? -1 : 1, r >= H ? -1 : 1};
  }

  index_t parameter_count() const { return size(); }
  /// Extra flops of apply: at most 8 per coefficient and token.
  index_t flop_count(index_t tokens) const { return 8 * tokens * size(); }

  waveft_update with_scale(double s) const { return waveft_update(c_, idx_, out_, in_, s, idwt_); }

 private:
  held_vector<T, Device> c_;
  std::shared_ptr<const fourierft_indices> idx_;
  index_t out_, in_;
  double scale_;
  bool idwt_;
};

/// WaveFT (Haar, PEFT's "db1") over an [out, in] layer with the coefficients at the given
/// positions; use_idwt = false places them directly (PEFT's option).
template <class V>
auto waveft(V&& spectrum, fourierft_indices idx, index_t out, index_t in, scale s, bool use_idwt = true) {
  auto h = hold_vector(std::forward<V>(spectrum));
  using T = std::remove_const_t<typename decltype(h.view)::element_type>;
  return waveft_update<T, typename decltype(h.view)::device_type>(
      std::move(h), std::make_shared<const fourierft_indices>(std::move(idx)), out, in, s.value, use_idwt);
}
/// WaveFT with PEFT's positions for random_loc_seed `seed` (PEFT's default 777).
template <class V>
auto waveft(V&& spectrum, index_t out, index_t in, std::uint64_t seed, scale s, bool use_idwt = true) {
  auto h = hold_vector(std::forward<V>(spectrum));
  auto idx = std::make_shared<const fourierft_indices>(fourierft_peft_indices(out, in, h.view.size(), seed));
  using T = std::remove_const_t<typename decltype(h.view)::element_type>;
  return waveft_update<T, typename decltype(h.view)::device_type>(std::move(h), std::move(idx), out, in, s.value, use_idwt);
}

DELTAW_NAMESPACE_END
