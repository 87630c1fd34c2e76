// SPDX-License-Identifier: MIT
// The sparse and spectral update types on CUDA (cuda/include/deltaw/cuda/updates_spectral.cuh):
// SHiRA, WaveFT (Haar atoms, with and without use_idwt), FourierFT and C3A, against the CPU
// backend on the same stored values: apply (ΔW alone, W + ΔW), apply_transposed,
// materialize, frobenius_norm, merge, unmerge, merge_checked and the VJPs (cuda::backward),
// in float and double, row- and column-major, odd sizes, tokens = 0, 1 and more; lazy sums
// with other types; the scratch high-water mark (no out × in scratch).
// FourierFT's and C3A's CPU references need FFTW: they are compiled when the build links
// deltaw::fft and defines DELTAW_CUDA_TEST_FFTW; SHiRA and WaveFT need no FFT.
// In the nvcc build it joins test_cuda_lora, whose test_cuda_lora.cu skips (exit 77)
// without a usable device.
#include <deltaw/cuda/cuda.hpp>
#include <deltaw/cuda/updates_spectral.cuh>
#include <deltaw/cuda/vjp.cuh>
#include <deltaw/deltaw.hpp>
#if defined(DELTAW_CUDA_TEST_FFTW)
#include <deltaw/fourier.hpp>
#else
#include <deltaw/backend/cpu/waveft.hpp>
#include <deltaw/backend/cpu/waveft_vjp.hpp>
#include <deltaw/expr/waveft.hpp>
#endif

#include <algorithm>
#include <iterator>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "cuda_test_util.cuh"
#include "cuda_update_check.cuh"
#include "test_util.hpp"

namespace dw = deltaw;

