// SPDX-License-Identifier: MIT
// CBQ completed (Ding et al., "CBQ: Cross-Block Quantization for Large Language Models",
// ICLR 2025): the LoRA-Rounding of cbq_rounding.hpp with
//
//  1. learnable per-output-channel step sizes s, trained jointly with the rounding factors
//     A₁, A₂ (cbq_linear_lsq), and
//  2. cross-block reconstruction: the output of a window of K consecutive blocks (default
//     K = 2, overlap 1) is reconstructed against the full-precision window output, the
//     factors and steps of every layer of the window optimised jointly, the window sliding
//     over the blocks (cbq_stack, cbq_reconstruct_blocks).
//
// The quantised weight of one layer, with a fixed integer zero point z (0 when symmetric):
//
//   Ŵ(A₁, A₂, s) = s·(clamp(b(s) + h(A₁A₂), qmin, qmax) − z)
//
// The floor inside b is not differentiable; two estimators are offered (cbq_step_grad):
//   lsq            b = ⌊W/s⌋ + z with the current s, and the straight-through estimator
//                  d⌊W/s⌋/ds ≈ d(W/s)/ds (LSQ, Esser et al. 2020): with u = b + h,
//                  dŴ/ds = (u − z) − W/s where qmin ≤ u ≤ qmax, and qmin − z / qmax − z
//                  where the clamp saturates. It is the exact derivative of the surrogate in
//                  which the fraction W/s − ⌊W/s⌋ is held constant (what the tests check).
//   frozen_base    (default) b = ⌊W/s₀⌋ + z from the initial step s₀, fixed: the objective
//                  is then differentiable in s and dŴ/ds = clamp(u) − z exactly (everywhere
//                  but the clamp kinks).
// Which of the two the paper uses is UNVERIFIED (the paper says the step sizes are learned
// with the rounding; the estimator is not given in what we have). frozen_base is the
// default because it measured better here: under lsq, each time ⌊W/s⌋ jumps as s moves,
// the learned h of that entry suddenly means the next code, and the hard error after
// reconstruction was erratic (better than fixed steps on some seeds, worse on others;
// docs/training.md has the table), while frozen_base lowered it on 5 of 6 seeds. The step is kept positive
// by its parametrisation (cbq_step_param), relative to the initial step s₀ so that the init
// is exactly s₀:
//   log (default)  s = s₀·exp(θ), θ₀ = 0, ds/dθ = s
//   clamped        s = s₀·max(θ, min_ratio), θ₀ = 1, ds/dθ = s₀ where θ ≥ min_ratio, else 0
//                  (the reconstruction also projects θ back to ≥ min_ratio after each step).
// A degenerate (all-zero) channel keeps Ŵ = 0 and gets no gradient, as in cbq_rounding.hpp.
//
// Blocks (cbq_block): y = act(x·Ŵᵀ + b) (+ x when residual), act ∈ {none, ReLU, GELU}: the
// library's nn layers have no plain MLP stack (only the tiny transformer), so the stack is
// defined here through the autograd ops. Window objective, for blocks [first, last]:
//
//   L = ‖f̂_window(x) − y_fp‖²_F / n + λ·Σ_layers Σ (1 − |2h(A₁A₂) − 1|^β)
//
// x is the window's input: the output of the blocks before it, already hard-quantised
// (cbq_window_input::quantized, default) or full precision (full_precision): UNVERIFIED,
// an option. y_fp is the full-precision model's activation after the window's last block.
// Windows start at 0, K − overlap apart; the last one ends at the last block. A block in
// an overlap is optimised again in the next window, starting from where the previous window
// left its factors and steps (fresh AdamW moments per window); its hard codes are final
// after the last window containing it. The regulariser schedule (warm-up, β from beta_start
// to beta_end) restarts in every window (UNVERIFIED).
//
// CBQ's two other pieces, both options, off by default (their exact settings UNVERIFIED):
//  - the KL term of the homologous reconstruction: L += κ·τ²·mean_rows KL(softmax(y_fp/τ) ‖
//    softmax(f̂(x)/τ)) (kl_weight κ, kl_temperature τ; autograd::softmax_kl);
//  - coarse-to-fine outlier pre-processing of the weights (cbq_cfp_truncate): per output
//    channel, the coarse candidates are the |w| above Q3 + k·IQR of that channel's |w|; the
//    fine split among them is the threshold that minimises the within-set sum of squares of
//    the kept and the outlier magnitudes (1-D two-means); the outliers are truncated to the
//    largest kept magnitude before the quantiser sees W. The target y_fp keeps W as is.
//
// Dense out × in matrices: only in codes_dense / cbq_block_result::codes (the integer codes,
// the quantised layer itself). Forward and backward passes work on `row_block` output
// channels at a time, as cbq_linear does.
#pragma once

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <memory>
#include <numbers>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cbq_rounding.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

enum class cbq_step_grad { lsq, frozen_base };
enum class cbq_step_param { log, clamped };

struct cbq_step_options {
  bool learn = true;                            // train s; false keeps s = s₀ (LoRA-Rounding only)
  cbq_step_grad grad = cbq_step_grad::frozen_base;  // estimator of dŴ/ds (UNVERIFIED: option)
  cbq_step_param param = cbq_step_param::log;       // how s stays positive
  double lr_scale = 1.0;                            // AdamW lr of θ relative to the factors' (UNVERIFIED)
  double min_ratio = 1e-3;                      // clamped: s ≥ min_ratio·s₀; in (0, 1]
};

