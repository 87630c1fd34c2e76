// SPDX-License-Identifier: MIT
// One reader for every PEFT adapter directory deltaw understands. read_peft(dir, name)
// finds the adapter (PEFT's save_pretrained writes the adapter "default" into dir and any
// other into dir/<name>/), detects its type from adapter_config.json's peft_type (LORA with
// rsLoRA / DoRA / fan_in_fan_out, LOKR, MISS incl. "mini" and Bone "bat", BONE, VERA,
// RANDLORA, LOHA, IA3, OFT, HRA) and returns its modules behind one interface:
//
//   auto a = io::read_peft("out", "my_adapter");
//   for (const auto& m : a.modules()) {            // io::any_peft_module, sorted by name
//     m.name(); m.method();                         // "model.layers.0.self_attn.q_proj", "DoRA"
//     m.out_features(); m.in_features();            // std::optional: recorded in the file or not
//     auto u = m.update(W);                         // io::peft_update<TW>: ΔW over this layer's W [out, in]
//     auto Y = u.apply(X);                          // X·(W + ΔW)ᵀ
//     u.merge(W); /* … */ u.unmerge(W);             // in place (keep u: DoRA unmerges with its cached norms)
//     u.visit([&](const auto& concrete) { … });     // low_rank, dora_update, kron_update, miss_update,
//                                                   // bone_bat_update, hadamard_update, ia3_update, oft_update,
//                                                   // hra_update, shira_update, road_update,
//                                                   // boft_update, adalora_update, hira_update,
//                                                   // delora_update
//   }
//   a.match({{"model.layers.0.self_attn.q_proj.weight", {4096, 4096}}, …});
//   a.targets("model.layers.5.self_attn.q_proj");   // PEFT's target_modules rule
//
// The modules come from the tensor names, never from target_modules: an adapter whose
// target_modules is a regex deltaw's matcher cannot evaluate (a look-ahead, which Python's
// re and so PEFT accept) is read; only targets() then throws unsupported_error.
// read_peft_adapter / read_peft_structured_adapter stay: they give the type-specific
// classes (also reachable here through source()), which the writers take.
#pragma once

#include <algorithm>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <iterator>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "../core/precompiled.hpp"
#include "peft.hpp"
#include "peft_structured.hpp"

DELTAW_NAMESPACE_BEGIN
namespace io {

/// The update of one adapter module over one layer weight W [out, in] (nn.Linear's
/// layout; for a fan_in_fan_out / Conv1D weight stored [in, out], its transpose view):
/// the concrete deltaw update behind one interface. It refers to W without owning it (DoRA
/// and Bone bat read W; DoRA caches W's row norms here, which is why unmerge must use the
/// object that merged), so W must outlive it.
template <class TW>
class peft_update {
 public:
  using kron_dd = kron_update<kron_dense_factor<float>, kron_dense_factor<float>>;
  using kron_dl = kron_update<kron_dense_factor<float>, kron_low_rank_factor<float>>;
  using kron_ld = kron_update<kron_low_rank_factor<float>, kron_dense_factor<float>>;
  using kron_ll = kron_update<kron_low_rank_factor<float>, kron_low_rank_factor<float>>;
  using variant_type = std::variant<low_rank<float>, dora_update<float, TW>, kron_dd, kron_dl, kron_ld, kron_ll,
                                    miss_update<float>, bone_bat_update<float, TW>, hadamard_update<float>,
                                    ia3_update<float, TW>, oft_update<float, TW>, hra_update<float, TW>,
                                    shira_update<float>, road_update<float, TW>, boft_update<float, TW>,
                                    adalora_update<float>, hira_update<float, TW>, delora_update<float>,
                                    vblora_update<float>>;
  /// The arithmetic type of materialize() (and of apply() for an input of type TW).
  using compute_type = compute_t<float, TW>;

