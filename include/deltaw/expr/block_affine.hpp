// SPDX-License-Identifier: MIT
// Block-affine updates: Bone "bat" (weight-guided) and Bone default / MiSS.
//
// Bone bat. W [out, in] split into r × r blocks W_ij (i: output block, j: input block),
// b_i [r, r] shared along output-block row i:
//     W'_ij = W_ij + W_ij·b_i + b_i,   so   ΔW_ij = W_ij·b_i + b_i   (depends on W, as DoRA).
// b is PEFT's miss_block [out/r, r, r] with its first two axes flattened: a matrix
// [out, r] whose rows i·r … i·r + r − 1 are b_i. Needs out % r == 0 and in % r == 0.
// Exact unmerge: W_ij = (W'_ij − b_i)·(I + b_i)⁻¹.
//
// MiSS (Bone's default). One D [r, m], with m = out (default) or m = mini_r ("mini",
// out % mini_r == 0):
//     ΔW[o, j·r + k] = D[k, o mod m],   i.e. ΔW = [Dᵀ Dᵀ … Dᵀ] tiled along the input
// (and D repeated out/m times along the output for mini). When in % r ≠ 0 the last,
// partial block uses the first in mod r rows of D (PEFT zero-pads x). No scaling.
#pragma once

#include <string>
#include <type_traits>
#include <utility>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// Bone "bat": W' = W + ΔW with ΔW_ij = W_ij·b_i + b_i over r × r blocks. Holds W (it
/// merges only into that weight) and b [out, r].
template <class T, class TW, class Device = device::cpu>
class bone_bat_update {
 public:
  using value_type = T;
  using weight_type = TW;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "Bone bat";

  bone_bat_update(held_matrix<TW, Device> W, held_matrix<T, Device> b) : W_(std::move(W)), b_(std::move(b)) {
    const auto& Wv = W_.view;
    const auto& bv = b_.view;
    if (bv.cols() < 1)
      throw rank_error("deltaw::bone_bat: the block size r (columns of b [out, r]) must be at least 1; got b " +
                       detail::shape_str(bv.rows(), bv.cols()));
    const index_t r = bv.cols();
    if (Wv.rows() % r != 0 || Wv.cols() % r != 0)
      throw shape_error("deltaw::bone_bat: W " + detail::shape_str(Wv.rows(), Wv.cols()) + " does not split into " +
                        std::to_string(r) + " × " + std::to_string(r) + " blocks (b is " +
                        detail::shape_str(bv.rows(), bv.cols()) + "): bat needs out % r == 0 and in % r == 0, got " +
                        std::to_string(Wv.rows()) + " % " + std::to_string(r) + " = " + std::to_string(Wv.rows() % r) +
                        " and " + std::to_string(Wv.cols()) + " % " + std::to_string(r) + " = " +
                        std::to_string(Wv.cols() % r));
    if (bv.rows() != Wv.rows())
      throw shape_error("deltaw::bone_bat: b must be [out, r] (PEFT's [out/r, r, r] flattened) = " +
                        detail::shape_str(Wv.rows(), r) + " for W " + detail::shape_str(Wv.rows(), Wv.cols()) +
                        "; got b " + detail::shape_str(bv.rows(), bv.cols()));
  }

  index_t rows() const { return W_.view.rows(); }
  index_t cols() const { return W_.view.cols(); }
  /// The block size r.
  index_t block() const { return b_.view.cols(); }
  const matrix_view<const TW, Device>& W() const { return W_.view; }
  const matrix_view<const T, Device>& b() const { return b_.view; }
  /// Calls f(name, view) for every view ΔW reads except the weight W() (the aliasing checks of the
  /// operations that write).
  template <class F>
  void for_each_operand(F&& f) const {
    f("b", b_.view);
  }
  /// b_i, the r × r matrix of output-block row i.
  matrix_view<const T, Device> block_matrix(index_t i) const { return b_.view.middle_rows(i * block(), block()); }

  /// out/r blocks of r × r: out·r.
  index_t parameter_count() const { return rows() * block(); }

  /// Apply forms W' (2·out·in·r flops, panel by panel, dropped after the call) when that
  /// is cheaper than the blockwise form (about one extra base GEMM): when tokens > r.
  bool forms_merged_weight(index_t tokens) const { return tokens > block(); }
  /// Extra flops of apply of W + ΔW over the base GEMM, for the form apply takes.
  index_t flop_count(index_t tokens) const {
    const index_t out = rows(), in = cols(), r = block();
    if (forms_merged_weight(tokens)) return 2 * out * in * r + out * in;
    // x_j·(I + b_i)ᵀ for every block (i, j), Σ_j x_j, and (Σ_j x_j)·b_iᵀ.
    return 2 * tokens * out * in + tokens * in + 2 * tokens * out * r;
  }

