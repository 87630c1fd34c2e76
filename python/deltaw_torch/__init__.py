# SPDX-License-Identifier: MIT
"""deltaw inside PyTorch.

deltaw's structured updates (LoKr, MiSS / Bone bat, LoHa, IA³, LoRA, AdaLoRA, HiRA, DeLoRA,
OFT, HRA, BOFT, RoAd, RandLoRA over stored bases, and VeRA as a low-rank update) as one
``torch.autograd.Function`` that reads PyTorch's tensors in place (their data pointers and
strides become deltaw views; nothing is copied), and
``swap_peft_forward(model)``, which makes the matching layers of a PEFT model compute
their forward and backward with deltaw while PEFT's ``nn.Parameter``s stay the source of
truth (their ``.grad`` is filled as with PEFT's own forward). ``restore(model)`` undoes it.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` against the
installed torch's headers and libraries (see docs/torch.md), or imported when it was
installed with ``pip install ./python``.
"""
from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Sequence

import torch

__all__ = [
    "load", "apply", "apply_transposed", "delta", "lokr", "miss", "bone_bat", "low_rank", "loha", "ia3", "adalora",
    "hira", "delora", "oft", "hra", "boft", "road", "randlora", "shira",
    "swap_peft_forward", "restore", "SUPPORTED", "torch_blas_flags", "stats",
]

# The update kinds of csrc/dw_kernels.hpp.
(LOKR_DD, LOKR_LD, LOKR_DL, LOKR_LL, MISS, BONE_BAT, LOW_RANK, LOHA, IA3_OUT, IA3_IN, ADALORA, HIRA, DELORA, OFT, HRA, BOFT,
 ROAD, RANDLORA, SHIRA) = range(19)

_HERE = Path(__file__).resolve().parent
_ext = None
#: Calls of deltaw's forward / backward (the tests read it to see that deltaw ran).
stats = {"forward": 0, "backward": 0}


def _eigen_include() -> str:
    for p in (os.environ.get("DELTAW_EIGEN_INCLUDE"), "/usr/include/eigen3", "/usr/local/include/eigen3"):
        if p and Path(p, "Eigen", "Core").exists():
            return p
    raise RuntimeError("deltaw_torch: Eigen 3 headers not found (install libeigen3-dev or set DELTAW_EIGEN_INCLUDE)")


def _deltaw_include() -> str:
    p = os.environ.get("DELTAW_INCLUDE") or str(_HERE.parent.parent / "include")
    if not Path(p, "deltaw", "deltaw.hpp").exists():
        raise RuntimeError(f"deltaw_torch: deltaw's headers not found under {p} (set DELTAW_INCLUDE)")
    return p


#: The Fortran BLAS entry points deltaw's kernels (through Eigen's EIGEN_USE_BLAS) may call.
_BLAS_SYMBOLS = ("sgemm_", "dgemm_", "sgemv_", "dgemv_", "strsm_", "dtrsm_")


def torch_blas_flags() -> list[str]:
    """["-DEIGEN_USE_BLAS", "-DDELTAW_USE_BLAS"] when the installed torch's libtorch_cpu
    exports the BLAS entry points deltaw's products call (x86-64 wheels carry MKL's), so that
    deltaw's GEMMs run in the same BLAS, with the same threads, as torch's; [] otherwise
    (deltaw then uses Eigen's own GEMM). DELTAW_TORCH_BLAS=0 forces [] ."""
    if os.environ.get("DELTAW_TORCH_BLAS", "1") == "0":
        return []
    import ctypes

    lib = Path(torch.__file__).resolve().parent / "lib" / "libtorch_cpu.so"
    try:
        h = ctypes.CDLL(str(lib))
    except OSError:
        return []
    return ["-DEIGEN_USE_BLAS", "-DDELTAW_USE_BLAS"] if all(hasattr(h, s) for s in _BLAS_SYMBOLS) else []


