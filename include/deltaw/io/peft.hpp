// SPDX-License-Identifier: MIT
// PEFT adapter directories (LoRA, rsLoRA, DoRA): adapter_config.json +
// adapter_model.safetensors, read into deltaw low_rank updates keyed by module name and
// written back in the layout PEFT loads.
//
// Keys: base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r],
// .lora_magnitude_vector [out] (DoRA). Scale s = α/r (α/√r with use_rslora), with r and
// α per module from rank_pattern / alpha_pattern: keys are regular expressions tried in
// file order against the module name as `(.*\.)?(key)$`, the first match wins.
// Anything deltaw does not implement (another peft_type, biases, modules_to_save,
// embedding or convolution LoRA, …) throws unsupported_error; anything inconsistent
// (unknown keys, shapes that disagree with each other or with the config) format_error.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "../core/precompiled.hpp"
#include "../backend/cpu/dora.hpp"
#include "../expr/low_rank.hpp"
#include "json.hpp"
#include "pattern.hpp"
#include "safetensors.hpp"

DELTAW_NAMESPACE_BEGIN
namespace io {

/// The LoRA fields of adapter_config.json that change the math. Fields deltaw does not
/// interpret are kept in `raw` and written back unchanged.
struct peft_lora_config {
  std::string peft_type = "LORA";
  index_t r = 8;
  double lora_alpha = 8;
  bool use_rslora = false;
  bool use_dora = false;
  bool fan_in_fan_out = false;
  std::vector<std::string> target_modules;          ///< list form (suffix match)
  std::optional<std::string> target_modules_regex;  ///< string form (full match)
  /// Non-empty when target_modules_regex uses a construct deltaw's matcher does not
  /// implement (a look-ahead, …): the adapter is still read (its modules come from the
  /// tensor names), only targets() refuses, with this reason.
  std::string target_modules_unsupported;
  std::vector<std::pair<std::string, index_t>> rank_pattern;  ///< file order
  std::vector<std::pair<std::string, double>> alpha_pattern;  ///< file order
  std::string base_model_name_or_path;
  json raw = json::object();

