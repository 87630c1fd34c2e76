// SPDX-License-Identifier: MIT
// GGUF (v2/v3) container reader and writer, and llama.cpp LoRA adapters on top of it.
//
// Container: "GGUF", u32 version, u64 tensor count, u64 KV count, typed KV pairs,
// tensor infos (name, n_dims ≤ 4, dims ne[] innermost first, ggml type, offset), padding
// to general.alignment (default 32), the data section. Every length, count, offset and
// size is checked against the bytes actually present; violations throw format_error.
//
// LoRA adapter (llama.cpp): general.type = "adapter", adapter.type = "lora",
// adapter.lora.alpha (f32), general.architecture; tensors "<base tensor>.lora_a" with
// numpy shape [r, in] (ne = [in, r]) and "<base tensor>.lora_b" [out, r] (ne = [r, out]).
// llama.cpp's scale is alpha / r, and 1 when alpha is 0 or absent.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "../core/precompiled.hpp"
#include "../core/dtype.hpp"
#include "../core/eigen.hpp"
#include "../core/view.hpp"
#include "../expr/low_rank.hpp"
#include "errors.hpp"
#include "file.hpp"
#include "safetensors.hpp"  // checked_mul, shape_string, little-endian check

DELTAW_NAMESPACE_BEGIN
namespace io {

enum class gguf_type : std::uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12
};

/// ggml tensor types deltaw converts; other known types are validated but not converted.
enum class ggml_type : std::uint32_t { F32 = 0, F16 = 1, Q8_0 = 8, I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, BF16 = 30 };

namespace detail {
struct ggml_type_traits {
  std::uint32_t id;
  const char* name;
  std::uint32_t block;  // elements per block
  std::uint32_t bytes;  // bytes per block
};
// Block geometry of the ggml types (as the gguf Python package's GGML_QUANT_SIZES).
inline constexpr ggml_type_traits ggml_types[] = {
    {0, "F32", 1, 4},        {1, "F16", 1, 2},       {2, "Q4_0", 32, 18},     {3, "Q4_1", 32, 20},
    {6, "Q5_0", 32, 22},     {7, "Q5_1", 32, 24},    {8, "Q8_0", 32, 34},     {9, "Q8_1", 32, 40},
    {10, "Q2_K", 256, 84},   {11, "Q3_K", 256, 110}, {12, "Q4_K", 256, 144},  {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210},  {15, "Q8_K", 256, 292}, {16, "IQ2_XXS", 256, 66}, {17, "IQ2_XS", 256, 74},
    {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50}, {20, "IQ4_NL", 32, 18},  {21, "IQ3_S", 256, 110},
    {22, "IQ2_S", 256, 82},  {23, "IQ4_XS", 256, 136}, {24, "I8", 1, 1},      {25, "I16", 1, 2},
    {26, "I32", 1, 4},       {27, "I64", 1, 8},      {28, "F64", 1, 8},       {29, "IQ1_M", 256, 56},
    {30, "BF16", 1, 2},      {34, "TQ1_0", 256, 54}, {35, "TQ2_0", 256, 66},  {39, "MXFP4", 32, 17}};
inline const ggml_type_traits* ggml_traits(std::uint32_t id) {
  for (const auto& t : ggml_types)
    if (t.id == id) return &t;
  return nullptr;
}
inline constexpr std::size_t gguf_max_dims = 4;         // GGML_MAX_DIMS
inline constexpr int gguf_max_array_depth = 4;          // nested arrays
}  // namespace detail

/// Bytes per element of a fixed-size GGUF value type (0 for STRING and ARRAY).
inline constexpr std::size_t gguf_scalar_size(gguf_type t) {
  switch (t) {
    case gguf_type::UINT8: case gguf_type::INT8: case gguf_type::BOOL: return 1;
    case gguf_type::UINT16: case gguf_type::INT16: return 2;
    case gguf_type::UINT32: case gguf_type::INT32: case gguf_type::FLOAT32: return 4;
    case gguf_type::UINT64: case gguf_type::INT64: case gguf_type::FLOAT64: return 8;
    default: return 0;
  }
}

struct gguf_value;

/// An array of fixed-size scalars kept as the file stores it (little-endian bytes): the
/// reader's form for every numeric / bool array, so that a KV array costs its own bytes
/// in memory (one gguf_value per element took 48 bytes: 48× the file for a u8 array).
struct gguf_packed_array {
  gguf_type type = gguf_type::UINT8;  ///< the element type (never STRING or ARRAY)
  std::vector<std::byte> bytes;
  std::size_t size() const { return gguf_scalar_size(type) ? bytes.size() / gguf_scalar_size(type) : 0; }
  /// Element i as a gguf_value (i < size()).
  gguf_value at(std::size_t i) const;
};

/// A typed KV value. Integers are widened (kept as the file's type in `type`). Arrays are
/// a std::vector<gguf_value> (strings, nested arrays, and arrays built by hand) or a
/// gguf_packed_array (numeric arrays read from a file); array_size() / element(i) read
/// either.
struct gguf_value {
  gguf_type type = gguf_type::UINT8;
  gguf_type array_type = gguf_type::UINT8;  ///< element type when type == ARRAY
  std::variant<std::uint64_t, std::int64_t, double, bool, std::string, std::vector<gguf_value>, gguf_packed_array> value;

  /// The number of elements of an array (0 for a non-array).
  std::size_t array_size() const {
    if (auto* v = std::get_if<std::vector<gguf_value>>(&value)) return v->size();
    if (auto* p = std::get_if<gguf_packed_array>(&value)) return p->size();
    return 0;
  }
  /// Element i of an array (i < array_size()).
  gguf_value element(std::size_t i) const {
    if (auto* p = std::get_if<gguf_packed_array>(&value)) return p->at(i);
    const auto* v = std::get_if<std::vector<gguf_value>>(&value);
    if (v == nullptr || i >= v->size()) throw argument_error("deltaw::io::gguf_value::element: not an array, or index out of range");
    return (*v)[i];
  }

  static gguf_value string(std::string s) { return {gguf_type::STRING, gguf_type::UINT8, std::move(s)}; }
  static gguf_value f32(float f) { return {gguf_type::FLOAT32, gguf_type::UINT8, double(f)}; }
  static gguf_value u32(std::uint32_t u) { return {gguf_type::UINT32, gguf_type::UINT8, std::uint64_t(u)}; }
  static gguf_value u64(std::uint64_t u) { return {gguf_type::UINT64, gguf_type::UINT8, u}; }
  static gguf_value i32(std::int32_t i) { return {gguf_type::INT32, gguf_type::UINT8, std::int64_t(i)}; }
  static gguf_value boolean(bool b) { return {gguf_type::BOOL, gguf_type::UINT8, b}; }

