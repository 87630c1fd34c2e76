#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""GraLoRA and UniLoRA fixtures (issue 16), written by PEFT 0.21.2 itself.

  peft_gralora/          k = 3 grid, r = 6, hybrid_r = 2, layers 15->21->9->6 (odd widths)
  peft_gralora_k2/       k = 2, r = 4, no hybrid part, layers 14->22->10->6
  peft_unilora/          r = 3, theta_d_length = 50, save_indices = True, layers 13->17->11->7
  peft_unilora_noidx/    the same with save_indices = False (PEFT's default: the indices are
                         redrawn from proj_seed when loading; deltaw refuses it)

Each directory: model.safetensors (the base model), adapter/ (save_pretrained), io.safetensors
(x, y of the whole model and x.<module>, y.<module> of each adapted layer, y = PEFT's forward).
Every trainable adapter parameter is random (PEFT starts GraLoRA's B at zero).
Usage: python3 tools/fixtures_gralora_unilora.py [--out tests/fixtures]"""
import argparse
import os

import torch
from peft import GraloraConfig, UniLoraConfig

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


def write(out, name, dims, config, seed):
    write_fixture(out, name, lambda: Net(dims), config, seed, dims[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    out = os.path.abspath(ap.parse_args().out)
    tm = ["q", "v", "head"]
    write(out, "peft_gralora", (15, 21, 9, 6),
          GraloraConfig(r=6, gralora_k=3, hybrid_r=2, alpha=5, target_modules=tm), 1700)
    write(out, "peft_gralora_k2", (14, 22, 10, 6),
          GraloraConfig(r=4, gralora_k=2, hybrid_r=0, alpha=7, target_modules=tm), 1710)
    write(out, "peft_unilora", (13, 17, 11, 7),
          UniLoraConfig(r=3, theta_d_length=50, proj_seed=5, save_indices=True, target_modules=tm), 1720)
    write(out, "peft_unilora_noidx", (13, 17, 11, 7),
          UniLoraConfig(r=3, theta_d_length=50, proj_seed=5, target_modules=tm), 1730)


if __name__ == "__main__":
    main()
