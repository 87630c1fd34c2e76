// SPDX-License-Identifier: MIT
// LoRA3D (Lu et al., 2024): self-calibration of a 3-D point-map predictor. The predictor's
// per-view point maps, with its own confidences, are aligned into one scene by a robust
// global alignment whose IRLS re-weights each point's confidence with a robust kernel;
// the re-weighted ("calibrated") confidences select pseudo-labels (the aligned scene seen
// from each view), and a LoRA of the predictor is fine-tuned on them.
//
//   robust_rho, robust_weight     ρ(r) and the IRLS weight ψ(r) = ρ'(r)/r of each kernel
//   weighted_similarity           closed-form weighted Procrustes (Umeyama) in double
//   robust_align                  IRLS similarity fit: weights c_i·ψ(r_i), refit, repeat
//   align_views                   global alignment of K point maps (view 0 fixes the gauge)
//   pseudo_labels                 per-view targets and weights from the calibrated confidences
//   weighted_point_loss           Σ w_i‖y_i − t_i‖² / Σ w_i, an autograd op
//   predict_views, fine_tune      a point head (nn::linear with LoRA) on per-view features
//   synthetic_scene               a multi-view task with known ground truth (tests, example)
//
// Choices (the paper's exact settings are UNVERIFIED here; each is an option):
//  - kernel: Geman–McClure by default, ψ(r) = (μ/(μ + r²))² with μ = c² (the form the
//    paper writes for its confidence re-weighting); Huber and Cauchy as alternatives,
//    `none` is weighted least squares.
//  - kernel scale: c_t = max(c, k·1.4826·median r) at each IRLS iteration (a graduated
//    schedule: wide while the fit is poor, shrinking to c), k = scale_factor (0: fixed c).
//  - the calibrated confidence of point i in view v is c_vi·ψ(r_vi) at the final
//    iteration; pseudo-labels keep the points whose calibrated confidence is at least
//    `threshold` times the view's largest, with that confidence as the loss weight.
//  - scale: Horn's symmetric scale in the closed forms (irls_options::symmetric_scale),
//    since Umeyama's least-squares scale, biased low by errors in the predictions, makes
//    the alternating alignment shrink the scene.
//  - pseudo_labels(…, exclude_own_view): labels of a view from the other views only (an
//    option, off by default).
//  - the paper's alignment optimises depth maps, focal lengths and poses (DUSt3R's global
//    aligner) by gradient descent; here the unknowns are one similarity per view and the
//    world points, solved by alternating closed forms (world points = weighted means,
//    poses = weighted Procrustes), with correspondences known (same points in every view).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Geometry>
#include <deltaw/core/eigen_dense.hpp>

#include "../nn/layers.hpp"
#include "../optim/optim.hpp"

DELTAW_NAMESPACE_BEGIN
namespace papers {
namespace lora3d {

using autograd::parameter;
using autograd::tape;
using autograd::var;

// ---------------------------------------------------------------------------------------
// Robust kernels
// ---------------------------------------------------------------------------------------

enum class robust_kernel {
  none,           ///< ρ = r²/2, ψ = 1 (weighted least squares)
  huber,          ///< ρ = r²/2 for |r| ≤ c, c(|r| − c/2) beyond; ψ = min(1, c/|r|)
  cauchy,         ///< ρ = (c²/2)·log(1 + r²/c²); ψ = 1/(1 + r²/c²)
  geman_mcclure,  ///< ρ = (r²/2)·c²/(c² + r²); ψ = (c²/(c² + r²))²
};

inline const char* kernel_name(robust_kernel k) {
  switch (k) {
    case robust_kernel::none: return "none";
    case robust_kernel::huber: return "huber";
    case robust_kernel::cauchy: return "cauchy";
    case robust_kernel::geman_mcclure: return "geman_mcclure";
  }
  return "?";
}

/// ρ(r) of the kernel at scale c > 0.
inline double robust_rho(robust_kernel k, double r, double c) {
  const double r2 = r * r, c2 = c * c;
  switch (k) {
    case robust_kernel::none: return 0.5 * r2;
    case robust_kernel::huber: return std::abs(r) <= c ? 0.5 * r2 : c * (std::abs(r) - 0.5 * c);
    case robust_kernel::cauchy: return 0.5 * c2 * std::log1p(r2 / c2);
    case robust_kernel::geman_mcclure: return 0.5 * r2 * c2 / (c2 + r2);
  }
  return 0;
}

/// The IRLS weight ψ(r) = ρ'(r)/r (the limit 1 at r = 0 for every kernel).
inline double robust_weight(robust_kernel k, double r, double c) {
  const double r2 = r * r, c2 = c * c;
  switch (k) {
    case robust_kernel::none: return 1.0;
    case robust_kernel::huber: return std::abs(r) <= c ? 1.0 : c / std::abs(r);
    case robust_kernel::cauchy: return 1.0 / (1.0 + r2 / c2);
    case robust_kernel::geman_mcclure: {
      const double q = c2 / (c2 + r2);
      return q * q;
    }
  }
  return 1.0;
}

// ---------------------------------------------------------------------------------------
// Similarity transforms and weighted Procrustes
// ---------------------------------------------------------------------------------------

/// x ↦ s·R·x + t.
struct similarity {
  double s = 1.0;
  Eigen::Matrix3d R = Eigen::Matrix3d::Identity();
  Eigen::Vector3d t = Eigen::Vector3d::Zero();