  const std::string* as_string() const { return std::get_if<std::string>(&value); }
  /// Any numeric value as a double.
  std::optional<double> as_number() const {
    if (auto* u = std::get_if<std::uint64_t>(&value)) return double(*u);
    if (auto* i = std::get_if<std::int64_t>(&value)) return double(*i);
    if (auto* d = std::get_if<double>(&value)) return *d;
    return std::nullopt;
  }
};

inline gguf_value gguf_packed_array::at(std::size_t i) const {
  const std::size_t w = gguf_scalar_size(type);
  if (w == 0 || i >= size()) throw argument_error("deltaw::io::gguf_packed_array::at: index out of range");
  const std::byte* p = bytes.data() + i * w;
  using detail::load_unaligned;
  gguf_value v;
  v.type = type;
  switch (type) {
    case gguf_type::UINT8: v.value = std::uint64_t(load_unaligned<std::uint8_t>(p)); break;
    case gguf_type::INT8: v.value = std::int64_t(load_unaligned<std::int8_t>(p)); break;
    case gguf_type::UINT16: v.value = std::uint64_t(load_unaligned<std::uint16_t>(p)); break;
    case gguf_type::INT16: v.value = std::int64_t(load_unaligned<std::int16_t>(p)); break;
    case gguf_type::UINT32: v.value = std::uint64_t(load_unaligned<std::uint32_t>(p)); break;
    case gguf_type::INT32: v.value = std::int64_t(load_unaligned<std::int32_t>(p)); break;
    case gguf_type::FLOAT32: v.value = double(load_unaligned<float>(p)); break;
    case gguf_type::BOOL: v.value = load_unaligned<std::uint8_t>(p) != 0; break;
    case gguf_type::UINT64: v.value = load_unaligned<std::uint64_t>(p); break;
    case gguf_type::INT64: v.value = load_unaligned<std::int64_t>(p); break;
    case gguf_type::FLOAT64: v.value = load_unaligned<double>(p); break;
    default: break;
  }
  return v;
}

struct gguf_tensor_info {
  std::string name;
  std::vector<std::uint64_t> ne;  ///< GGUF order: ne[0] is the innermost (contiguous) dimension
  std::uint32_t type = 0;
  std::uint64_t offset = 0;  ///< relative to the data section
  std::uint64_t nbytes = 0;
  /// numpy / PyTorch order: ne reversed.
  std::vector<std::uint64_t> shape() const { return {ne.rbegin(), ne.rend()}; }
  std::uint64_t element_count() const {
    std::uint64_t n = 1;
    for (auto d : ne) n *= d;  // validated when the file was opened
    return n;
  }
};

/// A validated GGUF file (or buffer). Copies share the bytes.
class gguf_file {
 public:
  static gguf_file open(const std::filesystem::path& path) {
    auto b = map_file(path);
    return parse(b.bytes, std::move(b.owner), path.string());
  }
  /// Validates an owned buffer (kept alive by the returned object and its views), so
  /// `parse(writer.serialize())` does not dangle.
  static gguf_file parse(std::vector<std::byte>&& bytes, const std::string& source = "<memory>") {
    auto owner = std::make_shared<const std::vector<std::byte>>(std::move(bytes));
    const std::span<const std::byte> s(owner->data(), owner->size());
    return parse(s, owner, source);
  }
  static gguf_file parse(std::span<const std::byte> bytes, std::shared_ptr<const void> owner = nullptr,
                         const std::string& source = "<memory>") {
    gguf_file f;
    f.bytes_ = bytes;
    f.owner_ = std::move(owner);
    f.source_ = source;
    f.read();
    return f;
  }

  std::uint32_t version() const { return version_; }
  std::uint64_t alignment() const { return alignment_; }
  const std::vector<std::pair<std::string, gguf_value>>& kv() const { return kv_; }
  const std::vector<gguf_tensor_info>& tensors() const { return tensors_; }

  const gguf_value* find_kv(std::string_view key) const {
    auto it = kv_index_.find(std::string(key));
    return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
  }
  /// A string KV, or nullopt when absent; format_error when present with another type.
  std::optional<std::string> get_string(std::string_view key) const {
    const auto* v = find_kv(key);
    if (!v) return std::nullopt;
    if (!v->as_string()) fail("key \"" + std::string(key) + "\" is not a string");
    return *v->as_string();
  }
  std::optional<double> get_number(std::string_view key) const {
    const auto* v = find_kv(key);
    if (!v) return std::nullopt;
    auto d = v->as_number();
    if (!d) fail("key \"" + std::string(key) + "\" is not a number");
    return d;
  }

  const gguf_tensor_info* find(std::string_view name) const {
    auto it = tensor_index_.find(std::string(name));
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
  }
  const gguf_tensor_info& at(std::string_view name) const {
    const auto* t = find(name);
    if (!t) fail("no tensor named \"" + std::string(name) + "\"");
    return *t;
  }
  std::span<const std::byte> data(const gguf_tensor_info& t) const {
    return bytes_.subspan(std::size_t(data_start_ + t.offset), std::size_t(t.nbytes));
  }

