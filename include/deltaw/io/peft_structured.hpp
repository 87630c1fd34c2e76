// SPDX-License-Identifier: MIT
// PEFT adapter directories of the structured types: LoKr, MiSS (default, "mini", "bat" =
// Bone), VeRA and RandLoRA. Read and written as adapter_config.json +
// adapter_model.safetensors with PEFT's key names (checked against peft 0.21.2, see
// tests/fixtures/peft_{lokr,miss,vera,randlora}*).
//
// Keys (all under base_model.model.<module>.):
//   LOKR      lokr_w1 [a, c] or lokr_w1_a [a, r] + lokr_w1_b [r, c]; lokr_w2 [b, d] or
//             lokr_w2_a [b, r] + lokr_w2_b [r, d]. ΔW = α/r · (w1 ⊗ w2), r and α per module
//             from rank_pattern / alpha_pattern (as LoRA's).
//   MISS      miss_block: [r, out] (init_weights true/false), [r, mini_r] ("mini"),
//             [out/r, r, r] ("bat"). No scale. peft_type BONE (bone_block, removed from PEFT
//             before 0.21) is read with the same meaning but no PEFT here writes it.
//   VERA      vera_lambda_b [out], vera_lambda_d [r]; shared bases base_model.vera_A
//             [r, in_max] and base_model.vera_B [out_max, r] (save_projection).
//   RANDLORA  randlora_lambda [r, N], randlora_gamma [N, min_dim]; shared bases
//             base_model.randlora_A [r, 1, min_dim_max], base_model.randlora_B
//             [max_dim_max, N_max, r], and PEFT 0.21 also repeats them per module
//             (<module>.randlora_A / _B).
//   LOHA      hada_w1_a [out, r], hada_w1_b [r, in], hada_w2_a [out, r], hada_w2_b [r, in].
//             ΔW = α/r · (w1_a·w1_b) ⊙ (w2_a·w2_b), r and α per module from rank_pattern /
//             alpha_pattern (as LoKr's).
//   IA3       ia3_l [out, 1] (output scaling) or [1, in] (input scaling: the module is in
//             feedforward_modules). W' = diag(l)·W or W·diag(l); output IA³ also scales the
//             layer's bias (peft_ia3_module::scale_bias).
//   OFT       oft_R.weight [r, b(b−1)/2] (one skew block per b input features) or [1, …]
//             (block_share); b is read from the tensor (PEFT may adjust oft_block_size per
//             layer). use_cayley_neumann / num_cayley_neumann_terms choose R; coft = true
//             projects the stored Q with eps on reading, as PEFT's forward does.
//   HRA       hra_u [in, r] (one Householder vector per column); apply_GS chooses the
//             Gram–Schmidt variant. r is one for the whole adapter (HRA has no rank_pattern).
//   SHIRA     shira_weight [nnz] (nnz = r·(out + in)) and shira_indices [2, nnz] int32 (rows,
//             then columns; PEFT's key has no adapter name). ΔW[rows[k], cols[k]] = v[k]
//             (PEFT's scaling is 1 and not saved; a deltaw scale is folded into v when written).
//   ROAD      road_theta, road_alpha [out/2] (road_1), [out] (road_2), [2·out] (road_4); the
//             config's variant and group_size. W' = R·W; PEFT also rotates the layer's bias
//             (peft_road_module::rotate_bias). RoadConfig has no r.
//   HIRA      hira_A [r, in], hira_B [out, r]; ΔW = W ⊙ (hira_B·hira_A), no scale; r per module
//             from rank_pattern.
//   DELORA    delora_A [r, in], delora_B [out, r], delora_lambda [1], delora_w_norm [in] (the
//             base weight's column norms, saved by PEFT); r per module from rank_pattern (the
//             config's delora_lambda / lambda_pattern only initialise λ and are kept as read).
//   BOFT      boft_R [m, nb, b, b] (free matrices; the rotation uses their skew part) and
//             boft_s [out, 1]. m, nb and b are read from the tensor: PEFT without its CUDA
//             extension builds (and saves) m = 1 whatever boft_n_butterfly_factor says.
//             boft_block_size / boft_block_num must agree with b / nb when non-zero.
//   ADALORA   lora_A [r, in], lora_E [r, 1], lora_B [out, r]; ΔW = s·B·diag(E)·A with
//             s = lora_alpha / (init_r + 1e-5) (r when lora_alpha is 0). rank_pattern maps
//             "<module>.lora_E" to PEFT's mask over the init_r triplets; the saved tensors
//             hold only the kept ones (r = the mask's count), and the scale keeps init_r.
//   VBLORA    vblora_logits_A [r, in/L, n], vblora_logits_B [out/L, r, n] (or their
//             _topk_indices / _topk_weights), shared base_model.vblora_vector_bank [n, L]:
//             io/peft_vblora.hpp.
//   PVERA     pvera_lambda_b [out], pvera_lambda_d [2r]; shared base_model.pvera_A [2r, in_max],
//             pvera_B [out_max, r] (save_projection): io/peft_pvera.hpp.
//
// Documented choices:
//  - VeRA and RandLoRA bases. PEFT draws them with torch's generator from
//    projection_prng_key; deltaw cannot reproduce torch's stream, so a checkpoint is read
//    only when it stores them (save_projection = true, PEFT's default); otherwise
//    unsupported_error. The stored bases are not deltaw's seeded bases, so these modules
//    are read as low_rank updates with the same ΔW (update(out, in): the files do not
//    record every layer dimension): VeRA as B'·A with B' = diag(λ_b)·B·diag(λ_d) [out, r]
//    formed (out·r values) and A a zero-copy slice; RandLoRA as s·U·V (or s·Vᵀ·Uᵀ when
//    out < in) with U a zero-copy slice of randlora_B and V [N·r, min_dim] formed from
//    λ, A and γ, the same tensor PEFT forms at every forward.
//    Written from deltaw's vera_update / randlora_update, the seeded bases are
//    materialised (they are small: r·in_max + out_max·r, resp. r·min_dim + max_dim·N·r)
//    and stored with save_projection = true, so PEFT loads exactly deltaw's ΔW.
//  - Bone "bat" needs the base weight: peft_miss_module::bat(W) / visit(W, f).
//  - Refused (unsupported_error): convolution LoKr (3-/4-D factors, lokr_t2), convolution
//    LoHa (the Tucker cores hada_t1 / hada_t2, 4-D factors), biases, modules_to_save,
//    fan_in_fan_out for VeRA / RandLoRA / IA3 / OFT, VeRA / RandLoRA without stored bases.
//    Dropout fields are ignored, as PEFT ignores them in eval.
#pragma once

#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <variant>

#include "../core/precompiled.hpp"
#include "../backend/cpu/hra.hpp"
#include "../backend/cpu/oft.hpp"
#include "../backend/cpu/boft.hpp"
#include "../expr/adalora.hpp"
#include "../expr/block_affine.hpp"
#include "../expr/ia3.hpp"
#include "../expr/kron.hpp"
#include "../expr/loha.hpp"
#include "../expr/random_basis.hpp"
#include "../expr/shira.hpp"
#include "../expr/road.hpp"
#include "../expr/hira.hpp"
#include "../expr/delora.hpp"
#include "peft.hpp"
#include "peft_pvera.hpp"
#include "peft_vblora.hpp"

DELTAW_NAMESPACE_BEGIN
namespace io {

/// How MiSS initialised / shapes its block: init_weights true or false (default), "mini",
/// "bat" (Bone).
enum class miss_kind : std::uint8_t { miss, mini, bat };

/// adapter_config.json of a structured adapter: the fields that change the math. Fields
/// deltaw does not interpret are kept in `raw` and written back unchanged.
struct peft_structured_config {
  std::string peft_type;  ///< LOKR, MISS, BONE, VERA, RANDLORA, LOHA, IA3, OFT, HRA
  index_t r = 8;          ///< OFT: blocks per layer, 0 when oft_block_size is given
  double alpha = 8;  ///< LoKr / LoHa `alpha`, RandLoRA `randlora_alpha`; unused by the others
  std::vector<std::pair<std::string, index_t>> rank_pattern;  ///< LoKr, LoHa; file order
  std::vector<std::pair<std::string, double>> alpha_pattern;  ///< LoKr, LoHa; file order
  bool decompose_both = false;                                ///< LoKr
  index_t decompose_factor = -1;                              ///< LoKr
  miss_kind miss = miss_kind::miss;                           ///< MiSS
  index_t mini_r = 1;                                         ///< MiSS "mini"
  bool save_projection = true;                                ///< VeRA, RandLoRA
  std::int64_t projection_prng_key = 0;                       ///< VeRA, RandLoRA (informational)
  bool sparse = false, very_sparse = false;                   ///< RandLoRA (informational)
  std::vector<std::string> feedforward_modules;               ///< IA3 (a list)
  std::optional<std::string> feedforward_modules_regex;       ///< IA3 (a string: full match)
  index_t oft_block_size = 0;                                 ///< OFT (0 when r is given)
  bool coft = false, block_share = false;                     ///< OFT
  double eps = 6e-5;                                          ///< OFT (COFT's radius)
  oft_options oft;                                            ///< OFT: Cayley–Neumann, terms
  hra_options hra;                                            ///< HRA: apply_GS
  road_variant road = road_variant::road_1;                   ///< ROAD: variant
  index_t group_size = 64;                                    ///< ROAD
  index_t boft_block_size = 0, boft_block_num = 0;            ///< BOFT (one of them non-zero)
  index_t boft_n_butterfly_factor = 1;                        ///< BOFT (as configured; m is read from boft_R)
  index_t init_r = 12;                                        ///< ADALORA (ranknum of every layer)
  std::vector<std::pair<std::string, std::vector<bool>>> adalora_rank_pattern;  ///< ADALORA: "<module>.lora_E" → mask
  std::vector<std::string> target_modules;
  std::optional<std::string> target_modules_regex;
  std::string target_modules_unsupported;  ///< as peft_lora_config's
  std::string base_model_name_or_path;
  json raw = json::object();

  /// Whether PEFT would adapt `module` (as peft_lora_config::targets).
  bool targets(const std::string& module) const {
    return detail::targets_module(target_modules, target_modules_regex, target_modules_unsupported, module);
  }

