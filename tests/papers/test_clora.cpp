// CLoRA (deltaw/papers/clora.hpp): softmax_rows, select_maps and the contrastive loss
// against central differences; the loss's value against a direct evaluation of the
// formula; the composer's attention maps, fused output and masks against dense double
// references computed here; the latent optimisation lowering the loss and pulling the two
// concepts' maps apart; the errors.
#include <deltaw/autograd/gradcheck.hpp>
#include <deltaw/papers/clora.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include "test_util.hpp"

namespace clora_test {
namespace ag = deltaw::autograd;
namespace cl = deltaw::papers::clora;
using deltaw::index_t;
using MatD = deltaw::dense<double>;

MatD uniform(index_t r, index_t c, std::uint64_t seed, double lo, double hi) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(lo, hi);
  MatD m(r, c);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = u(g);
  return m;
}

/// The loss written out: cosines by loops, each positive pair's −log of its ratio.
double loss_by_formula(const MatD& M, const std::vector<index_t>& labels, double tau, bool all_pairs) {
  const index_t n = M.rows();
  auto cosine = [&](index_t i, index_t j) {
    double d = 0, a = 0, b = 0;
    for (index_t k = 0; k < M.cols(); ++k) {
      d += M(i, k) * M(j, k);
      a += M(i, k) * M(i, k);
      b += M(j, k) * M(j, k);
    }
    return d / std::sqrt(a * b);
  };
  double total = 0;
  int pairs = 0;
  std::vector<bool> seen(16, false);
  for (index_t i = 0; i < n; ++i) {
    const index_t c = labels[std::size_t(i)];
    if (c < 0) continue;
    if (!all_pairs && seen[std::size_t(c)]) continue;
    seen[std::size_t(c)] = true;
    for (index_t p = 0; p < n; ++p) {
      if (p == i || labels[std::size_t(p)] != c) continue;
      double neg = 0;
      for (index_t m = 0; m < n; ++m)
        if (labels[std::size_t(m)] >= 0 && labels[std::size_t(m)] != c) neg += std::exp(cosine(i, m) / tau);
      const double pos = std::exp(cosine(i, p) / tau);
      total += -std::log(pos / (pos + neg));
      ++pairs;
    }
  }
  return pairs ? total / pairs : 0.0;
}

MatD softmax_rows_ref(const MatD& S) {
  MatD P = S;
  for (index_t i = 0; i < P.rows(); ++i) {
    P.row(i) = (P.row(i).array() - P.row(i).maxCoeff()).exp().matrix();
    P.row(i) /= P.row(i).sum();
  }
  return P;
}

/// Two concepts (0: "cat", 1: "dog") over three branches: base, LoRA 1 (cat), LoRA 2 (dog).
struct scene {
  index_t d = 6, positions = 10, tokens = 5;
  MatD Wq, Wk, Wv, z;
  MatD B1, A1, B2, A2, C1, D1, C2, D2;
  std::vector<deltaw::low_rank<double>> keys, values;
  std::vector<cl::composer<double>::branch> branches;
  std::vector<cl::concept_token> concept_tokens;
  scene() {
    Wq = uniform(d, d, 1, -0.8, 0.8);
    Wk = uniform(d, d, 2, -0.8, 0.8);
    Wv = uniform(d, d, 3, -0.8, 0.8);
    z = uniform(positions, d, 4, -1, 1);
    B1 = uniform(d, 2, 5, -0.5, 0.5), A1 = uniform(2, d, 6, -0.5, 0.5);
    B2 = uniform(d, 2, 7, -0.5, 0.5), A2 = uniform(2, d, 8, -0.5, 0.5);
    C1 = uniform(d, 2, 9, -0.5, 0.5), D1 = uniform(2, d, 10, -0.5, 0.5);
    C2 = uniform(d, 2, 11, -0.5, 0.5), D2 = uniform(2, d, 12, -0.5, 0.5);
    keys = {deltaw::lora(B1, A1, deltaw::alpha(4)), deltaw::lora(B2, A2, deltaw::alpha(4))};
    values = {deltaw::lora(C1, D1, deltaw::alpha(4)), deltaw::lora(C2, D2, deltaw::alpha(4))};
    // Prompts: "a cat and a dog" in every branch, embeddings perturbed per branch.
    const MatD base = uniform(tokens, d, 13, -1, 1);
    branches.push_back({base, nullptr, nullptr});
    branches.push_back({MatD(base + 0.3 * uniform(tokens, d, 14, -1, 1)), &keys[0], &values[0]});
    branches.push_back({MatD(base + 0.3 * uniform(tokens, d, 15, -1, 1)), &keys[1], &values[1]});
    // Token 1 is "cat", token 4 "dog", in each branch.
    for (index_t k = 0; k < 3; ++k) {
      concept_tokens.push_back({k, 1, 0});
      concept_tokens.push_back({k, 4, 1});
    }
  }
  cl::composer<double> make() const {
    return cl::composer<double>(deltaw::view(Wq), deltaw::view(Wk), deltaw::view(Wv), branches, concept_tokens);
  }
  /// Branch k's maps softmax(z·W_qᵀ·K_kᵀ/√d), dense, with ΔW formed here.
  MatD maps(const MatD& zz, index_t k) const {
    MatD Wkk = Wk;
    if (k > 0) Wkk += keys[std::size_t(k - 1)].scale() * (k == 1 ? MatD(B1 * A1) : MatD(B2 * A2));
    const MatD K = branches[std::size_t(k)].prompt * Wkk.transpose();
    return softmax_rows_ref((zz * Wq.transpose()) * K.transpose() / std::sqrt(double(d)));
  }
  MatD output(const MatD& zz, index_t k) const {
    MatD Wvv = Wv;
    if (k > 0) Wvv += values[std::size_t(k - 1)].scale() * (k == 1 ? MatD(C1 * D1) : MatD(C2 * D2));
    return maps(zz, k) * (branches[std::size_t(k)].prompt * Wvv.transpose());
  }
};

}  // namespace clora_test

