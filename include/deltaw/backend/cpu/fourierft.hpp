// SPDX-License-Identifier: MIT
// Evaluator of FourierFT (expr/fourierft.hpp), ΔW = s·Re(ifft2(S)) with S sparse (n
// coefficients c_k at (r_k, q_k)), with FFTW (backend/cpu/fftw.hpp). Writing
// ω_m = e^{2πi/m} and, for a real row x of length m, x̃[f] = Σ_j x_j·ω_m^{f·j} (the
// conjugate of its DFT, read off the half spectrum of one real FFT):
//   apply      y_p = s/(out·in)·Re(Σ_k c_k·x̃[q_k]·ω_out^{r_k·p})
//              = s/(out·in)·(inverse real FFT over out of the Hermitian half spectrum H,
//                H[r_k] += c_k·x̃[q_k]/2, H[out − r_k] += conj(c_k·x̃[q_k])/2)
//   transposed the same with the roles of (out, r) and (in, q) exchanged
//   rows of ΔW the same with x̃[q_k] replaced by ω_out^{r_k·p} (row p): one inverse real
//              FFT over in per row (merge / materialize, tile-wise, never the whole ΔW)
//   ‖ΔW‖_F     s·‖S_sym‖/√(out·in), S_sym = (S + S(−r, −q))/2 (Parseval; O(n))
// Per token: one real FFT over in, n gathers / scatters, one inverse real FFT over out,
// O(in·log in + out·log out + n), on chunks of at most 64 tokens. Scratch: 64 × (in + out)
// reals and complexes; never an out × in matrix.
#pragma once

#include <algorithm>
#include <cmath>
#include <complex>
#include <numbers>
#include <unordered_map>
#include <vector>

#include "../../expr/fourierft.hpp"
#include "evaluator.hpp"
#include "fftw.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace fourierft_detail {

template <class C>
using cplx = std::complex<C>;

/// Tokens per batch of transforms.
inline constexpr index_t chunk_rows = 64;

/// x̃[f] = Σ_j x_j·ω_m^{f·j} from the half spectrum F of x's real FFT (F[f] = conj(x̃[f])).
template <class C>
cplx<C> plus_dft(const cplx<C>* F, index_t f, index_t m) {
  return f <= m / 2 ? std::conj(F[f]) : F[m - f];
}
/// Adds v at frequency r (and conj(v) at −r), halved, into the half spectrum H of length m:
/// the inverse real FFT of H is then Re(Σ v·ω_m^{r·p}).
template <class C>
void add_hermitian(cplx<C>* H, index_t r, index_t m, cplx<C> v) {
  const C h(0.5);
  if (r <= m / 2) H[r] += v * h;
  const index_t rr = r == 0 ? 0 : m - r;
  if (rr <= m / 2) H[rr] += std::conj(v) * h;
}

/// Real FFTs of up to chunk rows of length m, taken from a view.
template <class C>
struct forward_rows {
  index_t m, chunk;
  std::vector<C> in;
  std::vector<cplx<C>> spec;
  fft::plan<C> p;
  forward_rows(index_t m_, index_t chunk_, const char* op)
      : m(m_), chunk(chunk_), in(std::size_t(m_ * chunk_), C(0)), spec(std::size_t((m_ / 2 + 1) * chunk_)),
        p(fft::plan<C>::r2c(m_, chunk_, in.data(), spec.data(), op)) {}
  /// Transforms rows [t0, t0 + k) of X (k ≤ chunk).
  template <class Ctx>
  void run(const Ctx& ctx, const cview<C>& X, index_t t0, index_t k) {
    copy(ctx, X.middle_rows(t0, k), mview<C>(in.data(), k, m, m, 1));
    p();
  }
  const cplx<C>* row(index_t t) const { return spec.data() + t * (m / 2 + 1); }
};

/// Inverse real FFTs of up to chunk Hermitian half spectra of length m, added to a view.
template <class C>
struct inverse_rows {
  index_t m, chunk;
  std::vector<cplx<C>> spec;
  std::vector<C> out;
  fft::plan<C> p;
  inverse_rows(index_t m_, index_t chunk_, const char* op)
      : m(m_), chunk(chunk_), spec(std::size_t((m_ / 2 + 1) * chunk_)), out(std::size_t(m_ * chunk_)),
        p(fft::plan<C>::c2r(m_, chunk_, spec.data(), out.data(), op)) {}
  void clear() { std::fill(spec.begin(), spec.end(), cplx<C>(0)); }
  cplx<C>* row(index_t t) { return spec.data() + t * (m / 2 + 1); }
  /// Y[t0 : t0 + k] += alpha·(inverse FFTs of the first k spectra).
  template <class Ctx>
  void run_add(const Ctx& ctx, C alpha, const mview<C>& Y, index_t t0, index_t k) {
    p();
    axpy<C>(ctx, alpha, cview<C>(out.data(), k, m, m, 1), Y.middle_rows(t0, k));
  }
};

template <class C, class U>
std::vector<cplx<C>> coefficients(const U& u) {
  std::vector<cplx<C>> c(std::size_t(u.size()));
  for (index_t k = 0; k < u.size(); ++k) c[std::size_t(k)] = cplx<C>(C(convert<double>(u.spectrum()[k])), C(0));
  return c;
}

