// SPDX-License-Identifier: MIT
// EVA's statistics gathered across ranks: the data-parallel form of eva_init
// (init/eva_model.hpp). Each of EVA's batches is split into `shards` parts; shard i is run
// through the model by rank i mod size, which collects every adapted layer's kept input
// rows; the rows of all shards are gathered (dist/mpi.hpp's allgather, or local_comm in one
// process) and every rank hands the same matrix — the shards' rows in shard order — to its
// own copy of the incremental PCA. The PCA therefore sees exactly what one process sees
// when it runs the shards itself, and every rank ends with the same components, ranks and
// adapters, bit for bit, whatever the number of ranks. Against one process running the
// whole batch at once, the layer inputs agree to rounding only (the GEMMs of a shard and of
// the batch may block their sums differently).
//
// What crosses the wire per batch and rank: for each owned shard and each layer whose PCA
// still wants input, the kept rows × in_features values (EVA's own input; EVA is a one-off
// initialisation, and the gathered rows are what the single-process fit holds anyway).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../init/eva_model.hpp"

DELTAW_NAMESPACE_BEGIN
namespace dist {

/// EVA over `layers`, data-parallel: `data(b, shard)` returns shard `shard` of batch b (an
/// eva_batch); `forward(tape, batch)` runs the model on it; shard i is run by rank
/// i mod comm.size(). Every rank returns the same result (and applies it to its layers
/// when o.apply). Stops when every layer converged or after o.max_batches batches.
template <class T, class Comm, class Data, class Forward>
eva_model_result<T> eva_init(Comm& comm, const std::vector<nn::linear<T>*>& layers, Data&& data, index_t shards,
                             Forward&& forward, const eva_model_options& o) {
  constexpr const char* op = "deltaw::dist::eva_init";
  if (shards < 1 || shards % comm.size() != 0)
    throw argument_error(std::string(op) + ": " + std::to_string(shards) + " shards over " + std::to_string(comm.size()) +
                         " ranks (each rank must own the same number of shards)");
  if (o.max_batches < 1) throw argument_error(std::string(op) + ": max_batches must be ≥ 1");
  const std::size_t L = layers.size();
  const index_t owned = shards / comm.size();

  eva_model_result<T> res;
  std::optional<eva_state> state;
  for (index_t b = 0; b < o.max_batches && !(state && state->done()); ++b) {
    // This rank's shards: per shard, per layer still wanting input, [rows, then the rows].
    std::vector<double> mine;
    std::vector<index_t> nodes;  // batch 0, first shard: the layers' input nodes (the input groups)
    for (index_t s = comm.rank(); s < shards; s += comm.size()) {
      const bool first = b == 0 && s == comm.rank();
      const auto X = eva_collect_inputs<T>(layers, forward, data(b, s), first ? &nodes : nullptr);
      for (std::size_t l = 0; l < L; ++l) {
        if (state && !state->needs_input(l)) continue;
        mine.push_back(double(X[l].rows()));
        for (index_t i = 0; i < X[l].rows(); ++i)
          for (index_t j = 0; j < X[l].cols(); ++j) mine.push_back(double(X[l](i, j)));
      }
    }
    // The input groups from the tape nodes: the same on every rank (same model, same forward).
    if (b == 0) state.emplace(deltaw::detail::eva_layer_spec(layers, nodes, res.input_groups), o.eva);
    const auto all = comm.allgather(std::uint64_t(b), mine);
    // Unpack every rank's message into per-shard, per-layer row blocks.
    std::vector<std::vector<dense<T>>> rows{std::size_t(shards), std::vector<dense<T>>(L)};
    for (int r = 0; r < comm.size(); ++r) {
      const auto& v = all[std::size_t(r)];
      std::size_t at = 0;
      for (index_t q = 0; q < owned; ++q) {
        const index_t s = q * comm.size() + r;
        for (std::size_t l = 0; l < L; ++l) {
          if (!state->needs_input(l)) continue;
          const index_t in = layers[l]->in_features();
          const double n = at < v.size() ? v[at] : -1;
          if (!(n >= 0) || n != double(index_t(n)) || v.size() - at - 1 < std::size_t(n) * std::size_t(in))
            throw shape_error(std::string(op) + ": rank " + std::to_string(r) + " sent a malformed block for shard " +
                              std::to_string(s) + ", layer '" + layers[l]->name() + "' of batch " + std::to_string(b));
          ++at;
          auto& M = rows[std::size_t(s)][l];
          M.resize(index_t(n), in);
          for (index_t i = 0; i < M.rows(); ++i)
            for (index_t j = 0; j < in; ++j) M(i, j) = T(v[at++]);
        }
      }
      if (at != v.size())
        throw shape_error(std::string(op) + ": rank " + std::to_string(r) + " sent " + std::to_string(v.size()) +
                          " values for batch " + std::to_string(b) + "; its shards account for " + std::to_string(at));
    }
    for (std::size_t l = 0; l < L; ++l) {
      if (!state->needs_input(l)) continue;
      index_t total = 0;
      for (index_t s = 0; s < shards; ++s) total += rows[std::size_t(s)][l].rows();
      dense<T> X(total, layers[l]->in_features());
      for (index_t s = 0, at = 0; s < shards; ++s) {
        const auto& M = rows[std::size_t(s)][l];
        X.middleRows(at, M.rows()) = M;
        at += M.rows();
      }
      state->observe(l, X);
    }
    state->end_batch();
    ++res.batches;
  }
  res.converged = state->done();
  res.adapters = state->template result<T>(o.allow_unconverged);
  res.ranks = state->ranks();
  if (o.apply) deltaw::detail::eva_apply(layers, res);
  return res;
}

/// The same over a tiny_transformer's adapted layers.
template <class T, class Comm, class Data>
eva_model_result<T> eva_init(Comm& comm, nn::tiny_transformer<T>& model, Data&& data, index_t shards,
                             const eva_model_options& o) {
  return eva_init<T>(
      comm, model.adapted_layers(), std::forward<Data>(data), shards,
      [&model](autograd::tape<T>& t, const eva_batch& b) { model(t, b.ids, b.batch); }, o);
}

}  // namespace dist
DELTAW_NAMESPACE_END