  /// All elements converted to double/float (row-major in numpy order). F32, F16, BF16,
  /// F64, I8–I64 and Q8_0 are converted; other types throw unsupported_error.
  template <class T = float>
  std::vector<T> values(std::string_view name) const {
    static_assert(std::is_floating_point_v<T>);
    const auto& t = at(name);
    const auto raw = data(t);
    const std::size_t n = std::size_t(t.element_count());
    std::vector<T> out(n);
    const std::byte* p = raw.data();
    using detail::load_unaligned;
    switch (t.type) {
      case 0: for (std::size_t i = 0; i < n; ++i) out[i] = T(load_unaligned<float>(p + 4 * i)); break;
      case 1: for (std::size_t i = 0; i < n; ++i) out[i] = T(fp16::to_float(load_unaligned<std::uint16_t>(p + 2 * i))); break;
      case 30: for (std::size_t i = 0; i < n; ++i) out[i] = T(float(bf16::from_bits(load_unaligned<std::uint16_t>(p + 2 * i)))); break;
      case 28: for (std::size_t i = 0; i < n; ++i) out[i] = T(load_unaligned<double>(p + 8 * i)); break;
      case 24: for (std::size_t i = 0; i < n; ++i) out[i] = T(load_unaligned<std::int8_t>(p + i)); break;
      case 25: for (std::size_t i = 0; i < n; ++i) out[i] = T(load_unaligned<std::int16_t>(p + 2 * i)); break;
      case 26: for (std::size_t i = 0; i < n; ++i) out[i] = T(load_unaligned<std::int32_t>(p + 4 * i)); break;
      case 27: for (std::size_t i = 0; i < n; ++i) out[i] = T(load_unaligned<std::int64_t>(p + 8 * i)); break;
      case 8:  // Q8_0: blocks of an fp16 scale d and 32 int8 q; x = d·q
        for (std::size_t b = 0; b < n / 32; ++b) {
          const std::byte* blk = p + 34 * b;
          const float d = fp16::to_float(load_unaligned<std::uint16_t>(blk));
          for (std::size_t k = 0; k < 32; ++k) out[32 * b + k] = T(d * float(load_unaligned<std::int8_t>(blk + 2 + k)));
        }
        break;
      default:
        throw unsupported_error("deltaw::io::gguf (" + source_ + "): tensor \"" + t.name + "\" has ggml type " +
                                detail::ggml_traits(t.type)->name + ", which deltaw does not convert");
    }
    return out;
  }

  /// A 2-D tensor as a matrix [ne[1], ne[0]] of T: zero-copy when the ggml type is T's
  /// (F32/F64/F16/BF16) and aligned, a converted copy otherwise.
  template <storage_type T>
  held_matrix<T> matrix(std::string_view name) const {
    const auto& t = at(name);
    if (t.ne.size() != 2)
      throw shape_error("deltaw::io::gguf (" + source_ + "): tensor \"" + t.name + "\" has shape " +
                        detail::shape_string(t.shape()) + "; a matrix needs 2 dimensions");
    const auto lim = std::uint64_t(std::numeric_limits<index_t>::max());
    if (t.ne[0] > lim || t.ne[1] > lim) fail("tensor \"" + t.name + "\" is too large to index");
    const index_t rows = index_t(t.ne[1]), cols = index_t(t.ne[0]);
    using U = std::remove_cv_t<T>;
    constexpr std::uint32_t own = std::is_same_v<U, float> ? 0 : std::is_same_v<U, double> ? 28 : std::is_same_v<U, fp16> ? 1 : 30;
    if (t.type == own && t.nbytes > 0) {
      const std::byte* p = data(t).data();
      if (reinterpret_cast<std::uintptr_t>(p) % alignof(U) == 0)
        return {matrix_view<const T>(reinterpret_cast<const U*>(p), rows, cols), owner_};
    }
    auto v = values<double>(name);
    auto buf = std::make_shared<std::vector<U>>(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) (*buf)[i] = detail::from_double<U>(v[i]);
    return {matrix_view<const T>(buf->data(), rows, cols), std::move(buf)};
  }

 private:
  [[noreturn]] void fail(const std::string& msg) const { throw format_error("deltaw::io::gguf (" + source_ + "): " + msg); }

  // Cursor over the bytes; every read checks the bounds first.
  std::size_t pos_ = 0;
  std::uint64_t remaining() const { return bytes_.size() - pos_; }
  void need(std::uint64_t n, const char* what) const {
    if (n > remaining())
      fail(std::string("truncated: ") + what + " needs " + std::to_string(n) + " bytes at offset " + std::to_string(pos_) +
           " but only " + std::to_string(remaining()) + " remain");
  }
  template <class I>
  I get(const char* what) {
    need(sizeof(I), what);
    I v = detail::load_unaligned<I>(bytes_.data() + pos_);
    pos_ += sizeof(I);
    return v;
  }
  std::string read_str(const char* what) {
    const auto n = get<std::uint64_t>(what);
    need(n, what);
    std::string s(reinterpret_cast<const char*>(bytes_.data() + pos_), std::size_t(n));
    pos_ += std::size_t(n);
    return s;
  }
  gguf_value get_value(std::uint32_t type, const std::string& key, int depth) {
    gguf_value v;
    v.type = gguf_type(type);
    switch (type) {
      case 0: v.value = std::uint64_t(get<std::uint8_t>("a u8 value")); break;
      case 1: v.value = std::int64_t(get<std::int8_t>("an i8 value")); break;
      case 2: v.value = std::uint64_t(get<std::uint16_t>("a u16 value")); break;
      case 3: v.value = std::int64_t(get<std::int16_t>("an i16 value")); break;
      case 4: v.value = std::uint64_t(get<std::uint32_t>("a u32 value")); break;
      case 5: v.value = std::int64_t(get<std::int32_t>("an i32 value")); break;
      case 6: v.value = double(get<float>("an f32 value")); break;
      case 7: v.value = get<std::uint8_t>("a bool value") != 0; break;
      case 8: v.value = read_str("a string value"); break;
      case 9: {
        if (depth >= detail::gguf_max_array_depth) fail("key \"" + key + "\": arrays nested too deeply");
        const auto et = get<std::uint32_t>("an array type");
        if (et > 12) fail("key \"" + key + "\": unknown array element type " + std::to_string(et));
        v.array_type = gguf_type(et);
        const auto n = get<std::uint64_t>("an array length");
        // Each element takes at least one byte (8 for strings, 12 for arrays): bound n before allocating.
        const std::size_t width = gguf_scalar_size(gguf_type(et));
        const std::uint64_t min_elem = et == 8 ? 8 : et == 9 ? 12 : width;
        if (n > remaining() / min_elem)
          fail("key \"" + key + "\": array of " + std::to_string(n) + " elements does not fit in the file");
        if (width != 0) {  // numbers and bools: the bytes as they are
          gguf_packed_array a;
          a.type = gguf_type(et);
          const auto* b = bytes_.data() + pos_;
          a.bytes.assign(b, b + std::size_t(n) * width);
          pos_ += std::size_t(n) * width;
          v.value = std::move(a);
          break;
        }
        std::vector<gguf_value> elems;
        elems.reserve(std::size_t(n));
        for (std::uint64_t i = 0; i < n; ++i) elems.push_back(get_value(et, key, depth + 1));
        v.value = std::move(elems);
        break;
      }
      case 10: v.value = get<std::uint64_t>("a u64 value"); break;
      case 11: v.value = get<std::int64_t>("an i64 value"); break;
      case 12: v.value = get<double>("an f64 value"); break;
      default: fail("key \"" + key + "\" has unknown value type " + std::to_string(type));
    }
    return v;
  }

