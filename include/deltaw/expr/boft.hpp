// SPDX-License-Identifier: MIT
// BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
// Factorization"; PEFT 0.21's BOFT): a product of m butterfly factors rotating the input,
// and a scale of the output:
//     y = s ⊙ ((x·R)·Wᵀ),   W' = diag(s)·W·Rᵀ,   ΔW = diag(s)·W·Rᵀ − W
//     R = M_{m−1} ⋯ M_1·M_0,   M_i = P_i·BD_i·P_iᵀ
// where BD_i = blockdiag(R_{i,0}, …, R_{i,nb−1}) holds nb rotations of b × b and P_i is the
// fixed butterfly permutation of PEFT's block_butterfly_perm (P_i[j, perm_i[j]] = 1; the
// identity when m = 1). Each R_{i,k} is the Cayley transform of the skew part of a free
// b × b parameter, S = (P − Pᵀ)/2, R = (I − S)(I + S)⁻¹ (PEFT's cayley_batch); the
// Cayley–Neumann series of OFT (oft_options) is an option PEFT's BOFT does not have.
//
// Parameters as PEFT stores them: boft_R [m, nb, b, b] (viewed here as [m·nb·b, b],
// row-major), boft_s [out, 1] (a vector of out). in = nb·b.
//
// PEFT's CPU path: without its CUDA extension (fbd_cuda) PEFT 0.21.2 silently sets
// boft_n_butterfly_factor to 1 when it builds the layer, so on a CPU-only machine every
// BOFT layer has m = 1 (one block-diagonal rotation, OFT with full-matrix parameters and an
// output scale), and an adapter saved with m > 1 on a GPU does not load there. deltaw
// computes any m exactly as PEFT's CUDA path does.
//
// The rotation blocks (m·nb·b² values, in double) and the permutations are computed once when
// the update is built (backend/cpu/boft.hpp: deltaw::boft); apply rotates x by m sparse
// block rotations (2·m·tokens·in·b flops, two column gathers per factor whose permutation is
// not the identity) and never forms the dense in × in R, the permutation matrices, nor W'.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "oft.hpp"
#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// BOFT's rotations: Cayley by default, as PEFT's BOFT (cayley_neumann = false).
inline constexpr oft_options boft_default_options{false, 5};

namespace detail {
/// PEFT's block_butterfly_perm(in, nb / 2^i, b / 2, m − 1) for factor i: perm[j] is the
/// column of P_i holding row j's one. Empty when it is the identity (m = 1, and i = 0).
inline std::vector<index_t> boft_permutation(index_t in, index_t nb, index_t b, index_t m, index_t i) {
  std::vector<index_t> p;
  if (m <= 1) return p;
  const index_t groups = nb >> i, r = b / 2;
  if (groups < 1 || r < 1 || in % groups != 0) return p;
  const index_t bs = in / groups;  // the columns each sorted group spans
  const index_t step = bs / r;     // sub-blocks of r columns in a group
  std::vector<index_t> order;
  order.reserve(std::size_t(bs));
  for (index_t parity = 0; parity < 2; ++parity)
    for (index_t pos = parity; pos < step; pos += 2)
      for (index_t t = 0; t < r; ++t) order.push_back(pos * r + t);
  if (index_t(order.size()) != bs) return p;  // shapes PEFT refuses; the constructor reports them
  p.resize(std::size_t(in));
  bool identity = true;
  for (index_t c0 = 0; c0 < in; c0 += bs)
    for (index_t j = 0; j < bs; ++j) {
      p[std::size_t(c0 + j)] = c0 + order[std::size_t(j)];
      identity = identity && order[std::size_t(j)] == j;
    }
  if (identity) p.clear();
  return p;
}
}  // namespace detail

template <class T, class TW, class Device = device::cpu>
class boft_update {
 public:
  using value_type = T;
  using weight_type = TW;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "BOFT";

