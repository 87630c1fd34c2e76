// SPDX-License-Identifier: MIT
// PEFT adapter directories of KaSA, BD-LoRA (both LoRA variants: peft_type "LORA" with
// kasa_config / use_bdlora in adapter_config.json) and TinyLoRA (peft_type "TINYLORA"),
// with PEFT 0.21.2's key names, shapes and config keys (fixtures: tools/fixtures_kasa_bdlora_tinylora.py).
// read_peft refers these directories here.
//
// KaSA   base_model.model.<m>.lora_A.weight [r, in], .lora_B.weight [out, r], .lora_diag [r];
//        kasa_config {beta, gamma}; s = α/r (α/√r with use_rslora), rank_pattern / alpha_pattern
//        as LoRA's. The update is deltaw::kasa (an adalora_update). PEFT saves neither the
//        truncated base weight nor the dropped part: apply the adapter to W after
//        deltaw::kasa_truncate_base_dense(W, r) (init/kasa.hpp), as PEFT does when it loads it.
// BD-LoRA .lora_A.weight [r, in/n] when A is block-diagonal, .lora_B.weight [out, r/n] when B
//        is; use_bdlora {target_modules_bd_a, target_modules_bd_b, nblocks, match_strict}; a
//        module's side is PEFT's rule: some pattern of the list is a substring of its name.
//        The update is deltaw::bd_lora_update (never densified).
// TinyLoRA base_model.model.<m>.tinylora_A [r, in], .tinylora_B [out, r], .tinylora_P [u, r, r]
//        and the shared base_model.tinylora_v.<g> [u]. PEFT assigns the vectors by the position
//        of each module in the model (named_modules order) and weight_tying, which the file
//        does not record: pass the order (module_order) unless the config makes one group.
//        Files saved with save_projection = false hold no tinylora_P (PEFT redraws it from
//        torch's generator); deltaw refuses them.
// Refused (unsupported_error): fan_in_fan_out, use_dora together with a variant, biases,
// modules_to_save (through parse_peft_config's checks).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../backend/cpu/adalora.hpp"
#include "../backend/cpu/bd_lora.hpp"
#include "../backend/cpu/tinylora.hpp"
#include "../expr/kasa.hpp"
#include "peft.hpp"
#include "peft_structured.hpp"

