// SPDX-License-Identifier: MIT
// PEFT adapter directories of the Fourier types, FourierFT, C3A and WaveFT (deltaw/fourier.hpp;
// needs FFTW and nlohmann-json). Read and written as adapter_config.json +
// adapter_model.safetensors with PEFT 0.21's key names (checked against peft 0.21.2, see
// tests/fixtures/peft_{fourierft,fourierft_seed,c3a,waveft,waveft_direct,waveft_odd}). Kept apart from read_peft /
// any_peft_adapter (io/peft_adapter.hpp), which would otherwise pull FFTW into every reader:
// read_peft refers FOURIERFT, C3A and WAVEFT directories here.
//
// Keys (all under base_model.model.<module>.):
//   FOURIERFT  fourierft_spectrum [n] (n = n_frequency, or n_frequency_pattern's value for the
//              module). The frequencies are NOT stored: PEFT draws them at load time from
//              random_loc_seed (torch.randperm, reproduced exactly by
//              deltaw::fourierft_peft_indices), so a module's update needs the layer's
//              [out, in] (peft_fourierft_module::update(out, in) or update(W)). ΔW =
//              scaling·Re(ifft2(S)).
//   C3A        c3a_kernel [out/b, in/b, b] (b = block_size, or block_size_pattern's value);
//              ΔW block-circulant divided by in.
//   WAVEFT     waveft_spectrum [n]; positions drawn from random_loc_seed as FourierFT's;
//              ΔW = scaling·IDWT2 (wavelet_family "db1" = Haar only; others unsupported_error)
//              or, with use_idwt = false, the coefficients placed directly.
//
// Documented choices:
//  - Writing FourierFT: PEFT regenerates the frequencies from the config's one
//    random_loc_seed, so add_fourierft checks that the update's indices are PEFT's for that
//    seed (argument_error otherwise) and that every module has the config's scaling. A
//    module whose n differs from n_frequency gets an n_frequency_pattern key: PEFT matches a
//    key k as the regular expression ".*\.k$", so the key is the module's name without its
//    first component (escaped); a top-level module (no ".") cannot have its own n in PEFT,
//    and then n_frequency is taken from it (argument_error if two top-level modules differ).
//  - C3A: block_size_pattern likewise; init_weights is written as false.
//  - Refused (unsupported_error): fan_in_fan_out, biases, modules_to_save.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../fourier.hpp"
#include "peft.hpp"
#include "peft_structured.hpp"

DELTAW_NAMESPACE_BEGIN
namespace io {

/// adapter_config.json of a FOURIERFT or C3A adapter: the fields that change the math;
/// the rest of the file is kept in `raw` and written back.
struct peft_fourier_config {
  std::string peft_type;                 ///< FOURIERFT, C3A or WAVEFT
  index_t n_frequency = 1000;            ///< FOURIERFT, WAVEFT (PEFT's default there: 2592)
  double scaling = 150.0;                ///< FOURIERFT, WAVEFT (PEFT's default there: 25)
  std::uint64_t random_loc_seed = 777;   ///< FOURIERFT, WAVEFT
  bool use_idwt = true;                  ///< WAVEFT
  index_t block_size = 256;              ///< C3A
  std::map<std::string, index_t> size_pattern;  ///< n_frequency_pattern / block_size_pattern
  std::vector<std::string> target_modules;
  json raw = json::object();
};

/// One FourierFT module: its spectrum and the adapter's seed and scaling.
struct peft_fourierft_module {
  std::string name;
  held_vector<float> spectrum;
  double scaling = 150.0;
  std::uint64_t seed = 777;
  /// The update over an [out, in] layer, with PEFT's frequencies for this seed.
  fourierft_update<float> update(index_t out, index_t in) const {
    auto idx = std::make_shared<const fourierft_indices>(fourierft_peft_indices(out, in, spectrum.view.size(), seed));
    return fourierft_update<float>(spectrum, std::move(idx), out, in, scaling);
  }
  /// The update over the layer whose weight is W [out, in].
  template <class T, class D>
  fourierft_update<float> update(const matrix_view<T, D>& W) const {
    return update(W.rows(), W.cols());
  }
};

/// One WaveFT module: its coefficients and the adapter's seed, scaling and use_idwt.
struct peft_waveft_module {
  std::string name;
  held_vector<float> spectrum;
  double scaling = 25.0;
  std::uint64_t seed = 777;
  bool use_idwt = true;
  /// The update over an [out, in] layer, with PEFT's positions for this seed.
  waveft_update<float> update(index_t out, index_t in) const {
    auto idx = std::make_shared<const fourierft_indices>(fourierft_peft_indices(out, in, spectrum.view.size(), seed));
    return waveft_update<float>(spectrum, std::move(idx), out, in, scaling, use_idwt);
  }
  template <class T, class D>
  waveft_update<float> update(const matrix_view<T, D>& W) const {
    return update(W.rows(), W.cols());
  }
};

/// One C3A module: its kernel [out/b · in/b, b] and the layer shape.
struct peft_c3a_module {
  std::string name;
  held_matrix<float> kernel;
  index_t out = 0, in = 0;
  c3a_update<float> update() const { return c3a_update<float>(kernel, out, in, in > 0 ? 1.0 / double(in) : 1.0); }
};

class peft_fourier_adapter {
 public:
  peft_fourier_config config;

