// SPDX-License-Identifier: MIT
// The VJPs (factor gradients) on CUDA views (cuda/include/deltaw/cuda/vjp.cuh): the
// backward passes written once (deltaw/backend/cpu/*_vjp.hpp) run with a cuda::context,
// against the same passes on the CPU backend over the same stored values, for LoRA,
// B·R·A, Block-LoRA, MiSS (+ mini), Bone bat, LoLDU, DoRA, NOLA, VeRA, RandLoRA and
// Kronecker updates (dense and low-rank factors): every gradient slot and dX, with
// gradients that already hold values (backward adds), all slots or some of them, both
// layouts, tokens = 0 included; dX also against dX₀ + dY·D with D the CPU's materialised
// ΔW. And the scratch high-water mark: no out × in scratch.
// In the nvcc build it joins test_cuda_lora, whose test_cuda_lora.cu skips (exit 77)
// without a usable device.
#include <deltaw/cuda/cuda.hpp>
#include <deltaw/cuda/vjp.cuh>
#include <deltaw/deltaw.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "cuda_test_util.cuh"
#include "cuda_update_check.cuh"
#include "test_util.hpp"

namespace dw = deltaw;

namespace cuda_vjp_test {

using dw::index_t;
using dwcuda::dev_indices;
using dwcuda::twin;
using dwcuda::vtwin;
using dwcuda::check_vjp;
using dwcuda::slot;
using dwt::MatD;

/// Odd sizes, r = 1, tokens = 0 and 1, more tokens than r.
struct shape {
  index_t out, in, r, tokens;
};
const shape shapes[] = {{12, 8, 4, 5}, {6, 10, 2, 0}, {9, 9, 3, 1}, {16, 24, 4, 33}, {5, 7, 1, 3}};

template <class T>
void lora_cases(dw::cuda::context& ctx, std::uint64_t seed) {
  for (const shape& s : shapes) {
    for (bool cm : {false, true}) {
      seed += 40;
      twin<T> B(dwt::random(s.out, s.r, seed + 1), cm), A(dwt::random(s.r, s.in, seed + 2), !cm);
      INFO("lora");
      check_vjp<T>(ctx, dw::lora(B.gpu(), A.gpu(), dw::alpha(3.0)), dw::lora(B.cpu(), A.cpu(), dw::alpha(3.0)),
                   {{s.out, s.r}, {s.r, s.in}}, s.tokens, cm, seed);
    }
  }
}

template <class T>
void bone_bat_cases(dw::cuda::context& ctx, std::uint64_t seed) {
  // out and in multiples of r; tokens ≤ r and > r (the two routes of the gradient of b).
  const shape bat[] = {{12, 8, 4, 5}, {6, 9, 3, 0}, {16, 24, 4, 33}, {8, 8, 2, 2}};
  for (const shape& s : bat) {
    for (bool cm : {false, true}) {
      seed += 40;
      twin<T> W(dwt::random(s.out, s.in, seed + 1), cm), b(MatD(0.3 * dwt::random(s.out, s.r, seed + 2)), !cm);
      INFO("bone bat");
      check_vjp<T>(ctx, dw::bone_bat(W.gpu(), b.gpu()), dw::bone_bat(W.cpu(), b.cpu()), {{s.out, s.r}}, s.tokens, cm,
                   seed);
    }
  }
}

/// LoLDU's factors of rank r over [out, in]: L unit lower trapezoidal, U unit upper, a
/// permutation, z and z₀; σ trained.
template <class T>
struct ldu_factors {
  twin<T> L, U;
  vtwin<T> z, z0;
  std::vector<index_t> perm;
  dev_indices pd;
  static MatD lower(index_t out, index_t r, std::uint64_t seed) {
    MatD L = dwt::random(out, r, seed);
    for (index_t j = 0; j < r; ++j) {
      for (index_t i = 0; i < j; ++i) L(i, j) = 0.0;
      L(j, j) = 1.0;
    }
    return L;
  }
  static std::vector<index_t> rotation(index_t out) {
    std::vector<index_t> p(static_cast<std::size_t>(out));
    for (index_t o = 0; o < out; ++o) p[std::size_t(o)] = (o + 3) % out;
    return p;
  }
  ldu_factors(index_t out, index_t in, index_t r, bool cm, std::uint64_t seed)
      : L(lower(out, r, seed), cm),
        U(MatD(lower(in, r, seed + 1).transpose()), !cm),
        z(dwt::random(r, 1, seed + 2)),
        z0(dwt::random(r, 1, seed + 3)),
        perm(rotation(out)),
        pd(perm) {}
  auto gpu() {
    return dw::ldu_from_factors(pd.gpu(), L.gpu(), z.gpu(), z0.gpu(), U.gpu(),
                                dw::scale(1.5), dw::scale(0.5), dw::ldu_options{.train_sigma = true});
  }
  auto cpu() {
    return dw::ldu_from_factors(dw::vector_view<const index_t>(perm.data(), index_t(perm.size())), L.cpu(), z.cpu(),
                                z0.cpu(), U.cpu(),
                                dw::scale(1.5), dw::scale(0.5), dw::ldu_options{.train_sigma = true});
  }
};

/// The largest single scratch request and the high-water mark of one backward call with
/// every slot and dX present.
template <class T, class UG>
std::pair<std::size_t, std::size_t> backward_scratch(const UG& ug, const std::vector<slot>& slots, index_t tokens,
                                                     std::uint64_t seed) {
  dw::cuda::context ctx;
  const index_t out = ug.rows(), in = ug.cols();
  twin<T> X(dwt::random(tokens, in, seed + 1)), dY(dwt::random(tokens, out, seed + 2)), dX(MatD::Zero(tokens, in));
  std::vector<std::unique_ptr<twin<T>>> g;
  std::vector<dw::matrix_view<T, dw::device::cuda>> v;
  for (const slot& s : slots) {
    g.push_back(std::make_unique<twin<T>>(MatD::Zero(s.rows, s.cols)));
    v.push_back(g.back()->gpu());
  }
  ctx.reset_scratch_statistics();
  dw::cuda::backward<T>(ctx, ug, X.gpu(), dY.gpu(), std::span<const dw::matrix_view<T, dw::device::cuda>>(v), dX.gpu());
  return {ctx.largest_scratch_request_bytes(), ctx.scratch_high_water_bytes()};
}

}  // namespace cuda_vjp_test

