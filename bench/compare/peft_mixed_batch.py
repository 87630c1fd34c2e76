#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""PEFT's mixed-batch forward on torch (CPU, fp32): the peer of bench/bench_serve.cpp.

One torch.nn.Linear(SIZE, SIZE, bias=False) under peft.get_peft_model with N LoRA adapters
"a0" … "a{N-1}" of ranks {8, 16, 32, 64}[i mod 4] (lora_alpha = 2r, lora_B filled with
small random values: PEFT initialises it to zero), X [TOKENS, SIZE], each token's adapter
drawn uniformly or by Zipf(1.0) popularity, as bench_serve draws them. Timed under
torch.no_grad(), in the same session:

  base     the Linear alone (PEFT's adapters disabled)
  mixed    model(x, adapter_names=[…]): PEFT's mixed-batch forward (one sub-batch per adapter)
  serial   one adapter at a time: set_adapter(a) and forward of that adapter's tokens, for
           every adapter in use (a server that does not batch across adapters)

Prints one line per case: median and min in ms and the ratio median / base median.

Usage: python3 bench/compare/peft_mixed_batch.py [--adapters 8 64 512] [--tokens 512]
                                                 [--size 4096] [--threads 2] [--reps 5]
       [--requests R --tokens-per-request T] [--laws distinct uniform zipf identical]
       [--no-serial] [--clock wall|thread]

With --requests, the batch is R requests of T consecutive tokens each, every request on
one adapter drawn by the laws of bench/bench_serve_regimes.cpp (distinct: request i on
its own adapter; identical: all on adapter a1); --laws picks them (default uniform zipf).
Exits 0 with a "skipped" line when torch or peft is not installed.
"""
import argparse
import statistics
import sys
import time

try:
    import numpy as np
    import torch
    import peft
except ImportError:
    print("peft_mixed_batch: skipped (torch, numpy or peft is not installed)")
    sys.exit(0)

RANKS = [8, 16, 32, 64]


class Net(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = torch.nn.Linear(n, n, bias=False)

    def forward(self, x):
        return self.lin(x)


CLOCK = time.perf_counter  # --clock thread: time.thread_time (this thread's CPU time)


def time_ms(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        ts.append((CLOCK() - t0) * 1e3)
    return statistics.median(ts), min(ts)


def assignment(tokens, n, zipf, seed=7):
    g = np.random.default_rng(seed)
    if not zipf:
        return g.integers(0, n, size=tokens)
    w = 1.0 / np.arange(1, n + 1)
    perm = g.permutation(n)
    return perm[g.choice(n, size=tokens, p=w / w.sum())]


def request_assignment(requests, per_request, n, law, seed=11):
    """Adapter of each token for `requests` requests of `per_request` tokens each."""
    g = np.random.default_rng(seed)
    if law == "distinct":
        a = g.permutation(n)[:requests]
    elif law == "identical":
        a = np.full(requests, min(1, n - 1))
    else:
        a = assignment(requests, n, law == "zipf", seed)
    return np.repeat(a, per_request)


def build(n, size):
    torch.manual_seed(0)
    net = Net(size)
    cfg = lambda r: peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], init_lora_weights=True)
    model = peft.get_peft_model(net, cfg(RANKS[0]), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg(RANKS[i % 4]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.uniform_(-0.01, 0.01)
    model.eval()
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", nargs="*", type=int, default=[8, 64, 512])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--requests", type=int, default=0)
    ap.add_argument("--tokens-per-request", type=int, default=1)
    ap.add_argument("--laws", nargs="*", default=["uniform", "zipf"],
                    choices=["distinct", "uniform", "zipf", "identical"])
    ap.add_argument("--no-serial", action="store_true")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: the calling thread's CPU time (with --threads 1, all of torch's work)")
    a = ap.parse_args()
    global CLOCK
    if a.clock == "thread":
        CLOCK = time.thread_time
    if a.requests > 0:
        a.tokens = a.requests * a.tokens_per_request
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, peft {peft.__version__}, threads {torch.get_num_threads()}, "
          f"Linear({a.size}, {a.size}), tokens {a.tokens}")
    x = torch.randn(a.tokens, a.size)
    for n in a.adapters:
        t0 = time.perf_counter()
        model = build(n, a.size)
        print(f"# {n} adapters built in {time.perf_counter() - t0:.1f} s")
        with torch.no_grad():
            with model.disable_adapter():
                base, base_min = time_ms(lambda: model(x), a.reps)
            print(f"N={n:4d} base          median {base:9.2f} ms  min {base_min:9.2f} ms  1.00x")
            for dist in a.laws:
                if dist == "distinct" and (a.requests or a.tokens) > n:
                    continue
                if a.requests > 0:
                    idx = request_assignment(a.requests, a.tokens_per_request, n, dist)
                elif dist in ("uniform", "zipf"):
                    idx = assignment(a.tokens, n, dist == "zipf")
                else:
                    idx = request_assignment(a.tokens, 1, n, dist)
                names = [f"a{i}" for i in idx]
                med, mn = time_ms(lambda: model(x, adapter_names=names), a.reps)
                print(f"N={n:4d} {dist:7s} mixed  median {med:9.2f} ms  min {mn:9.2f} ms  {med / base:.2f}x")
                if a.no_serial:
                    continue
                groups = {int(i): np.nonzero(idx == i)[0] for i in np.unique(idx)}

                def serial():
                    for i, rows in groups.items():
                        model.set_adapter(f"a{i}")
                        model(x[torch.from_numpy(rows)])

                med, mn = time_ms(serial, max(1, a.reps // 2))
                print(f"N={n:4d} {dist:7s} serial median {med:9.2f} ms  min {mn:9.2f} ms  {med / base:.2f}x")
        del model


if __name__ == "__main__":
    main()
