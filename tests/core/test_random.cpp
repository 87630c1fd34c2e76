// Philox-4x32-10 against the Random123 known-answer vectors, and the derived draws.
#include <deltaw/core/random.hpp>
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace dw = deltaw;

namespace {
void check_kat(dw::u32x4 ctr, dw::u32x2 key, dw::u32x4 want) {
  const dw::u32x4 got = dw::philox4x32_10(ctr, key);
  for (int i = 0; i < 4; ++i) CHECK(got.v[i] == want.v[i]);
}
}  // namespace

// Known answers of Philox4x32-10 from Random123's kat_vectors file (D. E. Shaw Research),
// as reproduced in DEShawResearch/fs123, core123/ut/ut_philox.cpp (test_kat_philox4x32):
// line format "ctr0 ctr1 ctr2 ctr3 key0 key1   out0 out1 out2 out3".
TEST_CASE("philox4x32_10 matches the Random123 known-answer vectors") {
  // counter 0, key 0
  check_kat({{0, 0, 0, 0}}, {{0, 0}}, {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}});
  // counter all ones, key all ones
  check_kat({{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, {{0xffffffffu, 0xffffffffu}},
            {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}});
  // the hexadecimal digits of pi
  check_kat({{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, {{0xa4093822u, 0x299f31d0u}},
            {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}});
}

TEST_CASE("philox4x32_10 is usable in constant expressions") {
  constexpr dw::u32x4 r = dw::philox4x32_10({{0, 0, 0, 0}}, {{0, 0}});
  static_assert(r.v[0] == 0x6627e8d5u && r.v[3] == 0x9b00dbd8u);
}

TEST_CASE("random_stream: element i is word i mod 4 of block i/4, keyed by seed and tensor") {
  const dw::random_stream s{0x0123456789abcdefULL, 0xfedcba9876543210ULL};
  const dw::u32x4 b = dw::philox4x32_10({{7, 0, 0x76543210u, 0xfedcba98u}}, {{0x89abcdefu, 0x01234567u}});
  for (int l = 0; l < 4; ++l) CHECK(s.bits(28 + l) == b.v[l]);
  // A different tensor or seed gives a different stream.
  const dw::random_stream t{s.seed, s.tensor + 1}, u{s.seed + 1, s.tensor};
  int same_t = 0, same_u = 0;
  for (std::uint64_t i = 0; i < 64; ++i) {
    same_t += s.bits(i) == t.bits(i);
    same_u += s.bits(i) == u.bits(i);
  }
  CHECK(same_t < 2);
  CHECK(same_u < 2);
  // Indices past 2^32 reach the high counter word.
  CHECK(s.bits(std::uint64_t(1) << 34) != s.bits(0));
}

TEST_CASE("uniform draws: ranges, exact symmetry, and moments over 1e6 draws") {
  const dw::random_stream s{42, 3};
  const int n = 1000000;
  double m01 = 0, v01 = 0, mpm = 0, vpm = 0;
  float lo01 = 1, hi01 = 0, lopm = 1, hipm = -1;
  for (int i = 0; i < n; ++i) {
    const float a = s.uniform01(std::uint64_t(i));
    const float b = s.uniform_pm1(std::uint64_t(i));
    lo01 = std::min(lo01, a);
    hi01 = std::max(hi01, a);
    lopm = std::min(lopm, b);
    hipm = std::max(hipm, b);
    m01 += a;
    v01 += double(a) * a;
    mpm += b;
    vpm += double(b) * b;
  }
  m01 /= n;
  v01 = v01 / n - m01 * m01;
  mpm /= n;
  vpm = vpm / n - mpm * mpm;
  CHECK(lo01 >= 0.0f);
  CHECK(hi01 < 1.0f);
  CHECK(lopm > -1.0f);
  CHECK(hipm < 1.0f);
  // Standard errors: 1/sqrt(12 n) ≈ 2.9e-4 for the mean of U(0,1); bounds are ~6 sigma.
  CHECK(std::abs(m01 - 0.5) < 2e-3);
  CHECK(std::abs(v01 - 1.0 / 12) < 1e-3);
  CHECK(std::abs(mpm) < 4e-3);
  CHECK(std::abs(vpm - 1.0 / 3) < 2e-3);
  // The (−1, 1) map is odd in the bits: x and ~x give opposite values.
  for (std::uint32_t x : {0u, 1u, 255u, 256u, 0x80000000u, 0x7fffffffu, 0xdeadbeefu})
    CHECK(dw::bits_to_uniform_pm1(x) == -dw::bits_to_uniform_pm1(~x));
  CHECK(dw::bits_to_uniform01(0) == 0.0f);
  CHECK(dw::bits_to_uniform01(0xffffffffu) == 1.0f - 1.0f / 16777216.0f);
}

TEST_CASE("normal draws: moments over 1e6 draws") {
  const dw::random_stream s{7, 11};
  const int n = 1000000;
  double m = 0, v = 0, k4 = 0;
  for (int i = 0; i < n; ++i) {
    const double z = s.normal(std::uint64_t(i));
    REQUIRE(std::isfinite(z));
    m += z;
    v += z * z;
    k4 += z * z * z * z;
  }
  m /= n;
  v = v / n - m * m;
  k4 /= n;
  CHECK(std::abs(m) < 6e-3);
  CHECK(std::abs(v - 1.0) < 1e-2);
  CHECK(std::abs(k4 - 3.0) < 6e-2);  // the fourth moment of N(0, 1)
}

TEST_CASE("ternary draws: P(+1) = P(-1) = p over 1e6 draws") {
  const dw::random_stream s{99, 0};
  const int n = 1000000;
  for (double p : {1.0 / 6.0, 1.0 / (2.0 * std::sqrt(4096.0))}) {
    int neg = 0, pos = 0, zero = 0;
    for (int i = 0; i < n; ++i) {
      const float t = s.ternary(std::uint64_t(i), p);
      neg += t == -1.0f;
      pos += t == 1.0f;
      zero += t == 0.0f;
    }
    CHECK(neg + pos + zero == n);
    const double se = std::sqrt(p * (1 - p) / n);
    CHECK(std::abs(double(neg) / n - p) < 6 * se);
    CHECK(std::abs(double(pos) / n - p) < 6 * se);
  }
}

TEST_CASE("fill_entries and axpy_entries equal elementwise evaluation at any offset") {
  const dw::basis_entries e{dw::random_stream{5, 9}, dw::basis_law::uniform, 0.25f, 0.0};
  const dw::basis_entries t{dw::random_stream{5, 10}, dw::basis_law::ternary, 2.0f, 1.0 / 6};
  for (std::uint64_t first : {0, 1, 2, 3, 4, 5, 13}) {
    for (std::uint64_t n : {0, 1, 3, 4, 7, 33}) {
      std::vector<float> a(n), b(n, 1.0f);
      dw::fill_entries(e, first, n, a.data());
      dw::axpy_entries(0.5f, t, first, n, b.data());
      for (std::uint64_t j = 0; j < n; ++j) {
        CHECK(a[j] == e(first + j));
        CHECK(b[j] == 1.0f + 0.5f * t(first + j));
      }
    }
  }
}

TEST_CASE("the same entries come out bit-identical on two threads and two calls") {
  const dw::basis_entries e{dw::random_stream{123, 4}, dw::basis_law::uniform, 1.0f, 0.0};
  const std::size_t n = 100003;
  std::vector<float> a(n), b(n), c(n);
  std::thread t1([&] { dw::fill_entries(e, 17, n, a.data()); });
  std::thread t2([&] { dw::fill_entries(e, 17, n, b.data()); });
  t1.join();
  t2.join();
  dw::fill_entries(e, 17, n, c.data());
  CHECK(std::memcmp(a.data(), b.data(), n * sizeof(float)) == 0);
  CHECK(std::memcmp(a.data(), c.data(), n * sizeof(float)) == 0);
}