DELTAW_NAMESPACE_BEGIN
namespace io {

namespace detail {
/// A float copy of a matrix view (the adapters own what they write).
template <class T>
held_matrix<float> variant_copy(const matrix_view<const T>& v) {
  auto buf = std::make_shared<std::vector<float>>(std::size_t(v.size()));
  for (index_t i = 0; i < v.rows(); ++i)
    for (index_t j = 0; j < v.cols(); ++j) (*buf)[std::size_t(i * v.cols() + j)] = convert<float>(v(i, j));
  return {matrix_view<const float>(buf->data(), v.rows(), v.cols()), buf};
}
template <class T>
held_vector<float> variant_copy(const vector_view<const T>& v) {
  auto buf = std::make_shared<std::vector<float>>(std::size_t(v.size()));
  for (index_t i = 0; i < v.size(); ++i) (*buf)[std::size_t(i)] = convert<float>(v[i]);
  return {vector_view<const float>(buf->data(), v.size()), buf};
}

/// Splits a LoRA adapter_config.json with a variant sub-config `key` (kasa_config /
/// use_bdlora): the LoRA part parsed by parse_peft_config, and the sub-config.
inline std::pair<peft_lora_config, json> split_lora_variant(std::string_view text, const char* key,
                                                            const std::string& source) {
  json o = parse_json_strict(text, "deltaw::io::peft (" + source + ")");
  if (!o.is_object()) peft_fail(source, "adapter_config.json must hold a JSON object");
  auto pt = o.find("peft_type");
  if (pt == o.end() || !pt->is_string() || pt->get<std::string>() != "LORA")
    peft_fail(source, std::string("a LoRA variant with \"") + key + "\" needs peft_type \"LORA\"");
  auto it = o.find(key);
  if (it == o.end() || !it->is_object())
    peft_fail(source, std::string("no \"") + key + "\" object: not a " +
                          (std::string_view(key) == "kasa_config" ? "KaSA" : "BD-LoRA") +
                          " adapter (read_peft reads plain LoRA)");
  json sub = *it;
  o.erase(it);
  for (const char* other : {"kasa_config", "use_bdlora"})
    if (auto jt = o.find(other); jt != o.end() && json_truthy(*jt))
      peft_unsupported(source, std::string("\"") + key + "\" together with \"" + other + "\"");
  if (peft_bool(o, "use_dora", source)) peft_unsupported(source, std::string("use_dora together with \"") + key + "\"");
  if (peft_bool(o, "fan_in_fan_out", source)) peft_unsupported(source, std::string("fan_in_fan_out with \"") + key + "\"");
  return {parse_peft_config(o.dump(), source), std::move(sub)};
}

/// r, lora_alpha, rank_pattern and alpha_pattern for modules (name, rank, α), as
/// peft_adapter::to_files chooses them: the most common rank is r.
template <class Modules>
void set_rank_alpha_patterns(peft_lora_config& c, const Modules& modules) {
  c.rank_pattern.clear();
  c.alpha_pattern.clear();
  if (modules.empty()) return;
  std::map<index_t, int> counts;
  for (const auto& m : modules) ++counts[m.rank()];
  c.r = std::max_element(counts.begin(), counts.end(), [](auto& x, auto& y) { return x.second < y.second; })->first;
  for (const auto& m : modules)
    if (m.rank() == c.r) {
      c.lora_alpha = m.alpha;
      break;
    }
  for (const auto& m : modules) {
    if (m.rank() != c.r) c.rank_pattern.emplace_back(regex_escape(m.name), m.rank());
    if (m.alpha != c.lora_alpha) c.alpha_pattern.emplace_back(regex_escape(m.name), m.alpha);
  }
  set_full_target_modules(c, modules);
}

/// LoRA's α for a scale s at rank r.
inline double lora_alpha_of(double s, index_t r, bool rslora) {
  return rslora ? s * std::sqrt(double(r)) : s * double(r);
}

/// The modules of a LoRA-variant file: module → tensor per suffix.
inline std::map<std::string, std::map<std::string, const st_tensor_info*>> group_variant_tensors(
    const safetensors_file& f, std::initializer_list<std::string_view> suffixes, const std::string& source) {
  std::map<std::string, std::map<std::string, const st_tensor_info*>> found;
  const std::string prefix = "base_model.model.";
  for (const auto& t : f.tensors()) {
    std::string_view k = t.name;
    bool ok = false;
    if (k.starts_with(prefix)) {
      k.remove_prefix(prefix.size());
      for (auto s : suffixes)
        if (k.size() > s.size() && k.ends_with(s)) {
          auto& slot = found[std::string(k.substr(0, k.size() - s.size()))][std::string(s)];
          if (slot)
            throw format_error("deltaw::io::peft (" + source + "): two tensors \"" + slot->name + "\" and \"" + t.name +
                               "\"");
          slot = &t;
          ok = true;
          break;
        }
    }
    if (!ok) throw format_error("deltaw::io::peft (" + source + "): unknown key \"" + t.name + "\"");
  }
  return found;
}
inline const st_tensor_info& variant_part(const std::map<std::string, const st_tensor_info*>& parts,
                                          const std::string& suffix, const std::string& where, std::size_t dims) {
  auto it = parts.find(suffix);
  if (it == parts.end() || !it->second) throw format_error(where + " lacks " + suffix.substr(1));
  if (it->second->shape.size() != dims)
    throw format_error(where + ": " + suffix.substr(1) + " " + shape_string(it->second->shape) + " must have " +
                       std::to_string(dims) + " dimension(s)");
  return *it->second;
}
template <class M>
void sort_by_name(std::vector<M>& v) {
  std::sort(v.begin(), v.end(), [](const M& x, const M& y) { return x.name < y.name; });
}
template <class M>
const M* find_by_name(const std::vector<M>& v, std::string_view n) {
  auto it = std::lower_bound(v.begin(), v.end(), n, [](const M& m, std::string_view k) { return m.name < k; });
  return it != v.end() && it->name == n ? &*it : nullptr;
}
}  // namespace detail

// ---------------------------------------------------------------- KaSA

/// One KaSA module: ΔW = s·B·diag(ΔΣ)·A.
struct peft_kasa_module {
  std::string name;
  held_matrix<float> A;       ///< lora_A [r, in]
  held_matrix<float> B;       ///< lora_B [out, r]
  held_vector<float> diag;    ///< lora_diag [r] (ΔΣ)
  double alpha = 8;
  double scale = 1;
  index_t rank() const { return A.view.rows(); }
  index_t out_features() const { return B.view.rows(); }
  index_t in_features() const { return A.view.cols(); }
  std::string layer_mismatch(index_t out, index_t in) const {
    if (out == out_features() && in == in_features()) return {};
    return "lora_B [out, r] and lora_A [r, in] make it " + deltaw::detail::shape_str(out_features(), in_features());
  }
  /// The update over the TRUNCATED base weight (kasa_truncate_base_dense), zero-copy over the file.
  adalora_update<float> update() const { return adalora_update<float>(B, diag, A, scale); }
};

/// A KaSA adapter: LoRA's config fields, KaSA's regulariser weights, the modules (by name).
class peft_kasa_adapter {
 public:
  peft_lora_config config;
  double beta = 1e-4;   ///< kasa_config.beta (train::kasa_options)
  double gamma = 1e-3;  ///< kasa_config.gamma

  const std::vector<peft_kasa_module>& modules() const { return modules_; }
  std::size_t size() const { return modules_.size(); }
  const peft_kasa_module* find(std::string_view n) const { return detail::find_by_name(modules_, n); }
  const peft_kasa_module& at(std::string_view n) const {
    if (const auto* m = find(n)) return *m;
    throw argument_error("deltaw::io::peft_kasa_adapter::at: no module \"" + std::string(n) + "\"");
  }

