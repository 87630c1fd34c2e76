// SPDX-License-Identifier: MIT
// BOFT and AdaLoRA adapters (issue 16): directories saved by PEFT 0.21.2 itself
// (tests/fixtures/peft_boft*, peft_adalora*; tools/make_fixtures.py --only boft_adalora)
// reproduce PEFT's per-layer and whole-model outputs within 1e-5 relative through read_peft:
// BOFT with m = 1 (what PEFT runs on a CPU, also when the config asks for more factors) and
// with 2 and 3 butterfly factors (PEFT's CUDA path); AdaLoRA with the rank_pattern PEFT's
// allocator wrote (one layer pruned to rank 0) and without, lora_alpha = 0. deltaw-written
// directories read back to the same ΔW; merge / unmerge through any_peft_module;
// inconsistent inputs are specific errors.
#include <deltaw/io/peft_adapter.hpp>

#include <fstream>

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;

namespace {

/// PEFT's outputs for every adapted module (lazy and dense paths), the whole model (an
/// unadapted layer is the plain Linear), and merge / unmerge round trips.
void boft_check_fixture(const std::string& name, const char* type, std::size_t n_modules) {
  CAPTURE(name);
  const auto weights = io::safetensors_file::open(dwio::fixtures() / name / "model.safetensors");
  const auto iof = io::safetensors_file::open(dwio::fixtures() / name / "io.safetensors");
  const auto a = io::read_peft(dwio::fixtures() / name / "adapter");
  CHECK(a.peft_type() == type);
  REQUIRE(a.size() == n_modules);
  auto linear = [&](const std::string& mod, const MatD& X, bool dense_path) {
    const auto W = weights.matrix<float>(mod + ".weight");
    const std::vector<double> b = weights.values<double>(mod + ".bias");
    const MatD Wd = Eigen::Map<const MatF>(W.view.data(), W.view.rows(), W.view.cols()).cast<double>();
    MatD Y;
    if (const auto* m = a.find(mod)) {
      if (dense_path) Y = X * (Wd + m->update(W.view).materialize().cast<double>()).transpose();
      else Y = m->apply(W.view, MatF(X.cast<float>())).cast<double>();
    } else {
      Y = X * Wd.transpose();
    }
    for (Eigen::Index i = 0; i < Y.rows(); ++i)
      for (Eigen::Index j = 0; j < Y.cols(); ++j) Y(i, j) += b[std::size_t(j)];
    return Y;
  };
  for (const char* mod : dwio::peft_model_fixture::modules) {
    if (!a.find(mod)) continue;
    CAPTURE(mod);
    const MatD X = dwio::load_matd(iof, std::string("x.") + mod), Y = dwio::load_matd(iof, std::string("y.") + mod);
    CHECK(dwt::rel_err(linear(mod, X, false), Y) < 1e-5);
    CHECK(dwt::rel_err(linear(mod, X, true), Y) < 1e-5);
    const auto Wf = weights.matrix<float>(std::string(mod) + ".weight");
    MatF W = Eigen::Map<const MatF>(Wf.view.data(), Wf.view.rows(), Wf.view.cols());
    const MatF W0 = W;
    const MatD Wp = W0.cast<double>() + a.at(mod).update(Wf.view).materialize().cast<double>();
    const auto u = a.at(mod).update(W);
    u.merge(W);
    CHECK(dwt::rel_err(W, Wp) < 1e-5);
    u.unmerge(W);
    CHECK(dwt::rel_err(W, W0) < 1e-5);
  }
  const MatD h1 = linear("blocks.0.q", dwio::load_matd(iof, "x"), false).cwiseMax(0.0);
  const MatD h2 = linear("blocks.0.v", h1, false).cwiseMax(0.0);
  CHECK(dwt::rel_err(linear("head", h2, false), dwio::load_matd(iof, "y")) < 1e-5);
}

}  // namespace

TEST_CASE("peft BOFT (m = 1 as PEFT runs on a CPU, 2 and 3 butterfly factors) reproduces PEFT 0.21.2") {
  boft_check_fixture("peft_boft", "BOFT", 3);
  boft_check_fixture("peft_boft_cpu_forced", "BOFT", 2);
  boft_check_fixture("peft_boft_butterfly", "BOFT", 2);
  boft_check_fixture("peft_boft_num", "BOFT", 2);
  const auto a = io::read_peft(dwio::fixtures() / "peft_boft_butterfly" / "adapter");
  const auto* m = a.at("blocks.0.v").get_if<io::peft_boft_module>();
  REQUIRE(m);
  CHECK(m->factors == 3);
  CHECK(m->blocks == 12);
  CHECK(m->block() == 2);
  CHECK(std::string(a.at("blocks.0.v").method()) == "BOFT");
  CHECK(a.at("blocks.0.v").reads_weight());
  CHECK(a.at("blocks.0.v").in_features() == 24);
  CHECK(a.at("blocks.0.v").out_features() == 20);
  // The config asks for 2 factors, PEFT on a CPU saved 1.
  const auto f = io::read_peft(dwio::fixtures() / "peft_boft_cpu_forced" / "adapter");
  CHECK(f.structured()->config.boft_n_butterfly_factor == 2);
  CHECK(f.at("blocks.0.q").get_if<io::peft_boft_module>()->factors == 1);
}

