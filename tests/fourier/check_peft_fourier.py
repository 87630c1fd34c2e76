#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Round trip: deltaw writes FourierFT, C3A and WaveFT adapters (peft_fourier_writer), PEFT 0.21 loads
them onto the Tiny model of tests/fixtures and its per-layer forward matches deltaw's output
within 1e-5 relative. Exits 77 (CTest skip) without torch, safetensors or peft."""
import argparse
import os
import shutil
import subprocess
import sys

SKIP = 77


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--writer", required=True)
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--dir", required=True)
    a = ap.parse_args()
    try:
        import torch
        import safetensors.torch
        import peft
        from peft import PeftModel
    except Exception as e:  # noqa: BLE001
        print("SKIPPED: python packages missing: %s" % e)
        sys.exit(SKIP)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(16, 24)
            self.v = torch.nn.Linear(24, 20)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block()])
            self.head = torch.nn.Linear(20, 8)

    if os.path.isdir(a.dir):
        shutil.rmtree(a.dir)
    os.makedirs(a.dir)
    subprocess.run([a.writer, a.fixtures, a.dir], check=True)
    base = safetensors.torch.load_file(os.path.join(a.fixtures, "peft_fourierft", "model.safetensors"))
    ok = True
    for kind in ("fourierft", "c3a", "waveft"):
        model = Tiny()
        model.load_state_dict(base)
        pm = PeftModel.from_pretrained(model, os.path.join(a.dir, kind, "adapter"))
        pm.eval()
        exp = safetensors.torch.load_file(os.path.join(a.dir, kind, "expected.safetensors"))
        wrapped = 0
        for name, mod in pm.base_model.model.named_modules():
            if not isinstance(mod, peft.tuners.tuners_utils.BaseTunerLayer):
                continue
            wrapped += 1
            with torch.no_grad():
                y = mod(exp["x." + name])
            ref = exp["y." + name]
            err = float((y - ref).norm() / ref.norm())
            good = err < 1e-5
            ok &= good
            print("%s %s %-12s rel err %.2e" % ("ok:" if good else "FAIL:", kind, name, err))
        if wrapped != 3:
            print("FAIL: %s: PEFT wrapped %d modules, expected 3" % (kind, wrapped))
            ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
