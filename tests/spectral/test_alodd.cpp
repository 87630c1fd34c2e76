// aLoDD (LoDD's adaptive boundary ratio) against independent references: jittered regular
// grids whose boundary nodes are known exactly (the paper's grid-structure assumption made
// true), a Gaussian blob whose convex-hull vertices must be boundary points (hull computed
// here by a monotone chain), the grid ratio and the PCA intrinsic dimension recomputed by
// hand on inputs with a known spectrum, and the two score-curve rules recomputed from the
// scores in plain loops.
#include "test_util.hpp"

#include <deltaw/spectral/lodd.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <vector>

namespace dw = deltaw;

namespace alodd_test {
using MatD = dwt::MatD;

/// A jittered grid of side^dim nodes (spacing 1, jitter uniform ±jitter per coordinate),
/// shifted by `offset` along the first axis, rotated in the (0, 1) plane by `angle`; the
/// indices of its boundary nodes (a coordinate at 0 or side − 1) are appended to `boundary`.
MatD grid(int side, int dim, double jitter, std::uint64_t seed, double offset, double angle,
          std::vector<Eigen::Index>& boundary, Eigen::Index first_index = 0) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(-jitter, jitter);
  Eigen::Index n = 1;
  for (int a = 0; a < dim; ++a) n *= side;
  MatD X(n, dim);
  for (Eigen::Index i = 0; i < n; ++i) {
    Eigen::Index rest = i;
    bool on_edge = false;
    for (int a = 0; a < dim; ++a) {
      const int c = int(rest % side);
      rest /= side;
      on_edge = on_edge || c == 0 || c == side - 1;
      X(i, a) = double(c) + u(g) + (a == 0 ? offset : 0.0);
    }
    if (dim >= 2) {
      const double x = X(i, 0), y = X(i, 1);
      X(i, 0) = std::cos(angle) * x - std::sin(angle) * y;
      X(i, 1) = std::sin(angle) * x + std::cos(angle) * y;
    }
    if (on_edge) boundary.push_back(first_index + i);
  }
  return X;
}

std::set<Eigen::Index> as_set(const std::vector<dw::index_t>& v) { return {v.begin(), v.end()}; }

/// The grid rule by hand: min(cap, 1 − (n^(1/d) − 2·c^(1/d))^d / n), the cap for a side ≤ 0.
double grid_ratio_by_hand(double n, double d, double c, double cap) {
  const double side = std::pow(n, 1.0 / d) - 2.0 * std::pow(c, 1.0 / d);
  if (side <= 0.0) return cap;
  return std::min(cap, 1.0 - std::pow(side, d) / n);
}

/// The count the score-curve rules choose, recomputed from the scores in plain loops.
Eigen::Index curve_rule_by_hand(const Eigen::VectorXd& scores, bool gap, double min_ratio, double max_ratio) {
  const Eigen::Index n = scores.size();
  std::vector<double> s(scores.data(), scores.data() + n);
  std::sort(s.begin(), s.end());
  Eigen::Index lo = (Eigen::Index)std::ceil(min_ratio * double(n) - 1e-9);
  if (lo < 1) lo = 1;
  Eigen::Index hi = (Eigen::Index)std::floor(max_ratio * double(n) + 1e-9);
  if (hi > n - 1) hi = n - 1;
  Eigen::Index best_c = lo;
  double best = -1e300;
  for (Eigen::Index c = lo; c <= hi; ++c) {
    double v;
    if (gap) {
      v = s[std::size_t(c)] - s[std::size_t(c - 1)];
    } else {
      const double y = (s[std::size_t(c)] - s[0]) / (s[std::size_t(n - 1)] - s[0]);
      v = y - double(c) / double(n - 1);
    }
    if (v > best) {
      best = v;
      best_c = c;
    }
  }
  return best_c;
}

