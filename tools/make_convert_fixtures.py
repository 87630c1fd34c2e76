#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""PEFT's own convert_to_lora on deltaw's PEFT fixtures: the reference of tests/io/test_peft_convert.cpp.

For each fixture directory tests/fixtures/<name> (model.safetensors + adapter/), the Tiny model is
loaded with its weights, the adapter on top with PeftModel.from_pretrained, and
peft.tuners.lora.conversion.convert_to_lora runs with a fixed rank and with an energy threshold.
Each result (the LoRA state dict: lora_A [k, in], lora_B [out, k] per module, scale 1) is saved as
tests/fixtures/convert_to_lora/<name>.<tag>.safetensors; the metadata holds the requested rank and
PEFT's rank_pattern as JSON.

Usage: python3 tools/make_convert_fixtures.py
Needs torch, peft 0.21.2 and safetensors."""
import json
import os
import sys

import safetensors.torch
import torch
from peft import PeftModel
from peft.tuners.lora.conversion import convert_to_lora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import Tiny  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
# fixture -> requested ranks (int: fixed, float: energy threshold). MiSS (non-bat): PEFT
# returns its own factors at rank r = 3 whatever is asked, so only r = 3 is compared.
CASES = {
    "peft_lokr": [2, 0.9],
    "peft_loha": [2, 0.9],
    "peft_vera": [2, 0.9],
    "peft_randlora": [3, 0.95],
    "peft_miss": [3],
    "peft_miss_bat": [2, 0.8],
}


def main():
    out = os.path.join(ROOT, "convert_to_lora")
    os.makedirs(out, exist_ok=True)
    for name, ranks in CASES.items():
        d = os.path.join(ROOT, name)
        for rank in ranks:
            model = Tiny()
            model.load_state_dict(safetensors.torch.load_file(os.path.join(d, "model.safetensors")))
            pm = PeftModel.from_pretrained(model, os.path.join(d, "adapter"))
            pm.eval()
            cfg, sd = convert_to_lora(pm, rank)
            tag = f"r{rank}" if isinstance(rank, int) else f"e{int(round(rank * 100))}"
            meta = {"rank": json.dumps(rank), "r": str(cfg.r), "rank_pattern": json.dumps(dict(cfg.rank_pattern))}
            safetensors.torch.save_file({k: v.contiguous().float() for k, v in sd.items()},
                                        os.path.join(out, f"{name}.{tag}.safetensors"), metadata=meta)
            print(name, tag, sorted((k, tuple(v.shape)) for k, v in sd.items()))


if __name__ == "__main__":
    main()
