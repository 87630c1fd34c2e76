// SPDX-License-Identifier: MIT
// The unified PEFT reader (deltaw/io/peft_adapter.hpp): read_peft detects every type of the
// committed PEFT-written fixtures and its one module interface (update over W, apply,
// merge / unmerge) reproduces PEFT's own outputs; PEFT's named-adapter layout
// (tests/fixtures/peft_named, tests/io/make_peft_named_fixture.py) including a look-ahead
// target_modules regex; match / targets for every type; errors; and the all-or-nothing
// directory write of the structured writer (the LoRA writer's in test_peft.cpp).
#include <deltaw/io/peft_adapter.hpp>

#include <fstream>
#include <set>

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
namespace fs = std::filesystem;
using dwt::MatD;
using dwt::MatF;

namespace dwt {
template <class E, class F>
void check_throws_containing(F&& f, const std::string& fragment) {
  check_throws_with<E>(std::forward<F>(f), {fragment});
}
}  // namespace dwt

namespace {

MatD adapter_add_bias(MatD y, const std::vector<double>& b) {
  for (Eigen::Index i = 0; i < y.rows(); ++i)
    for (Eigen::Index j = 0; j < y.cols(); ++j) y(i, j) += b[std::size_t(j)];
  return y;
}

MatF weight_of(const io::safetensors_file& f, const std::string& module, bool transposed = false) {
  const auto W = f.matrix<float>(module + ".weight");
  MatF m = Eigen::Map<const MatF>(W.view.data(), W.view.rows(), W.view.cols());
  return transposed ? MatF(m.transpose()) : m;
}

// Every module of a PEFT-written fixture through the unified interface, three ways against
// PEFT's per-layer outputs: apply over W; merge into a copy of W then a plain product;
// unmerge restores W.
void adapter_check_fixture(const std::string& name, const std::string& type, const std::string& adapter_sub = "adapter",
                   const std::string& y_prefix = "y.") {
  CAPTURE(name);
  const fs::path dir = dwio::fixtures() / name;
  const auto w = io::safetensors_file::open(dir / "model.safetensors");
  const auto x = io::safetensors_file::open(dir / "io.safetensors");
  const auto a = io::read_peft(dir / adapter_sub);
  CHECK(a.peft_type() == type);
  CHECK(a.adapter_name() == "default");
  REQUIRE(a.size() >= 2);
  for (const auto& m : a.modules()) {
    CAPTURE(m.name());
    CHECK(a.find(m.name()) == &m);
    CHECK(a.for_weight(m.name() + ".weight") == &m);
    const MatF W0 = weight_of(w, m.name(), m.fan_in_fan_out());  // [out, in]
    if (m.out_features()) CHECK(*m.out_features() == W0.rows());
    if (m.in_features()) CHECK(*m.in_features() == W0.cols());
    CHECK(m.layer_mismatch(W0.rows(), W0.cols()).empty());
    const MatD X = dwio::load_matd(x, "x." + m.name());
    const MatD Y = dwio::load_matd(x, y_prefix + m.name());
    const auto b = w.values<double>(m.name() + ".bias");
    const auto u = m.update(W0);
    CHECK(u.module() == m.name());
    CHECK(dwt::rel_err(adapter_add_bias(u.apply(MatF(X.cast<float>())).cast<double>(), b), Y) < 1e-5);
    CHECK(dwt::rel_err(adapter_add_bias(m.apply(W0, MatF(X.cast<float>())).cast<double>(), b), Y) < 1e-5);
    // ΔW in double against the same outputs: an independent path through materialize().
    const MatD Wd = W0.cast<double>() + u.materialize().cast<double>();
    CHECK(dwt::rel_err(adapter_add_bias(X * Wd.transpose(), b), Y) < 1e-5);
    // merge / unmerge in place (DoRA and Bone bat read W: the update is built on W1 itself).
    MatF W1 = W0;
    const auto merged = m.merge(W1);
    CHECK(dwt::rel_err(adapter_add_bias(X * W1.cast<double>().transpose(), b), Y) < 1e-5);
    merged.unmerge(W1);
    CHECK(dwt::rel_err(W1.cast<double>(), W0.cast<double>()) < 1e-5);
    CHECK(m.reads_weight() == (std::string(m.method()) == "DoRA" || std::string(m.method()) == "Bone bat"));
  }
}

std::map<std::string, std::pair<index_t, index_t>> shapes_of(const io::safetensors_file& f) {
  std::map<std::string, std::pair<index_t, index_t>> out;
  for (const auto& t : f.tensors())
    if (t.shape.size() == 2) out[t.name] = {index_t(t.shape[0]), index_t(t.shape[1])};
  return out;
}

std::string bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}
std::set<std::string> entries(const fs::path& d) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(d)) out.insert(e.path().filename().string());
  return out;
}

}  // namespace

