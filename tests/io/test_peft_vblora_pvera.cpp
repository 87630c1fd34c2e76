// SPDX-License-Identifier: MIT
// VB-LoRA and PVeRA adapters (issue 16): the directories saved by PEFT 0.21.2 itself
// (tools/fixtures_vblora_pvera.py: peft_vblora with full logits, peft_vblora_topk /
// peft_vblora_topk1 with save_only_topk_weights and int16 / uint8 indices, peft_pvera with its
// stored projections) reproduce PEFT's per-layer and whole-model outputs within 1e-5 relative
// through read_peft; PEFT's sampled PVeRA forward is reproduced from the noise it drew;
// deltaw-written directories (logits or top-k only; PVeRA's seeded bases) read back to the
// same ΔW, and a PEFT directory read and rewritten gives the same ΔW; inconsistent files are
// specific errors, and the fuzz seeds (fuzz/corpus/peft_structured/*vblora*, *pvera*) are
// read and applied or refused with a deltaw::error, never a crash.
#include <deltaw/io/peft_adapter.hpp>

#include <Eigen/SVD>

#include <functional>
#include <set>

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;

namespace {

/// Rewrites adapter_model.safetensors of `dir` with `edit` applied to its tensors (name →
/// values, shape, dtype F32 unless listed in ints).
void rewrite(const dwio::fs::path& dir, const std::function<void(io::safetensors_writer&, const io::safetensors_file&)>& edit) {
  const auto f = io::safetensors_file::open(dir / "adapter_model.safetensors");
  io::safetensors_writer w;
  edit(w, f);
  w.write(dir / "adapter_model.safetensors");
}
/// Copies every tensor of f except `skip` into w (as F32 / its integer values).
void copy_except(io::safetensors_writer& w, const io::safetensors_file& f, const std::set<std::string>& skip) {
  for (const auto& t : f.tensors()) {
    if (skip.count(t.name)) continue;
    w.add_raw(t.name, t.dtype, t.shape, f.data(t));
  }
}

}  // namespace

TEST_CASE("peft VB-LoRA and PVeRA reproduce PEFT 0.21.2") {
  for (const char* name : {"peft_vblora", "peft_vblora_topk", "peft_vblora_topk1"}) {
    CAPTURE(name);
    const dwio::peft_model_fixture m(name);
    CHECK(m.adapter.peft_type() == "VBLORA");
    REQUIRE(m.adapter.size() == 3);
    for (const char* mod : dwio::peft_model_fixture::modules) {
      CAPTURE(mod);
      const auto& am = m.adapter.at(mod);
      CHECK(std::string(am.method()) == "VB-LoRA");
      CHECK_FALSE(am.reads_weight());
      const auto W = m.weights.matrix<float>(std::string(mod) + ".weight");
      CHECK(am.out_features() == W.view.rows());
      CHECK(am.in_features() == W.view.cols());
      const auto* v = am.get_if<io::peft_vblora_module>();
      REQUIRE(v);
      // ΔW is B·A of PEFT's factors: its rank is at most r.
      const MatD D = am.update(W.view).materialize().cast<double>();
      Eigen::JacobiSVD<MatD> svd(D);
      CHECK(svd.singularValues().size() > 0);
      if (svd.singularValues().size() > v->r) CHECK(svd.singularValues()(v->r) < 1e-5 * svd.singularValues()(0));
    }
    m.check_outputs_and_merge();
  }
  const auto t = io::read_peft(dwio::fixtures() / "peft_vblora_topk" / "adapter");
  CHECK(t.at("head").get_if<io::peft_vblora_module>()->topk == 3);
  CHECK(t.at("head").get_if<io::peft_vblora_module>()->bank.view.rows() == 300);

  const dwio::peft_model_fixture m("peft_pvera");
  CHECK(m.adapter.peft_type() == "PVERA");
  REQUIRE(m.adapter.size() == 3);
  for (const char* mod : dwio::peft_model_fixture::modules) {
    CAPTURE(mod);
    const auto& am = m.adapter.at(mod);
    CHECK(std::string(am.method()) == "PVeRA");
    const auto* p = am.get_if<io::peft_pvera_module>();
    REQUIRE(p);
    CHECK(p->rank() == 4);
    CHECK(p->lambda_d.view.size() == 8);
    // PEFT's sampled forward (sample_at_inference with a seeded generator): base + branch.
    const auto W = m.weights.matrix<float>(std::string(mod) + ".weight");
    const MatD X = dwio::load_matd(m.io, std::string("x.") + mod), eps = dwio::load_matd(m.io, std::string("eps.") + mod);
    const MatD Ys = dwio::load_matd(m.io, std::string("ys.") + mod);
    const std::vector<double> b = m.weights.values<double>(std::string(mod) + ".bias");
    MatD Y = X * Eigen::Map<const MatF>(W.view.data(), W.view.rows(), W.view.cols()).cast<double>().transpose();
    Y.rowwise() += Eigen::Map<const Eigen::RowVectorXd>(b.data(), Eigen::Index(b.size()));
    Y += p->apply_sampled(W.view.rows(), X, eps);
    CHECK(dwt::rel_err(Y, Ys) < 1e-5);
    CHECK(dwt::rel_err(Ys, dwio::load_matd(m.io, std::string("y.") + mod)) > 1e-3);  // the noise mattered
  }
  m.check_outputs_and_merge();
}

