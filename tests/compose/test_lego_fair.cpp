// LoRA-LEGO (rank-1 units clustered into a rank-k LoRA) and the federated aggregations
// (FedAvg, FFA, LoRA-FAIR) against dense double references.
#include <deltaw/compose.hpp>

#include <algorithm>
#include <numeric>

#include "test_util.hpp"

namespace cp = deltaw::compose;
using dwt::MatD;

namespace {
template <class T>
MatD mat_of(const deltaw::matrix_view<const T>& v) {
  MatD m(v.rows(), v.cols());
  for (int i = 0; i < m.rows(); ++i)
    for (int j = 0; j < m.cols(); ++j) m(i, j) = v(i, j);
  return m;
}
MatD lego_dense(const deltaw::low_rank<double>& l) { return l.scale() * mat_of(l.B()) * mat_of(l.A()); }
}  // namespace

TEST_CASE("compose: LoRA-LEGO with one cluster per unit is the exact weighted sum") {
  std::vector<deltaw::low_rank<double>> a{
      deltaw::lora(dwt::random(9, 3, 1), dwt::random(3, 7, 2), deltaw::scale(2.0)),
      deltaw::lora(dwt::random(9, 2, 3), dwt::random(2, 7, 4), deltaw::scale(0.5))};
  std::vector<double> w{0.6, -1.5};
  for (auto scaling : {cp::lego_unit_scaling::balanced, cp::lego_unit_scaling::on_a}) {
    cp::lego_options o;
    o.k = 5;
    o.output = cp::lego_output::none;
    o.unit_scaling = scaling;
    const auto r = cp::lora_lego(a, w, o);
    CHECK(r.lora.rank() == 5);
    CHECK(r.inertia == doctest::Approx(0.0));
    const MatD ref = 0.6 * lego_dense(a[0]) + -1.5 * lego_dense(a[1]);
    CHECK(dwt::rel_err(lego_dense(r.lora), ref) < 1e-13);
  }
}

TEST_CASE("compose: LoRA-LEGO centroids, parameter and output reweighting against the labels") {
  // Two adapters whose units come in near-pairs (adapter 1 = adapter 0 with rank order
  // reversed and a small perturbation): k = r clusters pair them up.
  const MatD B0 = dwt::random(10, 4, 5), A0 = dwt::random(4, 8, 6);
  MatD B1 = B0.rowwise().reverse() + 0.01 * dwt::random(10, 4, 7);
  MatD A1 = A0.colwise().reverse() + 0.01 * dwt::random(4, 8, 8);
  std::vector<deltaw::low_rank<double>> a{deltaw::lora(MatD(B0), MatD(A0), deltaw::scale(1.0)),
                                          deltaw::lora(MatD(B1), MatD(A1), deltaw::scale(1.0))};
  std::vector<double> w{1.0, 1.0};
  for (auto norm : {cp::lego_norm::none, cp::lego_norm::joint, cp::lego_norm::per_factor}) {
    cp::lego_options o;
    o.k = 4;
    o.norm = norm;
    o.kmeans.restarts = 4;
    o.kmeans.seed = 3;
    const auto r = cp::lora_lego(a, w, o);
    CHECK(r.lora.scale() == doctest::Approx(1.0));  // √(r/k) with r = k = 4
    // Pairs: unit j of adapter 0 with unit 3 − j of adapter 1.
    for (int j = 0; j < 4; ++j) CHECK(r.labels[std::size_t(j)] == r.labels[std::size_t(4 + 3 - j)]);
    // Centroid of each cluster from the labels, independently.
    const MatD Bm = mat_of(r.lora.B()), Am = mat_of(r.lora.A());
    for (int c = 0; c < 4; ++c) {
      Eigen::VectorXd ca = Eigen::VectorXd::Zero(8), cb = Eigen::VectorXd::Zero(10);
      double na = 0, nb = 0, nj = 0;
      int cnt = 0;
      for (int u = 0; u < 8; ++u) {
        if (r.labels[std::size_t(u)] != c) continue;
        const Eigen::VectorXd ua = u < 4 ? Eigen::VectorXd(A0.row(u).transpose()) : Eigen::VectorXd(A1.row(u - 4).transpose());
        const Eigen::VectorXd ub = u < 4 ? Eigen::VectorXd(B0.col(u)) : Eigen::VectorXd(B1.col(u - 4));
        ca += ua, cb += ub, ++cnt;
        na += ua.norm(), nb += ub.norm(), nj += std::sqrt(ua.squaredNorm() + ub.squaredNorm());
      }
      REQUIRE(cnt == 2);
      ca /= cnt, cb /= cnt, na /= cnt, nb /= cnt, nj /= cnt;
      if (norm == cp::lego_norm::joint) {
        const double f = nj / std::sqrt(ca.squaredNorm() + cb.squaredNorm());
        ca *= f, cb *= f;
      } else if (norm == cp::lego_norm::per_factor) {
        ca *= na / ca.norm(), cb *= nb / cb.norm();
      }
      CHECK(dwt::rel_err(Am.row(c).transpose(), ca) < 1e-12);
      CHECK(dwt::rel_err(Bm.col(c), cb) < 1e-12);
    }
    // Close to the adapters' common update.
    CHECK((lego_dense(r.lora) - lego_dense(a[0])).norm() < 0.05 * lego_dense(a[0]).norm());
  }
  cp::lego_options o;
  o.k = 2;
  CHECK(cp::lora_lego(a, w, o).lora.scale() == doctest::Approx(std::sqrt(2.0)));  // √(4/2)
  o.k = 9;
  dwt::check_throws_with<deltaw::argument_error>([&] { (void)cp::lora_lego(a, w, o); }, {"k = 9", "8 rank-1 units"});
}