TEST_CASE("peft adapter: read_peft detects every type and its modules reproduce PEFT (apply, merge, unmerge)") {
  adapter_check_fixture("peft_lora", "LORA");
  adapter_check_fixture("peft_rslora", "LORA");
  adapter_check_fixture("peft_dora", "LORA");
  adapter_check_fixture("peft_fan_in_fan_out", "LORA");
  adapter_check_fixture("peft_lokr", "LOKR");
  adapter_check_fixture("peft_lokr_both", "LOKR");
  adapter_check_fixture("peft_lokr_dense", "LOKR");
  adapter_check_fixture("peft_miss", "MISS");
  adapter_check_fixture("peft_miss_mini", "MISS");
  adapter_check_fixture("peft_miss_bat", "MISS");
  adapter_check_fixture("peft_vera", "VERA");
  adapter_check_fixture("peft_randlora", "RANDLORA");
  adapter_check_fixture("peft_randlora_sparse", "RANDLORA");

  const auto a = io::read_peft(dwio::fixtures() / "peft_dora" / "adapter");
  CHECK(std::string(a.at("head").method()) == "DoRA");
  REQUIRE(a.lora() != nullptr);
  CHECK(a.structured() == nullptr);
  CHECK(a.lora()->config.use_dora);
  const auto bat = io::read_peft(dwio::fixtures() / "peft_miss_bat" / "adapter");
  CHECK(std::string(bat.at("head").method()) == "Bone bat");
  CHECK(bat.at("head").get_if<io::peft_miss_module>() != nullptr);
  CHECK_FALSE(bat.at("head").in_features().has_value());  // MiSS blocks do not record in
  const auto vera = io::read_peft(dwio::fixtures() / "peft_vera" / "adapter");
  CHECK_FALSE(vera.at("head").in_features().has_value());
  CHECK(vera.at("head").out_features() == 8);
}