namespace cbq_detail {
inline void check_step_options(const cbq_step_options& so, const char* op) {
  if (!(so.lr_scale > 0) || !std::isfinite(so.lr_scale))
    throw argument_error(std::string(op) + ": step.lr_scale must be finite and > 0; got " + std::to_string(so.lr_scale));
  if (!(so.min_ratio > 0 && so.min_ratio <= 1))
    throw argument_error(std::string(op) + ": step.min_ratio must lie in (0, 1]; got " + std::to_string(so.min_ratio));
}
template <class T, class M>
void check_theta(const cbq_quantizer<T>& q, const M& theta, const char* op) {
  if (theta.rows() != q.rows() || theta.cols() != 1)
    throw shape_error(std::string(op) + ": the step parameter θ is " + deltaw::detail::shape_str(theta.rows(), theta.cols()) +
                      "; expected [" + std::to_string(q.rows()) + ", 1] (one per output channel)");
}
}  // namespace cbq_detail

/// θ₀ [out, 1] at which the step is s₀ (0 for log, 1 for clamped).
template <class T>
dense<T> cbq_step_init(const cbq_quantizer<T>& q, const cbq_step_options& so = {}) {
  return dense<T>::Constant(q.rows(), 1, so.param == cbq_step_param::log ? T(0) : T(1));
}

/// The steps s [out, 1] of parameter θ [out, 1]: s₀·exp(θ) or s₀·max(θ, min_ratio).
/// Throws non_finite_error if one is not finite and positive.
template <class T, class M>
dense<T> cbq_steps(const cbq_quantizer<T>& q, const M& theta, const cbq_step_options& so = {}) {
  constexpr const char* op = "deltaw::train::cbq_steps";
  cbq_detail::check_theta(q, theta, op);
  dense<T> s(q.rows(), 1);
  for (index_t i = 0; i < q.rows(); ++i) {
    const T th = theta(i, 0), s0 = q.scales()(i, 0);
    s(i, 0) = so.param == cbq_step_param::log ? s0 * std::exp(th) : s0 * std::max(th, T(so.min_ratio));
    if (!std::isfinite(s(i, 0)) || !(s(i, 0) > T(0)))
      throw non_finite_error(std::string(op) + ": the step of channel " + std::to_string(i) + " is " +
                             std::to_string(double(s(i, 0))) + " (θ = " + std::to_string(double(th)) +
                             "); it must be finite and > 0");
  }
  return s;
}

namespace cbq_detail {
/// Soft weight of rows [i0, i0+nb) at steps s; DV = dŴ/dV, DS = dŴ/ds (per entry).
template <class T, class MA1, class MA2>
void lsq_block(const cbq_quantizer<T>& q, const MA1& a1, const MA2& a2, const dense<T>& s, cbq_step_grad mode,
               index_t i0, index_t nb, dense<T>& V, dense<T>& Wb, dense<T>* DV, dense<T>* DS) {
  V.noalias() = a1.middleRows(i0, nb) * a2;
  Wb.resize(nb, q.cols());
  if (DV) DV->resize(nb, q.cols());
  if (DS) DS->resize(nb, q.cols());
  const T lo = T(q.qmin()), hi = T(q.qmax());
  for (index_t i = 0; i < nb; ++i) {
    const index_t g = i0 + i;
    if (q.degenerate(g)) {
      Wb.row(i).setZero();
      if (DV) DV->row(i).setZero();
      if (DS) DS->row(i).setZero();
      continue;
    }
    const T si = s(g, 0), z = q.zero_points()(g, 0);
    for (index_t j = 0; j < q.cols(); ++j) {
      const T v = V(i, j), h = rect_sigmoid(v);
      const T r = q.weight()(g, j) / si;
      const T b = mode == cbq_step_grad::lsq ? std::floor(r) + z : q.base(g, j);
      const T u = b + h;
      const bool inside = !(u < lo || u > hi);
      const T qc = std::clamp(u, lo, hi);
      Wb(i, j) = si * (qc - z);
      if (DV) (*DV)(i, j) = inside ? si * rect_sigmoid_grad(v) : T(0);
      if (DS) (*DS)(i, j) = (inside && mode == cbq_step_grad::lsq) ? (u - z) - r : qc - z;
    }
  }
}

/// X·Ŵᵀ for hard-rounded weights, in row blocks: Ŵ = s·(clamp(b + up) − z) with
/// up = [h(A₁A₂) ≥ ½] (rtn = false) or [fraction ≥ ½] at s₀ (rtn = true: round to nearest).
template <class T>
dense<T> hard_apply(const cbq_quantizer<T>& q, const dense<T>& s, cbq_step_grad mode, const dense<T>* a1,
                    const dense<T>* a2, const dense<T>& X, index_t row_block, bool rtn) {
  const index_t bs = block_of(row_block);
  dense<T> y(X.rows(), q.rows()), V, Wb(0, 0);
  for (index_t i0 = 0; i0 < q.rows(); i0 += bs) {
    const index_t nb = std::min(bs, q.rows() - i0);
    if (!rtn) V.noalias() = a1->middleRows(i0, nb) * (*a2);
    Wb.resize(nb, q.cols());
    for (index_t i = 0; i < nb; ++i) {
      const index_t g = i0 + i;
      for (index_t j = 0; j < q.cols(); ++j) {
        if (q.degenerate(g)) {
          Wb(i, j) = T(0);
          continue;
        }
        const T z = q.zero_points()(g, 0);
        if (rtn) {
          Wb(i, j) = q.scales()(g, 0) * (q.clamp_code(q.base(g, j) + (q.fraction(g, j) >= T(0.5) ? T(1) : T(0))) - z);
        } else {
          const T b = mode == cbq_step_grad::lsq ? std::floor(q.weight()(g, j) / s(g, 0)) + z : q.base(g, j);
          const T up = rect_sigmoid(V(i, j)) >= T(0.5) ? T(1) : T(0);
          Wb(i, j) = s(g, 0) * (q.clamp_code(b + up) - z);
        }
      }
    }
    y.middleCols(i0, nb).noalias() = X * Wb.transpose();
  }
  return y;
}
}  // namespace cbq_detail