def load(build_dir: str | os.PathLike | None = None, verbose: bool = False):
    """The compiled extension: the installed ``deltaw_torch._C`` if present, else built (once,
    incrementally, with ninja) into ``build_dir`` (default ``$DELTAW_TORCH_BUILD`` or
    ``build/torch_ext`` at the repository root). ``MAX_JOBS`` defaults to 1. deltaw's
    products go to torch's own BLAS when it exports one (torch_blas_flags)."""
    global _ext
    if _ext is not None:
        return _ext
    try:
        from . import _C  # type: ignore[attr-defined]

        _ext = _C
        return _ext
    except ImportError:
        pass
    from torch.utils import cpp_extension

    bd = Path(build_dir or os.environ.get("DELTAW_TORCH_BUILD") or _HERE.parent.parent / "build" / "torch_ext")
    bd.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "1")
    _ext = cpp_extension.load(
        name="deltaw_torch_ext",
        sources=[str(_HERE / "csrc" / "bindings.cpp"), str(_HERE / "csrc" / "dw_kernels.cpp")],
        extra_include_paths=[_deltaw_include(), _eigen_include()],
        extra_cflags=["-O2", "-DNDEBUG", *torch_blas_flags()],
        build_directory=str(bd),
        verbose=verbose,
    )
    return _ext


# ─────────────────────────────────────────────────────────────────────────────────────────
# autograd
# ─────────────────────────────────────────────────────────────────────────────────────────


class _Delta(torch.autograd.Function):
    """y = x·ΔWᵀ (x·(W + ΔW)ᵀ for the kinds that read W) on a [tokens, in] input."""

    @staticmethod
    def forward(ctx, meta, x2d, *factors):
        kind, scale, out_f, in_f, opts, index = meta
        ext = load()
        stats["forward"] += 1
        y = ext.apply(kind, list(factors), scale, out_f, in_f, x2d, list(opts), index)
        ctx.meta = meta
        ctx.save_for_backward(x2d, *factors)
        return y

    @staticmethod
    def backward(ctx, dy):
        kind, scale, out_f, in_f, opts, index = ctx.meta
        ext = load()
        stats["backward"] += 1
        x2d, *factors = ctx.saved_tensors
        idx = [ext.trainable_index(kind, i) for i in range(ext.trainable_count(kind))]
        need = [bool(ctx.needs_input_grad[2 + j]) for j in idx]
        need_dx = bool(ctx.needs_input_grad[1])
        if dy.dtype != torch.float32:
            dy = dy.float()
        dx, grads = ext.backward(kind, list(factors), scale, out_f, in_f, x2d, dy, need, need_dx, list(opts), index)
        out = [None] * len(factors)
        for j, gr in zip(idx, grads):
            out[j] = gr
        return (None, dx, *out)


def delta(kind: int, x: torch.Tensor, factors: Sequence[torch.Tensor], scale: float, out_features: int,
          in_features: int, opts: Sequence[int] = (), index: torch.Tensor | None = None) -> torch.Tensor:
    """The differentiable x·ΔWᵀ of one update kind (x·(W + ΔW)ᵀ for the kinds that read W:
    Bone bat, IA³, OFT, HRA, BOFT, RoAd); x [..., in] → [..., out]. index: SHiRA's [2, nnz]."""
    if x.shape[-1] != in_features:
        raise ValueError(f"deltaw_torch.delta: x has {x.shape[-1]} features, the layer has in_features = {in_features}")
    lead = x.shape[:-1]
    meta = (int(kind), float(scale), int(out_features), int(in_features), tuple(int(o) for o in opts), index)
    y = _Delta.apply(meta, x.reshape(-1, in_features), *factors)
    return y.reshape(*lead, out_features)


