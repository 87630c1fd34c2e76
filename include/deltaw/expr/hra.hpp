// SPDX-License-Identifier: MIT
// HRA (Yuan et al. 2024, "Bridging the Gap between Low-rank and Orthogonal Adaptation via
// Householder Reflection Adaptation", arXiv:2405.17484; PEFT 0.21's `hra`): W' = W·H with
// H [in, in] orthogonal, acting on the input features:
//     y = x·W'ᵀ = (x·Hᵀ)·Wᵀ,   ΔW = W·(H − I)
//     plain:          H = H₀·H₁ ⋯ H_{r−1},  H_i = I − 2·n_i·n_iᵀ,  n_i = u_i/‖u_i‖
//     Gram–Schmidt:   H = I − 2·Q·Qᵀ,        Q = the Gram–Schmidt orthonormalisation of
//                                            u₀ … u_{r−1} (PEFT's apply_GS)
// with U [in, r] PEFT's hra_u (one column per reflection). Both are kept in the compact WY
// form H = I − N·Tm·Nᵀ, N [in, r] (plain: the n_i; Gram–Schmidt: Q) and Tm [r, r] upper
// triangular (plain: Tm_kk = 2, Tm[:k, k] = −2·Tm[:k, :k]·N[:, :k]ᵀ·n_k; Gram–Schmidt: 2·I),
// computed once in double when the update is built (backend/cpu/hra.hpp: deltaw::hra) and
// cached here (in·r + r² values). apply is X − ((X·N)·Tmᵀ)·Nᵀ then the base product
// (4·tokens·in·r + 2·tokens·r² flops); the in × in H and W' are never formed. ΔW reads W,
// so the update holds W and merges only into it; unmerge multiplies by Hᵀ = H⁻¹ (exact).
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// How HRA builds H from U (PEFT's apply_GS).
struct hra_options {
  bool gram_schmidt = false;
};

/// The cached compact WY form of H = I − N·Tm·Nᵀ, in double, row-major.
struct hra_factors {
  index_t in = 0, r = 0;
  std::vector<double> N;   ///< [in, r]
  std::vector<double> Tm;  ///< [r, r], upper triangular
  std::vector<double> norms;  ///< ‖u_i‖ (plain) or ‖v_i‖, the Gram–Schmidt residual norms
};

template <class T, class TW, class Device = device::cpu>
class hra_update {
 public:
  using value_type = T;
  using weight_type = TW;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "HRA";

  /// factors: the compact WY form of H built from U (see deltaw::hra).
  hra_update(held_matrix<TW, Device> W, held_matrix<T, Device> U, hra_options o, std::shared_ptr<const hra_factors> f)
      : W_(std::move(W)), U_(std::move(U)), opt_(o), F_(std::move(f)) {
    const auto& Wv = W_.view;
    const auto& Uv = U_.view;
    const std::string shapes = "W " + detail::shape_str(Wv.rows(), Wv.cols()) + ", U " + detail::shape_str(Uv.rows(), Uv.cols());
    if (Uv.rows() != Wv.cols())
      throw shape_error("deltaw::hra: U must be [in, r] with in the input features of W (PEFT's hra_u); got " + shapes);
    if (Uv.cols() < 1) throw rank_error("deltaw::hra: U needs at least one reflection (r ≥ 1); got " + shapes);
    if (!F_ || F_->in != Uv.rows() || F_->r != Uv.cols() || index_t(F_->N.size()) != Uv.rows() * Uv.cols() ||
        index_t(F_->Tm.size()) != Uv.cols() * Uv.cols())
      throw shape_error("deltaw::hra: cached factors missing or of the wrong size (build it with deltaw::hra)");
  }

  index_t rows() const { return W_.view.rows(); }
  index_t cols() const { return W_.view.cols(); }
  /// The number of reflections r.
  index_t rank() const { return U_.view.cols(); }
  const hra_options& options() const { return opt_; }
  const matrix_view<const TW, Device>& W() const { return W_.view; }
  const matrix_view<const T, Device>& U() const { return U_.view; }
  const std::shared_ptr<const hra_factors>& factors() const { return F_; }
  /// Calls f(name, view) for every view ΔW reads except the weight W().
  template <class F>
  void for_each_operand(F&& f) const {
    f("U", U_.view);
  }

  /// in·r values.
  index_t parameter_count() const { return U_.view.rows() * U_.view.cols(); }
  /// Extra flops of apply over the base GEMM: X·N, ·Tmᵀ and ·Nᵀ.
  index_t flop_count(index_t tokens) const {
    const index_t r = rank();
    return 4 * tokens * cols() * r + 2 * tokens * r * r;
  }

 private:
  held_matrix<TW, Device> W_;
  held_matrix<T, Device> U_;
  hra_options opt_;
  std::shared_ptr<const hra_factors> F_;
};

DELTAW_NAMESPACE_END
