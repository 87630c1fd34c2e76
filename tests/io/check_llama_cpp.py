# SPDX-License-Identifier: MIT
"""deltaw's GGUF LoRA adapters against llama.cpp itself (CTest io_llama_cpp).

1. A tiny random Llama (hidden 64, 4 heads, 2 KV heads, 2 layers, a 262-token byte-fallback
   vocabulary) saved by transformers and converted by llama.cpp's own convert_hf_to_gguf.py.
2. A PEFT LoRA on q, k, v, o (r = 4, alpha = 8, A and B random), saved by PEFT.
3. The adapter written as GGUF by deltaw (io_llama_cpp_writer, head counts read from the
   base GGUF) and by llama.cpp's convert_lora_to_gguf.py: same tensors, shapes and values.
4. llama.cpp (libllama through llama-cpp-python's bindings) runs base + adapter on a token
   sequence; its logits must match the PyTorch model with the PEFT adapter merged (fp32,
   max |diff| / max |ref| <= 1e-3), and so must those with llama.cpp's own adapter. The same
   adapter written with PEFT's q/k row order (what deltaw did before) must miss by > 1e-2, so
   the check tells the two apart.
5. deltaw reads llama.cpp's adapter back (read_gguf_lora, rows back in PEFT's order): every
   dense s·B·A equals PEFT's.

Exits 77 (CTest: skipped) when llama-cpp-python's sources / libllama, torch, transformers,
PEFT, numpy or safetensors are missing. Options fall back to the environment variables
DELTAW_LLAMA_CPP_PYTHON and DELTAW_LLAMA_CPP_LIB.
"""
import argparse
import json
import os
import subprocess
import sys
import types

SKIP = 77
failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)


