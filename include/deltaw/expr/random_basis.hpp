// SPDX-License-Identifier: MIT
// The random-basis family: NOLA, VeRA, RandLoRA. Their frozen bases are functions of a
// seed (core/random.hpp), regenerated tile by tile by the evaluators and never stored;
// only the trainable coefficients are held.
//
// Every entry of a basis is `law(bits(seed, tensor id, flat index))`, the flat index being
// the entry's row-major position in the basis' full (shared) shape, so a slice, a tile or a
// single entry is regenerated identically on any thread or device.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../core/random.hpp"
#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

namespace detail {
inline void check_nonneg_dims(index_t out, index_t in, const char* op) {
  if (out < 0 || in < 0) throw shape_error(std::string(op) + ": negative shape " + shape_str(out, in));
}
inline void check_rank(index_t r, const char* op) {
  if (r < 1) throw rank_error(std::string(op) + ": the rank r must be at least 1; got " + std::to_string(r));
}
inline index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }
template <class HV>
using held_vector_value_t = std::remove_const_t<typename decltype(HV::view)::element_type>;
}  // namespace detail

// ─────────────────────────────────────────────────────────────────────────────────────────
// NOLA (Koohpayegani et al. 2024, arXiv:2310.02556)
// ─────────────────────────────────────────────────────────────────────────────────────────

/// The distribution choices of NOLA that the paper leaves open. Zero means "the default".
/// UNVERIFIED against the authors' code: bases U(−1, 1)/√k (A) and U(−1, 1)/√l (B); the
/// frozen A₀ kaiming-uniform as nn.Linear's default (a = √5), i.e. U(−1/√in, 1/√in).
struct nola_options {
  bool frozen_a0 = true;       ///< include the frozen A₀ in A
  double a0_bound = 0.0;       ///< 0 → 1/√in
  double a_basis_bound = 0.0;  ///< 0 → 1/√k
  double b_basis_bound = 0.0;  ///< 0 → 1/√l
};

/// NOLA: ΔW = s·B·A, A = A₀ + Σᵢ αᵢ·Aᵢ (k bases [r, in]), B = Σⱼ βⱼ·Bⱼ (l bases
/// [out, r]), s = α/r. Holds the coefficients α [k], β [l] and a seed.
///
/// Tensor ids under the seed: A₀ → 0, Aᵢ → 2³² + i, Bⱼ → 2·2³² + j. Entry (row, col) of an
/// A basis has flat index row·in + col, of a B basis row·r + col.
template <class T, class Device = device::cpu>
class nola_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;

  nola_update(index_t out, index_t in, index_t r, std::uint64_t seed, held_vector<T, Device> a_coef,
              held_vector<T, Device> b_coef, double s, nola_options opt = {})
      : out_(out), in_(in), r_(r), seed_(seed), a_(std::move(a_coef)), b_(std::move(b_coef)),
        scale_(detail::checked_scale(s, "deltaw::nola")), opt_(opt) {
    constexpr const char* op = "deltaw::nola";
    detail::check_nonneg_dims(out, in, op);
    detail::check_rank(r, op);
    if (a_.view.size() < 1 || b_.view.size() < 1)
      throw argument_error(std::string(op) + ": NOLA needs at least one basis per factor; got k = " +
                           std::to_string(a_.view.size()) + " A coefficients and l = " +
                           std::to_string(b_.view.size()) + " B coefficients");
    for (double bound : {opt.a0_bound, opt.a_basis_bound, opt.b_basis_bound})
      if (!std::isfinite(bound) || bound < 0)
        throw argument_error(std::string(op) + ": basis bounds must be finite and non-negative; got " +
                             std::to_string(bound));
  }

  index_t rows() const { return out_; }
  index_t cols() const { return in_; }
  index_t rank() const { return r_; }
  index_t num_a_bases() const { return a_.view.size(); }
  index_t num_b_bases() const { return b_.view.size(); }
  double scale() const { return scale_; }
  std::uint64_t seed() const { return seed_; }
  const nola_options& options() const { return opt_; }
  const vector_view<const T, Device>& a_coefficients() const { return a_.view; }
  const vector_view<const T, Device>& b_coefficients() const { return b_.view; }
  /// Calls f(name, view) for every view ΔW reads (the bases are drawn, not read) (the aliasing checks of the
  /// operations that write).
  template <class F>
  void for_each_operand(F&& f) const {
    f("a_coef", a_.view);
    f("b_coef", b_.view);
  }

  /// The frozen A₀ [r, in].
  basis_entries a0() const {
    const double b = opt_.a0_bound > 0 ? opt_.a0_bound : (in_ > 0 ? 1.0 / std::sqrt(double(in_)) : 0.0);
    return {random_stream{seed_, 0}, basis_law::uniform, b, 0.0};
  }
  /// Basis Aᵢ [r, in].
  basis_entries a_basis(index_t i) const {
    const double b = opt_.a_basis_bound > 0 ? opt_.a_basis_bound : 1.0 / std::sqrt(double(num_a_bases()));
    return {random_stream{seed_, (std::uint64_t(1) << 32) + std::uint64_t(i)}, basis_law::uniform, b, 0.0};
  }
  /// Basis Bⱼ [out, r].
  basis_entries b_basis(index_t j) const {
    const double b = opt_.b_basis_bound > 0 ? opt_.b_basis_bound : 1.0 / std::sqrt(double(num_b_bases()));
    return {random_stream{seed_, (std::uint64_t(2) << 32) + std::uint64_t(j)}, basis_law::uniform, b, 0.0};
  }

  /// The k + l coefficients (the seed is not a parameter).
  index_t parameter_count() const { return num_a_bases() + num_b_bases(); }
  /// Forming A and B (2·r·(k·in + l·out), plus r·in for A₀) and the two rank-r products.
  index_t flop_count(index_t tokens) const {
    return 2 * tokens * r_ * (in_ + out_) + 2 * r_ * (num_a_bases() * in_ + num_b_bases() * out_) +
           (opt_.frozen_a0 ? r_ * in_ : 0);
  }

  nola_update with_scale(double s) const { return nola_update(out_, in_, r_, seed_, a_, b_, s, opt_); }

 private:
  index_t out_, in_, r_;
  std::uint64_t seed_;
  held_vector<T, Device> a_, b_;
  double scale_;
  nola_options opt_;
};

