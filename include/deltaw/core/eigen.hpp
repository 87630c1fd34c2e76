// SPDX-License-Identifier: MIT
// Zero-copy interop with Eigen: view() over any Eigen matrix, Map or Block with direct
// access, in either storage order, and hold() for expression operands.
#pragma once

#include <Eigen/Core>
#include <memory>
#include <type_traits>
#include <utility>

#include "view.hpp"

DELTAW_NAMESPACE_BEGIN

namespace detail {
template <class S>
struct eigen_scalar_to_storage {
  using type = S;
};
template <>
struct eigen_scalar_to_storage<Eigen::bfloat16> {
  using type = bf16;
};
template <>
struct eigen_scalar_to_storage<Eigen::half> {
  using type = fp16;
};
static_assert(sizeof(Eigen::bfloat16) == sizeof(bf16) && sizeof(Eigen::half) == sizeof(fp16));
}  // namespace detail

/// Any Eigen dense object (Matrix, Array, Map, Block, Ref) whose memory can be addressed.
template <class D>
concept eigen_dense = std::is_base_of_v<Eigen::DenseBase<std::remove_cvref_t<D>>, std::remove_cvref_t<D>>;

template <class D>
concept eigen_direct = eigen_dense<D> && ((int(std::remove_cvref_t<D>::Flags) & Eigen::DirectAccessBit) != 0);

template <class D>
concept eigen_plain = eigen_dense<D> &&
                      std::is_base_of_v<Eigen::PlainObjectBase<std::remove_cvref_t<D>>, std::remove_cvref_t<D>>;

/// Zero-copy view of an Eigen object. A const object gives a view of const elements.
/// Views of temporaries that own their memory would dangle, so they are rejected.
template <class D>
  requires eigen_dense<D>
auto view(D&& m) {
  using M = std::remove_cvref_t<D>;
  using S = typename detail::eigen_scalar_to_storage<typename M::Scalar>::type;
  // One static_assert per misuse, and nothing else instantiated after it.
  if constexpr (!eigen_direct<D>) {
    static_assert(eigen_direct<D>,
                  "deltaw::view: this Eigen expression has no memory to view; evaluate it first "
                  "(e.g. `Eigen::MatrixXf tmp = expr;` or `.eval()`)");
    return matrix_view<const float>{};
  } else if constexpr (eigen_plain<D> && std::is_rvalue_reference_v<D&&>) {
    static_assert(!eigen_plain<D>,
                  "deltaw::view: viewing a temporary Eigen matrix would dangle; keep the matrix in a variable");
    return matrix_view<const float>{};
  } else if constexpr (!storage_type<S>) {
    static_assert(storage_type<S>, "deltaw::view: Eigen scalar must be float, double, Eigen::bfloat16 or Eigen::half");
  } else {
    constexpr bool is_const = std::is_const_v<std::remove_reference_t<D>> || !(int(M::Flags) & Eigen::LvalueBit);
    using T = std::conditional_t<is_const, const S, S>;
    auto* p = const_cast<T*>(reinterpret_cast<const T*>(m.data()));
    return matrix_view<T>(p, m.rows(), m.cols(), m.rowStride(), m.colStride());
  }
}

/// Zero-copy 1-D view of an Eigen vector.
template <class D>
  requires eigen_direct<D>
auto vview(D&& v) {
  using M = std::remove_cvref_t<D>;
  static_assert(M::RowsAtCompileTime == 1 || M::ColsAtCompileTime == 1 || M::RowsAtCompileTime == Eigen::Dynamic,
                "deltaw::vview: expects a vector");
  static_assert(!(eigen_plain<D> && std::is_rvalue_reference_v<D&&>),
                "deltaw::vview: viewing a temporary Eigen vector would dangle; keep the vector in a variable");
  if (v.rows() != 1 && v.cols() != 1)
    throw shape_error("deltaw::vview: expects a vector, got " + detail::shape_str(v.rows(), v.cols()));
  using S = typename detail::eigen_scalar_to_storage<typename M::Scalar>::type;
  using T = std::conditional_t<std::is_const_v<std::remove_reference_t<D>>, const S, S>;
  auto* p = const_cast<T*>(reinterpret_cast<const T*>(v.data()));
  return vector_view<T>(p, v.size(), v.innerStride());
}
template <class T, class Dev>
vector_view<T, Dev> vview(const vector_view<T, Dev>& v) {
  return v;
}

/// What expressions store for a matrix operand (see held_matrix).
template <class X>
auto hold(X&& x) {
  using M = std::remove_cvref_t<X>;
  if constexpr (is_matrix_view_v<M>) {
    using T = std::remove_const_t<typename M::element_type>;
    return held_matrix<T, typename M::device_type>{x, nullptr};
  } else {
    static_assert(eigen_dense<X>, "deltaw: expected a deltaw::matrix_view or an Eigen matrix/Map/Block");
    static_assert(eigen_direct<X>, "deltaw: this Eigen expression has no memory; evaluate it first (.eval())");
    using T = std::remove_const_t<typename decltype(view(std::as_const(x)))::element_type>;
    if constexpr (eigen_plain<X> && !std::is_lvalue_reference_v<X>) {
      auto owner = std::make_shared<const M>(std::move(x));
      return held_matrix<T>{view(*owner), owner};
    } else {
      return held_matrix<T>{view(std::as_const(x)), nullptr};
    }
  }
}

/// What expressions store for a vector operand.
template <class X>
auto hold_vector(X&& x) {
  using M = std::remove_cvref_t<X>;
  if constexpr (is_vector_view_v<M>) {
    using T = std::remove_const_t<typename M::element_type>;
    return held_vector<T, typename M::device_type>{x, nullptr};
  } else {
    static_assert(eigen_direct<X>, "deltaw: expected a deltaw::vector_view or an Eigen vector");
    using T = std::remove_const_t<typename decltype(vview(std::as_const(x)))::element_type>;
    if constexpr (eigen_plain<X> && !std::is_lvalue_reference_v<X>) {
      auto owner = std::make_shared<const M>(std::move(x));
      return held_vector<T>{vview(*owner), owner};
    } else {
      return held_vector<T>{vview(std::as_const(x)), nullptr};
    }
  }
}

/// Dense row-major Eigen matrix: the type deltaw returns when it allocates a result.
template <class T>
using dense = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

DELTAW_NAMESPACE_END
