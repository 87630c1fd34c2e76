#!/usr/bin/env python3
"""deltaw's adapter merges against PEFT's own add_weighted_adapter.

1. Builds a tiny torch model with three LoRA adapters (t1: r=4, t2: r=4 rsLoRA, t3: r=6 on two
   of the three modules), random factors, and saves them with PEFT.
2. Runs PEFT's add_weighted_adapter for every combination_type and saves each result.
   DARE's random masks are made explicit: merge_utils.random_pruning is replaced by the same
   rule (Bernoulli(density) mask, rescaled by 1/density) that records each mask in
   masks.safetensors under "<mode>|<module>|<A|B|delta>|<adapter index>".
3. Runs the doctest case "compose: PEFT fixture" of test_compose (--no-skip), which merges
   the saved adapters with deltaw (the recorded masks fed to options.dare_mask), compares
   every module with PEFT's result and writes its own merges as PEFT directories.
4. Loads deltaw's merges with PEFT and compares their delta weights with PEFT's merges
   (for cat with the rsLoRA adapter first: with PEFT's merge divided by its spurious sqrt(r)).
Exit 77 (skip) without torch, peft or safetensors.
"""
import argparse
import math
import os
import shutil
import subprocess
import sys

try:
    import torch
    import peft
    from peft import LoraConfig, get_peft_model
    from peft.utils import merge_utils
    from peft.tuners.lora.model import LoraModel
    from safetensors.torch import save_file
except ImportError as e:  # pragma: no cover
    print(f"SKIPPED: {e}")
    sys.exit(77)

MODES_EQUAL_RANK = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
MODES_ANY_RANK = ["cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(10, 12)
        self.v = torch.nn.Linear(10, 12)
        self.fc = torch.nn.Linear(12, 8)

    def forward(self, x):
        return self.fc(self.q(x) + self.v(x))


def build():
    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "fc"],
                                              init_lora_weights=False), adapter_name="t1")
    model.add_adapter("t2", LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=["q", "v", "fc"],
                                      init_lora_weights=False))
    model.add_adapter("t3", LoraConfig(r=6, lora_alpha=12, target_modules=["q", "fc"], init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exe", required=True)
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    d = args.dir
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    model = build()
    model.save_pretrained(d, selected_adapters=["t1", "t2", "t3"])

    names = {id(m): n for n, m in model.base_model.model.named_modules()}
    ctx = {}
    masks = {}

    def recording_pruning(tensor, density, rescale):
        mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
        i = ctx["calls"]
        ctx["calls"] += 1
        valid = ctx["valid"]
        if ctx["kind"] == "svd":
            target, adapter = "delta", valid[i]
        else:
            target, adapter = ("A" if i < len(valid) else "B"), valid[i % len(valid)]
        masks[f"{ctx['mode']}|{ctx['module']}|{target}|{adapter}"] = mask.to(torch.float32).contiguous()
        out = tensor * mask
        return out / density if rescale else out

    merge_utils.random_pruning = recording_pruning
    orig_gen = LoraModel._generalized_task_arithmetic_weighted_adapter
    orig_svd = LoraModel._svd_generalized_task_arithmetic_weighted_adapter

    def set_ctx(kind, adapters, target):
        ctx.update(kind=kind, module=names[id(target)], calls=0,
                   valid=[i for i, a in enumerate(adapters) if a in target.lora_A])

    def gen(self, combination_type, adapters, weights, target, *a, **k):
        set_ctx("gen", adapters, target)
        return orig_gen(self, combination_type, adapters, weights, target, *a, **k)

    def svd(self, combination_type, adapters, weights, new_rank, target, *a, **k):
        set_ctx("svd", adapters, target)
        return orig_svd(self, combination_type, adapters, weights, new_rank, target, *a, **k)

    LoraModel._generalized_task_arithmetic_weighted_adapter = gen
    LoraModel._svd_generalized_task_arithmetic_weighted_adapter = svd

    cases = [(m, ["t1", "t2"], [0.7, -0.4]) for m in MODES_EQUAL_RANK]
    cases += [(m, ["t1", "t2", "t3"], [0.7, -0.4, 0.5]) for m in MODES_ANY_RANK]
    cases += [("cat_rs", ["t2", "t1"], [0.7, -0.4])]  # rsLoRA first: PEFT copies use_rslora
    with open(os.path.join(d, "cases.txt"), "w") as f:
        for mode, ads, ws in cases:
            ctx["mode"] = mode
            name = "m_" + mode
            model.add_weighted_adapter(ads, ws, name, combination_type=mode.replace("_rs", ""), density=0.5)
            model.save_pretrained(d, selected_adapters=[name])
            f.write(f"{mode} {','.join(ads)} {','.join(str(w) for w in ws)}\n")
    save_file(masks, os.path.join(d, "masks.safetensors"))

    env = dict(os.environ, DELTAW_COMPOSE_PEFT_DIR=d)
    r = subprocess.run([args.exe, "--no-skip", "-tc=compose: PEFT fixture*"], env=env)
    if r.returncode != 0:
        print("FAIL: the deltaw side failed")
        return 1

    # PEFT reads deltaw's merges: same delta weights as PEFT's own merges.
    failures = 0
    for mode, ads, ws in cases:
        model.load_adapter(os.path.join(d, "ours_" + mode), adapter_name="o_" + mode)
        for mname in ["q", "v", "fc"]:
            layer = getattr(model.base_model.model, mname)
            theirs = layer.get_delta_weight("m_" + mode).double()
            if mode == "cat_rs":  # PEFT's merge is scaled by sqrt(r) = sqrt(8); deltaw's is not
                theirs = theirs / math.sqrt(8.0)
            ours = layer.get_delta_weight("o_" + mode).double()
            err = (ours - theirs).abs().max().item() / max(1.0, theirs.abs().max().item())
            if err > 1e-5:
                print(f"FAIL {mode} {mname}: PEFT-loaded deltaw merge differs from PEFT's by {err:.3g}")
                failures += 1
    print(f"peft {peft.__version__}: {len(cases)} deltaw merges loaded by PEFT, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