def skip(why):
    print("SKIPPED: " + why)
    sys.exit(SKIP)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--writer", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--llama-cpp-python", default="")
    ap.add_argument("--llama-lib", default="")
    args = ap.parse_args()
    sdist = args.llama_cpp_python or os.environ.get("DELTAW_LLAMA_CPP_PYTHON", "")
    lib = args.llama_lib or os.environ.get("DELTAW_LLAMA_CPP_LIB", "")
    if not sdist or not lib:
        skip("set DELTAW_LLAMA_CPP_PYTHON (unpacked llama-cpp-python sdist) and DELTAW_LLAMA_CPP_LIB "
             "(directory with the libllama built from it)")
    src = os.path.join(sdist, "vendor", "llama.cpp")
    for p in (os.path.join(src, "convert_hf_to_gguf.py"), os.path.join(src, "convert_lora_to_gguf.py"),
              os.path.join(sdist, "llama_cpp", "llama_cpp.py")):
        if not os.path.isfile(p):
            skip(p + " not found")
    if not os.path.isdir(lib) or not any(f.startswith("libllama") for f in os.listdir(lib)):
        skip("no libllama in " + lib)
    try:
        import numpy as np
        import torch
        import transformers
        import peft
        from safetensors.numpy import load_file
    except ImportError as e:
        skip(str(e))

    d = args.dir
    os.makedirs(d, exist_ok=True)
    torch.manual_seed(0)
    model_dir, adapter_dir = os.path.join(d, "model"), os.path.join(d, "adapter")

    # --- 1. the base model, with a Llama-style byte-fallback BPE tokenizer built offline
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab["<0x%02X>" % b] = len(vocab)
    for t in ["\u2581", "a", "b"]:
        vocab[t] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    hf_tok = transformers.LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                             unk_token="<unk>")
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                                   initializer_range=0.15, tie_word_embeddings=False, bos_token_id=1,
                                   eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    hf_tok.save_pretrained(model_dir)
    base_gguf = os.path.join(d, "base.gguf")
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converters then use their own gguf-py
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        # convert_hf_to_gguf.py imports sentencepiece before looking for tokenizer.model; a
        # stub lets it fall through to the tokenizer.json vocabulary this model has.
        stubs = os.path.join(d, "stubs")
        os.makedirs(stubs, exist_ok=True)
        with open(os.path.join(stubs, "sentencepiece.py"), "w") as f:
            f.write("class SentencePieceProcessor:\n    pass\n")
        env["PYTHONPATH"] = stubs + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.join(src, "convert_hf_to_gguf.py"), model_dir, "--outfile",
                        base_gguf, "--outtype", "f32"], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:])
    check(r.returncode == 0, "convert_hf_to_gguf.py converted the tiny Llama")

    # --- 2. the PEFT adapter
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                           lora_dropout=0.0, init_lora_weights=False)
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(model_dir).float().eval(), lcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(adapter_dir)
    tokens = [1, 70, 259, 260, 100, 5, 261, 33, 200, 7, 150, 260]

    def rel(a, b):
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

    with torch.no_grad():
        ids = torch.tensor([tokens])
        ref_base = model(ids).logits[0].double().numpy()
        ref_lora = pm(ids).logits[0].double().numpy()
        merged = pm.merge_and_unload()
        ref_merged = merged(ids).logits[0].double().numpy()
    check(rel(ref_lora, ref_merged) < 1e-5, "PEFT forward = merged model (%.2e)" % rel(ref_lora, ref_merged))
    check(rel(ref_lora, ref_base) > 0.05, "the adapter moves the logits (%.3f)" % rel(ref_lora, ref_base))
    # Only q and k: how much they alone move the logits (the rows llama.cpp reorders).
    delta = {}
    st = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    scale = lcfg.lora_alpha / lcfg.r
    for k, v in st.items():
        if k.endswith(".lora_A.weight"):
            mod = k[len("base_model.model."):-len(".lora_A.weight")]
            delta[mod] = scale * (st[k.replace("lora_A", "lora_B")].astype(np.float64) @ v.astype(np.float64))

    # --- 3. deltaw's GGUF and llama.cpp's
    ours, ours_old, theirs = (os.path.join(d, n) for n in ("deltaw.gguf", "deltaw_peft_rows.gguf", "llama_cpp.gguf"))
    for out, extra in ((ours, []), (ours_old, ["--as-stored"])):
        r = subprocess.run([args.writer, "write", adapter_dir, base_gguf, out] + extra, capture_output=True, text=True)
        print(r.stdout.strip(), r.stderr.strip())
        check(r.returncode == 0, "deltaw wrote " + os.path.basename(out))
    r = subprocess.run([sys.executable, os.path.join(src, "convert_lora_to_gguf.py"), "--base", model_dir,
                        "--outfile", theirs, "--outtype", "f32", adapter_dir], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:])
    check(r.returncode == 0, "convert_lora_to_gguf.py converted the PEFT adapter")

    sys.path.insert(0, os.path.join(src, "gguf-py"))
    import gguf

    def tensors(p):
        rd = gguf.GGUFReader(p)
        return rd, {t.name: np.array(t.data) for t in rd.tensors}

    def field(rd, k):
        f = rd.fields[k]
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else float(v[0])

    rd_o, t_o = tensors(ours)
    rd_t, t_t = tensors(theirs)
    check(sorted(t_o) == sorted(t_t), "same tensor names (%d)" % len(t_t))
    check(field(rd_o, "general.architecture") == field(rd_t, "general.architecture") == "llama", "architecture llama")
    check(field(rd_o, "adapter.lora.alpha") == field(rd_t, "adapter.lora.alpha") == 8.0, "adapter.lora.alpha = 8")
    worst = 0.0
    for n in sorted(set(t_o) & set(t_t)):
        same_shape = t_o[n].shape == t_t[n].shape
        check(same_shape, "%s: shape %s (llama.cpp %s)" % (n, t_o[n].shape, t_t[n].shape))
        if same_shape:
            worst = max(worst, float(np.max(np.abs(t_o[n].astype(np.float64) - t_t[n].astype(np.float64)))))
    check(worst == 0.0, "every lora_a / lora_b equals llama.cpp's converter's (max |diff| %.3g)" % worst)
    _, t_old = tensors(ours_old)
    moved = [n for n in t_t if not np.array_equal(t_old[n], t_t[n])]
    check(sorted(moved) == sorted(n for n in t_t if n.endswith(".lora_b") and (".attn_q." in n or ".attn_k." in n)),
          "PEFT's row order differs from llama.cpp's exactly in attn_q / attn_k lora_b (%d tensors)" % len(moved))

    # --- 4. logits from llama.cpp
    os.environ["LLAMA_CPP_LIB_PATH"] = lib
    sys.path.insert(0, sdist)
    try:
        import diskcache  # noqa: F401  (llama_cpp imports it for its disk cache only)
    except ImportError:
        sys.modules["diskcache"] = types.ModuleType("diskcache")
    import llama_cpp

    def run(lora):
        # F32 KV cache (the default F16 alone costs ~1e-3 relative on these logits).
        kw = dict(model_path=base_gguf, n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False,
                  type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        if lora:
            kw["lora_path"] = lora
        llm = llama_cpp.Llama(**kw)
        llm.eval(tokens)
        out = np.array(llm.scores[:len(tokens)], dtype=np.float64)
        llm.close()
        return out

    e_base = rel(run(None), ref_base)
    e_ours = rel(run(ours), ref_merged)
    e_theirs = rel(run(theirs), ref_merged)
    e_old = rel(run(ours_old), ref_merged)
    check(e_base <= 1e-3, "llama.cpp base model = PyTorch's (rel err %.2e)" % e_base)
    check(e_ours <= 1e-3, "llama.cpp + deltaw's adapter = merged PyTorch model (rel err %.2e)" % e_ours)
    check(e_theirs <= 1e-3, "llama.cpp + llama.cpp's own adapter = merged PyTorch model (rel err %.2e)" % e_theirs)
    check(e_old > 1e-2, "llama.cpp + PEFT-row-order adapter is off (rel err %.3f): the check sees the bug" % e_old)

    # --- 5. deltaw reads llama.cpp's adapter back into PEFT's rows
    back = os.path.join(d, "read_back.safetensors")
    r = subprocess.run([args.writer, "read", theirs, base_gguf, back], capture_output=True, text=True)
    print(r.stdout.strip(), r.stderr.strip())
    check(r.returncode == 0, "deltaw read llama.cpp's adapter")
    if r.returncode == 0:
        got = load_file(back)
        names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
        worst = 0.0
        for mod, dw_ in delta.items():
            layer = mod.split(".")[2]
            gg = "blk.%s.%s.weight" % (layer, names[mod.split(".")[-1]])
            worst = max(worst, rel(got[gg].astype(np.float64), dw_))
        check(len(got) == len(delta) == 8, "8 updates read back")
        check(worst < 1e-6, "deltaw's reading of llama.cpp's adapter = PEFT's s·B·A (rel err %.2e)" % worst)

    summary = {"base": e_base, "deltaw": e_ours, "llama_cpp_converter": e_theirs, "peft_rows": e_old}
    print("logits rel err: " + json.dumps(summary))
    if failures:
        print("%d check(s) failed" % len(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
