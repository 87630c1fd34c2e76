// SPDX-License-Identifier: MIT
// RoAd (issue 16) against dense references in double built here: the dense rotation R
// [out, out] assembled as PEFT's _get_delta_weight does (diag(α·cos θ) plus the swapped,
// sign-flipped α·sin θ), W' = R·W. apply, apply_transposed, materialize, merge / unmerge
// round trip, merge_checked, frobenius_norm, a lazy sum with LoRA, the three variants and
// several group sizes, float and bf16 weights; the errors; the largest allocation of apply
// / merge below one out × in matrix.
#include <deltaw/deltaw.hpp>

#include "alloc_counter.hpp"
#include "expr/update_checks.hpp"
#include "test_util.hpp"

namespace {
namespace dw = deltaw;
using dwt::MatD;

/// PEFT's R for (variant, group size g), from θ and α as stored.
MatD road_ref(dw::road_variant v, Eigen::Index g, Eigen::Index out, const Eigen::VectorXd& th, const Eigen::VectorXd& al) {
  const Eigen::Index h = g / 2;
  Eigen::VectorXd first(out), second(out);
  for (Eigen::Index grp = 0; grp < out / g; ++grp)
    for (Eigen::Index p = 0; p < g; ++p) {
      const Eigen::Index o = grp * g + p;
      if (v == dw::road_variant::road_1) {  // reshape(-1, h).repeat_interleave(2, dim=0)
        const Eigen::Index i = grp * h + p % h;
        first[o] = al[i] * std::cos(th[i]);
        second[o] = al[i] * std::sin(th[i]);
      } else if (v == dw::road_variant::road_2) {
        first[o] = al[o] * std::cos(th[o]);
        second[o] = al[o] * std::sin(th[o]);
      } else {  // reshape(-1, 2, g): [:, 0] for cos, [:, 1] for sin
        first[o] = al[grp * 2 * g + p] * std::cos(th[grp * 2 * g + p]);
        second[o] = al[grp * 2 * g + g + p] * std::sin(th[grp * 2 * g + g + p]);
      }
    }
  MatD R = first.asDiagonal();
  for (Eigen::Index o = 0; o < out; ++o) {
    const bool lo = o % g < h;
    if (lo) R(o, o + h) -= second[o];
    else R(o, o - h) += second[o];
  }
  return R;
}

}  // namespace

