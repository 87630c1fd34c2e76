// SPDX-License-Identifier: MIT
// Strict JSON parsing for the readers: nlohmann-json with duplicate keys rejected (its
// default keeps the last one silently), a nesting limit, UTF-8 checked, and every
// failure reported as deltaw::format_error.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <unordered_set>
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

/// Parses `text` as one JSON value (leading/trailing whitespace allowed). Throws
/// format_error naming `what` on invalid UTF-8, invalid JSON, a duplicate key in any
/// object, or nesting deeper than max_depth.
inline json parse_json_strict(std::string_view text, const std::string& what, int max_depth = 64) {
  if (!detail::valid_utf8(text)) throw format_error(what + ": the JSON text is not valid UTF-8");
  // A raw NUL is never valid JSON, but nlohmann's lexer takes it as the end of input
  // (so "{}\0junk" would parse): reject it first.
  if (text.find('\0') != std::string_view::npos) throw format_error(what + ": invalid JSON: a NUL byte in the text");
  std::vector<std::unordered_set<std::string>> keys;  // one set per open object
  auto cb = [&](int depth, json::parse_event_t ev, json& parsed) -> bool {
    switch (ev) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (depth >= max_depth)
          throw format_error(what + ": JSON nested deeper than " + std::to_string(max_depth) + " levels");
        if (ev == json::parse_event_t::object_start) keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key: {
        const auto& k = parsed.get_ref<const std::string&>();
        if (keys.empty()) throw format_error(what + ": malformed JSON (a key outside an object)");
        if (!keys.back().insert(k).second) throw format_error(what + ": duplicate JSON key \"" + k + "\"");
        break;
      }
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), cb, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const json::exception& e) {
    throw format_error(what + ": invalid JSON: " + e.what());
  }
}

}  // namespace io
DELTAW_NAMESPACE_END