  index_t rank_for(const std::string& module) const {
    const auto* p = peft_lora_config::match_pattern(rank_pattern, module);
    return p ? p->second : r;
  }
  double alpha_for(const std::string& module) const {
    const auto* p = peft_lora_config::match_pattern(alpha_pattern, module);
    return p ? p->second : alpha;
  }
};

namespace detail {

[[noreturn]] inline void peft_unsupported(const std::string& src, const std::string& what) {
  throw unsupported_error("deltaw::io::peft (" + src + "): " + what + " is not supported");
}

/// A float tensor of any rank viewed as a row-major [rows, cols] matrix (rows·cols must be
/// its element count): zero-copy when stored as aligned F32, a converted copy otherwise.
inline held_matrix<float> st_flat_matrix(const safetensors_file& f, const st_tensor_info& t, index_t rows,
                                         index_t cols, const std::string& src) {
  if (t.element_count() != std::uint64_t(rows) * std::uint64_t(cols))
    peft_fail(src, "tensor \"" + t.name + "\" " + shape_string(t.shape) + " cannot be viewed as " +
                       deltaw::detail::shape_str(rows, cols));
  const auto raw = f.data(t);
  if (t.dtype == st_dtype::F32 && !raw.empty() && reinterpret_cast<std::uintptr_t>(raw.data()) % alignof(float) == 0)
    return {matrix_view<const float>(reinterpret_cast<const float*>(raw.data()), rows, cols), f.owner()};
  auto buf = std::make_shared<std::vector<float>>(f.values<float>(t.name));
  return {matrix_view<const float>(buf->data(), rows, cols), std::move(buf)};
}

inline held_matrix<float> owned_matrix(std::shared_ptr<std::vector<float>> buf, index_t rows, index_t cols) {
  return {matrix_view<const float>(buf->data(), rows, cols), std::move(buf)};
}

template <class T, class D>
held_matrix<float> copy_to_float(const matrix_view<const T, D>& v) {
  static_assert(std::is_same_v<D, device::cpu>, "deltaw::io::peft: copy device factors to the host first");
  auto buf = std::make_shared<std::vector<float>>(std::size_t(v.size()));
  for (index_t i = 0; i < v.rows(); ++i)
    for (index_t j = 0; j < v.cols(); ++j) (*buf)[std::size_t(i * v.cols() + j)] = convert<float>(v(i, j));
  return owned_matrix(std::move(buf), v.rows(), v.cols());
}
template <class T, class D>
held_vector<float> copy_to_float(const vector_view<const T, D>& v) {
  static_assert(std::is_same_v<D, device::cpu>, "deltaw::io::peft: copy device factors to the host first");
  auto buf = std::make_shared<std::vector<float>>(std::size_t(v.size()));
  for (index_t i = 0; i < v.size(); ++i) (*buf)[std::size_t(i)] = convert<float>(v[i]);
  return {vector_view<const float>(buf->data(), v.size()), std::move(buf)};
}

inline void add_f32_tensor(safetensors_writer& w, std::string name, std::vector<std::uint64_t> shape,
                           const matrix_view<const float>& m) {
  std::vector<float> v(std::size_t(m.size()));
  for (index_t i = 0; i < m.rows(); ++i)
    for (index_t j = 0; j < m.cols(); ++j) v[std::size_t(i * m.cols() + j)] = m(i, j);
  w.add_raw(std::move(name), st_dtype::F32, std::move(shape),
            std::as_bytes(std::span<const float>(v.data(), v.size())));
}

}  // namespace detail

/// Parses the adapter_config.json of a LOKR / MISS / BONE / VERA / RANDLORA adapter.
inline peft_structured_config parse_peft_structured_config(std::string_view text,
                                                           const std::string& source = "adapter_config.json") {
  peft_structured_config c;
  c.raw = parse_json_strict(text, "deltaw::io::peft (" + source + ")");
  const json& o = c.raw;
  if (!o.is_object()) detail::peft_fail(source, "adapter_config.json must hold a JSON object");
  auto pt = o.find("peft_type");
  if (pt == o.end() || !pt->is_string()) detail::peft_fail(source, "no string \"peft_type\"");
  c.peft_type = pt->get<std::string>();
  const std::string& t = c.peft_type;
  if (t != "LOKR" && t != "MISS" && t != "BONE" && t != "VERA" && t != "RANDLORA" && t != "LOHA" && t != "IA3" &&
      t != "OFT" && t != "HRA" && t != "SHIRA" && t != "ROAD" && t != "BOFT" && t != "ADALORA" &&
      t != "HIRA" && t != "DELORA" && t != "VBLORA" && t != "PVERA")
    throw unsupported_error("deltaw::io::peft (" + source + "): peft_type \"" + t +
                            "\" is not a structured type deltaw reads (LOKR, MISS, BONE, VERA, RANDLORA, LOHA, IA3, OFT, HRA, SHIRA, ROAD, "
                            "BOFT, ADALORA, HIRA, DELORA, VBLORA, PVERA; "
                            "LORA is read by read_peft_adapter)");
  // PEFT's defaults where a field is absent.
  c.r = t == "VERA" ? 256 : t == "RANDLORA" || t == "SHIRA" || t == "HIRA" ? 32 : t == "LOKR" || t == "LOHA" || t == "HRA" ? 8 : t == "OFT" || t == "IA3" ? 0 : 64;
  c.alpha = t == "RANDLORA" ? 640 : 8;
  if (t == "OFT") {
    // r or oft_block_size, the other 0 (PEFT's OFTConfig); the blocks are read from the tensors.
    auto count = [&](const char* k) -> index_t {
      auto it = o.find(k);
      if (it == o.end() || it->is_null()) return 0;
      if (!it->is_number_unsigned() || it->get<std::uint64_t>() > (std::uint64_t(1) << 31))
        detail::peft_fail(source, std::string("\"") + k + "\" must be a non-negative integer");
      return index_t(it->get<std::uint64_t>());
    };
    c.r = count("r");
    c.oft_block_size = count("oft_block_size");
    if ((c.r == 0) == (c.oft_block_size == 0))
      detail::peft_fail(source, "exactly one of \"r\" and \"oft_block_size\" must be non-zero (got r = " +
                                    std::to_string(c.r) + ", oft_block_size = " + std::to_string(c.oft_block_size) + ")");
    c.coft = detail::peft_bool(o, "coft", source);
    c.block_share = detail::peft_bool(o, "block_share", source);
    if (auto it = o.find("eps"); it != o.end() && !it->is_null()) c.eps = detail::peft_number(*it, "eps", source);
    auto cn = o.find("use_cayley_neumann");
    c.oft.cayley_neumann = cn == o.end() || cn->is_null() ? true : detail::peft_bool(o, "use_cayley_neumann", source);
    if (auto it = o.find("num_cayley_neumann_terms"); it != o.end() && !it->is_null()) {
      if (!it->is_number_integer() || it->get<std::int64_t>() > 64 || it->get<std::int64_t>() < -64)
        detail::peft_fail(source, "\"num_cayley_neumann_terms\" must be a small integer");
      c.oft.neumann_terms = int(it->get<std::int64_t>());
    }
    if (detail::peft_bool(o, "fan_in_fan_out", source)) detail::peft_unsupported(source, "fan_in_fan_out for OFT");
  } else if (t != "IA3") {
    if (auto it = o.find("r"); it != o.end()) c.r = detail::peft_rank(*it, "r", source);
  }
  if (t == "HRA") c.hra.gram_schmidt = detail::peft_bool(o, "apply_GS", source);
  if (t == "BOFT") {
    auto count = [&](const char* k, index_t dflt) -> index_t {
      auto it = o.find(k);
      if (it == o.end() || it->is_null()) return dflt;
      if (!it->is_number_unsigned() || it->get<std::uint64_t>() > (std::uint64_t(1) << 31))
        detail::peft_fail(source, std::string("\"") + k + "\" must be a non-negative integer");
      return index_t(it->get<std::uint64_t>());
    };
    c.boft_block_size = count("boft_block_size", 4);
    c.boft_block_num = count("boft_block_num", 0);
    c.boft_n_butterfly_factor = count("boft_n_butterfly_factor", 1);
    if ((c.boft_block_size == 0) == (c.boft_block_num == 0))
      detail::peft_fail(source, "exactly one of \"boft_block_size\" and \"boft_block_num\" must be non-zero (got " +
                                    std::to_string(c.boft_block_size) + " and " + std::to_string(c.boft_block_num) + ")");
    if (c.boft_n_butterfly_factor < 1) detail::peft_fail(source, "\"boft_n_butterfly_factor\" must be at least 1");
    if (detail::peft_bool(o, "fan_in_fan_out", source)) detail::peft_unsupported(source, "fan_in_fan_out for BOFT");
  }
  if (t == "ADALORA") {
    if (auto it = o.find("init_r"); it != o.end() && !it->is_null()) c.init_r = detail::peft_rank(*it, "init_r", source);
    if (auto it = o.find("lora_alpha"); it != o.end() && !it->is_null()) c.alpha = detail::peft_number(*it, "lora_alpha", source);
    if (auto it = o.find("rank_pattern"); it != o.end() && !it->is_null()) {
      if (!it->is_object()) detail::peft_fail(source, "\"rank_pattern\" must be an object");
      for (const auto& [key, v] : it->items()) {
        if (!v.is_array()) detail::peft_fail(source, "AdaLoRA's rank_pattern." + key + " must be a list of booleans");
        std::vector<bool> mask;
        for (const auto& b : v) {
          if (!b.is_boolean()) detail::peft_fail(source, "AdaLoRA's rank_pattern." + key + " must be a list of booleans");
          mask.push_back(b.get<bool>());
        }
        if (index_t(mask.size()) != c.init_r)
          detail::peft_fail(source, "AdaLoRA's rank_pattern." + key + " has " + std::to_string(mask.size()) +
                                        " entries but init_r = " + std::to_string(c.init_r));
        c.adalora_rank_pattern.emplace_back(key, std::move(mask));
      }
    }
    if (auto it = o.find("alpha_pattern"); it != o.end() && detail::json_truthy(*it))
      detail::peft_unsupported(source, "\"alpha_pattern\" for peft_type ADALORA (PEFT's AdaLoRA ignores it)");
    for (const char* k : {"use_dora", "fan_in_fan_out", "lora_bias"})
      if (detail::peft_bool(o, k, source)) detail::peft_unsupported(source, std::string("\"") + k + "\" for ADALORA");
  }
  if (t == "SHIRA" && detail::peft_bool(o, "fan_in_fan_out", source)) detail::peft_unsupported(source, "fan_in_fan_out for SHIRA");
  if (t == "ROAD") {
    if (auto it = o.find("variant"); it != o.end() && !it->is_null()) {
      const std::string v = it->is_string() ? it->get<std::string>() : std::string();
      if (v == "road_1") c.road = road_variant::road_1;
      else if (v == "road_2") c.road = road_variant::road_2;
      else if (v == "road_4") c.road = road_variant::road_4;
      else detail::peft_fail(source, "\"variant\" must be \"road_1\", \"road_2\" or \"road_4\"");
    }
    if (auto it = o.find("group_size"); it != o.end() && !it->is_null()) {
      c.group_size = detail::peft_rank(*it, "group_size", source);
      if (c.group_size % 2 != 0) detail::peft_fail(source, "\"group_size\" must be even");
    }
  }
  if (t == "IA3") {
    if (auto it = o.find("feedforward_modules"); it != o.end() && !it->is_null()) {
      if (it->is_string()) {
        c.feedforward_modules_regex = it->get<std::string>();
      } else if (it->is_array()) {
        for (const auto& v : *it) {
          if (!v.is_string()) detail::peft_fail(source, "\"feedforward_modules\" must list strings");
          c.feedforward_modules.push_back(v.get<std::string>());
        }
      } else {
        detail::peft_fail(source, "\"feedforward_modules\" must be a list or a string");
      }
    }
    if (detail::peft_bool(o, "fan_in_fan_out", source)) detail::peft_unsupported(source, "fan_in_fan_out for IA3 (Conv1D)");
  }
  const char* alpha_key = t == "RANDLORA" ? "randlora_alpha" : "alpha";
  if (t == "LOKR" || t == "RANDLORA" || t == "LOHA")
    if (auto it = o.find(alpha_key); it != o.end()) c.alpha = detail::peft_number(*it, alpha_key, source);
  if (auto it = o.find("base_model_name_or_path"); it != o.end() && it->is_string())
    c.base_model_name_or_path = it->get<std::string>();
  detail::read_target_modules(o, c.target_modules_regex, c.target_modules, c.target_modules_unsupported, source);
  if (t == "LOKR" || t == "LOHA" || t == "HIRA" || t == "DELORA") {
    for (const char* k : {"rank_pattern", "alpha_pattern"}) {
      auto it = o.find(k);
      if (it == o.end() || it->is_null()) continue;
      if (!it->is_object()) detail::peft_fail(source, std::string("\"") + k + "\" must be an object");
      for (const auto& [key, v] : it->items()) {
        detail::check_pattern_key(key, source);
        if (k[0] == 'r') c.rank_pattern.emplace_back(key, detail::peft_rank(v, std::string(k) + "." + key, source));
        else c.alpha_pattern.emplace_back(key, detail::peft_number(v, std::string(k) + "." + key, source));
      }
    }
    if (t == "LOKR") c.decompose_both = detail::peft_bool(o, "decompose_both", source);
    if (auto it = o.find("decompose_factor"); t == "LOKR" && it != o.end() && !it->is_null()) {
      if (!it->is_number_integer()) detail::peft_fail(source, "\"decompose_factor\" must be an integer");
      c.decompose_factor = it->get<index_t>();
    }
    // LoHa's use_effective_conv2d only changes convolutions, whose Tucker cores the tensor
    // reader refuses; LoKr's changes its factor shapes.
    if (t == "LOKR" && detail::peft_bool(o, "use_effective_conv2d", source))
      detail::peft_unsupported(source, "use_effective_conv2d (convolution LoKr)");
  } else if (t != "ADALORA") {
    // The other types have no patterns; a non-empty one would be silently ignored by PEFT too,
    // but it signals a config deltaw would misread.
    for (const char* k : {"rank_pattern", "alpha_pattern"})
      if (auto it = o.find(k); it != o.end() && detail::json_truthy(*it))
        detail::peft_unsupported(source, std::string("\"") + k + "\" for peft_type " + t);
  }
  if (t == "MISS" || t == "BONE") {
    if (auto it = o.find("init_weights"); it != o.end() && !it->is_null()) {
      if (it->is_string()) {
        const auto s = it->get<std::string>();
        if (s == "bat") c.miss = miss_kind::bat;
        else if (s == "mini" && t == "MISS") c.miss = miss_kind::mini;
        else detail::peft_fail(source, "\"init_weights\" \"" + s + "\" is not one of true, false, \"bat\", \"mini\"");
      } else if (!it->is_boolean()) {
        detail::peft_fail(source, "\"init_weights\" must be true, false, \"bat\" or \"mini\"");
      }
    }
    if (auto it = o.find("mini_r"); it != o.end() && !it->is_null()) c.mini_r = detail::peft_rank(*it, "mini_r", source);
  }
  if (t == "VERA" || t == "RANDLORA" || t == "PVERA") {
    auto it = o.find("save_projection");
    c.save_projection = it == o.end() || it->is_null() ? true : detail::peft_bool(o, "save_projection", source);
    if (auto k = o.find("projection_prng_key"); k != o.end() && k->is_number_integer())
      c.projection_prng_key = k->get<std::int64_t>();
    if (!c.save_projection)
      throw unsupported_error("deltaw::io::peft (" + source + "): a " + t +
                              " adapter saved with save_projection = false: its bases are torch.Generator draws "
                              "from projection_prng_key = " + std::to_string(c.projection_prng_key) +
                              ", which deltaw cannot reproduce; save it with save_projection = true");
    if (detail::peft_bool(o, "fan_in_fan_out", source)) detail::peft_unsupported(source, "fan_in_fan_out for " + t);
    c.sparse = detail::peft_bool(o, "sparse", source);
    c.very_sparse = detail::peft_bool(o, "very_sparse", source);
  }
  if (auto it = o.find("bias"); it != o.end() && !it->is_null()) {
    if (!it->is_string()) detail::peft_fail(source, "\"bias\" must be a string");
    if (it->get<std::string>() != "none") detail::peft_unsupported(source, "bias = \"" + it->get<std::string>() + "\"");
  }
  for (const char* k : {"modules_to_save", "layer_replication", "trainable_token_indices"})
    if (auto it = o.find(k); it != o.end() && detail::json_truthy(*it))
      detail::peft_unsupported(source, std::string("\"") + k + "\"");
  return c;
}

/// adapter_config.json for `c`: `raw` with the fields deltaw knows overwritten.
inline json peft_structured_config_json(const peft_structured_config& c) {
  json o = c.raw.is_object() ? c.raw : json::object();
  const std::string& t = c.peft_type;
  o["peft_type"] = t;
  if (t != "IA3" && t != "ROAD" && t != "BOFT") o["r"] = c.r;
  if (c.target_modules_regex) o["target_modules"] = *c.target_modules_regex;
  else o["target_modules"] = c.target_modules;
  o["base_model_name_or_path"] = c.base_model_name_or_path.empty() ? json(nullptr) : json(c.base_model_name_or_path);
  if (t == "LOKR" || t == "LOHA") {
    o["alpha"] = c.alpha;
    json rp = json::object(), ap = json::object();
    for (const auto& [k, v] : c.rank_pattern) rp[k] = v;
    for (const auto& [k, v] : c.alpha_pattern) ap[k] = v;
    o["rank_pattern"] = rp;
    o["alpha_pattern"] = ap;
    if (t == "LOKR") {
      o["decompose_both"] = c.decompose_both;
      o["decompose_factor"] = c.decompose_factor;
    }
    for (const auto& [k, v] : std::initializer_list<std::pair<const char*, json>>{
             {"rank_dropout", 0.0}, {"module_dropout", 0.0}, {"use_effective_conv2d", false}, {"init_weights", true}})
      if (!o.contains(k)) o[k] = v;
  } else if (t == "IA3") {
    if (c.feedforward_modules_regex) o["feedforward_modules"] = *c.feedforward_modules_regex;
    else o["feedforward_modules"] = c.feedforward_modules;
    o["fan_in_fan_out"] = false;
    if (!o.contains("init_ia3_weights")) o["init_ia3_weights"] = true;
  } else if (t == "OFT") {
    o["oft_block_size"] = c.oft_block_size;
    o["coft"] = c.coft;
    o["eps"] = c.eps;
    o["block_share"] = c.block_share;
    o["use_cayley_neumann"] = c.oft.cayley_neumann;
    o["num_cayley_neumann_terms"] = c.oft.neumann_terms;
    o["fan_in_fan_out"] = false;
    // The Cayley–Neumann series changed in PEFT 0.18; deltaw computes the current one, and
    // PEFT warns about adapters that do not say which they were trained with.
    for (const auto& [k, v] : std::initializer_list<std::pair<const char*, json>>{
             {"module_dropout", 0.0}, {"init_weights", true}, {"bias", "none"}, {"peft_version", "0.21.2"}})
      if (!o.contains(k)) o[k] = v;
  } else if (t == "BOFT") {
    o["boft_block_size"] = c.boft_block_size;
    o["boft_block_num"] = c.boft_block_num;
    o["boft_n_butterfly_factor"] = c.boft_n_butterfly_factor;
    o["fan_in_fan_out"] = false;
    for (const auto& [k, v] : std::initializer_list<std::pair<const char*, json>>{
             {"boft_dropout", 0.0}, {"init_weights", true}, {"bias", "none"}})
      if (!o.contains(k)) o[k] = v;
  } else if (t == "ADALORA") {
    o["init_r"] = c.init_r;
    o["lora_alpha"] = c.alpha;
    json rp = json::object();
    for (const auto& [k, v] : c.adalora_rank_pattern) {
      json m = json::array();
      for (bool b : v) m.push_back(b);
      rp[k] = m;
    }
    o["rank_pattern"] = c.adalora_rank_pattern.empty() ? json(nullptr) : rp;
    o["fan_in_fan_out"] = false;
    // AdaLoraConfig refuses total_step <= 0 and a schedule without a budgeting phase.
    for (const auto& [k, v] : std::initializer_list<std::pair<const char*, json>>{
             {"target_r", 8}, {"tinit", 0}, {"tfinal", 0}, {"deltaT", 1}, {"beta1", 0.85}, {"beta2", 0.85},
             {"orth_reg_weight", 0.5}, {"total_step", 1}, {"lora_dropout", 0.0}, {"bias", "none"},
             {"init_lora_weights", true}, {"use_dora", false}, {"use_rslora", false}, {"alpha_pattern", json::object()}})
      if (!o.contains(k)) o[k] = v;
  } else if (t == "HRA") {
    o["apply_GS"] = c.hra.gram_schmidt;
    for (const auto& [k, v] : std::initializer_list<std::pair<const char*, json>>{{"init_weights", true}, {"bias", "none"}})
      if (!o.contains(k)) o[k] = v;
  } else if (t == "HIRA" || t == "DELORA") {
    json rp = json::object();
    for (const auto& [k, v] : c.rank_pattern) rp[k] = v;
    o["rank_pattern"] = rp;
    if (!o.contains("init_weights")) o["init_weights"] = true;
    if (t == "HIRA" && !o.contains("hira_dropout")) o["hira_dropout"] = 0.0;
    if (t == "HIRA") o["fan_in_fan_out"] = false;
    if (t == "DELORA" && !o.contains("module_dropout")) o["module_dropout"] = 0.0;
    if (t == "DELORA" && !o.contains("bias")) o["bias"] = "none";
  } else if (t == "ROAD") {
    o["variant"] = road_variant_name(c.road);
    o["group_size"] = c.group_size;
    if (!o.contains("init_weights")) o["init_weights"] = true;
  } else if (t == "SHIRA") {
    o["fan_in_fan_out"] = false;
    for (const auto& [k, v] : std::initializer_list<std::pair<const char*, json>>{{"mask_type", "random"}, {"init_weights", true}})
      if (!o.contains(k)) o[k] = v;
  } else if (t == "MISS" || t == "BONE") {
    o["init_weights"] = c.miss == miss_kind::bat ? json("bat") : c.miss == miss_kind::mini ? json("mini") : json(true);
    o["mini_r"] = c.mini_r;
    if (!o.contains("bias")) o["bias"] = "none";
    if (t == "MISS" && !o.contains("miss_dropout")) o["miss_dropout"] = 0.0;
  } else if (t == "VERA" || t == "RANDLORA" || t == "PVERA") {
    if (t == "RANDLORA") {
      o["randlora_alpha"] = c.alpha;
      o["sparse"] = c.sparse;
      o["very_sparse"] = c.very_sparse;
    }
    o["save_projection"] = true;
    o["projection_prng_key"] = c.projection_prng_key;
    o["fan_in_fan_out"] = false;
    if (!o.contains("bias")) o["bias"] = "none";
  }
  for (const auto& [k, v] : std::initializer_list<std::pair<const char*, json>>{
           {"modules_to_save", nullptr}, {"task_type", nullptr}, {"inference_mode", true}})
    if (!o.contains(k)) o[k] = v;
  return o;
}

/// One LoKr module: w1 (dense [a, c] or w1_a [a, r]·w1_b [r, c]) and w2 likewise.
struct peft_lokr_module {
  std::string name;
  held_matrix<float> w1, w2;                      ///< dense factor, or the left part (…_a)
  std::optional<held_matrix<float>> w1_b, w2_b;  ///< the right part when low rank
  index_t rank = 0;
  double alpha = 0, scale = 0;

