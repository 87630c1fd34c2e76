#!/usr/bin/env python3
"""Writes deltaw's interchange fixtures into tests/fixtures/ with the real packages.

  safetensors/dtypes.safetensors   every safetensors dtype, written by safetensors.torch
  safetensors/dtypes_f64.safetensors  the same values converted to float64 by torch
  peft_<variant>/                  a tiny model, a PEFT adapter saved by PEFT itself
                                   (save_pretrained), the model's input and PEFT's output
  peft_{lokr,miss,vera,randlora}_* the same for the structured types (LoKr, MiSS default /
                                   mini / bat, VeRA and RandLoRA with save_projection)
  peft_{loha,ia3,oft}*             the same for LoHa, IA³ and OFT (issue 16)
  peft_hra*                        the same for HRA (plain and apply_GS; issue 16)
  peft_boft*, peft_adalora*        the same for BOFT (m = 1 as PEFT runs on a CPU; 2 and 3
                                   butterfly factors through a stand-in for PEFT's CUDA
                                   extension) and AdaLoRA (trained with PEFT's allocator);
                                   tools/fixtures_boft_adalora.py, --only boft_adalora
  peft_{fourierft,c3a,waveft}*     the same for FourierFT, C3A and WaveFT (issue 16; WaveFT also on
                                   odd layer widths), FourierFT / WaveFT with indices.safetensors:
                                   the positions PEFT drew per module
  gguf/lora_<type>.gguf            llama.cpp LoRA adapters written by gguf.GGUFWriter
  VERSIONS.json                    the package versions that wrote all of the above

Requires numpy, safetensors, gguf, torch and peft (transformers for the Conv1D /
fan_in_fan_out variant). Deterministic: fixed seeds.
Usage: python3 tools/make_fixtures.py [--out tests/fixtures] [--only structured|issue16|hra|peftb|fourier|boft_adalora]
(--only structured rewrites only the structured-type fixtures, --only issue16 only LoHa / IA³ /
OFT, --only hra only HRA, leaving the others as they are)."""
import argparse
import json
import os
import shutil

import numpy as np
import safetensors
import safetensors.torch
import gguf
import torch
import peft
from peft import LoraConfig, get_peft_model


def dtype_fixtures(out):
    d = os.path.join(out, "safetensors")
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 5, generator=g, dtype=torch.float64) * 4
    t = {
        "BOOL": base > 0,
        "U8": (base.abs() * 10).to(torch.uint8),
        "I8": (base * 10).to(torch.int8),
        "I16": (base * 1000).to(torch.int16),
        "U16": (base.abs() * 1000).to(torch.uint16),
        "F16": base.to(torch.float16),
        "BF16": base.to(torch.bfloat16),
        "I32": (base * 1e6).to(torch.int32),
        "U32": (base.abs() * 1e6).to(torch.uint32),
        "F32": base.to(torch.float32),
        "F64": base,
        "I64": (base * 1e9).to(torch.int64),
        "U64": (base.abs() * 1e9).to(torch.uint64),
        "F8_E4M3": base.to(torch.float8_e4m3fn),
        "F8_E5M2": base.to(torch.float8_e5m2),
    }
    t["F32_vector"] = torch.arange(7, dtype=torch.float32) / 3
    t["F32_empty"] = torch.zeros(0, 4, dtype=torch.float32)
    safetensors.torch.save_file(t, os.path.join(d, "dtypes.safetensors"), metadata={"writer": "safetensors.torch"})
    ref = {k: v.to(torch.float64) for k, v in t.items()}
    safetensors.torch.save_file(ref, os.path.join(d, "dtypes_f64.safetensors"))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(16, 24)
        self.v = torch.nn.Linear(24, 20)


