// SPDX-License-Identifier: MIT
// Evaluator of VB-LoRA (expr/vblora.hpp): ΔW = B·A with A [r, in] and B [out, r] mixed from
// the bank per call (top-k of each logit row, softmax, k-term sums: r·(in + out)·k flops),
// then
//   apply:       Y += (X·Aᵀ)·Bᵀ
//   transposed:  O += (G·B)·A
//   rows:        P += factor·B[rows]·A
//   norm:        ‖B·A‖_F² = tr((BᵀB)·(A·Aᵀ)), from the two r × r Gram matrices
// Scratch: A, B (r·(in + out)) and tokens × r; never out × in.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "../../expr/vblora.hpp"
#include "ops.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace vblora_detail {

/// The selections of every row of logits_A and logits_B.
struct selections {
  std::vector<vblora_selection> a, b;
};
template <class U>
selections select(const U& u) {
  constexpr const char* op = "deltaw::vblora";
  selections s;
  const index_t n = u.num_vectors(), k = u.topk();
  auto run = [&](const auto& L, std::vector<vblora_selection>& out) {
    out.resize(std::size_t(L.rows()));
    for (index_t q = 0; q < L.rows(); ++q)
      deltaw::detail::vblora_select(n, k, [&](index_t j) { return convert<double>(L(q, j)); }, out[std::size_t(q)], op, q);
  };
  run(u.logits_A(), s.a);
  run(u.logits_B(), s.b);
  return s;
}

/// A [r, in] and B [out, r] from the selections and the bank (mixtures summed in double).
template <class C, class U>
void form(const U& u, const selections& s, const mview<C>& A, const mview<C>& B) {
  const index_t r = u.rank(), L = u.vector_length(), ti = u.in_tiles(), to = u.out_tiles();
  const auto& V = u.bank();
  std::vector<double> acc(static_cast<std::size_t>(L));
  auto mix = [&](const vblora_selection& sel) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (std::size_t q = 0; q < sel.index.size(); ++q)
      for (index_t l = 0; l < L; ++l) acc[std::size_t(l)] += sel.weight[q] * convert<double>(V(sel.index[q], l));
  };
  for (index_t i = 0; i < r; ++i)
    for (index_t t = 0; t < ti; ++t) {
      mix(s.a[std::size_t(i * ti + t)]);
      for (index_t l = 0; l < L; ++l) A(i, t * L + l) = C(acc[std::size_t(l)]);
    }
  for (index_t t = 0; t < to; ++t)
    for (index_t i = 0; i < r; ++i) {
      mix(s.b[std::size_t(t * r + i)]);
      for (index_t l = 0; l < L; ++l) B(t * L + l, i) = C(acc[std::size_t(l)]);
    }
}

/// A and B as scratch in type C.
template <class C, class Ctx, class U>
struct factors {
  kernels::scratch<C> A, B;
  factors(const Ctx& ctx, const U& u, const selections& s)
      : A(kernels::make_scratch<C>(ctx, u.rank(), u.cols())), B(kernels::make_scratch<C>(ctx, u.rows(), u.rank())) {
    form<C>(u, s, A.view(), B.view());
  }
};

}  // namespace vblora_detail

template <class T>
struct evaluator<vblora_update<T, device::cpu>>
    : additive_rows<evaluator<vblora_update<T, device::cpu>>, vblora_update<T, device::cpu>> {
  using D = device::cpu;
  using U = vblora_update<T, D>;
  template <class C, class Ctx>
  using factors = vblora_detail::factors<C, Ctx, U>;

  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C>& X, const mview<C>& Y) {
    using enum kernels::op;
    const factors<C, Ctx> f(ctx, u, vblora_detail::select(u));
    auto Z = kernels::make_scratch<C>(ctx, X.rows(), u.rank());
    gemm<C>(ctx, C(1), X, none, f.A.cview(), trans, C(0), Z.view());
    gemm<C>(ctx, C(1), Z.cview(), none, f.B.cview(), trans, C(1), Y);
  }
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C>& G, const mview<C>& O) {
    using enum kernels::op;
    const factors<C, Ctx> f(ctx, u, vblora_detail::select(u));
    auto Z = kernels::make_scratch<C>(ctx, G.rows(), u.rank());
    gemm<C>(ctx, C(1), G, none, f.B.cview(), none, C(0), Z.view());
    gemm<C>(ctx, C(1), Z.cview(), none, f.A.cview(), none, C(1), O);
  }
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C>& P, C factor) {
    using enum kernels::op;
    const factors<C, Ctx> f(ctx, u, vblora_detail::select(u));
    gemm<C>(ctx, factor, f.B.cview().middle_rows(r0, P.rows()), none, f.A.cview(), none, C(1), P);
  }
  template <class C>
  static double frobenius_norm(const U& u) {
    using enum kernels::op;
    const kernels::cpu_context ctx;
    const factors<double, kernels::cpu_context> f(ctx, u, vblora_detail::select(u));
    auto GB = kernels::make_scratch<double>(ctx, u.rank(), u.rank());
    auto GA = kernels::make_scratch<double>(ctx, u.rank(), u.rank());
    gemm<double>(ctx, 1.0, f.B.cview(), trans, f.B.cview(), none, 0.0, GB.view());
    gemm<double>(ctx, 1.0, f.A.cview(), none, f.A.cview(), trans, 0.0, GA.view());
    return std::sqrt(std::max(trace_of_product<double>(GB.cview(), GA.cview()), 0.0));
  }
};

/// The factors A [r, in] and B [out, r] PEFT's _get_lora_matrices forms, in type C (e.g. to
/// hand the update to an engine that takes a plain LoRA: ΔW = B·A exactly, scale 1).
template <class C = float, class T>
std::pair<dense<C>, dense<C>> vblora_factors(const vblora_update<T, device::cpu>& u) {
  dense<C> A(u.rank(), u.cols()), B(u.rows(), u.rank());
  vblora_detail::form<C>(u, vblora_detail::select(u), deltaw::view(A), deltaw::view(B));
  return {std::move(A), std::move(B)};
}

}  // namespace cpu
DELTAW_NAMESPACE_END
