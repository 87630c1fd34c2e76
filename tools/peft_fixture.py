# SPDX-License-Identifier: MIT
"""What the tools/fixtures_*.py generators share: one fixture directory written by PEFT itself.

write_fixture(out, name, make_model, config, seed, ...) writes tests/fixtures/<name>/ with
  model.safetensors   the base model as built (before PEFT touched it)
  adapter/            what PeftModel.save_pretrained wrote (without its model-card README)
  io.safetensors      x [5, in] and PEFT's model output y; per adapted module m an input
                      x.m [3, in_m] and PEFT's layer output y.m
after setting every trainable adapter tensor to random values (PEFT zero-initialises one
factor of most methods, which would make a fixture blind to it). The random draws follow
the seed: the model from torch.manual_seed(seed), the adapter from seed + 1, x from seed + 2,
module i's input from seed + module_seed(i).
"""
import os
import shutil

import safetensors.torch
import torch


def write_fixture(out, name, make_model, config, seed, in_features, scale=lambda param: 0.3,
                  module_seed=lambda i: 3, on_module=None, finish=None):
    """on_module(name, module, x_m, io): more per-module tensors (under no_grad);
    finish(peft_model, layers, directory, io) -> metadata dict of io.safetensors or None."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    d = os.path.join(out, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    torch.manual_seed(seed)
    model = make_model()
    safetensors.torch.save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                                os.path.join(d, "model.safetensors"))
    pm = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale(n))
    pm.eval()
    x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(seed + 2))
    layers = {n: m for n, m in pm.base_model.model.named_modules() if isinstance(m, BaseTunerLayer)}
    with torch.no_grad():
        io = {"x": x, "y": pm(x)}
        for i, (n, m) in enumerate(layers.items()):
            xm = torch.randn(3, m.get_base_layer().in_features,
                             generator=torch.Generator().manual_seed(seed + module_seed(i)))
            io["x." + n] = xm
            io["y." + n] = m(xm)
            if on_module:
                on_module(n, m, xm, io)
    meta = finish(pm, layers, d, io) if finish else None
    safetensors.torch.save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"),
                                metadata=meta)
    pm.save_pretrained(os.path.join(d, "adapter"))
    readme = os.path.join(d, "adapter", "README.md")
    if os.path.exists(readme):
        os.remove(readme)
