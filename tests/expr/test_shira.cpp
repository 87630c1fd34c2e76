// SPDX-License-Identifier: MIT
// SHiRA (issue 16) against dense references in double built here by scattering the values
// (PEFT's sparse_coo_tensor, never deltaw's materialize): apply, apply_transposed,
// materialize, merge / unmerge round trip, merge_checked, frobenius_norm, in a lazy sum with
// LoRA, unsorted patterns, empty rows, nnz = 0 and nnz = out·in, float; the errors; the
// largest allocation of apply / merge below one out × in matrix.
#include <deltaw/deltaw.hpp>

#include <numeric>

#include "alloc_counter.hpp"
#include "expr/update_checks.hpp"
#include "test_util.hpp"

namespace {
namespace dw = deltaw;
using dwt::MatD;

/// nnz distinct random positions of an out × in matrix, in random order.
void random_pattern(std::mt19937_64& g, Eigen::Index out, Eigen::Index in, Eigen::Index nnz, std::vector<std::int32_t>& rows,
                    std::vector<std::int32_t>& cols) {
  std::vector<Eigen::Index> all(std::size_t(out * in));
  std::iota(all.begin(), all.end(), Eigen::Index(0));
  std::shuffle(all.begin(), all.end(), g);
  rows.clear();
  cols.clear();
  for (Eigen::Index k = 0; k < nnz; ++k) {
    rows.push_back(std::int32_t(all[std::size_t(k)] / in));
    cols.push_back(std::int32_t(all[std::size_t(k)] % in));
  }
}

MatD shira_ref(Eigen::Index out, Eigen::Index in, const std::vector<std::int32_t>& rows, const std::vector<std::int32_t>& cols,
               const Eigen::VectorXd& v, double s) {
  MatD D = MatD::Zero(out, in);
  for (std::size_t k = 0; k < rows.size(); ++k) D(rows[k], cols[k]) += s * v[Eigen::Index(k)];
  return D;
}

}  // namespace

TEST_CASE("SHiRA: ΔW[rows[k], cols[k]] = s·v[k], every operation against dense") {
  std::mt19937_64 g(1717);
  for (int trial = 0; trial < 12; ++trial) {
    const auto out = std::uniform_int_distribution<int>(1, 9)(g), in = std::uniform_int_distribution<int>(1, 11)(g);
    const Eigen::Index nnz = trial == 0 ? 0 : trial == 1 ? out * in : std::uniform_int_distribution<int>(1, out * in)(g);
    std::vector<std::int32_t> rows, cols;
    random_pattern(g, out, in, nnz, rows, cols);
    const Eigen::VectorXd v = dwt::random<MatD>(nnz, 1, 10 + trial).col(0);
    const double s = trial % 3 == 0 ? 1.0 : 0.25 + trial;
    MatD W = dwt::random<MatD>(out, in, 20 + trial);
    const MatD dW = shira_ref(out, in, rows, cols, v, s);
    INFO("trial " << trial << " out " << out << " in " << in << " nnz " << nnz);
    auto u = dw::shira(out, in, std::span<const std::int32_t>(rows), std::span<const std::int32_t>(cols), v, dw::scale(s));
    CHECK(u.nnz() == nnz);
    CHECK(u.parameter_count() == nnz);
    CHECK(u.flop_count(3) == 6 * nnz);
    const std::vector<Eigen::Index> tokens{0, 1, 5, 37};
    dwt::check_update_ops(u, dW, 30 + trial, tokens);
    for (const Eigen::Index T : tokens) {  // column-major input and output: the strided paths
      const Eigen::MatrixXd Xc = dwt::random<MatD>(T, in, 30 + trial + T);
      Eigen::MatrixXd Yc(T, out);
      dw::apply(u, Xc, Yc);
      CHECK(dwt::rel_err(MatD(Yc), MatD(Xc) * dW.transpose()) < 1e-12);
    }
    CHECK(std::abs(dw::frobenius_norm(u) - dW.norm()) < 1e-12 * std::max(1.0, dW.norm()));
    dwt::check_update_over_weight(u, W, dW, 50 + trial, {.tokens = tokens, .unmerge_tol = 1e-14});
    // The same pattern shared with other values.
    const Eigen::VectorXd v2 = 2 * v;
    auto u2 = dw::shira(u.pattern(), v2, dw::scale(s));
    CHECK(dwt::rel_err(dw::materialize(u2), 2 * dW) < 1e-12);
  }
  // float values and a bf16 weight merged in panels (rows beyond the first panel).
  std::vector<std::int32_t> rows, cols;
  random_pattern(g, 300, 7, 500, rows, cols);
  const Eigen::VectorXf vf = dwt::random<dwt::MatF>(500, 1, 90).col(0);
  auto uf = dw::shira(300, 7, std::span<const std::int32_t>(rows), std::span<const std::int32_t>(cols), vf);
  const MatD dWf = shira_ref(300, 7, rows, cols, vf.cast<double>(), 1.0);
  const dwt::MatF Xf = dwt::random<dwt::MatF>(3, 7, 91);
  CHECK(dwt::rel_err(dw::apply(uf, Xf).cast<double>(), Xf.cast<double>() * dWf.transpose()) < 1e-5);
  std::vector<dw::bf16> wb(300 * 7, dw::bf16(0.0f));
  dw::merge(dw::view(wb.data(), 300, 7), uf);
  MatD Wbd(300, 7);
  for (Eigen::Index i = 0; i < 300; ++i)
    for (Eigen::Index j = 0; j < 7; ++j) Wbd(i, j) = double(float(wb[std::size_t(i * 7 + j)]));
  CHECK(dwt::rel_err(Wbd, dWf) < 1e-2);
}

