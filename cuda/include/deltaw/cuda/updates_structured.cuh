// SPDX-License-Identifier: MIT
// CUDA evaluation of HRA, DeLoRA, GraLoRA, UniLoRA, VB-LoRA and HiRA (PEFT's structured
// low-rank methods), with their VJPs for cuda::backward (vjp.cuh):
//
//   HRA, DeLoRA, GraLoRA, HiRA   the evaluators and VJPs of deltaw/backend/cpu/<type>.hpp and
//                                <type>_vjp.hpp, templated on the device and run with a
//                                cuda::context through shared_evaluator.
//   UniLoRA, VB-LoRA             cpu::evaluator and cpu::vjp specialised here for
//                                device::cuda (the CPU's gather and top-k loops read the
//                                update's data on the host; here they are maps on the device).
//
// What runs on the host, and why:
//   HRA       the compact WY factors N [in, r], Tm [r, r] are computed on the host in double
//             when the update is built (cuda::hra below: U is downloaded once, in·r values);
//             each call uploads them (in·r + r² values). The backward's pullback through the
//             factors (the WY recursion and the normalisation, O(in·r²)) runs on the host:
//             ∂N [in, r], ∂Tm [r, r] and U are downloaded, ∂U uploaded and added on the device.
//   DeLoRA    the norms of A's rows and B's columns are summed on the device (reduce_cols) and
//             read back with λ (2·r + 1 values, synchronises); c [r] is computed on the host and
//             uploaded. Backward: ∂c [r] formed on the device (dot_rows) and read back; ∂λ
//             summed on the host and added on the device.
//   GraLoRA   nothing (GEMMs and copies only).
//   HiRA      nothing, but unmerge's check that 1 + B·A has no zero entry counts them per
//             column on the device and reads the counts (in values per panel, synchronises).
//   UniLoRA   the pattern (indices into θ and scales, host metadata of r·(in + out) entries
//             each) is uploaded into scratch per call; A and B are gathered from θ by one map
//             each. Backward: the scatter-add into ∂θ is one map over θ's d entries, each
//             summing its contributions in the CPU's order, through an inverse index (CSR)
//             built on the host per call from the pattern and uploaded (d + 1 offsets,
//             r·(in + out) entries): deterministic, no atomics, bitwise the CPU's order.
//   VB-LoRA   the top-k selection: the logits ((r·in/L + out/L·r) × n values) are downloaded
//             per call (an explicit copy that synchronises), selected and softmaxed on the host
//             (deltaw::detail::vblora_select, the CPU's code), and the selections (indices and
//             weights, k per logit row) uploaded; A and B are mixed from the bank by one map
//             each, summed in double in the CPU's order. Backward: the logit gradients are one
//             map over the logit rows (each row's k entries are distinct); the bank gradient is
//             one map over the bank's n × L entries through an inverse index (CSR, built on the
//             host from the selections) in the CPU's order.
// No operation takes an out × in scratch: the factors, tokens × r and panels of
// cpu::panel_rows rows (HiRA, HRA) are the largest.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <deltaw/backend/cpu/delora.hpp>
#include <deltaw/backend/cpu/delora_vjp.hpp>
#include <deltaw/backend/cpu/gralora.hpp>
#include <deltaw/backend/cpu/gralora_vjp.hpp>
#include <deltaw/backend/cpu/hira.hpp>
#include <deltaw/backend/cpu/hira_vjp.hpp>
#include <deltaw/backend/cpu/hra.hpp>
#include <deltaw/backend/cpu/hra_vjp.hpp>
#include <deltaw/backend/cpu/unilora.hpp>
#include <deltaw/backend/cpu/unilora_vjp.hpp>
#include <deltaw/backend/cpu/vblora.hpp>
#include <deltaw/backend/cpu/vblora_vjp.hpp>

