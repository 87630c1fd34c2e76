// SPDX-License-Identifier: MIT
// safetensors: reader (mmap, zero-copy views when aligned) and writer.
//
// Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
// {name: {dtype, shape, data_offsets: [begin, end)}, "__metadata__": {str: str}}, then
// the data (row-major, little-endian). The reader performs every check of the reference
// implementation (see docs/formats.md); any violation throws deltaw::format_error.
#pragma once

#include <algorithm>
#include <bit>
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
#include <unordered_set>
#include <utility>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/eigen.hpp"
#include "../core/view.hpp"
#include "errors.hpp"
#include "file.hpp"
#include "json.hpp"

DELTAW_NAMESPACE_BEGIN
namespace io {

static_assert(std::endian::native == std::endian::little,
              "deltaw::io: the readers and writers assume a little-endian host (as safetensors and GGUF files are)");

/// The element types of safetensors.
enum class st_dtype : std::uint8_t { BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, F8_E4M3, F8_E5M2 };

inline constexpr std::size_t st_dtype_size(st_dtype d) {
  switch (d) {
    case st_dtype::BOOL:
    case st_dtype::U8:
    case st_dtype::I8:
    case st_dtype::F8_E4M3:
    case st_dtype::F8_E5M2:
      return 1;
    case st_dtype::I16:
    case st_dtype::U16:
    case st_dtype::F16:
    case st_dtype::BF16:
      return 2;
    case st_dtype::I32:
    case st_dtype::U32:
    case st_dtype::F32:
      return 4;
    case st_dtype::F64:
    case st_dtype::I64:
    case st_dtype::U64:
      return 8;
  }
  return 0;
}

inline constexpr const char* st_dtype_name(st_dtype d) {
  switch (d) {
    case st_dtype::BOOL: return "BOOL";
    case st_dtype::U8: return "U8";
    case st_dtype::I8: return "I8";
    case st_dtype::I16: return "I16";
    case st_dtype::U16: return "U16";
    case st_dtype::F16: return "F16";
    case st_dtype::BF16: return "BF16";
    case st_dtype::I32: return "I32";
    case st_dtype::U32: return "U32";
    case st_dtype::F32: return "F32";
    case st_dtype::F64: return "F64";
    case st_dtype::I64: return "I64";
    case st_dtype::U64: return "U64";
    case st_dtype::F8_E4M3: return "F8_E4M3";
    case st_dtype::F8_E5M2: return "F8_E5M2";
  }
  return "?";
}

inline std::optional<st_dtype> parse_st_dtype(std::string_view s) {
  for (int i = 0; i <= int(st_dtype::F8_E5M2); ++i)
    if (s == st_dtype_name(st_dtype(i))) return st_dtype(i);
  return std::nullopt;
}

/// The safetensors dtype that stores T.
template <storage_type T>
constexpr st_dtype st_dtype_of() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>) return st_dtype::F32;
  else if constexpr (std::is_same_v<U, double>) return st_dtype::F64;
  else if constexpr (std::is_same_v<U, bf16>) return st_dtype::BF16;
  else return st_dtype::F16;
}

