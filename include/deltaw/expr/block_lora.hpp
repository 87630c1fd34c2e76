// SPDX-License-Identifier: MIT
// Block-LoRA ("One Head Eight Arms", Zhou et al. 2025, arXiv:2501.16720): LoRA's B·A written
// as a block product Σᵢ Bᵢ·Aᵢ whose n down-projections are one shared A₀.
//
// The reading implemented here: B [out, n·r_b] is split into n column blocks Bᵢ
// [out, r_b] that all share A₀ [r_b, in], so
//     ΔW = s·Σᵢ Bᵢ·A₀ = s·(Σᵢ Bᵢ)·A₀,
// which apply evaluates as LoRA with the summed B (the down-projection is computed once,
// at r_b, not n times). This reading is UNVERIFIED against the paper's code; another
// reading tiles A₀ along the input (A = [A₀ A₀ … A₀], each block acting on a slice of the
// input features), which this type does not implement.
//
// The scale is s = α/r with r = n·r_b, the LoRA rank that is split (UNVERIFIED); pass
// deltaw::scale(s) to choose it directly.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// ΔW = s·(Σᵢ Bᵢ)·A₀, B = [B₁ … Bₙ] [out, n·r_b], A₀ [r_b, in]. All of B and A₀ are trained.
template <class T, class Device = device::cpu>
class block_low_rank {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;

  block_low_rank(held_matrix<T, Device> B, held_matrix<T, Device> A0, double s)
      : B_(std::move(B)), A0_(std::move(A0)), scale_(detail::checked_scale(s, "deltaw::block_lora")) {
    validate();
  }

  index_t rows() const { return B_.view.rows(); }
  index_t cols() const { return A0_.view.cols(); }
  /// r_b: the rank of each block (rows of A₀).
  index_t block_rank() const { return A0_.view.rows(); }
  /// n: the number of blocks of B.
  index_t blocks() const { return B_.view.cols() / A0_.view.rows(); }
  double scale() const { return scale_; }
  /// B = [B₁ … Bₙ] [out, n·r_b].
  const matrix_view<const T, Device>& B() const { return B_.view; }
  /// The shared down-projection A₀ [r_b, in].
  const matrix_view<const T, Device>& A0() const { return A0_.view; }
  /// Calls f(name, view) for every view ΔW reads (the aliasing checks of the
  /// operations that write).
  template <class F>
  void for_each_operand(F&& f) const {
    f("B", B_.view);
    f("A0", A0_.view);
  }

  /// n·r_b·out + r_b·in.
  index_t parameter_count() const { return B_.view.size() + A0_.view.size(); }
  /// Extra flops of apply: Σᵢ Bᵢ once (out·r_b·(n − 1) adds), then LoRA at rank r_b.
  index_t flop_count(index_t tokens) const {
    return 2 * tokens * block_rank() * (rows() + cols()) + rows() * block_rank() * (blocks() - 1);
  }

  block_low_rank with_scale(double s) const { return block_low_rank(B_, A0_, s); }

 private:
  void validate() const {
    const auto& B = B_.view;
    const auto& A = A0_.view;
    const std::string shapes = "B " + detail::shape_str(B.rows(), B.cols()) + " and A₀ " +
                               detail::shape_str(A.rows(), A.cols());
    if (A.rows() < 1 || B.cols() < 1)
      throw rank_error("deltaw::block_lora: the block rank r_b and the number of blocks must be at least 1; got " +
                       shapes);
    if (B.cols() % A.rows() != 0)
      throw shape_error("deltaw::block_lora: B [out, n·r_b] must split into whole blocks of r_b = rows of A₀ columns; "
                        "got " + shapes);
  }

  held_matrix<T, Device> B_;
  held_matrix<T, Device> A0_;
  double scale_;
};

namespace detail {
template <class FB, class FA>
auto make_block_low_rank(FB&& B, FA&& A0, double s) {
  auto hb = hold(std::forward<FB>(B));
  auto ha = hold(std::forward<FA>(A0));
  static_assert(std::is_same_v<decltype(hb), decltype(ha)>,
                "deltaw::block_lora: B and A₀ must have the same element type and device (e.g. both float on the CPU)");
  using T = std::remove_const_t<typename decltype(hb.view)::element_type>;
  return block_low_rank<T, typename decltype(hb.view)::device_type>(std::move(hb), std::move(ha), s);
}
}  // namespace detail

/// Block-LoRA with s = α/r, r = n·r_b = columns of B (UNVERIFIED choice of r).
template <class FB, class FA>
auto block_lora(FB&& B, FA&& A0, alpha a) {
  auto u = detail::make_block_low_rank(std::forward<FB>(B), std::forward<FA>(A0), 1.0);  // validates first
  if (!std::isfinite(a.value))
    throw non_finite_error("deltaw::block_lora: alpha must be finite, got " + std::to_string(a.value));
  return u.with_scale(a.value / double(u.blocks() * u.block_rank()));
}
/// Block-LoRA with an explicit scale s.
template <class FB, class FA>
auto block_lora(FB&& B, FA&& A0, scale s = scale(1.0)) {
  return detail::make_block_low_rank(std::forward<FB>(B), std::forward<FA>(A0), s.value);
}

DELTAW_NAMESPACE_END