  /// rotations: the m·nb blocks R_{i,k} [b, b] row-major, in double (see deltaw::boft).
  boft_update(held_matrix<TW, Device> W, held_matrix<T, Device> P, held_vector<T, Device> s, oft_options o,
              std::shared_ptr<const std::vector<double>> rotations)
      : W_(std::move(W)), P_(std::move(P)), s_(std::move(s)), opt_(o), R_(std::move(rotations)) {
    const auto& Wv = W_.view;
    const auto& Pv = P_.view;
    const std::string shapes = "W " + detail::shape_str(Wv.rows(), Wv.cols()) + ", R " +
                               detail::shape_str(Pv.rows(), Pv.cols()) + ", s [" + std::to_string(s_.view.size()) + "]";
    b_ = Pv.cols();
    if (b_ < 1 || Wv.cols() < 1 || Wv.cols() % b_ != 0)
      throw shape_error("deltaw::boft: R's columns are the block size b, which must divide the in features of W; got " +
                        shapes);
    nb_ = Wv.cols() / b_;
    if (Pv.rows() < Wv.cols() || Pv.rows() % Wv.cols() != 0)
      throw shape_error("deltaw::boft: R must be [m·nb·b, b] (PEFT's boft_R [m, nb, b, b]) with nb·b = in; got " + shapes);
    m_ = Pv.rows() / Wv.cols();
    if (s_.view.size() != Wv.rows())
      throw shape_error("deltaw::boft: s must have one entry per output feature (boft_s [out, 1]); got " + shapes);
    if (m_ > 1) {
      // PEFT's conditions for butterfly factors (BOFTLayer.update_layer).
      if (b_ % 2 != 0 || nb_ % 2 != 0 || (nb_ % (index_t(1) << (m_ - 1))) != 0)
        throw shape_error("deltaw::boft: " + std::to_string(m_) +
                          " butterfly factors need an even block size b and a block count nb that is a multiple of "
                          "2^(m − 1); got b = " + std::to_string(b_) + ", nb = " + std::to_string(nb_) + " (" + shapes + ")");
    }
    perm_.resize(std::size_t(m_));
    inv_.resize(std::size_t(m_));
    for (index_t i = 0; i < m_; ++i) {
      perm_[std::size_t(i)] = detail::boft_permutation(Wv.cols(), nb_, b_, m_, i);
      const auto& p = perm_[std::size_t(i)];
      if (!p.empty()) {
        auto& q = inv_[std::size_t(i)];
        q.resize(p.size());
        for (std::size_t j = 0; j < p.size(); ++j) q[std::size_t(p[j])] = index_t(j);
      }
    }
    if (!R_ || index_t(R_->size()) != m_ * nb_ * b_ * b_)
      throw shape_error("deltaw::boft: cached rotations missing or of the wrong size (build it with deltaw::boft)");
  }

  index_t rows() const { return W_.view.rows(); }
  index_t cols() const { return W_.view.cols(); }
  /// The block size b.
  index_t block() const { return b_; }
  /// Blocks per butterfly factor (nb = in / b).
  index_t blocks() const { return nb_; }
  /// The number of butterfly factors m (PEFT's boft_n_butterfly_factor).
  index_t factors() const { return m_; }
  const oft_options& options() const { return opt_; }
  const matrix_view<const TW, Device>& W() const { return W_.view; }
  /// The parameters [m·nb·b, b]: block (i, k) is rows (i·nb + k)·b … + b.
  const matrix_view<const T, Device>& R() const { return P_.view; }
  const vector_view<const T, Device>& s() const { return s_.view; }
  /// The cached rotation R_{i,k}, b × b row-major, in double.
  const double* rotation(index_t i, index_t k) const { return R_->data() + (i * nb_ + k) * b_ * b_; }
  const std::shared_ptr<const std::vector<double>>& rotations() const { return R_; }
  /// Factor i's permutation (perm[j]: P_i[j, perm[j]] = 1) and its inverse; empty when P_i = I.
  const std::vector<index_t>& permutation(index_t i) const { return perm_[std::size_t(i)]; }
  const std::vector<index_t>& inverse_permutation(index_t i) const { return inv_[std::size_t(i)]; }
  /// Calls f(name, view) for every view ΔW reads except the weight W().
  template <class F>
  void for_each_operand(F&& f) const {
    f("R", P_.view);
    f("s", s_.view);
  }

  /// m·nb·b² + out values.
  index_t parameter_count() const { return P_.view.rows() * P_.view.cols() + s_.view.size(); }
  /// Extra flops of apply over the base GEMM: m blockwise rotations of x, the output scale.
  index_t flop_count(index_t tokens) const { return 2 * m_ * tokens * cols() * b_ + tokens * rows(); }

 private:
  held_matrix<TW, Device> W_;
  held_matrix<T, Device> P_;
  held_vector<T, Device> s_;
  oft_options opt_;
  std::shared_ptr<const std::vector<double>> R_;
  index_t b_ = 0, nb_ = 0, m_ = 0;
  std::vector<std::vector<index_t>> perm_, inv_;
};

DELTAW_NAMESPACE_END
