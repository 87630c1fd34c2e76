// LoRAPrune's coupled pruning and physical slicing (train/lora_prune.hpp,
// train/lora_prune_export.hpp): input-side importance and the coupled group sums against
// plain loops; on a real nn::transformer_block, heads of q, k, v masked with o's input
// columns and MLP channels of up with down's input columns; the sliced block (smaller
// dense matrices) against the masked block through a dense double reference written
// here; the safetensors file written and read back exactly; bad inputs.
#include <deltaw/train/lora_prune_export.hpp>
#include <deltaw/train/loop.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <numeric>
#include <vector>

#include "../autograd/grad_util.hpp"

namespace lpc_test {
namespace tr = deltaw::train;
namespace nn = deltaw::nn;
namespace ag = deltaw::autograd;
using MatD = dwt::MatD;
using index_t = deltaw::index_t;
using sliced = tr::sliced_lora_linear<double>;

// I of one member by plain loops: Ĝ_ij = Σ_k gB_ik·A_kj + B_ik·gA_kj − gB_ik·gA_kj,
// W'_ij = W_ij + s·Σ_k B_ik·A_kj, summed per group of rows (output) or columns (input).
inline std::vector<double> plain_importance(nn::linear<double>* l, index_t group, tr::prune_side side) {
  const auto W = l->weight();
  const MatD &B = l->lora_B()->value(), &A = l->lora_A()->value(), &gB = l->lora_B()->grad(), &gA = l->lora_A()->grad();
  const index_t out = W.rows(), in = W.cols(), r = A.rows();
  const bool by_col = side == tr::prune_side::input;
  std::vector<double> I(std::size_t((by_col ? in : out) / group), 0.0);
  for (index_t i = 0; i < out; ++i)
    for (index_t j = 0; j < in; ++j) {
      double g = 0, ba = 0;
      for (index_t k = 0; k < r; ++k) {
        g += gB(i, k) * A(k, j) + B(i, k) * gA(k, j) - gB(i, k) * gA(k, j);
        ba += B(i, k) * A(k, j);
      }
      I[std::size_t((by_col ? j : i) / group)] += std::abs(g * (W(i, j) + l->scale() * ba));
    }
  return I;
}
inline void l2_normalise(std::vector<double>& v) {
  double n = 0;
  for (double x : v) n += x * x;
  for (double& x : v) x /= std::sqrt(n) + 1e-8;
}
inline double max_rel(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0, big = 1e-300;
  for (std::size_t i = 0; i < a.size(); ++i) {
    m = std::max(m, std::abs(a[i] - b[i]));
    big = std::max(big, std::abs(b[i]));
  }
  return m / big;
}
inline std::vector<index_t> all_of(index_t n) {
  std::vector<index_t> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), index_t(0));
  return v;
}

// The dense double reference of a (sliced) layer: x·(W' + s·B'·A')ᵀ + b'.
inline MatD dense_layer(const sliced& s, const MatD& x) {
  const MatD Wm = s.weight + s.scale * s.lora_B * s.lora_A;
  MatD y = x * Wm.transpose();
  if (s.bias) y.rowwise() += s.bias->row(0);
  return y;
}
inline MatD ln_ref(const MatD& x) {
  MatD y(x.rows(), x.cols());
  for (index_t i = 0; i < x.rows(); ++i) {
    const double mu = x.row(i).mean();
    const double var = (x.row(i).array() - mu).square().mean();
    y.row(i) = (x.row(i).array() - mu) / std::sqrt(var + 1e-5);
  }
  return y;
}
inline MatD gelu_ref(MatD x) {
  for (index_t i = 0; i < x.size(); ++i) x.data()[i] = 0.5 * x.data()[i] * (1 + std::erf(x.data()[i] / std::sqrt(2.0)));
  return x;
}
// Causal attention with heads of dh columns (as many heads as q has).
inline MatD attention_ref(const MatD& q, const MatD& k, const MatD& v, index_t batch, index_t seq, index_t dh) {
  MatD y = MatD::Zero(q.rows(), q.cols());
  for (index_t b = 0; b < batch; ++b)
    for (index_t h = 0; h < q.cols() / dh; ++h)
      for (index_t i = 0; i < seq; ++i) {
        std::vector<double> p(std::size_t(i + 1));
        double mx = -1e300, sum = 0;
        for (index_t j = 0; j <= i; ++j) {
          double d = 0;
          for (index_t c = 0; c < dh; ++c) d += q(b * seq + i, h * dh + c) * k(b * seq + j, h * dh + c);
          p[std::size_t(j)] = d / std::sqrt(double(dh));
          mx = std::max(mx, p[std::size_t(j)]);
        }
        for (auto& x : p) sum += (x = std::exp(x - mx));
        for (index_t j = 0; j <= i; ++j)
          for (index_t c = 0; c < dh; ++c) y(b * seq + i, h * dh + c) += p[std::size_t(j)] / sum * v(b * seq + j, h * dh + c);
      }
  return y;
}
// The pre-norm block (norms at γ = 1, β = 0) over six layers q, k, v, o, up, down.
inline MatD block_ref(const std::vector<sliced>& s, const MatD& x, index_t batch, index_t seq, index_t dh) {
  const MatD h = ln_ref(x);
  const MatD a = attention_ref(dense_layer(s[0], h), dense_layer(s[1], h), dense_layer(s[2], h), batch, seq, dh);
  const MatD x1 = x + dense_layer(s[3], a);
  return x1 + dense_layer(s[5], gelu_ref(dense_layer(s[4], ln_ref(x1))));
}

