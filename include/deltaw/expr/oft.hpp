// SPDX-License-Identifier: MIT
// OFT (Qiu et al. 2023; PEFT 0.21's OFT, v2 parametrisation): a block-diagonal rotation
// R = blockdiag(R₀, …, R_{nb−1}) of the input, each R_k [b, b] the Cayley transform of a
// skew-symmetric Q_k:
//     y = (x·R)·Wᵀ,   W' = W·Rᵀ,   ΔW = W·(Rᵀ − I)        (R acts on the in features)
//     Cayley:          R_k = (I − Q_k)(I + Q_k)⁻¹
//     Cayley–Neumann:  R_k = I + 2Q + 2Q² + … + 2Q^{m−1} + Q^m, m = max(n − 1, 3) for
//                      n = num_cayley_neumann_terms ≥ 3, R = I + 2Q for n = 2, I for n ≤ 1
//                      (PEFT's truncated series, exactly as it computes it).
// Q_k is stored as PEFT's vector of its strict upper triangle (b(b−1)/2 values, row-major:
// (0,1), (0,2), …, (1,2), …) with Q = S − Sᵀ; Q [nq, b(b−1)/2] holds one row per block, or
// one row shared by every block (block_share). ΔW reads W (as DoRA and Bone bat), so the
// update holds W and merges only into it.
//
// The rotation blocks R_k are computed once, in double, when the update is built
// (backend/cpu/oft.hpp: deltaw::oft) and cached here (nq·b² values); apply rotates x
// block by block (2·tokens·in·b flops) and never forms the dense in × in R nor W'.
#pragma once

#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// How OFT turns Q into a rotation (PEFT's use_cayley_neumann, num_cayley_neumann_terms).
struct oft_options {
  bool cayley_neumann = true;
  int neumann_terms = 5;
};

namespace detail {
/// b with b(b − 1)/2 = n, or −1 when there is none (n = 0 gives b = 1).
inline index_t oft_block_from_elements(index_t n) {
  if (n < 0 || n > (index_t(1) << 60)) return -1;
  auto b = index_t(std::sqrt(2.0 * double(n))) + 1;  // within one of the root of b(b − 1) = 2n
  while (b > 1 && b * (b - 1) / 2 > n) --b;
  while (b * (b - 1) / 2 < n) ++b;
  return b * (b - 1) / 2 == n ? b : -1;
}
}  // namespace detail

template <class T, class TW, class Device = device::cpu>
class oft_update {
 public:
  using value_type = T;
  using weight_type = TW;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "OFT";

  /// rotations: the nq blocks R_k [b, b] row-major, in double (see deltaw::oft).
  oft_update(held_matrix<TW, Device> W, held_matrix<T, Device> Q, oft_options o,
             std::shared_ptr<const std::vector<double>> rotations)
      : W_(std::move(W)), Q_(std::move(Q)), opt_(o), R_(std::move(rotations)) {
    const auto& Wv = W_.view;
    const auto& Qv = Q_.view;
    b_ = detail::oft_block_from_elements(Qv.cols());
    const std::string shapes = "W " + detail::shape_str(Wv.rows(), Wv.cols()) + ", Q " + detail::shape_str(Qv.rows(), Qv.cols());
    if (b_ < 1)
      throw shape_error("deltaw::oft: Q's columns must be b(b − 1)/2 for a block size b (the strict upper triangle); got " + shapes);
    if (Qv.rows() < 1) throw rank_error("deltaw::oft: Q needs at least one block row; got " + shapes);
    if (Qv.rows() * b_ == Wv.cols()) {
      nb_ = Qv.rows();
    } else if (Qv.rows() == 1 && Wv.cols() % b_ == 0) {
      nb_ = Wv.cols() / b_;  // block_share
    } else {
      throw shape_error("deltaw::oft: the in features of W must be blocks × b (one Q row per block, or one shared row); "
                        "block size b = " + std::to_string(b_) + ", " + shapes);
    }
    if (!R_ || index_t(R_->size()) != Qv.rows() * b_ * b_)
      throw shape_error("deltaw::oft: cached rotations missing or of the wrong size (build it with deltaw::oft)");
  }

  index_t rows() const { return W_.view.rows(); }
  index_t cols() const { return W_.view.cols(); }
  /// The block size b.
  index_t block() const { return b_; }
  /// How many blocks the rotation has (in / b).
  index_t blocks() const { return nb_; }
  /// Whether one Q row serves every block (PEFT's block_share).
  bool shared() const { return Q_.view.rows() == 1 && nb_ > 1; }
  const oft_options& options() const { return opt_; }
  const matrix_view<const TW, Device>& W() const { return W_.view; }
  const matrix_view<const T, Device>& Q() const { return Q_.view; }
  /// The cached R_k of block k (shared: R₀ for every k), b × b row-major, in double.
  const double* rotation(index_t k) const { return R_->data() + (shared() ? 0 : k) * b_ * b_; }
  const std::shared_ptr<const std::vector<double>>& rotations() const { return R_; }
  /// Calls f(name, view) for every view ΔW reads except the weight W().
  template <class F>
  void for_each_operand(F&& f) const {
    f("Q", Q_.view);
  }

  /// nq·b(b − 1)/2 values.
  index_t parameter_count() const { return Q_.view.rows() * Q_.view.cols(); }
  /// Extra flops of apply over the base GEMM: the blockwise rotation of x.
  index_t flop_count(index_t tokens) const { return 2 * tokens * cols() * b_; }

 private:
  held_matrix<TW, Device> W_;
  held_matrix<T, Device> Q_;
  oft_options opt_;
  std::shared_ptr<const std::vector<double>> R_;
  index_t b_ = 0, nb_ = 0;
};

DELTAW_NAMESPACE_END
