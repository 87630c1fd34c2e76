// LoRA3D (deltaw/papers/lora3d.hpp): every robust kernel's IRLS weight against central
// differences of ρ; the weighted Procrustes against Horn's quaternion method (an
// independent closed form) and against the ground truth on clean data; IRLS rejecting
// outliers where least squares fails; the global alignment of several views recovering
// the poses and flagging the corrupted points; the weighted point loss by central
// differences; and the self-calibration (alignment → pseudo-labels → LoRA) lowering the
// predictor's error where raw confidences do not.
#include <deltaw/autograd/gradcheck.hpp>
#include <deltaw/papers/lora3d.hpp>

#include <doctest/doctest.h>

#include <Eigen/Eigenvalues>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace lora3d_test {
namespace ag = deltaw::autograd;
namespace nn = deltaw::nn;
namespace l3 = deltaw::papers::lora3d;
using deltaw::index_t;
using MatD = deltaw::dense<double>;

MatD random_points(index_t n, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(-scale, scale);
  MatD m(n, 3);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = u(g);
  return m;
}
l3::similarity random_similarity(std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nrm(0, 1);
  l3::similarity T;
  T.R = Eigen::AngleAxisd(2.0, Eigen::Vector3d(nrm(g), nrm(g), nrm(g)).normalized()).toRotationMatrix();
  T.s = 1.7;
  T.t = Eigen::Vector3d(nrm(g), nrm(g), nrm(g));
  return T;
}
double transform_error(const l3::similarity& a, const l3::similarity& b) {
  return std::max({(a.R - b.R).norm(), std::abs(a.s - b.s), (a.t - b.t).norm()});
}

// Horn (1987): the rotation is the quaternion of the largest eigenvalue of the 4 × 4
// matrix built from the weighted cross-covariance; scale and translation as Umeyama.
l3::similarity horn(const MatD& P, const MatD& Q, const std::vector<double>& w) {
  double W = 0;
  Eigen::Vector3d mp = Eigen::Vector3d::Zero(), mq = Eigen::Vector3d::Zero();
  for (index_t i = 0; i < P.rows(); ++i) {
    W += w[std::size_t(i)];
    mp += w[std::size_t(i)] * P.row(i).transpose();
    mq += w[std::size_t(i)] * Q.row(i).transpose();
  }
  mp /= W;
  mq /= W;
  Eigen::Matrix3d M = Eigen::Matrix3d::Zero();  // Σ w a bᵀ (a from P, b from Q)
  double varp = 0;
  for (index_t i = 0; i < P.rows(); ++i) {
    const Eigen::Vector3d a = P.row(i).transpose() - mp, b = Q.row(i).transpose() - mq;
    M += w[std::size_t(i)] * a * b.transpose();
    varp += w[std::size_t(i)] * a.squaredNorm();
  }
  const double Sxx = M(0, 0), Sxy = M(0, 1), Sxz = M(0, 2), Syx = M(1, 0), Syy = M(1, 1), Syz = M(1, 2), Szx = M(2, 0),
               Szy = M(2, 1), Szz = M(2, 2);
  Eigen::Matrix4d N;
  N << Sxx + Syy + Szz, Syz - Szy, Szx - Sxz, Sxy - Syx,  //
      Syz - Szy, Sxx - Syy - Szz, Sxy + Syx, Szx + Sxz,    //
      Szx - Sxz, Sxy + Syx, -Sxx + Syy - Szz, Syz + Szy,   //
      Sxy - Syx, Szx + Sxz, Syz + Szy, -Sxx - Syy + Szz;
  Eigen::SelfAdjointEigenSolver<Eigen::Matrix4d> es(N);
  const Eigen::Vector4d q = es.eigenvectors().col(3);
  l3::similarity T;
  T.R = Eigen::Quaterniond(q(0), q(1), q(2), q(3)).normalized().toRotationMatrix();
  double num = 0;
  for (index_t i = 0; i < P.rows(); ++i)
    num += w[std::size_t(i)] * (Q.row(i).transpose() - mq).dot(T.R * (P.row(i).transpose() - mp));
  T.s = num / varp;
  T.t = mq - T.s * T.R * mp;
  return T;
}
}  // namespace lora3d_test