def apply(kind: int, x: torch.Tensor, factors: Sequence[torch.Tensor], scale: float, out_features: int,
          in_features: int, opts: Sequence[int] = (), index: torch.Tensor | None = None) -> torch.Tensor:
    """x·ΔWᵀ without autograd (x [tokens, in])."""
    return load().apply(int(kind), list(factors), float(scale), int(out_features), int(in_features), x, list(opts),
                        index)


def apply_transposed(kind: int, g: torch.Tensor, factors: Sequence[torch.Tensor], scale: float, out_features: int,
                     in_features: int, opts: Sequence[int] = (), index: torch.Tensor | None = None) -> torch.Tensor:
    """g·ΔW without autograd (g [tokens, out])."""
    return load().apply_transposed(int(kind), list(factors), float(scale), int(out_features), int(in_features), g,
                                   list(opts), index)


def _factor(w):
    return (w,) if isinstance(w, torch.Tensor) else tuple(w)


def lokr(x, w1, w2, scale: float = 1.0):
    """x·(s·w1 ⊗ w2)ᵀ; w1, w2: a tensor (PEFT's lokr_w1) or a pair (lokr_w1_a, lokr_w1_b)."""
    f1, f2 = _factor(w1), _factor(w2)
    kind = {(1, 1): LOKR_DD, (2, 1): LOKR_LD, (1, 2): LOKR_DL, (2, 2): LOKR_LL}[(len(f1), len(f2))]
    a = f1[0].shape[0]
    c = f1[-1].shape[1]
    b = f2[0].shape[0]
    d = f2[-1].shape[1]
    return delta(kind, x, f1 + f2, scale, a * b, c * d)


def miss(x, block, out_features: int):
    """MiSS: block [r, out] (default) or [r, mini_r] ("mini")."""
    return delta(MISS, x, (block,), 1.0, out_features, x.shape[-1])


def bone_bat(x, weight, block):
    """x·(W + ΔW)ᵀ of Bone "bat" (no bias); block: PEFT's miss_block [out/r, r, r] or [out, r]."""
    out_f, in_f = weight.shape
    b = block.reshape(out_f, block.shape[-1])
    return delta(BONE_BAT, x, (weight, b), 1.0, out_f, in_f)


def low_rank(x, B, A, scale: float = 1.0):
    """x·(s·B·A)ᵀ, B [out, r], A [r, in] (any strides)."""
    return delta(LOW_RANK, x, (B, A), scale, B.shape[0], A.shape[1])


def loha(x, w1_a, w1_b, w2_a, w2_b, scale: float = 1.0):
    """x·(s·(w1_a·w1_b) ⊙ (w2_a·w2_b))ᵀ."""
    return delta(LOHA, x, (w1_a, w1_b, w2_a, w2_b), scale, w1_a.shape[0], w1_b.shape[1])


def ia3(x, weight, l, output_side: bool = True):
    """x·W'ᵀ of IA³ (no bias): W' = diag(l)·W (output side) or W·diag(l) (input side)."""
    out_f, in_f = weight.shape
    return delta(IA3_OUT if output_side else IA3_IN, x, (weight, l.reshape(-1)), 1.0, out_f, in_f)


def adalora(x, B, E, A, scale: float = 1.0):
    """x·(s·B·diag(E)·A)ᵀ; E: PEFT's lora_E [r, 1]."""
    return delta(ADALORA, x, (B, E, A), scale, B.shape[0], A.shape[1])


def hira(x, weight, B, A):
    """x·(W ⊙ (B·A))ᵀ (W frozen; the base term is the caller's)."""
    return delta(HIRA, x, (weight, B, A), 1.0, weight.shape[0], weight.shape[1])


def delora(x, B, A, lam, w_norm):
    """x·ΔWᵀ of DeLoRA: ΔW = B·diag(c)·A·diag(w), c_i = λ / (r·‖A[i]‖·‖B[:, i]‖) (norms ≥ 1e-4)."""
    return delta(DELORA, x, (B, A, lam.reshape(-1), w_norm.reshape(-1)), 1.0, B.shape[0], A.shape[1])


