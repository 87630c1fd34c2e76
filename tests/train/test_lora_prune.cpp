// LoRAPrune (train/lora_prune.hpp): the importance against dense double matrices formed
// here only (and no out×in allocation inside), the masking op by central differences and
// bit for bit, the cubic schedule and the choice of masked channels at every event, a
// short fit run reaching the target sparsity, the export of the mask, and bad inputs.
#include <deltaw/train/lora_prune.hpp>
#include <deltaw/train/loop.hpp>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "../alloc_counter.hpp"
#include "../autograd/grad_util.hpp"

using namespace dwag;
namespace tr = deltaw::train;
namespace nn = deltaw::nn;
using deltaw::index_t;

namespace {
// The formula with every matrix dense: Ĝ = g_B·A + B·g_A − c·g_B·g_A, W' = W + s·B·A.
std::vector<double> dense_importance(const MatD& W, const MatD& B, const MatD& A, double s, const MatD& gB,
                                     const MatD& gA, double c, index_t group, double scale = 1.0) {
  const MatD G = scale * (gB * A + B * gA - c * gB * gA);
  const MatD Wp = W + s * B * A;
  const Eigen::VectorXd rows = G.cwiseProduct(Wp).cwiseAbs().rowwise().sum();
  std::vector<double> I(std::size_t(W.rows() / group), 0.0);
  for (index_t o = 0; o < W.rows(); ++o) I[std::size_t(o / group)] += rows(o);
  return I;
}
double max_rel(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0, big = 1e-300;
  for (std::size_t i = 0; i < a.size(); ++i) {
    m = std::max(m, std::abs(a[i] - b[i]));
    big = std::max(big, std::abs(b[i]));
  }
  return m / big;
}

// A small MLP of nn::linear layers over weights it owns.
struct mlp {
  std::vector<std::unique_ptr<MatD>> w;
  std::vector<std::unique_ptr<nn::linear<double>>> l;
  mlp(const std::vector<index_t>& dims, index_t r, std::uint64_t seed) {
    std::mt19937_64 g(seed);
    for (std::size_t k = 0; k + 1 < dims.size(); ++k) {
      w.push_back(std::make_unique<MatD>(dwt::random<MatD>(dims[k + 1], dims[k], seed + k) / std::sqrt(double(dims[k]))));
      std::string name = "l";  // (not "l" + to_string: g++ 12 warns -Wrestrict falsely)
      name += std::to_string(k);
      l.push_back(std::make_unique<nn::linear<double>>(name, deltaw::view(std::as_const(*w.back()))));
      l.back()->set_bias(dwt::random<MatD>(1, dims[k + 1], seed + 50 + k) * 0.1);
      l.back()->attach(nn::adapter_kind::lora, r, 2.0 * double(r), g);
      // B = 0 would make g_A zero at the first step: start from a small B.
      l.back()->lora_B()->value() = 0.05 * dwt::random<MatD>(dims[k + 1], r, seed + 90 + k);
    }
  }
  ag::var<double> operator()(ag::tape<double>& t, const ag::var<double>& x) const {
    auto h = x;
    for (std::size_t k = 0; k < l.size(); ++k) {
      h = (*l[k])(t, h);
      if (k + 1 < l.size()) h = ag::relu(h);
    }
    return h;
  }
  std::vector<P*> params() {
    std::vector<P*> ps;
    for (auto& x : l) x->collect(ps);
    return ps;
  }
};
}  // namespace

