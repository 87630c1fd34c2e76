// SPDX-License-Identifier: MIT
// CUDA evaluation of the low-rank family added with PEFT's other methods, through their
// evaluators and VJPs written once in deltaw/backend/cpu/ (templated on the context and
// the device) run with a cuda::context (shared_evaluator.cuh): LoHa (`loha`), IA³ (`ia3`,
// both sides), AdaLoRA (`adalora`), BD-LoRA (`bd_lora`), TinyLoRA (`tinylora`) and PVeRA
// (`pvera`, its deterministic path). With this header, apply (ΔW alone and in lazy sums
// W + …), apply_transposed, merge, unmerge, materialize, and updates.cuh's
// frobenius_norm and merge_checked work on CUDA views, and cuda::backward (vjp.cuh) gives
// their factor gradients.
//
// What runs where (everything else is GEMMs and Thrust maps on the context's stream):
//   LoHa      K_A = A₁ ⊙_c A₂ [r₁r₂, in] and K_B = B₁ ⊙_r B₂ [out, r₁r₂] formed in scratch by
//             copies and scale_rows/scale_cols (a column of B₁ or row of A₁, a strided
//             device vector, is gathered into scratch on the device), then LoRA's products.
//   IA³       one product with W into a tokens × out scratch (or a scaled copy of X), scaled
//             by l − 1 (a functor map); merge scales W's rows / columns by l; unmerge first
//             reads l on the host (one synchronising download of the panel's entries, to
//             refuse an l = 0 before anything is written), then divides on the device.
//   AdaLoRA   LoRA's products with the r middle columns scaled by E (device vector in
//             scratch); ∂E: dot_rows of V and Z into scratch, added with one axpy.
//   BD-LoRA   one GEMM per block on column slices; nothing assembled.
//   TinyLoRA  the r × r core R = vᵀ·P formed on the device by one GEMM, then B·R·A's products.
//   PVeRA     VeRA's evaluator and VJP on u.mean() (updates.cuh): λ_d's first half and λ_b
//             read on the host (to_host_vector), bases regenerated on the device in tiles.
// Scratch is activation-, factor- or tile-sized (LoHa: r₁r₂·(out + in)); nothing out × in.
// The CPU evaluators' closed-form frobenius_norm (Gram matrices in double, with a
// kernels::cpu_context) is CPU-only (constrained to device::cpu): CUDA's frobenius_norm
// forms ΔW by panels through add_delta_rows.
#pragma once

#include <deltaw/backend/cpu/adalora.hpp>
#include <deltaw/backend/cpu/adalora_vjp.hpp>
#include <deltaw/backend/cpu/bd_lora.hpp>
#include <deltaw/backend/cpu/bd_lora_vjp.hpp>
#include <deltaw/backend/cpu/ia3.hpp>
#include <deltaw/backend/cpu/ia3_vjp.hpp>
#include <deltaw/backend/cpu/loha.hpp>
#include <deltaw/backend/cpu/loha_vjp.hpp>
#include <deltaw/backend/cpu/pvera.hpp>
#include <deltaw/backend/cpu/pvera_vjp.hpp>
#include <deltaw/backend/cpu/tinylora.hpp>
#include <deltaw/backend/cpu/tinylora_vjp.hpp>

#include "shared_evaluator.cuh"
#include "updates.cuh"
#include "vector_ops.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

template <class T>
struct evaluator<hadamard_update<T, device::cuda>> : shared_evaluator<hadamard_update<T, device::cuda>> {};
template <class T, class TW>
struct evaluator<ia3_update<T, TW, device::cuda>> : shared_evaluator<ia3_update<T, TW, device::cuda>> {};
template <class T>
struct evaluator<adalora_update<T, device::cuda>> : shared_evaluator<adalora_update<T, device::cuda>> {};
template <class T>
struct evaluator<bd_lora_update<T, device::cuda>> : shared_evaluator<bd_lora_update<T, device::cuda>> {};
template <class T>
struct evaluator<tinylora_update<T, device::cuda>> : shared_evaluator<tinylora_update<T, device::cuda>> {};
template <class T>
struct evaluator<pvera_update<T, device::cuda>> : shared_evaluator<pvera_update<T, device::cuda>> {};

}  // namespace cuda
DELTAW_NAMESPACE_END