#include "context.cuh"
#include "elementwise.cuh"
#include "for_each.cuh"
#include "ops.cuh"
#include "primitives.cuh"
#include "scratch.cuh"
#include "shared_evaluator.cuh"
#include "updates.cuh"
#include "vector_ops.cuh"
#include "vjp.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

template <class T, class TW>
struct evaluator<hra_update<T, TW, device::cuda>> : shared_evaluator<hra_update<T, TW, device::cuda>> {};
template <class T>
struct evaluator<delora_update<T, device::cuda>> : shared_evaluator<delora_update<T, device::cuda>> {};
template <class T>
struct evaluator<gralora_update<T, device::cuda>> : shared_evaluator<gralora_update<T, device::cuda>> {};
template <class T>
struct evaluator<unilora_update<T, device::cuda>> : shared_evaluator<unilora_update<T, device::cuda>> {};
template <class T>
struct evaluator<vblora_update<T, device::cuda>> : shared_evaluator<vblora_update<T, device::cuda>> {};
template <class T, class TW>
struct evaluator<hira_update<T, TW, device::cuda>> : shared_evaluator<hira_update<T, TW, device::cuda>> {};

namespace detail {

/// A device matrix (any layout, any storage type) read on the host as row-major doubles:
/// converted on the device into scratch, then one download (synchronises).
template <class T>
std::vector<double> structured_matrix_to_host(const context& ctx, const matrix_view<const T, device::cuda>& M) {
  if (M.rows() == 0 || M.cols() == 0) return {};
  const auto mark = ctx.position();
  auto S = kernels::make_scratch<double>(ctx, M.rows(), M.cols());
  copy(ctx, M, S.view());
  auto h = to_host_vector<double>(ctx, vector_view<const double, device::cuda>(S.cview().data(), M.rows() * M.cols()));
  ctx.release(mark);
  return h;
}

/// The CSR form of a list of keys in [0, n): for each key, the positions at which it occurs,
/// in increasing order. offsets [n + 1], positions [keys.size()].
struct structured_inverse_index {
  std::vector<index_t> offsets, positions;
};
template <class Key>
structured_inverse_index structured_invert(index_t n, std::size_t count, Key&& key) {
  structured_inverse_index r;
  r.offsets.assign(std::size_t(n) + 1, 0);
  for (std::size_t e = 0; e < count; ++e) ++r.offsets[std::size_t(key(e)) + 1];
  for (index_t i = 0; i < n; ++i) r.offsets[std::size_t(i) + 1] += r.offsets[std::size_t(i)];
  r.positions.resize(count);
  std::vector<index_t> next(r.offsets.begin(), r.offsets.end() - 1);
  for (std::size_t e = 0; e < count; ++e) r.positions[std::size_t(next[std::size_t(key(e))]++)] = index_t(e);
  return r;
}

// ---- UniLoRA ----

/// A(i, j) = θ[idx[i·cols + j]]·σ[i·cols + j] (idx and σ in scratch): the CPU's gather.
template <class T, class C>
struct unilora_gather_fn {
  vector_view<const T, device::cuda> theta;
  const index_t* idx;
  const double* scale;
  index_t cols;
  DELTAW_HOST_DEVICE C operator()(index_t i, index_t j, C) const {
    const index_t k = i * cols + j;
    return convert<C>(theta[idx[k]]) * C(scale[k]);
  }
};

/// ∂θ[t] += Σ over the entries e that read θ[t], in the CPU's order (A's entries, then B's):
/// dA_flat[e]·σ_A[e] or dB_flat[e − nA]·σ_B[e − nA].
template <class C>
struct unilora_theta_grad_fn {
  const index_t* offsets;
  const index_t* positions;
  const C* dA;  // [r, in] row-major
  const C* dB;  // [out, r] row-major
  const double* scale_A;
  const double* scale_B;
  index_t nA;
  bool column;  // the slot is [d, 1]
  DELTAW_HOST_DEVICE C operator()(index_t i, index_t j, C y) const {
    const index_t t = column ? i : j;
    for (index_t e = offsets[t]; e < offsets[t + 1]; ++e) {
      const index_t k = positions[e];
      y += k < nA ? dA[k] * C(scale_A[k]) : dB[k - nA] * C(scale_B[k - nA]);
    }
    return y;
  }
};

/// A [r, in] (which = 0) or B [out, r] (which = 1) gathered from θ on the device; the
/// pattern's indices and scales are uploaded into scratch for the map and released after it.
template <class C, class T>
kernels::scratch<C, device::cuda> unilora_gather(const context& ctx, const unilora_update<T, device::cuda>& u, int which) {
  const auto& p = *u.pattern();
  const index_t rows = which == 0 ? p.r : p.out, cols = which == 0 ? p.in : p.r;
  const auto& idx = which == 0 ? p.idx_A : p.idx_B;
  const auto& sc = which == 0 ? p.scale_A : p.scale_B;
  auto M = kernels::make_scratch<C>(ctx, rows, cols);
  if (rows == 0 || cols == 0) return M;
  const auto mark = ctx.position();
  const index_t* di = upload_to_scratch(ctx, idx.data(), idx.size());
  const double* ds = upload_to_scratch(ctx, sc.data(), sc.size());
  transform(ctx, M.view(), unilora_gather_fn<T, C>{u.theta(), di, ds, cols});
  ctx.release(mark);
  return M;
}

// ---- VB-LoRA ----

/// The top-k selections of every logit row, A's rows first, flattened: k indices and
/// softmax weights per row (the host's selection, uploaded).
struct vblora_flat {
  index_t k = 0, rows_a = 0, rows_b = 0;
  std::vector<index_t> index;
  std::vector<double> weight;
};
template <class T>
vblora_flat vblora_select_all(const context& ctx, const vblora_update<T, device::cuda>& u) {
  constexpr const char* op = "deltaw::vblora";
  vblora_flat f;
  const index_t n = u.num_vectors(), k = u.topk();
  f.k = k;
  f.rows_a = u.logits_A().rows();
  f.rows_b = u.logits_B().rows();
  f.index.reserve(std::size_t((f.rows_a + f.rows_b) * k));
  f.weight.reserve(f.index.capacity());
  vblora_selection s;
  for (const auto* L : {&u.logits_A(), &u.logits_B()}) {
    const std::vector<double> h = structured_matrix_to_host(ctx, *L);  // the explicit download of the logits
    for (index_t q = 0; q < L->rows(); ++q) {
      ::deltaw::detail::vblora_select(n, k, [&](index_t j) { return h[std::size_t(q * n + j)]; }, s, op, q);
      f.index.insert(f.index.end(), s.index.begin(), s.index.end());
      f.weight.insert(f.weight.end(), s.weight.begin(), s.weight.end());
    }
  }
  return f;
}

/// The selections in scratch (device pointers).
struct vblora_device_selection {
  const index_t* index;
  const double* weight;
  index_t k, rows_a;
};

/// A(i, t·L + l) (b = false) or B(t·L + l, i) (b = true) = Σ_q w_q·bank[j_q, l], summed in
/// double in the selection's order (the CPU's), for the selection of logit row i·ti + t of
/// A or t·r + i of B.
template <class T, class C>
struct vblora_mix_fn {
  matrix_view<const T, device::cuda> bank;
  vblora_device_selection sel;
  index_t L, m;  // m: ti for A, r for B
  bool b;
  DELTAW_HOST_DEVICE C operator()(index_t row, index_t col, C) const {
    index_t s, l;
    if (!b) {
      s = row * m + col / L;
      l = col % L;
    } else {
      s = sel.rows_a + (row / L) * m + col;
      l = row % L;
    }
    double acc = 0.0;
    for (index_t q = 0; q < sel.k; ++q)
      acc += sel.weight[s * sel.k + q] * convert<double>(bank(sel.index[s * sel.k + q], l));
    return C(acc);
  }
};

/// The gradient g(l) of the mixed sub-vector of logit row s (A's rows first).
template <class C>
struct vblora_row_grad {
  matrix_view<const C, device::cuda> dA, dB;  // [r, in], [out, r]
  index_t rows_a, ti, r, L;
  DELTAW_HOST_DEVICE C operator()(index_t s, index_t l) const {
    if (s < rows_a) return dA(s / ti, (s % ti) * L + l);
    const index_t q = s - rows_a;
    return dB((q / r) * L + l, q % r);
  }
};

/// For logit row s: c_p = ⟨g, bank[j_p, :]⟩, ∂ℓ[s, j_p] += w_p·(c_p − Σ_p' w_p'·c_p'), as the
/// CPU (c_p computed twice rather than held: k is small).
template <class T, class C>
struct vblora_logit_grad_fn {
  matrix_view<const T, device::cuda> bank;
  vblora_device_selection sel;
  vblora_row_grad<C> g;
  matrix_view<C, device::cuda> gl;  // the slot of A's or B's logits
  index_t s0;                       // the first selection row of that slot
  DELTAW_HOST_DEVICE double c(index_t s, index_t p) const {
    double v = 0.0;
    for (index_t l = 0; l < g.L; ++l) v += double(g(s, l)) * convert<double>(bank(sel.index[s * sel.k + p], l));
    return v;
  }
  DELTAW_HOST_DEVICE void operator()(index_t q) const {
    const index_t s = s0 + q;
    double mean = 0.0;
    for (index_t p = 0; p < sel.k; ++p) mean += sel.weight[s * sel.k + p] * c(s, p);
    for (index_t p = 0; p < sel.k; ++p) {
      C& y = gl(q, sel.index[s * sel.k + p]);
      y += C(sel.weight[s * sel.k + p] * (c(s, p) - mean));
    }
  }
};

/// ∂bank[j, l] += Σ w·g_s(l) over the selections (s, p) of bank vector j, in the CPU's order.
template <class C>
struct vblora_bank_grad_fn {
  const index_t* offsets;
  const index_t* positions;  // flattened selection slots s·k + p
  vblora_device_selection sel;
  vblora_row_grad<C> g;
  DELTAW_HOST_DEVICE C operator()(index_t j, index_t l, C y) const {
    for (index_t e = offsets[j]; e < offsets[j + 1]; ++e) {
      const index_t slot = positions[e];
      y += C(sel.weight[slot] * double(g(slot / sel.k, l)));
    }
    return y;
  }
};

/// The selections of u uploaded into scratch (released by the caller's mark).
inline vblora_device_selection upload_selection(const context& ctx, const vblora_flat& f) {
  return {upload_to_scratch(ctx, f.index.data(), f.index.size()), upload_to_scratch(ctx, f.weight.data(), f.weight.size()),
          f.k, f.rows_a};
}

/// A [r, in] and B [out, r] of a VB-LoRA update mixed on the device.
template <class C, class T>
struct vblora_factors {
  kernels::scratch<C, device::cuda> A, B;
  vblora_factors(const context& ctx, const vblora_update<T, device::cuda>& u, const vblora_flat& f)
      : A(kernels::make_scratch<C>(ctx, u.rank(), u.cols())), B(kernels::make_scratch<C>(ctx, u.rows(), u.rank())) {
    const auto mark = ctx.position();
    const auto sel = upload_selection(ctx, f);
    transform(ctx, A.view(), vblora_mix_fn<T, C>{u.bank(), sel, u.vector_length(), u.in_tiles(), false});
    transform(ctx, B.view(), vblora_mix_fn<T, C>{u.bank(), sel, u.vector_length(), u.rank(), true});
    ctx.release(mark);
  }
};

}  // namespace detail

