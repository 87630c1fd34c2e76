// SPDX-License-Identifier: MIT
// Federated LoRA training and data-parallel adapter training on the tiny transformer, written
// once over a communicator so that the same code runs in one process (local_comm simulates
// every client / shard in turn) and across processes (dist/mpi.hpp's mpi_comm, one or more
// clients / one shard per rank). The arithmetic is the same in both: every client or shard is
// computed from the same state with the same seeds, and the server's sums run in client
// (rank) order on every rank, so the results agree bit for bit.
//
// A communicator provides
//   int rank() const, size() const;
//   std::vector<std::vector<double>> allgather(std::uint64_t step, const std::vector<double>& mine);
// (element i: rank i's vector; every rank gets all of them).
//
// Federated rounds: the global adapter (A, B of every projection) goes to the clients; client
// k trains `local_steps` AdamW steps on its own non-IID data (sequences that follow a fixed
// permutation of the vocabulary, started only from the tokens t with t mod clients = k), then
// the server aggregates with FedAvg (A and B averaged separately), FFA-LoRA (A frozen and
// shared, B averaged: exact) or LoRA-FAIR (compose::lora_fair). Each round reports the loss of
// the global model on held-out sequences started anywhere and the aggregation error
// ‖aggregate − Σ p_k·ΔW_k‖_F over all layers, computed in factored form.
//
// FFA-LoRA with DP-SGD (fed_config::dp): each client privatises its local steps with
// train::dp_sgd (per-sample clipping of B's gradient, Gaussian noise). Client k's noise in
// round t is drawn from the seed dp_seed(dp.seed, t, k), not from the rank that trains it,
// so the run over any number of ranks equals the single-process one bit for bit. Only B is
// privatised, so DP-SGD is refused for FedAvg and LoRA-FAIR (they train A too).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "../compose/federated.hpp"
#include "../nn/layers.hpp"
#include "../optim/optim.hpp"
#include "../train/ffa_dp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace dist {

/// A communicator of one process: allgather returns the caller's own vector.
struct local_comm {
  int rank() const { return 0; }
  int size() const { return 1; }
  std::vector<std::vector<double>> allgather(std::uint64_t, const std::vector<double>& mine) const { return {mine}; }
};

enum class fed_method : unsigned char { fedavg, ffa, fair };
constexpr const char* fed_method_name(fed_method m) {
  return m == fed_method::fedavg ? "FedAvg" : m == fed_method::ffa ? "FFA-LoRA" : "LoRA-FAIR";
}

struct fed_config {
  nn::transformer_config model{/*vocab*/ 32, /*seq*/ 8, /*d_model*/ 32, /*heads*/ 2, /*d_ff*/ 64, /*layers*/ 1,
                               /*seed*/ 7};
  index_t rank = 4;
  double alpha = 8;
  index_t clients = 4;
  index_t rounds = 10;
  index_t local_steps = 4;
  index_t batch = 8;  ///< sequences per local step
  double lr = 1e-2;
  double fair_lambda = 0.01;
  std::uint64_t data_seed = 11;
  index_t eval_batch = 32;
  /// FFA-LoRA only: DP-SGD on every client's local steps (clip_norm, noise_multiplier,
  /// seed; rows_per_sample is set to the sequence length). Client k's noise in round t uses
  /// the seed dp_seed(dp->seed, t, k).
  std::optional<train::dp_sgd_options> dp;
};

/// The DP-SGD noise seed of client k in round t: a function of the run's seed, the round and
/// the client only (not of the rank that trains the client).
constexpr std::uint64_t dp_seed(std::uint64_t seed, index_t round, index_t client) {
  return seed ^ (0x9e3779b97f4a7c15ull * std::uint64_t(round + 1) + 0xbf58476d1ce4e5b9ull * std::uint64_t(client + 1));
}

struct fed_round_stats {
  double eval_loss = 0;
  double aggregation_error = 0;     ///< ‖aggregate − Σ p_k ΔW_k‖_F over all layers
  double aggregation_relative = 0;  ///< divided by ‖Σ p_k ΔW_k‖_F
};
struct fed_result {
  std::vector<fed_round_stats> rounds;
  std::vector<double> state;  ///< the final global adapter: per layer A then B, row-major
};