  void read() {
    if (bytes_.size() < 24) fail("the file has " + std::to_string(bytes_.size()) + " bytes, fewer than a GGUF header");
    if (std::memcmp(bytes_.data(), "GGUF", 4) != 0) fail("bad magic (not a GGUF file)");
    pos_ = 4;
    version_ = get<std::uint32_t>("the version");
    if (version_ == 1) throw unsupported_error("deltaw::io::gguf (" + source_ + "): GGUF version 1 is not supported");
    if (version_ != 2 && version_ != 3) {
      if ((version_ & 0xFFFFu) == 0) fail("version " + std::to_string(version_) + " (a big-endian GGUF file?)");
      fail("unknown GGUF version " + std::to_string(version_));
    }
    const auto n_tensors = get<std::uint64_t>("the tensor count");
    const auto n_kv = get<std::uint64_t>("the KV count");
    // A KV takes ≥ 13 bytes (key length, type, 1-byte value); a tensor info ≥ 24.
    if (n_kv > remaining() / 13) fail("KV count " + std::to_string(n_kv) + " does not fit in the file");
    if (n_tensors > remaining() / 24) fail("tensor count " + std::to_string(n_tensors) + " does not fit in the file");

    kv_.reserve(std::size_t(n_kv));
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      std::string key = read_str("a key");
      const auto type = get<std::uint32_t>("a value type");
      gguf_value v = get_value(type, key, 0);
      if (!kv_index_.emplace(key, kv_.size()).second) fail("duplicate key \"" + key + "\"");
      kv_.emplace_back(std::move(key), std::move(v));
    }
    if (const auto* a = find_kv("general.alignment")) {
      if (a->type != gguf_type::UINT32) fail("general.alignment must be a u32");
      alignment_ = std::get<std::uint64_t>(a->value);
      if (alignment_ == 0 || (alignment_ & (alignment_ - 1)) != 0)
        fail("general.alignment " + std::to_string(alignment_) + " is not a power of two");
    }

    tensors_.reserve(std::size_t(n_tensors));
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      gguf_tensor_info t;
      t.name = read_str("a tensor name");
      const auto nd = get<std::uint32_t>("a dimension count");
      if (nd > detail::gguf_max_dims)
        fail("tensor \"" + t.name + "\" has " + std::to_string(nd) + " dimensions; at most 4 are allowed");
      // As llama.cpp: every dimension below 2^63 and the element count representable in
      // an int64, here with zero dimensions left out of the product (a zero-byte tensor
      // [0, 2^62, 2^62] would otherwise pass and overflow the products taken later).
      std::uint64_t count = 1, nonzero = 1;
      constexpr auto i64_max = std::uint64_t(std::numeric_limits<std::int64_t>::max());
      for (std::uint32_t d = 0; d < nd; ++d) {
        t.ne.push_back(get<std::uint64_t>("a dimension"));
        const auto n = t.ne.back();
        if (n > i64_max) fail("tensor \"" + t.name + "\" has dimension " + std::to_string(n) + ", not below 2^63");
        auto c = detail::checked_mul(nonzero, n == 0 ? 1 : n);
        if (!c || *c > i64_max) fail("tensor \"" + t.name + "\" element count overflows");
        nonzero = *c;
        count *= n;
      }
      t.type = get<std::uint32_t>("a tensor type");
      const auto* tr = detail::ggml_traits(t.type);
      if (!tr) fail("tensor \"" + t.name + "\" has unknown ggml type " + std::to_string(t.type));
      if (!t.ne.empty() && t.ne[0] % tr->block != 0)
        fail("tensor \"" + t.name + "\": row length " + std::to_string(t.ne[0]) + " is not a multiple of the " +
             tr->name + " block size " + std::to_string(tr->block));
      if (t.ne.empty() && tr->block != 1) fail("tensor \"" + t.name + "\": a scalar cannot be block-quantized");
      auto nb = detail::checked_mul(count / tr->block, tr->bytes);
      if (!nb) fail("tensor \"" + t.name + "\" byte size overflows");
      t.nbytes = *nb;
      t.offset = get<std::uint64_t>("a tensor offset");
      if (t.offset % alignment_ != 0)
        fail("tensor \"" + t.name + "\" offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
             std::to_string(alignment_));
      if (!tensor_index_.emplace(t.name, tensors_.size()).second) fail("duplicate tensor name \"" + t.name + "\"");
      tensors_.push_back(std::move(t));
    }

    // The data section starts at the next multiple of the alignment.
    const std::uint64_t pad = (alignment_ - pos_ % alignment_) % alignment_;
    data_start_ = pos_ + pad;
    if (tensors_.empty()) return;
    if (data_start_ > bytes_.size()) fail("the data section starts past the end of the file");
    const std::uint64_t data_size = bytes_.size() - data_start_;
    std::vector<const gguf_tensor_info*> order;
    for (const auto& t : tensors_) {
      if (t.offset > data_size || t.nbytes > data_size - t.offset)
        fail("tensor \"" + t.name + "\" [" + std::to_string(t.offset) + ", +" + std::to_string(t.nbytes) +
             ") runs past the end of the data section (" + std::to_string(data_size) + " bytes)");
      order.push_back(&t);
    }
    std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
    for (std::size_t i = 1; i < order.size(); ++i)
      if (order[i - 1]->offset + order[i - 1]->nbytes > order[i]->offset)
        fail("tensors \"" + order[i - 1]->name + "\" and \"" + order[i]->name + "\" overlap");
  }

  std::span<const std::byte> bytes_;
  std::shared_ptr<const void> owner_;
  std::string source_;
  std::uint32_t version_ = 0;
  std::uint64_t alignment_ = 32;
  std::uint64_t data_start_ = 0;
  std::vector<std::pair<std::string, gguf_value>> kv_;
  std::unordered_map<std::string, std::size_t> kv_index_;
  std::vector<gguf_tensor_info> tensors_;
  std::unordered_map<std::string, std::size_t> tensor_index_;
};