  Eigen::Vector3d operator()(const Eigen::Vector3d& x) const { return s * (R * x) + t; }
  Eigen::Vector3d inverse(const Eigen::Vector3d& y) const { return R.transpose() * (y - t) / s; }
  /// Every row of P [n, 3] mapped.
  dense<double> apply(const dense<double>& P) const {
    dense<double> out(P.rows(), 3);
    for (index_t i = 0; i < P.rows(); ++i) out.row(i) = (*this)(P.row(i).transpose()).transpose();
    return out;
  }
};

namespace detail {
inline void check_points(const dense<double>& P, const char* op, const char* what) {
  if (P.cols() != 3)
    throw shape_error(std::string(op) + ": " + what + " is " + deltaw::detail::shape_str(P.rows(), P.cols()) +
                      "; expected [n, 3]");
}
inline void check_weights(const std::vector<double>& w, index_t n, const char* op, const char* what) {
  if (index_t(w.size()) != n)
    throw shape_error(std::string(op) + ": " + std::to_string(w.size()) + " " + what + " for " + std::to_string(n) +
                      " points");
  for (double x : w)
    if (!(x >= 0) || !std::isfinite(x))
      throw argument_error(std::string(op) + ": " + what + " must be finite and >= 0; got " + std::to_string(x));
}
inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  const auto mid = v.begin() + std::ptrdiff_t(v.size() / 2);
  std::nth_element(v.begin(), mid, v.end());
  return *mid;
}
}  // namespace detail

/// The similarity T minimising Σ wᵢ‖T(pᵢ) − qᵢ‖² (Umeyama 1991, weighted), P, Q [n, 3];
/// a rotation (det +1), never a reflection. with_scale = false fixes s = 1. Throws when
/// the weights sum to zero. symmetric_scale: s = (Σw‖q − q̄‖² / Σw‖p − p̄‖²)^½ (Horn's
/// symmetric form) instead of Umeyama's least-squares s, which errors in P bias towards 0
/// (an alternating alignment then shrinks the scene round after round).
inline similarity weighted_similarity(const dense<double>& P, const dense<double>& Q, const std::vector<double>& w,
                                      bool with_scale = true, bool symmetric_scale = false) {
  constexpr const char* op = "deltaw::papers::lora3d::weighted_similarity";
  detail::check_points(P, op, "P");
  detail::check_points(Q, op, "Q");
  if (P.rows() != Q.rows())
    throw shape_error(std::string(op) + ": P has " + std::to_string(P.rows()) + " points but Q has " +
                      std::to_string(Q.rows()));
  detail::check_weights(w, P.rows(), op, "weights");
  double W = 0;
  Eigen::Vector3d mp = Eigen::Vector3d::Zero(), mq = Eigen::Vector3d::Zero();
  for (index_t i = 0; i < P.rows(); ++i) {
    W += w[std::size_t(i)];
    mp += w[std::size_t(i)] * P.row(i).transpose();
    mq += w[std::size_t(i)] * Q.row(i).transpose();
  }
  if (!(W > 0)) throw argument_error(std::string(op) + ": the weights sum to zero; nothing to fit");
  mp /= W;
  mq /= W;
  Eigen::Matrix3d S = Eigen::Matrix3d::Zero();
  double varp = 0, varq = 0;
  for (index_t i = 0; i < P.rows(); ++i) {
    const Eigen::Vector3d a = P.row(i).transpose() - mp, b = Q.row(i).transpose() - mq;
    S += w[std::size_t(i)] * b * a.transpose();
    varp += w[std::size_t(i)] * a.squaredNorm();
    varq += w[std::size_t(i)] * b.squaredNorm();
  }
  S /= W;
  varp /= W;
  varq /= W;
  Eigen::JacobiSVD<Eigen::Matrix3d> svd(S, Eigen::ComputeFullU | Eigen::ComputeFullV);
  Eigen::Vector3d d(1, 1, (svd.matrixU() * svd.matrixV().transpose()).determinant() < 0 ? -1 : 1);
  similarity T;
  T.R = svd.matrixU() * d.asDiagonal() * svd.matrixV().transpose();
  T.s = !with_scale || !(varp > 0) ? 1.0 : symmetric_scale ? std::sqrt(varq / varp) : svd.singularValues().dot(d) / varp;
  T.t = mq - T.s * T.R * mp;
  return T;
}

struct irls_options {
  robust_kernel kernel = robust_kernel::geman_mcclure;
  double c = 0.05;             ///< the kernel's scale (floor of the graduated schedule)
  double scale_factor = 2.0;   ///< c_t = max(c, scale_factor·1.4826·median r); 0: fixed c
  index_t iterations = 30;
  double tol = 1e-12;          ///< stop when the weighted cost changes by less (relative)
  bool with_scale = true;
  /// Horn's symmetric scale in every closed-form step (see weighted_similarity); the
  /// default, as the alternating alignment of align_views needs it.
  bool symmetric_scale = true;
};

struct irls_result {
  similarity T;
  std::vector<double> residuals;   ///< ‖T(pᵢ) − qᵢ‖ at the end
  std::vector<double> calibrated;  ///< cᵢ·ψ(rᵢ) at the end
  index_t iterations = 0;
};

namespace detail {
inline double kernel_scale(const irls_options& o, const std::vector<double>& r) {
  return o.scale_factor > 0 ? std::max(o.c, o.scale_factor * 1.4826 * median(r)) : o.c;
}
}  // namespace detail

/// Robust similarity fit by IRLS: start from the confidence-weighted closed form, then
/// repeat (residuals → weights cᵢ·ψ(rᵢ) → closed form). confidence: cᵢ ≥ 0, one per point.
inline irls_result robust_align(const dense<double>& P, const dense<double>& Q, const std::vector<double>& confidence,
                                irls_options o = {}) {
  constexpr const char* op = "deltaw::papers::lora3d::robust_align";
  if (!(o.c > 0)) throw argument_error(std::string(op) + ": the kernel scale c must be > 0; got " + std::to_string(o.c));
  irls_result res;
  res.T = weighted_similarity(P, Q, confidence, o.with_scale, o.symmetric_scale);
  const index_t n = P.rows();
  res.residuals.assign(std::size_t(n), 0.0);
  res.calibrated = confidence;
  double prev = std::numeric_limits<double>::infinity();
  for (index_t it = 0; it <= o.iterations; ++it) {
    for (index_t i = 0; i < n; ++i)
      res.residuals[std::size_t(i)] = (res.T(P.row(i).transpose()) - Q.row(i).transpose()).norm();
    const double c = detail::kernel_scale(o, res.residuals);
    double cost = 0;
    for (index_t i = 0; i < n; ++i) {
      const double r = res.residuals[std::size_t(i)];
      res.calibrated[std::size_t(i)] = confidence[std::size_t(i)] * robust_weight(o.kernel, r, c);
      cost += confidence[std::size_t(i)] * robust_rho(o.kernel, r, c);
    }
    if (it == o.iterations || o.kernel == robust_kernel::none) break;
    if (std::abs(prev - cost) <= o.tol * std::max(1.0, std::abs(cost)) && c == o.c) break;
    prev = cost;
    res.T = weighted_similarity(P, Q, res.calibrated, o.with_scale, o.symmetric_scale);
    res.iterations = it + 1;
  }
  return res;
}

// ---------------------------------------------------------------------------------------
// Global alignment of several views
// ---------------------------------------------------------------------------------------

struct alignment_result {
  std::vector<similarity> poses;               ///< view → world; poses[0] is the identity
  dense<double> world;                         ///< [n, 3] aligned points
  std::vector<std::vector<double>> calibrated; ///< per view: c_vi·ψ(r_vi)
  std::vector<std::vector<double>> residuals;  ///< per view: ‖T_v(p_vi) − X_i‖
  std::vector<dense<double>> aligned;          ///< per view: T_v(p_vi) [n, 3] (world frame)
  index_t iterations = 0;
};

/// Aligns K point maps of the same n points (maps[v] [n, 3] in view v's frame, conf[v]
/// their confidences): world points X and similarities T_v minimising
/// Σ_v Σ_i c_vi·ρ(‖T_v(p_vi) − X_i‖), with T_0 = identity. Init: each view robustly
/// aligned to view 0; then `iterations` rounds of X_i = weighted mean of T_v(p_vi),
/// T_v = weighted Procrustes onto X (v ≥ 1), weights c_vi·ψ(r_vi) (scale schedule as
/// robust_align, from the median residual over all views).
inline alignment_result align_views(const std::vector<dense<double>>& maps, const std::vector<std::vector<double>>& conf,
                                    irls_options o = {}) {
  constexpr const char* op = "deltaw::papers::lora3d::align_views";
  if (maps.size() < 2 || conf.size() != maps.size())
    throw argument_error(std::string(op) + ": needs at least two views and one confidence vector per view; got " +
                         std::to_string(maps.size()) + " maps and " + std::to_string(conf.size()) + " confidence vectors");
  const index_t n = maps[0].rows();
  for (std::size_t v = 0; v < maps.size(); ++v) {
    detail::check_points(maps[v], op, "a point map");
    if (maps[v].rows() != n)
      throw shape_error(std::string(op) + ": view " + std::to_string(v) + " has " + std::to_string(maps[v].rows()) +
                        " points but view 0 has " + std::to_string(n));
    detail::check_weights(conf[v], n, op, "confidences");
  }
  const std::size_t K = maps.size();
  alignment_result res;
  res.poses.resize(K);
  for (std::size_t v = 1; v < K; ++v) {
    std::vector<double> c(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) c[std::size_t(i)] = conf[v][std::size_t(i)] * conf[0][std::size_t(i)];
    res.poses[v] = robust_align(maps[v], maps[0], c, o).T;
  }
  res.calibrated = conf;
  res.residuals.assign(K, std::vector<double>(static_cast<std::size_t>(n), 0.0));
  res.world = dense<double>::Zero(n, 3);
  std::vector<dense<double>> moved(K);
  for (index_t it = 0; it <= o.iterations; ++it) {
    for (std::size_t v = 0; v < K; ++v) moved[v] = res.poses[v].apply(maps[v]);
    // World points: weighted means (a point no view trusts falls back to the plain mean).
    for (index_t i = 0; i < n; ++i) {
      Eigen::Vector3d acc = Eigen::Vector3d::Zero(), plain = Eigen::Vector3d::Zero();
      double W = 0;
      for (std::size_t v = 0; v < K; ++v) {
        acc += res.calibrated[v][std::size_t(i)] * moved[v].row(i).transpose();
        plain += moved[v].row(i).transpose();
        W += res.calibrated[v][std::size_t(i)];
      }
      res.world.row(i) = (W > 0 ? Eigen::Vector3d(acc / W) : Eigen::Vector3d(plain / double(K))).transpose();
    }
    std::vector<double> all;
    for (std::size_t v = 0; v < K; ++v)
      for (index_t i = 0; i < n; ++i) {
        const double r = (moved[v].row(i) - res.world.row(i)).norm();
        res.residuals[v][std::size_t(i)] = r;
        all.push_back(r);
      }
    const double c = detail::kernel_scale(o, all);
    for (std::size_t v = 0; v < K; ++v)
      for (index_t i = 0; i < n; ++i)
        res.calibrated[v][std::size_t(i)] = conf[v][std::size_t(i)] * robust_weight(o.kernel, res.residuals[v][std::size_t(i)], c);
    if (it == o.iterations) {
      res.aligned = std::move(moved);
      break;
    }
    for (std::size_t v = 1; v < K; ++v) res.poses[v] = weighted_similarity(maps[v], res.world, res.calibrated[v], o.with_scale, o.symmetric_scale);
    res.iterations = it + 1;
  }
  return res;
}

struct pseudo_label_set {
  std::vector<dense<double>> targets;       ///< per view [n, 3]: T_v⁻¹(X_i), the scene seen from view v
  std::vector<std::vector<double>> weights; ///< per view: the calibrated confidence, 0 where dropped
  index_t kept = 0;
};

/// Pseudo-labels from an alignment: T_v⁻¹(X_i) for every point whose calibrated confidence
/// is at least `threshold` × the largest of its view, weighted by that confidence.
/// exclude_own_view (an option, not the paper's: UNVERIFIED): X_i is recomputed for view v
/// from the other views only (their calibrated weighted mean), so that a view's label does
/// not contain a share of its own prediction's error, which fine-tuning would otherwise
/// learn to keep; a point no other view trusts gets weight 0.
inline pseudo_label_set pseudo_labels(const alignment_result& a, double threshold = 0.1, bool exclude_own_view = false) {
  pseudo_label_set out;
  const std::size_t K = a.poses.size();
  if (exclude_own_view && a.aligned.size() != K)
    throw argument_error("deltaw::papers::lora3d::pseudo_labels: exclude_own_view needs the aligned maps of every view");
  for (std::size_t v = 0; v < K; ++v) {
    dense<double> t(a.world.rows(), 3);
    std::vector<double> w = a.calibrated[v];
    for (index_t i = 0; i < a.world.rows(); ++i) {
      Eigen::Vector3d X = a.world.row(i).transpose();
      if (exclude_own_view) {
        Eigen::Vector3d acc = Eigen::Vector3d::Zero();
        double W = 0;
        for (std::size_t u = 0; u < K; ++u)
          if (u != v) {
            acc += a.calibrated[u][std::size_t(i)] * a.aligned[u].row(i).transpose();
            W += a.calibrated[u][std::size_t(i)];
          }
        if (W > 0) X = acc / W;
        else w[std::size_t(i)] = 0;
      }
      t.row(i) = a.poses[v].inverse(X).transpose();
    }
    const double mx = w.empty() ? 0.0 : *std::max_element(w.begin(), w.end());
    for (double& x : w) {
      if (x < threshold * mx || x <= 0) x = 0;
      else ++out.kept;
    }
    out.targets.push_back(std::move(t));
    out.weights.push_back(std::move(w));
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// The loss of the fine-tuning
// ---------------------------------------------------------------------------------------

/// Σᵢ wᵢ‖yᵢ − tᵢ‖² / Σᵢ wᵢ over the rows of pred [n, d] and the constant targets [n, d];
/// ∂/∂yᵢ = 2wᵢ(yᵢ − tᵢ)/Σw. Throws when the weights sum to zero.
template <class T>
var<T> weighted_point_loss(const var<T>& pred, const dense<T>& target, const std::vector<double>& w) {
  constexpr const char* op = "deltaw::papers::lora3d::weighted_point_loss";
  auto& t = autograd::detail::tape_of(pred, op);
  const auto Y = pred.value();
  if (Y.rows() != target.rows() || Y.cols() != target.cols())
    throw shape_error(std::string(op) + ": the prediction is " + deltaw::detail::shape_str(Y.rows(), Y.cols()) +
                      " but the target is " + deltaw::detail::shape_str(target.rows(), target.cols()));
  detail::check_weights(w, Y.rows(), op, "weights");
  double W = 0, total = 0;
  auto g = std::make_shared<dense<T>>(Y.rows(), Y.cols());
  for (index_t i = 0; i < Y.rows(); ++i) W += w[std::size_t(i)];
  if (!(W > 0)) throw argument_error(std::string(op) + ": the weights sum to zero");
  for (index_t i = 0; i < Y.rows(); ++i)
    for (index_t j = 0; j < Y.cols(); ++j) {
      const double d = double(Y(i, j)) - double(target(i, j));
      total += w[std::size_t(i)] * d * d;
      (*g)(i, j) = T(2.0 * w[std::size_t(i)] * d / W);
    }
  dense<T> y(1, 1);
  y(0, 0) = T(total / W);
  const index_t ip = pred.id();
  return t.record(op, std::move(y), t.requires_grad(pred), [ip, g](tape<T>& t, index_t self) {
    autograd::detail::accumulate(t, ip, t.upstream(self)(0, 0) * (*g));
  });
}

/// The point maps a head predicts from per-view features [n, d]: [n, 3] each.
template <class T>
std::vector<dense<double>> predict_views(const nn::linear<T>& head, const std::vector<dense<double>>& features) {
  std::vector<dense<double>> out;
  for (const auto& f : features) {
    tape<T> t;
    autograd::no_grad<T> ng(t);
    const dense<T> x = f.template cast<T>();
    out.push_back(head(t, t.frozen(x, "features")).value().template cast<double>());
  }
  return out;
}

struct fine_tune_options {
  index_t steps = 200;  ///< full-batch AdamW steps over every view's pseudo-labels
  double lr = 1e-2;
  double weight_decay = 0.0;
};

/// Fine-tunes the trainable parameters of `head` (its LoRA) on pseudo-labels: the
/// weighted point loss over all views' features at once. Returns the loss of each step.
template <class T>
std::vector<double> fine_tune(nn::linear<T>& head, const std::vector<dense<double>>& features,
                              const pseudo_label_set& labels, fine_tune_options o = {}) {
  constexpr const char* op = "deltaw::papers::lora3d::fine_tune";
  if (features.size() != labels.targets.size())
    throw argument_error(std::string(op) + ": " + std::to_string(features.size()) + " feature maps for " +
                         std::to_string(labels.targets.size()) + " pseudo-labelled views");
  index_t rows = 0;
  for (std::size_t v = 0; v < features.size(); ++v) {
    if (features[v].rows() != labels.targets[v].rows())
      throw shape_error(std::string(op) + ": view " + std::to_string(v) + " has " + std::to_string(features[v].rows()) +
                        " feature rows but " + std::to_string(labels.targets[v].rows()) + " pseudo-labels");
    rows += features[v].rows();
  }
  dense<T> X(rows, features.empty() ? 0 : features[0].cols()), Y(rows, 3);
  std::vector<double> w;
  index_t r0 = 0;
  for (std::size_t v = 0; v < features.size(); ++v) {
    X.middleRows(r0, features[v].rows()) = features[v].template cast<T>();
    Y.middleRows(r0, features[v].rows()) = labels.targets[v].template cast<T>();
    w.insert(w.end(), labels.weights[v].begin(), labels.weights[v].end());
    r0 += features[v].rows();
  }
  std::vector<parameter<T>*> ps;
  head.collect(ps);
  if (ps.empty()) throw argument_error(std::string(op) + ": the head has no trainable parameters (attach a LoRA first)");
  optim::adamw<T> opt(ps, {o.lr, 0.9, 0.999, 1e-8, o.weight_decay});
  std::vector<double> hist;
  for (index_t s = 0; s < o.steps; ++s) {
    tape<T> t;
    const auto loss = weighted_point_loss(head(t, t.frozen(X, "features")), Y, w);
    t.backward(loss);
    opt.step();
    opt.zero_grad();
    hist.push_back(double(loss.value()(0, 0)));
  }
  return hist;
}

// ---------------------------------------------------------------------------------------
// A synthetic multi-view task with known ground truth
// ---------------------------------------------------------------------------------------

struct scene_options {
  index_t points = 200;
  index_t views = 4;
  index_t features = 12;           ///< d: the predictor reads features [n, d] per view
  index_t nuisance = 2;            ///< m: view-specific appearance factors in the features
  double feature_noise = 0.01;     ///< σ of the noise added to the features
  double outlier_fraction = 0.2;   ///< share of (view, point) pairs whose features are corrupted
  double outlier_offset = 1.5;     ///< size of the corruption (in scene units)
  double domain_shift = 0.3;       ///< how much the pretrained head reads the first nuisance factor
  std::uint64_t seed = 1;
};

/// The ground truth: points X [n, 3] in the world (= view 0's frame), poses T_v (view →
/// world, T_0 = identity, unit scale), and for each view features
///     x_vi = E·p_vi + N·z_vi + noise,   E [d, 3], N [d, m], z_vi ~ N(0, I_m),
/// of the true view-frame points p_vi = T_v⁻¹(X_i); z is the view's appearance (lighting,
/// texture), drawn independently per view and point. Outliers have the features of a
/// displaced point. With [P_p; P_z] = pinv([E N]), the exact head is W* = P_p [3, d] (it
/// ignores z); the "pretrained" head is W0 = W* + shift·a·(first row of P_z) with a unit
/// a, so on this scene its points err by shift·z_vi,1·a: a rank-1 error that differs from
/// view to view, which a multi-view consensus averages out and a rank-1 LoRA can undo.
/// Confidences of the predictor are uniform in [0.5, 1] and say nothing about outliers.
struct synthetic_scene {
  dense<double> world;                      ///< [n, 3]
  std::vector<similarity> poses;            ///< view → world
  std::vector<dense<double>> view_points;   ///< true p_vi [n, 3]
  std::vector<dense<double>> features;      ///< x_vi [n, d]
  std::vector<std::vector<bool>> outlier;   ///< per view
  std::vector<std::vector<double>> confidence;
  dense<double> W_true, W_pretrained;       ///< [3, d]

  explicit synthetic_scene(scene_options o = {}) {
    if (o.features < 3 + o.nuisance || o.nuisance < 1 || o.points < 3 || o.views < 1)
      throw argument_error("deltaw::papers::lora3d::synthetic_scene: needs features >= 3 + nuisance, nuisance >= 1, "
                           "points >= 3, views >= 1; got features " + std::to_string(o.features) + ", nuisance " +
                           std::to_string(o.nuisance) + ", points " + std::to_string(o.points) + ", views " +
                           std::to_string(o.views));
    std::mt19937_64 g(o.seed);
    std::uniform_real_distribution<double> u(-1.0, 1.0), uc(0.5, 1.0), u01(0.0, 1.0);
    std::normal_distribution<double> nrm(0.0, 1.0);
    world.resize(o.points, 3);
    for (index_t i = 0; i < world.size(); ++i) world.data()[i] = u(g);
    const index_t m = o.nuisance;
    dense<double> F(o.features, 3 + m);  // [E N]
    for (index_t i = 0; i < F.size(); ++i) F.data()[i] = nrm(g);
    const dense<double> Pinv = (F.transpose() * F).inverse() * F.transpose();
    W_true = Pinv.topRows(3);
    Eigen::Vector3d a(nrm(g), nrm(g), nrm(g));
    W_pretrained = W_true + o.domain_shift * a.normalized() * Pinv.row(3);
    for (index_t v = 0; v < o.views; ++v) {
      similarity T;
      if (v > 0) {
        Eigen::Vector3d axis(nrm(g), nrm(g), nrm(g));
        T.R = Eigen::AngleAxisd(0.3 + 0.9 * u01(g), axis.normalized()).toRotationMatrix();
        T.t = Eigen::Vector3d(u(g), u(g), u(g));
      }
      dense<double> p(o.points, 3), x(o.points, o.features);
      std::vector<bool> out(static_cast<std::size_t>(o.points));
      std::vector<double> c(static_cast<std::size_t>(o.points));
      Eigen::VectorXd q(3 + m);
      for (index_t i = 0; i < o.points; ++i) {
        p.row(i) = T.inverse(world.row(i).transpose()).transpose();
        q.head(3) = p.row(i).transpose();
        out[std::size_t(i)] = u01(g) < o.outlier_fraction;
        if (out[std::size_t(i)]) q.head(3) += o.outlier_offset * Eigen::Vector3d(nrm(g), nrm(g), nrm(g)).normalized();
        for (index_t k = 0; k < m; ++k) q(3 + k) = nrm(g);
        x.row(i) = (F * q).transpose();
        for (index_t j = 0; j < o.features; ++j) x(i, j) += o.feature_noise * nrm(g);
        c[std::size_t(i)] = uc(g);
      }
      poses.push_back(T);
      view_points.push_back(std::move(p));
      features.push_back(std::move(x));
      outlier.push_back(std::move(out));
      confidence.push_back(std::move(c));
    }
  }
};

}  // namespace lora3d
}  // namespace papers
DELTAW_NAMESPACE_END
