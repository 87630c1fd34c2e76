#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""deltaw inside PyTorch (python/deltaw_torch): for each PEFT type the extension swaps
(LoKr with every dense / low-rank factor pairing, MiSS default / mini / Bone bat, VeRA,
RandLoRA, LoHa, IA³ on both sides, LoRA, AdaLoRA, HiRA, DeLoRA, OFT (Cayley–Neumann, exact
Cayley, COFT with block_share), HRA (plain and Gram–Schmidt), BOFT, RoAd 1/2/4, SHiRA), a small
model with odd layer shapes (out > in and out < in, in not a multiple of MiSS's r) and
random non-zero adapter weights is run by
PEFT 0.21.2 and then with swap_peft_forward: the outputs, the gradient of the input and the
gradient of every trainable PEFT parameter must agree to ≤ 1e-5 relative (fp32), deltaw
must actually have run (its call counters), and restore() must give PEFT's forward back.
Also: the direct functions against ΔW formed in double (LoKr with a transposed,
non-contiguous x; RandLoRA over stored bases in both orientations; x·ΔWᵀ and g·ΔW), the
refusals (float64, a wrong feature count, a missing factor, deltaw's own shape error), and
the fallbacks to PEFT's forward (float64 input, DoRA).

Exits 77 (skipped, reason printed) when torch or peft is missing, or when no C++ compiler
or ninja is there to build the extension.
Usage: check_peft_swap.py [--build-dir DIR]"""
import argparse
import os
import shutil
import sys
from pathlib import Path

SKIP = 77
TOL = 1e-5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build-dir", default=None)
    a = ap.parse_args()
    try:
        import torch
        import peft
    except Exception as e:  # noqa: BLE001
        print(f"SKIPPED: torch / peft missing ({e})")
        sys.exit(SKIP)
    if shutil.which("ninja") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        print("SKIPPED: ninja or a C++ compiler missing (needed to build the extension)")
        sys.exit(SKIP)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import deltaw_torch as dwt

    dwt.load(a.build_dir)
    torch.set_num_threads(1)
    failures = []
    checks = 0

    def rel(a_, b_):
        a_, b_ = a_.double(), b_.double()
        return float((a_ - b_).norm() / max(float(b_.norm()), 1e-30))

    def expect(cond, what):
        nonlocal checks
        checks += 1
        if not cond:
            failures.append(what)
            print("FAIL:", what)

    # ── direct functions against dense references ─────────────────────────────────────
    g = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w1, w2 = rnd(3, 2), rnd(5, 7)  # out 15, in 14
    xt = rnd(14, 6).t()  # [6, 14], non-contiguous
    dW = 0.7 * torch.kron(w1, w2)
    y = dwt.apply(dwt.LOKR_DD, xt, [w1, w2], 0.7, 15, 14)
    expect(rel(y, xt.double() @ dW.double().t()) < TOL, "apply lokr vs dense, transposed x")
    gg = rnd(6, 15)
    o = dwt.apply_transposed(dwt.LOKR_DD, gg, [w1, w2], 0.7, 15, 14)
    expect(rel(o, gg.double() @ dW.double()) < TOL, "apply_transposed lokr vs dense")
    for bad, exc, word in ((xt.double(), TypeError, "float32"), (rnd(6, 13), ValueError, "in_features")):
        try:
            dwt.apply(dwt.LOKR_DD, bad, [w1, w2], 0.7, 15, 14)
            expect(False, f"refusal of a bad input ({word})")
        except exc as e:
            expect(word in str(e) and "deltaw_torch.apply" in str(e), f"refusal names the problem: {e}")
    try:
        dwt.apply(dwt.LOKR_DD, xt, [w1], 0.7, 15, 14)
        expect(False, "refusal of a missing factor")
    except ValueError as e:
        expect("takes 2 factors" in str(e), f"missing factor message: {e}")
    # A deltaw error (shape mismatch inside the update) surfaces as RuntimeError naming deltaw.
    try:
        dwt.apply(dwt.LOW_RANK, rnd(4, 9), [rnd(5, 2), rnd(3, 9)], 1.0, 5, 9)
        expect(False, "refusal of B, A with different ranks")
    except RuntimeError as e:
        expect("deltaw" in str(e), f"deltaw error message: {e}")

    # RandLoRA over stored bases, both orientations, against ΔW formed in double.
    for out_f, in_f in ((13, 7), (7, 13)):
        r_, mn, mx = 3, min(out_f, in_f), max(out_f, in_f)
        N = -(-mn // r_)
        U, A = rnd(mx, N * r_), rnd(r_, mn)
        lam, gam = rnd(r_, N), rnd(N, mn)
        V = (lam.double()[:, :, None] * A.double()[:, None, :] * gam.double()[None]).reshape(N * r_, mn)
        D = 0.6 * U.double() @ V
        D = D if out_f >= in_f else D.t()
        xr, gr = rnd(5, in_f), rnd(5, out_f)
        f4 = [U, A, lam, gam]
        expect(rel(dwt.apply(dwt.RANDLORA, xr, f4, 0.6, out_f, in_f), xr.double() @ D.t()) < TOL,
               f"apply randlora [{out_f}, {in_f}] vs dense")
        expect(rel(dwt.apply_transposed(dwt.RANDLORA, gr, f4, 0.6, out_f, in_f), gr.double() @ D) < TOL,
               f"apply_transposed randlora [{out_f}, {in_f}] vs dense")

    # ── PEFT models ───────────────────────────────────────────────────────────────────
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self, dims):
            super().__init__()
            self.q = nn.Linear(dims[0], dims[1])
            self.k = nn.Linear(dims[1], dims[2])
            self.v = nn.Linear(dims[2], dims[3], bias=False)

        def forward(self, x):
            return self.v(torch.tanh(self.k(torch.nn.functional.gelu(self.q(x)))))

    from peft import (AdaLoraConfig, BOFTConfig, DeloraConfig, HiraConfig, HRAConfig, IA3Config, LoHaConfig,
                      LoKrConfig, LoraConfig, MissConfig, OFTConfig, RandLoraConfig, RoadConfig, ShiraConfig,
                      VeraConfig,
                      get_peft_model)

    tm = ["q", "k", "v"]
    odd = (14, 22, 9, 15)   # out > in, out < in, in % 4 != 0
    by3 = (12, 18, 15, 9)   # Bone bat needs out % r == 0 and in % r == 0
    cases = [
        ("lokr dense", odd, LoKrConfig(r=2, alpha=3, target_modules=tm, init_weights=False)),
        ("lokr decompose_both", (16, 24, 20, 12), LoKrConfig(r=1, alpha=2, target_modules=tm, decompose_both=True,
                                                              init_weights=False)),
        ("lokr decompose_factor", (16, 24, 20, 12), LoKrConfig(r=2, alpha=3, target_modules=tm, decompose_both=True,
                                                                decompose_factor=8, init_weights=False)),
        ("lokr rank_pattern", (16, 24, 20, 12), LoKrConfig(r=2, alpha=5, target_modules=tm, decompose_both=True,
                                                            rank_pattern={"k": 8}, init_weights=False)),
        ("miss", odd, MissConfig(r=4, target_modules=tm)),
        ("miss mini", by3, MissConfig(r=4, mini_r=3, init_weights="mini", target_modules=tm)),
        ("bone bat", by3, MissConfig(r=3, init_weights="bat", target_modules=tm)),
        ("vera", odd, VeraConfig(r=4, target_modules=tm)),
        ("randlora", odd, RandLoraConfig(r=3, randlora_alpha=6, target_modules=tm)),
        ("randlora sparse", odd, RandLoraConfig(r=4, randlora_alpha=4, sparse=True, target_modules=tm)),
        ("loha", odd, LoHaConfig(r=3, alpha=5, target_modules=tm, init_weights=False)),
        ("ia3", odd, IA3Config(target_modules=tm, feedforward_modules=["k"])),
        ("lora", odd, LoraConfig(r=3, lora_alpha=5, target_modules=tm)),
        ("adalora", odd, AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, total_step=10, target_modules=tm)),
        ("hira", odd, HiraConfig(r=3, target_modules=tm)),
        ("delora", odd, DeloraConfig(r=3, target_modules=tm)),
        ("oft cayley-neumann", by3, OFTConfig(r=0, oft_block_size=3, target_modules=tm)),
        ("oft exact cayley", by3, OFTConfig(r=0, oft_block_size=3, use_cayley_neumann=False, target_modules=tm)),
        ("oft coft block_share", by3, OFTConfig(r=0, oft_block_size=3, coft=True, block_share=True,
                                                target_modules=tm)),
        ("hra", odd, HRAConfig(r=4, target_modules=tm)),
        ("hra gram-schmidt", odd, HRAConfig(r=3, apply_GS=True, target_modules=tm)),
        ("boft", by3, BOFTConfig(boft_block_size=3, boft_n_butterfly_factor=1, target_modules=tm)),
        ("road_1", (12, 18, 12, 6), RoadConfig(variant="road_1", group_size=6, target_modules=tm)),
        ("road_2", (12, 18, 12, 6), RoadConfig(variant="road_2", group_size=6, target_modules=tm)),
        ("road_4", (12, 18, 12, 6), RoadConfig(variant="road_4", group_size=6, target_modules=tm)),
        ("shira", odd, ShiraConfig(r=2, target_modules=tm)),
    ]
    kinds_seen = set()
    for name, dims, cfg in cases:
        torch.manual_seed(11)
        model = get_peft_model(Net(dims), cfg)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(13)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
        model.train()
        x0 = torch.randn(2, 5, dims[0], generator=gen)
        wy = torch.randn(2, 5, dims[3], generator=gen)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

        def run():
            model.zero_grad(set_to_none=True)
            x = x0.clone().requires_grad_(True)
            y = model(x)
            (y * wy).sum().backward()
            return y.detach(), x.grad.detach(), {n: p.grad.detach().clone() for n, p in params}

        y_ref, dx_ref, g_ref = run()
        f0, b0 = dwt.stats["forward"], dwt.stats["backward"]
        swapped = dwt.swap_peft_forward(model)
        expect(len(swapped) == 3, f"{name}: three layers swapped (got {swapped})")
        y_dw, dx_dw, g_dw = run()
        expect(dwt.stats["forward"] - f0 == 3 and dwt.stats["backward"] - b0 == 3,
               f"{name}: deltaw ran forward and backward on each layer "
               f"({dwt.stats['forward'] - f0}, {dwt.stats['backward'] - b0})")
        worst = rel(y_dw, y_ref)
        expect(worst <= TOL, f"{name}: output rel err {worst:.2e}")
        e = rel(dx_dw, dx_ref)
        expect(e <= TOL, f"{name}: input gradient rel err {e:.2e}")
        worst = max(worst, e)
        for n, _ in params:
            expect(g_ref[n].norm() > 0, f"{name}: PEFT's gradient of {n} is non-zero")
            e = rel(g_dw[n], g_ref[n])
            expect(e <= TOL, f"{name}: gradient of {n} rel err {e:.2e}")
            worst = max(worst, e)
        # Which LoKr factor pairing each layer used.
        for _, m in model.named_modules():
            if hasattr(m, "lokr_w1"):
                for ad in m.active_adapters:
                    kinds_seen.add((ad in m.lokr_w1, ad in m.lokr_w2))
        restored = dwt.restore(model)
        expect(sorted(restored) == sorted(swapped), f"{name}: restore gives every layer back")
        y_back, _, _ = run()
        expect(torch.equal(y_back, y_ref), f"{name}: PEFT's own forward after restore")
        print(f"{name:22s} {len(params)} trainable tensors, worst relative error {worst:.2e}")
    expect(len(kinds_seen) == 4, f"LoKr factor pairings covered: {sorted(kinds_seen)} (want all 4)")

    # Fallback: float64 inputs go to PEFT's forward (no deltaw call), unchanged results.
    torch.manual_seed(3)
    m64 = get_peft_model(Net(odd), LoKrConfig(r=2, target_modules=tm, init_weights=False)).double()
    x64 = torch.randn(3, odd[0], dtype=torch.float64)
    y64 = m64(x64)
    dwt.swap_peft_forward(m64)
    f0 = dwt.stats["forward"]
    expect(torch.equal(m64(x64), y64) and dwt.stats["forward"] == f0, "float64 input falls back to PEFT")

    # LoRA variants (DoRA) are PEFT's: swapped layers fall back, results unchanged.
    torch.manual_seed(4)
    md = get_peft_model(Net(odd), LoraConfig(r=2, use_dora=True, target_modules=tm))
    x32 = torch.randn(3, odd[0])
    yd = md(x32)
    dwt.swap_peft_forward(md)
    f0 = dwt.stats["forward"]
    expect(torch.equal(md(x32), yd) and dwt.stats["forward"] == f0, "DoRA falls back to PEFT")

    print(f"{checks} checks, {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