/// Builds a GGUF v3 file: KV pairs in insertion order, then tensors, each padded to the
/// alignment.
class gguf_writer {
 public:
  explicit gguf_writer(std::uint32_t alignment = 32) : alignment_(alignment) {
    if (alignment == 0 || (alignment & (alignment - 1)) != 0)
      throw argument_error("deltaw::io::gguf_writer: alignment must be a power of two");
    if (alignment != 32) add_kv("general.alignment", gguf_value::u32(alignment));
  }
  void add_kv(std::string key, gguf_value v) {
    for (const auto& [k, _] : kv_)
      if (k == key) throw argument_error("deltaw::io::gguf_writer: key \"" + key + "\" added twice");
    kv_.emplace_back(std::move(key), std::move(v));
  }
  /// A matrix (numpy shape [rows, cols], so ne = [cols, rows]) in its own type.
  template <class T, class D>
  void add_tensor(std::string name, const matrix_view<T, D>& m) {
    static_assert(std::is_same_v<D, device::cpu>, "deltaw::io::gguf_writer: copy device data to the host first");
    using U = std::remove_const_t<T>;
    constexpr std::uint32_t type = std::is_same_v<U, float> ? 0 : std::is_same_v<U, double> ? 28 : std::is_same_v<U, fp16> ? 1 : 30;
    std::vector<std::byte> b(std::size_t(m.size()) * sizeof(U));
    std::size_t k = 0;
    for (index_t i = 0; i < m.rows(); ++i)
      for (index_t j = 0; j < m.cols(); ++j, ++k) std::memcpy(b.data() + k * sizeof(U), &m(i, j), sizeof(U));
    for (const auto& t : tensors_)
      if (t.name == name) throw argument_error("deltaw::io::gguf_writer: tensor \"" + name + "\" added twice");
    tensors_.push_back({std::move(name), {std::uint64_t(m.cols()), std::uint64_t(m.rows())}, type, std::move(b)});
  }

  std::vector<std::byte> serialize() const {
    std::vector<std::byte> out;
    auto put = [&](const void* p, std::size_t n) {
      const auto* b = static_cast<const std::byte*>(p);
      out.insert(out.end(), b, b + n);
    };
    auto put_u32 = [&](std::uint32_t v) { put(&v, 4); };
    auto put_u64 = [&](std::uint64_t v) { put(&v, 8); };
    auto put_str = [&](const std::string& s) {
      put_u64(s.size());
      put(s.data(), s.size());
    };
    put("GGUF", 4);
    put_u32(3);
    put_u64(tensors_.size());
    put_u64(kv_.size());
    for (const auto& [k, v] : kv_) {
      put_str(k);
      put_u32(std::uint32_t(v.type));
      put_value(out, v);
    }
    std::uint64_t off = 0;
    for (const auto& t : tensors_) {
      put_str(t.name);
      put_u32(std::uint32_t(t.ne.size()));
      for (auto d : t.ne) put_u64(d);
      put_u32(t.type);
      put_u64(off);
      off += padded(t.bytes.size());
    }
    out.resize(padded(out.size()));
    for (const auto& t : tensors_) {
      put(t.bytes.data(), t.bytes.size());
      out.resize(padded(out.size()));
    }
    return out;
  }
  void write(const std::filesystem::path& path) const {
    const auto b = serialize();
    write_file(path, b);
  }

 private:
  std::size_t padded(std::size_t n) const { return (n + alignment_ - 1) / alignment_ * alignment_; }
  static void put_value(std::vector<std::byte>& out, const gguf_value& v) {
    auto put = [&](const void* p, std::size_t n) {
      const auto* b = static_cast<const std::byte*>(p);
      out.insert(out.end(), b, b + n);
    };
    auto num = [&](auto x) { put(&x, sizeof x); };
    switch (v.type) {
      case gguf_type::UINT8: num(std::uint8_t(std::get<std::uint64_t>(v.value))); break;
      case gguf_type::INT8: num(std::int8_t(std::get<std::int64_t>(v.value))); break;
      case gguf_type::UINT16: num(std::uint16_t(std::get<std::uint64_t>(v.value))); break;
      case gguf_type::INT16: num(std::int16_t(std::get<std::int64_t>(v.value))); break;
      case gguf_type::UINT32: num(std::uint32_t(std::get<std::uint64_t>(v.value))); break;
      case gguf_type::INT32: num(std::int32_t(std::get<std::int64_t>(v.value))); break;
      case gguf_type::FLOAT32: num(float(std::get<double>(v.value))); break;
      case gguf_type::BOOL: num(std::uint8_t(std::get<bool>(v.value) ? 1 : 0)); break;
      case gguf_type::STRING: {
        const auto& s = std::get<std::string>(v.value);
        num(std::uint64_t(s.size()));
        put(s.data(), s.size());
        break;
      }
      case gguf_type::ARRAY: {
        if (const auto* packed = std::get_if<gguf_packed_array>(&v.value)) {  // as read from a file
          num(std::uint32_t(packed->type));
          num(std::uint64_t(packed->size()));
          put(packed->bytes.data(), packed->size() * gguf_scalar_size(packed->type));
          break;
        }
        const auto& a = std::get<std::vector<gguf_value>>(v.value);
        num(std::uint32_t(v.array_type));
        num(std::uint64_t(a.size()));
        for (const auto& e : a) put_value(out, e);
        break;
      }
      case gguf_type::UINT64: num(std::get<std::uint64_t>(v.value)); break;
      case gguf_type::INT64: num(std::get<std::int64_t>(v.value)); break;
      case gguf_type::FLOAT64: num(std::get<double>(v.value)); break;
    }
  }
  struct tensor {
    std::string name;
    std::vector<std::uint64_t> ne;
    std::uint32_t type;
    std::vector<std::byte> bytes;
  };
  std::uint64_t alignment_;
  std::vector<std::pair<std::string, gguf_value>> kv_;
  std::vector<tensor> tensors_;
};

/// A llama.cpp LoRA adapter: one (A, B) pair per base tensor, one alpha for all.
///
/// B's rows are in the Hugging Face / PEFT order of the module: for the architectures whose
/// attn_q / attn_k rows llama.cpp's converter reorders (gguf_lora_permutes_qk), read_gguf_lora
/// undoes that reordering, unless read with gguf_lora_options::permute_qk = false, which keeps
/// the rows as stored (the order of the GGUF base tensor).
struct gguf_lora_adapter {
  struct pair {
    std::string base;      ///< base tensor name, e.g. "blk.0.attn_q.weight"
    held_matrix<float> A;  ///< [r, in]
    held_matrix<float> B;  ///< [out, r]
    index_t rank() const { return A.view.rows(); }
  };
  std::string architecture;
  float alpha = 0;  ///< 0: absent (llama.cpp then uses scale 1)
  std::vector<pair> tensors;  ///< sorted by base name

