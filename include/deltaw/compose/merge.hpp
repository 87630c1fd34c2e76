// SPDX-License-Identifier: MIT
// Merging N LoRA updates ΔW_i = s_i·B_i·A_i with weights w_i into one LoRA, in factored form:
// every mode of PEFT 0.21.2's add_weighted_adapter, plus an exact one (see
// docs/compose.md for what each mode computes and how far it is from Σ w_i·ΔW_i).
//
//  * merge(): the modes that work on the factors (linear, ties, dare_linear, dare_ties,
//    magnitude_prune: PEFT combines the A's and the B's separately), the exact ones (cat,
//    linear_exact) and svd, computed from QRs of the stacked factors: no out×in matrix.
//  * merge_materializing(): additionally the modes PEFT defines on the entries of the dense
//    ΔW_i (ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd). They form every
//    out×in ΔW_i, as the name says; merge() refuses them.
//  * factored_error(): ‖result − Σ w_i·ΔW_i‖_F from Gram matrices of the factors.
#pragma once

#include <deltaw/core/eigen_dense.hpp>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "../core/random.hpp"
#include "../expr/low_rank.hpp"

DELTAW_NAMESPACE_BEGIN
namespace compose {

/// The merge modes: PEFT 0.21.2's names (same meaning) and linear_exact.
enum class merge_mode : unsigned char {
  linear,               ///< PEFT: A = Σ sgn·√|w_i s_i|·A_i, B = Σ √|w_i s_i|·B_i (approximate)
  linear_exact,         ///< Σ w_i·ΔW_i exactly, compressed to its numerical rank (QR + SVD)
  cat,                  ///< B = [B_1 … B_N], A = [w_1 s_1 A_1; …] (exact, rank Σ r_i)
  svd,                  ///< best rank-k approximation of Σ w_i·ΔW_i (k = svd_rank or max r_i)
  ties,                 ///< PEFT: TIES on the A's and on the B's separately
  ties_svd,             ///< PEFT: TIES on the dense ΔW_i, then truncated SVD (materializing)
  dare_linear,          ///< PEFT: DARE + weighted sum on the A's and on the B's separately
  dare_ties,            ///< PEFT: DARE + TIES on the A's and on the B's separately
  dare_linear_svd,      ///< PEFT: DARE + weighted sum on the dense ΔW_i, then SVD (materializing)
  dare_ties_svd,        ///< PEFT: DARE + TIES on the dense ΔW_i, then SVD (materializing)
  magnitude_prune,      ///< PEFT: top-density magnitudes + weighted sum on A's and B's separately
  magnitude_prune_svd,  ///< PEFT: the same on the dense ΔW_i, then SVD (materializing)
};

inline constexpr merge_mode all_merge_modes[] = {
    merge_mode::linear,          merge_mode::linear_exact,    merge_mode::cat,           merge_mode::svd,
    merge_mode::ties,            merge_mode::ties_svd,        merge_mode::dare_linear,   merge_mode::dare_ties,
    merge_mode::dare_linear_svd, merge_mode::dare_ties_svd,   merge_mode::magnitude_prune,
    merge_mode::magnitude_prune_svd};

constexpr std::string_view mode_name(merge_mode m) {
  switch (m) {
    case merge_mode::linear: return "linear";
    case merge_mode::linear_exact: return "linear_exact";
    case merge_mode::cat: return "cat";
    case merge_mode::svd: return "svd";
    case merge_mode::ties: return "ties";
    case merge_mode::ties_svd: return "ties_svd";
    case merge_mode::dare_linear: return "dare_linear";
    case merge_mode::dare_ties: return "dare_ties";
    case merge_mode::dare_linear_svd: return "dare_linear_svd";
    case merge_mode::dare_ties_svd: return "dare_ties_svd";
    case merge_mode::magnitude_prune: return "magnitude_prune";
    case merge_mode::magnitude_prune_svd: return "magnitude_prune_svd";
  }
  return "?";
}

/// The mode named `name` (PEFT's combination_type spelling, or "linear_exact").
inline merge_mode parse_merge_mode(std::string_view name) {
  for (auto m : all_merge_modes)
    if (mode_name(m) == name) return m;
  throw argument_error("deltaw::compose::parse_merge_mode: unknown mode \"" + std::string(name) +
                       "\" (linear, linear_exact, cat, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, "
                       "dare_ties_svd, magnitude_prune, magnitude_prune_svd)");
}

/// Whether the mode works on the entries of the dense ΔW_i (merge_materializing only).
constexpr bool is_materializing(merge_mode m) {
  return m == merge_mode::ties_svd || m == merge_mode::dare_linear_svd || m == merge_mode::dare_ties_svd ||
         m == merge_mode::magnitude_prune_svd;
}
/// Whether the mode ends in a truncated SVD (its rank is svd_rank or the largest r_i).
constexpr bool is_svd_mode(merge_mode m) { return m == merge_mode::svd || is_materializing(m); }
/// Whether the mode combines the A's and the B's separately (PEFT: equal ranks required).
constexpr bool is_factorwise(merge_mode m) {
  return m == merge_mode::linear || m == merge_mode::ties || m == merge_mode::dare_linear ||
         m == merge_mode::dare_ties || m == merge_mode::magnitude_prune;
}
constexpr bool needs_density(merge_mode m) {
  return m != merge_mode::linear && m != merge_mode::linear_exact && m != merge_mode::cat && m != merge_mode::svd;
}
constexpr bool is_dare(merge_mode m) {
  return m == merge_mode::dare_linear || m == merge_mode::dare_ties || m == merge_mode::dare_linear_svd ||
         m == merge_mode::dare_ties_svd;
}

/// TIES' majority sign per entry: sign of Σ_i t_i ("total") or of Σ_i sgn(t_i) ("frequency"),
/// over the pruned, unweighted tensors (as PEFT).
enum class majority_sign : unsigned char { total, frequency };

/// Which tensor a DARE mask is drawn for.
enum class dare_target : unsigned char { A, B, delta };
struct dare_site {
  std::string_view module;  ///< set by merge_peft; empty for a single update
  std::size_t adapter = 0;  ///< index in the input list
  dare_target target = dare_target::A;
};

struct merge_options {
  merge_mode mode = merge_mode::svd;
  /// Rank of the svd modes; 0: the largest input rank (PEFT's default).
  index_t svd_rank = 0;
  /// PEFT's svd_clamp: the q-quantile h of the entries of B = U·S and A = Vᵀ together, both
  /// clamped to [−h, h]. Depends on the singular vectors' signs (so does PEFT's).
  std::optional<double> svd_clamp;
  /// Fraction of entries kept by the pruning modes (required by them), in [0, 1].
  std::optional<double> density;
  majority_sign sign_method = majority_sign::total;
  /// DARE's Bernoulli(density) masks: entry e of the tensor of site (module m, adapter i,
  /// target t) is kept when random_stream{seed, stream_base + 3·i + t}.uniform01(e) < density
  /// (row-major entry index). merge_peft offsets stream_base per module.
  std::uint64_t seed = 0;
  std::uint64_t stream_base = 0;
  /// Or explicit masks: called once per (adapter, target), fills `mask` with 0/1.
  std::function<void(const dare_site&, const matrix_view<double>& mask)> dare_mask;
  /// linear_exact drops singular values ≤ tolerance·σ_max (0: 64·ε·stacked rank).
  double exact_tolerance = 0;
};

namespace detail {
using mat = Eigen::MatrixXd;

template <class T>
mat to_mat(const matrix_view<const T>& v) {
  mat m(v.rows(), v.cols());
  for (index_t j = 0; j < v.cols(); ++j)
    for (index_t i = 0; i < v.rows(); ++i) m(i, j) = deltaw::convert<double>(v(i, j));
  return m;
}

/// A low_rank<double> owning row-major copies of B and A.
inline low_rank<double> owned_low_rank(const mat& B, const mat& A, double s) {
  auto copy = [](const mat& m) {
    auto buf = std::make_shared<std::vector<double>>(std::size_t(m.size()));
    for (index_t i = 0; i < m.rows(); ++i)
      for (index_t j = 0; j < m.cols(); ++j) (*buf)[std::size_t(i * m.cols() + j)] = m(i, j);
    return held_matrix<double>{matrix_view<const double>(buf->data(), index_t(m.rows()), index_t(m.cols())), buf};
  };
  return low_rank<double>(copy(B), copy(A), s);
}

/// Keeps the k = ⌊density·numel⌋ entries of largest magnitude (PEFT's magnitude_based_pruning;
/// equal magnitudes are ranked by row-major position).
inline void magnitude_prune_inplace(mat& t, double density) {
  if (density >= 1) return;
  const auto n = std::size_t(t.size());
  const auto k = std::size_t(density * double(n));
  std::vector<std::size_t> idx(n);
  std::iota(idx.begin(), idx.end(), std::size_t(0));
  const index_t cols = t.cols();
  auto at = [&](std::size_t e) -> double& { return t(index_t(e) / cols, index_t(e) % cols); };
  auto larger = [&](std::size_t a, std::size_t b) {
    const double x = std::abs(at(a)), y = std::abs(at(b));
    return x != y ? x > y : a < b;
  };
  if (k < n) std::nth_element(idx.begin(), idx.begin() + std::ptrdiff_t(k), idx.end(), larger);
  for (std::size_t e = k; e < n; ++e) at(idx[e]) = 0;
}

inline void check_density(const merge_options& o, const char* op) {
  if (!needs_density(o.mode)) return;
  if (!o.density)
    throw argument_error(std::string(op) + ": mode " + std::string(mode_name(o.mode)) + " needs options.density");
  const double d = *o.density;
  if (!(d >= 0 && d <= 1))
    throw argument_error(std::string(op) + ": density must be in [0, 1]; got " + std::to_string(d));
  if (is_dare(o.mode) && d == 0)
    throw argument_error(std::string(op) + ": DARE rescales by 1/density; density 0 is undefined");
}

/// DARE's random pruning with rescaling (PEFT's random_pruning(rescale=True)).
inline void dare_inplace(mat& t, const merge_options& o, const dare_site& site) {
  const double d = *o.density;
  if (d >= 1) return;
  mat mask(t.rows(), t.cols());
  if (o.dare_mask) {
    mask.setConstant(-1);
    o.dare_mask(site, matrix_view<double>(mask.data(), index_t(mask.rows()), index_t(mask.cols()), 1,
                                          index_t(mask.rows())));
    for (index_t i = 0; i < mask.size(); ++i)
      if (mask.data()[i] != 0 && mask.data()[i] != 1)
        throw argument_error("deltaw::compose::merge: options.dare_mask left an entry that is neither 0 nor 1");
  } else {
    const random_stream rs{o.seed, o.stream_base + 3 * std::uint64_t(site.adapter) + std::uint64_t(site.target)};
    for (index_t i = 0; i < t.rows(); ++i)
      for (index_t j = 0; j < t.cols(); ++j)
        mask(i, j) = double(rs.uniform01(std::uint64_t(i * t.cols() + j))) < d ? 1.0 : 0.0;
  }
  t = t.cwiseProduct(mask) / d;
}

/// PEFT's merge of same-shape task tensors: prune (magnitude / DARE / none), then a weighted
/// sum or TIES' disjoint merge under the majority sign.
inline mat combine(std::vector<mat> t, const std::vector<double>& w, const merge_options& o, dare_target target,
                   std::string_view module) {
  const merge_mode m = o.mode;
  const bool magnitude = m == merge_mode::ties || m == merge_mode::ties_svd || m == merge_mode::magnitude_prune ||
                         m == merge_mode::magnitude_prune_svd;
  for (std::size_t i = 0; i < t.size(); ++i) {
    if (magnitude) magnitude_prune_inplace(t[i], *o.density);
    else if (is_dare(m)) dare_inplace(t[i], o, dare_site{module, i, target});
  }
  const bool ties = m == merge_mode::ties || m == merge_mode::ties_svd || m == merge_mode::dare_ties ||
                    m == merge_mode::dare_ties_svd;
  mat out = mat::Zero(t[0].rows(), t[0].cols());
  if (!ties) {
    for (std::size_t i = 0; i < t.size(); ++i) out += w[i] * t[i];
    return out;
  }
  for (index_t e = 0; e < out.size(); ++e) {
    double s = 0;
    for (const auto& x : t) {
      const double v = x.data()[e];
      s += o.sign_method == majority_sign::total ? v : double((v > 0) - (v < 0));
    }
    const double maj = s >= 0 ? 1.0 : -1.0;
    double acc = 0, count = 0;
    for (std::size_t i = 0; i < t.size(); ++i) {
      const double v = t[i].data()[e];
      if (double((v > 0) - (v < 0)) == maj) {
        acc += w[i] * v;
        count += 1;
      }
    }
    out.data()[e] = acc / std::max(count, 1.0);
  }
  return out;
}

/// torch.quantile's linear interpolation.
inline double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double pos = q * double(v.size() - 1);
  const auto lo = std::size_t(std::floor(pos));
  const auto hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - double(lo));
}

