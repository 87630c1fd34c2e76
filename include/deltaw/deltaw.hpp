// SPDX-License-Identifier: MIT
// deltaw: structured weight updates (LoRA and its family) as lazy expressions.
//
// This header is the core: views, dtypes, errors, random streams, every update type, the
// primitive layer (deltaw/kernels/) and, written once against it, every type's evaluator
// and VJP with the public operations (apply, apply_transposed, merge, unmerge,
// materialize, frobenius_norm, DoRA's magnitude). The rest has its own umbrella:
//
//   deltaw/autograd.hpp   tape, differentiable ops and adapted layers, nn, optimisers
//   deltaw/train.hpp      the training strategies of the papers (LoRA+, LoRA-FA, …)
//   deltaw/init.hpp       PiSSA, OLoRA, LoRA-GA, EVA, LoRA-SB, LoLDU, CorDA inits
//   deltaw/linalg.hpp     randomized SVD, incremental PCA, Sylvester, k-means
//   deltaw/spectral.hpp   intruder dimensions, factored spectra, LoDD
//   deltaw/io.hpp         safetensors, PEFT adapter directories, GGUF (needs nlohmann-json)
#pragma once

#include "core/config.hpp"
#include "core/dtype.hpp"
#include "core/eigen.hpp"
#include "core/error.hpp"
#include "core/random.hpp"
#include "core/view.hpp"
#include "kernels/kernels.hpp"
#include "expr/update.hpp"
#include "expr/low_rank.hpp"
#include "expr/dora.hpp"
#include "expr/core_low_rank.hpp"
#include "expr/block_lora.hpp"
#include "expr/block_affine.hpp"
#include "expr/kron.hpp"
#include "expr/ldu.hpp"
#include "expr/random_basis.hpp"
#include "expr/loha.hpp"
#include "expr/ia3.hpp"
#include "expr/oft.hpp"
#include "expr/hra.hpp"
#include "expr/boft.hpp"
#include "expr/adalora.hpp"
#include "expr/shira.hpp"
#include "expr/road.hpp"
#include "expr/hira.hpp"
#include "expr/delora.hpp"
#include "backend/cpu/evaluator.hpp"
#include "backend/cpu/ops.hpp"
#include "backend/cpu/low_rank.hpp"
#include "backend/cpu/dora.hpp"
#include "backend/cpu/core_low_rank.hpp"
#include "backend/cpu/block_lora.hpp"
#include "backend/cpu/block_affine.hpp"
#include "backend/cpu/kron.hpp"
#include "backend/cpu/ldu.hpp"
#include "backend/cpu/random_basis.hpp"
#include "backend/cpu/loha.hpp"
#include "backend/cpu/ia3.hpp"
#include "backend/cpu/oft.hpp"
#include "backend/cpu/hra.hpp"
#include "backend/cpu/boft.hpp"
#include "backend/cpu/adalora.hpp"
#include "backend/cpu/shira.hpp"
#include "backend/cpu/road.hpp"
#include "backend/cpu/hira.hpp"
#include "backend/cpu/delora.hpp"
#include "backend/cpu/vjp.hpp"
#include "backend/cpu/low_rank_vjp.hpp"
#include "backend/cpu/dora_vjp.hpp"
#include "backend/cpu/core_low_rank_vjp.hpp"
#include "backend/cpu/block_lora_vjp.hpp"
#include "backend/cpu/block_affine_vjp.hpp"
#include "backend/cpu/kron_vjp.hpp"
#include "backend/cpu/ldu_vjp.hpp"
#include "backend/cpu/random_basis_vjp.hpp"
#include "backend/cpu/loha_vjp.hpp"
#include "backend/cpu/ia3_vjp.hpp"
#include "backend/cpu/oft_vjp.hpp"
#include "backend/cpu/hra_vjp.hpp"
#include "backend/cpu/boft_vjp.hpp"
#include "backend/cpu/adalora_vjp.hpp"
#include "backend/cpu/shira_vjp.hpp"
#include "backend/cpu/road_vjp.hpp"
#include "backend/cpu/hira_vjp.hpp"
#include "backend/cpu/delora_vjp.hpp"
