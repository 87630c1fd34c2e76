// Every autograd op against central differences in double, over random shapes.
#include "grad_util.hpp"

using namespace dwag;

TEST_CASE("autograd ops: gradient check over random shapes") {
  std::mt19937_64 g(7);
  double worst = 0;
  for (int trial = 0; trial < 3; ++trial) {
    const auto n = dim(g, 1, 6), k = dim(g, 1, 5), m = dim(g, 1, 5);
    const std::uint64_t s = 100 * trial;
    auto a = param("a", n, k, s + 1), b = param("b", n, k, s + 2), w = param("w", k, m, s + 3),
         bias = param("bias", 1, k, s + 4), gam = param("gamma", 1, k, s + 5), bet = param("beta", 1, k, s + 6),
         wt = param("wt", m, k, s + 7);
    worst = std::max(worst, check("add", [&](auto& t) { return ag::add(t.param(*a), t.param(*b)); }, {a.get(), b.get()}, s));
    worst = std::max(worst, check("scale", [&](auto& t) { return ag::scale(t.param(*a), -1.7); }, {a.get()}, s));
    worst = std::max(worst, check("add_bias", [&](auto& t) { return ag::add_bias(t.param(*a), t.param(*bias)); },
                                  {a.get(), bias.get()}, s));
    worst = std::max(worst, check("matmul", [&](auto& t) { return ag::matmul(t.param(*a), t.param(*w)); },
                                  {a.get(), w.get()}, s));
    worst = std::max(worst, check("matmul_nt", [&](auto& t) { return ag::matmul_nt(t.param(*a), t.param(*wt)); },
                                  {a.get(), wt.get()}, s));
    // Keep entries away from relu's kink, where central differences are not defined.
    auto ar = param("a", n, k, s + 8);
    for (Eigen::Index i = 0; i < ar->size(); ++i) {
      double& v = ar->value().data()[i];
      if (std::abs(v) < 0.05) v += 0.1;
    }
    worst = std::max(worst, check("relu", [&](auto& t) { return ag::relu(t.param(*ar)); }, {ar.get()}, s));
    worst = std::max(worst, check("gelu", [&](auto& t) { return ag::gelu(t.param(*a)); }, {a.get()}, s));
    worst = std::max(worst, check("silu", [&](auto& t) { return ag::silu(t.param(*a)); }, {a.get()}, s));
    if (k > 1) {
      worst = std::max(worst, check("layer_norm",
                                    [&](auto& t) { return ag::layer_norm(t.param(*a), t.param(*gam), t.param(*bet)); },
                                    {a.get(), gam.get(), bet.get()}, s));
    }
    // With one feature the norms are constant (±γ): nothing to check there.
    if (k > 1)
      worst = std::max(worst, check("rms_norm", [&](auto& t) { return ag::rms_norm(t.param(*a), t.param(*gam)); },
                                    {a.get(), gam.get()}, s));
    {
      auto table = param("table", 7, k, s + 9);
      std::vector<std::int64_t> ids;
      for (int i = 0; i < 9; ++i) ids.push_back(std::int64_t(dim(g, 0, 6)));
      worst = std::max(worst, check("embedding", [&](auto& t) { return ag::embedding(t.param(*table), ids); },
                                    {table.get()}, s));
    }
    {
      const Eigen::Index batch = dim(g, 1, 2), seq = dim(g, 1, 4), heads = dim(g, 1, 2), dh = dim(g, 1, 3);
      auto q = param("q", batch * seq, heads * dh, s + 10), kk = param("k", batch * seq, heads * dh, s + 11),
           v = param("v", batch * seq, heads * dh, s + 12);
      worst = std::max(worst, check("causal_attention",
                                    [&](auto& t) {
                                      return ag::causal_attention(t.param(*q), t.param(*kk), t.param(*v), batch, seq, heads);
                                    },
                                    {q.get(), kk.get(), v.get()}, s));
    }
    {
      auto logits = param("logits", n + 1, m + 1, s + 13, 2.0);
      std::vector<std::int64_t> labels;
      for (Eigen::Index i = 0; i < n + 1; ++i) labels.push_back(i == 0 ? ag::ignore_label : std::int64_t(dim(g, 0, int(m))));
      if (n + 1 == 1) labels[0] = 0;
      const auto rep = ag::gradcheck([&](auto& t) { return ag::cross_entropy(t.param(*logits), labels); }, {logits.get()});
      CHECK(rep.max_rel_error < 1e-6);
      std::printf("gradcheck %-28s entries %5td  max rel err %.2e\n", "cross_entropy (ignore -100)", rep.entries,
                  rep.max_rel_error);
      worst = std::max(worst, rep.max_rel_error);
      // the ignored row gets no gradient
      if (labels[0] == ag::ignore_label) CHECK(logits->grad().row(0).norm() == 0.0);
    }
    {
      auto p = param("pred", n, m, s + 14), q = param("target", n, m, s + 15);
      const auto rep = ag::gradcheck([&](auto& t) { return ag::mse(t.param(*p), t.param(*q)); }, {p.get(), q.get()});
      CHECK(rep.max_rel_error < 1e-6);
      std::printf("gradcheck %-28s entries %5td  max rel err %.2e\n", "mse", rep.entries, rep.max_rel_error);
      worst = std::max(worst, rep.max_rel_error);
    }
    {
      auto p = param("x", n, m, s + 16);
      const auto rep = ag::gradcheck([&](auto& t) { return ag::sum(ag::gelu(t.param(*p))); }, {p.get()});
      CHECK(rep.max_rel_error < 1e-6);
      worst = std::max(worst, rep.max_rel_error);
    }
  }
  std::printf("gradcheck ops: worst relative error %.2e\n", worst);
}