  index_t out_features() const { return w1.view.rows() * w2.view.rows(); }
  index_t in_features() const {
    return (w1_b ? w1_b->view.cols() : w1.view.cols()) * (w2_b ? w2_b->view.cols() : w2.view.cols());
  }
  /// Empty when a layer [out, in] fits the module, else why not.
  std::string layer_mismatch(index_t out, index_t in) const {
    if (out == out_features() && in == in_features()) return {};
    return "w1 ⊗ w2 is " + deltaw::detail::shape_str(out_features(), in_features());
  }
  /// Calls f with the kron_update (its factor kinds are part of its type, so they are
  /// chosen here) and returns what f returns.
  template <class F>
  decltype(auto) visit(F&& f) const {
    using dense_f = kron_dense_factor<float>;
    using low_f = kron_low_rank_factor<float>;
    auto with2 = [&](auto f1) -> decltype(auto) {
      using F1 = decltype(f1);
      if (w2_b) return std::invoke(f, kron_update<F1, low_f>(std::move(f1), low_f(w2, *w2_b), scale));
      return std::invoke(f, kron_update<F1, dense_f>(std::move(f1), dense_f(w2), scale));
    };
    if (w1_b) return with2(low_f(w1, *w1_b));
    return with2(dense_f(w1));
  }
};

/// One MiSS / Bone module. block: miss D [r, out], mini D [r, mini_r], bat b [out, r]
/// (PEFT's [out/r, r, r] with the first two axes flattened).
struct peft_miss_module {
  std::string name;
  miss_kind kind = miss_kind::miss;
  held_matrix<float> block;

  index_t r() const { return kind == miss_kind::bat ? block.view.cols() : block.view.rows(); }
  /// Empty when a layer [out, in] fits the module, else why not (the block does not record
  /// in, and "mini" not out either).
  std::string layer_mismatch(index_t out, index_t in) const {
    const auto bs = deltaw::detail::shape_str(block.view.rows(), block.view.cols());
    if (out < 0 || in < 0) return "a negative layer shape";
    switch (kind) {
      case miss_kind::miss:
        return block.view.cols() == out ? std::string() : "miss_block " + bs + " is [r, out]";
      case miss_kind::mini:
        return block.view.cols() > 0 && out % block.view.cols() == 0
                   ? std::string()
                   : "miss_block " + bs + " is [r, mini_r] and needs out % mini_r == 0";
      case miss_kind::bat:
        return block.view.rows() == out && out % r() == 0 && in % r() == 0
                   ? std::string()
                   : "the bat block " + bs + " is [out, r] and needs out % r == 0 and in % r == 0";
    }
    return {};
  }
  /// MiSS (default or mini) over a layer [out, in]. Throws argument_error for bat.
  miss_update<float> update(index_t out, index_t in) const {
    if (kind == miss_kind::bat)
      throw argument_error("deltaw::io::peft_miss_module::update: \"" + name + "\" is Bone bat; use bat(W)");
    if (kind == miss_kind::miss && block.view.cols() != out)
      throw shape_error("deltaw::io::peft_miss_module::update: \"" + name + "\" has miss_block " +
                        deltaw::detail::shape_str(block.view.rows(), block.view.cols()) + " [r, out] but the layer is " +
                        deltaw::detail::shape_str(out, in));
    return miss_update<float>(block, out, in);
  }
  /// Bone bat over the layer's weight W [out, in]. Throws argument_error for MiSS.
  template <class WL>
  auto bat(const WL& W) const {
    if (kind != miss_kind::bat)
      throw argument_error("deltaw::io::peft_miss_module::bat: \"" + name + "\" is MiSS, not Bone bat; use update()");
    auto hw = hold(W);
    using TW = std::remove_const_t<typename decltype(hw.view)::element_type>;
    return bone_bat_update<float, TW>(std::move(hw), block);
  }
  /// Calls f with the update for the layer whose weight is W (bat needs W itself).
  template <class WL, class F>
  decltype(auto) visit(const WL& W, F&& f) const {
    if (kind == miss_kind::bat) return std::invoke(f, bat(W));
    return std::invoke(f, update(W.rows(), W.cols()));
  }
};

/// One VeRA module with the adapter's stored bases: ΔW = diag(λ_b)·B·diag(λ_d)·A.
/// The file does not record in_features: update(out, in) takes the layer's shape.
struct peft_vera_module {
  std::string name;
  held_vector<float> lambda_b;  ///< [out]
  held_vector<float> lambda_d;  ///< [r]
  held_matrix<float> A;         ///< the shared vera_A [r, in_max]
  held_matrix<float> B;         ///< the shared vera_B [out_max, r]

  /// Empty when a layer [out, in] fits the module, else why not.
  std::string layer_mismatch(index_t out, index_t in) const {
    if (out == lambda_b.view.size() && in >= 1 && in <= A.view.cols() && out <= B.view.rows()) return {};
    return "vera_lambda_b is [" + std::to_string(lambda_b.view.size()) + "] (out) and the shared bases cover in ≤ " +
           std::to_string(A.view.cols()) + ", out ≤ " + std::to_string(B.view.rows());
  }

  /// The same ΔW as a low_rank update B'·A[:, :in], B' = diag(λ_b)·B[:out]·diag(λ_d)
  /// [out, r] formed here. shape_error when the layer does not fit the module.
  low_rank<float> update(index_t out, index_t in) const {
    const index_t r = B.view.cols();
    if (out != lambda_b.view.size() || in < 1 || in > A.view.cols() || out > B.view.rows())
      throw shape_error("deltaw::io::peft_vera_module::update: \"" + name + "\" has vera_lambda_b [" +
                        std::to_string(lambda_b.view.size()) + "] and shared bases up to " +
                        deltaw::detail::shape_str(B.view.rows(), A.view.cols()) + "; the layer " +
                        deltaw::detail::shape_str(out, in) + " does not fit");
    auto buf = std::make_shared<std::vector<float>>(std::size_t(out * r));
    for (index_t i = 0; i < out; ++i)
      for (index_t k = 0; k < r; ++k) (*buf)[std::size_t(i * r + k)] = lambda_b.view[i] * B.view(i, k) * lambda_d.view[k];
    return low_rank<float>(detail::owned_matrix(std::move(buf), out, r), {A.view.block(0, 0, r, in), A.owner}, 1.0);
  }
};

/// One RandLoRA module with the adapter's stored bases. The file records min_dim (γ's
/// width) but not which side it is: update(out, in) takes the layer's shape.
struct peft_randlora_module {
  std::string name;
  held_matrix<float> lambda;  ///< [r, N]
  held_matrix<float> gamma;   ///< [N, min_dim]
  held_matrix<float> A;       ///< the shared randlora_A as [r, min_dim_max]
  held_matrix<float> B;       ///< the shared randlora_B as [max_dim_max, N_max·r]
  double scale = 0;

  index_t num_bases() const { return lambda.view.cols(); }
  /// Empty when a layer [out, in] fits the module, else why not.
  std::string layer_mismatch(index_t out, index_t in) const {
    const index_t r = lambda.view.rows(), N = num_bases(), mn = gamma.view.cols();
    if (std::min(out, in) == mn && std::max(out, in) <= B.view.rows() && N * r <= B.view.cols()) return {};
    return "randlora_gamma is [" + std::to_string(N) + ", " + std::to_string(mn) +
           "] (min(out, in) = " + std::to_string(mn) + ") and the shared bases cover max(out, in) ≤ " +
           std::to_string(B.view.rows());
  }
  /// ΔW = s·U·V (out ≥ in) or s·Vᵀ·Uᵀ (out < in): U = randlora_B[:max_dim, :N] flattened
  /// [max_dim, N·r] (a zero-copy slice), V [N·r, min_dim] with
  /// V[c, j] = λ[c / N, c % N]·A[c / N, j]·γ[c % N, j] formed here, as PEFT does.
  low_rank<float> update(index_t out, index_t in) const {
    const index_t r = lambda.view.rows(), N = num_bases(), mn = gamma.view.cols();
    const index_t lo = std::min(out, in), hi = std::max(out, in);
    if (lo != mn || hi > B.view.rows() || N * r > B.view.cols())
      throw shape_error("deltaw::io::peft_randlora_module::update: \"" + name + "\" has randlora_gamma " +
                        deltaw::detail::shape_str(N, mn) + " [N, min_dim] and shared bases for max_dim up to " +
                        std::to_string(B.view.rows()) + "; the layer " + deltaw::detail::shape_str(out, in) +
                        " does not fit");
    auto buf = std::make_shared<std::vector<float>>(std::size_t(N * r * mn));
    for (index_t c = 0; c < N * r; ++c) {
      const index_t k = c / N, b = c % N;
      const float l = lambda.view(k, b);
      for (index_t j = 0; j < mn; ++j) (*buf)[std::size_t(c * mn + j)] = l * A.view(k, j) * gamma.view(b, j);
    }
    auto V = detail::owned_matrix(std::move(buf), N * r, mn);
    held_matrix<float> U{B.view.block(0, 0, hi, N * r), B.owner};
    if (out >= in) return low_rank<float>(U, V, scale);
    return low_rank<float>(held_matrix<float>{V.view.transpose(), V.owner},
                           held_matrix<float>{U.view.transpose(), U.owner}, scale);
  }
};

/// One LoHa module: ΔW = s·(w1_a·w1_b) ⊙ (w2_a·w2_b), s = α/r.
struct peft_loha_module {
  std::string name;
  held_matrix<float> w1_a, w1_b, w2_a, w2_b;  ///< [out, r], [r, in], [out, r], [r, in]
  index_t rank = 0;
  double alpha = 0, scale = 0;

  index_t out_features() const { return w1_a.view.rows(); }
  index_t in_features() const { return w1_b.view.cols(); }
  std::string layer_mismatch(index_t out, index_t in) const {
    if (out == out_features() && in == in_features()) return {};
    return "the LoHa factors give ΔW " + deltaw::detail::shape_str(out_features(), in_features());
  }
  hadamard_update<float> update() const { return hadamard_update<float>(w1_a, w1_b, w2_a, w2_b, scale); }
};

/// One IA³ module: the vector l and the side it scales (output: ia3_l [out, 1]; input, for
/// PEFT's feedforward_modules: [1, in]).
struct peft_ia3_module {
  std::string name;
  held_vector<float> l;
  ia3_side side = ia3_side::output;

  std::string layer_mismatch(index_t out, index_t in) const {
    const index_t want = side == ia3_side::output ? out : in;
    if (l.view.size() == want) return {};
    return std::string("ia3_l has ") + std::to_string(l.view.size()) + " entries and scales the " +
           (side == ia3_side::output ? "output (out)" : "input (in, a feed-forward module)");
  }
  /// IA³ over the layer's weight W [out, in].
  template <class WL>
  auto update(const WL& W) const {
    auto hw = hold(W);
    using TW = std::remove_const_t<typename decltype(hw.view)::element_type>;
    return ia3_update<float, TW>(std::move(hw), l, side);
  }
  /// PEFT's output IA³ scales the layer's bias too: b ← l ⊙ b (b [out]; unchanged for
  /// input scaling).
  template <class V>
  void scale_bias(V& b) const {
    if (side != ia3_side::output) return;
    if (index_t(b.size()) != l.view.size())
      throw shape_error("deltaw::io::peft_ia3_module::scale_bias: \"" + name + "\" has " +
                        std::to_string(l.view.size()) + " output scales but the bias has " + std::to_string(b.size()));
    for (index_t i = 0; i < l.view.size(); ++i) b[i] = decltype(+b[i])(b[i] * l.view[i]);
  }
};

/// One OFT module: Q [nq, b(b − 1)/2] (COFT-projected when the config says coft), the
/// rotation options; the update needs the layer's weight.
struct peft_oft_module {
  std::string name;
  held_matrix<float> Q;
  oft_options options;

