#!/usr/bin/env python3
"""Ratios of the foundation benchmarks (bench/bench_lora.cpp), each from ONE run's JSON.

Usage:
  bench_ratios.py RUN.json [RUN2.json ...] [--markdown] [--check]

Each file is the output of one run of bench_lora or bench_lora_blas with
--benchmark_out=RUN.json (or --benchmark_format=json > RUN.json), preferably with
--benchmark_repetitions=N (N >= 3) and --benchmark_enable_random_interleaving=true.
Every ratio is formed from the medians (over repetitions) of real_time within one file,
never across files, so drift between runs cancels. Files from different builds
(context key deltaw_build: eigen / blas) are shown side by side.

Printed per build and thread count t:
  lora_apply / base_gemm          target <= 1.03 (flop ideal 1 + r(in+out)/(in*out))
  lora_materialized / base_gemm   the naive strategy, for comparison
  lora_merge                      merge + unmerge of the update into W, in ms, and / base_gemm
  base_gemm vs openblas_sgemm     throughput of deltaw's base GEMM relative to a direct
                                  cblas_sgemm = t(openblas_sgemm) / t(base_gemm); the BLAS
                                  build's target is >= 0.95
--check exits with status 1 when a target is missed.
Plain Python 3, no third-party modules.
"""

import argparse
import json
import re
import statistics
import sys

TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
NAME = re.compile(r"^(?P<kind>[a-z_]+)/(?P<dims>[0-9/]+?)/threads:(?P<threads>\d+)$")

TARGET_LORA = 1.03
TARGET_BLAS = 0.95


def load(path):
    """Returns (context, {run_name: {"times": [ms...], "gflop": x}}) from one JSON run.

    The repetitions themselves are used when present; a run made with
    --benchmark_report_aggregates_only=true has only aggregates, and then its median is used.
    """
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    reps, medians = {}, {}
    for b in doc.get("benchmarks", []):
        if b.get("error_occurred"):
            continue
        name = b.get("run_name", b["name"])
        ms = b["real_time"] * TO_MS[b.get("time_unit", "ns")]
        cpu = b["cpu_time"] * TO_MS[b.get("time_unit", "ns")]
        if b.get("run_type", "iteration") == "iteration":
            e = reps.setdefault(name, {"times": [], "cpu": [], "gflop": b.get("GFLOP")})
            e["times"].append(ms)
            e["cpu"].append(cpu)
        elif b.get("aggregate_name") == "median":
            medians[name] = {"times": [ms], "cpu": [cpu], "gflop": b.get("GFLOP"),
                             "repetitions": b.get("repetitions", 1)}
    for name, e in medians.items():
        reps.setdefault(name, e)
    return doc.get("context", {}), reps


def parse(runs):
    """{(kind, threads): (median_ms, min_ms, max_ms, n, gflop, cpu_over_real)} with parsed names.

    cpu_over_real is the calling thread's CPU time over wall time (medians): about 1 when the
    benchmark had its cores to itself, well below 1 when other processes took them.
    """
    out = {}
    for name, e in runs.items():
        m = NAME.match(name)
        if not m:
            continue
        t = e["times"]
        n = e.get("repetitions", len(t))
        md = statistics.median(t)
        out[(m["kind"], int(m["threads"]))] = (md, min(t), max(t), n, e["gflop"], statistics.median(e["cpu"]) / md)
    return out


def fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def ratios(table, threads):
    def med(kind):
        v = table.get((kind, threads))
        return v[0] if v else None

    base, lora, mat, merge, blas = (med(k) for k in
                                    ("base_gemm", "lora_apply", "lora_materialized", "lora_merge", "openblas_sgemm"))
    div = lambda a, b: (a / b) if (a is not None and b) else None
    return {
        "base_ms": base,
        "lora_over_base": div(lora, base),
        "materialized_over_base": div(mat, base),
        "merge_ms": merge,
        "merge_over_base": div(merge, base),
        "base_vs_openblas": div(blas, base),
        "openblas_ms": blas,
    }


def describe(path, ctx, table):
    build = ctx.get("deltaw_build", "?")
    lines = [f"== {path}: build={build}, {ctx.get('date', '?')}, host={ctx.get('host_name', '?')}, "
             f"load_avg={ctx.get('load_avg', '?')}, lora_apply_rel_err={ctx.get('lora_apply_rel_err', '?')}"]
    lines.append(f"{'benchmark':<28}{'thr':>4}{'median ms':>11}{'min':>9}{'max':>9}{'reps':>5}{'GFLOP/s':>9}"
                 f"{'cpu/real':>9}")
    for (kind, t), (md, lo, hi, n, gf, cr) in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rate = (gf / (md * 1e-3)) if gf else None
        flag = "  <- contended?" if cr < 0.9 else ""
        lines.append(f"{kind:<28}{t:>4}{md:>11.2f}{lo:>9.2f}{hi:>9.2f}{n:>5}{fmt(rate, 1):>9}{cr:>9.2f}{flag}")
    return "\n".join(lines)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="JSON output of one benchmark run each")
    ap.add_argument("--markdown", action="store_true", help="print the docs/benchmarks.md table")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = ap.parse_args(argv)

    results = []  # (build, threads, ratios)
    for path in args.runs:
        ctx, runs = load(path)
        table = parse(runs)
        if not table:
            print(f"{path}: no foundation benchmarks found", file=sys.stderr)
            return 2
        if not args.markdown:
            print(describe(path, ctx, table))
            reps = min(v[3] for v in table.values())
            if reps < 3:
                print(f"  note: only {reps} repetition(s); use --benchmark_repetitions=5 or more")
            print()
        for t in sorted({t for (_, t) in table}):
            results.append((ctx.get("deltaw_build", "?"), t, ratios(table, t)))

    missed = []
    header = ("| build | threads | base_gemm ms | lora_apply / base_gemm | lora_materialized / base_gemm "
              "| merge+unmerge ms (/ base_gemm) | base_gemm vs openblas_sgemm |")
    print(header)
    print("|---|---|---|---|---|---|---|")
    for build, t, r in results:
        print(f"| {build} | {t} | {fmt(r['base_ms'], 1)} | {fmt(r['lora_over_base'])} | "
              f"{fmt(r['materialized_over_base'])} | {fmt(r['merge_ms'], 1)} ({fmt(r['merge_over_base'])}) | "
              f"{fmt(r['base_vs_openblas'])} |")
        if r["lora_over_base"] is not None and r["lora_over_base"] > TARGET_LORA:
            missed.append(f"{build}, {t} thread(s): lora_apply / base_gemm = {r['lora_over_base']:.3f} > {TARGET_LORA}")
        if build == "blas" and r["base_vs_openblas"] is not None and r["base_vs_openblas"] < TARGET_BLAS:
            missed.append(f"blas, {t} thread(s): base_gemm throughput = {r['base_vs_openblas']:.3f} of OpenBLAS "
                          f"< {TARGET_BLAS}")
    if not args.markdown:
        print()
        print(f"targets: lora_apply / base_gemm <= {TARGET_LORA} (flop ideal 1.0078 for 4096x4096, r=16); "
              f"blas build base_gemm >= {TARGET_BLAS} of openblas_sgemm throughput")
        print("missed: " + ("; ".join(missed) if missed else "none"))
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