namespace detail {
struct seq_batch {
  std::vector<std::int64_t> ids, labels;
};
/// Sequences following `perm`, started from tokens t with t mod `stride` = `offset`
/// (stride 1: anywhere).
inline seq_batch make_batch(const std::vector<std::int64_t>& perm, index_t n, index_t seq, std::uint64_t seed,
                            index_t stride, index_t offset) {
  std::mt19937_64 g(seed);
  const index_t choices = (index_t(perm.size()) - offset + stride - 1) / stride;
  std::uniform_int_distribution<index_t> pick(0, choices - 1);
  seq_batch b;
  for (index_t s = 0; s < n; ++s) {
    std::int64_t tok = std::int64_t(offset + stride * pick(g));
    for (index_t i = 0; i < seq; ++i) {
      b.ids.push_back(tok);
      tok = perm[std::size_t(tok)];
      b.labels.push_back(i + 1 < seq ? tok : autograd::ignore_label);
    }
  }
  return b;
}
inline std::vector<std::int64_t> permutation(index_t vocab, std::uint64_t seed) {
  std::vector<std::int64_t> p(static_cast<std::size_t>(vocab));
  for (std::size_t i = 0; i < p.size(); ++i) p[i] = std::int64_t(i);
  std::mt19937_64 g(seed);
  std::shuffle(p.begin(), p.end(), g);
  return p;
}

template <class T>
std::vector<double> get_state(nn::tiny_transformer<T>& m) {
  std::vector<double> s;
  for (auto* l : m.adapted_layers())
    for (auto* p : {l->lora_A(), l->lora_B()})
      for (index_t i = 0; i < p->size(); ++i) s.push_back(double(p->value().data()[i]));
  return s;
}
template <class T>
void set_state(nn::tiny_transformer<T>& m, const std::vector<double>& s, const char* op) {
  std::size_t at = 0;
  for (auto* l : m.adapted_layers())
    for (auto* p : {l->lora_A(), l->lora_B()}) {
      if (at + std::size_t(p->size()) > s.size())
        throw shape_error(std::string(op) + ": an adapter state of " + std::to_string(s.size()) +
                          " values is too short for the model");
      for (index_t i = 0; i < p->size(); ++i) p->value().data()[i] = T(s[at++]);
    }
  if (at != s.size())
    throw shape_error(std::string(op) + ": an adapter state of " + std::to_string(s.size()) + " values; the model has " +
                      std::to_string(at));
}
template <class T>
std::vector<double> get_grads(nn::tiny_transformer<T>& m) {
  std::vector<double> g;
  for (auto* p : m.trainable_parameters())
    for (index_t i = 0; i < p->size(); ++i) g.push_back(double(p->grad().data()[i]));
  return g;
}
template <class T>
void set_grads(nn::tiny_transformer<T>& m, const std::vector<double>& g) {
  std::size_t at = 0;
  for (auto* p : m.trainable_parameters())
    for (index_t i = 0; i < p->size(); ++i) p->grad().data()[i] = T(g[at++]);
}
/// The low_rank update of layer l from a flat state (scale s).
inline low_rank<double> layer_update(const std::vector<double>& s, const std::vector<std::pair<index_t, index_t>>& shapes,
                                     index_t r, std::size_t l, double scale) {
  std::size_t at = 0;
  for (std::size_t i = 0; i < l; ++i) at += std::size_t(r * (shapes[i].first + shapes[i].second));
  const index_t out = shapes[l].first, in = shapes[l].second;
  compose::detail::mat A(r, in), B(out, r);
  for (index_t i = 0; i < r; ++i)
    for (index_t j = 0; j < in; ++j) A(i, j) = s[at++];
  for (index_t i = 0; i < out; ++i)
    for (index_t j = 0; j < r; ++j) B(i, j) = s[at++];
  return compose::detail::owned_low_rank(B, A, scale);
}
template <class T>
double eval_loss(nn::tiny_transformer<T>& m, const std::vector<std::int64_t>& perm, const fed_config& c) {
  const auto b = make_batch(perm, c.eval_batch, c.model.seq, c.data_seed + 999, 1, 0);
  autograd::tape<T> t;
  autograd::no_grad<T> ng(t);
  return double(autograd::cross_entropy(m(t, b.ids, c.eval_batch), b.labels).value()(0, 0));
}
}  // namespace detail

