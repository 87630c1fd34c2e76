// Incremental PCA and EVA against the dense PCA (Eigen's JacobiSVD of the centred
// concatenation of every batch the PCA saw), and EVA's rank redistribution against an
// independent threshold count.
#include "linalg/spectrum_util.hpp"

#include <Eigen/SVD>
#include <deltaw/init/eva.hpp>

#include <algorithm>
#include <functional>
#include <map>
#include <random>
#include <vector>

namespace dw = deltaw;
using dwt::ColD;
using dwt::MatD;
using dw::index_t;

namespace {
/// n samples of mean + z·diag(σ)·Qᵀ (+ noise·N(0, 1) in every feature), z standard normal,
/// Q [d, len(σ)] orthonormal from `basis_seed`.
MatD samples(Eigen::Index n, const Eigen::VectorXd& sigma, const Eigen::VectorXd& mean, std::uint64_t basis_seed,
             std::mt19937_64& g, double noise = 0.0) {
  const Eigen::Index d = mean.size();
  const ColD Q = dwt::random_orthonormal(d, sigma.size(), basis_seed);
  std::normal_distribution<double> nd;
  MatD Z(n, sigma.size()), E(n, d);
  for (Eigen::Index i = 0; i < Z.size(); ++i) Z.data()[i] = nd(g);
  for (Eigen::Index i = 0; i < E.size(); ++i) E.data()[i] = noise * nd(g);
  return (Z * sigma.asDiagonal() * Q.transpose() + E).rowwise() + mean.transpose();
}
struct dense_pca {
  ColD V;             // [d, ·] principal directions
  Eigen::VectorXd S;  // singular values of the centred data
  double total;       // centred sum of squares
};
dense_pca pca_of(const MatD& X) {
  const MatD Xc = X.rowwise() - X.colwise().mean();
  Eigen::JacobiSVD<ColD> svd(ColD(Xc), Eigen::ComputeThinV);
  return {svd.matrixV(), svd.singularValues(), Xc.squaredNorm()};
}
MatD vstack(const std::vector<MatD>& xs) {
  Eigen::Index n = 0;
  for (const auto& x : xs) n += x.rows();
  MatD out(n, xs.front().cols());
  Eigen::Index o = 0;
  for (const auto& x : xs) {
    out.middleRows(o, x.rows()) = x;
    o += x.rows();
  }
  return out;
}
/// |cos| between each of the first k components (rows) and the reference directions.
double worst_alignment(const dw::incremental_pca::matrix& C, const ColD& V, Eigen::Index k) {
  double worst = 1.0;
  for (Eigen::Index c = 0; c < k; ++c) worst = std::min(worst, std::abs(C.row(c).dot(V.col(c))));
  return worst;
}
}  // namespace

