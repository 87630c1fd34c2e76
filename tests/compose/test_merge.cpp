// Merges of LoRA updates (deltaw/compose/merge.hpp) against dense double references:
// the exact modes against Σ w_i·s_i·B_i·A_i, svd against the SVD of that dense sum, and
// PEFT's entrywise modes against a plain re-statement of PEFT's rules (full sort for the
// top-k, explicit DARE masks).
#include <deltaw/compose.hpp>

#include <algorithm>
#include <filesystem>
#include <map>

#include "alloc_counter.hpp"
#include "test_util.hpp"

namespace cp = deltaw::compose;
using dwt::MatD;

namespace {

struct fixture {
  std::vector<deltaw::low_rank<double>> loras;
  std::vector<double> w;
};

// Three updates of a 12×10 weight: ranks 3, 3, 5 (the first two for the equal-rank modes),
// scales α/r and α/√r (rsLoRA).
fixture make(bool mixed = true, std::vector<double> w = {0.7, -0.4, 0.5}) {
  fixture f;
  const int ranks[] = {3, 3, 5};
  const double scales[] = {8.0 / 3, 4.0 / std::sqrt(3.0), 2.0};
  const std::size_t n = mixed ? 3 : 2;
  for (std::size_t i = 0; i < n; ++i)
    f.loras.push_back(deltaw::lora(dwt::random(12, ranks[i], 100 + i), dwt::random(ranks[i], 10, 200 + i),
                                   deltaw::scale(scales[i])));
  f.w.assign(w.begin(), w.begin() + std::ptrdiff_t(n));
  return f;
}

MatD dense(const deltaw::low_rank<double>& l) {
  MatD B(l.rows(), l.rank()), A(l.rank(), l.cols());
  for (int i = 0; i < B.rows(); ++i)
    for (int j = 0; j < B.cols(); ++j) B(i, j) = l.B()(i, j);
  for (int i = 0; i < A.rows(); ++i)
    for (int j = 0; j < A.cols(); ++j) A(i, j) = l.A()(i, j);
  return l.scale() * B * A;
}
template <class T>
MatD factor(const deltaw::matrix_view<const T>& v) {
  MatD m(v.rows(), v.cols());
  for (int i = 0; i < m.rows(); ++i)
    for (int j = 0; j < m.cols(); ++j) m(i, j) = v(i, j);
  return m;
}
MatD exact_sum(const fixture& f) {
  MatD s = MatD::Zero(f.loras[0].rows(), f.loras[0].cols());
  for (std::size_t i = 0; i < f.loras.size(); ++i) s += f.w[i] * dense(f.loras[i]);
  return s;
}
cp::merge_options opts(cp::merge_mode m, std::optional<double> density = {}) {
  cp::merge_options o;
  o.mode = m;
  o.density = density;
  return o;
}
template <class F>
auto run(const F& f, const cp::merge_options& o) {
  return cp::merge_materializing(f.loras, f.w, o);
}

// PEFT's rules restated on a flat vector: top-k by full sort, DARE by a given mask.
std::vector<double> flat(const MatD& m) { return std::vector<double>(m.data(), m.data() + m.size()); }
std::vector<double> topk(std::vector<double> v, double density) {
  const auto k = std::size_t(density * double(v.size()));
  std::vector<std::size_t> order(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return std::abs(v[a]) > std::abs(v[b]); });
  for (std::size_t i = k; i < v.size(); ++i) v[order[i]] = 0;
  return v;
}
std::vector<double> ref_merge(const std::vector<std::vector<double>>& t, const std::vector<double>& w, bool ties,
                              bool frequency) {
  std::vector<double> out(t[0].size(), 0.0);
  for (std::size_t e = 0; e < out.size(); ++e) {
    if (!ties) {
      for (std::size_t i = 0; i < t.size(); ++i) out[e] += w[i] * t[i][e];
      continue;
    }
    double s = 0;
    for (const auto& x : t) s += frequency ? (x[e] > 0 ? 1.0 : x[e] < 0 ? -1.0 : 0.0) : x[e];
    const double sign = s >= 0 ? 1 : -1;
    double acc = 0;
    int n = 0;
    for (std::size_t i = 0; i < t.size(); ++i)
      if ((t[i][e] > 0 && sign > 0) || (t[i][e] < 0 && sign < 0)) acc += w[i] * t[i][e], ++n;
    out[e] = acc / std::max(n, 1);
  }
  return out;
}
// Deterministic 0/1 mask for DARE, a function of (adapter, target, entry).
double mask_bit(std::size_t adapter, int target, int e) { return ((e * 7 + int(adapter) * 3 + target * 5) % 5) < 3; }