  /// The first pattern key matching `module` as (.*\.)?(key)$, or null.
  template <class V>
  static const std::pair<std::string, V>* match_pattern(const std::vector<std::pair<std::string, V>>& pats,
                                                        const std::string& module) {
    if (!pats.empty() && module.size() > 4096)
      throw format_error("deltaw::io::peft: module name of " + std::to_string(module.size()) +
                         " characters is too long to match against pattern keys");
    for (const auto& p : pats)
      if (pattern(p.first, "pattern key").matches_module(module)) return &p;
    return nullptr;
  }
  index_t rank_for(const std::string& module) const {
    const auto* p = match_pattern(rank_pattern, module);
    return p ? p->second : r;
  }
  double alpha_for(const std::string& module) const {
    const auto* p = match_pattern(alpha_pattern, module);
    return p ? p->second : lora_alpha;
  }
  /// s = α/r, or α/√r with use_rslora.
  double scale_for(const std::string& module) const {
    const double a = alpha_for(module);
    const double rr = double(rank_for(module));
    return use_rslora ? a / std::sqrt(rr) : a / rr;
  }
  /// Whether PEFT would adapt `module` (list: equal to or ending in "." + entry; string:
  /// a full regex match). unsupported_error when the regex uses a construct deltaw's
  /// matcher does not implement (target_modules_unsupported).
  bool targets(const std::string& module) const;
};

namespace detail {
/// PEFT's target_modules rule, shared by the LoRA and the structured configs.
inline bool targets_module(const std::vector<std::string>& names, const std::optional<std::string>& regex,
                           const std::string& unsupported, const std::string& module) {
  if (regex) {
    if (!unsupported.empty())
      throw unsupported_error("deltaw::io::peft: target_modules \"" + *regex +
                              "\" cannot be evaluated by deltaw's matcher (" + unsupported +
                              "); the adapter's modules are known from its tensors (modules(), find())");
    if (module.size() > 4096) throw format_error("deltaw::io::peft: module name too long to match target_modules");
    return pattern(*regex, "target_modules").full_match(module);
  }
  for (const auto& t : names)
    if (module == t || (module.size() > t.size() && module.ends_with("." + t))) return true;
  return false;
}
}  // namespace detail

inline bool peft_lora_config::targets(const std::string& module) const {
  return detail::targets_module(target_modules, target_modules_regex, target_modules_unsupported, module);
}

namespace detail {

[[noreturn]] inline void peft_fail(const std::string& src, const std::string& msg) {
  throw format_error("deltaw::io::peft (" + src + "): " + msg);
}

inline bool json_truthy(const json& v) {
  if (v.is_null()) return false;
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_array() || v.is_object() || v.is_string()) return !v.empty();
  return true;
}

inline double peft_number(const json& v, const std::string& field, const std::string& src) {
  if (!v.is_number()) peft_fail(src, "\"" + field + "\" must be a number");
  const double d = v.get<double>();
  if (!std::isfinite(d)) peft_fail(src, "\"" + field + "\" must be finite");
  return d;
}
inline index_t peft_rank(const json& v, const std::string& field, const std::string& src) {
  if (!v.is_number_integer()) peft_fail(src, "\"" + field + "\" must be an integer rank");
  if (!v.is_number_unsigned() || v.get<std::uint64_t>() == 0)
    throw rank_error("deltaw::io::peft (" + src + "): \"" + field + "\" must be at least 1");
  if (v.get<std::uint64_t>() > (std::uint64_t(1) << 31)) peft_fail(src, "\"" + field + "\" is implausibly large");
  return index_t(v.get<std::uint64_t>());
}
inline bool peft_bool(const json& o, const char* k, const std::string& src) {
  auto it = o.find(k);
  if (it == o.end() || it->is_null()) return false;
  if (!it->is_boolean()) peft_fail(src, std::string("\"") + k + "\" must be true or false");
  return it->get<bool>();
}
/// Compiles a regular expression of a config once, to report problems at parse time.
inline void check_regex_text(const std::string& k, const std::string& what, const std::string& src) {
  try {
    (void)pattern(k, what);
  } catch (const format_error& e) {
    peft_fail(src, what + " \"" + k + "\" is not a valid regular expression: " + e.what());
  } catch (const unsupported_error& e) {
    throw unsupported_error("deltaw::io::peft (" + src + "): " + e.what());
  }
}
inline void check_pattern_key(const std::string& k, const std::string& src) { check_regex_text(k, "pattern key", src); }

/// target_modules as written: the full names of the adapter's modules (sorted). PEFT
/// matches list entries as the whole name or a "."-suffix of it, so full names wrap exactly
/// these modules even in a deeper model (leaf names like "q_proj" would wrap every layer's
/// q_proj and leave PEFT warning about missing keys). A regex read from a file is dropped:
/// it may match modules the adapter does not hold.
template <class Config, class Modules>
void set_full_target_modules(Config& c, const Modules& modules) {
  c.target_modules.clear();
  for (const auto& m : modules) {
    if constexpr (requires { m.name; }) c.target_modules.push_back(m.name);
    else c.target_modules.push_back(std::visit([](const auto& x) { return x.name; }, m));
  }
  std::sort(c.target_modules.begin(), c.target_modules.end());
  c.target_modules_regex.reset();
  c.target_modules_unsupported.clear();
}

/// `s` with regex metacharacters escaped (pattern keys written for one exact module).
inline std::string regex_escape(const std::string& s) {
  std::string r;
  for (char c : s) {
    if (std::string_view("\\^$.|?*+()[]{}").find(c) != std::string_view::npos) r += '\\';
    r += c;
  }
  return r;
}

/// PEFT's "target_modules": a regular expression (a string) or a list of names. A regex
/// that is malformed is a format_error (Python's re rejects it too); one that uses a
/// construct deltaw's matcher does not implement (PEFT accepts look-aheads, …) only
/// records why in `unsupported`: deltaw takes the modules from the tensor names, so the
/// adapter stays readable and only target queries refuse.
template <class J, class Regex>
void read_target_modules(const J& o, Regex& regex, std::vector<std::string>& names, std::string& unsupported,
                         const std::string& source) {
  auto it = o.find("target_modules");
  if (it == o.end() || it->is_null()) return;
  if (it->is_string()) {
    regex = it->template get<std::string>();
    try {
      check_regex_text(*regex, "\"target_modules\"", source);
    } catch (const unsupported_error& e) {
      unsupported = e.what();
      if (unsupported.empty()) unsupported = "unsupported construct";
    }
  } else if (it->is_array()) {
    for (const auto& e : *it) {
      if (!e.is_string()) peft_fail(source, "\"target_modules\" entries must be strings");
      names.push_back(e.template get<std::string>());
    }
  } else {
    peft_fail(source, "\"target_modules\" must be a list of names or a regular expression");
  }
}
}  // namespace detail

