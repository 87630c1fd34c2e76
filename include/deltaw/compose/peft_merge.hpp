// SPDX-License-Identifier: MIT
// Merging PEFT LoRA adapters (io::peft_adapter) module by module: PEFT 0.21.2's
// add_weighted_adapter over whole adapters, in factored form, with the result written as a
// PEFT directory by io::write_peft_adapter. Needs nlohmann-json (through io/peft.hpp).
#pragma once

#include <cmath>
#include <map>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "../io/peft.hpp"
#include "merge.hpp"

DELTAW_NAMESPACE_BEGIN
namespace compose {

namespace detail {
/// PEFT's adapter-level rank: r, or the largest rank_pattern value.
inline index_t peft_adapter_rank(const io::peft_adapter& a) {
  index_t r = a.config.r;
  for (const auto& [k, v] : a.config.rank_pattern) r = std::max(r, v);
  for (const auto& m : a.modules()) r = std::max(r, m.rank);
  return r;
}

inline io::peft_adapter merge_peft_impl(std::span<const io::peft_adapter> ads, std::span<const double> w,
                                        merge_options o, bool materializing, const char* op) {
  if (ads.empty()) throw argument_error(std::string(op) + ": no adapters to merge");
  if (ads.size() != w.size())
    throw argument_error(std::string(op) + ": " + std::to_string(ads.size()) + " adapters but " +
                         std::to_string(w.size()) + " weights");
  if (!materializing && is_materializing(o.mode))
    throw argument_error(std::string(op) + ": mode " + std::string(mode_name(o.mode)) +
                         " prunes entries of the dense out×in ΔW_i; call deltaw::compose::merge_peft_materializing");
  for (std::size_t i = 0; i < ads.size(); ++i) {
    const auto& c = ads[i].config;
    const bool dora = c.use_dora || std::any_of(ads[i].modules().begin(), ads[i].modules().end(),
                                                [](const auto& m) { return m.magnitude.has_value(); });
    if (dora)
      throw unsupported_error(std::string(op) + ": adapter " + std::to_string(i) +
                                  " uses DoRA; its update m·(W+ΔW)/‖W+ΔW‖ − W is not a LoRA product and a weighted "
                                  "merge of the factors would silently drop the magnitude vector");
    if (c.raw.is_object() && c.raw.contains("lora_bias") && io::detail::json_truthy(c.raw["lora_bias"]))
      throw unsupported_error(std::string(op) + ": adapter " + std::to_string(i) +
                                  " has lora_bias; the bias of lora_B is not part of a factored merge");
    if (c.fan_in_fan_out != ads[0].config.fan_in_fan_out)
      throw argument_error(std::string(op) + ": adapter " + std::to_string(i) +
                           " differs from adapter 0 in fan_in_fan_out");
  }
  // The rank PEFT gives the new adapter: used for the svd modes' default.
  index_t max_rank = 0;
  for (const auto& a : ads) max_rank = std::max(max_rank, peft_adapter_rank(a));
  if (is_svd_mode(o.mode) && o.svd_rank == 0) o.svd_rank = max_rank;

  std::set<std::string> names;
  for (const auto& a : ads)
    for (const auto& m : a.modules()) names.insert(m.name);
  io::peft_adapter out;
  out.config = ads[0].config;
  out.config.use_rslora = false;  // every merged module has scale 1; α = r
  out.config.use_dora = false;
  out.config.rank_pattern.clear();
  out.config.alpha_pattern.clear();
  std::uint64_t module_index = 0;
  const auto user_mask = o.dare_mask;
  for (const auto& name : names) {
    std::vector<low_rank<float>> terms;
    std::vector<double> tw;
    std::vector<std::size_t> which;  // index in `ads` of each term
    for (std::size_t i = 0; i < ads.size(); ++i)
      if (const auto* m = ads[i].find(name)) {
        terms.push_back(m->update());
        tw.push_back(w[i]);
        which.push_back(i);
      }
    merge_options mo = o;
    mo.stream_base = o.stream_base + 3 * std::uint64_t(ads.size()) * module_index++;
    if (user_mask)
      mo.dare_mask = [&](const dare_site& s, const matrix_view<double>& mask) {
        user_mask(dare_site{name, which[s.adapter], s.target}, mask);
      };
    else if (is_dare(o.mode))  // the stream of adapter i stays i's when others lack the module
      mo.dare_mask = [&](const dare_site& s, const matrix_view<double>& mask) {
        const random_stream rs{o.seed, mo.stream_base + 3 * std::uint64_t(which[s.adapter]) + std::uint64_t(s.target)};
        for (index_t i = 0; i < mask.rows(); ++i)
          for (index_t j = 0; j < mask.cols(); ++j)
            mask(i, j) = double(rs.uniform01(std::uint64_t(i * mask.cols() + j))) < *o.density ? 1.0 : 0.0;
      };
    low_rank<double> merged = [&] {
      try {
        return merge_impl(std::span<const low_rank<float>>(terms), std::span<const double>(tw), mo, name, op);
      } catch (const shape_error& e) {
        throw shape_error(std::string(e.what()) + " (module \"" + name + "\")");
      } catch (const rank_error& e) {
        throw rank_error(std::string(e.what()) + " (module \"" + name + "\")");
      }
    }();
    out.add(name, merged);
  }
  return out;
}
}  // namespace detail

/// Merges PEFT adapters with weights `w` module by module (a module held by only some of
/// the adapters merges those), under options.mode; every merged module has scale 1 (α = r,
/// use_rslora off). The svd modes default to PEFT's rank: the largest r (or rank_pattern
/// value) of the inputs. Refuses DoRA and lora_bias adapters (unsupported_error) and the
/// materializing modes (argument_error; see merge_peft_materializing). The result is written
/// with io::write_peft_adapter.
inline io::peft_adapter merge_peft(std::span<const io::peft_adapter> ads, std::span<const double> w,
                                   const merge_options& o) {
  return detail::merge_peft_impl(ads, w, o, false, "deltaw::compose::merge_peft");
}

/// As merge_peft, also for ties_svd, dare_linear_svd, dare_ties_svd and magnitude_prune_svd,
/// which form each module's dense ΔW_i.
inline io::peft_adapter merge_peft_materializing(std::span<const io::peft_adapter> ads, std::span<const double> w,
                                                 const merge_options& o) {
  return detail::merge_peft_impl(ads, w, o, true, "deltaw::compose::merge_peft_materializing");
}

/// How far a merged adapter is from the weighted sum of its inputs, over all its modules:
/// √(Σ_m ‖merged_m − Σ_i w_i·ΔW_{i,m}‖²_F / Σ_m ‖Σ_i w_i·ΔW_{i,m}‖²_F), in factored form (no
/// out×in matrix). A module held by only some inputs is compared with those.
inline double merge_relative_error(const io::peft_adapter& merged, std::span<const io::peft_adapter> ads,
                                   std::span<const double> w) {
  if (ads.size() != w.size())
    throw argument_error("deltaw::compose::merge_relative_error: " + std::to_string(ads.size()) + " adapters but " +
                         std::to_string(w.size()) + " weights");
  double num = 0, den = 0;
  for (const auto& m : merged.modules()) {
    std::vector<low_rank<float>> t;
    std::vector<double> tw;
    for (std::size_t i = 0; i < ads.size(); ++i)
      if (const auto* x = ads[i].find(m.name)) t.push_back(x->update()), tw.push_back(w[i]);
    num += std::pow(factored_error(m.update(), std::span<const low_rank<float>>(t), std::span<const double>(tw)), 2);
    den += std::pow(factored_norm(std::span<const low_rank<float>>(t), std::span<const double>(tw)), 2);
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

}  // namespace compose
DELTAW_NAMESPACE_END
