// SPDX-License-Identifier: MIT
// The README's "Use" block as one program.
#include <deltaw/deltaw.hpp>
#include <cstdio>

namespace dw = deltaw;
using Mat = dw::dense<float>;

int main() {
  Mat W = Mat::Random(64, 48), B = Mat::Random(64, 4), A = Mat::Random(4, 48), X = Mat::Random(8, 48);
  Mat Yout(8, 64), dY = Mat::Random(8, 64);
  auto lora  = dw::lora(B, A, dw::alpha(16));
  auto layer = dw::view(W) + lora;
  auto Y     = dw::apply(layer, X);
  dw::apply(layer, X, Yout);
  auto dX    = dw::apply_transposed(layer, dY);
  dw::merge(W, lora);  dw::unmerge(W, lora);
  auto D     = dw::materialize(lora);
  double n   = dw::frobenius_norm(lora);
  auto m     = dw::dora_magnitude(W, lora);
  auto dora  = dw::dora(W, lora, m);
  std::printf("%f %f %f %f %f %f\n", double(Y.sum()), double(dX.sum()), double(D.sum()), n, double(m.sum()),
              double(dw::apply(dw::view(W) + dora, X).sum()));
}