  const std::string& peft_type() const { return config.peft_type; }
  std::size_t size() const { return fourierft_.size() + c3a_.size() + waveft_.size(); }
  const std::vector<peft_waveft_module>& waveft_modules() const { return waveft_; }
  const peft_waveft_module* find_waveft(std::string_view name) const {
    for (const auto& m : waveft_)
      if (m.name == name) return &m;
    return nullptr;
  }
  const std::vector<peft_fourierft_module>& fourierft_modules() const { return fourierft_; }
  const std::vector<peft_c3a_module>& c3a_modules() const { return c3a_; }
  const peft_fourierft_module* find_fourierft(std::string_view name) const {
    for (const auto& m : fourierft_)
      if (m.name == name) return &m;
    return nullptr;
  }
  const peft_c3a_module* find_c3a(std::string_view name) const {
    for (const auto& m : c3a_)
      if (m.name == name) return &m;
    return nullptr;
  }

  /// Adds a FourierFT module (copied to float). `seed` is the adapter's random_loc_seed;
  /// the update's indices must be PEFT's for it, its scale the adapter's scaling.
  template <class T, class D>
  void add_fourierft(std::string name, const fourierft_update<T, D>& u, std::uint64_t seed = 777) {
    constexpr const char* op = "deltaw::io::peft_fourier_adapter::add_fourierft";
    begin("FOURIERFT", name, op);
    if (fourierft_.empty()) {
      config.scaling = u.scale();
      config.random_loc_seed = seed;
    } else if (config.scaling != u.scale() || config.random_loc_seed != seed) {
      throw argument_error(std::string(op) + ": \"" + name + "\" has scaling " + std::to_string(u.scale()) + " and seed " +
                           std::to_string(seed) + ", unlike the modules already added (PEFT's FourierFT config has one " +
                           "scaling and one random_loc_seed)");
    }
    const auto want = fourierft_peft_indices(u.rows(), u.cols(), u.size(), seed);
    if (want.rows != u.indices().rows || want.cols != u.indices().cols)
      throw argument_error(std::string(op) + ": \"" + name + "\"'s frequencies are not the ones PEFT draws from random_loc_seed " +
                           std::to_string(seed) + " for [" + std::to_string(u.rows()) + ", " + std::to_string(u.cols()) +
                           "] with n = " + std::to_string(u.size()) + " (PEFT does not store them; build the update with " +
                           "deltaw::fourierft(spectrum, out, in, seed, scale))");
    fourierft_.push_back({std::move(name), detail::copy_to_float(u.spectrum()), u.scale(), seed});
  }
  /// Adds a WaveFT module (copied to float); as add_fourierft, plus one use_idwt per adapter.
  template <class T, class D>
  void add_waveft(std::string name, const waveft_update<T, D>& u, std::uint64_t seed = 777) {
    constexpr const char* op = "deltaw::io::peft_fourier_adapter::add_waveft";
    begin("WAVEFT", name, op);
    if (waveft_.empty()) {
      config.scaling = u.scale();
      config.random_loc_seed = seed;
      config.use_idwt = u.use_idwt();
    } else if (config.scaling != u.scale() || config.random_loc_seed != seed || config.use_idwt != u.use_idwt()) {
      throw argument_error(std::string(op) + ": \"" + name + "\" has another scaling, seed or use_idwt than the modules " +
                           "already added (PEFT's WaveFT config has one of each)");
    }
    const auto want = fourierft_peft_indices(u.rows(), u.cols(), u.size(), seed);
    if (want.rows != u.indices().rows || want.cols != u.indices().cols)
      throw argument_error(std::string(op) + ": \"" + name + "\"'s positions are not the ones PEFT draws from random_loc_seed " +
                           std::to_string(seed) + " (build the update with deltaw::waveft(spectrum, out, in, seed, scale))");
    waveft_.push_back({std::move(name), detail::copy_to_float(u.spectrum()), u.scale(), seed, u.use_idwt()});
  }
  /// Adds a C3A module (copied to float); its scale must be PEFT's 1/in.
  template <class T, class D>
  void add_c3a(std::string name, const c3a_update<T, D>& u) {
    constexpr const char* op = "deltaw::io::peft_fourier_adapter::add_c3a";
    begin("C3A", name, op);
    if (std::abs(u.scale() * double(u.cols()) - 1.0) > 1e-12)
      throw argument_error(std::string(op) + ": \"" + name + "\" has scale " + std::to_string(u.scale()) +
                           "; PEFT's C3A divides by in = " + std::to_string(u.cols()) + " (deltaw::c3a(kernel, out, in))");
    c3a_.push_back({std::move(name), detail::copy_to_float(u.kernel()), u.rows(), u.cols()});
  }

