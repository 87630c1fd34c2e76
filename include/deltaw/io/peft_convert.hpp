// SPDX-License-Identifier: MIT
// A PEFT adapter of any type deltaw reads, converted to a plain LoRA adapter (PEFT's
// `convert_to_lora`): each module's ΔW over its layer weight becomes B·A by a truncated SVD
// (deltaw::to_lora: sketched through apply, never the dense ΔW; or to_lora_dense, PEFT's own
// algorithm). The result is an io::peft_adapter with scale 1 (lora_alpha = r), written with
// write_peft_adapter and readable by PEFT, llama.cpp's converter, or any LoRA engine.
//
//   auto a   = io::read_peft("loha_dir");
//   auto W   = …;                                   // module → its weight [out, in] as a view
//   auto lo  = io::convert_to_lora(a, W, deltaw::lora_rank{16});
//   auto lo2 = io::convert_to_lora(a, W, deltaw::energy_fraction{0.99});  // rank per module
//   io::write_peft_adapter("as_lora", lo);
//
// As PEFT does: a fixed rank gives r = lora_alpha = k; an energy threshold gives r =
// lora_alpha = 1 and a rank_pattern / alpha_pattern entry per module. target_modules lists
// the modules' full names (so PEFT wraps exactly these layers); base_model_name_or_path is
// kept. Two differences from PEFT 0.21.2, both deliberate: PEFT returns a MiSS (non-bat)
// adapter's own factors at its native rank whatever rank was asked, deltaw truncates to the
// rank asked (both are exact when the rank asked is at least MiSS's r); and deltaw also
// converts the W-dependent types PEFT refuses (IA³, OFT, HRA, DoRA, …): their ΔW over the
// given weight is converted like any other.
#pragma once

#include <algorithm>
#include <map>
#include <string>
#include <utility>

#include "../linalg/to_lora.hpp"
#include "errors.hpp"
#include "peft_adapter.hpp"

DELTAW_NAMESPACE_BEGIN
namespace io {

/// Options of convert_to_lora: the sketch's (to_lora_options), or `dense` for PEFT's
/// algorithm (each ΔW materialised out × in and fully decomposed).
struct lora_conversion_options {
  to_lora_options sketch{};
  bool dense = false;
};

namespace detail {
template <class TW>
matrix_view<const TW> conversion_weight(const std::map<std::string, matrix_view<const TW>>& weights,
                                        const std::string& module) {
  auto it = weights.find(module + ".weight");
  if (it == weights.end()) it = weights.find(module);
  if (it == weights.end())
    throw format_error("deltaw::io::convert_to_lora: no weight for module \"" + module + "\" (give \"" + module +
                       ".weight\" or \"" + module + "\" in the weights map, as a view [out, in])");
  return it->second;
}
}  // namespace detail

/// Every module of `a` as a LoRA of the given rank (lora_rank) or energy (energy_fraction),
/// over the weights `weights` (module name or "<module>.weight" → W [out, in]; a Conv1D /
/// fan_in_fan_out weight stored [in, out] is given as its transpose view). format_error when a
/// module has no weight, shape_error when a weight does not fit its module, rank_error when
/// a fixed rank exceeds min(out, in) of a module.
template <class TW, class Target>
  requires(std::same_as<Target, lora_rank> || std::same_as<Target, energy_fraction>)
peft_adapter convert_to_lora(const any_peft_adapter& a, const std::map<std::string, matrix_view<const TW>>& weights,
                             Target target, const lora_conversion_options& opt = {}) {
  peft_adapter out;
  auto& c = out.config;
  if constexpr (std::same_as<Target, lora_rank>) {
    c.r = target.k;
    c.lora_alpha = double(target.k);
  } else {
    c.r = 1;
    c.lora_alpha = 1;
  }
  std::visit([&](const auto& src) { c.base_model_name_or_path = src.config.base_model_name_or_path; }, a.source());
  for (const auto& m : a.modules()) {
    const auto W = detail::conversion_weight(weights, m.name());
    if constexpr (std::same_as<Target, lora_rank>)
      if (target.k < 1 || target.k > std::min(W.rows(), W.cols()))
        throw rank_error("deltaw::io::convert_to_lora: module \"" + m.name() + "\" is " +
                         deltaw::detail::shape_str(W.rows(), W.cols()) + ": the rank must be in [1, " +
                         std::to_string(std::min(W.rows(), W.cols())) + "]; got " + std::to_string(target.k));
    const auto u = m.update(W);
    const auto conv = u.visit([&](const auto& x) {
      return opt.dense ? to_lora_dense<float>(x, target) : to_lora<float>(x, target, opt.sketch);
    });
    out.add(m.name(), conv.update());
    c.target_modules.push_back(m.name());
  }
  return out;
}

}  // namespace io
DELTAW_NAMESPACE_END
