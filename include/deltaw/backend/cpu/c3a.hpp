// SPDX-License-Identifier: MIT
// Evaluator of C3A (expr/c3a.hpp), ΔW block-circulant from kernels w_{m,j} of length b, with
// FFTW (backend/cpu/fftw.hpp). With x̂_j, ŵ_{m,j} the real-FFT half spectra (f ≤ b/2) of a
// token's input block j and of the kernel (m, j):
//   apply       ŷ_m[f] = Σ_j conj(ŵ_{m,j}[f])·x̂_j[f],   y_m = s/b·irfft(ŷ_m)
//   transposed  ô_j[f] = Σ_m ŵ_{m,j}[f]·ĝ_m[f],         o_j = s/b·irfft(ô_j)
// Per frequency f the sum over blocks is one real GEMM on stacked real and imaginary parts:
// [Re x̂ | Im x̂] (tokens × 2·in/b) times K_f = [[Re ŵᵀ, −Im ŵᵀ], [Im ŵᵀ, Re ŵᵀ]]
// (2·in/b × 2·out/b), and K_fᵀ for the transposed apply: (b/2 + 1)·8·tokens·(out/b)·(in/b)
// ≈ 4·tokens·out·in/b flops, plus tokens·(in + out)/b real FFTs of length b. Rows of ΔW
// (merge, materialize) are read off the kernels directly, O(in) per row. Scratch: the
// kernel spectra ((b/2 + 1)·4·(out/b)·(in/b) ≈ 2·out·in/b values, twice the parameters)
// and, per chunk of 64 tokens, 64 × (in + out) spectra; never an out × in matrix for b ≥ 2.
#pragma once

#include <algorithm>
#include <cmath>
#include <complex>
#include <vector>

#include "../../expr/c3a.hpp"
#include "evaluator.hpp"
#include "fftw.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace c3a_detail {

template <class C>
using cplx = std::complex<C>;

/// K_f for every frequency f, stacked: rows [f·2n, (f + 1)·2n) of a [(b/2 + 1)·2n, 2m] scratch
/// (m = out/b, n = in/b).
template <class C, class Ctx, class U>
auto kernel_spectra(const Ctx& ctx, const U& u, const char* op) {
  const index_t b = u.block_size(), m = u.row_blocks(), n = u.col_blocks(), fb = b / 2 + 1;
  auto K = kernels::make_scratch<C>(ctx, fb * 2 * n, 2 * m);
  if (m == 0 || n == 0) return K;
  std::vector<C> w(static_cast<std::size_t>(m * n * b));
  copy(ctx, u.kernel(), mview<C>(w.data(), m * n, b, b, 1));
  std::vector<cplx<C>> W(static_cast<std::size_t>(m * n * fb));
  fft::plan<C>::r2c(b, m * n, w.data(), W.data(), op)();
  const auto Kv = K.view();
  for (index_t f = 0; f < fb; ++f)
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j) {
        const cplx<C> v = W[std::size_t((i * n + j) * fb + f)];
        const index_t r = f * 2 * n;
        Kv(r + j, i) = v.real();
        Kv(r + j, m + i) = -v.imag();
        Kv(r + n + j, i) = v.imag();
        Kv(r + n + j, m + i) = v.real();
      }
  return K;
}

/// Tokens per chunk: the per-chunk buffers below stay cache-sized and are reused.
inline constexpr index_t chunk_rows = 64;

/// Buffers and FFT plans for chunks of up to `rows` tokens of length nblk·b (forward: real
/// rows → stacked spectra; inverse: stacked spectra → real rows).
template <class C>
struct chunk_fft {
  index_t rows, nblk, b, fb;
  std::vector<C> real;
  std::vector<cplx<C>> spec;
  fft::plan<C> fwd, inv;
  chunk_fft(index_t rows_, index_t nblk_, index_t b_, const char* op)
      : rows(rows_), nblk(nblk_), b(b_), fb(b_ / 2 + 1), real(std::size_t(rows_ * nblk_ * b_)),
        spec(std::size_t(rows_ * nblk_ * (b_ / 2 + 1))) {
    fwd = fft::plan<C>::r2c(b, rows * nblk, real.data(), spec.data(), op);
    inv = fft::plan<C>::c2r(b, rows * nblk, spec.data(), real.data(), op);
  }
  /// S (k·fb rows, row f·k + t) ← [Re x̂_0[f] … | Im x̂_0[f] …] of rows [t0, t0 + k) of X.
  template <class Ctx>
  void forward(const Ctx& ctx, const cview<C>& X, index_t t0, index_t k, const mview<C>& S) {
    copy(ctx, X.middle_rows(t0, k), mview<C>(real.data(), k, nblk * b, nblk * b, 1));
    fwd();
    for (index_t f = 0; f < fb; ++f)
      for (index_t t = 0; t < k; ++t) {
        const cplx<C>* p = spec.data() + t * nblk * fb + f;
        C* re = &S(f * k + t, 0);
        C* im = &S(f * k + t, nblk);
        for (index_t j = 0; j < nblk; ++j) {
          re[j] = p[j * fb].real();
          im[j] = p[j * fb].imag();
        }
      }
  }
  /// Y[t0 : t0 + k] += alpha·irfft of the stacked spectra S (k·fb rows).
  template <class Ctx>
  void inverse_add(const Ctx& ctx, const cview<C>& S, index_t k, C alpha, const mview<C>& Y, index_t t0) {
    for (index_t f = 0; f < fb; ++f)
      for (index_t t = 0; t < k; ++t) {
        cplx<C>* p = spec.data() + t * nblk * fb + f;
        const C* re = &S(f * k + t, 0);
        const C* im = &S(f * k + t, nblk);
        for (index_t j = 0; j < nblk; ++j) p[j * fb] = cplx<C>(re[j], im[j]);
      }
    inv();  // rows ≥ k hold stale values; only the first k are read
    axpy<C>(ctx, alpha, cview<C>(real.data(), k, nblk * b, nblk * b, 1), Y.middle_rows(t0, k));
  }
};