  /// The config and tensors PEFT would save for this adapter.
  std::pair<json, safetensors_writer> to_files() const {
    json o = config.raw.is_object() ? config.raw : json::object();
    safetensors_writer w;
    const std::string P = "base_model.model.";
    std::vector<std::string> names;
    json pattern = json::object();
    const bool fft = config.peft_type == "FOURIERFT", wft = config.peft_type == "WAVEFT";
    // The config's size: a top-level module's if there is one, else the first module's.
    std::optional<index_t> base;
    auto size_of = [&](std::size_t i) {
      return fft ? fourierft_[i].spectrum.view.size() : wft ? waveft_[i].spectrum.view.size() : c3a_[i].kernel.view.cols();
    };
    auto name_at = [&](std::size_t i) -> const std::string& { return fft ? fourierft_[i].name : wft ? waveft_[i].name : c3a_[i].name; };
    const std::size_t count = fft ? fourierft_.size() : wft ? waveft_.size() : c3a_.size();
    for (std::size_t i = 0; i < count; ++i) {
      const std::string& n = name_at(i);
      if (n.find('.') != std::string::npos) continue;
      if (base && *base != size_of(i))
        throw argument_error("deltaw::io::write_peft_fourier_adapter: top-level modules with different " +
                             std::string(fft || wft ? "n_frequency" : "block_size") + " cannot be expressed in PEFT's config");
      base = size_of(i);
    }
    if (!base && count > 0) base = size_of(0);
    for (std::size_t i = 0; i < count; ++i) {
      const std::string& n = name_at(i);
      names.push_back(n);
      if (size_of(i) != *base) pattern[detail::regex_escape(n.substr(n.find('.') + 1))] = size_of(i);
      if (fft) {
        w.add(P + n + ".fourierft_spectrum", fourierft_[i].spectrum.view);
      } else if (wft) {
        w.add(P + n + ".waveft_spectrum", waveft_[i].spectrum.view);
      } else {
        const auto& k = c3a_[i];
        const index_t b = k.kernel.view.cols();
        detail::add_f32_tensor(w, P + n + ".c3a_kernel",
                               {std::uint64_t(k.out / b), std::uint64_t(k.in / b), std::uint64_t(b)}, k.kernel.view);
      }
    }
    std::sort(names.begin(), names.end());
    o["peft_type"] = config.peft_type;
    o["target_modules"] = names;
    o["bias"] = "none";
    o["modules_to_save"] = nullptr;
    o["inference_mode"] = true;
    if (fft || wft) {
      o["n_frequency"] = base.value_or(config.n_frequency);
      o["n_frequency_pattern"] = pattern;
      o["scaling"] = config.scaling;
      o["random_loc_seed"] = config.random_loc_seed;
      o["fan_in_fan_out"] = false;
      o["init_weights"] = false;
      if (wft) {
        o["wavelet_family"] = "db1";
        o["use_idwt"] = config.use_idwt;
        o["proportional_parameters"] = false;
      }
    } else {
      o["block_size"] = base.value_or(config.block_size);
      o["block_size_pattern"] = pattern;
      o["init_weights"] = false;
    }
    return {std::move(o), std::move(w)};
  }

