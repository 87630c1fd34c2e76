// SPDX-License-Identifier: MIT
// LoLDU (Shi et al. 2024, arXiv:2410.13618): an update built on the partial-pivot LDU
// decomposition of the frozen weight, W = P·L·diag(D)·U, of which only the r leading
// diagonal entries are trained.
//
// How this type represents the method. The reference keeps a residual weight
//     W_res = W − σ₀·P·L_r·diag(z₀)·U_r,   z₀ = D[:r], σ₀ = α/r,
// and computes W' = W_res + σ·P·L_r·diag(z)·U_r. Rewriting W' = W + ΔW gives
//     ΔW = P·L_r·diag(σ·z − σ₀·z₀)·U_r,
// which is what this type stores: the frozen P, L_r, U_r, the initial values z₀ and σ₀,
// and the current z and σ. W itself is never touched (no W_res copy), so LoLDU composes
// in the lazy sum W + Δ₁ + … like any other update, merge/unmerge are W ± ΔW, and at
// initialisation (z = z₀, σ = σ₀) every coefficient σ·z_i − σ₀·z₀_i is exactly 0 in
// floating point: the initial output is X·Wᵀ bit for bit, not up to the rounding of
// W_res + P·L·diag(D)·U. With σ frozen (the default) ΔW = σ·P·L_r·diag(z − z₀)·U_r.
//
// Whether the reference trains σ is UNVERIFIED; `ldu_options::train_sigma` makes it an
// option, which only changes parameter_count (r or r + 1); the formula above already
// covers a σ that moves away from σ₀.
//
// P is a permutation vector, never a matrix: perm[o] = i means row o of W is row i of
// L·diag(D)·U (P[o, perm[o]] = 1, i.e. torch.linalg.lu's P.argmax(dim=1)). L_r [out, r] is
// unit lower-trapezoidal, U_r [r, in] unit upper-trapezoidal; both are checked on the CPU.
//
// The factory that runs the LU, `loldu(W, r, alpha(α))`, is in backend/cpu/ldu.hpp;
// `ldu_from_factors` builds the update from stored factors (e.g. a saved adapter).
#pragma once

#include <cmath>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// Options of LoLDU.
struct ldu_options {
  /// Count σ as a trainable parameter (UNVERIFIED whether the reference trains it).
  bool train_sigma = false;
};

/// ΔW = P·L_r·diag(σ·z − σ₀·z₀)·U_r (see the top of this header).
template <class T, class Device = device::cpu>
class ldu {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;

  ldu(held_vector<index_t, Device> perm, held_matrix<T, Device> L, held_vector<T, Device> z, held_vector<T, Device> z0,
      held_matrix<T, Device> U, double sigma, double sigma0, ldu_options opt = {})
      : perm_(std::move(perm)),
        L_(std::move(L)),
        z_(std::move(z)),
        z0_(std::move(z0)),
        U_(std::move(U)),
        sigma_(detail::checked_scale(sigma, "deltaw::ldu (σ)")),
        sigma0_(detail::checked_scale(sigma0, "deltaw::ldu (σ₀)")),
        opt_(opt) {
    validate();
  }

  index_t rows() const { return L_.view.rows(); }
  index_t cols() const { return U_.view.cols(); }
  index_t rank() const { return L_.view.cols(); }
  /// perm[o]: the row of L·diag(D)·U that row o of W is.
  const vector_view<const index_t, Device>& perm() const { return perm_.view; }
  /// L_r [out, r], unit lower-trapezoidal, in LU (pivoted) row order.
  const matrix_view<const T, Device>& L() const { return L_.view; }
  /// U_r [r, in], unit upper-trapezoidal.
  const matrix_view<const T, Device>& U() const { return U_.view; }
  /// The trained diagonal z [r].
  const vector_view<const T, Device>& z() const { return z_.view; }
  /// Its initial value z₀ = D[:r] [r].
  const vector_view<const T, Device>& z0() const { return z0_.view; }
  /// Calls f(name, view) for every view ΔW reads (the aliasing checks of the
  /// operations that write).
  template <class F>
  void for_each_operand(F&& f) const {
    f("perm", perm_.view);
    f("L", L_.view);
    f("z", z_.view);
    f("z0", z0_.view);
    f("U", U_.view);
  }
  double sigma() const { return sigma_; }
  double sigma0() const { return sigma0_; }
  const ldu_options& options() const { return opt_; }

  /// The i-th diagonal coefficient of ΔW, σ·z_i − σ₀·z₀_i, in double (host views only).
  double coefficient(index_t i) const {
    return sigma_ * double(convert<double>(z_.view[i])) - sigma0_ * double(convert<double>(z0_.view[i]));
  }

  /// r trainable values (the diagonal z), plus σ when it is trained.
  index_t parameter_count() const { return rank() + (opt_.train_sigma ? 1 : 0); }
  /// Extra flops of apply over the base GEMM: Z = X·U_rᵀ and Y += Z·(P·L_r·diag)ᵀ, as
  /// LoRA; the O(out·r) gather of P·L_r·diag(·) is not counted.
  index_t flop_count(index_t tokens) const { return 2 * tokens * rank() * (rows() + cols()); }

  /// The same frozen factors with another trained diagonal z (e.g. a caller-owned
  /// parameter vector: `u.with_z(deltaw::vview(z))`).
  template <class V>
  ldu with_z(V&& z) const {
    auto hz = hold_vector(std::forward<V>(z));
    static_assert(std::is_same_v<decltype(hz), held_vector<T, Device>>,
                  "deltaw::ldu::with_z: z must have the update's element type and device");
    return ldu(perm_, L_, std::move(hz), z0_, U_, sigma_, sigma0_, opt_);
  }
  /// The same update with another σ (σ₀ is kept, so ΔW stays relative to the original W).
  ldu with_sigma(double sigma) const { return ldu(perm_, L_, z_, z0_, U_, sigma, sigma0_, opt_); }

