// SPDX-License-Identifier: MIT
// GraLoRA and UniLoRA adapters (issue 16): the directories saved by PEFT 0.21.2 itself
// (tests/fixtures/peft_gralora: k = 3, r = 6, hybrid_r = 2 on layers 15→21→9→6;
// peft_gralora_k2: k = 2, r = 4, no hybrid part; peft_unilora: r = 3, θ of 50, save_indices;
// tools/fixtures_gralora_unilora.py) reproduce PEFT's per-layer and whole-model outputs within
// 1e-5 relative, lazily and through the dense ΔW; merge / unmerge round-trip W; deltaw-written
// directories read back to the same ΔW; a UniLoRA adapter saved without its indices, key and
// shape errors are specific errors; read_peft refers both types to their readers.
#include <deltaw/io/peft_adapter.hpp>
#include <deltaw/io/peft_gralora.hpp>
#include <deltaw/io/peft_unilora.hpp>

#include <fstream>

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;

namespace {

constexpr const char* mods[] = {"blocks.0.q", "blocks.0.v", "head"};

/// model.safetensors + io.safetensors of a fixture, and x·W'ᵀ + b for a module's update.
struct model_io {
  io::safetensors_file weights, io;
  explicit model_io(const std::string& name)
      : weights(io::safetensors_file::open(dwio::fixtures() / name / "model.safetensors")),
        io(io::safetensors_file::open(dwio::fixtures() / name / "io.safetensors")) {}
  template <class U>
  MatD linear(const std::string& mod, const U& u, const MatD& X, bool dense_path) const {
    const auto W = weights.matrix<float>(mod + ".weight");
    const std::vector<double> b = weights.values<double>(mod + ".bias");
    const MatD Wd = Eigen::Map<const MatF>(W.view.data(), W.view.rows(), W.view.cols()).cast<double>();
    MatD Y = dense_path ? MatD(X * (Wd + dw::materialize(u).template cast<double>()).transpose())
                        : MatD(dw::apply(W.view + u, MatF(X.cast<float>())).template cast<double>());
    for (Eigen::Index i = 0; i < Y.rows(); ++i)
      for (Eigen::Index j = 0; j < Y.cols(); ++j) Y(i, j) += b[std::size_t(j)];
    return Y;
  }
  /// PEFT's per-module outputs, the whole model's and the merge / unmerge round trip.
  template <class F>
  void check(F&& update_of) const {
    for (const char* mod : mods) {
      CAPTURE(mod);
      const MatD X = dwio::load_matd(io, std::string("x.") + mod), Y = dwio::load_matd(io, std::string("y.") + mod);
      CHECK(dwt::rel_err(linear(mod, update_of(mod), X, false), Y) < 1e-5);
      CHECK(dwt::rel_err(linear(mod, update_of(mod), X, true), Y) < 1e-5);
      const auto Wf = weights.matrix<float>(std::string(mod) + ".weight");
      MatF W = Eigen::Map<const MatF>(Wf.view.data(), Wf.view.rows(), Wf.view.cols());
      const MatF W0 = W;
      const MatD Wp = W0.cast<double>() + dw::materialize(update_of(mod)).template cast<double>();
      dw::merge(W, update_of(mod));
      CHECK(dwt::rel_err(W, Wp) < 1e-6);
      dw::unmerge(W, update_of(mod));
      CHECK(dwt::rel_err(W, W0) < 1e-6);
    }
    const MatD h1 = linear("blocks.0.q", update_of("blocks.0.q"), dwio::load_matd(io, "x"), false).cwiseMax(0.0);
    const MatD h2 = linear("blocks.0.v", update_of("blocks.0.v"), h1, false).cwiseMax(0.0);
    CHECK(dwt::rel_err(linear("head", update_of("head"), h2, false), dwio::load_matd(io, "y")) < 1e-5);
  }
};

}  // namespace