/// Runs `c.rounds` federated rounds of `method`; client k is trained by rank k mod size.
template <class T = float, class Comm>
fed_result run_federated(Comm& comm, const fed_config& c, fed_method method) {
  constexpr const char* op = "deltaw::dist::run_federated";
  if (c.clients < 1 || c.rounds < 0 || c.local_steps < 1)
    throw argument_error(std::string(op) + ": clients and local_steps must be ≥ 1, rounds ≥ 0");
  if (c.dp && method != fed_method::ffa)
    throw argument_error(std::string(op) + ": DP-SGD privatises B only; " + fed_method_name(method) +
                         " trains A as well, whose gradient would leak (use fed_method::ffa)");
  nn::tiny_transformer<T> model(c.model);
  model.attach(nn::adapter_kind::lora, c.rank, c.alpha);
  std::vector<std::pair<index_t, index_t>> shapes;
  double scale = 0;
  for (auto* l : model.adapted_layers()) {
    shapes.emplace_back(l->out_features(), l->in_features());
    scale = l->scale();
    if (method == fed_method::ffa) l->lora_A()->set_trainable(false);
  }
  const auto perm = detail::permutation(c.model.vocab, c.data_seed);
  std::vector<double> global = detail::get_state(model);
  std::vector<double> p(std::size_t(c.clients), 1.0 / double(c.clients));
  fed_result res;
  for (index_t round = 0; round < c.rounds; ++round) {
    // Local training of the clients this rank owns, in client order.
    std::vector<double> mine;
    for (index_t k = comm.rank(); k < c.clients; k += comm.size()) {
      detail::set_state(model, global, op);
      optim::adamw<T> opt(model.trainable_parameters(), {c.lr, 0.9, 0.999, 1e-8, 0.0});
      std::unique_ptr<train::dp_sgd<T>> dp;  // hooks on the model for this client only
      if (c.dp) {
        auto o = *c.dp;
        o.seed = dp_seed(c.dp->seed, round, k);
        dp = std::make_unique<train::dp_sgd<T>>(model, o);
      }
      for (index_t s = 0; s < c.local_steps; ++s) {
        const auto b = detail::make_batch(perm, c.batch, c.model.seq,
                                          c.data_seed + 1000003ull * std::uint64_t(round + 1) +
                                              7919ull * std::uint64_t(k) + std::uint64_t(s),
                                          c.clients, k % c.clients);
        train::step_context ctx;
        if (dp) dp->before_forward(ctx);
        autograd::tape<T> t;
        t.backward(autograd::cross_entropy(model(t, b.ids, c.batch), b.labels));
        if (dp) dp->after_backward(ctx);  // B's gradient := the clipped, noised one
        opt.step(1.0);
        opt.zero_grad();
      }
      const auto st = detail::get_state(model);
      mine.insert(mine.end(), st.begin(), st.end());
    }
    const auto all = comm.allgather(std::uint64_t(round), mine);
    // Client k's state: rank k mod size, position k / size in that rank's vector.
    const std::size_t P = global.size();
    std::vector<std::vector<double>> client(std::size_t(c.clients));
    for (index_t k = 0; k < c.clients; ++k) {
      const auto& v = all[std::size_t(k % comm.size())];
      const std::size_t at = std::size_t(k / comm.size()) * P;
      if (v.size() < at + P)
        throw shape_error(std::string(op) + ": rank " + std::to_string(k % comm.size()) + " sent " +
                          std::to_string(v.size()) + " values; client " + std::to_string(k) + " needs " +
                          std::to_string(at + P));
      client[std::size_t(k)].assign(v.begin() + std::ptrdiff_t(at), v.begin() + std::ptrdiff_t(at + P));
    }
    // Server: per layer, in client order.
    std::vector<double> next;
    fed_round_stats st;
    double err2 = 0, ref2 = 0;
    for (std::size_t l = 0; l < shapes.size(); ++l) {
      std::vector<low_rank<double>> ups;
      for (const auto& s : client) ups.push_back(detail::layer_update(s, shapes, c.rank, l, scale));
      low_rank<double> agg = [&] {
        if (method == fed_method::fair) return compose::lora_fair(ups, p, {c.fair_lambda}).lora;
        auto avg = compose::fedavg(ups, p);
        if (method == fed_method::ffa) {  // A stays the global (frozen) one, bit for bit
          const auto gl = detail::layer_update(global, shapes, c.rank, l, scale);
          return compose::detail::owned_low_rank(compose::detail::to_mat(avg.B()), compose::detail::to_mat(gl.A()),
                                                 scale);
        }
        return avg;
      }();
      // Copy out A then B (row-major) before `agg`'s views go away.
      for (index_t i = 0; i < agg.A().rows(); ++i)
        for (index_t j = 0; j < agg.A().cols(); ++j) next.push_back(agg.A()(i, j));
      for (index_t i = 0; i < agg.B().rows(); ++i)
        for (index_t j = 0; j < agg.B().cols(); ++j) next.push_back(agg.B()(i, j));
      err2 += std::pow(compose::aggregation_error(agg, ups, p), 2);
      ref2 += std::pow(compose::factored_norm(ups, p), 2);
    }
    global = std::move(next);
    detail::set_state(model, global, op);
    st.aggregation_error = std::sqrt(err2);
    st.aggregation_relative = ref2 > 0 ? std::sqrt(err2 / ref2) : 0;
    st.eval_loss = detail::eval_loss(model, perm, c);
    res.rounds.push_back(st);
  }
  res.state = global;
  return res;
}