TEST_CASE("peft adapter: PEFT's named-adapter layout, a look-ahead target_modules regex") {
  const fs::path dir = dwio::fixtures() / "peft_named";
  CHECK(io::list_peft_adapters(dir / "adapter") == std::vector<std::string>{"default", "second"});
  adapter_check_fixture("peft_named", "LORA", "adapter", "y.default.");

  const auto def = io::read_peft(dir / "adapter", "default");
  const auto second = io::read_peft(dir / "adapter", "second");
  CHECK(def.adapter_name() == "default");
  CHECK(second.adapter_name() == "second");
  CHECK(def.size() == 2);
  REQUIRE(second.size() == 2);
  CHECK(std::string(second.at("blocks.0.q").method()) == "DoRA");
  // The look-ahead regex: read anyway (modules from the tensor names), only targets() refuses.
  REQUIRE(second.lora()->config.target_modules_regex.has_value());
  CHECK(*second.lora()->config.target_modules_regex == "^(?!.*head).*\\.(q|v)$");
  CHECK_FALSE(second.lora()->config.target_modules_unsupported.empty());
  dwt::check_throws_containing<dw::unsupported_error>([&] { (void)second.targets("blocks.0.q"); },
                                                      "cannot be evaluated");
  CHECK(def.targets("blocks.0.q"));
  CHECK(def.targets("blocks.7.v"));
  CHECK_FALSE(def.targets("head"));

  // The second adapter against PEFT's outputs with it active, layer by layer and whole.
  const auto w = io::safetensors_file::open(dir / "model.safetensors");
  const auto x = io::safetensors_file::open(dir / "io.safetensors");
  for (const auto& m : second.modules()) {
    CAPTURE(m.name());
    const MatF W = weight_of(w, m.name());
    const MatD X = dwio::load_matd(x, "x." + m.name());
    CHECK(dwt::rel_err(adapter_add_bias(m.apply(W, MatF(X.cast<float>())).cast<double>(), w.values<double>(m.name() + ".bias")),
                       dwio::load_matd(x, "y.second." + m.name())) < 1e-5);
  }
  auto layer = [&](const io::any_peft_adapter& a, const std::string& mod, const MatF& h) {
    const MatF W = weight_of(w, mod);
    MatF y = a.find(mod) ? MatF(a.at(mod).apply(W, h)) : MatF(h * W.transpose());
    const auto b = w.values<float>(mod + ".bias");
    for (Eigen::Index i = 0; i < y.rows(); ++i)
      for (Eigen::Index j = 0; j < y.cols(); ++j) y(i, j) += b[std::size_t(j)];
    return y;
  };
  for (const auto* a : {&def, &second}) {
    const MatF h1 = layer(*a, "blocks.0.q", MatF(dwio::load_matd(x, "x").cast<float>())).cwiseMax(0.0f);
    const MatF h2 = layer(*a, "blocks.0.v", h1).cwiseMax(0.0f);
    CHECK(dwt::rel_err(layer(*a, "head", h2).cast<double>(), dwio::load_matd(x, "y." + a->adapter_name())) < 1e-5);
  }
}

TEST_CASE("peft adapter: match and targets for every type; errors name the module, the file, the adapter") {
  for (const std::string name : {"peft_lora", "peft_lokr", "peft_miss", "peft_miss_mini", "peft_miss_bat", "peft_vera",
                           "peft_randlora", "peft_fan_in_fan_out"}) {
    CAPTURE(name);
    const auto a = io::read_peft(dwio::fixtures() / name / "adapter");
    const auto w = io::safetensors_file::open(dwio::fixtures() / name / "model.safetensors");
    auto shapes = shapes_of(w);
    const auto pairs = a.match(shapes);
    CHECK(pairs.size() == a.size());
    for (const auto& m : a.modules()) {
      CHECK(pairs.at(m.name()) == m.name() + ".weight");
      CHECK(a.targets(m.name()));  // the fixtures' target_modules ("q", "v", "head", …)
    }
    // A missing weight is a format_error, a wrong shape a shape_error naming the module.
    const std::string first = a.modules().front().name();
    auto missing = shapes;
    missing.erase(first + ".weight");
    dwt::check_throws_containing<dw::format_error>([&] { (void)a.match(missing); }, first);
    auto wrong = shapes;
    wrong[first + ".weight"].first += 1;  // breaks every type (mini: out % mini_r, mini_r = 4)
    wrong[first + ".weight"].second += 1;
    dwt::check_throws_containing<dw::shape_error>([&] { (void)a.match(wrong); }, first);
    // update() over a weight that does not fit.
    const MatF bad = MatF::Zero(wrong[first + ".weight"].first, wrong[first + ".weight"].second);
    dwt::check_throws_containing<dw::shape_error>([&] { (void)a.at(first).update(bad); }, "does not fit W");
  }
  // fan_in_fan_out: update() takes [out, in]; the stored [in, out] weight gets a hint.
  const auto f = io::read_peft(dwio::fixtures() / "peft_fan_in_fan_out" / "adapter");
  const auto& m = f.at("c_attn");
  CHECK(m.fan_in_fan_out());
  const MatF stored = MatF::Zero(*m.in_features(), *m.out_features());
  dwt::check_throws_containing<dw::shape_error>([&] { (void)m.update(stored); }, "transpose view");
  CHECK_NOTHROW((void)m.update(dw::view(stored).transpose()));

  // DoRA / Bone bat merge only into the weight the update was built on.
  const auto d = io::read_peft(dwio::fixtures() / "peft_dora" / "adapter");
  const auto wd = io::safetensors_file::open(dwio::fixtures() / "peft_dora" / "model.safetensors");
  const MatF W = weight_of(wd, "head");
  MatF other = W;
  const auto u = d.at("head").update(W);
  dwt::check_throws_containing<dw::argument_error>([&] { u.merge(other); }, "merges only into the weight");

  // Names and directories.
  dwt::check_throws_containing<dw::argument_error>(
      [&] { (void)io::read_peft(dwio::fixtures() / "peft_named" / "adapter", "../peft_lora"); }, "single directory name");
  dwt::check_throws_containing<dw::argument_error>(
      [&] { (void)io::read_peft(dwio::fixtures() / "peft_named" / "adapter", "a/b"); }, "single directory name");
  dwt::check_throws_containing<dw::io_error>(
      [&] { (void)io::read_peft(dwio::fixtures() / "peft_named" / "adapter", "third"); }, "\"default\", \"second\"");
  CHECK(io::list_peft_adapters(dwio::fixtures() / "no_such_dir").empty());
  // A type deltaw does not read, through the in-memory entry point.
  dwt::check_throws_with<dw::unsupported_error>(
      [&] { (void)io::parse_peft(R"({"peft_type":"LN_TUNING","r":4})", io::safetensors_file::parse(dwio::raw_safetensors("{}"))); },
      {"peft_type \"LN_TUNING\" is not supported", "RANDLORA", "BOFT"});
}

