// SPDX-License-Identifier: MIT
// KaSA, BD-LoRA and TinyLoRA adapters (issue 16): the directories saved by PEFT 0.21.2 itself
// (tools/fixtures_kasa_bdlora_tinylora.py: a 15 → 21 → 9 → 6 model, three target modules,
// random adapter values) reproduce PEFT's per-layer and whole-model outputs within 1e-5
// relative: KaSA over the base weight deltaw truncates itself (also compared with the
// truncated weights PEFT produced) and its regulariser against PEFT's _get_kasa_loss; BD-LoRA
// with A or B block-diagonal, mixed with plain modules (match_strict false); TinyLoRA with
// shared vectors (weight_tying 0.5 and 1). Merge / unmerge round trips; deltaw-written
// directories read back to the same updates; read_peft's referral; specific errors.
#include <deltaw/init/kasa.hpp>
#include <deltaw/init/tinylora.hpp>
#include <deltaw/io/peft_adapter.hpp>
#include <deltaw/io/peft_kasa_bdlora_tinylora.hpp>
#include <deltaw/train/kasa.hpp>

#include <sstream>

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;

namespace {
const std::vector<std::string> kModules{"q", "v", "head"};  // the model's order

struct kbt_fixture {
  io::safetensors_file weights, ios;
  std::map<std::string, MatF> W;  // the base weights the adapter applies to
  explicit kbt_fixture(const std::string& name)
      : weights(io::safetensors_file::open(dwio::fixtures() / name / "model.safetensors")),
        ios(io::safetensors_file::open(dwio::fixtures() / name / "io.safetensors")) {
    for (const auto& m : kModules) W[m] = load_matd(weights, m + ".weight").cast<float>();
  }
  static MatD load_matd(const io::safetensors_file& f, const std::string& n) { return dwio::load_matd(f, n); }
  Eigen::RowVectorXd bias(const std::string& m) const {
    const auto b = weights.values<double>(m + ".bias");
    return Eigen::Map<const Eigen::RowVectorXd>(b.data(), Eigen::Index(b.size()));
  }
  /// PEFT's per-module and whole-model outputs from `layer(module, X)` = X·(W + ΔW)ᵀ.
  template <class F>
  void check_outputs(F&& layer) const {
    auto lin = [&](const std::string& m, const MatD& X) {
      MatD Y = layer(m, X);
      Y.rowwise() += bias(m);
      return Y;
    };
    for (const auto& m : kModules) {
      CAPTURE(m);
      CHECK(dwt::rel_err(lin(m, load_matd(ios, "x." + m)), load_matd(ios, "y." + m)) < 1e-5);
    }
    const MatD h = lin("v", lin("q", load_matd(ios, "x")).cwiseMax(0.0)).cwiseMax(0.0);
    CHECK(dwt::rel_err(lin("head", h), load_matd(ios, "y")) < 1e-5);
  }
  /// Lazy apply over W, the dense path, merge / unmerge round trip.
  template <class U>
  MatD apply_checked(const std::string& m, const U& u, const MatD& X) const {
    MatF Wm = W.at(m);
    const MatD lazy = dw::apply(dw::view(Wm) + u, MatF(X.cast<float>())).template cast<double>();
    const MatD dense = X * (Wm.cast<double>() + dw::materialize(u).template cast<double>()).transpose();
    CHECK(dwt::rel_err(lazy, dense) < 1e-5);
    const MatF W0 = Wm;
    dw::merge(Wm, u);
    CHECK(dwt::rel_err(MatD((Wm.cast<double>() - W0.cast<double>())), MatD(dw::materialize(u).template cast<double>())) < 1e-5);
    dw::unmerge(Wm, u);
    CHECK(dwt::rel_err(Wm, W0) < 1e-6);
    return lazy;
  }
};
}  // namespace

