// SPDX-License-Identifier: MIT
// docs/cuda.md: device pointers the caller owns (W_ptr [out, in], B_ptr [out, r], A_ptr
// [r, in], X_ptr [tokens, in], Y_ptr [tokens, out]; compiled, never run), their views X and
// Y, and two LoRAs l1, l2 over device factors.
#pragma once
#include <deltaw/cuda/cuda.hpp>

inline const deltaw::index_t out = 64, in = 32, r = 4, tokens = 8;
inline float *W_ptr = nullptr, *B_ptr = nullptr, *A_ptr = nullptr, *X_ptr = nullptr, *Y_ptr = nullptr;
inline const auto X = deltaw::cuda::view(static_cast<const float*>(X_ptr), tokens, in);
inline const auto Y = deltaw::cuda::view(Y_ptr, tokens, out);
inline const auto l1 = deltaw::lora(deltaw::cuda::view(static_cast<const float*>(B_ptr), out, r),
                                    deltaw::cuda::view(static_cast<const float*>(A_ptr), r, in), deltaw::alpha(16));
inline const auto l2 = l1;