  peft_update(std::string module, matrix_view<const TW> W, variant_type u)
      : module_(std::move(module)), W_(W), u_(std::move(u)) {}

  const std::string& module() const { return module_; }
  /// The weight the update was built over.
  const matrix_view<const TW>& W() const { return W_; }
  index_t rows() const { return W_.rows(); }
  index_t cols() const { return W_.cols(); }
  /// The concrete update (which alternative depends on the module's type).
  const variant_type& get() const { return u_; }
  /// Calls f with the concrete update and returns what f returns: use it in lazy sums
  /// (`view(W) + u`), VJPs, norms, parameter counts.
  template <class F>
  decltype(auto) visit(F&& f) const {
    return std::visit(std::forward<F>(f), u_);
  }

  /// Y = X·(W + ΔW)ᵀ into a caller-provided [tokens, out] output. X: [tokens, in].
  template <class XL, class YL>
  void apply(const XL& X, YL&& Y) const {
    std::visit([&](const auto& u) { deltaw::apply(W_ + u, X, std::forward<YL>(Y)); }, u_);
  }
  /// Y = X·(W + ΔW)ᵀ, allocated [tokens, out].
  template <class XL>
  auto apply(const XL& X) const {
    const auto Xv = view(X);
    using C = compute_t<compute_type, std::remove_const_t<typename decltype(Xv)::element_type>>;
    dense<C> Y(Xv.rows(), rows());
    apply(Xv, Y);
    return Y;
  }
  /// ΔW [out, in] as a dense matrix (allocates out × in, as its name says).
  dense<compute_type> materialize() const {
    return std::visit(
        [](const auto& u) -> dense<compute_type> {
          auto D = deltaw::materialize(u);
          if constexpr (std::is_same_v<decltype(D), dense<compute_type>>) return D;
          else return D.template cast<compute_type>();
        },
        u_);
  }
  /// W ← W + ΔW in place (DoRA: W ← W'). DoRA and Bone bat merge only into the weight
  /// they were built over (argument_error otherwise).
  template <class WL>
  void merge(WL&& W) const {
    std::visit([&](const auto& u) { deltaw::merge(std::forward<WL>(W), u); }, u_);
  }
  /// merge(), refusing (non_finite_error, W unchanged) when an entry would be NaN or ±Inf.
  template <class WL>
  void merge_checked(WL&& W) const {
    std::visit([&](const auto& u) { deltaw::merge_checked(std::forward<WL>(W), u); }, u_);
  }
  /// The inverse of merge (DoRA: with the row norms cached when this object was built).
  template <class WL>
  void unmerge(WL&& W) const {
    std::visit([&](const auto& u) { deltaw::unmerge(std::forward<WL>(W), u); }, u_);
  }

 private:
  std::string module_;
  matrix_view<const TW> W_;
  variant_type u_;
};

/// One module of any PEFT type deltaw reads.
class any_peft_module {
 public:
  using variant_type = std::variant<peft_lora_module, peft_lokr_module, peft_miss_module, peft_vera_module,
                                    peft_randlora_module, peft_loha_module, peft_ia3_module, peft_oft_module,
                                    peft_hra_module, peft_shira_module, peft_road_module, peft_boft_module,
                                    peft_adalora_module, peft_hira_module, peft_delora_module, peft_vblora_module,
                                    peft_pvera_module>;

  explicit any_peft_module(variant_type m) : m_(std::move(m)) {}

