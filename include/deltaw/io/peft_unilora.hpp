// SPDX-License-Identifier: MIT
// PEFT adapter directories of UniLoRA (expr/unilora.hpp): adapter_config.json +
// adapter_model.safetensors with PEFT 0.21's key names, checked against peft 0.21.2
// (tests/fixtures/peft_unilora, tools/fixtures_gralora_unilora.py). read_peft refers UNILORA
// directories here.
//
// Keys:
//   base_model.unilora_theta_d [d] F32                     θ, shared by every module
//   base_model.model.<module>.unilora_indices_A [r, in] I64, unilora_indices_B [out, r] I64
//   base_model.model.<module>.unilora_scales_A [r, in] F32, unilora_scales_B [out, r] F32
// The indices and scales are in the file only when the adapter was saved with
// save_indices = true. With PEFT's default (false) PEFT redraws them when loading: numpy's
// PCG64 generator seeded with proj_seed, a balanced shuffled assignment over all modules in
// the order the model registers them (not recorded in the file). deltaw does not reproduce
// that draw; such an adapter is refused with unsupported_error saying to save it with
// save_indices = true. Written adapters always carry their indices and scales
// (save_indices = true), which PEFT loads as they are.
// Refused (unsupported_error): fan_in_fan_out (Conv1D layers), biases, modules_to_save.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../backend/cpu/unilora.hpp"
#include "peft.hpp"
#include "peft_structured.hpp"

DELTAW_NAMESPACE_BEGIN
namespace io {

/// adapter_config.json of a UNILORA adapter; the rest of the file is kept in `raw`.
struct peft_unilora_config {
  index_t r = 4;
  index_t theta_d_length = 256;
  std::uint64_t proj_seed = 42;
  bool save_indices = false;
  std::vector<std::string> target_modules;
  json raw = json::object();
};

/// One UniLoRA module: its fixed pattern (indices and scales into θ).
struct peft_unilora_module {
  std::string name;
  std::shared_ptr<const unilora_pattern> pattern;
  index_t out_features() const { return pattern->out; }
  index_t in_features() const { return pattern->in; }
};

class peft_unilora_adapter {
 public:
  peft_unilora_config config;
  held_vector<float> theta;  ///< unilora_theta_d

  std::size_t size() const { return modules_.size(); }
  const std::vector<peft_unilora_module>& modules() const { return modules_; }
  const peft_unilora_module* find(std::string_view name) const {
    for (const auto& m : modules_)
      if (m.name == name) return &m;
    return nullptr;
  }
  /// The update of module `name` over the adapter's θ.
  unilora_update<float> update(std::string_view name) const {
    const auto* m = find(name);
    if (!m) throw argument_error("deltaw::io::peft_unilora_adapter: no module \"" + std::string(name) + "\"");
    return unilora_update<float>(m->pattern, theta);
  }

  /// Adds a module. The first module's θ becomes the adapter's (copied to float); every
  /// later module must hold the same θ values (UniLoRA shares one θ) and the same r.
  template <class T, class D>
  void add(std::string name, const unilora_update<T, D>& u) {
    constexpr const char* op = "deltaw::io::peft_unilora_adapter::add";
    if (find(name)) throw argument_error(std::string(op) + ": module \"" + name + "\" added twice");
    if (modules_.empty()) {
      theta = detail::copy_to_float(u.theta());
      config.r = u.rank();
      config.theta_d_length = u.theta().size();
    } else {
      bool same = u.theta().size() == theta.view.size() && u.rank() == config.r;
      for (index_t i = 0; same && i < theta.view.size(); ++i) same = convert<float>(u.theta()[i]) == theta.view[i];
      if (!same)
        throw argument_error(std::string(op) + ": \"" + name + "\" has another θ (or r) than the modules already added; " +
                             "a UniLoRA adapter shares one θ of length " + std::to_string(theta.view.size()) +
                             " and one r = " + std::to_string(config.r));
    }
    modules_.push_back({std::move(name), u.pattern()});
  }