/// y = x·Ŵ(A₁, A₂, s(θ))ᵀ on the tape: x [n, in], A₁ [out, r], A₂ [r, in], θ [out, 1] the
/// step parameter (see the top of the file). Row blocks as cbq_linear; gradients:
/// dA as cbq_linear's, dθᵢ = (Σⱼ Mᵢⱼ·dŴᵢⱼ/dsᵢ)·dsᵢ/dθᵢ with M = gᵀ·x.
template <class T>
autograd::var<T> cbq_linear_lsq(const autograd::var<T>& x, const autograd::var<T>& A1, const autograd::var<T>& A2,
                                const autograd::var<T>& theta, const cbq_quantizer<T>& q,
                                const cbq_step_options& so = {}, index_t row_block = 64) {
  constexpr const char* op = "deltaw::train::cbq_linear_lsq";
  auto& t = autograd::detail::same_tape(x, A1, op);
  autograd::detail::same_tape(x, A2, op);
  autograd::detail::same_tape(x, theta, op);
  cbq_detail::check_x(q, x.rows(), x.cols(), op);
  cbq_detail::check_factors(q, A1, A2, op);
  cbq_detail::check_theta(q, theta, op);
  cbq_detail::check_step_options(so, op);
  const index_t bs = cbq_detail::block_of(row_block);
  const auto X = x.value();
  const auto a1 = A1.value();
  const auto a2 = A2.value();
  const dense<T> s = cbq_steps(q, theta.value(), so);
  dense<T> y(x.rows(), q.rows()), V, Wb;
  for (index_t i0 = 0; i0 < q.rows(); i0 += bs) {
    const index_t nb = std::min(bs, q.rows() - i0);
    cbq_detail::lsq_block(q, a1, a2, s, so.grad, i0, nb, V, Wb, static_cast<dense<T>*>(nullptr),
                          static_cast<dense<T>*>(nullptr));
    y.middleCols(i0, nb).noalias() = X * Wb.transpose();
  }
  const index_t ix = x.id(), i1 = A1.id(), i2 = A2.id(), it = theta.id();
  const cbq_quantizer<T>* qp = &q;
  const bool rg = t.requires_grad(x) || t.requires_grad(A1) || t.requires_grad(A2) || t.requires_grad(theta);
  return t.record(
      "cbq_linear_lsq", std::move(y), rg,
      [ix, i1, i2, it, qp, bs, so](autograd::tape<T>& t, index_t self) {
        const auto& g = t.upstream(self);
        const auto X = t.value_at(ix);
        const auto a1 = t.value_at(i1);
        const auto a2 = t.value_at(i2);
        const auto th = t.value_at(it);
        const dense<T> s = cbq_steps(*qp, th, so);
        const bool gx = t.needs_grad(ix), g1 = t.needs_grad(i1), g2 = t.needs_grad(i2), gt = t.needs_grad(it);
        const bool gw = g1 || g2 || gt;
        dense<T> dX, dA1, dA2, dT, V, Wb, DV, DS, M;
        if (gx) dX.setZero(X.rows(), X.cols());
        if (g1) dA1.setZero(a1.rows(), a1.cols());
        if (g2) dA2.setZero(a2.rows(), a2.cols());
        if (gt) dT.setZero(qp->rows(), 1);
        for (index_t i0 = 0; i0 < qp->rows(); i0 += bs) {
          const index_t nb = std::min(bs, qp->rows() - i0);
          cbq_detail::lsq_block(*qp, a1, a2, s, so.grad, i0, nb, V, Wb, gw ? &DV : nullptr, gt ? &DS : nullptr);
          if (gx) dX.noalias() += g.middleCols(i0, nb) * Wb;
          if (!gw) continue;
          M.noalias() = g.middleCols(i0, nb).transpose() * X;
          if (gt)
            for (index_t i = 0; i < nb; ++i) {
              const index_t r = i0 + i;
              const T ds = (M.row(i).array() * DS.row(i).array()).sum();
              const T chain = so.param == cbq_step_param::log
                                  ? s(r, 0)
                                  : (th(r, 0) >= T(so.min_ratio) ? qp->scales()(r, 0) : T(0));
              dT(r, 0) = ds * chain;
            }
          if (g1 || g2) {
            M.array() *= DV.array();
            if (g1) dA1.middleRows(i0, nb).noalias() += M * a2.transpose();
            if (g2) dA2.noalias() += a1.middleRows(i0, nb).transpose() * M;
          }
        }
        if (gx) autograd::detail::accumulate(t, ix, dX);
        if (g1) autograd::detail::accumulate(t, i1, dA1);
        if (g2) autograd::detail::accumulate(t, i2, dA2);
        if (gt) autograd::detail::accumulate(t, it, dT);
      },
      /*backward_reads_output=*/false);
}

