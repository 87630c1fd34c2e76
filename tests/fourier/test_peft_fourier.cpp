// SPDX-License-Identifier: MIT
// FourierFT, C3A and WaveFT adapter directories (issue 16): saved by PEFT 0.21.2 itself
// (tests/fixtures/peft_fourierft*, peft_c3a, peft_waveft*; tools/make_fixtures.py
// --only fourier) reproduce PEFT's per-layer outputs within 1e-5 relative, and the
// frequencies deltaw draws are the ones PEFT drew (indices.safetensors); merge matches
// too; deltaw-written directories read back to the same ΔW; read_peft names the reader of
// these types; errors are specific.
#include <deltaw/io/peft_adapter.hpp>
#include <deltaw/io/peft_fourier.hpp>

#include <fstream>

#include "io/io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;

namespace {

const char* const modules[] = {"blocks.0.q", "blocks.0.v", "head"};

/// y = x·(W + ΔW)ᵀ + b against PEFT's per-module output, and merge into W.
template <class U>
void check_module(const io::safetensors_file& weights, const io::safetensors_file& iof, const std::string& mod, const U& u) {
  CAPTURE(mod);
  const auto W = weights.matrix<float>(mod + ".weight");
  const std::vector<double> b = weights.values<double>(mod + ".bias");
  const MatD X = dwio::load_matd(iof, "x." + mod), Y = dwio::load_matd(iof, "y." + mod);
  MatD Z = dw::apply(dw::view(W.view) + u, MatF(X.cast<float>())).template cast<double>();
  for (Eigen::Index i = 0; i < Z.rows(); ++i)
    for (Eigen::Index j = 0; j < Z.cols(); ++j) Z(i, j) += b[std::size_t(j)];
  CHECK(dwt::rel_err(Z, Y) < 1e-5);
  MatF Wm = dw::materialize(W.view);
  dw::merge(Wm, u);
  MatD Zm = X * Wm.cast<double>().transpose();
  for (Eigen::Index i = 0; i < Zm.rows(); ++i)
    for (Eigen::Index j = 0; j < Zm.cols(); ++j) Zm(i, j) += b[std::size_t(j)];
  CHECK(dwt::rel_err(Zm, Y) < 1e-5);
}

}  // namespace

TEST_CASE("peft FourierFT (two seeds, n_frequency_pattern) reproduces PEFT 0.21.2, frequencies included") {
  for (const char* name : {"peft_fourierft", "peft_fourierft_seed"}) {
    CAPTURE(name);
    const auto dir = dwio::fixtures() / name;
    const auto a = io::read_peft_fourier_adapter(dir / "adapter");
    CHECK(a.peft_type() == "FOURIERFT");
    REQUIRE(a.size() == 3);
    const auto weights = io::safetensors_file::open(dir / "model.safetensors");
    const auto iof = io::safetensors_file::open(dir / "io.safetensors");
    const auto idx = io::safetensors_file::open(dir / "indices.safetensors");
    for (const char* mod : modules) {
      const auto* m = a.find_fourierft(mod);
      REQUIRE(m);
      const auto W = weights.matrix<float>(std::string(mod) + ".weight");
      const auto u = m->update(W.view);
      // PEFT's indices, as it drew them: [2, n] int64, rows then columns.
      const std::vector<double> pi = idx.values<double>(mod);
      REQUIRE(pi.size() == std::size_t(2 * u.size()));
      for (index_t k = 0; k < u.size(); ++k) {
        CHECK(double(u.indices().rows[std::size_t(k)]) == pi[std::size_t(k)]);
        CHECK(double(u.indices().cols[std::size_t(k)]) == pi[std::size_t(u.size() + k)]);
      }
      check_module(weights, iof, mod, u);
    }
    CHECK(a.find_fourierft("blocks.0.v")->spectrum.view.size() == (std::string(name) == "peft_fourierft" ? 11 : 23));
  }
}

TEST_CASE("peft WaveFT (db1, use_idwt on and off, odd widths) reproduces PEFT 0.21.2, positions included") {
  for (const char* name : {"peft_waveft", "peft_waveft_direct", "peft_waveft_odd"}) {
    CAPTURE(name);
    const auto dir = dwio::fixtures() / name;
    const auto a = io::read_peft_fourier_adapter(dir / "adapter");
    CHECK(a.peft_type() == "WAVEFT");
    REQUIRE(a.size() == 3);
    CHECK(a.config.use_idwt == (std::string(name) != "peft_waveft_direct"));
    const auto weights = io::safetensors_file::open(dir / "model.safetensors");
    const auto iof = io::safetensors_file::open(dir / "io.safetensors");
    const auto idx = io::safetensors_file::open(dir / "indices.safetensors");
    for (const char* mod : modules) {
      const auto* m = a.find_waveft(mod);
      REQUIRE(m);
      const auto u = m->update(weights.matrix<float>(std::string(mod) + ".weight").view);
      const std::vector<double> pi = idx.values<double>(mod);
      REQUIRE(pi.size() == std::size_t(2 * u.size()));
      for (index_t k = 0; k < u.size(); ++k) {
        CHECK(double(u.indices().rows[std::size_t(k)]) == pi[std::size_t(k)]);
        CHECK(double(u.indices().cols[std::size_t(k)]) == pi[std::size_t(u.size() + k)]);
      }
      check_module(weights, iof, mod, u);
    }
  }
  // deltaw writes, deltaw reads
  const Eigen::VectorXf c = dwt::random<MatF>(7, 1, 9);
  io::peft_fourier_adapter w;
  const auto u = dw::waveft(c, 23, 16, 11, dw::scale(25));
  w.add_waveft("blocks.0.q", u, 11);
  dwio::temp_dir t;
  io::write_peft_fourier_adapter(t.path, w);
  const auto b = io::read_peft_fourier_adapter(t.path);
  CHECK(dwt::rel_err(dw::materialize(b.find_waveft("blocks.0.q")->update(23, 16)), dw::materialize(u)) < 1e-6);
  dwt::check_throws_with<dw::argument_error>([&] { w.add_waveft("v", dw::waveft(c, 9, 23, 11, dw::scale(25), false), 11); },
                                             {"use_idwt"});
  std::ofstream(t.path / "adapter_config.json") << R"({"peft_type": "WAVEFT", "wavelet_family": "db4"})";
  dwt::check_throws_with<dw::unsupported_error>([&] { (void)io::read_peft_fourier_adapter(t.path); }, {"db4", "Haar"});
}

