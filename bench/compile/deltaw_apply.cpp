// SPDX-License-Identifier: MIT
// deltaw/deltaw.hpp and the same LoRA apply as plain_eigen.cpp.
#include <deltaw/deltaw.hpp>
#include <cstdio>

namespace dw = deltaw;
using Mat = dw::dense<float>;

int main() {
  const Mat W = Mat::Random(256, 128), B = Mat::Random(256, 8), A = Mat::Random(8, 128), X = Mat::Random(32, 128);
  Mat Y(32, 256);
  dw::apply(dw::view(W) + dw::lora(B, A, dw::scale(2.0)), X, Y);
  std::printf("%f\n", double(Y.sum()));
}