/// Parses adapter_config.json text. Throws format_error when malformed and
/// unsupported_error for a peft_type or option deltaw does not implement.
inline peft_lora_config parse_peft_config(std::string_view text, const std::string& source = "adapter_config.json") {
  peft_lora_config c;
  c.raw = parse_json_strict(text, "deltaw::io::peft (" + source + ")");
  const json& o = c.raw;
  if (!o.is_object()) detail::peft_fail(source, "adapter_config.json must hold a JSON object");
  auto pt = o.find("peft_type");
  if (pt == o.end() || !pt->is_string()) detail::peft_fail(source, "no string \"peft_type\"");
  c.peft_type = pt->get<std::string>();
  if (c.peft_type != "LORA")
    throw unsupported_error("deltaw::io::peft (" + source + "): peft_type \"" + c.peft_type +
                            "\" is not supported; deltaw reads LORA adapters (with use_rslora / use_dora)");

  if (auto it = o.find("r"); it != o.end()) c.r = detail::peft_rank(*it, "r", source);
  if (auto it = o.find("lora_alpha"); it != o.end()) c.lora_alpha = detail::peft_number(*it, "lora_alpha", source);
  c.use_rslora = detail::peft_bool(o, "use_rslora", source);
  c.use_dora = detail::peft_bool(o, "use_dora", source);
  c.fan_in_fan_out = detail::peft_bool(o, "fan_in_fan_out", source);
  if (auto it = o.find("base_model_name_or_path"); it != o.end() && it->is_string())
    c.base_model_name_or_path = it->get<std::string>();

  detail::read_target_modules(o, c.target_modules_regex, c.target_modules, c.target_modules_unsupported, source);
  if (auto it = o.find("rank_pattern"); it != o.end() && !it->is_null()) {
    if (!it->is_object()) detail::peft_fail(source, "\"rank_pattern\" must be an object");
    for (const auto& [k, v] : it->items()) {
      detail::check_pattern_key(k, source);
      c.rank_pattern.emplace_back(k, detail::peft_rank(v, "rank_pattern." + k, source));
    }
  }
  if (auto it = o.find("alpha_pattern"); it != o.end() && !it->is_null()) {
    if (!it->is_object()) detail::peft_fail(source, "\"alpha_pattern\" must be an object");
    for (const auto& [k, v] : it->items()) {
      detail::check_pattern_key(k, source);
      c.alpha_pattern.emplace_back(k, detail::peft_number(v, "alpha_pattern." + k, source));
    }
  }

  // Options that add tensors deltaw would drop or change the forward pass: refuse them.
  auto unsupported = [&](const std::string& what) {
    throw unsupported_error("deltaw::io::peft (" + source + "): " + what + " is not supported");
  };
  if (auto it = o.find("bias"); it != o.end() && !it->is_null()) {
    if (!it->is_string()) detail::peft_fail(source, "\"bias\" must be a string");
    if (it->get<std::string>() != "none") unsupported("bias = \"" + it->get<std::string>() + "\" (trained biases)");
  }
  for (const char* k : {"lora_bias", "use_qalora"})
    if (detail::peft_bool(o, k, source)) unsupported(std::string(k) + " = true");
  for (const char* k : {"modules_to_save", "layer_replication", "target_parameters", "trainable_token_indices",
                        "alora_invocation_tokens", "megatron_config"})
    if (auto it = o.find(k); it != o.end() && detail::json_truthy(*it)) unsupported(std::string("\"") + k + "\"");
  // LoRA variants read by their own readers (deltaw/io/peft_kasa_bdlora_tinylora.hpp).
  for (const char* k : {"kasa_config", "use_bdlora"})
    if (auto it = o.find(k); it != o.end() && detail::json_truthy(*it))
      unsupported(std::string("\"") + k + "\" here (read it with deltaw::io::read_peft_" +
                  (k[0] == 'k' ? "kasa" : "bdlora") + "_adapter, deltaw/io/peft_kasa_bdlora_tinylora.hpp)");
  return c;
}

