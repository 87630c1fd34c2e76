// Flat-LoRA / LoRA-GGPO (the perturbation is removed to the last bit; its per-row standard
// deviation is σ_i) and LISA (exactly γ active blocks per period, uniform frequencies,
// fresh optimiser state on activation, frozen blocks do not move).
#include <deltaw/nn/layers.hpp>
#include <deltaw/train/flat_lora.hpp>
#include <deltaw/train/lisa.hpp>
#include <deltaw/train/loop.hpp>

#include <cmath>
#include <cstring>
#include <numbers>
#include <vector>

#include "../autograd/grad_util.hpp"

using namespace dwag;
namespace nn = deltaw::nn;
namespace op = deltaw::optim;
namespace tr = deltaw::train;
using deltaw::index_t;

template class deltaw::train::lisa<float>;
template class deltaw::train::lisa<double, deltaw::optim::sgd<double>>;

namespace {
template <class M>
bool fl_same_bits(const M& a, const M& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(typename M::Scalar) * std::size_t(a.size())) == 0;
}

// Checks, from inside the loop, that the weights differ from the originals during the
// step (after the methods before it perturbed them) and equal them bit for bit after.
template <class T>
struct weight_watch : tr::method<T> {
  std::vector<deltaw::dense<T>*> ws;
  std::vector<deltaw::dense<T>> orig;
  double min_changed = 1.0;  // smallest fraction of entries changed during a step
  bool all_restored = true;
  std::string name() const override { return "watch"; }
  void before_forward(const tr::step_context&) override {
    index_t changed = 0, total = 0;
    for (std::size_t i = 0; i < ws.size(); ++i)
      for (index_t k = 0; k < ws[i]->size(); ++k) {
        changed += std::memcmp(ws[i]->data() + k, orig[i].data() + k, sizeof(T)) != 0;
        ++total;
      }
    min_changed = std::min(min_changed, double(changed) / double(total));
  }
  void after_step(const tr::step_context&) override {
    for (std::size_t i = 0; i < ws.size(); ++i) all_restored = all_restored && fl_same_bits(*ws[i], orig[i]);
  }
};