// A transformer_block (d_model 12, 3 heads of 4, d_ff 10) over weights it owns, LoRA r = 2
// on every projection with a non-zero B, and a batch of 2 sequences of 5.
struct block_net {
  static constexpr index_t batch = 2, seq = 5, heads = 3, dh = 4;
  nn::transformer_config c;
  std::vector<std::unique_ptr<MatD>> w;
  std::unique_ptr<nn::transformer_block<double>> blk;
  MatD X, Y;
  explicit block_net(std::uint64_t seed) {
    c.d_model = 12;
    c.heads = heads;
    c.d_ff = 10;
    c.seq = seq;
    c.layers = 1;
    const index_t rows[6] = {12, 12, 12, 12, 10, 12}, cols[6] = {12, 12, 12, 12, 12, 10};
    std::vector<const MatD*> wp;
    for (int k = 0; k < 6; ++k) {
      w.push_back(std::make_unique<MatD>(dwt::random<MatD>(rows[k], cols[k], seed + std::uint64_t(k)) /
                                         std::sqrt(double(cols[k]))));
      wp.push_back(w.back().get());
    }
    blk = std::make_unique<nn::transformer_block<double>>("b", c, wp);
    std::mt19937_64 g(seed + 10);
    std::uint64_t k = 0;
    for (auto* l : blk->projections()) {
      l->attach(nn::adapter_kind::lora, 2, 4.0, g);
      l->lora_B()->value() = 0.1 * dwt::random<MatD>(l->out_features(), 2, seed + 20 + k++);
    }
    X = dwt::random<MatD>(batch * seq, 12, seed + 30);
    Y = dwt::random<MatD>(batch * seq, 12, seed + 31);
  }
  ag::var<double> operator()(ag::tape<double>& t) const { return (*blk)(t, t.frozen(X), batch, seq); }
  MatD forward() const {
    ag::tape<double> t;
    return (*this)(t).value();
  }
  void backward() const {
    ag::tape<double> t;
    t.backward(ag::mse((*this)(t), t.frozen(Y)));
  }
  std::vector<ag::parameter<double>*> params() {
    std::vector<ag::parameter<double>*> ps;
    blk->collect(ps);
    return ps;
  }
};
inline index_t count_parameters(const std::vector<sliced>& s) {
  index_t n = 0;
  for (const auto& l : s) n += l.weight.size() + l.lora_A.size() + l.lora_B.size() + (l.bias ? l.bias->size() : 0);
  return n;
}
inline void check_same(const std::vector<sliced>& a, const std::vector<sliced>& b) {
  REQUIRE(a.size() == b.size());
  for (std::size_t k = 0; k < a.size(); ++k) {
    INFO("layer " << a[k].name);
    CHECK(a[k].name == b[k].name);
    CHECK(a[k].weight == b[k].weight);
    CHECK(a[k].lora_A == b[k].lora_A);
    CHECK(a[k].lora_B == b[k].lora_B);
    CHECK(a[k].scale == b[k].scale);
    CHECK(a[k].bias.has_value() == b[k].bias.has_value());
    if (a[k].bias && b[k].bias) CHECK(*a[k].bias == *b[k].bias);
    CHECK(a[k].kept_out == b[k].kept_out);
    CHECK(a[k].kept_in == b[k].kept_in);
    CHECK(a[k].out_features == b[k].out_features);
    CHECK(a[k].in_features == b[k].in_features);
  }
}
}  // namespace lpc_test

