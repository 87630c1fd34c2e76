// SPDX-License-Identifier: MIT
// docs/methods.md, the VJP sections: a frozen W [out, in], a tape t, an input variable x
// [tokens, in], VeRA's shared bases and initial λ_d, λ_b (ld0, lb0), and the trainable
// parameters ld, lb (VeRA) and b (Bone bat, [out, r]).
#pragma once
#include <deltaw/autograd.hpp>

inline const deltaw::index_t out = 6, in = 4, r = 2, tokens = 3;
inline deltaw::dense<double> W = deltaw::dense<double>::Random(out, in);
inline const auto basis = deltaw::vera_shared_basis(7, r, out, in);
inline const Eigen::VectorXd ld0 = Eigen::VectorXd::Constant(r, 0.1), lb0 = Eigen::VectorXd::Zero(out);
inline deltaw::autograd::parameter<double> ld("lambda_d", deltaw::dense<double>::Constant(1, r, 0.1)),
    lb("lambda_b", deltaw::dense<double>::Zero(1, out)), b("b", deltaw::dense<double>::Zero(out, r)),
    x_value("x", deltaw::dense<double>::Random(tokens, in));
inline deltaw::autograd::tape<double> t;
inline const deltaw::autograd::var<double> x = t.param(x_value);