TEST_CASE("peft AdaLoRA (PEFT's rank_pattern, a layer pruned to rank 0; lora_alpha = 0) reproduces PEFT 0.21.2") {
  boft_check_fixture("peft_adalora", "ADALORA", 3);
  boft_check_fixture("peft_adalora_plain", "ADALORA", 3);
  const auto a = io::read_peft(dwio::fixtures() / "peft_adalora" / "adapter");
  const auto& c = a.structured()->config;
  CHECK(c.init_r == 4);
  CHECK(c.alpha == 6);
  REQUIRE(c.adalora_rank_pattern.size() == 3);
  const auto* q = a.at("blocks.0.q").get_if<io::peft_adalora_module>();
  REQUIRE(q);
  REQUIRE(q->mask);
  CHECK(q->rank() == std::count(q->mask->begin(), q->mask->end(), true));
  CHECK(q->scale == doctest::Approx(6 / (4 + 1e-5)).epsilon(1e-12));
  CHECK(std::string(a.at("head").method()) == "AdaLoRA");
  CHECK(a.at("head").get_if<io::peft_adalora_module>()->rank() == 0);
  const auto p = io::read_peft(dwio::fixtures() / "peft_adalora_plain" / "adapter");
  const auto* h = p.at("head").get_if<io::peft_adalora_module>();
  CHECK(h->scale == doctest::Approx(3 / (3 + 1e-5)).epsilon(1e-12));  // lora_alpha = 0: scaling = r
}

TEST_CASE("peft BOFT, AdaLoRA: deltaw writes, deltaw reads the same ΔW and config") {
  const MatF Wq = dwt::random<MatF>(24, 16, 1), Wv = dwt::random<MatF>(20, 24, 2);
  {
    io::peft_structured_adapter a;
    const Eigen::VectorXf sq = Eigen::VectorXf::Constant(24, 1.1f), sv = Eigen::VectorXf::Constant(20, 0.9f);
    const auto uq = dw::boft(Wq, MatF(0.3f * dwt::random<MatF>(2 * 16, 4, 3)), sq);
    const auto uv = dw::boft(Wv, MatF(0.3f * dwt::random<MatF>(2 * 24, 4, 4)), sv);
    a.add_boft("blocks.0.q", uq);
    a.add_boft("blocks.0.v", uv);
    dwio::temp_dir t;
    io::write_peft_structured_adapter(t.path, a);
    const auto b = io::read_peft(t.path);
    CHECK(b.peft_type() == "BOFT");
    CHECK(b.structured()->config.boft_block_size == 4);
    CHECK(b.structured()->config.boft_n_butterfly_factor == 2);
    CHECK(dwt::rel_err(b.at("blocks.0.q").update(Wq).materialize(), dw::materialize(uq)) < 1e-6);
    CHECK(dwt::rel_err(b.at("blocks.0.v").update(Wv).materialize(), dw::materialize(uv)) < 1e-6);
    io::peft_structured_adapter c;
    const Eigen::VectorXf one = Eigen::VectorXf::Ones(24);
    dwt::check_throws_with<dw::argument_error>(
        [&] { c.add_boft("q", dw::boft(Wq, MatF(dwt::random<MatF>(16, 4, 5)), one, dw::oft_options{true, 5})); },
        {"Cayley–Neumann"});
  }
  {
    io::peft_structured_adapter a;
    const MatF Bq = dwt::random<MatF>(24, 2, 6), Aq = dwt::random<MatF>(2, 16, 7), Bv = dwt::random<MatF>(20, 4, 8),
               Av = dwt::random<MatF>(4, 24, 9);
    const Eigen::VectorXf Eq = Eigen::VectorXf::Constant(2, 0.7f), Ev = Eigen::VectorXf::Constant(4, -0.4f);
    const auto uq = dw::adalora(Bq, Eq, Aq, dw::alpha(6), 4), uv = dw::adalora(Bv, Ev, Av, dw::alpha(6), 4);
    a.add_adalora("blocks.0.q", uq, 4, {false, true, false, true});
    a.add_adalora("blocks.0.v", uv, 4);
    dwio::temp_dir t;
    io::write_peft_structured_adapter(t.path, a);
    const auto b = io::read_peft(t.path);
    CHECK(b.peft_type() == "ADALORA");
    const auto& c = b.structured()->config;
    CHECK(c.init_r == 4);
    CHECK(c.alpha == 6);
    REQUIRE(c.adalora_rank_pattern.size() == 1);
    CHECK(c.adalora_rank_pattern[0].first == "blocks.0.q.lora_E");
    CHECK(c.adalora_rank_pattern[0].second == std::vector<bool>{false, true, false, true});
    CHECK(dwt::rel_err(b.at("blocks.0.q").update(Wq).materialize(), dw::materialize(uq)) < 1e-6);
    CHECK(dwt::rel_err(b.at("blocks.0.v").update(Wv).materialize(), dw::materialize(uv)) < 1e-6);
    dwt::check_throws_with<dw::argument_error>([&] { a.add_adalora("head", dw::adalora(Bq, Eq, Aq, dw::alpha(5), 4), 4); },
                                               {"lora_alpha", "one of each"});
    dwt::check_throws_with<dw::argument_error>([&] { a.add_adalora("h2", uq, 4, {true, true, true, false}); }, {"mask"});
    dwt::check_throws_with<dw::rank_error>([&] { a.add_adalora("h3", uv, 3); }, {"init_r = 3"});
  }
}