template <class T>
void run_exactness(tr::restore_mode mode, bool ggpo, double rho, const char* label) {
  nn::transformer_config c{11, 6, 16, 2, 32, 2, 5};
  nn::tiny_transformer<T> model(c);
  model.attach(nn::adapter_kind::lora, 4, 8.0);
  std::uint64_t seed = 60;
  for (auto* l : model.adapted_layers())
    l->lora_B()->value() = dwt::random<deltaw::dense<T>>(l->out_features(), 4, seed++);  // W' ≠ W
  weight_watch<T> watch;
  watch.ws = model.projection_weights();
  for (auto* w : watch.ws) watch.orig.push_back(*w);
  tr::flat_lora_options fo;
  fo.rho = rho;
  fo.seed = 9;
  fo.restore = mode;
  fo.ggpo = ggpo;
  fo.cosine_ramp = false;  // c = 1 from the first step
  tr::flat_lora<T> flat(tr::flat_targets(model), fo);
  std::vector<ag::parameter<T>*> ps;
  for (auto* l : model.adapted_layers()) {
    ps.push_back(l->lora_B());
    ps.push_back(l->lora_A());
  }
  op::adamw<T> opt(ps, {1e-2, 0.9, 0.999, 1e-8, 0.0});
  tr::fit_options o;
  o.steps = 4;
  o.log_every = 0;
  std::vector<std::int64_t> ids(12), labels(12);
  for (std::size_t i = 0; i < 12; ++i) {
    ids[i] = std::int64_t((7 * i + 3) % 11);
    labels[i] = std::int64_t((5 * i + 1) % 11);
  }
  index_t patched = 0, whole = 0;
  std::size_t bytes = 0;
  struct probe : tr::method<T> {
    tr::flat_lora<T>* f;
    index_t* patched;
    index_t* whole;
    std::size_t* bytes;
    std::string name() const override { return "probe"; }
    void before_forward(const tr::step_context&) override {
      *patched = std::max(*patched, f->patched_entries());
      *whole = std::max(*whole, f->whole_rows());
      *bytes = std::max(*bytes, f->restore_bytes());
    }
  } pr;
  pr.f = &flat;
  pr.patched = &patched;
  pr.whole = &whole;
  pr.bytes = &bytes;
  const auto r = tr::fit<T>([&](ag::tape<T>& t, index_t) { return ag::cross_entropy(model(t, ids, 2), labels); }, opt,
                            {&flat, &watch, &pr}, o);
  index_t total = 0, rows = 0;
  for (auto* w : watch.ws) {
    total += w->size();
    rows += w->rows();
  }
  std::printf("%s: %td weights, changed during each step >= %.1f%%, restored bit for bit: %s; sparse patches %td "
              "(%.2f%%), whole rows %td of %td, bytes kept across the step %zu (weights %zu)\n",
              label, total, 100 * watch.min_changed, watch.all_restored ? "yes" : "NO", patched,
              100.0 * double(patched) / double(total), whole, rows, bytes, std::size_t(total) * sizeof(T));
  CHECK(std::isfinite(r.final_loss));
  CHECK(watch.min_changed > 0.9);  // the perturbation was really applied
  CHECK(watch.all_restored);       // and removed to the last bit after each full step
  CHECK_FALSE(flat.perturbed());
  for (std::size_t i = 0; i < watch.ws.size(); ++i) CHECK(fl_same_bits(*watch.ws[i], watch.orig[i]));
  if (mode == tr::restore_mode::patch) {
    // Subtracting the noise alone would not restore these entries: the patches are needed.
    CHECK(patched > 0);
    // Never more than a saved copy plus σ and two offsets a row; far less at small ρ.
    CHECK(bytes <= std::size_t(total) * sizeof(T) + std::size_t(rows) * 16);
    if (rho <= 0.05) CHECK(bytes < std::size_t(total) * sizeof(T) / 2);
  }
}
}  // namespace

TEST_CASE("Flat-LoRA / LoRA-GGPO: the perturbation is removed to the last bit after every full step") {
  run_exactness<float>(tr::restore_mode::patch, false, 0.05, "Flat-LoRA float patch rho 0.05");
  run_exactness<float>(tr::restore_mode::patch, false, 1.0, "Flat-LoRA float patch rho 1   ");
  run_exactness<float>(tr::restore_mode::save, false, 1.0, "Flat-LoRA float save  rho 1   ");
  run_exactness<float>(tr::restore_mode::patch, true, 0.5, "LoRA-GGPO float patch rho 0.5 ");
  run_exactness<double>(tr::restore_mode::patch, true, 0.5, "LoRA-GGPO double patch rho 0.5");
}

