// SPDX-License-Identifier: MIT
// VJP of LoLDU, ΔW = P·L_r·diag(c)·U_r with c = σ·z − σ₀·z₀ (expr/ldu.hpp). P, L_r, U_r,
// z₀ and σ₀ are frozen; the trainable factors are z [r] and σ (a scalar). With
//   Z = X·U_rᵀ [tokens, r],  G = dY·(P·L_r) [tokens, r],
// the loss ⟨dY, X·ΔWᵀ⟩ = Σ_j c_j·⟨G[:, j], Z[:, j]⟩, so
//   dc_j = ⟨G[:, j], Z[:, j]⟩,  dz = σ·dc,  dσ = ⟨z, dc⟩,  dX (update part) = G·diag(c)·U_r.
// P·L_r is gathered once (out × r, as the evaluator does); only tokens × r temporaries.
//
// With autograd::adapted_linear the factor variables are z as [1, r] and σ as [1, 1];
// `rebind(u, views)` builds the update from them (the frozen parts taken from u):
//
//   const auto base = deltaw::loldu(W, r, deltaw::alpha(1), {.train_sigma = true});
//   auto y = ag::adapted_linear<double, 2>(x, deltaw::view(W), {z, sigma}, [&](const auto& v) {
//     return deltaw::cpu::vjp<decltype(base)>::rebind(base, v);
//   });
//
// σ's gradient is written only when u.options().train_sigma is set (a frozen σ may be
// passed as a frozen variable).
#pragma once

#include <array>
#include <span>
#include <string>
#include <vector>

#include "../../expr/ldu.hpp"
#include "ldu.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class D>
struct vjp<ldu<T, D>> {
  using U = ldu<T, D>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "z" : "sigma"; }

  /// The frozen parts of `u` with z = views[0] ([1, r] or [r, 1], viewed, not copied) and
  /// σ = views[1](0, 0) ([1, 1]). On the CPU (σ is read on the host).
  static U rebind(const U& u, const std::array<matrix_view<const T>, 2>& views)
    requires std::is_same_v<D, device::cpu>
  {
    constexpr const char* op = "deltaw::cpu::vjp<ldu>::rebind";
    const auto& z = views[0];
    const auto& s = views[1];
    if ((z.rows() != 1 && z.cols() != 1) || z.size() != u.rank())
      throw shape_error(std::string(op) + ": z is " + deltaw::detail::shape_str(z.rows(), z.cols()) + "; expected [1, " +
                        std::to_string(u.rank()) + "]");
    if (s.rows() != 1 || s.cols() != 1)
      throw shape_error(std::string(op) + ": sigma is " + deltaw::detail::shape_str(s.rows(), s.cols()) +
                        "; expected [1, 1]");
    const vector_view<const T> zv(z.data(), z.size(), z.rows() == 1 ? z.col_stride() : z.row_stride());
    return u.with_z(zv).with_sigma(double(convert<double>(s(0, 0))));
  }

  /// grads = {dz ([1, r] or [r, 1]), dσ ([1, 1])}; see vjp.hpp.
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<ldu>::backward";
    using enum kernels::op;
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    const index_t r = u.rank();
    const mview<C, D>& gz = grads[0];
    const mview<C, D> gs = u.options().train_sigma ? grads[1] : mview<C, D>();
    if (present(gz) && ((gz.rows() != 1 && gz.cols() != 1) || gz.size() != r))
      throw shape_error(std::string(op) + ": the gradient of z is " + deltaw::detail::shape_str(gz.rows(), gz.cols()) +
                        " but z has " + std::to_string(r) + " entries");
    if (present(grads[1]) && (grads[1].rows() != 1 || grads[1].cols() != 1))
      throw shape_error(std::string(op) + ": the gradient of sigma is " +
                        deltaw::detail::shape_str(grads[1].rows(), grads[1].cols()) + "; expected [1, 1]");

    const auto c = detail::ldu_coefficients<C>(ctx, u);
    const bool need_dc = present(gz) || present(gs);
    const bool need_dx = present(dX) && !detail::all_zero(c);  // ΔW = 0 exactly: no dX contribution
    if (!need_dc && !need_dx) return;

    // Rows of P·L_r (row o is row perm[o] of L_r), then G = dY·(P·L_r).
    auto PL = kernels::make_scratch<C>(ctx, u.rows(), r);
    detail::ldu_gather(ctx, u, 0, PL.view());
    const kernels::operand<C, D> Ur(ctx, u.U());
    auto G = kernels::make_scratch<C>(ctx, dY.rows(), r);
    gemm<C>(ctx, C(1), dY, none, PL.cview(), none, C(0), G.view());

    if (need_dc) {
      // dc_j = ⟨G[:, j], Z[:, j]⟩ with Z = X·U_rᵀ (Z is overwritten by G ∘ Z).
      auto Z = kernels::make_scratch<C>(ctx, X.rows(), r);
      gemm<C>(ctx, C(1), X, none, Ur, trans, C(0), Z.view());
      // dc is summed on the device and read on the host (r values; a download on a device).
      transform(ctx, G.cview(), Z.view(), detail::product_map{});
      std::vector<C> dc(static_cast<std::size_t>(r));
      reduce_cols(ctx, Z.cview(), vector_view<C>(dc.data(), r), detail::identity_map{});
      if (present(gz)) {
        const C sigma = C(u.sigma());
        std::vector<C> add(dc.size());
        for (std::size_t j = 0; j < dc.size(); ++j) add[j] = sigma * dc[j];
        detail::add_from_host(ctx, add, gz);  // gz [1, r] or [r, 1]: the same packed order
      }
      if (present(gs)) {
        const std::vector<C> z = to_host_vector<C>(ctx, u.z());
        C acc(0);
        for (index_t j = 0; j < r; ++j) acc += z[std::size_t(j)] * dc[std::size_t(j)];
        detail::add_from_host(ctx, std::vector<C>{acc}, gs);
      }
    }
    if (need_dx) {
      scale_cols(ctx, G.view(), vector_view<const C>(c.data(), r));  // G·diag(c)
      gemm<C>(ctx, C(1), G.cview(), none, Ur, none, C(1), dX);
    }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
