// SPDX-License-Identifier: MIT
// The primitive layer every evaluator is written against: contexts and scratch, GEMM
// (single, strided-batched, grouped), element-wise maps, reductions, gathers/scatters
// and random fills. The CPU implementation is here; deltaw::cuda adds the CUDA one.
#pragma once

#include "context.hpp"
#include "elementwise.hpp"
#include "gemm.hpp"
