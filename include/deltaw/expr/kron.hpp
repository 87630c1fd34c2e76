// SPDX-License-Identifier: MIT
// Kronecker updates: LoKr (PEFT, LyCORIS) and DiffuseKronA / KronA.
//
//   ΔW = s·(w1 ⊗ w2),  w1 [a, c], w2 [b, d],  out = a·b, in = c·d,
//   ΔW[i1·b + i2, j1·d + j2] = s·w1[i1, j1]·w2[i2, j2].
//
// Either factor is dense or a low-rank product (PEFT's lokr_w1_a·lokr_w1_b,
// lokr_w2_a·lokr_w2_b); the factor kind is part of the type, and neither the product
// w1_a·w1_b over all of ΔW nor w1 ⊗ w2 is formed by apply. Apply uses
// (w1 ⊗ w2)·x = vec(w1·X·w2ᵀ) with X the token reshaped [c, d] row-major
// (backend/cpu/kron.hpp).
//
// DiffuseKronA's checkpoints (IBM/DiffuseKronA, diffusekrona/krona.py, read for the math
// only). Its forward for [batch, tokens, in] inputs takes each token x, views it as
// [a2, b2], transposes it to X̃ [b2, a2] and returns vec(up·X̃·down), with up [b1, b2] its
// B (zero init) and down [a2, a1] its A (N(0, 1/a1²) init). Entry by entry
//     ΔW[u·a1 + v, q·b2 + p] = up[u, p]·down[q, v],
// that is ΔW = (up ⊗ downᵀ)·S with S the perfect shuffle of the input features
// (S·x)[p·a2 + q] = x[q·b2 + p]. deltaw's diffusekrona(A, B) is the paper's unshuffled
// A ⊗ B; to reproduce such a checkpoint use kron(up, downᵀ) on inputs permuted by S (or
// permute the columns of a materialised ΔW). This matters only for loading its
// checkpoints. (That file's 2-D path only works when a1 = a2 and the batch is one row, and
// its network_alpha branch reads an attribute it never sets, so it never scales.)
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// A Kronecker factor stored densely (PEFT's lokr_w1 / lokr_w2).
template <class T, class Device = device::cpu>
class kron_dense_factor {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_low_rank = false;

  explicit kron_dense_factor(held_matrix<T, Device> m) : m_(std::move(m)) {}

  index_t rows() const { return m_.view.rows(); }
  index_t cols() const { return m_.view.cols(); }
  const matrix_view<const T, Device>& matrix() const { return m_.view; }
  index_t parameter_count() const { return rows() * cols(); }
  /// Flops of F·M for M with k columns (or of M·Fᵀ for M with k rows).
  index_t product_flops(index_t k) const { return 2 * rows() * cols() * k; }

 private:
  held_matrix<T, Device> m_;
};

/// A Kronecker factor stored as a product left·right, left [rows, r], right [r, cols]
/// (PEFT's lokr_w1_a·lokr_w1_b); never multiplied out except by materialize/merge, and
/// then only to the factor's own (small) size.
template <class T, class Device = device::cpu>
class kron_low_rank_factor {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_low_rank = true;

  kron_low_rank_factor(held_matrix<T, Device> left, held_matrix<T, Device> right)
      : left_(std::move(left)), right_(std::move(right)) {
    if (left_.view.cols() != right_.view.rows())
      throw shape_error("deltaw::kron_factor: the low-rank factor left [rows, r]·right [r, cols] must share r; got " +
                        detail::shape_str(left_.view.rows(), left_.view.cols()) + " and " +
                        detail::shape_str(right_.view.rows(), right_.view.cols()));
    if (left_.view.cols() < 1)
      throw rank_error("deltaw::kron_factor: a low-rank factor needs rank at least 1; got left " +
                       detail::shape_str(left_.view.rows(), left_.view.cols()) + " and right " +
                       detail::shape_str(right_.view.rows(), right_.view.cols()));
  }

  index_t rows() const { return left_.view.rows(); }
  index_t cols() const { return right_.view.cols(); }
  index_t rank() const { return left_.view.cols(); }
  const matrix_view<const T, Device>& left() const { return left_.view; }
  const matrix_view<const T, Device>& right() const { return right_.view; }
  index_t parameter_count() const { return rank() * (rows() + cols()); }
  index_t product_flops(index_t k) const { return 2 * rank() * (rows() + cols()) * k; }

 private:
  held_matrix<T, Device> left_;
  held_matrix<T, Device> right_;
};

template <class F>
struct is_kron_factor : std::false_type {};
template <class T, class D>
struct is_kron_factor<kron_dense_factor<T, D>> : std::true_type {};
template <class T, class D>
struct is_kron_factor<kron_low_rank_factor<T, D>> : std::true_type {};
template <class F>
inline constexpr bool is_kron_factor_v = is_kron_factor<std::remove_cvref_t<F>>::value;

