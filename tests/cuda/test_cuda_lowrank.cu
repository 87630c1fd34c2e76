// SPDX-License-Identifier: MIT
// LoHa, IA³ (both sides), AdaLoRA, BD-LoRA (A or B block-diagonal), TinyLoRA and PVeRA on
// CUDA, through the evaluators and VJPs written once (deltaw/backend/cpu/*.hpp run with a
// cuda::context; cuda/include/deltaw/cuda/updates_lowrank.cuh), against the CPU backend on
// the same stored values: apply (ΔW alone, W + ΔW), apply_transposed, materialize,
// frobenius_norm, merge, unmerge, merge_checked and cuda::backward (every gradient slot and
// dX), in float and double, row- and column-major, tokens = 0, 1 and more than r; lazy sums
// mixing these types with LoRA; and the scratch high-water mark (no out × in scratch).
// In the nvcc build it joins test_cuda_lora, whose test_cuda_lora.cu skips (exit 77)
// without a usable device.
#include <deltaw/cuda/cuda.hpp>
#include <deltaw/cuda/updates_lowrank.cuh>
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

namespace cuda_lowrank_test {

using dw::index_t;
using dwcuda::slot;
using dwcuda::twin;
using dwcuda::vtwin;
using dwt::MatD;

/// Odd sizes, r = 1, tokens = 0 and 1, more tokens than r.
struct shape {
  index_t out, in, r, tokens;
};
const shape shapes[] = {{12, 8, 4, 5}, {6, 10, 2, 0}, {9, 9, 3, 1}, {16, 24, 4, 33}, {5, 7, 1, 3}};

/// A vector of n values in [lo, hi] as a device/host twin.
template <class T>
vtwin<T> vec(index_t n, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  return vtwin<T>(MatD(dwcuda::random_vec(n, seed, lo, hi)));
}

// One fixture per type: the stored factors (host and device), the update on each side,
// its gradient slots and, for IA³, the weight it is built over. `variants` runs of each
// shape and layout (IA³'s two sides, BD-LoRA's two block-diagonal factors).

template <class T>
struct loha_f {
  static constexpr const char* name = "loha";
  static constexpr int variants = 1;
  index_t out, in, r1, r2;
  twin<T> B1, A1, B2, A2;
  loha_f(const shape& s, bool cm, std::uint64_t seed, int)
      : out(s.out), in(s.in), r1(s.r), r2(s.r + 1), B1(dwt::random(out, r1, seed + 1), cm),
        A1(dwt::random(r1, in, seed + 2), !cm), B2(dwt::random(out, r2, seed + 3), !cm),
        A2(dwt::random(r2, in, seed + 4), cm) {}
  auto gpu() { return dw::loha(B1.gpu(), A1.gpu(), B2.gpu(), A2.gpu(), dw::alpha(2.0)); }
  auto cpu() { return dw::loha(B1.cpu(), A1.cpu(), B2.cpu(), A2.cpu(), dw::alpha(2.0)); }
  std::vector<slot> slots() const { return {{out, r1}, {r1, in}, {out, r2}, {r2, in}}; }
  twin<T>* own() { return nullptr; }
};

template <class T>
struct ia3_f {
  static constexpr const char* name = "ia3 (variant 0: output side, 1: input side)";
  static constexpr int variants = 2;
  dw::ia3_side side;
  twin<T> W;
  vtwin<T> l;
  ia3_f(const shape& s, bool cm, std::uint64_t seed, int v)
      : side(v == 0 ? dw::ia3_side::output : dw::ia3_side::input), W(dwt::random(s.out, s.in, seed + 1), cm),
        l(vec<T>(v == 0 ? s.out : s.in, seed + 2, 0.5, 2.0)) {}
  auto gpu() { return dw::ia3(W.gpu(), l.gpu(), side); }
  auto cpu() { return dw::ia3(W.cpu(), l.cpu(), side); }
  std::vector<slot> slots() const { return {{1, l.m.rows}}; }
  twin<T>* own() { return &W; }
};

template <class T>
struct adalora_f {
  static constexpr const char* name = "adalora (variant 1: two pruned triplets, E_i = 0)";
  static constexpr int variants = 2;
  index_t out, in, r;
  twin<T> B, A;
  vtwin<T> E;
  bool column_slot;
  static MatD e_values(index_t r, std::uint64_t seed, int v) {
    MatD e = dwcuda::random_vec(r, seed);
    if (v == 1)
      for (index_t i = 0; i < r; i += 2) e(i, 0) = 0.0;
    return e;
  }
  adalora_f(const shape& s, bool cm, std::uint64_t seed, int v)
      : out(s.out), in(s.in), r(s.r), B(dwt::random(out, r, seed + 1), cm), A(dwt::random(r, in, seed + 2), !cm),
        E(e_values(r, seed + 3, v)), column_slot(cm) {}
  auto gpu() { return dw::adalora(B.gpu(), E.gpu(), A.gpu(), dw::alpha(8.0), r + 2); }
  auto cpu() { return dw::adalora(B.cpu(), E.cpu(), A.cpu(), dw::alpha(8.0), r + 2); }
  std::vector<slot> slots() const { return {{out, r}, dwcuda::vector_slot(r, column_slot), {r, in}}; }
  twin<T>* own() { return nullptr; }
};

template <class T>
struct bd_lora_f {
  static constexpr const char* name = "bd_lora (variant 0: A block-diagonal, 1: B)";
  static constexpr int variants = 2;
  dw::bd_side side;
  index_t blocks;
  twin<T> B, A;
  // r blocks when the side's dimension allows it (else 1: dense).
  static index_t count(const shape& s, int v) { return (v == 0 ? s.in : s.out) % s.r == 0 ? s.r : 1; }
  bd_lora_f(const shape& s, bool cm, std::uint64_t seed, int v)
      : side(v == 0 ? dw::bd_side::A : dw::bd_side::B), blocks(count(s, v)),
        B(dwt::random(s.out, v == 1 ? s.r / blocks : s.r, seed + 1), cm),
        A(dwt::random(s.r, v == 0 ? s.in / blocks : s.in, seed + 2), !cm) {}
  auto gpu() { return dw::bd_lora(B.gpu(), A.gpu(), side, blocks, dw::alpha(3.0)); }
  auto cpu() { return dw::bd_lora(B.cpu(), A.cpu(), side, blocks, dw::alpha(3.0)); }
  std::vector<slot> slots() const { return {{B.rows, B.cols}, {A.rows, A.cols}}; }
  twin<T>* own() { return nullptr; }
};

template <class T>
struct tinylora_f {
  static constexpr const char* name = "tinylora";
  static constexpr int variants = 1;
  static constexpr index_t u = 5;
  index_t out, in, r;
  twin<T> B, P, A;
  vtwin<T> v;
  bool column_slot;
  tinylora_f(const shape& s, bool cm, std::uint64_t seed, int)
      : out(s.out), in(s.in), r(s.r), B(dwt::random(out, r, seed + 1), cm), P(dwt::random(u, r * r, seed + 2), !cm),
        A(dwt::random(r, in, seed + 3), cm), v(vec<T>(u, seed + 4)), column_slot(!cm) {}
  auto gpu() { return dw::tinylora(B.gpu(), v.gpu(), P.gpu(), A.gpu(), dw::scale(0.8)); }
  auto cpu() { return dw::tinylora(B.cpu(), v.cpu(), P.cpu(), A.cpu(), dw::scale(0.8)); }
  std::vector<slot> slots() const { return {{out, r}, dwcuda::vector_slot(u, column_slot), {r, in}}; }
  twin<T>* own() { return nullptr; }
};

template <class T>
struct pvera_f {
  static constexpr const char* name = "pvera";
  static constexpr int variants = 1;
  index_t out, in, r;
  dw::vera_basis basis;
  vtwin<T> ld, lb;
  pvera_f(const shape& s, bool, std::uint64_t seed, int)
      : out(s.out), in(s.in), r(s.r), basis(dw::pvera_shared_basis(seed, s.r, s.out + 3, s.in + 2)),
        ld(vec<T>(2 * s.r, seed + 1)), lb(vec<T>(s.out, seed + 2)) {}
  auto gpu() { return dw::pvera(basis, out, in, ld.gpu(), lb.gpu()); }
  auto cpu() { return dw::pvera(basis, out, in, ld.cpu(), lb.cpu()); }
  std::vector<slot> slots() const { return {{1, 2 * r}, {1, out}}; }
  twin<T>* own() { return nullptr; }
};

/// Every shape × layout × variant of fixture F: check_update (vjp = false) or check_vjp.
template <class T, template <class> class F>
void cases(dw::cuda::context& ctx, std::uint64_t seed, bool vjp) {
  for (const shape& s : shapes) {
    for (bool cm : {false, true}) {
      for (int v = 0; v < F<T>::variants; ++v) {
        seed += 20;
        F<T> f(s, cm, seed, v);
        INFO(F<T>::name << ", variant " << v);
        if (vjp) dwcuda::check_vjp<T>(ctx, f.gpu(), f.cpu(), f.slots(), s.tokens, cm, seed);
        else dwcuda::check_update<T>(ctx, f.gpu(), f.cpu(), s.tokens, cm, seed, f.own());
      }
    }
  }
}

template <class T>
void all_cases(bool vjp) {
  dw::cuda::context ctx;
  const std::uint64_t seed = vjp ? 20000 : 10000;
  cases<T, loha_f>(ctx, seed, vjp);
  cases<T, ia3_f>(ctx, seed + 1000, vjp);
  cases<T, adalora_f>(ctx, seed + 2000, vjp);
  cases<T, bd_lora_f>(ctx, seed + 3000, vjp);
  cases<T, tinylora_f>(ctx, seed + 4000, vjp);
  cases<T, pvera_f>(ctx, seed + 5000, vjp);
}

}  // namespace cuda_lowrank_test