double best_rank_k_error(const MatD& M, int k) {
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(M, Eigen::ComputeThinU | Eigen::ComputeThinV);
  double e = 0;
  for (int i = k; i < svd.singularValues().size(); ++i) e += svd.singularValues()[i] * svd.singularValues()[i];
  return std::sqrt(e);
}

}  // namespace

TEST_CASE("compose: cat and linear_exact are Σ w_i·ΔW_i to rounding, mixed ranks and rsLoRA scales") {
  const auto f = make();
  const MatD ref = exact_sum(f);
  const auto cat = run(f, opts(cp::merge_mode::cat));
  CHECK(cat.rank() == 11);
  CHECK(cat.scale() == 1.0);
  CHECK(dwt::rel_err(dense(cat), ref) < 1e-13);
  const auto ex = run(f, opts(cp::merge_mode::linear_exact));
  CHECK(ex.rank() == 10);  // 11 stacked directions in a 12×10 weight: numerical rank 10
  CHECK(dwt::rel_err(dense(ex), ref) < 1e-13);
  // factored_error and factored_norm against the dense Frobenius norms.
  CHECK(cp::factored_norm(f.loras, f.w) == doctest::Approx(ref.norm()).epsilon(1e-12));
  CHECK(cp::factored_error(cat, f.loras, f.w) < 1e-12 * ref.norm());
  const auto lin = run(make(false), opts(cp::merge_mode::linear));
  const auto f2 = make(false);
  CHECK(cp::factored_error(lin, f2.loras, f2.w) ==
        doctest::Approx((dense(lin) - exact_sum(f2)).norm()).epsilon(1e-10));
}