enum class cbq_activation { none, relu, gelu };

/// One block y = act(x·Wᵀ + b) (+ x when residual). W is a view (the caller's memory must
/// outlive the stack); the bias [1, out] is copied (empty: no bias).
template <class T>
struct cbq_block {
  matrix_view<const T> weight;
  dense<T> bias;
  cbq_activation act = cbq_activation::gelu;
  bool residual = false;
};

enum class cbq_window_input { quantized, full_precision };

struct cbq_cross_block_options {
  int bits = 4;
  bool symmetric = true;
  index_t rank = 4;              // r of every layer's A₁ [out, r], A₂ [r, in] (capped at min(out, in))
  index_t window = 2;            // K blocks per window
  index_t overlap = 1;           // blocks shared by consecutive windows, in [0, K)
  cbq_window_input input = cbq_window_input::quantized;  // UNVERIFIED: option
  cbq_step_options step;
  index_t steps = 500;           // AdamW steps per window
  double lr = 1e-2;
  double weight_decay = 0;
  double lambda = 1e-2;          // regulariser weight (UNVERIFIED)
  double beta_start = 20;        // β schedule per window (UNVERIFIED)
  double beta_end = 2;
  double warmup = 0.2;
  index_t batch_rows = 0;        // calibration rows per step; 0 = all
  index_t init_iters = 10;
  index_t row_block = 64;
  std::uint64_t seed = 0;
  double kl_weight = 0;          // κ of the KL term (0: off; UNVERIFIED)
  double kl_temperature = 1;     // τ of the KL term
  bool cfp = false;              // coarse-to-fine weight outlier truncation (UNVERIFIED details)
  double cfp_iqr_factor = 1.5;   // k of the coarse bound Q3 + k·IQR
};

/// The windows [first, last] over L blocks: starts 0, K − overlap, …; the last window ends
/// at block L − 1 (a window longer than the stack is the whole stack).
inline std::vector<std::pair<index_t, index_t>> cbq_windows(index_t blocks, index_t window, index_t overlap) {
  constexpr const char* op = "deltaw::train::cbq_windows";
  if (blocks < 1) throw argument_error(std::string(op) + ": there must be at least one block; got " + std::to_string(blocks));
  if (window < 1) throw argument_error(std::string(op) + ": window must be ≥ 1; got " + std::to_string(window));
  if (overlap < 0 || overlap >= window)
    throw argument_error(std::string(op) + ": overlap must lie in [0, window) = [0, " + std::to_string(window) +
                         "); got " + std::to_string(overlap));
  std::vector<std::pair<index_t, index_t>> w;
  for (index_t start = 0;; start += window - overlap) {
    const index_t last = std::min(start + window - 1, blocks - 1);
    w.emplace_back(start, last);
    if (last == blocks - 1) break;
  }
  return w;
}

/// CBQ's coarse-to-fine weight pre-processing (see the top of this file): W with each output
/// channel's outlier magnitudes truncated to the largest kept one (signs kept). Channels
/// without coarse candidates are unchanged. k: the coarse bound's IQR factor (> 0).
template <class T>
dense<T> cbq_cfp_truncate(const matrix_view<const T>& W, double k = 1.5) {
  if (!(k > 0) || !std::isfinite(k))
    throw argument_error("deltaw::train::cbq_cfp_truncate: the IQR factor must be finite and > 0; got " +
                         std::to_string(k));
  dense<T> out(W.rows(), W.cols());
  std::vector<double> a(static_cast<std::size_t>(W.cols()));
  for (index_t i = 0; i < W.rows(); ++i) {
    for (index_t j = 0; j < W.cols(); ++j) {
      out(i, j) = W(i, j);
      a[std::size_t(j)] = std::abs(double(W(i, j)));
    }
    std::sort(a.begin(), a.end());
    const auto quantile = [&](double p) {  // linear interpolation between order statistics
      const double x = p * double(a.size() - 1);
      const std::size_t lo = std::size_t(x);
      return lo + 1 < a.size() ? a[lo] + (x - double(lo)) * (a[lo + 1] - a[lo]) : a[lo];
    };
    if (a.size() < 4) continue;
    const double q1 = quantile(0.25), q3 = quantile(0.75), coarse = q3 + k * (q3 - q1);
    const std::size_t first = std::size_t(std::upper_bound(a.begin(), a.end(), coarse) - a.begin());
    if (first == a.size()) continue;  // no candidates
    // Fine: keep a[0 … m), truncate a[m …) for m in [first, n]; minimise the within-set sum of
    // squares (prefix sums; m = n keeps everything).
    const std::size_t n = a.size();
    std::vector<double> s1(n + 1, 0), s2(n + 1, 0);
    for (std::size_t j = 0; j < n; ++j) {
      s1[j + 1] = s1[j] + a[j];
      s2[j + 1] = s2[j] + a[j] * a[j];
    }
    const auto ss = [&](std::size_t b, std::size_t e) {  // Σ (a − mean)² over [b, e)
      if (e <= b) return 0.0;
      const double m1 = s1[e] - s1[b];
      return (s2[e] - s2[b]) - m1 * m1 / double(e - b);
    };
    std::size_t best = n;
    double best_ss = ss(0, n);
    for (std::size_t m = first; m < n; ++m)
      if (const double v = ss(0, m) + ss(m, n); v < best_ss) {
        best_ss = v;
        best = m;
      }
    if (best == n || best == 0) continue;
    const double t = a[best - 1];
    for (index_t j = 0; j < W.cols(); ++j)
      if (std::abs(double(out(i, j))) > t) out(i, j) = T(std::copysign(t, double(out(i, j))));
  }
  return out;
}