/// Out-spectra = In-spectra·op(K_f) for every frequency, then Y += s/b·irfft, by chunks of tokens.
template <class C, class Ctx, class U>
void circulant_apply(const Ctx& ctx, const U& u, const cview<C>& X, const mview<C>& Y, bool transposed, const char* op) {
  const index_t b = u.block_size(), T = X.rows(), fb = b / 2 + 1;
  const index_t nin = (transposed ? u.rows() : u.cols()) / b, nout = (transposed ? u.cols() : u.rows()) / b;
  if (T == 0 || nin == 0 || nout == 0) return;
  const auto K = kernel_spectra<C>(ctx, u, op);
  const index_t ch = std::min(T, chunk_rows), kn = u.col_blocks();
  chunk_fft<C> in(ch, nin, b, op), out(ch, nout, b, op);
  auto S = kernels::make_scratch<C>(ctx, fb * ch, 2 * nin);
  auto R = kernels::make_scratch<C>(ctx, fb * ch, 2 * nout);
  for (index_t t0 = 0; t0 < T; t0 += ch) {
    const index_t k = std::min(ch, T - t0);
    in.forward(ctx, X, t0, k, S.view());
    for (index_t f = 0; f < fb; ++f)
      gemm<C>(ctx, C(1), S.cview().middle_rows(f * k, k), kernels::op::none, K.cview().middle_rows(f * 2 * kn, 2 * kn),
              transposed ? kernels::op::trans : kernels::op::none, C(0), R.view().middle_rows(f * k, k));
    out.inverse_add(ctx, R.cview(), k, C(u.scale() / double(b)), Y, t0);
  }
}

}  // namespace c3a_detail

template <class T>
struct evaluator<c3a_update<T, device::cpu>> : additive_rows<evaluator<c3a_update<T, device::cpu>>, c3a_update<T, device::cpu>> {
  using U = c3a_update<T, device::cpu>;

  /// Y += X·ΔWᵀ in the frequency domain.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C>& X, const mview<C>& Y) {
    c3a_detail::circulant_apply<C>(ctx, u, X, Y, false, "deltaw::c3a apply");
  }
  /// O += G·ΔW in the frequency domain.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C>& G, const mview<C>& O) {
    c3a_detail::circulant_apply<C>(ctx, u, G, O, true, "deltaw::c3a apply_transposed");
  }
  /// P += factor·ΔW[r0 : r0 + P.rows()], read off the kernels (O(in) per row).
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx&, const U& u, index_t r0, const mview<C>& P, C factor) {
    const index_t b = u.block_size(), n = u.col_blocks();
    const C a = factor * C(u.scale());
    const auto& K = u.kernel();
    for (index_t i = 0; i < P.rows(); ++i) {
      const index_t row = r0 + i, m = row / b, k = row % b;
      for (index_t j = 0; j < n; ++j)
        for (index_t t = 0; t < b; ++t) P(i, j * b + t) += a * C(convert<double>(K(m * n + j, (t - k + b) % b)));
    }
  }
  /// |s|·√(b·Σ w²): each circulant block has b copies of its kernel.
  template <class C>
  static double frobenius_norm(const U& u) {
    double sq = 0;
    const auto& K = u.kernel();
    for (index_t i = 0; i < K.rows(); ++i)
      for (index_t j = 0; j < K.cols(); ++j) {
        const double v = convert<double>(K(i, j));
        sq += v * v;
      }
    return std::abs(u.scale()) * std::sqrt(double(u.block_size()) * sq);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
