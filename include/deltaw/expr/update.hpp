// SPDX-License-Identifier: MIT
// What every update type (ΔW) provides, the scale tags, and the lazy sum W + Δ₁ + Δ₂ ….
#pragma once

#include <cmath>
#include <concepts>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../core/eigen.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"

DELTAW_NAMESPACE_BEGIN

/// The scale of an update given as α; the method turns it into s (α/r for LoRA, α/√r
/// for rsLoRA).
struct alpha {
  double value;
  explicit constexpr alpha(double a) : value(a) {}
};
/// The scale of an update given directly as s.
struct scale {
  double value;
  explicit constexpr scale(double s) : value(s) {}
};

namespace detail {
inline double checked_scale(double s, const char* op) {
  if (!std::isfinite(s)) throw non_finite_error(std::string(op) + ": the scale must be finite, got " + std::to_string(s));
  return s;
}
}  // namespace detail

/// An update type ΔW: plain data with its shape, parameter and flop counts; its
/// evaluators live in backend/.
template <class U>
concept update = requires(const U& u, index_t tokens) {
  typename U::value_type;
  typename U::device_type;
  { U::is_update } -> std::convertible_to<bool>;
  { u.rows() } -> std::same_as<index_t>;
  { u.cols() } -> std::same_as<index_t>;
  { u.parameter_count() } -> std::same_as<index_t>;
  { u.flop_count(tokens) } -> std::same_as<index_t>;
} && U::is_update;

/// The lazy sum W + Δ₁ + … + Δₖ over a frozen weight view W [out, in].
template <class TW, class Device, update... Us>
class sum {
 public:
  using base_type = TW;
  using device_type = Device;
  static constexpr bool is_sum = true;

  sum(matrix_view<const TW, Device> W, std::tuple<Us...> deltas) : W_(W), deltas_(std::move(deltas)) {}

  index_t rows() const { return W_.rows(); }
  index_t cols() const { return W_.cols(); }
  const matrix_view<const TW, Device>& base() const { return W_; }
  const std::tuple<Us...>& deltas() const { return deltas_; }

  index_t parameter_count() const {
    return std::apply([](const auto&... u) { return (index_t{0} + ... + u.parameter_count()); }, deltas_);
  }
  /// Flops of apply for `tokens` rows: the base GEMM plus each update's extra.
  index_t flop_count(index_t tokens) const {
    return 2 * tokens * rows() * cols() +
           std::apply([&](const auto&... u) { return (index_t{0} + ... + u.flop_count(tokens)); }, deltas_);
  }

 private:
  matrix_view<const TW, Device> W_;
  std::tuple<Us...> deltas_;
};

template <class E>
struct is_sum : std::false_type {};
template <class TW, class D, class... Us>
struct is_sum<sum<TW, D, Us...>> : std::true_type {};

/// Something apply() evaluates: a weight view, an update alone (its ΔW), or a lazy sum.
template <class E>
concept weight_expression = is_matrix_view_v<E> || update<E> || is_sum<E>::value;

namespace detail {
template <class U>
void check_same_shape(index_t rows, index_t cols, const U& u, const char* op) {
  if (u.rows() != rows || u.cols() != cols)
    throw shape_error(std::string(op) + ": W is " + shape_str(rows, cols) + " but the update ΔW is " +
                      shape_str(u.rows(), u.cols()));
}
}  // namespace detail

namespace detail {
/// Calls f(name, view) for every view an update reads: its operands (for_each_operand)
/// and, with with_base, the base weight of the types whose ΔW reads one (DoRA, Bone bat:
/// their W()).
template <class U, class F>
void for_each_input(const U& u, F&& f, bool with_base) {
  static_assert(requires { u.for_each_operand(f); },
                "deltaw: an update type lists the views it reads with for_each_operand(f) (see expr/low_rank.hpp)");
  if constexpr (requires { u.W(); }) {
    if (with_base) f("W", u.W());
  }
  u.for_each_operand(f);
}
/// Throws aliasing_error, naming both, when `out` (the output `out_name` of `op`)
/// overlaps any view the update reads (its base weight too with with_base).
template <class U>
void check_update_no_overlap(const char* op, const char* out_name, const memory_lattice& out, const U& u,
                             bool with_base) {
  for_each_input(u, [&](const char* name, const auto& v) {
    if (lattices_overlap(out, lattice_of(v))) throw_overlap(op, out_name, "", "the update's ", name);
  }, with_base);
}
template <class O, class U>
  requires(is_matrix_view_v<O>)
void check_update_no_overlap(const char* op, const char* out_name, const O& out, const U& u, bool with_base) {
  check_update_no_overlap(op, out_name, lattice_of(out), u, with_base);
}
}  // namespace detail

/// W + Δ: W a view [out, in] (use deltaw::view(W) for an Eigen matrix), Δ of the same shape.
template <class T, class D, update U>
  requires std::same_as<typename U::device_type, D>
auto operator+(const matrix_view<T, D>& W, U u) {
  detail::check_same_shape(W.rows(), W.cols(), u, "W + ΔW");
  using TW = std::remove_const_t<T>;
  return sum<TW, D, U>(matrix_view<const TW, D>(W), std::tuple<U>(std::move(u)));
}

/// (W + Δ₁ + …) + Δ.
template <class TW, class D, class... Us, update U>
  requires std::same_as<typename U::device_type, D>
auto operator+(const sum<TW, D, Us...>& s, U u) {
  detail::check_same_shape(s.rows(), s.cols(), u, "(W + ΔW…) + ΔW");
  return sum<TW, D, Us..., U>(s.base(), std::tuple_cat(s.deltas(), std::tuple<U>(std::move(u))));
}

template <class T, class D, update U>
  requires(!std::same_as<typename U::device_type, D>)
auto operator+(const matrix_view<T, D>&, U) {
  static_assert(std::same_as<typename U::device_type, D>,
                "deltaw: W and ΔW live on different devices (one is a CPU view, the other a CUDA view)");
}

/// The device an expression lives on.
template <class E>
using device_of = typename E::device_type;

DELTAW_NAMESPACE_END
