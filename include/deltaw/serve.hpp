// SPDX-License-Identifier: MIT
// deltaw's multi-adapter serving (not included by deltaw.hpp):
//
//   serve/batch.hpp     heterogeneous batches: every token names its adapter (LoRA of mixed
//                       ranks by segments or gather, any update type by groups)
//   serve/masked.hpp    masked composition Y = X·Wᵀ + Σ_k diag(m_k)·X·ΔW_kᵀ and its VJP
//   serve/autograd.hpp  the masked LoRA composition as a tape op (gates, fusion weights)
//   serve/pool.hpp      the adapter pool: registered by name, loaded lazily, paged under a
//                       byte budget, LRU eviction, pinning; needs deltaw/io.hpp (nlohmann-json)
//
// docs/serving.md describes the API, the strategies and the pool.
#pragma once

#include "deltaw.hpp"
#include "serve/autograd.hpp"
#include "serve/batch.hpp"
#include "serve/masked.hpp"
#include "serve/pool.hpp"