namespace detail {
template <class FA, class FB>
auto make_nola(index_t out, index_t in, index_t r, std::uint64_t seed, FA&& a, FB&& b, double s, nola_options opt) {
  auto ha = hold_vector(std::forward<FA>(a));
  auto hb = hold_vector(std::forward<FB>(b));
  static_assert(std::is_same_v<decltype(ha), decltype(hb)>,
                "deltaw::nola: the A and B coefficient vectors must have the same element type and device");
  using T = held_vector_value_t<decltype(ha)>;
  return nola_update<T, typename decltype(ha.view)::device_type>(out, in, r, seed, std::move(ha), std::move(hb), s,
                                                                 opt);
}
}  // namespace detail

/// NOLA with s = α/r. a_coef [k] and b_coef [l]: Eigen vectors or vector_views.
template <class FA, class FB>
auto nola(index_t out, index_t in, index_t r, std::uint64_t seed, FA&& a_coef, FB&& b_coef, alpha a,
          nola_options opt = {}) {
  detail::check_rank(r, "deltaw::nola");
  if (!std::isfinite(a.value)) throw non_finite_error("deltaw::nola: alpha must be finite, got " + std::to_string(a.value));
  return detail::make_nola(out, in, r, seed, std::forward<FA>(a_coef), std::forward<FB>(b_coef), a.value / double(r),
                           opt);
}
/// NOLA with an explicit scale s.
template <class FA, class FB>
auto nola(index_t out, index_t in, index_t r, std::uint64_t seed, FA&& a_coef, FB&& b_coef, scale s = scale(1.0),
          nola_options opt = {}) {
  return detail::make_nola(out, in, r, seed, std::forward<FA>(a_coef), std::forward<FB>(b_coef), s.value, opt);
}

// ─────────────────────────────────────────────────────────────────────────────────────────
// VeRA (Kopiczko et al. 2024, arXiv:2310.11454)
// ─────────────────────────────────────────────────────────────────────────────────────────

/// The frozen pair shared by all VeRA layers: A [r, in_max] (tensor 0) and B [out_max, r]
/// (tensor 1), kaiming-uniform with gain √2 as PEFT's VeRA: U(±√(6/fan_in)), fan_in = in_max
/// for A and r for B. Plain data.
struct vera_basis {
  std::uint64_t seed = 0;
  index_t r = 0, out_max = 0, in_max = 0;