def randlora(x, U, A, lam, gam, scale: float, out_features: int):
    """x·ΔWᵀ of RandLoRA over stored bases: U [max_dim, N·r] (PEFT's randlora_B[:max_dim, :N]
    flattened), A [r, min_dim] (randlora_A), λ [r, N], γ [N, min_dim]; ΔW = s·U·V (out ≥ in) or
    s·Vᵀ·Uᵀ with V = λ·A·γ [N·r, min_dim] (PEFT's pairing), V never formed."""
    return delta(RANDLORA, x, (U, A, lam, gam), scale, out_features, x.shape[-1])


def shira(x, values, indices, scale: float, out_features: int):
    """x·ΔWᵀ of SHiRA: ΔW[indices[0, k], indices[1, k]] = s·values[k] (PEFT's shira_weight,
    shira_indices int32 or int64 [2, nnz]); the sparse pattern is built per call, ΔW never dense."""
    return delta(SHIRA, x, (values,), scale, out_features, x.shape[-1], (), indices.contiguous())


def oft(x, weight, Q, cayley_neumann: bool = True, neumann_terms: int = 5):
    """x·(W·Rᵀ)ᵀ = (x·R)·Wᵀ of OFT (no bias): R = blockdiag of the rotations of Q's rows
    (PEFT's oft_R.weight [nq, b(b−1)/2]; one shared row for block_share)."""
    return delta(OFT, x, (weight, Q), 1.0, weight.shape[0], weight.shape[1], (int(cayley_neumann), neumann_terms))


def hra(x, weight, U, gram_schmidt: bool = False):
    """x·(W·H)ᵀ of HRA (no bias): H the product of the Householder reflections of U's columns
    (PEFT's hra_u [in, r]); gram_schmidt: PEFT's apply_GS."""
    return delta(HRA, x, (weight, U), 1.0, weight.shape[0], weight.shape[1], (int(gram_schmidt),))


def boft(x, weight, R, s, cayley_neumann: bool = False, neumann_terms: int = 5):
    """x·W'ᵀ of BOFT (no bias): R = PEFT's boft_R [m, nb, b, b], s = boft_s [out, 1]."""
    b = R.shape[-1]
    return delta(BOFT, x, (weight, R.reshape(-1, b), s.reshape(-1)), 1.0, weight.shape[0], weight.shape[1],
                 (int(cayley_neumann), neumann_terms))


def road(x, weight, theta, alpha, variant: int, group_size: int):
    """x·(R·W)ᵀ of RoAd (no bias; PEFT rotates the bias too); variant 1, 2 or 4."""
    return delta(ROAD, x, (weight, theta.reshape(-1), alpha.reshape(-1)), 1.0, weight.shape[0], weight.shape[1],
                 (int(variant), int(group_size)))


# ─────────────────────────────────────────────────────────────────────────────────────────
# PEFT
# ─────────────────────────────────────────────────────────────────────────────────────────

_ORIGINAL = "_deltaw_original_forward"


def _usable(layer, x) -> bool:
    """deltaw's forward runs for CPU float32 inputs, adapters unmerged and enabled; anything
    else goes to PEFT's own forward."""
    return (not layer.disable_adapters) and (not layer.merged) and x.device.type == "cpu" and x.dtype == torch.float32


def _active(layer, params) -> list[str]:
    return [a for a in layer.active_adapters if a in params]


def _lycoris_dropout(layer, adapters) -> bool:
    return layer.training and any(layer.module_dropout[a] or layer.rank_dropout[a] for a in adapters)


def _lokr_forward(self, x, *args, **kwargs):
    adapters = _active(self, self._available_adapters)
    if not _usable(self, x) or _lycoris_dropout(self, adapters) or any(a in self.lokr_t2 for a in adapters):
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for a in adapters:
        w1 = self.lokr_w1[a] if a in self.lokr_w1 else (self.lokr_w1_a[a], self.lokr_w1_b[a])
        w2 = self.lokr_w2[a] if a in self.lokr_w2 else (self.lokr_w2_a[a], self.lokr_w2_b[a])
        result = result + lokr(x, w1, w2, self.scaling[a])
    return result