/// Y += alpha·Re(Σ_k c_k·x̃[a_k]·ω_{m_out}^{b_k·p}) for every row x of X (length m_in):
/// apply (a = q, b = r) and transposed apply (a = r, b = q).
template <class C, class Ctx>
void spectral_apply(const Ctx& ctx, const cview<C>& X, index_t m_in, index_t m_out, const std::vector<index_t>& a,
                    const std::vector<index_t>& b, const std::vector<cplx<C>>& c, C alpha, const mview<C>& Y,
                    const char* op) {
  const index_t T = X.rows();
  if (T == 0 || c.empty()) return;
  const index_t ch = std::min(T, chunk_rows);
  forward_rows<C> F(m_in, ch, op);
  inverse_rows<C> H(m_out, ch, op);
  const index_t n = index_t(c.size());
  for (index_t t0 = 0; t0 < T; t0 += ch) {
    const index_t k = std::min(ch, T - t0);
    F.run(ctx, X, t0, k);
    H.clear();
    for (index_t t = 0; t < k; ++t) {
      const cplx<C>* f = F.row(t);
      cplx<C>* h = H.row(t);
      for (index_t j = 0; j < n; ++j) add_hermitian(h, b[std::size_t(j)], m_out, c[std::size_t(j)] * plus_dft(f, a[std::size_t(j)], m_in));
    }
    H.run_add(ctx, alpha, Y, t0, k);
  }
}

}  // namespace fourierft_detail

template <class T>
struct evaluator<fourierft_update<T, device::cpu>>
    : additive_rows<evaluator<fourierft_update<T, device::cpu>>, fourierft_update<T, device::cpu>> {
  using U = fourierft_update<T, device::cpu>;

  static double norm_factor(const U& u) { return u.scale() / (double(u.rows()) * double(u.cols())); }

  /// Y += X·ΔWᵀ through FFTs over in and out.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C>& X, const mview<C>& Y) {
    const auto c = fourierft_detail::coefficients<C>(u);
    fourierft_detail::spectral_apply<C>(ctx, X, u.cols(), u.rows(), u.indices().cols, u.indices().rows, c, C(norm_factor(u)), Y,
                                        "deltaw::fourierft apply");
  }
  /// O += G·ΔW through FFTs over out and in.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C>& G, const mview<C>& O) {
    const auto c = fourierft_detail::coefficients<C>(u);
    fourierft_detail::spectral_apply<C>(ctx, G, u.rows(), u.cols(), u.indices().rows, u.indices().cols, c, C(norm_factor(u)), O,
                                        "deltaw::fourierft apply_transposed");
  }
  /// P += factor·ΔW[r0 : r0 + P.rows()], one inverse real FFT over in per row.
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C>& P, C factor) {
    using fourierft_detail::cplx;
    const index_t R = P.rows(), out = u.rows(), in = u.cols(), n = u.size();
    if (R == 0 || n == 0) return;
    const index_t ch = std::min(R, fourierft_detail::chunk_rows);
    fourierft_detail::inverse_rows<C> H(in, ch, "deltaw::fourierft merge");
    const auto& ix = u.indices();
    std::vector<double> c(static_cast<std::size_t>(n));
    for (index_t k = 0; k < n; ++k) c[std::size_t(k)] = convert<double>(u.spectrum()[k]);
    const double w = 2.0 * std::numbers::pi / double(out);
    for (index_t t0 = 0; t0 < R; t0 += ch) {
      const index_t k = std::min(ch, R - t0);
      H.clear();
      for (index_t t = 0; t < k; ++t) {
        const index_t p = r0 + t0 + t;
        cplx<C>* h = H.row(t);
        for (index_t j = 0; j < n; ++j) {
          const double ang = w * double((ix.rows[std::size_t(j)] * p) % out);  // exact phase reduction
          const cplx<C> v(C(c[std::size_t(j)] * std::cos(ang)), C(c[std::size_t(j)] * std::sin(ang)));
          fourierft_detail::add_hermitian(h, ix.cols[std::size_t(j)], in, v);
        }
      }
      H.run_add(ctx, factor * C(norm_factor(u)), P, t0, k);
    }
  }
  /// s·‖S_sym‖_F/√(out·in), O(n).
  template <class C>
  static double frobenius_norm(const U& u) {
    const index_t out = u.rows(), in = u.cols();
    std::unordered_map<std::uint64_t, double> sym;
    sym.reserve(std::size_t(2 * u.size()));
    for (index_t k = 0; k < u.size(); ++k) {
      const index_t r = u.indices().rows[std::size_t(k)], q = u.indices().cols[std::size_t(k)];
      const double v = 0.5 * convert<double>(u.spectrum()[k]);
      sym[std::uint64_t(r) * std::uint64_t(in) + std::uint64_t(q)] += v;
      sym[std::uint64_t((out - r) % out) * std::uint64_t(in) + std::uint64_t((in - q) % in)] += v;
    }
    double sq = 0;
    for (const auto& [key, v] : sym) sq += v * v;
    return std::abs(u.scale()) * std::sqrt(sq / (double(out) * double(in)));
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
