#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""deltaw's heterogeneous batch against PEFT's mixed-batch forward, the same requests, one run.

For each case (regime, N registered adapters, popularity law) of bench/bench_serve_regimes.cpp:

  1. deltaw: bench_serve_regimes (Eigen's products) and bench_serve_regimes_blas (OpenBLAS,
     one OpenBLAS thread) time X·Wᵀ ("base") and serve::apply_lora_batch ("batch") on the
     calling thread's CPU clock; the Eigen run also writes each case's request → adapter
     assignment (DELTAW_SERVE_ASSIGNMENTS).
  2. PEFT: one torch.nn.Linear(4096, 4096) under peft.get_peft_model with the same N adapters
     and ranks ({8, 16, 32, 64}[i mod 4], lora_alpha = 2r; peft_mixed_batch.py builds it),
     timed on the same clock with torch on one thread: the Linear alone ("base") and
     model(x, adapter_names=…) over exactly the requests deltaw served ("mixed").

Prints one row per case: medians in ms and the ratios batch / PEFT mixed (the issue's
≤ 0.85 goal) and batch / its own base (≤ 1.10); for the identical law also batch / the
single-adapter apply (≤ 1.02). --rounds repeats everything (deltaw, then
PEFT) to show the spread. Exits 0 with a "skipped" line without torch/peft or the binaries.

Usage: python3 bench/compare/serve_peft.py --bin-dir build/bench/bench
           [--cases 0/8/1 0/64/0 …] [--reps 9] [--deltaw-reps 3] [--rounds 1]
  a case is regime/adapters/popularity with regime 0 = decode 64×1, 1 = decode 256×1,
  2 = prefill 8×64 and popularity 0 distinct, 1 uniform, 2 Zipf(1), 3 identical.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peft_mixed_batch as pmb  # exits 0 with "skipped" when torch or peft is missing

import torch

REGIMES = ["decode 64x1", "decode 256x1", "prefill 8x64"]
LAWS = ["distinct", "uniform", "Zipf(1)", "identical"]
DEFAULT_CASES = ["0/8/1", "0/8/2", "0/64/0", "0/64/1", "0/64/2", "0/512/1", "1/64/1", "1/64/2",
                 "2/8/0", "2/8/1", "2/8/2", "2/64/1", "0/1/3", "2/1/3"]


def run_deltaw(binary, cases, env_extra, repetitions):
    """{case: {counter: median over the repetitions (each the median of 3 iterations)}}."""
    filt = "|".join(f"BM_regime/regime:{r}/adapters:{n}/popularity:{p}/" for r, n, p in cases)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **env_extra)
    out = subprocess.run([binary, f"--benchmark_filter={filt}", "--benchmark_format=json",
                          f"--benchmark_repetitions={repetitions}"],
                         env=env, check=True, capture_output=True, text=True).stdout
    runs = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("run_type", "iteration") != "iteration":
            continue
        parts = dict(kv.split(":") for kv in b["name"].split("/")[1:4])
        runs.setdefault((int(parts["regime"]), int(parts["adapters"]), int(parts["popularity"])), []).append(b)
    keys = ["base_ms", "batch_ms", "batch_base", "batch_single"]
    return {c: {k: statistics.median(b[k] for b in bs) for k in keys if k in bs[0]} for c, bs in runs.items()}


def run_peft(assignments, reps):
    """assignments: {case: (tokens per request, [adapter of each request])} → {case: (base, mixed)}."""
    torch.set_num_threads(1)
    pmb.CLOCK = time.thread_time
    out = {}
    by_n = {}
    for case, v in assignments.items():
        by_n.setdefault(case[1], []).append((case, v))
    for n, items in sorted(by_n.items()):
        model = pmb.build(n, 4096)
        with torch.no_grad():
            for case, (tpr, reqs) in items:
                torch.manual_seed(2)
                x = torch.randn(len(reqs) * tpr, 4096)
                names = [f"a{a}" for a in reqs for _ in range(tpr)]
                with model.disable_adapter():
                    base, _ = pmb.time_ms(lambda: model(x), reps)
                mixed, _ = pmb.time_ms(lambda: model(x, adapter_names=names), reps)
                out[case] = (base, mixed)
        del model
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True, help="the build's bench/ directory")
    ap.add_argument("--cases", nargs="*", default=DEFAULT_CASES)
    ap.add_argument("--reps", type=int, default=9, help="PEFT: timed calls per case")
    ap.add_argument("--deltaw-reps", type=int, default=3,
                    help="deltaw: benchmark repetitions per case (each the median of 3 paired iterations)")
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    cases = [tuple(int(v) for v in c.split("/")) for c in a.cases]
    binaries = [("eigen", os.path.join(a.bin_dir, "bench_serve_regimes")),
                ("blas", os.path.join(a.bin_dir, "bench_serve_regimes_blas"))]
    binaries = [(k, b) for k, b in binaries if os.path.exists(b)]
    if not binaries:
        print(f"serve_peft: skipped (no bench_serve_regimes in {a.bin_dir})")
        return
    print(f"torch {torch.__version__}, peft {pmb.peft.__version__}, one thread, thread CPU clock")
    for rnd in range(a.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            afile = os.path.join(tmp, "assignments.txt")
            res = {}
            for i, (kind, b) in enumerate(binaries):
                res[kind] = run_deltaw(b, cases, {"DELTAW_SERVE_ASSIGNMENTS": afile} if i == 0 else {},
                                       a.deltaw_reps)
            assignments = {}
            with open(afile) as f:
                for line in f:  # every repetition writes the same line
                    v = [int(t) for t in line.split()]
                    assignments[(v[0], v[1], v[2])] = (v[3], v[4:])
        peer = run_peft(assignments, a.reps)
        print(f"\nround {rnd + 1}: ms (medians); batch/PEFT = deltaw batch / PEFT mixed; /base = batch / own base")
        head = f"{'regime':13s} {'N':>5s} {'law':9s} {'used':>4s} | {'PEFT base':>9s} {'mixed':>7s} {'/base':>5s}"
        for kind, _ in binaries:
            head += f" | {kind + ' base':>10s} {'batch':>7s} {'/base':>5s} {'/PEFT':>5s}"
        print(head)
        for c in cases:
            if c not in peer:
                continue
            pb, pm = peer[c]
            row = f"{REGIMES[c[0]]:13s} {c[1]:5d} {LAWS[c[2]]:9s} {len(set(assignments[c][1])):4d} | {pb:9.2f} {pm:7.2f} {pm / pb:5.2f}"
            for kind, _ in binaries:
                r = res[kind][c]
                row += (f" | {r['base_ms']:10.2f} {r['batch_ms']:7.2f} {r['batch_base']:5.2f}"
                        f" {r['batch_ms'] / pm:5.2f}")
            if "batch_single" in res[binaries[0][0]][c]:  # identical: batch / deltaw::apply(W + ΔW, X)
                row += "   batch/single " + " ".join(f"{res[k][c]['batch_single']:.3f}" for k, _ in binaries)
            print(row)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