/// B = U·S, A = Vᵀ of rank k (zero-padded to k when the SVD has fewer values), clamped.
inline low_rank<double> svd_factors(mat US, mat Vt, index_t k, const std::optional<double>& clamp) {
  if (US.cols() < k) {
    const index_t have = index_t(US.cols());
    US.conservativeResize(Eigen::NoChange, k);
    US.rightCols(k - have).setZero();
    Vt.conservativeResize(k, Eigen::NoChange);
    Vt.bottomRows(k - have).setZero();
  }
  if (clamp) {
    std::vector<double> all(US.data(), US.data() + US.size());
    all.insert(all.end(), Vt.data(), Vt.data() + Vt.size());
    const double h = quantile(std::move(all), *clamp);
    US = US.cwiseMax(-h).cwiseMin(h);
    Vt = Vt.cwiseMax(-h).cwiseMin(h);
  }
  return owned_low_rank(US, Vt, 1.0);
}

/// Thin QR of X [m, n] (any shape): Q [m, p], R [p, n], p = min(m, n).
inline void thin_qr(const mat& X, mat& Q, mat& R) {
  const index_t m = index_t(X.rows()), n = index_t(X.cols()), p = std::min(m, n);
  const Eigen::HouseholderQR<mat> qr(X);
  Q = qr.householderQ() * mat::Identity(m, p);
  R = qr.matrixQR().topRows(p).template triangularView<Eigen::Upper>();
}