class Tiny(torch.nn.Module):
    """x -> blocks.0.q -> relu -> blocks.0.v -> relu -> head; Linear layers ([out, in])."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block()])
        self.head = torch.nn.Linear(20, 8)

    def forward(self, x):
        h = torch.relu(self.blocks[0].q(x))
        h = torch.relu(self.blocks[0].v(h))
        return self.head(h)


class TinyConv1D(torch.nn.Module):
    """GPT-2 style: transformers' Conv1D stores W as [in, out] (fan_in_fan_out)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.c_attn = Conv1D(24, 16)  # nf=out, nx=in
        self.c_proj = Conv1D(8, 24)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_attn(x)))


def randomize_structured(model, seed):
    """Random values for every adapter parameter (PEFT initialises most of them to zero or
    one, which would make the fixtures blind to the factor math)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def randomize_adapter(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                if "magnitude" in n:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def peft_fixture(out, name, model, config, seed, randomize=randomize_adapter):
    d = os.path.join(out, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    torch.manual_seed(seed)
    base_sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(base_sd, os.path.join(d, "model.safetensors"))
    pm = get_peft_model(model, config)
    randomize(pm, seed + 1)
    pm.eval()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        y = pm(x)
    pm.save_pretrained(os.path.join(d, "adapter"))
    readme = os.path.join(d, "adapter", "README.md")  # a model-card template, not a fixture
    if os.path.exists(readme):
        os.remove(readme)
    # Per-module inputs/outputs of the adapted layers, to check each ΔW on its own.
    io = {"x": x, "y": y}
    for mname, mod in pm.base_model.model.named_modules():
        if isinstance(mod, peft.tuners.tuners_utils.BaseTunerLayer):
            inf = mod.get_base_layer().in_features if hasattr(mod.get_base_layer(), "in_features") else mod.in_features
            xm = torch.randn(3, inf, generator=torch.Generator().manual_seed(seed + 3))
            with torch.no_grad():
                io["x." + mname] = xm
                io["y." + mname] = mod(xm)
    safetensors.torch.save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))
    return pm


def gguf_fixtures(out, pm):
    """The peft_lora adapter's factors as llama.cpp LoRA files (F32, F16, Q8_0), with
    names mapped blocks.0.q -> blk.0.attn_q.weight etc. Expected ΔW in expected.safetensors."""
    d = os.path.join(out, "gguf")
    os.makedirs(d, exist_ok=True)
    names = {"blocks.0.q": "blk.0.attn_q.weight", "blocks.0.v": "blk.0.attn_v.weight", "head": "output.weight"}
    mods = dict(pm.base_model.model.named_modules())
    alpha = 8.0
    expected = {}
    for qt in ("F32", "F16"):
        w = gguf.GGUFWriter(os.path.join(d, "lora_%s.gguf" % qt.lower()), "llama")
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", alpha)
        for hf, gg in names.items():
            m = mods[hf]
            A = m.lora_A["default"].weight.detach().numpy().astype(np.float32)  # [r, in]
            B = m.lora_B["default"].weight.detach().numpy().astype(np.float32)  # [out, r]
            r = A.shape[0]
            # Fold PEFT's per-module scale into B so that llama.cpp's alpha/r reproduces it.
            B = (B * (m.scaling["default"] * r / alpha)).astype(np.float32)
            for suffix, M in ((".lora_a", A), (".lora_b", B)):
                Ms = M if qt == "F32" else M.astype(np.float16)
                w.add_tensor(gg + suffix, Ms)
                expected["%s.%s%s" % (qt, gg, suffix)] = np.ascontiguousarray(Ms, dtype=np.float64)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    # Q8_0 needs rows that are multiples of 32: a separate synthetic pair, r = 32.
    rng = np.random.default_rng(7)
    A = rng.standard_normal((32, 64)).astype(np.float32)
    B = rng.standard_normal((40, 32)).astype(np.float32)
    q8 = gguf.GGMLQuantizationType.Q8_0
    w = gguf.GGUFWriter(os.path.join(d, "lora_q8_0.gguf"), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 16.0)
    for suffix, M in ((".lora_a", A), (".lora_b", B)):
        Q = gguf.quants.quantize(M, q8)
        w.add_tensor("blk.1.attn_q.weight" + suffix, Q, raw_shape=Q.shape, raw_dtype=q8)
        expected["Q8_0.blk.1.attn_q.weight" + suffix] = np.ascontiguousarray(gguf.quants.dequantize(Q, q8),
                                                                               dtype=np.float64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    safetensors.numpy.save_file(expected, os.path.join(d, "expected.safetensors"))


def structured_fixtures(out):
    """LoKr, MiSS (default, mini, bat), VeRA and RandLoRA adapters on the Tiny model (q [24, 16],
    v [20, 24], head [8, 20]), every parameter random."""
    from peft import LoKrConfig, MissConfig, VeraConfig, RandLoraConfig
    tm = ["q", "v", "head"]
    variants = [
        # r = 2: w1 dense, w2 = w2_a·w2_b for q and v; rank/alpha patterns per module.
        ("peft_lokr", LoKrConfig(r=2, alpha=3, target_modules=tm, rank_pattern={"head": 1},
                                 alpha_pattern={"v": 5}, init_weights=False)),
        # decompose_both and r = 1: both factors low rank where PEFT decomposes them.
        ("peft_lokr_both", LoKrConfig(r=1, alpha=2, target_modules=tm, decompose_both=True,
                                      init_weights=False)),
        # r = 6 with decompose_factor 2: both factors dense.
        ("peft_lokr_dense", LoKrConfig(r=6, alpha=2, target_modules=tm, decompose_factor=2,
                                       init_weights=False)),
        # r = 3: in % r != 0 for q (16) and head (20): the partial last block.
        ("peft_miss", MissConfig(r=3, target_modules=tm, init_weights=False)),
        ("peft_miss_mini", MissConfig(r=3, mini_r=4, target_modules=tm, init_weights="mini")),
        ("peft_miss_bat", MissConfig(r=4, target_modules=tm, init_weights="bat")),
        ("peft_vera", VeraConfig(r=4, target_modules=tm, save_projection=True, projection_prng_key=7)),
        ("peft_randlora", RandLoraConfig(r=4, randlora_alpha=6, target_modules=tm, save_projection=True,
                                         projection_prng_key=9)),
        ("peft_randlora_sparse", RandLoraConfig(r=3, randlora_alpha=5, target_modules=tm, save_projection=True,
                                                sparse=True, projection_prng_key=5)),
    ]
    for i, (name, cfg) in enumerate(variants):
        torch.manual_seed(20 + i)
        peft_fixture(out, name, Tiny(), cfg, 500 + 10 * i, randomize=randomize_structured)


def issue16_fixtures(out):
    """LoHa, IA³ (output and feed-forward input scaling) and OFT (Cayley–Neumann with
    oft_block_size, Cayley with r and COFT, block_share with 3 Neumann terms) on the Tiny model,
    every parameter random (PEFT initialises LoHa's w2_b and OFT's Q to zero, IA³'s l to one)."""
    from peft import LoHaConfig, IA3Config, OFTConfig
    tm = ["q", "v", "head"]
    variants = [
        ("peft_loha", LoHaConfig(r=3, alpha=5, target_modules=tm, rank_pattern={"head": 2}, alpha_pattern={"v": 4},
                                 init_weights=False)),
        ("peft_ia3", IA3Config(target_modules=tm, feedforward_modules=["v"])),
        # in = 16, 24, 20: 4, 6 and 5 blocks of 4.
        ("peft_oft", OFTConfig(r=0, oft_block_size=4, target_modules=tm, init_weights=False)),
        # r = 2 blocks per layer: b = 8, 12, 10; exact Cayley; COFT.
        ("peft_oft_cayley", OFTConfig(r=2, oft_block_size=0, target_modules=tm, use_cayley_neumann=False, coft=True,
                                      eps=0.5, init_weights=False)),
        ("peft_oft_share", OFTConfig(r=0, oft_block_size=4, target_modules=tm, block_share=True,
                                     num_cayley_neumann_terms=3, init_weights=False)),
    ]
    for i, (name, cfg) in enumerate(variants):
        torch.manual_seed(40 + i)
        peft_fixture(out, name, Tiny(), cfg, 900 + 10 * i, randomize=randomize_structured)


def hra_fixtures(out):
    """HRA on the Tiny model: the plain product of r = 3 reflections and the Gram–Schmidt
    variant with r = 4; every hra_u column random (PEFT's symmetric initialisation repeats
    each column twice, which makes consecutive reflections cancel)."""
    from peft import HRAConfig
    tm = ["q", "v", "head"]
    variants = [
        ("peft_hra", HRAConfig(r=3, target_modules=tm, init_weights=False)),
        ("peft_hra_gs", HRAConfig(r=4, apply_GS=True, target_modules=tm)),
    ]
    for i, (name, cfg) in enumerate(variants):
        torch.manual_seed(60 + i)
        peft_fixture(out, name, Tiny(), cfg, 1100 + 10 * i, randomize=randomize_structured)


def fourier_fixtures(out):
    """FourierFT (n = 37, and 11 for v through n_frequency_pattern; seeds 777 and 5) and C3A
    (block_size 4, and 2 for v through block_size_pattern; gaussian init) on the Tiny model, every
    spectrum / kernel value random (PEFT initialises FourierFT's spectrum to zero). FourierFT's
    frequencies are not in PEFT's checkpoint (drawn from random_loc_seed at load time): they are
    stored beside it in indices.safetensors (<module>: int64 [2, n], rows then columns)."""
    from peft import FourierFTConfig, C3AConfig, WaveFTConfig
    tm = ["q", "v", "head"]
    variants = [
        ("peft_fourierft", FourierFTConfig(n_frequency=37, scaling=150.0, target_modules=tm,
                                           n_frequency_pattern={"v": 11})),
        ("peft_fourierft_seed", FourierFTConfig(n_frequency=23, scaling=20.0, random_loc_seed=5, target_modules=tm)),
        ("peft_c3a", C3AConfig(block_size=4, target_modules=tm, block_size_pattern={"v": 2}, init_weights="gaussian")),
        ("peft_waveft", WaveFTConfig(n_frequency=40, scaling=25.0, target_modules=tm, n_frequency_pattern={"v": 13})),
        ("peft_waveft_direct", WaveFTConfig(n_frequency=30, scaling=10.0, use_idwt=False, random_loc_seed=3,
                                            target_modules=tm)),
    ]
    for i, (name, cfg) in enumerate(variants):
        torch.manual_seed(70 + i)
        pm = peft_fixture(out, name, Tiny(), cfg, 1200 + 10 * i, randomize=randomize_structured)
        if name.startswith("peft_fourierft") or name.startswith("peft_waveft"):
            idx = {}
            for mname, mod in pm.base_model.model.named_modules():
                if isinstance(mod, peft.tuners.tuners_utils.BaseTunerLayer):
                    ix = mod.indices if hasattr(mod, "indices") else mod.waveft_indices
                    idx[mname] = ix["default"].to(torch.int64).contiguous()
            safetensors.torch.save_file(idx, os.path.join(out, name, "indices.safetensors"))

    class TinyOdd(Tiny):
        """Tiny with odd layer widths (q: 16 -> 23, v: 23 -> 9, head: 9 -> 8): WaveFT's padding and crop."""

        def __init__(self):
            super().__init__()
            self.blocks[0].q = torch.nn.Linear(16, 23)
            self.blocks[0].v = torch.nn.Linear(23, 9)
            self.head = torch.nn.Linear(9, 8)

    torch.manual_seed(79)
    pm = peft_fixture(out, "peft_waveft_odd", TinyOdd(), WaveFTConfig(n_frequency=31, scaling=25.0, target_modules=tm),
                      1290, randomize=randomize_structured)
    safetensors.torch.save_file({m: l.waveft_indices["default"].to(torch.int64).contiguous()
                                 for m, l in pm.base_model.model.named_modules()
                                 if isinstance(l, peft.tuners.tuners_utils.BaseTunerLayer)},
                                os.path.join(out, "peft_waveft_odd", "indices.safetensors"))


def peftb_fixtures(out):
    """SHiRA (random mask, r = 2), RoAd (road_1 / road_2 / road_4, group_size 4), HiRA (r = 3) and
    DeLoRA (r = 3, rank/lambda patterns) on the Tiny model, every trainable parameter random
    (PEFT initialises SHiRA's values, HiRA's B and DeLoRA's B to zero and RoAd to the identity)."""
    from peft import ShiraConfig, RoadConfig, HiraConfig, DeloraConfig
    tm = ["q", "v", "head"]
    variants = [
        ("peft_shira", ShiraConfig(r=2, target_modules=tm, random_seed=3)),
        ("peft_road", RoadConfig(variant="road_2", group_size=4, target_modules=tm)),
        ("peft_road_1", RoadConfig(variant="road_1", group_size=4, target_modules=tm)),
        ("peft_road_4", RoadConfig(variant="road_4", group_size=4, target_modules=tm)),
        ("peft_hira", HiraConfig(r=3, target_modules=tm)),
        ("peft_delora", DeloraConfig(r=3, delora_lambda=4, target_modules=tm, rank_pattern={"head": 2},
                                     lambda_pattern={"v": 7})),
    ]
    for i, (name, cfg) in enumerate(variants):
        torch.manual_seed(80 + i)
        peft_fixture(out, name, Tiny(), cfg, 1300 + 10 * i, randomize=randomize_structured)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    ap.add_argument("--only", choices=["structured", "issue16", "hra", "peftb", "fourier", "boft_adalora"], default=None)
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    import safetensors.numpy  # noqa: F401
    if a.only == "structured":
        structured_fixtures(out)
        return
    if a.only == "issue16":
        issue16_fixtures(out)
        return
    if a.only == "boft_adalora":
        from fixtures_boft_adalora import boft_adalora_fixtures  # BOFT and AdaLoRA (issue 16)
        boft_adalora_fixtures(out, peft_fixture, Tiny)
        return
    if a.only == "hra":
        hra_fixtures(out)
        return
    if a.only == "peftb":
        peftb_fixtures(out)
        return
    if a.only == "fourier":
        fourier_fixtures(out)
        return
    torch.manual_seed(0)
    dtype_fixtures(out)

    torch.manual_seed(10)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "head"], rank_pattern={"v": 2},
                     alpha_pattern={"head": 3}, init_lora_weights=False)
    pm = peft_fixture(out, "peft_lora", Tiny(), cfg, 100)
    gguf_fixtures(out, pm)

    torch.manual_seed(11)
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=["q", "v", "head"], use_rslora=True, init_lora_weights=False)
    peft_fixture(out, "peft_rslora", Tiny(), cfg, 200)

    torch.manual_seed(12)
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["q", "v", "head"], use_dora=True, init_lora_weights=False)
    peft_fixture(out, "peft_dora", Tiny(), cfg, 300)

    fan = None
    try:
        import transformers
        torch.manual_seed(13)
        cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                         init_lora_weights=False)
        peft_fixture(out, "peft_fan_in_fan_out", TinyConv1D(), cfg, 400)
        fan = transformers.__version__
    except ImportError:
        print("transformers missing: peft_fan_in_fan_out not written")

    structured_fixtures(out)
    issue16_fixtures(out)
    hra_fixtures(out)
    from fixtures_boft_adalora import boft_adalora_fixtures
    boft_adalora_fixtures(out, peft_fixture, Tiny)
    peftb_fixtures(out)
    fourier_fixtures(out)

    versions = {"numpy": np.__version__, "safetensors": safetensors.__version__, "torch": torch.__version__,
                "peft": peft.__version__, "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
                "transformers": fan}
    with open(os.path.join(out, "VERSIONS.json"), "w") as f:
        json.dump(versions, f, indent=2)
        f.write("\n")
    print(json.dumps(versions))


def _dist_version(name):
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    main()
