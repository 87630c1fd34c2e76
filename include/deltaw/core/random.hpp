// SPDX-License-Identifier: MIT
// Counter-based random numbers: Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel
// random numbers: as easy as 1, 2, 3", SC'11), written from the published algorithm.
//
// Why counter-based: a random basis (NOLA, VeRA, RandLoRA) is a pure function of
// (seed, tensor id, element index), so any element or tile is regenerated independently,
// in any order, on any thread, on the CPU or in a CUDA kernel, with identical bits, and
// nothing needs to be stored.
//
// Everything here is DELTAW_HOST_DEVICE, uses only fixed-width integers and float/double,
// and no Eigen or std containers, so a CUDA kernel includes this header unchanged.
//
// Mapping: key = (seed low 32 bits, seed high 32 bits); counter = (block low, block high,
// tensor low, tensor high). Block b yields four 32-bit words: elements 4b .. 4b+3 of the
// stream. So element i of tensor t under seed s is word (i mod 4) of
// philox4x32_10({i/4, t}, s).
//
// Bit-exactness across devices: bits(), uniform01(), uniform_pm1() and ternary() use only
// integer arithmetic and exact int→float conversions, so CPU and CUDA agree bit for bit.
// normal() goes through log/cos/sin, whose last-ulp rounding differs between libm and
// CUDA's math library: it is deterministic per platform, not across platforms. The bases
// of NOLA, VeRA and RandLoRA use only the exact draws.
#pragma once

#include <cmath>
#include <cstdint>

#include "config.hpp"

DELTAW_NAMESPACE_BEGIN

/// Four 32-bit words: a Philox counter or output block.
struct u32x4 {
  std::uint32_t v[4];
};
/// Two 32-bit words: a Philox-4x32 key.
struct u32x2 {
  std::uint32_t v[2];
};

namespace detail {
// The Philox-4x32 multipliers and Weyl key increments (SC'11, Table 2 and section 4.2).
inline constexpr std::uint32_t philox_m0 = 0xD2511F53u;
inline constexpr std::uint32_t philox_m1 = 0xCD9E8D57u;
inline constexpr std::uint32_t philox_w0 = 0x9E3779B9u;  // golden ratio
inline constexpr std::uint32_t philox_w1 = 0xBB67AE85u;  // sqrt(3) - 1

DELTAW_HOST_DEVICE constexpr void philox_round(std::uint32_t& c0, std::uint32_t& c1, std::uint32_t& c2,
                                               std::uint32_t& c3, std::uint32_t k0, std::uint32_t k1) {
  const std::uint64_t p0 = std::uint64_t(philox_m0) * c0;
  const std::uint64_t p1 = std::uint64_t(philox_m1) * c2;
  const std::uint32_t hi0 = std::uint32_t(p0 >> 32), lo0 = std::uint32_t(p0);
  const std::uint32_t hi1 = std::uint32_t(p1 >> 32), lo1 = std::uint32_t(p1);
  const std::uint32_t n0 = hi1 ^ c1 ^ k0;
  const std::uint32_t n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
}
}  // namespace detail

/// Philox-4x32 with R rounds (10 is the standard, crush-resistant choice): a bijection of
/// the 128-bit counter under a 64-bit key.
template <int R = 10>
DELTAW_HOST_DEVICE constexpr u32x4 philox4x32(u32x4 ctr, u32x2 key) {
  std::uint32_t c0 = ctr.v[0], c1 = ctr.v[1], c2 = ctr.v[2], c3 = ctr.v[3];
  std::uint32_t k0 = key.v[0], k1 = key.v[1];
  for (int r = 0; r < R; ++r) {
    if (r > 0) {
      k0 += detail::philox_w0;
      k1 += detail::philox_w1;
    }
    detail::philox_round(c0, c1, c2, c3, k0, k1);
  }
  return u32x4{{c0, c1, c2, c3}};
}