TEST_CASE("incremental_pca: after all batches, the dense PCA of the concatenated data") {
  const Eigen::Index d = 40, k = 6, batch = 50, nb = 12;
  Eigen::VectorXd sigma(k);
  sigma << 9, 7, 5, 3.5, 2.5, 1.8;
  const Eigen::VectorXd mean = Eigen::VectorXd::LinSpaced(d, -2.0, 3.0);
  std::mt19937_64 g(1);
  // Clear gap after k: the rest of the spectrum is 1e-4 noise.
  const MatD X = samples(batch * nb, sigma, mean, 11, g, 1e-4);
  dw::incremental_pca pca(k);
  for (Eigen::Index b = 0; b < nb; ++b) pca.partial_fit(X.middleRows(b * batch, batch));
  CHECK(pca.samples_seen() == batch * nb);
  CHECK(pca.batches_seen() == nb);
  const dense_pca ref = pca_of(X);
  CHECK(dwt::rel_err(pca.mean(), Eigen::VectorXd(X.colwise().mean().transpose())) < 1e-13);
  const Eigen::VectorXd var = (X.rowwise() - X.colwise().mean()).colwise().squaredNorm().transpose() / double(X.rows());
  CHECK(dwt::rel_err(pca.variance(), var) < 1e-12);
  const double sub = dwt::subspace_diff(ColD(pca.components().transpose()), ref.V.leftCols(k));
  MESSAGE("incremental_pca (", nb, " batches of ", batch, ", gap 1.8 → 1e-4 noise): top-", k, " subspace diff = ", sub);
  CHECK(sub < 1e-4);
  CHECK(worst_alignment(pca.components(), ref.V, k) > 1 - 1e-8);
  CHECK(dwt::max_rel_diff(pca.singular_values(), ref.S, k) < 1e-6);
  const Eigen::VectorXd ratio_ref = ref.S.head(k).array().square() / ref.total;
  CHECK(dwt::rel_err(pca.explained_variance_ratio(), ratio_ref) < 1e-6);
  CHECK(pca.explained_variance()(0) == doctest::Approx(ref.S(0) * ref.S(0) / double(X.rows() - 1)).epsilon(1e-6));
  // Orthonormal rows; each row's entry of largest magnitude is positive (sign fixed by V).
  const auto& C = pca.components();
  CHECK((C * C.transpose() - MatD::Identity(k, k)).cwiseAbs().maxCoeff() < 1e-12);
  for (Eigen::Index c = 0; c < k; ++c) {
    Eigen::Index j = 0;
    C.row(c).cwiseAbs().maxCoeff(&j);
    CHECK(C(c, j) > 0);
  }
}

TEST_CASE("incremental_pca: exact on data of centred rank ≤ k, masks drop rows, dense path agrees") {
  const Eigen::Index d = 25, k = 5, batch = 30, nb = 5;
  Eigen::VectorXd sigma(4);
  sigma << 4, 3, 2, 1;  // centred rank 4 ≤ k: the incremental update loses nothing
  std::mt19937_64 g(2);
  const MatD X = samples(batch * nb, sigma, Eigen::VectorXd::Constant(d, 0.5), 12, g);
  // Every third row is garbage and masked out.
  MatD Xg = X;
  std::vector<std::uint8_t> keep(std::size_t(X.rows()), 1);
  std::vector<MatD> kept;
  for (Eigen::Index i = 0; i < X.rows(); ++i)
    if (i % 3 == 0) {
      keep[std::size_t(i)] = 0;
      Xg.row(i).setConstant(1e3);
    }
  dw::incremental_pca rnd(k), exact(k, dw::ipca_options{.randomized = false});
  for (Eigen::Index b = 0; b < nb; ++b) {
    const std::span<const std::uint8_t> kb(keep.data() + b * batch, std::size_t(batch));
    rnd.partial_fit(Xg.middleRows(b * batch, batch), kb);
    exact.partial_fit(Xg.middleRows(b * batch, batch), kb);
    for (Eigen::Index i = b * batch; i < (b + 1) * batch; ++i)
      if (keep[std::size_t(i)]) kept.push_back(X.row(i));
  }
  const MatD Xk = vstack(kept);
  CHECK(rnd.samples_seen() == Xk.rows());
  const dense_pca ref = pca_of(Xk);
  for (const auto* p : {&rnd, &exact}) {
    CHECK(dwt::subspace_diff(ColD(p->components().topRows(4).transpose()), ref.V.leftCols(4)) < 1e-10);
    CHECK(dwt::max_rel_diff(p->singular_values(), ref.S, 4) < 1e-10);
    CHECK(dwt::rel_err(p->mean(), Eigen::VectorXd(Xk.colwise().mean().transpose())) < 1e-13);
  }
  dw::incremental_pca small(k);
  dwt::check_throws_with<dw::rank_error>([&] { small.partial_fit(X.topRows(3)); }, {"first batch", "3 rows"});
  dwt::check_throws_with<dw::shape_error>(
      [&] {
        small.partial_fit(X.topRows(10));
        small.partial_fit(MatD(X.topLeftCorner(10, 7)));
      },
      {"7 features"});
}