/// HRA over a device weight W [out, in] with U [in, r] (PEFT's hra_u) on the device: U is
/// downloaded once (an explicit copy, synchronises) and the compact WY factors are computed
/// on the host in double by the CPU's code (deltaw::detail::hra_make_factors) and cached.
template <class WV, class UV>
auto hra(context& ctx, const WV& W, const UV& U, hra_options o = {}) {
  static_assert(detail::is_cuda_view_v<WV> && detail::is_cuda_view_v<UV>,
                "deltaw::cuda::hra: W and U must be CUDA views (deltaw::cuda::view(ptr, rows, cols))");
  using TW = std::remove_const_t<typename WV::element_type>;
  using T = std::remove_const_t<typename UV::element_type>;
  const matrix_view<const TW, device::cuda> Wv(W);
  const matrix_view<const T, device::cuda> Uv(U);
  std::shared_ptr<const hra_factors> f;
  if (Uv.cols() >= 1 && Uv.rows() == Wv.cols()) {  // else the update's constructor reports the shapes
    device_guard g(ctx.device());
    ctx.begin_operation();
    const std::vector<double> h = detail::structured_matrix_to_host(ctx, Uv);
    f = ::deltaw::detail::hra_make_factors(matrix_view<const double>(h.data(), Uv.rows(), Uv.cols(), Uv.cols(), 1), o);
  }
  return hra_update<T, TW, device::cuda>(held_matrix<TW, device::cuda>{Wv, nullptr},
                                         held_matrix<T, device::cuda>{Uv, nullptr}, o, std::move(f));
}
template <class WV, class UV>
auto hra(const WV& W, const UV& U, hra_options o = {}) {
  return hra(default_context(), W, U, o);
}

}  // namespace cuda

