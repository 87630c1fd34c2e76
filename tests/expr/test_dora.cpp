// DoRA against a dense reference: W' = diag(m / ‖W + sBA‖_row)·(W + sBA).
#include "test_util.hpp"

namespace dw = deltaw;
using dwt::ColMat;
using dwt::MatD;
using dwt::RowMat;

namespace {
MatD dora_dense(const MatD& W, const MatD& B, const MatD& A, double s, const Eigen::VectorXd& m) {
  const MatD V = W + s * B * A;
  Eigen::VectorXd n(V.rows());
  for (Eigen::Index o = 0; o < V.rows(); ++o) n(o) = std::sqrt(V.row(o).squaredNorm());
  return (m.array() / n.array()).matrix().asDiagonal() * V;
}
}  // namespace

TEST_CASE("DoRA: magnitude, apply, transposed apply, materialize, merge, unmerge vs dense (double)") {
  struct sh {
    int out, in, r, tokens;
  };
  for (auto [out, in, r, tokens] : {sh{1, 1, 1, 1}, sh{7, 5, 2, 3}, sh{33, 20, 20, 0}, sh{300, 41, 6, 17}}) {
    CAPTURE(out);
    CAPTURE(in);
    MatD W = dwt::random(out, in, 1);
    const MatD W0 = W;
    const MatD B = dwt::random(out, r, 2), A = dwt::random(r, in, 3), X = dwt::random(tokens, in, 4),
               G = dwt::random(tokens, out, 5);
    const double s = 2.0 / r;
    auto l = dw::lora(B, A, dw::alpha(2));
    const Eigen::VectorXd m0 = dw::dora_magnitude(W, l);
    const MatD V = W0 + s * B * A;
    CHECK(dwt::rel_err(m0, V.rowwise().norm()) < 1e-13);
    Eigen::VectorXd m = m0;
    m.array() *= 1.0 + 0.3 * dwt::random(out, 1, 6).array();  // trained magnitude
    const MatD Wp = dora_dense(W0, B, A, s, m);

    auto d = dw::dora(W, l, m);
    CHECK(dw::parameter_count(d) == r * (out + in) + out);
    auto e = dw::view(W) + d;
    CHECK(dwt::rel_err(dw::apply(e, X), X * Wp.transpose()) < 1e-12);
    CHECK(dwt::rel_err(dw::apply(d, X), X * (Wp - W0).transpose()) < 1e-12);
    CHECK(dwt::rel_err(dw::apply_transposed(e, G), G * Wp) < 1e-12);
    CHECK(dwt::rel_err(dw::apply_transposed(d, G), G * (Wp - W0)) < 1e-12);
    CHECK(dwt::rel_err(dw::materialize(d), Wp - W0) < 1e-12);
    CHECK(dw::frobenius_norm(d) == doctest::Approx((Wp - W0).norm()).epsilon(1e-12));

    // With the initial magnitude, DoRA's output equals plain LoRA's.
    auto d0 = dw::dora(W, l, m0);
    CHECK(dwt::rel_err(dw::apply(dw::view(W) + d0, X), X * V.transpose()) < 1e-12);

    dw::merge(W, d);
    CHECK(dwt::rel_err(W, Wp) < 1e-13);
    dw::unmerge(W, d);
    CHECK(dwt::rel_err(W, W0) < 1e-13);
  }
}

TEST_CASE("DoRA in float with a column-major weight, and beside a second LoRA in the sum") {
  ColMat<float> W = dwt::random<ColMat<float>>(40, 24, 11);
  const MatD W0 = W.cast<double>();
  const RowMat<float> B = dwt::random<RowMat<float>>(40, 4, 12), A = dwt::random<RowMat<float>>(4, 24, 13);
  const RowMat<float> B2 = dwt::random<RowMat<float>>(40, 2, 14), A2 = dwt::random<RowMat<float>>(2, 24, 15);
  const RowMat<float> X = dwt::random<RowMat<float>>(9, 24, 16);
  auto l = dw::lora(B, A, dw::alpha(8));
  Eigen::VectorXf m = dw::dora_magnitude(W, l);
  m *= 1.1f;
  const MatD Wp = dora_dense(W0, B.cast<double>(), A.cast<double>(), 2.0, m.cast<double>());
  const MatD dW2 = 0.5 * B2.cast<double>() * A2.cast<double>();
  auto e = dw::view(W) + dw::lora(B2, A2, dw::scale(0.5)) + dw::dora(W, l, m);
  CHECK(dwt::rel_err(dw::apply(e, X), X.cast<double>() * (Wp + dW2).transpose()) < 2e-5);
  CHECK(dwt::rel_err(dw::materialize(e), Wp + dW2) < 2e-5);
}

TEST_CASE("DoRA merges only into its own weight") {
  MatD W = dwt::random(6, 5, 1), Wother = dwt::random(6, 5, 2);
  const MatD B = dwt::random(6, 2, 3), A = dwt::random(2, 5, 4);
  auto l = dw::lora(B, A, dw::alpha(2));
  const Eigen::VectorXd m = dw::dora_magnitude(W, l);
  auto d = dw::dora(W, l, m);
  dwt::check_throws_with<dw::argument_error>([&] { dw::merge(Wother, d); }, {"merge", "DoRA", "built on"});
  const Eigen::VectorXd mbad = Eigen::VectorXd::Ones(5);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::dora(W, l, mbad); }, {"magnitude", "5", "6 rows"});
}