TEST_CASE("peft KaSA reproduces PEFT 0.21.2 (truncated base, ΔW = s·B·diag(ΔΣ)·A, regulariser)") {
  for (const char* name : {"peft_kasa", "peft_kasa_rslora"}) {
    CAPTURE(name);
    kbt_fixture f(name);
    const auto a = io::read_peft_kasa_adapter(dwio::fixtures() / name / "adapter");
    REQUIRE(a.size() == 3);
    const auto trunc = io::safetensors_file::open(dwio::fixtures() / name / "truncated.safetensors");
    double reg = 0;
    const dw::train::kasa_options o{.beta = a.beta, .gamma = a.gamma};
    for (const auto& m : kModules) {
      CAPTURE(m);
      const auto& km = a.at(m);
      CHECK(km.layer_mismatch(f.W[m].rows(), f.W[m].cols()).empty());
      dw::kasa_truncate_base_dense(f.W[m], km.rank());
      CHECK(dwt::rel_err(f.W[m].cast<double>(), kbt_fixture::load_matd(trunc, m + ".weight")) < 1e-5);
      reg += dw::train::kasa_regularizer(km.B.view, km.diag.view, km.A.view, o).value;
    }
    if (std::string(name) == "peft_kasa") {
      CHECK(a.beta == doctest::Approx(2e-2));
      CHECK(a.gamma == doctest::Approx(3e-2));
      CHECK(a.at("q").scale == doctest::Approx(6.0 / 4));
    } else {
      CHECK(a.config.use_rslora);
      CHECK(a.at("head").rank() == 2);
      CHECK(a.at("v").scale == doctest::Approx(7.0 / std::sqrt(3.0)));
      CHECK(a.at("head").scale == doctest::Approx(5.0 / std::sqrt(2.0)));
    }
    CHECK(reg == doctest::Approx(kbt_fixture::load_matd(f.ios, "kasa_loss")(0, 0)).epsilon(1e-5));
    f.check_outputs([&](const std::string& m, const MatD& X) { return f.apply_checked(m, a.at(m).update(), X); });

    // deltaw writes, deltaw reads: same updates, same config fields.
    dwio::temp_dir t;
    io::peft_kasa_adapter w;
    w.config = a.config;
    w.beta = a.beta;
    w.gamma = a.gamma;
    for (const auto& m : a.modules()) w.add(m.name, dw::kasa(m.B.view, m.diag.view, m.A.view, dw::scale(m.scale)));
    io::write_peft_kasa_adapter(t.path, w);
    const auto b = io::read_peft_kasa_adapter(t.path);
    CHECK(b.beta == a.beta);
    for (const auto& m : kModules) {
      CHECK(b.at(m).scale == doctest::Approx(a.at(m).scale).epsilon(1e-12));
      CHECK(dwt::rel_err(dw::materialize(b.at(m).update()), dw::materialize(a.at(m).update())) == 0);
    }
  }
}

TEST_CASE("peft BD-LoRA reproduces PEFT 0.21.2 (block-diagonal A or B, mixed with plain LoRA)") {
  {
    kbt_fixture f("peft_bdlora");
    const auto a = io::read_peft_bdlora_adapter(dwio::fixtures() / "peft_bdlora" / "adapter");
    REQUIRE(a.size() == 3);
    CHECK(a.nblocks == 3);
    CHECK(a.match_strict);
    CHECK(a.at("q").a_blocks == 3);
    CHECK(a.at("head").a_blocks == 3);
    CHECK(a.at("v").b_blocks == 3);
    CHECK(a.at("q").in_features() == 15);
    CHECK(a.at("v").out_features() == 9);
    f.check_outputs([&](const std::string& m, const MatD& X) { return f.apply_checked(m, a.at(m).update(), X); });
  }
  {
    kbt_fixture f("peft_bdlora_mixed");
    const auto a = io::read_peft_bdlora_adapter(dwio::fixtures() / "peft_bdlora_mixed" / "adapter");
    CHECK_FALSE(a.match_strict);
    CHECK(a.at("q").b_blocks == 3);
    CHECK(a.at("v").a_blocks == 1);
    CHECK(a.at("v").b_blocks == 1);
    CHECK(a.at("v").scale == doctest::Approx(4.0 / std::sqrt(3.0)));
    f.check_outputs([&](const std::string& m, const MatD& X) { return f.apply_checked(m, a.at(m).update(), X); });

    dwio::temp_dir t;
    io::peft_bdlora_adapter w;
    w.config = a.config;
    for (const auto& m : a.modules()) w.add(m.name, m.update());
    io::write_peft_bdlora_adapter(t.path, w);
    const auto b = io::read_peft_bdlora_adapter(t.path);
    CHECK_FALSE(b.match_strict);
    CHECK(b.target_modules_bd_b == std::vector<std::string>{"q"});
    for (const auto& m : kModules)
      CHECK(dwt::rel_err(dw::materialize(b.at(m).update()), dw::materialize(a.at(m).update())) == 0);
  }
  // PEFT's substring rule: a written name inside another would move that module's side.
  io::peft_bdlora_adapter w;
  const MatF B = MatF::Ones(4, 1), A = MatF::Ones(2, 3), A2 = MatF::Ones(2, 6);
  w.add("blk.q", dw::bd_lora(B, A, dw::bd_side::B, 2));
  w.add("blk.q_big", dw::bd_lora(MatF(MatF::Ones(4, 2)), A2, dw::bd_side::A, 2));
  dwt::check_throws_with<dw::argument_error>([&] { (void)w.to_files(); }, {"blk.q_big", "substring rule"});
}