  /// The module's name in the base model, e.g. "model.layers.0.self_attn.q_proj".
  const std::string& name() const {
    return std::visit([](const auto& m) -> const std::string& { return m.name; }, m_);
  }
  /// "LoRA", "DoRA", "LoKr", "MiSS", "MiSS mini", "Bone bat", "VeRA", "RandLoRA", "LoHa",
  /// "IA3", "OFT" or "HRA".
  const char* method() const {
    return std::visit(
        [](const auto& m) -> const char* {
          using M = std::remove_cvref_t<decltype(m)>;
          if constexpr (std::is_same_v<M, peft_lora_module>) return m.magnitude ? "DoRA" : "LoRA";
          else if constexpr (std::is_same_v<M, peft_lokr_module>) return "LoKr";
          else if constexpr (std::is_same_v<M, peft_miss_module>)
            return m.kind == miss_kind::bat ? "Bone bat" : m.kind == miss_kind::mini ? "MiSS mini" : "MiSS";
          else if constexpr (std::is_same_v<M, peft_vera_module>) return "VeRA";
          else if constexpr (std::is_same_v<M, peft_loha_module>) return "LoHa";
          else if constexpr (std::is_same_v<M, peft_ia3_module>) return "IA3";
          else if constexpr (std::is_same_v<M, peft_oft_module>) return "OFT";
          else if constexpr (std::is_same_v<M, peft_hra_module>) return "HRA";
          else if constexpr (std::is_same_v<M, peft_shira_module>) return "SHiRA";
          else if constexpr (std::is_same_v<M, peft_road_module>) return "RoAd";
          else if constexpr (std::is_same_v<M, peft_hira_module>) return "HiRA";
          else if constexpr (std::is_same_v<M, peft_delora_module>) return "DeLoRA";
          else if constexpr (std::is_same_v<M, peft_vblora_module>) return "VB-LoRA";
          else if constexpr (std::is_same_v<M, peft_pvera_module>) return "PVeRA";
          else if constexpr (std::is_same_v<M, peft_boft_module>) return "BOFT";
          else if constexpr (std::is_same_v<M, peft_adalora_module>) return "AdaLoRA";
          else return "RandLoRA";
        },
        m_);
  }
  /// out (W's rows) when the file records it: LoRA, LoKr, MiSS default and bat, VeRA, LoHa,
  /// output IA³.
  std::optional<index_t> out_features() const {
    return std::visit(
        [](const auto& m) -> std::optional<index_t> {
          using M = std::remove_cvref_t<decltype(m)>;
          if constexpr (std::is_same_v<M, peft_lora_module> || std::is_same_v<M, peft_lokr_module> ||
                        std::is_same_v<M, peft_loha_module> || std::is_same_v<M, peft_boft_module> ||
                        std::is_same_v<M, peft_adalora_module> || std::is_same_v<M, peft_hira_module> ||
                        std::is_same_v<M, peft_delora_module> || std::is_same_v<M, peft_vblora_module> ||
                        std::is_same_v<M, peft_pvera_module>)
            return m.out_features();
          else if constexpr (std::is_same_v<M, peft_ia3_module>) {
            if (m.side == ia3_side::output) return m.l.view.size();
            return std::nullopt;
          }
          else if constexpr (std::is_same_v<M, peft_road_module>)
            return m.out_features();
          else if constexpr (std::is_same_v<M, peft_miss_module>) {
            if (m.kind == miss_kind::mini) return std::nullopt;
            return m.kind == miss_kind::bat ? m.block.view.rows() : m.block.view.cols();
          } else if constexpr (std::is_same_v<M, peft_vera_module>)
            return m.lambda_b.view.size();
          else
            return std::nullopt;
        },
        m_);
  }
  /// in (W's columns) when the file records it: LoRA, LoKr, LoHa, input IA³, OFT without
  /// block_share, HRA.
  std::optional<index_t> in_features() const {
    return std::visit(
        [](const auto& m) -> std::optional<index_t> {
          using M = std::remove_cvref_t<decltype(m)>;
          if constexpr (std::is_same_v<M, peft_lora_module> || std::is_same_v<M, peft_lokr_module> ||
                        std::is_same_v<M, peft_loha_module> || std::is_same_v<M, peft_boft_module> ||
                        std::is_same_v<M, peft_adalora_module> || std::is_same_v<M, peft_hira_module> ||
                        std::is_same_v<M, peft_delora_module> || std::is_same_v<M, peft_vblora_module>)
            return m.in_features();
          else if constexpr (std::is_same_v<M, peft_ia3_module>) {
            if (m.side == ia3_side::input) return m.l.view.size();
            return std::nullopt;
          } else if constexpr (std::is_same_v<M, peft_oft_module>) {
            if (m.Q.view.rows() == 1) return std::nullopt;  // shared, or one block: any multiple of b
            return m.Q.view.rows() * m.block();
          } else if constexpr (std::is_same_v<M, peft_hra_module>) {
            return m.U.view.rows();
          }
          else
            return std::nullopt;
        },
        m_);
  }
  /// Whether ΔW depends on W's values (DoRA, Bone bat, IA³, OFT, HRA), not only on its shape.
  bool reads_weight() const {
    const auto* l = std::get_if<peft_lora_module>(&m_);
    const auto* b = std::get_if<peft_miss_module>(&m_);
    return (l && l->magnitude) || (b && b->kind == miss_kind::bat) || std::holds_alternative<peft_ia3_module>(m_) ||
           std::holds_alternative<peft_oft_module>(m_) || std::holds_alternative<peft_hra_module>(m_) ||
           std::holds_alternative<peft_road_module>(m_) || std::holds_alternative<peft_boft_module>(m_) ||
           std::holds_alternative<peft_hira_module>(m_);
  }
  /// LoRA with fan_in_fan_out: the checkpoint stores W as [in, out] (GPT-2's Conv1D);
  /// update() and match() still take [out, in] (pass the stored weight's transpose view).
  bool fan_in_fan_out() const {
    const auto* l = std::get_if<peft_lora_module>(&m_);
    return l && l->fan_in_fan_out;
  }
  /// Empty when a layer with weight [out, in] fits the module, else why not.
  std::string layer_mismatch(index_t out, index_t in) const {
    return std::visit([&](const auto& m) { return m.layer_mismatch(out, in); }, m_);
  }

