// The public operations on CPU expressions: apply, apply_transposed, materialize, merge,
// unmerge, merge_checked, frobenius_norm, parameter_count, flop_count.
//
// An expression is a weight view W, an update ΔW alone, or a lazy sum W + Δ₁ + ….
// Nothing here forms a dense out × in matrix except materialize() (by name) and the
// bounded panels used when W is stored in bf16/fp16.
#pragma once

#include <string>
#include <tuple>
#include <type_traits>

#include "../../expr/update.hpp"
#include "eigen_bridge.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN

/// An expression whose operands are CPU views.
template <class E>
concept cpu_expression = weight_expression<E> && std::same_as<device_of<E>, device::cpu>;

/// The arithmetic type of an expression: double if any operand is double, else float.
template <class E>
struct expression_compute;
template <class T, class D>
struct expression_compute<matrix_view<T, D>> {
  using type = accum_t<std::remove_cv_t<T>>;
};
template <class TW, class D, class... Us>
struct expression_compute<sum<TW, D, Us...>> {
  using type = compute_t<TW, typename Us::value_type...>;
};
template <class E>
  requires update<E>
struct expression_compute<E> {
  using type = accum_t<typename E::value_type>;
};
template <class E>
using expression_compute_t = typename expression_compute<E>::type;

namespace cpu {

namespace detail {
template <class U, class TW>
bool shares_base(const U& u, const matrix_view<const TW>& W) {
  if constexpr (requires { u.W(); }) {
    return same_view(u.W(), W);
  } else {
    return false;
  }
}
template <class U, class C>
concept has_base_hook = requires { &evaluator<U>::template apply_on_base<C, dense<C>, dense<C>>; };
/// Types that compute X·(W + ΔW)ᵀ and G·(W + ΔW) themselves, instead of the base product
/// plus their ΔW (Bone bat: one product with W' instead of two with W).
template <class U, class C>
concept has_base_replacement = requires {
  &evaluator<U>::template apply_with_base<C, dense<C>, dense<C>>;
  &evaluator<U>::template apply_transposed_with_base<C, dense<C>, dense<C>>;
};
template <class U, class C>
concept uses_base = has_base_hook<U, C> || has_base_replacement<U, C>;

template <class C, class TW, class Tuple>
int count_hooked(const Tuple& deltas, const matrix_view<const TW>& W) {
  int n = 0;
  std::apply([&](const auto&... u) {
    ((n += (uses_base<std::remove_cvref_t<decltype(u)>, C> && shares_base(u, W)) ? 1 : 0), ...);
  }, deltas);
  if (n > 1)
    throw argument_error(
        "deltaw: a lazy sum may hold at most one update over its own base weight (DoRA, Bone bat); got " +
        std::to_string(n));
  return n;
}

/// Calls the base replacement of the one update that has it over W; false if none does.
template <class C, class TW, class Tuple, class F>
bool replace_base(const Tuple& deltas, const matrix_view<const TW>& W, F&& f) {
  bool done = false;
  std::apply([&](const auto&... u) {
    auto one = [&](const auto& d) {
      if constexpr (has_base_replacement<std::remove_cvref_t<decltype(d)>, C>) {
        if (!done && shares_base(d, W)) {
          f(d);
          done = true;
        }
      }
    };
    (one(u), ...);
  }, deltas);
  return done;
}
}  // namespace detail

/// Y = X·Wᵀ.
template <class C, class TW, class XM, class YM>
void base_apply(const matrix_view<const TW>& W, const XM& X, YM& Y) {
  for_row_panels<C>(W, [&](index_t r0, const auto& P) { Y.middleCols(r0, P.rows()).noalias() = X * P.transpose(); });
}

/// O = G·W.
template <class C, class TW, class GM, class OM>
void base_apply_transposed(const matrix_view<const TW>& W, const GM& G, OM& O) {
  if (maps_directly<C>(W)) {
    with_operand<C>(W, [&](const auto& M) { O.noalias() = G * M; });
    return;
  }
  O.setZero();
  for_row_panels<C>(W, [&](index_t r0, const auto& P) { O.noalias() += G.middleCols(r0, P.rows()) * P; });
}

template <class C, class E, class XM, class YM>
void apply_expr(const E& e, const XM& X, YM& Y) {
  if constexpr (is_matrix_view_v<E>) {
    base_apply<C>(matrix_view<const typename E::value_type>(e), X, Y);
  } else if constexpr (update<E>) {
    Y.setZero();
    evaluator<E>::template apply_add<C>(e, X, Y);
  } else {
    const int hooked = detail::count_hooked<C>(e.deltas(), e.base());
    const bool replaced = detail::replace_base<C>(e.deltas(), e.base(), [&](const auto& d) {
      evaluator<std::remove_cvref_t<decltype(d)>>::template apply_with_base<C>(d, X, Y);
    });
    if (!replaced) base_apply<C>(e.base(), X, Y);
    std::apply([&](const auto&... u) {
      auto one = [&](const auto& d) {
        using U = std::remove_cvref_t<decltype(d)>;
        if constexpr (detail::has_base_hook<U, C>) {
          if (detail::shares_base(d, e.base())) return evaluator<U>::template apply_on_base<C>(d, X, Y);
        }
        (void)hooked;
      };
      (one(u), ...);
    }, e.deltas());
    std::apply([&](const auto&... u) {
      auto one = [&](const auto& d) {
        using U = std::remove_cvref_t<decltype(d)>;
        if constexpr (detail::uses_base<U, C>) {
          if (detail::shares_base(d, e.base())) return;
        }
        evaluator<U>::template apply_add<C>(d, X, Y);
      };
      (one(u), ...);
    }, e.deltas());
  }
}

template <class C, class E, class GM, class OM>
void apply_transposed_expr(const E& e, const GM& G, OM& O) {
  if constexpr (is_matrix_view_v<E>) {
    base_apply_transposed<C>(matrix_view<const typename E::value_type>(e), G, O);
  } else if constexpr (update<E>) {
    O.setZero();
    evaluator<E>::template apply_transposed_add<C>(e, G, O);
  } else {
    bool done_base = detail::count_hooked<C>(e.deltas(), e.base()) == 1 &&
                     detail::replace_base<C>(e.deltas(), e.base(), [&](const auto& d) {
                       evaluator<std::remove_cvref_t<decltype(d)>>::template apply_transposed_with_base<C>(d, G, O);
                     });
    if (!done_base && detail::count_hooked<C>(e.deltas(), e.base()) == 1) {
      // DoRA over the base: G·W' = (G·diag(g))·W + s·((G·diag(g))·B)·A.
      std::apply([&](const auto&... u) {
        auto one = [&](const auto& d) {
          using U = std::remove_cvref_t<decltype(d)>;
          if constexpr (detail::has_base_hook<U, C>) {
            if (detail::shares_base(d, e.base())) {
              const dense<C> Gs = evaluator<U>::template transposed_input<C>(d, G);
              base_apply_transposed<C>(e.base(), Gs, O);
              evaluator<std::remove_cvref_t<decltype(d.lora())>>::template apply_transposed_add<C>(d.lora(), Gs, O);
              done_base = true;
            }
          }
        };
        (one(u), ...);
      }, e.deltas());
    }
    if (!done_base) base_apply_transposed<C>(e.base(), G, O);
    std::apply([&](const auto&... u) {
      auto one = [&](const auto& d) {
        using U = std::remove_cvref_t<decltype(d)>;
        if constexpr (detail::uses_base<U, C>) {
          if (detail::shares_base(d, e.base())) return;
        }
        evaluator<U>::template apply_transposed_add<C>(d, G, O);
      };
      (one(u), ...);
    }, e.deltas());
  }
}

}  // namespace cpu

