// SPDX-License-Identifier: MIT
// RoAd adapters (issue 16): directories saved by PEFT 0.21.2 itself (tests/fixtures/
// peft_road (road_2), peft_road_1, peft_road_4, group_size 4, tools/make_fixtures.py --only
// peftb) reproduce PEFT's per-layer and whole-model outputs within 1e-5 relative (bias rotated
// as PEFT does) through read_peft and read_peft_structured_adapter; deltaw-written directories
// read back to the same ΔW; merge / unmerge through any_peft_module; inconsistent inputs are
// specific errors.
#include <deltaw/io/peft_adapter.hpp>

#include <fstream>

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;

TEST_CASE("peft RoAd (road_1, road_2, road_4) reproduces PEFT 0.21.2") {
  const std::pair<const char*, dw::road_variant> cases[] = {{"peft_road_1", dw::road_variant::road_1},
                                                           {"peft_road", dw::road_variant::road_2},
                                                           {"peft_road_4", dw::road_variant::road_4}};
  for (const auto& [name, v] : cases) {
    CAPTURE(name);
    const dwio::peft_model_fixture m(name);
    CHECK(m.adapter.peft_type() == "ROAD");
    REQUIRE(m.adapter.size() == 3);
    for (const char* mod : dwio::peft_model_fixture::modules) {
      CAPTURE(mod);
      const auto& am = m.adapter.at(mod);
      CHECK(std::string(am.method()) == "RoAd");
      CHECK(am.reads_weight());
      const auto* r = am.get_if<io::peft_road_module>();
      REQUIRE(r);
      CHECK(r->variant == v);
      CHECK(r->group_size == 4);
      const auto W = m.weights.matrix<float>(std::string(mod) + ".weight");
      CHECK(am.out_features() == W.view.rows());
    }
    m.check_outputs_and_merge();
    const auto s = io::read_peft_structured_adapter(dwio::fixtures() / name / "adapter");
    CHECK(s.config.road == v);
    CHECK(s.config.group_size == 4);
  }
}

TEST_CASE("peft RoAd: deltaw writes, deltaw reads the same ΔW") {
  const MatF Wq = dwt::random<MatF>(24, 16, 1), Wv = dwt::random<MatF>(20, 24, 2);
  for (auto v : {dw::road_variant::road_1, dw::road_variant::road_4}) {
    CAPTURE(dw::road_variant_name(v));
    io::peft_structured_adapter a;
    const Eigen::VectorXf tq = dwt::random<MatF>(dw::road_parameter_size(v, 24), 1, 3).col(0);
    const Eigen::VectorXf aq = dwt::random<MatF>(dw::road_parameter_size(v, 24), 1, 4).col(0);
    const Eigen::VectorXf tv = dwt::random<MatF>(dw::road_parameter_size(v, 20), 1, 5).col(0);
    const Eigen::VectorXf av = dwt::random<MatF>(dw::road_parameter_size(v, 20), 1, 6).col(0);
    const auto uq = dw::road(Wq, tq, aq, v, 4);
    const auto uv = dw::road(Wv, tv, av, v, 4);
    a.add_road("blocks.0.q", uq);
    a.add_road("blocks.0.v", uv);
    dwio::temp_dir t;
    io::write_peft_structured_adapter(t.path, a);
    const auto b = io::read_peft(t.path);
    CHECK(b.peft_type() == "ROAD");
    CHECK(b.structured()->config.road == v);
    CHECK(b.structured()->config.group_size == 4);
    CHECK(dwt::rel_err(b.at("blocks.0.q").update(Wq).materialize(), dw::materialize(uq)) < 1e-6);
    CHECK(dwt::rel_err(b.at("blocks.0.v").update(Wv).materialize(), dw::materialize(uv)) < 1e-6);
    const std::string text = [&] {
      std::ifstream in(t.path / "adapter_config.json");
      return std::string(std::istreambuf_iterator<char>(in), {});
    }();
    CHECK(text.find("\"r\"") == std::string::npos);  // RoadConfig has no r
  }
  io::peft_structured_adapter c;
  const Eigen::VectorXf t24 = Eigen::VectorXf::Ones(24), t20 = Eigen::VectorXf::Ones(20);
  c.add_road("q", dw::road(Wq, t24, t24, dw::road_variant::road_2, 4));
  dwt::check_throws_with<dw::argument_error>([&] { c.add_road("v", dw::road(Wv, t20, t20, dw::road_variant::road_2, 2)); },
                                             {"\"v\" is road_2 with group_size 2", "one variant and one group_size"});
}

TEST_CASE("peft RoAd: inconsistent inputs are specific errors") {
  dwio::temp_dir tmp;
  auto write = [&](const std::string& config, io::safetensors_writer& w) {
    std::filesystem::create_directories(tmp.path);
    std::ofstream(tmp.path / "adapter_config.json") << config;
    w.write(tmp.path / "adapter_model.safetensors");
  };
  const Eigen::VectorXf v6 = Eigen::VectorXf::Ones(6), v5 = Eigen::VectorXf::Ones(5);
  io::safetensors_writer w;
  w.add("base_model.model.q.road_theta", dw::vector_view<const float>(v6.data(), 6));
  w.add("base_model.model.q.road_alpha", dw::vector_view<const float>(v6.data(), 6));
  write(R"({"peft_type": "ROAD", "variant": "road_2", "group_size": 2, "target_modules": ["q"]})", w);
  const auto a = io::read_peft(tmp.path);
  CHECK(a.at("q").out_features() == 6);
  dwt::check_throws_with<dw::shape_error>([&] { (void)a.at("q").update(MatF(dwt::random<MatF>(4, 3, 1))); },
                                          {"road_theta [6] (road_2) needs out = 6"});
  write(R"({"peft_type": "ROAD", "variant": "road_3", "group_size": 2, "target_modules": ["q"]})", w);
  dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"\"variant\" must be"});
  write(R"({"peft_type": "ROAD", "variant": "road_2", "group_size": 3, "target_modules": ["q"]})", w);
  dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"\"group_size\" must be even"});
  write(R"({"peft_type": "ROAD", "variant": "road_4", "group_size": 2, "target_modules": ["q"]})", w);
  const auto a4 = io::read_peft(tmp.path);  // 6 = 2·out for out = 3: not a multiple of the group size
  dwt::check_throws_with<dw::shape_error>([&] { (void)a4.at("q").update(MatF(dwt::random<MatF>(3, 3, 1))); },
                                          {"multiple of group_size 2"});
  io::safetensors_writer w2;
  w2.add("base_model.model.q.road_theta", dw::vector_view<const float>(v6.data(), 6));
  w2.add("base_model.model.q.road_alpha", dw::vector_view<const float>(v5.data(), 5));
  write(R"({"peft_type": "ROAD", "variant": "road_2", "group_size": 2, "target_modules": ["q"]})", w2);
  dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"do not fit road_2"});
  io::safetensors_writer w3;
  w3.add("base_model.model.q.road_theta", dw::vector_view<const float>(v6.data(), 6));
  write(R"({"peft_type": "ROAD", "variant": "road_2", "group_size": 2, "target_modules": ["q"]})", w3);
  dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"lacks road_alpha"});
}
