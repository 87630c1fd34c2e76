// SPDX-License-Identifier: MIT
// PEFT VBLORA adapter files (PEFT 0.21.2's `vblora`, checked against its save_pretrained: see
// tests/fixtures/peft_vblora*): the module type and the tensor reading / writing that
// io::peft_structured_adapter dispatches to (read_peft returns these modules; the writer is
// peft_structured_adapter::add_vblora + write_peft_structured_adapter).
//
// Keys:
//   base_model.vblora_vector_bank                  [n, L]  the shared bank (F32)
//   base_model.model.<module>.vblora_logits_A      [r, in/L, n]
//   base_model.model.<module>.vblora_logits_B      [out/L, r, n]
// or, with save_only_topk_weights = true (inference only, as PEFT says):
//   <module>.vblora_logits_{A,B}_topk_indices     [.., .., k]  U8 (n < 2⁸), I16 (n < 2¹⁵), I32, I64
//   <module>.vblora_logits_{A,B}_topk_weights     [.., .., k − 1]  the first k − 1 softmax
//                                                  weights (largest first); the last is 1 − Σ
// Config: r, num_vectors, vector_length, topk, save_only_topk_weights (PEFT's defaults 4, 256,
// 256, 2, false where absent). No scale.
//
// Documented choices:
//  - A save_only_topk_weights file is read as PEFT's loader reads it: logits −∞ except the k
//    kept, which are log(weight) (expr/vblora.hpp treats −∞ logits), so the module's ΔW is
//    PEFT's. Indices outside [0, n), repeated indices in a row, or weights that are not in
//    [0, 1] or sum above 1 are format_error.
//  - Writing with save_only_topk_weights keeps only what PEFT keeps (the top k of each row
//    with their softmax weights); the logits themselves are lost, as in PEFT.
//  - Refused (unsupported_error): fan_in_fan_out (Conv1D layers).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "../backend/cpu/vblora.hpp"
#include "peft.hpp"

DELTAW_NAMESPACE_BEGIN
namespace io {

/// One VB-LoRA module: its logits (PEFT's tensors with the first two dimensions flattened)
/// and the adapter's shared bank.
struct peft_vblora_module {
  std::string name;
  held_matrix<float> logits_A;  ///< [r·in/L, n]
  held_matrix<float> logits_B;  ///< [out/L·r, n]
  held_matrix<float> bank;      ///< the shared vblora_vector_bank [n, L]
  index_t r = 0, topk = 0;