/// adapter_config.json for `c`: `raw` with the fields deltaw knows overwritten.
inline json peft_config_json(const peft_lora_config& c) {
  json o = c.raw.is_object() ? c.raw : json::object();
  o["peft_type"] = c.peft_type;
  o["r"] = c.r;
  o["lora_alpha"] = c.lora_alpha;
  o["use_rslora"] = c.use_rslora;
  o["use_dora"] = c.use_dora;
  o["fan_in_fan_out"] = c.fan_in_fan_out;
  if (c.target_modules_regex) o["target_modules"] = *c.target_modules_regex;
  else o["target_modules"] = c.target_modules;
  json rp = json::object(), ap = json::object();
  for (const auto& [k, v] : c.rank_pattern) rp[k] = v;
  for (const auto& [k, v] : c.alpha_pattern) ap[k] = v;
  o["rank_pattern"] = rp;
  o["alpha_pattern"] = ap;
  o["base_model_name_or_path"] = c.base_model_name_or_path.empty() ? json(nullptr) : json(c.base_model_name_or_path);
  for (const auto& [k, v] : std::initializer_list<std::pair<const char*, json>>{{"bias", "none"},
                                                                                  {"lora_dropout", 0.0},
                                                                                  {"modules_to_save", nullptr},
                                                                                  {"task_type", nullptr},
                                                                                  {"inference_mode", true},
                                                                                  {"init_lora_weights", true}})
    if (!o.contains(k)) o[k] = v;
  return o;
}

/// One adapted module: LoRA factors in PEFT's layout, with the scale resolved.
struct peft_lora_module {
  std::string name;  ///< e.g. "model.layers.0.self_attn.q_proj"
  held_matrix<float> A;  ///< [r, in]
  held_matrix<float> B;  ///< [out, r]
  std::optional<held_vector<float>> magnitude;  ///< DoRA, [out]
  index_t rank = 0;
  double alpha = 0;
  double scale = 0;
  bool fan_in_fan_out = false;

  index_t out_features() const { return B.view.rows(); }
  index_t in_features() const { return A.view.cols(); }
  /// Empty when a layer with weight [out, in] (nn.Linear's layout; for fan_in_fan_out the
  /// stored weight's transpose) fits the module, else why not.
  std::string layer_mismatch(index_t out, index_t in) const {
    if (out == out_features() && in == in_features()) return {};
    return "lora_B [out, r] and lora_A [r, in] make it " + deltaw::detail::shape_str(out_features(), in_features());
  }

  /// ΔW [out, in] = s·B·A in PyTorch's nn.Linear layout (zero-copy over the file).
  low_rank<float> update() const { return low_rank<float>(B, A, scale); }
  /// The update of the weight as the checkpoint stores it: with fan_in_fan_out (GPT-2's
  /// Conv1D keeps W as [in, out]) that is ΔWᵀ = s·Aᵀ·Bᵀ, as transposed views.
  low_rank<float> update_for_stored_weight() const {
    if (!fan_in_fan_out) return update();
    return low_rank<float>(held_matrix<float>{A.view.transpose(), A.owner},
                           held_matrix<float>{B.view.transpose(), B.owner}, scale);
  }
  /// DoRA over W [out, in] (for fan_in_fan_out pass the stored [in, out] weight's
  /// transpose view). Throws argument_error when the adapter has no magnitude vector.
  template <class WL>
  auto dora(const WL& W) const {
    if (!magnitude)
      throw argument_error("deltaw::io::peft_lora_module::dora: module \"" + name + "\" has no lora_magnitude_vector");
    return deltaw::dora(W, update(), magnitude->view);
  }
};

/// A LoRA adapter: its config and its modules, sorted by name.
class peft_adapter {
 public:
  peft_lora_config config;

  const std::vector<peft_lora_module>& modules() const { return modules_; }
  std::size_t size() const { return modules_.size(); }

  const peft_lora_module* find(std::string_view module) const {
    auto it = std::lower_bound(modules_.begin(), modules_.end(), module,
                               [](const peft_lora_module& m, std::string_view n) { return m.name < n; });
    return it != modules_.end() && it->name == module ? &*it : nullptr;
  }
  const peft_lora_module& at(std::string_view module) const {
    const auto* m = find(module);
    if (!m) throw argument_error("deltaw::io::peft_adapter::at: the adapter has no module \"" + std::string(module) + "\"");
    return *m;
  }
  /// The module adapting the weight tensor `weight_name` of a state dict
  /// ("<module>.weight"), or null when the adapter leaves it alone.
  const peft_lora_module* for_weight(std::string_view weight_name) const {
    if (weight_name.ends_with(".weight")) weight_name.remove_suffix(7);
    return find(weight_name);
  }