  /// Adds (or replaces) a module from a KaSA update (deltaw::kasa), copied as float; its α
  /// is s·r (s·√r with config.use_rslora).
  template <class T, class D>
  void add(std::string module, const adalora_update<T, D>& u) {
    static_assert(std::is_same_v<D, device::cpu>, "deltaw::io::peft_kasa_adapter::add: a CPU update");
    if (u.rank() < 1) throw rank_error("deltaw::io::peft_kasa_adapter::add: \"" + module + "\" has rank 0");
    peft_kasa_module m;
    m.name = std::move(module);
    m.A = detail::variant_copy(u.A());
    m.B = detail::variant_copy(u.B());
    m.diag = detail::variant_copy(u.E());
    m.scale = u.scale();
    m.alpha = detail::lora_alpha_of(u.scale(), u.rank(), config.use_rslora);
    modules_.erase(std::remove_if(modules_.begin(), modules_.end(), [&](const auto& x) { return x.name == m.name; }),
                   modules_.end());
    modules_.push_back(std::move(m));
    detail::sort_by_name(modules_);
  }

  static peft_kasa_adapter parse(std::string_view config_text, const safetensors_file& f,
                                 const std::string& config_source, const std::string& source) {
    auto [cfg, sub] = detail::split_lora_variant(config_text, "kasa_config", config_source);
    peft_kasa_adapter a;
    a.config = std::move(cfg);
    a.config.raw["kasa_config"] = sub;
    if (auto it = sub.find("beta"); it != sub.end()) a.beta = detail::peft_number(*it, "kasa_config.beta", config_source);
    if (auto it = sub.find("gamma"); it != sub.end()) a.gamma = detail::peft_number(*it, "kasa_config.gamma", config_source);
    if (a.beta < 0 || a.gamma < 0) detail::peft_fail(config_source, "kasa_config.beta and .gamma must be non-negative");
    for (const auto& [mod, parts] : detail::group_variant_tensors(f, {".lora_A.weight", ".lora_B.weight", ".lora_diag"}, source)) {
      const std::string where = "deltaw::io::peft (" + source + "): KaSA module \"" + mod + "\"";
      const auto& ta = detail::variant_part(parts, ".lora_A.weight", where, 2);
      const auto& tb = detail::variant_part(parts, ".lora_B.weight", where, 2);
      const auto& td = detail::variant_part(parts, ".lora_diag", where, 1);
      const index_t r = a.config.rank_for(mod);
      if (ta.shape[0] != std::uint64_t(r) || tb.shape[1] != std::uint64_t(r) || td.shape[0] != std::uint64_t(r))
        throw format_error(where + ": lora_A " + detail::shape_string(ta.shape) + ", lora_B " +
                           detail::shape_string(tb.shape) + ", lora_diag " + detail::shape_string(td.shape) +
                           " are not [r, in], [out, r], [r] with the config's r = " + std::to_string(r));
      peft_kasa_module m;
      m.name = mod;
      m.A = f.matrix<float>(ta.name);
      m.B = f.matrix<float>(tb.name);
      m.diag = f.vector<float>(td.name);
      m.alpha = a.config.alpha_for(mod);
      m.scale = a.config.scale_for(mod);
      a.modules_.push_back(std::move(m));
    }
    detail::sort_by_name(a.modules_);
    return a;
  }

  /// adapter_config.json and the tensors, as PEFT writes them.
  std::pair<json, safetensors_writer> to_files() const {
    peft_lora_config c = config;
    detail::set_rank_alpha_patterns(c, modules_);
    c.use_dora = false;
    c.fan_in_fan_out = false;
    json o = peft_config_json(c);
    o.erase("use_bdlora");
    o["kasa_config"] = json{{"beta", beta}, {"gamma", gamma}};
    safetensors_writer w;
    for (const auto& m : modules_) {
      const std::string p = "base_model.model." + m.name;
      w.add(p + ".lora_A.weight", m.A.view);
      w.add(p + ".lora_B.weight", m.B.view);
      w.add(p + ".lora_diag", m.diag.view);
    }
    return {std::move(o), std::move(w)};
  }

 private:
  std::vector<peft_kasa_module> modules_;
};

// ---------------------------------------------------------------- BD-LoRA

/// One BD-LoRA module: ΔW = s·BD(B)·BD(A), at most one factor block-diagonal.
struct peft_bdlora_module {
  std::string name;
  held_matrix<float> A;   ///< lora_A [r, in/a_blocks]
  held_matrix<float> B;   ///< lora_B [out, r/b_blocks]
  index_t a_blocks = 1, b_blocks = 1;
  double alpha = 8;
  double scale = 1;
  index_t rank() const { return A.view.rows(); }
  index_t out_features() const { return B.view.rows(); }
  index_t in_features() const { return A.view.cols() * a_blocks; }
  std::string layer_mismatch(index_t out, index_t in) const {
    if (out == out_features() && in == in_features()) return {};
    return "lora_B and the block-diagonal lora_A make it " + deltaw::detail::shape_str(out_features(), in_features());
  }
  bd_lora_update<float> update() const { return bd_lora_update<float>(B, b_blocks, A, a_blocks, scale); }
};

/// A BD-LoRA adapter: LoRA's config fields, use_bdlora's, the modules (by name).
class peft_bdlora_adapter {
 public:
  peft_lora_config config;
  std::vector<std::string> target_modules_bd_a, target_modules_bd_b;  ///< substring patterns
  index_t nblocks = 1;
  bool match_strict = true;

