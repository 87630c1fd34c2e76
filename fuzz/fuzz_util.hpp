// SPDX-License-Identifier: MIT
// What the PEFT-adapter fuzz targets share: the input layout (u32 little-endian n, n bytes of
// adapter_config.json, then the bytes of adapter_model.safetensors, as fuzz/make_corpus.py
// packs the fixtures), the deterministic operand fill, how a finding aborts, and the
// DELTAW_FUZZ_VERBOSE switch that prints what became of each input.
#pragma once

#include <deltaw/backend/cpu/ops.hpp>
#include <deltaw/backend/cpu/vjp.hpp>
#include <deltaw/core/eigen.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <span>
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

/// Evaluates update u every way the public API allows (apply, apply_transposed, materialize,
/// merge + unmerge, the norm, the VJP into `grads`, one gradient buffer per parameter), so
/// that a shape the reader or the constructors let through but the evaluators do not expect
/// shows up as an ASan report; a wrongly shaped result is a finding of `target`. Updates
/// larger than `max_weights` weights are skipped (each input stays cheap).
template <class U, std::size_t N>
void exercise(const char* target, const U& u, std::array<deltaw::dense<float>, N> grads,
              deltaw::index_t max_weights = 1 << 14) {
  namespace dw = deltaw;
  const dw::index_t out = u.rows(), in = u.cols();
  if (out < 1 || in < 1 || out > max_weights || in > max_weights || out * in > max_weights) return;
  const auto X = filled(3, in, 0.25f);
  const auto G = filled(3, out, 0.5f);
  const auto Y = dw::apply(u, X);
  const auto O = dw::apply_transposed(u, G);
  const auto D = dw::materialize(u);
  if (Y.rows() != 3 || Y.cols() != out || O.rows() != 3 || O.cols() != in || D.rows() != out || D.cols() != in)
    finding(target, "apply / apply_transposed / materialize returned a wrongly shaped result");
  auto W = filled(out, in, 0.125f);
  dw::merge(W, u);
  dw::unmerge(W, u);
  (void)dw::frobenius_norm(u);
  dw::dense<float> dX = dw::dense<float>::Zero(3, in);
  std::array<dw::dense<float>*, N> gs;
  for (std::size_t i = 0; i < N; ++i) gs[i] = &grads[i];
  dw::cpu::backward<float>(u, X, G, std::span<dw::dense<float>* const>(gs), &dX);
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