TEST_CASE("peft VB-LoRA and PVeRA: deltaw writes, deltaw reads the same ΔW") {
  const Eigen::Index r = 2, L = 3, n = 9;
  // Layers 12 → 15 → 6 (in/L = 4, 5; out/L = 5, 2).
  const MatF bank = dwt::random<MatF>(n, L, 1);
  const MatF la1 = MatF(3 * dwt::random<MatF>(r * 4, n, 2)), lb1 = MatF(3 * dwt::random<MatF>(5 * r, n, 3));
  const MatF la2 = MatF(3 * dwt::random<MatF>(r * 5, n, 4)), lb2 = MatF(3 * dwt::random<MatF>(2 * r, n, 5));
  const auto u1 = dw::vblora(la1, lb1, bank, r, 3), u2 = dw::vblora(la2, lb2, bank, r, 3);
  const MatF W1 = dwt::random<MatF>(15, 12, 6), W2 = dwt::random<MatF>(6, 15, 7);
  for (bool topk_only : {false, true}) {
    CAPTURE(topk_only);
    io::peft_structured_adapter a;
    a.add_vblora("layers.0.up", u1, topk_only);
    a.add_vblora("layers.0.down", u2, topk_only);
    dwio::temp_dir t;
    io::write_peft_structured_adapter(t.path, a);
    const auto f = io::safetensors_file::open(t.path / "adapter_model.safetensors");
    if (topk_only) {
      CHECK(f.at("base_model.model.layers.0.up.vblora_logits_A_topk_indices").dtype == io::st_dtype::U8);
      CHECK(f.at("base_model.model.layers.0.up.vblora_logits_A_topk_indices").shape == std::vector<std::uint64_t>{2, 4, 3});
      CHECK(f.at("base_model.model.layers.0.up.vblora_logits_B_topk_weights").shape == std::vector<std::uint64_t>{5, 2, 2});
    } else {
      CHECK(f.at("base_model.model.layers.0.down.vblora_logits_B").shape == std::vector<std::uint64_t>{2, 2, 9});
    }
    CHECK(f.at("base_model.vblora_vector_bank").shape == std::vector<std::uint64_t>{9, 3});
    const auto b = io::read_peft(t.path);
    CHECK(b.peft_type() == "VBLORA");
    CHECK(b.structured()->config.raw["num_vectors"] == 9);
    CHECK(b.structured()->config.raw["topk"] == 3);
    CHECK(b.structured()->config.raw["save_only_topk_weights"] == topk_only);
    CHECK(dwt::rel_err(b.at("layers.0.up").update(W1).materialize(), dw::materialize(u1)) < 1e-6);
    CHECK(dwt::rel_err(b.at("layers.0.down").update(W2).materialize(), dw::materialize(u2)) < 1e-6);
  }
  {  // another bank, r or topk in one adapter: refused
    io::peft_structured_adapter a;
    a.add_vblora("x", u1);
    const MatF bank2 = dwt::random<MatF>(n, L, 9);
    dwt::check_throws_with<dw::argument_error>([&] { a.add_vblora("y", dw::vblora(la2, lb2, bank2, r, 3)); },
                                               {"add_vblora", "\"y\"", "another vector bank"});
    dwt::check_throws_with<dw::argument_error>([&] { a.add_vblora("y", dw::vblora(la2, lb2, bank, r, 2)); }, {"topk = 2"});
  }
  {  // PVeRA from seeded bases
    const auto basis = dw::pvera_shared_basis(11, 3, 15, 15);
    const Eigen::VectorXf ld1 = dwt::random<MatF>(6, 1, 10).col(0), lbv1 = dwt::random<MatF>(15, 1, 11).col(0);
    const Eigen::VectorXf ld2 = dwt::random<MatF>(6, 1, 12).col(0), lbv2 = dwt::random<MatF>(6, 1, 13).col(0);
    const auto p1 = dw::pvera(basis, 15, 12, ld1, lbv1), p2 = dw::pvera(basis, 6, 15, ld2, lbv2);
    io::peft_structured_adapter a;
    a.add_pvera("layers.0.up", p1);
    a.add_pvera("layers.0.down", p2);
    dwt::check_throws_with<dw::argument_error>(
        [&] { a.add_pvera("z", dw::pvera(dw::pvera_shared_basis(12, 3, 15, 15), 6, 15, ld2, lbv2)); }, {"other shared bases"});
    dwio::temp_dir t;
    io::write_peft_structured_adapter(t.path, a);
    const auto f = io::safetensors_file::open(t.path / "adapter_model.safetensors");
    CHECK(f.at("base_model.pvera_A").shape == std::vector<std::uint64_t>{6, 15});
    CHECK(f.at("base_model.pvera_B").shape == std::vector<std::uint64_t>{15, 3});
    const auto b = io::read_peft(t.path);
    CHECK(b.peft_type() == "PVERA");
    CHECK(b.structured()->config.projection_prng_key == 11);
    CHECK(dwt::rel_err(b.at("layers.0.up").update(W1).materialize(), dw::materialize(p1)) < 1e-6);
    CHECK(dwt::rel_err(b.at("layers.0.down").update(W2).materialize(), dw::materialize(p2)) < 1e-6);
    // The stored log-variance rows are the seeded basis' rows r..2r−1: the sampled paths agree.
    const MatD X = dwt::random<MatD>(4, 12, 20), eps = dwt::random<MatD>(4, 3, 21);
    MatD Y = MatD::Zero(4, 15);
    dw::cpu::pvera_apply_sampled<double>(dw::pvera(basis, 15, 12, Eigen::VectorXd(ld1.cast<double>()),
                                                   Eigen::VectorXd(lbv1.cast<double>())),
                                         dw::view(X), dw::view(eps), dw::view(Y));
    CHECK(dwt::rel_err(b.at("layers.0.up").get_if<io::peft_pvera_module>()->apply_sampled(15, X, eps), Y) < 1e-6);
  }
  // A PEFT directory read and written back (the top-k form and PVeRA's torch bases kept).
  for (const char* name : {"peft_vblora_topk", "peft_vblora", "peft_pvera"}) {
    CAPTURE(name);
    const auto a = io::read_peft(dwio::fixtures() / name / "adapter");
    dwio::temp_dir t;
    io::write_peft_structured_adapter(t.path, *a.structured());
    const auto b = io::read_peft(t.path);
    const auto weights = io::safetensors_file::open(dwio::fixtures() / name / "model.safetensors");
    for (const char* mod : dwio::peft_model_fixture::modules) {
      const auto W = weights.matrix<float>(std::string(mod) + ".weight");
      CHECK(dwt::rel_err(b.at(mod).update(W.view).materialize(), a.at(mod).update(W.view).materialize()) < 1e-6);
    }
  }
}

