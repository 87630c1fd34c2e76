// Helpers for the io tests: fixture paths, raw file builders, temporary directories.
#pragma once

#include <deltaw/io.hpp>

#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "test_util.hpp"

using deltaw::index_t;

namespace dwio {

namespace fs = std::filesystem;

inline fs::path fixtures() { return fs::path(DELTAW_IO_FIXTURES); }
inline fs::path corpus() { return fs::path(DELTAW_IO_FUZZ_CORPUS); }

/// A fresh empty directory under the system temp dir, removed at scope exit.
struct temp_dir {
  fs::path path;
  temp_dir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("deltaw_io_test_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

inline std::vector<std::byte> bytes_of(const std::string& s) {
  std::vector<std::byte> b(s.size());
  if (!s.empty()) std::memcpy(b.data(), s.data(), s.size());
  return b;
}

/// A safetensors buffer: 8-byte length of `header` (as given, unpadded), then header, then data.
inline std::vector<std::byte> raw_safetensors(const std::string& header, const std::vector<std::byte>& data = {},
                                              std::uint64_t length_override = ~std::uint64_t(0)) {
  std::vector<std::byte> out(8);
  const std::uint64_t n = length_override == ~std::uint64_t(0) ? header.size() : length_override;
  std::memcpy(out.data(), &n, 8);
  auto h = bytes_of(header);
  out.insert(out.end(), h.begin(), h.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

inline std::vector<std::byte> f32_bytes(std::initializer_list<float> v) {
  std::vector<std::byte> b(v.size() * 4);
  std::memcpy(b.data(), std::data(v), b.size());
  return b;
}

inline std::vector<std::byte> zeros(std::size_t n) { return std::vector<std::byte>(n); }

inline std::vector<std::byte> slurp(const fs::path& p) {
  auto b = deltaw::io::read_file(p);
  return {b.bytes.begin(), b.bytes.end()};
}

inline void write_text(const fs::path& p, const std::string& s) {
  auto b = bytes_of(s);
  deltaw::io::write_file(p, b);
}

/// Loads a 2-D F32/F64 tensor of a safetensors file as a double matrix.
inline dwt::MatD load_matd(const deltaw::io::safetensors_file& f, const std::string& name) {
  const auto& t = f.at(name);
  const auto v = f.values<double>(name);
  const Eigen::Index r = Eigen::Index(t.shape.size() == 2 ? t.shape[0] : 1);
  const Eigen::Index c = Eigen::Index(t.shape.size() == 2 ? t.shape[1] : t.shape.at(0));
  return Eigen::Map<const dwt::MatD>(v.data(), r, c);
}

/// A directory made by tools/make_fixtures.py for the structured PEFT types: a tiny model
/// (blocks.0.q → ReLU → blocks.0.v → ReLU → head; model.safetensors), its inputs and
/// outputs as PEFT computed them (io.safetensors) and the adapter, read with read_peft.
struct peft_model_fixture {
  static constexpr const char* modules[] = {"blocks.0.q", "blocks.0.v", "head"};
  deltaw::io::safetensors_file weights, io;
  deltaw::io::any_peft_adapter adapter;
  explicit peft_model_fixture(const std::string& name)
      : weights(deltaw::io::safetensors_file::open(fixtures() / name / "model.safetensors")),
        io(deltaw::io::safetensors_file::open(fixtures() / name / "io.safetensors")),
        adapter(deltaw::io::read_peft(fixtures() / name / "adapter")) {}

  /// X·W'ᵀ + b' as deltaw computes it, lazily or through the dense ΔW (IA³ output scaling
  /// scales the bias too, RoAd rotates it).
  dwt::MatD linear(const std::string& module, const dwt::MatD& X, bool dense_path = false) const {
    using dwt::MatD;
    using dwt::MatF;
    const auto W = weights.matrix<float>(module + ".weight");
    const auto& m = adapter.at(module);
    std::vector<double> b = weights.values<double>(module + ".bias");
    if (const auto* ia = m.get_if<deltaw::io::peft_ia3_module>()) ia->scale_bias(b);
    if (const auto* rd = m.get_if<deltaw::io::peft_road_module>()) rd->rotate_bias(b);  // PEFT rotates b too
    MatD Y;
    if (dense_path) {
      const MatD Wd = Eigen::Map<const MatF>(W.view.data(), W.view.rows(), W.view.cols()).cast<double>();
      Y = X * (Wd + m.update(W.view).materialize().cast<double>()).transpose();
    } else {
      Y = m.apply(W.view, MatF(X.cast<float>())).cast<double>();
    }
    for (Eigen::Index i = 0; i < Y.rows(); ++i)
      for (Eigen::Index j = 0; j < Y.cols(); ++j) Y(i, j) += b[std::size_t(j)];
    return Y;
  }

  /// What every such fixture must give: PEFT's per-module outputs (lazy and dense paths) and
  /// the whole model's within 1e-5 relative, and merge / unmerge through any_peft_module
  /// round-tripping W.
  void check_outputs_and_merge() const {
    using dwt::MatD;
    using dwt::MatF;
    for (const char* mod : modules) {
      CAPTURE(mod);
      const MatD X = load_matd(io, std::string("x.") + mod);
      const MatD Y = load_matd(io, std::string("y.") + mod);
      CHECK(dwt::rel_err(linear(mod, X), Y) < 1e-5);
      CHECK(dwt::rel_err(linear(mod, X, true), Y) < 1e-5);
    }
    const MatD h1 = linear("blocks.0.q", load_matd(io, "x")).cwiseMax(0.0);
    const MatD h2 = linear("blocks.0.v", h1).cwiseMax(0.0);
    CHECK(dwt::rel_err(linear("head", h2), load_matd(io, "y")) < 1e-5);
    for (const char* mod : modules) {
      CAPTURE(mod);
      const auto Wf = weights.matrix<float>(std::string(mod) + ".weight");
      MatF W = Eigen::Map<const MatF>(Wf.view.data(), Wf.view.rows(), Wf.view.cols());
      const MatF W0 = W;
      const MatD Wp = W0.cast<double>() + adapter.at(mod).update(Wf.view).materialize().cast<double>();
      const auto u = adapter.at(mod).update(W);
      u.merge(W);
      CHECK(dwt::rel_err(W, Wp) < 1e-5);
      u.unmerge(W);
      CHECK(dwt::rel_err(W, W0) < 1e-5);
    }
  }
};

}  // namespace dwio