/// Indices of the convex-hull vertices of 2-D points (Andrew's monotone chain, strict turns).
std::set<Eigen::Index> hull_2d(const MatD& X) {
  std::vector<Eigen::Index> idx(std::size_t(X.rows()));
  for (Eigen::Index i = 0; i < X.rows(); ++i) idx[std::size_t(i)] = i;
  std::sort(idx.begin(), idx.end(), [&](Eigen::Index a, Eigen::Index b) {
    return X(a, 0) < X(b, 0) || (X(a, 0) == X(b, 0) && X(a, 1) < X(b, 1));
  });
  auto cross = [&](Eigen::Index o, Eigen::Index a, Eigen::Index b) {
    return (X(a, 0) - X(o, 0)) * (X(b, 1) - X(o, 1)) - (X(a, 1) - X(o, 1)) * (X(b, 0) - X(o, 0));
  };
  std::vector<Eigen::Index> h;
  for (int pass = 0; pass < 2; ++pass) {
    const std::size_t start = h.size();
    for (std::size_t t = 0; t < idx.size(); ++t) {
      const Eigen::Index p = pass == 0 ? idx[t] : idx[idx.size() - 1 - t];
      while (h.size() >= start + 2 && cross(h[h.size() - 2], h[h.size() - 1], p) <= 0) h.pop_back();
      h.push_back(p);
    }
    h.pop_back();
  }
  return {h.begin(), h.end()};
}
}  // namespace alodd_test

TEST_CASE("aLoDD grid rule: the ratio and the intrinsic dimension against hand computation") {
  using alodd_test::grid_ratio_by_hand;
  CHECK(dw::alodd_grid_ratio(225, 2) == doctest::Approx(56.0 / 225.0).epsilon(1e-12));
  CHECK(dw::alodd_grid_ratio(1000, 3) == doctest::Approx(488.0 / 1000.0).epsilon(1e-12));
  CHECK(dw::alodd_grid_ratio(400, 2, 4) == doctest::Approx(144.0 / 400.0).epsilon(1e-12));  // 4 grids 10 × 10
  CHECK(dw::alodd_grid_ratio(64, 3) == 0.5);        // 1 − 8/64 capped
  CHECK(dw::alodd_grid_ratio(16, 2, 4, 0.3) == 0.3);  // side 4 − 2·2 = 0: every node a boundary node
  for (dw::index_t n : {50, 333, 2000})
    for (dw::index_t d : {2, 3, 5})
      for (dw::index_t c : {1, 3}) {
        CAPTURE(n);
        CAPTURE(d);
        CAPTURE(c);
        CHECK(dw::alodd_grid_ratio(n, d, c, 0.5) == doctest::Approx(grid_ratio_by_hand(double(n), double(d), double(c), 0.5)));
      }

  using alodd_test::MatD;
  std::vector<Eigen::Index> unused;
  // An exact (unjittered) grid is isotropic: the cumulative shares are j/D, so m = D − 1 for
  // the toolkit's strict "below 0.8" (D = 4: 0.25, 0.5, 0.75 < 0.8), capped by log2 n.
  CHECK(dw::alodd_intrinsic_dim(alodd_test::grid(3, 4, 0.0, 1, 0, 0, unused)) == 3);   // 81 points, log2 = 6.3
  CHECK(dw::alodd_intrinsic_dim(alodd_test::grid(10, 3, 0.0, 1, 0, 0, unused)) == 2);  // shares 1/3, 2/3 < 0.8
  CHECK(dw::alodd_intrinsic_dim(alodd_test::grid(6, 2, 0.0, 1, 0, 0, unused)) == 2);   // m = 1, floored at 2
  // a lower share: only the first quarter is below 0.5, m = 1, floored at 2
  CHECK(dw::alodd_intrinsic_dim(alodd_test::grid(3, 4, 0.0, 1, 0, 0, unused), 0.5) == 2);  // m = 1
  // log2 n caps it: the 8 rows of a Sylvester-Hadamard matrix without its constant column
  // are isotropic in 7-D (shares j/7, m = 5), but log2 8 = 3
  MatD hadamard(8, 7);
  for (int i = 0; i < 8; ++i)
    for (int j = 1; j < 8; ++j) {
      int bits = i & j, parity = 0;
      for (; bits; bits >>= 1) parity ^= bits & 1;
      hadamard(i, j - 1) = parity ? -1.0 : 1.0;
    }
  CHECK(dw::alodd_intrinsic_dim(hadamard) == 3);
  CHECK(dw::alodd_intrinsic_dim(hadamard, 0.3) == 2);  // m = 2 (1/7, 2/7 < 0.3)
  // points on a line: the first component holds everything, m = 0, d_I = 2
  MatD line(30, 3);
  for (Eigen::Index i = 0; i < 30; ++i) line.row(i) << double(i), 2.0 * double(i), -double(i);
  CHECK(dw::alodd_intrinsic_dim(line) == 2);
  // more features than points: the centred spectrum from the n × n Gram matrix gives the same
  // d_I as the covariance route (a 16-point isotropic set padded with zero features)
  MatD wide = MatD::Zero(16, 20);
  wide.leftCols(4) = alodd_test::grid(2, 4, 0.0, 1, 0, 0, unused);
  CHECK(dw::alodd_intrinsic_dim(wide) == dw::alodd_intrinsic_dim(MatD(wide.leftCols(4))));
  CHECK(dw::alodd_intrinsic_dim(wide) == 3);
  // shifted far from the origin: the centred spectrum is unchanged, while the toolkit's
  // uncentred X·Xᵀ/n is dominated by the mean direction (share > 0.8, m = 0, d_I = 2)
  const MatD shifted = wide.array() + 100.0;
  CHECK(dw::alodd_intrinsic_dim(shifted) == 3);
  CHECK(dw::alodd_intrinsic_dim(shifted, 0.8, true) == 2);
  MatD centred = wide;
  centred.leftCols(4).array() -= 0.5;  // zero-mean columns: the two spectra agree
  CHECK(dw::alodd_intrinsic_dim(centred, 0.8, true) == 3);
  CHECK(dw::alodd_intrinsic_dim(wide, 0.8, true) == 2);  // mean (½, ½, ½, ½): shares 0.625, 0.75 < 0.8
}