  const pair* find(std::string_view base) const {
    for (const auto& p : tensors)
      if (p.base == base) return &p;
    return nullptr;
  }
  /// llama.cpp's scale for a pair: alpha / r, or 1 when alpha is 0.
  double scale(const pair& p) const { return alpha != 0 ? double(alpha) / double(p.rank()) : 1.0; }
  /// ΔW [out, in] = scale·B·A for the base tensor `base` (argument_error if absent).
  low_rank<float> update(std::string_view base) const {
    const auto* p = find(base);
    if (!p) throw argument_error("deltaw::io::gguf_lora_adapter::update: no LoRA for \"" + std::string(base) + "\"");
    return low_rank<float>(p->B, p->A, scale(*p));
  }
};

/// Whether llama.cpp's Hugging Face → GGUF converter reorders the rows of attn_q and attn_k
/// for `architecture` (a GGUF general.architecture), and so its LoRA converter the rows of
/// their lora_b. Per head of D rows, Hugging Face's rotate-half order (row s·D/2 + i, s ∈ {0, 1})
/// becomes interleaved pairs (row 2i + s); attn_k uses the key/value head count. The list is
/// the converter's model classes that apply that permutation to q_proj / k_proj (llama.cpp as
/// vendored by llama-cpp-python 0.3.36); Llama 4, Apertus, Mistral-format checkpoints and the
/// Qwen, Gemma, Phi … families keep Hugging Face's order.
inline bool gguf_lora_permutes_qk(std::string_view architecture) {
  static constexpr std::string_view archs[] = {
      "llama",  "arcee",       "llama-embed", "smollm3",   "nanbeige",       "granite", "granite_swa", "granitemoe",
      "granitehybrid", "nemotron_h", "nemotron_h_moe", "arctic", "baichuan", "bailingmoe", "chameleon", "deci",
      "deepseek", "internlm2", "llada",       "minicpm",   "olmo",           "xverse"};
  return std::find(std::begin(archs), std::end(archs), architecture) != std::end(archs);
}

/// Options of read_gguf_lora and write_gguf_lora (an aggregate: `{.head_count = {32},
/// .head_count_kv = {8}}`).
struct gguf_lora_options {
  /// The base model's architecture. Non-empty: the adapter's general.architecture must equal it
  /// (read), or the architecture written must (write); llama.cpp refuses a mismatch.
  std::string architecture{};
  /// Attention heads of the base model (llama.cpp's <arch>.attention.head_count): one value
  /// for every layer, or one per layer. Needed for attn_q / attn_k of the architectures
  /// gguf_lora_permutes_qk names.
  std::vector<std::int64_t> head_count{};
  /// Key/value heads (<arch>.attention.head_count_kv), the same way; empty: head_count.
  std::vector<std::int64_t> head_count_kv{};
  /// Reorder the rows of attn_q / attn_k's B between PEFT's order (in memory) and llama.cpp's
  /// (in the file): nullopt decides by gguf_lora_permutes_qk(architecture); false keeps the
  /// rows as they are; true reorders whatever the architecture.
  std::optional<bool> permute_qk{};
  /// general.name to write (optional).
  std::string name{};

  /// The architecture and head counts of a base model's GGUF (general.architecture,
  /// <arch>.attention.head_count and head_count_kv, numbers or per-layer arrays).
  static gguf_lora_options from_model(const gguf_file& base) {
    const std::string where = "deltaw::io::gguf_lora_options::from_model: ";
    gguf_lora_options o;
    auto arch = base.get_string("general.architecture");
    if (!arch) throw format_error(where + "general.architecture is missing");
    o.architecture = *arch;
    auto counts = [&](const std::string& key) {
      std::vector<std::int64_t> out;
      const auto* v = base.find_kv(key);
      if (!v) return out;
      auto one = [&](const gguf_value& e) {
        const auto d = e.as_number();
        if (!d || !(*d >= 0) || *d > 1e9 || *d != std::floor(*d))
          throw format_error(where + "\"" + key + "\" must be a non-negative integer or an array of them");
        out.push_back(std::int64_t(*d));
      };
      if (v->type == gguf_type::ARRAY) {
        for (std::size_t i = 0, n = v->array_size(); i < n; ++i) one(v->element(i));
      } else {
        one(*v);
      }
      return out;
    };
    o.head_count = counts(o.architecture + ".attention.head_count");
    o.head_count_kv = counts(o.architecture + ".attention.head_count_kv");
    return o;
  }
};

