// SPDX-License-Identifier: MIT
// libFuzzer target: GGUF container and LoRA reader. Any input parses or throws
// deltaw::error; parsed tensors are converted and LoRA pairs applied.
#include <deltaw/backend/cpu/low_rank.hpp>
#include <deltaw/backend/cpu/ops.hpp>
#include <deltaw/io/gguf.hpp>

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace io = deltaw::io;
  try {
    const auto f = io::gguf_file::parse({reinterpret_cast<const std::byte*>(data), size});
    for (const auto& t : f.tensors()) {
      if (t.element_count() > (1u << 16)) continue;
      try {
        (void)f.values<double>(t.name);
        if (t.ne.size() == 2) (void)f.matrix<float>(t.name);
      } catch (const deltaw::unsupported_error&) {
      }
    }
    // Rows as stored (a llama adapter's q/k would otherwise need head counts and stop
    // the read early), then with head counts taken from the input's own metadata.
    io::gguf_lora_options keep;
    keep.permute_qk = false;
    const auto a = io::read_gguf_lora(f, keep);
    for (const auto& p : a.tensors)
      if (p.A.view.size() + p.B.view.size() <= (1u << 14) && p.B.view.rows() * p.A.view.cols() <= (1 << 16))
        (void)deltaw::materialize(a.update(p.base));
    (void)io::read_gguf_lora(f, io::gguf_lora_options::from_model(f));
  } catch (const deltaw::error&) {
  }
  return 0;
}
