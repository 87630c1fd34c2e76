// SPDX-License-Identifier: MIT
// CBQ's LoRA-Rounding (Ding et al., "CBQ: Cross-Block Quantization for Large Language
// Models", ICLR 2025): AdaRound (Nagel et al., ICML 2020) with a low-rank rounding matrix,
// for post-training quantisation of one frozen layer W [out, in]:
//
//   Ŵ(A₁, A₂) = s·(clamp(⌊W/s⌋ + z + h(A₁A₂), qmin, qmax) − z),  A₁ [out, r], A₂ [r, in]
//   h(V)      = clip(σ(V)(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1
//
// with a per-output-channel scale s and zero point z (z = 0 when symmetric). Each weight
// is rounded down or up; A₁A₂ decides which. Beyond that formula everything here is an
// option marked UNVERIFIED in docs/training.md: the scales (symmetric max-abs /
// (2^(b−1) − 1), or asymmetric min/max with the range widened to include 0), the
// AdaRound regulariser λ·Σ(1 − |2h − 1|^β) with β cosine-annealed from 20 to 2 after a
// warm-up without it, the init of A₁, A₂ (a few alternating least-squares sweeps so that
// h(A₁A₂) ≈ the fractional part W/s − ⌊W/s⌋), and hard rounding at the end (h ≥ ½ → up).
//
// Dense out × in matrices are formed only where the name says so
// (cbq_soft_weight_dense, cbq_codes_dense, cbq_rtn_codes_dense,
// cbq_quantized_weight_dense) and in cbq_result::codes, the integer codes that replace W.
// Everything else (the op's forward and backward, the regulariser, the init, the error)
// works on row blocks of `row_block` output channels: V = A₁[blk]·A₂ is [row_block, in].
//
// Derivatives: the floor is a constant (W is frozen). The clip in h and the clamp to
// [qmin, qmax] pass the gradient where their argument lies inside the closed interval and
// give zero strictly outside (PyTorch's clamp convention); at ⌊W/s⌋ + z = qmax with
// 0 < h, the clamp saturates and the entry gets no gradient.
//
// CBQ's learnable step sizes and its cross-block reconstruction windows build on this file:
// train/cbq_cross_block.hpp (cbq_linear_lsq, cbq_stack, cbq_reconstruct_blocks).
#pragma once

#include <deltaw/core/eigen_dense.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "../autograd/ops.hpp"
#include "../optim/optim.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

inline constexpr double cbq_zeta = 1.1;
inline constexpr double cbq_gamma = -0.1;

struct cbq_quant_options {
  int bits = 4;            // b in [2, 16]
  bool symmetric = true;   // UNVERIFIED: max-abs/(2^(b−1)−1), codes in [−2^(b−1), 2^(b−1)−1]; else min/max, [0, 2^b−1]
};

using cbq_codes = Eigen::Matrix<std::int32_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace cbq_detail {
/// h(v) = clip(σ(v)(ζ−γ)+γ, 0, 1) and dh/dv (0 where the clip saturates strictly).
template <class T>
inline T rect_sigmoid(T v) {
  const T s = T(1) / (T(1) + std::exp(-v));
  return std::clamp(s * T(cbq_zeta - cbq_gamma) + T(cbq_gamma), T(0), T(1));
}
template <class T>
inline T rect_sigmoid_grad(T v) {
  const T s = T(1) / (T(1) + std::exp(-v));
  const T u = s * T(cbq_zeta - cbq_gamma) + T(cbq_gamma);
  return (u < T(0) || u > T(1)) ? T(0) : T(cbq_zeta - cbq_gamma) * s * (T(1) - s);
}
/// h⁻¹(p) for p in [0, 1] (finite since γ < 0 < 1 < ζ).
inline double rect_sigmoid_inverse(double p) { return std::log((p - cbq_gamma) / (cbq_zeta - p)); }
}  // namespace cbq_detail