namespace detail {
/// "blk.<layer>.attn_q.weight" / "blk.<layer>.attn_k.weight": the layer and whether it is k.
struct gguf_qk_tensor {
  std::size_t layer;
  bool is_k;
};
inline std::optional<gguf_qk_tensor> gguf_qk_of(std::string_view base) {
  constexpr std::string_view pre = "blk.";
  if (!base.starts_with(pre)) return std::nullopt;
  base.remove_prefix(pre.size());
  const auto dot = base.find('.');
  if (dot == 0 || dot == std::string_view::npos || dot > 9) return std::nullopt;
  const auto digits = base.substr(0, dot);
  if (digits.find_first_not_of("0123456789") != std::string_view::npos) return std::nullopt;
  const auto rest = base.substr(dot);
  if (rest != ".attn_q.weight" && rest != ".attn_k.weight") return std::nullopt;
  std::size_t layer = 0;
  for (char c : digits) layer = layer * 10 + std::size_t(c - '0');
  return gguf_qk_tensor{layer, rest == ".attn_k.weight"};
}

/// The head count that reorders `base`'s rows, or 0 when they stay as they are.
/// argument_error when it is needed and the options lack it.
inline index_t gguf_qk_heads(const gguf_lora_options& o, const std::string& architecture, const std::string& base,
                             const std::string& where) {
  const bool permute = o.permute_qk ? *o.permute_qk : gguf_lora_permutes_qk(architecture);
  if (!permute) return 0;
  const auto qk = gguf_qk_of(base);
  if (!qk) return 0;
  const bool use_kv = qk->is_k && !o.head_count_kv.empty();
  const auto& counts = use_kv ? o.head_count_kv : o.head_count;
  const char* key = use_kv ? "head_count_kv" : "head_count";
  if (counts.empty())
    throw argument_error(where + "\"" + base + "\": llama.cpp stores the rows of attn_q / attn_k of \"" + architecture +
                         "\" reordered for its rotary embedding, which needs the attention head counts: set "
                         "gguf_lora_options::head_count (and head_count_kv), e.g. with gguf_lora_options::from_model(base "
                         "model GGUF), or permute_qk = false to keep the rows as they are");
  if (counts.size() != 1 && qk->layer >= counts.size())
    throw argument_error(where + "\"" + base + "\": layer " + std::to_string(qk->layer) + " but " + key + " has " +
                         std::to_string(counts.size()) + " per-layer values");
  const auto n = counts.size() == 1 ? counts[0] : counts[qk->layer];
  if (n <= 0)
    throw argument_error(where + "\"" + base + "\": " + key + " is " + std::to_string(n) + " for this layer");
  return index_t(n);
}

/// Rows of `src` reordered for `heads` heads: to_gguf maps Hugging Face's row h·D + s·D/2 + i
/// to h·D + 2i + s (llama.cpp's converter), !to_gguf back.
inline dense<float> gguf_permute_qk_rows(const matrix_view<const float>& src, index_t heads, bool to_gguf,
                                         const std::string& what) {
  const index_t rows = src.rows();
  if (heads <= 0 || rows % heads != 0 || (rows / heads) % 2 != 0)
    throw argument_error(what + ": " + std::to_string(rows) + " rows do not split into " + std::to_string(heads) +
                         " heads of an even size (the rotary reordering needs that)");
  const index_t D = rows / heads, half = D / 2;
  dense<float> out(rows, src.cols());
  for (index_t h = 0; h < heads; ++h)
    for (index_t i = 0; i < half; ++i)
      for (index_t s = 0; s < 2; ++s) {
        const index_t hf = h * D + s * half + i, gg = h * D + 2 * i + s;
        const index_t from = to_gguf ? hf : gg, to = to_gguf ? gg : hf;
        for (index_t j = 0; j < src.cols(); ++j) out(to, j) = src(from, j);
      }
  return out;
}

inline void gguf_check_architecture(const gguf_lora_options& o, const std::string& architecture, const std::string& where) {
  if (!o.architecture.empty() && o.architecture != architecture)
    throw format_error(where + "the adapter is for \"" + architecture + "\" but the model is \"" + o.architecture + "\"");
}
}  // namespace detail

/// Reads a llama.cpp LoRA adapter; B in PEFT's row order (see gguf_lora_adapter).
inline gguf_lora_adapter read_gguf_lora(const gguf_file& f, const gguf_lora_options& options,
                                        const std::string& source = "<gguf>") {
  const auto where = "deltaw::io::read_gguf_lora (" + source + "): ";
  auto gtype = f.get_string("general.type");
  if (!gtype || *gtype != "adapter")
    throw format_error(where + "general.type is " + (gtype ? "\"" + *gtype + "\"" : std::string("missing")) +
                       ", not \"adapter\"");
  auto atype = f.get_string("adapter.type");
  if (!atype) throw format_error(where + "adapter.type is missing");
  if (*atype != "lora") throw unsupported_error(where + "adapter.type \"" + *atype + "\" is not supported (only \"lora\")");
  gguf_lora_adapter a;
  auto arch = f.get_string("general.architecture");
  if (!arch) throw format_error(where + "general.architecture is missing");
  a.architecture = *arch;
  detail::gguf_check_architecture(options, a.architecture, where);
  if (auto al = f.get_number("adapter.lora.alpha")) {
    if (!std::isfinite(*al)) throw non_finite_error(where + "adapter.lora.alpha is not finite");
    if (!std::isfinite(float(*al)))
      throw format_error(where + "adapter.lora.alpha = " + std::to_string(*al) + " does not fit a float (llama.cpp reads it as f32)");
    a.alpha = float(*al);
  }
  std::map<std::string, std::pair<const gguf_tensor_info*, const gguf_tensor_info*>> pairs;
  for (const auto& t : f.tensors()) {
    std::string_view n = t.name;
    if (n.ends_with(".lora_a") && n.size() > 7) pairs[std::string(n.substr(0, n.size() - 7))].first = &t;
    else if (n.ends_with(".lora_b") && n.size() > 7) pairs[std::string(n.substr(0, n.size() - 7))].second = &t;
    else throw format_error(where + "tensor \"" + t.name + "\" is neither a .lora_a nor a .lora_b");
  }
  for (const auto& [base, ab] : pairs) {
    if (!ab.first || !ab.second)
      throw format_error(where + "\"" + base + "\" lacks its " + (ab.first ? ".lora_b" : ".lora_a") + " tensor");
    const auto sa = ab.first->shape(), sb = ab.second->shape();
    if (sa.size() != 2 || sb.size() != 2 || sa[0] != sb[1] || sa[0] == 0)
      throw format_error(where + "\"" + base + "\": lora_a " + detail::shape_string(sa) + " must be [r, in] and lora_b " +
                         detail::shape_string(sb) + " [out, r] with r ≥ 1");
    auto B = f.matrix<float>(ab.second->name);
    if (const index_t heads = detail::gguf_qk_heads(options, a.architecture, base, where)) {
      auto hf = std::make_shared<dense<float>>(
          detail::gguf_permute_qk_rows(B.view, heads, false, where + "\"" + base + ".lora_b\""));
      B = held_matrix<float>{matrix_view<const float>(hf->data(), hf->rows(), hf->cols()), hf};
    }
    a.tensors.push_back({base, f.matrix<float>(ab.first->name), std::move(B)});
  }
  return a;
}
/// With `architecture` non-empty, the file's general.architecture must equal it.
inline gguf_lora_adapter read_gguf_lora(const gguf_file& f, const std::string& architecture = "",
                                        const std::string& source = "<gguf>") {
  gguf_lora_options o;
  o.architecture = architecture;
  return read_gguf_lora(f, o, source);
}
inline gguf_lora_adapter read_gguf_lora(const std::filesystem::path& path, const gguf_lora_options& options) {
  return read_gguf_lora(gguf_file::open(path), options, path.string());
}
#if DELTAW_DEFINE_PRECOMPILED
DELTAW_PRECOMPILED_INLINE gguf_lora_adapter read_gguf_lora(const std::filesystem::path& path, const std::string& architecture = "") {
  return read_gguf_lora(gguf_file::open(path), architecture, path.string());
}
#else
gguf_lora_adapter read_gguf_lora(const std::filesystem::path& path, const std::string& architecture = "");
#endif

