// SPDX-License-Identifier: MIT
// libFuzzer target: GraLoRA and UniLoRA adapters (io/peft_gralora.hpp, io/peft_unilora.hpp)
// read from memory, the way read_peft_gralora_adapter / read_peft_unilora_adapter read a
// directory; the config's peft_type picks the reader.
//
// Input: as fuzz_peft_structured (u32 little-endian n, n bytes of adapter_config.json, then
// the bytes of adapter_model.safetensors; fuzz/make_corpus.py packs the fixtures so). Every
// module that reads is turned into its update and applied, transposed-applied, materialised,
// merged, unmerged and differentiated, so a shape the reader or the constructors let through
// but the evaluators do not expect shows up as an ASan report. A read adapter is written
// back (to_files) and read again. deltaw::error is the expected way to refuse an input;
// anything else is a finding.
#include <deltaw/backend/cpu/gralora_vjp.hpp>
#include <deltaw/backend/cpu/ops.hpp>
#include <deltaw/backend/cpu/unilora_vjp.hpp>
#include <deltaw/io/peft_gralora.hpp>
#include <deltaw/io/peft_unilora.hpp>

#include "fuzz_util.hpp"

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string_view>
#include <vector>

namespace {

namespace dw = deltaw;
namespace io = deltaw::io;

constexpr dw::index_t max_weights = 1 << 14;

[[noreturn]] void finding(const char* what) { deltaw_fuzz::finding("fuzz_peft_gralora_unilora", what); }


template <class U, std::size_t N>
void exercise(const U& u, std::array<dw::dense<float>, N> grads) {
  deltaw_fuzz::exercise("fuzz_peft_gralora_unilora", u, std::move(grads), max_weights);
}

template <class A, class Parse, class Write>
void round_trip(const A& a, Parse&& parse, Write&& text_of) {
  std::vector<std::byte> bytes;
  std::string text;
  try {
    auto [c, w] = a.to_files();
    bytes = w.serialize();
    text = text_of(c);
  } catch (const dw::error&) {
    return;
  }
  try {
    auto b = parse(text, io::safetensors_file::parse(std::move(bytes)));
    if (b.size() != a.size()) finding("the written-back adapter has another number of modules");
  } catch (const dw::error& e) {
    std::fprintf(stderr, "fuzz_peft_gralora_unilora: re-reading a written adapter threw: %s\n", e.what());
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto in = deltaw_fuzz::split(data, size);
  if (!in) return 0;
  const bool verbose = deltaw_fuzz::verbose();
  const std::string_view config = in->config;
  auto st = std::move(in->safetensors);
  const bool gra = config.find("GRALORA") != std::string_view::npos;
  try {
    if (gra) {
      auto a = io::peft_gralora_adapter::from_safetensors(io::parse_peft_gralora_config(config, "fuzz"),
                                                          io::safetensors_file::parse(std::move(st)), "fuzz");
      if (verbose) std::fprintf(stderr, "read GRALORA with %zu modules\n", a.size());
      for (const auto& m : a.modules()) {
        try {
          const auto u = m.update();
          exercise<decltype(u), 4>(u, {dw::dense<float>::Zero(u.A().rows(), u.A().cols()),
                                       dw::dense<float>::Zero(u.B().rows(), u.B().cols()),
                                       dw::dense<float>::Zero(u.hybrid_A().rows(), u.hybrid_A().cols()),
                                       dw::dense<float>::Zero(u.hybrid_B().rows(), u.hybrid_B().cols())});
        } catch (const dw::error& e) {
          if (verbose) std::fprintf(stderr, "  %s: %s\n", m.name.c_str(), e.what());
        }
      }
      round_trip(a, [](const std::string& t, io::safetensors_file f) {
        return io::peft_gralora_adapter::from_safetensors(io::parse_peft_gralora_config(t, "again"), f, "again");
      }, [](const io::json& c) { return c.dump(); });
    } else {
      auto a = io::peft_unilora_adapter::from_safetensors(io::parse_peft_unilora_config(config, "fuzz"),
                                                          io::safetensors_file::parse(std::move(st)), "fuzz");
      if (verbose) std::fprintf(stderr, "read UNILORA with %zu modules\n", a.size());
      for (const auto& m : a.modules()) {
        try {
          const auto u = a.update(m.name);
          exercise<decltype(u), 1>(u, {dw::dense<float>::Zero(u.theta().size(), 1)});
        } catch (const dw::error& e) {
          if (verbose) std::fprintf(stderr, "  %s: %s\n", m.name.c_str(), e.what());
        }
      }
      round_trip(a, [](const std::string& t, io::safetensors_file f) {
        return io::peft_unilora_adapter::from_safetensors(io::parse_peft_unilora_config(t, "again"), f, "again");
      }, [](const io::json& c) { return c.dump(); });
    }
  } catch (const dw::error& e) {
    if (verbose) std::fprintf(stderr, "refused: %s\n", e.what());
  }
  return 0;
}