  basis_entries A() const {
    return {random_stream{seed, 0}, basis_law::uniform, std::sqrt(6.0 / double(in_max)), 0.0};
  }
  basis_entries B() const {
    return {random_stream{seed, 1}, basis_law::uniform, std::sqrt(6.0 / double(r)), 0.0};
  }
  /// Flat indices in the shared shapes.
  std::uint64_t a_index(index_t k, index_t j) const { return std::uint64_t(k) * std::uint64_t(in_max) + std::uint64_t(j); }
  std::uint64_t b_index(index_t i, index_t k) const { return std::uint64_t(i) * std::uint64_t(r) + std::uint64_t(k); }
};

/// The shared VeRA bases for layers up to [out_max, in_max].
inline vera_basis vera_shared_basis(std::uint64_t seed, index_t r, index_t out_max, index_t in_max) {
  constexpr const char* op = "deltaw::vera_shared_basis";
  detail::check_rank(r, op);
  if (out_max < 1 || in_max < 1)
    throw shape_error(std::string(op) + ": the largest layer shape must be positive; got " +
                      detail::shape_str(out_max, in_max));
  return vera_basis{seed, r, out_max, in_max};
}

/// VeRA: ΔW = diag(λ_b)·B·diag(λ_d)·A with the top-left [out, r] / [r, in] slices of the
/// shared bases; λ_d [r] (PEFT init 0.1), λ_b [out] (init 0).
template <class T, class Device = device::cpu>
class vera_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;

  vera_update(const vera_basis& basis, index_t out, index_t in, held_vector<T, Device> lambda_d,
              held_vector<T, Device> lambda_b)
      : basis_(basis), out_(out), in_(in), d_(std::move(lambda_d)), b_(std::move(lambda_b)) {
    constexpr const char* op = "deltaw::vera";
    detail::check_nonneg_dims(out, in, op);
    detail::check_rank(basis.r, op);
    if (out > basis.out_max || in > basis.in_max)
      throw shape_error(std::string(op) + ": the layer " + detail::shape_str(out, in) +
                        " does not fit the shared bases made for layers up to " +
                        detail::shape_str(basis.out_max, basis.in_max));
    if (d_.view.size() != basis.r)
      throw shape_error(std::string(op) + ": lambda_d has " + std::to_string(d_.view.size()) +
                        " entries; the shared bases have rank r = " + std::to_string(basis.r));
    if (b_.view.size() != out)
      throw shape_error(std::string(op) + ": lambda_b has " + std::to_string(b_.view.size()) +
                        " entries; the layer has out = " + std::to_string(out) + " rows");
  }

  index_t rows() const { return out_; }
  index_t cols() const { return in_; }
  index_t rank() const { return basis_.r; }
  const vera_basis& basis() const { return basis_; }
  const vector_view<const T, Device>& lambda_d() const { return d_.view; }
  const vector_view<const T, Device>& lambda_b() const { return b_.view; }
  /// Calls f(name, view) for every view ΔW reads (the bases are drawn, not read) (the aliasing checks of the
  /// operations that write).
  template <class F>
  void for_each_operand(F&& f) const {
    f("lambda_d", d_.view);
    f("lambda_b", b_.view);
  }

  /// r + out.
  index_t parameter_count() const { return rank() + rows(); }
  /// Two rank-r products and the two diagonal scalings.
  index_t flop_count(index_t tokens) const {
    return 2 * tokens * rank() * (in_ + out_) + rank() * in_ + out_ * rank();
  }

 private:
  vera_basis basis_;
  index_t out_, in_;
  held_vector<T, Device> d_, b_;
};

/// VeRA over a layer [out, in]; lambda_d [r] and lambda_b [out] as Eigen vectors or views.
template <class FD, class FB>
auto vera(const vera_basis& basis, index_t out, index_t in, FD&& lambda_d, FB&& lambda_b) {
  auto hd = hold_vector(std::forward<FD>(lambda_d));
  auto hb = hold_vector(std::forward<FB>(lambda_b));
  static_assert(std::is_same_v<decltype(hd), decltype(hb)>,
                "deltaw::vera: lambda_d and lambda_b must have the same element type and device");
  using T = detail::held_vector_value_t<decltype(hd)>;
  return vera_update<T, typename decltype(hd.view)::device_type>(basis, out, in, std::move(hd), std::move(hb));
}

// ─────────────────────────────────────────────────────────────────────────────────────────
// RandLoRA (Albert et al. 2025, arXiv:2502.00987)
// ─────────────────────────────────────────────────────────────────────────────────────────

