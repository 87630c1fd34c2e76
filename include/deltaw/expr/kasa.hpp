// SPDX-License-Identifier: MIT
// KaSA (Knowledge-aware Singular-value Adaptation, arXiv:2412.06071; PEFT 0.21's
// LoraConfig(kasa_config=KasaConfig(...)), KasaLinearVariant). Two parts:
//   1. the frozen base weight loses its r smallest singular directions, once, at init
//      (W ← W − Σ_{last r} σᵢ·uᵢ·vᵢᵀ): a dense SVD of W, deltaw::kasa_truncate_base_dense in
//      init/kasa.hpp — not part of the update, PEFT does not save the truncated weight either;
//   2. the trained update ΔW = s·B·diag(ΔΣ)·A, B [out, r] (lora_B), ΔΣ [r] (lora_diag),
//      A [r, in] (lora_A), s = LoRA's α/r (α/√r with use_rslora).
// Part 2 has exactly AdaLoRA's form B·diag(E)·A (expr/adalora.hpp), so kasa() builds an
// adalora_update with LoRA's scale: same evaluator, VJPs (dΔΣ is the E slot) and cost,
// 2·tokens·r·(in + out) flops. The paper's regularisers (PEFT's _get_kasa_loss) are
// train::kasa_regularizer (train/kasa.hpp).
#pragma once

#include <cmath>
#include <string>
#include <utility>

#include "adalora.hpp"

DELTAW_NAMESPACE_BEGIN

/// KaSA's update ΔW = s·B·diag(ΔΣ)·A with an explicit scale.
template <class BL, class EL, class AL>
auto kasa(BL&& B, EL&& diag, AL&& A, scale s = scale(1.0)) {
  return detail::make_adalora(std::forward<BL>(B), std::forward<EL>(diag), std::forward<AL>(A), s.value);
}
/// KaSA's update with LoRA's scale α/r (α/√r when rslora).
template <class BL, class EL, class AL>
auto kasa(BL&& B, EL&& diag, AL&& A, alpha a, bool rslora = false) {
  auto u = detail::make_adalora(std::forward<BL>(B), std::forward<EL>(diag), std::forward<AL>(A), 1.0);
  const double r = double(u.rank());
  if (u.rank() < 1) throw rank_error("deltaw::kasa: the rank must be at least 1 to derive α/r");
  return u.with_scale(rslora ? a.value / std::sqrt(r) : a.value / r);
}

DELTAW_NAMESPACE_END