TEST_CASE("aLoDD grid rule: recovers the boundary of jittered grids exactly") {
  SUBCASE("one 15 × 15 square grid, rotated: d_I = 2 estimated, 56 boundary nodes") {
    std::vector<Eigen::Index> truth;
    const alodd_test::MatD X = alodd_test::grid(15, 2, 0.02, 7, 0.0, 0.3, truth);
    const auto r = dw::lodd_boundary_adaptive(X, {.lodd = {.k = 8}});
    CHECK(r.intrinsic_dim == 2);
    CHECK(r.ratio == doctest::Approx(56.0 / 225.0).epsilon(1e-12));
    REQUIRE(r.boundary.size() == truth.size());
    CHECK(alodd_test::as_set(r.boundary) == std::set<Eigen::Index>(truth.begin(), truth.end()));
    // lowest first, and the threshold separates the two sets
    for (std::size_t i = 1; i < r.boundary.size(); ++i) CHECK(r.scores(r.boundary[i - 1]) <= r.scores(r.boundary[i]));
    for (Eigen::Index i = 0; i < X.rows(); ++i)
      CHECK((r.scores(i) < r.threshold) == (std::find(truth.begin(), truth.end(), i) != truth.end()));
    MESSAGE("aLoDD demo, 15x15 jittered grid, k = 8: d_I = ", r.intrinsic_dim, ", ratio = ", r.ratio, ", ",
            r.boundary.size(), " of ", X.rows(), " points, threshold = ", r.threshold, " (true boundary: ",
            truth.size(), ", all found)");
  }
  SUBCASE("four separated 10 × 10 grids, clusters = 4: 144 boundary nodes") {
    std::vector<Eigen::Index> truth;
    alodd_test::MatD X(400, 2);
    for (int c = 0; c < 4; ++c)
      X.middleRows(100 * c, 100) = alodd_test::grid(10, 2, 0.02, 11 + std::uint64_t(c), 30.0 * c, 0.0, truth, 100 * c);
    const auto r = dw::lodd_boundary_adaptive(X, {.lodd = {.k = 8}, .clusters = 4, .intrinsic_dim = 2});
    CHECK(r.ratio == doctest::Approx(144.0 / 400.0).epsilon(1e-12));
    REQUIRE(r.boundary.size() == 144);
    CHECK(alodd_test::as_set(r.boundary) == std::set<Eigen::Index>(truth.begin(), truth.end()));
  }
  SUBCASE("a 10 × 10 × 10 cube, intrinsic_dim = 3 given: 488 boundary nodes") {
    std::vector<Eigen::Index> truth;
    const alodd_test::MatD X = alodd_test::grid(10, 3, 0.01, 5, 0.0, 0.2, truth);
    const auto r = dw::lodd_boundary_adaptive(X, {.lodd = {.k = 26}, .intrinsic_dim = 3});
    CHECK(r.intrinsic_dim == 3);
    REQUIRE(r.boundary.size() == 488);
    CHECK(alodd_test::as_set(r.boundary) == std::set<Eigen::Index>(truth.begin(), truth.end()));
    // the toolkit's own estimate on this cube is 2 (see the header), and its ratio follows
    const auto est = dw::lodd_boundary_adaptive(X, {.lodd = {.k = 26}});
    CHECK(est.intrinsic_dim == 2);
    CHECK(est.ratio == doctest::Approx(alodd_test::grid_ratio_by_hand(1000, 2, 1, 0.5)));
    CHECK(est.boundary.size() == std::size_t(std::llround(est.ratio * 1000)));
  }
}

