// SPDX-License-Identifier: MIT
// PEFT adapter directories of GraLoRA (expr/gralora.hpp): adapter_config.json +
// adapter_model.safetensors with PEFT 0.21's key names, checked against peft 0.21.2
// (tests/fixtures/peft_gralora: k = 3 with a hybrid part, peft_gralora_k2: k = 2 without;
// tools/fixtures_gralora_unilora.py). read_peft refers GRALORA directories here.
//
// Keys (under base_model.model.<module>.), all F32 as PEFT saves them:
//   gralora_A [k, in/k, r]            read as the update's A [in, r] (the same bytes)
//   gralora_B [k, r, out/k]           read as the update's B [k·r, out/k]
//   gralora_A_general.weight [hr, in] and gralora_B_general.weight [out, hr], when hr > 0
// Config: r, gralora_k, hybrid_r and alpha are one per adapter (PEFT has no per-module
// patterns for GraLoRA); the scale is alpha/(r + hybrid_r). gralora_dropout is ignored (not
// part of ΔW). Refused (unsupported_error): fan_in_fan_out (Conv1D layers), biases,
// modules_to_save. Writing checks that every module shares r, k, hr and the scale.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../backend/cpu/gralora.hpp"
#include "peft.hpp"
#include "peft_structured.hpp"

DELTAW_NAMESPACE_BEGIN
namespace io {

/// adapter_config.json of a GRALORA adapter: the fields that change ΔW; the rest is kept in
/// `raw` and written back.
struct peft_gralora_config {
  index_t r = 32;          ///< PEFT's default
  index_t k = 2;           ///< gralora_k
  index_t hybrid_r = 0;
  double alpha = 64;
  std::vector<std::string> target_modules;
  json raw = json::object();
  double scale() const { return alpha / double(r + hybrid_r); }
};

/// One GraLoRA module: the grid's A [in, r], B [k·r, out/k] and the hybrid A_h, B_h.
struct peft_gralora_module {
  std::string name;
  held_matrix<float> A, B, hybrid_A, hybrid_B;
  index_t k = 1;
  double scale = 1;
  index_t out_features() const { return k * B.view.cols(); }
  index_t in_features() const { return A.view.rows(); }
  gralora_update<float> update() const { return gralora_update<float>(A, B, k, hybrid_A, hybrid_B, scale); }
};

class peft_gralora_adapter {
 public:
  peft_gralora_config config;

  std::size_t size() const { return modules_.size(); }
  const std::vector<peft_gralora_module>& modules() const { return modules_; }
  const peft_gralora_module* find(std::string_view name) const {
    for (const auto& m : modules_)
      if (m.name == name) return &m;
    return nullptr;
  }
  const peft_gralora_module& at(std::string_view name) const {
    if (const auto* m = find(name)) return *m;
    throw argument_error("deltaw::io::peft_gralora_adapter: no module \"" + std::string(name) + "\"");
  }

  /// Adds a module (copied to float). The first module sets r, k, hybrid_r and alpha
  /// (= scale·(r + hr)); later ones must match them (PEFT's config holds one of each).
  template <class T, class D>
  void add(std::string name, const gralora_update<T, D>& u) {
    constexpr const char* op = "deltaw::io::peft_gralora_adapter::add";
    if (find(name)) throw argument_error(std::string(op) + ": module \"" + name + "\" added twice");
    if (modules_.empty()) {
      config.r = u.rank();
      config.k = u.k();
      config.hybrid_r = u.hybrid_rank();
      config.alpha = u.scale() * double(u.rank() + u.hybrid_rank());
    } else if (config.r != u.rank() || config.k != u.k() || config.hybrid_r != u.hybrid_rank() ||
               std::abs(config.scale() - u.scale()) > 1e-12 * std::max(1.0, std::abs(u.scale()))) {
      throw argument_error(std::string(op) + ": \"" + name + "\" has r = " + std::to_string(u.rank()) + ", k = " +
                           std::to_string(u.k()) + ", hybrid_r = " + std::to_string(u.hybrid_rank()) + ", scale " +
                           std::to_string(u.scale()) + "; the adapter has r = " + std::to_string(config.r) + ", k = " +
                           std::to_string(config.k) + ", hybrid_r = " + std::to_string(config.hybrid_r) + ", scale " +
                           std::to_string(config.scale()) + " (PEFT's GraLoRA config has one of each)");
    }
    modules_.push_back({std::move(name), detail::copy_to_float(u.A()), detail::copy_to_float(u.B()),
                        detail::copy_to_float(u.hybrid_A()), detail::copy_to_float(u.hybrid_B()), u.k(), u.scale()});
  }