namespace detail {

/// float8 e4m3fn (bias 7, no infinities, S.1111.111 is NaN; max 448).
inline float f8_e4m3_to_float(std::uint8_t b) {
  const bool neg = (b & 0x80u) != 0;
  const unsigned e = (b >> 3) & 0xFu, m = b & 0x7u;
  float v;
  if (e == 0xF && m == 0x7) v = std::numeric_limits<float>::quiet_NaN();
  else if (e == 0) v = std::ldexp(float(m), -9);  // subnormal: m/8 · 2^(1-7)
  else v = std::ldexp(1.0f + float(m) / 8.0f, int(e) - 7);
  return neg ? -v : v;
}
/// float8 e5m2: the top byte of an IEEE binary16.
inline float f8_e5m2_to_float(std::uint8_t b) { return fp16::to_float(std::uint16_t(std::uint16_t(b) << 8)); }

template <class I>
I load_unaligned(const std::byte* p) {
  I v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

/// Element i of a buffer of dtype d, as a double (integers exactly up to 2^53).
inline double st_element(st_dtype d, const std::byte* base, std::size_t i) {
  const std::byte* p = base + i * st_dtype_size(d);
  switch (d) {
    case st_dtype::BOOL: return std::to_integer<std::uint8_t>(*p) != 0 ? 1.0 : 0.0;
    case st_dtype::U8: return double(std::to_integer<std::uint8_t>(*p));
    case st_dtype::I8: return double(std::int8_t(std::to_integer<std::uint8_t>(*p)));
    case st_dtype::I16: return double(load_unaligned<std::int16_t>(p));
    case st_dtype::U16: return double(load_unaligned<std::uint16_t>(p));
    case st_dtype::F16: return double(fp16::to_float(load_unaligned<std::uint16_t>(p)));
    case st_dtype::BF16: return double(float(bf16::from_bits(load_unaligned<std::uint16_t>(p))));
    case st_dtype::I32: return double(load_unaligned<std::int32_t>(p));
    case st_dtype::U32: return double(load_unaligned<std::uint32_t>(p));
    case st_dtype::F32: return double(load_unaligned<float>(p));
    case st_dtype::F64: return load_unaligned<double>(p);
    case st_dtype::I64: return double(load_unaligned<std::int64_t>(p));
    case st_dtype::U64: return double(load_unaligned<std::uint64_t>(p));
    case st_dtype::F8_E4M3: return double(f8_e4m3_to_float(std::to_integer<std::uint8_t>(*p)));
    case st_dtype::F8_E5M2: return double(f8_e5m2_to_float(std::to_integer<std::uint8_t>(*p)));
  }
  return 0.0;
}

/// a·b, or nullopt on overflow of 64 bits.
inline std::optional<std::uint64_t> checked_mul(std::uint64_t a, std::uint64_t b) {
  std::uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

inline std::string shape_string(const std::vector<std::uint64_t>& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

inline std::uint64_t read_u64_le(const std::byte* p) { return load_unaligned<std::uint64_t>(p); }

/// Stores one value as storage type T (conversions round to nearest even).
template <class T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, double>) return v;
  else if constexpr (std::is_same_v<T, float>) return float(v);
  else return T(float(v));
}

}  // namespace detail

/// One tensor's header entry.
struct st_tensor_info {
  std::string name;
  st_dtype dtype;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0;  ///< data_offsets, relative to the start of the data section
  std::uint64_t end = 0;
  std::uint64_t element_count() const {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;  // validated not to overflow when the file was opened
    return n;
  }
};

/// The largest header the reader accepts, as the reference implementation.
inline constexpr std::uint64_t safetensors_max_header = 100'000'000;

/// A validated safetensors file (or buffer). Cheap to copy: copies share the bytes.
class safetensors_file {
 public:
  /// Maps the file and validates it. Throws io_error if it cannot be read, format_error
  /// if it is malformed.
  static safetensors_file open(const std::filesystem::path& path) {
    auto buf = map_file(path);
    return parse(buf.bytes, std::move(buf.owner), path.string());
  }

  /// Validates `bytes` (kept alive by `owner`, or by the caller when owner is null).
  /// Validates an owned buffer (kept alive by the returned object and its views), so
  /// `parse(writer.serialize())` does not dangle.
  static safetensors_file parse(std::vector<std::byte>&& bytes, const std::string& source = "<memory>") {
    auto owner = std::make_shared<const std::vector<std::byte>>(std::move(bytes));
    const std::span<const std::byte> s(owner->data(), owner->size());
    return parse(s, owner, source);
  }
  static safetensors_file parse(std::span<const std::byte> bytes, std::shared_ptr<const void> owner = nullptr,
                                const std::string& source = "<memory>") {
    safetensors_file f;
    f.bytes_ = bytes;
    f.owner_ = std::move(owner);
    f.source_ = source;
    f.validate();
    return f;
  }

  const std::vector<st_tensor_info>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  std::size_t size() const { return tensors_.size(); }
  bool contains(std::string_view name) const { return find(name) != nullptr; }