TEST_CASE("Flat-LoRA: sigma_i = c(t)*rho/sqrt(n)*||W'_i|| and the per-row std of the noise matches it") {
  const index_t m = 24, n = 3000, r = 3;
  MatD W = dwt::random<MatD>(m, n, 70);
  for (index_t i = 0; i < m; ++i) W.row(i) *= 0.2 + 0.1 * double(i);  // rows of different norms
  const MatD W0 = W;
  nn::linear<double> layer("l", deltaw::view(std::as_const(W)));
  std::mt19937_64 g(71);
  layer.attach(nn::adapter_kind::lora, r, 2.0, g);
  layer.lora_B()->value() = dwt::random<MatD>(m, r, 72);
  tr::flat_lora_options fo;
  fo.rho = 0.1;
  fo.seed = 5;
  tr::flat_lora<double> flat({{deltaw::view(W), &layer}}, fo);
  MatD other = W;
  dwt::check_throws_with<deltaw::argument_error>([&] { tr::flat_lora<double>({{deltaw::view(other), &layer}}, fo); },
                                                 {"flat_lora", "not the memory layer 'l' views"});

  // c(t) = (1 − cos(π·t/T))/2 at t = 7 of T = 20, from the loop's total.
  tr::step_context ctx;
  ctx.step = 7;
  ctx.total_steps = 20;
  const double c = 0.5 * (1 - std::cos(std::numbers::pi * 7.0 / 20.0));
  flat.before_forward(ctx);
  const MatD eps = W - W0;
  const MatD Wm = W0 + layer.scale() * layer.lora_B()->value() * layer.lora_A()->value();  // dense W'
  double worst_sigma = 0, worst_mean = 0, worst_std = 0, pooled_n = 0, pooled_s1 = 0, pooled_s2 = 0;
  for (index_t i = 0; i < m; ++i) {
    const double sigma = c * fo.rho / std::sqrt(double(n)) * Wm.row(i).norm();
    worst_sigma = std::max(worst_sigma, std::abs(flat.sigmas(0)[std::size_t(i)] / sigma - 1));
    double s1 = 0, s2 = 0;
    for (index_t j = 0; j < n; ++j) {
      const double z = eps(i, j) / sigma;
      s1 += z;
      s2 += z * z;
    }
    const double mean = s1 / double(n), sd = std::sqrt(s2 / double(n) - mean * mean);
    worst_mean = std::max(worst_mean, std::abs(mean));
    worst_std = std::max(worst_std, std::abs(sd - 1));
    pooled_n += double(n);
    pooled_s1 += s1;
    pooled_s2 += s2;
  }
  const double pm = pooled_s1 / pooled_n, psd = std::sqrt(pooled_s2 / pooled_n - pm * pm);
  std::printf("Flat-LoRA sigma_i vs dense reference: max rel err %.2e; per row (n = %td): max |mean| %.4f (bound %.4f), "
              "max |std/sigma - 1| %.4f (bound %.4f); pooled std/sigma %.4f\n",
              worst_sigma, n, worst_mean, 5.5 / std::sqrt(double(n)), worst_std, 5.5 / std::sqrt(2.0 * double(n)), psd);
  CHECK(worst_sigma < 1e-12);
  // 5.5-sigma bounds per row (24 rows: family-wise false alarm < 1e-6): the mean of n
  // standard normals has sd 1/√n, the sample std about 1/√(2n).
  CHECK(worst_mean < 5.5 / std::sqrt(double(n)));
  CHECK(worst_std < 5.5 / std::sqrt(2.0 * double(n)));
  CHECK(std::abs(psd - 1) < 5 / std::sqrt(2 * pooled_n));
  flat.after_backward(ctx);
  CHECK(fl_same_bits(W, W0));

  // c(0) = 0: nothing is perturbed at the first step; the same step regenerates the same noise.
  ctx.step = 0;
  flat.before_forward(ctx);
  CHECK(fl_same_bits(W, W0));
  flat.after_backward(ctx);
  ctx.step = 7;
  flat.before_forward(ctx);
  CHECK(fl_same_bits(MatD(W - W0), eps));
  flat.restore();
  CHECK(fl_same_bits(W, W0));
}