TEST_CASE("lora3d: each kernel's IRLS weight is rho'(r)/r by central differences") {
  using namespace lora3d_test;
  const double c = 0.5, h = 1e-6;
  for (auto k : {l3::robust_kernel::none, l3::robust_kernel::huber, l3::robust_kernel::cauchy, l3::robust_kernel::geman_mcclure}) {
    CHECK(l3::robust_weight(k, 0.0, c) == 1.0);
    CHECK(l3::robust_rho(k, 0.0, c) == 0.0);
    for (double r : {0.01, 0.3, 0.7, 2.0, 9.0}) {
      const double d = (l3::robust_rho(k, r + h, c) - l3::robust_rho(k, r - h, c)) / (2 * h);
      INFO(l3::kernel_name(k) << " r " << r);
      CHECK(l3::robust_weight(k, r, c) == doctest::Approx(d / r).epsilon(1e-6));
    }
  }
  // The redescending kernel gives far residuals almost no weight; Huber keeps c/|r|.
  CHECK(l3::robust_weight(l3::robust_kernel::geman_mcclure, 9.0, c) < 1e-5);
  CHECK(l3::robust_weight(l3::robust_kernel::huber, 9.0, c) == doctest::Approx(c / 9.0));
}

TEST_CASE("lora3d: weighted Procrustes equals Horn's quaternion solution and the truth on clean data") {
  using namespace lora3d_test;
  const MatD P = random_points(40, 1);
  const auto T = random_similarity(2);
  std::mt19937_64 g(3);
  std::uniform_real_distribution<double> uw(0.1, 2.0);
  std::normal_distribution<double> nrm(0, 1);
  std::vector<double> w(40);
  for (auto& x : w) x = uw(g);
  const MatD Q = T.apply(P);
  const auto fit = l3::weighted_similarity(P, Q, w);
  CHECK(transform_error(fit, T) < 1e-11);
  CHECK(std::abs(fit.R.determinant() - 1.0) < 1e-12);
  // Noisy data: the optimum is unique; both closed forms must agree.
  MatD Qn = Q;
  for (index_t i = 0; i < Qn.size(); ++i) Qn.data()[i] += 0.2 * nrm(g);
  const auto a = l3::weighted_similarity(P, Qn, w), b = horn(P, Qn, w);
  std::printf("lora3d weighted Procrustes vs Horn (noisy): %.2e\n", transform_error(a, b));
  CHECK(transform_error(a, b) < 1e-10);
  // A reflection in the data still gives a rotation.
  MatD Pm = P;
  Pm.col(0) *= -1.0;
  CHECK(l3::weighted_similarity(Pm, Q, w).R.determinant() == doctest::Approx(1.0).epsilon(1e-12));
  CHECK(transform_error(l3::weighted_similarity(P, Q, w, false), horn(P, Q, w)) > 0.5);  // s = 1 fixed
  CHECK(l3::weighted_similarity(P, Q, w, false).s == 1.0);
  CHECK_THROWS_AS(l3::weighted_similarity(P, Q, std::vector<double>(40, 0.0)), deltaw::argument_error);
  CHECK_THROWS_AS(l3::weighted_similarity(P, MatD(39, 3), w), deltaw::shape_error);
}

