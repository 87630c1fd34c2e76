// PEFT adapter directories: adapters saved by PEFT itself (tests/fixtures/peft_*, see
// tools/make_fixtures.py) reproduce PEFT's own forward outputs within 1e-5 relative;
// rank_pattern / alpha_pattern semantics; write → read round trips; every unsupported or
// inconsistent input is a specific error.
#include <csignal>
#include <fstream>
#include <functional>
#include <set>
#if defined(__unix__) || defined(__APPLE__)
#include <sys/resource.h>
#endif

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;

namespace {

struct model_files {
  io::safetensors_file weights, io;
  io::peft_adapter adapter;
  explicit model_files(const std::string& name)
      : weights(io::safetensors_file::open(dwio::fixtures() / name / "model.safetensors")),
        io(io::safetensors_file::open(dwio::fixtures() / name / "io.safetensors")),
        adapter(io::read_peft_adapter(dwio::fixtures() / name / "adapter")) {}
};

MatD add_bias(MatD y, const std::vector<double>& b) {
  for (Eigen::Index i = 0; i < y.rows(); ++i)
    for (Eigen::Index j = 0; j < y.cols(); ++j) y(i, j) += b[std::size_t(j)];
  return y;
}
MatD relu(MatD y) { return y.cwiseMax(0.0); }

// One adapted nn.Linear as deltaw computes it: X·(W + ΔW)ᵀ + b (DoRA: X·W'ᵀ + b).
MatD linear(const model_files& m, const std::string& module, const MatD& X) {
  const auto W = m.weights.matrix<float>(module + ".weight");
  const auto& mod = m.adapter.at(module);
  const MatF Xf = X.cast<float>();
  MatF Y;
  if (mod.magnitude) Y = dw::apply(W.view + mod.dora(W.view), Xf);
  else Y = dw::apply(W.view + mod.update(), Xf);
  return add_bias(Y.cast<double>(), m.weights.values<double>(module + ".bias"));
}

// The Tiny model of make_fixtures.py: q -> relu -> v -> relu -> head.
MatD tiny_forward(const model_files& m, const MatD& x) {
  const MatD h1 = relu(linear(m, "blocks.0.q", x));
  const MatD h2 = relu(linear(m, "blocks.0.v", h1));
  return linear(m, "head", h2);
}

void check_against_peft(const std::string& name) {
  CAPTURE(name);
  const model_files m(name);
  CHECK(m.adapter.size() == 3);
  for (const auto& mod : m.adapter.modules()) {
    CAPTURE(mod.name);
    const MatD X = dwio::load_matd(m.io, "x." + mod.name);
    const MatD Y = dwio::load_matd(m.io, "y." + mod.name);
    CHECK(dwt::rel_err(linear(m, mod.name, X), Y) < 1e-5);
  }
  const MatD y = tiny_forward(m, dwio::load_matd(m.io, "x"));
  CHECK(dwt::rel_err(y, dwio::load_matd(m.io, "y")) < 1e-5);
}

}  // namespace

TEST_CASE("peft: LoRA with rank_pattern and alpha_pattern reproduces PEFT's outputs") {
  check_against_peft("peft_lora");
  const model_files m("peft_lora");
  const auto& c = m.adapter.config;
  CHECK(c.r == 4);
  CHECK(c.lora_alpha == 8);
  // rank_pattern {"v": 2}, alpha_pattern {"head": 3}
  CHECK(m.adapter.at("blocks.0.q").rank == 4);
  CHECK(m.adapter.at("blocks.0.q").scale == doctest::Approx(2.0));
  CHECK(m.adapter.at("blocks.0.v").rank == 2);
  CHECK(m.adapter.at("blocks.0.v").scale == doctest::Approx(4.0));
  CHECK(m.adapter.at("head").rank == 4);
  CHECK(m.adapter.at("head").scale == doctest::Approx(0.75));
  CHECK(c.targets("blocks.0.q"));
  CHECK_FALSE(c.targets("blocks.0.qq"));
  // The adapter's F32 tensors are viewed in the mapped file.
  CHECK(m.adapter.at("head").A.owner != nullptr);
}

TEST_CASE("peft: rsLoRA (alpha / sqrt(r)) reproduces PEFT's outputs") {
  check_against_peft("peft_rslora");
  const model_files m("peft_rslora");
  CHECK(m.adapter.config.use_rslora);
  CHECK(m.adapter.at("head").scale == doctest::Approx(6.0 / 2.0));
}

