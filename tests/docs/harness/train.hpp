// SPDX-License-Identifier: MIT
// docs/training.md: `using namespace deltaw;` as the document writes names (train::,
// optim::, autograd::, view, dense); a frozen layer Wq, a random engine gen, the options of
// train::fit (fit_opts, fo), a loss (loss_fn, loss) and an optimiser opt; for DiffoRA a tape
// t, an input x, a frozen W, LoRA parameters B and A with scale s; for LoRAPrune the float
// tiny transformer's adapted projections q, k, v, up and its head size.
#pragma once
#include <deltaw/train.hpp>

using namespace deltaw;
inline dense<float> Wq = dense<float>::Random(16, 16), W = dense<float>::Random(16, 16);
inline std::mt19937_64 gen(1);
inline train::fit_options fit_opts, fo;
inline autograd::parameter<float> B("B", dense<float>::Zero(16, 2)), A("A", dense<float>::Random(2, 16)),
    x_value("x", dense<float>::Random(4, 16));
inline autograd::tape<float> t;
inline autograd::var<float> x = t.param(x_value), y;
inline const double s = 2.0;
inline const index_t head_dim = 4;
inline nn::tiny_transformer<float> model = [] {
  nn::transformer_config c;
  c.vocab = 16;
  c.seq = 8;
  c.d_model = 16;
  c.heads = 4;
  c.d_ff = 32;
  c.layers = 1;
  nn::tiny_transformer<float> m(c);
  m.attach(nn::adapter_kind::lora, 2, 4.0);
  return m;
}();
inline nn::linear<float>*q = model.projections()[0], *k = model.projections()[1], *v = model.projections()[2],
                         *up = model.projections()[4];
inline optim::adamw<float> opt(model.trainable_parameters(), {});
inline const dense<float> target = dense<float>::Zero(4, 16);
inline const std::function<autograd::var<float>(autograd::tape<float>&, index_t)> loss_fn =
    [](autograd::tape<float>& tp, index_t) { return autograd::mse(tp.param(x_value), tp.frozen(target)); };
inline const auto& loss = loss_fn;