def _loha_forward(self, x, *args, **kwargs):
    adapters = _active(self, self._available_adapters)
    if not _usable(self, x) or _lycoris_dropout(self, adapters) or any(a in self.hada_t1 for a in adapters):
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for a in adapters:
        result = result + loha(x, self.hada_w1_a[a], self.hada_w1_b[a], self.hada_w2_a[a], self.hada_w2_b[a],
                               self.scaling[a])
    return result


def _miss_forward(self, x, *args, **kwargs):
    adapters = _active(self, self.miss_block)
    bat = self.miss_fn == "bat"
    if not _usable(self, x) or (bat and (len(adapters) != 1 or args or kwargs)):
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    if bat:
        base = self.get_base_layer()
        y = bone_bat(x, base.weight, self.miss_block[adapters[0]])
        return y if base.bias is None else y + base.bias
    result = self.base_layer(x, *args, **kwargs)
    for a in adapters:
        result = result + miss(self.miss_dropout[a](x), self.miss_block[a], self.out_features)
    return result


def _vera_forward(self, x, *args, **kwargs):
    adapters = _active(self, self.vera_lambda_d)
    if not _usable(self, x) or getattr(self, "fan_in_fan_out", False):
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for a in adapters:
        B = self.vera_B[a][: self.out_features, :]
        A = self.vera_A[a][:, : self.in_features]
        # B' = diag(λ_b)·B·diag(λ_d) [out, r] is formed by torch (out·r values), so that the
        # gradients of λ_b, λ_d follow by torch's chain rule from deltaw's gradient of B'.
        Bp = self.vera_lambda_b[a][:, None] * B * self.vera_lambda_d[a][None, :]
        result = result + low_rank(self.vera_dropout[a](x), Bp, A, 1.0)
    return result


def _randlora_forward(self, x, *args, **kwargs):
    adapters = _active(self, self.randlora_lambda)
    if not _usable(self, x) or getattr(self, "fan_in_fan_out", False):
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    mn, mx = min(self.out_features, self.in_features), max(self.out_features, self.in_features)
    for a in adapters:
        N = self.num_bases
        A = self.randlora_A[a]
        if A.dim() != 3 or A.shape[1] != 1:
            return getattr(self, _ORIGINAL)(x, *args, **kwargs)
        # U [max_dim, N·r]: a view when N is the shared N (else torch's flatten copies the slice);
        # A [r, min_dim]: a strided view of the shared basis.
        U = self.randlora_B[a][:mx, :N, :].flatten(start_dim=1)
        result = result + randlora(self.randlora_dropout[a](x), U, A[:, 0, :mn], self.randlora_lambda[a],
                                   self.randlora_gamma[a], self.scaling[a], self.out_features)
    return result


def _ia3_forward(self, x, *args, **kwargs):
    adapters = _active(self, self.ia3_l)
    if not _usable(self, x) or getattr(self, "fan_in_fan_out", False) or not adapters or args or kwargs:
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    l = self.ia3_l[adapters[0]].flatten()
    for a in adapters[1:]:
        l = l * self.ia3_l[a].flatten()
    base = self.get_base_layer()
    y = ia3(x, base.weight, l, output_side=not self.is_feedforward)
    if base.bias is None:
        return y
    # PEFT scales the whole output, bias included, on the output side.
    return y + (base.bias if self.is_feedforward else base.bias * l)


