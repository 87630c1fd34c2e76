#!/usr/bin/env python3
"""PiSSA-style init with torch.svd_lowrank beside bench_init_spectral's pissa_randomized.

The same weight recipe as bench/bench_init_spectral.cpp (W = G/sqrt(n) + a planted rank-16
part; not bit-identical, the timing does not depend on the values), the same rank,
oversampling and power iterations: torch.svd_lowrank(W, q=r+oversampling, niter=4), then
A, B and W_res as PEFT's pissa_niter_4 forms them. Prints the median ms (wall and CPU) of the SVD
alone and of the whole init, in fp32 (PEFT's dtype for it) and in fp64 (deltaw's pissa()).

    OMP_NUM_THREADS=1 python3 bench/compare/svd_lowrank_torch.py --threads 1

Exits 0 with a message when torch is absent.
"""
import argparse
import statistics
import sys
import time

try:
    import torch
except ImportError:  # pragma: no cover - depends on the machine
    print("torch is not installed; skipping the torch.svd_lowrank comparison")
    sys.exit(0)


def make_weight(n, rank, dtype, gen):
    W = (torch.rand(n, n, generator=gen, dtype=dtype) * 2 - 1) / n ** 0.5
    U = torch.rand(n, rank, generator=gen, dtype=dtype) * 2 - 1
    V = torch.rand(n, rank, generator=gen, dtype=dtype) * 2 - 1
    U = U / U.norm(dim=0)
    V = V / V.norm(dim=0)
    U = U * (8.0 * (1.0 + torch.arange(rank, dtype=dtype) / 60.0))
    return W + U @ V.T


def pissa_init(W, r, oversampling, niter):
    # PEFT's pissa_niter_N: V, S, Uh = svd_lowrank(W, q, niter); keep the top r.
    U, S, V = torch.svd_lowrank(W, q=r + oversampling, niter=niter)
    U, S, V = U[:, :r], S[:r], V[:, :r]
    root = S.sqrt()
    A = root[:, None] * V.T
    B = U * root[None, :]
    W_res = W - B @ A
    return A, B, W_res


def median_ms(fn, reps):
    """Median wall and CPU (process) time in ms; with one thread the CPU time is the
    comparable figure on a machine shared with other work, as Google Benchmark's cpu_time."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--oversampling", type=int, default=10)
    p.add_argument("--niter", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, W {a.n}x{a.n}, r {a.rank}, "
          f"q = r + {a.oversampling}, niter {a.niter}, median of {a.reps}")
    for dtype in (torch.float32, torch.float64):
        gen = torch.Generator().manual_seed(20261130)
        W = make_weight(a.n, a.rank, dtype, gen)
        q = a.rank + a.oversampling
        svd_ms = median_ms(lambda: torch.svd_lowrank(W, q=q, niter=a.niter), a.reps)
        init_ms = median_ms(lambda: pissa_init(W, a.rank, a.oversampling, a.niter), a.reps)
        # accuracy of the top r against the exact SVD is not timed here (the C++ benchmark
        # reports it for deltaw); a sanity check that the sketch found the planted part:
        S = torch.svd_lowrank(W, q=q, niter=a.niter)[1][: a.rank]
        print(f"{str(dtype):14s} svd_lowrank {svd_ms[0]:8.1f} ms wall {svd_ms[1]:8.1f} ms cpu   "
              f"pissa init {init_ms[0]:8.1f} ms wall {init_ms[1]:8.1f} ms cpu   "
              f"sigma_1 {S[0].item():.4f} sigma_r {S[-1].item():.4f}")


if __name__ == "__main__":
    main()