TEST_CASE("LoRA-GGPO: sigma_i mixes the weight row norm and the EMA of the gradient row norms (dense check)") {
  const index_t m = 7, n = 9, r = 2;
  MatD W = dwt::random<MatD>(m, n, 80);
  const MatD W0 = W;
  nn::linear<double> layer("l", deltaw::view(std::as_const(W)));
  std::mt19937_64 g(81);
  layer.attach(nn::adapter_kind::lora, r, 4.0, g);
  layer.lora_B()->value() = dwt::random<MatD>(m, r, 82);
  tr::flat_lora_options fo;
  fo.rho = 0.2;
  fo.ggpo = true;
  fo.ggpo_alpha = 0.3;
  fo.ggpo_beta = 0.6;
  fo.cosine_ramp = false;
  tr::flat_lora<double> flat({{deltaw::view(W), &layer}}, fo);
  const MatD Wm = W0 + layer.scale() * layer.lora_B()->value() * layer.lora_A()->value();
  const double base = fo.rho / std::sqrt(double(n));
  tr::step_context ctx;
  // Before any gradient: σ_i = α·base·‖W'_i‖.
  flat.before_forward(ctx);
  for (index_t i = 0; i < m; ++i)
    CHECK(flat.sigmas(0)[std::size_t(i)] == doctest::Approx(0.3 * base * Wm.row(i).norm()).epsilon(1e-12));
  // Two gradients, then σ_i = base·(α‖W'_i‖ + (1−α)·κ·ḡ_i) with ḡ = β·‖Ĝ¹_i‖ + (1−β)·‖Ĝ²_i‖.
  MatD gn = MatD::Zero(m, 1);
  for (int k = 0; k < 2; ++k) {
    layer.lora_B()->grad() = dwt::random<MatD>(m, r, 90 + std::uint64_t(k));
    layer.lora_A()->grad() = dwt::random<MatD>(r, n, 95 + std::uint64_t(k));
    const MatD G = layer.lora_B()->grad() * layer.lora_A()->value() + layer.lora_B()->value() * layer.lora_A()->grad();
    for (index_t i = 0; i < m; ++i) gn(i, 0) = k == 0 ? G.row(i).norm() : 0.6 * gn(i, 0) + 0.4 * G.row(i).norm();
    flat.after_backward(ctx);
    CHECK(fl_same_bits(W, W0));
    flat.before_forward(ctx);
  }
  double wf = 0;
  for (index_t i = 0; i < m; ++i) wf += Wm.row(i).squaredNorm();
  const double kappa = std::sqrt(wf) / gn.norm();
  double worst = 0;
  for (index_t i = 0; i < m; ++i) {
    const double want = base * (0.3 * Wm.row(i).norm() + 0.7 * kappa * gn(i, 0));
    worst = std::max(worst, std::abs(flat.sigmas(0)[std::size_t(i)] / want - 1));
    CHECK(flat.grad_row_norms(0)[std::size_t(i)] == doctest::Approx(gn(i, 0)).epsilon(1e-12));
  }
  std::printf("LoRA-GGPO sigma_i vs dense reference: max rel err %.2e\n", worst);
  CHECK(worst < 1e-12);
  flat.restore();
  CHECK(fl_same_bits(W, W0));
}

