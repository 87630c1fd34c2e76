// bf16/fp16 conversions against Eigen's independent implementations, plus fixed points.
#include <Eigen/Core>
#include <cmath>
#include <limits>
#include <random>

#include "test_util.hpp"

namespace dw = deltaw;

TEST_CASE("bf16 matches Eigen::bfloat16 rounding on random and special floats") {
  std::mt19937 g(7);
  std::uniform_int_distribution<std::uint32_t> bits;
  int checked = 0;
  for (int i = 0; i < 200000; ++i) {
    std::uint32_t u = bits(g);
    float f;
    std::memcpy(&f, &u, 4);
    const dw::bf16 mine(f);
    const Eigen::bfloat16 ref(f);
    if (std::isnan(f)) {
      CHECK(std::isnan(float(mine)));
      continue;
    }
    REQUIRE(mine.bits == Eigen::numext::bit_cast<std::uint16_t>(ref));
    ++checked;
  }
  CHECK(checked > 190000);
  CHECK(dw::bf16(1.0f).bits == 0x3f80);
  CHECK(float(dw::bf16(-2.5f)) == -2.5f);
  CHECK(std::isinf(float(dw::bf16(std::numeric_limits<float>::infinity()))));
}

TEST_CASE("fp16 matches Eigen::half rounding, including subnormals and overflow") {
  std::mt19937 g(11);
  std::uniform_int_distribution<std::uint32_t> bits;
  std::uniform_real_distribution<float> small(-1e-4f, 1e-4f);
  for (int i = 0; i < 200000; ++i) {
    std::uint32_t u = bits(g);
    float f;
    std::memcpy(&f, &u, 4);
    if (i % 2) f = small(g);  // many values in fp16's subnormal range
    if (std::isnan(f)) continue;
    const dw::fp16 mine(f);
    const Eigen::half ref(f);
    INFO("f = " << f);
    REQUIRE(mine.bits == Eigen::numext::bit_cast<std::uint16_t>(ref));
    // and back: exact for every representable half
    REQUIRE(dw::fp16::to_float(mine.bits) == float(ref));
  }
  CHECK(dw::fp16(1.0f).bits == 0x3c00);
  CHECK(dw::fp16(65504.0f).bits == 0x7bff);
  CHECK(dw::fp16(65520.0f).bits == 0x7c00);  // rounds to +inf
  CHECK(std::isnan(float(dw::fp16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST_CASE("compute types: fp32 accumulates 16-bit storage, double stays double") {
  static_assert(std::is_same_v<dw::accum_t<dw::bf16>, float>);
  static_assert(std::is_same_v<dw::accum_t<dw::fp16>, float>);
  static_assert(std::is_same_v<dw::compute_t<float, double>, double>);
  static_assert(std::is_same_v<dw::compute_t<dw::bf16, float>, float>);
  CHECK(std::string(dw::dtype_name<dw::bf16>()) == "bfloat16");
}