TEST_CASE("autograd: cross-entropy and MSE values against direct formulas") {
  const MatD L = dwt::random<MatD>(4, 5, 3) * 3.0;
  const std::vector<std::int64_t> labels{2, ag::ignore_label, 0, 4};
  ag::tape<double> t;
  const auto loss = ag::cross_entropy(t.frozen(L), labels);
  double ref = 0;
  int cnt = 0;
  for (int i = 0; i < 4; ++i) {
    if (labels[std::size_t(i)] == ag::ignore_label) continue;
    double z = 0;
    for (int j = 0; j < 5; ++j) z += std::exp(L(i, j));
    ref += std::log(z) - L(i, labels[std::size_t(i)]);
    ++cnt;
  }
  CHECK(loss.value()(0, 0) == doctest::Approx(ref / cnt).epsilon(1e-12));
  const MatD a = dwt::random<MatD>(3, 2, 4), b = dwt::random<MatD>(3, 2, 5);
  CHECK(ag::mse(t.frozen(a), t.frozen(b)).value()(0, 0) == doctest::Approx((a - b).squaredNorm() / 6).epsilon(1e-12));
}

TEST_CASE("autograd: accuracy counts argmax hits over the rows not ignored") {
  // Rows whose argmax is planted at a known column: 0 → col 3 (label 3, hit), 1 → col 1
  // (label 2, miss), 2 ignored, 3 → col 0 (label 0, hit).
  MatD L = dwt::random<MatD>(4, 5, 9);
  const int planted[4] = {3, 1, 4, 0};
  for (int i = 0; i < 4; ++i) L(i, planted[i]) = 10.0;
  const std::vector<std::int64_t> labels{3, 2, ag::ignore_label, 0};
  ag::tape<double> t;
  const auto x = t.frozen(L);
  CHECK(ag::accuracy(x, labels) == doctest::Approx(2.0 / 3.0).epsilon(1e-15));
  CHECK(ag::accuracy(x, std::vector<std::int64_t>(4, ag::ignore_label)) == 0.0);
  dwt::check_throws_with<deltaw::shape_error>([&] { (void)ag::accuracy(x, {0, 1}); }, {"accuracy", "[4, 5]", "2 labels"});
  dwt::check_throws_with<deltaw::argument_error>([&] { (void)ag::accuracy(x, {0, 1, 5, 0}); },
                                             {"accuracy", "label 5 at row 2", "outside [0, 5)"});
}

TEST_CASE("autograd: attention matches a dense masked reference") {
  const Eigen::Index batch = 2, seq = 3, heads = 2, dh = 2;
  const MatD Q = dwt::random<MatD>(6, 4, 1), K = dwt::random<MatD>(6, 4, 2), V = dwt::random<MatD>(6, 4, 3);
  ag::tape<double> t;
  const auto y = ag::causal_attention(t.frozen(Q), t.frozen(K), t.frozen(V), batch, seq, heads);
  for (Eigen::Index b = 0; b < batch; ++b)
    for (Eigen::Index h = 0; h < heads; ++h)
      for (Eigen::Index i = 0; i < seq; ++i) {
        Eigen::VectorXd w(i + 1);
        for (Eigen::Index j = 0; j <= i; ++j)
          w(j) = std::exp(Q.row(b * seq + i).segment(h * dh, dh).dot(K.row(b * seq + j).segment(h * dh, dh)) / std::sqrt(2.0));
        w /= w.sum();
        Eigen::RowVectorXd o = Eigen::RowVectorXd::Zero(dh);
        for (Eigen::Index j = 0; j <= i; ++j) o += w(j) * V.row(b * seq + j).segment(h * dh, dh);
        CHECK((y.value().row(b * seq + i).segment(h * dh, dh) - o).norm() < 1e-12);
      }
}