 private:
  void validate() const {
    const auto& L = L_.view;
    const auto& U = U_.view;
    const std::string shapes = "L_r " + detail::shape_str(L.rows(), L.cols()) + ", U_r " +
                               detail::shape_str(U.rows(), U.cols()) + ", z [" + std::to_string(z_.view.size()) +
                               "], z₀ [" + std::to_string(z0_.view.size()) + "], perm [" +
                               std::to_string(perm_.view.size()) + "]";
    if (L.cols() != U.rows() || z_.view.size() != L.cols() || z0_.view.size() != L.cols())
      throw shape_error("deltaw::ldu: L_r [out, r], U_r [r, in], z [r] and z₀ [r] must share r; got " + shapes);
    if (perm_.view.size() != L.rows())
      throw shape_error("deltaw::ldu: the permutation must have one entry per row of W (out); got " + shapes);
    if (L.cols() < 1) throw rank_error("deltaw::ldu: the rank r must be at least 1; got " + shapes);
    if (L.cols() > L.rows() || L.cols() > U.cols())
      throw rank_error("deltaw::ldu: the rank r must be at most min(out, in); got " + shapes);
    if constexpr (std::is_same_v<Device, device::cpu>) {
      std::vector<char> seen(std::size_t(L.rows()), 0);
      for (index_t o = 0; o < perm_.view.size(); ++o) {
        const index_t i = perm_.view[o];
        if (i < 0 || i >= L.rows() || seen[std::size_t(i)])
          throw argument_error("deltaw::ldu: perm is not a permutation of 0.." + std::to_string(L.rows() - 1) +
                               " (entry " + std::to_string(o) + " is " + std::to_string(i) + ")");
        seen[std::size_t(i)] = 1;
      }
      for (index_t j = 0; j < L.cols(); ++j)
        for (index_t i = 0; i <= j; ++i)
          if (convert<double>(L(i, j)) != (i == j ? 1.0 : 0.0))
            throw argument_error("deltaw::ldu: L_r must be unit lower-trapezoidal (L(i, i) = 1, L(i, j) = 0 for j > i); "
                                 "L(" + std::to_string(i) + ", " + std::to_string(j) + ") is " +
                                 std::to_string(convert<double>(L(i, j))));
      for (index_t i = 0; i < U.rows(); ++i)
        for (index_t j = 0; j <= i; ++j)
          if (convert<double>(U(i, j)) != (i == j ? 1.0 : 0.0))
            throw argument_error("deltaw::ldu: U_r must be unit upper-trapezoidal (U(i, i) = 1, U(i, j) = 0 for j < i); "
                                 "U(" + std::to_string(i) + ", " + std::to_string(j) + ") is " +
                                 std::to_string(convert<double>(U(i, j))));
    }
  }

  held_vector<index_t, Device> perm_;
  held_matrix<T, Device> L_;
  held_vector<T, Device> z_;
  held_vector<T, Device> z0_;
  held_matrix<T, Device> U_;
  double sigma_;
  double sigma0_;
  ldu_options opt_;
};

namespace detail {
/// A permutation given as a std::vector (owned), or a vector_view of index_t (viewed).
inline held_vector<index_t> hold_perm(std::vector<index_t> p) {
  auto owner = std::make_shared<const std::vector<index_t>>(std::move(p));
  return {vector_view<const index_t>(owner->data(), index_t(owner->size())), owner};
}
template <class D>
held_vector<index_t, D> hold_perm(const vector_view<const index_t, D>& p) {
  return {p, nullptr};
}
template <class D>
held_vector<index_t, D> hold_perm(const vector_view<index_t, D>& p) {
  return {vector_view<const index_t, D>(p), nullptr};
}
}  // namespace detail

/// LoLDU from stored factors: perm [out] (std::vector<index_t>, owned, or a vector_view of
/// index_t), L_r [out, r], z [r], z₀ [r], U_r [r, in] (deltaw views or Eigen objects), the
/// current σ and σ₀ = α/r. Use it to load a saved adapter or to train z in caller memory.
template <class Perm, class FL, class FZ, class FZ0, class FU>
auto ldu_from_factors(Perm&& perm, FL&& L, FZ&& z, FZ0&& z0, FU&& U, scale sigma, scale sigma0,
                      ldu_options opt = {}) {
  auto hp = detail::hold_perm(std::forward<Perm>(perm));
  auto hl = hold(std::forward<FL>(L));
  auto hz = hold_vector(std::forward<FZ>(z));
  auto hz0 = hold_vector(std::forward<FZ0>(z0));
  auto hu = hold(std::forward<FU>(U));
  using T = std::remove_const_t<typename decltype(hl.view)::element_type>;
  using D = typename decltype(hl.view)::device_type;
  static_assert(std::is_same_v<decltype(hu), held_matrix<T, D>> && std::is_same_v<decltype(hz), held_vector<T, D>> &&
                    std::is_same_v<decltype(hz0), held_vector<T, D>>,
                "deltaw::ldu_from_factors: L_r, U_r, z and z₀ must have the same element type and device");
  static_assert(std::is_same_v<decltype(hp), held_vector<index_t, D>>,
                "deltaw::ldu_from_factors: the permutation must live on the same device as the factors");
  return ldu<T, D>(std::move(hp), std::move(hl), std::move(hz), std::move(hz0), std::move(hu), sigma.value,
                   sigma0.value, opt);
}

DELTAW_NAMESPACE_END