/// SVD of Bs·As (Bs [out, R], As [R, in]) from QRs of Bs and Asᵀ: Bs·As = Qb·(Rb·Raᵀ)·Qaᵀ.
/// Returns Qb·U·S [out, q] and Vᵀ·Qaᵀ [q, in], q = min(p_b, p_a), singular values descending.
inline void factored_svd(const mat& Bs, const mat& As, mat& US, mat& Vt, Eigen::VectorXd& S) {
  mat Qb, Rb, Qa, Ra;
  thin_qr(Bs, Qb, Rb);
  thin_qr(As.transpose(), Qa, Ra);
  const mat core = Rb * Ra.transpose();
  const Eigen::JacobiSVD<mat> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);
  S = svd.singularValues();
  US = Qb * svd.matrixU() * S.asDiagonal();
  Vt = (Qa * svd.matrixV()).transpose();
}

/// ‖Bs·As‖_F through QRs of Bs and Asᵀ.
inline double stacked_norm(const mat& Bs, const mat& As) {
  mat Qb, Rb, Qa, Ra;
  thin_qr(Bs, Qb, Rb);
  thin_qr(As.transpose(), Qa, Ra);
  return (Rb * Ra.transpose()).norm();
}

template <class T>
void check_inputs(std::span<const low_rank<T>> a, std::span<const double> w, const merge_options& o, const char* op) {
  if (a.empty()) throw argument_error(std::string(op) + ": no adapters to merge");
  if (a.size() != w.size())
    throw argument_error(std::string(op) + ": " + std::to_string(a.size()) + " adapters but " +
                         std::to_string(w.size()) + " weights");
  for (std::size_t i = 1; i < a.size(); ++i)
    if (a[i].rows() != a[0].rows() || a[i].cols() != a[0].cols())
      throw shape_error(std::string(op) + ": adapter " + std::to_string(i) + " updates a " +
                        deltaw::detail::shape_str(a[i].rows(), a[i].cols()) + " weight but adapter 0 a " +
                        deltaw::detail::shape_str(a[0].rows(), a[0].cols()));
  for (double x : w)
    if (!std::isfinite(x)) throw argument_error(std::string(op) + ": a weight is not finite");
  if (is_factorwise(o.mode))
    for (std::size_t i = 1; i < a.size(); ++i)
      if (a[i].rank() != a[0].rank())
        throw rank_error(std::string(op) + ": mode " + std::string(mode_name(o.mode)) +
                         " combines the A's and B's entrywise and needs equal ranks; adapter 0 has r = " +
                         std::to_string(a[0].rank()) + ", adapter " + std::to_string(i) + " r = " +
                         std::to_string(a[i].rank()) + " (cat, svd and linear_exact take mixed ranks)");
  if (o.svd_rank < 0) throw argument_error(std::string(op) + ": svd_rank must be ≥ 0");
  if (o.svd_clamp && !(*o.svd_clamp >= 0 && *o.svd_clamp <= 1))
    throw argument_error(std::string(op) + ": svd_clamp is a quantile in [0, 1]; got " + std::to_string(*o.svd_clamp));
  check_density(o, op);
}

