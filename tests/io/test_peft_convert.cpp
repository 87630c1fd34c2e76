// SPDX-License-Identifier: MIT
// io::convert_to_lora (issue 16: any adapter as a plain LoRA) against PEFT 0.21.2's own
// convert_to_lora on the same fixtures (tools/make_convert_fixtures.py wrote PEFT's LoRA
// state dicts into tests/fixtures/convert_to_lora/): per module the same rank and the same
// product B·A within 1e-5 relative; the written directory read back as a LoRA adapter; and
// the W-dependent types PEFT refuses (OFT, HRA, IA³) converted against their dense ΔW.
#include <deltaw/io/peft_convert.hpp>

#include <Eigen/SVD>

#include "io/io_test_util.hpp"

namespace {
namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;

MatD to_d(const dw::matrix_view<const float>& v) {
  MatD M(v.rows(), v.cols());
  for (Eigen::Index i = 0; i < M.rows(); ++i)
    for (Eigen::Index j = 0; j < M.cols(); ++j) M(i, j) = v(i, j);
  return M;
}

std::map<std::string, dw::matrix_view<const float>> fixture_weights(const dwio::peft_model_fixture& f) {
  std::map<std::string, dw::matrix_view<const float>> w;
  for (const char* m : dwio::peft_model_fixture::modules) {
    const std::string n = std::string(m) + ".weight";
    w.emplace(n, f.weights.matrix<float>(n).view);
  }
  return w;
}

MatD product(const io::peft_lora_module& m) { return m.scale * to_d(m.B.view) * to_d(m.A.view); }

/// The dense ΔW of a fixture's module (deltaw's materialize, which the fixture tests check
/// against PEFT's outputs).
MatD dense_delta(const dwio::peft_model_fixture& f, const std::string& module) {
  const auto W = f.weights.matrix<float>(module + ".weight");
  return f.adapter.at(module).update(W.view).materialize().cast<double>();
}

}  // namespace

TEST_CASE("convert_to_lora: the LoRA PEFT's convert_to_lora makes, module by module (LoKr, LoHa, VeRA, RandLoRA, MiSS, Bone bat)") {
  struct peft_case {
    const char* fixture;
    const char* tag;
    int rank;       // > 0: fixed
    double energy;  // else
  };
  const peft_case cases[] = {
      {"peft_lokr", "r2", 2, 0},      {"peft_lokr", "e90", 0, 0.9},     {"peft_loha", "r2", 2, 0},
      {"peft_loha", "e90", 0, 0.9},   {"peft_vera", "r2", 2, 0},        {"peft_vera", "e90", 0, 0.9},
      {"peft_randlora", "r3", 3, 0},  {"peft_randlora", "e95", 0, 0.95}, {"peft_miss", "r3", 3, 0},
      {"peft_miss_bat", "r2", 2, 0},  {"peft_miss_bat", "e80", 0, 0.8},
  };
  for (const auto& c : cases) {
    CAPTURE(c.fixture);
    CAPTURE(c.tag);
    const dwio::peft_model_fixture f(c.fixture);
    const auto ref = io::safetensors_file::open(dwio::fixtures() / "convert_to_lora" /
                                                (std::string(c.fixture) + "." + c.tag + ".safetensors"));
    const auto W = fixture_weights(f);
    for (bool dense : {false, true}) {
      CAPTURE(dense);
      const io::lora_conversion_options opt{.sketch = {}, .dense = dense};
      const io::peft_adapter lo = c.rank > 0 ? io::convert_to_lora(f.adapter, W, dw::lora_rank{c.rank}, opt)
                                             : io::convert_to_lora(f.adapter, W, dw::energy_fraction{c.energy}, opt);
      REQUIRE(lo.size() == 3);
      for (const char* mod : dwio::peft_model_fixture::modules) {
        CAPTURE(mod);
        const std::string key = std::string("base_model.model.") + mod;
        const MatD A = dwio::load_matd(ref, key + ".lora_A.weight");
        const MatD B = dwio::load_matd(ref, key + ".lora_B.weight");
        const auto& m = lo.at(mod);
        CHECK(m.rank == A.rows());       // PEFT's rank (fixed, or its energy cutoff)
        CHECK(m.scale == 1.0);           // PEFT bakes the scale in: alpha = r
        CHECK(dwt::rel_err(product(m), B * A) < 1e-5);
        if (c.rank > 0) {                // the truncation is the optimal one for this rank
          const MatD D = dense_delta(f, mod);
          Eigen::BDCSVD<Eigen::MatrixXd> svd(Eigen::MatrixXd(D), Eigen::ComputeThinU | Eigen::ComputeThinV);
          const auto k = c.rank;
          const MatD best = svd.matrixU().leftCols(k) * svd.singularValues().head(k).asDiagonal() *
                            svd.matrixV().leftCols(k).transpose();
          CHECK(dwt::rel_err(product(m), best) < 1e-5);
        }
      }
      CHECK(lo.config.r == (c.rank > 0 ? c.rank : 1));
    }
  }
}

