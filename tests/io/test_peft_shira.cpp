// SPDX-License-Identifier: MIT
// SHiRA adapters (issue 16): the directory saved by PEFT 0.21.2 itself (tests/fixtures/
// peft_shira, tools/make_fixtures.py --only peftb: random masks with r = 2, random values)
// reproduces PEFT's per-layer and whole-model outputs within 1e-5 relative through read_peft
// and read_peft_structured_adapter; deltaw-written directories read back to the same ΔW and
// the same bytes of shira_indices; merge / unmerge through any_peft_module; inconsistent
// inputs are specific errors.
#include <deltaw/io/peft_adapter.hpp>

#include <fstream>
#include <numeric>

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;

TEST_CASE("peft SHiRA reproduces PEFT 0.21.2") {
  const dwio::peft_model_fixture m("peft_shira");
  CHECK(m.adapter.peft_type() == "SHIRA");
  REQUIRE(m.adapter.size() == 3);
  const std::map<std::string, std::pair<index_t, index_t>> shapes{
      {"blocks.0.q", {24, 16}}, {"blocks.0.v", {20, 24}}, {"head", {8, 20}}};
  for (const char* mod : dwio::peft_model_fixture::modules) {
    CAPTURE(mod);
    const auto& am = m.adapter.at(mod);
    CHECK(std::string(am.method()) == "SHiRA");
    CHECK_FALSE(am.reads_weight());
    const auto* s = am.get_if<io::peft_shira_module>();
    REQUIRE(s);
    const auto [out, in] = shapes.at(mod);
    CHECK(index_t(s->rows.size()) == 2 * (out + in));  // r = 2
    CHECK(s->values.view.size() == 2 * (out + in));
    // ΔW has exactly the stored entries.
    const auto W = m.weights.matrix<float>(std::string(mod) + ".weight");
    const MatD D = am.update(W.view).materialize().cast<double>();
    index_t nz = 0;
    for (Eigen::Index i = 0; i < D.rows(); ++i)
      for (Eigen::Index j = 0; j < D.cols(); ++j) nz += D(i, j) != 0;
    CHECK(nz == index_t(s->rows.size()));
    for (std::size_t k = 0; k < s->rows.size(); ++k) CHECK(D(s->rows[k], s->cols[k]) == double(s->values.view[index_t(k)]));
    CHECK(am.layer_mismatch(out, in).empty());
    CHECK_FALSE((am.layer_mismatch(out - 1, in).empty() && am.layer_mismatch(out, in - 1).empty()));
  }
  m.check_outputs_and_merge();
  const auto s = io::read_peft_structured_adapter(dwio::fixtures() / "peft_shira" / "adapter");
  CHECK(s.config.r == 2);
  CHECK(s.config.raw.at("random_seed") == 3);
}

TEST_CASE("peft SHiRA: deltaw writes, deltaw reads the same ΔW and indices") {
  std::mt19937_64 g(3);
  auto pattern = [&](index_t out, index_t in, index_t r, std::vector<std::int32_t>& rows, std::vector<std::int32_t>& cols) {
    std::vector<index_t> all(std::size_t(out * in));
    std::iota(all.begin(), all.end(), index_t(0));
    std::shuffle(all.begin(), all.end(), g);
    for (index_t k = 0; k < r * (out + in); ++k) {
      rows.push_back(std::int32_t(all[std::size_t(k)] / in));
      cols.push_back(std::int32_t(all[std::size_t(k)] % in));
    }
  };
  std::vector<std::int32_t> rq, cq, rv, cv;
  pattern(24, 16, 3, rq, cq);
  pattern(20, 24, 3, rv, cv);
  const Eigen::VectorXf vq = dwt::random<MatF>(3 * 40, 1, 1).col(0), vv = dwt::random<MatF>(3 * 44, 1, 2).col(0);
  auto sp = [](const std::vector<std::int32_t>& x) { return std::span<const std::int32_t>(x); };
  const auto uq = dw::shira(24, 16, sp(rq), sp(cq), vq, dw::scale(0.5));  // the scale is folded into v
  const auto uv = dw::shira(20, 24, sp(rv), sp(cv), vv);
  io::peft_structured_adapter a;
  a.add_shira("blocks.0.q", uq);
  a.add_shira("blocks.0.v", uv);
  dwio::temp_dir t;
  io::write_peft_structured_adapter(t.path, a);
  const auto b = io::read_peft(t.path);
  CHECK(b.peft_type() == "SHIRA");
  CHECK(b.structured()->config.r == 3);
  const MatF Wq = dwt::random<MatF>(24, 16, 3), Wv = dwt::random<MatF>(20, 24, 4);
  CHECK(dwt::rel_err(b.at("blocks.0.q").update(Wq).materialize(), dw::materialize(uq)) < 1e-6);
  CHECK(dwt::rel_err(b.at("blocks.0.v").update(Wv).materialize(), dw::materialize(uv)) < 1e-6);
  const auto f = io::safetensors_file::open(t.path / "adapter_model.safetensors");
  const auto& ti = f.at("base_model.model.blocks.0.q.shira_indices");
  CHECK(ti.dtype == io::st_dtype::I32);
  CHECK(ti.shape == std::vector<std::uint64_t>{2, 120});
  const auto idx = f.values<double>(ti.name);
  for (std::size_t k = 0; k < rq.size(); ++k) {
    CHECK(idx[k] == rq[k]);
    CHECK(idx[rq.size() + k] == cq[k]);
  }
  // PEFT sizes shira_weight as r·(out + in) with one r.
  io::peft_structured_adapter c;
  c.add_shira("q", uq);
  std::vector<std::int32_t> r2, c2;
  pattern(20, 24, 2, r2, c2);
  const Eigen::VectorXf v2 = dwt::random<MatF>(2 * 44, 1, 5).col(0);
  dwt::check_throws_with<dw::argument_error>([&] { c.add_shira("v", dw::shira(20, 24, sp(r2), sp(c2), v2)); },
                                             {"\"v\" has 88 entries", "one r per adapter", "r = 3 so far"});
  r2.pop_back();
  c2.pop_back();
  const Eigen::VectorXf v3 = v2.head(87);
  io::peft_structured_adapter d;
  dwt::check_throws_with<dw::argument_error>([&] { d.add_shira("v", dw::shira(20, 24, sp(r2), sp(c2), v3)); },
                                             {"87 entries", "r·(out + in)"});
}

