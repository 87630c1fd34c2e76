"""PEFT as the second reference for deltaw's data-driven initialisations.

Writes inputs, runs init_peft_writer (deltaw), and compares with PEFT:
  LoRA-GA (PEFT's variant, stable scale, gamma 16) through get_peft_model(init_lora_weights="lora_ga"),
  incremental PCA against peft.utils.incremental_pca.IncrementalPCA (lowrank, q = 2k, 4 iterations),
  CorDA IPM / KPM against peft.tuners.lora.corda.collect_eigens_for_layer and PEFT's A/B formula.
PEFT computes LoRA-GA's and CorDA's SVDs in float32, hence the 1e-5-level tolerances there.
Exit 77 (skipped) when torch or peft is missing.
"""
import argparse
import os
import subprocess
import sys

try:
    import numpy as np
    import torch
    from torch import nn
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraGAConfig
    from peft.tuners.lora.corda import collect_eigens_for_layer
    from peft.utils.incremental_pca import IncrementalPCA
except Exception as e:  # noqa: BLE001
    print(f"SKIPPED: {e}")
    sys.exit(77)

ap = argparse.ArgumentParser()
ap.add_argument("--writer", required=True)
ap.add_argument("--dir", required=True)
args = ap.parse_args()
os.makedirs(args.dir, exist_ok=True)
rng = np.random.default_rng(0)
torch.manual_seed(0)  # torch.svd_lowrank inside PEFT draws from it
failures = []


def path(name):
    return os.path.join(args.dir, name)


def save(name, a):
    np.ascontiguousarray(a, dtype=np.float64).tofile(path(name))


def load(name, shape):
    return np.fromfile(path(name), dtype=np.float64).reshape(shape)


def check(what, err, tol):
    ok = err <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {what}: {err:.3e} (tolerance {tol:.0e})")
    if not ok:
        failures.append(what)


def orth(p, k):
    q, _ = np.linalg.qr(rng.standard_normal((p, k)))
    return q


W = rng.uniform(-1, 1, (64, 48))
G = orth(64, 48) @ np.diag(4.0 * 0.75 ** np.arange(48)) @ orth(48, 48).T
X = (rng.standard_normal((600, 6)) @ np.diag([9, 7, 5, 3.5, 2.5, 1.8]) @ orth(40, 6).T
     + np.linspace(-2, 3, 40) + 1e-4 * rng.standard_normal((600, 40)))
Wc = rng.uniform(-1, 1, (24, 30))
Xc = rng.standard_normal((500, 30)) @ np.diag(np.linspace(0.2, 3, 30)) @ rng.uniform(-1, 1, (30, 30))
C = Xc.T @ Xc / 500
for name, a in (("W.bin", W), ("G.bin", G), ("X.bin", X), ("Wc.bin", Wc), ("C.bin", C)):
    save(name, a)
subprocess.run([args.writer, args.dir], check=True)

# LoRA-GA: r = 4, alpha = 8 (s = 2). Singular vectors have arbitrary signs: align them.
model = nn.Sequential(nn.Linear(48, 64, bias=False)).double()
model[0].weight.data = torch.tensor(W)
model[0]._peft_loraga_grad = torch.tensor(G)
cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
lin = get_peft_model(model, cfg).base_model.model[0]
A = lin.lora_A["default"].weight.detach().double().numpy()
B = lin.lora_B["default"].weight.detach().double().numpy()
dA, dB = load("ga_peft_A.bin", (4, 48)), load("ga_peft_B.bin", (64, 4))
sa = np.sign(np.sum(A * dA, axis=1, keepdims=True))
sb = np.sign(np.sum(B * dB, axis=0, keepdims=True))
check("LoRA-GA (peft variant) A vs PEFT, up to signs", np.abs(dA - sa * A).max(), 1e-5)
check("LoRA-GA (peft variant) B vs PEFT, up to signs", np.abs(dB - sb * B).max() / np.abs(B).max(), 1e-5)
check("LoRA-GA deltaw W_res + s·B·A vs W", np.abs(load("ga_peft_W.bin", (64, 48)) + 2.0 * dB @ dA - W).max(), 1e-14)

# Incremental PCA: 12 batches of 50, k = 6 (signs are fixed by V in both).
ip = IncrementalPCA(n_components=6, lowrank=True, lowrank_seed=42)
Xt = torch.tensor(X)
for b in range(12):
    ip.partial_fit(Xt[b * 50:(b + 1) * 50])
check("incremental PCA components vs PEFT", np.abs(load("ipca_C.bin", (6, 40)) - ip.components_.numpy()).max(), 1e-10)
check("incremental PCA singular values vs PEFT (relative)",
      np.abs(load("ipca_S.bin", (6,)) / ip.singular_values_.numpy() - 1).max(), 1e-10)
check("incremental PCA explained-variance ratios vs PEFT",
      np.abs(load("ipca_R.bin", (6,)) - ip.explained_variance_ratio_.numpy()).max(), 1e-10)

# CorDA: r = 4, s = 2; PEFT's eigens (float32) and its lora_A / lora_B formula.
for method in ("ipm", "kpm"):
    lin = nn.Linear(30, 24, bias=False)
    lin.weight.data = torch.tensor(Wc, dtype=torch.float32)
    lin.covariance_matrix = torch.tensor(C, dtype=torch.float32)
    e = collect_eigens_for_layer(lin, None)
    sl = slice(0, 4) if method == "ipm" else slice(-4, None)
    S = e.S_WC[sl].double() / 2.0
    lora_B = e.U_WC[:, sl].double() * S.sqrt()
    lora_A = e.V_WC[:, sl].double().t() * S.sqrt().view(-1, 1)
    ref = (2.0 * lora_B @ lora_A).numpy()
    d = load(f"corda_{method}_sBA.bin", (24, 30))
    check(f"CorDA {method} s·B·A vs PEFT (relative to max)", np.abs(d - ref).max() / np.abs(ref).max(), 1e-4)

sys.exit(1 if failures else 0)