/// ΔW = s·(w1 ⊗ w2). F1, F2: kron_dense_factor or kron_low_rank_factor of one element
/// type and device.
template <class F1, class F2>
class kron_update {
  static_assert(is_kron_factor_v<F1> && is_kron_factor_v<F2>,
                "deltaw::kron_update: factors are kron_dense_factor or kron_low_rank_factor");
  static_assert(std::is_same_v<typename F1::value_type, typename F2::value_type> &&
                    std::is_same_v<typename F1::device_type, typename F2::device_type>,
                "deltaw::kron: w1 and w2 must have the same element type and device (e.g. both float on the CPU)");

 public:
  using value_type = typename F1::value_type;
  using device_type = typename F1::device_type;
  using first_factor = F1;
  using second_factor = F2;
  static constexpr bool is_update = true;

  kron_update(F1 w1, F2 w2, double s)
      : w1_(std::move(w1)), w2_(std::move(w2)), scale_(detail::checked_scale(s, "deltaw::kron")) {
    // out = a·b and in = c·d (and the factors' parameter counts) must be representable:
    // factors with a zero dimension hold no bytes, so any other dimension can be huge.
    index_t out, in, p1, p2, p;
    if (__builtin_mul_overflow(w1_.rows(), w2_.rows(), &out) || __builtin_mul_overflow(w1_.cols(), w2_.cols(), &in) ||
        !parameter_count_fits(w1_, p1) || !parameter_count_fits(w2_, p2) || __builtin_add_overflow(p1, p2, &p))
      throw shape_error("deltaw::kron: the Kronecker product of " + detail::shape_str(w1_.rows(), w1_.cols()) + " and " +
                        detail::shape_str(w2_.rows(), w2_.cols()) + " has dimensions too large to index");
  }

  /// out = a·b.
  index_t rows() const { return w1_.rows() * w2_.rows(); }
  /// in = c·d.
  index_t cols() const { return w1_.cols() * w2_.cols(); }
  double scale() const { return scale_; }
  const F1& w1() const { return w1_; }
  const F2& w2() const { return w2_; }
  /// Calls f(name, view) for every view ΔW reads (the aliasing checks of the
  /// operations that write).
  template <class F>
  void for_each_operand(F&& f) const {
    if constexpr (F1::is_low_rank) {
      f("w1_a", w1_.left());
      f("w1_b", w1_.right());
    } else {
      f("w1", w1_.matrix());
    }
    if constexpr (F2::is_low_rank) {
      f("w2_a", w2_.left());
      f("w2_b", w2_.right());
    } else {
      f("w2", w2_.matrix());
    }
  }

  /// The sum of the factors' sizes (a·c + b·d, or r·(a + c) for a low-rank w1, …).
  index_t parameter_count() const { return w1_.parameter_count() + w2_.parameter_count(); }

  /// Per token, w1·X·w2ᵀ with X [c, d] costs either w1 first ([a, c]·[c, d], then
  /// [a, d]·w2ᵀ) or w2 first ([c, d]·w2ᵀ, then w1·[c, b]); apply takes the cheaper.
  index_t flops_w1_first(index_t tokens) const {
    return tokens * (w1_.product_flops(w2_.cols()) + w2_.product_flops(w1_.rows()));
  }
  index_t flops_w2_first(index_t tokens) const {
    return tokens * (w2_.product_flops(w1_.cols()) + w1_.product_flops(w2_.rows()));
  }
  bool w1_first(index_t tokens) const { return flops_w1_first(tokens) <= flops_w2_first(tokens); }
  /// Extra flops of apply over the base GEMM (the cheaper order).
  index_t flop_count(index_t tokens) const {
    return std::min(flops_w1_first(tokens), flops_w2_first(tokens));
  }

  kron_update with_scale(double s) const { return kron_update(w1_, w2_, s); }

 private:
  template <class F>
  static bool parameter_count_fits(const F& f, index_t& n) {
    if constexpr (F::is_low_rank) {
      index_t sum;
      return !__builtin_add_overflow(f.rows(), f.cols(), &sum) && !__builtin_mul_overflow(f.rank(), sum, &n) &&
             !__builtin_mul_overflow(n, index_t(2), &sum);
    } else {
      return !__builtin_mul_overflow(f.rows(), f.cols(), &n);
    }
  }
  F1 w1_;
  F2 w2_;
  double scale_;
};

/// PEFT's factor choice for one dimension (its `factorization`, decompose_factor):
/// returns (m, n) with m·n = dim.
///  - factor > 0 dividing dim: (factor, dim / factor), in that order, even when
///    factor > dim / factor (PEFT does not sort this case).
///  - factor = -1 (the default): among the divisor pairs reached by searching upward
///    from 1 toward √dim, the pair with the smallest m + n, m ≤ n: 256 → (16, 16),
///    128 → (8, 16), 127 → (1, 127).
///  - any other factor (a positive non-divisor, 0, or < -1): the same search, stopping
///    before a divisor larger than factor, so the smaller of the pair never exceeds it
///    (for factor ≤ 0 that gives (1, dim)). 128 with factor 3 → (2, 64).
inline std::pair<index_t, index_t> lokr_factorization(index_t dim, index_t factor = -1) {
  if (dim < 1)
    throw argument_error("deltaw::lokr_factorization: the dimension must be at least 1; got " + std::to_string(dim));
  if (factor > 0 && dim % factor == 0) return {factor, dim / factor};
  if (factor == -1) factor = dim;
  index_t m = 1, n = dim;
  while (m < n) {
    index_t next = m + 1;
    while (dim % next != 0) ++next;
    const index_t pair = dim / next;
    if (next + pair > m + n || next > factor) break;
    m = next;
    n = pair;
  }
  if (m > n) std::swap(m, n);
  return {m, n};
}

