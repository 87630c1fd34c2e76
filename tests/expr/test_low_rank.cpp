// LoRA / rsLoRA against the dense materialisation in double, over random shapes
// (odd sizes, r = 1, r = min(in, out), tokens = 0, empty dimensions), both storage
// orders, float, double and bf16/fp16 storage; merge/unmerge bounds; errors.
#include <cmath>
#include <limits>

#include "test_util.hpp"

namespace dw = deltaw;
using dwt::ColMat;
using dwt::MatD;
using dwt::RowMat;

namespace {

struct shape {
  Eigen::Index out, in, r, tokens;
};
const shape shapes[] = {{1, 1, 1, 1},   {7, 5, 1, 3},    {13, 17, 4, 0}, {33, 20, 20, 9}, {20, 33, 20, 5},
                        {64, 48, 16, 31}, {6, 0, 2, 3}, {0, 5, 2, 3},   {301, 257, 8, 40}};

// The storage type's rounding of a double matrix, back in double (the reference sees the
// same inputs the library sees).
template <class T>
MatD rounded(const MatD& m) {
  MatD r(m.rows(), m.cols());
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j) r(i, j) = double(float(T(float(m(i, j)))));
  return r;
}
template <>
MatD rounded<double>(const MatD& m) {
  return m;
}
template <>
MatD rounded<float>(const MatD& m) {
  return m.cast<float>().cast<double>();
}

// Users hold bf16/fp16 weights as Eigen::bfloat16 / Eigen::half matrices; view() maps
// them to deltaw::bf16 / deltaw::fp16 without copying.
template <class T>
struct eigen_storage {
  using type = T;
};
template <>
struct eigen_storage<dw::bf16> {
  using type = Eigen::bfloat16;
};
template <>
struct eigen_storage<dw::fp16> {
  using type = Eigen::half;
};
template <class T>
using es_t = typename eigen_storage<T>::type;

template <class T>
RowMat<es_t<T>> store(const MatD& m) {
  return m.cast<float>().cast<es_t<T>>();
}
template <>
RowMat<double> store<double>(const MatD& m) {
  return m;
}

template <class M>
MatD as_double(const M& m) {
  if constexpr (std::is_same_v<typename M::Scalar, double>) return m;
  else return m.template cast<float>().template cast<double>();
}

template <class T>
double tolerance() {
  return std::is_same_v<T, double> ? 1e-12 : 2e-5;  // fp32 accumulation for float/bf16/fp16
}

// Runs every operation for one shape, storage type T and layout, against double references.
template <class T, bool ColMajorOperands>
void check_shape(const shape& sh, std::uint64_t seed) {
  CAPTURE(sh.out);
  CAPTURE(sh.in);
  CAPTURE(sh.r);
  CAPTURE(sh.tokens);
  const MatD W0 = rounded<T>(dwt::random(sh.out, sh.in, seed));
  const MatD B0 = rounded<T>(dwt::random(sh.out, sh.r, seed + 1));
  const MatD A0 = rounded<T>(dwt::random(sh.r, sh.in, seed + 2));
  const MatD X0 = rounded<T>(dwt::random(sh.tokens, sh.in, seed + 3));
  const MatD G0 = rounded<T>(dwt::random(sh.tokens, sh.out, seed + 4));
  const double alpha = 3.0;
  const double s = alpha / double(sh.r);
  const MatD dW = s * B0 * A0;

  using Store = std::conditional_t<ColMajorOperands, ColMat<es_t<T>>, RowMat<es_t<T>>>;
  Store W = store<T>(W0), B = store<T>(B0), A = store<T>(A0), X = store<T>(X0), G = store<T>(G0);
  using C = dw::accum_t<T>;
  const double tol = tolerance<T>();

  auto l = dw::lora(B, A, dw::alpha(alpha));
  CHECK(l.scale() == doctest::Approx(s));
  CHECK(l.rank() == sh.r);
  CHECK(dw::parameter_count(l) == sh.r * (sh.out + sh.in));
  CHECK(dw::flop_count(l, sh.tokens) == 2 * sh.tokens * sh.r * (sh.out + sh.in));
  auto e = dw::view(W) + l;

  // apply, allocating and into a caller's column-major output
  const auto Y = dw::apply(e, X);
  static_assert(std::is_same_v<typename std::remove_cvref_t<decltype(Y)>::Scalar, C>);
  CHECK(dwt::rel_err(Y, X0 * (W0 + dW).transpose()) < tol);
  ColMat<C> Ycm(sh.tokens, sh.out);
  dw::apply(e, X, Ycm);
  CHECK(dwt::rel_err(Ycm, X0 * (W0 + dW).transpose()) < tol);
  CHECK(dwt::rel_err(dw::apply(l, X), X0 * dW.transpose()) < tol);
  CHECK(dwt::rel_err(dw::apply(dw::view(W), X), X0 * W0.transpose()) < tol);

  // apply_transposed: G·(W + ΔW)
  CHECK(dwt::rel_err(dw::apply_transposed(e, G), G0 * (W0 + dW)) < tol);
  CHECK(dwt::rel_err(dw::apply_transposed(l, G), G0 * dW) < tol);

  // materialize and the Frobenius norm without the dense matrix
  CHECK(dwt::rel_err(dw::materialize(l), dW) < tol);
  CHECK(dwt::rel_err(dw::materialize(e), W0 + dW) < tol);
  CHECK(dw::frobenius_norm(l) == doctest::Approx(dW.norm()).epsilon(std::is_same_v<T, double> ? 1e-12 : 1e-5));
}

