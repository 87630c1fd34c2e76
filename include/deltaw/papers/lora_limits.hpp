// SPDX-License-Identifier: MIT
// "Computational Limits of Low-Rank Adaptation (LoRA) for Transformer-Based Models":
// (1) the norm quantities the efficiency threshold is stated in, for one attention layer
//     with LoRA on W_Q, W_K, W_V (W* = W + s·B·A), and a monitor that records them during
//     training; (2) the LoRA gradient of attention computed through chained low-rank
//     approximations (partial: W_Q and W_V adapted; full: W_Q, W_K, W_V), next to the exact
//     gradient through the dense n×n attention matrix.
//
// The setting (single head, as in the paper's analysis): X [n, d_in], Q = X·W_Q*ᵀ,
// K = X·W_K*ᵀ, V = X·W_V*ᵀ, P = softmax(β·Q·Kᵀ) row-wise, O = P·V and the loss
// L = ½‖O − Y‖²_F for a target Y [n, d_v].
//
// The threshold. The paper's result (after Alman & Song's bounded-entries theorem) is
// that almost-linear-time approximate gradients exist when the entries that enter exp()
// are bounded by Γ = o(√log n) and not (under SETH) when Γ = Ω(√log n); Γ is stated in
// norms of products of X, W* and αBA/r. Which norm, and the constant in front of √log n,
// are UNVERIFIED here (shared/METHODS.md has only the sentence above), so both are options
// (threshold_options): `entries` takes Γ = √β·max(‖Q‖_max, ‖K‖_max) (the entries of the
// products X·W*ᵀ, scale split between Q and K); `norm_product` takes the upper bound
// Γ = √β·‖X‖_{2→∞}·max(‖W_Q*‖₂, ‖W_K*‖₂) from the norms of the factors; the threshold is
// κ·√(ln n) with κ an option (default 1). Every quantity is reported, whatever the choice.
//
// The approximation. exp(⟨q, k⟩) ≈ Σ_{m ≤ g} ⟨q, k⟩^m/m! = ⟨φ(q), φ(k)⟩ with φ the
// monomials q^α/√α! (|α| ≤ g), C(d + g, g) features: the polynomial method of the
// paper's upper bound. With Φ_q = φ(√β·Q), Φ_k = φ(√β·K) [n, k], P̂ = D̂⁻¹·Φ_q·Φ_kᵀ is never
// formed: O, dV, the row terms r = rowsum(P̂ ⊙ G·Vᵀ) and the Hadamard products
// (P̂ ⊙ G·Vᵀ)·K, (P̂ ⊙ G·Vᵀ)ᵀ·Q are chained through [k, d] products, O(n·k·d²) instead of
// O(n²·d). The truncation error is small only while the entries β·qᵢ·kⱼ are: the regime
// below the threshold (the error is reported by the tests, the example and the benchmark).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "../core/eigen.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"

