// SPDX-License-Identifier: MIT
// HiRA and DeLoRA adapters (issue 16): the directories saved by PEFT 0.21.2 itself
// (tests/fixtures/peft_hira with r = 3, peft_delora with r = 3, rank_pattern head: 2 and a
// lambda_pattern; tools/make_fixtures.py --only peftb) reproduce PEFT's per-layer and
// whole-model outputs within 1e-5 relative through read_peft and
// read_peft_structured_adapter; deltaw-written directories (per-module ranks as
// rank_pattern) read back to the same ΔW; merge / unmerge through any_peft_module;
// inconsistent inputs are specific errors.
#include <deltaw/io/peft_adapter.hpp>

#include <fstream>

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;

TEST_CASE("peft HiRA and DeLoRA reproduce PEFT 0.21.2") {
  {
    const dwio::peft_model_fixture m("peft_hira");
    CHECK(m.adapter.peft_type() == "HIRA");
    REQUIRE(m.adapter.size() == 3);
    for (const char* mod : dwio::peft_model_fixture::modules) {
      CAPTURE(mod);
      const auto& am = m.adapter.at(mod);
      CHECK(std::string(am.method()) == "HiRA");
      CHECK(am.reads_weight());
      const auto* h = am.get_if<io::peft_hira_module>();
      REQUIRE(h);
      CHECK(h->rank() == 3);
      const auto W = m.weights.matrix<float>(std::string(mod) + ".weight");
      CHECK(am.out_features() == W.view.rows());
      CHECK(am.in_features() == W.view.cols());
    }
    m.check_outputs_and_merge();
    CHECK(io::read_peft_structured_adapter(dwio::fixtures() / "peft_hira" / "adapter").config.r == 3);
  }
  {
    const dwio::peft_model_fixture m("peft_delora");
    CHECK(m.adapter.peft_type() == "DELORA");
    REQUIRE(m.adapter.size() == 3);
    for (const char* mod : dwio::peft_model_fixture::modules) {
      CAPTURE(mod);
      const auto& am = m.adapter.at(mod);
      CHECK(std::string(am.method()) == "DeLoRA");
      CHECK_FALSE(am.reads_weight());
      const auto* d = am.get_if<io::peft_delora_module>();
      REQUIRE(d);
      CHECK(d->rank() == (std::string(mod) == "head" ? 2 : 3));
      // delora_w_norm is the base weight's column norms (PEFT computed it at creation).
      const auto W = m.weights.matrix<float>(std::string(mod) + ".weight");
      const Eigen::VectorXd w = dw::delora_weight_norms(W.view);
      for (index_t j = 0; j < W.view.cols(); ++j) CHECK(double(d->w_norm.view[j]) == doctest::Approx(w[j]).epsilon(1e-6));
    }
    m.check_outputs_and_merge();
    const auto s = io::read_peft_structured_adapter(dwio::fixtures() / "peft_delora" / "adapter");
    CHECK(s.config.r == 3);
    CHECK(s.config.rank_for("head") == 2);
  }
}