  const st_tensor_info* find(std::string_view name) const {
    auto it = index_.find(std::string(name));
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  /// The entry for `name`; format_error when the file has no such tensor.
  const st_tensor_info& at(std::string_view name) const {
    const auto* t = find(name);
    if (t == nullptr) throw format_error(op("at") + ": no tensor named \"" + std::string(name) + "\"");
    return *t;
  }

  /// The raw little-endian bytes of a tensor.
  std::span<const std::byte> data(const st_tensor_info& t) const {
    return bytes_.subspan(std::size_t(data_start_ + t.begin), std::size_t(t.end - t.begin));
  }
  std::span<const std::byte> data(std::string_view name) const { return data(at(name)); }
  /// What keeps the bytes alive (the mapping), or null for caller-owned memory.
  const std::shared_ptr<const void>& owner() const { return owner_; }

  /// All elements of a tensor converted to T (float or double), row-major.
  template <class T = float>
  std::vector<T> values(std::string_view name) const {
    static_assert(std::is_floating_point_v<T>, "deltaw::io::safetensors_file::values: T must be float or double");
    const auto& t = at(name);
    const auto raw = data(t);
    const std::size_t n = std::size_t(t.element_count());
    std::vector<T> out(n);
    for (std::size_t i = 0; i < n; ++i) out[i] = T(detail::st_element(t.dtype, raw.data(), i));
    return out;
  }

  /// A 2-D tensor [rows, cols] as a matrix of storage type T. Zero-copy (sharing the
  /// mapping) when the file's dtype is T's and the data is aligned for T; otherwise a
  /// converted copy. 1-D tensors are refused (use vector()).
  template <storage_type T>
  held_matrix<T> matrix(std::string_view name) const {
    const auto& t = at(name);
    if (t.shape.size() != 2)
      throw shape_error(op("matrix") + ": tensor \"" + t.name + "\" has shape " + detail::shape_string(t.shape) +
                        "; a matrix needs 2 dimensions");
    const index_t rows = checked_index(t, t.shape[0]), cols = checked_index(t, t.shape[1]);
    if (const T* p = direct<T>(t)) return {matrix_view<const T>(p, rows, cols), owner_};
    auto buf = converted<T>(t);
    return {matrix_view<const T>(buf->data(), rows, cols), std::move(buf)};
  }

  /// A 1-D tensor as a vector of storage type T (zero-copy under the same conditions).
  template <storage_type T>
  held_vector<T> vector(std::string_view name) const {
    const auto& t = at(name);
    if (t.shape.size() != 1)
      throw shape_error(op("vector") + ": tensor \"" + t.name + "\" has shape " + detail::shape_string(t.shape) +
                        "; a vector needs 1 dimension");
    const index_t n = checked_index(t, t.shape[0]);
    if (const T* p = direct<T>(t)) return {vector_view<const T>(p, n), owner_};
    auto buf = converted<T>(t);
    return {vector_view<const T>(buf->data(), n), std::move(buf)};
  }

  /// True when matrix<T>/vector<T> of this tensor would not copy.
  template <storage_type T>
  bool is_zero_copy(std::string_view name) const {
    return direct<T>(at(name)) != nullptr || at(name).element_count() == 0;
  }

 private:
  std::string op(const char* f) const { return "deltaw::io::safetensors_file::" + std::string(f) + " (" + source_ + ")"; }
  [[noreturn]] void fail(const std::string& msg) const {
    throw format_error("deltaw::io::safetensors (" + source_ + "): " + msg);
  }

  index_t checked_index(const st_tensor_info& t, std::uint64_t d) const {
    if (d > std::uint64_t(std::numeric_limits<index_t>::max()))
      throw format_error(op("matrix") + ": tensor \"" + t.name + "\" has a dimension too large to index");
    return index_t(d);
  }

  template <class T>
  const T* direct(const st_tensor_info& t) const {
    if (t.dtype != st_dtype_of<T>()) return nullptr;
    const std::byte* p = bytes_.data() + data_start_ + t.begin;
    if (t.end == t.begin) return nullptr;
    if (reinterpret_cast<std::uintptr_t>(p) % alignof(T) != 0) return nullptr;
    return reinterpret_cast<const T*>(p);
  }

  template <class T>
  std::shared_ptr<std::vector<T>> converted(const st_tensor_info& t) const {
    const auto raw = data(t);
    const std::size_t n = std::size_t(t.element_count());
    auto out = std::make_shared<std::vector<T>>(n);
    if (t.dtype == st_dtype_of<T>()) {
      if (n) std::memcpy(out->data(), raw.data(), n * sizeof(T));  // unaligned: same bits, copied
    } else {
      for (std::size_t i = 0; i < n; ++i) (*out)[i] = detail::from_double<T>(detail::st_element(t.dtype, raw.data(), i));
    }
    return out;
  }

  void validate() {
    const std::uint64_t size = bytes_.size();
    if (size < 8) fail("the file has " + std::to_string(size) + " bytes, fewer than the 8-byte header length");
    const std::uint64_t n = detail::read_u64_le(bytes_.data());
    if (n > safetensors_max_header)
      fail("header length " + std::to_string(n) + " exceeds the limit of " + std::to_string(safetensors_max_header) +
           " bytes");
    if (n > size - 8)
      fail("header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size) +
           " bytes)");
    data_start_ = 8 + n;
    const std::string_view text(reinterpret_cast<const char*>(bytes_.data() + 8), std::size_t(n));
    parse_header(text);

    // Entries sorted by offset must tile the data section exactly, in order from 0.
    std::vector<std::size_t> order(tensors_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return std::pair(tensors_[a].begin, tensors_[a].end) < std::pair(tensors_[b].begin, tensors_[b].end);
    });
    std::uint64_t expected = 0;
    for (std::size_t i : order) {
      const auto& t = tensors_[i];
      if (t.begin != expected || t.end < t.begin)
        fail("tensor \"" + t.name + "\" has data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
             "); the next tensor must start at " + std::to_string(expected) + " (no gaps or overlaps)");
      std::uint64_t count = 1;
      for (auto d : t.shape) {
        auto c = detail::checked_mul(count, d);
        if (!c) fail("tensor \"" + t.name + "\" shape " + detail::shape_string(t.shape) + " overflows");
        count = *c;
      }
      auto nbytes = detail::checked_mul(count, st_dtype_size(t.dtype));
      if (!nbytes) fail("tensor \"" + t.name + "\" byte size overflows");
      if (t.end - t.begin != *nbytes)
        fail("tensor \"" + t.name + "\" " + st_dtype_name(t.dtype) + " " + detail::shape_string(t.shape) + " needs " +
             std::to_string(*nbytes) + " bytes but data_offsets span " + std::to_string(t.end - t.begin));
      expected = t.end;
    }
    if (expected != size - data_start_)
      fail("the tensors cover " + std::to_string(expected) + " data bytes but the file has " +
           std::to_string(size - data_start_) + " after the header");

    // Keep tensors in data order; the index (built while parsing, which rejected
    // duplicate names) follows them.
    std::vector<std::size_t> where(order.size());
    for (std::size_t i = 0; i < order.size(); ++i) where[order[i]] = i;
    for (auto& [name, i] : index_) i = where[i];
    std::vector<st_tensor_info> sorted;
    sorted.reserve(order.size());
    for (std::size_t i : order) sorted.push_back(std::move(tensors_[i]));
    tensors_ = std::move(sorted);
  }