TEST_CASE("peft GraLoRA reproduces PEFT 0.21.2") {
  struct want {
    const char* dir;
    index_t k, r, hr;
    double alpha;
  };
  for (const want w : {want{"peft_gralora", 3, 6, 2, 5.0}, want{"peft_gralora_k2", 2, 4, 0, 7.0}}) {
    CAPTURE(w.dir);
    const auto a = io::read_peft_gralora_adapter(dwio::fixtures() / w.dir / "adapter");
    CHECK(a.config.k == w.k);
    CHECK(a.config.r == w.r);
    CHECK(a.config.hybrid_r == w.hr);
    CHECK(a.config.scale() == doctest::Approx(w.alpha / double(w.r + w.hr)));
    REQUIRE(a.size() == 3);
    const model_io m(w.dir);
    for (const char* mod : mods) {
      const auto W = m.weights.matrix<float>(std::string(mod) + ".weight");
      CHECK(a.at(mod).out_features() == W.view.rows());
      CHECK(a.at(mod).in_features() == W.view.cols());
      CHECK(a.at(mod).update().hybrid_rank() == w.hr);
    }
    m.check([&](const std::string& mod) { return a.at(mod).update(); });
  }
}

TEST_CASE("peft UniLoRA reproduces PEFT 0.21.2 (save_indices = true)") {
  const auto a = io::read_peft_unilora_adapter(dwio::fixtures() / "peft_unilora" / "adapter");
  CHECK(a.config.r == 3);
  CHECK(a.config.theta_d_length == 50);
  CHECK(a.config.save_indices);
  REQUIRE(a.size() == 3);
  CHECK(a.theta.view.size() == 50);
  // PEFT's scales are 1/√count over every module's indices: recomputed here from the indices.
  std::vector<std::span<const index_t>> all;
  for (const auto& m : a.modules()) {
    all.emplace_back(m.pattern->idx_A);
    all.emplace_back(m.pattern->idx_B);
  }
  const auto inv = dw::unilora_inverse_sqrt_counts<index_t>(50, all);
  for (const auto& m : a.modules())
    for (std::size_t i = 0; i < m.pattern->idx_A.size(); ++i)
      CHECK(m.pattern->scale_A[i] == doctest::Approx(inv[std::size_t(m.pattern->idx_A[i])]).epsilon(1e-7));
  const model_io m("peft_unilora");
  m.check([&](const std::string& mod) { return a.update(mod); });
}

TEST_CASE("peft UniLoRA saved without indices, and malformed GraLoRA / UniLoRA files, are specific errors") {
  dwt::check_throws_with<dw::unsupported_error>(
      [&] { (void)io::read_peft_unilora_adapter(dwio::fixtures() / "peft_unilora_noidx" / "adapter"); },
      {"save_indices = false", "proj_seed", "save_indices=True"});
  // read_peft refers both types to their readers.
  dwt::check_throws_with<dw::unsupported_error>([&] { (void)io::read_peft(dwio::fixtures() / "peft_gralora" / "adapter"); },
                                                {"GRALORA", "read_peft_gralora_adapter"});
  dwt::check_throws_with<dw::unsupported_error>([&] { (void)io::read_peft(dwio::fixtures() / "peft_unilora" / "adapter"); },
                                                {"UNILORA", "read_peft_unilora_adapter"});
  const auto st = io::safetensors_file::open(dwio::fixtures() / "peft_gralora" / "adapter" / "adapter_model.safetensors");
  auto cfg = io::parse_peft_gralora_config(R"({"peft_type": "GRALORA", "r": 6, "gralora_k": 2, "hybrid_r": 2, "alpha": 5})", "cfg");
  dwt::check_throws_with<dw::format_error>([&] { (void)io::peft_gralora_adapter::from_safetensors(cfg, st, "st"); },
                                           {"gralora_A [3, 5, 6]", "k = 2"});
  cfg = io::parse_peft_gralora_config(R"({"peft_type": "GRALORA", "r": 6, "gralora_k": 3, "hybrid_r": 0, "alpha": 5})", "cfg");
  dwt::check_throws_with<dw::format_error>([&] { (void)io::peft_gralora_adapter::from_safetensors(cfg, st, "st"); },
                                           {"general", "hybrid_r = 0"});
  dwt::check_throws_with<dw::format_error>(
      [&] { (void)io::parse_peft_gralora_config(R"({"peft_type": "GRALORA", "r": 5, "gralora_k": 2})", "cfg"); },
      {"r = 5", "gralora_k = 2"});
  dwt::check_throws_with<dw::unsupported_error>(
      [&] { (void)io::parse_peft_unilora_config(R"({"peft_type": "UNILORA", "fan_in_fan_out": true})", "cfg"); },
      {"fan_in_fan_out"});
  const auto su = io::safetensors_file::open(dwio::fixtures() / "peft_unilora" / "adapter" / "adapter_model.safetensors");
  auto ucfg = io::parse_peft_unilora_config(R"({"peft_type": "UNILORA", "r": 3, "theta_d_length": 40})", "cfg");
  dwt::check_throws_with<dw::format_error>([&] { (void)io::peft_unilora_adapter::from_safetensors(ucfg, su, "st"); },
                                           {"50 entries", "theta_d_length is 40"});
  ucfg = io::parse_peft_unilora_config(R"({"peft_type": "UNILORA", "r": 2, "theta_d_length": 50})", "cfg");
  dwt::check_throws_with<dw::format_error>([&] { (void)io::peft_unilora_adapter::from_safetensors(ucfg, su, "st"); },
                                           {"unilora_indices_A [3, 13]", "r = 2"});
}