  /// Pairs every module with a weight of the user's model, given as name → stored shape
  /// (names as in the base model's state dict, "<module>.weight" or "<module>"). Throws
  /// format_error for a module with no weight and shape_error when a stored shape is not
  /// [out, in] ([in, out] with fan_in_fan_out). Returns module → weight name.
  std::map<std::string, std::string> match(const std::map<std::string, std::pair<index_t, index_t>>& weights) const {
    std::map<std::string, std::string> out;
    for (const auto& m : modules_) {
      auto it = weights.find(m.name + ".weight");
      if (it == weights.end()) it = weights.find(m.name);
      if (it == weights.end())
        throw format_error("deltaw::io::peft_adapter::match: the adapter adapts \"" + m.name +
                           "\" but the model has no weight \"" + m.name + ".weight\"");
      const auto expect = m.fan_in_fan_out ? std::pair(m.in_features(), m.out_features())
                                           : std::pair(m.out_features(), m.in_features());
      if (it->second != expect)
        throw shape_error("deltaw::io::peft_adapter::match: weight \"" + it->first + "\" is " +
                          deltaw::detail::shape_str(it->second.first, it->second.second) + " but the adapter's \"" +
                          m.name + "\" expects " + deltaw::detail::shape_str(expect.first, expect.second) +
                          (m.fan_in_fan_out ? " (fan_in_fan_out: [in, out])" : " ([out, in])"));
      out.emplace(m.name, it->first);
    }
    return out;
  }

  /// Adds a module from a LoRA update ΔW = s·B·A (any storage type; stored as float).
  /// Its rank and α (= s·r, or s·√r with use_rslora) become rank_pattern / alpha_pattern
  /// entries on write when they differ from the config's r and lora_alpha.
  template <class T>
  void add(std::string module, const low_rank<T>& l, const std::optional<vector_view<const float>>& magnitude = {}) {
    if (find(module)) throw argument_error("deltaw::io::peft_adapter::add: module \"" + module + "\" added twice");
    peft_lora_module m;
    m.name = std::move(module);
    m.A = copy_float(l.A());
    m.B = copy_float(l.B());
    m.rank = l.rank();
    m.scale = l.scale();
    m.alpha = config.use_rslora ? l.scale() * std::sqrt(double(l.rank())) : l.scale() * double(l.rank());
    m.fan_in_fan_out = config.fan_in_fan_out;
    if (magnitude) {
      if (magnitude->size() != l.rows())
        throw shape_error("deltaw::io::peft_adapter::add: magnitude has " + std::to_string(magnitude->size()) +
                          " entries for a [" + std::to_string(l.rows()) + ", " + std::to_string(l.cols()) + "] update");
      auto buf = std::make_shared<std::vector<float>>(std::size_t(magnitude->size()));
      for (index_t i = 0; i < magnitude->size(); ++i) (*buf)[std::size_t(i)] = (*magnitude)[i];
      m.magnitude = held_vector<float>{vector_view<const float>(buf->data(), index_t(buf->size())), buf};
      config.use_dora = true;
    }
    insert(std::move(m));
  }

