// SPDX-License-Identifier: MIT
// Writes FourierFT, C3A and WaveFT adapters for the Tiny model of tests/fixtures (its layer shapes
// from peft_fourierft/model.safetensors) with deltaw, and deltaw's per-layer outputs
// y = x·(W + ΔW)ᵀ + b for random x, for tests/fourier/check_peft_fourier.py to compare
// with PEFT's forward after PEFT loads the directories.
//   peft_fourier_writer <fixtures dir> <out dir>
#include <deltaw/io/peft_fourier.hpp>

#include <cstdio>
#include <random>

namespace dw = deltaw;
namespace io = deltaw::io;
using dw::index_t;
using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace {
MatF randm(std::mt19937& g, Eigen::Index r, Eigen::Index c, float s) {
  std::normal_distribution<float> d(0.f, s);
  MatF m(r, c);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = d(g);
  return m;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <fixtures dir> <out dir>\n", argv[0]);
    return 2;
  }
  const std::filesystem::path fx = argv[1], out = argv[2];
  const auto weights = io::safetensors_file::open(fx / "peft_fourierft" / "model.safetensors");
  const char* const mods[] = {"blocks.0.q", "blocks.0.v", "head"};
  std::mt19937 g(1616);
  for (const char* kind : {"fourierft", "c3a", "waveft"}) {
    io::peft_fourier_adapter a;
    io::safetensors_writer expected;
    std::vector<MatF> keep;
    keep.reserve(16);
    for (const char* m : mods) {
      const auto W = weights.matrix<float>(std::string(m) + ".weight");
      const auto b = weights.values<float>(std::string(m) + ".bias");
      const index_t o = W.view.rows(), i = W.view.cols();
      const MatF& X = keep.emplace_back(randm(g, 4, i, 1.f));
      MatF Y;
      if (std::string(kind) == "fourierft") {
        const index_t n = std::string(m) == "blocks.0.v" ? 13 : 29;
        const Eigen::VectorXf c = randm(g, n, 1, 1.f);
        const auto u = dw::fourierft(c, o, i, 5, dw::scale(40));
        a.add_fourierft(m, u, 5);
        Y = dw::apply(dw::view(W.view) + u, X);
      } else if (std::string(kind) == "waveft") {
        const index_t n = std::string(m) == "blocks.0.v" ? 17 : 41;
        const Eigen::VectorXf c = randm(g, n, 1, 1.f);
        const auto u = dw::waveft(c, o, i, 9, dw::scale(25));
        a.add_waveft(m, u, 9);
        Y = dw::apply(dw::view(W.view) + u, X);
      } else {
        const index_t bs = std::string(m) == "blocks.0.v" ? 2 : 4;
        const MatF K = randm(g, (o / bs) * (i / bs), bs, 1.f);
        const auto u = dw::c3a(K, o, i);
        a.add_c3a(m, u);
        Y = dw::apply(dw::view(W.view) + u, X);
      }
      for (Eigen::Index r = 0; r < Y.rows(); ++r)
        for (Eigen::Index c = 0; c < Y.cols(); ++c) Y(r, c) += b[std::size_t(c)];
      expected.add(std::string("x.") + m, dw::view(X));
      expected.add(std::string("y.") + m, dw::view(keep.emplace_back(Y)));
    }
    io::write_peft_fourier_adapter(out / kind / "adapter", a);
    expected.write(out / kind / "expected.safetensors");
  }
  return 0;
}