namespace detail {
template <class XL>
auto cpu_input_view(const XL& X, const char* op) {
  auto v = view(X);
  static_assert(std::same_as<typename decltype(v)::device_type, device::cpu>,
                "deltaw: this operand is a CUDA view; CPU expressions take CPU views");
  (void)op;
  using T = std::remove_const_t<typename decltype(v)::element_type>;
  return matrix_view<const T>(v);
}
template <class YL>
auto cpu_output_view(YL&& Y, const char* op) {
  auto v = view(std::forward<YL>(Y));
  using T = typename decltype(v)::element_type;
  static_assert(!std::is_const_v<T>, "deltaw: the output must be writable (a non-const matrix or view)");
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "deltaw: outputs are float or double matrices (bf16/fp16 are storage types)");
  (void)op;
  return v;
}
inline void check_rows(index_t got, index_t want, const char* op, const char* what, index_t r, index_t c) {
  if (got != want)
    throw shape_error(std::string(op) + ": " + what + " is " + shape_str(r, c) + "; expected " +
                      std::to_string(want) + (what[0] == 'Y' || what[0] == 'O' ? " rows" : ""));
}
}  // namespace detail

/// Y = X·(W + ΔW)ᵀ into a caller-provided output [tokens, out]. X: [tokens, in].
template <cpu_expression E, class XL, class YL>
void apply(const E& e, const XL& X, YL&& Y) {
  constexpr const char* op = "deltaw::apply";
  const auto Xv = detail::cpu_input_view(X, op);
  auto Yv = detail::cpu_output_view(std::forward<YL>(Y), op);
  using C = std::remove_const_t<typename decltype(Yv)::element_type>;
  if constexpr (std::is_same_v<C, float> || std::is_same_v<C, double>) {  // else cpu_output_view's static_assert fired
    if (Xv.cols() != e.cols())
      throw shape_error(std::string(op) + ": X is " + detail::shape_str(Xv.rows(), Xv.cols()) + " but W is " +
                        detail::shape_str(e.rows(), e.cols()) + "; X·Wᵀ needs X to have " + std::to_string(e.cols()) +
                        " columns");
    if (Yv.rows() != Xv.rows() || Yv.cols() != e.rows())
      throw shape_error(std::string(op) + ": the output is " + detail::shape_str(Yv.rows(), Yv.cols()) +
                        " but X·Wᵀ is " + detail::shape_str(Xv.rows(), e.rows()));
    cpu::with_output<C>(Yv, [&](auto& Ym) {
      cpu::with_operand<C>(Xv, [&](const auto& Xm) { cpu::apply_expr<C>(e, Xm, Ym); });
    });
  }
}

