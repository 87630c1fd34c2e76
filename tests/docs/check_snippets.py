#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Every ```cpp block of README.md and docs/*.md compiles.

Each block is preceded by a marker comment, invisible when the Markdown is rendered:

  <!-- compile: file -->    the block is a whole translation unit (a program, a list of
                            includes): compiled as it stands;
  <!-- compile: NAME -->    a fragment: its #include lines go to the top, then
                            tests/docs/harness/NAME.hpp (the variables the fragment uses,
                            declared with the types the prose gives them), and the rest of
                            the block becomes the body of a function (the fragments of one
                            harness share a translation unit, each in its own function);
  <!-- compile: cuda NAME --> the same, compiled by nvcc as CUDA; skipped (and said so)
                            when no CUDA compiler was configured.

A cpp block without a marker, or with a harness that does not exist, fails the check, so
that no snippet escapes it. `#line` directives make the compiler's messages point at the
Markdown file and line. The compile flags are deltaw::deltaw's (CONFIG, a JSON file written
by tests/repo.cmake); templates are instantiated, so -fsyntax-only catches what a build would.
"""
import argparse, concurrent.futures, glob, json, os, re, subprocess, sys, time

MARK = re.compile(r"<!--\s*compile:\s*(cuda\s+)?([A-Za-z0-9_-]+)\s*-->")


def blocks(path):
    lines = open(path, encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
        if lines[i].strip().startswith("```cpp"):
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            m = MARK.search(lines[k]) if k >= 0 else None
            yield i + 2, lines[i + 1:j], (m.group(2), bool(m.group(1))) if m else None
            i = j
        i += 1


def fragment_tu(fragments, harness, harness_dir):
    """One translation unit for every fragment that uses `harness`: their #include lines at
    the top, the harness, then each fragment as the body of its own function. #line
    directives point every line at its Markdown file and line."""
    out = []
    for md, first, body in fragments:
        for n, l in enumerate(body):
            if l.lstrip().startswith("#include"):
                out += [f'#line {first + n} "{os.path.abspath(md)}"', l]
    out.append(f'#include "{os.path.join(harness_dir, harness + ".hpp")}"')
    for k, (md, first, body) in enumerate(fragments):
        out.append(f"[[maybe_unused]] static void deltaw_doc_snippet_{k}() {{")
        for n, l in enumerate(body):
            if not l.lstrip().startswith("#include"):
                out += [f'#line {first + n} "{os.path.abspath(md)}"', l]
        out.append("}")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    cfg = json.load(open(a.config))
    # CMake's include lists repeat directories and hold the compiler's own (-I/usr/include
    # would break #include_next in the C++ library's headers): keep each once, drop those.
    implicit = {os.path.normpath(d) for d in cfg.get("implicit", []) if d}
    for key in ("cxx_flags", "cuda_flags"):
        kept = []
        for f in cfg.get(key, []):
            if f.startswith("-I") and (os.path.normpath(f[2:]) in implicit or f in kept or f == "-I"):
                continue
            kept.append(f)
        cfg[key] = kept
    harness_dir = os.path.join(a.source_dir, "tests", "docs", "harness")
    os.makedirs(a.work_dir, exist_ok=True)
    mds = [os.path.join(a.source_dir, "README.md")] + sorted(glob.glob(os.path.join(a.source_dir, "docs", "*.md")))
    jobs, problems, skipped = [], [], []
    groups = {}  # (harness, cuda) -> [(md, first line, body, where)]
    blocks_seen = 0
    for md in mds:
        rel = os.path.relpath(md, a.source_dir)
        for first, body, mark in blocks(md):
            where = f"{rel}:{first - 1}"
            if mark is None:
                problems.append(f"{where}: a ```cpp block without a <!-- compile: ... --> marker before it")
                continue
            harness, cuda = mark
            if harness != "file" and not os.path.exists(os.path.join(harness_dir, harness + ".hpp")):
                problems.append(f"{where}: harness '{harness}' does not exist (tests/docs/harness/{harness}.hpp)")
                continue
            if cuda and not cfg.get("cuda_compiler"):
                skipped.append(f"{where} (CUDA; no CUDA compiler configured)")
                continue
            blocks_seen += 1
            if harness == "file":  # a whole translation unit: compiled alone
                stem = re.sub(r"[^A-Za-z0-9]", "_", rel) + f"_{first - 1}"
                src = os.path.join(a.work_dir, stem + (".cu" if cuda else ".cpp"))
                with open(src, "w", encoding="utf-8") as f:
                    f.write(f'#line {first} "{os.path.abspath(md)}"\n' + "\n".join(body) + "\n")
                jobs.append((where, src, cuda))
            else:
                groups.setdefault((harness, cuda), []).append((md, first, body, where))
    for (harness, cuda), frags in sorted(groups.items()):
        src = os.path.join(a.work_dir, f"harness_{harness}" + (".cu" if cuda else ".cpp"))
        with open(src, "w", encoding="utf-8") as f:
            f.write(fragment_tu([(md, first, body) for md, first, body, _ in frags], harness, harness_dir))
        jobs.append((", ".join(w for *_, w in frags), src, cuda))
    jobs = [(where, ([cfg["cuda_compiler"]] + cfg["cuda_flags"] + ["-c", src, "-o", os.devnull]) if cuda
             else ([cfg["cxx"]] + cfg["cxx_flags"] + ["-fsyntax-only", src])) for where, src, cuda in jobs]

    def run(job):
        where, cmd = job
        t0 = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True)
        return where, p.returncode, p.stdout + p.stderr, time.monotonic() - t0

    timings = []
    # The slowest first, so that the pool does not end waiting on one long compile.
    jobs.sort(key=lambda j: j[1][0] != cfg.get("cuda_compiler"))
    with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as ex:
        for where, rc, out, secs in ex.map(run, jobs):
            timings.append((secs, where))
            if rc != 0:
                problems.append(f"{where}: does not compile\n{out}")
    for secs, where in sorted(timings, reverse=True)[:5]:
        print(f"{secs:6.1f} s  {where}")
    for s in skipped:
        print(f"skipped: {s}")
    failed = sum(1 for p in problems if "does not compile" in p)
    print(f"docs_snippets: {blocks_seen} blocks in {len(jobs)} translation units ({len(jobs) - failed} compiled), "
          f"{len(skipped)} skipped, {len(problems)} problems")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