TEST_CASE("clora: softmax_rows, select_maps and the contrastive loss pass central differences") {
  using namespace clora_test;
  ag::parameter<double> S("scores", uniform(7, 5, 20, -2, 2)), T("scores2", uniform(7, 3, 21, -2, 2));
  const std::vector<index_t> which = {0, 1, 0, 1, 0}, cols = {0, 2, 3, 1, 4}, labels = {0, 0, 1, 1, -1};
  for (bool all_pairs : {true, false}) {
    cl::contrastive_options o;
    o.all_pairs = all_pairs;
    o.temperature = 0.3;
    const auto rep = ag::gradcheck(
        [&](ag::tape<double>& t) {
          std::vector<ag::var<double>> P = {cl::softmax_rows(t.param(S)), cl::softmax_rows(t.param(T))};
          return cl::contrastive_loss(cl::select_maps(P, which, cols), labels, o);
        },
        {&S, &T});
    CAPTURE(all_pairs);
    CHECK(rep.max_rel_error < 1e-6);
    CHECK(rep.min_grad_norm > 1e-4);
  }
}

TEST_CASE("clora: the contrastive loss equals the formula evaluated directly") {
  using namespace clora_test;
  const MatD M = uniform(6, 9, 30, 0.0, 1.0);
  for (const auto& labels : {std::vector<index_t>{0, 1, 0, 1, 2, 2}, std::vector<index_t>{0, 0, -1, 1, 1, 1}}) {
    for (double tau : {0.5, 0.1}) {
      for (bool all_pairs : {true, false}) {
        ag::tape<double> t;
        cl::contrastive_options o;
        o.temperature = tau;
        o.all_pairs = all_pairs;
        const auto l = cl::contrastive_loss(t.frozen(M, "M"), labels, o);
        CHECK(l.value()(0, 0) == doctest::Approx(loss_by_formula(M, labels, tau, all_pairs)).epsilon(1e-12));
      }
    }
  }
  // No positive pair: the loss is 0.
  ag::tape<double> t;
  const std::vector<index_t> lonely = {0, 1, -1};
  CHECK(cl::contrastive_loss(t.frozen(MatD(M.topRows(3)), "M"), lonely).value()(0, 0) == 0.0);
}