TEST_CASE("LISA: exactly gamma blocks per period, each block in about gamma/L of the periods, pairs uniform") {
  const index_t L = 8, gamma = 2, K = 5, periods = 6000;
  std::vector<std::unique_ptr<P>> store;
  auto make = [&] {
    store.push_back(std::make_unique<P>("p" + std::to_string(store.size()), MatD::Zero(1, 1)));
    return store.back().get();
  };
  std::vector<P*> emb{make()}, head{make(), make()};
  std::vector<std::vector<P*>> blocks(L);
  for (auto& b : blocks) b = {make(), make()};
  std::vector<P*> all;
  for (auto& p : store) all.push_back(p.get());
  op::adamw<double> opt(all, {});
  tr::lisa<double> lisa(emb, blocks, head, opt, {gamma, K, 17});
  std::vector<index_t> count(std::size_t(L), 0);
  std::vector<index_t> pair(std::size_t(L * L), 0);
  std::vector<bool> prev(std::size_t(L), false);
  bool exact = true, constant = true, always = true;
  for (index_t step = 0; step < periods * K; ++step) {
    tr::step_context ctx;
    ctx.step = step;
    lisa.before_forward(ctx);
    // Read the state from the parameters' flags, not from the method's own bookkeeping.
    std::vector<bool> now(static_cast<std::size_t>(L));
    index_t active = 0;
    for (index_t b = 0; b < L; ++b) {
      now[std::size_t(b)] = blocks[std::size_t(b)][0]->trainable();
      exact = exact && blocks[std::size_t(b)][1]->trainable() == now[std::size_t(b)];
      active += now[std::size_t(b)];
    }
    exact = exact && active == gamma;
    always = always && emb[0]->trainable() && head[0]->trainable() && head[1]->trainable();
    if (step % K != 0) {
      constant = constant && now == prev;
    } else {
      for (index_t a = 0; a < L; ++a) {
        count[std::size_t(a)] += now[std::size_t(a)];
        for (index_t b = a + 1; b < L; ++b) pair[std::size_t(a * L + b)] += now[std::size_t(a)] && now[std::size_t(b)];
      }
    }
    prev = now;
  }
  CHECK(exact);     // γ blocks at every step
  CHECK(constant);  // the set changes only at period starts
  CHECK(always);    // embedding and head always trainable
  CHECK(lisa.periods() == periods);
  // Each block's count is Binomial(P, γ/L) (every period draws a uniform γ-subset, periods
  // independent); each pair's is Binomial(P, γ(γ−1)/(L(L−1))). 5-sigma bounds.
  const double p1 = double(gamma) / double(L), p2 = double(gamma * (gamma - 1)) / double(L * (L - 1));
  const double e1 = double(periods) * p1, sd1 = std::sqrt(double(periods) * p1 * (1 - p1));
  const double e2 = double(periods) * p2, sd2 = std::sqrt(double(periods) * p2 * (1 - p2));
  double worst1 = 0, worst2 = 0, chi2 = 0;
  for (index_t a = 0; a < L; ++a) {
    const double d = double(count[std::size_t(a)]) - e1;
    worst1 = std::max(worst1, std::abs(d) / sd1);
    chi2 += d * d / e1;
    for (index_t b = a + 1; b < L; ++b) worst2 = std::max(worst2, std::abs(double(pair[std::size_t(a * L + b)]) - e2) / sd2);
  }
  std::printf("LISA L = %td, gamma = %td, %td periods: per-block counts within %.2f sd of %.0f, pairs within %.2f sd of "
              "%.1f; chi-square over blocks %.2f (%td dof)\n",
              L, gamma, periods, worst1, e1, worst2, e2, chi2, L - 1);
  CHECK(worst1 < 5);
  CHECK(worst2 < 5);
  // The schedule is a pure function of the seed.
  CHECK(tr::lisa_choose(L, gamma, 17, 123) == tr::lisa_choose(L, gamma, 17, 123));
  CHECK(tr::lisa_choose(L, L, 17, 5).size() == std::size_t(L));
  dwt::check_throws_with<deltaw::argument_error>([&] { tr::lisa<double>(emb, blocks, head, opt, {9, K, 1}); },
                                                 {"lisa", "9 active layers of 8"});
}