  const std::vector<peft_bdlora_module>& modules() const { return modules_; }
  std::size_t size() const { return modules_.size(); }
  const peft_bdlora_module* find(std::string_view n) const { return detail::find_by_name(modules_, n); }
  const peft_bdlora_module& at(std::string_view n) const {
    if (const auto* m = find(n)) return *m;
    throw argument_error("deltaw::io::peft_bdlora_adapter::at: no module \"" + std::string(n) + "\"");
  }

  /// PEFT's rule: 'A' or 'B' when a pattern of that list is a substring of the module name,
  /// 0 for neither.
  static char side_of(const std::string& module, const std::vector<std::string>& bd_a, const std::vector<std::string>& bd_b) {
    auto any = [&](const std::vector<std::string>& l) {
      return std::any_of(l.begin(), l.end(), [&](const std::string& p) { return module.find(p) != std::string::npos; });
    };
    const bool a = any(bd_a), b = any(bd_b);
    if (a && b) return '2';
    return a ? 'A' : b ? 'B' : 0;
  }

  /// Adds (or replaces) a module from a BD-LoRA update, copied as float; its α is s·r (s·√r
  /// with config.use_rslora). Written files need one block count over all block-diagonal
  /// factors and at most one block-diagonal factor per module (PEFT's form).
  template <class T, class D>
  void add(std::string module, const bd_lora_update<T, D>& u) {
    static_assert(std::is_same_v<D, device::cpu>, "deltaw::io::peft_bdlora_adapter::add: a CPU update");
    constexpr const char* op = "deltaw::io::peft_bdlora_adapter::add";
    if (u.a_blocks() > 1 && u.b_blocks() > 1)
      throw argument_error(std::string(op) + ": \"" + module + "\" has both factors block-diagonal; PEFT's BD-LoRA has one");
    peft_bdlora_module m;
    m.name = std::move(module);
    m.A = detail::variant_copy(u.A());
    m.B = detail::variant_copy(u.B());
    m.a_blocks = u.a_blocks();
    m.b_blocks = u.b_blocks();
    m.scale = u.scale();
    m.alpha = detail::lora_alpha_of(u.scale(), u.rank(), config.use_rslora);
    modules_.erase(std::remove_if(modules_.begin(), modules_.end(), [&](const auto& x) { return x.name == m.name; }),
                   modules_.end());
    modules_.push_back(std::move(m));
    detail::sort_by_name(modules_);
  }

  static peft_bdlora_adapter parse(std::string_view config_text, const safetensors_file& f,
                                   const std::string& config_source, const std::string& source) {
    auto split = detail::split_lora_variant(config_text, "use_bdlora", config_source);
    const json sub = std::move(split.second);  // a named variable: lambdas below read it
    peft_bdlora_adapter a;
    a.config = std::move(split.first);
    a.config.raw["use_bdlora"] = sub;
    auto list = [&](const char* k, std::vector<std::string>& out) {
      auto it = sub.find(k);
      if (it == sub.end() || it->is_null()) return;
      if (!it->is_array()) detail::peft_fail(config_source, std::string("use_bdlora.") + k + " must be a list");
      for (const auto& e : *it) {
        if (!e.is_string()) detail::peft_fail(config_source, std::string("use_bdlora.") + k + " must hold strings");
        out.push_back(e.get<std::string>());
      }
    };
    list("target_modules_bd_a", a.target_modules_bd_a);
    list("target_modules_bd_b", a.target_modules_bd_b);
    if (auto it = sub.find("nblocks"); it != sub.end()) a.nblocks = detail::peft_rank(*it, "use_bdlora.nblocks", config_source);
    if (a.nblocks < 1) detail::peft_fail(config_source, "use_bdlora.nblocks must be at least 1");
    a.match_strict = detail::peft_bool(sub, "match_strict", config_source) || !sub.contains("match_strict");
    for (const auto& [mod, parts] : detail::group_variant_tensors(f, {".lora_A.weight", ".lora_B.weight"}, source)) {
      const std::string where = "deltaw::io::peft (" + source + "): BD-LoRA module \"" + mod + "\"";
      const auto& ta = detail::variant_part(parts, ".lora_A.weight", where, 2);
      const auto& tb = detail::variant_part(parts, ".lora_B.weight", where, 2);
      const char side = side_of(mod, a.target_modules_bd_a, a.target_modules_bd_b);
      if (side == '2') throw format_error(where + " matches both target_modules_bd_a and target_modules_bd_b");
      if (side == 0 && a.match_strict)
        throw format_error(where + " matches neither target_modules_bd_a nor target_modules_bd_b but match_strict is true");
      const index_t r = a.config.rank_for(mod);
      const index_t nb = side == 'B' ? a.nblocks : 1;
      if (ta.shape[0] != std::uint64_t(r) || tb.shape[1] * std::uint64_t(nb) != std::uint64_t(r))
        throw format_error(where + ": lora_A " + detail::shape_string(ta.shape) + " and lora_B " +
                           detail::shape_string(tb.shape) + " do not fit r = " + std::to_string(r) + " with " +
                           (side == 'A' ? "A" : side == 'B' ? "B" : "no factor") + " block-diagonal (nblocks = " +
                           std::to_string(a.nblocks) + ")");
      peft_bdlora_module m;
      m.name = mod;
      m.A = f.matrix<float>(ta.name);
      m.B = f.matrix<float>(tb.name);
      m.a_blocks = side == 'A' ? a.nblocks : 1;
      m.b_blocks = nb;
      m.alpha = a.config.alpha_for(mod);
      m.scale = a.config.scale_for(mod);
      try {
        (void)m.update();
      } catch (const error& e) {
        throw format_error(where + ": " + e.what());
      }
      a.modules_.push_back(std::move(m));
    }
    detail::sort_by_name(a.modules_);
    return a;
  }