TEST_CASE("LoRAPrune importance: equals the dense |Ĝ ⊙ W'| row sums for chunks 1, 7, 64, grouped, any layout") {
  struct shape_case {
    index_t out, in, r;
  };
  for (auto sc : {shape_case{13, 11, 3}, shape_case{37, 29, 5}, shape_case{64, 50, 1}, shape_case{36, 17, 4}}) {
    const MatD W = dwt::random<MatD>(sc.out, sc.in, 1), B = dwt::random<MatD>(sc.out, sc.r, 2),
               A = dwt::random<MatD>(sc.r, sc.in, 3), gB = dwt::random<MatD>(sc.out, sc.r, 4),
               gA = dwt::random<MatD>(sc.r, sc.in, 5);
    const dwt::ColMat<double> Wc = W;  // a column-major view of the same W
    for (index_t chunk : {1, 7, 64})
      for (index_t group : {1, 4, 6}) {
        if (sc.out % group != 0) continue;
        tr::lora_importance_options o;
        o.chunk = chunk;
        o.group_size = group;
        const auto ref = dense_importance(W, B, A, 0.7, gB, gA, 1.0, group);
        const auto got = tr::lora_prune_importance<double>(deltaw::view(W), B, A, 0.7, gB, gA, o);
        INFO(sc.out << "x" << sc.in << " r " << sc.r << " chunk " << chunk << " group " << group);
        CHECK(max_rel(got, ref) < 1e-13);
        CHECK(max_rel(tr::lora_prune_importance<double>(deltaw::view(Wc), B, A, 0.7, gB, gA, o), ref) < 1e-13);
      }
    tr::lora_importance_options o;
    o.cross_weight = 0.25;
    o.gradient_scale = -3.0;
    o.chunk = 5;
    CHECK(max_rel(tr::lora_prune_importance<double>(deltaw::view(W), B, A, 1.5, gB, gA, o),
                  dense_importance(W, B, A, 1.5, gB, gA, 0.25, 1, -3.0)) < 1e-13);
  }
  // float factors: the sums are in double; compare with the double formula on the same values.
  const dwt::MatF Wf = dwt::random<dwt::MatF>(20, 9, 6), Bf = dwt::random<dwt::MatF>(20, 2, 7),
                  Af = dwt::random<dwt::MatF>(2, 9, 8), gBf = dwt::random<dwt::MatF>(20, 2, 9),
                  gAf = dwt::random<dwt::MatF>(2, 9, 10);
  tr::lora_importance_options o;
  o.chunk = 3;
  CHECK(max_rel(tr::lora_prune_importance<float>(deltaw::view(Wf), Bf, Af, 0.5, gBf, gAf, o),
                dense_importance(Wf.cast<double>(), Bf.cast<double>(), Af.cast<double>(), 0.5, gBf.cast<double>(),
                                 gAf.cast<double>(), 1.0, 1)) < 1e-12);
}

TEST_CASE("LoRAPrune importance: no out×in allocation") {
  const index_t out = 256, in = 192, r = 4;
  const MatD W = dwt::random<MatD>(out, in, 11), B = dwt::random<MatD>(out, r, 12), A = dwt::random<MatD>(r, in, 13),
             gB = dwt::random<MatD>(out, r, 14), gA = dwt::random<MatD>(r, in, 15);
  tr::lora_importance_options o;
  o.chunk = 8;
  std::vector<double> got;
  const std::size_t big = dwt::largest_allocation([&] { got = tr::lora_prune_importance<double>(deltaw::view(W), B, A, 2.0, gB, gA, o); });
  const std::size_t dense_bytes = std::size_t(out * in) * sizeof(double);
  MESSAGE("largest allocation while scoring " << out << "x" << in << " (r " << r << ", chunk 8): " << big
                                              << " B; out x in is " << dense_bytes << " B");
  CHECK(max_rel(got, dense_importance(W, B, A, 2.0, gB, gA, 1.0, 1)) < 1e-13);
  if (dwt::allocation_counting_available()) {
    CHECK(big > 0);
    CHECK(big * 8 <= dense_bytes);
    CHECK(dwt::largest_allocation([&] { MatD d(out, in); d.setZero(); }) >= dense_bytes);  // the counter sees it
  }
}

