// SPDX-License-Identifier: MIT
// deltaw's CUDA backend: include this from .cu files (compiled by nvcc) together with, or
// instead of, deltaw/deltaw.hpp. Link deltaw::cuda (cudart, cuBLAS, cuSOLVER).
#pragma once

#include "error.cuh"
#include "context.cuh"
#include "view.cuh"
#include "buffer.cuh"
#include "gemm.cuh"
#include "elementwise.cuh"
#include "primitives.cuh"
#include "scratch.cuh"
#include "evaluator.cuh"
#include "low_rank.cuh"
#include "shared_evaluator.cuh"
#include "kron.cuh"
#include "ops.cuh"
#include "vector_ops.cuh"
#include "updates.cuh"
#include "updates_lowrank.cuh"
#include "updates_spectral.cuh"
#include "updates_structured.cuh"
#include "updates_orth.cuh"
