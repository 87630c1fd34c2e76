// SPDX-License-Identifier: MIT
// Storage types: bf16 and fp16 stored as 16 bits, converted to float for arithmetic.
// Both conversions round to nearest even and are usable in CUDA device code, so the
// CPU and CUDA backends see the same bits.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "config.hpp"

DELTAW_NAMESPACE_BEGIN

namespace detail {
DELTAW_HOST_DEVICE inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
DELTAW_HOST_DEVICE inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
}  // namespace detail

/// bfloat16 storage (1 sign, 8 exponent, 7 mantissa bits).
struct bf16 {
  std::uint16_t bits = 0;

  bf16() = default;
  DELTAW_HOST_DEVICE explicit bf16(float f) : bits(from_float(f)) {}
  DELTAW_HOST_DEVICE explicit operator float() const { return detail::bits_float(std::uint32_t(bits) << 16); }

  DELTAW_HOST_DEVICE static std::uint16_t from_float(float f) {
    std::uint32_t u = detail::float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return std::uint16_t(u >> 16);
  }
  DELTAW_HOST_DEVICE static bf16 from_bits(std::uint16_t b) {
    bf16 h;
    h.bits = b;
    return h;
  }
};

/// IEEE 754 binary16 storage (1 sign, 5 exponent, 10 mantissa bits).
struct fp16 {
  std::uint16_t bits = 0;

  fp16() = default;
  DELTAW_HOST_DEVICE explicit fp16(float f) : bits(from_float(f)) {}
  DELTAW_HOST_DEVICE explicit operator float() const { return to_float(bits); }

  DELTAW_HOST_DEVICE static std::uint16_t from_float(float f) {
    const std::uint32_t u = detail::float_bits(f);
    const std::uint32_t sign = (u >> 16) & 0x8000u;
    const std::uint32_t au = u & 0x7fffffffu;
    if (au > 0x7f800000u) return std::uint16_t(sign | 0x7e00u);  // NaN
    if (au >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // overflow (>= 65520) or Inf
    if (au < 0x38800000u) {                                        // subnormal or zero in fp16
      if (au < 0x33000000u) return std::uint16_t(sign);            // below half the smallest subnormal
      const std::uint32_t e = au >> 23;
      const std::uint32_t m = (au & 0x7fffffu) | 0x800000u;
      const std::uint32_t shift = 126u - e;  // 14 + (112 - e) + ... : brings m to 10 bits
      std::uint32_t r = m >> shift;
      const std::uint32_t rem = m & ((1u << shift) - 1u);
      const std::uint32_t half = 1u << (shift - 1u);
      if (rem > half || (rem == half && (r & 1u))) ++r;
      return std::uint16_t(sign | r);
    }
    std::uint32_t r = au - 0x38000000u;  // rebias exponent 127 -> 15
    r += 0xfffu + ((r >> 13) & 1u);      // round to nearest even
    return std::uint16_t(sign | (r >> 13));
  }
  DELTAW_HOST_DEVICE static float to_float(std::uint16_t h) {
    const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
    const std::uint32_t e = (h >> 10) & 0x1fu;
    std::uint32_t m = h & 0x3ffu;
    if (e == 0x1f) return detail::bits_float(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
      if (m == 0) return detail::bits_float(sign);
      // subnormal: value = m * 2^-24
      float v = float(m) * 5.9604644775390625e-8f;
      return sign ? -v : v;
    }
    return detail::bits_float(sign | ((e + 112u) << 23) | (m << 13));
  }
  DELTAW_HOST_DEVICE static fp16 from_bits(std::uint16_t b) {
    fp16 h;
    h.bits = b;
    return h;
  }
};

/// True for the 16-bit storage-only types.
template <class T>
inline constexpr bool is_storage16_v = std::is_same_v<std::remove_cv_t<T>, bf16> || std::is_same_v<std::remove_cv_t<T>, fp16>;

/// The element types deltaw stores: float, double, bf16, fp16.
template <class T>
concept storage_type = std::is_same_v<std::remove_cv_t<T>, float> || std::is_same_v<std::remove_cv_t<T>, double> ||
                       is_storage16_v<T>;

/// Arithmetic type for a storage type: fp32 accumulates bf16/fp16/float, double stays double.
template <class T>
struct accum {
  using type = float;
};
template <>
struct accum<double> {
  using type = double;
};
template <class T>
struct accum<const T> : accum<T> {};
template <class T>
using accum_t = typename accum<T>::type;

/// The arithmetic type for several storage types: double if any is double, else float.
template <class... Ts>
using compute_t = std::common_type_t<accum_t<Ts>...>;

/// Converts any storage type to its arithmetic value.
template <class To, class From>
DELTAW_HOST_DEVICE inline To convert(From v) {
  if constexpr (std::is_same_v<std::remove_cv_t<From>, bf16> || std::is_same_v<std::remove_cv_t<From>, fp16>) {
    return To(float(v));
  } else if constexpr (std::is_same_v<To, bf16> || std::is_same_v<To, fp16>) {
    return To(float(v));
  } else {
    return To(v);
  }
}

/// Name of a storage type, for messages.
template <class T>
constexpr const char* dtype_name() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>) return "float32";
  else if constexpr (std::is_same_v<U, double>) return "float64";
  else if constexpr (std::is_same_v<U, bf16>) return "bfloat16";
  else if constexpr (std::is_same_v<U, fp16>) return "float16";
  else return "unknown";
}

DELTAW_NAMESPACE_END