  index_t block() const { return deltaw::detail::oft_block_from_elements(Q.view.cols()); }
  std::string layer_mismatch(index_t, index_t in) const {
    const index_t b = block(), nq = Q.view.rows();
    if (b >= 1 && (nq * b == in || (nq == 1 && in % b == 0))) return {};
    return "oft_R.weight " + deltaw::detail::shape_str(nq, Q.view.cols()) + " has blocks of " + std::to_string(b) +
           " input features (" + std::to_string(nq) + " blocks, or one shared)";
  }
  template <class WL>
  auto update(const WL& W) const {
    return deltaw::detail::make_oft(hold(W), Q, options);
  }
};

/// One BOFT module: boft_R viewed as [m·nb·b, b], boft_s [out]; the update needs the
/// layer's weight. Exact Cayley rotations (PEFT's BOFT).
struct peft_boft_module {
  std::string name;
  held_matrix<float> R;
  held_vector<float> s;
  index_t factors = 1, blocks = 0;  ///< m and nb of boft_R [m, nb, b, b]
  oft_options options = boft_default_options;

  index_t block() const { return R.view.cols(); }
  index_t in_features() const { return blocks * block(); }
  index_t out_features() const { return s.view.size(); }
  std::string layer_mismatch(index_t out, index_t in) const {
    if (out == out_features() && in == in_features()) return {};
    return "boft_R [" + std::to_string(factors) + ", " + std::to_string(blocks) + ", " + std::to_string(block()) + ", " +
           std::to_string(block()) + "] rotates " + std::to_string(in_features()) + " input features and boft_s scales " +
           std::to_string(out_features()) + " outputs";
  }
  template <class WL>
  auto update(const WL& W) const {
    return deltaw::detail::make_boft(hold(W), R, s, options);
  }
};

/// One AdaLoRA module: lora_A [r, in], lora_E (as a vector of r), lora_B [out, r], PEFT's
/// scale α / (init_r + 1e-5) and, when rank_pattern lists the module, its mask over the
/// init_r triplets (r of them kept).
struct peft_adalora_module {
  std::string name;
  held_matrix<float> A, B;
  held_vector<float> E;
  index_t ranknum = 0;  ///< init_r
  double alpha = 0, scale = 0;
  std::optional<std::vector<bool>> mask;

  index_t rank() const { return A.view.rows(); }
  index_t out_features() const { return B.view.rows(); }
  index_t in_features() const { return A.view.cols(); }
  std::string layer_mismatch(index_t out, index_t in) const {
    if (out == out_features() && in == in_features()) return {};
    return "the AdaLoRA factors give ΔW " + deltaw::detail::shape_str(out_features(), in_features());
  }
  adalora_update<float> update() const { return adalora_update<float>(B, E, A, scale); }
};

/// One HRA module: U [in, r] (hra_u) and the variant (apply_GS); the update needs the
/// layer's weight.
struct peft_hra_module {
  std::string name;
  held_matrix<float> U;
  hra_options options;

  std::string layer_mismatch(index_t, index_t in) const {
    if (U.view.rows() == in) return {};
    return "hra_u " + deltaw::detail::shape_str(U.view.rows(), U.view.cols()) + " is [in, r]";
  }
  /// HRA over the layer's weight W [out, in]; argument_error for a zero column of U (or,
  /// with Gram–Schmidt, a dependent one), where PEFT would divide by zero.
  template <class WL>
  auto update(const WL& W) const {
    return deltaw::detail::make_hra(hold(W), U, options);
  }
};

/// One SHiRA module: the values (shira_weight) and the pattern (shira_indices) in PEFT's
/// order. The file does not record the layer's shape: update(out, in) takes it and builds
/// the CSR.
struct peft_shira_module {
  std::string name;
  held_vector<float> values;
  std::vector<index_t> rows, cols;

  std::string layer_mismatch(index_t out, index_t in) const {
    index_t mr = -1, mc = -1;
    for (std::size_t k = 0; k < rows.size(); ++k) {
      mr = std::max(mr, rows[k]);
      mc = std::max(mc, cols[k]);
    }
    if (mr < out && mc < in) return {};
    return "shira_indices reach row " + std::to_string(mr) + " and column " + std::to_string(mc);
  }
  /// SHiRA over a layer [out, in]; argument_error for a repeated index.
  shira_update<float> update(index_t out, index_t in) const {
    return shira_update<float>(deltaw::detail::shira_make_pattern(out, in, std::span<const index_t>(rows),
                                                                  std::span<const index_t>(cols)),
                               values, 1.0);
  }
};

/// One RoAd module: road_theta, road_alpha and the config's variant and group size; the
/// update needs the layer's weight.
struct peft_road_module {
  std::string name;
  held_vector<float> theta, alpha;
  road_variant variant = road_variant::road_1;
  index_t group_size = 64;

  /// The output features the stored vectors imply.
  index_t out_features() const {
    const index_t n = theta.view.size();
    return variant == road_variant::road_1 ? 2 * n : variant == road_variant::road_2 ? n : n / 2;
  }
  std::string layer_mismatch(index_t out, index_t) const {
    if (out == out_features() && out % group_size == 0) return {};
    return std::string("road_theta [") + std::to_string(theta.view.size()) + "] (" + road_variant_name(variant) +
           ") needs out = " + std::to_string(out_features()) + ", a multiple of group_size " + std::to_string(group_size);
  }
  /// RoAd over the layer's weight W [out, in].
  template <class WL>
  auto update(const WL& W) const {
    using TW = std::remove_const_t<typename decltype(view(W))::element_type>;
    return road_update<float, TW>(hold(W), theta, alpha, variant, group_size);
  }
  /// b ← R·b: PEFT rotates the layer's bias with its output (b has out entries).
  template <class V>
  void rotate_bias(V& b) const {
    const index_t out = out_features(), h = group_size / 2;
    if (index_t(b.size()) != out)
      throw shape_error("deltaw::io::peft_road_module::rotate_bias: the bias has " + std::to_string(b.size()) +
                        " entries, the module " + std::to_string(out));
    const auto coef = [&](index_t o, bool sine) {
      const index_t g = group_size, grp = o / g, p = o % g;
      index_t i = variant == road_variant::road_1 ? grp * h + p % h : variant == road_variant::road_2 ? o : grp * 2 * g + p;
      if (sine && variant == road_variant::road_4) i += g;
      const double a = alpha.view[i], t = theta.view[i];
      return sine ? a * std::sin(t) : a * std::cos(t);
    };
    for (index_t o = 0; o < out; ++o) {
      if (o % group_size >= h) continue;
      const index_t q = o + h;
      const double bo = double(b[std::size_t(o)]), bq = double(b[std::size_t(q)]);
      b[std::size_t(o)] = coef(o, false) * bo - coef(o, true) * bq;
      b[std::size_t(q)] = coef(q, false) * bq + coef(q, true) * bo;
    }
  }
};

/// One HiRA module: hira_A [r, in], hira_B [out, r]; the update needs the layer's weight.
struct peft_hira_module {
  std::string name;
  held_matrix<float> A, B;

  index_t rank() const { return A.view.rows(); }
  index_t out_features() const { return B.view.rows(); }
  index_t in_features() const { return A.view.cols(); }
  std::string layer_mismatch(index_t out, index_t in) const {
    if (out == out_features() && in == in_features()) return {};
    return "hira_B [" + std::to_string(out_features()) + ", r] and hira_A [r, " + std::to_string(in_features()) + "]";
  }
  template <class WL>
  auto update(const WL& W) const {
    using TW = std::remove_const_t<typename decltype(view(W))::element_type>;
    return hira_update<float, TW>(hold(W), B, A);
  }
};

/// One DeLoRA module: delora_A, delora_B, delora_lambda and the stored weight norms.
struct peft_delora_module {
  std::string name;
  held_matrix<float> A, B;
  held_vector<float> lambda, w_norm;

  index_t rank() const { return A.view.rows(); }
  index_t out_features() const { return B.view.rows(); }
  index_t in_features() const { return A.view.cols(); }
  std::string layer_mismatch(index_t out, index_t in) const {
    if (out == out_features() && in == in_features()) return {};
    return "delora_B [" + std::to_string(out_features()) + ", r] and delora_A [r, " + std::to_string(in_features()) + "]";
  }
  delora_update<float> update() const { return delora_update<float>(B, A, lambda, w_norm); }
};

/// A structured PEFT adapter: its config, its modules (of the config's one type, sorted by
/// name) and, for VeRA / RandLoRA, the shared bases.
class peft_structured_adapter {
 public:
  using module = std::variant<peft_lokr_module, peft_miss_module, peft_vera_module, peft_randlora_module,
                              peft_loha_module, peft_ia3_module, peft_oft_module, peft_hra_module,
                              peft_shira_module, peft_road_module, peft_boft_module, peft_adalora_module,
                              peft_hira_module, peft_delora_module, peft_vblora_module, peft_pvera_module>;
  peft_structured_config config;
  /// VeRA: vera_A [r, in_max], vera_B [out_max, r]. RandLoRA: randlora_A as [r, min_dim],
  /// randlora_B as [max_dim, N·r]. PVeRA: pvera_A [2r, in_max], pvera_B [out_max, r].
  /// VB-LoRA: basis_A is the vector bank [n, L]. Empty otherwise.
  held_matrix<float> basis_A, basis_B;
  index_t randlora_bases = 0;  ///< N of the shared randlora_B

  std::size_t size() const { return modules_.size(); }
  const std::vector<module>& modules() const { return modules_; }
  static const std::string& name_of(const module& m) {
    return std::visit([](const auto& x) -> const std::string& { return x.name; }, m);
  }
  const module* find(std::string_view n) const {
    auto it = std::lower_bound(modules_.begin(), modules_.end(), n,
                               [](const module& x, std::string_view k) { return name_of(x) < k; });
    return it != modules_.end() && name_of(*it) == n ? &*it : nullptr;
  }
  const module& at(std::string_view n) const {
    const auto* m = find(n);
    if (!m) throw argument_error("deltaw::io::peft_structured_adapter::at: the adapter has no module \"" + std::string(n) + "\"");
    return *m;
  }
  /// The module adapting the weight tensor `weight_name` ("<module>.weight"), or null.
  const module* for_weight(std::string_view weight_name) const {
    if (weight_name.ends_with(".weight")) weight_name.remove_suffix(7);
    return find(weight_name);
  }
  /// Pairs every module with a weight of the user's model, given as name → [out, in]
  /// ("<module>.weight" or "<module>"), as peft_adapter::match: format_error for a module
  /// without a weight, shape_error for a weight that does not fit (layer_mismatch).
  /// Returns module → weight name.
  std::map<std::string, std::string> match(const std::map<std::string, std::pair<index_t, index_t>>& weights) const {
    std::map<std::string, std::string> out;
    for (const auto& mv : modules_) {
      const std::string& n = name_of(mv);
      auto it = weights.find(n + ".weight");
      if (it == weights.end()) it = weights.find(n);
      if (it == weights.end())
        throw format_error("deltaw::io::peft_structured_adapter::match: the adapter adapts \"" + n +
                           "\" but the model has no weight \"" + n + ".weight\"");
      const std::string why =
          std::visit([&](const auto& m) { return m.layer_mismatch(it->second.first, it->second.second); }, mv);
      if (!why.empty())
        throw shape_error("deltaw::io::peft_structured_adapter::match: weight \"" + it->first + "\" is " +
                          deltaw::detail::shape_str(it->second.first, it->second.second) + " but the adapter's \"" + n +
                          "\" does not fit it: " + why);
      out.emplace(n, it->first);
    }
    return out;
  }
  template <class M>
  const M& get(std::string_view n) const {
    const auto* p = std::get_if<M>(&at(n));
    if (!p)
      throw argument_error("deltaw::io::peft_structured_adapter::get: module \"" + std::string(n) +
                           "\" is of another type (the adapter is " + config.peft_type + ")");
    return *p;
  }
  /// Calls f with the update of module `n` over its layer's weight W (W is used only by
  /// Bone bat, and for MiSS's in_features): one loop for every type.
  template <class WL, class F>
  void visit(std::string_view n, const WL& W, F&& f) const {
    std::visit(
        [&](const auto& m) {
          using M = std::remove_cvref_t<decltype(m)>;
          if constexpr (std::is_same_v<M, peft_miss_module>) m.visit(W, f);
          else if constexpr (std::is_same_v<M, peft_lokr_module>) m.visit(f);
          else if constexpr (std::is_same_v<M, peft_loha_module> || std::is_same_v<M, peft_adalora_module> ||
                             std::is_same_v<M, peft_delora_module>)
            f(m.update());
          else if constexpr (std::is_same_v<M, peft_ia3_module> || std::is_same_v<M, peft_oft_module> ||
                             std::is_same_v<M, peft_hra_module> || std::is_same_v<M, peft_road_module> ||
                             std::is_same_v<M, peft_boft_module> || std::is_same_v<M, peft_hira_module>)
            f(m.update(W));
          else f(m.update(W.rows(), W.cols()));
        },
        at(n));
  }

  // ── writing: add deltaw updates ──────────────────────────────────────────────────────

  /// LoKr module from kron_update (PEFT's s = α/r with r the adapter's rank for the
  /// module; α = s·r is written). The factor shapes must be the ones PEFT gives the layer
  /// (lokr_shapes with the config's decompose_both / decompose_factor), else PEFT could
  /// not load it: argument_error.
  template <class F1, class F2>
  void add_lokr(std::string name, const kron_update<F1, F2>& u, index_t r) {
    begin("LOKR", name);
    if (r < 1) throw rank_error("deltaw::io::peft_structured_adapter::add_lokr: r must be at least 1; got " + std::to_string(r));
    peft_lokr_module m;
    m.name = std::move(name);
    auto put = [&](const auto& f, held_matrix<float>& left, std::optional<held_matrix<float>>& right) {
      if constexpr (std::remove_cvref_t<decltype(f)>::is_low_rank) {
        if (f.rank() != r)
          throw rank_error("deltaw::io::peft_structured_adapter::add_lokr: \"" + m.name + "\" has a low-rank factor of rank " +
                           std::to_string(f.rank()) + " but r = " + std::to_string(r));
        left = detail::copy_to_float(f.left());
        right = detail::copy_to_float(f.right());
      } else {
        left = detail::copy_to_float(f.matrix());
      }
    };
    put(u.w1(), m.w1, m.w1_b);
    put(u.w2(), m.w2, m.w2_b);
    const auto L = lokr_shapes(u.rows(), u.cols(), r, config.decompose_both, config.decompose_factor);
    const bool ok = m.w1.view.rows() == L.a && m.w2.view.rows() == L.b &&
                    (m.w1_b ? m.w1_b->view.cols() : m.w1.view.cols()) == L.c &&
                    (m.w2_b ? m.w2_b->view.cols() : m.w2.view.cols()) == L.d && m.w1_b.has_value() == !L.w1_dense &&
                    m.w2_b.has_value() == !L.w2_dense;
    if (!ok)
      throw argument_error("deltaw::io::peft_structured_adapter::add_lokr: \"" + m.name + "\" " +
                           deltaw::detail::shape_str(u.rows(), u.cols()) + " with r = " + std::to_string(r) +
                           " needs PEFT's layout w1 [" + std::to_string(L.a) + ", " + std::to_string(L.c) + "] (" +
                           (L.w1_dense ? "dense" : "low rank") + "), w2 [" + std::to_string(L.b) + ", " +
                           std::to_string(L.d) + "] (" + (L.w2_dense ? "dense" : "low rank") +
                           "); PEFT could not load other shapes");
    m.rank = r;
    m.scale = u.scale();
    m.alpha = u.scale() * double(r);
    insert(std::move(m));
  }

