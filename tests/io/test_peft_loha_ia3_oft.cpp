// SPDX-License-Identifier: MIT
// LoHa, IA³ and OFT adapters (issue 16): directories saved by PEFT 0.21.2 itself
// (tests/fixtures/peft_{loha,ia3,oft,oft_cayley,oft_share}, tools/make_fixtures.py --only
// issue16) reproduce PEFT's per-layer and whole-model outputs within 1e-5 relative, through
// read_peft_structured_adapter and through read_peft (any_peft_module); deltaw-written
// directories read back to the same ΔW; merge / unmerge through any_peft_module; the
// unsupported and inconsistent inputs are specific errors.
#include <deltaw/io/peft_adapter.hpp>

#include <fstream>

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;

namespace {

void loha_check_fixture(const std::string& name, const std::string& type, const char* method) {
  CAPTURE(name);
  const dwio::peft_model_fixture m(name);
  CHECK(m.adapter.peft_type() == type);
  REQUIRE(m.adapter.size() == 3);
  for (const char* mod : dwio::peft_model_fixture::modules) CHECK(std::string(m.adapter.at(mod).method()) == method);
  m.check_outputs_and_merge();
}

}  // namespace

TEST_CASE("peft LoHa (rank / alpha patterns) reproduces PEFT 0.21.2") {
  loha_check_fixture("peft_loha", "LOHA", "LoHa");
  const dwio::peft_model_fixture m("peft_loha");
  const auto& h = *m.adapter.at("head").get_if<io::peft_loha_module>();
  CHECK(h.rank == 2);
  CHECK(h.scale == doctest::Approx(5.0 / 2));
  CHECK(m.adapter.at("blocks.0.v").get_if<io::peft_loha_module>()->scale == doctest::Approx(4.0 / 3));
  CHECK(m.adapter.at("head").out_features() == 8);
  CHECK(m.adapter.at("head").in_features() == 20);
}

TEST_CASE("peft IA3 (output scaling with the bias, feed-forward input scaling) reproduces PEFT 0.21.2") {
  loha_check_fixture("peft_ia3", "IA3", "IA3");
  const dwio::peft_model_fixture m("peft_ia3");
  CHECK(m.adapter.at("blocks.0.v").get_if<io::peft_ia3_module>()->side == dw::ia3_side::input);
  CHECK(m.adapter.at("blocks.0.q").get_if<io::peft_ia3_module>()->side == dw::ia3_side::output);
  CHECK(m.adapter.at("blocks.0.v").in_features() == 24);
  CHECK(m.adapter.at("blocks.0.q").reads_weight());
}

TEST_CASE("peft OFT (Cayley–Neumann, exact Cayley with COFT, block_share) reproduces PEFT 0.21.2") {
  loha_check_fixture("peft_oft", "OFT", "OFT");
  loha_check_fixture("peft_oft_cayley", "OFT", "OFT");
  loha_check_fixture("peft_oft_share", "OFT", "OFT");
  const dwio::peft_model_fixture c("peft_oft_cayley");
  CHECK(c.adapter.at("blocks.0.v").get_if<io::peft_oft_module>()->block() == 12);
  CHECK_FALSE(c.adapter.at("blocks.0.v").get_if<io::peft_oft_module>()->options.cayley_neumann);
  const dwio::peft_model_fixture s("peft_oft_share");
  CHECK(s.adapter.at("head").get_if<io::peft_oft_module>()->options.neumann_terms == 3);
  const auto W = s.weights.matrix<float>("head.weight");
  const auto u = s.adapter.at("head").update(W.view);
  CHECK(std::get<dw::oft_update<float, float>>(u.get()).shared());
}