  /// adapter_config.json and the tensors. target_modules_bd_a / _bd_b are the full names of
  /// the modules with a block-diagonal A / B; argument_error when PEFT's substring rule would
  /// then give some module another side (one name inside another), or block counts differ.
  std::pair<json, safetensors_writer> to_files() const {
    constexpr const char* op = "deltaw::io::peft_bdlora_adapter::to_files";
    peft_lora_config c = config;
    detail::set_rank_alpha_patterns(c, modules_);
    c.use_dora = false;
    c.fan_in_fan_out = false;
    std::vector<std::string> la, lb;
    index_t nb = 0;
    bool strict = true;
    for (const auto& m : modules_) {
      const index_t k = std::max(m.a_blocks, m.b_blocks);
      if (k > 1) {
        if (nb != 0 && nb != k)
          throw argument_error(std::string(op) + ": PEFT has one nblocks; \"" + m.name + "\" has " + std::to_string(k) +
                               " blocks, another module " + std::to_string(nb));
        nb = k;
      }
      if (m.a_blocks > 1) la.push_back(m.name);
      else if (m.b_blocks > 1) lb.push_back(m.name);
      else strict = false;
    }
    if (nb == 0) nb = 1;
    for (const auto& m : modules_) {
      const char want = m.a_blocks > 1 ? 'A' : m.b_blocks > 1 ? 'B' : 0;
      if (side_of(m.name, la, lb) != want)
        throw argument_error(std::string(op) + ": with PEFT's substring rule module \"" + m.name +
                             "\" would not get its block-diagonal side (a module name contains another)");
    }
    json o = peft_config_json(c);
    o.erase("kasa_config");
    o["use_bdlora"] = json{{"target_modules_bd_a", la}, {"target_modules_bd_b", lb}, {"nblocks", nb}, {"match_strict", strict}};
    safetensors_writer w;
    for (const auto& m : modules_) {
      const std::string p = "base_model.model." + m.name;
      w.add(p + ".lora_A.weight", m.A.view);
      w.add(p + ".lora_B.weight", m.B.view);
    }
    return {std::move(o), std::move(w)};
  }

 private:
  std::vector<peft_bdlora_module> modules_;
};

// ---------------------------------------------------------------- TinyLoRA

/// adapter_config.json of a TINYLORA adapter; the rest of the file is kept in `raw`.
struct peft_tinylora_config {
  index_t r = 2;
  index_t u = 64;
  double weight_tying = 0.0;
  std::int64_t projection_seed = 42;
  bool save_projection = true;
  std::vector<std::string> target_modules;
  json raw = json::object();

  /// PEFT's grouping of N target modules: groups = max(1, round(N·(1 − weight_tying))) (round
  /// half to even, as Python's round), size = max(1, N / groups), module i → min(i / size, groups − 1).
  index_t groups(index_t n) const { return std::max<index_t>(1, index_t(std::nearbyint(double(n) * (1.0 - weight_tying)))); }
  index_t group_of(index_t i, index_t n) const {
    const index_t g = groups(n), size = std::max<index_t>(1, n / g);
    return std::min(i / size, g - 1);
  }
};

/// One TinyLoRA module: ΔW = B·(Σᵢ vᵢPᵢ)·A with v = tinylora_v.<group>.
struct peft_tinylora_module {
  std::string name;
  held_matrix<float> A;  ///< tinylora_A [r, in]
  held_matrix<float> B;  ///< tinylora_B [out, r]
  held_matrix<float> P;  ///< tinylora_P [u, r, r] as [u, r·r]
  held_vector<float> v;  ///< the group's tinylora_v [u]
  index_t group = 0;
  index_t rank() const { return A.view.rows(); }
  index_t out_features() const { return B.view.rows(); }
  index_t in_features() const { return A.view.cols(); }
  std::string layer_mismatch(index_t out, index_t in) const {
    if (out == out_features() && in == in_features()) return {};
    return "tinylora_B [out, r] and tinylora_A [r, in] make it " + deltaw::detail::shape_str(out_features(), in_features());
  }
  tinylora_update<float> update() const { return tinylora_update<float>(B, v, P, A, 1.0); }
};

/// A TinyLoRA adapter: config, modules (by name), each with its group's vector.
class peft_tinylora_adapter {
 public:
  peft_tinylora_config config;

  const std::vector<peft_tinylora_module>& modules() const { return modules_; }
  std::size_t size() const { return modules_.size(); }
  const peft_tinylora_module* find(std::string_view n) const { return detail::find_by_name(modules_, n); }
  const peft_tinylora_module& at(std::string_view n) const {
    if (const auto* m = find(n)) return *m;
    throw argument_error("deltaw::io::peft_tinylora_adapter::at: no module \"" + std::string(n) + "\"");
  }