TEST_CASE_TEMPLATE("cuda backward: LoRA and Bone bat gradients match the CPU backend", T, float, double) {
  dw::cuda::context ctx;
  cuda_vjp_test::lora_cases<T>(ctx, 1000);
  cuda_vjp_test::bone_bat_cases<T>(ctx, 2000);
}

TEST_CASE("cuda backward: B·R·A, Block-LoRA and MiSS gradients match the CPU backend (float)") {
  using T = float;
  using cuda_vjp_test::twin;
  using dwt::MatD;
  dw::cuda::context ctx;
  std::uint64_t seed = 3000;
  for (const auto& s : cuda_vjp_test::shapes) {
    for (bool cm : {false, true}) {
      seed += 40;
      {  // B·R·A with r1 ≠ r2, every factor trained
        const dw::index_t r1 = s.r, r2 = s.r + 1;
        twin<T> B(dwt::random(s.out, r1, seed + 1), cm), R(dwt::random(r1, r2, seed + 2), !cm),
            A(dwt::random(r2, s.in, seed + 3), cm);
        INFO("core_lora");
        const dw::core_trainable all{.B = true, .R = true, .A = true};
        cuda_vjp_test::check_vjp<T>(ctx, dw::core_lora(B.gpu(), R.gpu(), A.gpu(), dw::scale(0.7), all),
                                    dw::core_lora(B.cpu(), R.cpu(), A.cpu(), dw::scale(0.7), all),
                                    {{s.out, r1}, {r1, r2}, {r2, s.in}}, s.tokens, cm, seed);
      }
      {  // Block-LoRA, 3 blocks
        twin<T> B(dwt::random(s.out, 3 * s.r, seed + 4), cm), A0(dwt::random(s.r, s.in, seed + 5), !cm);
        INFO("block_lora");
        cuda_vjp_test::check_vjp<T>(ctx, dw::block_lora(B.gpu(), A0.gpu(), dw::scale(1.3)),
                                    dw::block_lora(B.cpu(), A0.cpu(), dw::scale(1.3)), {{s.out, 3 * s.r}, {s.r, s.in}},
                                    s.tokens, cm, seed + 1);
      }
      {  // MiSS: D [r + 1, out], in not a multiple of r + 1 in some shapes
        twin<T> Dm(dwt::random(s.r + 1, s.out, seed + 6), cm);
        INFO("miss");
        cuda_vjp_test::check_vjp<T>(ctx, dw::miss(Dm.gpu(), s.in), dw::miss(Dm.cpu(), s.in), {{s.r + 1, s.out}},
                                    s.tokens, cm, seed + 2);
      }
      if (s.out % 2 == 0) {  // MiSS mini: D [r, out/2] repeated twice
        twin<T> Dm(dwt::random(s.r, s.out / 2, seed + 7), !cm);
        INFO("miss mini");
        cuda_vjp_test::check_vjp<T>(ctx, dw::miss_mini(Dm.gpu(), s.out, s.in), dw::miss_mini(Dm.cpu(), s.out, s.in),
                                    {{s.r, s.out / 2}}, s.tokens, cm, seed + 3);
      }
    }
  }
}

