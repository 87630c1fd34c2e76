#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""VB-LoRA and PVeRA fixtures (issue 16), written by PEFT 0.21.2 itself.

  peft_vblora/        r = 3, vector_length 3, 11 bank vectors, topk 2; layers 15->21->9->6
  peft_vblora_topk/   save_only_topk_weights = True (k = 3, 300 vectors: int16 indices, the
                      k − 1 first softmax weights); vector_length 7, layers 14->21->7->14
  peft_vblora_topk1/  save_only_topk_weights with topk 1 (empty weight tensors, uint8 indices)
  peft_pvera/         r = 4, projection_prng_key 7, save_projection; layers 13->17->11->7;
                      also eps.<module> / ys.<module>: PEFT's sampled forward
                      (sample_at_inference, generator_seed) and the noise it drew

Each directory: model.safetensors (the base model), adapter/ (save_pretrained), io.safetensors
(x, y of the whole model and x.<module>, y.<module> of each adapted layer, y = PEFT's forward
in eval). Every trainable adapter parameter is random (PEFT starts λ_b at zero).
Usage: python3 tools/fixtures_vblora_pvera.py [--out tests/fixtures]"""
import argparse
import os

import torch
from peft import PveraConfig, VBLoRAConfig

from peft_fixture import write_fixture


class Block(torch.nn.Module):
    def __init__(self, a, b, c):
        super().__init__()
        self.q = torch.nn.Linear(a, b)
        self.v = torch.nn.Linear(b, c)


class Net(torch.nn.Module):
    """x -> blocks.0.q -> relu -> blocks.0.v -> relu -> head."""

    def __init__(self, dims):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(dims[0], dims[1], dims[2])])
        self.head = torch.nn.Linear(dims[2], dims[3])

    def forward(self, x):
        h = torch.relu(self.blocks[0].q(x))
        h = torch.relu(self.blocks[0].v(h))
        return self.head(h)


def sampled_output(seed):
    """PEFT's sampled PVeRA forward: ε ~ N(0, 1) [3, r] from the adapter's generator."""
    def on_module(name, mod, xm, io):
        s = seed + 4
        mod.sample_at_inference["default"] = True
        mod.pvera_generator["default"] = torch.Generator().manual_seed(s)
        io["eps." + name] = torch.randn((3, mod.r["default"]), generator=torch.Generator().manual_seed(s))
        io["ys." + name] = mod(xm)
        mod.sample_at_inference["default"] = False
    return on_module


def write(out, name, dims, config, seed, sampled=False):
    # VB-LoRA's logits spread over ±2 (so the top k are well separated), the rest ±0.3.
    write_fixture(out, name, lambda: Net(dims), config, seed, dims[0],
                  scale=lambda n: 2.0 if "logits" in n else 0.3,
                  on_module=sampled_output(seed) if sampled else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    out = os.path.abspath(ap.parse_args().out)
    tm = ["q", "v", "head"]
    write(out, "peft_vblora", (15, 21, 9, 6),
          VBLoRAConfig(r=3, num_vectors=11, vector_length=3, topk=2, target_modules=tm), 1800)
    write(out, "peft_vblora_topk", (14, 21, 7, 14),
          VBLoRAConfig(r=2, num_vectors=300, vector_length=7, topk=3, save_only_topk_weights=True, target_modules=tm),
          1810)
    write(out, "peft_vblora_topk1", (15, 21, 9, 6),
          VBLoRAConfig(r=2, num_vectors=5, vector_length=3, topk=1, save_only_topk_weights=True, target_modules=tm),
          1820)
    write(out, "peft_pvera", (13, 17, 11, 7),
          PveraConfig(r=4, projection_prng_key=7, target_modules=tm), 1830, sampled=True)


if __name__ == "__main__":
    main()