/// Per-output-channel quantiser of a frozen W (a view: W must outlive it). It stores only
/// the scales and zero points ([out, 1]); ⌊W/s⌋ is recomputed entry by entry.
/// A channel whose range is zero (an all-zero row) is degenerate: its scale is reported as
/// 1, its codes stay at z (Ŵ row exactly 0), its rounding variables get no gradient and do
/// not enter the regulariser, so no division by zero and no NaN.
template <class T>
class cbq_quantizer {
 public:
  cbq_quantizer(matrix_view<const T> W, cbq_quant_options o = {}) : W_(W), o_(o) {
    constexpr const char* op = "deltaw::train::cbq_quantizer";
    if (o.bits < 2 || o.bits > 16)
      throw argument_error(std::string(op) + ": bits must lie in [2, 16]; got " + std::to_string(o.bits));
    if (W.rows() < 1 || W.cols() < 1)
      throw shape_error(std::string(op) + ": W is " + deltaw::detail::shape_str(W.rows(), W.cols()) +
                        "; it must be non-empty");
    if (W.data() == nullptr) throw null_data_error(std::string(op) + ": W has no data");
    if (o.symmetric) {
      qmin_ = -(1 << (o.bits - 1));
      qmax_ = (1 << (o.bits - 1)) - 1;
    } else {
      qmin_ = 0;
      qmax_ = (1 << o.bits) - 1;
    }
    scale_.setZero(W.rows(), 1);
    zero_.setZero(W.rows(), 1);
    degenerate_.assign(std::size_t(W.rows()), false);
    for (index_t i = 0; i < W.rows(); ++i) {
      double lo = 0, hi = 0;  // the range always contains 0 (UNVERIFIED for the asymmetric case)
      for (index_t j = 0; j < W.cols(); ++j) {
        const double w = double(W(i, j));
        if (!std::isfinite(w))
          throw non_finite_error(std::string(op) + ": W(" + std::to_string(i) + ", " + std::to_string(j) +
                                 ") is not finite");
        lo = std::min(lo, w);
        hi = std::max(hi, w);
      }
      double s, z = 0;
      if (o.symmetric) {
        s = std::max(-lo, hi) / double(qmax_);
      } else {
        s = (hi - lo) / double(qmax_);
        if (s > 0) z = std::clamp(std::nearbyint(-lo / s), 0.0, double(qmax_));
      }
      if (!(s > 0) || !std::isfinite(s) || !std::isfinite(T(s)) || !(T(s) > T(0))) {
        s = 1;
        z = 0;
        degenerate_[std::size_t(i)] = true;
      }
      scale_(i, 0) = T(s);
      zero_(i, 0) = T(z);
    }
  }

  index_t rows() const { return W_.rows(); }
  index_t cols() const { return W_.cols(); }
  int bits() const { return o_.bits; }
  bool symmetric() const { return o_.symmetric; }
  int qmin() const { return qmin_; }
  int qmax() const { return qmax_; }
  /// [out, 1]: the step s of each output channel.
  const dense<T>& scales() const { return scale_; }
  /// [out, 1]: the zero point z (an integer; 0 when symmetric).
  const dense<T>& zero_points() const { return zero_; }
  bool degenerate(index_t i) const { return degenerate_[std::size_t(i)]; }
  const matrix_view<const T>& weight() const { return W_; }

  /// ⌊W/s⌋ + z, not yet clamped (in T; an integer value).
  T base(index_t i, index_t j) const {
    if (degenerate(i)) return zero_(i, 0);
    return std::floor(W_(i, j) / scale_(i, 0)) + zero_(i, 0);
  }
  /// W/s − ⌊W/s⌋ in [0, 1) (0 on a degenerate channel).
  T fraction(index_t i, index_t j) const {
    if (degenerate(i)) return T(0);
    const T r = W_(i, j) / scale_(i, 0);
    return r - std::floor(r);
  }
  T clamp_code(T q) const { return std::clamp(q, T(qmin_), T(qmax_)); }
  /// s·(clamp(base + h, qmin, qmax) − z) for a soft or hard h.
  T dequant(index_t i, index_t j, T h) const {
    if (degenerate(i)) return T(0);
    return scale_(i, 0) * (clamp_code(base(i, j) + h) - zero_(i, 0));
  }
  /// dŴ/dh = s where the clamp passes (qmin ≤ base + h ≤ qmax), else 0.
  T dequant_grad(index_t i, index_t j, T h) const {
    if (degenerate(i)) return T(0);
    const T q = base(i, j) + h;
    return (q < T(qmin_) || q > T(qmax_)) ? T(0) : scale_(i, 0);
  }