TEST_CASE("LoRAPrune importance, input side: column-group sums equal plain loops for every chunk") {
  namespace L = lpc_test;
  L::MatD W = dwt::random<L::MatD>(11, 12, 1);
  L::nn::linear<double> l("l", deltaw::view(std::as_const(W)));
  std::mt19937_64 g(2);
  l.attach(L::nn::adapter_kind::lora, 3, 1.5, g);
  l.lora_B()->value() = dwt::random<L::MatD>(11, 3, 3);
  l.lora_B()->grad() = dwt::random<L::MatD>(11, 3, 4);
  l.lora_A()->grad() = dwt::random<L::MatD>(3, 12, 5);
  for (L::index_t chunk : {1, 4, 64})
    for (L::index_t group : {1, 3, 4}) {
      L::tr::lora_importance_options o;
      o.chunk = chunk;
      o.group_size = group;
      o.side = L::tr::prune_side::input;
      const auto got = L::tr::lora_prune_importance<double>(l.weight(), l.lora_B()->value(), l.lora_A()->value(), l.scale(),
                                                            l.lora_B()->grad(), l.lora_A()->grad(), o);
      INFO("chunk " << chunk << " group " << group);
      CHECK(got.size() == std::size_t(12 / group));
      CHECK(L::max_rel(got, L::plain_importance(&l, group, L::tr::prune_side::input)) < 1e-13);
    }
  // The output side by the same loops (the two sides sum the same |Ĝ ⊙ W'| entries).
  const auto rows = L::tr::lora_prune_importance<double>(l.weight(), l.lora_B()->value(), l.lora_A()->value(), l.scale(),
                                                         l.lora_B()->grad(), l.lora_A()->grad(), {});
  CHECK(L::max_rel(rows, L::plain_importance(&l, 1, L::tr::prune_side::output)) < 1e-13);
  L::tr::lora_importance_options bad;
  bad.side = L::tr::prune_side::input;
  bad.group_size = 5;
  dwt::check_throws_with<deltaw::argument_error>(
      [&] {
        (void)L::tr::lora_prune_importance<double>(l.weight(), l.lora_B()->value(), l.lora_A()->value(), 1.0,
                                                   l.lora_B()->grad(), l.lora_A()->grad(), bad);
      },
      {"group_size 5", "in = 12"});
}

TEST_CASE("LoRAPrune couplings on a transformer_block: Ī of a head = Σ over q, k, v rows and o columns, per option") {
  namespace L = lpc_test;
  L::block_net net(201);
  net.backward();
  auto proj = net.blk->projections();
  for (bool score_in : {true, false})
    for (bool per_member : {true, false}) {
      L::tr::lora_prune_options o;
      o.score_input_side = score_in;
      o.normalize_per_member = per_member;
      const auto cs = L::tr::transformer_couplings<double>(proj, L::block_net::heads);
      REQUIRE(cs.size() == 2u);
      L::tr::lora_prune<double> pr(o, cs);
      REQUIRE(pr.unit_count() == 2);
      CHECK(pr.unit_name(0) == "block0.attn");
      CHECK(pr.unit_name(1) == "block0.mlp");
      CHECK(pr.layers().size() == 6u);
      CHECK(pr.group_count(0) == 3);
      CHECK(pr.group_size(0) == 4);
      CHECK(pr.group_count(1) == 10);
      pr.after_backward({});
      // unit 0: q, k, v (rows, heads of 4) + o (columns); unit 1: up (rows) + down (columns).
      const std::vector<std::vector<L::index_t>> members{{0, 1, 2, 3}, {4, 5}};
      for (L::index_t u = 0; u < 2; ++u) {
        const L::index_t group = u == 0 ? 4 : 1;
        std::vector<double> sum(std::size_t(pr.group_count(u)), 0.0);
        for (auto m : members[std::size_t(u)]) {
          const bool input = m == 3 || m == 5;
          if (input && !score_in) continue;
          auto I = L::plain_importance(proj[std::size_t(m)], group, input ? L::tr::prune_side::input : L::tr::prune_side::output);
          if (per_member) L::l2_normalise(I);
          for (std::size_t k = 0; k < I.size(); ++k) sum[k] += I[k];
        }
        if (!per_member) L::l2_normalise(sum);
        for (double& x : sum) x *= 0.1;  // Ī = 0.9·0 + 0.1·I
        INFO("unit " << u << " score_input_side " << score_in << " normalize_per_member " << per_member);
        CHECK(L::max_rel(pr.importance(u), sum) < 1e-12);
      }
    }
}