  /// The config and tensors PEFT would save for this adapter (with save_indices = true).
  std::pair<json, safetensors_writer> to_files() const {
    json o = config.raw.is_object() ? config.raw : json::object();
    safetensors_writer w;
    const std::string P = "base_model.model.";
    std::vector<std::string> names;
    w.add("base_model.unilora_theta_d", theta.view);
    for (const auto& m : modules_) {
      names.push_back(m.name);
      const auto& p = *m.pattern;
      const auto idx = [&](const std::string& key, const std::vector<index_t>& v, index_t rows, index_t cols) {
        std::vector<std::int64_t> b(v.begin(), v.end());
        w.add_raw(P + m.name + key, st_dtype::I64, {std::uint64_t(rows), std::uint64_t(cols)},
                  std::as_bytes(std::span<const std::int64_t>(b)));
      };
      const auto sc = [&](const std::string& key, const std::vector<double>& v, index_t rows, index_t cols) {
        std::vector<float> b(v.begin(), v.end());
        w.add_raw(P + m.name + key, st_dtype::F32, {std::uint64_t(rows), std::uint64_t(cols)},
                  std::as_bytes(std::span<const float>(b)));
      };
      idx(".unilora_indices_A", p.idx_A, p.r, p.in);
      idx(".unilora_indices_B", p.idx_B, p.out, p.r);
      sc(".unilora_scales_A", p.scale_A, p.r, p.in);
      sc(".unilora_scales_B", p.scale_B, p.out, p.r);
    }
    std::sort(names.begin(), names.end());
    o["peft_type"] = "UNILORA";
    o["r"] = config.r;
    o["theta_d_length"] = theta.view.size();
    o["proj_seed"] = config.proj_seed;
    o["save_indices"] = true;
    o["target_modules"] = names;
    o["unilora_dropout"] = 0.0;
    o["fan_in_fan_out"] = false;
    o["bias"] = "none";
    o["modules_to_save"] = nullptr;
    o["inference_mode"] = true;
    if (!o.contains("init_theta_d_bound")) o["init_theta_d_bound"] = 0.02;
    if (!o.contains("init_weights")) o["init_weights"] = true;
    return {std::move(o), std::move(w)};
  }

  /// Builds the adapter from a parsed config and the tensors file.
  static peft_unilora_adapter from_safetensors(peft_unilora_config cfg, const safetensors_file& f, const std::string& source) {
    peft_unilora_adapter a;
    a.config = std::move(cfg);
    const std::string P = "base_model.model.", theta_key = "base_model.unilora_theta_d";
    const char* suffixes[] = {".unilora_indices_A", ".unilora_indices_B", ".unilora_scales_A", ".unilora_scales_B"};
    const st_tensor_info* th = nullptr;
    std::vector<std::pair<std::string, std::array<const st_tensor_info*, 4>>> mods;
    for (const auto& t : f.tensors()) {
      if (t.name == theta_key) {
        th = &t;
        continue;
      }
      const std::string_view n(t.name);
      int which = -1;
      for (int s = 0; s < 4 && which < 0; ++s)
        if (n.starts_with(P) && n.ends_with(suffixes[s]) && n.size() > P.size() + std::string_view(suffixes[s]).size()) which = s;
      if (which < 0)
        throw format_error("deltaw::io::peft (" + source + "): unknown key \"" + t.name + "\" for a UNILORA adapter (expected " +
                           theta_key + " and base_model.model.<module>.unilora_indices_A / _B, unilora_scales_A / _B)");
      std::string mod(n.substr(P.size(), n.size() - P.size() - std::string_view(suffixes[which]).size()));
      auto it = std::find_if(mods.begin(), mods.end(), [&](const auto& e) { return e.first == mod; });
      if (it == mods.end()) {
        mods.push_back({mod, {}});
        it = mods.end() - 1;
      }
      it->second[std::size_t(which)] = &t;
    }
    if (!th) throw format_error("deltaw::io::peft (" + source + "): a UNILORA adapter without " + theta_key);
    if (th->shape.size() != 1 || th->shape[0] == 0)
      throw format_error("deltaw::io::peft (" + source + "): " + theta_key + " is " + detail::shape_string(th->shape) +
                         "; expected [theta_d_length]");
    a.theta = f.vector<float>(theta_key);
    if (a.theta.view.size() != a.config.theta_d_length)
      throw format_error("deltaw::io::peft (" + source + "): " + theta_key + " has " + std::to_string(a.theta.view.size()) +
                         " entries but the config's theta_d_length is " + std::to_string(a.config.theta_d_length));
    if (mods.empty())
      throw unsupported_error("deltaw::io::peft (" + source + "): this UNILORA adapter was saved without its indices " +
                              "(save_indices = " + std::string(a.config.save_indices ? "true" : "false") +
                              "): PEFT redraws them at load time from proj_seed with numpy's generator over the model's " +
                              "module order, which deltaw does not reproduce; save it with UniLoraConfig(save_indices=True)");
    const index_t r = a.config.r, d = a.theta.view.size();
    for (auto& [mod, ts] : mods) {
      const std::string where = "deltaw::io::peft (" + source + "): module \"" + mod + "\"";
      for (int s = 0; s < 4; ++s)
        if (!ts[std::size_t(s)]) throw format_error(where + " lacks " + std::string(suffixes[s] + 1));
      const auto &ia = *ts[0], &ib = *ts[1], &sa = *ts[2], &sb = *ts[3];
      if (ia.shape.size() != 2 || ib.shape.size() != 2 || ia.shape[0] != std::uint64_t(r) || ib.shape[1] != std::uint64_t(r) ||
          sa.shape != ia.shape || sb.shape != ib.shape || ia.shape[1] > (std::uint64_t(1) << 32) ||
          ib.shape[0] > (std::uint64_t(1) << 32))
        throw format_error(where + ": unilora_indices_A " + detail::shape_string(ia.shape) + ", unilora_indices_B " +
                           detail::shape_string(ib.shape) + ", unilora_scales_A " + detail::shape_string(sa.shape) +
                           ", unilora_scales_B " + detail::shape_string(sb.shape) + " are not [r, in], [out, r] (twice) with " +
                           "the config's r = " + std::to_string(r));
      const auto va = f.values<double>(ia.name), vb = f.values<double>(ib.name);
      const auto wa = f.values<double>(sa.name), wb = f.values<double>(sb.name);
      try {
        a.modules_.push_back({mod, deltaw::detail::unilora_make_pattern(index_t(ib.shape[0]), index_t(ia.shape[1]), r, d,
                                                                std::span<const double>(va), std::span<const double>(vb),
                                                                std::span<const double>(wa), std::span<const double>(wb))});
      } catch (const error& e) {
        throw format_error(where + ": " + e.what());
      }
    }
    std::sort(a.modules_.begin(), a.modules_.end(), [](const auto& x, const auto& y) { return x.name < y.name; });
    return a;
  }