  /// Builds the adapter from a parsed config and the tensors file.
  static peft_fourier_adapter from_safetensors(peft_fourier_config cfg, const safetensors_file& f, const std::string& source) {
    peft_fourier_adapter a;
    a.config = std::move(cfg);
    const std::string P = "base_model.model.";
    const bool fft = a.config.peft_type == "FOURIERFT", wft = a.config.peft_type == "WAVEFT";
    const std::string suffix = fft ? ".fourierft_spectrum" : wft ? ".waveft_spectrum" : ".c3a_kernel";
    for (const auto& t : f.tensors()) {
      const std::string_view n(t.name);
      if (!n.starts_with(P) || !n.ends_with(suffix))
        throw format_error("deltaw::io::peft (" + source + "): unknown key \"" + t.name + "\" for a " + a.config.peft_type +
                           " adapter (expected base_model.model.<module>" + suffix + ")");
      std::string mod(n.substr(P.size(), n.size() - P.size() - suffix.size()));
      const std::string where = "deltaw::io::peft (" + source + "): module \"" + mod + "\"";
      if (fft || wft) {
        if (t.shape.size() != 1 || t.shape[0] == 0)
          throw format_error(where + ": " + suffix.substr(1) + " is " + detail::shape_string(t.shape) + "; expected [n], n ≥ 1");
        auto m = detail::st_flat_matrix(f, t, 1, index_t(t.shape[0]), source);
        held_vector<float> v{vector_view<const float>(m.view.data(), m.view.cols()), m.owner};
        if (fft)
          a.fourierft_.push_back(peft_fourierft_module{std::move(mod), std::move(v), a.config.scaling, a.config.random_loc_seed});
        else
          a.waveft_.push_back(
              peft_waveft_module{std::move(mod), std::move(v), a.config.scaling, a.config.random_loc_seed, a.config.use_idwt});
      } else {
        if (t.shape.size() != 3 || t.shape[0] == 0 || t.shape[1] == 0 || t.shape[2] == 0)
          throw format_error(where + ": c3a_kernel is " + detail::shape_string(t.shape) + "; expected [out/b, in/b, b]");
        if (t.shape[0] * t.shape[2] > (std::uint64_t(1) << 40) || t.shape[1] * t.shape[2] > (std::uint64_t(1) << 40))
          throw format_error(where + ": c3a_kernel " + detail::shape_string(t.shape) + " is too large");
        const index_t b = index_t(t.shape[2]);
        peft_c3a_module pm{std::move(mod), detail::st_flat_matrix(f, t, index_t(t.shape[0] * t.shape[1]), b, source),
                           index_t(t.shape[0]) * b, index_t(t.shape[1]) * b};
        a.c3a_.push_back(std::move(pm));
      }
    }
    return a;
  }