TEST_CASE("peft VB-LoRA and PVeRA: errors") {
  auto with_dir = [](const char* name, auto&& edit_config, auto&& edit_tensors, auto&& expect) {
    dwio::temp_dir t;
    for (const char* f : {"adapter_config.json", "adapter_model.safetensors"})
      dwio::fs::copy_file(dwio::fixtures() / name / "adapter" / f, t.path / f);
    const auto raw = io::read_file(t.path / "adapter_config.json");
    auto cfg = io::json::parse(std::string(reinterpret_cast<const char*>(raw.bytes.data()), raw.bytes.size()));
    edit_config(cfg);
    dwio::write_text(t.path / "adapter_config.json", cfg.dump());
    rewrite(t.path, edit_tensors);
    expect(t.path);
  };
  auto none = [](auto&...) {};
  auto copy_all = [](io::safetensors_writer& w, const io::safetensors_file& f) { copy_except(w, f, {}); };
  const std::string ia = "base_model.model.head.vblora_logits_A_topk_indices";
  const std::string wa = "base_model.model.head.vblora_logits_A_topk_weights";
  // The config's bank shape against the stored bank.
  with_dir("peft_vblora", [](io::json& c) { c["num_vectors"] = 12; }, copy_all, [](const auto& p) {
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(p); }, {"vblora_vector_bank is [11, 3]", "[12, 3]"});
  });
  // fan_in_fan_out
  with_dir("peft_vblora", [](io::json& c) { c["fan_in_fan_out"] = true; }, copy_all, [](const auto& p) {
    dwt::check_throws_with<dw::unsupported_error>([&] { (void)io::read_peft(p); }, {"fan_in_fan_out for VBLORA"});
  });
  // An index out of range, a repeated index, weights above 1.
  auto edit_indices = [&](auto&& change) {
    return [&, change](io::safetensors_writer& w, const io::safetensors_file& f) {
      copy_except(w, f, {ia, wa});
      auto iv = f.values<double>(ia);
      auto wv = f.values<double>(wa);
      change(iv, wv);
      std::vector<std::int16_t> i16(iv.begin(), iv.end());
      std::vector<float> w32(wv.begin(), wv.end());
      w.add_raw(ia, io::st_dtype::I16, f.at(ia).shape, std::as_bytes(std::span<const std::int16_t>(i16)));
      w.add_raw(wa, io::st_dtype::F32, f.at(wa).shape, std::as_bytes(std::span<const float>(w32)));
    };
  };
  with_dir("peft_vblora_topk", none, edit_indices([](auto& i, auto&) { i[1] = 300; }), [](const auto& p) {
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(p); }, {"\"head\"", "outside [0, num_vectors = 300)"});
  });
  with_dir("peft_vblora_topk", none, edit_indices([](auto& i, auto&) { i[1] = i[0]; }), [](const auto& p) {
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(p); }, {"repeats bank index"});
  });
  with_dir("peft_vblora_topk", none, edit_indices([](auto&, auto& w) { w[0] = 0.7; w[1] = 0.6; }), [](const auto& p) {
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(p); }, {"sum above 1"});
  });
  // Missing weights for a top-k factor.
  with_dir("peft_vblora_topk", none, [&](io::safetensors_writer& w, const io::safetensors_file& f) { copy_except(w, f, {wa}); },
           [](const auto& p) {
             dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(p); }, {"\"head\" needs either", "_topk_weights"});
           });
  // PVeRA: no stored projections; λ_d of the wrong length; an unknown key.
  with_dir("peft_pvera", [](io::json& c) { c["save_projection"] = false; }, copy_all, [](const auto& p) {
    dwt::check_throws_with<dw::unsupported_error>([&] { (void)io::read_peft(p); }, {"PVERA", "save_projection = false"});
  });
  with_dir("peft_pvera", none,
           [&](io::safetensors_writer& w, const io::safetensors_file& f) {
             const std::string k = "base_model.model.head.pvera_lambda_d";
             copy_except(w, f, {k});
             const std::vector<float> v(5, 0.5f);
             w.add_raw(k, io::st_dtype::F32, {5}, std::as_bytes(std::span<const float>(v)));
           },
           [](const auto& p) {
             dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(p); }, {"\"head\"", "pvera_lambda_d is [5]", "[8]"});
           });
  with_dir("peft_pvera", none,
           [&](io::safetensors_writer& w, const io::safetensors_file& f) {
             copy_except(w, f, {});
             const std::vector<float> v(2, 0.5f);
             w.add_raw("base_model.model.head.pvera_extra", io::st_dtype::F32, {2}, std::as_bytes(std::span<const float>(v)));
           },
           [](const auto& p) {
             dwt::check_throws_with<dw::format_error>([&] { (void)io::read_peft(p); }, {"unknown key", "pvera_extra", "PVERA"});
           });
}