/// Philox-4x32-10.
DELTAW_HOST_DEVICE constexpr u32x4 philox4x32_10(u32x4 ctr, u32x2 key) { return philox4x32<10>(ctr, key); }

/// 32 random bits → float in [0, 1): the top 24 bits times 2⁻²⁴ (exact).
DELTAW_HOST_DEVICE constexpr float bits_to_uniform01(std::uint32_t x) {
  return float(x >> 8) * (1.0f / 16777216.0f);
}
/// 32 random bits → float in (−1, 1), symmetric about 0 and never 0 or ±1:
/// (2·(x>>8) + 1 − 2²⁴)·2⁻²⁴, an odd integer of magnitude < 2²⁴ times a power of two (exact).
DELTAW_HOST_DEVICE constexpr float bits_to_uniform_pm1(std::uint32_t x) {
  const std::int32_t t = std::int32_t((x >> 8) << 1) + 1 - (std::int32_t(1) << 24);
  return float(t) * (1.0f / 16777216.0f);
}
/// 32 random bits → float in (0, 1] (a safe argument for log).
DELTAW_HOST_DEVICE constexpr float bits_to_uniform01_open0(std::uint32_t x) {
  return float((x >> 8) + 1u) * (1.0f / 16777216.0f);
}
/// 32 random bits → −1, 0 or +1 with P(−1) = P(+1) = p (p ≤ 1/2), compared on the same 24-bit
/// uniform u as PEFT's rule (u < p → −1, u > 1 − p → +1).
DELTAW_HOST_DEVICE constexpr float bits_to_ternary(std::uint32_t x, double p) {
  const double u = double(bits_to_uniform01(x));
  return u < p ? -1.0f : (u > 1.0 - p ? 1.0f : 0.0f);
}

/// The stream of one tensor: element i of tensor `tensor` under `seed`. Plain data
/// (two integers), so it is copied into CUDA kernels by value.
struct random_stream {
  std::uint64_t seed = 0;
  std::uint64_t tensor = 0;

  DELTAW_HOST_DEVICE constexpr u32x2 key() const {
    return u32x2{{std::uint32_t(seed), std::uint32_t(seed >> 32)}};
  }
  /// Output block b: elements 4b .. 4b+3.
  DELTAW_HOST_DEVICE constexpr u32x4 block(std::uint64_t b) const {
    return philox4x32_10(u32x4{{std::uint32_t(b), std::uint32_t(b >> 32), std::uint32_t(tensor),
                                std::uint32_t(tensor >> 32)}},
                         key());
  }
  /// The 32 random bits of element i.
  DELTAW_HOST_DEVICE constexpr std::uint32_t bits(std::uint64_t i) const { return block(i >> 2).v[i & 3]; }
  /// Uniform on [0, 1).
  DELTAW_HOST_DEVICE constexpr float uniform01(std::uint64_t i) const { return bits_to_uniform01(bits(i)); }
  /// Uniform on (−1, 1).
  DELTAW_HOST_DEVICE constexpr float uniform_pm1(std::uint64_t i) const { return bits_to_uniform_pm1(bits(i)); }
  /// Ternary −1/0/+1 with P(±1) = p each.
  DELTAW_HOST_DEVICE constexpr float ternary(std::uint64_t i, double p) const { return bits_to_ternary(bits(i), p); }
  /// Standard normal by Box–Muller: element i uses the pair of words (0, 1) of block i/2 and
  /// takes the cosine branch for even i, the sine branch for odd i. Computed in double.
  DELTAW_HOST_DEVICE float normal(std::uint64_t i) const {
    const u32x4 w = block(i >> 1);
    const double u1 = double(bits_to_uniform01_open0(w.v[0]));
    const double u2 = double(bits_to_uniform01(w.v[1]));
    const double rad = std::sqrt(-2.0 * std::log(u1));
    const double th = 6.283185307179586476925286766559 * u2;
    return float((i & 1) ? rad * std::sin(th) : rad * std::cos(th));
  }
};