namespace cpu {

/// UniLoRA on CUDA: the CPU's evaluator with the gathers as maps on the device.
template <class T>
struct evaluator<unilora_update<T, device::cuda>>
    : additive_rows<evaluator<unilora_update<T, device::cuda>>, unilora_update<T, device::cuda>> {
  using D = device::cuda;
  using U = unilora_update<T, D>;
  using Ctx = cuda::context;

  template <class C>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    using enum kernels::op;
    if (X.rows() == 0) return;
    const auto A = cuda::detail::unilora_gather<C>(ctx, u, 0);
    const auto B = cuda::detail::unilora_gather<C>(ctx, u, 1);
    auto H = kernels::make_scratch<C>(ctx, X.rows(), u.rank());
    gemm<C>(ctx, C(1), X, none, A.cview(), trans, C(0), H.view());
    gemm<C>(ctx, C(1), H.cview(), none, B.cview(), trans, C(1), Y);
  }
  template <class C>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    using enum kernels::op;
    if (G.rows() == 0) return;
    const auto A = cuda::detail::unilora_gather<C>(ctx, u, 0);
    const auto B = cuda::detail::unilora_gather<C>(ctx, u, 1);
    auto H = kernels::make_scratch<C>(ctx, G.rows(), u.rank());
    gemm<C>(ctx, C(1), G, none, B.cview(), none, C(0), H.view());
    gemm<C>(ctx, C(1), H.cview(), none, A.cview(), none, C(1), O);
  }
  template <class C>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    using enum kernels::op;
    if (P.rows() == 0) return;
    const auto A = cuda::detail::unilora_gather<C>(ctx, u, 0);
    const auto B = cuda::detail::unilora_gather<C>(ctx, u, 1);
    gemm<C>(ctx, factor, B.cview().middle_rows(r0, P.rows()), none, A.cview(), none, C(1), P);
  }
};