TEST_CASE("cuda backward: LoLDU, DoRA, NOLA, VeRA, RandLoRA and Kronecker gradients match the CPU backend (double)") {
  using T = double;
  using cuda_vjp_test::twin;
  using cuda_vjp_test::vtwin;
  using dwt::MatD;
  dw::cuda::context ctx;
  std::uint64_t seed = 5000;
  for (const auto& s : cuda_vjp_test::shapes) {
    for (bool cm : {false, true}) {
      seed += 40;
      {
        const dw::index_t r = std::min({s.r + 1, s.out, s.in});
        cuda_vjp_test::ldu_factors<T> f(s.out, s.in, r, cm, seed);
        INFO("ldu");
        cuda_vjp_test::check_vjp<T>(ctx, f.gpu(), f.cpu(), {{1, r}, {1, 1}}, s.tokens, cm, seed);
      }
      {
        twin<T> W(dwt::random(s.out, s.in, seed + 1), cm), B(dwt::random(s.out, s.r, seed + 2), !cm),
            A(dwt::random(s.r, s.in, seed + 3), cm);
        const vtwin<T> m(MatD((1.25 + 0.5 * dwt::random(s.out, 1, seed + 4).array()).matrix()));
        INFO("dora");
        const auto ug = dw::cuda::dora(ctx, W.gpu(), dw::lora(B.gpu(), A.gpu(), dw::alpha(2.0)), m.gpu());
        const auto uc = dw::dora(W.cpu(), dw::lora(B.cpu(), A.cpu(), dw::alpha(2.0)), m.cpu());
        cuda_vjp_test::check_vjp<T>(ctx, ug, uc, {{s.out, s.r}, {s.r, s.in}, {1, s.out}}, s.tokens, cm, seed + 1);
      }
      {
        const vtwin<T> a(dwt::random(5, 1, seed + 5)), b(dwt::random(4, 1, seed + 6));
        INFO("nola");
        cuda_vjp_test::check_vjp<T>(ctx, dw::nola(s.out, s.in, s.r, seed, a.gpu(), b.gpu(), dw::scale(0.9)),
                                    dw::nola(s.out, s.in, s.r, seed, a.cpu(), b.cpu(), dw::scale(0.9)), {{1, 5}, {1, 4}},
                                    s.tokens, cm, seed + 2);
      }
      {
        const auto basis = dw::vera_shared_basis(seed, s.r + 1, s.out + 3, s.in + 2);
        const vtwin<T> ld(dwt::random(s.r + 1, 1, seed + 7)), lb(dwt::random(s.out, 1, seed + 8));
        INFO("vera");
        cuda_vjp_test::check_vjp<T>(ctx, dw::vera(basis, s.out, s.in, ld.gpu(), lb.gpu()),
                                    dw::vera(basis, s.out, s.in, ld.cpu(), lb.cpu()), {{1, s.r + 1}, {1, s.out}},
                                    s.tokens, cm, seed + 3);
      }
      for (auto kind : {dw::randlora_kind::dense, dw::randlora_kind::very_sparse}) {
        const auto basis = dw::randlora_shared_basis(seed, s.r, s.out + 1, s.in + 2, kind);
        const dw::index_t mn = std::min(s.out, s.in), N = (mn + s.r - 1) / s.r;
        twin<T> lam(dwt::random(s.r, N, seed + 9), cm), gam(dwt::random(N, mn, seed + 10), !cm);
        INFO("randlora kind " << int(kind));
        cuda_vjp_test::check_vjp<T>(ctx, dw::randlora(basis, s.out, s.in, lam.gpu(), gam.gpu(), dw::alpha(4.0)),
                                    dw::randlora(basis, s.out, s.in, lam.cpu(), gam.cpu(), dw::alpha(4.0)),
                                    {{s.r, N}, {N, mn}}, s.tokens, cm, seed + 4);
      }
    }
  }
  // Kronecker: out = a·b, in = c·d; dense ⊗ dense and low-rank ⊗ low-rank factors.
  struct kshape {
    dw::index_t a, b, c, d, r, tokens;
  };
  const kshape ks[] = {{3, 4, 2, 5, 2, 7}, {2, 3, 3, 3, 1, 0}, {4, 2, 5, 3, 2, 1}, {5, 3, 2, 4, 2, 40}};
  for (const kshape& k : ks) {
    for (bool cm : {false, true}) {
      seed += 40;
      twin<T> w1(dwt::random(k.a, k.c, seed + 1), cm), w2(dwt::random(k.b, k.d, seed + 2), !cm);
      twin<T> l1(dwt::random(k.a, k.r, seed + 3), cm), r1(dwt::random(k.r, k.c, seed + 4), !cm);
      twin<T> l2(dwt::random(k.b, k.r, seed + 5), !cm), r2(dwt::random(k.r, k.d, seed + 6), cm);
      {
        INFO("kron dense ⊗ dense");
        cuda_vjp_test::check_vjp<T>(ctx, dw::kron(w1.gpu(), w2.gpu(), dw::scale(0.8)),
                                    dw::kron(w1.cpu(), w2.cpu(), dw::scale(0.8)), {{k.a, k.c}, {k.b, k.d}}, k.tokens, cm,
                                    seed);
      }
      {
        INFO("kron low-rank ⊗ low-rank");
        cuda_vjp_test::check_vjp<T>(
            ctx, dw::kron(dw::kron_factor(l1.gpu(), r1.gpu()), dw::kron_factor(l2.gpu(), r2.gpu()), dw::scale(0.8)),
            dw::kron(dw::kron_factor(l1.cpu(), r1.cpu()), dw::kron_factor(l2.cpu(), r2.cpu()), dw::scale(0.8)),
            {{k.a, k.r}, {k.r, k.c}, {k.b, k.r}, {k.r, k.d}}, k.tokens, cm, seed + 1);
      }
    }
  }
}