namespace cbq_detail {
template <class T>
void activate(dense<T>& y, cbq_activation a) {
  if (a == cbq_activation::relu) y = y.cwiseMax(T(0));
  if (a == cbq_activation::gelu)
    y = y.unaryExpr([](T v) { return T(0.5) * v * (T(1) + std::erf(v * T(std::numbers::sqrt2 / 2))); });
}
inline void check_options(const cbq_cross_block_options& o, const char* op) {
  if (o.bits < 2 || o.bits > 16)
    throw argument_error(std::string(op) + ": bits must lie in [2, 16]; got " + std::to_string(o.bits));
  if (o.rank < 1) throw rank_error(std::string(op) + ": rank must be ≥ 1; got " + std::to_string(o.rank));
  if (o.steps < 0 || o.batch_rows < 0) throw argument_error(std::string(op) + ": steps and batch_rows must be ≥ 0");
  if (!(o.lr > 0) || !std::isfinite(o.lr))
    throw argument_error(std::string(op) + ": lr must be finite and > 0; got " + std::to_string(o.lr));
  if (!(o.lambda >= 0) || !(o.beta_end >= 1) || !(o.beta_start >= 1) || !(o.warmup >= 0 && o.warmup <= 1))
    throw argument_error(std::string(op) + ": lambda must be ≥ 0, the betas ≥ 1 and warmup in [0, 1]");
  if (!(o.kl_weight >= 0) || !std::isfinite(o.kl_weight) || !(o.kl_temperature > 0) || !std::isfinite(o.kl_temperature))
    throw argument_error(std::string(op) + ": kl_weight must be ≥ 0 and kl_temperature > 0 (both finite)");
  if (o.cfp && (!(o.cfp_iqr_factor > 0) || !std::isfinite(o.cfp_iqr_factor)))
    throw argument_error(std::string(op) + ": cfp_iqr_factor must be finite and > 0; got " +
                         std::to_string(o.cfp_iqr_factor));
  check_step_options(o.step, op);
  (void)cbq_windows(1, o.window, o.overlap);  // window / overlap checks
}
}  // namespace cbq_detail

/// The quantisation state of a stack of blocks: per layer a quantiser (scales s₀ and zero
/// points from W), the rounding factors A₁, A₂ (AdaRound init, cbq_init_factors, seeded
/// per layer) and the step parameter θ (trainable iff o.step.learn).
template <class T>
class cbq_stack {
 public:
  cbq_stack(std::vector<cbq_block<T>> blocks, const cbq_cross_block_options& o) : blocks_(std::move(blocks)), o_(o) {
    constexpr const char* op = "deltaw::train::cbq_stack";
    cbq_detail::check_options(o, op);
    if (blocks_.empty()) throw argument_error(std::string(op) + ": there must be at least one block");
    q_.reserve(blocks_.size());
    for (std::size_t l = 0; l < blocks_.size(); ++l) {
      const auto& b = blocks_[l];
      const std::string at = std::string(op) + ": block " + std::to_string(l);
      if (l > 0 && b.weight.cols() != blocks_[l - 1].weight.rows())
        throw shape_error(at + " has W " + deltaw::detail::shape_str(b.weight.rows(), b.weight.cols()) +
                          " but block " + std::to_string(l - 1) + " outputs " + std::to_string(blocks_[l - 1].weight.rows()) +
                          " features");
      if (b.bias.size() != 0 && (b.bias.rows() != 1 || b.bias.cols() != b.weight.rows()))
        throw shape_error(at + ": the bias is " + deltaw::detail::shape_str(b.bias.rows(), b.bias.cols()) +
                          "; expected [1, " + std::to_string(b.weight.rows()) + "] or empty");
      if (b.residual && b.weight.rows() != b.weight.cols())
        throw shape_error(at + " is residual but W is " + deltaw::detail::shape_str(b.weight.rows(), b.weight.cols()) +
                          "; a residual block needs out == in");
      if (o.cfp) {  // the quantiser sees the truncated copy (kept alive here); y_fp uses b.weight
        truncated_.push_back(std::make_unique<dense<T>>(cbq_cfp_truncate(b.weight, o.cfp_iqr_factor)));
        q_.emplace_back(deltaw::view(std::as_const(*truncated_.back())), cbq_quant_options{o.bits, o.symmetric});
      } else {
        q_.emplace_back(b.weight, cbq_quant_options{o.bits, o.symmetric});
      }
      const auto& q = q_.back();
      const index_t r = std::min({o.rank, q.rows(), q.cols()});
      dense<T> a1, a2;
      cbq_init_factors(q, r, a1, a2, o.seed ^ (0x9e3779b97f4a7c15ULL * (l + 1)), o.init_iters, o.row_block);
      const std::string nm = "cbq." + std::to_string(l);
      A1_.push_back(std::make_unique<autograd::parameter<T>>(nm + ".A1", std::move(a1)));
      A2_.push_back(std::make_unique<autograd::parameter<T>>(nm + ".A2", std::move(a2)));
      th_.push_back(std::make_unique<autograd::parameter<T>>(nm + ".step", cbq_step_init(q, o.step)));
      th_.back()->set_trainable(o.step.learn);
    }
  }
  cbq_stack(const cbq_stack&) = delete;
  cbq_stack& operator=(const cbq_stack&) = delete;

