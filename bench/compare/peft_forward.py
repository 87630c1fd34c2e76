#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""PEFT's own forward on torch (CPU, fp32) for one Linear(IN, OUT) adapted by a PEFT method:
the peer side of the deltaw apply benchmarks in bench/ (same shapes, same threads, same run).

Each method is a PEFT config built by METHODS[name](); the adapter's parameters are filled
with non-zero random values (PEFT initialises many of them to zero, which would let a method
skip work), the model is put in eval mode, and the forward of X [TOKENS, IN] is timed under
torch.no_grad(). Reference in the same run: the base layer alone (y = x·Wᵀ). Prints one line
per method: median and min in ms and the ratio median / base median.

Usage: python3 bench/compare/peft_forward.py [--methods loha oft ...] [--size 4096]
                                            [--tokens 512] [--threads 2] [--reps 9] [--json FILE]
Add a method: put a function returning its PEFT config into METHODS (target_modules=["lin"]).
Exits 0 with a "skipped" line when torch or peft is not installed.
"""
import argparse
import json
import statistics
import sys
import time

try:
    import torch
    import peft
except ImportError:
    print("peft_forward: skipped (torch or peft is not installed)")
    sys.exit(0)

T = ["lin"]

# name -> function returning a PEFT config for target_modules T. Keep defaults close to
# each method's paper/PEFT defaults; the deltaw benchmark of the same name uses the same sizes.
METHODS = {
    "lora": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=T),
    "loha": lambda: peft.LoHaConfig(r=8, alpha=8, target_modules=T),
    "ia3": lambda: peft.IA3Config(target_modules=T, feedforward_modules=[]),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=32, target_modules=T),
    # PEFT on a CPU builds BOFT with one butterfly factor whatever boft_n_butterfly_factor says.
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=T),
    "adalora": lambda: peft.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=8, total_step=1000, target_modules=T),
    "hra": lambda: peft.HRAConfig(r=8, target_modules=T),
    "lokr": lambda: peft.LoKrConfig(r=8, alpha=8, decompose_factor=64, target_modules=T),
    "vera": lambda: peft.VeraConfig(r=256, target_modules=T),
    "randlora": lambda: peft.RandLoraConfig(r=32, target_modules=T),
    "miss": lambda: peft.MissConfig(r=64, target_modules=T),
    "shira": lambda: peft.ShiraConfig(r=32, target_modules=T),
    "road": lambda: peft.RoadConfig(variant="road_1", group_size=64, target_modules=T),
    "hira": lambda: peft.HiraConfig(r=32, target_modules=T),
    "delora": lambda: peft.DeloraConfig(r=8, target_modules=T),
    "fourierft": lambda: peft.FourierFTConfig(n_frequency=1000, scaling=150.0, target_modules=T),
    "c3a": lambda: peft.C3AConfig(block_size=256, target_modules=T),
    "waveft": lambda: peft.WaveFTConfig(n_frequency=2592, scaling=25.0, target_modules=T),
    "gralora": lambda: peft.GraloraConfig(r=32, gralora_k=2, hybrid_r=8, alpha=64, target_modules=T),
    "unilora": lambda: peft.UniLoraConfig(r=4, theta_d_length=256, target_modules=T),
    # KaSA truncates W by a dense SVD when created (one-off; not timed here).
    "kasa": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=T, kasa_config=peft.tuners.lora.config.KasaConfig()),
    "bdlora_a": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=T, use_bdlora=peft.tuners.lora.config.BdLoraConfig(
        target_modules_bd_a=T, nblocks=4)),
    "bdlora_b": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=T, use_bdlora=peft.tuners.lora.config.BdLoraConfig(
        target_modules_bd_b=T, nblocks=4)),
    "tinylora": lambda: peft.TinyLoraConfig(r=2, u=64, target_modules=T),
    "vblora": lambda: peft.VBLoRAConfig(r=4, num_vectors=256, vector_length=256, topk=2, target_modules=T),
    "pvera": lambda: peft.PveraConfig(r=256, target_modules=T),
}


class Net(torch.nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.lin = torch.nn.Linear(n_in, n_out, bias=False)

    def forward(self, x):
        return self.lin(x)


def time_ms(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.randn(a.tokens, a.size)
    base = Net(a.size, a.size).eval()
    with torch.no_grad():
        b_med, b_min = time_ms(lambda: base(x), a.reps)
    print(f"# torch {torch.__version__}, peft {peft.__version__}, threads {a.threads}, "
          f"{a.tokens} x {a.size} -> {a.size}")
    print(f"base          median {b_med:9.2f} ms  min {b_min:9.2f} ms")
    rows = {"base": {"median_ms": b_med, "min_ms": b_min}}
    for name in a.methods:
        if name not in METHODS:
            sys.exit(f"peft_forward: unknown method {name!r} (known: {', '.join(METHODS)})")
        torch.manual_seed(1)
        model = peft.get_peft_model(Net(a.size, a.size), METHODS[name]())
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.02)
        model.eval()
        with torch.no_grad():
            med, mn = time_ms(lambda: model(x), a.reps)
        rows[name] = {"median_ms": med, "min_ms": mn, "ratio_to_base": med / b_med}
        print(f"{name:13s} median {med:9.2f} ms  min {mn:9.2f} ms  / base {med / b_med:6.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