 private:
  matrix_view<const T> W_;
  cbq_quant_options o_;
  int qmin_ = 0, qmax_ = 0;
  dense<T> scale_, zero_;
  std::vector<bool> degenerate_;
};

namespace cbq_detail {
template <class T, class A1, class A2>
void check_factors(const cbq_quantizer<T>& q, const A1& a1, const A2& a2, const char* op) {
  if (a1.rows() != q.rows() || a2.cols() != q.cols() || a1.cols() != a2.rows() || a1.cols() < 1)
    throw shape_error(std::string(op) + ": A1 is " + deltaw::detail::shape_str(a1.rows(), a1.cols()) + " and A2 is " +
                      deltaw::detail::shape_str(a2.rows(), a2.cols()) + "; expected [" + std::to_string(q.rows()) +
                      ", r] and [r, " + std::to_string(q.cols()) + "] with r ≥ 1");
}
inline index_t block_of(index_t row_block) { return std::max<index_t>(row_block, 1); }

/// Fills Wb [nb, in] with the soft weight of rows [i0, i0+nb) from V = A₁[blk]·A₂;
/// if D is given, also D = dŴ/dV there.
template <class T, class MA1, class MA2>
void soft_block(const cbq_quantizer<T>& q, const MA1& a1, const MA2& a2, index_t i0, index_t nb, dense<T>& V,
                dense<T>& Wb, dense<T>* D) {
  V.noalias() = a1.middleRows(i0, nb) * a2;
  Wb.resize(nb, q.cols());
  if (D) D->resize(nb, q.cols());
  for (index_t i = 0; i < nb; ++i)
    for (index_t j = 0; j < q.cols(); ++j) {
      const T h = rect_sigmoid(V(i, j));
      Wb(i, j) = q.dequant(i0 + i, j, h);
      if (D) (*D)(i, j) = q.dequant_grad(i0 + i, j, h) * rect_sigmoid_grad(V(i, j));
    }
}
}  // namespace cbq_detail

/// The soft weight Ŵ(A₁, A₂) [out, in] (dense, by name).
template <class T>
dense<T> cbq_soft_weight_dense(const cbq_quantizer<T>& q, const dense<T>& A1, const dense<T>& A2,
                               index_t row_block = 64) {
  cbq_detail::check_factors(q, A1, A2, "deltaw::train::cbq_soft_weight_dense");
  dense<T> out(q.rows(), q.cols()), V, Wb;
  const index_t bs = cbq_detail::block_of(row_block);
  for (index_t i0 = 0; i0 < q.rows(); i0 += bs) {
    const index_t nb = std::min(bs, q.rows() - i0);
    cbq_detail::soft_block(q, A1, A2, i0, nb, V, Wb, static_cast<dense<T>*>(nullptr));
    out.middleRows(i0, nb) = Wb;
  }
  return out;
}

/// Hard-rounded codes [out, in] (dense, by name): clamp(⌊W/s⌋ + z + [h(A₁A₂) ≥ ½]).
template <class T>
cbq_codes cbq_codes_dense(const cbq_quantizer<T>& q, const dense<T>& A1, const dense<T>& A2, index_t row_block = 64) {
  cbq_detail::check_factors(q, A1, A2, "deltaw::train::cbq_codes_dense");
  cbq_codes c(q.rows(), q.cols());
  dense<T> V;
  const index_t bs = cbq_detail::block_of(row_block);
  for (index_t i0 = 0; i0 < q.rows(); i0 += bs) {
    const index_t nb = std::min(bs, q.rows() - i0);
    V.noalias() = A1.middleRows(i0, nb) * A2;
    for (index_t i = 0; i < nb; ++i)
      for (index_t j = 0; j < q.cols(); ++j) {
        const T up = q.degenerate(i0 + i) ? T(0) : T(cbq_detail::rect_sigmoid(V(i, j)) >= T(0.5) ? 1 : 0);
        c(i0 + i, j) = std::int32_t(q.clamp_code(q.base(i0 + i, j) + up));
      }
  }
  return c;
}

