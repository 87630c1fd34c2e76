// SPDX-License-Identifier: MIT
// HRA adapters (issue 16): directories saved by PEFT 0.21.2 itself (tests/fixtures/peft_hra
// and peft_hra_gs, tools/make_fixtures.py --only hra) reproduce PEFT's per-layer and
// whole-model outputs within 1e-5 relative through read_peft (any_peft_module) and
// read_peft_structured_adapter; deltaw-written directories read back to the same ΔW; merge /
// unmerge through any_peft_module; inconsistent inputs are specific errors.
#include <deltaw/io/peft_adapter.hpp>

#include <fstream>

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;

namespace {

void check_hra_fixture(const std::string& name, bool gs, Eigen::Index r) {
  CAPTURE(name);
  const dwio::peft_model_fixture m(name);
  CHECK(m.adapter.peft_type() == "HRA");
  REQUIRE(m.adapter.size() == 3);
  for (const char* mod : dwio::peft_model_fixture::modules) {
    CAPTURE(mod);
    const auto& am = m.adapter.at(mod);
    CHECK(std::string(am.method()) == "HRA");
    CHECK(am.reads_weight());
    const auto* h = am.get_if<io::peft_hra_module>();
    REQUIRE(h);
    CHECK(h->options.gram_schmidt == gs);
    CHECK(h->U.view.cols() == r);
    CHECK(am.in_features() == h->U.view.rows());
  }
  m.check_outputs_and_merge();
  // The same modules through read_peft_structured_adapter.
  const auto s = io::read_peft_structured_adapter(dwio::fixtures() / name / "adapter");
  CHECK(s.config.r == r);
  CHECK(s.config.hra.gram_schmidt == gs);
  const auto W = m.weights.matrix<float>("head.weight");
  s.visit("head", W.view, [&](const auto& u) {
    const MatD X = dwio::load_matd(m.io, "x.head");
    const MatD Y = dwio::load_matd(m.io, "y.head");
    const std::vector<double> b = m.weights.values<double>("head.bias");
    MatD Z = dw::apply(dw::view(W.view) + u, MatF(X.cast<float>())).template cast<double>();
    for (Eigen::Index i = 0; i < Z.rows(); ++i)
      for (Eigen::Index j = 0; j < Z.cols(); ++j) Z(i, j) += b[std::size_t(j)];
    CHECK(dwt::rel_err(Z, Y) < 1e-5);
  });
}

}  // namespace

TEST_CASE("peft HRA (plain product of reflections, Gram–Schmidt) reproduces PEFT 0.21.2") {
  check_hra_fixture("peft_hra", false, 3);
  check_hra_fixture("peft_hra_gs", true, 4);
}

TEST_CASE("peft HRA: deltaw writes, deltaw reads the same ΔW") {
  const MatF Wq = dwt::random<MatF>(24, 16, 1), Wv = dwt::random<MatF>(20, 24, 2);
  for (bool gs : {false, true}) {
    CAPTURE(gs);
    io::peft_structured_adapter a;
    const auto uq = dw::hra(Wq, dwt::random<MatF>(16, 3, 3), dw::hra_options{gs});
    const auto uv = dw::hra(Wv, dwt::random<MatF>(24, 3, 4), dw::hra_options{gs});
    a.add_hra("blocks.0.q", uq);
    a.add_hra("blocks.0.v", uv);
    dwio::temp_dir t;
    io::write_peft_structured_adapter(t.path, a);
    const auto b = io::read_peft(t.path);
    CHECK(b.peft_type() == "HRA");
    CHECK(b.structured()->config.r == 3);
    CHECK(b.structured()->config.hra.gram_schmidt == gs);
    CHECK(dwt::rel_err(b.at("blocks.0.q").update(Wq).materialize(), dw::materialize(uq)) < 1e-6);
    CHECK(dwt::rel_err(b.at("blocks.0.v").update(Wv).materialize(), dw::materialize(uv)) < 1e-6);
  }
  io::peft_structured_adapter c;
  c.add_hra("q", dw::hra(Wq, dwt::random<MatF>(16, 3, 5)));
  dwt::check_throws_with<dw::argument_error>([&] { c.add_hra("v", dw::hra(Wv, dwt::random<MatF>(24, 2, 6))); },
                                             {"\"v\" has r = 2", "one r and one apply_GS"});
  dwt::check_throws_with<dw::argument_error>(
      [&] { c.add_hra("v", dw::hra(Wv, dwt::random<MatF>(24, 3, 6), dw::hra_options{true})); }, {"with Gram–Schmidt"});
}

TEST_CASE("peft HRA: inconsistent inputs are specific errors") {
  dwio::temp_dir tmp;
  auto write = [&](const std::string& config, io::safetensors_writer& w) {
    std::filesystem::create_directories(tmp.path);
    std::ofstream(tmp.path / "adapter_config.json") << config;
    w.write(tmp.path / "adapter_model.safetensors");
  };
  MatF U = dwt::random<MatF>(6, 2, 1);
  {
    io::safetensors_writer w;
    w.add("base_model.model.q.hra_u", dw::view(U));
    write(R"({"peft_type": "HRA", "r": 3, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"module \"q\"", "hra_u [6, 2]", "r = 3"});
    write(R"({"peft_type": "HRA", "r": 2, "apply_GS": "yes", "target_modules": ["q"]})", w);
    CHECK_THROWS_AS((void)io::read_peft(tmp.path), dw::format_error);
    write(R"({"peft_type": "HRA", "r": 2, "rank_pattern": {"q": 4}, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::unsupported_error>([&] { (void)io::read_peft(tmp.path); }, {"rank_pattern"});
    write(R"({"peft_type": "HRA", "r": 2, "target_modules": ["q"]})", w);
    const auto a = io::read_peft(tmp.path);
    const MatF W = dwt::random<MatF>(3, 5, 1);
    dwt::check_throws_with<dw::shape_error>([&] { (void)a.at("q").update(W); }, {"hra_u [6, 2] is [in, r]"});
    CHECK(a.match({{"q.weight", {3, 6}}}).size() == 1);
  }
  {
    U.col(1).setZero();  // PEFT would divide by zero
    io::safetensors_writer w;
    w.add("base_model.model.q.hra_u", dw::view(U));
    write(R"({"peft_type": "HRA", "r": 2, "target_modules": ["q"]})", w);
    const auto a = io::read_peft(tmp.path);
    const MatF W = dwt::random<MatF>(3, 6, 1);
    dwt::check_throws_with<dw::argument_error>([&] { (void)a.at("q").update(W); }, {"column 1 of U (hra_u)"});
  }
}
