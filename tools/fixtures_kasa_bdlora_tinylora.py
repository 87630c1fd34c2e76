# SPDX-License-Identifier: MIT
"""KaSA, BD-LoRA and TinyLoRA fixtures (issue 16), written by PEFT 0.21.2 itself.

    python3 tools/fixtures_kasa_bdlora_tinylora.py [--out tests/fixtures]

Model: x [*, 15] -> q (15 -> 21) -> relu -> v (21 -> 9) -> relu -> head (9 -> 6), nn.Linear
with biases; every trained adapter tensor is set to random values (PEFT zero-initialises
KaSA's and BD-LoRA's B and TinyLoRA's v, which would make the fixtures blind to them).

Each directory tests/fixtures/<name>/ holds
  model.safetensors   the ORIGINAL base model (before PEFT touched it)
  adapter/            what save_pretrained wrote
  io.safetensors      x [5, 15] and PEFT's model output y; per adapted module m an input
                      x.m [3, in] and PEFT's layer output y.m (base + adapter + bias)
KaSA directories also hold truncated.safetensors (PEFT's truncated base weights, which PEFT
does not save with the adapter) and, in io.safetensors, kasa_loss (LoraModel._get_kasa_loss).
TinyLoRA directories record the model's module order in io.safetensors' metadata
("module_order"): PEFT assigns the shared vectors tinylora_v.<g> by that order, which the
adapter files do not record.
"""
import argparse
import os

import safetensors.torch
import torch

from peft_fixture import write_fixture


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(15, 21)
        self.v = torch.nn.Linear(21, 9)
        self.head = torch.nn.Linear(9, 6)

    def forward(self, x):
        return self.head(torch.relu(self.v(torch.relu(self.q(x)))))


MODULES = ["q", "v", "head"]


def kasa_extras(pm, layers, d, io):
    """The module order (TinyLoRA's groups follow it); for KaSA, PEFT's loss and truncated weights."""
    if getattr(pm.peft_config["default"], "kasa_config", None) is not None:
        with torch.no_grad():
            io["kasa_loss"] = torch.tensor([float(pm.base_model._get_kasa_loss())], dtype=torch.float64)
        safetensors.torch.save_file(
            {n + ".weight": m.get_base_layer().weight.detach().clone().contiguous() for n, m in layers.items()},
            os.path.join(d, "truncated.safetensors"))
    return {"module_order": ",".join(layers.keys())}


def fixture(out, name, config, seed):
    write_fixture(out, name, Net, config, seed, 15, scale=lambda n: 0.4, module_seed=lambda i: 3 + i,
                  finish=kasa_extras)


def main():
    from peft import LoraConfig, TinyLoraConfig
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    out = os.path.abspath(ap.parse_args().out)
    os.makedirs(out, exist_ok=True)
    fixture(out, "peft_kasa", LoraConfig(r=4, lora_alpha=6, target_modules=MODULES,
                                         kasa_config=KasaConfig(beta=2e-2, gamma=3e-2)), 2400)
    fixture(out, "peft_kasa_rslora", LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=MODULES,
                                                rank_pattern={"head": 2}, alpha_pattern={"v": 7},
                                                kasa_config=KasaConfig()), 2410)
    fixture(out, "peft_bdlora", LoraConfig(r=6, lora_alpha=5, target_modules=MODULES,
                                           use_bdlora=BdLoraConfig(target_modules_bd_a=["q", "head"],
                                                                   target_modules_bd_b=["v"], nblocks=3)), 2420)
    fixture(out, "peft_bdlora_mixed", LoraConfig(r=3, lora_alpha=4, use_rslora=True, target_modules=MODULES,
                                                 use_bdlora=BdLoraConfig(target_modules_bd_b=["q"], nblocks=3,
                                                                         match_strict=False)), 2430)
    fixture(out, "peft_tinylora", TinyLoraConfig(r=2, u=5, weight_tying=0.5, target_modules=MODULES,
                                                 projection_seed=7), 2440)
    fixture(out, "peft_tinylora_tied", TinyLoraConfig(r=3, u=4, weight_tying=1.0, target_modules=MODULES), 2450)


if __name__ == "__main__":
    main()