TEST_CASE("lora3d: IRLS rejects outliers that break least squares; calibrated confidences flag them") {
  using namespace lora3d_test;
  const index_t n = 120;
  const MatD P = random_points(n, 11);
  const auto T = random_similarity(12);
  MatD Q = T.apply(P);
  std::mt19937_64 g(13);
  std::uniform_real_distribution<double> u01(0, 1), uc(0.5, 1.0);
  std::normal_distribution<double> nrm(0, 1);
  std::vector<bool> out(n);
  std::vector<double> conf(n);
  for (index_t i = 0; i < n; ++i) {
    out[std::size_t(i)] = u01(g) < 0.3;
    conf[std::size_t(i)] = uc(g);  // confidences say nothing about outliers
    for (int j = 0; j < 3; ++j) Q(i, j) += out[std::size_t(i)] ? 2.0 * nrm(g) : 1e-4 * nrm(g);
  }
  l3::irls_options o;
  o.kernel = l3::robust_kernel::none;
  const double e_ls = transform_error(l3::robust_align(P, Q, conf, o).T, T);
  double e_cauchy = 0, e_gm = 0;
  for (auto k : {l3::robust_kernel::cauchy, l3::robust_kernel::geman_mcclure}) {
    o.kernel = k;
    o.c = 0.01;
    const auto r = l3::robust_align(P, Q, conf, o);
    (k == l3::robust_kernel::cauchy ? e_cauchy : e_gm) = transform_error(r.T, T);
    if (k == l3::robust_kernel::geman_mcclure) {
      double max_out = 0, min_in = 1e300;
      for (index_t i = 0; i < n; ++i)
        (out[std::size_t(i)] ? max_out : min_in) = out[std::size_t(i)] ? std::max(max_out, r.calibrated[std::size_t(i)])
                                                                        : std::min(min_in, r.calibrated[std::size_t(i)]);
      std::printf("lora3d IRLS GM: %td iterations; calibrated confidence: inliers >= %.3f, outliers <= %.2e\n", r.iterations,
                  min_in, max_out);
      CHECK(max_out < 0.01 * min_in);
      CHECK(min_in > 0.4);
    }
  }
  std::printf("lora3d transform error with 30%% outliers: least squares %.3f, Cauchy %.2e, Geman-McClure %.2e\n", e_ls,
              e_cauchy, e_gm);
  CHECK(e_ls > 0.05);
  CHECK(e_gm < 1e-3);
  CHECK(e_cauchy < 0.2 * e_ls);
}

TEST_CASE("lora3d: global alignment of views recovers the poses and flags corrupted predictions") {
  using namespace lora3d_test;
  l3::scene_options so;
  so.points = 80;
  so.views = 4;
  so.feature_noise = 0;
  so.domain_shift = 0;
  so.outlier_fraction = 0;
  so.seed = 21;
  {
    const l3::synthetic_scene sc(so);
    // The exact decoder reproduces the view points; alignment gives the true poses.
    std::vector<MatD> maps;
    for (const auto& f : sc.features) maps.push_back(f * sc.W_true.transpose());
    CHECK((maps[1] - sc.view_points[1]).cwiseAbs().maxCoeff() < 1e-10);
    const auto a = l3::align_views(maps, sc.confidence);
    double e = 0;
    for (std::size_t v = 0; v < maps.size(); ++v) e = std::max(e, transform_error(a.poses[v], sc.poses[v]));
    CHECK(e < 1e-8);
    CHECK((a.world - sc.world).cwiseAbs().maxCoeff() < 1e-8);
  }
  so.outlier_fraction = 0.2;
  so.feature_noise = 1e-3;
  const l3::synthetic_scene sc(so);
  std::vector<MatD> maps;
  for (const auto& f : sc.features) maps.push_back(f * sc.W_true.transpose());
  double worst[2] = {0, 0};
  for (int robust = 0; robust < 2; ++robust) {
    l3::irls_options o;
    o.kernel = robust ? l3::robust_kernel::geman_mcclure : l3::robust_kernel::none;
    const auto a = l3::align_views(maps, sc.confidence, o);
    for (std::size_t v = 0; v < maps.size(); ++v) worst[robust] = std::max(worst[robust], transform_error(a.poses[v], sc.poses[v]));
    if (robust) {
      const auto pl = l3::pseudo_labels(a, 0.1);
      index_t out_kept = 0, in_dropped = 0, outliers = 0;
      for (std::size_t v = 0; v < maps.size(); ++v)
        for (index_t i = 0; i < so.points; ++i) {
          const bool o_ = sc.outlier[v][std::size_t(i)], kept = pl.weights[v][std::size_t(i)] > 0;
          outliers += o_;
          out_kept += o_ && kept;
          in_dropped += !o_ && !kept;
          // A kept pseudo-label of an inlier is the true view point up to the noise.
          if (kept && !o_) CHECK((pl.targets[v].row(i) - sc.view_points[v].row(i)).norm() < 0.02);
        }
      std::printf("lora3d alignment: %td outliers of %td, kept as pseudo-labels %td; inliers dropped %td\n", outliers,
                  index_t(maps.size()) * so.points, out_kept, in_dropped);
      CHECK(out_kept <= outliers / 20);
      CHECK(in_dropped <= index_t(maps.size()) * so.points / 50);
    }
  }
  std::printf("lora3d pose error with 20%% corrupted predictions: least squares %.3f, Geman-McClure %.2e\n", worst[0], worst[1]);
  CHECK(worst[1] < 5e-3);
  CHECK(worst[0] > 10 * worst[1]);
}

