#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Writes tests/fixtures/peft_named/ with the real PEFT: one PeftModel holding two LoRA
adapters, saved by PEFT's own save_pretrained, which puts the adapter "default" in
adapter/ and the adapter "second" in adapter/second/ (PEFT's layout for named adapters).

  adapter/                 "default": LoRA r=4 on ["q", "v"] (list target_modules)
  adapter/second/          "second":  DoRA r=2, target_modules the look-ahead regex
                           ^(?!.*head).*\\.(q|v)$ (Python's re accepts it, deltaw's matcher
                           does not implement look-arounds; the adapter must still be read)
  model.safetensors        the base model's weights
  io.safetensors           x, y.<adapter> (the model's output with that adapter active),
                           x.<module>, y.<adapter>.<module> (each adapted layer alone)

Requires torch, safetensors and peft (0.21.2 wrote the committed files). Deterministic.
Usage: python3 tests/io/make_peft_named_fixture.py [--out tests/fixtures]"""
import argparse
import os
import sys
import shutil

import safetensors.torch
import torch
import peft
from peft import LoraConfig, get_peft_model


# The same tiny model as the other PEFT fixtures (tools/make_fixtures.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
from make_fixtures import Tiny  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "fixtures"))
    a = ap.parse_args()
    d = os.path.join(a.out, "peft_named")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    torch.manual_seed(7)
    model = Tiny()
    safetensors.torch.save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                                os.path.join(d, "model.safetensors"))
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    pm.add_adapter("second", LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=r"^(?!.*head).*\.(q|v)$"))
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                if "magnitude" in n:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.eval()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(9))
    io = {"x": x}
    xs = {}
    for name in ("default", "second"):
        pm.set_adapter(name)
        with torch.no_grad():
            io["y." + name] = pm(x)
            for mname, mod in pm.base_model.model.named_modules():
                if isinstance(mod, peft.tuners.tuners_utils.BaseTunerLayer):
                    if mname not in xs:
                        xs[mname] = torch.randn(3, mod.get_base_layer().in_features,
                                                generator=torch.Generator().manual_seed(10 + len(xs)))
                        io["x." + mname] = xs[mname]
                    io["y." + name + "." + mname] = mod(xs[mname])
    pm.save_pretrained(os.path.join(d, "adapter"))  # both adapters: adapter/ and adapter/second/
    for sub in ("", "second"):
        readme = os.path.join(d, "adapter", sub, "README.md")  # a model-card template
        if os.path.exists(readme):
            os.remove(readme)
    safetensors.torch.save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))
    print("wrote", d, "with peft", peft.__version__, "torch", torch.__version__)


if __name__ == "__main__":
    main()