TEST_CASE("aLoDD grid rule on a Gaussian blob: the hull vertices are boundary points") {
  std::mt19937_64 g(3);
  std::normal_distribution<double> z(0.0, 1.0);
  alodd_test::MatD X(400, 2);
  for (Eigen::Index i = 0; i < X.rows(); ++i) X.row(i) << 3.0 * z(g), z(g);  // anisotropic: shares 0.9, 1
  // d_I: the first component's share is about 0.9 ≥ 0.8, so m = 0 and d_I = 2
  const auto r = dw::lodd_boundary_adaptive(X, {.lodd = {.k = 15}});
  CHECK(r.intrinsic_dim == 2);
  CHECK(r.ratio == doctest::Approx(1.0 - 18.0 * 18.0 / 400.0).epsilon(1e-12));  // (√400 − 2)² inner nodes
  CHECK(r.boundary.size() == 76);
  const auto chosen = alodd_test::as_set(r.boundary);
  const auto hull = alodd_test::hull_2d(X);
  REQUIRE(hull.size() >= 5);
  for (Eigen::Index h : hull) CHECK_MESSAGE(chosen.count(h) == 1, "hull vertex ", h, " not a boundary point");
  // the chosen points lie further out (Mahalanobis radius) than the rest, on average
  double in_r = 0, out_r = 0;
  for (Eigen::Index i = 0; i < X.rows(); ++i) {
    const double rad = std::hypot(X(i, 0) / 3.0, X(i, 1));
    (chosen.count(i) ? out_r : in_r) += rad;
  }
  out_r /= double(chosen.size());
  in_r /= double(X.rows() - Eigen::Index(chosen.size()));
  CHECK(out_r > 1.3 * in_r);
  MESSAGE("aLoDD demo, Gaussian blob n = 400, k = 15: d_I = ", r.intrinsic_dim, ", ratio = ", r.ratio, ", ",
          r.boundary.size(), " boundary points, all ", hull.size(), " hull vertices among them; mean radius ", out_r,
          " vs ", in_r, " inside");
}