  // The header is read in one SAX pass straight into tensors_, index_ and metadata_ (no
  // JSON DOM): linear time, memory a small multiple of the header, and what the format
  // ignores (extra fields in an entry) skipped without being stored. Checks: an object
  // at the top; each entry an object with a string "dtype", an array "shape" of
  // non-negative integers and "data_offsets" [begin, end]; "__metadata__" null or an
  // object of strings; no duplicate names, metadata keys or entry fields; nesting ≤ 8.
  class header_sax {
   public:
    header_sax(safetensors_file& f, const std::string& what) : f_(f), what_(what) {}

    bool null() { return scalar(kind::null); }
    bool boolean(bool) { return scalar(kind::other); }
    bool number_integer(json::number_integer_t) { return scalar(kind::other); }
    bool number_unsigned(json::number_unsigned_t v) {
      if (skip_ == 0 && state_ == st::shape) {
        f_.tensors_.back().shape.push_back(v);
        return true;
      }
      if (skip_ == 0 && state_ == st::offsets) {
        if (n_offsets_ == 0) f_.tensors_.back().begin = v;
        else if (n_offsets_ == 1) f_.tensors_.back().end = v;
        ++n_offsets_;
        return true;
      }
      return scalar(kind::other);
    }
    bool number_float(json::number_float_t v, const json::string_t& s) {
      if (!std::isfinite(v)) throw format_error(what_ + ": invalid JSON: number overflow parsing '" + s + "'");
      return scalar(kind::other);
    }
    bool string(json::string_t& v) {
      if (skip_ == 0 && state_ == st::entry && field_ == fld::dtype) {
        auto d = parse_st_dtype(v);
        if (!d) f_.fail("entry \"" + f_.tensors_.back().name + "\" has unknown dtype \"" + v + "\"");
        f_.tensors_.back().dtype = *d;
        have_dtype_ = true;
        return true;
      }
      if (skip_ == 0 && state_ == st::metadata) {
        if (!f_.metadata_.emplace(std::move(key_), std::move(v)).second)
          f_.fail("duplicate JSON key \"" + last_key_ + "\" in __metadata__");
        return true;
      }
      return scalar(kind::other);
    }
    bool binary(json::binary_t&) { throw format_error(what_ + ": invalid JSON: binary value"); }

