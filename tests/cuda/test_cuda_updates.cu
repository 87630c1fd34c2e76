// SPDX-License-Identifier: MIT
// Every update type but LoRA and Kronecker on CUDA, through the evaluators written once
// (deltaw/backend/cpu/*.hpp run with a cuda::context; cuda/include/deltaw/cuda/updates.cuh),
// against the CPU backend on the same stored values: B·R·A, Block-LoRA, MiSS (+ mini),
// Bone bat, LoLDU, DoRA, NOLA, VeRA, RandLoRA. For each: apply (ΔW alone, W + ΔW),
// apply_transposed, materialize, frobenius_norm, merge, unmerge, merge_checked, in float
// and double, row- and column-major, tokens = 0 included; lazy sums of mixed types; the
// scratch high-water mark (no out × in scratch); and that the Philox bases regenerated on
// the device are bitwise those of the CPU.
// In the nvcc build it joins test_cuda_lora, whose test_cuda_lora.cu skips (exit 77)
// without a usable device.
#include <deltaw/cuda/cuda.hpp>
#include <deltaw/deltaw.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda_test_util.cuh"
#include "cuda_update_check.cuh"
#include "test_util.hpp"

namespace dw = deltaw;
using dw::index_t;
using dwt::MatD;

namespace {

using dwcuda::dev_indices;
using dwcuda::twin;
using dwcuda::vtwin;
using dwcuda::check_update;
using dwcuda::random_vec;
using dwcuda::upd_cpu_tol;
using dwcuda::upd_ref_tol;

struct upd_shape {
  index_t out, in, r, tokens;
};
// Odd sizes, r = 1, tokens = 0 and 1, more tokens than r (Bone bat's merged-weight path).
const upd_shape upd_shapes[] = {{12, 8, 4, 5}, {6, 10, 2, 0}, {9, 9, 3, 1}, {16, 24, 4, 33}, {5, 7, 1, 3}};

}  // namespace

TEST_CASE_TEMPLATE("cuda: B·R·A, Block-LoRA and MiSS match the CPU backend", T, float, double) {
  dw::cuda::context ctx;
  std::uint64_t seed = 100;
  for (const upd_shape& s : upd_shapes) {
    for (bool cm : {false, true}) {
      seed += 20;
      {  // core_low_rank with r1 ≠ r2
        const index_t r1 = s.r, r2 = s.r + 1;
        twin<T> B(dwt::random(s.out, r1, seed + 4), cm), R(dwt::random(r1, r2, seed + 5), !cm),
            A(dwt::random(r2, s.in, seed + 6), cm);
        INFO("core_low_rank");
        check_update<T>(ctx, dw::core_lora(B.gpu(), R.gpu(), A.gpu(), dw::scale(0.7)),
                        dw::core_lora(B.cpu(), R.cpu(), A.cpu(), dw::scale(0.7)), s.tokens, cm, seed);
      }
      {  // Block-LoRA, 3 blocks
        twin<T> B(dwt::random(s.out, 3 * s.r, seed + 7), cm), A0(dwt::random(s.r, s.in, seed + 8), !cm);
        INFO("block_lora");
        check_update<T>(ctx, dw::block_lora(B.gpu(), A0.gpu(), dw::scale(1.3)),
                        dw::block_lora(B.cpu(), A0.cpu(), dw::scale(1.3)), s.tokens, cm, seed + 1);
      }
      {  // MiSS: D [r, out], in not a multiple of r in some shapes
        twin<T> Dm(dwt::random(s.r + 1, s.out, seed + 9), cm);
        INFO("miss");
        check_update<T>(ctx, dw::miss(Dm.gpu(), s.in), dw::miss(Dm.cpu(), s.in), s.tokens, cm, seed + 2);
      }
      if (s.out % 2 == 0) {  // MiSS mini: D [r, out/2] repeated twice
        twin<T> Dm(dwt::random(s.r, s.out / 2, seed + 10), !cm);
        INFO("miss mini");
        check_update<T>(ctx, dw::miss_mini(Dm.gpu(), s.out, s.in), dw::miss_mini(Dm.cpu(), s.out, s.in), s.tokens, cm,
                        seed + 3);
      }
    }
  }
}