  /// Adds (or replaces) a module from a TinyLoRA update (scale 1, as PEFT's), copied as float,
  /// in weight-tying group `group` (modules of one group must carry the same v when written).
  template <class T, class D>
  void add(std::string module, const tinylora_update<T, D>& u, index_t group = 0) {
    static_assert(std::is_same_v<D, device::cpu>, "deltaw::io::peft_tinylora_adapter::add: a CPU update");
    constexpr const char* op = "deltaw::io::peft_tinylora_adapter::add";
    if (u.scale() != 1.0)
      throw argument_error(std::string(op) + ": PEFT's TinyLoRA has no scale; \"" + module + "\" has s = " +
                           std::to_string(u.scale()));
    if (group < 0) throw argument_error(std::string(op) + ": negative group");
    peft_tinylora_module m;
    m.name = std::move(module);
    m.A = detail::variant_copy(u.A());
    m.B = detail::variant_copy(u.B());
    m.P = detail::variant_copy(u.P());
    m.v = detail::variant_copy(u.v());
    m.group = group;
    modules_.erase(std::remove_if(modules_.begin(), modules_.end(), [&](const auto& x) { return x.name == m.name; }),
                   modules_.end());
    modules_.push_back(std::move(m));
    detail::sort_by_name(modules_);
  }

  /// Builds from a config, the tensors and the model's order of the target modules
  /// (named_modules order; may be empty when the config makes one group).
  static peft_tinylora_adapter from_safetensors(peft_tinylora_config cfg, const safetensors_file& f,
                                                const std::vector<std::string>& module_order,
                                                const std::string& source = "adapter_model.safetensors") {
    const std::string where0 = "deltaw::io::peft (" + source + ")";
    peft_tinylora_adapter a;
    a.config = std::move(cfg);
    std::map<index_t, const st_tensor_info*> vecs;
    std::map<std::string, std::map<std::string, const st_tensor_info*>> mods;
    const std::string vp = "base_model.tinylora_v.", mp = "base_model.model.";
    for (const auto& t : f.tensors()) {
      std::string_view k = t.name;
      if (k.starts_with(vp)) {
        const std::string g(k.substr(vp.size()));
        if (g.empty() || g.size() > 9 || g.find_first_not_of("0123456789") != std::string::npos)
          throw format_error(where0 + ": tinylora_v key \"" + t.name + "\" does not end in a group number");
        vecs[index_t(std::stol(g))] = &t;
        continue;
      }
      bool ok = false;
      if (k.starts_with(mp)) {
        k.remove_prefix(mp.size());
        for (std::string_view s : {".tinylora_A", ".tinylora_B", ".tinylora_P"})
          if (k.size() > s.size() && k.ends_with(s)) {
            mods[std::string(k.substr(0, k.size() - s.size()))][std::string(s)] = &t;
            ok = true;
            break;
          }
      }
      if (!ok) throw format_error(where0 + ": unknown key \"" + t.name + "\"");
    }
    const index_t n = index_t(mods.size()), ng = a.config.groups(n);
    if (index_t(vecs.size()) != ng || (ng > 0 && (vecs.begin()->first != 0 || vecs.rbegin()->first != ng - 1)))
      throw format_error(where0 + ": " + std::to_string(vecs.size()) + " tinylora_v vectors, but weight_tying = " +
                         std::to_string(a.config.weight_tying) + " over " + std::to_string(n) + " modules makes " +
                         std::to_string(ng) + " groups (0 … " + std::to_string(ng - 1) + ")");
    std::map<std::string, index_t> position;
    if (ng > 1) {
      if (module_order.empty())
        throw argument_error("deltaw::io::read_peft_tinylora_adapter: the adapter has " + std::to_string(ng) +
                             " weight-tying groups, assigned by the modules' order in the model, which the file "
                             "does not record: pass module_order (the target modules in named_modules order)");
      for (const auto& name : module_order) {
        if (!mods.count(name))
          throw argument_error("deltaw::io::read_peft_tinylora_adapter: module_order names \"" + name +
                               "\", which the adapter does not have");
        if (!position.emplace(name, index_t(position.size())).second)
          throw argument_error("deltaw::io::read_peft_tinylora_adapter: module_order names \"" + name + "\" twice");
      }
      if (index_t(position.size()) != n)
        throw argument_error("deltaw::io::read_peft_tinylora_adapter: module_order has " +
                             std::to_string(position.size()) + " of the adapter's " + std::to_string(n) + " modules");
    }
    for (const auto& [mod, parts] : mods) {
      const std::string where = where0 + ": TinyLoRA module \"" + mod + "\"";
      if (!parts.count(".tinylora_P"))
        throw unsupported_error(where + " has no tinylora_P (saved with save_projection = false: PEFT redraws the "
                                "projections from torch's generator, which deltaw does not reproduce; save with "
                                "save_projection = true)");
      const auto& ta = detail::variant_part(parts, ".tinylora_A", where, 2);
      const auto& tb = detail::variant_part(parts, ".tinylora_B", where, 2);
      const auto& tp = detail::variant_part(parts, ".tinylora_P", where, 3);
      peft_tinylora_module m;
      m.name = mod;
      m.group = ng > 1 ? a.config.group_of(position.at(mod), n) : 0;
      const auto& tv = *vecs.at(m.group);
      const std::uint64_t r = ta.shape[0];
      if (tb.shape[1] != r || tp.shape[1] != r || tp.shape[2] != r || tv.shape.size() != 1 || tv.shape[0] != tp.shape[0])
        throw format_error(where + ": tinylora_A " + detail::shape_string(ta.shape) + ", tinylora_B " +
                           detail::shape_string(tb.shape) + ", tinylora_P " + detail::shape_string(tp.shape) + " and " +
                           tv.name + " " + detail::shape_string(tv.shape) + " are not [r, in], [out, r], [u, r, r], [u]");
      m.A = f.matrix<float>(ta.name);
      m.B = f.matrix<float>(tb.name);
      auto pv = std::make_shared<std::vector<float>>(f.values<float>(tp.name));
      m.P = {matrix_view<const float>(pv->data(), index_t(tp.shape[0]), index_t(r * r)), pv};
      m.v = f.vector<float>(tv.name);
      a.modules_.push_back(std::move(m));
    }
    detail::sort_by_name(a.modules_);
    return a;
  }