template <class T>
index_t svd_rank_of(std::span<const low_rank<T>> a, const merge_options& o) {
  if (o.svd_rank > 0) return o.svd_rank;
  index_t r = 0;
  for (const auto& x : a) r = std::max(r, x.rank());
  return r;
}

template <class T>
low_rank<double> merge_impl(std::span<const low_rank<T>> a, std::span<const double> w, const merge_options& o,
                            std::string_view module, const char* op) {
  check_inputs(a, w, o, op);
  const std::size_t n = a.size();
  const index_t out = a[0].rows(), in = a[0].cols();
  const merge_mode m = o.mode;
  if (is_factorwise(m)) {
    std::vector<mat> As, Bs;
    std::vector<double> wa, wb;
    for (std::size_t i = 0; i < n; ++i) {
      const double ws = w[i] * a[i].scale();
      const double r = std::sqrt(std::abs(ws));
      wa.push_back(ws >= 0 ? r : -r);  // the sign goes on A only
      wb.push_back(r);
      As.push_back(to_mat(a[i].A()));
      Bs.push_back(to_mat(a[i].B()));
    }
    const mat A = combine(std::move(As), wa, o, dare_target::A, module);
    const mat B = combine(std::move(Bs), wb, o, dare_target::B, module);
    return owned_low_rank(B, A, 1.0);
  }
  index_t R = 0;
  for (const auto& x : a) R += x.rank();
  if (m == merge_mode::cat || m == merge_mode::svd || m == merge_mode::linear_exact) {
    mat Bs(out, R), As(R, in);
    index_t c = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const index_t r = a[i].rank();
      Bs.middleCols(c, r) = to_mat(a[i].B());
      As.middleRows(c, r) = (w[i] * a[i].scale()) * to_mat(a[i].A());
      c += r;
    }
    if (m == merge_mode::cat) return owned_low_rank(Bs, As, 1.0);
    mat US, Vt;
    Eigen::VectorXd S;
    factored_svd(Bs, As, US, Vt, S);
    if (m == merge_mode::svd) {
      const index_t k = std::min<index_t>(svd_rank_of(a, o), std::min(out, in));
      const index_t q = std::min<index_t>(k, index_t(S.size()));
      return svd_factors(US.leftCols(q), Vt.topRows(q), k, o.svd_clamp);
    }
    const double tol = o.exact_tolerance > 0 ? o.exact_tolerance : 64 * std::numeric_limits<double>::epsilon() * double(R);
    index_t keep = 0;
    while (keep < S.size() && S[keep] > tol * S[0]) ++keep;
    keep = std::max<index_t>(keep, 1);
    return owned_low_rank(US.leftCols(keep), Vt.topRows(keep), 1.0);
  }
  // Materializing modes: entrywise on the dense ΔW_i = s_i·B_i·A_i, then truncated SVD.
  std::vector<mat> D;
  std::vector<double> wv(w.begin(), w.end());
  for (std::size_t i = 0; i < n; ++i) D.push_back(a[i].scale() * (to_mat(a[i].B()) * to_mat(a[i].A())));
  const mat M = combine(std::move(D), wv, o, dare_target::delta, module);
  const Eigen::BDCSVD<mat> svd(M, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const index_t k = std::min<index_t>(svd_rank_of(a, o), std::min(out, in));
  return svd_factors(svd.matrixU().leftCols(k) * svd.singularValues().head(k).asDiagonal(),
                     svd.matrixV().leftCols(k).transpose(), k, o.svd_clamp);
}
}  // namespace detail