    bool start_object(std::size_t) {
      enter();
      if (skip_ > 0) return ++skip_, true;
      switch (state_) {
        case st::begin: state_ = st::root; return true;
        case st::root:
          if (key_ == "__metadata__") {
            state_ = st::metadata;
          } else {
            state_ = st::entry;
            have_dtype_ = have_shape_ = have_offsets_ = false;
            seen_dtype_ = seen_shape_ = seen_offsets_ = false;
          }
          return true;
        case st::entry:
          if (field_ != fld::other) return scalar(kind::other);
          skip_ = 1;  // an extra field: ignored
          return true;
        case st::end: return true;
        case st::metadata: f_.fail("__metadata__ value for \"" + last_key_ + "\" is not a string");
        case st::shape: f_.fail("entry \"" + f_.tensors_.back().name + "\" has a shape entry that is not a non-negative integer");
        case st::offsets: bad_offsets();
      }
      return true;
    }
    bool end_object() {
      --depth_;
      if (skip_ > 0) {
        --skip_;
        return true;
      }
      if (state_ == st::entry) {
        const auto& name = f_.tensors_.back().name;
        if (!have_dtype_) f_.fail("entry \"" + name + "\" has no string \"dtype\"");
        if (!have_shape_) f_.fail("entry \"" + name + "\" has no array \"shape\"");
        if (!have_offsets_) bad_offsets();
      }
      state_ = state_ == st::root ? st::end : st::root;
      return true;
    }
    bool start_array(std::size_t) {
      enter();
      if (skip_ > 0) return ++skip_, true;
      if (state_ == st::entry && field_ == fld::shape) {
        state_ = st::shape;
        have_shape_ = true;
        return true;
      }
      if (state_ == st::entry && field_ == fld::offsets) {
        state_ = st::offsets;
        have_offsets_ = true;
        n_offsets_ = 0;
        return true;
      }
      // An extra field's array is skipped; so is a top-level array, so that its depth
      // is still checked before it is refused as "not a JSON object".
      if ((state_ == st::entry && field_ == fld::other) || state_ == st::begin) return skip_ = 1, true;
      return scalar(kind::other);
    }
    bool end_array() {
      --depth_;
      if (skip_ > 0) {
        --skip_;
        return true;
      }
      if (state_ == st::offsets && n_offsets_ != 2) bad_offsets();
      state_ = st::entry;
      return true;
    }
    bool key(json::string_t& k) {
      if (skip_ > 0) return true;  // duplicate keys inside ignored values are not looked for
      if (state_ == st::root) {
        if (k == "__metadata__") {
          if (seen_metadata_) f_.fail("duplicate JSON key \"__metadata__\"");
          seen_metadata_ = true;
          key_ = std::move(k);
          return true;
        }
        if (!f_.index_.emplace(k, f_.tensors_.size()).second) f_.fail("duplicate JSON key \"" + k + "\"");
        st_tensor_info t;
        t.name = k;
        f_.tensors_.push_back(std::move(t));
        key_ = std::move(k);
        return true;
      }
      if (state_ == st::metadata) {
        last_key_ = k;
        key_ = std::move(k);
        return true;
      }
      // In an entry.
      field_ = k == "dtype" ? fld::dtype : k == "shape" ? fld::shape : k == "data_offsets" ? fld::offsets : fld::other;
      bool* seen = field_ == fld::dtype ? &seen_dtype_ : field_ == fld::shape ? &seen_shape_ : field_ == fld::offsets ? &seen_offsets_ : nullptr;
      if (seen && *seen) f_.fail("entry \"" + f_.tensors_.back().name + "\": duplicate JSON key \"" + k + "\"");
      if (seen) *seen = true;
      return true;
    }
    bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) {
      throw format_error(what_ + ": invalid JSON: " + e.what());
    }
    bool finished() const { return state_ == st::end; }