TEST_CASE("peft LoHa / IA3 / OFT: deltaw writes, deltaw reads the same ΔW") {
  dwio::temp_dir tmp;
  const MatF Wq = dwt::random<MatF>(24, 16, 1), Wv = dwt::random<MatF>(20, 24, 2);
  SUBCASE("LoHa with per-module rank and alpha") {
    io::peft_structured_adapter a;
    const auto uq = dw::loha(dwt::random<MatF>(24, 3, 3), dwt::random<MatF>(3, 16, 4), dwt::random<MatF>(24, 3, 5),
                             dwt::random<MatF>(3, 16, 6), dw::alpha(5));
    const auto uv = dw::loha(dwt::random<MatF>(20, 2, 7), dwt::random<MatF>(2, 24, 8), dwt::random<MatF>(20, 2, 9),
                             dwt::random<MatF>(2, 24, 10), dw::alpha(3));
    a.add_loha("blocks.0.q", uq);
    a.add_loha("blocks.0.v", uv);
    io::write_peft_structured_adapter(tmp.path, a);
    const auto b = io::read_peft(tmp.path);
    CHECK(b.peft_type() == "LOHA");
    CHECK(dwt::rel_err(b.at("blocks.0.q").update(Wq).materialize(), dw::materialize(uq)) < 1e-6);
    CHECK(dwt::rel_err(b.at("blocks.0.v").update(Wv).materialize(), dw::materialize(uv)) < 1e-6);
    io::peft_structured_adapter c;
    dwt::check_throws_with<dw::rank_error>(
        [&] {
          c.add_loha("x", dw::loha(dwt::random<MatF>(4, 2, 1), dwt::random<MatF>(2, 5, 2), dwt::random<MatF>(4, 1, 3),
                                   dwt::random<MatF>(1, 5, 4)));
        },
        {"one rank"});
  }
  SUBCASE("IA3: output and input scaling") {
    io::peft_structured_adapter a;
    const Eigen::VectorXf lq = Eigen::VectorXf::Random(24), lv = Eigen::VectorXf::Random(24);
    const auto uq = dw::ia3(Wq, lq, dw::ia3_side::output);
    const auto uv = dw::ia3(Wv, lv, dw::ia3_side::input);
    a.add_ia3("blocks.0.q", uq);
    a.add_ia3("blocks.0.v", uv);
    io::write_peft_structured_adapter(tmp.path, a);
    const auto b = io::read_peft(tmp.path);
    CHECK(b.structured()->config.feedforward_modules == std::vector<std::string>{"blocks.0.v"});
    CHECK(dwt::rel_err(b.at("blocks.0.q").update(Wq).materialize(), dw::materialize(uq)) < 1e-6);
    CHECK(dwt::rel_err(b.at("blocks.0.v").update(Wv).materialize(), dw::materialize(uv)) < 1e-6);
    // An output module whose name ends with an input module's name would be misread by PEFT.
    io::peft_structured_adapter c;
    c.add_ia3("v", dw::ia3(Wv, lv, dw::ia3_side::input));
    c.add_ia3("blocks.0.v", dw::ia3(Wv, Eigen::VectorXf::Random(20).eval(), dw::ia3_side::output));
    dwio::temp_dir t2;
    dwt::check_throws_with<dw::argument_error>([&] { io::write_peft_structured_adapter(t2.path, c); },
                                               {"feedforward_modules", "blocks.0.v"});
  }
  SUBCASE("OFT: one block size, or one block count") {
    for (int variant = 0; variant < 2; ++variant) {
      io::peft_structured_adapter a;
      const dw::oft_options o{variant == 0, 4};
      // variant 0: b = 4 for both (4 and 6 blocks); variant 1: 2 blocks each (b = 8 and 12).
      const MatF Qq = 0.3f * dwt::random<MatF>(variant == 0 ? 4 : 2, variant == 0 ? 6 : 28, 11);
      const MatF Qv = 0.3f * dwt::random<MatF>(variant == 0 ? 6 : 2, variant == 0 ? 6 : 66, 12);
      const auto uq = dw::oft(Wq, Qq, o);
      const auto uv = dw::oft(Wv, Qv, o);
      a.add_oft("blocks.0.q", uq);
      a.add_oft("blocks.0.v", uv);
      dwio::temp_dir t;
      io::write_peft_structured_adapter(t.path, a);
      const auto b = io::read_peft(t.path);
      CHECK(b.structured()->config.oft_block_size == (variant == 0 ? 4 : 0));
      CHECK(b.structured()->config.r == (variant == 0 ? 0 : 2));
      CHECK(dwt::rel_err(b.at("blocks.0.q").update(Wq).materialize(), dw::materialize(uq)) < 1e-6);
      CHECK(dwt::rel_err(b.at("blocks.0.v").update(Wv).materialize(), dw::materialize(uv)) < 1e-6);
    }
    io::peft_structured_adapter c;
    c.add_oft("q", dw::oft(Wq, dwt::random<MatF>(4, 6, 1)));
    dwt::check_throws_with<dw::argument_error>([&] { c.add_oft("v", dw::oft(Wv, dwt::random<MatF>(6, 6, 1), {false, 5})); },
                                               {"rotation options"});
    c.add_oft("v", dw::oft(Wv, dwt::random<MatF>(2, 66, 1)));  // b = 12 and 2 blocks, q: b = 4 and 4 blocks
    dwio::temp_dir t3;
    dwt::check_throws_with<dw::argument_error>([&] { io::write_peft_structured_adapter(t3.path, c); },
                                               {"neither one block size nor one block count"});
  }
}

