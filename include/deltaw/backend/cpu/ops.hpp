// SPDX-License-Identifier: MIT
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
using ctx_t = kernels::cpu_context;
template <class U, class C>
concept has_base_hook = requires { &evaluator<U>::template apply_on_base<C, ctx_t>; };
/// Types that compute X·(W + ΔW)ᵀ and G·(W + ΔW) themselves, instead of the base product
/// plus their ΔW (Bone bat: one product with W' instead of two with W).
template <class U, class C>
concept has_base_replacement = requires {
  &evaluator<U>::template apply_with_base<C, ctx_t>;
  &evaluator<U>::template apply_transposed_with_base<C, ctx_t>;
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
template <class C, class Ctx, class TW, class D>
void base_apply(const Ctx& ctx, const matrix_view<const TW, D>& W, const std::type_identity_t<cview<C, D>>& X,
                const std::type_identity_t<mview<C, D>>& Y) {
  for_row_panels<C>(ctx, W, [&](index_t r0, const cview<C, D>& P) {
    gemm<C>(ctx, C(1), X, kernels::op::none, P, kernels::op::trans, C(0), Y.middle_cols(r0, P.rows()));
  });
}

/// O = G·W (beta = 1: O += G·W).
template <class C, class Ctx, class TW, class D>
void base_apply_transposed(const Ctx& ctx, const matrix_view<const TW, D>& W, const std::type_identity_t<cview<C, D>>& G,
                           const std::type_identity_t<mview<C, D>>& O, C beta = C(0)) {
  if (beta == C(0) && !maps_directly<C>(W)) fill(ctx, O, C(0));
  const C b = maps_directly<C>(W) ? beta : C(1);
  for_row_panels<C>(ctx, W, [&](index_t r0, const cview<C, D>& P) {
    gemm<C>(ctx, C(1), G.middle_cols(r0, P.rows()), kernels::op::none, P, kernels::op::none, b, O);
  });
}

template <class C, class Ctx, class E>
void apply_expr(const Ctx& ctx, const E& e, const cview<C>& X, const mview<C>& Y) {
  if constexpr (is_matrix_view_v<E>) {
    base_apply<C>(ctx, matrix_view<const typename E::value_type>(e), X, Y);
  } else if constexpr (update<E>) {
    kernels::fill(ctx, Y, C(0));
    evaluator<E>::template apply_add<C>(ctx, e, X, Y);
  } else {
    detail::count_hooked<C>(e.deltas(), e.base());
    const bool replaced = detail::replace_base<C>(e.deltas(), e.base(), [&](const auto& d) {
      evaluator<std::remove_cvref_t<decltype(d)>>::template apply_with_base<C>(ctx, d, X, Y);
    });
    if (!replaced) base_apply<C>(ctx, e.base(), X, Y);
    std::apply([&](const auto&... u) {
      auto one = [&](const auto& d) {
        using U = std::remove_cvref_t<decltype(d)>;
        if constexpr (detail::has_base_hook<U, C>) {
          if (detail::shares_base(d, e.base())) evaluator<U>::template apply_on_base<C>(ctx, d, X, Y);
        }
      };
      (one(u), ...);
    }, e.deltas());
    std::apply([&](const auto&... u) {
      auto one = [&](const auto& d) {
        using U = std::remove_cvref_t<decltype(d)>;
        if constexpr (detail::uses_base<U, C>) {
          if (detail::shares_base(d, e.base())) return;
        }
        evaluator<U>::template apply_add<C>(ctx, d, X, Y);
      };
      (one(u), ...);
    }, e.deltas());
  }
}

template <class C, class Ctx, class E>
void apply_transposed_expr(const Ctx& ctx, const E& e, const cview<C>& G, const mview<C>& O) {
  if constexpr (is_matrix_view_v<E>) {
    base_apply_transposed<C>(ctx, matrix_view<const typename E::value_type>(e), G, O);
  } else if constexpr (update<E>) {
    kernels::fill(ctx, O, C(0));
    evaluator<E>::template apply_transposed_add<C>(ctx, e, G, O);
  } else {
    const bool hooked = detail::count_hooked<C>(e.deltas(), e.base()) == 1;
    bool done_base = hooked && detail::replace_base<C>(e.deltas(), e.base(), [&](const auto& d) {
                       evaluator<std::remove_cvref_t<decltype(d)>>::template apply_transposed_with_base<C>(ctx, d, G, O);
                     });
    if (!done_base && hooked) {
      // DoRA over the base: G·W' = (G·diag(g))·W + s·((G·diag(g))·B)·A.
      std::apply([&](const auto&... u) {
        auto one = [&](const auto& d) {
          using U = std::remove_cvref_t<decltype(d)>;
          if constexpr (detail::has_base_hook<U, C>) {
            if (detail::shares_base(d, e.base())) {
              const auto Gs = evaluator<U>::template transposed_input<C>(ctx, d, G);
              base_apply_transposed<C>(ctx, e.base(), Gs.cview(), O);
              evaluator<std::remove_cvref_t<decltype(d.lora())>>::template apply_transposed_add<C>(ctx, d.lora(),
                                                                                                   Gs.cview(), O);
              done_base = true;
            }
          }
        };
        (one(u), ...);
      }, e.deltas());
    }
    if (!done_base) base_apply_transposed<C>(ctx, e.base(), G, O);
    std::apply([&](const auto&... u) {
      auto one = [&](const auto& d) {
        using U = std::remove_cvref_t<decltype(d)>;
        if constexpr (detail::uses_base<U, C>) {
          if (detail::shares_base(d, e.base())) return;
        }
        evaluator<U>::template apply_transposed_add<C>(ctx, d, G, O);
      };
      (one(u), ...);
    }, e.deltas());
  }
}

/// Runs f(ctx, In, Out) with In the input in arithmetic type C (converted when its storage
/// or layout needs it) and Out the output or, when the output has no BLAS-compatible
/// layout, a scratch copied back afterwards.
template <class C, class T, class F>
void with_views(const matrix_view<const T>& In, const mview<C>& Out, F&& f) {
  const kernels::cpu_context ctx;
  const kernels::operand<C> in(ctx, In);
  if (kernels::is_blas_compatible(Out)) {
    f(ctx, in.view(), Out);
    return;
  }
  auto tmp = kernels::make_scratch<C>(ctx, Out.rows(), Out.cols());
  f(ctx, in.view(), tmp.view());
  kernels::copy(ctx, tmp.cview(), Out);
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
/// Throws aliasing_error when the output `out` of `op` overlaps any view the expression
/// reads: the weight, every update's factors and base weight. O(number of operands).
template <class O, class E>
void check_expression_no_overlap(const char* op, const char* out_name, const O& out, const E& e) {
  if constexpr (is_matrix_view_v<E>) {
    check_no_overlap(op, out_name, out, "the weight W", e);
  } else if constexpr (update<E>) {
    check_update_no_overlap(op, out_name, out, e, true);
  } else {
    check_no_overlap(op, out_name, out, "the weight W", e.base());
    std::apply([&](const auto&... u) { (check_update_no_overlap(op, out_name, out, u, true), ...); }, e.deltas());
  }
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
    detail::check_no_overlap(op, "the output Y", Yv, "the input X", Xv);
    detail::check_expression_no_overlap(op, "the output Y", Yv, e);
    cpu::with_views<C>(Xv, Yv, [&](const auto& ctx, const cpu::cview<C>& Xm, const cpu::mview<C>& Ym) {
      cpu::apply_expr<C>(ctx, e, Xm, Ym);
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
    detail::check_no_overlap(op, "the output O", Ov, "the input G", Gv);
    detail::check_expression_no_overlap(op, "the output O", Ov, e);
    cpu::with_views<C>(Gv, Ov, [&](const auto& ctx, const cpu::cview<C>& Gm, const cpu::mview<C>& Om) {
      cpu::apply_transposed_expr<C>(ctx, e, Gm, Om);
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
  const kernels::cpu_context ctx;
  if constexpr (is_matrix_view_v<E>) {
    dense<C> D(e.rows(), e.cols());
    kernels::copy(ctx, matrix_view<const typename E::value_type>(e), cpu::detail::dense_view(D));
    return D;
  } else if constexpr (update<E>) {
    dense<C> D = dense<C>::Zero(e.rows(), e.cols());
    cpu::evaluator<E>::template add_delta_rows<C>(ctx, e, 0, cpu::detail::dense_view(D));
    return D;
  } else {
    dense<C> D(e.rows(), e.cols());
    kernels::copy(ctx, e.base(), cpu::detail::dense_view(D));
    std::apply([&](const auto&... u) {
      (cpu::evaluator<std::remove_cvref_t<decltype(u)>>::template add_delta_rows<C>(ctx, u, 0, cpu::detail::dense_view(D)),
       ...);
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
  detail::check_update_no_overlap("deltaw::merge", "the weight W", Wv, u, false);
  using C = compute_t<typename decltype(Wv)::value_type, typename U::value_type>;
  const kernels::cpu_context ctx;
  cpu::for_mutable_row_panels<C>(ctx, Wv, [&](index_t r0, const cpu::mview<C>& P) {
    cpu::evaluator<U>::template merge_rows<C>(ctx, u, r0, P);
  });
}

/// The exact inverse of merge: W ← W − ΔW (DoRA: W ← W'/g − s·B·A with the cached norms).
template <class WL, update U>
  requires std::same_as<device_of<U>, device::cpu>
void unmerge(WL&& W, const U& u) {
  auto Wv = detail::mutable_weight_view(std::forward<WL>(W), "deltaw::unmerge");
  detail::check_merge(u, Wv, "deltaw::unmerge");
  detail::check_update_no_overlap("deltaw::unmerge", "the weight W", Wv, u, false);
  using C = compute_t<typename decltype(Wv)::value_type, typename U::value_type>;
  const kernels::cpu_context ctx;
  cpu::for_mutable_row_panels<C>(ctx, Wv, [&](index_t r0, const cpu::mview<C>& P) {
    cpu::evaluator<U>::template unmerge_rows<C>(ctx, u, r0, P);
  });
}

/// merge(), but first computes the merged weight panel by panel and throws
/// non_finite_error, leaving W bit-identical, if any entry would be NaN or ±Inf once
/// rounded to W's storage type (PEFT's safe_merge). The second pass recomputes the same
/// panels and stores exactly what was checked. Scratch is one panel, never out × in.
template <class WL, update U>
  requires std::same_as<device_of<U>, device::cpu>
void merge_checked(WL&& W, const U& u) {
  auto Wv = detail::mutable_weight_view(std::forward<WL>(W), "deltaw::merge_checked");
  detail::check_merge(u, Wv, "deltaw::merge_checked");
  detail::check_update_no_overlap("deltaw::merge_checked", "the weight W", Wv, u, false);
  using TW = typename decltype(Wv)::value_type;
  using C = compute_t<TW, typename U::value_type>;
  const kernels::cpu_context ctx;
  auto scratch = kernels::make_scratch<C>(ctx, std::min(cpu::panel_rows, Wv.rows()), Wv.cols());
  for (index_t r0 = 0; r0 < Wv.rows(); r0 += cpu::panel_rows) {
    const index_t n = std::min(cpu::panel_rows, Wv.rows() - r0);
    const auto P = scratch.view().middle_rows(0, n);
    kernels::copy(ctx, matrix_view<const TW>(Wv.middle_rows(r0, n)), P);
    cpu::evaluator<U>::template merge_rows<C>(ctx, u, r0, P);
    // Checked as W will hold it: rounded to W's storage type, where a finite sum in C
    // can overflow (fp16 past 65504, bf16 and float past 3.4e38).
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < P.cols(); ++j)
        if (!std::isfinite(convert<double>(convert<TW>(P(i, j)))))
          throw non_finite_error("deltaw::merge_checked: merging would make W(" + std::to_string(r0 + i) + ", " +
                                 std::to_string(j) + ") non-finite once stored as " + dtype_name<TW>() +
                                 " (the merged value is " + std::to_string(double(P(i, j))) +
                                 "); W is left unchanged");
  }
  for (index_t r0 = 0; r0 < Wv.rows(); r0 += cpu::panel_rows) {
    const index_t n = std::min(cpu::panel_rows, Wv.rows() - r0);
    const auto P = scratch.view().middle_rows(0, n);
    kernels::copy(ctx, matrix_view<const TW>(Wv.middle_rows(r0, n)), P);
    cpu::evaluator<U>::template merge_rows<C>(ctx, u, r0, P);
    kernels::copy(ctx, cpu::cview<C>(P), Wv.middle_rows(r0, n));
  }
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