TEST_CASE_TEMPLATE("cuda: Bone bat and DoRA (updates over their own weight) match the CPU backend", T, float, double) {
  dw::cuda::context ctx;
  std::uint64_t seed = 300;
  const upd_shape bat_shapes[] = {{12, 8, 4, 5}, {6, 9, 3, 0}, {16, 24, 4, 33}, {8, 8, 2, 2}};
  for (const upd_shape& s : bat_shapes) {
    for (bool cm : {false, true}) {
      seed += 20;
      twin<T> W(dwt::random(s.out, s.in, seed + 1), cm), b(MatD(0.3 * dwt::random(s.out, s.r, seed + 2)), !cm);
      INFO("bone bat");
      const auto ug = dw::bone_bat(W.gpu(), b.gpu());
      const auto uc = dw::bone_bat(W.cpu(), b.cpu());
      check_update<T>(ctx, ug, uc, s.tokens, cm, seed, &W);
    }
  }
  for (const upd_shape& s : upd_shapes) {
    for (bool cm : {false, true}) {
      seed += 20;
      twin<T> W(dwt::random(s.out, s.in, seed + 1), cm), B(dwt::random(s.out, s.r, seed + 2), !cm),
          A(dwt::random(s.r, s.in, seed + 3), cm);
      const vtwin<T> m(random_vec(s.out, seed + 4, 0.5, 2.0));
      INFO("dora");
      const auto ug = dw::cuda::dora(ctx, W.gpu(), dw::lora(B.gpu(), A.gpu(), dw::alpha(2.0)), m.gpu());
      const auto uc = dw::dora(W.cpu(), dw::lora(B.cpu(), A.cpu(), dw::alpha(2.0)), m.cpu());
      for (index_t o = 0; o < s.out; ++o)
        CHECK(std::abs(ug.norms()[std::size_t(o)] - uc.norms()[std::size_t(o)]) <= upd_cpu_tol<T>() * uc.norms()[std::size_t(o)]);
      check_update<T>(ctx, ug, uc, s.tokens, cm, seed, &W);
    }
  }
}

TEST_CASE_TEMPLATE("cuda: LoLDU matches the CPU backend", T, float, double) {
  dw::cuda::context ctx;
  std::uint64_t seed = 500;
  for (const upd_shape& s : upd_shapes) {
    for (bool cm : {false, true}) {
      seed += 20;
      const MatD Wf = dwt::random(s.out, s.in, seed + 1);
      const auto init = dw::loldu(dw::dense<T>(Wf.cast<T>()), std::min({s.r + 1, s.out, s.in}), dw::alpha(2.0));
      const index_t r = init.rank();
      MatD L(s.out, r), U(r, s.in);
      Eigen::VectorXd z0(r);
      for (index_t i = 0; i < s.out; ++i)
        for (index_t j = 0; j < r; ++j) L(i, j) = dw::convert<double>(init.L()(i, j));
      for (index_t i = 0; i < r; ++i)
        for (index_t j = 0; j < s.in; ++j) U(i, j) = dw::convert<double>(init.U()(i, j));
      for (index_t j = 0; j < r; ++j) z0(j) = dw::convert<double>(init.z0()[j]);
      std::vector<index_t> perm(static_cast<std::size_t>(s.out));
      for (index_t o = 0; o < s.out; ++o) perm[std::size_t(o)] = init.perm()[o];
      twin<T> Lt(L, cm), Ut(U, !cm);
      const vtwin<T> z(z0 + random_vec(r, seed + 2, -0.5, 0.5)), zz0(z0);
      const dev_indices pd(perm);
      INFO("ldu");
      const auto ug = dw::ldu_from_factors(pd.gpu(), Lt.gpu(), z.gpu(), zz0.gpu(), Ut.gpu(), dw::scale(init.sigma() * 1.5),
                                           dw::scale(init.sigma0()));
      const auto uc = dw::ldu_from_factors(dw::vector_view<const index_t>(perm.data(), s.out), Lt.cpu(), z.cpu(),
                                           zz0.cpu(), Ut.cpu(), dw::scale(init.sigma() * 1.5), dw::scale(init.sigma0()));
      check_update<T>(ctx, ug, uc, s.tokens, cm, seed);
    }
  }
}