  index_t rank() const { return r; }
  index_t out_features() const { return logits_B.view.rows() / r * bank.view.cols(); }
  index_t in_features() const { return logits_A.view.rows() / r * bank.view.cols(); }
  /// Empty when a layer [out, in] fits the module, else why not.
  std::string layer_mismatch(index_t out, index_t in) const {
    if (out == out_features() && in == in_features()) return {};
    return "vblora_logits_A / _B give [" + std::to_string(out_features()) + ", " + std::to_string(in_features()) + "]";
  }
  vblora_update<float> update() const { return vblora_update<float>(logits_A, logits_B, bank, r, topk); }
  vblora_update<float> update(index_t, index_t) const { return update(); }
};

namespace detail {

/// VBLORA's config fields (PEFT's defaults where absent).
struct vblora_fields {
  index_t r = 4, num_vectors = 256, vector_length = 256, topk = 2;
  bool save_only_topk_weights = false;
};
inline vblora_fields parse_vblora_fields(const json& o, const std::string& source) {
  vblora_fields v;
  auto rank = [&](const char* k, index_t& dst) {
    if (auto it = o.find(k); it != o.end() && !it->is_null()) dst = peft_rank(*it, k, source);
  };
  rank("r", v.r);
  rank("num_vectors", v.num_vectors);
  rank("vector_length", v.vector_length);
  rank("topk", v.topk);
  v.save_only_topk_weights = peft_bool(o, "save_only_topk_weights", source);
  if (peft_bool(o, "fan_in_fan_out", source))
    throw unsupported_error("deltaw::io::peft (" + source + "): fan_in_fan_out for VBLORA is not supported");
  if (v.topk > v.num_vectors)
    peft_fail(source, "topk = " + std::to_string(v.topk) + " exceeds num_vectors = " + std::to_string(v.num_vectors));
  return v;
}

/// Reads the VBLORA tensors of `f` and calls add(peft_vblora_module) for each module (name
/// order). `bank_out` receives the shared bank.
template <class Add>
void read_vblora_modules(const json& config, const safetensors_file& f, const std::string& source,
                         held_matrix<float>& bank_out, Add&& add) {
  const vblora_fields c = parse_vblora_fields(config, source);
  const std::string P = "base_model.model.", bank_key = "base_model.vblora_vector_bank";
  auto fail = [&](const std::string& m) { throw format_error("deltaw::io::peft (" + source + "): " + m); };
  const st_tensor_info* bank_t = nullptr;
  // module → suffix → tensor
  std::map<std::string, std::map<std::string, const st_tensor_info*>> parts;
  static const char* const suffixes[] = {"vblora_logits_A_topk_indices", "vblora_logits_A_topk_weights",
                                         "vblora_logits_B_topk_indices", "vblora_logits_B_topk_weights",
                                         "vblora_logits_A", "vblora_logits_B"};
  for (const auto& t : f.tensors()) {
    std::string_view k = t.name;
    if (k == bank_key) { bank_t = &t; continue; }
    bool found = false;
    if (k.starts_with(P)) {
      k.remove_prefix(P.size());
      for (std::string_view s : suffixes)
        if (k.size() > s.size() + 1 && k.ends_with(s) && k[k.size() - s.size() - 1] == '.') {
          auto& slot = parts[std::string(k.substr(0, k.size() - s.size() - 1))][std::string(s)];
          if (slot) fail("two tensors named \"" + t.name + "\"");
          slot = &t;
          found = true;
          break;
        }
    }
    if (!found) fail("unknown key \"" + t.name + "\" for a VBLORA adapter");
  }
  if (!bank_t) fail("a VBLORA adapter needs base_model.vblora_vector_bank");
  if (bank_t->shape.size() != 2 || bank_t->shape[0] != std::uint64_t(c.num_vectors) ||
      bank_t->shape[1] != std::uint64_t(c.vector_length))
    fail("vblora_vector_bank is " + shape_string(bank_t->shape) + "; the config gives [num_vectors, vector_length] = [" +
         std::to_string(c.num_vectors) + ", " + std::to_string(c.vector_length) + "]");
  bank_out = f.matrix<float>(bank_key);
  const index_t n = c.num_vectors, k = c.topk;
  for (const auto& entry : parts) {
    const auto& mod = entry.first;  // not a structured binding: clang 14 cannot capture one in a lambda
    const auto& p = entry.second;
    const std::string where = "module \"" + mod + "\"";
    auto get = [&](const std::string& s) -> const st_tensor_info* {
      auto it = p.find(s);
      return it == p.end() ? nullptr : it->second;
    };
    // The two leading dimensions a factor's logits must have: A [r, ·], B [·, r].
    auto logits = [&](const char* side) -> held_matrix<float> {
      const std::string base = std::string("vblora_logits_") + side;
      const auto *full = get(base), *idx = get(base + "_topk_indices"), *wts = get(base + "_topk_weights");
      const bool a = side[0] == 'A';
      auto check_lead = [&](const std::vector<std::uint64_t>& s, const std::string& what) {
        constexpr auto dim_max = std::uint64_t(1) << 31;
        if (s.size() != 3 || s[0] == 0 || s[1] == 0 || s[0] > dim_max || s[1] > dim_max || (a ? s[0] : s[1]) != std::uint64_t(c.r))
          fail(where + ": " + what + " is " + shape_string(s) + "; expected " + (a ? "[r, in/L, ·]" : "[out/L, r, ·]") +
               " with r = " + std::to_string(c.r));
      };
      if (full && !idx && !wts) {
        check_lead(full->shape, base);
        if (full->shape[2] != std::uint64_t(n))
          fail(where + ": " + base + " is " + shape_string(full->shape) + "; its last dimension must be num_vectors = " +
               std::to_string(n));
        auto v = std::make_shared<std::vector<float>>(f.values<float>(full->name));
        const index_t rows = index_t(full->shape[0] * full->shape[1]);
        return {matrix_view<const float>(v->data(), rows, n), v};
      }
      if (full || !idx || !wts)
        fail(where + " needs either " + base + " or both " + base + "_topk_indices and " + base + "_topk_weights");
      check_lead(idx->shape, base + "_topk_indices");
      if (idx->shape[2] != std::uint64_t(k) || wts->shape.size() != 3 || wts->shape[0] != idx->shape[0] ||
          wts->shape[1] != idx->shape[1] || wts->shape[2] != std::uint64_t(k - 1))
        fail(where + ": " + base + "_topk_indices " + shape_string(idx->shape) + " and _topk_weights " +
             shape_string(wts->shape) + " must be [.., .., k] and [.., .., k − 1] with topk k = " + std::to_string(k));
      // The expansion to [rows, n] logits (PEFT's loader does the same) must stay bounded by
      // what a file can mean: rows and n each come from a tensor of the file.
      if (idx->shape[0] * idx->shape[1] * std::uint64_t(n) > (std::uint64_t(1) << 28))
        fail(where + ": " + base + "_topk_indices " + shape_string(idx->shape) + " with num_vectors = " +
             std::to_string(n) + " expands to more than 2^28 logits");
      const auto iv = f.values<double>(idx->name);
      const auto wv = f.values<double>(wts->name);
      const index_t rows = index_t(idx->shape[0] * idx->shape[1]);
      auto v = std::make_shared<std::vector<float>>(std::size_t(rows * n), -std::numeric_limits<float>::infinity());
      std::set<index_t> seen;
      for (index_t q = 0; q < rows; ++q) {
        double rest = 1.0;
        seen.clear();
        for (index_t j = 0; j < k; ++j) {
          const double id = iv[std::size_t(q * k + j)];
          if (!(id >= 0 && id < double(n)) || id != std::floor(id))
            fail(where + ": " + base + "_topk_indices holds " + std::to_string(id) + ", outside [0, num_vectors = " +
                 std::to_string(n) + ")");
          if (!seen.insert(index_t(id)).second)
            fail(where + ": " + base + "_topk_indices repeats bank index " + std::to_string(index_t(id)) + " in row " +
                 std::to_string(q));
          double w = 0;
          if (j + 1 < k) {
            w = wv[std::size_t(q * (k - 1) + j)];
            if (!(w >= 0 && w <= 1)) fail(where + ": " + base + "_topk_weights holds " + std::to_string(w) + ", not in [0, 1]");
            rest -= w;
          } else {
            if (rest < -1e-5) fail(where + ": " + base + "_topk_weights of row " + std::to_string(q) + " sum above 1");
            w = std::max(rest, 0.0);
          }
          // PEFT: logits = log(weights) scattered into −∞ (in float32, as here).
          (*v)[std::size_t(q * n + index_t(id))] = std::log(float(w));
        }
      }
      return {matrix_view<const float>(v->data(), rows, n), v};
    };
    peft_vblora_module m;
    m.name = mod;
    m.logits_A = logits("A");
    m.logits_B = logits("B");
    m.bank = bank_out;
    m.r = c.r;
    m.topk = k;
    add(std::move(m));
  }
}

/// A module for the writer from a deltaw update (copied to float); the bank must be the one
/// already held in `bank` (set here on the first module).
template <class T, class D>
peft_vblora_module vblora_module_from(std::string name, const vblora_update<T, D>& u, held_matrix<float>& bank,
                                      bool first) {
  constexpr const char* op = "deltaw::io::peft_structured_adapter::add_vblora";
  static_assert(std::is_same_v<D, device::cpu>, "deltaw::io::peft: copy device factors to the host first");
  auto copy = [](const auto& v) {
    auto buf = std::make_shared<std::vector<float>>(std::size_t(v.size()));
    for (index_t i = 0; i < v.rows(); ++i)
      for (index_t j = 0; j < v.cols(); ++j) (*buf)[std::size_t(i * v.cols() + j)] = convert<float>(v(i, j));
    return held_matrix<float>{matrix_view<const float>(buf->data(), v.rows(), v.cols()), buf};
  };
  if (first) {
    bank = copy(u.bank());
  } else {
    bool same = bank.view.rows() == u.bank().rows() && bank.view.cols() == u.bank().cols();
    for (index_t i = 0; same && i < bank.view.rows(); ++i)
      for (index_t j = 0; same && j < bank.view.cols(); ++j) same = bank.view(i, j) == convert<float>(u.bank()(i, j));
    if (!same)
      throw argument_error(std::string(op) + ": \"" + name + "\" uses another vector bank than the modules already added " +
                           "(PEFT's VB-LoRA shares one bank)");
  }
  return peft_vblora_module{std::move(name), copy(u.logits_A()), copy(u.logits_B()), bank, u.rank(), u.topk()};
}

/// The config fields of a VBLORA adapter being written, into `raw` (r is written by the caller).
inline void vblora_config_fields(json& raw, const peft_vblora_module& m) {
  raw["num_vectors"] = m.bank.view.rows();
  raw["vector_length"] = m.bank.view.cols();
  raw["topk"] = m.topk;
}

/// Adds one module's tensors under `key` (base_model.model.<module>): the logits, or with
/// topk_only their top-k indices and first k − 1 weights, as PEFT saves them.
inline void add_vblora_tensors(safetensors_writer& w, const std::string& key, const peft_vblora_module& m, bool topk_only) {
  const index_t n = m.bank.view.rows(), k = m.topk, r = m.r;
  auto f32 = [&](std::string name, std::vector<std::uint64_t> shape, const std::vector<float>& v) {
    w.add_raw(std::move(name), st_dtype::F32, std::move(shape), std::as_bytes(std::span<const float>(v.data(), v.size())));
  };
  for (int side = 0; side < 2; ++side) {
    const auto& L = side == 0 ? m.logits_A.view : m.logits_B.view;
    const std::string base = key + (side == 0 ? ".vblora_logits_A" : ".vblora_logits_B");
    const auto lead0 = std::uint64_t(side == 0 ? r : L.rows() / r), lead1 = std::uint64_t(side == 0 ? L.rows() / r : r);
    if (!topk_only) {
      std::vector<float> v(std::size_t(L.size()));
      for (index_t i = 0; i < L.rows(); ++i)
        for (index_t j = 0; j < n; ++j) v[std::size_t(i * n + j)] = L(i, j);
      f32(base, {lead0, lead1, std::uint64_t(n)}, v);
      continue;
    }
    std::vector<float> wts(std::size_t(L.rows() * (k - 1)));
    std::vector<std::int64_t> idx(std::size_t(L.rows() * k));
    vblora_selection s;
    for (index_t q = 0; q < L.rows(); ++q) {
      deltaw::detail::vblora_select(n, k, [&](index_t j) { return double(L(q, j)); }, s, "deltaw::io::write (VBLORA)", q);
      for (index_t j = 0; j < k; ++j) idx[std::size_t(q * k + j)] = s.index[std::size_t(j)];
      for (index_t j = 0; j + 1 < k; ++j) wts[std::size_t(q * (k - 1) + j)] = float(s.weight[std::size_t(j)]);
    }
    const std::vector<std::uint64_t> ishape{lead0, lead1, std::uint64_t(k)};
    // PEFT's index dtype: the smallest of uint8, int16, int32, int64 that holds num_vectors.
    auto put = [&](auto tag, st_dtype dt) {
      using I = decltype(tag);
      std::vector<I> c(idx.begin(), idx.end());
      w.add_raw(base + "_topk_indices", dt, ishape, std::as_bytes(std::span<const I>(c.data(), c.size())));
    };
    if (n < (index_t(1) << 8)) put(std::uint8_t{}, st_dtype::U8);
    else if (n < (index_t(1) << 15)) put(std::int16_t{}, st_dtype::I16);
    else if (n < (index_t(1) << 31)) put(std::int32_t{}, st_dtype::I32);
    else put(std::int64_t{}, st_dtype::I64);
    f32(base + "_topk_weights", {lead0, lead1, std::uint64_t(k - 1)}, wts);
  }
}

/// The shared bank's tensor.
inline void add_vblora_bank(safetensors_writer& w, const held_matrix<float>& bank) {
  w.add("base_model.vblora_vector_bank", bank.view);
}

}  // namespace detail
}  // namespace io
DELTAW_NAMESPACE_END
