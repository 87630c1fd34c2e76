// SPDX-License-Identifier: MIT
// LoRAPrune's physical slicing: once the masks are final, each layer becomes a smaller
// dense layer with only its kept output rows and input columns, and its LoRA factors
// sliced the same way (B's rows for the output side, A's columns for the input side).
// On inputs that are zero in the pruned input channels (what the coupled producers' masks
// guarantee, see lora_prune_coupling) the sliced layer computes exactly the masked
// layer's kept outputs.
//
//   train::sliced_lora_linear<T>        W' [out', in'], bias, B' [out', r], A' [r, in'], s,
//                                       the kept indices and the full shape
//   train::slice_lora_linear(l, ko, ki) one nn::linear, given kept rows / columns
//   train::slice_pruned(pruner)         every layer of a lora_prune, by its final masks
//   train::write_sliced / save_sliced   a safetensors file (bytes / path)
//   train::read_sliced / load_sliced    back, with every shape and index checked
//
// File layout (safetensors): per layer `<name>.weight` [out', in'], `<name>.bias` [out']
// (when the layer has one), `<name>.lora_A.weight` [r, in'], `<name>.lora_B.weight`
// [out', r] in T's dtype, `<name>.kept_out` and `<name>.kept_in` (I64, ascending indices
// into the unpruned layer); metadata "format" = "deltaw.lora_prune.sliced", "layers" (the
// count), "layer.<k>" (the k-th name), "<name>.scale" (s, 17 significant digits),
// "<name>.out_features" / "<name>.in_features" (the unpruned shape). A reader rebuilds
// the pruned shapes from the kept lists alone, and the unpruned ones from the metadata.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "../io/safetensors.hpp"
#include "lora_prune.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

/// One physically pruned LoRA layer: y = x·W'ᵀ + s·(x·A'ᵀ)·B'ᵀ (+ b') on x [n, in'].
template <class T>
struct sliced_lora_linear {
  std::string name;
  dense<T> weight;              ///< [out', in']
  std::optional<dense<T>> bias; ///< [1, out']
  dense<T> lora_B;              ///< [out', r]
  dense<T> lora_A;              ///< [r, in']
  double scale = 1.0;
  index_t out_features = 0;     ///< of the unpruned layer
  index_t in_features = 0;
  std::vector<index_t> kept_out;  ///< ascending rows of the unpruned layer, size out'
  std::vector<index_t> kept_in;   ///< ascending columns, size in'

  /// The layer on x [n, in'], factored (the adapter is applied through A' and B').
  dense<T> forward(const dense<T>& x) const {
    if (x.cols() != weight.cols())
      throw shape_error("deltaw::train::sliced_lora_linear(" + name + ")::forward: x is " +
                        deltaw::detail::shape_str(x.rows(), x.cols()) + "; the layer is " +
                        deltaw::detail::shape_str(weight.rows(), weight.cols()));
    dense<T> y = x * weight.transpose();
    const dense<T> xa = x * lora_A.transpose();
    y.noalias() += T(scale) * (xa * lora_B.transpose());
    if (bias) y.rowwise() += bias->row(0);
    return y;
  }
};

namespace detail {
inline void check_kept(const std::vector<index_t>& k, index_t n, const std::string& op, const std::string& what) {
  for (std::size_t i = 0; i < k.size(); ++i)
    if (k[i] < 0 || k[i] >= n || (i > 0 && k[i] <= k[i - 1]))
      throw argument_error(op + ": " + what + " must be ascending indices in [0, " + std::to_string(n) +
                           "); entry " + std::to_string(i) + " is " + std::to_string(k[i]));
}
}  // namespace detail

/// Slices one layer (LoRA / rsLoRA adapter required) to the rows kept_out and columns
/// kept_in (ascending). Copies only the kept part.
template <class T>
sliced_lora_linear<T> slice_lora_linear(nn::linear<T>& l, std::vector<index_t> kept_out, std::vector<index_t> kept_in) {
  const std::string op = "deltaw::train::slice_lora_linear: layer '" + l.name() + "'";
  if (!l.has_adapter() || l.kind() == nn::adapter_kind::dora)
    throw argument_error(op + ": the layer needs a LoRA / rsLoRA adapter");
  detail::check_kept(kept_out, l.out_features(), op, "kept_out");
  detail::check_kept(kept_in, l.in_features(), op, "kept_in");
  sliced_lora_linear<T> s;
  s.name = l.name();
  s.scale = l.scale();
  s.out_features = l.out_features();
  s.in_features = l.in_features();
  const index_t ro = index_t(kept_out.size()), ci = index_t(kept_in.size()), r = l.lora_A()->value().rows();
  const auto W = l.weight();
  const auto& B = l.lora_B()->value();
  const auto& A = l.lora_A()->value();
  s.weight.resize(ro, ci);
  s.lora_B.resize(ro, r);
  s.lora_A.resize(r, ci);
  for (index_t i = 0; i < ro; ++i) {
    for (index_t j = 0; j < ci; ++j) s.weight(i, j) = W(kept_out[std::size_t(i)], kept_in[std::size_t(j)]);
    s.lora_B.row(i) = B.row(kept_out[std::size_t(i)]);
  }
  for (index_t j = 0; j < ci; ++j) s.lora_A.col(j) = A.col(kept_in[std::size_t(j)]);
  if (l.bias()) {
    dense<T> b(1, ro);
    for (index_t i = 0; i < ro; ++i) b(0, i) = l.bias()->value()(0, kept_out[std::size_t(i)]);
    s.bias = std::move(b);
  }
  s.kept_out = std::move(kept_out);
  s.kept_in = std::move(kept_in);
  return s;
}

