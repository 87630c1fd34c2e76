# SPDX-License-Identifier: MIT
"""pip install ./python  — builds deltaw_torch._C against the installed torch's headers and
libraries (torch.utils.cpp_extension) and deltaw's headers from this repository (or
DELTAW_INCLUDE). Eigen 3: /usr/include/eigen3 or DELTAW_EIGEN_INCLUDE. Set MAX_JOBS=1 on
small machines; use --no-build-isolation (the build needs the torch that is installed). Without an install, deltaw_torch compiles the same sources on first use."""
import os
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

here = Path(__file__).resolve().parent
deltaw_include = os.environ.get("DELTAW_INCLUDE") or str(here.parent / "include")
eigen = os.environ.get("DELTAW_EIGEN_INCLUDE") or "/usr/include/eigen3"


def blas_flags():
    # The same choice as deltaw_torch.torch_blas_flags (not imported: the package imports torch
    # at the top, which is fine here too, but keep setup.py standalone).
    if os.environ.get("DELTAW_TORCH_BLAS", "1") == "0":
        return []
    import ctypes

    import torch

    try:
        h = ctypes.CDLL(str(Path(torch.__file__).resolve().parent / "lib" / "libtorch_cpu.so"))
    except OSError:
        return []
    syms = ("sgemm_", "dgemm_", "sgemv_", "dgemv_", "strsm_", "dtrsm_")
    return ["-DEIGEN_USE_BLAS", "-DDELTAW_USE_BLAS"] if all(hasattr(h, s) for s in syms) else []


setup(
    name="deltaw_torch",
    version="0.1.0",
    description="deltaw's structured weight updates inside PyTorch, and a forward swap for PEFT layers",
    license="MIT",
    packages=["deltaw_torch"],
    ext_modules=[
        CppExtension(
            "deltaw_torch._C",
            ["deltaw_torch/csrc/bindings.cpp", "deltaw_torch/csrc/dw_kernels.cpp"],
            include_dirs=[deltaw_include, eigen],
            extra_compile_args=["-O2", "-DNDEBUG", *blas_flags()],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    install_requires=["torch"],
)