namespace cuda_spectral_test {

using dw::index_t;
using dwcuda::check_update;
using dwcuda::check_vjp;
using dwcuda::random_vec;
using dwcuda::slot;
using dwcuda::twin;
using dwcuda::vtwin;
using dwt::MatD;

struct shape {
  index_t out, in, tokens, b;  // b: C3A's block size (divides out and in)
};
// Odd sizes, tokens = 0 and 1, more tokens than any block.
const shape shapes[] = {{12, 8, 5, 4}, {6, 10, 0, 2}, {9, 9, 1, 3}, {16, 24, 33, 8}, {5, 7, 3, 1}};

/// n distinct positions of an [out, in] matrix (a seeded shuffle).
inline dw::fourierft_indices positions(index_t out, index_t in, index_t n, std::uint64_t seed) {
  std::vector<index_t> all(static_cast<std::size_t>(out * in));
  std::iota(all.begin(), all.end(), index_t(0));
  std::shuffle(all.begin(), all.end(), std::mt19937_64(seed));
  dw::fourierft_indices f;
  for (index_t k = 0; k < n; ++k) {
    f.rows.push_back(all[std::size_t(k)] / in);
    f.cols.push_back(all[std::size_t(k)] % in);
  }
  return f;
}

/// SHiRA over a random pattern of nnz entries: the CPU update and the CUDA one sharing its CSR.
template <class T>
struct shira_pair {
  dw::fourierft_indices idx;
  vtwin<T> v;
  shira_pair(index_t out, index_t in, index_t nnz, std::uint64_t seed)
      : idx(positions(out, in, nnz, seed)), v(random_vec(nnz, seed + 1)) {}
  auto cpu(index_t out, index_t in, double s) const {
    return dw::shira(out, in, std::span<const index_t>(idx.rows), std::span<const index_t>(idx.cols), v.cpu(), dw::scale(s));
  }
  auto gpu(const dw::shira_update<T>& c, double s) const { return dw::shira(c.pattern(), v.gpu(), dw::scale(s)); }
};

/// Every operation and the VJP of SHiRA and WaveFT (both use_idwt settings).
template <class T>
void sparse_cases(dw::cuda::context& ctx, std::uint64_t seed) {
  // The shapes above, and one whose materialize and frobenius_norm take several panels
  // (windows of positions that start past the first).
  std::vector<shape> all(std::begin(shapes), std::end(shapes));
  all.push_back({300, 260, 3, 4});
  for (const shape& s : all) {
    // The large shape sparser: the CPU's WaveFT adds each entry into Y on its own, so many
    // entries per row over a large W·X would round apart from the device's row sums.
    const index_t sparser = s.out * s.in > 10000 ? 10 : 1;
    for (bool cm : {false, true}) {
      seed += 20;
      {
        const index_t nnz = std::max<index_t>(1, s.out * s.in / (4 * sparser));
        const shira_pair<T> p(s.out, s.in, nnz, seed);
        const auto uc = p.cpu(s.out, s.in, 0.7);
        const auto ug = p.gpu(uc, 0.7);
        INFO("shira");
        check_update<T>(ctx, ug, uc, s.tokens, cm, seed);
        check_vjp<T>(ctx, ug, uc, {dwcuda::vector_slot(nnz, cm)}, s.tokens, cm, seed + 1);
      }
      for (bool idwt : {true, false}) {
        // A third of the grid: atoms of the four quadrants overlap at many (i, j).
        const index_t n = std::max<index_t>(1, s.out * s.in / (3 * sparser));
        const vtwin<T> c(random_vec(n, seed + 2));
        const auto idx = positions(s.out, s.in, n, seed + 3);
        const auto uc = dw::waveft(c.cpu(), idx, s.out, s.in, dw::scale(0.8), idwt);
        const auto ug = dw::waveft(c.gpu(), idx, s.out, s.in, dw::scale(0.8), idwt);
        INFO("waveft, use_idwt = " << idwt);
        check_update<T>(ctx, ug, uc, s.tokens, cm, seed + 4);
        check_vjp<T>(ctx, ug, uc, {dwcuda::vector_slot(n, !cm)}, s.tokens, cm, seed + 5);
      }
    }
  }
}

#if defined(DELTAW_CUDA_TEST_FFTW)
/// Every operation and the VJP of FourierFT and C3A.
template <class T>
void fourier_cases(dw::cuda::context& ctx, std::uint64_t seed) {
  for (const shape& s : shapes) {
    for (bool cm : {false, true}) {
      seed += 20;
      {
        const index_t n = std::max<index_t>(1, s.out * s.in / 5);
        const vtwin<T> c(random_vec(n, seed + 1));
        const auto idx = positions(s.out, s.in, n, seed + 2);
        const auto uc = dw::fourierft(c.cpu(), idx, s.out, s.in, dw::scale(20.0));
        const auto ug = dw::fourierft(c.gpu(), idx, s.out, s.in, dw::scale(20.0));
        INFO("fourierft");
        check_update<T>(ctx, ug, uc, s.tokens, cm, seed + 3);
        check_vjp<T>(ctx, ug, uc, {dwcuda::vector_slot(n, !cm)}, s.tokens, cm, seed + 4);
      }
      {
        const index_t b = s.b, out = s.out / b * b, in = s.in / b * b;
        twin<T> K(dwt::random((out / b) * (in / b), b, seed + 5), !cm);
        const auto uc = dw::c3a(K.cpu(), out, in, dw::scale(0.5));
        const auto ug = dw::c3a(K.gpu(), out, in, dw::scale(0.5));
        INFO("c3a, b = " << b);
        check_update<T>(ctx, ug, uc, s.tokens, cm, seed + 6);
        check_vjp<T>(ctx, ug, uc, {{(out / b) * (in / b), b}}, s.tokens, cm, seed + 7);
      }
    }
  }
  // C3A through the frequency domain (b ≥ 16): odd b, one block column, several chunks of
  // tokens (70 tokens at out + in = 96).
  const shape dft[] = {{32, 48, 5, 16}, {34, 51, 1, 17}, {64, 32, 70, 32}, {16, 16, 0, 16}};
  for (const shape& s : dft) {
    for (bool cm : {false, true}) {
      seed += 20;
      twin<T> K(dwt::random((s.out / s.b) * (s.in / s.b), s.b, seed + 5), cm);
      const auto uc = dw::c3a(K.cpu(), s.out, s.in, dw::scale(0.25));
      const auto ug = dw::c3a(K.gpu(), s.out, s.in, dw::scale(0.25));
      INFO("c3a (frequency domain), b = " << s.b);
      check_update<T>(ctx, ug, uc, s.tokens, cm, seed + 6);
      check_vjp<T>(ctx, ug, uc, {{(s.out / s.b) * (s.in / s.b), s.b}}, s.tokens, cm, seed + 7);
    }
  }
}
#endif

/// The scratch of every operation of u at tokens = 8 (see the test below).
template <class T, class U>
void scratch_of(const std::string& name, const U& u, std::size_t limit, std::size_t whole_limit, std::size_t vjp_slots_rows,
                std::size_t vjp_slots_cols) {
  const index_t out = u.rows(), in = u.cols();
  const std::size_t dense_bytes = std::size_t(out * in) * sizeof(T);
  twin<T> W(dwt::random(out, in, 3));
  const std::vector<dwcuda::slot> slots = {{index_t(vjp_slots_rows), index_t(vjp_slots_cols)}};
  CAPTURE(name);
  const auto s = dwcuda::measure_scratch<T>(u, W, 8, &slots);
  MESSAGE(name << ": scratch high-water (B):" << s.per_op << "; dense ΔW " << dense_bytes << " B");
  CAPTURE(s.per_op);
  CHECK(s.largest < dense_bytes);  // no single request of an out × in matrix
  CHECK(s.per_call > 0);
  CHECK(s.per_call < limit);
  CHECK(s.whole < whole_limit);
}

}  // namespace cuda_spectral_test