TEST_CASE("read_peft refers FOURIERFT and C3A directories to read_peft_fourier_adapter") {
  for (const char* name : {"peft_fourierft", "peft_c3a", "peft_waveft"})
    dwt::check_throws_with<dw::unsupported_error>([&] { (void)io::read_peft(dwio::fixtures() / name / "adapter"); },
                                                  {"read_peft_fourier_adapter", "deltaw::fft"});
}

TEST_CASE("peft C3A (block_size_pattern) reproduces PEFT 0.21.2") {
  const auto dir = dwio::fixtures() / "peft_c3a";
  const auto a = io::read_peft_fourier_adapter(dir / "adapter");
  CHECK(a.peft_type() == "C3A");
  REQUIRE(a.size() == 3);
  const auto weights = io::safetensors_file::open(dir / "model.safetensors");
  const auto iof = io::safetensors_file::open(dir / "io.safetensors");
  for (const char* mod : modules) {
    const auto* m = a.find_c3a(mod);
    REQUIRE(m);
    check_module(weights, iof, mod, m->update());
  }
  CHECK(a.find_c3a("blocks.0.v")->update().block_size() == 2);
  CHECK(a.find_c3a("head")->update().block_size() == 4);
}

TEST_CASE("peft FourierFT / C3A: deltaw writes, deltaw reads the same ΔW; errors") {
  const Eigen::VectorXf c1 = dwt::random<MatF>(9, 1, 1), c2 = dwt::random<MatF>(5, 1, 2);
  io::peft_fourier_adapter a;
  const auto u1 = dw::fourierft(c1, 24, 16, 42, dw::scale(7));
  const auto u2 = dw::fourierft(c2, 20, 24, 42, dw::scale(7));
  a.add_fourierft("blocks.0.q", u1, 42);
  a.add_fourierft("blocks.0.v", u2, 42);
  dwio::temp_dir t;
  io::write_peft_fourier_adapter(t.path, a);
  const auto b = io::read_peft_fourier_adapter(t.path);
  CHECK(b.config.random_loc_seed == 42);
  CHECK(b.config.n_frequency == 9);
  CHECK(b.config.size_pattern.at("0\\.v") == 5);
  CHECK(dwt::rel_err(dw::materialize(b.find_fourierft("blocks.0.q")->update(24, 16)), dw::materialize(u1)) < 1e-6);
  CHECK(dwt::rel_err(dw::materialize(b.find_fourierft("blocks.0.v")->update(20, 24)), dw::materialize(u2)) < 1e-6);
  dwt::check_throws_with<dw::argument_error>([&] { a.add_fourierft("head", dw::fourierft(c2, 8, 20, 43, dw::scale(7)), 43); },
                                             {"one scaling and one random_loc_seed"});
  dwt::check_throws_with<dw::argument_error>(
      [&] { a.add_fourierft("head", dw::fourierft(c2, dw::fourierft_indices{{0, 1, 2, 3, 4}, {0, 0, 0, 0, 0}}, 8, 20, dw::scale(7)), 42); },
      {"not the ones PEFT draws"});
  dwt::check_throws_with<dw::argument_error>([&] { a.add_c3a("head", dw::c3a(MatF(MatF::Ones(10, 4)), 8, 20)); }, {"cannot hold"});

  io::peft_fourier_adapter c;
  const MatF K = dwt::random<MatF>(24, 4, 3);
  const auto uc = dw::c3a(K, 24, 16);
  c.add_c3a("blocks.0.q", uc);
  dwio::temp_dir t2;
  io::write_peft_fourier_adapter(t2.path, c);
  const auto d = io::read_peft_fourier_adapter(t2.path);
  CHECK(dwt::rel_err(dw::materialize(d.find_c3a("blocks.0.q")->update()), dw::materialize(uc)) < 1e-6);
  dwt::check_throws_with<dw::argument_error>([&] { c.add_c3a("v", dw::c3a(K, 24, 16, dw::scale(1))); }, {"divides by in = 16"});

  // a malformed directory
  dwio::temp_dir tmp;
  std::ofstream(tmp.path / "adapter_config.json") << R"({"peft_type": "C3A", "block_size": 4, "target_modules": ["q"]})";
  io::safetensors_writer w;
  w.add("base_model.model.q.c3a_kernel", dw::view(K));
  w.write(tmp.path / "adapter_model.safetensors");
  dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft_fourier_adapter(tmp.path); }, {"module \"q\"", "[out/b, in/b, b]"});
  std::ofstream(tmp.path / "adapter_config.json") << R"({"peft_type": "FOURIERFT", "fan_in_fan_out": true})";
  dwt::check_throws_with<dw::unsupported_error>([&] { (void)io::read_peft_fourier_adapter(tmp.path); }, {"fan_in_fan_out"});
}
