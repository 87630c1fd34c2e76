// SPDX-License-Identifier: MIT
// BD-LoRA (block-diagonal LoRA; PEFT 0.21's LoraConfig(use_bdlora=BdLoraConfig(...)),
// BdLoraLinearVariant / BlockDiagonalLinear): LoRA's ΔW = s·B·A with A or B block-diagonal,
// so a row- or column-sharded layer needs no communication for its adapter.
//
// A factor with n_b blocks is stored as PEFT stores it: the n_b diagonal blocks stacked
// along the rows, i.e. a block-diagonal M_full [p, q] is held as M [p, q/n_b] whose rows
// i·p/n_b … (i+1)·p/n_b − 1 are block i (acting on columns i·q/n_b … of M_full). With
// n_b = 1 the factor is dense. PEFT makes at most one of A, B block-diagonal per module;
// this type accepts both (each with its own block count).
//
//   A: [r, in/n_a] (n_a blocks of r/n_a × in/n_a),   B: [out, r/n_b] (n_b blocks of out/n_b × r/n_b)
//
// Applied block by block, Y += s·BD(B)·(BD(A)·x): n_a + n_b small GEMMs on column slices,
// 2·tokens·r·(in/n_a + out/n_b) flops; the zero off-diagonal blocks are never formed.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// ΔW = s·BD(B)·BD(A), each factor block-diagonal with its own block count (1 = dense).
template <class T, class Device = device::cpu>
class bd_lora_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "BD-LoRA";

  bd_lora_update(held_matrix<T, Device> B, index_t b_blocks, held_matrix<T, Device> A, index_t a_blocks, double s)
      : B_(std::move(B)), A_(std::move(A)), nb_(b_blocks), na_(a_blocks), scale_(detail::checked_scale(s, "deltaw::bd_lora")) {
    validate();
  }

  /// out.
  index_t rows() const { return B_.view.rows(); }
  /// in (A's stored columns times its block count).
  index_t cols() const { return A_.view.cols() * na_; }
  /// r.
  index_t rank() const { return A_.view.rows(); }
  double scale() const { return scale_; }
  /// Block counts of A and B (1: dense).
  index_t a_blocks() const { return na_; }
  index_t b_blocks() const { return nb_; }
  /// B as stored: [out, r/n_b] (the blocks stacked along the rows).
  const matrix_view<const T, Device>& B() const { return B_.view; }
  /// A as stored: [r, in/n_a].
  const matrix_view<const T, Device>& A() const { return A_.view; }
  template <class F>
  void for_each_operand(F&& f) const {
    f("B", B_.view);
    f("A", A_.view);
  }

  /// The stored values: out·r/n_b + r·in/n_a.
  index_t parameter_count() const { return B_.view.size() + A_.view.size(); }
  /// Extra flops of apply over the base GEMM.
  index_t flop_count(index_t tokens) const { return 2 * tokens * (A_.view.size() + B_.view.size()); }
  bd_lora_update with_scale(double s) const { return bd_lora_update(B_, nb_, A_, na_, s); }

 private:
  void validate() const {
    const auto &Bv = B_.view, &Av = A_.view;
    const std::string shapes = "B " + detail::shape_str(Bv.rows(), Bv.cols()) + " with " + std::to_string(nb_) +
                               " block(s), A " + detail::shape_str(Av.rows(), Av.cols()) + " with " +
                               std::to_string(na_) + " block(s)";
    if (na_ < 1 || nb_ < 1) throw argument_error("deltaw::bd_lora: block counts must be at least 1; got " + shapes);
    const index_t r = Av.rows();
    if (r % na_ != 0 || r % nb_ != 0 || Bv.rows() % nb_ != 0)
      throw shape_error("deltaw::bd_lora: r (A's rows) must be divisible by both block counts and out (B's rows) by "
                        "B's; got " + shapes);
    if (Bv.cols() * nb_ != r)
      throw shape_error("deltaw::bd_lora: B [out, r/n_b] and A [r, in/n_a] must share r; got " + shapes);
  }

  held_matrix<T, Device> B_;
  held_matrix<T, Device> A_;
  index_t nb_;
  index_t na_;
  double scale_;
};

namespace detail {
template <class FB, class FA>
auto make_bd_lora(FB&& B, index_t nb, FA&& A, index_t na, double s) {
  auto hb = hold(std::forward<FB>(B));
  auto ha = hold(std::forward<FA>(A));
  static_assert(std::is_same_v<decltype(hb), decltype(ha)>,
                "deltaw::bd_lora: B and A must have the same element type and device");
  using T = std::remove_const_t<typename decltype(hb.view)::element_type>;
  return bd_lora_update<T, typename decltype(hb.view)::device_type>(std::move(hb), nb, std::move(ha), na, s);
}
}  // namespace detail

/// Which LoRA factor is block-diagonal (PEFT's target_modules_bd_a / target_modules_bd_b).
enum class bd_side { A, B };

/// BD-LoRA with one block-diagonal factor: `side` says which, `blocks` its block count
/// (PEFT's nblocks); the other factor is dense. B [out, r] or [out, r/n], A [r, in/n] or [r, in].
template <class FB, class FA>
auto bd_lora(FB&& B, FA&& A, bd_side side, index_t blocks, scale s = scale(1.0)) {
  return detail::make_bd_lora(std::forward<FB>(B), side == bd_side::B ? blocks : 1, std::forward<FA>(A),
                              side == bd_side::A ? blocks : 1, s.value);
}
/// BD-LoRA with LoRA's scale α/r (α/√r with rslora).
template <class FB, class FA>
auto bd_lora(FB&& B, FA&& A, bd_side side, index_t blocks, alpha a, bool rslora = false) {
  auto u = bd_lora(std::forward<FB>(B), std::forward<FA>(A), side, blocks, scale(1.0));
  const double r = double(u.rank());
  return u.with_scale(rslora ? a.value / std::sqrt(r) : a.value / r);
}

DELTAW_NAMESPACE_END