/// UniLoRA's VJP on CUDA (unilora_vjp.hpp's formulas): the scatter-add into ∂θ is one map over
/// θ through an inverse index of the pattern built on the host, in the CPU's order.
template <class T>
struct vjp<unilora_update<T, device::cuda>> {
  using D = device::cuda;
  using U = unilora_update<T, D>;
  static constexpr int factor_count = 1;
  static const char* factor_name(int) { return "theta"; }

  template <class C>
  static void backward(const cuda::context& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<unilora>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    const auto& g = grads[0];
    const auto& p = *u.pattern();
    if (present(g) && !((g.rows() == p.d && g.cols() == 1) || (g.rows() == 1 && g.cols() == p.d)))
      throw shape_error(std::string(op) + ": the gradient of theta is " + deltaw::detail::shape_str(g.rows(), g.cols()) +
                        "; expected [" + std::to_string(p.d) + ", 1] or [1, " + std::to_string(p.d) + "]");
    using enum kernels::op;
    const index_t r = u.rank(), T_ = X.rows();
    if (T_ == 0 || (!present(g) && !present(dX))) return;
    const auto A = cuda::detail::unilora_gather<C>(ctx, u, 0);
    const auto B = cuda::detail::unilora_gather<C>(ctx, u, 1);
    auto dH = kernels::make_scratch<C>(ctx, T_, r);
    gemm<C>(ctx, C(1), dY, none, B.cview(), none, C(0), dH.view());
    if (present(dX)) gemm<C>(ctx, C(1), dH.cview(), none, A.cview(), none, C(1), dX);
    if (!present(g)) return;
    auto dA = kernels::make_scratch<C>(ctx, r, u.cols());
    gemm<C>(ctx, C(1), dH.cview(), trans, X, none, C(0), dA.view());
    auto H = kernels::make_scratch<C>(ctx, T_, r);
    gemm<C>(ctx, C(1), X, none, A.cview(), trans, C(0), H.view());
    auto dB = kernels::make_scratch<C>(ctx, u.rows(), r);
    gemm<C>(ctx, C(1), dY, trans, H.cview(), none, C(0), dB.view());
    const std::size_t nA = p.idx_A.size(), nB = p.idx_B.size();
    const auto inv = cuda::detail::structured_invert(
        p.d, nA + nB, [&](std::size_t e) { return e < nA ? p.idx_A[e] : p.idx_B[e - nA]; });
    const auto mark = ctx.position();
    const cuda::detail::unilora_theta_grad_fn<C> f{
        cuda::detail::upload_to_scratch(ctx, inv.offsets.data(), inv.offsets.size()),
        cuda::detail::upload_to_scratch(ctx, inv.positions.data(), inv.positions.size()),
        dA.cview().data(),
        dB.cview().data(),
        cuda::detail::upload_to_scratch(ctx, p.scale_A.data(), nA),
        cuda::detail::upload_to_scratch(ctx, p.scale_B.data(), nB),
        index_t(nA),
        g.cols() == 1};
    transform(ctx, g, f);
    ctx.release(mark);
  }
};