def _lora_forward(self, x, *args, **kwargs):
    adapters = _active(self, self.lora_A)
    if (not _usable(self, x) or kwargs or getattr(self, "fan_in_fan_out", False)
            or any(a in self.lora_variant or self.lora_B[a].bias is not None for a in adapters)):
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for a in adapters:
        result = result + low_rank(self.lora_dropout[a](x), self.lora_B[a].weight, self.lora_A[a].weight,
                                   self.scaling[a])
    return result


def _adalora_forward(self, x, *args, **kwargs):
    adapters = _active(self, self.lora_A)
    if not _usable(self, x) or getattr(self, "fan_in_fan_out", False):
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for a in adapters:
        s = self.scaling[a] / (float(self.ranknum[a]) + 1e-5)
        result = result + adalora(self.lora_dropout[a](x), self.lora_B[a], self.lora_E[a], self.lora_A[a], s)
    return result


def _hira_forward(self, x, *args, **kwargs):
    adapters = _active(self, self.hira_A)
    if not _usable(self, x) or getattr(self, "fan_in_fan_out", False):
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    w = self.get_base_layer().weight
    for a in adapters:
        result = result + hira(self.hira_dropout[a](x), w, self.hira_B[a], self.hira_A[a])
    return result


def _delora_forward(self, x, *args, **kwargs):
    adapters = _active(self, self.delora_A)
    if not _usable(self, x):
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for a in adapters:
        if self.r[a] != self.delora_A[a].shape[0]:
            return getattr(self, _ORIGINAL)(x, *args, **kwargs)
        result = result + delora(self.delora_dropout[a](x), self.delora_B[a], self.delora_A[a], self.delora_lambda[a],
                                 self.delora_w_norm[a])
    return result


def _oft_forward(self, x, *args, **kwargs):
    adapters = _active(self, self.oft_R)
    if not _usable(self, x) or len(adapters) != 1 or args or kwargs or getattr(self, "fan_in_fan_out", False):
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    mod = self.oft_R[adapters[0]]
    if mod.coft:
        # PEFT's own projection, in place under no_grad, exactly as its forward does.
        with torch.no_grad():
            mod.weight.copy_(mod._project_batch(mod.weight, eps=mod.eps))
    base = self.get_base_layer()
    y = oft(x, base.weight, mod.weight, bool(mod.use_cayley_neumann), int(mod.num_cayley_neumann_terms))
    return y if base.bias is None else y + base.bias


def _hra_forward(self, x, *args, **kwargs):
    adapters = _active(self, self.hra_u)
    if not _usable(self, x) or len(adapters) != 1 or args or kwargs:
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    a = adapters[0]
    base = self.get_base_layer()
    # PEFT multiplies by weight.data: W receives no gradient there either.
    y = hra(x, base.weight.detach(), self.hra_u[a], bool(self.hra_apply_GS[a]))
    return y if base.bias is None else y + base.bias


def _boft_forward(self, x, *args, **kwargs):
    adapters = _active(self, self.boft_R)
    if (not _usable(self, x) or len(adapters) != 1 or args or kwargs
            or (self.training and getattr(self.boft_dropout[adapters[0]], "p", 0) > 0)):
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    a = adapters[0]
    base = self.get_base_layer()
    y = boft(x, base.weight, self.boft_R[a], self.boft_s[a])
    return y if base.bias is None else y + base.bias


def _road_forward(self, x, *args, **kwargs):
    adapters = _active(self, self._available_adapters)
    if not _usable(self, x) or len(adapters) != 1 or args or kwargs:
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    a = adapters[0]
    base = self.get_base_layer()
    variant = {"road_1": 1, "road_2": 2, "road_4": 4}[self.variant[a]]
    y = road(x, base.weight, self.road_theta[a], self.road_alpha[a], variant, self.group_size[a])
    if base.bias is None:
        return y
    # The rotated bias R·b (out values) by PEFT's own rotation helper, so θ and α get its gradient.
    from peft.tuners.road.layer import _apply_road

    return y + _apply_road(self.variant[a], self.group_size[a], self.road_theta[a], self.road_alpha[a],
                           base.bias[None, :])[0]


