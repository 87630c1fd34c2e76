// Structured PEFT adapters (LoKr, MiSS / Bone bat, VeRA, RandLoRA): directories saved by
// PEFT 0.21.2 itself (tests/fixtures/peft_{lokr,miss,vera,randlora}*, tools/make_fixtures.py)
// reproduce PEFT's forward outputs within 1e-5 relative; deltaw-written directories read
// back to the same ΔW (dense, double); unsupported and inconsistent inputs are specific
// errors.
#include <deltaw/io/peft_structured.hpp>

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;

namespace {

struct fixture {
  io::safetensors_file weights, io;
  io::peft_structured_adapter adapter;
  explicit fixture(const std::string& name)
      : weights(io::safetensors_file::open(dwio::fixtures() / name / "model.safetensors")),
        io(io::safetensors_file::open(dwio::fixtures() / name / "io.safetensors")),
        adapter(io::read_peft_structured_adapter(dwio::fixtures() / name / "adapter")) {}
};

MatD add_bias(MatD y, const std::vector<double>& b) {
  for (Eigen::Index i = 0; i < y.rows(); ++i)
    for (Eigen::Index j = 0; j < y.cols(); ++j) y(i, j) += b[std::size_t(j)];
  return y;
}

// One adapted nn.Linear as deltaw computes it: X·(W + ΔW)ᵀ + b, ΔW never formed.
MatD linear(const fixture& m, const std::string& module, const MatD& X) {
  const auto W = m.weights.matrix<float>(module + ".weight");
  const MatF Xf = X.cast<float>();
  MatF Y;
  m.adapter.visit(module, W.view, [&](const auto& u) { Y = dw::apply(W.view + u, Xf); });
  return add_bias(Y.cast<double>(), m.weights.values<double>(module + ".bias"));
}

// The same in double with ΔW materialised: an independent path through materialize().
MatD linear_dense(const fixture& m, const std::string& module, const MatD& X) {
  const auto W = m.weights.matrix<float>(module + ".weight");
  const MatD Wd = Eigen::Map<const MatF>(W.view.data(), W.view.rows(), W.view.cols()).cast<double>();
  MatD dW;
  m.adapter.visit(module, W.view, [&](const auto& u) { dW = dw::materialize(u).template cast<double>(); });
  return add_bias(X * (Wd + dW).transpose(), m.weights.values<double>(module + ".bias"));
}

void check_against_peft(const std::string& name, const std::string& type) {
  CAPTURE(name);
  const fixture m(name);
  CHECK(m.adapter.config.peft_type == type);
  REQUIRE(m.adapter.size() == 3);
  for (const char* mod : {"blocks.0.q", "blocks.0.v", "head"}) {
    CAPTURE(mod);
    const MatD X = dwio::load_matd(m.io, std::string("x.") + mod);
    const MatD Y = dwio::load_matd(m.io, std::string("y.") + mod);
    CHECK(dwt::rel_err(linear(m, mod, X), Y) < 1e-5);
    CHECK(dwt::rel_err(linear_dense(m, mod, X), Y) < 1e-5);
  }
  // The Tiny model: q -> relu -> v -> relu -> head.
  const MatD h1 = linear(m, "blocks.0.q", dwio::load_matd(m.io, "x")).cwiseMax(0.0);
  const MatD h2 = linear(m, "blocks.0.v", h1).cwiseMax(0.0);
  CHECK(dwt::rel_err(linear(m, "head", h2), dwio::load_matd(m.io, "y")) < 1e-5);
}

template <class U>
MatD dense_of(const U& u) {
  return dw::materialize(u).template cast<double>();
}

}  // namespace

TEST_CASE("peft structured: LoKr (dense w1, low-rank w2, rank/alpha patterns) reproduces PEFT") {
  check_against_peft("peft_lokr", "LOKR");
  const fixture m("peft_lokr");
  // r = 2, alpha = 3, rank_pattern {"head": 1}, alpha_pattern {"v": 5}
  const auto& q = m.adapter.get<io::peft_lokr_module>("blocks.0.q");
  const auto& v = m.adapter.get<io::peft_lokr_module>("blocks.0.v");
  const auto& h = m.adapter.get<io::peft_lokr_module>("head");
  CHECK(q.scale == doctest::Approx(1.5));
  CHECK(v.scale == doctest::Approx(2.5));
  CHECK(h.rank == 1);
  CHECK(h.scale == doctest::Approx(3.0));
  CHECK_FALSE(q.w1_b.has_value());
  CHECK(q.w2_b.has_value());
  CHECK(q.out_features() == 24);
  CHECK(q.in_features() == 16);
  // The stored factors follow PEFT's layout rule, as lokr_shapes computes it.
  const auto L = dw::lokr_shapes(24, 16, 2);
  CHECK(q.w1.view.rows() == L.a);
  CHECK(q.w2.view.rows() == L.b);
  CHECK(L.w1_dense);
  CHECK_FALSE(L.w2_dense);
  // Zero-copy over the mapped file.
  CHECK(q.w1.owner != nullptr);
}