TEST_CASE_TEMPLATE("cuda: NOLA, VeRA and RandLoRA (bases regenerated on the device) match the CPU backend", T, float,
                   double) {
  dw::cuda::context ctx;
  std::uint64_t seed = 700;
  for (const upd_shape& s : upd_shapes) {
    for (bool cm : {false, true}) {
      seed += 20;
      {
        const vtwin<T> a(random_vec(5, seed + 1)), b(random_vec(4, seed + 2));
        INFO("nola");
        check_update<T>(ctx, dw::nola(s.out, s.in, s.r, seed, a.gpu(), b.gpu(), dw::scale(0.9)),
                        dw::nola(s.out, s.in, s.r, seed, a.cpu(), b.cpu(), dw::scale(0.9)), s.tokens, cm, seed);
      }
      {
        const auto basis = dw::vera_shared_basis(seed, s.r + 1, s.out + 3, s.in + 2);
        const vtwin<T> ld(random_vec(s.r + 1, seed + 3)), lb(random_vec(s.out, seed + 4));
        INFO("vera");
        check_update<T>(ctx, dw::vera(basis, s.out, s.in, ld.gpu(), lb.gpu()),
                        dw::vera(basis, s.out, s.in, ld.cpu(), lb.cpu()), s.tokens, cm, seed + 1);
      }
      for (auto kind : {dw::randlora_kind::dense, dw::randlora_kind::sparse, dw::randlora_kind::very_sparse}) {
        const auto basis = dw::randlora_shared_basis(seed, s.r, s.out + 1, s.in + 2, kind);
        const index_t mn = std::min(s.out, s.in), N = (mn + s.r - 1) / s.r;
        twin<T> lam(dwt::random(s.r, N, seed + 5), cm), gam(dwt::random(N, mn, seed + 6), !cm);
        INFO("randlora kind " << int(kind));
        check_update<T>(ctx, dw::randlora(basis, s.out, s.in, lam.gpu(), gam.gpu(), dw::alpha(4.0)),
                        dw::randlora(basis, s.out, s.in, lam.cpu(), gam.cpu(), dw::alpha(4.0)), s.tokens, cm, seed + 2);
      }
    }
  }
}