  /// adapter_config.json and the tensors (save_projection = true). `module_order` (the model's
  /// order of the modules) is needed when the modules use more than one group: argument_error
  /// unless PEFT's grouping of that order under config.weight_tying gives every module its
  /// group, or when modules of one group carry different vectors.
  std::pair<json, safetensors_writer> to_files(const std::vector<std::string>& module_order = {}) const {
    constexpr const char* op = "deltaw::io::peft_tinylora_adapter::to_files";
    if (modules_.empty()) throw argument_error(std::string(op) + ": the adapter has no modules");
    const index_t n = index_t(modules_.size()), ng = config.groups(n);
    std::map<index_t, const peft_tinylora_module*> rep;
    for (const auto& m : modules_) {
      auto [it, fresh] = rep.emplace(m.group, &m);
      if (!fresh) {
        const auto &a = it->second->v.view, &b = m.v.view;
        bool same = a.size() == b.size();
        for (index_t i = 0; same && i < a.size(); ++i) same = a[i] == b[i];
        if (!same)
          throw argument_error(std::string(op) + ": \"" + it->second->name + "\" and \"" + m.name + "\" share group " +
                               std::to_string(m.group) + " but not their vector v");
      }
    }
    const index_t r = modules_.front().rank(), u = modules_.front().P.view.rows();
    for (const auto& m : modules_)
      if (m.rank() != r || m.P.view.rows() != u)
        throw argument_error(std::string(op) + ": PEFT's config has one r and one u; \"" + m.name + "\" has r = " +
                             std::to_string(m.rank()) + ", u = " + std::to_string(m.P.view.rows()));
    if (ng > 1 || index_t(rep.size()) > 1) {
      if (index_t(module_order.size()) != n)
        throw argument_error(std::string(op) + ": " + std::to_string(rep.size()) + " groups: pass module_order (all " +
                             std::to_string(n) + " modules in the model's order)");
      for (index_t i = 0; i < n; ++i) {
        const auto* m = find(module_order[std::size_t(i)]);
        if (!m) throw argument_error(std::string(op) + ": module_order names \"" + module_order[std::size_t(i)] + "\", not in the adapter");
        if (m->group != config.group_of(i, n))
          throw argument_error(std::string(op) + ": with weight_tying = " + std::to_string(config.weight_tying) +
                               " PEFT puts \"" + m->name + "\" (position " + std::to_string(i) + ") in group " +
                               std::to_string(config.group_of(i, n)) + ", not " + std::to_string(m->group));
      }
    } else if (rep.begin()->first != 0) {
      throw argument_error(std::string(op) + ": one group must be group 0");
    }
    json o = config.raw.is_object() ? config.raw : json::object();
    o["peft_type"] = "TINYLORA";
    o["r"] = r;
    o["u"] = u;
    o["weight_tying"] = config.weight_tying;
    o["projection_seed"] = config.projection_seed;
    o["save_projection"] = true;
    std::vector<std::string> tm;
    for (const auto& m : modules_) tm.push_back(m.name);
    o["target_modules"] = tm;
    for (const auto& [k, v] : std::initializer_list<std::pair<const char*, json>>{
             {"bias", "none"}, {"fan_in_fan_out", false}, {"tinylora_dropout", 0.0}, {"init_weights", true},
             {"init_v_bound", 0.02}, {"inference_mode", true}, {"modules_to_save", nullptr}, {"task_type", nullptr}})
      if (!o.contains(k)) o[k] = v;
    safetensors_writer w;
    for (const auto& m : modules_) {
      const std::string p = "base_model.model." + m.name;
      w.add(p + ".tinylora_A", m.A.view);
      w.add(p + ".tinylora_B", m.B.view);
      const auto& P = m.P.view;  // contiguous row-major float (variant_copy or the file)
      w.add_raw(p + ".tinylora_P", st_dtype::F32, {std::uint64_t(u), std::uint64_t(r), std::uint64_t(r)},
                std::as_bytes(std::span<const float>(P.data(), std::size_t(P.size()))));
    }
    for (const auto& [g, m] : rep) w.add("base_model.tinylora_v." + std::to_string(g), m->v.view);
    return {std::move(o), std::move(w)};
  }