/// How the entries of a random basis are drawn from their 32 random bits.
enum class basis_law : std::uint8_t {
  uniform,  ///< scale · U(−1, 1)
  ternary,  ///< scale · {−1, 0, +1} with P(±1) = p each
};

/// The element law of a random tensor: value(i) = scale · law(bits(i)). Plain data.
/// The law's value (U(−1, 1) or −1/0/+1) is exact in float; the scale is applied in the
/// caller's arithmetic type T (one rounding in float, none visible in double), so float
/// bases are bit-identical wherever IEEE float multiplication is (CPU and CUDA alike).
struct basis_entries {
  random_stream stream{};
  basis_law law = basis_law::uniform;
  double scale = 1.0;
  double p = 0.0;  ///< ternary only

  /// The unscaled law value of 32 random bits.
  DELTAW_HOST_DEVICE constexpr float unit(std::uint32_t x) const {
    return law == basis_law::uniform ? bits_to_uniform_pm1(x) : bits_to_ternary(x, p);
  }
  /// Entry i (its flat row-major index in the tensor's full shape), in type T.
  template <class T = float>
  DELTAW_HOST_DEVICE constexpr T value(std::uint64_t i) const {
    return T(scale) * T(unit(stream.bits(i)));
  }
  DELTAW_HOST_DEVICE constexpr float operator()(std::uint64_t i) const { return value<float>(i); }
};

/// out[j] = e(first + j) for j < n: one Philox block per four entries, the partial blocks at
/// either end handled separately so the middle loop is branch-free.
template <class T>
DELTAW_HOST_DEVICE void fill_entries(const basis_entries& e, std::uint64_t first, std::uint64_t n, T* out) {
  const T sc = T(e.scale);
  std::uint64_t j = 0;
  while (j < n && ((first + j) & 3) != 0) {
    out[j] = e.template value<T>(first + j);
    ++j;
  }
  const std::uint64_t full = (n - j) / 4;
  const std::uint64_t b0 = (first + j) >> 2;
  for (std::uint64_t q = 0; q < full; ++q) {
    const u32x4 w = e.stream.block(b0 + q);
    out[j + 4 * q + 0] = sc * T(e.unit(w.v[0]));
    out[j + 4 * q + 1] = sc * T(e.unit(w.v[1]));
    out[j + 4 * q + 2] = sc * T(e.unit(w.v[2]));
    out[j + 4 * q + 3] = sc * T(e.unit(w.v[3]));
  }
  for (j += 4 * full; j < n; ++j) out[j] = e.template value<T>(first + j);
}

/// out[j] += c · e(first + j): a weighted basis accumulated without a temporary (NOLA's
/// sums). The entry is rounded to T before the multiply-add, as fill_entries gives it.
template <class T>
DELTAW_HOST_DEVICE void axpy_entries(T c, const basis_entries& e, std::uint64_t first, std::uint64_t n, T* out) {
  const T sc = T(e.scale);
  std::uint64_t j = 0;
  while (j < n && ((first + j) & 3) != 0) {
    out[j] += c * e.template value<T>(first + j);
    ++j;
  }
  const std::uint64_t full = (n - j) / 4;
  const std::uint64_t b0 = (first + j) >> 2;
  for (std::uint64_t q = 0; q < full; ++q) {
    const u32x4 w = e.stream.block(b0 + q);
    const T v0 = sc * T(e.unit(w.v[0])), v1 = sc * T(e.unit(w.v[1]));
    const T v2 = sc * T(e.unit(w.v[2])), v3 = sc * T(e.unit(w.v[3]));
    out[j + 4 * q + 0] += c * v0;
    out[j + 4 * q + 1] += c * v1;
    out[j + 4 * q + 2] += c * v2;
    out[j + 4 * q + 3] += c * v3;
  }
  for (j += 4 * full; j < n; ++j) out[j] += c * e.template value<T>(first + j);
}

DELTAW_NAMESPACE_END