  /// Builds from a config and the tensors of adapter_model.safetensors.
  static peft_adapter from_safetensors(peft_lora_config cfg, const safetensors_file& f,
                                       const std::string& source = "adapter_model.safetensors") {
    peft_adapter a;
    a.config = std::move(cfg);
    struct parts {
      const st_tensor_info* A = nullptr;
      const st_tensor_info* B = nullptr;
      const st_tensor_info* m = nullptr;
    };
    std::map<std::string, parts> found;
    const std::string prefix = "base_model.model.";
    for (const auto& t : f.tensors()) {
      std::string_view k = t.name;
      if (!k.starts_with(prefix))
        throw format_error("deltaw::io::peft (" + source + "): unknown key \"" + t.name + "\" (PEFT keys start with \"" +
                           prefix + "\")");
      k.remove_prefix(prefix.size());
      std::string_view mod;
      const st_tensor_info** slot = nullptr;
      for (auto [suffix, which] : {std::pair<std::string_view, int>{".lora_A.weight", 0},
                                   {".lora_B.weight", 1},
                                   {".lora_magnitude_vector.weight", 2},
                                   {".lora_magnitude_vector", 2}}) {
        if (k.ends_with(suffix) && k.size() > suffix.size()) {
          mod = k.substr(0, k.size() - suffix.size());
          auto& p = found[std::string(mod)];
          slot = which == 0 ? &p.A : which == 1 ? &p.B : &p.m;
          break;
        }
      }
      if (slot == nullptr) {
        for (std::string_view u : {".lora_embedding_A", ".lora_embedding_B"})
          if (k.find(u) != std::string_view::npos)
            throw unsupported_error("deltaw::io::peft (" + source + "): embedding LoRA (\"" + t.name +
                                    "\") is not supported");
        if (k.ends_with(".lora_B.bias"))
          throw unsupported_error("deltaw::io::peft (" + source + "): LoRA biases (\"" + t.name + "\") are not supported");
        throw format_error("deltaw::io::peft (" + source + "): unknown key \"" + t.name + "\"");
      }
      if (*slot != nullptr)
        throw format_error("deltaw::io::peft (" + source + "): two tensors for the same part of \"" + std::string(mod) +
                           "\" (\"" + (*slot)->name + "\" and \"" + t.name + "\")");
      *slot = &t;
    }
    for (const auto& [mod, p] : found) {
      const std::string where = "deltaw::io::peft (" + source + "): module \"" + mod + "\"";
      if (!p.A || !p.B) throw format_error(where + " lacks " + (p.A ? "lora_B.weight" : "lora_A.weight"));
      if (p.A->shape.size() != 2 || p.B->shape.size() != 2) {
        if (p.A->shape.size() == 4 || p.B->shape.size() == 4)
          throw unsupported_error(where + ": convolution LoRA (4-D factors) is not supported");
        throw format_error(where + ": lora_A " + detail::shape_string(p.A->shape) + " and lora_B " +
                           detail::shape_string(p.B->shape) + " must be matrices");
      }
      if (p.A->shape[0] != p.B->shape[1])
        throw format_error(where + ": lora_A " + detail::shape_string(p.A->shape) + " [r, in] and lora_B " +
                           detail::shape_string(p.B->shape) + " [out, r] disagree on r");
      peft_lora_module m;
      m.name = mod;
      m.rank = a.config.rank_for(mod);
      if (std::uint64_t(m.rank) != p.A->shape[0])
        throw format_error(where + ": the config gives r = " + std::to_string(m.rank) + " but lora_A is " +
                           detail::shape_string(p.A->shape));
      m.alpha = a.config.alpha_for(mod);
      m.scale = a.config.scale_for(mod);
      m.fan_in_fan_out = a.config.fan_in_fan_out;
      m.A = f.matrix<float>(p.A->name);
      m.B = f.matrix<float>(p.B->name);
      if (p.m) {
        if (!a.config.use_dora) throw format_error(where + " has a lora_magnitude_vector but the config has use_dora false");
        if (p.m->shape.size() != 1 || p.m->shape[0] != p.B->shape[0])
          throw format_error(where + ": lora_magnitude_vector " + detail::shape_string(p.m->shape) + " must be [" +
                             std::to_string(p.B->shape[0]) + "] (out)");
        m.magnitude = f.vector<float>(p.m->name);
      } else if (a.config.use_dora) {
        throw format_error(where + " lacks lora_magnitude_vector but the config has use_dora true");
      }
      a.insert(std::move(m));
    }
    return a;
  }

  /// The tensors of adapter_model.safetensors, and the config (rank_pattern /
  /// alpha_pattern filled in for modules whose r or α differ from the defaults).
  std::pair<peft_lora_config, safetensors_writer> to_files() const {
    peft_lora_config c = config;
    c.rank_pattern.clear();
    c.alpha_pattern.clear();
    if (!modules_.empty()) {
      // Default r: the most common rank; default α: the α of the first module with it.
      std::map<index_t, int> counts;
      for (const auto& m : modules_) ++counts[m.rank];
      c.r = std::max_element(counts.begin(), counts.end(), [](auto& x, auto& y) { return x.second < y.second; })->first;
      for (const auto& m : modules_)
        if (m.rank == c.r) {
          c.lora_alpha = m.alpha;
          break;
        }
      for (const auto& m : modules_) {
        if (m.rank != c.r) c.rank_pattern.emplace_back(detail::regex_escape(m.name), m.rank);
        if (m.alpha != c.lora_alpha) c.alpha_pattern.emplace_back(detail::regex_escape(m.name), m.alpha);
      }
    }
    detail::set_full_target_modules(c, modules_);
    c.use_dora = std::any_of(modules_.begin(), modules_.end(), [](const auto& m) { return m.magnitude.has_value(); });
    safetensors_writer w;
    for (const auto& m : modules_) {
      if (c.use_dora && !m.magnitude)
        throw argument_error("deltaw::io::peft_adapter: with DoRA every module needs a magnitude vector; \"" + m.name +
                             "\" has none");
      w.add("base_model.model." + m.name + ".lora_A.weight", m.A.view);
      w.add("base_model.model." + m.name + ".lora_B.weight", m.B.view);
      if (m.magnitude) w.add("base_model.model." + m.name + ".lora_magnitude_vector", m.magnitude->view);
    }
    return {std::move(c), std::move(w)};
  }