/// One update for write_gguf_lora: the GGUF base tensor name and a CPU low_rank of any
/// element type (float is shared, other types are converted to float).
struct gguf_lora_update {
  std::string base;
  low_rank<float> update;

  template <class T, class D>
  gguf_lora_update(std::string base_name, const low_rank<T, D>& u) : base(std::move(base_name)), update(to_float(u)) {}

 private:
  template <class T, class D>
  static low_rank<float> to_float(const low_rank<T, D>& u) {
    static_assert(std::is_same_v<D, device::cpu>, "deltaw::io::write_gguf_lora: copy device data to the host first");
    if constexpr (std::is_same_v<T, float>) {
      return u;
    } else {
      auto held = [](const matrix_view<const T>& m) {
        auto d = std::make_shared<dense<float>>(m.rows(), m.cols());
        for (index_t i = 0; i < m.rows(); ++i)
          for (index_t j = 0; j < m.cols(); ++j) (*d)(i, j) = convert<float>(m(i, j));
        return held_matrix<float>{matrix_view<const float>(d->data(), d->rows(), d->cols()), d};
      };
      return low_rank<float>(held(u.B()), held(u.A()), u.scale());
    }
  }
};

/// Writes LoRA updates as a llama.cpp adapter, e.g.
///   write_gguf_lora("out.gguf", "llama", {{"blk.0.attn_q.weight", q}, {"blk.0.attn_v.weight", v}},
///                   gguf_lora_options::from_model(gguf_file::open("base.gguf")));
/// Each B is taken in PEFT's row order; for the architectures of gguf_lora_permutes_qk the
/// rows of attn_q / attn_k are reordered as llama.cpp's converter reorders the base model's,
/// which needs the head counts (argument_error without them). GGUF has one alpha for all
/// tensors and llama.cpp scales by alpha/r; alpha is taken as s·r of the first update, and
/// where another update's s differs from alpha/r its B is stored pre-multiplied by
/// s·r/alpha, so every ΔW is reproduced exactly. An empty list is an argument_error.
inline void write_gguf_lora(const std::filesystem::path& path, const std::string& architecture,
                            const std::vector<gguf_lora_update>& updates, const gguf_lora_options& options = {}) {
  const std::string where = "deltaw::io::write_gguf_lora (" + path.string() + "): ";
  if (updates.empty()) throw argument_error(where + "no updates to write (llama.cpp needs at least one LoRA pair)");
  if (architecture.empty()) throw argument_error(where + "the architecture is empty (llama.cpp matches it to the model's)");
  if (!options.architecture.empty() && options.architecture != architecture)
    throw argument_error(where + "writing for \"" + architecture + "\" but the options are for \"" +
                         options.architecture + "\"");
  gguf_writer w;
  w.add_kv("general.architecture", gguf_value::string(architecture));
  w.add_kv("general.type", gguf_value::string("adapter"));
  if (!options.name.empty()) w.add_kv("general.name", gguf_value::string(options.name));
  w.add_kv("adapter.type", gguf_value::string("lora"));
  const auto& first = updates.front().update;
  const float alpha = float(first.scale() * double(first.rank()));
  w.add_kv("adapter.lora.alpha", gguf_value::f32(alpha));
  for (const auto& [base, u] : updates) {
    const double implied = alpha != 0 ? double(alpha) / double(u.rank()) : 1.0;
    const double fold = u.scale() / implied;
    const auto& A = u.A();
    const auto& B = u.B();
    dense<float> a(A.rows(), A.cols()), b(B.rows(), B.cols());
    for (index_t i = 0; i < A.rows(); ++i)
      for (index_t j = 0; j < A.cols(); ++j) a(i, j) = A(i, j);
    for (index_t i = 0; i < B.rows(); ++i)
      for (index_t j = 0; j < B.cols(); ++j) b(i, j) = float(double(B(i, j)) * fold);
    if (const index_t heads = detail::gguf_qk_heads(options, architecture, base, where))
      b = detail::gguf_permute_qk_rows(matrix_view<const float>(b.data(), b.rows(), b.cols()), heads, true,
                                       where + "\"" + base + "\"");
    w.add_tensor(base + ".lora_a", matrix_view<const float>(a.data(), a.rows(), a.cols()));
    w.add_tensor(base + ".lora_b", matrix_view<const float>(b.data(), b.rows(), b.cols()));
  }
  w.write(path);
}
/// The same from (name, low_rank<T>) pairs.
template <class T, class D>
void write_gguf_lora(const std::filesystem::path& path, const std::string& architecture,
                     const std::vector<std::pair<std::string, low_rank<T, D>>>& updates,
                     const gguf_lora_options& options = {}) {
  std::vector<gguf_lora_update> u;
  u.reserve(updates.size());
  for (const auto& [base, lr] : updates) u.emplace_back(base, lr);
  write_gguf_lora(path, architecture, u, options);
}

/// GGUF base tensor name for a Hugging Face Llama-family module (the names llama.cpp's
/// converter uses), e.g. "model.layers.3.self_attn.q_proj" → "blk.3.attn_q.weight".
/// Returns nullopt for modules outside the table.
inline std::optional<std::string> llama_gguf_tensor_name(std::string_view name) {
  if (name.ends_with(".weight")) name.remove_suffix(7);
  static const std::pair<std::string_view, std::string_view> table[] = {
      {"self_attn.q_proj", "attn_q"},  {"self_attn.k_proj", "attn_k"}, {"self_attn.v_proj", "attn_v"},
      {"self_attn.o_proj", "attn_output"}, {"mlp.gate_proj", "ffn_gate"}, {"mlp.up_proj", "ffn_up"},
      {"mlp.down_proj", "ffn_down"}};
  constexpr std::string_view pre = "model.layers.";
  if (name == "lm_head") return "output.weight";
  if (!name.starts_with(pre)) return std::nullopt;
  name.remove_prefix(pre.size());
  const auto dot = name.find('.');
  if (dot == std::string_view::npos || dot == 0) return std::nullopt;
  const auto layer = name.substr(0, dot);
  if (layer.find_first_not_of("0123456789") != std::string_view::npos) return std::nullopt;
  const auto rest = name.substr(dot + 1);
  for (const auto& [hf, gg] : table)
    if (rest == hf) return "blk." + std::string(layer) + "." + std::string(gg) + ".weight";
  return std::nullopt;
}

}  // namespace io
DELTAW_NAMESPACE_END