DELTAW_NAMESPACE_BEGIN
namespace papers {
namespace lora_limits {

/// One projection W* = W + s·B·A (B [out, r], A [r, in]); B and A empty: no adapter.
template <class T>
struct lora_projection {
  matrix_view<const T> W;
  matrix_view<const T> B;
  matrix_view<const T> A;
  double s = 0;
  bool adapted() const { return B.rows() > 0 && A.rows() > 0; }
};

template <class T>
struct attention_layer {
  lora_projection<T> q, k, v;
};

enum class gamma_kind {
  entries,       ///< Γ = √β·max(‖Q‖_max, ‖K‖_max)
  norm_product,  ///< Γ = √β·‖X‖_{2→∞}·max(‖W_Q*‖₂, ‖W_K*‖₂)
};

struct threshold_options {
  gamma_kind kind = gamma_kind::entries;
  double kappa = 1.0;   ///< threshold κ·√(ln n) (UNVERIFIED constant)
  double beta = -1;     ///< logit scale; < 0: 1/√d with d the columns of Q
  int power_iterations = 30;
};

/// The norms of one layer for one batch X.
struct layer_norms {
  index_t n = 0, d = 0;
  double beta = 0;
  double x_max = 0;       ///< ‖X‖_max
  double x_row = 0;       ///< ‖X‖_{2→∞} (largest row norm)
  double w_spec[3] = {};  ///< ‖W‖₂ of Q, K, V
  double delta_spec[3] = {};  ///< ‖s·B·A‖₂ of Q, K, V (0 without adapter)
  double wstar_spec[3] = {};  ///< ‖W + s·B·A‖₂ of Q, K, V
  double out_max[3] = {};     ///< ‖X·W*ᵀ‖_max: Q, K, V
  double out_row[3] = {};     ///< ‖X·W*ᵀ‖_{2→∞}
  double logit_bound = 0;     ///< β·max‖qᵢ‖·max‖kⱼ‖ ≥ max |β·qᵢ·kⱼ|
  double gamma = 0;           ///< per threshold_options::kind
  double threshold = 0;       ///< κ·√(ln n)
  bool below = false;         ///< gamma < threshold
};

namespace detail {
template <class T>
Eigen::Map<const dense<T>, Eigen::Unaligned, Eigen::OuterStride<>> rowmajor(const matrix_view<const T>& v, const char* what) {
  if (v.rows() > 1 && v.cols() > 1 && v.col_stride() != 1)
    throw layout_error(std::string("deltaw::papers::lora_limits: ") + what + " must be row-major (unit column stride)");
  const index_t os = v.rows() <= 1 ? std::max<index_t>(v.cols(), 1) : v.row_stride();
  return {v.data(), v.rows(), v.cols(), Eigen::OuterStride<>(os)};
}
/// Z = X·W*ᵀ = X·Wᵀ + s·(X·Aᵀ)·Bᵀ, never forming W*.
template <class T>
dense<T> project(const dense<T>& X, const lora_projection<T>& p, const char* what) {
  if (p.W.cols() != X.cols())
    throw shape_error(std::string("deltaw::papers::lora_limits: X is ") + deltaw::detail::shape_str(X.rows(), X.cols()) +
                      " but " + what + "'s W is " + deltaw::detail::shape_str(p.W.rows(), p.W.cols()));
  dense<T> Z = X * rowmajor(p.W, "W").transpose();
  if (p.adapted()) {
    if (p.B.rows() != p.W.rows() || p.A.cols() != p.W.cols() || p.B.cols() != p.A.rows())
      throw shape_error(std::string("deltaw::papers::lora_limits: ") + what + ": W " +
                        deltaw::detail::shape_str(p.W.rows(), p.W.cols()) + ", B " + deltaw::detail::shape_str(p.B.rows(), p.B.cols()) +
                        ", A " + deltaw::detail::shape_str(p.A.rows(), p.A.cols()) + " do not form W + s·B·A");
    const dense<T> XA = X * rowmajor(p.A, "A").transpose();
    Z.noalias() += T(p.s) * (XA * rowmajor(p.B, "B").transpose());
  }
  return Z;
}
/// ‖M‖₂ by power iteration on MᵀM, M given by its products (never formed).
template <class T, class Mv, class Mtv>
double spectral(index_t cols, Mv mv, Mtv mtv, int iters) {
  if (cols == 0) return 0;
  Eigen::Matrix<double, Eigen::Dynamic, 1> x(cols);
  for (index_t i = 0; i < cols; ++i) x[i] = 1.0 + 0.01 * double(i % 7);  // deterministic, not orthogonal to much
  x.normalize();
  double s = 0;
  for (int it = 0; it < iters; ++it) {
    const Eigen::Matrix<double, Eigen::Dynamic, 1> y = mv(x);
    Eigen::Matrix<double, Eigen::Dynamic, 1> z = mtv(y);
    const double nz = z.norm();
    s = std::sqrt(nz);
    if (nz == 0) return 0;
    x = z / nz;
  }
  return s;
}
template <class T>
double spectral_of(const lora_projection<T>& p, bool with_W, bool with_delta, int iters) {
  const auto W = rowmajor(p.W, "W");
  const bool d = with_delta && p.adapted();
  const auto B = rowmajor(p.B, "B");
  const auto A = rowmajor(p.A, "A");
  using Vec = Eigen::Matrix<double, Eigen::Dynamic, 1>;
  auto mv = [&](const Vec& x) {
    Vec y = Vec::Zero(W.rows());
    if (with_W) y += W.template cast<double>() * x;
    if (d) y += p.s * (B.template cast<double>() * (A.template cast<double>() * x));
    return y;
  };
  auto mtv = [&](const Vec& y) {
    Vec x = Vec::Zero(W.cols());
    if (with_W) x += W.template cast<double>().transpose() * y;
    if (d) x += p.s * (A.template cast<double>().transpose() * (B.template cast<double>().transpose() * y));
    return x;
  };
  if (!with_W && !d) return 0;
  return spectral<T>(W.cols(), mv, mtv, iters);
}
template <class M>
double max_row_norm(const M& m) {
  double r = 0;
  for (index_t i = 0; i < m.rows(); ++i) r = std::max(r, double(m.row(i).template cast<double>().norm()));
  return r;
}
}  // namespace detail

/// The norms of one attention layer on a batch X [n, d_in] (never forms an n×n or W*).
template <class T>
layer_norms measure(const dense<T>& X, const attention_layer<T>& L, const threshold_options& o = {}) {
  layer_norms r;
  r.n = X.rows();
  const lora_projection<T>* ps[3] = {&L.q, &L.k, &L.v};
  const char* names[3] = {"W_Q", "W_K", "W_V"};
  dense<T> Z[3];
  for (int i = 0; i < 3; ++i) Z[i] = detail::project(X, *ps[i], names[i]);
  if (Z[0].cols() != Z[1].cols())
    throw shape_error("deltaw::papers::lora_limits::measure: Q has " + std::to_string(Z[0].cols()) + " columns but K has " +
                      std::to_string(Z[1].cols()));
  r.d = Z[0].cols();
  r.beta = o.beta < 0 ? (r.d > 0 ? 1.0 / std::sqrt(double(r.d)) : 1.0) : o.beta;
  r.x_max = X.size() ? double(X.cwiseAbs().maxCoeff()) : 0.0;
  r.x_row = detail::max_row_norm(X);
  for (int i = 0; i < 3; ++i) {
    r.w_spec[i] = detail::spectral_of(*ps[i], true, false, o.power_iterations);
    r.delta_spec[i] = detail::spectral_of(*ps[i], false, true, o.power_iterations);
    r.wstar_spec[i] = detail::spectral_of(*ps[i], true, true, o.power_iterations);
    r.out_max[i] = Z[i].size() ? double(Z[i].cwiseAbs().maxCoeff()) : 0.0;
    r.out_row[i] = detail::max_row_norm(Z[i]);
  }
  r.logit_bound = r.beta * r.out_row[0] * r.out_row[1];
  const double sb = std::sqrt(r.beta);
  r.gamma = o.kind == gamma_kind::entries ? sb * std::max(r.out_max[0], r.out_max[1])
                                          : sb * r.x_row * std::max(r.wstar_spec[0], r.wstar_spec[1]);
  r.threshold = o.kappa * std::sqrt(std::log(std::max<double>(double(r.n), 2.0)));
  r.below = r.gamma < r.threshold;
  return r;
}

/// Records layer_norms as training goes (call it on the batch of a step).
class norm_monitor {
 public:
  struct record {
    std::int64_t step;
    layer_norms norms;
  };
  explicit norm_monitor(threshold_options o = {}) : o_(o) {}
  template <class T>
  const layer_norms& operator()(std::int64_t step, const dense<T>& X, const attention_layer<T>& L) {
    records_.push_back({step, measure(X, L, o_)});
    return records_.back().norms;
  }
  const std::vector<record>& records() const { return records_; }
  /// The first step at which Γ reached the threshold (−1: never).
  std::int64_t first_crossing() const {
    for (const auto& r : records_)
      if (!r.norms.below) return r.step;
    return -1;
  }
  const threshold_options& options() const { return o_; }

