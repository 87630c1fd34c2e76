// SPDX-License-Identifier: MIT
// deltaw's evaluators and VJPs over the buffers the bindings hand over (dw_kernels.hpp).
// Every operand is a deltaw view of the caller's memory (PyTorch's tensors): nothing is
// copied unless a view's layout is not BLAS-compatible, in which case deltaw's kernels
// make the one converted copy they always make.
#include "dw_kernels.hpp"

#include <deltaw/deltaw.hpp>

#include <span>
#include <string>
#include <vector>

namespace deltaw_torch {
namespace {

namespace dw = deltaw;
using cv = dw::matrix_view<const float>;
using mv = dw::matrix_view<float>;

cv cview_of(const mat& m) { return cv(m.p, m.rows, m.cols, m.rs, m.cs); }
mv mview_of(const mat& m) { return m.p ? mv(m.p, m.rows, m.cols, m.rs, m.cs) : mv(); }
dw::vector_view<const float> vec_of(const mat& m) {
  // l arrives as [1, n] (or [n, 1]); a vector view along its long side.
  return m.rows == 1 ? dw::vector_view<const float>(m.p, m.cols, m.cs) : dw::vector_view<const float>(m.p, m.rows, m.rs);
}

dw::road_variant road_variant_of(std::int64_t v) {
  if (v == 1) return dw::road_variant::road_1;
  if (v == 2) return dw::road_variant::road_2;
  if (v == 4) return dw::road_variant::road_4;
  throw dw::argument_error("deltaw_torch: RoAd variant must be 1, 2 or 4; got " + std::to_string(v));
}

/// Calls fn(u) with the deltaw update of kind k over the factors f (every kind but RandLoRA,
/// which is evaluated below with deltaw's primitives).
template <class F>
void visit(int k, const mat* f, double s, std::int64_t out, std::int64_t in, const options& o, F&& fn) {
  const auto sc = dw::scale(s);
  switch (k) {
    case lokr_dd:
      return fn(dw::kron(cview_of(f[0]), cview_of(f[1]), sc));
    case lokr_ld:
      return fn(dw::kron(dw::kron_factor(cview_of(f[0]), cview_of(f[1])), cview_of(f[2]), sc));
    case lokr_dl:
      return fn(dw::kron(cview_of(f[0]), dw::kron_factor(cview_of(f[1]), cview_of(f[2])), sc));
    case lokr_ll:
      return fn(dw::kron(dw::kron_factor(cview_of(f[0]), cview_of(f[1])), dw::kron_factor(cview_of(f[2]), cview_of(f[3])),
                         sc));
    case miss:
      if (f[0].cols == out) return fn(dw::miss(cview_of(f[0]), in));
      return fn(dw::miss_mini(cview_of(f[0]), out, in));
    case bone_bat:
      return fn(dw::bone_bat(cview_of(f[0]), cview_of(f[1])));
    case low_rank:
      return fn(dw::lora(cview_of(f[0]), cview_of(f[1]), sc));
    case loha:
      return fn(dw::loha(cview_of(f[0]), cview_of(f[1]), cview_of(f[2]), cview_of(f[3]), sc));
    case ia3_out:
      return fn(dw::ia3(cview_of(f[0]), vec_of(f[1]), dw::ia3_side::output));
    case ia3_in:
      return fn(dw::ia3(cview_of(f[0]), vec_of(f[1]), dw::ia3_side::input));
    case adalora:
      return fn(dw::adalora(cview_of(f[0]), vec_of(f[1]), cview_of(f[2]), sc));
    case hira:
      return fn(dw::hira(cview_of(f[0]), cview_of(f[1]), cview_of(f[2])));
    case delora:
      return fn(dw::delora(cview_of(f[0]), cview_of(f[1]), vec_of(f[2]), vec_of(f[3])));
    case oft:
      return fn(dw::oft(cview_of(f[0]), cview_of(f[1]), dw::oft_options{o.v[0] != 0, int(o.v[1])}));
    case hra:
      return fn(dw::hra(cview_of(f[0]), cview_of(f[1]), dw::hra_options{o.v[0] != 0}));
    case boft:
      return fn(dw::boft(cview_of(f[0]), cview_of(f[1]), vec_of(f[2]), dw::oft_options{o.v[0] != 0, int(o.v[1])}));
    case road:
      return fn(dw::road(cview_of(f[0]), vec_of(f[1]), vec_of(f[2]), road_variant_of(o.v[0]), o.v[1]));
    case shira:
      if (!o.rows || !o.cols)
        throw dw::argument_error("deltaw_torch: SHiRA needs its index pattern (PEFT's shira_indices [2, nnz])");
      if (o.index_bits == 32)
        return fn(dw::shira(out, in, std::span<const std::int32_t>(static_cast<const std::int32_t*>(o.rows), std::size_t(o.nnz)),
                            std::span<const std::int32_t>(static_cast<const std::int32_t*>(o.cols), std::size_t(o.nnz)),
                            vec_of(f[0]), sc));
      return fn(dw::shira(out, in, std::span<const std::int64_t>(static_cast<const std::int64_t*>(o.rows), std::size_t(o.nnz)),
                          std::span<const std::int64_t>(static_cast<const std::int64_t*>(o.cols), std::size_t(o.nnz)),
                          vec_of(f[0]), sc));
    default:
      throw dw::argument_error("deltaw_torch: unknown update kind " + std::to_string(k));
  }
}

// ── RandLoRA over stored bases ──────────────────────────────────────────────────────────
// deltaw's randlora_update regenerates its (seeded) bases; PEFT's are torch-drawn and
// stored, so this kind is evaluated here with deltaw's primitives. V is never formed: with
// X_k = X∘A[k] (A's row k scaling X's columns),
//   X·Vᵀ   = [X_1·γᵀ·diag(λ_1) … X_r·γᵀ·diag(λ_r)]          (r products [T, mn]·[mn, N])
//   P·V    = Σ_k ((P_k·diag(λ_k))·γ)∘A[k]                   (P_k: P's k-th block of N columns)
//   for L [T, N·r], R [T, mn] and ∂V = Lᵀ·R:
//   ∂γ     = Σ_k (L_k·diag(λ_k))ᵀ·R_k,  ∂λ[k, b] = Σ_t L_k[t, b]·(R_k·γᵀ)[t, b]
namespace rl {
namespace kn = dw::kernels;
using kn::op;
struct bases {
  cv U, A, lam, gam;
  std::int64_t r, N, mn;
};
bases bases_of(const mat* f) {
  bases b{cview_of(f[0]), cview_of(f[1]), cview_of(f[2]), cview_of(f[3]), f[2].rows, f[2].cols, f[3].cols};
  const std::string shapes = "U " + dw::detail::shape_str(b.U.rows(), b.U.cols()) + ", A " +
                             dw::detail::shape_str(b.A.rows(), b.A.cols()) + ", lambda " +
                             dw::detail::shape_str(b.r, b.N) + ", gamma " + dw::detail::shape_str(b.gam.rows(), b.mn);
  if (b.A.rows() != b.r || b.A.cols() != b.mn || b.gam.rows() != b.N || b.U.cols() != b.N * b.r)
    throw dw::shape_error("deltaw_torch randlora: needs U [max_dim, N·r], A [r, min_dim], lambda [r, N], gamma [N, min_dim]; got " +
                          shapes);
  return b;
}
dw::vector_view<const float> row(const cv& m, std::int64_t k) {
  return dw::vector_view<const float>(m.data() + k * m.row_stride(), m.cols(), m.col_stride());
}
/// P = X·Vᵀ (overwritten), X [T, mn], P [T, N·r].
void times_vt(const kn::cpu_context& ctx, const bases& b, const cv& X, const mv& P) {
  auto S = kn::make_scratch<float>(ctx, X.rows(), b.mn);
  for (std::int64_t k = 0; k < b.r; ++k) {
    kn::copy(ctx, X, S.view());
    kn::scale_cols(ctx, S.view(), row(b.A, k));
    const mv Pk = P.middle_cols(k * b.N, b.N);
    kn::gemm<float>(ctx, 1.0f, S.cview(), op::none, b.gam, op::trans, 0.0f, Pk);
    kn::scale_cols(ctx, Pk, row(b.lam, k));
  }
}
/// Z += alpha·P·V, P [T, N·r], Z [T, mn].
void times_v(const kn::cpu_context& ctx, const bases& b, float alpha, const cv& P, const mv& Z) {
  auto Pk = kn::make_scratch<float>(ctx, P.rows(), b.N);
  auto Tk = kn::make_scratch<float>(ctx, P.rows(), b.mn);
  for (std::int64_t k = 0; k < b.r; ++k) {
    kn::copy(ctx, P.middle_cols(k * b.N, b.N), Pk.view());
    kn::scale_cols(ctx, Pk.view(), row(b.lam, k));
    kn::gemm<float>(ctx, alpha, Pk.cview(), op::none, b.gam, op::none, 0.0f, Tk.view());
    kn::scale_cols(ctx, Tk.view(), row(b.A, k));
    kn::axpy<float>(ctx, 1.0f, Tk.cview(), Z);
  }
}
/// dλ += ∂λ, dγ += ∂γ of ⟨∂V, V⟩ with ∂V = Lᵀ·R (either may be absent).
void grads(const kn::cpu_context& ctx, const bases& b, const cv& L, const cv& R, const mv& dlam, const mv& dgam) {
  if (!dlam.data() && !dgam.data()) return;
  auto S = kn::make_scratch<float>(ctx, R.rows(), b.mn);
  auto Lk = kn::make_scratch<float>(ctx, L.rows(), b.N);
  auto Q = kn::make_scratch<float>(ctx, R.rows(), b.N);
  for (std::int64_t k = 0; k < b.r; ++k) {
    kn::copy(ctx, R, S.view());
    kn::scale_cols(ctx, S.view(), row(b.A, k));
    const cv Lv = L.middle_cols(k * b.N, b.N);
    if (dgam.data()) {
      kn::copy(ctx, Lv, Lk.view());
      kn::scale_cols(ctx, Lk.view(), row(b.lam, k));
      kn::gemm<float>(ctx, 1.0f, Lk.cview(), op::trans, S.cview(), op::none, 1.0f, dgam);
    }
    if (dlam.data()) {
      kn::gemm<float>(ctx, 1.0f, S.cview(), op::none, b.gam, op::trans, 0.0f, Q.view());
      const mv dl = dlam.middle_rows(k, 1);
      kn::dot_rows(ctx, Lv.transpose(), Q.cview().transpose(),
                   dw::vector_view<float>(dl.data(), b.N, dl.col_stride()), true);
    }
  }
}
void check_layer(const bases& b, std::int64_t out, std::int64_t in) {
  const std::int64_t mn = std::min(out, in), mx = std::max(out, in);
  if (b.mn != mn || b.U.rows() != mx)
    throw dw::shape_error("deltaw_torch randlora: the layer [" + std::to_string(out) + ", " + std::to_string(in) +
                          "] needs gamma [N, " + std::to_string(mn) + "] and U [" + std::to_string(mx) +
                          ", N·r]; got gamma " + dw::detail::shape_str(b.gam.rows(), b.mn) + ", U " +
                          dw::detail::shape_str(b.U.rows(), b.U.cols()));
}
void apply(const mat* f, double s, std::int64_t out, std::int64_t in, const mat& Xm, const mat& Ym) {
  const kn::cpu_context ctx;
  const bases b = bases_of(f);
  check_layer(b, out, in);
  const kn::operand<float> X(ctx, cview_of(Xm));
  const mv Y = mview_of(Ym);
  auto P = kn::make_scratch<float>(ctx, Xm.rows, b.N * b.r);
  if (out >= in) {  // Y = s·(X·Vᵀ)·Uᵀ
    times_vt(ctx, b, X.view(), P.view());
    kn::gemm<float>(ctx, float(s), P.cview(), op::none, b.U, op::trans, 0.0f, Y);
  } else {  // Y = s·(X·U)·V
    kn::gemm<float>(ctx, 1.0f, X.view(), op::none, b.U, op::none, 0.0f, P.view());
    kn::fill(ctx, Y, 0.0f);
    times_v(ctx, b, float(s), P.cview(), Y);
  }
}
void apply_transposed(const mat* f, double s, std::int64_t out, std::int64_t in, const mat& Gm, const mat& Om) {
  const kn::cpu_context ctx;
  const bases b = bases_of(f);
  check_layer(b, out, in);
  const kn::operand<float> G(ctx, cview_of(Gm));
  const mv O = mview_of(Om);
  auto P = kn::make_scratch<float>(ctx, Gm.rows, b.N * b.r);
  if (out >= in) {  // O = s·(G·U)·V
    kn::gemm<float>(ctx, 1.0f, G.view(), op::none, b.U, op::none, 0.0f, P.view());
    kn::fill(ctx, O, 0.0f);
    times_v(ctx, b, float(s), P.cview(), O);
  } else {  // O = s·(G·Vᵀ)·Uᵀ
    times_vt(ctx, b, G.view(), P.view());
    kn::gemm<float>(ctx, float(s), P.cview(), op::none, b.U, op::trans, 0.0f, O);
  }
}
void backward(const mat* f, double s, std::int64_t out, std::int64_t in, const mat& Xm, const mat& dYm,
              const mat* g, const mat& dXm) {
  const kn::cpu_context ctx;
  const bases b = bases_of(f);
  check_layer(b, out, in);
  const kn::operand<float> X(ctx, cview_of(Xm)), dY(ctx, cview_of(dYm));
  const mv dlam = mview_of(g[0]), dgam = mview_of(g[1]), dX = mview_of(dXm);
  if (g[0].p && (g[0].rows != b.r || g[0].cols != b.N))
    throw dw::shape_error("deltaw_torch randlora: the gradient of lambda must be " + dw::detail::shape_str(b.r, b.N));
  if (g[1].p && (g[1].rows != b.N || g[1].cols != b.mn))
    throw dw::shape_error("deltaw_torch randlora: the gradient of gamma must be " + dw::detail::shape_str(b.N, b.mn));
  auto P = kn::make_scratch<float>(ctx, Xm.rows, b.N * b.r);
  if (out >= in) {  // dP = s·dY·U; dX += dP·V; ∂V = dPᵀ·X
    kn::gemm<float>(ctx, float(s), dY.view(), op::none, b.U, op::none, 0.0f, P.view());
    if (dXm.p) times_v(ctx, b, 1.0f, P.cview(), dX);
    grads(ctx, b, P.cview(), X.view(), dlam, dgam);
  } else {  // P = s·X·U; ∂V = Pᵀ·dY; dX += s·(dY·Vᵀ)·Uᵀ
    if (g[0].p || g[1].p) {
      kn::gemm<float>(ctx, float(s), X.view(), op::none, b.U, op::none, 0.0f, P.view());
      grads(ctx, b, P.cview(), dY.view(), dlam, dgam);
    }
    if (dXm.p) {
      times_vt(ctx, b, dY.view(), P.view());
      kn::gemm<float>(ctx, float(s), P.cview(), op::none, b.U, op::trans, 1.0f, dX);
    }
  }
}
}  // namespace rl

}  // namespace

int factor_count(int k) {
  switch (k) {
    case lokr_dd: return 2;
    case lokr_ld: case lokr_dl: return 3;
    case lokr_ll: return 4;
    case miss: return 1;
    case bone_bat: return 2;
    case low_rank: return 2;
    case loha: return 4;
    case ia3_out: case ia3_in: return 2;
    case adalora: case hira: return 3;
    case delora: return 4;
    case oft: case hra: return 2;
    case boft: case road: return 3;
    case randlora: return 4;
    case shira: return 1;
    default: return -1;
  }
}
bool with_base(int k) {
  return k == bone_bat || k == ia3_out || k == ia3_in || k == oft || k == hra || k == boft || k == road;
}
namespace {
bool reads_frozen_w(int k) { return with_base(k) || k == hira; }
}  // namespace
int trainable_count(int k) {
  if (k == randlora) return 2;
  return reads_frozen_w(k) || k == delora ? factor_count(k) - 1 : factor_count(k);
}
int trainable_index(int k, int i) { return k == randlora ? i + 2 : reads_frozen_w(k) ? i + 1 : i; }

void apply(int k, const mat* f, double s, std::int64_t out, std::int64_t in, const options& o, const mat& X,
           const mat& Y) {
  if (k == randlora) return rl::apply(f, s, out, in, X, Y);
  visit(k, f, s, out, in, o, [&](const auto& u) {
    if (with_base(k))
      dw::apply(cview_of(f[0]) + u, cview_of(X), mview_of(Y));
    else
      dw::apply(u, cview_of(X), mview_of(Y));
  });
}

void apply_transposed(int k, const mat* f, double s, std::int64_t out, std::int64_t in, const options& o, const mat& G,
                      const mat& O) {
  if (k == randlora) return rl::apply_transposed(f, s, out, in, G, O);
  visit(k, f, s, out, in, o, [&](const auto& u) {
    if (with_base(k))
      dw::apply_transposed(cview_of(f[0]) + u, cview_of(G), mview_of(O));
    else
      dw::apply_transposed(u, cview_of(G), mview_of(O));
  });
}

void backward(int k, const mat* f, double s, std::int64_t out, std::int64_t in, const options& o, const mat& X,
              const mat& dY, const mat* grads, const mat& dX) {
  if (k == randlora) return rl::backward(f, s, out, in, X, dY, grads, dX);
  visit(k, f, s, out, in, o, [&](const auto& u) {
    using U = std::remove_cvref_t<decltype(u)>;
    const int n = trainable_count(k);
    std::vector<mv> slots;
    bool any = false;
    for (int i = 0; i < n; ++i) {  // grads[i] is the slot of factor trainable_index(k, i)
      slots.push_back(mview_of(grads[i]));
      any = any || grads[i].p;
    }
    const bool base = with_base(k);
    if (any || (dX.p && !base)) {
      const dw::kernels::cpu_context ctx;
      const dw::kernels::operand<float> Xo(ctx, cview_of(X)), Go(ctx, cview_of(dY));
      // dX is accumulated by the VJP: the caller hands it zeroed.
      dw::cpu::vjp<U>::template backward<float>(ctx, u, Xo.view(), Go.view(), std::span<const mv>(slots),
                                                base ? mv() : mview_of(dX));
    }
    if (base && dX.p) dw::apply_transposed(cview_of(f[0]) + u, cview_of(dY), mview_of(dX));
  });
}

}  // namespace deltaw_torch
