// Helpers for the autograd tests: random parameters and a gradient check that reports.
#pragma once

#include <deltaw/autograd/adapters.hpp>
#include <deltaw/autograd/gradcheck.hpp>
#include <deltaw/autograd/ops.hpp>

#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace dwag {

namespace ag = deltaw::autograd;
using P = ag::parameter<double>;
using dwt::MatD;

inline std::unique_ptr<P> param(const std::string& name, Eigen::Index r, Eigen::Index c, std::uint64_t seed,
                                double scale = 1.0) {
  return std::make_unique<P>(name, MatD(scale * dwt::random<MatD>(r, c, seed)));
}

/// Central-difference check of loss = Σ f(tape) ⊙ R (R random, fixed): every parameter's
/// gradient within rel_tol. Prints one line for the report.
template <class F>
double check(const std::string& what, F&& f, const std::vector<P*>& params, std::uint64_t seed, double tol = 1e-6) {
  MatD R;
  auto loss = [&](ag::tape<double>& t) {
    auto y = f(t);
    if (R.size() == 0) R = dwt::random<MatD>(y.rows(), y.cols(), seed ^ 0x5eed);
    return ag::weighted_sum(y, R);
  };
  const auto rep = ag::gradcheck(loss, params);
  INFO(what << ": max relative error " << rep.max_rel_error << " at " << rep.worst);
  CHECK(rep.max_rel_error < tol);
  CHECK(rep.min_grad_norm > 0);
  std::printf("gradcheck %-28s entries %5td  max rel err %.2e (%s)\n", what.c_str(), rep.entries, rep.max_rel_error,
              rep.worst.c_str());
  return rep.max_rel_error;
}

inline Eigen::Index dim(std::mt19937_64& g, int lo, int hi) {
  return std::uniform_int_distribution<int>(lo, hi)(g);
}

}  // namespace dwag