/// Merges the updates `a` with weights `w` under options.mode, without forming any out×in
/// matrix. The result is a low_rank<double> (scale 1 for every mode). Throws argument_error
/// for the materializing modes (use merge_materializing), a missing or out-of-range density,
/// or mismatched counts; shape_error when the updates differ in shape; rank_error when a
/// factorwise mode (linear, ties, dare_*, magnitude_prune) gets mixed ranks.
template <class T>
low_rank<double> merge(std::span<const low_rank<T>> a, std::span<const double> w, const merge_options& o) {
  if (is_materializing(o.mode))
    throw argument_error("deltaw::compose::merge: mode " + std::string(mode_name(o.mode)) +
                         " prunes entries of the dense out×in ΔW_i; call deltaw::compose::merge_materializing");
  return detail::merge_impl(a, w, o, {}, "deltaw::compose::merge");
}

/// As merge(), and also the modes defined on the entries of the dense ΔW_i (ties_svd,
/// dare_linear_svd, dare_ties_svd, magnitude_prune_svd), which allocate N + 1 out×in
/// matrices and an SVD of one.
template <class T>
low_rank<double> merge_materializing(std::span<const low_rank<T>> a, std::span<const double> w,
                                     const merge_options& o) {
  return detail::merge_impl(a, w, o, {}, "deltaw::compose::merge_materializing");
}