/// Round-to-nearest codes [out, in] (dense, by name), the baseline: clamp(⌊W/s⌋ + z +
/// [frac ≥ ½]) (halves round up).
template <class T>
cbq_codes cbq_rtn_codes_dense(const cbq_quantizer<T>& q) {
  cbq_codes c(q.rows(), q.cols());
  for (index_t i = 0; i < q.rows(); ++i)
    for (index_t j = 0; j < q.cols(); ++j)
      c(i, j) = std::int32_t(q.clamp_code(q.base(i, j) + (q.fraction(i, j) >= T(0.5) ? T(1) : T(0))));
  return c;
}

/// s·(codes − z) [out, in] (dense, by name).
template <class T>
dense<T> cbq_quantized_weight_dense(const cbq_quantizer<T>& q, const cbq_codes& codes) {
  if (codes.rows() != q.rows() || codes.cols() != q.cols())
    throw shape_error("deltaw::train::cbq_quantized_weight_dense: codes are " +
                      deltaw::detail::shape_str(codes.rows(), codes.cols()) + " but W is " +
                      deltaw::detail::shape_str(q.rows(), q.cols()));
  dense<T> out(q.rows(), q.cols());
  for (index_t i = 0; i < q.rows(); ++i)
    for (index_t j = 0; j < q.cols(); ++j)
      out(i, j) = q.degenerate(i) ? T(0) : q.scales()(i, 0) * (T(codes(i, j)) - q.zero_points()(i, 0));
  return out;
}

namespace cbq_detail {
template <class T>
void check_x(const cbq_quantizer<T>& q, index_t rows, index_t cols, const char* op) {
  if (cols != q.cols() || rows < 1)
    throw shape_error(std::string(op) + ": X is " + deltaw::detail::shape_str(rows, cols) + " but W is " +
                      deltaw::detail::shape_str(q.rows(), q.cols()) + "; X must be [n ≥ 1, " +
                      std::to_string(q.cols()) + "]");
}
}  // namespace cbq_detail

/// ‖X·Wᵀ − X·Ŵᵀ‖²_F / n for the hard weight s·(codes − z), in row blocks (no dense weight).
template <class T>
double cbq_output_error(const cbq_quantizer<T>& q, matrix_view<const T> X, const cbq_codes& codes,
                        index_t row_block = 64) {
  constexpr const char* op = "deltaw::train::cbq_output_error";
  cbq_detail::check_x(q, X.rows(), X.cols(), op);
  if (codes.rows() != q.rows() || codes.cols() != q.cols())
    throw shape_error(std::string(op) + ": codes are " + deltaw::detail::shape_str(codes.rows(), codes.cols()) +
                      " but W is " + deltaw::detail::shape_str(q.rows(), q.cols()));
  dense<T> xs;
  const auto Xm = autograd::detail::map_view(X, xs);
  const index_t bs = cbq_detail::block_of(row_block);
  dense<T> E;
  double acc = 0;
  for (index_t i0 = 0; i0 < q.rows(); i0 += bs) {
    const index_t nb = std::min(bs, q.rows() - i0);
    E.resize(nb, q.cols());
    for (index_t i = 0; i < nb; ++i)
      for (index_t j = 0; j < q.cols(); ++j)
        E(i, j) = q.weight()(i0 + i, j) -
                  (q.degenerate(i0 + i) ? T(0)
                                        : q.scales()(i0 + i, 0) * (T(codes(i0 + i, j)) - q.zero_points()(i0 + i, 0)));
    acc += double((Xm * E.transpose()).squaredNorm());
  }
  return acc / double(X.rows());
}