  /// MiSS (default or mini, from D's shape: [r, out] or [r, mini_r]).
  template <class T, class D>
  void add_miss(std::string name, const miss_update<T, D>& u) {
    const miss_kind k = u.block_cols() == u.rows() ? miss_kind::miss : miss_kind::mini;
    begin("MISS", name);
    set_miss(k, u.block(), k == miss_kind::mini ? u.block_cols() : 1, name);
    insert(peft_miss_module{std::move(name), k, detail::copy_to_float(u.D())});
  }
  /// Bone bat (MiSS init_weights "bat"): its block b only; W stays the model's.
  template <class T, class TW, class D>
  void add_bone_bat(std::string name, const bone_bat_update<T, TW, D>& u) {
    begin("MISS", name);
    set_miss(miss_kind::bat, u.block(), 1, name);
    insert(peft_miss_module{std::move(name), miss_kind::bat, detail::copy_to_float(u.b())});
  }

  /// VeRA from deltaw's seeded bases; every module must share one vera_basis. The bases are
  /// materialised into vera_A / vera_B on the first add.
  template <class T, class D>
  void add_vera(std::string name, const vera_update<T, D>& u) {
    begin("VERA", name);
    const auto& b = u.basis();
    if (!basis_A.owner) {
      config.r = b.r;
      config.projection_prng_key = std::int64_t(b.seed);
      auto a = std::make_shared<std::vector<float>>(std::size_t(b.r * b.in_max));
      fill_entries(b.A(), 0, a->size(), a->data());
      auto bb = std::make_shared<std::vector<float>>(std::size_t(b.out_max * b.r));
      fill_entries(b.B(), 0, bb->size(), bb->data());
      basis_A = detail::owned_matrix(std::move(a), b.r, b.in_max);
      basis_B = detail::owned_matrix(std::move(bb), b.out_max, b.r);
      vera_seed_ = b.seed;
    } else if (b.r != basis_A.view.rows() || b.in_max != basis_A.view.cols() || b.out_max != basis_B.view.rows() ||
               b.seed != vera_seed_) {
      throw argument_error("deltaw::io::peft_structured_adapter::add_vera: \"" + name +
                           "\" uses other shared bases than the modules already added (PEFT shares one pair)");
    }
    peft_vera_module m;
    m.name = std::move(name);
    m.lambda_b = detail::copy_to_float(u.lambda_b());
    m.lambda_d = detail::copy_to_float(u.lambda_d());
    m.A = basis_A;
    m.B = basis_B;
    insert(std::move(m));
  }

  /// RandLoRA from deltaw's seeded bases; every module must share one randlora_basis.
  template <class T, class D>
  void add_randlora(std::string name, const randlora_update<T, D>& u) {
    begin("RANDLORA", name);
    const auto& b = u.basis();
    if (!basis_A.owner) {
      config.r = b.r;
      config.projection_prng_key = std::int64_t(b.seed);
      config.sparse = b.kind == randlora_kind::sparse;
      config.very_sparse = b.kind == randlora_kind::very_sparse;
      auto a = std::make_shared<std::vector<float>>(std::size_t(b.r * b.min_dim));
      fill_entries(b.A(), 0, a->size(), a->data());
      auto bb = std::make_shared<std::vector<float>>(std::size_t(b.max_dim * b.num_bases * b.r));
      fill_entries(b.B(), 0, bb->size(), bb->data());
      basis_A = detail::owned_matrix(std::move(a), b.r, b.min_dim);
      basis_B = detail::owned_matrix(std::move(bb), b.max_dim, b.num_bases * b.r);
      randlora_bases = b.num_bases;
      randlora_seed_ = b.seed;
      randlora_kind_ = b.kind;
    } else if (b.r != basis_A.view.rows() || b.min_dim != basis_A.view.cols() || b.max_dim != basis_B.view.rows() ||
               b.seed != randlora_seed_ || b.kind != randlora_kind_) {
      throw argument_error("deltaw::io::peft_structured_adapter::add_randlora: \"" + name +
                           "\" uses other shared bases than the modules already added (PEFT shares one pair)");
    }
    const double a = u.scale() * double(b.r);
    if (size() > 0 && a != config.alpha)
      throw argument_error("deltaw::io::peft_structured_adapter::add_randlora: \"" + name + "\" has α = s·r = " +
                           std::to_string(a) + " but earlier modules have " + std::to_string(config.alpha) +
                           " (RandLoRA has no alpha_pattern)");
    config.alpha = a;
    peft_randlora_module m;
    m.name = std::move(name);
    m.lambda = detail::copy_to_float(u.lambda());
    m.gamma = detail::copy_to_float(u.gamma());
    m.A = basis_A;
    m.B = basis_B;
    m.scale = u.scale();
    insert(std::move(m));
  }

  /// LoHa module from hadamard_update. PEFT's LoHa has one rank r for both products and
  /// s = α/r: α = s·r is written (rank_pattern / alpha_pattern where modules differ).
  template <class T, class D>
  void add_loha(std::string name, const hadamard_update<T, D>& u) {
    begin("LOHA", name);
    if (u.rank1() != u.rank2())
      throw rank_error("deltaw::io::peft_structured_adapter::add_loha: \"" + name + "\" has ranks " +
                       std::to_string(u.rank1()) + " and " + std::to_string(u.rank2()) + "; PEFT's LoHa has one rank r");
    peft_loha_module m;
    m.name = std::move(name);
    m.w1_a = detail::copy_to_float(u.B1());
    m.w1_b = detail::copy_to_float(u.A1());
    m.w2_a = detail::copy_to_float(u.B2());
    m.w2_b = detail::copy_to_float(u.A2());
    m.rank = u.rank1();
    m.scale = u.scale();
    m.alpha = u.scale() * double(m.rank);
    insert(std::move(m));
  }
  /// IA³ module: its vector and side (an input-scaling module is listed in
  /// feedforward_modules). W stays the model's.
  template <class T, class TW, class D>
  void add_ia3(std::string name, const ia3_update<T, TW, D>& u) {
    begin("IA3", name);
    insert(peft_ia3_module{std::move(name), detail::copy_to_float(u.l()), u.side()});
  }
  /// OFT module: its Q (oft_R.weight). Every module must share the rotation options and
  /// block_share (PEFT's config holds one of each); W stays the model's.
  template <class T, class TW, class D>
  void add_oft(std::string name, const oft_update<T, TW, D>& u) {
    begin("OFT", name);
    const auto& o = u.options();
    if (size() == 0) {
      config.oft = o;
      config.block_share = u.shared();
      config.coft = false;  // Q is stored as it acts (already projected if it ever was)
    } else if (config.oft.cayley_neumann != o.cayley_neumann ||
               (o.cayley_neumann && config.oft.neumann_terms != o.neumann_terms)) {
      throw argument_error("deltaw::io::peft_structured_adapter::add_oft: \"" + name +
                           "\" uses other rotation options (use_cayley_neumann, num_cayley_neumann_terms) than the "
                           "modules already added (PEFT's OFT config has one of each)");
    }
    config.block_share = config.block_share || u.shared();
    insert(peft_oft_module{std::move(name), detail::copy_to_float(u.Q()), o});
  }
  /// BOFT module: its R (boft_R [m, nb, b, b]) and s (boft_s [out, 1]); W stays the
  /// model's. PEFT's BOFT computes exact Cayley rotations, so a Cayley–Neumann update is
  /// refused (argument_error); the modules must share m and b or nb (one config), checked
  /// when written. A file with m > 1 loads in PEFT only where its CUDA extension does.
  template <class T, class TW, class D>
  void add_boft(std::string name, const boft_update<T, TW, D>& u) {
    begin("BOFT", name);
    if (u.options().cayley_neumann)
      throw argument_error("deltaw::io::peft_structured_adapter::add_boft: \"" + name +
                           "\" uses the Cayley–Neumann series; PEFT's BOFT has only the exact Cayley transform");
    peft_boft_module m;
    m.name = std::move(name);
    m.R = detail::copy_to_float(u.R());
    m.s = detail::copy_to_float(u.s());
    m.factors = u.factors();
    m.blocks = u.blocks();
    insert(std::move(m));
  }
  /// AdaLoRA module: B, E, A and the layer's init_r (PEFT's ranknum); the scale s gives
  /// lora_alpha = s·(init_r + 1e-5), which every module must share (one lora_alpha and one
  /// init_r per PEFT config). With r < init_r the module enters rank_pattern with `mask`
  /// (init_r entries, r true; default: the first r kept), as PEFT saves a pruned layer.
  template <class T, class D>
  void add_adalora(std::string name, const adalora_update<T, D>& u, index_t init_r, std::vector<bool> mask = {}) {
    begin("ADALORA", name);
    constexpr const char* op = "deltaw::io::peft_structured_adapter::add_adalora";
    if (init_r < 1 || init_r < u.rank())
      throw rank_error(std::string(op) + ": \"" + name + "\" has r = " + std::to_string(u.rank()) + " but init_r = " +
                       std::to_string(init_r));
    if (!mask.empty() && (index_t(mask.size()) != init_r || index_t(std::count(mask.begin(), mask.end(), true)) != u.rank()))
      throw argument_error(std::string(op) + ": the mask of \"" + name + "\" must have init_r = " + std::to_string(init_r) +
                           " entries, r = " + std::to_string(u.rank()) + " of them true");
    double alpha = u.scale() * (double(init_r) + 1e-5);
    if (std::abs(alpha - std::round(alpha)) <= 1e-9 * std::max(1.0, std::abs(alpha))) alpha = std::round(alpha);
    if (size() == 0) {
      config.init_r = init_r;
      config.alpha = alpha;
    } else if (config.init_r != init_r || std::abs(config.alpha - alpha) > 1e-9 * std::max(1.0, std::abs(alpha))) {
      throw argument_error(std::string(op) + ": \"" + name + "\" has init_r = " + std::to_string(init_r) +
                           " and lora_alpha = " + std::to_string(alpha) + ", unlike the modules already added (init_r = " +
                           std::to_string(config.init_r) + ", lora_alpha = " + std::to_string(config.alpha) +
                           "); PEFT's AdaLoRA config has one of each");
    }
    peft_adalora_module m;
    m.name = std::move(name);
    m.A = detail::copy_to_float(u.A());
    m.B = detail::copy_to_float(u.B());
    m.E = detail::copy_to_float(u.E());
    m.ranknum = init_r;
    m.alpha = config.alpha;
    m.scale = u.scale();
    if (!mask.empty()) m.mask = std::move(mask);
    else if (u.rank() < init_r) {
      std::vector<bool> lead(std::size_t(init_r), false);
      std::fill(lead.begin(), lead.begin() + u.rank(), true);
      m.mask = std::move(lead);
    }
    insert(std::move(m));
  }
  /// HRA module: its U (hra_u). Every module must share r and the variant (PEFT's HRA
  /// config has one r, no rank_pattern, and one apply_GS); W stays the model's.
  template <class T, class TW, class D>
  void add_hra(std::string name, const hra_update<T, TW, D>& u) {
    begin("HRA", name);
    if (size() == 0) {
      config.r = u.rank();
      config.hra = u.options();
    } else if (config.r != u.rank() || config.hra.gram_schmidt != u.options().gram_schmidt) {
      throw argument_error("deltaw::io::peft_structured_adapter::add_hra: \"" + name + "\" has r = " +
                           std::to_string(u.rank()) + (u.options().gram_schmidt ? " with" : " without") +
                           " Gram–Schmidt, unlike the modules already added (PEFT's HRA config has one r and one apply_GS)");
    }
    insert(peft_hra_module{std::move(name), detail::copy_to_float(u.U()), u.options()});
  }

  /// SHiRA module: its values (times its scale: PEFT does not save one) and pattern. PEFT
  /// sizes shira_weight as r·(out + in) with one r per adapter, so nnz must be that for one
  /// r shared by every module (argument_error otherwise: PEFT could not load it).
  template <class T, class D>
  void add_shira(std::string name, const shira_update<T, D>& u) {
    begin("SHIRA", name);
    const index_t sum = u.rows() + u.cols();
    if (u.nnz() == 0 || u.nnz() % sum != 0 || (size() > 0 && u.nnz() / sum != config.r))
      throw argument_error("deltaw::io::peft_structured_adapter::add_shira: \"" + name + "\" has " +
                           std::to_string(u.nnz()) + " entries for " + deltaw::detail::shape_str(u.rows(), u.cols()) +
                           "; PEFT's SHiRA stores r·(out + in) = r·" + std::to_string(sum) + " with one r per adapter" +
                           (size() > 0 ? " (r = " + std::to_string(config.r) + " so far)" : std::string()));
    config.r = u.nnz() / sum;
    peft_shira_module m;
    m.name = std::move(name);
    const auto& p = *u.pattern();
    m.rows = p.rows;
    m.cols = p.cols;
    auto v = std::make_shared<std::vector<float>>(std::size_t(u.nnz()));
    for (index_t k = 0; k < u.nnz(); ++k) (*v)[std::size_t(k)] = float(u.scale() * convert<double>(u.values()[k]));
    m.values = held_vector<float>{vector_view<const float>(v->data(), u.nnz()), v};
    insert(std::move(m));
  }

  /// HiRA module: B and A (hira_B, hira_A); W stays the model's. Ranks may differ per module
  /// (written as rank_pattern).
  template <class T, class TW, class D>
  void add_hira(std::string name, const hira_update<T, TW, D>& u) {
    begin("HIRA", name);
    insert(peft_hira_module{std::move(name), detail::copy_to_float(u.A()), detail::copy_to_float(u.B())});
  }
  /// DeLoRA module: B, A, λ and the weight norms (delora_w_norm). Ranks may differ per module.
  template <class T, class D>
  void add_delora(std::string name, const delora_update<T, D>& u) {
    begin("DELORA", name);
    insert(peft_delora_module{std::move(name), detail::copy_to_float(u.A()), detail::copy_to_float(u.B()),
                              detail::copy_to_float(u.lambda()), detail::copy_to_float(u.w_norm())});
  }

  /// RoAd module: θ and α. Every module must share the variant and group_size (PEFT's
  /// config has one of each); W stays the model's.
  template <class T, class TW, class D>
  void add_road(std::string name, const road_update<T, TW, D>& u) {
    begin("ROAD", name);
    if (size() == 0) {
      config.road = u.variant();
      config.group_size = u.group_size();
    } else if (config.road != u.variant() || config.group_size != u.group_size()) {
      throw argument_error("deltaw::io::peft_structured_adapter::add_road: \"" + name + "\" is " +
                           road_variant_name(u.variant()) + " with group_size " + std::to_string(u.group_size()) +
                           ", unlike the modules already added (PEFT's RoAd config has one variant and one group_size)");
    }
    insert(peft_road_module{std::move(name), detail::copy_to_float(u.theta()), detail::copy_to_float(u.alpha()),
                            u.variant(), u.group_size()});
  }

