// SPDX-License-Identifier: MIT
// Server-side aggregation of federated LoRA clients, in factored form (no out×in matrix):
//
//   fedavg      Ā = Σ p_k·A_k, B̄ = Σ p_k·B_k. Inexact: B̄·Ā ≠ Σ p_k·B_k·A_k.
//   ffa         A shared and frozen (FFA-LoRA): B̄ with the common A. Exact.
//   lora_fair   LoRA-FAIR (Bian et al., 2025): keeps Ā and adds a residual ΔB minimising
//                 ‖(B̄ + ΔB)·Ā − Σ p_k·B_k·A_k‖_F² + λ·‖ΔB‖_F²,
//               the ridge closed form ΔB = (Σ p_k·B_k·(A_k·Āᵀ) − B̄·Ā·Āᵀ)·(Ā·Āᵀ + λ·I)⁻¹ (r×r
//               solves; λ = 0 takes the minimum-norm least-squares solution). Clients restart
//               from (Ā, B̄ + ΔB). The paper's regulariser is ‖ΔB‖ weighted by λ = 0.01 and
//               solved iteratively; the squared (ridge) form is the closed-form variant
//               METHODS.md allows.
//   aggregation_error   ‖s·B·A − Σ p_k·s_k·B_k·A_k‖_F from Gram matrices (factored_error).
//
// p_k are the given client weights normalised to sum 1 (sample counts, say).
#pragma once

#include <deltaw/core/eigen_dense.hpp>
#include <string>
#include <vector>

#include "merge.hpp"

DELTAW_NAMESPACE_BEGIN
namespace compose {

namespace detail {
template <class T>
std::vector<double> client_weights(const std::vector<low_rank<T>>& c, const std::vector<double>& w, const char* op) {
  if (c.empty()) throw argument_error(std::string(op) + ": no clients");
  std::vector<double> p = w.empty() ? std::vector<double>(c.size(), 1.0) : w;
  if (p.size() != c.size())
    throw argument_error(std::string(op) + ": " + std::to_string(c.size()) + " clients but " +
                         std::to_string(p.size()) + " weights");
  double s = 0;
  for (double x : p) {
    if (!(x >= 0) || !std::isfinite(x))
      throw argument_error(std::string(op) + ": client weights must be finite and ≥ 0");
    s += x;
  }
  if (!(s > 0)) throw argument_error(std::string(op) + ": the client weights sum to 0");
  for (auto& x : p) x /= s;
  for (std::size_t k = 1; k < c.size(); ++k) {
    if (c[k].rows() != c[0].rows() || c[k].cols() != c[0].cols() || c[k].rank() != c[0].rank())
      throw shape_error(std::string(op) + ": client " + std::to_string(k) + " has B " +
                        deltaw::detail::shape_str(c[k].B().rows(), c[k].B().cols()) + ", A " +
                        deltaw::detail::shape_str(c[k].A().rows(), c[k].A().cols()) + "; client 0 B " +
                        deltaw::detail::shape_str(c[0].B().rows(), c[0].B().cols()) + ", A " +
                        deltaw::detail::shape_str(c[0].A().rows(), c[0].A().cols()));
    if (c[k].scale() != c[0].scale())
      throw argument_error(std::string(op) + ": client " + std::to_string(k) + " has scale " +
                           std::to_string(c[k].scale()) + " but client 0 " + std::to_string(c[0].scale()));
  }
  return p;
}
}  // namespace detail

/// FedAvg of the factors separately: (B̄, Ā) with the clients' common scale.
template <class T>
low_rank<double> fedavg(const std::vector<low_rank<T>>& clients, const std::vector<double>& weights = {}) {
  const auto p = detail::client_weights(clients, weights, "deltaw::compose::fedavg");
  detail::mat B = detail::mat::Zero(clients[0].rows(), clients[0].rank());
  detail::mat A = detail::mat::Zero(clients[0].rank(), clients[0].cols());
  for (std::size_t k = 0; k < clients.size(); ++k) {
    B += p[k] * detail::to_mat(clients[k].B());
    A += p[k] * detail::to_mat(clients[k].A());
  }
  return detail::owned_low_rank(B, A, clients[0].scale());
}

struct fair_options {
  double lambda = 0.01;  ///< ridge weight on ‖ΔB‖_F²
};
struct fair_result {
  low_rank<double> lora;  ///< (B̄ + ΔB, Ā), the clients' scale
  detail::mat delta_B;    ///< [out, r]
};

/// LoRA-FAIR's server step (see the header comment).
template <class T>
fair_result lora_fair(const std::vector<low_rank<T>>& clients, const std::vector<double>& weights = {},
                      const fair_options& o = {}) {
  constexpr const char* op = "deltaw::compose::lora_fair";
  const auto p = detail::client_weights(clients, weights, op);
  if (!(o.lambda >= 0) || !std::isfinite(o.lambda))
    throw argument_error(std::string(op) + ": lambda must be finite and ≥ 0; got " + std::to_string(o.lambda));
  const index_t out = clients[0].rows(), in = clients[0].cols(), r = clients[0].rank();
  detail::mat B = detail::mat::Zero(out, r), A = detail::mat::Zero(r, in);
  std::vector<detail::mat> Bs, As;
  for (std::size_t k = 0; k < clients.size(); ++k) {
    Bs.push_back(detail::to_mat(clients[k].B()));
    As.push_back(detail::to_mat(clients[k].A()));
    B += p[k] * Bs.back();
    A += p[k] * As.back();
  }
  const detail::mat AAt = A * A.transpose();  // r×r
  detail::mat rhs = -B * AAt;                 // out×r
  for (std::size_t k = 0; k < clients.size(); ++k) rhs += p[k] * (Bs[k] * (As[k] * A.transpose()));
  detail::mat G = AAt;
  G.diagonal().array() += o.lambda;
  // ΔB·G = rhs  ⇔  G·ΔBᵀ = rhsᵀ (G symmetric).
  detail::mat dBt;
  if (o.lambda > 0) dBt = G.ldlt().solve(rhs.transpose());
  else dBt = Eigen::CompleteOrthogonalDecomposition<detail::mat>(G).solve(rhs.transpose());
  detail::mat dB = dBt.transpose();
  return fair_result{detail::owned_low_rank(B + dB, A, clients[0].scale()), std::move(dB)};
}

/// ‖aggregate − Σ p_k·ΔW_k‖_F in factored form.
template <class T, class U>
double aggregation_error(const low_rank<U>& aggregate, const std::vector<low_rank<T>>& clients,
                         const std::vector<double>& weights = {}) {
  const auto p = detail::client_weights(clients, weights, "deltaw::compose::aggregation_error");
  return factored_error(aggregate, clients, p);
}

}  // namespace compose
DELTAW_NAMESPACE_END