/// The shapes PEFT's LoKr gives a Linear layer [out, in] (update_layer): out = a·b,
/// in = c·d from lokr_factorization, and whether each factor is stored densely.
struct lokr_layout {
  index_t a, b, c, d;
  bool w1_dense;  ///< false: w1 = w1_a [a, r]·w1_b [r, c]
  bool w2_dense;  ///< false: w2 = w2_a [b, r]·w2_b [r, d]
};
inline lokr_layout lokr_shapes(index_t out, index_t in, index_t r, bool decompose_both = false,
                               index_t decompose_factor = -1) {
  if (r < 1) throw rank_error("deltaw::lokr_shapes: r must be at least 1; got " + std::to_string(r));
  const auto [a, b] = lokr_factorization(out, decompose_factor);
  const auto [c, d] = lokr_factorization(in, decompose_factor);
  // PEFT compares r < max(…)/2 in floating point.
  const bool w1_dense = !(decompose_both && 2 * r < std::max(a, c));
  const bool w2_dense = !(2 * r < std::max(b, d));
  return {a, b, c, d, w1_dense, w2_dense};
}

namespace detail {
template <class X>
auto make_kron_factor(X&& x) {
  if constexpr (is_kron_factor_v<X>) {
    return std::remove_cvref_t<X>(std::forward<X>(x));
  } else {
    auto h = hold(std::forward<X>(x));
    using T = std::remove_const_t<typename decltype(h.view)::element_type>;
    return kron_dense_factor<T, typename decltype(h.view)::device_type>(std::move(h));
  }
}
template <class F1, class F2>
auto make_kron(F1&& w1, F2&& w2, double s) {
  auto f1 = make_kron_factor(std::forward<F1>(w1));
  auto f2 = make_kron_factor(std::forward<F2>(w2));
  return kron_update<decltype(f1), decltype(f2)>(std::move(f1), std::move(f2), s);
}
}  // namespace detail

/// A dense Kronecker factor (a view or an Eigen matrix; temporaries are owned).
template <class M>
auto kron_factor(M&& m) {
  return detail::make_kron_factor(std::forward<M>(m));
}
/// A low-rank Kronecker factor left [rows, r]·right [r, cols], kept as the product.
template <class L, class R>
auto kron_factor(L&& left, R&& right) {
  auto hl = hold(std::forward<L>(left));
  auto hr = hold(std::forward<R>(right));
  static_assert(std::is_same_v<decltype(hl), decltype(hr)>,
                "deltaw::kron_factor: left and right must have the same element type and device");
  using T = std::remove_const_t<typename decltype(hl.view)::element_type>;
  return kron_low_rank_factor<T, typename decltype(hl.view)::device_type>(std::move(hl), std::move(hr));
}

/// ΔW = s·(w1 ⊗ w2) with an explicit scale. w1, w2: matrices, views or kron_factor(…).
template <class F1, class F2>
auto kron(F1&& w1, F2&& w2, scale s = scale(1.0)) {
  return detail::make_kron(std::forward<F1>(w1), std::forward<F2>(w2), s.value);
}

/// PEFT's LoKr: s = α/r, with r the adapter's configured rank, applied even when both
/// factors are dense (PEFT does so). A low-rank factor must have rank r.
template <class F1, class F2>
auto lokr(F1&& w1, F2&& w2, alpha a, index_t r) {
  if (r < 1) throw rank_error("deltaw::lokr: r must be at least 1; got " + std::to_string(r));
  if (!std::isfinite(a.value)) throw non_finite_error("deltaw::lokr: alpha must be finite, got " + std::to_string(a.value));
  auto u = detail::make_kron(std::forward<F1>(w1), std::forward<F2>(w2), 1.0);
  auto check = [&](const auto& f, const char* name) {
    if constexpr (std::remove_cvref_t<decltype(f)>::is_low_rank) {
      if (f.rank() != r)
        throw rank_error(std::string("deltaw::lokr: the low-rank factor ") + name + " has rank " +
                         std::to_string(f.rank()) + " but r = " + std::to_string(r) +
                         "; PEFT uses the adapter's r for both");
    }
  };
  check(u.w1(), "w1 = w1_a·w1_b");
  check(u.w2(), "w2 = w2_a·w2_b");
  return u.with_scale(a.value / double(r));
}

/// DiffuseKronA / KronA: ΔW = A ⊗ B with no scaling (A [a1, a2], B [b1, b2]; its init is
/// A ~ N(0, (1/a1)²), B = 0). See the perfect-shuffle note at the top of this file.
template <class FA, class FB>
auto diffusekrona(FA&& A, FB&& B) {
  return detail::make_kron(std::forward<FA>(A), std::forward<FB>(B), 1.0);
}

DELTAW_NAMESPACE_END
