#!/usr/bin/env python3
"""Round trip: deltaw writes (io_roundtrip_writer), the Python packages read.

--part formats: safetensors (numpy; torch for BF16 if present) and gguf.GGUFReader.
--part peft:    PEFT loads deltaw's adapter directories (LoRA with rank/alpha patterns,
                rsLoRA, DoRA, and the structured types) onto a torch model and its forward
                matches deltaw's output; loaded onto a deeper model (two blocks, the
                adapter covers block 0), PEFT wraps exactly the adapter's modules and
                reports no missing adapter keys (target_modules holds full names).
Exits 77 (CTest skip) when the packages a part needs are missing."""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys

SKIP = 77


def need(*mods):
    missing = []
    for m in mods:
        try:
            __import__(m)
        except Exception:
            missing.append(m)
    if missing:
        print("SKIPPED: python packages missing: " + ", ".join(missing))
        sys.exit(SKIP)


def formula(r, c, step, offset):
    import numpy as np
    return (np.arange(r * c, dtype=np.float64).reshape(r, c) * step + offset)


def check(cond, msg):
    if not cond:
        print("FAIL: " + msg)
        sys.exit(1)
    print("ok: " + msg)


def part_formats(d):
    need("numpy", "safetensors", "gguf")
    import numpy as np
    from safetensors import safe_open
    import gguf
    p = os.path.join(d, "st.safetensors")
    with safe_open(p, framework="numpy") as f:
        check(f.metadata() == {"writer": "deltaw", "k": "v"}, "safetensors metadata")
        check(sorted(f.keys()) == sorted(["f32", "f64", "bf16", "f16", "f32_transposed", "vec"]), "safetensors keys")
        a = f.get_tensor("f32")
        check(a.dtype == np.float32 and np.array_equal(a, formula(5, 7, 0.125, -2)), "F32 [5, 7] values")
        check(np.array_equal(f.get_tensor("f32_transposed"), formula(5, 7, 0.125, -2).T), "strided view written row-major")
        b = f.get_tensor("f64")
        check(b.dtype == np.float64 and np.array_equal(b, formula(3, 4, 1.0 / 3.0, 0)), "F64 [3, 4] values")
        h = f.get_tensor("f16")
        check(h.dtype == np.float16 and np.array_equal(h, formula(2, 3, 0.5, -1)), "F16 values")
        check(np.array_equal(f.get_tensor("vec"), np.linspace(0, 2.5, 6, dtype=np.float32)), "1-D vector")
    # BF16: numpy has no bfloat16; decode the bits from the file's own header.
    raw = open(p, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8:8 + n])
    s, e = hdr["bf16"]["data_offsets"]
    bits = np.frombuffer(raw[8 + n + s:8 + n + e], dtype=np.uint16).astype(np.uint32) << 16
    check(hdr["bf16"]["dtype"] == "BF16" and hdr["bf16"]["shape"] == [4, 6] and
          np.array_equal(bits.view(np.float32).reshape(4, 6), formula(4, 6, 0.25, -1)), "BF16 values")
    try:
        import torch
        from safetensors.torch import load_file
        t = load_file(p)["bf16"]
        check(t.dtype == torch.bfloat16 and torch.equal(t.float(), torch.tensor(formula(4, 6, 0.25, -1)).float()),
              "BF16 via safetensors.torch")
    except ImportError:
        print("note: torch missing, BF16 checked from raw bits only")

    r = gguf.GGUFReader(os.path.join(d, "lora.gguf"))
    fields = {k: v for k, v in r.fields.items()}

    def sval(k):
        return bytes(fields[k].parts[fields[k].data[0]]).decode()

    check(sval("general.type") == "adapter" and sval("adapter.type") == "lora", "GGUF general.type / adapter.type")
    check(sval("general.architecture") == "llama", "GGUF general.architecture")
    alpha = float(fields["adapter.lora.alpha"].parts[fields["adapter.lora.alpha"].data[0]][0])
    check(alpha == 6.0, "GGUF adapter.lora.alpha = 6 (s = alpha / r = 2 for r = 3)")
    tens = {t.name: t for t in r.tensors}
    A1, B1 = formula(3, 8, 0.0625, -0.5), formula(6, 3, 0.125, -1)
    A2, B2 = formula(2, 8, 0.25, -1), formula(4, 2, 0.5, -2)
    ta = tens["blk.0.attn_q.weight.lora_a"]
    check(list(ta.shape) == [8, 3] and ta.data.shape == (3, 8), "lora_a: ne = [in, r], numpy [r, in]")
    tb = tens["blk.0.attn_q.weight.lora_b"]
    check(list(tb.shape) == [3, 6] and tb.data.shape == (6, 3), "lora_b: ne = [r, out], numpy [out, r]")
    check(np.array_equal(ta.data, A1) and np.array_equal(tb.data, B1), "first pair values")
    # llama.cpp: delta = (alpha / r) * B @ A; the second update had s = 0.5 with r = 2.
    a2, b2 = tens["blk.0.attn_v.weight.lora_a"].data, tens["blk.0.attn_v.weight.lora_b"].data
    delta = (alpha / a2.shape[0]) * (b2.astype(np.float64) @ a2.astype(np.float64))
    check(np.allclose(delta, 0.5 * B2 @ A2, rtol=1e-6, atol=1e-7), "folded scale: llama.cpp's alpha/r gives s = 0.5")