TEST_CASE("eva_rank_allocation: the budget largest pooled ratios, against a threshold count") {
  std::mt19937_64 g(3);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int trial = 0; trial < 20; ++trial) {
    const std::size_t L = 2 + std::size_t(trial % 5);
    std::vector<Eigen::VectorXd> ratios;
    std::vector<index_t> kmax;
    index_t pool = 0;
    for (std::size_t l = 0; l < L; ++l) {
      const index_t len = 3 + index_t(u(g) * 10);
      Eigen::VectorXd v(len);
      for (index_t j = 0; j < len; ++j) v(j) = u(g) * std::pow(0.2 + 0.8 * u(g), double(j));
      std::sort(v.data(), v.data() + len, std::greater<double>());
      ratios.push_back(v);
      kmax.push_back(1 + index_t(u(g) * double(len - 1)));
      pool += kmax.back();
    }
    const index_t budget = index_t(u(g) * double(pool));
    const auto ranks = dw::eva_rank_allocation(ratios, kmax, budget);
    // Reference: t = the budget-th largest pooled value; count values > t, then ties at t.
    std::vector<double> all;
    for (std::size_t l = 0; l < L; ++l)
      for (index_t j = 0; j < kmax[l]; ++j) all.push_back(ratios[l](j));
    std::sort(all.begin(), all.end(), std::greater<double>());
    index_t sum = 0;
    for (std::size_t l = 0; l < L; ++l) {
      index_t c = 0;
      if (budget > 0)
        for (index_t j = 0; j < kmax[l]; ++j) c += ratios[l](j) >= all[std::size_t(budget - 1)] ? 1 : 0;
      CHECK(ranks[l] == c);  // no ties in continuous random data
      CHECK(ranks[l] <= kmax[l]);
      sum += ranks[l];
    }
    CHECK(sum == budget);
  }
  // Ties go to the earlier layer.
  const std::vector<Eigen::VectorXd> same{Eigen::Vector2d(0.5, 0.1), Eigen::Vector2d(0.5, 0.1)};
  CHECK(dw::eva_rank_allocation(same, {2, 2}, 1) == std::vector<index_t>{1, 0});
  CHECK(dw::eva_rank_allocation(same, {2, 2}, 3) == std::vector<index_t>{2, 1});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::eva_rank_allocation(same, {1, 1}, 3); },
                                         {"deltaw::eva_rank_allocation", "budget 3", "[0, 2]"});
}