  /// VB-LoRA (io/peft_vblora.hpp); every module must share one bank. With
  /// save_only_topk_weights the file keeps only each row's top k and weights, as PEFT's option.
  template <class T, class D>
  void add_vblora(std::string name, const vblora_update<T, D>& u, bool save_only_topk_weights = false) {
    begin("VBLORA", name);
    if (size() > 0 && (u.rank() != config.r || u.topk() != std::get<peft_vblora_module>(modules_.front()).topk))
      throw argument_error("deltaw::io::peft_structured_adapter::add_vblora: \"" + name + "\" has r = " +
                           std::to_string(u.rank()) + ", topk = " + std::to_string(u.topk()) +
                           " unlike the modules already added (PEFT's VBLoRAConfig has one r and one topk)");
    config.r = u.rank();
    auto m = detail::vblora_module_from(std::move(name), u, basis_A, size() == 0);
    detail::vblora_config_fields(config.raw, m);
    config.raw["save_only_topk_weights"] = save_only_topk_weights;
    insert(std::move(m));
  }
  /// PVeRA from deltaw's seeded bases (io/peft_pvera.hpp); every module must share one vera_basis.
  template <class T, class D>
  void add_pvera(std::string name, const pvera_update<T, D>& u) {
    begin("PVERA", name);
    config.r = u.rank();
    insert(detail::pvera_module_from(std::move(name), u, basis_A, basis_B, vera_seed_, size() == 0));
    config.projection_prng_key = std::int64_t(vera_seed_);
  }

  // ── files ────────────────────────────────────────────────────────────────────────────

  /// Builds from a parsed config and adapter_model.safetensors.
  static peft_structured_adapter from_safetensors(peft_structured_config cfg, const safetensors_file& f,
                                                  const std::string& source = "adapter_model.safetensors");

  /// The tensors of adapter_model.safetensors and the config to write with them.
  std::pair<peft_structured_config, safetensors_writer> to_files() const;