TEST_CASE("LoRAPrune coupled on a transformer_block: whole heads and MLP channels; sliced block == masked block; saved and read back") {
  namespace L = lpc_test;
  using L::block_net;
  block_net net(301);
  auto proj = net.blk->projections();
  // The reference itself: with every channel kept it is the library's block.
  {
    std::vector<L::sliced> full;
    for (auto* l : proj) full.push_back(L::tr::slice_lora_linear<double>(*l, L::all_of(l->out_features()), L::all_of(l->in_features())));
    CHECK(dwt::rel_err(L::block_ref(full, net.X, block_net::batch, block_net::seq, block_net::dh), net.forward()) < 1e-12);
  }
  L::tr::lora_prune_options o;
  o.target_sparsity = 0.5;
  o.interval = 2;
  L::tr::lora_prune<double> pr(o, L::tr::transformer_couplings<double>(proj, block_net::heads));
  deltaw::optim::adamw<double> opt(net.params(), {.lr = 1e-2});
  L::tr::fit_options fo;
  fo.steps = 6;
  fo.log_every = 0;
  const auto r = L::tr::fit<double>([&](L::ag::tape<double>& t, L::index_t) { return L::ag::mse(net(t), t.frozen(net.Y)); },
                                    opt, {&pr}, fo);
  CHECK(std::isfinite(r.final_loss));
  REQUIRE(pr.masked_count(0) == 1);  // ⌊0.5·3⌋ heads
  REQUIRE(pr.masked_count(1) == 5);  // ⌊0.5·10⌋ MLP channels
  const auto& head_cols = pr.masked_columns(0);
  REQUIRE(head_cols.size() == 4u);
  const L::index_t head = head_cols[0] / 4;
  for (std::size_t k = 0; k < 4; ++k) CHECK(head_cols[k] == head * 4 + L::index_t(k));
  // The same channels leave q, k, v's rows and o's columns; up's rows and down's columns.
  for (L::index_t i : {0, 1, 2}) CHECK(pr.kept_outputs(i).size() == 8u);
  CHECK(pr.kept_inputs(0).size() == 12u);
  CHECK(pr.kept_outputs(3).size() == 12u);
  CHECK(pr.kept_inputs(3) == pr.kept_outputs(0));
  CHECK(pr.kept_inputs(5) == pr.kept_outputs(4));
  const auto o_kept = pr.kept_inputs(3);
  for (auto c : head_cols) CHECK(std::find(o_kept.begin(), o_kept.end(), c) == o_kept.end());

  const L::MatD y_masked = net.forward();  // with the hooks
  const auto sl = L::tr::slice_pruned(pr);
  REQUIRE(sl.size() == 6u);
  const L::index_t shapes[6][2] = {{8, 12}, {8, 12}, {8, 12}, {12, 8}, {5, 12}, {12, 5}};
  for (std::size_t k = 0; k < 6; ++k) {
    CHECK(sl[k].name == proj[k]->name());
    CHECK(sl[k].weight.rows() == shapes[k][0]);
    CHECK(sl[k].weight.cols() == shapes[k][1]);
    CHECK(sl[k].lora_B.rows() == shapes[k][0]);
    CHECK(sl[k].lora_A.cols() == shapes[k][1]);
    // Each entry is the unpruned layer's at the kept indices.
    for (L::index_t i = 0; i < sl[k].weight.rows(); ++i)
      for (L::index_t j = 0; j < sl[k].weight.cols(); ++j)
        CHECK(sl[k].weight(i, j) == proj[k]->weight()(sl[k].kept_out[std::size_t(i)], sl[k].kept_in[std::size_t(j)]));
  }
  const L::MatD y_sliced = L::block_ref(sl, net.X, block_net::batch, block_net::seq, block_net::dh);
  const double err = dwt::rel_err(y_sliced, y_masked);
  CHECK(err < 1e-12);
  // The factored forward of a sliced layer is the dense one.
  const L::MatD h = dwt::random<L::MatD>(6, 12, 302);
  CHECK(dwt::rel_err(sl[0].forward(h), L::dense_layer(sl[0], h)) < 1e-13);
  // The check can fail: keeping another head instead differs.
  {
    auto wrong = sl;
    const L::index_t other = (head + 1) % 3;
    std::vector<L::index_t> ko;
    for (L::index_t c = 0; c < 12; ++c)
      if (c / 4 != other) ko.push_back(c);
    for (std::size_t k = 0; k < 3; ++k) wrong[k] = L::tr::slice_lora_linear<double>(*proj[k], ko, L::all_of(12));
    wrong[3] = L::tr::slice_lora_linear<double>(*proj[3], L::all_of(12), ko);
    CHECK(dwt::rel_err(L::block_ref(wrong, net.X, block_net::batch, block_net::seq, block_net::dh), y_masked) > 1e-4);
  }
  // Written, read back (bytes and file): the same layers, the same block output.
  const auto bytes = L::tr::write_sliced(sl);
  const auto f = deltaw::io::safetensors_file::parse(std::vector<std::byte>(bytes));
  CHECK(f.at("b.q.kept_out").dtype == deltaw::io::st_dtype::I64);
  CHECK(f.at("b.o.weight").shape == std::vector<std::uint64_t>{12, 8});
  const auto back = L::tr::read_sliced<double>(f);
  L::check_same(back, sl);
  const auto path = std::filesystem::temp_directory_path() / "deltaw_test_lora_prune_sliced.safetensors";
  L::tr::save_sliced(sl, path);
  const auto loaded = L::tr::load_sliced<double>(path);
  std::filesystem::remove(path);
  L::check_same(loaded, sl);
  CHECK(dwt::rel_err(L::block_ref(loaded, net.X, block_net::batch, block_net::seq, block_net::dh), y_masked) < 1e-12);
  // write_pruned_weight: o's masked input columns and A's columns zeroed in the copy.
  L::MatD Wo = *net.w[3];
  pr.write_pruned_weight(3, Wo);
  for (auto c : head_cols) {
    CHECK(Wo.col(c).cwiseAbs().maxCoeff() == 0.0);
    CHECK(proj[3]->lora_A()->value().col(c).cwiseAbs().maxCoeff() == 0.0);
  }
  std::vector<L::sliced> full;
  for (auto* l : proj) full.push_back(L::tr::slice_lora_linear<double>(*l, L::all_of(l->out_features()), L::all_of(l->in_features())));
  MESSAGE("coupled LoRAPrune on a block (d_model 12, 3 heads of 4, d_ff 10, r 2), 6 steps to sparsity 0.5: head "
          << head << " and 5 of 10 MLP channels pruned; parameters " << L::count_parameters(full) << " -> "
          << L::count_parameters(sl) << "; max rel |sliced - masked| = " << err << "; file " << bytes.size() << " B");
}