TEST_CASE_TEMPLATE("cuda: LoHa, IA³, AdaLoRA, BD-LoRA, TinyLoRA and PVeRA match the CPU backend", T, float, double) {
  cuda_lowrank_test::all_cases<T>(false);
}

TEST_CASE_TEMPLATE("cuda backward: LoHa, IA³, AdaLoRA, BD-LoRA, TinyLoRA and PVeRA gradients match the CPU backend", T,
                   float, double) {
  cuda_lowrank_test::all_cases<T>(true);
}

TEST_CASE_TEMPLATE("cuda: lazy sums of LoHa, IA³, AdaLoRA, BD-LoRA, TinyLoRA, PVeRA and LoRA match the CPU backend", T,
                   float, double) {
  // Block-scope names: other files of the one translation unit have a global `shape`.
  using cuda_lowrank_test::adalora_f, cuda_lowrank_test::bd_lora_f, cuda_lowrank_test::ia3_f, cuda_lowrank_test::loha_f,
      cuda_lowrank_test::pvera_f, cuda_lowrank_test::shape, cuda_lowrank_test::tinylora_f, cuda_lowrank_test::twin,
      cuda_lowrank_test::vec, cuda_lowrank_test::vtwin, dw::index_t, dwt::MatD;
  dw::cuda::context ctx;
  const shape s{12, 8, 4, 0};
  for (index_t tokens : {0, 1, 7}) {
    for (bool cm : {false, true}) {
      CAPTURE(tokens);
      CAPTURE(cm);
      const std::uint64_t seed = 30000 + std::uint64_t(tokens) * 100 + (cm ? 50 : 0);
      ia3_f<T> ia(s, cm, seed, 0);  // over W: the CPU uses IA³'s base hook, CUDA adds its ΔW
      auto& W = ia.W;
      loha_f<T> lh(s, !cm, seed + 10, 0);
      adalora_f<T> ad(s, cm, seed + 20, 1);
      bd_lora_f<T> bd(s, !cm, seed + 30, 0);
      tinylora_f<T> tl(s, cm, seed + 40, 0);
      pvera_f<T> pv(s, cm, seed + 50, 0);
      twin<T> X(dwt::random(tokens, s.in, seed + 60), !cm), B(dwt::random(s.out, 2, seed + 61), cm),
          A(dwt::random(2, s.in, seed + 62), !cm);
      auto Yg = dwcuda::nan_output<T>(tokens, s.out, cm), Yc = dwcuda::nan_output<T>(tokens, s.out, cm);
      dw::apply(ctx, W.gpu() + ia.gpu() + lh.gpu() + ad.gpu() + bd.gpu() + tl.gpu() + pv.gpu() +
                         dw::lora(B.gpu(), A.gpu(), dw::alpha(4.0)),
                X.gpu(), Yg.gpu());
      dw::apply(W.cpu() + ia.cpu() + lh.cpu() + ad.cpu() + bd.cpu() + tl.cpu() + pv.cpu() +
                    dw::lora(B.cpu(), A.cpu(), dw::alpha(4.0)),
                X.cpu(), Yc.cpu());
      CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= dwcuda::upd_cpu_tol<T>());
      // W + one of these and a type of the first CUDA set (input-side IA³ over W, VeRA).
      ia3_f<T> ii(s, cm, seed + 70, 1);
      const auto vb = dw::vera_shared_basis(seed, 3, s.out, s.in);
      const vtwin<T> vd(vec<T>(3, seed + 71)), vl(vec<T>(s.out, seed + 72));
      auto Zg = dwcuda::nan_output<T>(tokens, s.out, !cm), Zc = dwcuda::nan_output<T>(tokens, s.out, !cm);
      dw::apply(ctx, ii.W.gpu() + ii.gpu() + dw::vera(vb, s.out, s.in, vd.gpu(), vl.gpu()), X.gpu(), Zg.gpu());
      dw::apply(ii.W.cpu() + ii.cpu() + dw::vera(vb, s.out, s.in, vd.cpu(), vl.cpu()), X.cpu(), Zc.cpu());
      CHECK(dwt::rel_err(Zg.dev_d(), Zc.host_d()) <= dwcuda::upd_cpu_tol<T>());
    }
  }
  // IA³'s unmerge reads l on the host (an explicit download) and refuses an l = 0 before
  // writing anything, for either side, as on the CPU.
  for (int v = 0; v < 2; ++v) {
    ia3_f<T> f(s, v == 1, 31000 + std::uint64_t(v), v);
    MatD l0 = f.l.m.host_d();
    l0(1, 0) = 0.0;
    const vtwin<T> l(l0);
    const auto u = dw::ia3(f.W.gpu(), l.gpu(), f.side);
    dw::merge(ctx, f.W.gpu(), u);
    const MatD merged = f.W.dev_d();
    dwt::check_throws_with<dw::argument_error>([&] { dw::unmerge(ctx, f.W.gpu(), u); }, {"l[1] = 0"});
    CHECK((f.W.dev_d().array() == merged.array()).all());
  }
}