/// How RandLoRA's bases are drawn, each normalised to unit standard deviation:
/// dense: kaiming-uniform, i.e. U(−√3, √3) after normalisation; sparse: ternary with
/// P(±1) = 1/6; very_sparse: ternary with P(±1) = 1/(2√D), D = the shared min_dim.
/// The normalisation uses the exact standard deviation of the law (√(1/3)·bound, √(2p)),
/// not PEFT's empirical std of the drawn tensor: the latter needs a pass over the whole
/// max_dim × N × r basis, the thing deltaw never forms; the two differ by O(1/√size).
enum class randlora_kind : std::uint8_t { dense, sparse, very_sparse };

/// The frozen bases shared by all RandLoRA layers (PEFT's randlora_A [r, 1, min_dim] and
/// randlora_B [max_dim, N, r], N = ⌈min_dim/r⌉). Tensor 0 is A, entry (k, j) at flat index
/// k·min_dim + j; tensor 1 is B, entry (i, b, k) at (i·N + b)·r + k. Plain data.
struct randlora_basis {
  std::uint64_t seed = 0;
  index_t r = 0, max_dim = 0, min_dim = 0, num_bases = 0;
  randlora_kind kind = randlora_kind::dense;

  double ternary_p() const {
    return kind == randlora_kind::sparse ? 1.0 / 6.0 : 1.0 / (2.0 * std::sqrt(double(min_dim)));
  }
  basis_entries entries(std::uint64_t tensor) const {
    if (kind == randlora_kind::dense) return {random_stream{seed, tensor}, basis_law::uniform, std::sqrt(3.0), 0.0};
    const double p = ternary_p();
    return {random_stream{seed, tensor}, basis_law::ternary, 1.0 / std::sqrt(2.0 * p), p};
  }
  basis_entries A() const { return entries(0); }
  basis_entries B() const { return entries(1); }
  std::uint64_t a_index(index_t k, index_t j) const { return std::uint64_t(k) * std::uint64_t(min_dim) + std::uint64_t(j); }
  std::uint64_t b_index(index_t i, index_t b, index_t k) const {
    return (std::uint64_t(i) * std::uint64_t(num_bases) + std::uint64_t(b)) * std::uint64_t(r) + std::uint64_t(k);
  }
};

/// The shared RandLoRA bases for layers up to [out_max, in_max] (PEFT: the largest out and
/// the largest in over the adapted layers).
inline randlora_basis randlora_shared_basis(std::uint64_t seed, index_t r, index_t out_max, index_t in_max,
                                            randlora_kind kind = randlora_kind::dense) {
  constexpr const char* op = "deltaw::randlora_shared_basis";
  detail::check_rank(r, op);
  if (out_max < 1 || in_max < 1)
    throw shape_error(std::string(op) + ": the largest layer shape must be positive; got " +
                      detail::shape_str(out_max, in_max));
  const index_t mn = std::min(out_max, in_max), mx = std::max(out_max, in_max);
  return randlora_basis{seed, r, mx, mn, detail::ceil_div(mn, r), kind};
}