/// Y = X·(W + ΔW)ᵀ, allocated [tokens, out] row-major.
template <cpu_expression E, class XL>
auto apply(const E& e, const XL& X) {
  const auto Xv = detail::cpu_input_view(X, "deltaw::apply");
  using C = compute_t<expression_compute_t<E>, typename decltype(Xv)::value_type>;
  dense<C> Y(Xv.rows(), e.rows());
  apply(e, Xv, Y);
  return Y;
}

/// O = G·(W + ΔW) into a caller-provided output [tokens, in]; G: [tokens, out]. This is
/// the input gradient of apply.
template <cpu_expression E, class GL, class OL>
void apply_transposed(const E& e, const GL& G, OL&& O) {
  constexpr const char* op = "deltaw::apply_transposed";
  const auto Gv = detail::cpu_input_view(G, op);
  auto Ov = detail::cpu_output_view(std::forward<OL>(O), op);
  using C = std::remove_const_t<typename decltype(Ov)::element_type>;
  if constexpr (std::is_same_v<C, float> || std::is_same_v<C, double>) {  // else cpu_output_view's static_assert fired
    if (Gv.cols() != e.rows())
      throw shape_error(std::string(op) + ": G is " + detail::shape_str(Gv.rows(), Gv.cols()) + " but W is " +
                        detail::shape_str(e.rows(), e.cols()) + "; G·W needs G to have " + std::to_string(e.rows()) +
                        " columns");
    if (Ov.rows() != Gv.rows() || Ov.cols() != e.cols())
      throw shape_error(std::string(op) + ": the output is " + detail::shape_str(Ov.rows(), Ov.cols()) +
                        " but G·W is " + detail::shape_str(Gv.rows(), e.cols()));
    cpu::with_output<C>(Ov, [&](auto& Om) {
      cpu::with_operand<C>(Gv, [&](const auto& Gm) { cpu::apply_transposed_expr<C>(e, Gm, Om); });
    });
  }
}

/// O = G·(W + ΔW), allocated [tokens, in].
template <cpu_expression E, class GL>
auto apply_transposed(const E& e, const GL& G) {
  const auto Gv = detail::cpu_input_view(G, "deltaw::apply_transposed");
  using C = compute_t<expression_compute_t<E>, typename decltype(Gv)::value_type>;
  dense<C> O(Gv.rows(), e.cols());
  apply_transposed(e, Gv, O);
  return O;
}

/// The dense matrix of an expression: ΔW for an update, W + ΣΔ for a sum. Allocates
/// out × in, as its name says.
template <cpu_expression E>
auto materialize(const E& e) {
  using C = expression_compute_t<E>;
  if constexpr (is_matrix_view_v<E>) {
    return cpu::to_dense<C>(e);
  } else if constexpr (update<E>) {
    dense<C> D = dense<C>::Zero(e.rows(), e.cols());
    cpu::evaluator<E>::template add_delta_rows<C>(e, 0, D);
    return D;
  } else {
    dense<C> D = cpu::to_dense<C>(e.base());
    std::apply([&](const auto&... u) {
      (cpu::evaluator<std::remove_cvref_t<decltype(u)>>::template add_delta_rows<C>(u, 0, D), ...);
    }, e.deltas());
    return D;
  }
}