TEST_CASE("peft VB-LoRA and PVeRA: the fuzz seeds are read and applied, or refused with a deltaw::error") {
  int read = 0, refused = 0;
  for (const auto& e : dwio::fs::directory_iterator(dwio::corpus() / "peft_structured")) {
    const std::string n = e.path().filename().string();
    if (n.find("vblora") == std::string::npos && n.find("pvera") == std::string::npos) continue;
    CAPTURE(n);
    const auto b = dwio::slurp(e.path());
    REQUIRE(b.size() >= 4);
    std::uint32_t len = 0;
    std::memcpy(&len, b.data(), 4);
    REQUIRE(4 + std::size_t(len) <= b.size());
    const std::string cfg(reinterpret_cast<const char*>(b.data()) + 4, len);
    std::vector<std::byte> st(b.begin() + 4 + std::ptrdiff_t(len), b.end());
    try {
      const auto a = io::parse_peft(cfg, io::safetensors_file::parse(std::move(st)));
      for (const auto& m : a.modules()) {
        const index_t out = m.out_features().value_or(4), in = m.in_features().value_or(3);
        const MatF W = dwt::random<MatF>(out, in, 1), X = dwt::random<MatF>(2, in, 2);
        try {
          CHECK(m.apply(W, X).allFinite());
        } catch (const dw::error&) {  // a layer the module does not fit
        }
      }
      ++read;
    } catch (const dw::error&) {
      ++refused;
    }
  }
  CHECK(read >= 4);     // the four fixtures
  CHECK(refused >= 8);  // the edits
}