/// y = x·Ŵ(A₁, A₂)ᵀ on the tape, x [n, in], A₁ [out, r], A₂ [r, in] (usually parameters).
/// Neither pass forms Ŵ whole: both work on `row_block` output channels at a time, the
/// backward recomputing V = A₁[blk]·A₂ (the quantiser and W must outlive the tape).
/// Gradients: dA₁[blk] = M·A₂ᵀ, dA₂ = Σ A₁[blk]ᵀ·M, M = (gᵀ[blk]·x) ⊙ dŴ/dV.
template <class T>
autograd::var<T> cbq_linear(const autograd::var<T>& x, const autograd::var<T>& A1, const autograd::var<T>& A2,
                            const cbq_quantizer<T>& q, index_t row_block = 64) {
  constexpr const char* op = "deltaw::train::cbq_linear";
  auto& t = autograd::detail::same_tape(x, A1, op);
  autograd::detail::same_tape(x, A2, op);
  cbq_detail::check_x(q, x.rows(), x.cols(), op);
  cbq_detail::check_factors(q, A1, A2, op);
  const index_t bs = cbq_detail::block_of(row_block);
  const auto X = x.value();
  const auto a1 = A1.value();
  const auto a2 = A2.value();
  dense<T> y(x.rows(), q.rows()), V, Wb;
  for (index_t i0 = 0; i0 < q.rows(); i0 += bs) {
    const index_t nb = std::min(bs, q.rows() - i0);
    cbq_detail::soft_block(q, a1, a2, i0, nb, V, Wb, static_cast<dense<T>*>(nullptr));
    y.middleCols(i0, nb).noalias() = X * Wb.transpose();
  }
  const index_t ix = x.id(), i1 = A1.id(), i2 = A2.id();
  const cbq_quantizer<T>* qp = &q;
  const bool rg = t.requires_grad(x) || t.requires_grad(A1) || t.requires_grad(A2);
  return t.record(
      "cbq_linear", std::move(y), rg,
      [ix, i1, i2, qp, bs](autograd::tape<T>& t, index_t self) {
        const auto& g = t.upstream(self);
        const auto X = t.value_at(ix);
        const auto a1 = t.value_at(i1);
        const auto a2 = t.value_at(i2);
        const bool gx = t.needs_grad(ix), g1 = t.needs_grad(i1), g2 = t.needs_grad(i2);
        dense<T> dX, dA1, dA2, V, Wb, D, M;
        if (gx) dX.setZero(X.rows(), X.cols());
        if (g1) dA1.setZero(a1.rows(), a1.cols());
        if (g2) dA2.setZero(a2.rows(), a2.cols());
        for (index_t i0 = 0; i0 < qp->rows(); i0 += bs) {
          const index_t nb = std::min(bs, qp->rows() - i0);
          cbq_detail::soft_block(*qp, a1, a2, i0, nb, V, Wb, (g1 || g2) ? &D : nullptr);
          if (gx) dX.noalias() += g.middleCols(i0, nb) * Wb;
          if (!(g1 || g2)) continue;
          M.noalias() = g.middleCols(i0, nb).transpose() * X;
          M.array() *= D.array();
          if (g1) dA1.middleRows(i0, nb).noalias() += M * a2.transpose();
          if (g2) dA2.noalias() += a1.middleRows(i0, nb).transpose() * M;
        }
        if (gx) autograd::detail::accumulate(t, ix, dX);
        if (g1) autograd::detail::accumulate(t, i1, dA1);
        if (g2) autograd::detail::accumulate(t, i2, dA2);
      },
      /*backward_reads_output=*/false);
}