TEST_CASE_TEMPLATE("cuda: lazy sums of mixed update types match the CPU backend", T, float, double) {
  dw::cuda::context ctx;
  const index_t out = 12, in = 8, r = 2;
  for (index_t tokens : {0, 1, 7}) {
    for (bool cm : {false, true}) {
      CAPTURE(tokens);
      CAPTURE(cm);
      const std::uint64_t seed = 900 + std::uint64_t(tokens) * 10 + (cm ? 1 : 0);
      twin<T> W(dwt::random(out, in, seed), cm), X(dwt::random(tokens, in, seed + 1), !cm);
      twin<T> B(dwt::random(out, r, seed + 2), cm), R(dwt::random(r, r, seed + 3), cm), A(dwt::random(r, in, seed + 4), !cm);
      twin<T> Bb(dwt::random(out, 2 * r, seed + 5), cm), Dm(dwt::random(r, out, seed + 6), !cm);
      twin<T> lam(dwt::random(r, 4, seed + 7), cm), gam(dwt::random(4, in, seed + 8), cm);
      const vtwin<T> ld(random_vec(r, seed + 9)), lb(random_vec(out, seed + 10)), m(random_vec(out, seed + 11, 0.5, 2.0));
      const auto vb = dw::vera_shared_basis(seed, r, out, in);
      const auto rb = dw::randlora_shared_basis(seed, r, out, in);
      // W + five updates of different types (none over its own weight).
      auto Yg = dwcuda::nan_output<T>(tokens, out, cm), Yc = dwcuda::nan_output<T>(tokens, out, cm);
      dw::apply(ctx,
                W.gpu() + dw::core_lora(B.gpu(), R.gpu(), A.gpu(), dw::scale(0.5)) +
                    dw::block_lora(Bb.gpu(), A.gpu(), dw::scale(0.25)) + dw::miss(Dm.gpu(), in) +
                    dw::vera(vb, out, in, ld.gpu(), lb.gpu()) + dw::randlora(rb, out, in, lam.gpu(), gam.gpu(), dw::alpha(2.0)),
                X.gpu(), Yg.gpu());
      dw::apply(W.cpu() + dw::core_lora(B.cpu(), R.cpu(), A.cpu(), dw::scale(0.5)) +
                    dw::block_lora(Bb.cpu(), A.cpu(), dw::scale(0.25)) + dw::miss(Dm.cpu(), in) +
                    dw::vera(vb, out, in, ld.cpu(), lb.cpu()) + dw::randlora(rb, out, in, lam.cpu(), gam.cpu(), dw::alpha(2.0)),
                X.cpu(), Yc.cpu());
      CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= upd_cpu_tol<T>());
      // DoRA over W plus a LoRA and a NOLA: the CPU uses DoRA's base hook, CUDA adds its ΔW.
      const vtwin<T> na(random_vec(3, seed + 12)), nb(random_vec(2, seed + 13));
      twin<T> A2(dwt::random(2 * r, in, seed + 14), cm);
      auto Zg = dwcuda::nan_output<T>(tokens, out, !cm), Zc = dwcuda::nan_output<T>(tokens, out, !cm);
      const auto dg = dw::cuda::dora(ctx, W.gpu(), dw::lora(B.gpu(), A.gpu(), dw::alpha(1.0)), m.gpu());
      const auto dc = dw::dora(W.cpu(), dw::lora(B.cpu(), A.cpu(), dw::alpha(1.0)), m.cpu());
      dw::apply(ctx, W.gpu() + dg + dw::lora(Bb.gpu(), A2.gpu(), dw::scale(0.1)) +
                         dw::nola(out, in, r, seed, na.gpu(), nb.gpu()),
                X.gpu(), Zg.gpu());
      dw::apply(W.cpu() + dc + dw::lora(Bb.cpu(), A2.cpu(), dw::scale(0.1)) +
                    dw::nola(out, in, r, seed, na.cpu(), nb.cpu()),
                X.cpu(), Zc.cpu());
      CHECK(dwt::rel_err(Zg.dev_d(), Zc.host_d()) <= upd_cpu_tol<T>());
    }
  }
}

namespace {

/// The bits of a device tile and of the CPU's, element by element.
template <class C>
bool same_bits(const twin<C>& a, const twin<C>& b) {
  const std::vector<C> da = a.dev.to_vector();
  return da.size() == b.host.size() && std::memcmp(da.data(), b.host.data(), da.size() * sizeof(C)) == 0;
}

}  // namespace

