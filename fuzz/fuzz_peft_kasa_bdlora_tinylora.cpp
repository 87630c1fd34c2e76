// SPDX-License-Identifier: MIT
// libFuzzer target: KaSA, BD-LoRA and TinyLoRA adapters (io/peft_kasa_bdlora_tinylora.hpp)
// read from memory, the way read_peft_kasa_adapter / read_peft_bdlora_adapter /
// read_peft_tinylora_adapter read a directory; the config picks the reader (TINYLORA, a
// LoRA config with a kasa_config object, else BD-LoRA's).
//
// Input: as fuzz_peft_structured (u32 little-endian n, n bytes of adapter_config.json, then
// the bytes of adapter_model.safetensors; fuzz/make_corpus.py packs the fixtures so). Every
// module that reads is turned into its update and applied, transposed-applied, materialised,
// merged, unmerged and differentiated; a read adapter is written back (to_files) and read
// again. deltaw::error is the expected way to refuse an input; anything else is a finding.
#include <deltaw/backend/cpu/adalora_vjp.hpp>
#include <deltaw/backend/cpu/bd_lora_vjp.hpp>
#include <deltaw/backend/cpu/ops.hpp>
#include <deltaw/backend/cpu/tinylora_vjp.hpp>
#include <deltaw/io/peft_kasa_bdlora_tinylora.hpp>

#include "fuzz_util.hpp"

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace {

namespace dw = deltaw;
namespace io = deltaw::io;

constexpr dw::index_t max_weights = 1 << 14;

[[noreturn]] void finding(const char* what) { deltaw_fuzz::finding("fuzz_peft_kasa_bdlora_tinylora", what); }


template <class U, std::size_t N>
void exercise(const U& u, std::array<dw::dense<float>, N> grads) {
  deltaw_fuzz::exercise("fuzz_peft_kasa_bdlora_tinylora", u, std::move(grads), max_weights);
}

template <class A, class Modules, class F>
void each(const A&, const Modules& ms, F&& f) {
  const bool verbose = deltaw_fuzz::verbose();
  for (const auto& m : ms) {
    try {
      f(m);
    } catch (const dw::error& e) {
      if (verbose) std::fprintf(stderr, "  %s: %s\n", m.name.c_str(), e.what());
    }
  }
}

template <class ToFiles, class Parse>
void round_trip(std::size_t n, ToFiles&& to_files, Parse&& parse) {
  std::vector<std::byte> bytes;
  std::string text;
  try {
    auto [c, w] = to_files();
    bytes = w.serialize();
    text = c.dump();
  } catch (const dw::error&) {
    return;
  }
  try {
    if (parse(text, io::safetensors_file::parse(std::move(bytes))) != n)
      finding("the written-back adapter has another number of modules");
  } catch (const dw::error& e) {
    std::fprintf(stderr, "fuzz_peft_kasa_bdlora_tinylora: re-reading a written adapter threw: %s\n", e.what());
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
  try {
    auto f = io::safetensors_file::parse(std::move(st));
    if (config.find("TINYLORA") != std::string_view::npos) {
      // The fixtures' model order; a file with other modules is refused (argument_error).
      const std::vector<std::string> order{"q", "v", "head"};
      auto a = io::peft_tinylora_adapter::from_safetensors(io::parse_peft_tinylora_config(config, "fuzz"), f, order, "fuzz");
      if (verbose) std::fprintf(stderr, "read TINYLORA with %zu modules\n", a.size());
      each(a, a.modules(), [](const io::peft_tinylora_module& m) {
        const auto u = m.update();
        exercise<decltype(u), 3>(u, {dw::dense<float>::Zero(u.B().rows(), u.B().cols()),
                                     dw::dense<float>::Zero(u.vector_size(), 1),
                                     dw::dense<float>::Zero(u.A().rows(), u.A().cols())});
      });
      round_trip(a.size(), [&] { return a.to_files(order); }, [&](const std::string& t, const io::safetensors_file& g) {
        return io::peft_tinylora_adapter::from_safetensors(io::parse_peft_tinylora_config(t, "again"), g, order, "again").size();
      });
    } else if (const auto o = io::parse_json_strict(config, "fuzz");
               o.is_object() && o.contains("kasa_config") && o["kasa_config"].is_object()) {
      auto a = io::peft_kasa_adapter::parse(config, f, "fuzz", "fuzz");
      if (verbose) std::fprintf(stderr, "read KaSA with %zu modules\n", a.size());
      each(a, a.modules(), [](const io::peft_kasa_module& m) {
        const auto u = m.update();
        exercise<decltype(u), 3>(u, {dw::dense<float>::Zero(u.B().rows(), u.B().cols()),
                                     dw::dense<float>::Zero(u.rank(), 1),
                                     dw::dense<float>::Zero(u.A().rows(), u.A().cols())});
      });
      round_trip(a.size(), [&] { return a.to_files(); }, [](const std::string& t, const io::safetensors_file& g) {
        return io::peft_kasa_adapter::parse(t, g, "again", "again").size();
      });
    } else {
      auto a = io::peft_bdlora_adapter::parse(config, f, "fuzz", "fuzz");
      if (verbose) std::fprintf(stderr, "read BD-LoRA with %zu modules\n", a.size());
      each(a, a.modules(), [](const io::peft_bdlora_module& m) {
        const auto u = m.update();
        exercise<decltype(u), 2>(u, {dw::dense<float>::Zero(u.B().rows(), u.B().cols()),
                                     dw::dense<float>::Zero(u.A().rows(), u.A().cols())});
      });
      round_trip(a.size(), [&] { return a.to_files(); }, [](const std::string& t, const io::safetensors_file& g) {
        return io::peft_bdlora_adapter::parse(t, g, "again", "again").size();
      });
    }
  } catch (const dw::error& e) {
    if (verbose) std::fprintf(stderr, "refused: %s\n", e.what());
  }
  return 0;
}