TEST_CASE("compose: LoRA-LEGO canonical signs pair (b, a) with (−b, −a)") {
  const MatD B0 = dwt::random(10, 3, 11), A0 = dwt::random(3, 8, 12);
  std::vector<deltaw::low_rank<double>> a{deltaw::lora(MatD(B0), MatD(A0)), deltaw::lora(MatD(-B0), MatD(-A0))};
  std::vector<double> w{1.0, 1.0};
  cp::lego_options o;
  o.k = 3;
  o.norm = cp::lego_norm::none;
  o.kmeans.restarts = 4;
  o.canonical_sign = true;
  CHECK(dwt::rel_err(lego_dense(cp::lora_lego(a, w, o).lora), lego_dense(a[0])) < 1e-12);
}

TEST_CASE("compose: FedAvg, FFA and LoRA-FAIR aggregation against the dense sums") {
  const int out = 11, in = 9, r = 3, K = 4;
  std::vector<deltaw::low_rank<double>> clients;
  for (int k = 0; k < K; ++k)
    clients.push_back(deltaw::lora(dwt::random(out, r, 30 + k), dwt::random(r, in, 40 + k), deltaw::scale(0.5)));
  const std::vector<double> counts{1, 2, 3, 4};
  MatD T = MatD::Zero(out, in), Bbar = MatD::Zero(out, r), Abar = MatD::Zero(r, in);
  for (int k = 0; k < K; ++k) {
    const double p = counts[std::size_t(k)] / 10.0;
    T += p * mat_of(clients[std::size_t(k)].B()) * mat_of(clients[std::size_t(k)].A());
    Bbar += p * mat_of(clients[std::size_t(k)].B());
    Abar += p * mat_of(clients[std::size_t(k)].A());
  }
  const auto avg = cp::fedavg(clients, counts);
  CHECK(dwt::rel_err(mat_of(avg.B()), Bbar) < 1e-14);
  CHECK(dwt::rel_err(mat_of(avg.A()), Abar) < 1e-14);
  const double e_avg = cp::aggregation_error(avg, clients, counts);
  CHECK(e_avg == doctest::Approx((0.5 * (Bbar * Abar - T)).norm()).epsilon(1e-10));
  for (double lambda : {0.0, 0.01, 1.0}) {
    CAPTURE(lambda);
    const auto fair = cp::lora_fair(clients, counts, cp::fair_options{lambda});
    // Dense least squares: X·[Ā, √λ·I] ≈ [T, √λ·B̄], X = B̄ + ΔB, by QR of the transpose.
    MatD M(r, in + r), N(out, in + r);
    M << Abar, std::sqrt(lambda) * MatD::Identity(r, r);
    N << T, std::sqrt(lambda) * Bbar;
    const MatD X = Eigen::MatrixXd(M.transpose()).colPivHouseholderQr().solve(Eigen::MatrixXd(N.transpose())).transpose();
    CHECK(dwt::rel_err(fair.delta_B, X - Bbar) < 1e-10);
    CHECK(dwt::rel_err(mat_of(fair.lora.B()), X) < 1e-10);
    const double e_fair = cp::aggregation_error(fair.lora, clients, counts);
    CHECK(e_fair == doctest::Approx((0.5 * (X * Abar - T)).norm()).epsilon(1e-9));
    CHECK(e_fair <= e_avg);
  }
  // FFA: a shared A makes FedAvg exact.
  std::vector<deltaw::low_rank<double>> ffa;
  const MatD A = dwt::random(r, in, 50);
  for (int k = 0; k < K; ++k) ffa.push_back(deltaw::lora(dwt::random(out, r, 60 + k), MatD(A), deltaw::scale(0.5)));
  CHECK(cp::aggregation_error(cp::fedavg(ffa, counts), ffa, counts) < 1e-12);
  CHECK(cp::lora_fair(ffa, counts).delta_B.norm() < 1e-12);
  dwt::check_throws_with<deltaw::argument_error>([&] { (void)cp::fedavg(clients, {1.0, 2.0}); },
                                                 {"4 clients but 2 weights"});
  clients[1] = clients[1].with_scale(0.25);
  dwt::check_throws_with<deltaw::argument_error>([&] { (void)cp::lora_fair(clients, counts); }, {"client 1", "scale"});
}