TEST_CASE("cuda: LoHa, IA³, AdaLoRA, BD-LoRA, TinyLoRA and PVeRA take no out × in scratch") {
  // out = in = 512, tokens = 8, float: a dense ΔW is 1 MiB.
  using cuda_lowrank_test::slot, cuda_lowrank_test::twin, cuda_lowrank_test::vec, cuda_lowrank_test::vtwin, dw::index_t,
      dwt::MatD;
  using T = float;
  const index_t out = 512, in = 512, r = 16, tokens = 8;
  const std::size_t dense_bytes = std::size_t(out * in) * sizeof(T);
  twin<T> W(dwt::random(out, in, 4));
  const auto run = [&](const std::string& name, const auto& u, const std::vector<slot>& slots,
                       std::size_t limit = 0) {
    if (limit == 0) limit = dense_bytes / 4;
    CAPTURE(name);
    const auto s = dwcuda::measure_scratch<T>(u, W, tokens, &slots);
    MESSAGE(name << ": scratch high-water (B):" << s.per_op << "; dense ΔW " << dense_bytes << " B");
    CAPTURE(s.per_op);
    CHECK(s.largest < dense_bytes);  // no single request of an out × in matrix
    CHECK(s.per_call > 0);
    CHECK(s.per_call < limit);  // apply, W + ΔW, apply_transposed, merge, unmerge, backward
    // The whole-ΔW operations work on panels of 32 K or 64 K entries: never one out × in.
    CHECK(s.whole < dense_bytes);
  };
  {
    // PEFT's default r = 8: the Khatri–Rao factors K_A [r², in] and K_B [out, r²] have
    // r² = 64 lines, each an eighth of ΔW at this size (1/64 at 4096²); apply holds both,
    // backward also dK_B: bounded by four such factors, independent of out × in.
    twin<T> B1(dwt::random(out, 8, 5)), A1(dwt::random(8, in, 6)), B2(dwt::random(out, 8, 7)), A2(dwt::random(8, in, 8));
    run("loha (r = 8)", dw::loha(B1.gpu(), A1.gpu(), B2.gpu(), A2.gpu(), dw::alpha(8.0)),
        {{out, 8}, {8, in}, {out, 8}, {8, in}}, 4 * std::size_t(64 * std::max(out, in)) * sizeof(T));
  }
  {
    const vtwin<T> lo(vec<T>(out, 9, 0.5, 2.0)), li(vec<T>(in, 10, 0.5, 2.0));
    run("ia3 (output)", dw::ia3(W.gpu(), lo.gpu(), dw::ia3_side::output), {{1, out}});
    run("ia3 (input)", dw::ia3(W.gpu(), li.gpu(), dw::ia3_side::input), {{1, in}});
  }
  twin<T> B(dwt::random(out, r, 11)), A(dwt::random(r, in, 12));
  {
    const vtwin<T> E(vec<T>(r, 13));
    run("adalora", dw::adalora(B.gpu(), E.gpu(), A.gpu(), dw::alpha(16.0), r), {{out, r}, {r, 1}, {r, in}});
  }
  {
    twin<T> Ab(dwt::random(r, in / 4, 14)), Bb(dwt::random(out, r / 4, 15));
    run("bd_lora (A, 4 blocks)", dw::bd_lora(B.gpu(), Ab.gpu(), dw::bd_side::A, 4, dw::alpha(16.0)),
        {{out, r}, {r, in / 4}});
    run("bd_lora (B, 4 blocks)", dw::bd_lora(Bb.gpu(), A.gpu(), dw::bd_side::B, 4, dw::alpha(16.0)),
        {{out, r / 4}, {r, in}});
  }
  {
    twin<T> P(dwt::random(13, r * r, 16));
    const vtwin<T> v(vec<T>(13, 17));
    run("tinylora", dw::tinylora(B.gpu(), v.gpu(), P.gpu(), A.gpu()), {{out, r}, {13, 1}, {r, in}});
  }
  {
    const auto basis = dw::pvera_shared_basis(18, 32, out, in);
    const vtwin<T> ld(vec<T>(64, 19)), lb(vec<T>(out, 20));
    run("pvera (r = 32)", dw::pvera(basis, out, in, ld.gpu(), lb.gpu()), {{1, 64}, {1, out}});
  }
}