TEST_CASE("peft: DoRA (lora_magnitude_vector) reproduces PEFT's outputs") {
  check_against_peft("peft_dora");
  const model_files m("peft_dora");
  CHECK(m.adapter.config.use_dora);
  for (const auto& mod : m.adapter.modules()) {
    REQUIRE(mod.magnitude);
    CHECK(mod.magnitude->view.size() == mod.out_features());
  }
}

TEST_CASE("peft: fan_in_fan_out (GPT-2 Conv1D, W stored [in, out]) reproduces PEFT's outputs") {
  const model_files m("peft_fan_in_fan_out");
  CHECK(m.adapter.config.fan_in_fan_out);
  MatD h = dwio::load_matd(m.io, "x");
  for (const char* name : {"c_attn", "c_proj"}) {
    const auto& mod = m.adapter.at(name);
    const auto Ws = m.weights.matrix<float>(std::string(name) + ".weight");  // [in, out]
    CHECK(Ws.view.rows() == mod.in_features());
    CHECK(Ws.view.cols() == mod.out_features());
    const auto b = m.weights.values<double>(std::string(name) + ".bias");
    // Per-module check through the transposed view: W [out, in] = Wsᵀ.
    const MatD X = dwio::load_matd(m.io, std::string("x.") + name);
    const MatF Y = dw::apply(Ws.view.transpose() + mod.update(), MatF(X.cast<float>()));
    CHECK(dwt::rel_err(add_bias(Y.cast<double>(), b), dwio::load_matd(m.io, std::string("y.") + name)) < 1e-5);
    // Merging into the stored layout: Ws + ΔWᵀ.
    MatF merged = Eigen::Map<const MatF>(Ws.view.data(), Ws.view.rows(), Ws.view.cols());
    dw::merge(merged, mod.update_for_stored_weight());
    const MatD ref = Eigen::Map<const MatF>(Ws.view.data(), Ws.view.rows(), Ws.view.cols()).cast<double>() +
                     dw::materialize(mod.update()).cast<double>().transpose();
    CHECK(dwt::rel_err(merged, ref) < 1e-6);
    MatD out = add_bias(h * merged.cast<double>(), b);
    h = std::string(name) == "c_attn" ? relu(out) : out;
  }
  CHECK(dwt::rel_err(h, dwio::load_matd(m.io, "y")) < 1e-5);
  // match() expects [in, out] stored shapes here.
  std::map<std::string, std::pair<index_t, index_t>> shapes;
  for (const auto& t : m.weights.tensors())
    if (t.shape.size() == 2) shapes[t.name] = {index_t(t.shape[0]), index_t(t.shape[1])};
  CHECK(m.adapter.match(shapes).size() == 2);
}

TEST_CASE("peft: modules are matched to the model's weights by name and shape") {
  const model_files m("peft_lora");
  std::map<std::string, std::pair<index_t, index_t>> shapes;
  for (const auto& t : m.weights.tensors())
    if (t.shape.size() == 2) shapes[t.name] = {index_t(t.shape[0]), index_t(t.shape[1])};
  const auto map = m.adapter.match(shapes);
  CHECK(map.size() == 3);
  CHECK(map.at("blocks.0.q") == "blocks.0.q.weight");
  CHECK(m.adapter.for_weight("head.weight") == &m.adapter.at("head"));
  CHECK(m.adapter.for_weight("blocks.0.q.bias") == nullptr);
  auto wrong = shapes;
  wrong["head.weight"] = {8, 21};
  dwt::check_throws_with<dw::shape_error>([&] { (void)m.adapter.match(wrong); },
                                          {"\"head.weight\" is [8, 21]", "expects [8, 20]"});
  auto missing = shapes;
  missing.erase("blocks.0.v.weight");
  dwt::check_throws_with<dw::format_error>([&] { (void)m.adapter.match(missing); }, {"no weight \"blocks.0.v.weight\""});
}