 private:
  template <class T>
  static held_matrix<float> copy_float(const matrix_view<const T>& v) {
    auto buf = std::make_shared<std::vector<float>>(std::size_t(v.size()));
    for (index_t i = 0; i < v.rows(); ++i)
      for (index_t j = 0; j < v.cols(); ++j) (*buf)[std::size_t(i * v.cols() + j)] = convert<float>(v(i, j));
    return {matrix_view<const float>(buf->data(), v.rows(), v.cols()), buf};
  }
  void insert(peft_lora_module m) {
    auto it = std::lower_bound(modules_.begin(), modules_.end(), m.name,
                               [](const peft_lora_module& x, const std::string& n) { return x.name < n; });
    modules_.insert(it, std::move(m));
  }
  std::vector<peft_lora_module> modules_;
};

namespace detail {
/// The directory of adapter `name` under `dir`: PEFT's save_pretrained writes the adapter
/// named "default" into `dir` itself and any other into `dir/<name>/`. `name` is one path
/// component (argument_error otherwise); empty means "default".
inline std::filesystem::path adapter_subdir(const std::filesystem::path& dir, std::string_view name, const char* op) {
  if (name.empty() || name == "default") return dir;
  if (name == "." || name == ".." || name.find_first_of("/\\") != std::string_view::npos ||
      name.find('\0') != std::string_view::npos)
    throw argument_error(std::string(op) + ": adapter name \"" + std::string(name) +
                         "\" is not a single directory name (PEFT keeps a named adapter in <dir>/<name>/)");
  return dir / std::string(name);
}

/// What every PEFT adapter directory holds: adapter_config.json (read whole, parsed by
/// the caller) and adapter_model.safetensors (mapped by tensors()). `op` names the
/// caller in the errors.
struct adapter_dir {
  std::filesystem::path dir;
  const char* op;
  byte_buffer config;
  std::string config_path = (dir / "adapter_config.json").string();
  std::string tensors_path = (dir / "adapter_model.safetensors").string();