TEST_CASE("peft SHiRA: inconsistent inputs are specific errors") {
  dwio::temp_dir tmp;
  auto write = [&](const std::string& config, io::safetensors_writer& w) {
    std::filesystem::create_directories(tmp.path);
    std::ofstream(tmp.path / "adapter_config.json") << config;
    w.write(tmp.path / "adapter_model.safetensors");
  };
  const std::string cfg = R"({"peft_type": "SHIRA", "r": 1, "target_modules": ["q"]})";
  const MatF v = dwt::random<MatF>(1, 3, 1);
  auto indices = [](std::vector<std::int32_t> idx, std::uint64_t n, io::safetensors_writer& w) {
    w.add_raw("base_model.model.q.shira_indices", io::st_dtype::I32, {2, n},
              std::as_bytes(std::span<const std::int32_t>(idx)));
  };
  {
    io::safetensors_writer w;
    w.add("base_model.model.q.shira_weight", dw::vector_view<const float>(v.data(), 3));
    indices({0, 1, 2, 0, 1, 1}, 3, w);
    write(cfg, w);
    const auto a = io::read_peft(tmp.path);
    const MatF W = dwt::random<MatF>(3, 2, 1);
    CHECK(a.at("q").update(W).materialize()(1, 1) == doctest::Approx(double(v(0, 1))));
    dwt::check_throws_with<dw::shape_error>([&] { (void)a.at("q").update(MatF(dwt::random<MatF>(2, 2, 1))); },
                                            {"reach row 2"});
    dwt::check_throws_with<dw::shape_error>([&] { (void)a.match({{"q.weight", {3, 1}}}); }, {"column 1"});
    write(R"({"peft_type": "SHIRA", "r": 1, "fan_in_fan_out": true, "target_modules": ["q"]})", w);
    dwt::check_throws_with<dw::unsupported_error>([&] { (void)io::read_peft(tmp.path); }, {"fan_in_fan_out for SHIRA"});
  }
  {
    io::safetensors_writer w;
    w.add("base_model.model.q.shira_weight", dw::vector_view<const float>(v.data(), 3));
    indices({0, 1, 0, 0, 1, 0}, 3, w);  // (0, 0) twice
    write(cfg, w);
    const auto a = io::read_peft(tmp.path);
    dwt::check_throws_with<dw::argument_error>([&] { (void)a.at("q").update(MatF(dwt::random<MatF>(3, 2, 1))); },
                                               {"(0, 0) appears twice"});
  }
  {
    io::safetensors_writer w;
    w.add("base_model.model.q.shira_weight", dw::vector_view<const float>(v.data(), 3));
    indices({0, 1, 2, 0}, 2, w);
    write(cfg, w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"[nnz] and [2, nnz]"});
  }
  {
    io::safetensors_writer w;
    w.add("base_model.model.q.shira_weight", dw::vector_view<const float>(v.data(), 3));
    indices({0, -1, 2, 0, 1, 1}, 3, w);
    write(cfg, w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"shira_indices holds -1"});
  }
  {
    io::safetensors_writer w;
    w.add("base_model.model.q.shira_weight", dw::vector_view<const float>(v.data(), 3));
    write(cfg, w);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(tmp.path); }, {"lacks shira_indices"});
  }
}