TEST_CASE("cuda backward: gemm_strided_reduce (Kronecker's sums over tokens) matches the CPU's") {
  // gemm_strided_reduce in chunks (count × |C| above 64 K entries) and one product per item.
  using T = double;
  using cuda_vjp_test::twin;
  using dwt::MatD;
  dw::cuda::context ctx;
  const dw::kernels::cpu_context cpu;
  struct rcase {
    dw::index_t m, n, k, count;
  };
  for (const rcase& c : {rcase{3, 4, 5, 7}, rcase{40, 50, 3, 70}, rcase{300, 256, 2, 3}, rcase{2, 2, 2, 0}}) {
    CAPTURE(c.m);
    CAPTURE(c.count);
    const MatD a = dwt::random(c.count * c.m * c.k + 1, 1, 11), b = dwt::random(c.count * c.k * c.n + 1, 1, 12);
    twin<T> A(a, true), B(b, true), Cg(dwt::random(c.m, c.n, 13), true), Cc(dwt::random(c.m, c.n, 13), true);
    // A_i [m, k] row-major, B_i [n, k] row-major used transposed.
    const auto Ag = dw::matrix_view<const T, dw::device::cuda>(A.dev.data(), c.m, c.k, c.k, 1);
    const auto Bg = dw::matrix_view<const T, dw::device::cuda>(B.dev.data(), c.n, c.k, c.k, 1);
    const auto Ac = dw::matrix_view<const T>(A.host.data(), c.m, c.k, c.k, 1);
    const auto Bc = dw::matrix_view<const T>(B.host.data(), c.n, c.k, c.k, 1);
    dw::cuda::gemm_strided_reduce<T>(ctx, 0.5, Ag, c.m * c.k, dw::kernels::op::none, Bg, c.n * c.k, dw::kernels::op::trans,
                                     0.25, Cg.gpu(), c.count);
    dw::kernels::gemm_strided_reduce<T>(cpu, 0.5, Ac, c.m * c.k, dw::kernels::op::none, Bc, c.n * c.k,
                                        dw::kernels::op::trans, 0.25, Cc.cpu(), c.count);
    CHECK(dwt::rel_err(Cg.dev_d(), Cc.host_d()) <= 1e-12);
  }
}