TEST_CASE("lora3d: weighted point loss by central differences; self-calibration lowers the predictor's error") {
  using namespace lora3d_test;
  {
    ag::parameter<double> Y("pred", random_points(7, 31));
    const MatD target = random_points(7, 32);
    const std::vector<double> w{0.5, 0, 1, 2, 0.1, 0.7, 1.3};
    double ref = 0, W = 0;
    for (index_t i = 0; i < 7; ++i) {
      ref += w[std::size_t(i)] * (Y.value().row(i) - target.row(i)).squaredNorm();
      W += w[std::size_t(i)];
    }
    ag::tape<double> t;
    CHECK(l3::weighted_point_loss(t.param(Y), target, w).value()(0, 0) == doctest::Approx(ref / W).epsilon(1e-13));
    const auto rep = ag::gradcheck([&](ag::tape<double>& tt) { return l3::weighted_point_loss(tt.param(Y), target, w); }, {&Y});
    std::printf("gradcheck weighted_point_loss: max rel err %.2e\n", rep.max_rel_error);
    CHECK(rep.max_rel_error < 1e-7);
    CHECK(Y.grad().row(1).norm() == 0.0);  // weight 0: no gradient
    CHECK_THROWS_AS(l3::weighted_point_loss(t.param(Y), target, std::vector<double>(7, 0.0)), deltaw::argument_error);
  }
  // The LoRA of the head, through nn::linear, by central differences of the same loss.
  l3::scene_options so;
  so.points = 150;
  so.views = 4;
  so.outlier_offset = 3.0;
  so.seed = 41;
  const l3::synthetic_scene sc(so);
  auto error_on_inliers = [&](const std::vector<MatD>& pred) {
    double e = 0;
    index_t cnt = 0;
    for (std::size_t v = 0; v < pred.size(); ++v)
      for (index_t i = 0; i < so.points; ++i)
        if (!sc.outlier[v][std::size_t(i)]) {
          e += (pred[v].row(i) - sc.view_points[v].row(i)).norm();
          ++cnt;
        }
    return e / double(cnt);
  };
  double after[2] = {0, 0}, before = 0;
  for (int robust = 0; robust < 2; ++robust) {
    nn::linear<double> head("head", deltaw::view(sc.W_pretrained));
    std::mt19937_64 g(5);
    head.attach(nn::adapter_kind::lora, 1, 1.0, g);
    const auto pred0 = l3::predict_views(head, sc.features);
    before = error_on_inliers(pred0);
    l3::irls_options o;
    o.kernel = robust ? l3::robust_kernel::geman_mcclure : l3::robust_kernel::none;
    const auto a = l3::align_views(pred0, sc.confidence, o);
    const auto pl = l3::pseudo_labels(a, robust ? 0.1 : 0.0, /*exclude_own_view=*/true);
    if (robust) {
      head.lora_B()->value().setConstant(0.1);
      std::vector<ag::parameter<double>*> ps{head.lora_B(), head.lora_A()};
      const auto rep = ag::gradcheck(
          [&](ag::tape<double>& t) {
            return l3::weighted_point_loss(head(t, t.frozen(sc.features[1], "x")), pl.targets[1], pl.weights[1]);
          },
          ps);
      std::printf("gradcheck LoRA head on pseudo-labels: max rel err %.2e\n", rep.max_rel_error);
      CHECK(rep.max_rel_error < 1e-6);
      head.lora_B()->value().setZero();
    }
    l3::fine_tune(head, sc.features, pl, {300, 2e-2, 0.0});
    after[robust] = error_on_inliers(l3::predict_views(head, sc.features));
  }
  std::printf("lora3d predictor error on inlier points: before %.4f, after LoRA on raw-confidence pseudo-labels %.4f, "
              "on calibrated pseudo-labels %.4f\n",
              before, after[0], after[1]);
  CHECK(after[1] < 0.5 * before);
  CHECK(after[1] < 0.5 * after[0]);
}