  /// The config and tensors PEFT would save for this adapter.
  std::pair<json, safetensors_writer> to_files() const {
    json o = config.raw.is_object() ? config.raw : json::object();
    safetensors_writer w;
    const std::string P = "base_model.model.";
    std::vector<std::string> names;
    for (const auto& m : modules_) {
      names.push_back(m.name);
      const index_t k = m.k, r = m.A.view.cols();
      detail::add_f32_tensor(w, P + m.name + ".gralora_A",
                             {std::uint64_t(k), std::uint64_t(m.in_features() / k), std::uint64_t(r)}, m.A.view);
      detail::add_f32_tensor(w, P + m.name + ".gralora_B", {std::uint64_t(k), std::uint64_t(r), std::uint64_t(m.B.view.cols())},
                             m.B.view);
      if (m.hybrid_A.view.rows() > 0) {
        w.add(P + m.name + ".gralora_A_general.weight", m.hybrid_A.view);
        w.add(P + m.name + ".gralora_B_general.weight", m.hybrid_B.view);
      }
    }
    std::sort(names.begin(), names.end());
    o["peft_type"] = "GRALORA";
    o["r"] = config.r;
    o["gralora_k"] = config.k;
    o["hybrid_r"] = config.hybrid_r;
    o["alpha"] = config.alpha;
    o["target_modules"] = names;
    o["gralora_dropout"] = 0.0;
    o["fan_in_fan_out"] = false;
    o["bias"] = "none";
    o["modules_to_save"] = nullptr;
    o["inference_mode"] = true;
    if (!o.contains("init_weights")) o["init_weights"] = true;
    return {std::move(o), std::move(w)};
  }

  /// Builds the adapter from a parsed config and the tensors file.
  static peft_gralora_adapter from_safetensors(peft_gralora_config cfg, const safetensors_file& f, const std::string& source) {
    peft_gralora_adapter a;
    a.config = std::move(cfg);
    const auto& c = a.config;
    const std::string P = "base_model.model.";
    const char* suffixes[] = {".gralora_A", ".gralora_B", ".gralora_A_general.weight", ".gralora_B_general.weight"};
    // Group the tensors by module.
    std::vector<std::pair<std::string, std::array<const st_tensor_info*, 4>>> mods;
    for (const auto& t : f.tensors()) {
      const std::string_view n(t.name);
      int which = -1;
      for (int s = 0; s < 4 && which < 0; ++s)
        if (n.starts_with(P) && n.ends_with(suffixes[s]) && n.size() > P.size() + std::string_view(suffixes[s]).size()) which = s;
      if (which < 0)
        throw format_error("deltaw::io::peft (" + source + "): unknown key \"" + t.name +
                           "\" for a GRALORA adapter (expected base_model.model.<module>.gralora_A, .gralora_B, "
                           ".gralora_A_general.weight or .gralora_B_general.weight)");
      std::string mod(n.substr(P.size(), n.size() - P.size() - std::string_view(suffixes[which]).size()));
      auto it = std::find_if(mods.begin(), mods.end(), [&](const auto& e) { return e.first == mod; });
      if (it == mods.end()) {
        mods.push_back({mod, {}});
        it = mods.end() - 1;
      }
      it->second[std::size_t(which)] = &t;
    }
    for (auto& [mod, ts] : mods) {
      const std::string where = "deltaw::io::peft (" + source + "): module \"" + mod + "\"";
      if (!ts[0] || !ts[1]) throw format_error(where + " lacks " + std::string(ts[0] ? "gralora_B" : "gralora_A"));
      const auto &ta = *ts[0], &tb = *ts[1];
      const index_t k = c.k, r = c.r, hr = c.hybrid_r;
      if (ta.shape.size() != 3 || tb.shape.size() != 3 || ta.shape[0] != std::uint64_t(k) || tb.shape[0] != std::uint64_t(k) ||
          ta.shape[2] != std::uint64_t(r) || tb.shape[1] != std::uint64_t(r) || ta.shape[1] == 0 || tb.shape[2] == 0 ||
          ta.shape[1] > (std::uint64_t(1) << 32) || tb.shape[2] > (std::uint64_t(1) << 32))
        throw format_error(where + ": gralora_A " + detail::shape_string(ta.shape) + " and gralora_B " +
                           detail::shape_string(tb.shape) + " are not [k, in/k, r] and [k, r, out/k] with the config's k = " +
                           std::to_string(k) + ", r = " + std::to_string(r));
      const index_t in = k * index_t(ta.shape[1]), ob = index_t(tb.shape[2]), out = k * ob;
      peft_gralora_module m;
      m.name = mod;
      m.k = k;
      m.scale = c.scale();
      m.A = detail::st_flat_matrix(f, ta, in, r, source);
      m.B = detail::st_flat_matrix(f, tb, k * r, ob, source);
      if (hr > 0) {
        if (!ts[2] || !ts[3])
          throw format_error(where + " lacks " + std::string(ts[2] ? "gralora_B_general.weight" : "gralora_A_general.weight") +
                             " (the config has hybrid_r = " + std::to_string(hr) + ")");
        if (ts[2]->shape != std::vector<std::uint64_t>{std::uint64_t(hr), std::uint64_t(in)} ||
            ts[3]->shape != std::vector<std::uint64_t>{std::uint64_t(out), std::uint64_t(hr)})
          throw format_error(where + ": gralora_A_general.weight " + detail::shape_string(ts[2]->shape) +
                             " and gralora_B_general.weight " + detail::shape_string(ts[3]->shape) + " are not [" +
                             std::to_string(hr) + ", " + std::to_string(in) + "] and [" + std::to_string(out) + ", " +
                             std::to_string(hr) + "]");
        m.hybrid_A = detail::st_flat_matrix(f, *ts[2], hr, in, source);
        m.hybrid_B = detail::st_flat_matrix(f, *ts[3], out, hr, source);
      } else {
        if (ts[2] || ts[3]) throw format_error(where + " has gralora_*_general weights but the config has hybrid_r = 0");
        m.hybrid_A = {matrix_view<const float>(nullptr, 0, in), nullptr};
        m.hybrid_B = {matrix_view<const float>(nullptr, out, 0), nullptr};
      }
      a.modules_.push_back(std::move(m));
    }
    std::sort(a.modules_.begin(), a.modules_.end(), [](const auto& x, const auto& y) { return x.name < y.name; });
    return a;
  }