TEST_CASE("cuda backward: no update type takes an out × in scratch") {
  // out = in = 512, tokens = 8: a dense ΔW is 1 MiB (float) or 2 MiB (double).
  using cuda_vjp_test::backward_scratch;
  using cuda_vjp_test::twin;
  using dwt::MatD;
  const dw::index_t out = 512, in = 512, r = 16, tokens = 8;
  const auto check = [&](const std::string& name, std::pair<std::size_t, std::size_t> s, std::size_t elem,
                         std::size_t limit = 0) {
    const std::size_t dense = std::size_t(out * in) * elem;
    if (limit == 0) limit = dense / 4;
    MESSAGE(name << " backward: largest scratch request " << s.first << " B, high-water " << s.second << " B; dense ΔW "
                 << dense << " B");
    CAPTURE(name);
    CHECK(s.first < dense);
    CHECK(s.second > 0);
    CHECK(s.second < limit);
  };
  {
    using T = float;
    twin<T> B(dwt::random(out, r, 1)), A(dwt::random(r, in, 2)), R(dwt::random(r, r, 3)), Bb(dwt::random(out, 4 * r, 4));
    twin<T> Dm(dwt::random(r, out, 5)), W(dwt::random(out, in, 6)), b(MatD(0.1 * dwt::random(out, r, 7)));
    const dw::core_trainable all{.B = true, .R = true, .A = true};
    check("lora", backward_scratch<T>(dw::lora(B.gpu(), A.gpu(), dw::alpha(2.0)), {{out, r}, {r, in}}, tokens, 8), 4);
    check("core_lora",
          backward_scratch<T>(dw::core_lora(B.gpu(), R.gpu(), A.gpu(), dw::scale(0.5), all), {{out, r}, {r, r}, {r, in}},
                              tokens, 9),
          4);
    check("block_lora", backward_scratch<T>(dw::block_lora(Bb.gpu(), A.gpu(), dw::scale(0.5)), {{out, 4 * r}, {r, in}}, tokens, 10),
          4);
    check("miss", backward_scratch<T>(dw::miss(Dm.gpu(), in), {{r, out}}, tokens, 11), 4);
    check("bone bat", backward_scratch<T>(dw::bone_bat(W.gpu(), b.gpu()), {{out, r}}, tokens, 12), 4);
  }
  {
    using T = double;
    dw::cuda::context c;
    twin<T> B(dwt::random(out, r, 1)), A(dwt::random(r, in, 2)), W(dwt::random(out, in, 6));
    const cuda_vjp_test::vtwin<T> m(MatD((1.0 + 0.5 * dwt::random(out, 1, 13).array()).matrix()));
    check("dora",
          backward_scratch<T>(dw::cuda::dora(c, W.gpu(), dw::lora(B.gpu(), A.gpu(), dw::alpha(2.0)), m.gpu()),
                              {{out, r}, {r, in}, {1, out}}, tokens, 14),
          8);
    cuda_vjp_test::ldu_factors<T> f(out, in, r, false, 15);
    check("ldu", backward_scratch<T>(f.gpu(), {{1, r}, {1, 1}}, tokens, 16), 8);
    const cuda_vjp_test::vtwin<T> na(dwt::random(8, 1, 17)), nb(dwt::random(8, 1, 18));
    check("nola", backward_scratch<T>(dw::nola(out, in, r, 5, na.gpu(), nb.gpu(), dw::scale(0.5)), {{1, 8}, {1, 8}}, tokens, 19),
          8);
    const auto vb = dw::vera_shared_basis(6, 32, out, in);
    const cuda_vjp_test::vtwin<T> ld(dwt::random(32, 1, 20)), lb(dwt::random(out, 1, 21));
    check("vera (r = 32)", backward_scratch<T>(dw::vera(vb, out, in, ld.gpu(), lb.gpu()), {{1, 32}, {1, out}}, tokens, 22), 8);
    // RandLoRA works in tiles of at most 256 lines of N·r ≥ min_dim entries (half of ΔW at
    // this size, 1/16 at 4096²): bounded by four tiles, as its forward.
    const auto rb = dw::randlora_shared_basis(7, r, out, in);
    const dw::index_t N = (in + r - 1) / r;
    twin<T> lam(dwt::random(r, N, 23)), gam(dwt::random(N, in, 24));
    check("randlora",
          backward_scratch<T>(dw::randlora(rb, out, in, lam.gpu(), gam.gpu(), dw::alpha(32.0)), {{r, N}, {N, in}}, tokens, 25),
          8, 4 * std::size_t(256 * std::max(N * r, in)) * sizeof(T));
    // Kronecker, w1 [16, 16] ⊗ w2 [32, 32]: out = in = 512.
    twin<T> w1(dwt::random(16, 16, 26)), w2(dwt::random(32, 32, 27));
    check("kron", backward_scratch<T>(dw::kron(w1.gpu(), w2.gpu(), dw::scale(0.5)), {{16, 16}, {32, 32}}, tokens, 28), 8);
  }
}