  index_t size() const { return index_t(blocks_.size()); }
  index_t in_features() const { return blocks_.front().weight.cols(); }
  index_t out_features() const { return blocks_.back().weight.rows(); }
  const cbq_cross_block_options& options() const { return o_; }
  const cbq_block<T>& block(index_t l) const { return blocks_[std::size_t(l)]; }
  const cbq_quantizer<T>& quantizer(index_t l) const { return q_[std::size_t(l)]; }
  autograd::parameter<T>& A1(index_t l) { return *A1_[std::size_t(l)]; }
  autograd::parameter<T>& A2(index_t l) { return *A2_[std::size_t(l)]; }
  autograd::parameter<T>& step_parameter(index_t l) { return *th_[std::size_t(l)]; }
  const autograd::parameter<T>& A1(index_t l) const { return *A1_[std::size_t(l)]; }
  const autograd::parameter<T>& A2(index_t l) const { return *A2_[std::size_t(l)]; }
  const autograd::parameter<T>& step_parameter(index_t l) const { return *th_[std::size_t(l)]; }
  /// The current steps s [out, 1] of layer l.
  dense<T> steps(index_t l) const { return cbq_steps(quantizer(l), step_parameter(l).value(), o_.step); }

  /// Blocks [first, last] with soft quantised weights, on the tape.
  autograd::var<T> forward_soft(autograd::tape<T>& t, const autograd::var<T>& x, index_t first, index_t last) {
    check_range(first, last, "forward_soft");
    autograd::var<T> h = x;
    for (index_t l = first; l <= last; ++l) {
      const auto& b = block(l);
      auto y = cbq_linear_lsq(h, t.param(A1(l)), t.param(A2(l)), t.param(step_parameter(l)), quantizer(l), o_.step,
                              o_.row_block);
      y = post(t, h, y, b);
      h = y;
    }
    return h;
  }

  /// The window objective ‖f̂(x) − y‖²_F / n + λ·Σ_l reg_β(A₁ˡ, A₂ˡ) over blocks [first, last]
  /// (no regulariser when beta = 0 or λ = 0). x [n, in of `first`], y [n, out of `last`].
  autograd::var<T> window_objective(autograd::tape<T>& t, const dense<T>& x, const dense<T>& y, index_t first,
                                    index_t last, double beta) {
    constexpr const char* op = "deltaw::train::cbq_stack::window_objective";
    check_range(first, last, "window_objective");
    if (x.cols() != block(first).weight.cols() || y.cols() != block(last).weight.rows() || x.rows() != y.rows() ||
        x.rows() < 1)
      throw shape_error(std::string(op) + ": x is " + deltaw::detail::shape_str(x.rows(), x.cols()) + " and y is " +
                        deltaw::detail::shape_str(y.rows(), y.cols()) + "; expected [n ≥ 1, " +
                        std::to_string(block(first).weight.cols()) + "] and [n, " +
                        std::to_string(block(last).weight.rows()) + "]");
    if (beta != 0 && !(beta >= 1))
      throw argument_error(std::string(op) + ": beta must be 0 (off) or ≥ 1; got " + std::to_string(beta));
    autograd::var<T> h = t.frozen(x, "window input");
    std::vector<autograd::var<T>> a1s, a2s;
    for (index_t l = first; l <= last; ++l) {
      auto a1 = t.param(A1(l)), a2 = t.param(A2(l));
      auto yl = cbq_linear_lsq(h, a1, a2, t.param(step_parameter(l)), quantizer(l), o_.step, o_.row_block);
      h = post(t, h, yl, block(l));
      a1s.push_back(a1);
      a2s.push_back(a2);
    }
    // mse averages over n·out entries; × out gives ‖·‖²_F / n.
    auto loss = autograd::scale(autograd::mse(h, t.frozen(y, "window target")), double(y.cols()));
    if (o_.kl_weight > 0)
      loss = autograd::add(loss, autograd::scale(autograd::softmax_kl(h, y, o_.kl_temperature), o_.kl_weight));
    if (beta > 0 && o_.lambda > 0)
      for (index_t l = first; l <= last; ++l)
        loss = autograd::add(loss, autograd::scale(cbq_rounding_regularizer(a1s[std::size_t(l - first)],
                                                                            a2s[std::size_t(l - first)], quantizer(l),
                                                                            beta, o_.row_block),
                                                   o_.lambda));
    return loss;
  }

