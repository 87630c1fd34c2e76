// The lazy sum W + Δ₁ + Δ₂ and the closure rule for temporaries.
#include "test_util.hpp"

namespace dw = deltaw;
using dwt::MatD;

namespace {
MatD make(int r, int c, int seed) { return dwt::random(r, c, std::uint64_t(seed)); }
}  // namespace

TEST_CASE("sum of several LoRAs equals the dense sum") {
  const MatD W = make(21, 13, 1), X = make(5, 13, 2), G = make(5, 21, 3);
  const MatD B1 = make(21, 3, 4), A1 = make(3, 13, 5), B2 = make(21, 1, 6), A2 = make(1, 13, 7);
  const MatD B3 = make(21, 13, 8), A3 = make(13, 13, 9);
  auto e = dw::view(W) + dw::lora(B1, A1, dw::alpha(6)) + dw::rslora(B2, A2, dw::alpha(2)) +
           dw::lora(B3, A3, dw::scale(-0.25));
  const MatD ref = W + 2.0 * B1 * A1 + 2.0 * B2 * A2 - 0.25 * B3 * A3;
  CHECK(dwt::rel_err(dw::apply(e, X), X * ref.transpose()) < 1e-12);
  CHECK(dwt::rel_err(dw::apply_transposed(e, G), G * ref) < 1e-12);
  CHECK(dwt::rel_err(dw::materialize(e), ref) < 1e-12);
  CHECK(dw::parameter_count(e) == 3 * 34 + 1 * 34 + 13 * 34);
  CHECK(dw::flop_count(e, 5) == 2 * 5 * 21 * 13 + 2 * 5 * (3 + 1 + 13) * 34);
}

TEST_CASE("expressions built from temporaries own them (no dangling)") {
  const MatD W = make(12, 9, 1), X = make(4, 9, 2);
  MatD B = make(12, 2, 3), A = make(2, 9, 4);
  const MatD ref = W + 1.5 * B * A;
  auto e = dw::view(W) + dw::lora(make(12, 2, 3), make(2, 9, 4), dw::alpha(3));  // factors are temporaries
  MatD junk1 = make(12, 2, 99), junk2 = make(2, 9, 98);                         // reuse freed memory, if any
  CHECK(dwt::rel_err(dw::apply(e, X), X * ref.transpose()) < 1e-12);
  auto copy = e;  // copies share the owned factors
  CHECK(dwt::rel_err(dw::apply(copy, X), X * ref.transpose()) < 1e-12);
  // lvalue factors are viewed: changing them changes the expression
  auto lv = dw::lora(B, A, dw::alpha(3));
  B *= 2.0;
  CHECK(dwt::rel_err(dw::materialize(lv), 1.5 * B * A) < 1e-12);  // s = 3 / 2
  (void)junk1;
  (void)junk2;
}