TEST_CASE_TEMPLATE("cuda: random bases regenerated on the device are bitwise the CPU's", C, float, double) {
  dw::cuda::context ctx;
  const dw::kernels::cpu_context cpu;
  const auto vb = dw::vera_shared_basis(11, 7, 300, 200);
  const auto rd = dw::randlora_shared_basis(12, 5, 130, 70, dw::randlora_kind::dense);
  const auto rs = dw::randlora_shared_basis(13, 5, 130, 70, dw::randlora_kind::sparse);
  const auto rv = dw::randlora_shared_basis(14, 5, 130, 70, dw::randlora_kind::very_sparse);
  const dw::basis_entries bases[] = {vb.A(), vb.B(), rd.A(), rd.B(), rs.A(), rs.B(), rv.A(), rv.B()};
  struct tile {
    index_t rows, cols;
    std::uint64_t first, ld;
  };
  // Tiles at offsets that are and are not multiples of four (Philox blocks), rows longer
  // and shorter than the basis row (ld), and a single entry.
  const tile tiles[] = {{7, 200, 0, 200}, {3, 33, 5, 200}, {64, 13, 1001, 17}, {1, 1, 3, 1}, {9, 8, 2, 8}};
  int compared = 0;
  for (const auto& e : bases) {
    for (const tile& t : tiles) {
      for (bool cm : {false, true}) {
        CAPTURE(t.rows);
        CAPTURE(t.cols);
        CAPTURE(t.first);
        CAPTURE(cm);
        auto Yg = dwcuda::nan_output<C>(t.rows, t.cols, cm), Yc = dwcuda::nan_output<C>(t.rows, t.cols, cm);
        dw::cuda::fill_random(ctx, e, t.first, t.ld, Yg.gpu());
        dw::kernels::fill_random(cpu, e, t.first, t.ld, Yc.cpu());
        CHECK(same_bits(Yg, Yc));
        // The values themselves: entry (i, j) is e(first + i·ld + j).
        const MatD v = Yc.host_d();
        CHECK(v(t.rows - 1, t.cols - 1) ==
              double(e.template value<C>(t.first + std::uint64_t(t.rows - 1) * t.ld + std::uint64_t(t.cols - 1))));
        ++compared;
      }
    }
  }
  CHECK(compared == 8 * 5 * 2);

  // Weighted sums of bases (NOLA's A₀ + Σ αᵢ·Aᵢ), added onto a tile that holds values.
  const std::vector<C> coef = {C(1), C(0.37), C(-1.25), C(2.5e-3)};
  const std::vector<dw::basis_entries> nb = {vb.A(), rd.B(), rs.A(), rv.B()};
  for (const tile& t : tiles) {
    for (bool cm : {false, true}) {
      twin<C> Yg(dwt::random(t.rows, t.cols, 77), cm), Yc(dwt::random(t.rows, t.cols, 77), cm);
      const dw::vector_view<const C> cv(coef.data(), index_t(coef.size()));
      dw::cuda::axpy_random(ctx, cv, std::span<const dw::basis_entries>(nb), t.first, t.ld, Yg.gpu());
      dw::kernels::axpy_random(cpu, cv, std::span<const dw::basis_entries>(nb), t.first, t.ld, Yc.cpu());
      CHECK(same_bits(Yg, Yc));
    }
  }
}