struct dp_config {
  nn::transformer_config model{/*vocab*/ 32, /*seq*/ 8, /*d_model*/ 32, /*heads*/ 2, /*d_ff*/ 64, /*layers*/ 1,
                               /*seed*/ 7};
  index_t rank = 4;
  double alpha = 8;
  index_t steps = 5;
  index_t batch = 8;  ///< sequences per step, split evenly over the shards
  double lr = 1e-2;
  std::uint64_t data_seed = 5;
};

/// Data-parallel adapter training: each step's batch is split into `shards` equal parts;
/// shard i's gradient (its mean loss times its share of the batch) is computed by rank
/// i mod size; the adapter gradients only (A and B of every projection) are gathered and
/// summed in shard order on every rank, then every rank takes the same AdamW step. With
/// local_comm all shards run in this process: the same sums in the same order. Returns the
/// final adapter state (per layer A then B) and fills `losses` with the full-batch loss per step.
template <class T = float, class Comm>
std::vector<double> run_data_parallel(Comm& comm, const dp_config& c, index_t shards,
                                      std::vector<double>* losses = nullptr) {
  constexpr const char* op = "deltaw::dist::run_data_parallel";
  if (shards < 1 || c.batch % shards != 0)
    throw argument_error(std::string(op) + ": the batch of " + std::to_string(c.batch) + " sequences does not split into " +
                         std::to_string(shards) + " equal shards");
  if (shards % comm.size() != 0)
    throw argument_error(std::string(op) + ": " + std::to_string(shards) + " shards over " +
                         std::to_string(comm.size()) + " ranks");
  nn::tiny_transformer<T> model(c.model);
  model.attach(nn::adapter_kind::lora, c.rank, c.alpha);
  const auto perm = detail::permutation(c.model.vocab, c.data_seed);
  optim::adamw<T> opt(model.trainable_parameters(), {c.lr, 0.9, 0.999, 1e-8, 0.0});
  const index_t per = c.batch / shards;
  for (index_t step = 0; step < c.steps; ++step) {
    const auto b = detail::make_batch(perm, c.batch, c.model.seq, c.data_seed + 31 * std::uint64_t(step + 1), 1, 0);
    std::vector<double> mine;
    for (index_t s = comm.rank(); s < shards; s += comm.size()) {
      const auto n = std::size_t(per * c.model.seq);
      const std::vector<std::int64_t> ids(b.ids.begin() + std::ptrdiff_t(std::size_t(s) * n),
                                          b.ids.begin() + std::ptrdiff_t(std::size_t(s + 1) * n));
      const std::vector<std::int64_t> lab(b.labels.begin() + std::ptrdiff_t(std::size_t(s) * n),
                                          b.labels.begin() + std::ptrdiff_t(std::size_t(s + 1) * n));
      opt.zero_grad();
      autograd::tape<T> t;
      const auto loss = autograd::cross_entropy(model(t, ids, per), lab);
      t.backward(loss);
      auto g = detail::get_grads(model);
      for (auto& x : g) x /= double(shards);  // equal shards: the mean of the shard means
      g.push_back(double(loss.value()(0, 0)) / double(shards));
      mine.insert(mine.end(), g.begin(), g.end());
    }
    const auto all = comm.allgather(std::uint64_t(step), mine);
    std::vector<double> sum;
    for (index_t s = 0; s < shards; ++s) {  // shard order
      const auto& v = all[std::size_t(s % comm.size())];
      const std::size_t P = mine.size() / std::size_t(shards / comm.size());
      const std::size_t at = std::size_t(s / comm.size()) * P;
      if (v.size() != mine.size())
        throw shape_error(std::string(op) + ": rank " + std::to_string(s % comm.size()) + " sent " +
                          std::to_string(v.size()) + " values; expected " + std::to_string(mine.size()));
      if (sum.empty()) sum.assign(v.begin() + std::ptrdiff_t(at), v.begin() + std::ptrdiff_t(at + P));
      else
        for (std::size_t i = 0; i < P; ++i) sum[i] += v[at + i];
    }
    if (losses) losses->push_back(sum.back());
    sum.pop_back();
    detail::set_grads(model, sum);
    opt.step(1.0);
  }
  return detail::get_state(model);
}

}  // namespace dist
DELTAW_NAMESPACE_END