TEST_CASE("mask_columns: masked columns exactly 0, others bit for bit; VJP by central differences") {
  auto Y = param("Y", 6, 9, 21);
  const std::vector<index_t> cols{0, 4, 5, 8};
  ag::tape<double> t;
  const auto y = tr::mask_columns(t.param(*Y), cols);
  const MatD v = y.value();
  for (index_t j = 0; j < 9; ++j)
    for (index_t i = 0; i < 6; ++i) {
      if (std::find(cols.begin(), cols.end(), j) != cols.end())
        CHECK(v(i, j) == 0.0);
      else
        CHECK(v(i, j) == Y->value()(i, j));
    }
  // Y as a product, so that the check covers the op inside a graph.
  auto X = param("X", 6, 5, 22), M = param("M", 9, 5, 23);
  check("mask_columns", [&](ag::tape<double>& tp) { return tr::mask_columns(ag::matmul_nt(tp.param(*X), tp.param(*M)), cols); },
        {X.get(), M.get()}, 24);
  dwt::check_throws_with<deltaw::argument_error>([&] { (void)tr::mask_columns(t.param(*Y), {9}); }, {"column 9"});
}

TEST_CASE("LoRAPrune cubic schedule: the formula, non-decreasing, never above the target") {
  for (double w0 : {0.0, 0.1})
    for (double w1 : {0.0, 0.2}) {
      tr::lora_prune_options o;
      o.target_sparsity = 0.6;
      o.initial_warmup = w0;
      o.final_warmup = w1;
      const index_t T = 100;
      double prev = 0;
      for (index_t d = 0; d <= T; ++d) {
        const double got = tr::lora_prune_sparsity(o, d, T);
        const double a = w0 * T, b = T - w1 * T;
        const double want = d <= a ? 0.0 : d >= b ? 0.6 : 0.6 * (1 - std::pow(1 - (d - a) / (b - a), 3));
        CHECK(std::abs(got - want) < 1e-15);
        CHECK(got >= prev);
        CHECK(got <= 0.6);
        prev = got;
      }
      CHECK(tr::lora_prune_sparsity(o, T, T) == 0.6);
    }
}

