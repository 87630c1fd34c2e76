// VJP of DoRA, W' = diag(g)·(W + s·B·A), g = m/n, the row norms n detached (constants in
// the backward pass, as PEFT does). With P = X·Wᵀ + s·(X·Aᵀ)·Bᵀ the output before the
// gain, Y = P·diag(g):
//   dm_o = Σ_t dY[t, o]·P[t, o] / n_o,   dP = dY·diag(g),
// then LoRA's VJP with dP (B, A), and the input gradient dX = dP·W + s·(dP·B)·A — one
// product with W, the same as the base alone. P is saved by forward() or recomputed.
#pragma once

#include "../../expr/dora.hpp"
#include "dora.hpp"
#include "low_rank_vjp.hpp"
#include "ops.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class TW>
struct vjp<dora_update<T, TW, device::cpu>> {
  using U = dora_update<T, TW, device::cpu>;
  using L = vjp<low_rank<T, device::cpu>>;
  static constexpr int factor_count = 3;
  static const char* factor_name(int i) { return i == 0 ? "B" : i == 1 ? "A" : "m"; }

  /// Y = X·W'ᵀ (the whole effective weight, base included) and P, the output before the
  /// gain, which backward_with_base needs for dm.
  template <class C, class XM>
  static void forward(const U& u, const XM& X, dense<C>& Y, dense<C>& P) {
    P.resize(X.rows(), u.rows());
    deltaw::apply(view(u.W()) + u.lora(), view(X), P);
    Y = P;
    Y.array().rowwise() *= evaluator<U>::template gains<C>(u).transpose();
  }

  /// Gradients for Y = X·W'ᵀ with W' the whole DoRA weight: grads = {&dB, &dA, &dm}
  /// (dm [1, out] or [out, 1]) and dX += dY·W' (or dX = when dX_fresh: the first
  /// contribution is written, saving a pass). P: from forward().
  template <class C, class XM, class GM, class PM>
  static void backward_with_base(const U& u, const XM& X, const PM& P, const GM& dY, std::span<dense<C>* const> grads,
                                 dense<C>* dX, bool dX_fresh = false) {
    constexpr const char* op = "deltaw::cpu::vjp<dora>::backward";
    detail::check_grad_slots<C>(grads, factor_count, op);
    if (grads[2] && grads[2]->size() != u.rows())
      throw shape_error(std::string(op) + ": the gradient of m has " + std::to_string(grads[2]->size()) +
                        " entries; m has " + std::to_string(u.rows()));
    if (P.rows() != dY.rows() || P.cols() != dY.cols())
      throw shape_error(std::string(op) + ": the saved pre-gain output is " + deltaw::detail::shape_str(P.rows(), P.cols()) +
                        " but dY is " + deltaw::detail::shape_str(dY.rows(), dY.cols()));
    const auto g = evaluator<U>::template gains<C>(u);
    if (grads[2]) {
      Eigen::Array<C, Eigen::Dynamic, 1> inv_n(u.rows());
      for (index_t o = 0; o < u.rows(); ++o) inv_n(o) = C(1.0 / u.norms()[std::size_t(o)]);
      const Eigen::Array<C, 1, Eigen::Dynamic> dm = dY.cwiseProduct(P).colwise().sum().array() * inv_n.transpose();
      for (index_t o = 0; o < u.rows(); ++o) grads[2]->data()[o] += dm(o);  // [1, out] or [out, 1]
    }
    dense<C> dP = dY;
    dP.array().rowwise() *= g.transpose();
    dense<C>* lg[2] = {grads[0], grads[1]};
    if (dX) {
      if (dX_fresh) {
        dX->resize(dY.rows(), u.cols());
        deltaw::apply_transposed(view(u.W()), view(std::as_const(dP)), *dX);
      } else {
        dense<C> base(dY.rows(), u.cols());
        deltaw::apply_transposed(view(u.W()), view(std::as_const(dP)), base);
        *dX += base;
      }
    }
    L::template backward<C>(u.lora(), X, dP, std::span<dense<C>* const>(lg, 2), dX);
  }

  /// The protocol form (vjp.hpp): dX += dY·ΔW with ΔW = W' − W. Recomputes P; prefer
  /// forward + backward_with_base in training.
  template <class C, class XM, class GM>
  static void backward(const U& u, const XM& X, const GM& dY, std::span<dense<C>* const> grads, dense<C>* dX) {
    dense<C> Y, P;
    const dense<C> Xd = X;
    forward<C>(u, Xd, Y, P);
    dense<C> full;
    backward_with_base<C>(u, Xd, P, dY, grads, dX ? &full : nullptr, true);
    if (dX) {
      dense<C> base(dY.rows(), u.cols());
      const dense<C> dYd = dY;
      deltaw::apply_transposed(view(u.W()), view(dYd), base);
      *dX += full - base;
    }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