  /// The module's update over the layer weight W [out, in] (any deltaw matrix view or
  /// Eigen matrix, float / double / bf16 / fp16). shape_error when W does not fit the
  /// module. The result refers to W: keep W alive while it is used.
  template <class WL>
  auto update(const WL& W) const {
    using V = decltype(view(W));
    static_assert(std::is_same_v<typename V::device_type, device::cpu>,
                  "deltaw::io::any_peft_module::update: W must be a CPU matrix");
    using TW = std::remove_const_t<typename V::element_type>;
    const matrix_view<const TW> Wv(view(W));
    using R = peft_update<TW>;
    if (const std::string why = layer_mismatch(Wv.rows(), Wv.cols()); !why.empty()) {
      std::string hint;
      if (fan_in_fan_out() && layer_mismatch(Wv.cols(), Wv.rows()).empty())
        hint = " (fan_in_fan_out: pass the transpose view of the stored [in, out] weight)";
      throw shape_error("deltaw::io::any_peft_module::update: \"" + name() + "\" (" + method() +
                        ") does not fit W " + deltaw::detail::shape_str(Wv.rows(), Wv.cols()) + ": " + why + hint);
    }
    return std::visit(
        [&](const auto& m) -> R {
          using M = std::remove_cvref_t<decltype(m)>;
          if constexpr (std::is_same_v<M, peft_lora_module>) {
            if (!m.magnitude) return R(m.name, Wv, m.update());
            // dora_update keeps the magnitude's owner (the mapped file) alive with it.
            const auto l = m.update();
            using C = compute_t<float, TW>;
            auto norms = std::make_shared<const std::vector<double>>(cpu::dora_row_norms<C>(Wv, l));
            return R(m.name, Wv,
                     dora_update<float, TW>(held_matrix<TW>{Wv, nullptr}, l, *m.magnitude, std::move(norms)));
          } else if constexpr (std::is_same_v<M, peft_lokr_module>) {
            return m.visit([&](auto k) { return R(m.name, Wv, std::move(k)); });
          } else if constexpr (std::is_same_v<M, peft_miss_module>) {
            if (m.kind == miss_kind::bat)
              return R(m.name, Wv, bone_bat_update<float, TW>(held_matrix<TW>{Wv, nullptr}, m.block));
            return R(m.name, Wv, m.update(Wv.rows(), Wv.cols()));
          } else if constexpr (std::is_same_v<M, peft_loha_module> || std::is_same_v<M, peft_adalora_module> ||
                               std::is_same_v<M, peft_delora_module>) {
            return R(m.name, Wv, m.update());
          } else if constexpr (std::is_same_v<M, peft_ia3_module> || std::is_same_v<M, peft_oft_module> ||
                               std::is_same_v<M, peft_hra_module> || std::is_same_v<M, peft_road_module> ||
                               std::is_same_v<M, peft_boft_module> || std::is_same_v<M, peft_hira_module>) {
            return R(m.name, Wv, m.update(Wv));
          } else {
            return R(m.name, Wv, m.update(Wv.rows(), Wv.cols()));
          }
        },
        m_);
  }
  /// Y = X·(W + ΔW)ᵀ for this module over W.
  template <class WL, class XL>
  auto apply(const WL& W, const XL& X) const {
    return update(W).apply(X);
  }
  /// Merges ΔW into W in place and returns the update that did it: keep it and call its
  /// unmerge(W) to undo (DoRA's inverse needs the row norms of the unmerged W).
  template <class WL>
  auto merge(WL&& W) const {
    auto u = update(std::as_const(W));
    u.merge(std::forward<WL>(W));
    return u;
  }