   private:
    enum class st { begin, root, entry, metadata, shape, offsets, end };
    enum class fld { dtype, shape, offsets, other };
    enum class kind { null, other };
    void enter() {
      if (++depth_ > 8) throw format_error(what_ + ": JSON nested deeper than 8 levels");
    }
    [[noreturn]] void bad_offsets() const {
      f_.fail("entry \"" + f_.tensors_.back().name + "\" needs \"data_offsets\": [begin, end] of non-negative integers");
    }
    // A scalar (or, from start_array, an array) where the state expects something else.
    bool scalar(kind k) {
      if (skip_ > 0) return true;
      switch (state_) {
        case st::begin: f_.fail("the header is not a JSON object");
        case st::root:
          if (key_ == "__metadata__") {
            if (k == kind::null) return true;
            f_.fail("__metadata__ must be an object of strings");
          }
          f_.fail("entry \"" + key_ + "\" is not an object");
        case st::entry:
          if (field_ == fld::dtype) f_.fail("entry \"" + f_.tensors_.back().name + "\" has no string \"dtype\"");
          if (field_ == fld::shape) f_.fail("entry \"" + f_.tensors_.back().name + "\" has no array \"shape\"");
          if (field_ == fld::offsets) bad_offsets();
          return true;  // an extra field's value: ignored
        case st::metadata: f_.fail("__metadata__ value for \"" + last_key_ + "\" is not a string");
        case st::shape: f_.fail("entry \"" + f_.tensors_.back().name + "\" has a shape entry that is not a non-negative integer");
        case st::offsets: bad_offsets();
        case st::end: return true;
      }
      return true;
    }

    safetensors_file& f_;
    const std::string& what_;
    st state_ = st::begin;
    fld field_ = fld::other;
    int depth_ = 0, skip_ = 0, n_offsets_ = 0;
    bool have_dtype_ = false, have_shape_ = false, have_offsets_ = false;
    bool seen_dtype_ = false, seen_shape_ = false, seen_offsets_ = false;
    bool seen_metadata_ = false;
    std::string key_, last_key_;
  };

  void parse_header(std::string_view text) {
    const std::string what = "deltaw::io::safetensors (" + source_ + ") header";
    if (!detail::valid_utf8(text)) throw format_error(what + ": the JSON text is not valid UTF-8");
    if (text.find('\0') != std::string_view::npos) throw format_error(what + ": invalid JSON: a NUL byte in the text");
    header_sax h(*this, what);
    try {
      json::sax_parse(text.begin(), text.end(), &h, json::input_format_t::json, /*strict=*/true, /*ignore_comments=*/false);
    } catch (const json::exception& e) {
      throw format_error(what + ": invalid JSON: " + e.what());
    }
    if (!h.finished()) fail("the header is not a JSON object");
  }

  std::span<const std::byte> bytes_;
  std::shared_ptr<const void> owner_;
  std::string source_;
  std::uint64_t data_start_ = 0;
  std::vector<st_tensor_info> tensors_;
  std::unordered_map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// Builds a safetensors file: add tensors (copied, row-major), metadata, then write().
class safetensors_writer {
 public:
  /// A matrix of any strides, stored row-major [rows, cols] in its own dtype.
  template <class T, class D>
  void add(std::string name, const matrix_view<T, D>& m) {
    static_assert(std::is_same_v<D, device::cpu>, "deltaw::io::safetensors_writer: copy device data to the host first");
    using U = std::remove_const_t<T>;
    std::vector<std::byte> b(std::size_t(m.size()) * sizeof(U));
    std::size_t k = 0;
    for (index_t i = 0; i < m.rows(); ++i)
      for (index_t j = 0; j < m.cols(); ++j, ++k) std::memcpy(b.data() + k * sizeof(U), &m(i, j), sizeof(U));
    push(std::move(name), st_dtype_of<U>(), {std::uint64_t(m.rows()), std::uint64_t(m.cols())}, std::move(b));
  }
  /// A vector, stored 1-D.
  template <class T, class D>
  void add(std::string name, const vector_view<T, D>& v) {
    static_assert(std::is_same_v<D, device::cpu>, "deltaw::io::safetensors_writer: copy device data to the host first");
    using U = std::remove_const_t<T>;
    std::vector<std::byte> b(std::size_t(v.size()) * sizeof(U));
    for (index_t i = 0; i < v.size(); ++i) std::memcpy(b.data() + std::size_t(i) * sizeof(U), &v[i], sizeof(U));
    push(std::move(name), st_dtype_of<U>(), {std::uint64_t(v.size())}, std::move(b));
  }
  /// An Eigen matrix (or Map/Block) of float, double, Eigen::bfloat16 or Eigen::half.
  template <class M>
    requires eigen_direct<M>
  void add(std::string name, const M& m) {
    add(std::move(name), view(m));
  }
  /// Raw little-endian bytes of any dtype; the byte count must match the shape.
  void add_raw(std::string name, st_dtype dtype, std::vector<std::uint64_t> shape, std::span<const std::byte> bytes) {
    std::uint64_t n = 1;
    for (auto d : shape) {
      auto c = detail::checked_mul(n, d);
      if (!c) throw shape_error("deltaw::io::safetensors_writer::add_raw: shape overflows");
      n = *c;
    }
    auto nb = detail::checked_mul(n, st_dtype_size(dtype));
    if (!nb || *nb != bytes.size())
      throw shape_error("deltaw::io::safetensors_writer::add_raw: \"" + name + "\" " + st_dtype_name(dtype) + " " +
                        detail::shape_string(shape) + " needs " + (nb ? std::to_string(*nb) : std::string("too many")) +
                        " bytes, got " + std::to_string(bytes.size()));
    push(std::move(name), dtype, std::move(shape), std::vector<std::byte>(bytes.begin(), bytes.end()));
  }
  void set_metadata(std::string key, std::string value) { metadata_[std::move(key)] = std::move(value); }