/// AdaRound's regulariser Σ (1 − |2h(A₁A₂) − 1|^β) over the non-degenerate channels, a
/// [1, 1] variable; β ≥ 1 (its gradient −2β·|u|^(β−1)·sign(u)·h′ is then finite).
template <class T>
autograd::var<T> cbq_rounding_regularizer(const autograd::var<T>& A1, const autograd::var<T>& A2,
                                          const cbq_quantizer<T>& q, double beta, index_t row_block = 64) {
  constexpr const char* op = "deltaw::train::cbq_rounding_regularizer";
  auto& t = autograd::detail::same_tape(A1, A2, op);
  cbq_detail::check_factors(q, A1, A2, op);
  if (!(beta >= 1) || !std::isfinite(beta))
    throw argument_error(std::string(op) + ": beta must be finite and ≥ 1; got " + std::to_string(beta));
  const index_t bs = cbq_detail::block_of(row_block);
  const auto a1 = A1.value();
  const auto a2 = A2.value();
  dense<T> V;
  double acc = 0;
  for (index_t i0 = 0; i0 < q.rows(); i0 += bs) {
    const index_t nb = std::min(bs, q.rows() - i0);
    V.noalias() = a1.middleRows(i0, nb) * a2;
    for (index_t i = 0; i < nb; ++i) {
      if (q.degenerate(i0 + i)) continue;
      for (index_t j = 0; j < q.cols(); ++j)
        acc += 1.0 - std::pow(std::abs(2.0 * double(cbq_detail::rect_sigmoid(V(i, j))) - 1.0), beta);
    }
  }
  dense<T> y(1, 1);
  y(0, 0) = T(acc);
  const index_t i1 = A1.id(), i2 = A2.id();
  const cbq_quantizer<T>* qp = &q;
  return t.record(
      "cbq_rounding_regularizer", std::move(y), t.requires_grad(A1) || t.requires_grad(A2),
      [i1, i2, qp, bs, beta](autograd::tape<T>& t, index_t self) {
        const T g = t.upstream(self)(0, 0);
        const auto a1 = t.value_at(i1);
        const auto a2 = t.value_at(i2);
        const bool g1 = t.needs_grad(i1), g2 = t.needs_grad(i2);
        dense<T> dA1, dA2, V, M;
        if (g1) dA1.setZero(a1.rows(), a1.cols());
        if (g2) dA2.setZero(a2.rows(), a2.cols());
        for (index_t i0 = 0; i0 < qp->rows(); i0 += bs) {
          const index_t nb = std::min(bs, qp->rows() - i0);
          V.noalias() = a1.middleRows(i0, nb) * a2;
          M.resize(nb, qp->cols());
          for (index_t i = 0; i < nb; ++i)
            for (index_t j = 0; j < qp->cols(); ++j) {
              if (qp->degenerate(i0 + i)) {
                M(i, j) = T(0);
                continue;
              }
              const double u = 2.0 * double(cbq_detail::rect_sigmoid(V(i, j))) - 1.0;
              const double du = u == 0 ? 0.0 : std::pow(std::abs(u), beta - 1) * (u > 0 ? 1.0 : -1.0);
              M(i, j) = g * T(-2.0 * beta * du) * cbq_detail::rect_sigmoid_grad(V(i, j));
            }
          if (g1) dA1.middleRows(i0, nb).noalias() += M * a2.transpose();
          if (g2) dA2.noalias() += a1.middleRows(i0, nb).transpose() * M;
        }
        if (g1) autograd::detail::accumulate(t, i1, dA1);
        if (g2) autograd::detail::accumulate(t, i2, dA2);
      },
      /*backward_reads_output=*/false);
}