 private:
  std::vector<peft_gralora_module> modules_;
};

/// Parses the adapter_config.json of a GRALORA adapter.
inline peft_gralora_config parse_peft_gralora_config(std::string_view text, const std::string& source) {
  const json o = parse_json_strict(text, source);
  if (!o.is_object()) detail::peft_fail(source, "adapter_config.json must hold a JSON object");
  peft_gralora_config c;
  c.raw = o;
  auto pt = o.find("peft_type");
  if (pt == o.end() || !pt->is_string()) detail::peft_fail(source, "no string \"peft_type\"");
  if (pt->get<std::string>() != "GRALORA")
    throw unsupported_error("deltaw::io::read_peft_gralora_adapter (" + source + "): peft_type \"" + pt->get<std::string>() +
                            "\" is not GRALORA");
  if (auto it = o.find("r"); it != o.end()) c.r = detail::peft_rank(*it, "r", source);
  if (auto it = o.find("gralora_k"); it != o.end()) c.k = detail::peft_rank(*it, "gralora_k", source);
  if (auto it = o.find("hybrid_r"); it != o.end() && !it->is_null()) {
    if (!it->is_number_integer() || !it->is_number_unsigned() || it->get<std::uint64_t>() > (std::uint64_t(1) << 31))
      detail::peft_fail(source, "\"hybrid_r\" must be a non-negative integer");
    c.hybrid_r = index_t(it->get<std::uint64_t>());
  }
  if (auto it = o.find("alpha"); it != o.end()) c.alpha = detail::peft_number(*it, "alpha", source);
  if (c.r % c.k != 0)
    detail::peft_fail(source, "r = " + std::to_string(c.r) + " is not a multiple of gralora_k = " + std::to_string(c.k));
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

/// Reads a GRALORA adapter directory.
inline peft_gralora_adapter read_peft_gralora_adapter(const std::filesystem::path& dir) {
  const detail::adapter_dir d(dir, "deltaw::io::read_peft_gralora_adapter");
  auto cfg = parse_peft_gralora_config(d.config_text(), d.config_path);
  return peft_gralora_adapter::from_safetensors(std::move(cfg), d.tensors(), d.tensors_path);
}

/// Writes `a` as a PEFT adapter directory (created if needed), all-or-nothing.
inline void write_peft_gralora_adapter(const std::filesystem::path& dir, const peft_gralora_adapter& a) {
  if (a.size() == 0) throw argument_error("deltaw::io::write_peft_gralora_adapter: the adapter has no modules");
  auto [cfg, w] = a.to_files();
  detail::write_adapter_files(dir, "deltaw::io::write_peft_gralora_adapter", w, cfg.dump(2) + "\n");
}

}  // namespace io
DELTAW_NAMESPACE_END