template <class T, bool Col>
void check_all_shapes() {
  std::uint64_t seed = 100;
  for (const auto& sh : shapes) check_shape<T, Col>(sh, seed += 10);
}

}  // namespace

TEST_CASE("LoRA matches the dense reference: double, row-major") { check_all_shapes<double, false>(); }
TEST_CASE("LoRA matches the dense reference: double, column-major operands") { check_all_shapes<double, true>(); }
TEST_CASE("LoRA matches the dense reference: float, row-major") { check_all_shapes<float, false>(); }
TEST_CASE("LoRA matches the dense reference: float, column-major operands") { check_all_shapes<float, true>(); }
TEST_CASE("LoRA with bf16 storage matches the double reference on the rounded inputs within 2e-5") {
  check_all_shapes<dw::bf16, false>();
  check_all_shapes<dw::bf16, true>();
}
TEST_CASE("LoRA with fp16 storage matches the double reference on the rounded inputs within 2e-5") {
  check_all_shapes<dw::fp16, false>();
}

TEST_CASE("mixed storage: float activations with double weights compute in double") {
  const MatD W0 = dwt::random(9, 11, 1), B0 = dwt::random(9, 3, 2), A0 = dwt::random(3, 11, 3);
  const RowMat<float> X = dwt::random<RowMat<float>>(4, 11, 4);
  auto Y = dw::apply(dw::view(W0) + dw::lora(B0, A0, dw::scale(0.5)), X);
  static_assert(std::is_same_v<decltype(Y)::Scalar, double>);
  CHECK(dwt::rel_err(Y, X.cast<double>() * (W0 + 0.5 * B0 * A0).transpose()) < 1e-12);
}

TEST_CASE("rsLoRA scales by alpha / sqrt(r)") {
  const MatD B = dwt::random(8, 4, 1), A = dwt::random(4, 6, 2), X = dwt::random(3, 6, 3);
  auto l = dw::rslora(B, A, dw::alpha(8));
  CHECK(l.scale() == doctest::Approx(4.0));
  CHECK(dwt::rel_err(dw::apply(l, X), X * (4.0 * B * A).transpose()) < 1e-12);
}

TEST_CASE("strided views without a unit stride are accepted (copied) and give the same result") {
  const MatD W0 = dwt::random(10, 12, 1), B0 = dwt::random(10, 2, 2), A0 = dwt::random(2, 12, 3);
  const MatD Xbig = dwt::random(5, 24, 4);
  // X = every other column of Xbig: strides (24, 2)
  auto Xv = dw::view(Xbig.data(), 5, 12, 24, 2);
  const MatD X = Xbig(Eigen::all, Eigen::seq(0, 23, 2));
  CHECK(dwt::rel_err(dw::apply(dw::view(W0) + dw::lora(B0, A0, dw::scale(2)), Xv), X * (W0 + 2 * B0 * A0).transpose()) <
        1e-12);
}

namespace {
template <class T>
void merge_roundtrip(double bound_ulps_of_storage) {
  const int out = 67, in = 45, r = 5;
  const MatD W0 = rounded<T>(dwt::random(out, in, 21));
  const MatD B0 = rounded<T>(dwt::random(out, r, 22));
  const MatD A0 = rounded<T>(dwt::random(r, in, 23));
  RowMat<es_t<T>> W = store<T>(W0);
  const RowMat<es_t<T>> B = store<T>(B0), A = store<T>(A0);
  auto l = dw::lora(B, A, dw::alpha(10));
  const MatD dW = l.scale() * B0 * A0;
  dw::merge(W, l);
  const MatD merged = as_double(W);
  CHECK(dwt::rel_err(merged, W0 + dW) < bound_ulps_of_storage);
  dw::unmerge(W, l);
  const MatD back = as_double(W);
  // Elementwise: each of merge and unmerge rounds once to the storage type.
  const double u = bound_ulps_of_storage;
  const MatD bound = u * (W0.cwiseAbs() + 2.0 * (W0 + dW).cwiseAbs()).array() + 1e-300;
  CHECK(((back - W0).cwiseAbs().array() <= bound.array()).all());
}
}  // namespace

