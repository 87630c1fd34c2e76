// SPDX-License-Identifier: MIT
// OLoRA (Büyükakyüz 2024, arXiv:2406.01775): thin QR of W = Q·R, the adapter starts as
// A = R[:r] (the first r rows of R), B = Q[:, :r] (orthonormal columns), and W −= s·B·A.
// Since R is upper triangular, the first r columns of W are entirely in the adapter (for
// s = 1 they vanish from W_res).
#pragma once

#include <deltaw/core/eigen_dense.hpp>
#include <cmath>
#include <string>

#include "factors.hpp"

DELTAW_NAMESPACE_BEGIN

/// Initialises an OLoRA adapter of rank r and scale s from W [out, in] (a writable float or
/// double Eigen matrix or view) and rewrites W into W − s·B·A in place. The QR is computed
/// in double (Householder); factors are returned in W's element type.
template <class WL>
auto olora(WL&& W, index_t r, double s) {
  constexpr const char* op = "deltaw::olora";
  auto Wv = detail::writable_weight(std::forward<WL>(W), op);
  using T = typename decltype(Wv)::element_type;
  detail::check_init_rank(r, Wv.rows(), Wv.cols(), op);
  if (!std::isfinite(s)) throw non_finite_error(std::string(op) + ": the scale s must be finite");
  using Mat = Eigen::MatrixXd;
  const Mat Wd = cpu::to_dense<double>(matrix_view<const T>(Wv));
  Eigen::HouseholderQR<Mat> qr(Wd);
  lora_factors<T> f;
  f.s = s;
  f.B = (qr.householderQ() * Mat::Identity(Wd.rows(), r)).template cast<T>();
  const Mat R = qr.matrixQR().topRows(r).template triangularView<Eigen::Upper>();
  f.A = R.template cast<T>();
  detail::subtract_scaled_product<double>(Wv, f.B, f.A, s);
  return f;
}

DELTAW_NAMESPACE_END