  /// The file's bytes. Header padded with spaces to a multiple of 8 so the data section
  /// starts 8-byte aligned (as the reference writer does).
  std::vector<std::byte> serialize() const {
    // Written out directly (linear in the entries; an ordered_json header would be
    // quadratic): the same bytes as nlohmann's compact dump, metadata first, then the
    // tensors in the order they were added.
    std::string text = "{";
    bool first = true;
    auto quoted = [](const std::string& str) {
      try {
        return json(str).dump();
      } catch (const json::exception& ex) {
        throw argument_error(std::string("deltaw::io::safetensors_writer: a name or metadata string is not valid UTF-8: ") +
                             ex.what());
      }
    };
    if (!metadata_.empty()) {
      text += "\"__metadata__\":{";
      bool mfirst = true;
      for (const auto& [k, v] : metadata_) {
        if (!mfirst) text += ',';
        mfirst = false;
        text += quoted(k);
        text += ':';
        text += quoted(v);
      }
      text += '}';
      first = false;
    }
    std::uint64_t off = 0;
    for (const auto& e : entries_) {
      if (!first) text += ',';
      first = false;
      text += quoted(e.name);
      text += ":{\"dtype\":\"";
      text += st_dtype_name(e.dtype);
      text += "\",\"shape\":[";
      for (std::size_t i = 0; i < e.shape.size(); ++i) {
        if (i) text += ',';
        text += std::to_string(e.shape[i]);
      }
      text += "],\"data_offsets\":[";
      text += std::to_string(off);
      text += ',';
      text += std::to_string(off + e.bytes.size());
      text += "]}";
      off += e.bytes.size();
    }
    text += '}';
    text.append((8 - text.size() % 8) % 8, ' ');
    std::vector<std::byte> out(8 + text.size() + off);
    const std::uint64_t n = text.size();
    std::memcpy(out.data(), &n, 8);
    std::memcpy(out.data() + 8, text.data(), text.size());
    std::size_t p = 8 + text.size();
    for (const auto& e : entries_) {
      if (!e.bytes.empty()) std::memcpy(out.data() + p, e.bytes.data(), e.bytes.size());
      p += e.bytes.size();
    }
    return out;
  }
  void write(const std::filesystem::path& path) const {
    const auto b = serialize();
    write_file(path, b);
  }
  std::size_t size() const { return entries_.size(); }

 private:
  struct entry {
    std::string name;
    st_dtype dtype;
    std::vector<std::uint64_t> shape;
    std::vector<std::byte> bytes;
  };
  void push(std::string name, st_dtype d, std::vector<std::uint64_t> shape, std::vector<std::byte> b) {
    if (name == "__metadata__")
      throw argument_error("deltaw::io::safetensors_writer: \"__metadata__\" is reserved and cannot name a tensor");
    if (!names_.insert(name).second)
      throw argument_error("deltaw::io::safetensors_writer: a tensor named \"" + name + "\" was already added");
    entries_.push_back({std::move(name), d, std::move(shape), std::move(b)});
  }
  std::vector<entry> entries_;
  std::unordered_set<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace io
DELTAW_NAMESPACE_END