TEST_CASE("peft: pattern keys match as (.*\\.)?(key)$, first match in file order wins") {
  const auto c = io::parse_peft_config(R"({"peft_type":"LORA","r":8,"lora_alpha":16,
      "rank_pattern":{"layers\\.1\\..*":2,"q_proj":4,"layers\\.0\\.q_proj":6},
      "alpha_pattern":{"proj":1}})");
  CHECK(c.rank_for("model.layers.0.q_proj") == 4);  // "q_proj" comes before the exact key
  CHECK(c.rank_for("model.layers.1.q_proj") == 2);
  CHECK(c.rank_for("model.layers.0.k_proj") == 8);
  CHECK(c.rank_for("model.layers.0.xq_proj") == 8);  // needs a dot boundary
  CHECK(c.rank_for("q_proj") == 4);                  // (.*\.)? is optional
  CHECK(c.alpha_for("a.proj") == 1);
  CHECK(c.alpha_for("a.q_proj") == 16);  // "proj" must match the whole last component(s)
  CHECK(c.scale_for("model.layers.0.k_proj") == doctest::Approx(2.0));
  const auto rs = io::parse_peft_config(R"({"peft_type":"LORA","r":16,"lora_alpha":8,"use_rslora":true})");
  CHECK(rs.scale_for("x") == doctest::Approx(2.0));
  const auto d = io::parse_peft_config(R"({"peft_type":"LORA"})");  // PEFT's defaults
  CHECK(d.r == 8);
  CHECK(d.lora_alpha == 8);
  const auto t = io::parse_peft_config(R"({"peft_type":"LORA","target_modules":".*\\.(q|v)_proj"})");
  CHECK(t.targets("model.layers.0.q_proj"));
  CHECK_FALSE(t.targets("model.layers.0.k_proj"));
}