/// Init of A₁ [out, r], A₂ [r, in] so that A₁A₂ ≈ V* = h⁻¹(frac) (the logits at which the
/// soft weight equals W before clamping), by `iters` alternating least-squares sweeps from
/// a seeded random A₂ (UNVERIFIED). V* is recomputed in row blocks, never stored whole.
template <class T>
void cbq_init_factors(const cbq_quantizer<T>& q, index_t rank, dense<T>& A1, dense<T>& A2, std::uint64_t seed = 0,
                      index_t iters = 10, index_t row_block = 64) {
  constexpr const char* op = "deltaw::train::cbq_init_factors";
  if (rank < 1 || rank > std::min(q.rows(), q.cols()))
    throw rank_error(std::string(op) + ": rank must lie in [1, min(out, in)] = [1, " +
                     std::to_string(std::min(q.rows(), q.cols())) + "]; got " + std::to_string(rank));
  const index_t bs = cbq_detail::block_of(row_block), out = q.rows(), in = q.cols();
  std::mt19937_64 gen(seed);
  A2.resize(rank, in);
  // Uniform(−1, 1) from the raw 64-bit stream (std distributions differ across libraries).
  for (index_t k = 0; k < A2.size(); ++k) A2.data()[k] = T(2.0 * double(gen() >> 11) * 0x1.0p-53 - 1.0);
  A1.setZero(out, rank);
  using dd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
  dense<T> Vb;
  auto target_block = [&](index_t i0, index_t nb) {
    Vb.resize(nb, in);
    for (index_t i = 0; i < nb; ++i)
      for (index_t j = 0; j < in; ++j)
        Vb(i, j) = q.degenerate(i0 + i) ? T(0) : T(cbq_detail::rect_sigmoid_inverse(double(q.fraction(i0 + i, j))));
  };
  const double ridge = 1e-8;
  for (index_t it = 0; it < std::max<index_t>(iters, 1); ++it) {
    // A₁ = V*·A₂ᵀ·(A₂A₂ᵀ)⁻¹
    dd G = (A2 * A2.transpose()).template cast<double>();
    G.diagonal().array() += ridge * std::max(1.0, G.diagonal().maxCoeff());
    Eigen::LDLT<dd> s2(G);
    for (index_t i0 = 0; i0 < out; i0 += bs) {
      const index_t nb = std::min(bs, out - i0);
      target_block(i0, nb);
      const dd R = (Vb * A2.transpose()).template cast<double>();
      A1.middleRows(i0, nb) = s2.solve(R.transpose()).transpose().template cast<T>();
    }
    // A₂ = (A₁ᵀA₁)⁻¹·A₁ᵀ·V*
    dd H = (A1.transpose() * A1).template cast<double>();
    H.diagonal().array() += ridge * std::max(1.0, H.diagonal().maxCoeff());
    Eigen::LDLT<dd> s1(H);
    dd R = dd::Zero(rank, in);
    for (index_t i0 = 0; i0 < out; i0 += bs) {
      const index_t nb = std::min(bs, out - i0);
      target_block(i0, nb);
      R += (A1.middleRows(i0, nb).transpose() * Vb).template cast<double>();
    }
    A2 = s1.solve(R).template cast<T>();
  }
}

struct cbq_reconstruct_options {
  int bits = 4;
  bool symmetric = true;
  index_t rank = 8;              // r of A₁ [out, r], A₂ [r, in]
  index_t steps = 1000;
  double lr = 1e-2;              // AdamW
  double weight_decay = 0;       // AdamW's decoupled decay on A₁, A₂
  double lambda = 1e-2;          // weight of the regulariser (UNVERIFIED)
  double beta_start = 20;        // β annealed (cosine) from beta_start to beta_end (UNVERIFIED)
  double beta_end = 2;
  double warmup = 0.2;           // fraction of the steps without the regulariser (UNVERIFIED)
  index_t batch_rows = 0;        // calibration rows per step, drawn from the seed; 0 = all
  index_t init_iters = 10;       // ALS sweeps of the init
  index_t row_block = 64;
  std::uint64_t seed = 0;
};

template <class T>
struct cbq_result {
  cbq_codes codes;           // [out, in] integers in [qmin, qmax] (the quantised layer, dense)
  dense<T> scales;           // [out, 1]
  dense<T> zero_points;      // [out, 1]
  int qmin = 0, qmax = 0;
  dense<T> A1, A2;           // the optimised rounding factors
  double error = 0;          // ‖X·Wᵀ − X·Ŵᵀ‖²_F / n of the hard-rounded weight
  double rtn_error = 0;      // the same for round-to-nearest at the same bits and scales
  double final_loss = 0;     // the last step's soft reconstruction term
  index_t flips = 0;         // codes that differ from round-to-nearest
};

/// β at step t of `steps` (UNVERIFIED, AdaRound's schedule): none during the warm-up,
/// then cosine from beta_start to beta_end. Returns 0 when the regulariser is off.
inline double cbq_beta_at(const cbq_reconstruct_options& o, index_t t) {
  const double warm = o.warmup * double(o.steps);
  if (double(t) < warm) return 0;
  const double rel = o.steps <= warm ? 1.0 : (double(t) - warm) / (double(o.steps) - warm);
  return o.beta_end + 0.5 * (o.beta_start - o.beta_end) * (1 + std::cos(rel * std::numbers::pi));
}

