// SPDX-License-Identifier: MIT
// deltaw/io.hpp: read a PEFT adapter directory and apply one module's LoRA.
#include <deltaw/io.hpp>
#include <cstdio>

namespace dw = deltaw;
using Mat = dw::dense<float>;

int main(int argc, char** argv) {
  if (argc < 2) return 0;
  const auto adapter = dw::io::read_peft_adapter(argv[1]);
  const auto& m = adapter.modules().front();
  const Mat W = Mat::Random(m.out_features(), m.in_features()), X = Mat::Random(4, m.in_features());
  Mat Y(4, m.out_features());
  dw::apply(dw::view(W) + m.update(), X, Y);
  std::printf("%f\n", double(Y.sum()));
}