  /// The type-specific module (peft_lora_module, peft_lokr_module, peft_miss_module,
  /// peft_vera_module, peft_randlora_module).
  const variant_type& get() const { return m_; }
  template <class M>
  const M* get_if() const {
    return std::get_if<M>(&m_);
  }

 private:
  variant_type m_;
};

/// An adapter of any PEFT type deltaw reads: its modules (sorted by name), its config and
/// the type-specific adapter they came from.
class any_peft_adapter {
 public:
  using source_type = std::variant<peft_adapter, peft_structured_adapter>;

  explicit any_peft_adapter(peft_adapter a, std::string adapter_name = "default")
      : name_(std::move(adapter_name)), src_(std::move(a)) {
    for (const auto& m : std::get<peft_adapter>(src_).modules()) modules_.emplace_back(m);
  }
  explicit any_peft_adapter(peft_structured_adapter a, std::string adapter_name = "default")
      : name_(std::move(adapter_name)), src_(std::move(a)) {
    for (const auto& m : std::get<peft_structured_adapter>(src_).modules())
      std::visit([&](const auto& x) { modules_.emplace_back(x); }, m);
  }

  /// adapter_config.json's peft_type: "LORA", "LOKR", "MISS", "BONE", "VERA", "RANDLORA",
  /// "LOHA", "IA3", "OFT", "HRA".
  const std::string& peft_type() const {
    return std::visit([](const auto& a) -> const std::string& { return a.config.peft_type; }, src_);
  }
  /// "default", or the name of the sub-directory it was read from.
  const std::string& adapter_name() const { return name_; }