/// VB-LoRA on CUDA: the selection on the host from explicitly downloaded logits, the mixtures
/// as maps on the device.
template <class T>
struct evaluator<vblora_update<T, device::cuda>>
    : additive_rows<evaluator<vblora_update<T, device::cuda>>, vblora_update<T, device::cuda>> {
  using D = device::cuda;
  using U = vblora_update<T, D>;
  using Ctx = cuda::context;

  template <class C>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    using enum kernels::op;
    const cuda::detail::vblora_factors<C, T> f(ctx, u, cuda::detail::vblora_select_all(ctx, u));
    auto Z = kernels::make_scratch<C>(ctx, X.rows(), u.rank());
    gemm<C>(ctx, C(1), X, none, f.A.cview(), trans, C(0), Z.view());
    gemm<C>(ctx, C(1), Z.cview(), none, f.B.cview(), trans, C(1), Y);
  }
  template <class C>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    using enum kernels::op;
    const cuda::detail::vblora_factors<C, T> f(ctx, u, cuda::detail::vblora_select_all(ctx, u));
    auto Z = kernels::make_scratch<C>(ctx, G.rows(), u.rank());
    gemm<C>(ctx, C(1), G, none, f.B.cview(), none, C(0), Z.view());
    gemm<C>(ctx, C(1), Z.cview(), none, f.A.cview(), none, C(1), O);
  }
  template <class C>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    using enum kernels::op;
    const cuda::detail::vblora_factors<C, T> f(ctx, u, cuda::detail::vblora_select_all(ctx, u));
    gemm<C>(ctx, factor, f.B.cview().middle_rows(r0, P.rows()), none, f.A.cview(), none, C(1), P);
  }
};