namespace detail {
template <class WL>
auto mutable_weight_view(WL&& W, const char* op) {
  auto v = view(std::forward<WL>(W));
  static_assert(!std::is_const_v<typename decltype(v)::element_type>,
                "deltaw::merge/unmerge: the weight must be writable (a non-const matrix or view)");
  static_assert(std::same_as<typename decltype(v)::device_type, device::cpu>, "deltaw: this overload is for CPU views");
  (void)op;
  return v;
}
template <class U, class V>
void check_merge(const U& u, const V& W, const char* op) {
  check_same_shape(W.rows(), W.cols(), u, op);
  // An update whose ΔW reads its own weight (DoRA, Bone bat) rewrites rows of that weight
  // when merging, so it merges only into it.
  if constexpr (requires { u.W(); }) {
    if (!same_view(u.W(), W))
      throw argument_error(std::string(op) + ": a " + U::method_name +
                           " update merges only into the weight it was built on");
  }
}
}  // namespace detail

/// W ← W + ΔW in place (DoRA: W ← W'). W: a writable view or Eigen matrix.
template <class WL, update U>
  requires std::same_as<device_of<U>, device::cpu>
void merge(WL&& W, const U& u) {
  auto Wv = detail::mutable_weight_view(std::forward<WL>(W), "deltaw::merge");
  detail::check_merge(u, Wv, "deltaw::merge");
  using C = compute_t<typename decltype(Wv)::value_type, typename U::value_type>;
  cpu::for_mutable_row_panels<C>(Wv, [&](index_t r0, auto& P) { cpu::evaluator<U>::template merge_rows<C>(u, r0, P); });
}

/// The exact inverse of merge: W ← W − ΔW (DoRA: W ← W'/g − s·B·A with the cached norms).
template <class WL, update U>
  requires std::same_as<device_of<U>, device::cpu>
void unmerge(WL&& W, const U& u) {
  auto Wv = detail::mutable_weight_view(std::forward<WL>(W), "deltaw::unmerge");
  detail::check_merge(u, Wv, "deltaw::unmerge");
  using C = compute_t<typename decltype(Wv)::value_type, typename U::value_type>;
  cpu::for_mutable_row_panels<C>(Wv, [&](index_t r0, auto& P) { cpu::evaluator<U>::template unmerge_rows<C>(u, r0, P); });
}

/// merge(), but first computes the merged weight panel by panel and throws
/// non_finite_error, leaving W untouched, if any entry would be NaN or ±Inf (PEFT's
/// safe_merge). Costs a second pass; scratch is one panel, never out × in.
template <class WL, update U>
  requires std::same_as<device_of<U>, device::cpu>
void merge_checked(WL&& W, const U& u) {
  auto Wv = detail::mutable_weight_view(std::forward<WL>(W), "deltaw::merge_checked");
  detail::check_merge(u, Wv, "deltaw::merge_checked");
  using C = compute_t<typename decltype(Wv)::value_type, typename U::value_type>;
  dense<C> P;
  for (index_t r0 = 0; r0 < Wv.rows(); r0 += cpu::panel_rows) {
    const index_t n = std::min(cpu::panel_rows, Wv.rows() - r0);
    P = cpu::to_dense<C>(Wv.middle_rows(r0, n));
    cpu::evaluator<U>::template merge_rows<C>(u, r0, P);
    if (!P.allFinite()) {
      index_t i = 0, j = 0;
      for (i = 0; i < P.rows(); ++i) {
        for (j = 0; j < P.cols(); ++j)
          if (!std::isfinite(double(P(i, j)))) break;
        if (j < P.cols()) break;
      }
      throw non_finite_error("deltaw::merge_checked: merging would make W(" + std::to_string(r0 + i) + ", " +
                             std::to_string(j) + ") non-finite; W is left unchanged");
    }
  }
  merge(Wv, u);
}

/// ‖ΔW‖_F without forming ΔW (closed form where the type has one, else panel by panel).
template <update U>
  requires std::same_as<device_of<U>, device::cpu>
double frobenius_norm(const U& u) {
  return cpu::evaluator<U>::template frobenius_norm<accum_t<typename U::value_type>>(u);
}

/// Trainable parameters of an update or of all updates in a sum.
template <class E>
  requires(update<E> || is_sum<E>::value)
index_t parameter_count(const E& e) {
  return e.parameter_count();
}

/// Flops of apply for `tokens` rows: an update's extra over the base GEMM, or the whole
/// sum's (base included).
template <class E>
  requires(update<E> || is_sum<E>::value)
index_t flop_count(const E& e, index_t tokens) {
  return e.flop_count(tokens);
}

DELTAW_NAMESPACE_END