TEST_CASE("peft TinyLoRA reproduces PEFT 0.21.2 (Σ vᵢPᵢ, weight-tying groups by module order)") {
  {
    kbt_fixture f("peft_tinylora");
    const auto& meta = f.ios.metadata();
    REQUIRE(meta.count("module_order"));
    CHECK(meta.at("module_order") == "q,v,head");
    const auto a = io::read_peft_tinylora_adapter(dwio::fixtures() / "peft_tinylora" / "adapter", kModules);
    REQUIRE(a.size() == 3);
    CHECK(a.config.u == 5);
    CHECK(a.config.groups(3) == 2);  // round(1.5) = 2, as Python's
    CHECK(a.at("q").group == 0);
    CHECK(a.at("v").group == 1);
    CHECK(a.at("head").group == 1);
    f.check_outputs([&](const std::string& m, const MatD& X) { return f.apply_checked(m, a.at(m).update(), X); });
    dwt::check_throws_with<dw::argument_error>(
        [] { (void)io::read_peft_tinylora_adapter(dwio::fixtures() / "peft_tinylora" / "adapter"); },
        {"2 weight-tying groups", "module_order"});
    dwt::check_throws_with<dw::argument_error>(
        [] { (void)io::read_peft_tinylora_adapter(dwio::fixtures() / "peft_tinylora" / "adapter", {"q", "v"}); },
        {"module_order has 2 of the adapter's 3"});

    dwio::temp_dir t;
    io::peft_tinylora_adapter w;
    w.config = a.config;
    for (const auto& m : a.modules()) w.add(m.name, m.update(), m.group);
    dwt::check_throws_with<dw::argument_error>([&] { (void)w.to_files({"v", "q", "head"}); }, {"PEFT puts \"v\""});
    io::write_peft_tinylora_adapter(t.path, w, kModules);
    const auto b = io::read_peft_tinylora_adapter(t.path, kModules);
    for (const auto& m : kModules)
      CHECK(dwt::rel_err(dw::materialize(b.at(m).update()), dw::materialize(a.at(m).update())) == 0);
  }
  {
    kbt_fixture f("peft_tinylora_tied");
    const auto a = io::read_peft_tinylora_adapter(dwio::fixtures() / "peft_tinylora_tied" / "adapter");  // one group
    CHECK(a.at("head").rank() == 3);
    // PEFT's frozen factors are the √S-split truncated SVD of the original W: deltaw's
    // tinylora_factors_dense gives the same B·A and the same column / row norms (the singular
    // vectors' signs are arbitrary).
    for (const auto& m : kModules) {
      CAPTURE(m);
      const auto fz = dw::tinylora_factors_dense(f.W[m], 3);
      const auto& pm = a.at(m);
      const MatD Bp = Eigen::Map<const MatF>(pm.B.view.data(), pm.B.view.rows(), pm.B.view.cols()).cast<double>();
      const MatD Ap = Eigen::Map<const MatF>(pm.A.view.data(), pm.A.view.rows(), pm.A.view.cols()).cast<double>();
      CHECK(dwt::rel_err(MatD(fz.B.cast<double>() * fz.A.cast<double>()), MatD(Bp * Ap)) < 1e-5);
      CHECK(dwt::rel_err(MatD(fz.B.cast<double>().colwise().norm()), MatD(Bp.colwise().norm())) < 1e-5);
      CHECK(dwt::rel_err(MatD(fz.A.cast<double>().rowwise().norm()), MatD(Ap.rowwise().norm())) < 1e-5);
    }
    f.check_outputs([&](const std::string& m, const MatD& X) { return f.apply_checked(m, a.at(m).update(), X); });
  }
}

TEST_CASE("read_peft refers KaSA, BD-LoRA and TinyLoRA adapters to their readers") {
  dwt::check_throws_with<dw::unsupported_error>([] { (void)io::read_peft(dwio::fixtures() / "peft_kasa" / "adapter"); },
                                                {"kasa_config", "read_peft_kasa_adapter"});
  dwt::check_throws_with<dw::unsupported_error>([] { (void)io::read_peft_adapter(dwio::fixtures() / "peft_bdlora" / "adapter"); },
                                                {"use_bdlora", "read_peft_bdlora_adapter"});
  dwt::check_throws_with<dw::unsupported_error>(
      [] { (void)io::read_peft(dwio::fixtures() / "peft_tinylora" / "adapter"); }, {"read_peft_tinylora_adapter"});
  dwt::check_throws_with<dw::format_error>(
      [] { (void)io::read_peft_kasa_adapter(dwio::fixtures() / "peft_bdlora" / "adapter"); }, {"no \"kasa_config\""});
  // A file whose shapes disagree with the config: the module and the shapes are named.
  dwio::temp_dir t;
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors"})
    std::filesystem::copy_file(dwio::fixtures() / "peft_bdlora" / "adapter" / f, t.path / f);
  {
    std::ifstream in(t.path / "adapter_config.json");
    std::stringstream ss;
    ss << in.rdbuf();
    std::string s = ss.str();
    s.replace(s.find("\"nblocks\": 3"), 12, "\"nblocks\": 2");
    dwio::write_text(t.path / "adapter_config.json", s);
  }
  dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft_bdlora_adapter(t.path); },
                                           {"BD-LoRA module \"v\"", "nblocks = 2"});
}