TEST_CASE_TEMPLATE("cuda: SHiRA and WaveFT match the CPU backend (updates and VJPs)", T, float, double) {
  dw::cuda::context ctx;
  cuda_spectral_test::sparse_cases<T>(ctx, 5000);
}

#if defined(DELTAW_CUDA_TEST_FFTW)
TEST_CASE_TEMPLATE("cuda: FourierFT and C3A match the CPU backend (updates and VJPs)", T, float, double) {
  dw::cuda::context ctx;
  cuda_spectral_test::fourier_cases<T>(ctx, 6000);
}
#endif

TEST_CASE_TEMPLATE("cuda: lazy sums with the sparse and spectral types match the CPU backend", T, float, double) {
  using namespace cuda_spectral_test;
  dw::cuda::context ctx;
  const index_t out = 12, in = 8, r = 2;
  for (index_t tokens : {0, 1, 7}) {
    for (bool cm : {false, true}) {
      CAPTURE(tokens);
      CAPTURE(cm);
      const std::uint64_t seed = 7000 + std::uint64_t(tokens) * 10 + (cm ? 1 : 0);
      twin<T> W(dwt::random(out, in, seed), cm), X(dwt::random(tokens, in, seed + 1), !cm);
      twin<T> B(dwt::random(out, r, seed + 2), cm), A(dwt::random(r, in, seed + 3), !cm);
      const shira_pair<T> p(out, in, 20, seed + 4);
      const auto sc = p.cpu(out, in, 0.5);
      const auto sg = p.gpu(sc, 0.5);
      const vtwin<T> c(random_vec(30, seed + 5));
      const auto idx = positions(out, in, 30, seed + 6);
      auto Yg = dwcuda::nan_output<T>(tokens, out, cm), Yc = dwcuda::nan_output<T>(tokens, out, cm);
      dw::apply(ctx,
                W.gpu() + sg + dw::waveft(c.gpu(), idx, out, in, dw::scale(0.6)) +
                    dw::lora(B.gpu(), A.gpu(), dw::alpha(2.0)),
                X.gpu(), Yg.gpu());
      dw::apply(W.cpu() + sc + dw::waveft(c.cpu(), idx, out, in, dw::scale(0.6)) + dw::lora(B.cpu(), A.cpu(), dw::alpha(2.0)),
                X.cpu(), Yc.cpu());
      CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= dwcuda::upd_cpu_tol<T>());
#if defined(DELTAW_CUDA_TEST_FFTW)
      twin<T> K(dwt::random((out / 4) * (in / 4), 4, seed + 7), cm), R(dwt::random(r, r, seed + 8), cm);
      auto Zg = dwcuda::nan_output<T>(tokens, out, !cm), Zc = dwcuda::nan_output<T>(tokens, out, !cm);
      dw::apply(ctx,
                W.gpu() + dw::fourierft(c.gpu(), idx, out, in, dw::scale(10.0)) + dw::c3a(K.gpu(), out, in) +
                    dw::core_lora(B.gpu(), R.gpu(), A.gpu(), dw::scale(0.5)),
                X.gpu(), Zg.gpu());
      dw::apply(W.cpu() + dw::fourierft(c.cpu(), idx, out, in, dw::scale(10.0)) + dw::c3a(K.cpu(), out, in) +
                    dw::core_lora(B.cpu(), R.cpu(), A.cpu(), dw::scale(0.5)),
                X.cpu(), Zc.cpu());
      CHECK(dwt::rel_err(Zg.dev_d(), Zc.host_d()) <= dwcuda::upd_cpu_tol<T>());
#endif
    }
  }
}