/// Every layer of `p` (in p.layers() order) sliced by its final masks.
template <class T>
std::vector<sliced_lora_linear<T>> slice_pruned(const lora_prune<T>& p) {
  std::vector<sliced_lora_linear<T>> out;
  for (index_t i = 0; i < index_t(p.layers().size()); ++i)
    out.push_back(slice_lora_linear<T>(*p.layers()[std::size_t(i)], p.kept_outputs(i), p.kept_inputs(i)));
  return out;
}

/// The safetensors bytes of sliced layers (layout in the header comment).
template <class T>
std::vector<std::byte> write_sliced(const std::vector<sliced_lora_linear<T>>& layers) {
  const std::string op = "deltaw::train::write_sliced";
  io::safetensors_writer w;
  w.set_metadata("format", "deltaw.lora_prune.sliced");
  w.set_metadata("layers", std::to_string(layers.size()));
  auto indices = [&](const std::string& name, const std::vector<index_t>& k) {
    std::vector<std::int64_t> v(k.begin(), k.end());
    w.add_raw(name, io::st_dtype::I64, {std::uint64_t(v.size())},
              std::span<const std::byte>(reinterpret_cast<const std::byte*>(v.data()), v.size() * sizeof(std::int64_t)));
  };
  for (std::size_t k = 0; k < layers.size(); ++k) {
    const auto& s = layers[k];
    const index_t ro = index_t(s.kept_out.size()), ci = index_t(s.kept_in.size());
    if (s.weight.rows() != ro || s.weight.cols() != ci || s.lora_B.rows() != ro || s.lora_A.cols() != ci ||
        s.lora_B.cols() != s.lora_A.rows() || (s.bias && (s.bias->rows() != 1 || s.bias->cols() != ro)))
      throw shape_error(op + ": layer '" + s.name + "': weight " +
                        deltaw::detail::shape_str(s.weight.rows(), s.weight.cols()) + ", B " +
                        deltaw::detail::shape_str(s.lora_B.rows(), s.lora_B.cols()) + ", A " +
                        deltaw::detail::shape_str(s.lora_A.rows(), s.lora_A.cols()) + " for " +
                        std::to_string(ro) + " kept rows and " + std::to_string(ci) + " kept columns");
    detail::check_kept(s.kept_out, s.out_features, op + " ('" + s.name + "')", "kept_out");
    detail::check_kept(s.kept_in, s.in_features, op + " ('" + s.name + "')", "kept_in");
    w.set_metadata("layer." + std::to_string(k), s.name);
    char buf[40];
    std::snprintf(buf, sizeof buf, "%.17g", s.scale);
    w.set_metadata(s.name + ".scale", buf);
    w.set_metadata(s.name + ".out_features", std::to_string(s.out_features));
    w.set_metadata(s.name + ".in_features", std::to_string(s.in_features));
    w.add(s.name + ".weight", s.weight);
    if (s.bias) {
      const dense<T>& b = *s.bias;
      w.add(s.name + ".bias", vector_view<const T>(b.data(), b.cols()));
    }
    w.add(s.name + ".lora_A.weight", s.lora_A);
    w.add(s.name + ".lora_B.weight", s.lora_B);
    indices(s.name + ".kept_out", s.kept_out);
    indices(s.name + ".kept_in", s.kept_in);
  }
  return w.serialize();
}

template <class T>
void save_sliced(const std::vector<sliced_lora_linear<T>>& layers, const std::filesystem::path& path) {
  io::write_file(path, write_sliced(layers));
}