/// Optimises A₁, A₂ for a frozen W [out, in] on calibration inputs X [n, in] with AdamW,
/// minimising ‖X·Wᵀ − X·Ŵᵀ‖²_F/n + λ·reg(β), then hard-rounds. Deterministic given the
/// seed (init and row sampling).
template <class T>
cbq_result<T> cbq_reconstruct(matrix_view<const T> W, matrix_view<const T> X, const cbq_reconstruct_options& o) {
  constexpr const char* op = "deltaw::train::cbq_reconstruct";
  cbq_quantizer<T> q(W, {o.bits, o.symmetric});
  cbq_detail::check_x(q, X.rows(), X.cols(), op);
  if (o.rank < 1 || o.rank > std::min(q.rows(), q.cols()))
    throw rank_error(std::string(op) + ": rank must lie in [1, min(out, in)] = [1, " +
                     std::to_string(std::min(q.rows(), q.cols())) + "]; got " + std::to_string(o.rank));
  if (o.steps < 0 || o.batch_rows < 0)
    throw argument_error(std::string(op) + ": steps and batch_rows must be ≥ 0");
  if (!(o.lambda >= 0) || !(o.beta_end >= 1) || !(o.beta_start >= 1))
    throw argument_error(std::string(op) + ": lambda must be ≥ 0 and the betas ≥ 1");
  dense<T> xs, ws;
  const dense<T> Xd = autograd::detail::map_view(X, xs);
  for (index_t k = 0; k < Xd.size(); ++k)
    if (!std::isfinite(Xd.data()[k])) throw non_finite_error(std::string(op) + ": X has a non-finite entry");
  const dense<T> Yref = Xd * autograd::detail::map_view(W, ws).transpose();  // [n, out]
  dense<T> a1, a2;
  cbq_init_factors(q, o.rank, a1, a2, o.seed ^ 0x9e3779b97f4a7c15ULL, o.init_iters, o.row_block);
  autograd::parameter<T> A1("cbq.A1", std::move(a1)), A2("cbq.A2", std::move(a2));
  optim::adamw<T> opt({&A1, &A2}, {.lr = o.lr, .weight_decay = o.weight_decay});
  std::mt19937_64 gen(o.seed);
  const index_t n = X.rows();
  const bool sample = o.batch_rows > 0 && o.batch_rows < n;
  dense<T> Xb, Yb;
  double last = 0;
  for (index_t step = 0; step < o.steps; ++step) {
    if (sample) {
      Xb.resize(o.batch_rows, X.cols());
      Yb.resize(o.batch_rows, q.rows());
      for (index_t k = 0; k < o.batch_rows; ++k) {
        const index_t r = index_t(gen() % std::uint64_t(n));
        Xb.row(k) = Xd.row(r);
        Yb.row(k) = Yref.row(r);
      }
    }
    const dense<T>& xb = sample ? Xb : Xd;
    const dense<T>& yb = sample ? Yb : Yref;
    autograd::tape<T> t;
    A1.zero_grad();
    A2.zero_grad();
    auto a = t.param(A1), b = t.param(A2);
    auto y = cbq_linear(t.frozen(xb, "X"), a, b, q, o.row_block);
    // mse averages over n·out entries; × out gives ‖·‖²_F / n.
    auto loss = autograd::scale(autograd::mse(y, t.frozen(yb, "XWᵀ")), double(q.rows()));
    last = double(loss.value()(0, 0));
    const double beta = cbq_beta_at(o, step);
    if (beta > 0 && o.lambda > 0)
      loss = autograd::add(loss, autograd::scale(cbq_rounding_regularizer(a, b, q, beta, o.row_block), o.lambda));
    t.backward(loss);
    opt.step();
  }
  cbq_result<T> r;
  r.codes = cbq_codes_dense(q, A1.value(), A2.value(), o.row_block);
  r.scales = q.scales();
  r.zero_points = q.zero_points();
  r.qmin = q.qmin();
  r.qmax = q.qmax();
  r.error = cbq_output_error(q, X, r.codes, o.row_block);
  const cbq_codes rtn = cbq_rtn_codes_dense(q);
  r.rtn_error = cbq_output_error(q, X, rtn, o.row_block);
  r.flips = (r.codes.array() != rtn.array()).count();
  r.final_loss = last;
  r.A1 = std::move(A1.value());
  r.A2 = std::move(A2.value());
  return r;
}

}  // namespace train
DELTAW_NAMESPACE_END