  /// Blocks [first, last] in full precision (first = last + 1: x itself).
  dense<T> forward_full_precision(const dense<T>& x, index_t first, index_t last) const {
    dense<T> ws;
    return forward_span(x, first, last, "forward_full_precision", [&](const dense<T>& h, index_t l) {
      return dense<T>(h * autograd::detail::map_view(block(l).weight, ws).transpose());
    });
  }
  /// Blocks [first, last] with the hard-rounded weights of the current factors and steps.
  dense<T> forward_hard(const dense<T>& x, index_t first, index_t last) const {
    return forward_span(x, first, last, "forward_hard", [&](const dense<T>& h, index_t l) {
      return cbq_detail::hard_apply(quantizer(l), steps(l), o_.step.grad, &A1(l).value(), &A2(l).value(), h,
                                    o_.row_block, false);
    });
  }
  /// Blocks [first, last] rounded to nearest at the initial steps s₀ (the baseline).
  dense<T> forward_rtn(const dense<T>& x, index_t first, index_t last) const {
    return forward_span(x, first, last, "forward_rtn", [&](const dense<T>& h, index_t l) {
      return cbq_detail::hard_apply(quantizer(l), quantizer(l).scales(), o_.step.grad,
                                    static_cast<const dense<T>*>(nullptr), static_cast<const dense<T>*>(nullptr), h,
                                    o_.row_block, true);
    });
  }
  /// The hard codes [out, in] of layer l (dense, by name): clamp(b(s) + [h ≥ ½]).
  cbq_codes codes_dense(index_t l) const {
    const auto& q = quantizer(l);
    const dense<T> s = steps(l);
    const dense<T> V = A1(l).value() * A2(l).value();  // [out, in]: the codes are as large
    cbq_codes c(q.rows(), q.cols());
    for (index_t i = 0; i < q.rows(); ++i)
      for (index_t j = 0; j < q.cols(); ++j) {
        if (q.degenerate(i)) {
          c(i, j) = std::int32_t(q.zero_points()(i, 0));
          continue;
        }
        const T b = o_.step.grad == cbq_step_grad::lsq ? std::floor(q.weight()(i, j) / s(i, 0)) + q.zero_points()(i, 0)
                                                        : q.base(i, j);
        c(i, j) = std::int32_t(q.clamp_code(b + (cbq_detail::rect_sigmoid(V(i, j)) >= T(0.5) ? T(1) : T(0))));
      }
    return c;
  }

 private:
  void check_range(index_t first, index_t last, const char* fn) const {
    if (first < 0 || last < first || last >= size())
      throw argument_error(std::string("deltaw::train::cbq_stack::") + fn + ": blocks [" + std::to_string(first) + ", " +
                           std::to_string(last) + "] are not a range of the " + std::to_string(size()) + " blocks");
  }
  /// An empty span (first = last + 1) is allowed for the dense forwards; x is checked too.
  void check_span(const dense<T>& x, index_t first, index_t last, const char* fn) const {
    if (!(first == last + 1 && first >= 0 && first <= size())) check_range(first, last, fn);
    if (first <= last && x.cols() != block(first).weight.cols())
      throw shape_error(std::string("deltaw::train::cbq_stack::") + fn + ": x is " +
                        deltaw::detail::shape_str(x.rows(), x.cols()) + " but block " + std::to_string(first) +
                        " takes " + std::to_string(block(first).weight.cols()) + " features");
  }
  autograd::var<T> post(autograd::tape<T>& t, const autograd::var<T>& x, autograd::var<T> y, const cbq_block<T>& b) {
    if (b.bias.size() != 0) y = autograd::add_bias(y, t.frozen(b.bias, "bias"));
    if (b.act == cbq_activation::relu) y = autograd::relu(y);
    if (b.act == cbq_activation::gelu) y = autograd::gelu(y);
    if (b.residual) y = autograd::add(x, y);
    return y;
  }
  /// Blocks [first, last] through `linear(h, l)` (the layer's product), then each block's bias,
  /// activation and residual.
  template <class Linear>
  dense<T> forward_span(const dense<T>& x, index_t first, index_t last, const char* what, Linear&& linear) const {
    check_span(x, first, last, what);
    dense<T> h = x;
    for (index_t l = first; l <= last; ++l) {
      dense<T> y = linear(h, l);
      h = finish(h, y, block(l));
    }
    return h;
  }
  static dense<T> finish(const dense<T>& x, dense<T>& y, const cbq_block<T>& b) {
    if (b.bias.size() != 0) y.rowwise() += b.bias.row(0);
    cbq_detail::activate(y, b.act);
    if (b.residual) y += x;
    return std::move(y);
  }

  std::vector<cbq_block<T>> blocks_;
  cbq_cross_block_options o_;
  std::vector<std::unique_ptr<dense<T>>> truncated_;  // CFP's weights, which q_ views
  std::vector<cbq_quantizer<T>> q_;
  std::vector<std::unique_ptr<autograd::parameter<T>>> A1_, A2_, th_;
};

template <class T>
struct cbq_block_result {
  cbq_codes codes;          // [out, in] integers in [qmin, qmax] (the quantised layer)
  dense<T> scales;          // [out, 1] the learned steps s (s₀ when steps are not learned)
  dense<T> initial_scales;  // [out, 1] s₀
  dense<T> zero_points;     // [out, 1]
  int qmin = 0, qmax = 0;
  dense<T> A1, A2;
};

template <class T>
struct cbq_cross_block_result {
  std::vector<cbq_block_result<T>> blocks;
  std::vector<std::pair<index_t, index_t>> windows;
  std::vector<double> window_loss_first;  // soft reconstruction term at each window's first step
  std::vector<double> window_loss_last;   // … and at its last step
  double error = 0;      // ‖f(X) − f̂(X)‖²_F / n at the stack's output, hard-rounded
  double rtn_error = 0;  // the same for round-to-nearest at s₀
};