TEST_CASE("aLoDD score-curve rules (largest gap, knee): brute-force recomputation and the grid boundary") {
  std::vector<Eigen::Index> truth;
  const alodd_test::MatD X = alodd_test::grid(12, 2, 0.02, 9, 0.0, 0.5, truth);  // 44 boundary nodes of 144
  for (const auto rule : {dw::alodd_rule::largest_gap, dw::alodd_rule::knee}) {
    const bool gap = rule == dw::alodd_rule::largest_gap;
    CAPTURE(gap);
    const auto r = dw::lodd_boundary_adaptive(X, {.lodd = {.k = 8}, .rule = rule});
    CHECK(r.intrinsic_dim == 0);
    CHECK(Eigen::Index(r.boundary.size()) == alodd_test::curve_rule_by_hand(r.scores, gap, 0.0, 0.5));
    CHECK(r.ratio == double(r.boundary.size()) / 144.0);
    CHECK(alodd_test::as_set(r.boundary) == std::set<Eigen::Index>(truth.begin(), truth.end()));
    // a window that excludes the true count: the rule picks within it, as recomputed
    const auto w = dw::lodd_boundary_adaptive(X, {.lodd = {.k = 8}, .rule = rule, .max_ratio = 0.2, .min_ratio = 0.05});
    const Eigen::Index c = alodd_test::curve_rule_by_hand(w.scores, gap, 0.05, 0.2);
    CHECK(Eigen::Index(w.boundary.size()) == c);
    CHECK(c >= 8);
    CHECK(c <= 28);
  }
  // random points in a square: no clean gap; the recomputation still agrees
  const alodd_test::MatD U = dwt::random(300, 2, 17);
  for (const auto rule : {dw::alodd_rule::largest_gap, dw::alodd_rule::knee}) {
    const auto r = dw::lodd_boundary_adaptive(U, {.rule = rule, .max_ratio = 0.4, .min_ratio = 0.02});
    CHECK(Eigen::Index(r.boundary.size()) ==
          alodd_test::curve_rule_by_hand(r.scores, rule == dw::alodd_rule::largest_gap, 0.02, 0.4));
    // the scores are those of lodd_scores, and the set is lodd_boundary's at the same ratio
    CHECK((r.scores - dw::lodd_scores(U)).cwiseAbs().maxCoeff() == 0.0);
    const auto fixed = dw::lodd_boundary(U, r.ratio);
    CHECK(std::vector<dw::index_t>(fixed.begin(), fixed.end()) == r.boundary);
  }
}

TEST_CASE("aLoDD: errors name the op and the offending value") {
  const alodd_test::MatD X = dwt::random(30, 3, 2);
  const char* op = "deltaw::lodd_boundary_adaptive";
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::lodd_boundary_adaptive(X, {.contribution = 0.0}); },
                                             {op, "contribution"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::lodd_boundary_adaptive(X, {.clusters = 0}); },
                                             {op, "clusters", "[1, 30]"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::lodd_boundary_adaptive(X, {.clusters = 31}); },
                                             {op, "clusters"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::lodd_boundary_adaptive(X, {.intrinsic_dim = -1}); },
                                             {op, "intrinsic_dim"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::lodd_boundary_adaptive(X, {.max_ratio = 0.0}); },
                                             {op, "max_ratio"});
  dwt::check_throws_with<dw::argument_error>(
      [&] { (void)dw::lodd_boundary_adaptive(X, {.max_ratio = 0.2, .min_ratio = 0.3}); }, {op, "min_ratio"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::lodd_boundary_adaptive(X, {.lodd = {.w = 1.5}}); },
                                             {op, "w must lie in [0, 1]"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::lodd_boundary_adaptive(X, {.lodd = {.k = 30}}); },
                                         {op, "[1, 29]", "k = 30"});
  dwt::check_throws_with<dw::argument_error>(
      [&] {
        (void)dw::lodd_boundary_adaptive(X, {.lodd = {.k = 5}, .rule = dw::alodd_rule::knee, .max_ratio = 0.02});
      },
      {op, "no admissible count"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::alodd_grid_ratio(10, 0); },
                                             {"deltaw::alodd_grid_ratio", "d = 0"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::alodd_intrinsic_dim(X, 1.5); },
                                             {"deltaw::alodd_intrinsic_dim", "contribution"});
  alodd_test::MatD Y = X;
  Y(4, 1) = std::nan("");
  dwt::check_throws_with<dw::non_finite_error>([&] { (void)dw::lodd_boundary_adaptive(Y, {.lodd = {.k = 5}}); }, {op});
  dwt::check_throws_with<dw::non_finite_error>([&] { (void)dw::alodd_intrinsic_dim(Y); },
                                               {"deltaw::alodd_intrinsic_dim", "NaN"});
}
