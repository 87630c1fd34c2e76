#!/usr/bin/env python3
"""The step of bench/bench_train_step.cpp in PyTorch (CPU, fp32), same shapes and threads.

A frozen nn.Linear-like weight W [4096, 4096] (requires_grad=False), LoRA B [4096, 16],
A [16, 4096] (s = 32/16), 512 tokens; x requires its gradient; loss = MSE against a
target; backward; AdamW on A and B (foreach off); zero_grad. Reference in the same run:
y = x·Wᵀ and dx = dy·W (the two GEMMs). Prints medians and min of each and their ratios.

Usage: python3 bench/compare/torch_train_step.py [--threads 1 2] [--reps 15]
       python3 bench/compare/torch_train_step.py --rss-steps 3
The second form runs N training steps with one thread and no two_gemms buffers, and prints
the peak resident memory (VmHWM) above what the process held before any tensor existed:
the counterpart of `bench_train_step --rss_steps=N`.
Exits 0 with a "skipped" line when torch is not installed.
"""
import argparse
import statistics
import sys
import time

try:
    import torch
except ImportError:  # torch is optional: skip cleanly
    print("torch_train_step: skipped (torch is not installed)")
    sys.exit(0)

OUT = IN = 4096
TOKENS, RANK, ALPHA = 512, 16, 32.0


def once(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_rss_mib():
    """VmHWM (peak resident set so far) in MiB, from /proc/self/status; -1 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return -1.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rss-steps", type=int, default=0)
    args = ap.parse_args()
    if args.rss_steps:
        torch.set_num_threads(1)
        torch.ones(1) @ torch.ones(1, 1)  # load the kernels before measuring the start-up
    startup = peak_rss_mib()

    g = torch.Generator().manual_seed(20240611)
    # uniform in [-1, 1), made in place so that no temporary raises the peak RSS
    W = torch.rand(OUT, IN, generator=g).mul_(2).sub_(1).div_(IN ** 0.5)  # frozen
    X = torch.rand(TOKENS, IN, generator=g).mul_(2).sub_(1)
    target = torch.rand(TOKENS, OUT, generator=g).mul_(2).sub_(1)
    B = torch.nn.Parameter((torch.rand(OUT, RANK, generator=g) * 2 - 1) * 0.01)
    A = torch.nn.Parameter((torch.rand(RANK, IN, generator=g) * 2 - 1) / IN ** 0.5)
    s = ALPHA / RANK
    opt = torch.optim.AdamW([B, A], lr=1e-4, weight_decay=0.0, foreach=False)
    dY = None if args.rss_steps else torch.rand(TOKENS, OUT, generator=g).mul_(2).sub_(1)

    def train_step():
        x = X.detach().requires_grad_(True)
        y = x @ W.t() + s * ((x @ A.t()) @ B.t())
        loss = torch.nn.functional.mse_loss(y, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return x.grad

    def two_gemms():
        y = X @ W.t()
        dx = dY @ W
        return y, dx

    print(f"torch {torch.__version__}, W [{OUT}, {IN}] fp32 frozen, LoRA r = {RANK}, {TOKENS} tokens")
    if args.rss_steps:
        for i in range(args.rss_steps):
            train_step()
            print(f"step {i}: peak RSS so far {peak_rss_mib():.2f} MiB")
        peak = peak_rss_mib()
        print(f"peak RSS {peak:.2f} MiB, of which {startup:.2f} MiB before any tensor existed; "
              f"peak - startup = {peak - startup:.2f} MiB")
        return
    for th in args.threads:
        torch.set_num_threads(th)
        train_step()  # warm-up (allocates AdamW state)
        with torch.no_grad():
            two_gemms()
        # interleave the two so that machine load affects both alike
        ts, tg = [], []
        for _ in range(args.reps):
            ts.append(once(train_step))
            with torch.no_grad():
                tg.append(once(two_gemms))
        ms, mg = statistics.median(ts) * 1e3, statistics.median(tg) * 1e3
        print(f"threads {th}: torch_train_step median {ms:8.1f} ms (min {min(ts) * 1e3:8.1f}), "
              f"torch_two_gemms median {mg:8.1f} ms (min {min(tg) * 1e3:8.1f}); "
              f"ratio median {ms / mg:.3f}, min {min(ts) / min(tg):.3f}")


if __name__ == "__main__":
    main()
