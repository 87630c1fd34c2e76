// SPDX-License-Identifier: MIT
// The torch-free half of the deltaw PyTorch extension: deltaw's apply, apply_transposed
// and VJPs over raw float32 buffers described by (pointer, shape, strides). Compiled in its
// own translation unit without torch's headers, so changing it does not recompile the
// bindings (bindings.cpp) and vice versa.
#pragma once

#include <cstdint>

namespace deltaw_torch {

/// A float32 matrix in memory: element (i, j) at p[i·rs + j·cs]. p may be null for an
/// absent gradient slot.
struct mat {
  float* p = nullptr;
  std::int64_t rows = 0, cols = 0, rs = 0, cs = 0;
};

/// The update types the extension evaluates. Factors, in order (PEFT's names):
enum kind : int {
  lokr_dd = 0,  ///< w1 [a, c], w2 [b, d]
  lokr_ld = 1,  ///< w1_a [a, r], w1_b [r, c], w2 [b, d]
  lokr_dl = 2,  ///< w1 [a, c], w2_a [b, r], w2_b [r, d]
  lokr_ll = 3,  ///< w1_a, w1_b, w2_a, w2_b
  miss = 4,     ///< miss_block [r, out], or [r, mini_r] ("mini"; out given)
  bone_bat = 5, ///< W [out, in] (frozen), miss_block viewed as [out, r]
  low_rank = 6, ///< B [out, r], A [r, in] (LoRA; VeRA with its formed B′ = diag(λ_b)·B·diag(λ_d))
  loha = 7,     ///< hada_w1_a [out, r], hada_w1_b [r, in], hada_w2_a, hada_w2_b
  ia3_out = 8,  ///< W [out, in] (frozen), l as [1, out]
  ia3_in = 9,   ///< W [out, in] (frozen), l as [1, in]
  adalora = 10, ///< lora_B [out, r], lora_E [r, 1], lora_A [r, in]
  hira = 11,    ///< W [out, in] (frozen), hira_B [out, r], hira_A [r, in]: ΔW = W ⊙ (B·A)
  delora = 12,  ///< delora_B [out, r], delora_A [r, in], delora_lambda [1], delora_w_norm [in] (frozen)
  oft = 13,     ///< W [out, in] (frozen), oft_R.weight [nq, b(b−1)/2]; opts {cayley_neumann, terms}
  hra = 14,     ///< W [out, in] (frozen), hra_u [in, r]; opts {gram_schmidt}
  boft = 15,    ///< W [out, in] (frozen), boft_R as [m·nb·b, b], boft_s [out, 1]; opts {cayley_neumann, terms}
  road = 16,    ///< W [out, in] (frozen), road_theta, road_alpha; opts {variant 1/2/4, group_size}
  /// RandLoRA with PEFT's stored bases: U [max_dim, N·r] (randlora_B flattened, frozen),
  /// A [r, min_dim] (randlora_A, frozen), λ [r, N], γ [N, min_dim]. ΔW = s·U·V (out ≥ in) or
  /// s·Vᵀ·Uᵀ, V [N·r, min_dim] row k·N + b = λ[k, b]·A[k, :]∘γ[b, :], never formed.
  randlora = 17,
  shira = 18,   ///< shira_weight [nnz] at (rows, cols) = options::index (PEFT's shira_indices)
};

/// Integer options of a kind (see above), at most four, and SHiRA's index pattern.
struct options {
  std::int64_t v[4] = {0, 0, 0, 0};
  const void* rows = nullptr;  ///< [nnz] int32 or int64 (index_bits)
  const void* cols = nullptr;  ///< [nnz]
  std::int64_t nnz = 0;
  int index_bits = 64;
};

/// Number of factors kind k takes, how many of them are trainable, and the factor index of
/// trainable factor i (W, when present, is first and frozen; DeLoRA's w_norm is last).
int factor_count(int k);
int trainable_count(int k);
int trainable_index(int k, int i);
/// True for the types whose ΔW reads W: apply/apply_transposed then compute the whole
/// X·(W + ΔW)ᵀ (resp. G·(W + ΔW)) in deltaw, the bias being the caller's.
bool with_base(int k);

/// Y = X·ΔWᵀ (with_base: X·(W + ΔW)ᵀ), Y [tokens, out] overwritten.
void apply(int k, const mat* f, double s, std::int64_t out, std::int64_t in, const options& o, const mat& X,
           const mat& Y);
/// O = G·ΔW (with_base: G·(W + ΔW)), O [tokens, in] overwritten.
void apply_transposed(int k, const mat* f, double s, std::int64_t out, std::int64_t in, const options& o, const mat& G,
                      const mat& O);
/// grads[i] += ∂L/∂(trainable factor i) (absent when p is null); dX = dY·ΔW (with_base:
/// dY·(W + ΔW)), overwritten, skipped when dX.p is null.
void backward(int k, const mat* f, double s, std::int64_t out, std::int64_t in, const options& o, const mat& X,
              const mat& dY, const mat* grads, const mat& dX);

}  // namespace deltaw_torch
