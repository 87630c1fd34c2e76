#!/usr/bin/env python3
"""DLPack from PyTorch into deltaw: tensors exported by torch.utils.dlpack.to_dlpack (with
PyTorch's own strides and offsets: transposed, sliced, stepped, fp16/bf16) are viewed by
deltaw::io::dlpack_matrix in the probe library (tests/io/dlpack_probe.cpp), copied out
through the view's strides, and compared with the tensor; refusals name the problem.
(PyTorch has no negative strides; those are covered by the C++ test.)
Exits 77 (skipped) when torch is missing.
Usage: check_dlpack.py --lib path/to/libio_dlpack_probe.so"""
import argparse
import ctypes
import sys

SKIP = 77


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    a = ap.parse_args()
    try:
        import torch
        import torch.utils.dlpack
    except Exception:
        print("SKIPPED: torch missing")
        sys.exit(SKIP)
    lib = ctypes.CDLL(a.lib)
    f = lib.deltaw_dlpack_probe
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_double), ctypes.c_long,
                  ctypes.POINTER(ctypes.c_long), ctypes.POINTER(ctypes.c_long), ctypes.c_char_p, ctypes.c_long]
    get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
    get_ptr.restype = ctypes.c_void_p
    get_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]
    kinds = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
    failures = 0

    def probe(t, writable=False, kind=None):
        cap = torch.utils.dlpack.to_dlpack(t)  # legacy DLManagedTensor; the capsule keeps ownership
        ptr = get_ptr(cap, b"dltensor")
        n = max(1, t.numel())
        out = (ctypes.c_double * n)()
        rows, cols = ctypes.c_long(), ctypes.c_long()
        err = ctypes.create_string_buffer(512)
        k = kinds.get(t.dtype, 0) if kind is None else kind
        rc = f(ptr, k, int(writable), out, n, ctypes.byref(rows), ctypes.byref(cols), err, 512)
        return rc, [out[i] for i in range(n)], (rows.value, cols.value), err.value.decode()

    def check(cond, msg):
        nonlocal failures
        print(("ok: " if cond else "FAIL: ") + msg)
        failures += 0 if cond else 1

    g = torch.Generator().manual_seed(3)
    base = torch.randn(9, 12, generator=g, dtype=torch.float64)
    cases = {
        "contiguous f32": base.float(),
        "transposed f64 (column-major strides)": base.t(),
        "sliced f32 (offset into storage)": base.float()[2:7, 3:11],
        "stepped f32 [::2, ::3] (no unit stride, const view)": base.float()[::2, ::3],
        "f16": base.half(),
        "bf16 transposed": base.bfloat16().t(),
        "one row of a matrix": base.float()[4:5, :],
        "expanded (zero stride, const view)": base.float()[0:1, :].expand(5, 12),
    }
    for name, t in cases.items():
        rc, vals, shape, err = probe(t)
        want = t.double().reshape(-1).tolist()
        ok = rc == 0 and shape == tuple(t.shape) and vals == want
        check(ok, "%s %s strides %s: deltaw's view equals the tensor%s" % (name, tuple(t.shape), t.stride(),
                                                                          "" if rc == 0 else " (" + err + ")"))

    refusals = [
        ("3-D tensor", torch.zeros(2, 3, 4), False, None, "ndim 3"),
        ("int32 tensor", torch.zeros(3, 4, dtype=torch.int32), False, 0, "int32"),
        ("f32 asked as f64", torch.zeros(3, 4), False, 1, "float32"),
        ("writable view of a stepped tensor", base.float()[::2, ::3], True, None, "no unit stride"),
        ("writable view of an expanded tensor", base.float()[0:1, :].expand(5, 12), True, None, "zero (broadcast) stride"),
    ]
    for name, t, writable, kind, frag in refusals:
        rc, _, _, err = probe(t, writable, kind)
        check(rc == -1 and frag in err, "%s refused: %s" % (name, err))
    print("torch", torch.__version__)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