TEST_CASE("clora: the composer's maps and fused output equal dense references") {
  using namespace clora_test;
  const scene s;
  const auto c = s.make();
  CHECK(c.concepts() == 2);
  ag::tape<double> t;
  const MatD maps = c.concept_maps(t, t.frozen(s.z, "z")).value();
  for (std::size_t i = 0; i < s.concept_tokens.size(); ++i) {
    const auto& ct = s.concept_tokens[i];
    const MatD P = s.maps(s.z, ct.branch);
    CHECK(dwt::rel_err(MatD(maps.row(index_t(i)).transpose()), MatD(P.col(ct.token))) <= 1e-12);
  }
  for (bool hard : {true, false}) {
    cl::mask_options mo;
    mo.hard = hard;
    mo.threshold = 0.4;
    const MatD m = c.masks(s.z, mo);
    REQUIRE(m.rows() == s.positions);
    REQUIRE(m.cols() == 2);
    // Masks from the reference maps: per concept the max over branches of the min–max normalised map.
    MatD ref = MatD::Zero(s.positions, 2);
    for (const auto& ct : s.concept_tokens) {
      const Eigen::VectorXd col = s.maps(s.z, ct.branch).col(ct.token);
      const Eigen::VectorXd v = (col.array() - col.minCoeff()) / (col.maxCoeff() - col.minCoeff());
      for (index_t p = 0; p < s.positions; ++p) ref(p, ct.concept_id) = std::max(ref(p, ct.concept_id), v(p));
    }
    for (index_t p = 0; p < s.positions; ++p) {
      CAPTURE(p);
      if (hard) {
        const index_t best = ref(p, 0) >= ref(p, 1) ? 0 : 1;
        const bool on = ref(p, best) >= 0.4;
        CHECK(m(p, best) == (on ? 1.0 : 0.0));
        CHECK(m(p, 1 - best) == 0.0);
      } else {
        Eigen::RowVector2d r = ref.row(p);
        for (int k = 0; k < 2; ++k)
          if (r(k) < 0.4) r(k) = 0;
        if (r.sum() > 1) r /= r.sum();
        CHECK((m.row(p) - r).cwiseAbs().maxCoeff() <= 1e-12);
        CHECK(m.row(p).sum() <= 1.0 + 1e-12);
      }
    }
    // Fusion: concept 0 → branch 1 (cat LoRA), concept 1 → branch 2 (dog LoRA).
    const std::vector<index_t> cb = {1, 2};
    const MatD fused = c.fuse(s.z, m, cb);
    const MatD O0 = s.output(s.z, 0), O1 = s.output(s.z, 1), O2 = s.output(s.z, 2);
    MatD expect(s.positions, s.d);
    for (index_t p = 0; p < s.positions; ++p)
      expect.row(p) = m(p, 0) * O1.row(p) + m(p, 1) * O2.row(p) + (1.0 - m(p, 0) - m(p, 1)) * O0.row(p);
    CHECK(dwt::rel_err(fused, expect) <= 1e-12);
  }
}

TEST_CASE("clora: optimising the latent lowers the loss and separates the concepts' maps") {
  using namespace clora_test;
  const scene s;
  const auto c = s.make();
  // The loss through the whole layer against central differences in z.
  ag::parameter<double> zp("z", s.z);
  const auto rep = ag::gradcheck([&](ag::tape<double>& t) { return c.loss(t, t.param(zp)); }, {&zp});
  CHECK(rep.max_rel_error < 1e-6);
  CHECK(rep.min_grad_norm > 1e-6);

  // Mean cosine between a cat map and a dog map, from the dense reference maps.
  auto cross_cosine = [&](const MatD& zz) {
    double sum = 0;
    int n = 0;
    for (index_t a = 0; a < 3; ++a)
      for (index_t b = 0; b < 3; ++b) {
        const Eigen::VectorXd u = s.maps(zz, a).col(1), v = s.maps(zz, b).col(4);
        sum += u.dot(v) / (u.norm() * v.norm());
        ++n;
      }
    return sum / n;
  };
  MatD z = s.z;
  cl::latent_options o;
  o.steps = 30;
  o.step_size = 2.0;
  const auto history = c.optimise_latent(z, o);
  REQUIRE(history.size() == 31);
  MESSAGE("CLoRA latent optimisation: loss " << history.front() << " -> " << history.back()
                                              << ", cat/dog map cosine " << cross_cosine(s.z) << " -> "
                                              << cross_cosine(z));
  CHECK(history.back() < 0.9 * history.front());
  CHECK(cross_cosine(z) < cross_cosine(s.z));
  // The returned latent is the last step's: its loss is the history's last entry.
  ag::tape<double> t;
  CHECK(c.loss(t, t.frozen(z, "z")).value()(0, 0) == doctest::Approx(history.back()).epsilon(1e-12));
}

TEST_CASE("clora: errors name the problem") {
  using namespace clora_test;
  const scene s;
  ag::tape<double> t;
  const MatD M = uniform(3, 4, 40, 0, 1);
  const std::vector<index_t> two = {0, 0};
  dwt::check_throws_with<deltaw::shape_error>([&] { cl::contrastive_loss(t.frozen(M, "M"), two); },
                                              {"2 concept labels for 3 maps"});
  MatD Z = M;
  Z.row(1).setZero();
  const std::vector<index_t> three = {0, 0, 1};
  dwt::check_throws_with<deltaw::argument_error>([&] { cl::contrastive_loss(t.frozen(Z, "M"), three); },
                                                 {"map 1 has norm 0", "undefined"});
  auto bad = s.concept_tokens;
  bad.push_back({1, 9, 0});
  dwt::check_throws_with<deltaw::argument_error>(
      [&] { cl::composer<double>(deltaw::view(s.Wq), deltaw::view(s.Wk), deltaw::view(s.Wv), s.branches, bad); },
      {"branch 1, token 9", "does not name a prompt token"});
  const auto c = s.make();
  const std::vector<index_t> cb = {1, 5};
  dwt::check_throws_with<deltaw::argument_error>([&] { c.fuse(s.z, c.masks(s.z), cb); },
                                                 {"concept branch 5 outside [0, 3)"});
}
