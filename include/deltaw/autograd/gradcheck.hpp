// SPDX-License-Identifier: MIT
// Gradient checking by central differences in double, for any loss built on a tape from
// parameters: the analytic gradient of one backward() against (f(θ + h) − f(θ − h))/2h,
// entry by entry, evaluated under no_grad.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "tape.hpp"

DELTAW_NAMESPACE_BEGIN
namespace autograd {

struct gradcheck_report {
  /// max over parameters of ‖analytic − numeric‖_F / max(‖numeric‖_F, ‖analytic‖_F)
  /// (0 when both vanish).
  double max_rel_error = 0;
  /// The parameter where it was reached.
  std::string worst;
  /// Entries perturbed.
  index_t entries = 0;
  /// The smallest ‖numeric‖_F over the parameters (a check of a zero gradient proves little).
  double min_grad_norm = std::numeric_limits<double>::infinity();
};

/// loss(tape<double>&) must build a [1, 1] loss from `params` (through tape::param) and
/// return it; it is called 1 + 2·(entries) times. The parameters' gradients are zeroed
/// and left holding the analytic gradient.
template <class F>
gradcheck_report gradcheck(F&& loss, const std::vector<parameter<double>*>& params, double h = 1e-6) {
  for (auto* p : params) p->zero_grad();
  {
    tape<double> t;
    const auto l = loss(t);
    t.backward(l);
  }
  auto eval = [&]() {
    tape<double> t;
    no_grad<double> ng(t);
    const auto l = loss(t);
    if (l.rows() != 1 || l.cols() != 1)
      throw shape_error("deltaw::autograd::gradcheck: the loss must be [1, 1]; got " +
                        deltaw::detail::shape_str(l.rows(), l.cols()));
    return l.value()(0, 0);
  };
  gradcheck_report rep;
  for (auto* p : params) {
    if (!p->trainable()) continue;
    dense<double> num(p->rows(), p->cols());
    for (index_t i = 0; i < p->size(); ++i) {
      double& v = p->value().data()[i];
      const double v0 = v;
      v = v0 + h;
      const double fp = eval();
      v = v0 - h;
      const double fm = eval();
      v = v0;
      num.data()[i] = (fp - fm) / (2 * h);
      ++rep.entries;
    }
    const double nn = num.norm(), na = p->grad().norm();
    const double denom = std::max(nn, na);
    const double err = denom == 0 ? 0.0 : (p->grad() - num).norm() / denom;
    rep.min_grad_norm = std::min(rep.min_grad_norm, nn);
    if (err >= rep.max_rel_error) {
      rep.max_rel_error = err;
      rep.worst = p->name();
    }
  }
  return rep;
}

}  // namespace autograd
DELTAW_NAMESPACE_END