TEST_CASE("peft: unsupported types and options throw unsupported_error; bad configs format_error") {
  using dw::format_error;
  using dw::unsupported_error;
  const std::string base = R"("peft_type":"LORA","r":4,"lora_alpha":8)";
  auto cfg = [&](const std::string& extra) { return "{" + base + extra + "}"; };
  struct cse {
    std::string text;
    const char* frag;
    int kind;  // 0 unsupported, 1 format, 2 rank, 3 accepted
  };
  const std::vector<cse> cases = {
      {R"({"peft_type":"LOKR","r":4})", "peft_type \"LOKR\" is not supported", 0},
      {R"({"peft_type":"VERA"})", "peft_type \"VERA\"", 0},
      {cfg(R"(,"bias":"all")"), "bias = \"all\"", 0},
      {cfg(R"(,"bias":"lora_only")"), "trained biases", 0},
      {cfg(R"(,"lora_bias":true)"), "lora_bias = true", 0},
      {cfg(R"(,"modules_to_save":["classifier"])"), "\"modules_to_save\"", 0},
      {cfg(R"(,"layer_replication":[[0,2]])"), "\"layer_replication\"", 0},
      {cfg(R"(,"use_qalora":true)"), "use_qalora", 0},
      {cfg(R"(,"target_parameters":["experts.w"])"), "target_parameters", 0},
      {cfg(R"(,"trainable_token_indices":[1,2])"), "trainable_token_indices", 0},
      {R"({"r":4})", "no string \"peft_type\"", 1},
      {R"([1])", "must hold a JSON object", 1},
      {cfg(R"(,"r":8)"), "duplicate JSON key \"r\"", 1},
      {R"({"peft_type":"LORA","r":"four"})", "must be an integer rank", 1},
      {R"({"peft_type":"LORA","r":2.5})", "must be an integer rank", 1},
      {R"({"peft_type":"LORA","lora_alpha":"x"})", "must be a number", 1},
      {cfg(R"(,"use_dora":"yes")"), "must be true or false", 1},
      {cfg(R"(,"rank_pattern":{"(unclosed":2})"), "not a valid regular expression", 1},
      {cfg(R"(,"rank_pattern":[1])"), "must be an object", 1},
      {cfg(R"(,"rank_pattern":{"a\\75555555555555555555":2})"), "back-reference", 0},  // found by fuzzing
      {cfg(R"(,"alpha_pattern":{"a{99999999999}":2})"), "repeat count above 1000", 1},
      {cfg(R"(,"rank_pattern":{"(a|a)*b":2})"), "", 3},  // exponential for std::regex; fine here
      {cfg(R"(,"target_modules":"a)(b")"), "not a valid regular expression", 1},
      {cfg(R"(,"target_modules":5)"), "list of names or a regular expression", 1},
      {cfg(R"(,"target_modules":[1])"), "entries must be strings", 1},
      {R"({"peft_type":"LORA","r":0})", "at least 1", 2},
      {R"({"peft_type":"LORA","r":-3})", "at least 1", 2},
      {cfg(R"(,"rank_pattern":{"q":0})"), "at least 1", 2},
      {"{\"peft_type\":\"LORA\"", "invalid JSON", 1},
  };
  for (const auto& c : cases) {
    CAPTURE(c.text);
    auto f = [&] { (void)io::parse_peft_config(c.text); };
    if (c.kind == 0) dwt::check_throws_with<unsupported_error>(f, {c.frag});
    else if (c.kind == 1) dwt::check_throws_with<format_error>(f, {c.frag});
    else if (c.kind == 2) dwt::check_throws_with<dw::rank_error>(f, {c.frag});
    else CHECK(io::parse_peft_config(c.text).rank_for(std::string(30, 'a')) == 4);
  }
  CHECK(cases.size() == 29);
}

namespace {
// An adapter directory with the given config and tensors.
void write_dir(const std::filesystem::path& dir, const std::string& config, const io::safetensors_writer& w) {
  std::filesystem::create_directories(dir);
  dwio::write_text(dir / "adapter_config.json", config);
  w.write(dir / "adapter_model.safetensors");
}
}  // namespace

TEST_CASE("peft: inconsistent adapter tensors throw specific errors") {
  dwio::temp_dir tmp;
  const std::string cfg = R"({"peft_type":"LORA","r":2,"lora_alpha":4})";
  const MatF A = dwt::random<MatF>(2, 5, 1), B = dwt::random<MatF>(3, 2, 2), A3 = dwt::random<MatF>(3, 5, 3);
  const Eigen::VectorXf mag = Eigen::VectorXf::Ones(3), mag4 = Eigen::VectorXf::Ones(4);
  struct cse {
    const char* name;
    std::function<void(io::safetensors_writer&)> fill;
    std::string config;
    const char* frag;
    bool unsupported;
  };
  const std::string pre = "base_model.model.layer.";
  const std::vector<cse> cases = {
      {"unknown key", [&](auto& w) { w.add(pre + "lora_A.weight", A); w.add(pre + "lora_B.weight", B); w.add("base_model.model.layer.weight", B); }, cfg, "unknown key \"base_model.model.layer.weight\"", false},
      {"no prefix", [&](auto& w) { w.add("layer.lora_A.weight", A); }, cfg, "start with \"base_model.model.\"", false},
      {"adapter name left in", [&](auto& w) { w.add(pre + "lora_A.default.weight", A); }, cfg, "unknown key", false},
      {"missing B", [&](auto& w) { w.add(pre + "lora_A.weight", A); }, cfg, "lacks lora_B.weight", false},
      {"missing A", [&](auto& w) { w.add(pre + "lora_B.weight", B); }, cfg, "lacks lora_A.weight", false},
      {"r disagrees", [&](auto& w) { w.add(pre + "lora_A.weight", A3); w.add(pre + "lora_B.weight", B); }, cfg, "disagree on r", false},
      {"config r", [&](auto& w) { w.add(pre + "lora_A.weight", A); w.add(pre + "lora_B.weight", B); }, R"({"peft_type":"LORA","r":4})", "the config gives r = 4", false},
      {"magnitude without dora", [&](auto& w) { w.add(pre + "lora_A.weight", A); w.add(pre + "lora_B.weight", B); w.add(pre + "lora_magnitude_vector", dw::vview(mag)); }, cfg, "use_dora false", false},
      {"dora without magnitude", [&](auto& w) { w.add(pre + "lora_A.weight", A); w.add(pre + "lora_B.weight", B); }, R"({"peft_type":"LORA","r":2,"use_dora":true})", "lacks lora_magnitude_vector", false},
      {"magnitude size", [&](auto& w) { w.add(pre + "lora_A.weight", A); w.add(pre + "lora_B.weight", B); w.add(pre + "lora_magnitude_vector", dw::vview(mag4)); }, R"({"peft_type":"LORA","r":2,"use_dora":true})", "must be [3] (out)", false},
      {"two magnitudes", [&](auto& w) { w.add(pre + "lora_A.weight", A); w.add(pre + "lora_B.weight", B); w.add(pre + "lora_magnitude_vector", dw::vview(mag)); w.add(pre + "lora_magnitude_vector.weight", dw::vview(mag)); }, R"({"peft_type":"LORA","r":2,"use_dora":true})", "two tensors for the same part", false},
      {"embedding", [&](auto& w) { w.add(pre + "lora_embedding_A", A); }, cfg, "embedding LoRA", true},
      {"lora bias", [&](auto& w) { w.add(pre + "lora_A.weight", A); w.add(pre + "lora_B.bias", dw::vview(mag)); }, cfg, "LoRA biases", true},
  };
  int i = 0;
  for (const auto& c : cases) {
    CAPTURE(c.name);
    io::safetensors_writer w;
    c.fill(w);
    const auto dir = tmp.path / std::to_string(i++);
    write_dir(dir, c.config, w);
    if (c.unsupported) dwt::check_throws_with<dw::unsupported_error>([&] { (void)io::read_peft_adapter(dir); }, {c.frag});
    else dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft_adapter(dir); }, {c.frag});
  }
  // Convolution LoRA: 4-D factors.
  {
    io::safetensors_writer w;
    std::vector<std::byte> z(2 * 3 * 1 * 1 * 4);
    w.add_raw(pre + "lora_A.weight", io::st_dtype::F32, {2, 3, 1, 1}, z);
    w.add_raw(pre + "lora_B.weight", io::st_dtype::F32, {3, 2, 1, 1}, z);
    write_dir(tmp.path / "conv", cfg, w);
    dwt::check_throws_with<dw::unsupported_error>([&] { (void)io::read_peft_adapter(tmp.path / "conv"); },
                                                  {"convolution LoRA"});
  }
  // A pickle checkpoint is refused, a missing directory is an io_error.
  std::filesystem::create_directories(tmp.path / "bin");
  dwio::write_text(tmp.path / "bin" / "adapter_config.json", cfg);
  dwio::write_text(tmp.path / "bin" / "adapter_model.bin", "pickle");
  dwt::check_throws_with<dw::unsupported_error>([&] { (void)io::read_peft_adapter(tmp.path / "bin"); }, {"adapter_model.bin"});
  dwt::check_throws_with<dw::io_error>([&] { (void)io::read_peft_adapter(tmp.path / "none"); }, {"cannot open"});
  // The DoRA of a module without a magnitude vector.
  const model_files m("peft_lora");
  const auto W = m.weights.matrix<float>("head.weight");
  dwt::check_throws_with<dw::argument_error>([&] { (void)m.adapter.at("head").dora(W.view); }, {"no lora_magnitude_vector"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)m.adapter.at("nope"); }, {"no module \"nope\""});
}