TEST_CASE("compose: svd is the best rank-k approximation, from the factors") {
  const auto f = make();
  const MatD ref = exact_sum(f);
  for (int k : {0, 2, 7, 10}) {
    auto o = opts(cp::merge_mode::svd);
    o.svd_rank = k;
    const auto m = run(f, o);
    const int kk = k == 0 ? 5 : k;  // default: the largest input rank
    CHECK(m.rank() == kk);
    CHECK((dense(m) - ref).norm() == doctest::Approx(best_rank_k_error(ref, kk)).epsilon(1e-10).scale(ref.norm()));
    // The rank-k truncation is unique here (distinct singular values): compare to the dense one.
    Eigen::JacobiSVD<Eigen::MatrixXd> svd(ref, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const MatD best = svd.matrixU().leftCols(kk) * svd.singularValues().head(kk).asDiagonal() *
                      svd.matrixV().leftCols(kk).transpose();
    CHECK(dwt::rel_err(dense(m), best) < 1e-12);
  }
  // svd_clamp: the q-quantile (linear interpolation) of the entries of B and A together.
  auto o = opts(cp::merge_mode::svd);
  o.svd_clamp = 0.9;
  const auto unclamped = run(f, opts(cp::merge_mode::svd));
  const auto clamped = run(f, o);
  std::vector<double> all;
  for (double x : flat(factor(unclamped.B()))) all.push_back(x);
  for (double x : flat(factor(unclamped.A()))) all.push_back(x);
  std::sort(all.begin(), all.end());
  const double pos = 0.9 * double(all.size() - 1);
  const auto lo = std::size_t(pos);
  const double h = all[lo] + (all[lo + 1] - all[lo]) * (pos - double(lo));
  CHECK(dwt::rel_err(factor(clamped.B()), factor(unclamped.B()).cwiseMax(-h).cwiseMin(h)) < 1e-15);
  CHECK(dwt::rel_err(factor(clamped.A()), factor(unclamped.A()).cwiseMax(-h).cwiseMin(h)) < 1e-15);
}

TEST_CASE("compose: PEFT's linear combines A and B separately; weights [1, -1] show how far off it is") {
  const auto f = make(false);
  const auto m = run(f, opts(cp::merge_mode::linear));
  MatD A = MatD::Zero(3, 10), B = MatD::Zero(12, 3);
  for (std::size_t i = 0; i < 2; ++i) {
    const double ws = f.w[i] * f.loras[i].scale();
    A += (ws < 0 ? -1 : 1) * std::sqrt(std::abs(ws)) * factor(f.loras[i].A());
    B += std::sqrt(std::abs(ws)) * factor(f.loras[i].B());
  }
  CHECK(dwt::rel_err(factor(m.A()), A) < 1e-14);
  CHECK(dwt::rel_err(factor(m.B()), B) < 1e-14);
  const auto g = make(false, {1.0, -1.0});
  const auto lg = run(g, opts(cp::merge_mode::linear));
  const double rel = cp::factored_error(lg, g.loras, g.w) /
                     cp::factored_norm(g.loras, g.w);
  MESSAGE("linear with weights [1, -1]: relative error " << rel);
  CHECK(rel > 0.5);  // the cross terms B_1·A_2 and B_2·A_1 do not cancel
  CHECK(rel == doctest::Approx((dense(lg) - exact_sum(g)).norm() / exact_sum(g).norm()).epsilon(1e-10));
}

TEST_CASE("compose: ties, magnitude_prune and DARE on the factors follow PEFT's rules") {
  const auto f = make(false);
  for (auto mode : {cp::merge_mode::ties, cp::merge_mode::magnitude_prune, cp::merge_mode::dare_linear,
                    cp::merge_mode::dare_ties}) {
    for (bool frequency : {false, true}) {
      CAPTURE(cp::mode_name(mode));
      CAPTURE(frequency);
      auto o = opts(mode, 0.4);
      o.sign_method = frequency ? cp::majority_sign::frequency : cp::majority_sign::total;
      o.dare_mask = [](const cp::dare_site& s, const deltaw::matrix_view<double>& mask) {
        for (int e = 0; e < mask.rows() * mask.cols(); ++e)
          mask(e / mask.cols(), e % mask.cols()) = mask_bit(s.adapter, int(s.target), e);
      };
      const auto m = run(f, o);
      const bool dare = cp::is_dare(mode);
      const bool ties = mode == cp::merge_mode::ties || mode == cp::merge_mode::dare_ties;
      for (int which = 0; which < 2; ++which) {  // 0: A, 1: B
        std::vector<std::vector<double>> t;
        std::vector<double> w;
        for (std::size_t i = 0; i < 2; ++i) {
          const MatD x = which == 0 ? factor(f.loras[i].A()) : factor(f.loras[i].B());
          std::vector<double> v(std::size_t(x.size()));
          for (int e = 0; e < x.size(); ++e) v[std::size_t(e)] = x(e / x.cols(), e % x.cols());
          if (dare)
            for (int e = 0; e < x.size(); ++e) v[std::size_t(e)] *= mask_bit(i, which, e) / 0.4;
          else
            v = topk(v, 0.4);
          t.push_back(v);
          const double ws = f.w[i] * f.loras[i].scale();
          w.push_back((which == 0 && ws < 0 ? -1 : 1) * std::sqrt(std::abs(ws)));
        }
        const auto r = ref_merge(t, w, ties, frequency);
        const MatD got = which == 0 ? factor(m.A()) : factor(m.B());
        MatD want(got.rows(), got.cols());
        for (int e = 0; e < got.size(); ++e) want(e / got.cols(), e % got.cols()) = r[std::size_t(e)];
        CHECK(dwt::rel_err(got, want) < 1e-14);
        if (!dare) CHECK((got.array() != 0).count() <= got.size());
      }
    }
  }
}

TEST_CASE("compose: the materializing modes prune the dense ΔW_i, then truncate the SVD") {
  const auto f = make();
  for (auto mode : {cp::merge_mode::ties_svd, cp::merge_mode::magnitude_prune_svd, cp::merge_mode::dare_linear_svd,
                    cp::merge_mode::dare_ties_svd}) {
    CAPTURE(cp::mode_name(mode));
    auto o = opts(mode, 0.3);
    o.dare_mask = [](const cp::dare_site& s, const deltaw::matrix_view<double>& mask) {
      CHECK(s.target == cp::dare_target::delta);
      for (int e = 0; e < mask.rows() * mask.cols(); ++e)
        mask(e / mask.cols(), e % mask.cols()) = mask_bit(s.adapter, 2, e);
    };
    const auto m = run(f, o);
    CHECK(m.rank() == 5);
    std::vector<std::vector<double>> t;
    for (std::size_t i = 0; i < 3; ++i) {
      const MatD d = dense(f.loras[i]);
      std::vector<double> v(std::size_t(d.size()));
      for (int e = 0; e < d.size(); ++e) v[std::size_t(e)] = d(e / d.cols(), e % d.cols());
      if (cp::is_dare(mode))
        for (int e = 0; e < d.size(); ++e) v[std::size_t(e)] *= mask_bit(i, 2, e) / 0.3;
      else
        v = topk(v, 0.3);
      t.push_back(v);
    }
    const bool ties = mode == cp::merge_mode::ties_svd || mode == cp::merge_mode::dare_ties_svd;
    const auto r = ref_merge(t, f.w, ties, false);
    MatD M(12, 10);
    for (int e = 0; e < M.size(); ++e) M(e / 10, e % 10) = r[std::size_t(e)];
    Eigen::JacobiSVD<Eigen::MatrixXd> svd(M, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const MatD best =
        svd.matrixU().leftCols(5) * svd.singularValues().head(5).asDiagonal() * svd.matrixV().leftCols(5).transpose();
    CHECK(dwt::rel_err(dense(m), best) < 1e-12);
    // merge() refuses it by name.
    dwt::check_throws_with<deltaw::argument_error>(
        [&] { (void)cp::merge(f.loras, f.w, o); },
        {std::string(cp::mode_name(mode)), "merge_materializing"});
  }
}

TEST_CASE("compose: the default DARE masks keep about `density` of the entries, reproducibly") {
  const auto f = make(false);
  auto o = opts(cp::merge_mode::dare_linear, 0.25);
  o.seed = 7;
  const auto a = run(f, o);
  const auto b = run(f, o);
  CHECK(dwt::rel_err(factor(a.B()), factor(b.B())) == 0);
  // With one adapter of weight 1 and scale 1 the merged A is mask·A/density: count the kept.
  std::vector<deltaw::low_rank<double>> one{deltaw::lora(dwt::random(200, 4, 1), dwt::random(4, 300, 2))};
  std::vector<double> w1{1.0};
  const auto m = cp::merge(one, w1, o);
  const MatD A = factor(m.A());
  const MatD A0 = factor(one[0].A());
  int kept = 0;
  for (int e = 0; e < A.size(); ++e)
    if (A.data()[e] != 0) {
      ++kept;
      CHECK(A.data()[e] == doctest::Approx(A0.data()[e] / 0.25).epsilon(1e-14));
    }
  const double frac = double(kept) / double(A.size());  // 1200 Bernoulli(0.25): sd 0.0125
  CHECK(frac > 0.25 - 5 * 0.0125);
  CHECK(frac < 0.25 + 5 * 0.0125);
}

TEST_CASE("compose: merge errors name the mode, the shapes and the ranks") {
  const auto f = make();
  dwt::check_throws_with<deltaw::rank_error>([&] { (void)run(f, opts(cp::merge_mode::linear)); },
                                             {"linear", "r = 3", "r = 5", "cat"});
  dwt::check_throws_with<deltaw::argument_error>([&] { (void)run(make(false), opts(cp::merge_mode::ties)); },
                                                 {"ties", "density"});
  dwt::check_throws_with<deltaw::argument_error>(
      [&] { (void)run(make(false), opts(cp::merge_mode::dare_ties, 0.0)); }, {"density 0"});
  dwt::check_throws_with<deltaw::argument_error>(
      [&] { (void)run(make(false), opts(cp::merge_mode::magnitude_prune, 1.5)); }, {"[0, 1]"});
  std::vector<deltaw::low_rank<double>> two{f.loras[0], deltaw::lora(dwt::random(11, 3, 1), dwt::random(3, 10, 2))};
  std::vector<double> w2{1, 1};
  dwt::check_throws_with<deltaw::shape_error>(
      [&] { (void)cp::merge(two, w2, opts(cp::merge_mode::cat)); }, {"[11, 10]", "[12, 10]"});
  std::vector<double> w1{1};
  dwt::check_throws_with<deltaw::argument_error>(
      [&] { (void)cp::merge(two, w1, opts(cp::merge_mode::cat)); }, {"2 adapters but 1 weights"});
  CHECK(cp::parse_merge_mode("dare_ties_svd") == cp::merge_mode::dare_ties_svd);
  dwt::check_throws_with<deltaw::argument_error>([] { (void)cp::parse_merge_mode("tie"); }, {"\"tie\""});
}

TEST_CASE("compose: svd and linear_exact never allocate an out×in matrix") {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("allocation counting unavailable (sanitizer build)");
    return;
  }
  std::vector<deltaw::low_rank<double>> big;
  for (int i = 0; i < 3; ++i)
    big.push_back(deltaw::lora(dwt::random(384, 4, 10 + i), dwt::random(4, 512, 20 + i), deltaw::scale(0.5)));
  std::vector<double> w{1, -0.5, 0.25};
  for (auto mode : {cp::merge_mode::svd, cp::merge_mode::linear_exact, cp::merge_mode::cat}) {
    const std::size_t largest = dwt::largest_allocation([&] {
      (void)cp::merge(big, w, opts(mode));
      (void)cp::factored_norm(big, w);
    });
    CAPTURE(cp::mode_name(mode));
    CHECK(largest < 384u * 512u * sizeof(double) / 8);
  }
}

#if __has_include(<nlohmann/json.hpp>)
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace {
MatD dense_f(const deltaw::low_rank<float>& l) {
  MatD B(l.rows(), l.rank()), A(l.rank(), l.cols());
  for (int i = 0; i < B.rows(); ++i)
    for (int j = 0; j < B.cols(); ++j) B(i, j) = l.B()(i, j);
  for (int i = 0; i < A.rows(); ++i)
    for (int j = 0; j < A.cols(); ++j) A(i, j) = l.A()(i, j);
  return l.scale() * B * A;
}
}  // namespace

// Run by tests/compose/check_peft_merge.py (CTest compose_peft) with DELTAW_COMPOSE_PEFT_DIR
// set to the directory it filled with PEFT's adapters, merges and DARE masks.
TEST_CASE("compose: PEFT fixture" * doctest::skip()) {
  const char* env = std::getenv("DELTAW_COMPOSE_PEFT_DIR");
  REQUIRE_MESSAGE(env != nullptr, "run through tests/compose/check_peft_merge.py");
  const std::filesystem::path dir(env);
  const auto masks = deltaw::io::safetensors_file::open(dir / "masks.safetensors");
  std::ifstream cases(dir / "cases.txt");
  std::string line;
  int n_cases = 0;
  std::ostringstream table;
  table << "\n| mode | deltaw rel. error | PEFT rel. error |\n|---|---|---|\n";
  while (std::getline(cases, line)) {
    std::istringstream ls(line);
    std::string mode_s, ads_s, ws_s;
    ls >> mode_s >> ads_s >> ws_s;
    CAPTURE(mode_s);
    std::vector<deltaw::io::peft_adapter> ads;
    std::vector<double> w;
    for (std::size_t p = 0, q; p <= ads_s.size(); p = q + 1) {
      q = std::min(ads_s.find(',', p), ads_s.size());
      ads.push_back(deltaw::io::read_peft_adapter(dir / ads_s.substr(p, q - p)));
    }
    for (std::size_t p = 0, q; p <= ws_s.size(); p = q + 1) {
      q = std::min(ws_s.find(',', p), ws_s.size());
      w.push_back(std::stod(ws_s.substr(p, q - p)));
    }
    const bool rs_first = mode_s == "cat_rs";
    cp::merge_options o;
    o.mode = cp::parse_merge_mode(rs_first ? "cat" : mode_s);
    o.density = 0.5;
    o.dare_mask = [&](const cp::dare_site& s, const deltaw::matrix_view<double>& mask) {
      const char* t = s.target == cp::dare_target::A ? "A" : s.target == cp::dare_target::B ? "B" : "delta";
      const std::string key = mode_s + "|" + std::string(s.module) + "|" + t + "|" + std::to_string(s.adapter);
      REQUIRE_MESSAGE(masks.contains(key), key);
      const auto m = masks.matrix<float>(key);
      REQUIRE(m.view.rows() == mask.rows());
      REQUIRE(m.view.cols() == mask.cols());
      for (int i = 0; i < mask.rows(); ++i)
        for (int j = 0; j < mask.cols(); ++j) mask(i, j) = m.view(i, j);
    };
    const auto ours = cp::merge_peft_materializing(ads, w, o);
    const auto theirs = deltaw::io::read_peft_adapter(dir / ("m_" + mode_s));
    REQUIRE(ours.size() == theirs.size());
    for (const auto& tm : theirs.modules()) {
      CAPTURE(tm.name);
      const auto& om = ours.at(tm.name);
      const MatD d_ours = dense_f(om.update()), d_theirs = dense_f(tm.update());
      if (rs_first) {  // PEFT keeps use_rslora with α = r: its scale is √r, not 1
        CHECK(tm.scale == doctest::Approx(std::sqrt(double(tm.rank))));
        CHECK(dwt::rel_err(d_ours * tm.scale, d_theirs) < 1e-5);
        continue;
      }
      CHECK(dwt::rel_err(d_ours, d_theirs) < 1e-5);
      if (cp::is_factorwise(o.mode)) {  // the factors themselves
        CHECK(dwt::rel_err(factor(om.A.view), factor(tm.A.view)) < 1e-5);
        CHECK(dwt::rel_err(factor(om.B.view), factor(tm.B.view)) < 1e-5);
      }
    }
    table << "| " << mode_s << " | " << cp::merge_relative_error(ours, ads, w) << " | " << cp::merge_relative_error(theirs, ads, w)
          << " |\n";
    if (o.mode == cp::merge_mode::svd || o.mode == cp::merge_mode::linear) {  // deltaw's exact mode, same inputs
      auto e = o;
      e.mode = cp::merge_mode::linear_exact;
      const double rel = cp::merge_relative_error(cp::merge_peft(ads, w, e), ads, w);
      CHECK(rel < 1e-6);  // float32 factors
      table << "| linear_exact on " << (o.mode == cp::merge_mode::svd ? "svd" : "linear") << "'s inputs | " << rel
            << " | (no such mode) |\n";
    }
    deltaw::io::write_peft_adapter(dir / ("ours_" + mode_s), ours);
    ++n_cases;
  }
  CHECK(n_cases == 12);
  MESSAGE(table.str());
}
#endif