TEST_CASE("LoRAPrune coupling with a gate and a bias: importance of three members, sliced MLP == masked MLP") {
  namespace L = lpc_test;
  const L::MatD Wu = dwt::random<L::MatD>(6, 5, 401) / 2, Wg = dwt::random<L::MatD>(6, 5, 402) / 2, Wd = dwt::random<L::MatD>(4, 6, 403) / 2;
  L::nn::linear<double> up("up", deltaw::view(Wu)), gate("gate", deltaw::view(Wg)), down("down", deltaw::view(Wd));
  std::mt19937_64 g(404);
  std::uint64_t k = 0;
  for (auto* l : {&up, &gate, &down}) {
    l->attach(L::nn::adapter_kind::rslora, 2, 3.0, g);
    l->lora_B()->value() = 0.2 * dwt::random<L::MatD>(l->out_features(), 2, 410 + k++);
  }
  up.set_bias(dwt::random<L::MatD>(1, 6, 420));
  down.set_bias(dwt::random<L::MatD>(1, 4, 421));
  const auto c = L::tr::mlp_coupling<double>("mlp", &up, &gate, &down);
  REQUIRE(c.members.size() == 3u);
  CHECK(c.members[2].side == L::tr::prune_side::input);
  L::tr::lora_prune_options o;
  o.target_sparsity = 0.5;
  o.interval = 1;
  o.total_steps = 1;
  L::tr::lora_prune<double> pr(o, {c});
  const L::MatD X = dwt::random<L::MatD>(7, 5, 430), Yt = dwt::random<L::MatD>(7, 4, 431);
  // relu(up) + relu(gate): a channel whose up and gate outputs are masked feeds down a 0.
  auto mlp = [&](L::ag::tape<double>& t) {
    const auto x = t.frozen(X);
    return down(t, L::ag::add(L::ag::relu(up(t, x)), L::ag::relu(gate(t, x))));
  };
  {
    L::ag::tape<double> t;
    t.backward(L::ag::mse(mlp(t), t.frozen(Yt)));
  }
  pr.after_backward({});
  std::vector<double> want(6, 0.0);
  for (auto [l, side] : {std::pair{&up, L::tr::prune_side::output}, std::pair{&gate, L::tr::prune_side::output},
                         std::pair{&down, L::tr::prune_side::input}}) {
    auto I = L::plain_importance(l, 1, side);
    L::l2_normalise(I);
    for (std::size_t j = 0; j < 6; ++j) want[j] += 0.1 * I[j];
  }
  CHECK(L::max_rel(pr.importance(0), want) < 1e-12);
  pr.after_step({});
  REQUIRE(pr.masked_count(0) == 3);
  // The three lowest Ī are the masked channels.
  std::vector<std::size_t> order(6);
  std::iota(order.begin(), order.end(), std::size_t(0));
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return want[a] < want[b]; });
  for (std::size_t q = 0; q < 6; ++q) CHECK(pr.masked(0)[order[q]] == (q < 3 ? 1 : 0));
  L::MatD y_masked;
  {
    L::ag::tape<double> t;
    y_masked = mlp(t).value();
  }
  const auto sl = L::tr::slice_pruned(pr);
  REQUIRE(sl.size() == 3u);
  REQUIRE(sl[0].bias.has_value());
  for (std::size_t q = 0; q < 3; ++q) CHECK((*sl[0].bias)(0, L::index_t(q)) == up.bias()->value()(0, sl[0].kept_out[q]));
  CHECK(sl[2].bias->cols() == 4);
  const L::MatD relu_sum = L::dense_layer(sl[0], X).cwiseMax(0.0) + L::dense_layer(sl[1], X).cwiseMax(0.0);
  CHECK(dwt::rel_err(L::dense_layer(sl[2], relu_sum), y_masked) < 1e-12);
  const auto back = L::tr::read_sliced<double>(deltaw::io::safetensors_file::parse(L::tr::write_sliced(sl)));
  L::check_same(back, sl);
}