  const std::vector<any_peft_module>& modules() const { return modules_; }
  std::size_t size() const { return modules_.size(); }
  const any_peft_module* find(std::string_view module) const {
    auto it = std::lower_bound(modules_.begin(), modules_.end(), module,
                               [](const any_peft_module& m, std::string_view n) { return m.name() < n; });
    return it != modules_.end() && it->name() == module ? &*it : nullptr;
  }
  const any_peft_module& at(std::string_view module) const {
    const auto* m = find(module);
    if (!m)
      throw argument_error("deltaw::io::any_peft_adapter::at: the " + peft_type() + " adapter has no module \"" +
                           std::string(module) + "\"");
    return *m;
  }
  /// The module adapting the weight tensor `weight_name` ("<module>.weight"), or null.
  const any_peft_module* for_weight(std::string_view weight_name) const {
    if (weight_name.ends_with(".weight")) weight_name.remove_suffix(7);
    return find(weight_name);
  }
  /// Whether PEFT would adapt `module` by the config's target_modules (list: the name or a
  /// "."-suffix of it; string: a full regex match). unsupported_error when the regex uses a
  /// construct deltaw's matcher does not implement; the adapter's own modules are
  /// modules() either way.
  bool targets(const std::string& module) const {
    return std::visit([&](const auto& a) { return a.config.targets(module); }, src_);
  }
  /// Pairs every module with a weight of the user's model, given as name → stored shape
  /// ("<module>.weight" or "<module>"; [out, in], for fan_in_fan_out LoRA [in, out] as
  /// stored). format_error for a module without a weight, shape_error for one that does not
  /// fit. Returns module → weight name.
  std::map<std::string, std::string> match(const std::map<std::string, std::pair<index_t, index_t>>& weights) const {
    return std::visit([&](const auto& a) { return a.match(weights); }, src_);
  }

  /// The type-specific adapter: peft_adapter (LORA) or peft_structured_adapter (the
  /// others), e.g. to write it back with write_peft_adapter / write_peft_structured_adapter.
  const source_type& source() const { return src_; }
  const peft_adapter* lora() const { return std::get_if<peft_adapter>(&src_); }
  const peft_structured_adapter* structured() const { return std::get_if<peft_structured_adapter>(&src_); }

 private:
  std::string name_;
  source_type src_;
  std::vector<any_peft_module> modules_;
};

namespace detail {
/// The peft_type of a config text, for dispatching (the type-specific parser checks the rest).
inline std::string peft_type_of(std::string_view text, const std::string& source) {
  const json o = parse_json_strict(text, "deltaw::io::peft (" + source + ")");
  if (!o.is_object()) peft_fail(source, "adapter_config.json must hold a JSON object");
  auto pt = o.find("peft_type");
  if (pt == o.end() || !pt->is_string()) peft_fail(source, "no string \"peft_type\"");
  return pt->get<std::string>();
}
}  // namespace detail

/// Builds an adapter of any supported type from adapter_config.json text and the parsed
/// adapter_model.safetensors (the in-memory path of read_peft).
inline any_peft_adapter parse_peft(std::string_view config_text, const safetensors_file& tensors,
                                   const std::string& config_source = "adapter_config.json",
                                   const std::string& tensors_source = "adapter_model.safetensors",
                                   std::string adapter_name = "default") {
  const std::string type = detail::peft_type_of(config_text, config_source);
  if (type == "LORA")
    return any_peft_adapter(
        peft_adapter::from_safetensors(parse_peft_config(config_text, config_source), tensors, tensors_source),
        std::move(adapter_name));
  // The types of peft_structured_adapter, and those read by readers of their own (with why).
  static constexpr std::string_view structured[] = {"LOKR", "MISS",  "BONE", "VERA",    "RANDLORA", "LOHA",
                                                    "IA3",  "OFT",   "HRA",  "SHIRA",   "ROAD",     "BOFT",
                                                    "ADALORA", "HIRA", "DELORA", "VBLORA", "PVERA"};
  static constexpr std::pair<std::string_view, std::string_view> elsewhere[] = {
      {"FOURIERFT", "read_peft_fourier_adapter (deltaw/io/peft_fourier.hpp, which needs FFTW: link deltaw::fft)"},
      {"C3A", "read_peft_fourier_adapter (deltaw/io/peft_fourier.hpp, which needs FFTW: link deltaw::fft)"},
      {"WAVEFT", "read_peft_fourier_adapter (deltaw/io/peft_fourier.hpp, which needs FFTW: link deltaw::fft)"},
      {"GRALORA", "read_peft_gralora_adapter (deltaw/io/peft_gralora.hpp)"},
      {"UNILORA", "read_peft_unilora_adapter (deltaw/io/peft_unilora.hpp)"},
      {"TINYLORA", "read_peft_tinylora_adapter (deltaw/io/peft_kasa_bdlora_tinylora.hpp)"}};
  if (std::find(std::begin(structured), std::end(structured), type) != std::end(structured))
    return any_peft_adapter(peft_structured_adapter::from_safetensors(
                                parse_peft_structured_config(config_text, config_source), tensors, tensors_source),
                            std::move(adapter_name));
  for (const auto& [t, reader] : elsewhere)
    if (t == type)
      throw unsupported_error("deltaw::io::peft (" + config_source + "): a " + type + " adapter is read by deltaw::io::" +
                              std::string(reader));
  std::string known = "LORA (with use_rslora / use_dora)";
  for (std::size_t k = 0; k < std::size(structured); ++k)
    known += (k + 1 == std::size(structured) ? " and " : ", ") + std::string(structured[k]);
  throw unsupported_error("deltaw::io::peft (" + config_source + "): peft_type \"" + type +
                          "\" is not supported; deltaw reads " + known);
}

/// The names of the adapters saved under `dir`: "default" when dir holds
/// adapter_config.json, then every sub-directory that does (sorted).
#if DELTAW_DEFINE_PRECOMPILED
DELTAW_PRECOMPILED_INLINE std::vector<std::string> list_peft_adapters(const std::filesystem::path& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  if (std::filesystem::is_regular_file(dir / "adapter_config.json", ec)) out.emplace_back("default");
  std::vector<std::string> named;
  for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code e;
    if (it->is_directory(e) && std::filesystem::is_regular_file(it->path() / "adapter_config.json", e))
      named.push_back(it->path().filename().string());
  }
  std::sort(named.begin(), named.end());
  out.insert(out.end(), named.begin(), named.end());
  return out;
}
#else
std::vector<std::string> list_peft_adapters(const std::filesystem::path& dir);
#endif