TEST_CASE_TEMPLATE("cuda: no update type takes an out × in scratch", T, float, double) {
  // out = in = 512, tokens = 8: a dense ΔW is 1 MiB (float) or 2 MiB (double).
  const index_t out = 512, in = 512, r = 16, tokens = 8;
  const std::size_t dense_bytes = std::size_t(out * in) * sizeof(T);
  const auto run = [&](const std::string& name, const auto& u, twin<T>& W, std::size_t limit,
                       std::size_t largest_limit = 0) {
    if (largest_limit == 0) largest_limit = dense_bytes - 1;
    CAPTURE(name);
    const auto s = dwcuda::measure_scratch<T>(u, W, tokens);
    MESSAGE(name << ": scratch high-water (B):" << s.per_op << "; dense ΔW " << dense_bytes << " B");
    CAPTURE(s.per_op);
    CHECK(s.largest <= largest_limit);  // no single request of an out × in matrix
    CHECK(s.per_call > 0);
    CHECK(s.per_call < limit);
    // The whole-ΔW operations work on panels of 32 K or 64 K entries (an eighth or a
    // quarter of ΔW at this size): never one out × in.
    CHECK(s.whole < std::max(limit, dense_bytes));
  };
  twin<T> W(dwt::random(out, in, 3));
  twin<T> B(dwt::random(out, r, 4)), R(dwt::random(r, r, 5)), A(dwt::random(r, in, 6)), Bb(dwt::random(out, 4 * r, 7));
  twin<T> Dm(dwt::random(r, out, 8)), Dmini(dwt::random(r, 64, 9)), b(MatD(0.1 * dwt::random(out, r, 10)));
  run("core_low_rank", dw::core_lora(B.gpu(), R.gpu(), A.gpu(), dw::scale(0.5)), W, dense_bytes / 4);
  run("block_lora", dw::block_lora(Bb.gpu(), A.gpu(), dw::scale(0.5)), W, dense_bytes / 4);
  run("miss", dw::miss(Dm.gpu(), in), W, dense_bytes / 4);
  run("miss mini", dw::miss_mini(Dmini.gpu(), out, in), W, dense_bytes / 4);
  run("bone bat (tokens ≤ r: blockwise)", dw::bone_bat(W.gpu(), b.gpu()), W, dense_bytes / 4);
  {
    dw::cuda::context c;
    const vtwin<T> m(random_vec(out, 11, 0.5, 2.0));
    run("dora", dw::cuda::dora(c, W.gpu(), dw::lora(B.gpu(), A.gpu(), dw::alpha(2.0)), m.gpu()), W, dense_bytes / 4);
  }
  {
    std::vector<index_t> perm(static_cast<std::size_t>(out));
    for (index_t o = 0; o < out; ++o) perm[std::size_t(o)] = (o * 7) % out;  // 7 is prime to 512
    MatD L = dwt::random(out, r, 12), U = dwt::random(r, in, 13);
    for (index_t j = 0; j < r; ++j) {
      for (index_t i = 0; i < j; ++i) L(i, j) = 0.0;
      L(j, j) = 1.0;
      for (index_t k = 0; k < j; ++k) U(j, k) = 0.0;
      U(j, j) = 1.0;
    }
    twin<T> Lt(L), Ut(U);
    const vtwin<T> z(random_vec(r, 14)), z0(random_vec(r, 15));
    const dev_indices pd(perm);
    run("ldu", dw::ldu_from_factors(pd.gpu(), Lt.gpu(), z.gpu(), z0.gpu(), Ut.gpu(), dw::scale(0.5), dw::scale(0.25)), W,
        dense_bytes / 4);
  }
  {
    const vtwin<T> a(random_vec(8, 16)), bb(random_vec(8, 17));
    run("nola", dw::nola(out, in, r, 5, a.gpu(), bb.gpu(), dw::scale(0.5)), W, dense_bytes / 4);
  }
  {
    // r = 32: PEFT's default r = 256 is half of this layer, so its factors alone are half of ΔW.
    const auto basis = dw::vera_shared_basis(6, 32, out, in);
    const vtwin<T> ld(random_vec(32, 18)), lb(random_vec(out, 19));
    run("vera (r = 32)", dw::vera(basis, out, in, ld.gpu(), lb.gpu()), W, dense_bytes / 4);
  }
  {
    // Full rank by design: the evaluator draws U and V in tiles of at most 256 lines of
    // N·r or min_dim entries (N·r ≥ min_dim), each feeding one GEMM. At 512 × 512 one tile
    // is half of ΔW (at 4096 × 4096, 1/16): the bound is a few tiles, independent of out.
    const auto basis = dw::randlora_shared_basis(7, r, out, in);
    const index_t N = (in + r - 1) / r;
    twin<T> lam(dwt::random(r, N, 20)), gam(dwt::random(N, in, 21));
    const std::size_t tile_bytes = std::size_t(256 * std::max(N * r, in)) * sizeof(T);
    // frobenius_norm draws its tiles in double: the largest request is one double tile.
    run("randlora", dw::randlora(basis, out, in, lam.gpu(), gam.gpu(), dw::alpha(32.0)), W, 4 * tile_bytes,
        std::size_t(256 * std::max(N * r, in)) * sizeof(double));
  }
}