TEST_CASE("peft: write -> read round trip keeps factors and every module's scale") {
  dwio::temp_dir tmp;
  for (const char* name : {"peft_lora", "peft_rslora", "peft_dora", "peft_fan_in_fan_out"}) {
    CAPTURE(name);
    const auto a = io::read_peft_adapter(dwio::fixtures() / name / "adapter");
    const auto dir = tmp.path / name;
    io::write_peft_adapter(dir, a);
    const auto b = io::read_peft_adapter(dir);
    REQUIRE(b.size() == a.size());
    CHECK(b.config.use_rslora == a.config.use_rslora);
    CHECK(b.config.use_dora == a.config.use_dora);
    CHECK(b.config.fan_in_fan_out == a.config.fan_in_fan_out);
    for (const auto& ma : a.modules()) {
      const auto& mb = b.at(ma.name);
      CHECK(mb.rank == ma.rank);
      CHECK(mb.scale == doctest::Approx(ma.scale).epsilon(1e-12));
      CHECK(dwt::rel_err(dw::materialize(mb.update()), dw::materialize(ma.update())) == 0.0);
      CHECK(mb.magnitude.has_value() == ma.magnitude.has_value());
    }
  }
}

TEST_CASE("peft: adapters built from deltaw updates get rank_pattern / alpha_pattern as needed") {
  dwio::temp_dir tmp;
  for (bool rs : {false, true}) {
    CAPTURE(rs);
    io::peft_adapter a;
    a.config.use_rslora = rs;
    a.config.base_model_name_or_path = "tiny";
    const MatF B1 = dwt::random<MatF>(6, 4, 1), A1 = dwt::random<MatF>(4, 5, 2);
    const MatF B2 = dwt::random<MatF>(7, 2, 3), A2 = dwt::random<MatF>(2, 6, 4);
    const MatF B3 = dwt::random<MatF>(5, 4, 5), A3 = dwt::random<MatF>(4, 7, 6);
    a.add("model.layers.0.q_proj", dw::lora(B1, A1, dw::alpha(8)));
    a.add("model.layers.0.k_proj", dw::lora(B2, A2, dw::scale(0.37)));  // other r and s
    a.add("model.layers.1.q_proj", dw::lora(B3, A3, dw::scale(3.0)));   // same r, other s
    dwt::check_throws_with<dw::argument_error>([&] { a.add("model.layers.0.q_proj", dw::lora(B1, A1)); }, {"added twice"});
    io::write_peft_adapter(tmp.path / (rs ? "rs" : "plain"), a);
    const auto b = io::read_peft_adapter(tmp.path / (rs ? "rs" : "plain"));
    CHECK(b.config.r == 4);
    CHECK(b.config.rank_pattern.size() == 1);
    CHECK(b.config.alpha_pattern.size() == 2);
    CHECK(b.config.base_model_name_or_path == "tiny");
    for (const auto& ma : a.modules()) {
      CAPTURE(ma.name);
      CHECK(b.at(ma.name).scale == doctest::Approx(ma.scale).epsilon(1e-12));
      CHECK(dwt::rel_err(dw::materialize(b.at(ma.name).update()), dw::materialize(ma.update())) < 1e-7);
    }
    CHECK(b.config.targets("model.layers.0.k_proj"));
    // Full module names: PEFT would wrap exactly these three, not layer 1's k_proj.
    CHECK(b.config.target_modules ==
          std::vector<std::string>{"model.layers.0.k_proj", "model.layers.0.q_proj", "model.layers.1.q_proj"});
    CHECK_FALSE(b.config.targets("model.layers.1.k_proj"));
  }
}