TEST_CASE("peft GraLoRA and UniLoRA: deltaw writes, deltaw reads the same ΔW") {
  {
    io::peft_gralora_adapter a;
    const MatF A1 = dwt::random<MatF>(12, 4, 1), B1 = dwt::random<MatF>(8, 5, 2), Ah1 = dwt::random<MatF>(1, 12, 3),
               Bh1 = dwt::random<MatF>(10, 1, 4);
    const MatF A2 = dwt::random<MatF>(6, 4, 5), B2 = dwt::random<MatF>(8, 3, 6), Ah2 = dwt::random<MatF>(1, 6, 7),
               Bh2 = dwt::random<MatF>(6, 1, 8);
    const auto u1 = dw::gralora(A1, B1, 2, Ah1, Bh1, dw::scale(0.6)), u2 = dw::gralora(A2, B2, 2, Ah2, Bh2, dw::scale(0.6));
    a.add("blocks.0.q", u1);
    a.add("head", u2);
    dwt::check_throws_with<dw::argument_error>([&] { a.add("x", dw::gralora(A2, B2, 2, Ah2, Bh2, dw::scale(0.7))); },
                                               {"scale", "one of each"});
    dwio::temp_dir t;
    io::write_peft_gralora_adapter(t.path, a);
    const auto b = io::read_peft_gralora_adapter(t.path);
    CHECK(b.config.alpha == doctest::Approx(0.6 * 5));
    CHECK(dwt::rel_err(dw::materialize(b.at("blocks.0.q").update()), dw::materialize(u1)) < 1e-6);
    CHECK(dwt::rel_err(dw::materialize(b.at("head").update()), dw::materialize(u2)) < 1e-6);
  }
  {
    const auto a = io::read_peft_unilora_adapter(dwio::fixtures() / "peft_unilora" / "adapter");
    io::peft_unilora_adapter w;
    for (const auto& m : a.modules()) w.add(m.name, a.update(m.name));
    const Eigen::VectorXf other = Eigen::VectorXf::Ones(50);
    dwt::check_throws_with<dw::argument_error>([&] { w.add("x", dw::unilora(a.modules()[0].pattern, other)); }, {"another θ"});
    dwio::temp_dir t;
    io::write_peft_unilora_adapter(t.path, w);
    const auto b = io::read_peft_unilora_adapter(t.path);
    REQUIRE(b.size() == 3);
    for (const auto& m : a.modules()) {
      CAPTURE(m.name);
      CHECK(b.find(m.name)->pattern->idx_B == m.pattern->idx_B);
      CHECK(dwt::rel_err(dw::materialize(b.update(m.name)), dw::materialize(a.update(m.name))) == 0.0);
    }
  }
}