def part_peft(d):
    need("numpy", "safetensors", "torch", "peft")
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    import peft

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

        def forward(self, x):
            h = torch.relu(self.blocks[0].q(x))
            h = torch.relu(self.blocks[0].v(h))
            return self.head(h)

    class Deeper(Tiny):
        """Tiny with a second block the adapter does not cover (same forward)."""

        def __init__(self):
            super().__init__()
            self.blocks.append(Block())

    from peft.tuners.tuners_utils import BaseTunerLayer
    import warnings

    def check_deeper(variant, ref):
        model = Deeper()
        missing = model.load_state_dict(base_sd, strict=False).missing_keys
        check(all(k.startswith("blocks.1.") for k in missing), "deeper model: only blocks.1 lacks base weights")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pm = PeftModel.from_pretrained(model, os.path.join(d, "adapter_" + variant))
        pm.eval()
        wrapped = sorted(n for n, m in pm.base_model.model.named_modules() if isinstance(m, BaseTunerLayer))
        cfg = pm.peft_config["default"]
        check(wrapped == ["blocks.0.q", "blocks.0.v", "head"],
              "%s on a deeper model wraps only the adapter's modules (target_modules %s): %s"
              % (variant, cfg.target_modules, wrapped))
        noisy = [str(w.message) for w in caught if "missing" in str(w.message).lower()]
        check(not noisy, "%s on a deeper model: no missing-key warnings %s" % (variant, noisy[:1]))
        with torch.no_grad():
            y = pm(io["x"])
        err = ((y - ref).abs().max() / max(1.0, ref.abs().max())).item()
        check(err < 1e-5, "%s on a deeper model: forward rel err %.2e" % (variant, err))

    io = load_file(os.path.join(d, "io.safetensors"))
    base_sd = load_file(os.path.join(d, "model.safetensors"))
    for variant in ("lora", "rslora", "dora"):
        model = Tiny()
        model.load_state_dict(base_sd)
        pm = PeftModel.from_pretrained(model, os.path.join(d, "adapter_" + variant))
        pm.eval()
        cfg = pm.peft_config["default"]
        with torch.no_grad():
            y = pm(io["x"])
        ref = io["y_" + variant]
        err = ((y - ref).abs().max() / max(1.0, ref.abs().max())).item()
        check(err < 1e-5, "PEFT %s loads deltaw's adapter (r=%d, rank_pattern=%s, alpha_pattern=%s); "
              "forward rel err %.2e" % (variant, cfg.r, dict(cfg.rank_pattern), dict(cfg.alpha_pattern), err))
        check_deeper(variant, ref)
    # Structured types written by deltaw (peft_structured.hpp): LoKr, MiSS, Bone bat (MiSS
    # init_weights "bat"), VeRA and RandLoRA with deltaw's bases stored (save_projection),
    # LoHa, IA3 (input scaling for feedforward_modules), OFT (Cayley–Neumann; exact Cayley
    # with block_share), HRA (plain and apply_GS), SHiRA, RoAd, HiRA, DeLoRA; GraLoRA and
    # UniLoRA (io/peft_gralora.hpp, io/peft_unilora.hpp); KaSA, BD-LoRA and TinyLoRA
    # (io/peft_kasa_bdlora_tinylora.hpp; PEFT truncates the base itself when it loads KaSA);
    # VB-LoRA (logits and save_only_topk_weights) and PVeRA (io/peft_vblora.hpp, io/peft_pvera.hpp).
    base = Tiny()
    base.load_state_dict(base_sd)
    with torch.no_grad():
        y0 = base(io["x"])
    import peft.tuners.boft.layer as boft_layer

    class FbdStub:
        """What PEFT's fbd_cuda extension computes: [N, D, b, b] blocks into [N, D·b, D·b]."""

        @staticmethod
        def forward(x):
            return [torch.stack([torch.block_diag(*blocks.unbind(0)) for blocks in x.unbind(0)])]

    for variant in ("lokr", "miss", "miss_bat", "vera", "randlora", "loha", "ia3", "oft", "oft_share", "hra",
                    "hra_gs", "boft", "boft_butterfly", "adalora", "shira", "road", "hira", "delora", "gralora",
                    "unilora", "kasa", "bdlora", "tinylora", "vblora", "vblora_topk", "pvera"):
        # BOFT with m > 1 loads only where PEFT has its CUDA extension (else it builds m = 1);
        # False: "no extension" without PEFT's attempt to compile it.
        boft_layer._FBD_CUDA = FbdStub() if variant == "boft_butterfly" else False
        model = Tiny()
        model.load_state_dict(base_sd)
        pm = PeftModel.from_pretrained(model, os.path.join(d, "adapter_" + variant))
        pm.eval()
        cfg = pm.peft_config["default"]
        with torch.no_grad():
            y = pm(io["x"])
        ref = io["y_" + variant]
        err = ((y - ref).abs().max() / max(1.0, ref.abs().max())).item()
        # The adapter must matter: a PEFT that ignored it (or regenerated other bases)
        # would be far from deltaw's output.
        moved = ((ref - y0).norm() / ref.norm()).item()
        check(err < 1e-5 and moved > 1e-2, "PEFT %s (peft_type %s) loads deltaw's adapter; forward rel err %.2e "
              "(the adapter moves the output by %.2f)" % (variant, cfg.peft_type, err, moved))
        check_deeper(variant, ref)
    print("peft", peft.__version__, "torch", torch.__version__)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["formats", "peft"], required=True)
    ap.add_argument("--writer", required=True)
    ap.add_argument("--dir", required=True)
    a = ap.parse_args()
    # Check the packages before writing anything.
    if a.part == "formats":
        need("numpy", "safetensors", "gguf")
    else:
        need("numpy", "safetensors", "torch", "peft")
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    subprocess.run([a.writer, a.dir, a.part], check=True)
    part_formats(a.dir) if a.part == "formats" else part_peft(a.dir)


if __name__ == "__main__":
    main()