/// VB-LoRA's VJP on CUDA (vblora_vjp.hpp's formulas, the selection held fixed).
template <class T>
struct vjp<vblora_update<T, device::cuda>> {
  using D = device::cuda;
  using U = vblora_update<T, D>;
  static constexpr int factor_count = 3;
  static const char* factor_name(int i) { return i == 0 ? "logits_A" : i == 1 ? "logits_B" : "bank"; }

  template <class C>
  static void backward(const cuda::context& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<vblora>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.logits_A(), op, "logits_A");
    detail::check_grad_shape(grads[1], u.logits_B(), op, "logits_B");
    detail::check_grad_shape(grads[2], u.bank(), op, "bank");
    using enum kernels::op;
    const bool gla = present(grads[0]), glb = present(grads[1]), gbank = present(grads[2]), gx = present(dX);
    if (!gla && !glb && !gbank && !gx) return;
    const index_t r = u.rank(), T_ = X.rows(), L = u.vector_length();
    const auto sel = cuda::detail::vblora_select_all(ctx, u);
    const cuda::detail::vblora_factors<C, T> f(ctx, u, sel);
    auto dZ = kernels::make_scratch<C>(ctx, T_, r);
    gemm<C>(ctx, C(1), dY, none, f.B.cview(), none, C(0), dZ.view());
    if (gx) gemm<C>(ctx, C(1), dZ.cview(), none, f.A.cview(), none, C(1), dX);
    const bool need_a = gla || gbank, need_b = glb || gbank;
    if (!need_a && !need_b) return;
    auto dA = kernels::make_scratch<C>(ctx, need_a ? r : 0, u.cols());
    auto dB = kernels::make_scratch<C>(ctx, need_b ? u.rows() : 0, r);
    if (need_a) gemm<C>(ctx, C(1), dZ.cview(), trans, X, none, C(0), dA.view());
    if (need_b) {
      auto Z = kernels::make_scratch<C>(ctx, T_, r);
      gemm<C>(ctx, C(1), X, none, f.A.cview(), trans, C(0), Z.view());
      gemm<C>(ctx, C(1), dY, trans, Z.cview(), none, C(0), dB.view());
    }
    const auto mark = ctx.position();
    const auto ds = cuda::detail::upload_selection(ctx, sel);
    const cuda::detail::vblora_row_grad<C> g{dA.cview(), dB.cview(), sel.rows_a, u.in_tiles(), r, L};
    if (gla)
      cuda::detail::for_each_index(ctx, sel.rows_a, cuda::detail::vblora_logit_grad_fn<T, C>{u.bank(), ds, g, grads[0], 0},
                                   "deltaw::cuda: VB-LoRA logits_A gradient");
    if (glb)
      cuda::detail::for_each_index(ctx, sel.rows_b,
                                   cuda::detail::vblora_logit_grad_fn<T, C>{u.bank(), ds, g, grads[1], sel.rows_a},
                                   "deltaw::cuda: VB-LoRA logits_B gradient");
    if (gbank) {
      // Only the rows whose factor gradient was formed (A's when need_a, B's when need_b:
      // both whenever the bank's gradient is wanted).
      const auto inv = cuda::detail::structured_invert(u.num_vectors(), sel.index.size(),
                                            [&](std::size_t e) { return sel.index[e]; });
      transform(ctx, grads[2],
                cuda::detail::vblora_bank_grad_fn<C>{
                    cuda::detail::upload_to_scratch(ctx, inv.offsets.data(), inv.offsets.size()),
                    cuda::detail::upload_to_scratch(ctx, inv.positions.data(), inv.positions.size()), ds, g});
    }
    ctx.release(mark);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