/// Reads the PEFT adapter `adapter_name` saved under `dir`: "default" (or empty) is dir
/// itself, any other name dir/<name>/ (PEFT's save_pretrained layout). The type comes from
/// peft_type. io_error when the directory has no such adapter (naming the adapters it has).
#if DELTAW_DEFINE_PRECOMPILED
DELTAW_PRECOMPILED_INLINE any_peft_adapter read_peft(const std::filesystem::path& dir, std::string_view adapter_name) {
  constexpr const char* op = "deltaw::io::read_peft";
  const auto sub = detail::adapter_subdir(dir, adapter_name, op);
  std::error_code ec;
  if (!std::filesystem::exists(sub / "adapter_config.json", ec)) {
    std::string have;
    for (const auto& n : list_peft_adapters(dir)) have += (have.empty() ? "" : ", ") + ("\"" + n + "\"");
    throw io_error(std::string(op) + ": '" + dir.string() + "' has no adapter \"" +
                   std::string(adapter_name.empty() ? "default" : adapter_name) + "\" ('" +
                   (sub / "adapter_config.json").string() + "' does not exist); adapters there: " +
                   (have.empty() ? "none" : have));
  }
  const detail::adapter_dir d(sub, op);
  return parse_peft(d.config_text(), d.tensors(), d.config_path, d.tensors_path,
                    std::string(adapter_name.empty() ? "default" : adapter_name));
}
#else
any_peft_adapter read_peft(const std::filesystem::path& dir, std::string_view adapter_name);
#endif
/// read_peft(dir, "default").
inline any_peft_adapter read_peft(const std::filesystem::path& dir) { return read_peft(dir, "default"); }


}  // namespace io
DELTAW_NAMESPACE_END