TEST_CASE("RoAd: W' = R·W with 2 × 2 rotations of output pairs, every operation against dense") {
  std::mt19937_64 g(1818);
  const dw::road_variant vs[] = {dw::road_variant::road_1, dw::road_variant::road_2, dw::road_variant::road_4};
  for (int trial = 0; trial < 12; ++trial) {
    const auto v = vs[trial % 3];
    const Eigen::Index gs = 2 * std::uniform_int_distribution<int>(1, 3)(g);
    const Eigen::Index out = gs * std::uniform_int_distribution<int>(1, 3)(g), in = std::uniform_int_distribution<int>(1, 9)(g);
    const Eigen::Index n = dw::road_parameter_size(v, out);
    const Eigen::VectorXd th = dwt::random<MatD>(n, 1, 10 + trial).col(0) * 2;
    const Eigen::VectorXd al = (dwt::random<MatD>(n, 1, 20 + trial).col(0).array() + 1.5).matrix();
    MatD W = dwt::random<MatD>(out, in, 30 + trial);
    const MatD R = road_ref(v, gs, out, th, al), Wp = R * W, dW = Wp - W;
    INFO("trial " << trial << " " << dw::road_variant_name(v) << " g " << gs << " out " << out << " in " << in);
    auto u = dw::road(W, th, al, v, gs);
    CHECK(u.parameter_count() == 2 * n);
    dwt::check_update_ops(u, dW, 40 + trial);
    dwt::check_update_over_weight(u, W, dW, 60 + trial, {.unmerge_tol = 1e-10, .reads_weight = "RoAd"});
  }
  // float θ, α and W; a bf16 W merged in panels of 256 rows (group_size 64 divides them).
  const Eigen::Index out = 512, in = 5;
  const dwt::MatF Wf = dwt::random<dwt::MatF>(out, in, 90);
  const Eigen::VectorXf thf = dwt::random<dwt::MatF>(out, 1, 91).col(0), alf = dwt::random<dwt::MatF>(out, 1, 92).col(0);
  const MatD R = road_ref(dw::road_variant::road_2, 64, out, thf.cast<double>(), alf.cast<double>());
  const dwt::MatF Xf = dwt::random<dwt::MatF>(3, in, 93);
  CHECK(dwt::rel_err(dw::apply(dw::view(Wf) + dw::road(Wf, thf, alf, dw::road_variant::road_2), Xf).cast<double>(),
                     Xf.cast<double>() * (R * Wf.cast<double>()).transpose()) < 1e-5);
  std::vector<dw::bf16> wb(std::size_t(out * in));
  for (std::size_t i = 0; i < wb.size(); ++i) wb[i] = dw::bf16(Wf.data()[i]);
  const auto Wb = dw::view(wb.data(), out, in);
  MatD Wbd(out, in);
  for (Eigen::Index i = 0; i < out; ++i)
    for (Eigen::Index j = 0; j < in; ++j) Wbd(i, j) = double(float(wb[std::size_t(i * in + j)]));
  const MatD want = R * Wbd;
  const auto ub = dw::road(dw::matrix_view<const dw::bf16>(Wb), thf, alf, dw::road_variant::road_2);
  dw::merge(Wb, ub);
  for (Eigen::Index i = 0; i < out; ++i)
    for (Eigen::Index j = 0; j < in; ++j) Wbd(i, j) = double(float(wb[std::size_t(i * in + j)]));
  CHECK(dwt::rel_err(Wbd, want) < 1e-2);
  // group_size 6 does not divide the 256-row panels of a bf16 weight.
  std::vector<dw::bf16> wb6(std::size_t(264 * in), dw::bf16(1.0f));
  const auto Wb6 = dw::view(wb6.data(), 264, in);
  const Eigen::VectorXf t6 = Eigen::VectorXf::Constant(264, 0.3f), a6 = Eigen::VectorXf::Ones(264);
  const auto u6 = dw::road(dw::matrix_view<const dw::bf16>(Wb6), t6, a6, dw::road_variant::road_2, 6);
  dwt::check_throws_with<dw::argument_error>([&] { dw::merge(Wb6, u6); }, {"RoAd", "group_size 6", "dividing 256"});
}

TEST_CASE("RoAd: errors") {
  const MatD W = dwt::random<MatD>(8, 3, 1);
  const Eigen::VectorXd v8 = Eigen::VectorXd::Ones(8), v4 = Eigen::VectorXd::Ones(4);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::road(W, v8, v8, dw::road_variant::road_1, 4); },
                                          {"road_1", "4 entries", "got 8 and 8"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::road(W, v8, v4, dw::road_variant::road_2, 4); }, {"got 8 and 4"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::road(W, v8, v8, dw::road_variant::road_2, 3); },
                                             {"group_size must be even"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::road(W, v8, v8, dw::road_variant::road_2, 16); },
                                          {"multiple of group_size", "W [8, 3]"});
  // α = 0 on a pair: merge loses the rows, unmerge refuses.
  Eigen::VectorXd a = v8;
  a[1] = 0;
  a[3] = 0;
  MatD W2 = W;
  auto u = dw::road(W2, v8, a, dw::road_variant::road_2, 4);
  dw::merge(W2, u);
  dwt::check_throws_with<dw::argument_error>([&] { dw::unmerge(W2, u); }, {"features 1 and 3", "singular"});
}

TEST_CASE("RoAd: no apply, merge or norm allocates out × in") {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("skipped: allocation counting is unavailable under sanitizers");
    return;
  }
  constexpr Eigen::Index out = 768, in = 1024, T = 64;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);
  using Mat = dwt::RowMat<float>;
  Mat W = dwt::random<Mat>(out, in, 1);
  const Mat X = dwt::random<Mat>(T, in, 2), G = dwt::random<Mat>(T, out, 3);
  const Eigen::VectorXf th = dwt::random<Mat>(out / 2, 1, 4).col(0), al = dwt::random<Mat>(out / 2, 1, 5).col(0);
  Mat Y(T, out), O(T, in);
  auto u = dw::road(W, th, al, dw::road_variant::road_1);
  CHECK(dwt::largest_allocation([&] { dw::apply(dw::view(W) + u, X, Y); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::apply(u, X, Y); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::apply_transposed(dw::view(W) + u, G, O); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::apply_transposed(u, G, O); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::merge(W, u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::unmerge(W, u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::frobenius_norm(u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::materialize(u); }) >= dense_bytes);
}