  adapter_dir(std::filesystem::path d, const char* o) : dir(std::move(d)), op(o) { config = read_file(config_path, max_config_bytes); }
  std::string_view config_text() const {
    return {reinterpret_cast<const char*>(config.bytes.data()), config.bytes.size()};
  }
  safetensors_file tensors() const {
    if (!std::filesystem::exists(tensors_path)) {
      if (std::filesystem::exists(dir / "adapter_model.bin"))
        throw unsupported_error(std::string(op) + ": '" + dir.string() +
                                "' holds adapter_model.bin (a pickle); only adapter_model.safetensors is read");
      throw io_error(std::string(op) + ": '" + tensors_path + "' does not exist");
    }
    return safetensors_file::open(tensors_path);
  }
};

/// Test hook: called between the two files of a PEFT directory update (after
/// adapter_config.json, before adapter_model.safetensors is written into the staging
/// directory). Tests make it throw to check that a failure there leaves the old
/// directory intact. Null (the default) does nothing.
inline void (*peft_write_between_files_hook)(const std::filesystem::path& staging) = nullptr;

/// Writes the two files of a PEFT adapter directory all-or-nothing:
///  1. both are written completely (write_file: temporary + rename) into a fresh staging
///     directory created exclusively, next to `dir` when `dir` does not exist, inside it
///     (".deltaw-staging-…", same filesystem) when it does;
///  2. then, if `dir` did not exist, the staging directory is renamed to `dir` (one atomic
///     step); otherwise the two files are renamed over the old ones, the first one rolled
///     back from a hard link of the old file if the second rename fails. Entries of `dir`
///     other than the two files (README.md, named adapters' sub-directories) stay.
/// On any failure the staging directory is removed and `dir` is as it was; the error is an
/// io_error naming the path.
inline void write_adapter_files(const std::filesystem::path& dir_in, const char* op, const safetensors_writer& tensors,
                                const std::string& config_text) {
  namespace fs = std::filesystem;
  fs::path dir = dir_in;
  if (!dir.empty() && !dir.has_filename()) dir = dir.parent_path();  // "out/adapter/"
  if (dir.empty() || dir.filename() == "." || dir.filename() == "..")
    throw argument_error(std::string(op) + ": '" + dir_in.string() + "' does not name a directory to write");
  std::error_code ec;
  const auto st = fs::status(dir, ec);
  const bool exists = fs::exists(st);
  if (exists && !fs::is_directory(st))
    throw io_error(std::string(op) + ": '" + dir.string() + "' exists and is not a directory");
  const fs::path parent = exists ? dir : (dir.has_parent_path() ? dir.parent_path() : fs::path("."));
  if (!exists) {
    fs::create_directories(parent, ec);
    if (ec) throw io_error(std::string(op) + ": cannot create '" + parent.string() + "': " + ec.message());
  }
  // A fresh staging directory: mkdir fails when the name exists, so it is ours alone.
  fs::path staging;
  {
    std::random_device rd;
    const std::string stem = exists ? ".deltaw-staging-" : "." + dir.filename().string() + ".deltaw-staging-";
    for (int attempt = 0; attempt < 100 && staging.empty(); ++attempt) {
      char hex[17];
      std::snprintf(hex, sizeof hex, "%08x%08x", unsigned(rd()), unsigned(rd()));
      const fs::path p = parent / (stem + hex);
      if (fs::create_directory(p, ec) && !ec) staging = p;
      else if (ec && ec != std::errc::file_exists)
        throw io_error(std::string(op) + ": cannot create a staging directory in '" + parent.string() + "': " + ec.message());
    }
    if (staging.empty()) throw io_error(std::string(op) + ": cannot create a staging directory in '" + parent.string() + "'");
  }
  struct cleanup {
    fs::path p;
    ~cleanup() {
      if (!p.empty()) {
        std::error_code e;
        fs::remove_all(p, e);
      }
    }
  } guard{staging};
  const char* names[2] = {"adapter_config.json", "adapter_model.safetensors"};
  write_file(staging / names[0], std::as_bytes(std::span<const char>(config_text.data(), config_text.size())));
  if (peft_write_between_files_hook) peft_write_between_files_hook(staging);
  tensors.write(staging / names[1]);

  if (!exists) {
    fs::rename(staging, dir, ec);
    if (ec) throw io_error(std::string(op) + ": cannot move the new adapter into place as '" + dir.string() + "': " + ec.message());
    guard.p.clear();
    return;
  }
  // dir exists: keep a hard link to each old file (the rollback copy), then rename the new
  // files over the old ones, the safetensors first (a reader of the old config cannot pair
  // it with the new tensors without failing loudly on their names and shapes).
  const int order[2] = {1, 0};
  bool backed_up[2] = {false, false}, moved[2] = {false, false};
  for (int k : order) {
    const fs::path old = dir / names[k];
    if (fs::exists(fs::symlink_status(old, ec))) {
      std::error_code e;
      fs::create_hard_link(old, staging / (std::string(names[k]) + ".old"), e);
      backed_up[k] = !e;
      // The new file keeps the old one's permission bits (best effort).
      const auto perms = fs::status(old, e).permissions();
      if (!e) fs::permissions(staging / names[k], perms, e);
    }
  }
  for (int k : order) {
    fs::rename(staging / names[k], dir / names[k], ec);
    if (ec) {
      const std::string why = ec.message();
      // Roll back the file already moved: its old version from the hard link, or remove
      // it when there was none.
      for (int j : order) {
        if (!moved[j]) continue;
        std::error_code e;
        if (backed_up[j]) fs::rename(staging / (std::string(names[j]) + ".old"), dir / names[j], e);
        else fs::remove(dir / names[j], e);
      }
      throw io_error(std::string(op) + ": cannot move the new " + names[k] + " into '" + dir.string() + "': " + why +
                     " (the directory is left as it was)");
    }
    moved[k] = true;
  }
}
}  // namespace detail

/// Reads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors; the
/// tensors stay mapped and are viewed without copying when stored as aligned F32).
#if DELTAW_DEFINE_PRECOMPILED
DELTAW_PRECOMPILED_INLINE peft_adapter read_peft_adapter(const std::filesystem::path& dir) {
  const detail::adapter_dir d(dir, "deltaw::io::read_peft_adapter");
  auto cfg = parse_peft_config(d.config_text(), d.config_path);
  return peft_adapter::from_safetensors(std::move(cfg), d.tensors(), d.tensors_path);
}
#else
peft_adapter read_peft_adapter(const std::filesystem::path& dir);
#endif

/// Writes `a` as a PEFT adapter directory (created if needed), all-or-nothing: both files
/// are written in full before either replaces an old one (detail::write_adapter_files).
#if DELTAW_DEFINE_PRECOMPILED
DELTAW_PRECOMPILED_INLINE void write_peft_adapter(const std::filesystem::path& dir, const peft_adapter& a) {
  auto [cfg, w] = a.to_files();
  const std::string text = peft_config_json(cfg).dump(2) + "\n";
  detail::write_adapter_files(dir, "deltaw::io::write_peft_adapter", w, text);
}
#else
void write_peft_adapter(const std::filesystem::path& dir, const peft_adapter& a);
#endif

}  // namespace io
DELTAW_NAMESPACE_END