 private:
  held_matrix<TW, Device> W_;
  held_matrix<T, Device> b_;
};

/// MiSS (Bone default): ΔW[o, j·r + k] = D[k, o mod m], D [r, m], m = out or mini_r.
template <class T, class Device = device::cpu>
class miss_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;

  miss_update(held_matrix<T, Device> D, index_t out, index_t in) : D_(std::move(D)), out_(out), in_(in) {
    const auto& Dv = D_.view;
    if (Dv.rows() < 1)
      throw rank_error("deltaw::miss: the block size r (rows of D) must be at least 1; got D " +
                       detail::shape_str(Dv.rows(), Dv.cols()));
    if (out < 0 || in < 0)
      throw shape_error("deltaw::miss: negative shape " + detail::shape_str(out, in));
    if (Dv.cols() < 1 ? out != 0 : out % Dv.cols() != 0)
      throw shape_error("deltaw::miss: D " + detail::shape_str(Dv.rows(), Dv.cols()) +
                        " must have out columns, or mini_r columns with out % mini_r == 0; out is " +
                        std::to_string(out) + " (ΔW " + detail::shape_str(out, in) + ")");
  }

  index_t rows() const { return out_; }
  index_t cols() const { return in_; }
  /// The block size r.
  index_t block() const { return D_.view.rows(); }
  /// m: D's columns (out, or mini_r for the mini variant).
  index_t block_cols() const { return D_.view.cols(); }
  /// How many times D repeats along the output (1 unless mini).
  index_t repeats() const { return block_cols() == 0 ? 0 : out_ / block_cols(); }
  const matrix_view<const T, Device>& D() const { return D_.view; }
  /// Calls f(name, view) for every view ΔW reads (the aliasing checks of the
  /// operations that write).
  template <class F>
  void for_each_operand(F&& f) const {
    f("D", D_.view);
  }

  /// D's size: r·out (r·mini_r for mini).
  index_t parameter_count() const { return block() * block_cols(); }
  /// Σ_j x_j (tokens·in adds), its product with D, and the tiling for mini.
  index_t flop_count(index_t tokens) const {
    return tokens * in_ + 2 * tokens * block() * block_cols() + (repeats() > 1 ? tokens * out_ : 0);
  }

 private:
  held_matrix<T, Device> D_;
  index_t out_;
  index_t in_;
};

/// Bone bat over W [out, in] with b [out, r] (PEFT's miss_block [out/r, r, r] viewed as
/// [out, r]). W is held (by view, or owned if a temporary), as DoRA holds its weight.
template <class WL, class BL>
auto bone_bat(WL&& W, BL&& b) {
  auto hw = hold(std::forward<WL>(W));
  auto hb = hold(std::forward<BL>(b));
  using TW = std::remove_const_t<typename decltype(hw.view)::element_type>;
  using T = std::remove_const_t<typename decltype(hb.view)::element_type>;
  using D = typename decltype(hb.view)::device_type;
  static_assert(std::is_same_v<typename decltype(hw.view)::device_type, D>,
                "deltaw::bone_bat: W and b must live on the same device");
  return bone_bat_update<T, TW, D>(std::move(hw), std::move(hb));
}

/// MiSS / Bone default: D [r, out], ΔW [out, in] = [Dᵀ … Dᵀ] (in_features given, as D
/// does not carry it).
template <class DL>
auto miss(DL&& D, index_t in_features) {
  auto hd = hold(std::forward<DL>(D));
  using T = std::remove_const_t<typename decltype(hd.view)::element_type>;
  const index_t out = hd.view.cols();
  return miss_update<T, typename decltype(hd.view)::device_type>(std::move(hd), out, in_features);
}

/// MiSS "mini": D [r, mini_r] repeated out/mini_r times along the output.
template <class DL>
auto miss_mini(DL&& D, index_t out_features, index_t in_features) {
  auto hd = hold(std::forward<DL>(D));
  using T = std::remove_const_t<typename decltype(hd.view)::element_type>;
  return miss_update<T, typename decltype(hd.view)::device_type>(std::move(hd), out_features, in_features);
}

DELTAW_NAMESPACE_END