TEST_CASE("SHiRA: errors") {
  const std::vector<std::int32_t> r{0, 1, 2}, c{0, 1, 1};
  const Eigen::VectorXd v = Eigen::VectorXd::Ones(3);
  auto sp = [](const std::vector<std::int32_t>& x) { return std::span<const std::int32_t>(x); };
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::shira(2, 4, sp(r), sp(c), v); }, {"row index 2", "[2, 4]"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::shira(3, 1, sp(r), sp(c), v); }, {"column index 1"});
  const std::vector<std::int32_t> r2{0, 1, 0}, c2{1, 1, 1};
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::shira(3, 4, sp(r2), sp(c2), v); },
                                             {"(0, 1) appears twice", "entries 0 and 2"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::shira(3, 4, sp(r), sp(c), Eigen::VectorXd(Eigen::VectorXd::Ones(2))); },
                                          {"3 entries", "2 values"});
  const std::vector<std::int32_t> c3{0, 1};
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::shira(3, 4, sp(r), sp(c3), v); }, {"3 row indices", "2 column"});
  const std::vector<double> rf{0, 1.5, 2}, cf{0, 1, 1};
  dwt::check_throws_with<dw::argument_error>(
      [&] { (void)dw::shira(3, 4, std::span<const double>(rf), std::span<const double>(cf), v); }, {"row index 1.5"});
  dwt::check_throws_with<dw::non_finite_error>([&] { (void)dw::shira(3, 4, sp(r), sp(c), v, dw::scale(std::nan(""))); },
                                               {"finite"});
}

TEST_CASE("SHiRA: no apply, merge or norm allocates out × in") {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("skipped: allocation counting is unavailable under sanitizers");
    return;
  }
  constexpr Eigen::Index out = 768, in = 1024, r = 8, T = 64;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);
  std::mt19937_64 g(5);
  std::vector<std::int32_t> rows, cols;
  random_pattern(g, out, in, r * (out + in), rows, cols);
  using Mat = dwt::RowMat<float>;
  Mat W = dwt::random<Mat>(out, in, 1);
  const Mat X = dwt::random<Mat>(T, in, 2), G = dwt::random<Mat>(T, out, 3);
  const Eigen::VectorXf v = dwt::random<dwt::MatF>(r * (out + in), 1, 4).col(0);
  Mat Y(T, out), O(T, in);
  auto u = dw::shira(out, in, std::span<const std::int32_t>(rows), std::span<const std::int32_t>(cols), v);
  CHECK(dwt::largest_allocation([&] { dw::apply(dw::view(W) + u, X, Y); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::apply(u, X, Y); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::apply_transposed(u, G, O); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::merge(W, u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::unmerge(W, u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::frobenius_norm(u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::materialize(u); }) >= dense_bytes);
}
