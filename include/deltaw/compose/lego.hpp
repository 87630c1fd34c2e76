// SPDX-License-Identifier: MIT
// LoRA-LEGO (Zhao et al., "Merging LoRAs like Playing LEGO", 2024): every rank of every
// adapter is a unit (b_j, a_j), a column of B and the matching row of A, whose product b_j·a_j
// is one rank-1 term of ΔW. All units of N adapters are pooled, clustered by k-means on the
// vectors [a_j; b_j], and the k centroids become one rank-k LoRA. The "dual reweighting"
// undoes the shrinking of averaged units: parameter reweighting rescales each centroid to its
// members' mean norm; output reweighting scales the merged update by √(r/k).
//
// UNVERIFIED details (options; see docs/compose.md): how a unit carries the adapter's
// weight·scale (split as √|w·s| on both vectors by default), whether the norm is matched on
// [a; b] jointly or on a and b separately, which r the output factor uses (the largest input
// rank by default), and whether units are sign-canonicalised first ((b, a) and (−b, −a) are
// the same term; off by default, as in the paper's clustering of raw parameters).
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "../linalg/kmeans.hpp"
#include "merge.hpp"

DELTAW_NAMESPACE_BEGIN
namespace compose {

/// How adapter i's factor w_i·s_i enters its units (b, a).
enum class lego_unit_scaling : unsigned char {
  balanced,  ///< b·√|w s| and a·sgn(w s)·√|w s|  (default; UNVERIFIED)
  on_a,      ///< b and a·w·s
};
/// Parameter reweighting: each centroid rescaled to its members' mean norm.
enum class lego_norm : unsigned char {
  none,
  joint,       ///< ‖[ā; b̄]‖ := mean ‖[a; b]‖ (default; UNVERIFIED)
  per_factor,  ///< ‖ā‖ := mean ‖a‖ and ‖b̄‖ := mean ‖b‖
};
/// Output reweighting: the merged update's scale.
enum class lego_output : unsigned char {
  none,           ///< scale 1
  sqrt_r_over_k,  ///< √(r/k), r the largest input rank (default; UNVERIFIED which r)
};

struct lego_options {
  index_t k = 0;  ///< the merged rank (number of clusters); 0 → the largest input rank
  lego_unit_scaling unit_scaling = lego_unit_scaling::balanced;
  lego_norm norm = lego_norm::joint;
  lego_output output = lego_output::sqrt_r_over_k;
  /// Flip each unit so that the entry of largest magnitude of its a is positive.
  bool canonical_sign = false;
  kmeans_options kmeans{};
};

struct lego_result {
  low_rank<double> lora;        ///< rank k: B [out, k], A [k, in], the output scale
  std::vector<index_t> labels;  ///< cluster of each unit (adapter 0's ranks first, …)
  double inertia = 0;           ///< k-means' Σ ‖unit − centroid‖²
};

/// LoRA-LEGO merge of the updates `a` with weights `w` into one rank-k LoRA. Forms only the
/// units [Σ r_i, in + out] and the k centroids. Throws argument_error when k exceeds the
/// number of units or the counts differ, shape_error when the updates differ in shape.
template <class T>
lego_result lora_lego(const std::vector<low_rank<T>>& a, const std::vector<double>& w, const lego_options& o = {}) {
  constexpr const char* op = "deltaw::compose::lora_lego";
  if (a.empty()) throw argument_error(std::string(op) + ": no adapters to merge");
  if (a.size() != w.size())
    throw argument_error(std::string(op) + ": " + std::to_string(a.size()) + " adapters but " +
                         std::to_string(w.size()) + " weights");
  const index_t out = a[0].rows(), in = a[0].cols();
  index_t n = 0, rmax = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].rows() != out || a[i].cols() != in)
      throw shape_error(std::string(op) + ": adapter " + std::to_string(i) + " updates a " +
                        deltaw::detail::shape_str(a[i].rows(), a[i].cols()) + " weight but adapter 0 a " +
                        deltaw::detail::shape_str(out, in));
    n += a[i].rank();
    rmax = std::max(rmax, a[i].rank());
  }
  const index_t k = o.k > 0 ? o.k : rmax;
  if (k > n)
    throw argument_error(std::string(op) + ": k = " + std::to_string(k) + " clusters but only " + std::to_string(n) +
                         " rank-1 units");
  // Units: row u = [a_u (in) | b_u (out)].
  detail::mat U(n, in + out);
  index_t row = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double ws = w[i] * a[i].scale();
    const double sa = o.unit_scaling == lego_unit_scaling::balanced ? (ws < 0 ? -1 : 1) * std::sqrt(std::abs(ws)) : ws;
    const double sb = o.unit_scaling == lego_unit_scaling::balanced ? std::sqrt(std::abs(ws)) : 1.0;
    for (index_t j = 0; j < a[i].rank(); ++j, ++row) {
      for (index_t c = 0; c < in; ++c) U(row, c) = sa * deltaw::convert<double>(a[i].A()(j, c));
      for (index_t c = 0; c < out; ++c) U(row, in + c) = sb * deltaw::convert<double>(a[i].B()(c, j));
      if (o.canonical_sign) {
        Eigen::Index p = 0;
        U.row(row).head(in).cwiseAbs().maxCoeff(&p);
        if (U(row, p) < 0) U.row(row) *= -1;
      }
    }
  }
  const auto km = kmeans<double>(U, k, o.kmeans);
  detail::mat C = km.centroids.template cast<double>();
  if (o.norm != lego_norm::none) {
    std::vector<double> na(std::size_t(k), 0), nb(std::size_t(k), 0), nj(std::size_t(k), 0), cnt(std::size_t(k), 0);
    for (index_t u = 0; u < n; ++u) {
      const auto c = std::size_t(km.labels[std::size_t(u)]);
      na[c] += U.row(u).head(in).norm();
      nb[c] += U.row(u).tail(out).norm();
      nj[c] += U.row(u).norm();
      cnt[c] += 1;
    }
    for (index_t c = 0; c < k; ++c) {
      const auto cc = std::size_t(c);
      if (cnt[cc] == 0) continue;
      auto rescale = [&](auto&& seg, double target) {
        const double cur = seg.norm();
        if (cur > 0) seg *= target / cnt[cc] / cur;
      };
      if (o.norm == lego_norm::joint) rescale(C.row(c), nj[cc]);
      else {
        rescale(C.row(c).head(in), na[cc]);
        rescale(C.row(c).tail(out), nb[cc]);
      }
    }
  }
  const double scale = o.output == lego_output::sqrt_r_over_k ? std::sqrt(double(rmax) / double(k)) : 1.0;
  return lego_result{detail::owned_low_rank(C.rightCols(out).transpose(), C.leftCols(in), scale), km.labels,
                     km.inertia};
}

}  // namespace compose
DELTAW_NAMESPACE_END