/// ‖r − Σ_i w_i·ΔW_i‖_F in factored form: the difference is Bs·As with the stacked factors
/// Bs = [s_r·B_r, B_1, …], As = [A_r; −w_1 s_1 A_1; …] (R = r + Σ r_i columns), and with
/// Bs = Qb·Rb, Asᵀ = Qa·Ra, ‖Bs·As‖_F = ‖Rb·Raᵀ‖_F (an R×R core; no out×in matrix). The QRs
/// keep the accuracy at rounding of the terms (Gram matrices would square the condition and
/// lose half the digits to cancellation when the result nearly equals the sum).
template <class T, class U>
double factored_error(const low_rank<U>& r, std::span<const low_rank<T>> a, std::span<const double> w) {
  if (a.size() != w.size())
    throw argument_error("deltaw::compose::factored_error: " + std::to_string(a.size()) + " adapters but " +
                         std::to_string(w.size()) + " weights");
  index_t R = r.rank();
  for (const auto& x : a) {
    if (x.rows() != r.rows() || x.cols() != r.cols())
      throw shape_error("deltaw::compose::factored_error: an update is " +
                        deltaw::detail::shape_str(x.rows(), x.cols()) + " but the result is " +
                        deltaw::detail::shape_str(r.rows(), r.cols()));
    R += x.rank();
  }
  detail::mat Bs(r.rows(), R), As(R, r.cols());
  Bs.leftCols(r.rank()) = r.scale() * detail::to_mat(r.B());
  As.topRows(r.rank()) = detail::to_mat(r.A());
  index_t c = r.rank();
  for (std::size_t i = 0; i < a.size(); ++i) {
    Bs.middleCols(c, a[i].rank()) = detail::to_mat(a[i].B());
    As.middleRows(c, a[i].rank()) = (-w[i] * a[i].scale()) * detail::to_mat(a[i].A());
    c += a[i].rank();
  }
  return detail::stacked_norm(Bs, As);
}

/// ‖Σ_i w_i·ΔW_i‖_F in factored form (the denominator of a relative error).
template <class T>
double factored_norm(std::span<const low_rank<T>> a, std::span<const double> w) {
  index_t R = 0;
  for (const auto& x : a) R += x.rank();
  if (a.empty()) return 0;
  detail::mat Bs(a[0].rows(), R), As(R, a[0].cols());
  index_t c = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    Bs.middleCols(c, a[i].rank()) = detail::to_mat(a[i].B());
    As.middleRows(c, a[i].rank()) = (w[i] * a[i].scale()) * detail::to_mat(a[i].A());
    c += a[i].rank();
  }
  return detail::stacked_norm(Bs, As);
}

/// The same on vectors (spans of non-const elements do not deduce T).
template <class T>
low_rank<double> merge(const std::vector<low_rank<T>>& a, const std::vector<double>& w, const merge_options& o) {
  return merge(std::span<const low_rank<T>>(a), std::span<const double>(w), o);
}
template <class T>
low_rank<double> merge_materializing(const std::vector<low_rank<T>>& a, const std::vector<double>& w,
                                     const merge_options& o) {
  return merge_materializing(std::span<const low_rank<T>>(a), std::span<const double>(w), o);
}
template <class T, class U>
double factored_error(const low_rank<U>& r, const std::vector<low_rank<T>>& a, const std::vector<double>& w) {
  return factored_error(r, std::span<const low_rank<T>>(a), std::span<const double>(w));
}
template <class T>
double factored_norm(const std::vector<low_rank<T>>& a, const std::vector<double>& w) {
  return factored_norm(std::span<const low_rank<T>>(a), std::span<const double>(w));
}

}  // namespace compose
DELTAW_NAMESPACE_END
