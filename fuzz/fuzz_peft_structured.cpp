// SPDX-License-Identifier: MIT
// libFuzzer target: structured PEFT adapters (LoKr, MiSS / Bone bat, VeRA, RandLoRA, LoHa,
// IA3, OFT, HRA, SHiRA, RoAd, HiRA, DeLoRA) read
// from memory, the way read_peft_structured_adapter reads a directory.
//
// Input: u32 little-endian n, then n bytes of adapter_config.json, then the bytes of
// adapter_model.safetensors (n is clamped to what is there; fuzz/make_corpus.py packs the
// committed fixtures this way). Every module that reads is then turned into its update for
// a few small layer shapes (the fixtures' layers, and the one the module's own tensors
// imply) and applied, transposed-applied and materialised, so a shape the reader or the
// update constructors let through but the evaluators do not expect shows up as an ASan
// report. A read adapter is also written back (to_files) and read again.
// deltaw::error is the expected way to refuse an input; anything else is a finding.
#include "fuzz_util.hpp"
#include <deltaw/backend/cpu/adalora.hpp>
#include <deltaw/backend/cpu/block_affine.hpp>
#include <deltaw/backend/cpu/boft.hpp>
#include <deltaw/backend/cpu/hra.hpp>
#include <deltaw/backend/cpu/ia3.hpp>
#include <deltaw/backend/cpu/kron.hpp>
#include <deltaw/backend/cpu/loha.hpp>
#include <deltaw/backend/cpu/low_rank.hpp>
#include <deltaw/backend/cpu/oft.hpp>
#include <deltaw/backend/cpu/delora.hpp>
#include <deltaw/backend/cpu/hira.hpp>
#include <deltaw/backend/cpu/road.hpp>
#include <deltaw/backend/cpu/shira.hpp>
#include <deltaw/backend/cpu/ops.hpp>
#include <deltaw/core/eigen.hpp>
#include <deltaw/io/peft_structured.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <utility>
#include <vector>