/// Reads what write_sliced wrote; format_error for anything inconsistent (missing entry,
/// shapes that disagree with the kept lists, indices out of order or range).
template <class T>
std::vector<sliced_lora_linear<T>> read_sliced(const io::safetensors_file& f) {
  const std::string op = "deltaw::train::read_sliced";
  const auto& md = f.metadata();
  auto meta = [&](const std::string& key) -> const std::string& {
    auto it = md.find(key);
    if (it == md.end()) throw format_error(op + ": metadata \"" + key + "\" is missing");
    return it->second;
  };
  auto number = [&](const std::string& key) {
    const std::string& v = meta(key);
    std::size_t used = 0;
    long long n = -1;
    try {
      n = std::stoll(v, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != v.size() || v.empty() || n < 0) throw format_error(op + ": metadata \"" + key + "\" = \"" + v + "\" is not a count");
    return index_t(n);
  };
  if (meta("format") != "deltaw.lora_prune.sliced")
    throw format_error(op + ": metadata format is \"" + meta("format") + "\"; expected \"deltaw.lora_prune.sliced\"");
  const index_t n = number("layers");
  std::vector<sliced_lora_linear<T>> out;
  for (index_t k = 0; k < n; ++k) {
    sliced_lora_linear<T> s;
    s.name = meta("layer." + std::to_string(k));
    const std::string who = op + ": layer '" + s.name + "'";
    s.out_features = number(s.name + ".out_features");
    s.in_features = number(s.name + ".in_features");
    {
      const std::string& v = meta(s.name + ".scale");
      std::size_t used = 0;
      try {
        s.scale = std::stod(v, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != v.size() || v.empty() || !std::isfinite(s.scale))
        throw format_error(who + ": scale \"" + v + "\" is not a finite number");
    }
    auto indices = [&](const std::string& name, index_t full) {
      const auto& t = f.at(name);
      if (t.dtype != io::st_dtype::I64 || t.shape.size() != 1)
        throw format_error(who + ": \"" + name + "\" must be a 1-D I64 tensor");
      const auto v = f.values<double>(name);
      std::vector<index_t> ix(v.begin(), v.end());
      for (std::size_t i = 0; i < ix.size(); ++i)
        if (ix[i] < 0 || ix[i] >= full || (i > 0 && ix[i] <= ix[i - 1]))
          throw format_error(who + ": \"" + name + "\" entry " + std::to_string(i) + " = " + std::to_string(ix[i]) +
                             " is out of order or outside [0, " + std::to_string(full) + ")");
      return ix;
    };
    s.kept_out = indices(s.name + ".kept_out", s.out_features);
    s.kept_in = indices(s.name + ".kept_in", s.in_features);
    const index_t ro = index_t(s.kept_out.size()), ci = index_t(s.kept_in.size());
    auto mat = [&](const std::string& name, index_t rows, index_t cols) {
      const auto& t = f.at(name);
      if (t.shape.size() != 2 || (rows >= 0 && index_t(t.shape[0]) != rows) || (cols >= 0 && index_t(t.shape[1]) != cols))
        throw format_error(who + ": \"" + name + "\" has shape " + io::detail::shape_string(t.shape) + "; expected [" +
                           (rows >= 0 ? std::to_string(rows) : std::string("r")) + ", " +
                           (cols >= 0 ? std::to_string(cols) : std::string("r")) + "]");
      const auto m = f.matrix<T>(name);
      dense<T> d(m.view.rows(), m.view.cols());
      for (index_t i = 0; i < d.rows(); ++i)
        for (index_t j = 0; j < d.cols(); ++j) d(i, j) = m.view(i, j);
      return d;
    };
    s.weight = mat(s.name + ".weight", ro, ci);
    s.lora_A = mat(s.name + ".lora_A.weight", -1, ci);
    s.lora_B = mat(s.name + ".lora_B.weight", ro, s.lora_A.rows());
    if (f.contains(s.name + ".bias")) {
      const auto& t = f.at(s.name + ".bias");
      if (t.shape.size() != 1 || index_t(t.shape[0]) != ro)
        throw format_error(who + ": \"" + s.name + ".bias\" has shape " + io::detail::shape_string(t.shape) +
                           "; expected [" + std::to_string(ro) + "]");
      const auto v = f.values<double>(s.name + ".bias");
      dense<T> b(1, ro);
      for (index_t i = 0; i < ro; ++i) b(0, i) = T(v[std::size_t(i)]);
      s.bias = std::move(b);
    }
    out.push_back(std::move(s));
  }
  return out;
}

template <class T>
std::vector<sliced_lora_linear<T>> load_sliced(const std::filesystem::path& path) {
  return read_sliced<T>(io::safetensors_file::open(path));
}

}  // namespace train
DELTAW_NAMESPACE_END