 private:
  void begin(const char* type, const std::string& name, const char* op) {
    if (config.peft_type.empty()) config.peft_type = type;
    if (config.peft_type != type)
      throw argument_error(std::string(op) + ": a " + config.peft_type + " adapter cannot hold a " + type + " module");
    if (find_fourierft(name) || find_c3a(name) || find_waveft(name)) throw argument_error(std::string(op) + ": module \"" + name + "\" added twice");
  }
  std::vector<peft_fourierft_module> fourierft_;
  std::vector<peft_c3a_module> c3a_;
  std::vector<peft_waveft_module> waveft_;
};

/// Parses the adapter_config.json of a FOURIERFT or C3A adapter.
inline peft_fourier_config parse_peft_fourier_config(std::string_view text, const std::string& source) {
  const json o = parse_json_strict(text, source);
  if (!o.is_object()) detail::peft_fail(source, "adapter_config.json must hold a JSON object");
  peft_fourier_config c;
  c.raw = o;
  auto pt = o.find("peft_type");
  if (pt == o.end() || !pt->is_string()) detail::peft_fail(source, "no string \"peft_type\"");
  c.peft_type = pt->get<std::string>();
  if (c.peft_type != "FOURIERFT" && c.peft_type != "C3A" && c.peft_type != "WAVEFT")
    throw unsupported_error("deltaw::io::read_peft_fourier_adapter (" + source + "): peft_type \"" + c.peft_type +
                            "\" is not FOURIERFT, C3A or WAVEFT");
  const bool fft = c.peft_type != "C3A";
  if (c.peft_type == "WAVEFT") {
    c.n_frequency = 2592;
    c.scaling = 25.0;
    if (auto it = o.find("wavelet_family"); it != o.end() && !it->is_null()) {
      if (!it->is_string()) detail::peft_fail(source, "\"wavelet_family\" must be a string");
      if (it->get<std::string>() != "db1")
        detail::peft_unsupported(source, "wavelet_family \"" + it->get<std::string>() + "\" (deltaw has the Haar wavelet, \"db1\")");
    }
    if (auto it = o.find("use_idwt"); it != o.end() && !it->is_null()) c.use_idwt = detail::peft_bool(o, "use_idwt", source);
  }
  if (fft) {
    if (auto it = o.find("n_frequency"); it != o.end()) c.n_frequency = detail::peft_rank(*it, "n_frequency", source);
    if (auto it = o.find("scaling"); it != o.end()) c.scaling = detail::peft_number(*it, "scaling", source);
    if (auto it = o.find("random_loc_seed"); it != o.end() && !it->is_null()) {
      if (!it->is_number_integer() || !it->is_number_unsigned()) detail::peft_fail(source, "\"random_loc_seed\" must be a non-negative integer");
      c.random_loc_seed = it->get<std::uint64_t>();
    }
    if (detail::peft_bool(o, "fan_in_fan_out", source)) detail::peft_unsupported(source, "fan_in_fan_out = true");
  } else if (auto it = o.find("block_size"); it != o.end()) {
    c.block_size = detail::peft_rank(*it, "block_size", source);
  }
  if (auto it = o.find(fft ? "n_frequency_pattern" : "block_size_pattern"); it != o.end() && !it->is_null()) {
    if (!it->is_object()) detail::peft_fail(source, std::string("\"") + (fft ? "n_frequency_pattern" : "block_size_pattern") + "\" must be an object");
    for (auto p = it->begin(); p != it->end(); ++p) c.size_pattern[p.key()] = detail::peft_rank(p.value(), p.key(), source);
  }
  if (auto it = o.find("bias"); it != o.end() && it->is_string() && it->get<std::string>() != "none")
    detail::peft_unsupported(source, "bias = \"" + it->get<std::string>() + "\"");
  if (auto it = o.find("modules_to_save"); it != o.end() && detail::json_truthy(*it))
    detail::peft_unsupported(source, "\"modules_to_save\"");
  if (auto it = o.find("target_modules"); it != o.end() && it->is_array())
    for (const auto& e : *it)
      if (e.is_string()) c.target_modules.push_back(e.get<std::string>());
  return c;
}

/// Reads a FOURIERFT, C3A or WAVEFT adapter directory.
inline peft_fourier_adapter read_peft_fourier_adapter(const std::filesystem::path& dir) {
  const detail::adapter_dir d(dir, "deltaw::io::read_peft_fourier_adapter");
  auto cfg = parse_peft_fourier_config(d.config_text(), d.config_path);
  return peft_fourier_adapter::from_safetensors(std::move(cfg), d.tensors(), d.tensors_path);
}

/// Writes `a` as a PEFT adapter directory (created if needed), all-or-nothing.
inline void write_peft_fourier_adapter(const std::filesystem::path& dir, const peft_fourier_adapter& a) {
  if (a.size() == 0) throw argument_error("deltaw::io::write_peft_fourier_adapter: the adapter has no modules");
  auto [cfg, w] = a.to_files();
  detail::write_adapter_files(dir, "deltaw::io::write_peft_fourier_adapter", w, cfg.dump(2) + "\n");
}

}  // namespace io
DELTAW_NAMESPACE_END