TEST_CASE("peft structured: LoKr with decompose_both (both factors low rank) reproduces PEFT") {
  check_against_peft("peft_lokr_both", "LOKR");
  const fixture m("peft_lokr_both");
  CHECK(m.adapter.config.decompose_both);
  const auto& q = m.adapter.get<io::peft_lokr_module>("blocks.0.q");
  CHECK(q.w1_b.has_value());
  CHECK(q.w2_b.has_value());
}

TEST_CASE("peft structured: LoKr with decompose_factor (both factors dense) reproduces PEFT") {
  check_against_peft("peft_lokr_dense", "LOKR");
  const fixture m("peft_lokr_dense");
  CHECK(m.adapter.config.decompose_factor == 2);
  const auto& q = m.adapter.get<io::peft_lokr_module>("blocks.0.q");
  CHECK_FALSE(q.w1_b.has_value());
  CHECK_FALSE(q.w2_b.has_value());
  CHECK(q.w1.view.rows() == 2);
}

TEST_CASE("peft structured: MiSS default (partial last block), mini and bat reproduce PEFT") {
  check_against_peft("peft_miss", "MISS");
  check_against_peft("peft_miss_mini", "MISS");
  check_against_peft("peft_miss_bat", "MISS");
  const fixture a("peft_miss"), b("peft_miss_mini"), c("peft_miss_bat");
  CHECK(a.adapter.config.miss == io::miss_kind::miss);
  CHECK(b.adapter.config.miss == io::miss_kind::mini);
  CHECK(b.adapter.config.mini_r == 4);
  CHECK(c.adapter.config.miss == io::miss_kind::bat);
  const auto& bat = c.adapter.get<io::peft_miss_module>("blocks.0.q");
  CHECK(bat.block.view.rows() == 24);
  CHECK(bat.r() == 4);
  const auto W = c.weights.matrix<float>("blocks.0.q.weight");
  dwt::check_throws_with<dw::argument_error>([&] { (void)bat.update(24, 16); }, {"Bone bat", "bat(W)"});
  dwt::check_throws_with<dw::argument_error>(
      [&] { (void)a.adapter.get<io::peft_miss_module>("head").bat(W.view); }, {"not Bone bat"});
  dwt::check_throws_with<dw::shape_error>(
      [&] { (void)a.adapter.get<io::peft_miss_module>("head").update(20, 8); }, {"[r, out]"});
}

TEST_CASE("peft structured: VeRA from stored bases (save_projection) reproduces PEFT") {
  check_against_peft("peft_vera", "VERA");
  const fixture m("peft_vera");
  CHECK(m.adapter.basis_A.view.rows() == 4);
  CHECK(m.adapter.basis_A.view.cols() == 24);
  CHECK(m.adapter.basis_B.view.rows() == 24);
  const auto& q = m.adapter.get<io::peft_vera_module>("blocks.0.q");
  dwt::check_throws_with<dw::shape_error>([&] { (void)q.update(20, 16); }, {"blocks.0.q", "does not fit"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)q.update(24, 25); }, {"does not fit"});
}

TEST_CASE("peft structured: RandLoRA dense and sparse from stored bases reproduce PEFT") {
  check_against_peft("peft_randlora", "RANDLORA");
  check_against_peft("peft_randlora_sparse", "RANDLORA");
  const fixture m("peft_randlora");
  CHECK(m.adapter.config.alpha == 6);
  CHECK(m.adapter.randlora_bases == 6);
  const auto& v = m.adapter.get<io::peft_randlora_module>("blocks.0.v");  // [20, 24]: out < in
  CHECK(v.num_bases() == 5);
  CHECK(v.scale == doctest::Approx(1.5));
  dwt::check_throws_with<dw::shape_error>([&] { (void)v.update(24, 21); }, {"does not fit"});
  CHECK(fixture("peft_randlora_sparse").adapter.config.sparse);
}