TEST_CASE("peft: a target_modules regex deltaw cannot evaluate (look-ahead) keeps the adapter readable") {
  const std::string text = R"({"peft_type":"LORA","r":4,"target_modules":"^(?!.*fc2).*\\.(q_proj|v_proj)$"})";
  const auto c = io::parse_peft_config(text);
  REQUIRE(c.target_modules_regex.has_value());
  CHECK(*c.target_modules_regex == "^(?!.*fc2).*\\.(q_proj|v_proj)$");
  CHECK_FALSE(c.target_modules_unsupported.empty());
  dwt::check_throws_with<dw::unsupported_error>([&] { (void)c.targets("model.layers.0.q_proj"); },
                                                {"target_modules", "cannot be evaluated", "modules()"});
  // A supported regex still answers; a malformed one is still a format_error (Python's re
  // rejects it too), and look-arounds in rank_pattern keys (which change the math) refuse.
  CHECK(io::parse_peft_config(R"({"peft_type":"LORA","target_modules":".*\\.q_proj"})").targets("a.q_proj"));
  dwt::check_throws_with<dw::unsupported_error>(
      [&] { (void)io::parse_peft_config(R"({"peft_type":"LORA","rank_pattern":{"(?!x)q":2}})"); }, {"pattern key"});
  // Read from a directory and written back: the modules come from the tensors, and the
  // written target_modules lists their full names instead of the regex.
  dwio::temp_dir tmp;
  io::safetensors_writer w;
  const MatF A = dwt::random<MatF>(4, 5, 1), B = dwt::random<MatF>(3, 4, 2);
  w.add("base_model.model.model.layers.0.q_proj.lora_A.weight", A);
  w.add("base_model.model.model.layers.0.q_proj.lora_B.weight", B);
  std::filesystem::create_directories(tmp.path / "in");
  dwio::write_text(tmp.path / "in" / "adapter_config.json", text);
  w.write(tmp.path / "in" / "adapter_model.safetensors");
  const auto a = io::read_peft_adapter(tmp.path / "in");
  REQUIRE(a.size() == 1);
  CHECK(a.modules()[0].name == "model.layers.0.q_proj");
  io::write_peft_adapter(tmp.path / "out", a);
  const auto b = io::read_peft_adapter(tmp.path / "out");
  CHECK_FALSE(b.config.target_modules_regex.has_value());
  CHECK(b.config.target_modules == std::vector<std::string>{"model.layers.0.q_proj"});
  CHECK(b.config.targets("model.layers.0.q_proj"));
}