/// RandLoRA: ΔW = s·D (out ≥ in) or s·Dᵀ (out < in), D = U·V [max_dim, min_dim] with
///   U [max_dim, N·r], column c = B[:, c / r, c % r]       (PEFT: randlora_B.flatten(1))
///   V [N·r, min_dim], row c = λ[k, b]·A[k, :]∘γ[b, :] with k = c / N, b = c % N
///                                                         (PEFT: (λ·A·γ).flatten(0, 1)).
/// The product pairs B's (basis c / r, rank c % r) with λ's (rank c / N, basis c % N):
/// PEFT's pairing, kept exactly so PEFT checkpoints (λ, γ) load unchanged. It equals the
/// paper's Σ_b B_b·Λ_b·A·Γ_b only when N = 1 or r = 1.
/// λ [r, N] (init 0), γ [N, min_dim] (init 1/max(N, min_dim)), s = α/r.
template <class T, class Device = device::cpu>
class randlora_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;

  randlora_update(const randlora_basis& basis, index_t out, index_t in, held_matrix<T, Device> lambda,
                  held_matrix<T, Device> gamma, double s)
      : basis_(basis), out_(out), in_(in), lambda_(std::move(lambda)), gamma_(std::move(gamma)),
        scale_(detail::checked_scale(s, "deltaw::randlora")) {
    constexpr const char* op = "deltaw::randlora";
    detail::check_nonneg_dims(out, in, op);
    detail::check_rank(basis.r, op);
    if (max_dim() > basis.max_dim || min_dim() > basis.min_dim)
      throw shape_error(std::string(op) + ": the layer " + detail::shape_str(out, in) + " needs bases with max_dim ≥ " +
                        std::to_string(max_dim()) + " and min_dim ≥ " + std::to_string(min_dim()) +
                        "; the shared bases have max_dim " + std::to_string(basis.max_dim) + " and min_dim " +
                        std::to_string(basis.min_dim));
    const auto& L = lambda_.view;
    const auto& G = gamma_.view;
    if (L.rows() != basis.r || L.cols() != num_bases())
      throw shape_error(std::string(op) + ": lambda is " + detail::shape_str(L.rows(), L.cols()) + "; expected [r, N] = " +
                        detail::shape_str(basis.r, num_bases()) + " for the layer " + detail::shape_str(out, in));
    if (G.rows() != num_bases() || G.cols() != min_dim())
      throw shape_error(std::string(op) + ": gamma is " + detail::shape_str(G.rows(), G.cols()) +
                        "; expected [N, min_dim] = " + detail::shape_str(num_bases(), min_dim()) + " for the layer " +
                        detail::shape_str(out, in));
  }

  index_t rows() const { return out_; }
  index_t cols() const { return in_; }
  index_t rank() const { return basis_.r; }
  index_t min_dim() const { return std::min(out_, in_); }
  index_t max_dim() const { return std::max(out_, in_); }
  /// N = ⌈min_dim / r⌉: enough bases for full rank.
  index_t num_bases() const { return detail::ceil_div(min_dim(), basis_.r); }
  /// True when ΔW = s·Dᵀ (out < in: the roles of the dimensions swap).
  bool transposed() const { return out_ < in_; }
  double scale() const { return scale_; }
  const randlora_basis& basis() const { return basis_; }
  const matrix_view<const T, Device>& lambda() const { return lambda_.view; }
  const matrix_view<const T, Device>& gamma() const { return gamma_.view; }
  /// Calls f(name, view) for every view ΔW reads (the bases are drawn, not read) (the aliasing checks of the
  /// operations that write).
  template <class F>
  void for_each_operand(F&& f) const {
    f("lambda", lambda_.view);
    f("gamma", gamma_.view);
  }

  /// N·r + N·min_dim.
  index_t parameter_count() const { return num_bases() * rank() + num_bases() * min_dim(); }
  /// Two products through the N·r inner dimension, plus forming V (2·N·r·min_dim).
  index_t flop_count(index_t tokens) const {
    const index_t nr = num_bases() * rank();
    return 2 * tokens * nr * (in_ + out_) + 2 * nr * min_dim();
  }

  randlora_update with_scale(double s) const { return randlora_update(basis_, out_, in_, lambda_, gamma_, s); }

 private:
  randlora_basis basis_;
  index_t out_, in_;
  held_matrix<T, Device> lambda_, gamma_;
  double scale_;
};

namespace detail {
template <class FL, class FG>
auto make_randlora(const randlora_basis& basis, index_t out, index_t in, FL&& lambda, FG&& gamma, double s) {
  auto hl = hold(std::forward<FL>(lambda));
  auto hg = hold(std::forward<FG>(gamma));
  static_assert(std::is_same_v<decltype(hl), decltype(hg)>,
                "deltaw::randlora: lambda and gamma must have the same element type and device");
  using T = std::remove_const_t<typename decltype(hl.view)::element_type>;
  return randlora_update<T, typename decltype(hl.view)::device_type>(basis, out, in, std::move(hl), std::move(hg), s);
}
}  // namespace detail

/// RandLoRA with s = α/r (PEFT defaults r = 32, α = 640). lambda [r, N], gamma [N, min_dim].
template <class FL, class FG>
auto randlora(const randlora_basis& basis, index_t out, index_t in, FL&& lambda, FG&& gamma, alpha a) {
  if (!std::isfinite(a.value))
    throw non_finite_error("deltaw::randlora: alpha must be finite, got " + std::to_string(a.value));
  detail::check_rank(basis.r, "deltaw::randlora");
  return detail::make_randlora(basis, out, in, std::forward<FL>(lambda), std::forward<FG>(gamma),
                               a.value / double(basis.r));
}
/// RandLoRA with an explicit scale s.
template <class FL, class FG>
auto randlora(const randlora_basis& basis, index_t out, index_t in, FL&& lambda, FG&& gamma, scale s = scale(1.0)) {
  return detail::make_randlora(basis, out, in, std::forward<FL>(lambda), std::forward<FG>(gamma), s.value);
}

DELTAW_NAMESPACE_END