TEST_CASE("peft structured: deltaw writes, deltaw reads the same ΔW (every type)") {
  dwio::temp_dir tmp;
  SUBCASE("LoKr: dense and low-rank factors, per-module r and alpha") {
    io::peft_structured_adapter a;
    // [24, 16] with r = 2: w1 [4, 4] dense, w2 = [6, 2]·[2, 4]; [8, 20] with r = 1.
    const MatF w1 = dwt::random<MatF>(4, 4, 1), w2a = dwt::random<MatF>(6, 2, 2), w2b = dwt::random<MatF>(2, 4, 3);
    const MatF h1 = dwt::random<MatF>(2, 4, 4), h2a = dwt::random<MatF>(4, 1, 5), h2b = dwt::random<MatF>(1, 5, 6);
    const auto uq = dw::lokr(w1, dw::kron_factor(w2a, w2b), dw::alpha(3), 2);
    const auto uh = dw::lokr(h1, dw::kron_factor(h2a, h2b), dw::alpha(7), 1);
    a.add_lokr("blocks.0.q", uq, 2);
    a.add_lokr("head", uh, 1);
    io::write_peft_structured_adapter(tmp.path, a);
    const auto b = io::read_peft_structured_adapter(tmp.path);
    CHECK(b.config.peft_type == "LOKR");
    MatD got;
    b.get<io::peft_lokr_module>("blocks.0.q").visit([&](const auto& u) { got = dense_of(u); });
    CHECK(dwt::rel_err(got, dense_of(uq)) < 1e-6);
    b.get<io::peft_lokr_module>("head").visit([&](const auto& u) { got = dense_of(u); });
    CHECK(dwt::rel_err(got, dense_of(uh)) < 1e-6);
    CHECK(b.get<io::peft_lokr_module>("head").rank == 1);
    // A layout PEFT would not build for the layer is refused at add time.
    io::peft_structured_adapter c;
    dwt::check_throws_with<dw::argument_error>(
        [&] { c.add_lokr("x", dw::lokr(dwt::random<MatF>(6, 4, 7), dwt::random<MatF>(4, 4, 8), dw::alpha(1), 2), 2); },
        {"PEFT's layout", "w1 [4, 4]"});
  }
  SUBCASE("MiSS default, mini, and bat") {
    const MatF D = dwt::random<MatF>(3, 24, 11), Dm = dwt::random<MatF>(3, 4, 12), bb = dwt::random<MatF>(24, 4, 13);
    const MatF W = dwt::random<MatF>(24, 16, 14);
    const auto um = dw::miss(D, 16);
    const auto umini = dw::miss_mini(Dm, 24, 16);
    const auto ubat = dw::bone_bat(W, bb);
    const struct {
      const char* dir;
      std::function<void(io::peft_structured_adapter&)> add;
      MatD expect;
    } cases[] = {{"miss", [&](auto& a) { a.add_miss("q", um); }, dense_of(um)},
                 {"mini", [&](auto& a) { a.add_miss("q", umini); }, dense_of(umini)},
                 {"bat", [&](auto& a) { a.add_bone_bat("q", ubat); }, dense_of(ubat)}};
    for (const auto& c : cases) {
      CAPTURE(c.dir);
      io::peft_structured_adapter a;
      c.add(a);
      io::write_peft_structured_adapter(tmp.path / c.dir, a);
      const auto b = io::read_peft_structured_adapter(tmp.path / c.dir);
      MatD got;
      b.visit("q", dw::view(W), [&](const auto& u) { got = dense_of(u); });
      CHECK(dwt::rel_err(got, c.expect) < 1e-6);
    }
    io::peft_structured_adapter a;
    a.add_miss("q", um);
    dwt::check_throws_with<dw::argument_error>([&] { a.add_miss("v", umini); }, {"MiSS module \"v\"", "mini_r"});
    dwt::check_throws_with<dw::argument_error>([&] { a.add_miss("q", um); }, {"added twice"});
  }
  SUBCASE("VeRA: deltaw's seeded bases are stored and read back as low_rank") {
    const auto basis = dw::vera_shared_basis(42, 4, 24, 24);
    const Eigen::VectorXf d = dwt::random<MatF>(4, 1, 21).col(0), bq = dwt::random<MatF>(24, 1, 22).col(0),
                          bv = dwt::random<MatF>(20, 1, 23).col(0);
    const auto uq = dw::vera(basis, 24, 16, d, bq);
    const auto uv = dw::vera(basis, 20, 24, d, bv);
    io::peft_structured_adapter a;
    a.add_vera("blocks.0.q", uq);
    a.add_vera("blocks.0.v", uv);
    dwt::check_throws_with<dw::argument_error>(
        [&] { a.add_vera("head", dw::vera(dw::vera_shared_basis(43, 4, 24, 24), 8, 20, d, bv.head(8).eval())); },
        {"other shared bases"});
    dwt::check_throws_with<dw::argument_error>([&] { a.add_miss("x", dw::miss(MatF(dwt::random<MatF>(2, 8, 1)), 4)); },
                                               {"MISS", "VERA adapter"});
    io::write_peft_structured_adapter(tmp.path, a);
    const auto b = io::read_peft_structured_adapter(tmp.path);
    CHECK(b.config.projection_prng_key == 42);
    CHECK(dwt::rel_err(dense_of(b.get<io::peft_vera_module>("blocks.0.q").update(24, 16)), dense_of(uq)) < 1e-6);
    CHECK(dwt::rel_err(dense_of(b.get<io::peft_vera_module>("blocks.0.v").update(20, 24)), dense_of(uv)) < 1e-6);
  }
  SUBCASE("RandLoRA (both orientations, sparse bases)") {
    for (auto kind : {dw::randlora_kind::dense, dw::randlora_kind::sparse}) {
      const auto basis = dw::randlora_shared_basis(7, 4, 24, 24, kind);
      const MatF lq = dwt::random<MatF>(4, 4, 31), gq = dwt::random<MatF>(4, 16, 32);
      const MatF lv = dwt::random<MatF>(4, 5, 33), gv = dwt::random<MatF>(5, 20, 34);
      const auto uq = dw::randlora(basis, 24, 16, lq, gq, dw::alpha(6));
      const auto uv = dw::randlora(basis, 20, 24, lv, gv, dw::alpha(6));
      io::peft_structured_adapter a;
      a.add_randlora("blocks.0.q", uq);
      a.add_randlora("blocks.0.v", uv);
      dwt::check_throws_with<dw::argument_error>(
          [&] { a.add_randlora("head", dw::randlora(basis, 8, 20, MatF(lv.leftCols(2)), MatF(gv.topRows(2).leftCols(8)), dw::alpha(5))); },
          {"RandLoRA has no alpha_pattern"});
      const auto dir = tmp.path / (kind == dw::randlora_kind::dense ? "dense" : "sparse");
      io::write_peft_structured_adapter(dir, a);
      const auto b = io::read_peft_structured_adapter(dir);
      CHECK(b.config.sparse == (kind == dw::randlora_kind::sparse));
      CHECK(dwt::rel_err(dense_of(b.get<io::peft_randlora_module>("blocks.0.q").update(24, 16)), dense_of(uq)) < 1e-6);
      CHECK(dwt::rel_err(dense_of(b.get<io::peft_randlora_module>("blocks.0.v").update(20, 24)), dense_of(uv)) < 1e-6);
    }
  }
}