TEST_CASE_TEMPLATE("cuda: the sparse and spectral types take no out × in scratch", T, float, double) {
  using namespace cuda_spectral_test;
  // out = in = 512, tokens = 8: a dense ΔW is 1 MiB (float) or 2 MiB (double).
  const index_t out = 512, in = 512;
  const std::size_t dense = std::size_t(out * in) * sizeof(T);
  {
    // PEFT's nnz = r·(out + in) at r = 16: 16 K entries, 1/16 of ΔW.
    const index_t nnz = 16 * (out + in);
    const shira_pair<T> p(out, in, nnz, 1);
    const auto uc = p.cpu(out, in, 1.0);
    scratch_of<T>("shira (nnz = 16 K)", p.gpu(uc, 1.0), dense / 4, dense, 1, std::size_t(nnz));
  }
  {
    const index_t n = 4096;
    const vtwin<T> c(random_vec(n, 2));
    scratch_of<T>("waveft (n = 4 K)", dw::waveft(c.gpu(), positions(out, in, n, 3), out, in, dw::scale(25.0)), dense / 4,
                  dense, std::size_t(n), 1);
  }
#if defined(DELTAW_CUDA_TEST_FFTW)
  {
    // The bases are drawn in chunks of coefficients of bounded size, so the scratch does not
    // grow with n (but for 16 B per coefficient of frequencies); n = 256 keeps the 4·out·in·n
    // flops of each whole-ΔW pass short (PEFT's default n_frequency is 1000).
    const index_t n = 256;
    const vtwin<T> c(random_vec(n, 4));
    scratch_of<T>("fourierft (n = 256)", dw::fourierft(c.gpu(), positions(out, in, n, 5), out, in, dw::scale(150.0)),
                  dense / 4, dense, 1, std::size_t(n));
  }
  {
    // The frequency domain (b ≥ 16): kernel spectra of (b + 2)·out·in/b² values, per chunk
    // of tokens spectra of about 2·tokens·(out + in).
    const index_t b = 32;
    twin<T> K(dwt::random((out / b) * (in / b), b, 6));
    scratch_of<T>("c3a (b = 32)", dw::c3a(K.gpu(), out, in), dense / 4, dense, std::size_t((out / b) * (in / b)),
                  std::size_t(b));
  }
  {
    // Small blocks: panels of 64 K entries of ΔW, a quarter of ΔW at this size (1/256 at 4096²).
    const index_t b = 4;
    twin<T> K(dwt::random((out / b) * (in / b), b, 7));
    scratch_of<T>("c3a (b = 4: panels)", dw::c3a(K.gpu(), out, in), dense / 2, dense, std::size_t((out / b) * (in / b)),
                  std::size_t(b));
  }
#endif
}