 private:
  std::vector<peft_unilora_module> modules_;
};

/// Parses the adapter_config.json of a UNILORA adapter.
inline peft_unilora_config parse_peft_unilora_config(std::string_view text, const std::string& source) {
  const json o = parse_json_strict(text, source);
  if (!o.is_object()) detail::peft_fail(source, "adapter_config.json must hold a JSON object");
  peft_unilora_config c;
  c.raw = o;
  auto pt = o.find("peft_type");
  if (pt == o.end() || !pt->is_string()) detail::peft_fail(source, "no string \"peft_type\"");
  if (pt->get<std::string>() != "UNILORA")
    throw unsupported_error("deltaw::io::read_peft_unilora_adapter (" + source + "): peft_type \"" + pt->get<std::string>() +
                            "\" is not UNILORA");
  if (auto it = o.find("r"); it != o.end()) c.r = detail::peft_rank(*it, "r", source);
  if (auto it = o.find("theta_d_length"); it != o.end()) c.theta_d_length = detail::peft_rank(*it, "theta_d_length", source);
  if (auto it = o.find("proj_seed"); it != o.end() && !it->is_null()) {
    if (!it->is_number_integer() || !it->is_number_unsigned()) detail::peft_fail(source, "\"proj_seed\" must be a non-negative integer");
    c.proj_seed = it->get<std::uint64_t>();
  }
  c.save_indices = detail::peft_bool(o, "save_indices", source);
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

/// Reads a UNILORA adapter directory (saved with save_indices = true).
inline peft_unilora_adapter read_peft_unilora_adapter(const std::filesystem::path& dir) {
  const detail::adapter_dir d(dir, "deltaw::io::read_peft_unilora_adapter");
  auto cfg = parse_peft_unilora_config(d.config_text(), d.config_path);
  return peft_unilora_adapter::from_safetensors(std::move(cfg), d.tensors(), d.tensors_path);
}

/// Writes `a` as a PEFT adapter directory (created if needed, save_indices = true), all-or-nothing.
inline void write_peft_unilora_adapter(const std::filesystem::path& dir, const peft_unilora_adapter& a) {
  if (a.size() == 0) throw argument_error("deltaw::io::write_peft_unilora_adapter: the adapter has no modules");
  auto [cfg, w] = a.to_files();
  detail::write_adapter_files(dir, "deltaw::io::write_peft_unilora_adapter", w, cfg.dump(2) + "\n");
}

}  // namespace io
DELTAW_NAMESPACE_END