def _shira_forward(self, x, *args, **kwargs):
    adapters = _active(self, self.shira_weight)
    if not _usable(self, x) or getattr(self, "quantization_backend", None) is not None:
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for a in adapters:
        idx = self.shira_indices[a]
        if idx.device != x.device:
            return getattr(self, _ORIGINAL)(x, *args, **kwargs)
        result = result + shira(x, self.shira_weight[a], idx, self.scaling[a], self.out_features)
    return result


def _registry():
    """PEFT layer class → deltaw forward, for the PEFT types importable here."""
    reg = {}
    import importlib

    for mod, cls, fwd in (
        ("peft.tuners.lokr.layer", "Linear", _lokr_forward),
        ("peft.tuners.loha.layer", "Linear", _loha_forward),
        ("peft.tuners.miss.layer", "MissLinear", _miss_forward),
        ("peft.tuners.vera.layer", "Linear", _vera_forward),
        ("peft.tuners.randlora.layer", "Linear", _randlora_forward),
        ("peft.tuners.ia3.layer", "Linear", _ia3_forward),
        ("peft.tuners.lora.layer", "Linear", _lora_forward),
        ("peft.tuners.adalora.layer", "SVDLinear", _adalora_forward),
        ("peft.tuners.hira.layer", "Linear", _hira_forward),
        ("peft.tuners.delora.layer", "DeloraLinear", _delora_forward),
        ("peft.tuners.oft.layer", "Linear", _oft_forward),
        ("peft.tuners.hra.layer", "HRALinear", _hra_forward),
        ("peft.tuners.boft.layer", "Linear", _boft_forward),
        ("peft.tuners.road.layer", "Linear", _road_forward),
        ("peft.tuners.shira.layer", "Linear", _shira_forward),
    ):
        try:
            reg[getattr(importlib.import_module(mod), cls)] = fwd
        except (ImportError, AttributeError):
            pass
    return reg


SUPPORTED = ("LOKR", "LOHA", "MISS", "VERA", "RANDLORA", "IA3", "LORA", "ADALORA", "HIRA", "DELORA", "OFT", "HRA", "BOFT",
             "ROAD", "SHIRA")


def swap_peft_forward(model: torch.nn.Module, build_dir=None) -> list[str]:
    """Replaces the forward of every LoKr, LoHa, MiSS, VeRA, RandLoRA, IA³, LoRA (plain, no
    DoRA or other variant), AdaLoRA, HiRA, DeLoRA, OFT, HRA, BOFT, RoAd and SHiRA Linear layer of
    ``model`` (a PeftModel or any module holding PEFT layers) with deltaw's. PEFT's parameters
    stay where they are and receive the gradients. Layers whose input is not CPU float32, that
    are merged or disabled, or that use a feature deltaw's forward does not cover (LoKr/LoHa
    rank or module dropout while training, convolution factors, fan_in_fan_out, several Bone
    bat adapters at once, LoRA variants such as DoRA, lora_bias, mixed-adapter batches,
    several active OFT / HRA / BOFT / RoAd adapters, BOFT's dropout while training) fall back
    to PEFT's forward call by call. Returns the swapped
    layers' names."""
    load(build_dir)
    reg = _registry()
    swapped = []
    for name, m in model.named_modules():
        fwd = reg.get(type(m))
        if fwd is None or _ORIGINAL in m.__dict__:
            continue
        m.__dict__[_ORIGINAL] = m.forward
        m.forward = types.MethodType(fwd, m)
        swapped.append(name)
    return swapped


def restore(model: torch.nn.Module) -> list[str]:
    """Undoes swap_peft_forward; returns the restored layers' names."""
    restored = []
    for name, m in model.named_modules():
        if _ORIGINAL in m.__dict__:
            del m.__dict__["forward"]
            del m.__dict__[_ORIGINAL]
            restored.append(name)
    return restored
