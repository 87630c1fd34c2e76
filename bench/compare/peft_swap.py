#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""PEFT with and without deltaw's forward (python/deltaw_torch.swap_peft_forward), side by
side in one run: one Linear(SIZE, SIZE) adapted by each method (PEFT's own layers and
parameters), the adapter filled with non-zero random values, X [TOKENS, SIZE] fp32 on the
CPU, the same torch thread count for both (deltaw's own products run on one thread: the
extension is built without OpenMP, so the default is --threads 1).

Times, as the median of --reps runs after one warm-up:
  forward   eval mode, torch.no_grad(), y = model(x)
  train     train mode, zero_grad + forward + (y·w).sum().backward() (gradients of the adapter
            parameters and of x)
and the ratio PEFT / deltaw (> 1: the swap is faster). The base layer alone (y = x·Wᵀ) is the
reference line. Before timing, the swapped model's output is checked against PEFT's.

Default methods: lokr randlora vera miss bone_bat loha hira lora; also available: ia3 adalora
delora oft boft road shira hra.
Usage: python3 bench/compare/peft_swap.py [--methods lokr randlora ...] [--size 4096]
                                         [--tokens 128] [--threads 1] [--reps 5] [--build-dir DIR]
Exits 0 with a "skipped" line when torch or peft is not installed.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

try:
    import torch
    import peft
except ImportError:
    print("peft_swap: skipped (torch or peft is not installed)")
    sys.exit(0)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "python"))
import deltaw_torch  # noqa: E402

T = ["lin"]
METHODS = {
    # LoKr: w1 [64, 64] dense, w2 [64, 64] as w2_a·w2_b (r = 8); PEFT forms the dense ΔW.
    "lokr": lambda: peft.LoKrConfig(r=8, alpha=8, decompose_factor=64, target_modules=T),
    "loha": lambda: peft.LoHaConfig(r=8, alpha=8, target_modules=T),
    "randlora": lambda: peft.RandLoraConfig(r=32, target_modules=T),
    "vera": lambda: peft.VeraConfig(r=256, target_modules=T),
    "miss": lambda: peft.MissConfig(r=64, target_modules=T),
    "bone_bat": lambda: peft.MissConfig(r=64, init_weights="bat", target_modules=T),
    "ia3": lambda: peft.IA3Config(target_modules=T, feedforward_modules=[]),
    "lora": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=T),
    "adalora": lambda: peft.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=8, total_step=1000, target_modules=T),
    "hira": lambda: peft.HiraConfig(r=32, target_modules=T),
    "delora": lambda: peft.DeloraConfig(r=8, target_modules=T),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=32, target_modules=T),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=T),
    "road": lambda: peft.RoadConfig(variant="road_1", group_size=64, target_modules=T),
    "shira": lambda: peft.ShiraConfig(r=32, target_modules=T),
    # PEFT forms H [in, in] from r reflections and W·H at every forward: slow at 4096 (opt-in).
    "hra": lambda: peft.HRAConfig(r=8, target_modules=T),
}
DEFAULT = ["lokr", "randlora", "vera", "miss", "bone_bat", "loha", "hira", "lora"]


class Net(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = torch.nn.Linear(n, n, bias=False)

    def forward(self, x):
        return self.lin(x)


def median_ms(f, reps):
    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="*", default=DEFAULT, choices=list(METHODS))
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--build-dir", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    deltaw_torch.load(a.build_dir)
    n, g = a.size, torch.Generator().manual_seed(1)
    x = torch.randn(a.tokens, n, generator=g)
    wy = torch.randn(a.tokens, n, generator=g)
    print(f"# Linear({n}, {n}), x [{a.tokens}, {n}] fp32, torch threads {a.threads}, median of {a.reps}; "
          f"ratio = PEFT / deltaw")
    base = Net(n)
    with torch.no_grad():
        b_fwd = median_ms(lambda: base(x), a.reps)
    print(f"{'base x·Wᵀ':10s} forward {b_fwd:9.2f} ms")
    print(f"{'method':10s} {'fwd PEFT':>10s} {'fwd deltaw':>11s} {'ratio':>6s}   "
          f"{'train PEFT':>11s} {'train deltaw':>13s} {'ratio':>6s}")
    for name in a.methods:
        torch.manual_seed(0)
        model = peft.get_peft_model(Net(n), METHODS[name]())
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        xg = x.clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return model(x)

        def step():
            model.zero_grad(set_to_none=True)
            xg.grad = None
            (model(xg) * wy).sum().backward()

        model.eval()
        y_peft = fwd()
        f_peft = median_ms(fwd, a.reps)
        model.train()
        t_peft = median_ms(step, a.reps)
        deltaw_torch.swap_peft_forward(model)
        model.eval()
        err = float((fwd() - y_peft).norm() / y_peft.norm())
        if err > 1e-4:
            raise SystemExit(f"peft_swap: {name}: swapped output differs from PEFT's (rel {err:.2e})")
        f_dw = median_ms(fwd, a.reps)
        model.train()
        t_dw = median_ms(step, a.reps)
        deltaw_torch.restore(model)
        print(f"{name:10s} {f_peft:8.2f}ms {f_dw:9.2f}ms {f_peft / f_dw:5.2f}x   "
              f"{t_peft:9.2f}ms {t_dw:11.2f}ms {t_peft / t_dw:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
