// SPDX-License-Identifier: MIT
// CUDA evaluation of the rotation update types: OFT, BOFT and RoAd, through the evaluators
// and VJPs written once in deltaw/backend/cpu/ (oft.hpp, boft.hpp, road.hpp and their
// _vjp.hpp, templated on the context and the device), run with a cuda::context by
// shared_evaluator.cuh; their primitive calls find the CUDA overloads by argument-dependent
// lookup. dw::apply (ΔW alone and W + ΔW), apply_transposed, materialize, merge, unmerge,
// merge_checked and frobenius_norm (updates.cuh) work on them; cuda::backward (vjp.cuh,
// which also supplies the dot_rows that BOFT's and RoAd's VJPs call) gives their factor
// gradients.
//
// What runs where:
//   OFT, BOFT  The Cayley (or Cayley–Neumann) transform of each b × b block is a small LU
//              solve: it runs on the host, in double, with the CPU code (Eigen), once, when
//              the update is built by cuda::oft / cuda::boft below: the parameters are
//              downloaded explicitly (one to_host_vector), the rotation blocks cached on the
//              host (nq·b² or m·nb·b² doubles, as on the CPU). Every operation uploads them
//              into scratch (copy_from_host) and applies them on the device as one
//              gemm_strided_batched of nb b-column products per rotation (OFT: one;
//              BOFT: one per butterfly factor). unmerge inverts the blocks on the host and
//              uploads the inverses; BOFT's unmerge reads s on the host to refuse a zero.
//              BOFT's butterfly permutations are host index vectors: they reach the device
//              as gather_rows' host indices (range-checked, copied into scratch).
//              The VJPs read the nb products X_kᵀ·V_k on the host (one download of nb·b²
//              values per rotation) and the parameters (one download), pull them back
//              through the Cayley map there, and add ∂L/∂Q (∂L/∂R) through one upload and
//              an axpy; BOFT's ∂L/∂s is a dot_rows on the device.
//   RoAd       Everything on the device: f = α·cos θ and s = α·sin θ by a functor, each pass
//              over the features one transform whose functor reads a pair's two values
//              from a source view (P = X·Wᵀ, G, or a copy of whole groups of rows of W,
//              about 32 K entries).
//              unmerge downloads f and s (2·out values) to refuse a singular pair; the VJP
//              sums its 2·out column products on the device (dot_rows, in double) and
//              runs the chain rule through θ, α on the host (2·out values, downloaded).
// Scratch: OFT, BOFT two or three tokens × in buffers and the rotation table (in·b, or
// m·in·b, values), merge one to three panels of cpu::panel_rows (256) rows × in; RoAd
// tokens × out, merge and the rows of ΔW whole groups of about 32 K entries. The backward
// passes add their tokens × in (BOFT: m + 5 of them) or tokens × out buffers. Nothing
// out × in.
#pragma once

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include <deltaw/backend/cpu/boft.hpp>
#include <deltaw/backend/cpu/boft_vjp.hpp>
#include <deltaw/backend/cpu/oft.hpp>
#include <deltaw/backend/cpu/oft_vjp.hpp>
#include <deltaw/backend/cpu/road.hpp>
#include <deltaw/backend/cpu/road_vjp.hpp>

#include "ops.cuh"
#include "primitives.cuh"
#include "scratch.cuh"
#include "shared_evaluator.cuh"
#include "updates.cuh"
#include "vector_ops.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

template <class T, class TW>
struct evaluator<oft_update<T, TW, device::cuda>> : shared_evaluator<oft_update<T, TW, device::cuda>> {};
template <class T, class TW>
struct evaluator<boft_update<T, TW, device::cuda>> : shared_evaluator<boft_update<T, TW, device::cuda>> {};
template <class T, class TW>
struct evaluator<road_update<T, TW, device::cuda>> : shared_evaluator<road_update<T, TW, device::cuda>> {};

/// OFT over a device weight W [out, in] with Q [nq, b(b − 1)/2] on the device (deltaw::oft's
/// layout; both held by view): Q is downloaded once (synchronises ctx's stream) and the
/// rotation blocks computed on the host, in double, by the CPU's code, and cached.
template <class TW, class T>
auto oft(context& ctx, const matrix_view<TW, device::cuda>& W, const matrix_view<T, device::cuda>& Q, oft_options o = {}) {
  using W_ = std::remove_const_t<TW>;
  using T_ = std::remove_const_t<T>;
  const matrix_view<const W_, device::cuda> Wv(W);
  const matrix_view<const T_, device::cuda> Qv(Q);
  device_guard g(ctx.device());
  ctx.begin_operation();
  const std::vector<double> Qh = cpu::oft_detail::to_host_matrix(static_cast<const context&>(ctx), Qv);
  auto R = ::deltaw::detail::oft_rotations(
      matrix_view<const double>(Qh.data(), Qv.rows(), Qv.cols(), std::max<index_t>(Qv.cols(), 1), 1), Wv.cols(), o);
  return oft_update<T_, W_, device::cuda>(held_matrix<W_, device::cuda>{Wv, nullptr},
                                          held_matrix<T_, device::cuda>{Qv, nullptr}, o, std::move(R));
}
template <class TW, class T>
auto oft(const matrix_view<TW, device::cuda>& W, const matrix_view<T, device::cuda>& Q, oft_options o = {}) {
  return oft(default_context(), W, Q, o);
}

/// BOFT over a device weight W [out, in] with R [m·nb·b, b] and s [out] on the device
/// (deltaw::boft's layout; held by view): R is downloaded once (synchronises ctx's stream)
/// and the rotation blocks computed on the host, in double, by the CPU's code, and cached.
template <class TW, class T>
auto boft(context& ctx, const matrix_view<TW, device::cuda>& W, const matrix_view<T, device::cuda>& R,
          const vector_view<const std::remove_const_t<T>, device::cuda>& s, oft_options o = boft_default_options) {
  using W_ = std::remove_const_t<TW>;
  using T_ = std::remove_const_t<T>;
  const matrix_view<const W_, device::cuda> Wv(W);
  const matrix_view<const T_, device::cuda> Rv(R);
  device_guard g(ctx.device());
  ctx.begin_operation();
  const std::vector<double> Rh = cpu::oft_detail::to_host_matrix(static_cast<const context&>(ctx), Rv);
  auto blocks = ::deltaw::detail::boft_rotations(
      matrix_view<const double>(Rh.data(), Rv.rows(), Rv.cols(), std::max<index_t>(Rv.cols(), 1), 1), o);
  return boft_update<T_, W_, device::cuda>(held_matrix<W_, device::cuda>{Wv, nullptr},
                                           held_matrix<T_, device::cuda>{Rv, nullptr},
                                           held_vector<T_, device::cuda>{s, nullptr}, o, std::move(blocks));
}
template <class TW, class T>
auto boft(const matrix_view<TW, device::cuda>& W, const matrix_view<T, device::cuda>& R,
          const vector_view<const std::remove_const_t<T>, device::cuda>& s, oft_options o = boft_default_options) {
  return boft(default_context(), W, R, s, o);
}

}  // namespace cuda
DELTAW_NAMESPACE_END