/// CBQ over a stack of blocks on calibration inputs X [n, in]: windows of o.window blocks
/// (cbq_windows), in each AdamW on the window objective (cbq_stack::window_objective) over
/// the window's factors and (if o.step.learn) step parameters, then hard rounding.
/// Deterministic given the seed.
template <class T>
cbq_cross_block_result<T> cbq_reconstruct_blocks(std::vector<cbq_block<T>> blocks, matrix_view<const T> X,
                                                 const cbq_cross_block_options& o) {
  constexpr const char* op = "deltaw::train::cbq_reconstruct_blocks";
  cbq_stack<T> st(std::move(blocks), o);
  if (X.cols() != st.in_features() || X.rows() < 1)
    throw shape_error(std::string(op) + ": X is " + deltaw::detail::shape_str(X.rows(), X.cols()) +
                      " but the first block takes " + std::to_string(st.in_features()) + " features");
  dense<T> xs;
  const dense<T> Xd = autograd::detail::map_view(X, xs);
  if (!Xd.allFinite()) throw non_finite_error(std::string(op) + ": X has a non-finite entry");
  const index_t L = st.size(), n = Xd.rows();
  std::vector<dense<T>> fp(std::size_t(L + 1));  // full-precision activations
  fp[0] = Xd;
  for (index_t l = 0; l < L; ++l) fp[std::size_t(l + 1)] = st.forward_full_precision(fp[std::size_t(l)], l, l);
  cbq_cross_block_result<T> res;
  res.windows = cbq_windows(L, o.window, o.overlap);
  cbq_reconstruct_options sched;
  sched.steps = o.steps;
  sched.warmup = o.warmup;
  sched.beta_start = o.beta_start;
  sched.beta_end = o.beta_end;
  std::mt19937_64 gen(o.seed);
  const bool sample = o.batch_rows > 0 && o.batch_rows < n;
  for (const auto& [first, last] : res.windows) {
    const dense<T> xin = o.input == cbq_window_input::quantized ? st.forward_hard(Xd, 0, first - 1)
                                                                 : fp[std::size_t(first)];
    const dense<T>& yref = fp[std::size_t(last + 1)];
    std::vector<autograd::parameter<T>*> ps;
    for (index_t l = first; l <= last; ++l) {
      ps.push_back(&st.A1(l));
      ps.push_back(&st.A2(l));
      if (o.step.learn) ps.push_back(&st.step_parameter(l));
    }
    optim::adamw<T> opt(ps, {.lr = o.lr, .weight_decay = o.weight_decay});
    if (o.step.learn)
      for (index_t l = first; l <= last; ++l) opt.set_lr_scale(&st.step_parameter(l), o.step.lr_scale);
    dense<T> Xb, Yb;
    double first_loss = 0, last_loss = 0;
    for (index_t step = 0; step < o.steps; ++step) {
      if (sample) {
        Xb.resize(o.batch_rows, xin.cols());
        Yb.resize(o.batch_rows, yref.cols());
        for (index_t k = 0; k < o.batch_rows; ++k) {
          const index_t r = index_t(gen() % std::uint64_t(n));
          Xb.row(k) = xin.row(r);
          Yb.row(k) = yref.row(r);
        }
      }
      for (auto* p : ps) p->zero_grad();
      autograd::tape<T> t;
      const double beta = o.lambda > 0 ? cbq_beta_at(sched, step) : 0.0;
      auto recon = st.window_objective(t, sample ? Xb : xin, sample ? Yb : yref, first, last, 0.0);
      last_loss = double(recon.value()(0, 0));
      if (step == 0) first_loss = last_loss;
      auto loss = recon;
      if (beta > 0)
        for (index_t l = first; l <= last; ++l)
          loss = autograd::add(loss, autograd::scale(cbq_rounding_regularizer(t.param(st.A1(l)), t.param(st.A2(l)),
                                                                              st.quantizer(l), beta, o.row_block),
                                                     o.lambda));
      t.backward(loss);
      opt.step();
      if (o.step.learn && o.step.param == cbq_step_param::clamped)
        for (index_t l = first; l <= last; ++l)
          st.step_parameter(l).value() = st.step_parameter(l).value().cwiseMax(T(o.step.min_ratio));
    }
    res.window_loss_first.push_back(first_loss);
    res.window_loss_last.push_back(last_loss);
  }
  for (index_t l = 0; l < L; ++l) {
    cbq_block_result<T> b;
    b.codes = st.codes_dense(l);
    b.scales = st.steps(l);
    b.initial_scales = st.quantizer(l).scales();
    b.zero_points = st.quantizer(l).zero_points();
    b.qmin = st.quantizer(l).qmin();
    b.qmax = st.quantizer(l).qmax();
    b.A1 = st.A1(l).value();
    b.A2 = st.A2(l).value();
    res.blocks.push_back(std::move(b));
  }
  const dense<T>& yfp = fp[std::size_t(L)];
  res.error = double((st.forward_hard(Xd, 0, L - 1) - yfp).squaredNorm()) / double(n);
  res.rtn_error = double((st.forward_rtn(Xd, 0, L - 1) - yfp).squaredNorm()) / double(n);
  return res;
}

}  // namespace train
DELTAW_NAMESPACE_END