TEST_CASE("LoRAPrune coupled in fit on a 2-block tiny_transformer: half the heads and MLP channels, loss decreasing") {
  namespace L = lpc_test;
  L::nn::transformer_config c;
  c.vocab = 16;
  c.seq = 8;
  c.d_model = 16;
  c.heads = 4;
  c.d_ff = 32;
  c.layers = 2;
  c.seed = 9;
  L::nn::tiny_transformer<double> model(c);
  model.attach(L::nn::adapter_kind::lora, 2, 4.0);
  deltaw::optim::adamw<double> opt(model.trainable_parameters(), {.lr = 2e-2});
  std::vector<std::int64_t> ids, labels;
  std::mt19937_64 g(91);
  for (int b = 0; b < 4; ++b) {
    const auto s0 = std::int64_t(g() % 16);
    for (L::index_t i = 0; i < c.seq; ++i) {
      ids.push_back((s0 + i) % 16);
      labels.push_back((s0 + i + 1) % 16);
    }
  }
  L::tr::lora_prune_options o;
  o.target_sparsity = 0.5;
  L::tr::fit_options fo;
  fo.steps = 30;
  fo.log_every = 0;
  L::tr::lora_prune<double> pr(o, L::tr::transformer_couplings<double>(model.projections(), c.heads));
  const auto r = L::tr::fit<double>([&](L::ag::tape<double>& t, L::index_t) { return L::ag::cross_entropy(model(t, ids, 4), labels); },
                                    opt, {&pr}, fo);
  REQUIRE(pr.unit_count() == 4);
  for (L::index_t u : {0, 2}) {
    CHECK(pr.masked_count(u) == 2);  // 2 of 4 heads
    for (std::size_t k = 0; k < pr.masked_columns(u).size(); ++k) CHECK(pr.masked_columns(u)[k] % 4 == L::index_t(k) % 4);
  }
  CHECK(pr.masked_count(1) == 16);
  CHECK(pr.masked_count(3) == 16);
  const auto sl = L::tr::slice_pruned(pr);
  REQUIRE(sl.size() == 12u);
  CHECK(sl[0].weight.rows() == 8);  // q of block 0: 2 heads of 4 kept
  CHECK(sl[3].weight.cols() == 8);  // o's input
  CHECK(sl[4].weight.rows() == 16);
  CHECK(sl[5].weight.cols() == 16);
  MESSAGE("tiny_transformer (2 blocks) with coupled LoRAPrune: loss " << r.first_loss << " -> " << r.final_loss);
  CHECK(std::isfinite(r.final_loss));
  CHECK(r.final_loss < r.first_loss);
}

