// SPDX-License-Identifier: MIT
// The checks every update type gets against its dense ΔW in double (built by the caller from
// the type's definition, never from deltaw's materialize): apply and apply_transposed alone
// and over W, materialize, frobenius_norm, a lazy sum with a LoRA, and the merge / unmerge /
// merge_checked round trip. Shared by the tests of the structured types.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "test_util.hpp"

namespace dwt {

/// apply / apply_transposed of u alone for each token count, materialize and frobenius_norm.
template <class U>
void check_update_ops(const U& u, const MatD& dW, std::uint64_t seed,
                      const std::vector<Eigen::Index>& tokens = {0, 1, 5}) {
  const auto out = dW.rows(), in = dW.cols();
  for (const Eigen::Index T : tokens) {
    CAPTURE(T);
    const MatD X = random<MatD>(T, in, seed + T), G = random<MatD>(T, out, seed + 7 + T);
    CHECK(rel_err(deltaw::apply(u, X), X * dW.transpose()) < 1e-12);
    CHECK(rel_err(deltaw::apply_transposed(u, G), G * dW) < 1e-12);
  }
  CHECK(rel_err(deltaw::materialize(u), dW) < 1e-12);
  CHECK(std::abs(deltaw::frobenius_norm(u) - dW.norm()) < 1e-10 * std::max(1.0, dW.norm()));
}

/// Options of check_update_over_weight.
struct over_weight_options {
  std::vector<Eigen::Index> tokens{0, 1, 5};
  double unmerge_tol = 1e-12;  ///< ‖unmerge(merge(W)) − W‖ / ‖W‖
  bool merge_checked = true;
  /// For a type whose ΔW reads W (it merges only into that weight): the name its error
  /// gives ("HRA", "RoAd", …); null for a type that merges into any weight.
  const char* reads_weight = nullptr;
};

/// Over W (the weight u was built over, which the merge checks change and restore):
/// apply / apply_transposed of view(W) + u, a lazy sum with a LoRA, merge, unmerge,
/// merge_checked; for a type that reads W, the refusal to merge into another weight.
template <class U>
void check_update_over_weight(const U& u, MatD& W, const MatD& dW, std::uint64_t seed,
                              const over_weight_options& o = {}) {
  const auto out = W.rows(), in = W.cols();
  const MatD Wp = W + dW;
  for (const Eigen::Index T : o.tokens) {
    CAPTURE(T);
    const MatD X = random<MatD>(T, in, seed + 11 + T), G = random<MatD>(T, out, seed + 19 + T);
    CHECK(rel_err(deltaw::apply(deltaw::view(W) + u, X), X * Wp.transpose()) < 1e-12);
    CHECK(rel_err(deltaw::apply_transposed(deltaw::view(W) + u, G), G * Wp) < 1e-12);
  }
  const MatD Bl = random<MatD>(out, 2, seed + 31), Al = random<MatD>(2, in, seed + 37);
  const MatD X = random<MatD>(4, in, seed + 41);
  CHECK(rel_err(deltaw::apply(deltaw::view(W) + u + deltaw::lora(Bl, Al, deltaw::scale(0.5)), X),
                X * (Wp + 0.5 * Bl * Al).transpose()) < 1e-12);
  const MatD W0 = W;
  deltaw::merge(W, u);
  CHECK(rel_err(W, Wp) < 1e-12);
  deltaw::unmerge(W, u);
  CHECK(rel_err(W, W0) < o.unmerge_tol);
  if (o.merge_checked) {
    deltaw::merge_checked(W, u);
    CHECK(rel_err(W, Wp) < 1e-12);
    deltaw::unmerge(W, u);
  }
  if (o.reads_weight) {
    MatD W2 = W0;
    check_throws_with<deltaw::argument_error>([&] { deltaw::merge(W2, u); },
                                              {o.reads_weight, "merges only into the weight"});
  }
}

}  // namespace dwt