TEST_CASE("LoRAPrune method: Ī against the dense formula; at each event the cubic count, lowest Ī masked, masks kept") {
  mlp net({6, 12, 16, 3}, 2, 31);
  const MatD X = dwt::random<MatD>(40, 6, 32), Yt = dwt::random<MatD>(40, 3, 33);
  tr::lora_prune_options o;
  o.target_sparsity = 0.7;
  o.interval = 5;
  o.total_steps = 33;  // not a multiple of 5: the last event is at step 33
  auto pr = std::make_unique<tr::lora_prune<double>>(std::vector<nn::linear<double>*>{net.l[0].get(), net.l[1].get()}, o,
                                                     std::vector<index_t>{1, 4});
  CHECK(pr->group_count(0) == 12);
  CHECK(pr->group_count(1) == 4);
  deltaw::optim::adamw<double> opt(net.params(), {.lr = 1e-2});
  std::vector<std::vector<double>> prev_ema(2, std::vector<double>());
  index_t events = 0;
  for (index_t step = 0; step < 33; ++step) {
    tr::step_context ctx;
    ctx.step = step;
    ag::tape<double> t;
    auto loss = ag::mse(net(t, t.frozen(X)), t.frozen(Yt));
    t.backward(loss);
    // The expected Ī from the layers' factors and gradients, before the method reads them.
    std::vector<std::vector<double>> want(2);
    for (index_t i = 0; i < 2; ++i) {
      auto* l = net.l[std::size_t(i)].get();
      auto I = dense_importance(*net.w[std::size_t(i)], l->lora_B()->value(), l->lora_A()->value(), l->scale(),
                                l->lora_B()->grad(), l->lora_A()->grad(), 1.0, pr->group_size(i));
      double n = 0;
      for (double v : I) n += v * v;
      want[std::size_t(i)].resize(I.size());
      for (std::size_t g = 0; g < I.size(); ++g)
        want[std::size_t(i)][g] = 0.9 * (step == 0 ? 0.0 : prev_ema[std::size_t(i)][g]) + 0.1 * I[g] / (std::sqrt(n) + 1e-8);
    }
    pr->after_backward(ctx);
    for (index_t i = 0; i < 2; ++i) {
      CHECK(max_rel(pr->importance(i), want[std::size_t(i)]) < 1e-12);
      prev_ema[std::size_t(i)] = pr->importance(i);
    }
    opt.step(1.0);
    opt.zero_grad();
    const std::vector<std::uint8_t> before0 = pr->masked(0), before1 = pr->masked(1);
    pr->after_step(ctx);
    const index_t done = step + 1;
    const bool event = done % 5 == 0 || done == 33;
    if (!event) {
      CHECK(pr->masked(0) == before0);
      CHECK(pr->masked(1) == before1);
      continue;
    }
    ++events;
    const double sp = 0.7 * (1 - std::pow(1 - double(done) / 33.0, 3));
    CHECK(std::abs(pr->sparsity() - sp) < 1e-15);
    for (index_t i = 0; i < 2; ++i) {
      const auto& before = i == 0 ? before0 : before1;
      const auto& now = pr->masked(i);
      const auto& ema = pr->importance(i);
      const index_t n = pr->group_count(i);
      CHECK(pr->masked_count(i) == index_t(std::floor(sp * double(n))));
      CHECK(double(pr->masked_count(i)) <= 0.7 * double(n));
      // Kept: every channel masked before is masked now.
      for (std::size_t g = 0; g < before.size(); ++g)
        if (before[g]) CHECK(now[g] == 1);
      // The newly masked ones are the lowest Ī among those unmasked before (own sort).
      std::vector<std::pair<double, std::size_t>> cand;
      for (std::size_t g = 0; g < before.size(); ++g)
        if (!before[g]) cand.push_back({ema[g], g});
      std::sort(cand.begin(), cand.end());
      const std::size_t added = std::size_t(pr->masked_count(i)) - std::size_t(std::count(before.begin(), before.end(), 1));
      for (std::size_t k = 0; k < cand.size(); ++k) CHECK(now[cand[k].second] == (k < added ? 1 : 0));
      // The hook's columns: whole groups.
      CHECK(index_t(pr->masked_columns(i).size()) == pr->masked_count(i) * pr->group_size(i));
    }
  }
  CHECK(events == 7);  // 5, 10, …, 30 and 33
  CHECK(pr->masked_count(0) == 8);  // ⌊0.7·12⌋
  CHECK(pr->masked_count(1) == 2);  // ⌊0.7·4⌋ heads of 4

  // The pruned forward: masked columns exactly 0, others bit for bit as the unhooked layer.
  auto* l1 = net.l[1].get();
  const MatD H = dwt::random<MatD>(7, 12, 34);
  ag::tape<double> t;
  const MatD y = (*l1)(t, t.frozen(H)).value();
  const MatD y_plain =
      ag::add_bias(ag::lora_linear(t.frozen(H), l1->weight(), t.param(*l1->lora_B()), t.param(*l1->lora_A()), l1->scale()),
                   t.param(*l1->bias()))
          .value();
  const auto& cols = pr->masked_columns(1);
  for (index_t j = 0; j < 16; ++j) {
    const bool m = std::find(cols.begin(), cols.end(), j) != cols.end();
    for (index_t i = 0; i < 7; ++i) CHECK(y(i, j) == (m ? 0.0 : y_plain(i, j)));
  }
  // Export: W copy, B and bias rows zeroed; the dense layer over the copy matches the hooked one.
  MatD Wc = *net.w[1];
  pr->write_pruned_weight(1, Wc);
  const MatD y_export = (H * (Wc + l1->scale() * l1->lora_B()->value() * l1->lora_A()->value()).transpose()).rowwise() +
                        l1->bias()->value().row(0);
  CHECK(dwt::rel_err(y_export, y) < 1e-14);
  for (auto c : cols) CHECK(Wc.row(c).cwiseAbs().maxCoeff() == 0.0);
  CHECK(*net.w[1] != Wc);  // the layer's own W is untouched: the copy was written
  pr.reset();
  CHECK(!net.l[0]->has_forward_hook());
  CHECK(!net.l[1]->has_forward_hook());
}