TEST_CASE("peft structured: unsupported and inconsistent inputs are specific errors") {
  const auto cfg = [](const std::string& body) { return io::parse_peft_structured_config(body); };
  dwt::check_throws_with<dw::unsupported_error>([&] { cfg(R"({"peft_type": "LN_TUNING", "r": 2})"); },
                                                {"LN_TUNING", "not a structured type"});
  dwt::check_throws_with<dw::unsupported_error>(
      [&] { cfg(R"({"peft_type": "VERA", "r": 4, "save_projection": false, "projection_prng_key": 3})"); },
      {"save_projection = false", "torch.Generator", "projection_prng_key = 3"});
  dwt::check_throws_with<dw::unsupported_error>(
      [&] { cfg(R"({"peft_type": "RANDLORA", "r": 4, "save_projection": false})"); }, {"RANDLORA", "save_projection"});
  dwt::check_throws_with<dw::unsupported_error>([&] { cfg(R"({"peft_type": "MISS", "r": 4, "bias": "all"})"); },
                                                {"bias = \"all\""});
  dwt::check_throws_with<dw::unsupported_error>(
      [&] { cfg(R"({"peft_type": "LOKR", "r": 4, "use_effective_conv2d": true})"); }, {"use_effective_conv2d"});
  dwt::check_throws_with<dw::unsupported_error>(
      [&] { cfg(R"({"peft_type": "VERA", "r": 4, "fan_in_fan_out": true})"); }, {"fan_in_fan_out for VERA"});
  dwt::check_throws_with<dw::unsupported_error>(
      [&] { cfg(R"({"peft_type": "MISS", "r": 4, "modules_to_save": ["head"]})"); }, {"modules_to_save"});
  dwt::check_throws_with<dw::format_error>([&] { cfg(R"({"peft_type": "MISS", "r": 4, "init_weights": "pissa"})"); },
                                           {"init_weights", "pissa"});
  dwt::check_throws_with<dw::rank_error>([&] { cfg(R"({"peft_type": "LOKR", "r": 0})"); }, {"\"r\""});

  // Tensor-level problems, on in-memory files.
  const auto lokr_cfg = cfg(R"({"peft_type": "LOKR", "r": 2, "alpha": 2})");
  const auto build = [&](const std::function<void(io::safetensors_writer&)>& add, const io::peft_structured_config& c) {
    io::safetensors_writer w;
    add(w);
    return io::peft_structured_adapter::from_safetensors(c, io::safetensors_file::parse(w.serialize()));
  };
  const MatF m44 = dwt::random<MatF>(4, 4, 1), m62 = dwt::random<MatF>(6, 2, 2), m24 = dwt::random<MatF>(2, 4, 3);
  dwt::check_throws_with<dw::format_error>(
      [&] { build([&](auto& w) { w.add("base_model.model.q.lokr_w1", m44); w.add("base_model.model.q.lokr_w2_a", m62); }, lokr_cfg); },
      {"module \"q\"", "lokr_w2_a and lokr_w2_b"});
  dwt::check_throws_with<dw::format_error>(
      [&] {
        build([&](auto& w) {
          w.add("base_model.model.q.lokr_w1", m44);
          w.add("base_model.model.q.lokr_w2_a", MatF(dwt::random<MatF>(6, 3, 4)));
          w.add("base_model.model.q.lokr_w2_b", MatF(dwt::random<MatF>(3, 4, 5)));
        }, lokr_cfg);
      },
      {"r = 2", "lokr_w2_a"});
  dwt::check_throws_with<dw::unsupported_error>(
      [&] {
        build([&](auto& w) {
          w.add("base_model.model.q.lokr_w1", m44);
          w.add("base_model.model.q.lokr_w2_a", m62);
          w.add("base_model.model.q.lokr_w2_b", m24);
          w.add("base_model.model.q.lokr_t2", m44);
        }, lokr_cfg);
      },
      {"lokr_t2"});
  dwt::check_throws_with<dw::format_error>(
      [&] { build([&](auto& w) { w.add("base_model.model.q.lora_A.weight", m44); }, lokr_cfg); },
      {"unknown key", "lora_A", "LOKR adapter"});
  const auto vera_cfg = cfg(R"({"peft_type": "VERA", "r": 4})");
  const Eigen::VectorXf ones4 = Eigen::VectorXf::Ones(4);
  dwt::check_throws_with<dw::format_error>(
      [&] {
        build([&](auto& w) {
          w.add("base_model.model.q.vera_lambda_b", dw::vview(ones4));
          w.add("base_model.model.q.vera_lambda_d", dw::vview(ones4));
        }, vera_cfg);
      },
      {"save_projection needs base_model.vera_A"});
  // An empty randlora_B with a huge dimension: N·r must not wrap around (found by fuzzing).
  const auto randlora_cfg = cfg(R"({"peft_type": "RANDLORA", "r": 4})");
  const std::vector<float> a8(8, 0.5f);
  dwt::check_throws_with<dw::format_error>(
      [&] {
        build([&](auto& w) {
          w.add_raw("base_model.randlora_A", io::st_dtype::F32, {4, 1, 2}, std::as_bytes(std::span(a8)));
          w.add_raw("base_model.randlora_B", io::st_dtype::F32, {0, std::uint64_t(1) << 62, 4}, {});
        }, randlora_cfg);
      },
      {"randlora_B", "above 2^31"});
  const auto bat_cfg = cfg(R"({"peft_type": "MISS", "r": 4, "init_weights": "bat"})");
  dwt::check_throws_with<dw::format_error>(
      [&] { build([&](auto& w) { w.add("base_model.model.q.miss_block", m44); }, bat_cfg); }, {"[out/r, r, r]"});
  dwt::check_throws_with<dw::io_error>(
      [&] { (void)io::read_peft_structured_adapter(dwio::fixtures() / "peft_miss"); }, {"adapter_config.json"});
}