namespace {
std::string file_bytes(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}
std::set<std::string> dir_entries(const std::filesystem::path& d) {
  std::set<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(d)) out.insert(e.path().filename().string());
  return out;
}
}  // namespace

TEST_CASE("peft: a directory update is all-or-nothing (failure between the two files, rollback of the first)") {
  namespace fs = std::filesystem;
  dwio::temp_dir tmp;
  const auto old_a = io::read_peft_adapter(dwio::fixtures() / "peft_lora" / "adapter");
  const auto new_a = io::read_peft_adapter(dwio::fixtures() / "peft_dora" / "adapter");
  const fs::path dir = tmp.path / "adapter";
  io::write_peft_adapter(dir, old_a);
  const std::string cfg0 = file_bytes(dir / "adapter_config.json"), st0 = file_bytes(dir / "adapter_model.safetensors");
  const auto entries0 = dir_entries(dir);
  auto unchanged = [&] {
    CHECK(file_bytes(dir / "adapter_config.json") == cfg0);
    CHECK(file_bytes(dir / "adapter_model.safetensors") == st0);
    CHECK(dir_entries(dir) == entries0);  // no staging directory left behind
    CHECK(dir_entries(tmp.path) == std::set<std::string>{"adapter"});
    CHECK_FALSE(io::read_peft_adapter(dir).config.use_dora);
  };

  SUBCASE("an error thrown between the two files") {
    io::detail::peft_write_between_files_hook = [](const fs::path& staging) {
      CHECK(fs::exists(staging / "adapter_config.json"));  // the first file is written by now
      throw dw::io_error("injected");
    };
    dwt::check_throws_with<dw::io_error>([&] { io::write_peft_adapter(dir, new_a); }, {"injected"});
    dwt::check_throws_with<dw::io_error>([&] { io::write_peft_adapter(tmp.path / "new", new_a); }, {"injected"});
    io::detail::peft_write_between_files_hook = nullptr;
    unchanged();  // and "new" was never created
  }
#if defined(__unix__) || defined(__APPLE__)
  SUBCASE("the second write fails for real (file size limit: the config fits, the tensors do not)") {
    const std::string cfg_text = io::peft_config_json(new_a.to_files().first).dump(2);
    const auto st_size = new_a.to_files().second.serialize().size();
    REQUIRE(cfg_text.size() + 64 < st_size);
    struct rlimit old {};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
    auto* old_handler = std::signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim = old;
    lim.rlim_cur = rlim_t(cfg_text.size() + 64);
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &lim) == 0);
    bool threw = false;
    try {
      io::write_peft_adapter(dir, new_a);
    } catch (const dw::io_error&) {
      threw = true;
    }
    ::setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, old_handler);
    CHECK(threw);
    unchanged();
  }
#endif
  SUBCASE("the second rename fails: the first file is rolled back") {
    // adapter_config.json made a non-empty directory: the tensors move in first, then the
    // config's rename fails and the old tensors come back.
    fs::remove(dir / "adapter_config.json");
    fs::create_directories(dir / "adapter_config.json" / "x");
    dwt::check_throws_with<dw::io_error>([&] { io::write_peft_adapter(dir, new_a); },
                                         {"adapter_config.json", "left as it was"});
    CHECK(file_bytes(dir / "adapter_model.safetensors") == st0);
    CHECK(fs::is_directory(dir / "adapter_config.json" / "x"));
    CHECK(dir_entries(dir) == entries0);
  }
  SUBCASE("success replaces both and keeps the rest of the directory") {
    dwio::write_text(dir / "README.md", "card");
    fs::permissions(dir / "adapter_model.safetensors", fs::perms::owner_read | fs::perms::owner_write);
    io::write_peft_adapter(dir, new_a);
    CHECK(file_bytes(dir / "README.md") == "card");
    CHECK(io::read_peft_adapter(dir).config.use_dora);
    CHECK((fs::status(dir / "adapter_model.safetensors").permissions() & fs::perms::all) ==
          (fs::perms::owner_read | fs::perms::owner_write));
    CHECK(dir_entries(dir).size() == entries0.size() + 1);
  }
}