TEST_CASE("peft BOFT, AdaLoRA: inconsistent inputs are specific errors") {
  dwio::temp_dir tmp;
  auto write = [&](const std::string& config, io::safetensors_writer& w) {
    std::filesystem::create_directories(tmp.path);
    std::ofstream(tmp.path / "adapter_config.json") << config;
    w.write(tmp.path / "adapter_model.safetensors");
  };
  {
    std::vector<float> R(2 * 3 * 4 * 4, 0.1f), s(5, 1.0f);
    io::safetensors_writer w;
    w.add_raw("base_model.model.q.boft_R", io::st_dtype::F32, {2, 3, 4, 4}, std::as_bytes(std::span<const float>(R)));
    w.add_raw("base_model.model.q.boft_s", io::st_dtype::F32, {5, 1}, std::as_bytes(std::span<const float>(s)));
    write(R"({"peft_type": "BOFT", "boft_block_size": 4, "boft_n_butterfly_factor": 2, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"module \"q\"", "2^(m − 1)"});
    write(R"({"peft_type": "BOFT", "boft_block_size": 4, "boft_n_butterfly_factor": 3, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"boft_n_butterfly_factor is 3"});
    write(R"({"peft_type": "BOFT", "boft_block_size": 2, "boft_n_butterfly_factor": 2, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"boft_block_size = 2"});
    write(R"({"peft_type": "BOFT", "boft_block_size": 4, "boft_block_num": 3, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"exactly one of"});
  }
  {
    std::vector<float> R(1 * 3 * 4 * 4, 0.1f), s(5, 1.0f);
    io::safetensors_writer w;
    w.add_raw("base_model.model.q.boft_R", io::st_dtype::F32, {1, 3, 4, 4}, std::as_bytes(std::span<const float>(R)));
    w.add_raw("base_model.model.q.boft_s", io::st_dtype::F32, {5, 1}, std::as_bytes(std::span<const float>(s)));
    write(R"({"peft_type": "BOFT", "boft_block_size": 0, "boft_block_num": 3, "target_modules": ["q"]})", w);
    const auto a = io::read_peft(tmp.path);
    const MatF W = dwt::random<MatF>(5, 8, 1);
    dwt::check_throws_with<dw::shape_error>([&] { (void)a.at("q").update(W); }, {"rotates 12 input features"});
  }
  {
    const MatF A = dwt::random<MatF>(3, 6, 1), B = dwt::random<MatF>(4, 3, 2), E = dwt::random<MatF>(3, 1, 3);
    io::safetensors_writer w;
    w.add("base_model.model.q.lora_A", dw::view(A));
    w.add("base_model.model.q.lora_B", dw::view(B));
    w.add("base_model.model.q.lora_E", dw::view(E));
    write(R"({"peft_type": "ADALORA", "init_r": 4, "lora_alpha": 2, "total_step": 5, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"r = 3", "init_r is 4"});
    write(R"({"peft_type": "ADALORA", "init_r": 4, "rank_pattern": {"q.lora_E": [true, false, true, false]},
              "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"rank_pattern keeps 2"});
    write(R"({"peft_type": "ADALORA", "init_r": 4, "rank_pattern": {"q.lora_E": [true, false]}, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"init_r = 4"});
    write(R"({"peft_type": "ADALORA", "init_r": 4, "rank_pattern": {"q.lora_E": [true, true, false, true]},
              "target_modules": ["q"], "lora_alpha": 3})", w);
    const auto a = io::read_peft(tmp.path);
    const auto* m = a.at("q").get_if<io::peft_adalora_module>();
    REQUIRE(m);
    CHECK(m->scale == doctest::Approx(3 / (4 + 1e-5)).epsilon(1e-12));
    const MatF W = dwt::random<MatF>(4, 6, 5);
    const MatD dW = m->scale * B.cast<double>() * E.cast<double>().col(0).asDiagonal() * A.cast<double>();
    CHECK(dwt::rel_err(a.at("q").update(W).materialize(), dW) < 1e-6);
  }
}