TEST_CASE("LoRAPrune with keep_masked off re-selects the lowest Ī among all channels") {
  mlp net({5, 10, 2}, 2, 41);
  const MatD X = dwt::random<MatD>(30, 5, 42), Yt = dwt::random<MatD>(30, 2, 43);
  tr::lora_prune_options o;
  o.target_sparsity = 0.5;
  o.interval = 3;
  o.keep_masked = false;
  tr::lora_prune<double> pr({net.l[0].get()}, o);
  deltaw::optim::adamw<double> opt(net.params(), {.lr = 5e-2});
  tr::fit_options fo;
  fo.steps = 12;
  fo.log_every = 0;
  struct check_lowest : tr::method<double> {
    tr::lora_prune<double>* p;
    index_t checked = 0;
    std::string name() const override { return "check"; }
    void after_step(const tr::step_context& c) override {
      if ((c.step + 1) % 3 != 0) return;
      std::vector<std::pair<double, std::size_t>> s;
      for (std::size_t g = 0; g < p->importance(0).size(); ++g) s.push_back({p->importance(0)[g], g});
      std::sort(s.begin(), s.end());
      for (std::size_t k = 0; k < s.size(); ++k) CHECK(p->masked(0)[s[k].second] == (index_t(k) < p->masked_count(0) ? 1 : 0));
      ++checked;
    }
  } chk;
  chk.p = &pr;
  tr::fit<double>([&](ag::tape<double>& t, index_t) { return ag::mse(net(t, t.frozen(X)), t.frozen(Yt)); }, opt,
                  {&pr, &chk}, fo);
  CHECK(chk.checked == 4);
  CHECK(pr.masked_count(0) == 5);
}

TEST_CASE("LoRAPrune in train::fit: target sparsity reached, loss finite and decreasing, hooks removed") {
  mlp net({8, 32, 32, 4}, 4, 51);
  const MatD X = dwt::random<MatD>(64, 8, 52), M = dwt::random<MatD>(4, 8, 53);
  const MatD Yt = (X * M.transpose()).array().tanh().matrix();
  deltaw::optim::adamw<double> opt(net.params(), {.lr = 2e-2});
  tr::fit_options fo;
  fo.steps = 80;
  fo.log_every = 20;
  fo.label = "LoRAPrune";
  tr::fit_result r;
  {
    tr::lora_prune_options o;
    o.target_sparsity = 0.5;
    tr::lora_prune<double> pr({net.l[0].get(), net.l[1].get()}, o);
    r = tr::fit<double>([&](ag::tape<double>& t, index_t) { return ag::mse(net(t, t.frozen(X)), t.frozen(Yt)); }, opt,
                        {&pr}, fo);
    CHECK(pr.masked_count(0) == 16);
    CHECK(pr.masked_count(1) == 16);
    CHECK(pr.events() == 8);
    CHECK(pr.updates() == 80);
    CHECK(net.l[0]->has_forward_hook());
  }
  CHECK(!net.l[0]->has_forward_hook());
  CHECK(!net.l[1]->has_forward_hook());
  double first = 0, last = 0;
  for (int k = 0; k < 5; ++k) {
    first += r.losses[std::size_t(k)] / 5;
    last += r.losses[r.losses.size() - 1 - std::size_t(k)] / 5;
  }
  MESSAGE("LoRAPrune fit: mean loss of the first 5 steps " << first << ", of the last 5 " << last
                                                           << " (half the hidden channels masked)");
  CHECK(std::isfinite(r.final_loss));
  CHECK(last < 0.5 * first);
}