namespace {
// Watches a LISA run from the outside: per step, which blocks are trainable, that frozen
// blocks do not move, and the AdamW moments of each active block after the step.
struct lisa_watch : tr::method<double> {
  nn::tiny_transformer<double>::parameter_groups g;
  op::adamw<double>* opt = nullptr;
  index_t K = 1;
  std::vector<bool> active, prev_active;
  std::vector<std::vector<MatD>> values, grads, m_before;
  int newly = 0, reactivated = 0, continuing = 0, failures = 0, frozen_moved = 0;
  std::vector<bool> ever;
  std::string name() const override { return "lisa_watch"; }
  void before_forward(const tr::step_context& ctx) override {
    const std::size_t L = g.blocks.size();
    if (ever.empty()) ever.assign(L, false);
    if (ctx.step % K == 0) prev_active = active.empty() ? std::vector<bool>(L, false) : active;
    active.assign(L, false);
    values.assign(L, {});
    m_before.assign(L, {});
    for (std::size_t b = 0; b < L; ++b) {
      active[b] = g.blocks[b][0]->trainable();
      for (auto* p : g.blocks[b]) {
        values[b].push_back(p->value());
        m_before[b].push_back(opt->first_moment(p));
      }
    }
    for (auto* p : g.embedding) failures += !p->trainable();
    for (auto* p : g.head) failures += !p->trainable();
  }
  void after_backward(const tr::step_context&) override {
    grads.assign(g.blocks.size(), {});
    for (std::size_t b = 0; b < g.blocks.size(); ++b)
      for (auto* p : g.blocks[b]) grads[b].push_back(p->grad());
    for (auto* p : g.embedding) failures += p->grad().norm() == 0;
  }
  void after_step(const tr::step_context& ctx) override {
    const double b1 = 0.9, b2 = 0.999;
    for (std::size_t b = 0; b < g.blocks.size(); ++b) {
      if (!active[b]) {
        for (std::size_t k = 0; k < g.blocks[b].size(); ++k) frozen_moved += !fl_same_bits(g.blocks[b][k]->value(), values[b][k]);
        continue;
      }
      if (ctx.step % K != 0) continue;
      const bool is_new = !prev_active[b];
      newly += is_new;
      reactivated += is_new && ever[b];
      continuing += !is_new;
      ever[b] = true;
      for (std::size_t k = 0; k < g.blocks[b].size(); ++k) {
        auto* p = g.blocks[b][k];
        const MatD& gr = grads[b][k];
        // A fresh AdamW has m = (1−β₁)g and v = (1−β₂)g² after its first step; a block
        // that stays active continues its moments.
        const MatD want_m = is_new ? MatD((1 - b1) * gr) : MatD(b1 * m_before[b][k] + (1 - b1) * gr);
        const double em = dwt::rel_err(opt->first_moment(p), want_m);
        failures += em > 1e-14;
        if (is_new) failures += dwt::rel_err(opt->second_moment(p), MatD((1 - b2) * gr.array().square().matrix())) > 1e-14;
      }
    }
  }
};
}  // namespace

TEST_CASE("LISA on the tiny transformer: fresh AdamW moments for newly activated blocks, frozen blocks unchanged") {
  nn::transformer_config c{7, 4, 8, 2, 16, 4, 3};
  nn::tiny_transformer<double> model(c);
  model.make_fully_trainable();
  op::adamw<double> opt(model.trainable_parameters(), {1e-2, 0.9, 0.999, 1e-8, 0.01});
  const index_t K = 2;
  tr::lisa<double> lisa(model.groups(), opt, {1, K, 123});
  lisa_watch w;
  w.g = model.groups();
  w.opt = &opt;
  w.K = K;
  std::vector<std::int64_t> ids(8), labels(8);
  for (std::size_t i = 0; i < 8; ++i) {
    ids[i] = std::int64_t((3 * i + 1) % 7);
    labels[i] = std::int64_t((2 * i + 5) % 7);
  }
  tr::fit_options o;
  o.steps = 60;
  o.log_every = 0;
  const auto r = tr::fit<double>([&](ag::tape<double>& t, index_t) { return ag::cross_entropy(model(t, ids, 2), labels); },
                                 opt, {&lisa, &w}, o);
  std::printf("LISA tiny transformer: %d activations (%d re-activations after a pause, %d continuing blocks), "
              "loss %.3f -> %.3f, failures %d, frozen entries moved %d\n",
              w.newly, w.reactivated, w.continuing, r.first_loss, r.final_loss, w.failures, w.frozen_moved);
  CHECK(w.failures == 0);
  CHECK(w.frozen_moved == 0);
  CHECK(w.reactivated >= 3);  // the reset was exercised on blocks that had old moments
  CHECK(w.continuing >= 1);   // and the no-reset path on blocks staying active
  CHECK(r.final_loss < r.first_loss);
}