TEST_CASE("merge then unmerge restores W: double exactly to 1e-15, float within 2^-23, bf16 within 2^-8") {
  SUBCASE("double") { merge_roundtrip<double>(1e-15); }
  SUBCASE("float") { merge_roundtrip<float>(std::ldexp(1.0, -23)); }
  SUBCASE("bf16") { merge_roundtrip<dw::bf16>(std::ldexp(1.0, -8)); }
}

TEST_CASE("merge into a column-major weight and into a view") {
  ColMat<double> W = dwt::random<ColMat<double>>(9, 7, 5);
  const ColMat<double> W0 = W;
  const MatD B = dwt::random(9, 3, 6), A = dwt::random(3, 7, 7);
  dw::merge(dw::view(W), dw::lora(B, A, dw::scale(1.5)));
  CHECK(dwt::rel_err(W, W0 + 1.5 * B * A) < 1e-14);
}

TEST_CASE("merge_checked refuses a non-finite result and leaves W untouched") {
  RowMat<float> W = dwt::random<RowMat<float>>(300, 20, 1);
  const RowMat<float> W0 = W;
  RowMat<float> B = dwt::random<RowMat<float>>(300, 2, 2);
  const RowMat<float> A = dwt::random<RowMat<float>>(2, 20, 3);
  B(290, 1) = std::numeric_limits<float>::infinity();  // in the second panel of 256 rows
  dwt::check_throws_with<dw::non_finite_error>([&] { dw::merge_checked(W, dw::lora(B, A, dw::scale(1))); },
                                               {"merge_checked", "W(290", "unchanged"});
  CHECK((W.array() == W0.array()).all());
  B(290, 1) = 1e38f;  // finite factors, overflowing product
  RowMat<float> A2 = A;
  A2.setConstant(1e38f);
  CHECK_THROWS_AS(dw::merge_checked(W, dw::lora(B, A2, dw::scale(1))), dw::non_finite_error);
  CHECK((W.array() == W0.array()).all());
  B(290, 1) = 0.5f;
  dw::merge_checked(W, dw::lora(B, A, dw::scale(1)));
  CHECK(dwt::rel_err(W, W0.cast<double>() + (B * A).cast<double>()) < 1e-6);
}

TEST_CASE("bad inputs raise specific, readable errors") {
  const MatD W = dwt::random(8, 6, 1), B = dwt::random(8, 3, 2), A = dwt::random(3, 6, 3), A4 = dwt::random(4, 6, 4);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::lora(B, A4, dw::alpha(1)); },
                                          {"deltaw::lora", "B [8, 3]", "A [4, 6]"});
  const MatD B0(8, 0), A0(0, 6);
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::lora(B0, A0, dw::alpha(1)); }, {"rank", "at least 1"});
  dwt::check_throws_with<dw::non_finite_error>(
      [&] { (void)dw::lora(B, A, dw::scale(std::numeric_limits<double>::quiet_NaN())); }, {"scale", "finite"});
  dwt::check_throws_with<dw::non_finite_error>(
      [&] { (void)dw::lora(B, A, dw::alpha(std::numeric_limits<double>::infinity())); }, {"alpha", "finite"});
  dwt::check_throws_with<dw::null_data_error>(
      [&] { (void)dw::lora(dw::view(static_cast<double*>(nullptr), 8, 3), A, dw::alpha(1)); }, {"null data"});
  const MatD Wt = dwt::random(6, 8, 5);
  dwt::check_throws_with<dw::shape_error>([&] { (void)(dw::view(Wt) + dw::lora(B, A, dw::alpha(1))); },
                                          {"W + ΔW", "[6, 8]", "[8, 6]"});
  auto e = dw::view(W) + dw::lora(B, A, dw::alpha(1));
  const MatD Xbad = dwt::random(4, 7, 6);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::apply(e, Xbad); }, {"deltaw::apply", "X is [4, 7]", "6 columns"});
  const MatD X = dwt::random(4, 6, 7);
  MatD Ybad(4, 7);
  dwt::check_throws_with<dw::shape_error>([&] { dw::apply(e, X, Ybad); }, {"output is [4, 7]", "[4, 8]"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::apply_transposed(e, X); }, {"apply_transposed", "8 columns"});
  MatD W2 = dwt::random(8, 5, 8);
  dwt::check_throws_with<dw::shape_error>([&] { dw::merge(W2, dw::lora(B, A, dw::alpha(1))); }, {"merge", "[8, 5]"});
  // every error derives from deltaw::error
  CHECK_THROWS_AS(dw::merge(W2, dw::lora(B, A, dw::alpha(1))), dw::error);
}