TEST_CASE("peft LoHa / IA3 / OFT: unsupported and inconsistent inputs are specific errors") {
  dwio::temp_dir tmp;
  auto write = [&](const std::string& config, io::safetensors_writer& w) {
    std::filesystem::create_directories(tmp.path);
    std::ofstream(tmp.path / "adapter_config.json") << config;
    w.write(tmp.path / "adapter_model.safetensors");
  };
  const MatF f4 = dwt::random<MatF>(4, 4, 1), f2 = dwt::random<MatF>(4, 2, 2), g2 = dwt::random<MatF>(2, 4, 3);
  {
    io::safetensors_writer w;
    w.add("base_model.model.q.hada_w1_a", dw::view(f2));
    w.add("base_model.model.q.hada_w1_b", dw::view(g2));
    w.add("base_model.model.q.hada_w2_a", dw::view(f2));
    w.add("base_model.model.q.hada_w2_b", dw::view(g2));
    w.add("base_model.model.q.hada_t1", dw::view(f4));
    write(R"({"peft_type": "LOHA", "r": 2, "alpha": 2, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::unsupported_error>([&] { (void)io::read_peft(tmp.path); }, {"Tucker core", "hada_t1"});
  }
  {
    io::safetensors_writer w;
    w.add("base_model.model.q.hada_w1_a", dw::view(f2));
    w.add("base_model.model.q.hada_w1_b", dw::view(g2));
    w.add("base_model.model.q.hada_w2_a", dw::view(f2));
    w.add("base_model.model.q.hada_w2_b", dw::view(g2));
    write(R"({"peft_type": "LOHA", "r": 3, "alpha": 2, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"module \"q\"", "r = 3"});
  }
  {
    io::safetensors_writer w;
    w.add("base_model.model.q.hada_w1_a", dw::view(f2));
    write(R"({"peft_type": "LOHA", "r": 2, "alpha": 2, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"lacks hada_w1_b"});
  }
  {
    io::safetensors_writer w;
    const MatF l = dwt::random<MatF>(1, 4, 4);
    w.add("base_model.model.q.ia3_l", dw::view(l));
    write(R"({"peft_type": "IA3", "target_modules": ["q"], "feedforward_modules": []})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"ia3_l is [1, 4]", "output"});
    write(R"({"peft_type": "IA3", "target_modules": ["q"], "feedforward_modules": ["q"], "fan_in_fan_out": true})", w);
    dwt::check_throws_with<dw::unsupported_error>([&] { (void)io::read_peft(tmp.path); }, {"fan_in_fan_out for IA3"});
    write(R"({"peft_type": "IA3", "target_modules": ["q"], "feedforward_modules": ["q"]})", w);
    const auto a = io::read_peft(tmp.path);
    const MatF W3 = dwt::random<MatF>(3, 5, 1);
    dwt::check_throws_with<dw::shape_error>([&] { (void)a.at("q").update(W3); }, {"ia3_l has 4 entries", "input"});
  }
  {
    io::safetensors_writer w;
    const MatF q = dwt::random<MatF>(2, 5, 5);  // 5 is no b(b − 1)/2
    w.add("base_model.model.q.oft_R.weight", dw::view(q));
    write(R"({"peft_type": "OFT", "r": 2, "oft_block_size": 0, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"oft_R.weight [2, 5]"});
    write(R"({"peft_type": "OFT", "r": 2, "oft_block_size": 4, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"exactly one of"});
  }
  {
    io::safetensors_writer w;
    const MatF q = dwt::random<MatF>(2, 6, 5);  // b = 4: in must be 8
    w.add("base_model.model.q.oft_R.weight", dw::view(q));
    write(R"({"peft_type": "OFT", "r": 2, "oft_block_size": 0, "target_modules": ["q"]})", w);
    const auto a = io::read_peft(tmp.path);
    const MatF W = dwt::random<MatF>(3, 12, 1);
    dwt::check_throws_with<dw::shape_error>([&] { (void)a.at("q").update(W); }, {"OFT", "blocks of 4"});
    CHECK(a.match({{"q.weight", {3, 8}}}).size() == 1);
  }
}