namespace {

namespace dw = deltaw;
namespace io = deltaw::io;

// Keeps each input cheap: an update is evaluated only for layers up to this many weights.
constexpr dw::index_t max_weights = 1 << 14;

[[noreturn]] void finding(const char* what) { deltaw_fuzz::finding("fuzz_peft_structured", what); }

using deltaw_fuzz::filled;

// Evaluates update u of a layer [out, in] (W its weight) every way the public API allows.
template <class U>
void exercise(const U& u, const dw::dense<float>& W) {
  const dw::index_t out = u.rows(), in = u.cols();
  if (out != W.rows() || in != W.cols()) {
    // LoKr's, LoHa's, AdaLoRA's and DeLoRA's shapes come from their factors alone; the others must take the layer's.
    if constexpr (!requires { u.w1(); } && !requires { u.B1(); } && !requires { u.E(); } && !requires { u.w_norm(); })
      finding("update shape differs from the layer it was built for");
  }
  if (out < 0 || in < 0 || out > max_weights || in > max_weights || out * in > max_weights) return;
  const auto X = filled(3, in, 0.25f);
  const auto G = filled(3, out, 0.5f);
  const auto Y = dw::apply(u, X);
  const auto O = dw::apply_transposed(u, G);
  const auto D = dw::materialize(u);
  if (Y.rows() != 3 || Y.cols() != out || O.rows() != 3 || O.cols() != in || D.rows() != out || D.cols() != in)
    finding("apply / apply_transposed / materialize returned a wrongly shaped result");
  if (out == W.rows() && in == W.cols()) {
    const auto Ys = dw::apply(dw::view(W) + u, X);
    if (Ys.rows() != 3 || Ys.cols() != out) finding("apply(W + dW) returned a wrongly shaped result");
  }
}

void exercise_module(const io::peft_structured_adapter& a, const io::peft_structured_adapter::module& mv) {
  const std::string& name = io::peft_structured_adapter::name_of(mv);
  // The fixtures' layers (blocks.0.q [24, 16], blocks.0.v [20, 24], head [8, 20]), a
  // square one, and the shapes the module's own tensors imply.
  std::vector<std::pair<dw::index_t, dw::index_t>> shapes{{24, 16}, {20, 24}, {8, 20}, {4, 4}};
  if (const auto* m = std::get_if<io::peft_lokr_module>(&mv)) {
    shapes.emplace_back(m->out_features(), m->in_features());
  } else if (const auto* m = std::get_if<io::peft_miss_module>(&mv)) {
    const dw::index_t c = m->block.view.cols(), rows = m->block.view.rows();
    if (m->kind == io::miss_kind::bat) shapes.emplace_back(rows, c > 0 ? 2 * c : 1);
    else shapes.emplace_back(c, c > 0 ? c + 1 : 1);
  } else if (const auto* m = std::get_if<io::peft_vera_module>(&mv)) {
    shapes.emplace_back(m->lambda_b.view.size(), m->A.view.cols());
    shapes.emplace_back(m->lambda_b.view.size(), 1);
  } else if (const auto* m = std::get_if<io::peft_randlora_module>(&mv)) {
    const dw::index_t mn = m->gamma.view.cols(), hi = m->B.view.rows();
    shapes.emplace_back(hi, mn);
    shapes.emplace_back(mn, hi);
  } else if (const auto* m = std::get_if<io::peft_loha_module>(&mv)) {
    shapes.emplace_back(m->out_features(), m->in_features());
  } else if (const auto* m = std::get_if<io::peft_ia3_module>(&mv)) {
    shapes.emplace_back(m->l.view.size(), m->l.view.size());
    shapes.emplace_back(3, m->l.view.size());
  } else if (const auto* m = std::get_if<io::peft_oft_module>(&mv)) {
    shapes.emplace_back(3, m->Q.view.rows() * std::max<dw::index_t>(m->block(), 0));
    shapes.emplace_back(3, 2 * std::max<dw::index_t>(m->block(), 0));
  } else if (const auto* m = std::get_if<io::peft_hra_module>(&mv)) {
    shapes.emplace_back(3, m->U.view.rows());
  } else if (const auto* m = std::get_if<io::peft_boft_module>(&mv)) {
    shapes.emplace_back(m->out_features(), m->in_features());
  } else if (const auto* m = std::get_if<io::peft_adalora_module>(&mv)) {
    shapes.emplace_back(m->out_features(), m->in_features());
  } else if (const auto* m = std::get_if<io::peft_shira_module>(&mv)) {
    dw::index_t mr = 0, mc = 0;
    for (std::size_t k = 0; k < m->rows.size(); ++k) {
      mr = std::max(mr, m->rows[k] + 1);
      mc = std::max(mc, m->cols[k] + 1);
    }
    shapes.emplace_back(mr, mc);
  } else if (const auto* m = std::get_if<io::peft_road_module>(&mv)) {
    shapes.emplace_back(m->out_features(), 3);
  } else if (const auto* m = std::get_if<io::peft_hira_module>(&mv)) {
    shapes.emplace_back(m->out_features(), m->in_features());
  } else if (const auto* m = std::get_if<io::peft_delora_module>(&mv)) {
    shapes.emplace_back(m->out_features(), m->in_features());
  }
  for (const auto& [out, in] : shapes) {
    if (out < 0 || in < 0 || out > max_weights || in > max_weights || out * in > max_weights) continue;
    const auto W = filled(out, in, 0.125f);
    try {
      a.visit(name, dw::view(W), [&](const auto& u) { exercise(u, W); });
    } catch (const dw::error& e) {
      if (std::getenv("DELTAW_FUZZ_VERBOSE")) std::fprintf(stderr, "  %s [%ld, %ld]: %s\n", name.c_str(), long(out), long(in), e.what());
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto in = deltaw_fuzz::split(data, size);
  if (!in) return 0;
  const bool verbose = deltaw_fuzz::verbose();
  const std::string_view config = in->config;
  auto st = std::move(in->safetensors);
  io::peft_structured_adapter a;
  try {
    auto cfg = io::parse_peft_structured_config(config);
    a = io::peft_structured_adapter::from_safetensors(std::move(cfg), io::safetensors_file::parse(std::move(st)));
  } catch (const dw::error& e) {
    if (verbose) std::fprintf(stderr, "refused: %s\n", e.what());
    return 0;
  }
  if (verbose) std::fprintf(stderr, "read %s with %zu modules\n", a.config.peft_type.c_str(), a.size());
  for (const auto& m : a.modules()) exercise_module(a, m);

  // What was read can be written back and reads again to the same modules.
  std::vector<std::byte> bytes;
  std::string text;
  try {
    auto [c, w] = a.to_files();
    bytes = w.serialize();
    text = io::peft_structured_config_json(c).dump();
  } catch (const dw::error&) {
    return 0;  // e.g. an empty adapter, or tensors the writer refuses
  }
  try {
    auto b = io::peft_structured_adapter::from_safetensors(io::parse_peft_structured_config(text),
                                                          io::safetensors_file::parse(std::move(bytes)));
    if (b.size() != a.size()) finding("the written-back adapter has another number of modules");
    for (std::size_t i = 0; i < a.size(); ++i)
      if (io::peft_structured_adapter::name_of(a.modules()[i]) != io::peft_structured_adapter::name_of(b.modules()[i]))
        finding("the written-back adapter has other module names");
  } catch (const dw::error& e) {
    std::fprintf(stderr, "fuzz_peft_structured: re-reading a written adapter threw: %s\n", e.what());
    std::abort();
  }
  return 0;
}