TEST_CASE("eva: ranks sum to the budget, A has orthonormal rows = the dense PCA of the inputs seen") {
  // Layers: "down" (own inputs, fast-decaying spectrum), "q" and "k" (one shared input group,
  // moderate decay), "up" (own inputs, flat spectrum). r = 4 each, ρ = 2: k_l = 8, budget 16.
  // Each group's inputs have centred rank 8 = k, so the incremental PCA is exact and the
  // dense PCA of what it saw is the reference to rounding.
  const Eigen::Index din = 32, dqk = 24, tokens = 64;
  std::vector<dw::eva_layer> layers{{"down", din, 16, 4, ""}, {"q", dqk, 24, 4, "qk"}, {"k", dqk, 12, 4, "qk"},
                                    {"up", din, 20, 4, ""}};
  const dw::eva_options opt{.alpha = 8.0};
  dw::eva_state st(layers, opt);
  CHECK(st.budget() == 16);
  for (std::size_t l = 0; l < 4; ++l) CHECK(st.max_components(l) == 8);
  const Eigen::VectorXd s_down = dwt::geometric_spectrum(8, 10.0, 0.5);
  const Eigen::VectorXd s_qk = dwt::geometric_spectrum(8, 6.0, 0.8);
  const Eigen::VectorXd s_up = dwt::geometric_spectrum(8, 4.0, 0.93);
  std::mt19937_64 g(4);
  std::map<std::string, std::vector<MatD>> seen;  // per group leader: the kept rows it was given
  index_t q_then_k_ignored = 0;
  const auto feed = [&](index_t, dw::eva_state& s) {
    // Labels: the first 10 tokens are prompt (−100) and the last 6 padding (attention 0);
    // their activations are garbage that must not reach the PCA.
    std::vector<std::int64_t> labels(std::size_t(tokens), 1), attn(std::size_t(tokens), 1);
    for (int i = 0; i < 10; ++i) labels[std::size_t(i)] = -100;
    for (int i = 0; i < 6; ++i) attn[std::size_t(tokens - 1 - i)] = 0;
    const auto keep = dw::eva_token_mask(labels, attn);
    const auto make = [&](const Eigen::VectorXd& sig, Eigen::Index d, std::uint64_t basis) {
      MatD X = samples(tokens, sig, Eigen::VectorXd::LinSpaced(d, 0.0, 1.0), basis, g);
      for (Eigen::Index i = 0; i < tokens; ++i)
        if (!keep[std::size_t(i)]) X.row(i).setConstant(50.0 * double(i % 7) - 100.0);
      return X;
    };
    const auto record = [&](const std::string& who, std::size_t l, const MatD& X) {
      if (!s.needs_input(l)) return;
      s.observe(l, X, keep);
      std::vector<MatD> rows;
      for (Eigen::Index i = 0; i < tokens; ++i)
        if (keep[std::size_t(i)]) rows.push_back(X.row(i));
      seen[who].push_back(vstack(rows));
    };
    record("down", 0, make(s_down, din, 100));
    const MatD Xqk = make(s_qk, dqk, 200);
    const bool qk_wanted = s.needs_input(1);
    CHECK(s.needs_input(2) == qk_wanted);  // one PCA for q and k
    record("qk", 1, Xqk);
    if (qk_wanted && !s.needs_input(2)) ++q_then_k_ignored;  // k's input: q already fed the shared PCA
    s.observe(2, Xqk, keep);                                  // so a second observe is a no-op
    record("up", 3, make(s_up, din, 300));
  };
  const index_t used = dw::eva_fit(st, feed, 200);
  MESSAGE("eva: converged after ", used, " batches; ranks down/q/k/up = ", st.ranks()[0], "/", st.ranks()[1], "/",
          st.ranks()[2], "/", st.ranks()[3]);
  REQUIRE(st.done());
  CHECK(q_then_k_ignored == index_t(seen["qk"].size()));
  const auto& ranks = st.ranks();
  CHECK(ranks[0] + ranks[1] + ranks[2] + ranks[3] == st.budget());
  for (std::size_t l = 0; l < 4; ++l) CHECK(ranks[l] <= st.max_components(l));
  // The flat spectrum ("up") keeps more of its variance spread out, so it gets more rank than the fast-decaying "down".
  CHECK(ranks[3] > ranks[0]);
  // Redistribution against the threshold count on the dense ratios of what each group saw.
  std::map<std::string, dense_pca> ref;
  for (const auto& [who, xs] : seen) ref.emplace(who, pca_of(vstack(xs)));
  const std::vector<std::string> group_of{"down", "qk", "qk", "up"};
  std::vector<double> pool;
  for (std::size_t l = 0; l < 4; ++l)
    for (Eigen::Index j = 0; j < 8; ++j) {
      const auto& R = ref.at(group_of[l]);
      pool.push_back(R.S(j) * R.S(j) / R.total);
    }
  std::vector<double> sorted = pool;
  std::sort(sorted.begin(), sorted.end(), std::greater<double>());
  const double t = sorted[15];
  index_t counted = 0;
  for (std::size_t l = 0; l < 4; ++l) {
    index_t c = 0;
    for (Eigen::Index j = 0; j < 8; ++j) c += pool[l * 8 + std::size_t(j)] > t * (1 + 1e-9) ? 1 : 0;
    CHECK(ranks[l] >= c);  // everything clearly above the threshold is kept
    counted += c;
  }
  CHECK(counted >= 14);  // at most the q/k duplicate tie sits at the threshold

  const auto adapters = st.result<double>();
  REQUIRE(adapters.size() == 4);
  for (std::size_t l = 0; l < 4; ++l) {
    CAPTURE(l);
    const auto& a = adapters[l];
    CHECK(a.name == layers[l].name);
    CHECK(a.rank == ranks[l]);
    CHECK(a.alpha == doctest::Approx(8.0 * double(ranks[l]) / 4.0));
    if (a.rank == 0) {
      CHECK(!a.has_adapter());
      continue;
    }
    CHECK(a.factors.s == doctest::Approx(2.0));  // α_l / rank_l = α / r
    CHECK(a.factors.B.rows() == layers[l].out_features);
    CHECK(a.factors.B.cols() == a.rank);
    CHECK(a.factors.B.cwiseAbs().maxCoeff() == 0.0);
    const MatD& A = a.factors.A;
    CHECK((A * A.transpose() - MatD::Identity(a.rank, a.rank)).cwiseAbs().maxCoeff() < 1e-12);
    const auto& R = ref.at(group_of[l]);
    double worst = 1.0;
    for (Eigen::Index c = 0; c < a.rank; ++c) worst = std::min(worst, std::abs(A.row(c).dot(R.V.col(c))));
    MESSAGE("eva layer ", layers[l].name, ": rank ", a.rank, ", min |cos(A_c, dense PCA_c)| = ", worst);
    CHECK(worst > 1 - 1e-9);
  }
  // q and k share one PCA: the same rows.
  const Eigen::Index common = std::min(adapters[1].rank, adapters[2].rank);
  CHECK((adapters[1].factors.A.topRows(common) - adapters[2].factors.A.topRows(common)).cwiseAbs().maxCoeff() == 0.0);

  // Whitening divides each row by √(singular value).
  dw::eva_options wopt = opt;
  wopt.whiten = true;
  dw::eva_state ws(layers, wopt);
  (void)dw::eva_fit(ws, feed, 200);
  const auto white = ws.result<float>();
  for (std::size_t l = 0; l < 4; ++l)
    for (Eigen::Index c = 0; c < white[l].rank; ++c) {
      const double sv = ws.pca(l).singular_values()(c);
      CHECK(double(white[l].factors.A.row(c).norm()) == doctest::Approx(1.0 / std::sqrt(sv)).epsilon(1e-5));
    }
}

TEST_CASE("eva: argument errors and unconverged results") {
  const std::vector<dw::eva_layer> layers{{"a", 6, 4, 4, ""}};
  dwt::check_throws_with<dw::rank_error>([&] { dw::eva_state st(layers, dw::eva_options{}); },
                                         {"deltaw::eva_state", "'a'", "8 components", "6 input features"});
  dwt::check_throws_with<dw::argument_error>([&] { dw::eva_state st(layers, dw::eva_options{.rho = 0.5}); }, {"ρ"});
  dw::eva_state st({{"a", 10, 4, 2, ""}}, dw::eva_options{});
  std::mt19937_64 g(5);
  const MatD X = samples(20, dwt::geometric_spectrum(4, 3.0, 0.5), Eigen::VectorXd::Zero(10), 1, g);
  st.observe(0, X);
  st.end_batch();  // one batch: nothing to compare with, nothing converged
  CHECK(!st.done());
  dwt::check_throws_with<dw::argument_error>([&] { (void)st.result(); }, {"'a'", "not converged"});
  CHECK(st.result(true).front().rank == 2);
  dwt::check_throws_with<dw::shape_error>([&] { st.observe(0, MatD(X.leftCols(9))); }, {"'a'", "10 input features"});
}
