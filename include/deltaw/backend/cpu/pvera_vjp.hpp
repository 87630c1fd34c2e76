// SPDX-License-Identifier: MIT
// VJP of PVeRA's deterministic path (ΔW = diag(λ_b)·B·diag(λ_d[:r])·A₂[:r]): VeRA's VJP on
// u.mean(), the gradient of λ_d's mean half written into the first r entries of the [1, 2r]
// slot; the log-variance half does not enter the mean path and gets no gradient. Factor
// variables for autograd::adapted_linear: λ_d [1, 2r], λ_b [1, out] (rebind builds the update).
#pragma once

#include <array>
#include <span>

#include "../../expr/pvera.hpp"
#include "pvera.hpp"
#include "random_basis_vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class D>
struct vjp<pvera_update<T, D>> {
  using U = pvera_update<T, D>;
  using V = vjp<vera_update<T, D>>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "lambda_d" : "lambda_b"; }

  /// u with λ_d = views[0] ([1, 2r]) and λ_b = views[1] ([1, out]), viewed.
  static U rebind(const U& u, const std::array<matrix_view<const T, D>, 2>& views) {
    constexpr const char* op = "deltaw::cpu::vjp<pvera>::rebind";
    const auto d = detail::coefficient_vector<T>(views[0], 2 * u.rank(), op, "lambda_d");
    const auto b = detail::coefficient_vector<T>(views[1], u.rows(), op, "lambda_b");
    return U(u.basis(), u.rows(), u.cols(), held_vector<T, D>{d, nullptr}, held_vector<T, D>{b, nullptr});
  }

  /// grads = {dλ_d [1, 2r] or [2r, 1], dλ_b [1, out]}; see vjp.hpp.
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<pvera>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_vector_grad<C>(grads[0], 2 * u.rank(), op, "lambda_d");
    const index_t r = u.rank();
    std::array<mview<C, D>, 2> g{mview<C, D>(), grads[1]};
    if (present(grads[0]))
      g[0] = grads[0].rows() == 1 ? grads[0].middle_cols(0, r) : grads[0].middle_rows(0, r);
    V::template backward<C>(ctx, u.mean(), X, dY, std::span<const mview<C, D>>(g), dX);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