TEST_CASE("LoRAPrune on a tiny_transformer: heads of q, k, v masked as groups, loss decreasing") {
  nn::transformer_config c;
  c.vocab = 16;
  c.seq = 8;
  c.d_model = 16;
  c.heads = 4;
  c.d_ff = 32;
  c.layers = 1;
  c.seed = 7;
  nn::tiny_transformer<double> model(c);
  model.attach(nn::adapter_kind::lora, 2, 4.0);
  auto proj = model.projections();  // q, k, v, o, up, down
  tr::lora_prune_options o;
  o.target_sparsity = 0.5;
  const index_t head_dim = c.d_model / c.heads;
  deltaw::optim::adamw<double> opt(model.trainable_parameters(), {.lr = 2e-2});
  // Next token = token + 1 (mod vocab), from a random start per sequence.
  std::vector<std::int64_t> ids, labels;
  std::mt19937_64 g(71);
  for (int b = 0; b < 4; ++b) {
    const auto s0 = std::int64_t(g() % 16);
    for (index_t i = 0; i < c.seq; ++i) {
      ids.push_back((s0 + i) % 16);
      labels.push_back((s0 + i + 1) % 16);
    }
  }
  tr::fit_options fo;
  fo.steps = 40;
  fo.log_every = 0;
  tr::fit_result r;
  {
    tr::lora_prune<double> pr({proj[0], proj[1], proj[2], proj[4]}, o, {head_dim, head_dim, head_dim, 1});
    r = tr::fit<double>([&](ag::tape<double>& t, index_t) { return ag::cross_entropy(model(t, ids, 4), labels); }, opt,
                        {&pr}, fo);
    for (index_t i = 0; i < 3; ++i) {
      CHECK(pr.masked_count(i) == 2);  // 2 of 4 heads
      const auto& cols = pr.masked_columns(i);
      REQUIRE(cols.size() == 8u);
      for (std::size_t k = 0; k < cols.size(); ++k) CHECK(cols[k] % head_dim == index_t(k) % head_dim);  // whole heads
    }
    CHECK(pr.masked_count(3) == 16);  // half of up's 32 channels
  }
  for (auto* l : proj) CHECK(!l->has_forward_hook());
  MESSAGE("tiny_transformer with LoRAPrune: loss " << r.first_loss << " -> " << r.final_loss);
  CHECK(std::isfinite(r.final_loss));
  CHECK(r.final_loss < r.first_loss);
}

TEST_CASE("LoRAPrune: bad inputs give specific argument_errors, and nothing is hooked") {
  mlp net({4, 8, 6}, 2, 61);
  auto* a = net.l[0].get();
  auto* b = net.l[1].get();
  using E = deltaw::argument_error;
  for (double bad : {1.0, -0.1, 1.5}) {
    tr::lora_prune_options o;
    o.target_sparsity = bad;
    dwt::check_throws_with<E>([&] { tr::lora_prune<double> p({a}, o); }, {"target_sparsity", "[0, 1)"});
  }
  MatD W = dwt::random<MatD>(8, 4, 62);
  nn::linear<double> plain("plain", deltaw::view(std::as_const(W)));
  dwt::check_throws_with<E>([&] { tr::lora_prune<double> p({a, &plain}); }, {"'plain'", "has no adapter"});
  nn::linear<double> dora("dora", deltaw::view(std::as_const(W)));
  std::mt19937_64 g(1);
  dora.attach(nn::adapter_kind::dora, 2, 4, g);
  dwt::check_throws_with<E>([&] { tr::lora_prune<double> p({a, &dora}); }, {"'dora'", "DoRA"});
  int owner = 0;
  b->set_forward_hook([](ag::tape<double>&, const ag::var<double>&, const ag::var<double>& y) { return y; }, &owner);
  dwt::check_throws_with<E>([&] { tr::lora_prune<double> p({a, b}); }, {"'l1'", "already has a forward hook"});
  CHECK(!a->has_forward_hook());  // nothing installed when the constructor throws
  CHECK(b->clear_forward_hook(&owner));
  dwt::check_throws_with<E>([&] { tr::lora_prune<double> p({a, b}, {}, {3, 2}); }, {"group_size 3", "out = 8"});
  dwt::check_throws_with<E>([&] { tr::lora_prune<double> p({a, a}); }, {"listed twice"});
  dwt::check_throws_with<E>([&] { tr::lora_prune<double> p({a}, {}, {1, 1}); }, {"2 group sizes for 1 layers"});
  tr::lora_prune<double> p({a});
  dwt::check_throws_with<E>([&] { p.after_step(tr::step_context{}); }, {"total_steps"});
  dwt::check_throws_with<E>([&] { (void)p.importance(1); }, {"layer 1 of 1"});
  MatD Wbad(3, 3);
  dwt::check_throws_with<deltaw::shape_error>([&] { p.write_pruned_weight(0, Wbad); }, {"W_copy is [3, 3]"});
}