TEST_CASE("peft adapter: a structured directory update is all-or-nothing") {
  dwio::temp_dir tmp;
  const auto src = io::read_peft_structured_adapter(dwio::fixtures() / "peft_lokr" / "adapter");
  const fs::path dir = tmp.path / "out";
  io::write_peft_structured_adapter(dir, src);
  dwio::write_text(dir / "README.md", "model card");
  fs::create_directories(dir / "second");
  dwio::write_text(dir / "second" / "adapter_config.json", "{}");
  const std::string old_cfg = bytes(dir / "adapter_config.json"), old_st = bytes(dir / "adapter_model.safetensors");
  const auto before = entries(dir);
  CHECK(before == std::set<std::string>{"README.md", "adapter_config.json", "adapter_model.safetensors", "second"});

  // A different adapter (a MiSS one), failing between its two files: nothing changes.
  const auto miss = io::read_peft_structured_adapter(dwio::fixtures() / "peft_miss" / "adapter");
  io::detail::peft_write_between_files_hook = [](const fs::path&) { throw dw::io_error("injected failure"); };
  dwt::check_throws_containing<dw::io_error>([&] { io::write_peft_structured_adapter(dir, miss); }, "injected failure");
  dwt::check_throws_containing<dw::io_error>([&] { io::write_peft_structured_adapter(tmp.path / "fresh", miss); },
                                             "injected failure");
  io::detail::peft_write_between_files_hook = nullptr;
  CHECK(bytes(dir / "adapter_config.json") == old_cfg);
  CHECK(bytes(dir / "adapter_model.safetensors") == old_st);
  CHECK(entries(dir) == before);  // no staging directory left behind
  CHECK(entries(tmp.path) == std::set<std::string>{"out"});
  CHECK(io::read_peft(dir).peft_type() == "LOKR");

  // Then it succeeds: the new adapter, the other entries kept.
  io::write_peft_structured_adapter(dir, miss);
  CHECK(entries(dir) == before);
  CHECK(bytes(dir / "README.md") == "model card");
  CHECK(fs::exists(dir / "second" / "adapter_config.json"));
  const auto back = io::read_peft(dir);
  CHECK(back.peft_type() == "MISS");
  CHECK(back.size() == miss.size());
  // target_modules lists the full module names, so PEFT wraps these modules only.
  CHECK(back.structured()->config.target_modules == std::vector<std::string>{"blocks.0.q", "blocks.0.v", "head"});
  CHECK_FALSE(back.targets("blocks.1.q"));
}