 private:
  threshold_options o_;
  std::vector<record> records_;
};

// ---------------------------------------------------------------------------------------
// Gradients.

struct gradient_options {
  bool full = false;  ///< false: W_Q and W_V (partial); true: W_Q, W_K, W_V
  int degree = 2;     ///< Taylor degree g of the polynomial kernel (chained version)
  double beta = -1;   ///< < 0: 1/√d
};

/// The loss and the gradients of the LoRA factors (empty for projections not adapted or,
/// in partial mode, for K).
template <class T>
struct lora_gradients {
  double loss = 0;
  dense<T> O;
  dense<T> dB[3], dA[3];  ///< Q, K, V
};

/// Monomials q^α/√α! with |α| ≤ g: each feature is a parent feature times one coordinate.
struct polynomial_features {
  index_t d = 0;
  int degree = 0;
  std::vector<index_t> parent, var;  ///< feature j = feature parent[j] · x[var[j]] (feature 0 = 1)
  std::vector<double> coef;          ///< 1/√α!
  index_t size() const { return index_t(parent.size()); }
};

inline polynomial_features make_polynomial_features(index_t d, int degree) {
  if (d < 1 || degree < 0)
    throw argument_error("deltaw::papers::lora_limits::make_polynomial_features: need d ≥ 1 and degree ≥ 0; got d = " +
                         std::to_string(d) + ", degree = " + std::to_string(degree));
  polynomial_features f;
  f.d = d;
  f.degree = degree;
  std::vector<index_t> last{-1};     // the largest coordinate in each feature's monomial
  std::vector<index_t> mult_last{0};  // multiplicity of that coordinate
  f.parent.push_back(-1);
  f.var.push_back(-1);
  f.coef.push_back(1.0);
  std::vector<index_t> level{0};
  for (int m = 1; m <= degree; ++m) {
    std::vector<index_t> next;
    for (index_t p : level)
      for (index_t v = std::max<index_t>(last[std::size_t(p)], 0); v < d; ++v) {
        const index_t mult = v == last[std::size_t(p)] ? mult_last[std::size_t(p)] + 1 : 1;
        f.parent.push_back(p);
        f.var.push_back(v);
        f.coef.push_back(f.coef[std::size_t(p)] / std::sqrt(double(mult)));  // α! gains a factor mult
        last.push_back(v);
        mult_last.push_back(mult);
        next.push_back(f.size() - 1);
      }
    level = std::move(next);
  }
  return f;
}

/// Φ [n, k]: the features of every row of Z (scaled by c first).
template <class T>
dense<T> feature_map(const polynomial_features& f, const dense<T>& Z, double c) {
  if (Z.cols() != f.d)
    throw shape_error("deltaw::papers::lora_limits::feature_map: rows have " + std::to_string(Z.cols()) +
                      " entries; the features were made for " + std::to_string(f.d));
  const index_t k = f.size();
  dense<T> raw(Z.rows(), k), out(Z.rows(), k);
  for (index_t i = 0; i < Z.rows(); ++i) {
    raw(i, 0) = T(1);
    for (index_t j = 1; j < k; ++j) raw(i, j) = raw(i, f.parent[std::size_t(j)]) * T(c) * Z(i, f.var[std::size_t(j)]);
    for (index_t j = 0; j < k; ++j) out(i, j) = raw(i, j) * T(f.coef[std::size_t(j)]);
  }
  return out;
}

namespace detail {
template <class T>
void check_gradient_inputs(const dense<T>& X, const dense<T>& Y, const dense<T>& V, const char* op) {
  if (Y.rows() != X.rows() || Y.cols() != V.cols())
    throw shape_error(std::string("deltaw::papers::lora_limits::") + op + ": Y is " + deltaw::detail::shape_str(Y.rows(), Y.cols()) +
                      "; expected " + deltaw::detail::shape_str(X.rows(), V.cols()));
}
/// dB = s·dZᵀ·(X·Aᵀ), dA = s·(dZ·B)ᵀ·X for Z = X·(W + s·B·A)ᵀ.
template <class T>
void lora_factor_grads(const dense<T>& X, const dense<T>& dZ, const lora_projection<T>& p, dense<T>& dB, dense<T>& dA) {
  if (!p.adapted()) return;
  const auto A = rowmajor(p.A, "A");
  const auto B = rowmajor(p.B, "B");
  const dense<T> XA = X * A.transpose();
  dB = T(p.s) * (dZ.transpose() * XA);
  const dense<T> dZB = dZ * B;
  dA = T(p.s) * (dZB.transpose() * X);
}
template <class T>
double beta_of(double b, index_t d) {
  return b < 0 ? 1.0 / std::sqrt(double(std::max<index_t>(d, 1))) : b;
}
}  // namespace detail

/// The loss and gradients through the dense n×n attention matrix (materialises P; the
/// reference). With `taylor` the attention is the polynomial kernel's P̂ = D̂⁻¹·Φ_q·Φ_kᵀ
/// (the same approximation the chained version computes without forming it).
template <class T>
lora_gradients<T> attention_lora_grad_dense(const dense<T>& X, const dense<T>& Y, const attention_layer<T>& L,
                                            const gradient_options& o = {}, bool taylor = false) {
  const dense<T> Q = detail::project(X, L.q, "W_Q"), K = detail::project(X, L.k, "W_K"), V = detail::project(X, L.v, "W_V");
  detail::check_gradient_inputs(X, Y, V, "attention_lora_grad_dense");
  const double beta = detail::beta_of<T>(o.beta, Q.cols());
  dense<T> P;
  if (taylor) {
    const auto f = make_polynomial_features(Q.cols(), o.degree);
    const dense<T> Fq = feature_map(f, Q, std::sqrt(beta)), Fk = feature_map(f, K, std::sqrt(beta));
    P = Fq * Fk.transpose();
  } else {
    P = T(beta) * (Q * K.transpose());
    for (index_t i = 0; i < P.rows(); ++i) {
      const T m = P.row(i).maxCoeff();
      P.row(i) = (P.row(i).array() - m).exp().matrix();
    }
  }
  for (index_t i = 0; i < P.rows(); ++i) P.row(i) /= P.row(i).sum();
  lora_gradients<T> g;
  g.O = P * V;
  const dense<T> G = g.O - Y;
  g.loss = 0.5 * double(G.template cast<double>().squaredNorm());
  const dense<T> dV = P.transpose() * G;
  dense<T> dS = G * V.transpose();  // dP
  for (index_t i = 0; i < dS.rows(); ++i) {
    const T r = P.row(i).dot(dS.row(i));
    dS.row(i) = P.row(i).cwiseProduct((dS.row(i).array() - r).matrix());
  }
  const dense<T> dQ = T(beta) * (dS * K);
  detail::lora_factor_grads(X, dQ, L.q, g.dB[0], g.dA[0]);
  detail::lora_factor_grads(X, dV, L.v, g.dB[2], g.dA[2]);
  if (o.full) {
    const dense<T> dK = T(beta) * (dS.transpose() * Q);
    detail::lora_factor_grads(X, dK, L.k, g.dB[1], g.dA[1]);
  }
  return g;
}

/// The loss alone through the dense attention (for finite differences).
template <class T>
double attention_lora_loss_dense(const dense<T>& X, const dense<T>& Y, const attention_layer<T>& L, double beta = -1) {
  const dense<T> Q = detail::project(X, L.q, "W_Q"), K = detail::project(X, L.k, "W_K"), V = detail::project(X, L.v, "W_V");
  detail::check_gradient_inputs(X, Y, V, "attention_lora_loss_dense");
  const double b = detail::beta_of<T>(beta, Q.cols());
  dense<T> P = T(b) * (Q * K.transpose());
  for (index_t i = 0; i < P.rows(); ++i) {
    const T m = P.row(i).maxCoeff();
    P.row(i) = (P.row(i).array() - m).exp().matrix();
    P.row(i) /= P.row(i).sum();
  }
  return 0.5 * double((P * V - Y).template cast<double>().squaredNorm());
}

/// The loss and LoRA gradients through chained low-rank factors: O(n·k·d²) with k the
/// number of polynomial features, no n×n matrix.
template <class T>
lora_gradients<T> attention_lora_grad_chained(const dense<T>& X, const dense<T>& Y, const attention_layer<T>& L,
                                              const gradient_options& o = {}) {
  const dense<T> Q = detail::project(X, L.q, "W_Q"), K = detail::project(X, L.k, "W_K"), V = detail::project(X, L.v, "W_V");
  detail::check_gradient_inputs(X, Y, V, "attention_lora_grad_chained");
  const double beta = detail::beta_of<T>(o.beta, Q.cols());
  const auto f = make_polynomial_features(Q.cols(), o.degree);
  const dense<T> Fq = feature_map(f, Q, std::sqrt(beta)), Fk = feature_map(f, K, std::sqrt(beta));
  const index_t n = X.rows(), dv = V.cols(), dk = Q.cols();
  using vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  const vec ks = Fk.colwise().sum().transpose();  // Φ_kᵀ·1
  const vec D = Fq * ks;                           // row sums of Φ_q·Φ_kᵀ
  for (index_t i = 0; i < n; ++i)
    if (!(D[i] > T(0)))
      throw argument_error("deltaw::papers::lora_limits::attention_lora_grad_chained: the degree-" + std::to_string(o.degree) +
                          " kernel's row sum for token " + std::to_string(i) +
                          " is not positive (entries far above the threshold; raise the degree or use the exact gradient)");
  const vec Dinv = D.cwiseInverse();
  lora_gradients<T> g;
  const dense<T> kv = Fk.transpose() * V;  // [k, dv]
  g.O = Dinv.asDiagonal() * (Fq * kv);
  const dense<T> G = g.O - Y;
  g.loss = 0.5 * double(G.template cast<double>().squaredNorm());
  const dense<T> GD = Dinv.asDiagonal() * G;  // D⁻¹G
  const dense<T> dV = Fk * (Fq.transpose() * GD);
  // r_i = Σ_j P̂_ij (G_i·V_j) = G_i·O_i
  const vec r = G.cwiseProduct(g.O).rowwise().sum();
  // dQ = β[(P̂ ⊙ G·Vᵀ)·K − diag(r)·P̂·K]
  const vec rD = -r.cwiseProduct(Dinv);
  dense<T> dQ = rD.asDiagonal() * (Fq * (Fk.transpose() * K));
  {
    dense<T> tmp(n, f.size());
    for (index_t b = 0; b < dv; ++b) {
      tmp = Fk.array().colwise() * V.col(b).array();
      const dense<T> Mb = tmp.transpose() * K;  // Σ_j Φ_k[j]·V_jb·K_j  [k, dk]
      const dense<T> FM = Fq * Mb;               // [n, dk]
      dQ += (GD.col(b)).asDiagonal() * FM;
    }
  }
  dQ *= T(beta);
  detail::lora_factor_grads(X, dQ, L.q, g.dB[0], g.dA[0]);
  detail::lora_factor_grads(X, dV, L.v, g.dB[2], g.dA[2]);
  if (o.full) {
    // dK = β[(P̂ ⊙ G·Vᵀ)ᵀ·Q − P̂ᵀ·diag(r)·Q]
    const dense<T> rQ = (r.cwiseProduct(Dinv)).asDiagonal() * Q;
    dense<T> dK = -(Fk * (Fq.transpose() * rQ));
    dense<T> tmp(n, f.size());
    for (index_t b = 0; b < dv; ++b) {
      tmp = Fq.array().colwise() * GD.col(b).array();
      const dense<T> Nb = tmp.transpose() * Q;  // Σ_i Φ_q[i]·G_ib/D_i·Q_i  [k, dk]
      const dense<T> FN = Fk * Nb;
      dK += V.col(b).asDiagonal() * FN;
    }
    dK *= T(beta);
    detail::lora_factor_grads(X, dK, L.k, g.dB[1], g.dA[1]);
  }
  (void)dk;
  return g;
}

/// max over the returned factor gradients of ‖a − b‖_F / ‖b‖_F.
template <class T>
double gradient_rel_error(const lora_gradients<T>& a, const lora_gradients<T>& b) {
  double e = 0;
  for (int i = 0; i < 3; ++i)
    for (const auto* pair : {&a.dB[i], &a.dA[i]}) {
      const dense<T>& x = *pair;
      const dense<T>& y = pair == &a.dB[i] ? b.dB[i] : b.dA[i];
      if (x.size() == 0 && y.size() == 0) continue;
      if (x.rows() != y.rows() || x.cols() != y.cols())
        throw shape_error("deltaw::papers::lora_limits::gradient_rel_error: the two gradient sets differ in shape");
      const double ny = double(y.template cast<double>().norm());
      const double d = double((x - y).template cast<double>().norm());
      e = std::max(e, ny == 0 ? d : d / ny);
    }
  return e;
}

}  // namespace lora_limits
}  // namespace papers
DELTAW_NAMESPACE_END
