// SPDX-License-Identifier: MIT
// Strict JSON parsing for the readers: nlohmann-json's SAX parser building the DOM in
// O(n log n) (ordered_json's own insertion is quadratic), duplicate keys rejected (its
// default keeps the last one silently), a nesting limit, UTF-8 checked, and every
// failure reported as deltaw::format_error.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "errors.hpp"

DELTAW_NAMESPACE_BEGIN
namespace io {

/// Key order is kept as in the file: PEFT's rank_pattern / alpha_pattern are matched in
/// file order (first match wins), as Python dicts iterate.
using json = nlohmann::ordered_json;

namespace detail {

/// True when s is well-formed UTF-8 (no overlongs, no surrogates, ≤ U+10FFFF).
inline bool valid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c == 0xE0) len = 3, lo = 0xA0;
    else if (c >= 0xE1 && c <= 0xEC) len = 3;
    else if (c == 0xED) len = 3, hi = 0x9F;
    else if (c >= 0xEE && c <= 0xEF) len = 3;
    else if (c == 0xF0) len = 4, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3) len = 4;
    else if (c == 0xF4) len = 4, hi = 0x8F;
    else return false;
    if (n - i < len) return false;
    if (p[i + 1] < lo || p[i + 1] > hi) return false;
    for (std::size_t k = 2; k < len; ++k)
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return false;
    i += len;
  }
  return true;
}

}  // namespace detail

namespace detail {

/// A SAX handler that builds an ordered_json in linear time. ordered_json's own insertion
/// scans the object for the key (quadratic in the member count: a 160k-entry safetensors
/// header took 20 s), so members are appended to the underlying vector directly, and
/// duplicates are found per object by sorting its keys when it closes (O(k log k)).
class json_strict_builder {
 public:
  json_strict_builder(const std::string& what, int max_depth) : what_(what), max_depth_(max_depth) {}

  bool null() { return put(nullptr); }
  bool boolean(bool v) { return put(v); }
  bool number_integer(json::number_integer_t v) { return put(v); }
  bool number_unsigned(json::number_unsigned_t v) { return put(v); }
  bool number_float(json::number_float_t v, const json::string_t& s) {
    if (!std::isfinite(v)) throw format_error(what_ + ": invalid JSON: number overflow parsing '" + s + "'");
    return put(v);
  }
  bool string(json::string_t& v) { return put(std::move(v)); }
  bool binary(json::binary_t&) { throw format_error(what_ + ": invalid JSON: binary value"); }
  bool start_object(std::size_t) { return open(json::object()); }
  bool start_array(std::size_t) { return open(json::array()); }
  bool key(json::string_t& k) {
    key_ = std::move(k);
    return true;
  }
  bool end_object() {
    auto& obj = *stack_.back()->get_ptr<json::object_t*>();
    if (obj.size() > 1) {
      std::vector<const std::string*> keys;
      keys.reserve(obj.size());
      for (const auto& kv : obj) keys.push_back(&kv.first);
      std::sort(keys.begin(), keys.end(), [](const std::string* a, const std::string* b) { return *a < *b; });
      for (std::size_t i = 1; i < keys.size(); ++i)
        if (*keys[i] == *keys[i - 1]) throw format_error(what_ + ": duplicate JSON key \"" + *keys[i] + "\"");
    }
    stack_.pop_back();
    return true;
  }
  bool end_array() {
    stack_.pop_back();
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) {
    throw format_error(what_ + ": invalid JSON: " + e.what());
  }

  json result() { return std::move(root_); }

 private:
  // Adds a value to the open container (or as the root); returns false never (errors throw).
  template <class V>
  json* add(V&& v) {
    if (stack_.empty()) {
      root_ = json(std::forward<V>(v));
      return &root_;
    }
    json& top = *stack_.back();
    if (auto* arr = top.get_ptr<json::array_t*>()) {
      arr->emplace_back(std::forward<V>(v));
      return &arr->back();
    }
    // ordered_map is a std::vector of pairs: append without its linear key search (keys
    // are checked for duplicates when the object closes).
    auto& members = static_cast<std::vector<std::pair<const std::string, json>>&>(*top.get_ptr<json::object_t*>());
    members.emplace_back(std::move(key_), json(std::forward<V>(v)));
    return &members.back().second;
  }
  template <class V>
  bool put(V&& v) {
    add(std::forward<V>(v));
    return true;
  }
  bool open(json&& empty) {
    // Pointers to open containers stay valid: a container's parent only grows after the
    // container has been closed.
    if (int(stack_.size()) >= max_depth_)
      throw format_error(what_ + ": JSON nested deeper than " + std::to_string(max_depth_) + " levels");
    stack_.push_back(add(std::move(empty)));
    return true;
  }

  const std::string& what_;
  int max_depth_;
  json root_;
  std::vector<json*> stack_;
  std::string key_;
};

}  // namespace detail

/// Parses `text` as one JSON value (leading/trailing whitespace allowed) in O(n log n)
/// time and memory linear in the text. Throws format_error naming `what` on invalid
/// UTF-8, invalid JSON, a non-finite number, a duplicate key in any object, or nesting
/// deeper than max_depth. Object members keep the file's order.
inline json parse_json_strict(std::string_view text, const std::string& what, int max_depth = 64) {
  if (!detail::valid_utf8(text)) throw format_error(what + ": the JSON text is not valid UTF-8");
  // A raw NUL is never valid JSON, but nlohmann's lexer takes it as the end of input
  // (so "{}\0junk" would parse): reject it first.
  if (text.find('\0') != std::string_view::npos) throw format_error(what + ": invalid JSON: a NUL byte in the text");
  detail::json_strict_builder b(what, max_depth);
  try {
    json::sax_parse(text.begin(), text.end(), &b, json::input_format_t::json, /*strict=*/true, /*ignore_comments=*/false);
  } catch (const json::exception& e) {
    throw format_error(what + ": invalid JSON: " + e.what());
  }
  return b.result();
}

}  // namespace io
DELTAW_NAMESPACE_END