TEST_CASE("peft HiRA and DeLoRA: deltaw writes, deltaw reads the same ΔW") {
  const MatF Wq = dwt::random<MatF>(24, 16, 1), Wv = dwt::random<MatF>(20, 24, 2), Wh = dwt::random<MatF>(8, 20, 3);
  const MatF Bq = dwt::random<MatF>(24, 3, 4), Aq = dwt::random<MatF>(3, 16, 5), Bv = dwt::random<MatF>(20, 3, 6),
             Av = dwt::random<MatF>(3, 24, 7), Bh = dwt::random<MatF>(8, 2, 8), Ah = dwt::random<MatF>(2, 20, 9);
  {
    io::peft_structured_adapter a;
    const auto uq = dw::hira(Wq, Bq, Aq), uv = dw::hira(Wv, Bv, Av), uh = dw::hira(Wh, Bh, Ah);
    a.add_hira("blocks.0.q", uq);
    a.add_hira("blocks.0.v", uv);
    a.add_hira("head", uh);
    dwio::temp_dir t;
    io::write_peft_structured_adapter(t.path, a);
    const auto b = io::read_peft(t.path);
    CHECK(b.peft_type() == "HIRA");
    CHECK(b.structured()->config.r == 3);
    CHECK(b.structured()->config.rank_for("head") == 2);
    CHECK(dwt::rel_err(b.at("blocks.0.q").update(Wq).materialize(), dw::materialize(uq)) < 1e-6);
    CHECK(dwt::rel_err(b.at("head").update(Wh).materialize(), dw::materialize(uh)) < 1e-6);
  }
  {
    io::peft_structured_adapter a;
    const Eigen::VectorXf l = Eigen::VectorXf::Constant(1, 3.5f);
    const Eigen::VectorXf wq = dw::delora_weight_norms(Wq).cast<float>(), wh = dw::delora_weight_norms(Wh).cast<float>();
    const auto uq = dw::delora(Bq, Aq, l, wq), uh = dw::delora(Bh, Ah, l, wh);
    a.add_delora("blocks.0.q", uq);
    a.add_delora("head", uh);
    dwio::temp_dir t;
    io::write_peft_structured_adapter(t.path, a);
    const auto b = io::read_peft(t.path);
    CHECK(b.peft_type() == "DELORA");
    CHECK(b.structured()->config.rank_for("head") == 2);
    CHECK(b.structured()->config.rank_for("blocks.0.q") == 3);
    CHECK(dwt::rel_err(b.at("blocks.0.q").update(Wq).materialize(), dw::materialize(uq)) < 1e-6);
    CHECK(dwt::rel_err(b.at("head").update(Wh).materialize(), dw::materialize(uh)) < 1e-6);
  }
  io::peft_structured_adapter c;
  c.add_hira("q", dw::hira(Wq, Bq, Aq));
  const Eigen::VectorXf l = Eigen::VectorXf::Ones(1), w = Eigen::VectorXf::Ones(16);
  dwt::check_throws_with<dw::argument_error>([&] { c.add_delora("v", dw::delora(Bq, Aq, l, w)); },
                                             {"cannot add a DELORA module", "HIRA adapter"});
}

TEST_CASE("peft HiRA and DeLoRA: inconsistent inputs are specific errors") {
  dwio::temp_dir tmp;
  auto write = [&](const std::string& config, io::safetensors_writer& w) {
    std::filesystem::create_directories(tmp.path);
    std::ofstream(tmp.path / "adapter_config.json") << config;
    w.write(tmp.path / "adapter_model.safetensors");
  };
  const MatF A = dwt::random<MatF>(2, 5, 1), B = dwt::random<MatF>(3, 2, 2);
  {
    io::safetensors_writer w;
    w.add("base_model.model.q.hira_A", dw::view(A));
    w.add("base_model.model.q.hira_B", dw::view(B));
    write(R"({"peft_type": "HIRA", "r": 3, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"hira_A [2, 5]", "r = 3"});
    write(R"({"peft_type": "HIRA", "r": 3, "rank_pattern": {"q": 2}, "target_modules": ["q"]})", w);
    const auto a = io::read_peft(tmp.path);
    dwt::check_throws_with<dw::shape_error>([&] { (void)a.at("q").update(MatF(dwt::random<MatF>(3, 4, 1))); },
                                            {"hira_A [r, 5]"});
  }
  {
    io::safetensors_writer w;
    w.add("base_model.model.q.hira_A", dw::view(A));
    write(R"({"peft_type": "HIRA", "r": 2, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"lacks hira_B"});
  }
  {
    const Eigen::VectorXf l = Eigen::VectorXf::Ones(1), w4 = Eigen::VectorXf::Ones(4);
    io::safetensors_writer w;
    w.add("base_model.model.q.delora_A", dw::view(A));
    w.add("base_model.model.q.delora_B", dw::view(B));
    w.add("base_model.model.q.delora_lambda", dw::vector_view<const float>(l.data(), 1));
    w.add("base_model.model.q.delora_w_norm", dw::vector_view<const float>(w4.data(), 4));
    write(R"({"peft_type": "DELORA", "r": 2, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"delora_w_norm [4]", "[in] = [5]"});
  }
  {
    io::safetensors_writer w;
    w.add("base_model.model.q.delora_A", dw::view(A));
    w.add("base_model.model.q.delora_B", dw::view(B));
    write(R"({"peft_type": "DELORA", "r": 2, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"lacks delora_lambda"});
  }
}
