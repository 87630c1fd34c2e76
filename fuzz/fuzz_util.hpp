// SPDX-License-Identifier: MIT
// What the PEFT-adapter fuzz targets share: the input layout (u32 little-endian n, n bytes of
// adapter_config.json, then the bytes of adapter_model.safetensors, as fuzz/make_corpus.py
// packs the fixtures), the deterministic operand fill, how a finding aborts, and the
// DELTAW_FUZZ_VERBOSE switch that prints what became of each input.
#pragma once

#include <deltaw/core/eigen.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string_view>
#include <vector>

namespace deltaw_fuzz {

/// A finding: print it under the target's name and abort (libFuzzer keeps the input).
[[noreturn]] inline void finding(const char* target, const char* what) {
  std::fprintf(stderr, "%s: %s\n", target, what);
  std::abort();
}

/// Deterministic, small, finite values (the point is memory safety, not numerics).
inline deltaw::dense<float> filled(deltaw::index_t r, deltaw::index_t c, float s) {
  deltaw::dense<float> m(r, c);
  for (deltaw::index_t i = 0; i < r; ++i)
    for (deltaw::index_t j = 0; j < c; ++j) m(i, j) = s * float((i * 7 + j * 3) % 11 - 5);
  return m;
}

/// DELTAW_FUZZ_VERBOSE=1 prints what became of each input (to check the seeds).
inline bool verbose() {
  static const bool v = std::getenv("DELTAW_FUZZ_VERBOSE") != nullptr;
  return v;
}

/// One input: the config text (a view of the input) and an owned copy of the safetensors
/// bytes, as a mapped file would be (views into it must not outlive the adapter).
struct adapter_input {
  std::string_view config;
  std::vector<std::byte> safetensors;
};

/// Splits an input; nothing for one shorter than its length prefix. n is clamped to what is
/// there.
inline std::optional<adapter_input> split(const std::uint8_t* data, std::size_t size) {
  if (size < 4) return std::nullopt;
  std::uint32_t n = 0;
  std::memcpy(&n, data, 4);  // little endian on every target libFuzzer runs on here
  data += 4;
  size -= 4;
  const std::size_t cn = std::min<std::size_t>(n, size);
  return adapter_input{std::string_view(reinterpret_cast<const char*>(data), cn),
                       std::vector<std::byte>(reinterpret_cast<const std::byte*>(data + cn),
                                              reinterpret_cast<const std::byte*>(data + size))};
}

}  // namespace deltaw_fuzz