TEST_CASE("LoRAPrune couplings and slicing: mismatched head_dim, shapes and files give specific errors") {
  namespace L = lpc_test;
  L::block_net net(501);
  auto p = net.blk->projections();  // q, k, v, o [12, 12], up [10, 12], down [12, 10]
  using E = deltaw::argument_error;
  using S = L::tr::prune_side;
  L::tr::lora_prune_options o;
  dwt::check_throws_with<E>([&] { L::tr::lora_prune<double> pr(o, {L::tr::attention_coupling<double>("a", p[0], p[1], p[2], p[3], 5)}); },
                            {"'b.q'", "group_size 5", "out = 12"});
  L::tr::lora_prune_coupling<double> mismatch{"qd", 2, {{p[0], S::output, true}, {p[5], S::input, true}}};
  dwt::check_throws_with<deltaw::shape_error>([&] { L::tr::lora_prune<double> pr(o, {mismatch}); },
                                              {"coupling 'qd'", "'b.down'", "in = 10", "other members have 12"});
  L::tr::lora_prune_coupling<double> only_in{"in", 1, {{p[3], S::input, true}}};
  dwt::check_throws_with<E>([&] { L::tr::lora_prune<double> pr(o, {only_in}); }, {"'in'", "no output-side member"});
  L::tr::lora_prune_coupling<double> twice{"tw", 4, {{p[0], S::output, true}, {p[0], S::output, true}}};
  dwt::check_throws_with<E>([&] { L::tr::lora_prune<double> pr(o, {twice}); }, {"'b.q'", "listed twice on its output side"});
  L::tr::lora_prune_coupling<double> empty{"e", 1, {}};
  dwt::check_throws_with<E>([&] { L::tr::lora_prune<double> pr(o, {empty}); }, {"'e'", "no members"});
  {
    L::tr::lora_prune_options no_in;
    no_in.score_input_side = false;
    L::tr::lora_prune_coupling<double> unscored{"u", 4, {{p[0], S::output, false}, {p[3], S::input, true}}};
    dwt::check_throws_with<E>([&] { L::tr::lora_prune<double> pr(no_in, {unscored}); }, {"'u'", "no scored member"});
  }
  dwt::check_throws_with<E>([&] { (void)L::tr::transformer_couplings<double>({p[0], p[1], p[2], p[3], p[4]}, 3); },
                            {"5 projections", "6 per block"});
  dwt::check_throws_with<E>([&] { (void)L::tr::transformer_couplings<double>(p, 5); }, {"'b.q'", "not a multiple of heads = 5"});
  CHECK(!p[0]->has_forward_hook());  // nothing installed by a constructor that threw
  {
    L::tr::lora_prune<double> pr(o, L::tr::transformer_couplings<double>(p, 3));
    dwt::check_throws_with<E>([&] { (void)pr.importance(2); }, {"coupling 2 of 2"});
    dwt::check_throws_with<E>([&] { (void)pr.kept_outputs(6); }, {"layer 6 of 6"});
    CHECK(p[0]->has_forward_hook());
    CHECK(!p[3]->has_forward_hook());  // o is pruned on its input side only
  }
  CHECK(!p[0]->has_forward_hook());
  dwt::check_throws_with<E>([&] { (void)L::tr::slice_lora_linear<double>(*p[0], {0, 2, 1}, L::all_of(12)); },
                            {"'b.q'", "kept_out", "ascending", "entry 2 is 1"});
  dwt::check_throws_with<E>([&] { (void)L::tr::slice_lora_linear<double>(*p[0], L::all_of(12), {0, 12}); },
                            {"kept_in", "[0, 12)"});
  // Files: a well-formed one, then one thing wrong at a time.
  auto one = std::vector<L::sliced>{L::tr::slice_lora_linear<double>(*p[4], {1, 3, 4}, L::all_of(12))};
  CHECK(L::tr::read_sliced<double>(deltaw::io::safetensors_file::parse(L::tr::write_sliced(one))).size() == 1u);
  auto bad_shape = one;
  bad_shape[0].kept_out = {1, 3};
  dwt::check_throws_with<deltaw::shape_error>([&] { (void)L::tr::write_sliced(bad_shape); }, {"'b.up'", "2 kept rows"});
  auto file_with = [&](std::vector<std::int64_t> kept_out, std::string format) {
    deltaw::io::safetensors_writer w;
    w.set_metadata("format", format);
    w.set_metadata("layers", "1");
    w.set_metadata("layer.0", "x");
    w.set_metadata("x.scale", "0.5");
    w.set_metadata("x.out_features", "4");
    w.set_metadata("x.in_features", "3");
    const L::MatD W = dwt::random<L::MatD>(2, 3, 510), A = dwt::random<L::MatD>(1, 3, 511), B = dwt::random<L::MatD>(2, 1, 512);
    w.add("x.weight", W);
    w.add("x.lora_A.weight", A);
    w.add("x.lora_B.weight", B);
    std::vector<std::int64_t> ki{0, 1, 2};
    w.add_raw("x.kept_out", deltaw::io::st_dtype::I64, {kept_out.size()},
              std::as_bytes(std::span<const std::int64_t>(kept_out)));
    w.add_raw("x.kept_in", deltaw::io::st_dtype::I64, {3}, std::as_bytes(std::span<const std::int64_t>(ki)));
    return deltaw::io::safetensors_file::parse(w.serialize());
  };
  const auto good = L::tr::read_sliced<double>(file_with({0, 3}, "deltaw.lora_prune.sliced"));
  REQUIRE(good.size() == 1u);
  CHECK(good[0].scale == 0.5);
  CHECK(good[0].kept_out == std::vector<L::index_t>{0, 3});
  CHECK(!good[0].bias.has_value());
  dwt::check_throws_with<deltaw::format_error>([&] { (void)L::tr::read_sliced<double>(file_with({0, 3}, "other")); },
                                               {"format", "\"other\""});
  dwt::check_throws_with<deltaw::format_error>([&] { (void)L::tr::read_sliced<double>(file_with({0, 1, 3}, "deltaw.lora_prune.sliced")); },
                                               {"'x'", "\"x.weight\"", "[2, 3]", "expected [3, 3]"});
  dwt::check_throws_with<deltaw::format_error>([&] { (void)L::tr::read_sliced<double>(file_with({3, 0}, "deltaw.lora_prune.sliced")); },
                                               {"\"x.kept_out\"", "entry 1 = 0", "out of order"});
  dwt::check_throws_with<deltaw::format_error>([&] { (void)L::tr::read_sliced<double>(file_with({0, 4}, "deltaw.lora_prune.sliced")); },
                                               {"\"x.kept_out\"", "outside [0, 4)"});
}
