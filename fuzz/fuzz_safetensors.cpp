// SPDX-License-Identifier: MIT
// libFuzzer target: any byte string given to the safetensors reader either parses (and
// then every tensor can be read) or throws deltaw::error. Anything else is a bug.
#include <deltaw/io/safetensors.hpp>

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace io = deltaw::io;
  try {
    auto f = io::safetensors_file::parse({reinterpret_cast<const std::byte*>(data), size});
    double sink = 0;
    for (const auto& t : f.tensors()) {
      if (t.element_count() <= (1u << 16)) {
        auto v = f.values<double>(t.name);
        for (double x : v) sink += x;
      }
      if (t.shape.size() == 2) (void)f.matrix<float>(t.name);
      if (t.shape.size() == 1) (void)f.vector<deltaw::bf16>(t.name);
    }
    (void)sink;
  } catch (const deltaw::error&) {
  }
  return 0;
}