 private:
  std::vector<peft_tinylora_module> modules_;
};

/// Parses the adapter_config.json of a TINYLORA adapter.
inline peft_tinylora_config parse_peft_tinylora_config(std::string_view text, const std::string& source) {
  const json o = parse_json_strict(text, "deltaw::io::peft (" + source + ")");
  if (!o.is_object()) detail::peft_fail(source, "adapter_config.json must hold a JSON object");
  auto pt = o.find("peft_type");
  if (pt == o.end() || !pt->is_string() || pt->get<std::string>() != "TINYLORA")
    throw unsupported_error("deltaw::io::read_peft_tinylora_adapter (" + source + "): peft_type is not TINYLORA");
  peft_tinylora_config c;
  c.raw = o;
  if (auto it = o.find("r"); it != o.end()) c.r = detail::peft_rank(*it, "r", source);
  if (auto it = o.find("u"); it != o.end()) c.u = detail::peft_rank(*it, "u", source);
  if (auto it = o.find("weight_tying"); it != o.end()) c.weight_tying = detail::peft_number(*it, "weight_tying", source);
  if (!(c.weight_tying >= 0 && c.weight_tying <= 1)) detail::peft_fail(source, "\"weight_tying\" must be in [0, 1]");
  if (auto it = o.find("projection_seed"); it != o.end() && it->is_number_integer()) c.projection_seed = it->get<std::int64_t>();
  c.save_projection = !o.contains("save_projection") || detail::peft_bool(o, "save_projection", source);
  if (detail::peft_bool(o, "fan_in_fan_out", source)) detail::peft_unsupported(source, "fan_in_fan_out = true");
  if (auto it = o.find("bias"); it != o.end() && it->is_string() && it->get<std::string>() != "none")
    detail::peft_unsupported(source, "bias = \"" + it->get<std::string>() + "\"");
  if (auto it = o.find("modules_to_save"); it != o.end() && detail::json_truthy(*it))
    detail::peft_unsupported(source, "\"modules_to_save\"");
  if (auto it = o.find("target_modules"); it != o.end() && it->is_array())
    for (const auto& e : *it)
      if (e.is_string()) c.target_modules.push_back(e.get<std::string>());
  return c;
}

/// Reads a KaSA adapter directory (a LoRA adapter_config.json with kasa_config).
inline peft_kasa_adapter read_peft_kasa_adapter(const std::filesystem::path& dir) {
  const detail::adapter_dir d(dir, "deltaw::io::read_peft_kasa_adapter");
  return peft_kasa_adapter::parse(d.config_text(), d.tensors(), d.config_path, d.tensors_path);
}
/// Reads a BD-LoRA adapter directory (a LoRA adapter_config.json with use_bdlora).
inline peft_bdlora_adapter read_peft_bdlora_adapter(const std::filesystem::path& dir) {
  const detail::adapter_dir d(dir, "deltaw::io::read_peft_bdlora_adapter");
  return peft_bdlora_adapter::parse(d.config_text(), d.tensors(), d.config_path, d.tensors_path);
}
/// Reads a TINYLORA adapter directory; module_order: the target modules in the model's
/// named_modules order (needed when weight_tying makes more than one group).
inline peft_tinylora_adapter read_peft_tinylora_adapter(const std::filesystem::path& dir,
                                                        const std::vector<std::string>& module_order = {}) {
  const detail::adapter_dir d(dir, "deltaw::io::read_peft_tinylora_adapter");
  return peft_tinylora_adapter::from_safetensors(parse_peft_tinylora_config(d.config_text(), d.config_path), d.tensors(),
                                                 module_order, d.tensors_path);
}

/// Writers: all-or-nothing (detail::write_adapter_files).
inline void write_peft_kasa_adapter(const std::filesystem::path& dir, const peft_kasa_adapter& a) {
  if (a.size() == 0) throw argument_error("deltaw::io::write_peft_kasa_adapter: the adapter has no modules");
  auto [cfg, w] = a.to_files();
  detail::write_adapter_files(dir, "deltaw::io::write_peft_kasa_adapter", w, cfg.dump(2) + "\n");
}
inline void write_peft_bdlora_adapter(const std::filesystem::path& dir, const peft_bdlora_adapter& a) {
  if (a.size() == 0) throw argument_error("deltaw::io::write_peft_bdlora_adapter: the adapter has no modules");
  auto [cfg, w] = a.to_files();
  detail::write_adapter_files(dir, "deltaw::io::write_peft_bdlora_adapter", w, cfg.dump(2) + "\n");
}
inline void write_peft_tinylora_adapter(const std::filesystem::path& dir, const peft_tinylora_adapter& a,
                                        const std::vector<std::string>& module_order = {}) {
  auto [cfg, w] = a.to_files(module_order);
  detail::write_adapter_files(dir, "deltaw::io::write_peft_tinylora_adapter", w, cfg.dump(2) + "\n");
}

}  // namespace io
DELTAW_NAMESPACE_END