TEST_CASE("convert_to_lora: written as a PEFT LoRA directory and read back; OFT, HRA and IA³ (which PEFT refuses)") {
  for (const char* fixture : {"peft_oft", "peft_hra", "peft_ia3", "peft_loha"}) {
    CAPTURE(fixture);
    const dwio::peft_model_fixture f(fixture);
    const auto W = fixture_weights(f);
    const auto lo = io::convert_to_lora(f.adapter, W, dw::energy_fraction{0.999});
    dwio::temp_dir d;
    io::write_peft_adapter(d.path / "lora", lo);
    const auto back = io::read_peft(d.path / "lora");
    REQUIRE(back.peft_type() == "LORA");
    REQUIRE(back.size() == 3);
    for (const char* mod : dwio::peft_model_fixture::modules) {
      CAPTURE(mod);
      const MatD D = dense_delta(f, mod);
      const auto& m = back.lora()->at(mod);
      // Energy 0.999 keeps ≥ 99.9 % of ‖ΔW‖²: relative error ≤ √0.001 (plus fp32 rounding).
      const double err = dwt::rel_err(product(m), D);
      CHECK(err <= std::sqrt(0.001) + 1e-5);
      // And no rank larger than needed: one fewer would drop below the threshold.
      Eigen::BDCSVD<Eigen::MatrixXd> svd{Eigen::MatrixXd(D)};
      const auto& S = svd.singularValues();
      double kept = 0;
      for (Eigen::Index i = 0; i < m.rank - 1; ++i) kept += S[i] * S[i];
      CHECK(kept < 0.999 * S.squaredNorm() * (1 + 1e-6));
      // The output of the converted layer moves by at most ‖X‖₂·‖ΔW − B·A‖_F.
      const MatD X = dwio::load_matd(f.io, std::string("x.") + mod);
      const MatD Wd = to_d(W.at(std::string(mod) + ".weight"));
      const double xop = Eigen::BDCSVD<Eigen::MatrixXd>(Eigen::MatrixXd(X)).singularValues()(0);
      const double moved = (X * (Wd + product(m)).transpose() - X * (Wd + D).transpose()).norm();
      CHECK(moved <= xop * (D - product(m)).norm() * (1 + 1e-6) + 1e-6);
    }
  }
}

TEST_CASE("convert_to_lora: errors name the module") {
  const dwio::peft_model_fixture f("peft_loha");
  auto W = fixture_weights(f);
  W.erase("head.weight");
  dwt::check_throws_with<dw::format_error>([&] { (void)io::convert_to_lora(f.adapter, W, dw::lora_rank{2}); },
                                           {"no weight for module \"head\""});
  const auto W2 = fixture_weights(f);
  // head is [8, 20]: rank 9 > min(out, in).
  dwt::check_throws_with<dw::rank_error>([&] { (void)io::convert_to_lora(f.adapter, W2, dw::lora_rank{9}); },
                                         {"module \"head\" is [8, 20]", "[1, 8]", "got 9"});
}
