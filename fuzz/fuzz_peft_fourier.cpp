// SPDX-License-Identifier: MIT
// libFuzzer target: FourierFT, C3A and WaveFT adapters (io/peft_fourier.hpp) read from memory, the
// way read_peft_fourier_adapter reads a directory. Needs FFTW (built only where fftw3 and
// fftw3f are found).
//
// Input: as fuzz_peft_structured (u32 little-endian n, n bytes of adapter_config.json, then
// the bytes of adapter_model.safetensors; fuzz/make_corpus.py packs the fixtures so). Every
// module that reads is turned into its update (FourierFT over the fixtures' layer shapes and
// a few small ones, with PEFT's frequencies drawn for each; C3A over its own shape) and
// applied, transposed-applied, materialised, merged and differentiated, so a shape the
// reader or the constructors let through but the FFT evaluators do not expect shows up as
// an ASan report. A read adapter is written back (to_files) and read again.
// deltaw::error is the expected way to refuse an input; anything else is a finding.
#include "fuzz_util.hpp"
#include <deltaw/io/peft_fourier.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <array>
#include <span>
#include <string_view>
#include <vector>

namespace {

namespace dw = deltaw;
namespace io = deltaw::io;

constexpr dw::index_t max_weights = 1 << 14;

[[noreturn]] void finding(const char* what) { deltaw_fuzz::finding("fuzz_peft_fourier", what); }


template <class U>
void exercise(const U& u) {
  dw::dense<float> g;
  if constexpr (requires { u.kernel(); }) g = dw::dense<float>::Zero(u.kernel().rows(), u.kernel().cols());
  else g = dw::dense<float>::Zero(1, u.size());
  deltaw_fuzz::exercise("fuzz_peft_fourier", u, std::array<dw::dense<float>, 1>{g}, max_weights);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto in = deltaw_fuzz::split(data, size);
  if (!in) return 0;
  const bool verbose = deltaw_fuzz::verbose();
  const std::string_view config = in->config;
  auto st = std::move(in->safetensors);
  io::peft_fourier_adapter a;
  try {
    auto cfg = io::parse_peft_fourier_config(config, "fuzz");
    a = io::peft_fourier_adapter::from_safetensors(std::move(cfg), io::safetensors_file::parse(std::move(st)), "fuzz");
  } catch (const dw::error& e) {
    if (verbose) std::fprintf(stderr, "refused: %s\n", e.what());
    return 0;
  }
  if (verbose) std::fprintf(stderr, "read %s with %zu modules\n", a.peft_type().c_str(), a.size());
  const std::pair<dw::index_t, dw::index_t> shapes[] = {{24, 16}, {20, 24}, {8, 20}, {1, 1}, {3, 5}};
  for (const auto& m : a.fourierft_modules())
    for (const auto& [out, in] : shapes) {
      try {
        exercise(m.update(out, in));
      } catch (const dw::error& e) {
        if (verbose) std::fprintf(stderr, "  %s [%ld, %ld]: %s\n", m.name.c_str(), long(out), long(in), e.what());
      }
    }
  for (const auto& m : a.waveft_modules())
    for (const auto& [out, in] : shapes) {
      try {
        exercise(m.update(out, in));
      } catch (const dw::error& e) {
        if (verbose) std::fprintf(stderr, "  %s [%ld, %ld]: %s\n", m.name.c_str(), long(out), long(in), e.what());
      }
    }
  for (const auto& m : a.c3a_modules()) {
    try {
      exercise(m.update());
    } catch (const dw::error& e) {
      if (verbose) std::fprintf(stderr, "  %s: %s\n", m.name.c_str(), e.what());
    }
  }
  std::vector<std::byte> bytes;
  std::string text;
  try {
    auto [c, w] = a.to_files();
    bytes = w.serialize();
    text = c.dump();
  } catch (const dw::error&) {
    return 0;
  }
  try {
    auto b = io::peft_fourier_adapter::from_safetensors(io::parse_peft_fourier_config(text, "fuzz"),
                                                        io::safetensors_file::parse(std::move(bytes)), "fuzz");
    if (b.size() != a.size()) finding("the written-back adapter has another number of modules");
  } catch (const dw::error& e) {
    std::fprintf(stderr, "fuzz_peft_fourier: re-reading a written adapter threw: %s\n", e.what());
    std::abort();
  }
  return 0;
}