 private:
  void begin(const char* type, const std::string& name) {
    if (config.peft_type.empty()) config.peft_type = type;
    const bool same = config.peft_type == type || (config.peft_type == "BONE" && std::string(type) == "MISS");
    if (!same)
      throw argument_error("deltaw::io::peft_structured_adapter: cannot add a " + std::string(type) + " module (\"" +
                           name + "\") to a " + config.peft_type + " adapter; PEFT adapters hold one type");
    if (find(name)) throw argument_error("deltaw::io::peft_structured_adapter: module \"" + name + "\" added twice");
  }
  void set_miss(miss_kind k, index_t r, index_t mini_r, const std::string& name) {
    if (size() == 0) {
      config.miss = k;
      config.r = r;
      config.mini_r = mini_r;
    } else if (config.miss != k || config.r != r || config.mini_r != mini_r) {
      throw argument_error("deltaw::io::peft_structured_adapter: MiSS module \"" + name +
                           "\" differs in kind, r or mini_r from the modules already added (MiSS has no rank_pattern)");
    }
  }
  void insert(module m) {
    auto it = std::lower_bound(modules_.begin(), modules_.end(), name_of(m),
                               [](const module& x, const std::string& n) { return name_of(x) < n; });
    modules_.insert(it, std::move(m));
  }
  std::vector<module> modules_;
  std::uint64_t vera_seed_ = 0, randlora_seed_ = 0;
  randlora_kind randlora_kind_ = randlora_kind::dense;
};

inline peft_structured_adapter peft_structured_adapter::from_safetensors(peft_structured_config cfg,
                                                                         const safetensors_file& f,
                                                                         const std::string& source) {
  peft_structured_adapter a;
  a.config = std::move(cfg);
  const std::string& type = a.config.peft_type;
  if (type == "VBLORA") {  // io/peft_vblora.hpp
    detail::read_vblora_modules(a.config.raw, f, source, a.basis_A, [&](peft_vblora_module m) { a.insert(std::move(m)); });
    return a;
  }
  if (type == "PVERA") {  // io/peft_pvera.hpp
    detail::read_pvera_modules(a.config.raw, f, source, a.basis_A, a.basis_B,
                               [&](peft_pvera_module m) { a.insert(std::move(m)); });
    return a;
  }
  const bool is_miss = type == "MISS" || type == "BONE";
  const std::string model_prefix = "base_model.model.", shared_prefix = "base_model.";
  std::vector<std::string_view> suffixes;
  if (type == "LOKR") suffixes = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"};
  else if (type == "MISS") suffixes = {"miss_block"};
  else if (type == "BONE") suffixes = {"bone_block"};
  else if (type == "VERA") suffixes = {"vera_lambda_b", "vera_lambda_d"};
  else if (type == "LOHA") suffixes = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"};
  else if (type == "IA3") suffixes = {"ia3_l"};
  else if (type == "OFT") suffixes = {"oft_R.weight"};
  else if (type == "HRA") suffixes = {"hra_u"};
  else if (type == "SHIRA") suffixes = {"shira_weight", "shira_indices"};
  else if (type == "ROAD") suffixes = {"road_theta", "road_alpha"};
  else if (type == "HIRA") suffixes = {"hira_A", "hira_B"};
  else if (type == "DELORA") suffixes = {"delora_A", "delora_B", "delora_lambda", "delora_w_norm"};
  else if (type == "BOFT") suffixes = {"boft_R", "boft_s"};
  else if (type == "ADALORA") suffixes = {"lora_A", "lora_B", "lora_E"};
  else suffixes = {"randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B"};

  std::map<std::string, std::map<std::string, const st_tensor_info*>> parts;
  const st_tensor_info *shared_A = nullptr, *shared_B = nullptr;
  for (const auto& t : f.tensors()) {
    std::string_view k = t.name;
    if (type == "VERA" || type == "RANDLORA") {
      const std::string pa = shared_prefix + (type == "VERA" ? "vera_A" : "randlora_A");
      const std::string pb = shared_prefix + (type == "VERA" ? "vera_B" : "randlora_B");
      if (k == pa) { shared_A = &t; continue; }
      if (k == pb) { shared_B = &t; continue; }
    }
    if (!k.starts_with(model_prefix))
      throw format_error("deltaw::io::peft (" + source + "): unknown key \"" + t.name + "\" for a " + type + " adapter");
    k.remove_prefix(model_prefix.size());
    if (type == "LOKR" && k.ends_with(".lokr_t2"))
      detail::peft_unsupported(source, "LoKr's effective-conv2d factor (\"" + t.name + "\")");
    if (type == "LOHA" && (k.ends_with(".hada_t1") || k.ends_with(".hada_t2")))
      detail::peft_unsupported(source, "LoHa's Tucker core of a convolution (\"" + t.name + "\"); deltaw's LoHa is for Linear layers");
    bool found = false;
    for (auto s : suffixes) {
      if (k.size() > s.size() + 1 && k.ends_with(s) && k[k.size() - s.size() - 1] == '.') {
        const std::string mod(k.substr(0, k.size() - s.size() - 1));
        auto& slot = parts[mod][std::string(s)];
        if (slot) throw format_error("deltaw::io::peft (" + source + "): two tensors named \"" + t.name + "\"");
        slot = &t;
        found = true;
        break;
      }
    }
    if (!found) throw format_error("deltaw::io::peft (" + source + "): unknown key \"" + t.name + "\" for a " + type + " adapter");
  }

  auto mat2 = [&](const st_tensor_info* t, const std::string& where) {
    if (t->shape.size() != 2) {
      if (t->shape.size() > 2 && type == "LOKR") detail::peft_unsupported(source, "convolution LoKr (" + where + " is " + detail::shape_string(t->shape) + ")");
      if (t->shape.size() > 2 && type == "LOHA") detail::peft_unsupported(source, "convolution LoHa (" + where + " is " + detail::shape_string(t->shape) + ")");
      throw format_error("deltaw::io::peft (" + source + "): " + where + " is " + detail::shape_string(t->shape) + "; expected a matrix");
    }
    return f.matrix<float>(t->name);
  };

  if (type == "VERA" || type == "RANDLORA") {
    if (!shared_A || !shared_B)
      throw format_error("deltaw::io::peft (" + source + "): a " + type + " adapter with save_projection needs base_model." +
                         (type == "VERA" ? "vera_A and base_model.vera_B" : "randlora_A and base_model.randlora_B"));
    if (type == "VERA") {
      a.basis_A = mat2(shared_A, "vera_A");
      a.basis_B = mat2(shared_B, "vera_B");
      if (a.basis_A.view.rows() != a.basis_B.view.cols())
        throw format_error("deltaw::io::peft (" + source + "): vera_A " + detail::shape_string(shared_A->shape) + " and vera_B " +
                           detail::shape_string(shared_B->shape) + " disagree on r");
    } else {
      if (shared_A->shape.size() != 3 || shared_A->shape[1] != 1 || shared_B->shape.size() != 3 ||
          shared_B->shape[2] != shared_A->shape[0])
        throw format_error("deltaw::io::peft (" + source + "): randlora_A " + detail::shape_string(shared_A->shape) +
                           " [r, 1, min_dim] and randlora_B " + detail::shape_string(shared_B->shape) +
                           " [max_dim, N, r] do not fit together");
      const auto& sa = shared_A->shape;
      const auto& sb = shared_B->shape;
      // An empty tensor passes the byte-length check with any other dimensions: bound them
      // so that N·r cannot wrap around.
      constexpr auto dim_max = std::uint64_t(std::numeric_limits<std::int32_t>::max());
      if (sb[0] > dim_max || sb[1] > dim_max || sb[2] > dim_max || sa[0] > dim_max || sa[2] > dim_max)
        throw format_error("deltaw::io::peft (" + source + "): randlora_B " + detail::shape_string(shared_B->shape) +
                           " or randlora_A " + detail::shape_string(shared_A->shape) + " has a dimension above 2^31 − 1");
      a.basis_A = detail::st_flat_matrix(f, *shared_A, index_t(sa[0]), index_t(sa[2]), source);
      a.basis_B = detail::st_flat_matrix(f, *shared_B, index_t(sb[0]), index_t(sb[1] * sb[2]), source);
      a.randlora_bases = index_t(sb[1]);
    }
    if (a.basis_A.view.rows() != a.config.r)
      throw format_error("deltaw::io::peft (" + source + "): the config gives r = " + std::to_string(a.config.r) +
                         " but the stored bases have rank " + std::to_string(a.basis_A.view.rows()));
  }

  for (const auto& entry : parts) {
    // Not a structured binding: the lambdas below capture p, which clang before 16 rejects.
    const std::string& mod = entry.first;
    const auto& p = entry.second;
    const std::string where = "deltaw::io::peft (" + source + "): module \"" + mod + "\"";
    auto get = [&](const char* s) -> const st_tensor_info* {
      auto it = p.find(s);
      return it == p.end() ? nullptr : it->second;
    };
    if (type == "LOKR") {
      peft_lokr_module m;
      m.name = mod;
      m.rank = a.config.rank_for(mod);
      m.alpha = a.config.alpha_for(mod);
      m.scale = m.alpha / double(m.rank);
      for (int i = 0; i < 2; ++i) {
        const std::string base = i == 0 ? "lokr_w1" : "lokr_w2";
        const auto* dense = get(base.c_str());
        const auto* left = get((base + "_a").c_str());
        const auto* right = get((base + "_b").c_str());
        held_matrix<float>& dst = i == 0 ? m.w1 : m.w2;
        auto& dst_b = i == 0 ? m.w1_b : m.w2_b;
        if (dense && !left && !right) {
          dst = mat2(dense, base);
        } else if (!dense && left && right) {
          dst = mat2(left, base + "_a");
          dst_b = mat2(right, base + "_b");
          if (dst.view.cols() != dst_b->view.rows())
            throw format_error(where + ": " + base + "_a " + detail::shape_string(left->shape) + " and " + base + "_b " +
                               detail::shape_string(right->shape) + " disagree on r");
          if (dst.view.cols() != m.rank)
            throw format_error(where + ": the config gives r = " + std::to_string(m.rank) + " but " + base + "_a is " +
                               detail::shape_string(left->shape));
        } else {
          throw format_error(where + " needs either " + base + " or both " + base + "_a and " + base + "_b");
        }
      }
      // out = a·b and in = c·d must be representable: zero-byte factors can claim any
      // other dimension (lokr_w1 [2^62 + 1, 0] with lokr_w2 [4, 0] overflowed).
      {
        index_t prod;
        const index_t c1 = m.w1_b ? m.w1_b->view.cols() : m.w1.view.cols();
        const index_t c2 = m.w2_b ? m.w2_b->view.cols() : m.w2.view.cols();
        auto low_rank_fits = [&prod](const held_matrix<float>& l, index_t c) {  // r·(rows + cols)·2
          index_t sum;
          return !__builtin_add_overflow(l.view.rows(), c, &sum) && !__builtin_mul_overflow(l.view.cols(), sum, &prod) &&
                 !__builtin_mul_overflow(prod, index_t(2), &prod);
        };
        if (__builtin_mul_overflow(m.w1.view.rows(), m.w2.view.rows(), &prod) || __builtin_mul_overflow(c1, c2, &prod) ||
            (m.w1_b && !low_rank_fits(m.w1, c1)) || (m.w2_b && !low_rank_fits(m.w2, c2)))
          throw format_error(where + ": the LoKr factors " + deltaw::detail::shape_str(m.w1.view.rows(), c1) + " ⊗ " +
                             deltaw::detail::shape_str(m.w2.view.rows(), c2) + " give a layer too large to index");
      }
      a.insert(std::move(m));
    } else if (is_miss) {
      const auto* t = get(type == "MISS" ? "miss_block" : "bone_block");
      peft_miss_module m;
      m.name = mod;
      m.kind = a.config.miss;
      const index_t r = a.config.r;
      if (m.kind == miss_kind::bat) {
        if (t->shape.size() != 3 || t->shape[1] != std::uint64_t(r) || t->shape[2] != std::uint64_t(r))
          throw format_error(where + ": a bat block must be [out/r, r, r] with r = " + std::to_string(r) + "; got " +
                             detail::shape_string(t->shape));
        index_t out_rows;
        if (t->shape[0] > std::uint64_t(std::numeric_limits<index_t>::max()) ||
            __builtin_mul_overflow(index_t(t->shape[0]), r, &out_rows))
          throw format_error(where + ": a bat block " + detail::shape_string(t->shape) + " is too large to index");
        m.block = detail::st_flat_matrix(f, *t, out_rows, r, source);
      } else {
        m.block = mat2(t, "miss_block");
        if (m.block.view.rows() != r)
          throw format_error(where + ": the config gives r = " + std::to_string(r) + " but the block is " +
                             detail::shape_string(t->shape) + " [r, ·]");
        if (m.kind == miss_kind::mini && m.block.view.cols() != a.config.mini_r)
          throw format_error(where + ": the config gives mini_r = " + std::to_string(a.config.mini_r) +
                             " but the block is " + detail::shape_string(t->shape) + " [r, mini_r]");
      }
      a.insert(std::move(m));
    } else if (type == "LOHA") {
      peft_loha_module m;
      m.name = mod;
      m.rank = a.config.rank_for(mod);
      m.alpha = a.config.alpha_for(mod);
      m.scale = m.alpha / double(m.rank);
      const st_tensor_info* t[4];
      const char* keys[4] = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"};
      for (int i = 0; i < 4; ++i)
        if (!(t[i] = get(keys[i]))) throw format_error(where + " lacks " + keys[i]);
      m.w1_a = mat2(t[0], keys[0]);
      m.w1_b = mat2(t[1], keys[1]);
      m.w2_a = mat2(t[2], keys[2]);
      m.w2_b = mat2(t[3], keys[3]);
      const auto& A = m.w1_a.view;
      const auto& B = m.w1_b.view;
      const auto& C = m.w2_a.view;
      const auto& E = m.w2_b.view;
      if (A.cols() != m.rank || B.rows() != m.rank || C.cols() != m.rank || E.rows() != m.rank || A.rows() != C.rows() ||
          B.cols() != E.cols())
        throw format_error(where + ": hada_w1_a " + detail::shape_string(t[0]->shape) + ", hada_w1_b " +
                           detail::shape_string(t[1]->shape) + ", hada_w2_a " + detail::shape_string(t[2]->shape) +
                           ", hada_w2_b " + detail::shape_string(t[3]->shape) + " are not [out, r], [r, in], [out, r], [r, in] with r = " +
                           std::to_string(m.rank) + " (the config's rank for this module)");
      a.insert(std::move(m));
    } else if (type == "IA3") {
      const auto* t = get("ia3_l");
      if (t->shape.size() != 2 || (t->shape[0] != 1 && t->shape[1] != 1))
        throw format_error(where + ": ia3_l is " + detail::shape_string(t->shape) + "; expected [out, 1] or [1, in]");
      peft_ia3_module m;
      m.name = mod;
      // The side PEFT chose from feedforward_modules (list: a suffix of the name, as PEFT's
      // endswith; string: a full regex match).
      std::optional<bool> ff;
      if (a.config.feedforward_modules_regex) {
        if (t->shape[0] == 1 && t->shape[1] == 1)
          ff = detail::targets_module({}, a.config.feedforward_modules_regex, "", mod);
      } else {
        ff = std::any_of(a.config.feedforward_modules.begin(), a.config.feedforward_modules.end(),
                         [&](const std::string& f) { return std::string_view(mod).ends_with(f); });
      }
      const bool input = t->shape[0] == 1 && (t->shape[1] != 1 || ff.value_or(false));
      if (ff && *ff != input)
        throw format_error(where + ": ia3_l is " + detail::shape_string(t->shape) + " but feedforward_modules says the module scales its " +
                           (*ff ? "input ([1, in])" : "output ([out, 1])"));
      m.side = input ? ia3_side::input : ia3_side::output;
      const auto mm = f.matrix<float>(t->name);  // [n, 1] or [1, n], packed
      m.l = held_vector<float>{vector_view<const float>(mm.view.data(), mm.view.size()), mm.owner};
      a.insert(std::move(m));
    } else if (type == "OFT") {
      const auto* t = get("oft_R.weight");
      peft_oft_module m;
      m.name = mod;
      m.Q = mat2(t, "oft_R.weight");
      if (m.block() < 1 || m.Q.view.rows() < 1)
        throw format_error(where + ": oft_R.weight " + detail::shape_string(t->shape) +
                           " is not [blocks, b(b − 1)/2] for a block size b");
      if (a.config.block_share != (m.Q.view.rows() == 1) && a.config.block_share)
        throw format_error(where + ": block_share is set but oft_R.weight is " + detail::shape_string(t->shape));
      // PEFT adjusts oft_block_size for a layer whose in_features it does not divide: the
      // tensor's size, not the config, gives b.
      m.options = a.config.oft;
      if (a.config.coft) {  // PEFT projects the parameter before every forward
        auto P = std::make_shared<dense<float>>(oft_coft_project(m.Q.view, a.config.eps));
        m.Q = held_matrix<float>{view(std::as_const(*P)), P};
      }
      a.insert(std::move(m));
    } else if (type == "HRA") {
      const auto* t = get("hra_u");
      peft_hra_module m;
      m.name = mod;
      m.U = mat2(t, "hra_u");
      if (m.U.view.cols() != a.config.r || m.U.view.rows() < 1)
        throw format_error(where + ": hra_u " + detail::shape_string(t->shape) + " is not [in, r] with the config's r = " +
                           std::to_string(a.config.r));
      m.options = a.config.hra;
      a.insert(std::move(m));
    } else if (type == "BOFT") {
      const auto *tr = get("boft_R"), *ts = get("boft_s");
      if (!tr || !ts) throw format_error(where + " lacks " + std::string(tr ? "boft_s" : "boft_R"));
      const auto& sh = tr->shape;
      constexpr auto dim_max = std::uint64_t(std::numeric_limits<std::int32_t>::max());
      if (sh.size() != 4 || sh[2] != sh[3] || sh[0] < 1 || sh[1] < 1 || sh[2] < 1 || sh[0] > 62 || sh[1] > dim_max ||
          sh[2] > dim_max)
        throw format_error(where + ": boft_R is " + detail::shape_string(sh) + "; expected [m, nb, b, b]");
      if (ts->shape.size() != 2 || ts->shape[1] != 1)
        throw format_error(where + ": boft_s is " + detail::shape_string(ts->shape) + "; expected [out, 1]");
      peft_boft_module m;
      m.name = mod;
      m.factors = index_t(sh[0]);
      m.blocks = index_t(sh[1]);
      const index_t b = index_t(sh[2]);
      index_t rows;
      if (__builtin_mul_overflow(m.factors * m.blocks, b, &rows) || __builtin_mul_overflow(rows, b, &rows))
        throw format_error(where + ": boft_R " + detail::shape_string(sh) + " is too large to index");
      if ((a.config.boft_block_size != 0 && b != a.config.boft_block_size) ||
          (a.config.boft_block_num != 0 && m.blocks != a.config.boft_block_num))
        throw format_error(where + ": boft_R " + detail::shape_string(sh) + " disagrees with the config's boft_block_size = " +
                           std::to_string(a.config.boft_block_size) + " / boft_block_num = " +
                           std::to_string(a.config.boft_block_num));
      // PEFT saves m = 1 when it ran without its CUDA extension, whatever the config says.
      if (m.factors != 1 && m.factors != a.config.boft_n_butterfly_factor)
        throw format_error(where + ": boft_R has " + std::to_string(m.factors) + " butterfly factors but the config's "
                           "boft_n_butterfly_factor is " + std::to_string(a.config.boft_n_butterfly_factor));
      if (m.factors > 1 && (b % 2 != 0 || m.blocks % (index_t(1) << (m.factors - 1)) != 0))
        throw format_error(where + ": boft_R " + detail::shape_string(sh) + ": " + std::to_string(m.factors) +
                           " butterfly factors need an even b and nb a multiple of 2^(m − 1) (PEFT's conditions)");
      m.R = detail::st_flat_matrix(f, *tr, rows / b, b, source);
      const auto sm = f.matrix<float>(ts->name);
      m.s = held_vector<float>{vector_view<const float>(sm.view.data(), sm.view.size()), sm.owner};
      a.insert(std::move(m));
    } else if (type == "ADALORA") {
      const auto *ta = get("lora_A"), *tb = get("lora_B"), *te = get("lora_E");
      if (!ta || !tb || !te) throw format_error(where + " needs lora_A, lora_B and lora_E");
      peft_adalora_module m;
      m.name = mod;
      m.A = mat2(ta, "lora_A");
      m.B = mat2(tb, "lora_B");
      const auto em = mat2(te, "lora_E");
      const index_t r = m.A.view.rows();
      if (m.B.view.cols() != r || em.view.rows() != r || em.view.cols() != 1)
        throw format_error(where + ": lora_A " + detail::shape_string(ta->shape) + ", lora_E " + detail::shape_string(te->shape) +
                           " and lora_B " + detail::shape_string(tb->shape) + " are not [r, in], [r, 1], [out, r]");
      m.E = held_vector<float>{r == 0 ? vector_view<const float>() : vector_view<const float>(em.view.data(), r, em.view.row_stride()),
                               em.owner};
      for (const auto& [key, mask] : a.config.adalora_rank_pattern) {
        const auto at = key.find(".lora_E");
        if (at != std::string::npos && key.substr(0, at) == mod) m.mask = mask;
      }
      const index_t want = m.mask ? index_t(std::count(m.mask->begin(), m.mask->end(), true)) : a.config.init_r;
      if (r != want)
        throw format_error(where + ": lora_A has r = " + std::to_string(r) + " but " +
                           (m.mask ? "rank_pattern keeps " : "init_r is ") + std::to_string(want));
      m.ranknum = a.config.init_r;
      m.alpha = a.config.alpha;
      m.scale = deltaw::detail::adalora_peft_scale(m.alpha, m.ranknum, r);
      a.insert(std::move(m));
    } else if (type == "HIRA" || type == "DELORA") {
      const bool hi = type == "HIRA";
      const char* ka = hi ? "hira_A" : "delora_A";
      const char* kb = hi ? "hira_B" : "delora_B";
      const auto *ta = get(ka), *tb = get(kb);
      if (!ta || !tb) throw format_error(where + " lacks " + (ta ? kb : ka));
      auto A = mat2(ta, ka), B = mat2(tb, kb);
      const index_t r = a.config.rank_for(mod);
      if (A.view.rows() != r || B.view.cols() != r)
        throw format_error(where + ": " + ka + " " + detail::shape_string(ta->shape) + " and " + kb + " " +
                           detail::shape_string(tb->shape) + " are not [r, in] and [out, r] with the config's r = " +
                           std::to_string(r) + " for this module");
      if (hi) {
        a.insert(peft_hira_module{mod, std::move(A), std::move(B)});
      } else {
        const auto *tl = get("delora_lambda"), *tw = get("delora_w_norm");
        if (!tl || !tw) throw format_error(where + " lacks " + std::string(tl ? "delora_w_norm" : "delora_lambda"));
        peft_delora_module m{mod, std::move(A), std::move(B), f.vector<float>(tl->name), f.vector<float>(tw->name)};
        if (m.lambda.view.size() != 1 || m.w_norm.view.size() != m.in_features())
          throw format_error(where + ": delora_lambda " + detail::shape_string(tl->shape) + " and delora_w_norm " +
                             detail::shape_string(tw->shape) + " are not [1] and [in] = [" + std::to_string(m.in_features()) + "]");
        a.insert(std::move(m));
      }
    } else if (type == "ROAD") {
      const auto *tt = get("road_theta"), *ta = get("road_alpha");
      if (!tt || !ta) throw format_error(where + " lacks " + std::string(tt ? "road_alpha" : "road_theta"));
      peft_road_module m;
      m.name = mod;
      m.theta = f.vector<float>(tt->name);
      m.alpha = f.vector<float>(ta->name);
      m.variant = a.config.road;
      m.group_size = a.config.group_size;
      const index_t n = m.theta.view.size();
      if (m.alpha.view.size() != n || n < 1 || road_parameter_size(m.variant, m.out_features()) != n)
        throw format_error(where + ": road_theta " + detail::shape_string(tt->shape) + " and road_alpha " +
                           detail::shape_string(ta->shape) + " do not fit " + road_variant_name(m.variant) +
                           " (out/2, out or 2·out entries each)");
      a.insert(std::move(m));
    } else if (type == "SHIRA") {
      const auto *tv = get("shira_weight"), *ti = get("shira_indices");
      if (!tv || !ti) throw format_error(where + " lacks " + std::string(tv ? "shira_indices" : "shira_weight"));
      if (tv->shape.size() != 1 || ti->shape.size() != 2 || ti->shape[0] != 2 || ti->shape[1] != tv->shape[0])
        throw format_error(where + ": shira_weight " + detail::shape_string(tv->shape) + " and shira_indices " +
                           detail::shape_string(ti->shape) + " are not [nnz] and [2, nnz]");
      peft_shira_module m;
      m.name = mod;
      m.values = f.vector<float>(tv->name);
      const auto idx = f.values<double>(ti->name);  // int32 (float32 when saved on Windows)
      const std::size_t n = std::size_t(tv->shape[0]);
      m.rows.resize(n);
      m.cols.resize(n);
      for (std::size_t k = 0; k < 2 * n; ++k) {
        const double d = idx[k];
        if (!(d >= 0) || d > 2147483647.0 || d != double(index_t(d)))
          throw format_error(where + ": shira_indices holds " + std::to_string(d) + ", not an index");
        (k < n ? m.rows[k] : m.cols[k - n]) = index_t(d);
      }
      a.insert(std::move(m));
    } else if (type == "VERA") {
      const auto *tb = get("vera_lambda_b"), *td = get("vera_lambda_d");
      if (!tb || !td) throw format_error(where + " lacks " + std::string(tb ? "vera_lambda_d" : "vera_lambda_b"));
      peft_vera_module m;
      m.name = mod;
      m.lambda_b = f.vector<float>(tb->name);
      m.lambda_d = f.vector<float>(td->name);
      const index_t out = m.lambda_b.view.size(), r = a.basis_A.view.rows();
      if (m.lambda_d.view.size() != r)
        throw format_error(where + ": vera_lambda_d " + detail::shape_string(td->shape) + " must be [r] = [" + std::to_string(r) + "]");
      if (out > a.basis_B.view.rows())
        throw format_error(where + ": vera_lambda_b " + detail::shape_string(tb->shape) + " is longer than vera_B's " +
                           std::to_string(a.basis_B.view.rows()) + " rows");
      m.A = a.basis_A;
      m.B = a.basis_B;
      a.insert(std::move(m));
    } else {
      const auto *tl = get("randlora_lambda"), *tg = get("randlora_gamma");
      if (!tl || !tg) throw format_error(where + " lacks " + std::string(tl ? "randlora_gamma" : "randlora_lambda"));
      peft_randlora_module m;
      m.name = mod;
      m.lambda = mat2(tl, "randlora_lambda");
      m.gamma = mat2(tg, "randlora_gamma");
      const index_t r = a.basis_A.view.rows(), N = m.lambda.view.cols(), mn = m.gamma.view.cols();
      if (m.lambda.view.rows() != r || m.gamma.view.rows() != N)
        throw format_error(where + ": randlora_lambda " + detail::shape_string(tl->shape) + " [r, N] and randlora_gamma " +
                           detail::shape_string(tg->shape) + " [N, min_dim] do not fit r = " + std::to_string(r));
      if (N > a.randlora_bases || mn > a.basis_A.view.cols() || N != deltaw::detail::ceil_div(mn, r))
        throw format_error(where + ": N = " + std::to_string(N) + " bases of min_dim " + std::to_string(mn) +
                           " do not fit the shared bases (N ≤ " + std::to_string(a.randlora_bases) + ", min_dim ≤ " +
                           std::to_string(a.basis_A.view.cols()) + ", N = ⌈min_dim / r⌉)");
      // Per-module copies of the bases (PEFT 0.21 writes them) must equal the shared ones.
      for (const char* s : {"randlora_A", "randlora_B"})
        if (const auto* t = get(s)) {
          const auto* sh = s[9] == 'A' ? shared_A : shared_B;
          const auto x = f.data(*t), y = f.data(*sh);
          if (t->shape != sh->shape || t->dtype != sh->dtype || std::memcmp(x.data(), y.data(), x.size()) != 0)
            throw format_error(where + ": its " + s + " differs from base_model." + s + " (deltaw reads one shared basis)");
        }
      m.A = a.basis_A;
      m.B = a.basis_B;
      m.scale = a.config.alpha / double(r);
      a.insert(std::move(m));
    }
  }
  return a;
}

inline std::pair<peft_structured_config, safetensors_writer> peft_structured_adapter::to_files() const {
  peft_structured_config c = config;
  safetensors_writer w;
  const std::string P = "base_model.model.";
  // rank and alpha of a LoKr / LoHa module (the patterns are written for the others).
  auto rank_alpha = [](const module& m) {
    if (const auto* k = std::get_if<peft_lokr_module>(&m)) return std::pair<index_t, double>(k->rank, k->alpha);
    const auto& h = std::get<peft_loha_module>(m);
    return std::pair<index_t, double>(h.rank, h.alpha);
  };
  if (c.peft_type == "LOKR" || c.peft_type == "LOHA") {
    c.rank_pattern.clear();
    c.alpha_pattern.clear();
    if (!modules_.empty()) {
      std::map<index_t, int> counts;
      for (const auto& m : modules_) ++counts[rank_alpha(m).first];
      c.r = std::max_element(counts.begin(), counts.end(), [](auto& x, auto& y) { return x.second < y.second; })->first;
      for (const auto& m : modules_)
        if (rank_alpha(m).first == c.r) {
          c.alpha = rank_alpha(m).second;
          break;
        }
    }
  }
  if ((c.peft_type == "HIRA" || c.peft_type == "DELORA") && !modules_.empty()) {
    // r: the most common rank; the others go to rank_pattern (written in the loop below).
    c.rank_pattern.clear();
    std::map<index_t, int> counts;
    for (const auto& m : modules_)
      ++counts[std::visit([](const auto& x) -> index_t {
        if constexpr (requires { x.rank(); }) return x.rank();
        else return 0;
      }, m)];
    c.r = std::max_element(counts.begin(), counts.end(), [](auto& x, auto& y) { return x.second < y.second; })->first;
  }
  if (c.peft_type == "IA3") {
    c.feedforward_modules.clear();
    c.feedforward_modules_regex.reset();
    for (const auto& mv : modules_)
      if (std::get<peft_ia3_module>(mv).side == ia3_side::input) c.feedforward_modules.push_back(name_of(mv));
    // PEFT marks a module feed-forward when its name ends with a listed name.
    for (const auto& mv : modules_)
      if (std::get<peft_ia3_module>(mv).side == ia3_side::output)
        for (const auto& f : c.feedforward_modules)
          if (std::string_view(name_of(mv)).ends_with(f))
            throw argument_error("deltaw::io::peft_structured_adapter: the output-scaling IA³ module \"" + name_of(mv) +
                                 "\" ends with the input-scaling module's name \"" + f +
                                 "\", so PEFT's feedforward_modules rule would scale its input");
  }
  if (c.peft_type == "OFT" && !modules_.empty()) {
    std::set<index_t> blocks, rows;
    for (const auto& mv : modules_) {
      const auto& m = std::get<peft_oft_module>(mv);
      blocks.insert(m.block());
      rows.insert(m.Q.view.rows());
    }
    if (c.block_share && (rows.size() != 1 || *rows.begin() != 1))
      throw argument_error("deltaw::io::peft_structured_adapter: an OFT adapter mixing shared (block_share) and "
                           "per-block modules cannot be written (PEFT's block_share is one flag)");
    if (blocks.size() == 1) {
      c.oft_block_size = *blocks.begin();
      c.r = 0;
    } else if (rows.size() == 1 && !c.block_share) {
      c.r = *rows.begin();
      c.oft_block_size = 0;
    } else {
      throw argument_error("deltaw::io::peft_structured_adapter: the OFT modules have neither one block size nor one "
                           "block count, which PEFT's config (oft_block_size or r) cannot express");
    }
  }
  if (c.peft_type == "BOFT" && !modules_.empty()) {
    std::set<index_t> bs, nbs, ms;
    for (const auto& mv : modules_) {
      const auto& m = std::get<peft_boft_module>(mv);
      bs.insert(m.block());
      nbs.insert(m.blocks);
      ms.insert(m.factors);
    }
    if (ms.size() != 1)
      throw argument_error("deltaw::io::peft_structured_adapter: the BOFT modules have different numbers of butterfly "
                           "factors, which PEFT's config (one boft_n_butterfly_factor) cannot express");
    c.boft_n_butterfly_factor = *ms.begin();
    if (bs.size() == 1) {
      c.boft_block_size = *bs.begin();
      c.boft_block_num = 0;
    } else if (nbs.size() == 1) {
      c.boft_block_num = *nbs.begin();
      c.boft_block_size = 0;
    } else {
      throw argument_error("deltaw::io::peft_structured_adapter: the BOFT modules have neither one block size nor one "
                           "block count, which PEFT's config (boft_block_size or boft_block_num) cannot express");
    }
  }
  if (c.peft_type == "ADALORA") {
    c.adalora_rank_pattern.clear();
    for (const auto& mv : modules_) {
      const auto& m = std::get<peft_adalora_module>(mv);
      if (m.mask) c.adalora_rank_pattern.emplace_back(m.name + ".lora_E", *m.mask);
    }
  }
  detail::set_full_target_modules(c, modules_);
  for (const auto& mv : modules_) {
    const std::string& n = name_of(mv);
    if (const auto* m = std::get_if<peft_lokr_module>(&mv)) {
      if (m->rank != c.r) c.rank_pattern.emplace_back(detail::regex_escape(n), m->rank);
      if (m->alpha != c.alpha) c.alpha_pattern.emplace_back(detail::regex_escape(n), m->alpha);
      if (m->w1_b) {
        w.add(P + n + ".lokr_w1_a", m->w1.view);
        w.add(P + n + ".lokr_w1_b", m->w1_b->view);
      } else {
        w.add(P + n + ".lokr_w1", m->w1.view);
      }
      if (m->w2_b) {
        w.add(P + n + ".lokr_w2_a", m->w2.view);
        w.add(P + n + ".lokr_w2_b", m->w2_b->view);
      } else {
        w.add(P + n + ".lokr_w2", m->w2.view);
      }
    } else if (const auto* m = std::get_if<peft_miss_module>(&mv)) {
      const std::string key = P + n + (c.peft_type == "BONE" ? ".bone_block" : ".miss_block");
      if (m->kind == miss_kind::bat)
        detail::add_f32_tensor(w, key, {std::uint64_t(m->block.view.rows() / m->r()), std::uint64_t(m->r()), std::uint64_t(m->r())},
                               m->block.view);
      else
        w.add(key, m->block.view);
    } else if (const auto* m = std::get_if<peft_vera_module>(&mv)) {
      w.add(P + n + ".vera_lambda_b", m->lambda_b.view);
      w.add(P + n + ".vera_lambda_d", m->lambda_d.view);
    } else if (const auto* m = std::get_if<peft_randlora_module>(&mv)) {
      w.add(P + n + ".randlora_lambda", m->lambda.view);
      w.add(P + n + ".randlora_gamma", m->gamma.view);
    } else if (const auto* m = std::get_if<peft_loha_module>(&mv)) {
      if (m->rank != c.r) c.rank_pattern.emplace_back(detail::regex_escape(n), m->rank);
      if (m->alpha != c.alpha) c.alpha_pattern.emplace_back(detail::regex_escape(n), m->alpha);
      w.add(P + n + ".hada_w1_a", m->w1_a.view);
      w.add(P + n + ".hada_w1_b", m->w1_b.view);
      w.add(P + n + ".hada_w2_a", m->w2_a.view);
      w.add(P + n + ".hada_w2_b", m->w2_b.view);
    } else if (const auto* m = std::get_if<peft_ia3_module>(&mv)) {
      const auto k = std::uint64_t(m->l.view.size());
      const bool in = m->side == ia3_side::input;
      std::vector<float> v(static_cast<std::size_t>(k));
      for (index_t i = 0; i < m->l.view.size(); ++i) v[std::size_t(i)] = m->l.view[i];
      detail::add_f32_tensor(w, P + n + ".ia3_l", in ? std::vector<std::uint64_t>{1, k} : std::vector<std::uint64_t>{k, 1},
                             matrix_view<const float>(v.data(), 1, index_t(k)));
    } else if (const auto* m = std::get_if<peft_oft_module>(&mv)) {
      w.add(P + n + ".oft_R.weight", m->Q.view);
    } else if (const auto* m = std::get_if<peft_hra_module>(&mv)) {
      w.add(P + n + ".hra_u", m->U.view);
    } else if (const auto* m = std::get_if<peft_boft_module>(&mv)) {
      const auto b = std::uint64_t(m->block());
      detail::add_f32_tensor(w, P + n + ".boft_R", {std::uint64_t(m->factors), std::uint64_t(m->blocks), b, b}, m->R.view);
      std::vector<float> v(std::size_t(m->s.view.size()));
      for (index_t i = 0; i < m->s.view.size(); ++i) v[std::size_t(i)] = m->s.view[i];
      detail::add_f32_tensor(w, P + n + ".boft_s", {std::uint64_t(v.size()), 1},
                             matrix_view<const float>(v.data(), 1, index_t(v.size())));
    } else if (const auto* m = std::get_if<peft_adalora_module>(&mv)) {
      w.add(P + n + ".lora_A", m->A.view);
      w.add(P + n + ".lora_B", m->B.view);
      std::vector<float> v(std::size_t(m->E.view.size()));
      for (index_t i = 0; i < m->E.view.size(); ++i) v[std::size_t(i)] = m->E.view[i];
      detail::add_f32_tensor(w, P + n + ".lora_E", {std::uint64_t(v.size()), 1},
                             matrix_view<const float>(v.data(), 1, index_t(v.size())));
    } else if (const auto* m = std::get_if<peft_hira_module>(&mv)) {
      if (m->rank() != c.r) c.rank_pattern.emplace_back(detail::regex_escape(n), m->rank());
      w.add(P + n + ".hira_A", m->A.view);
      w.add(P + n + ".hira_B", m->B.view);
    } else if (const auto* m = std::get_if<peft_delora_module>(&mv)) {
      if (m->rank() != c.r) c.rank_pattern.emplace_back(detail::regex_escape(n), m->rank());
      w.add(P + n + ".delora_A", m->A.view);
      w.add(P + n + ".delora_B", m->B.view);
      w.add(P + n + ".delora_lambda", m->lambda.view);
      w.add(P + n + ".delora_w_norm", m->w_norm.view);
    } else if (const auto* m = std::get_if<peft_vblora_module>(&mv)) {
      detail::add_vblora_tensors(w, P + n, *m, detail::peft_bool(c.raw, "save_only_topk_weights", "config"));
    } else if (const auto* m = std::get_if<peft_pvera_module>(&mv)) {
      detail::add_pvera_tensors(w, P + n, *m);
    } else if (const auto* m = std::get_if<peft_road_module>(&mv)) {
      w.add(P + n + ".road_theta", m->theta.view);
      w.add(P + n + ".road_alpha", m->alpha.view);
    } else if (const auto* m = std::get_if<peft_shira_module>(&mv)) {
      w.add(P + n + ".shira_weight", m->values.view);
      std::vector<std::int32_t> idx(2 * m->rows.size());
      for (std::size_t k = 0; k < m->rows.size(); ++k) {
        idx[k] = std::int32_t(m->rows[k]);
        idx[m->rows.size() + k] = std::int32_t(m->cols[k]);
      }
      w.add_raw(P + n + ".shira_indices", st_dtype::I32, {2, std::uint64_t(m->rows.size())},
                std::as_bytes(std::span<const std::int32_t>(idx)));
    }
  }
  if (c.peft_type == "VERA") {
    w.add("base_model.vera_A", basis_A.view);
    w.add("base_model.vera_B", basis_B.view);
  } else if (c.peft_type == "VBLORA" && !modules_.empty()) {
    detail::add_vblora_bank(w, basis_A);
  } else if (c.peft_type == "PVERA" && !modules_.empty()) {
    detail::add_pvera_bases(w, basis_A, basis_B);
  } else if (c.peft_type == "RANDLORA") {
    const auto r = std::uint64_t(basis_A.view.rows());
    const std::vector<std::uint64_t> sa{r, 1, std::uint64_t(basis_A.view.cols())};
    const std::vector<std::uint64_t> sb{std::uint64_t(basis_B.view.rows()), std::uint64_t(randlora_bases), r};
    detail::add_f32_tensor(w, "base_model.randlora_A", sa, basis_A.view);
    detail::add_f32_tensor(w, "base_model.randlora_B", sb, basis_B.view);
    // PEFT 0.21 also stores (and on load expects) a copy per module.
    for (const auto& mv : modules_) {
      detail::add_f32_tensor(w, P + name_of(mv) + ".randlora_A", sa, basis_A.view);
      detail::add_f32_tensor(w, P + name_of(mv) + ".randlora_B", sb, basis_B.view);
    }
  }
  return {std::move(c), std::move(w)};
}

/// Reads a structured PEFT adapter directory (LOKR, MISS, BONE, VERA, RANDLORA, LOHA, IA3,
/// OFT, HRA, SHIRA, ROAD, HIRA, DELORA).
#if DELTAW_DEFINE_PRECOMPILED
DELTAW_PRECOMPILED_INLINE peft_structured_adapter read_peft_structured_adapter(const std::filesystem::path& dir) {
  const detail::adapter_dir d(dir, "deltaw::io::read_peft_structured_adapter");
  auto cfg = parse_peft_structured_config(d.config_text(), d.config_path);
  return peft_structured_adapter::from_safetensors(std::move(cfg), d.tensors(), d.tensors_path);
}
#else
peft_structured_adapter read_peft_structured_adapter(const std::filesystem::path& dir);
#endif

/// Writes `a` as a PEFT adapter directory (created if needed), all-or-nothing (as
/// write_peft_adapter).
#if DELTAW_DEFINE_PRECOMPILED
DELTAW_PRECOMPILED_INLINE void write_peft_structured_adapter(const std::filesystem::path& dir, const peft_structured_adapter& a) {
  if (a.size() == 0) throw argument_error("deltaw::io::write_peft_structured_adapter: the adapter has no modules");
  auto [cfg, w] = a.to_files();
  const std::string text = peft_structured_config_json(cfg).dump(2) + "\n";
  detail::write_adapter_files(dir, "deltaw::io::write_peft_structured_adapter", w, text);
}
#else
void write_peft_structured_adapter(const std::filesystem::path& dir, const peft_structured_adapter& a);
#endif

}  // namespace io
DELTAW_NAMESPACE_END
