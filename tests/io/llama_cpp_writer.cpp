// SPDX-License-Identifier: MIT
// deltaw's side of tests/io/check_llama_cpp.py (GGUF LoRA adapters against llama.cpp):
//   io_llama_cpp_writer write <peft dir> <base model .gguf> <out .gguf> [--as-stored]
//     reads a PEFT LoRA adapter, names its modules with llama_gguf_tensor_name and writes
//     it with write_gguf_lora, head counts from the base model's GGUF; --as-stored keeps
//     PEFT's row order for attn_q / attn_k (what deltaw wrote before), to show the check
//     tells the two apart.
//   io_llama_cpp_writer read <adapter .gguf> <base model .gguf> <out .safetensors>
//     reads a llama.cpp adapter with read_gguf_lora (back to PEFT's rows) and stores each
//     ΔW = s·B·A, dense, under its GGUF base name.
#include <deltaw/io.hpp>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace dw = deltaw;
namespace io = deltaw::io;

namespace {

int write(const std::string& peft_dir, const std::string& base, const std::string& out, bool as_stored) {
  const auto adapter = io::read_peft_adapter(peft_dir);
  auto options = io::gguf_lora_options::from_model(io::gguf_file::open(base));
  if (as_stored) options.permute_qk = false;
  std::vector<io::gguf_lora_update> updates;
  for (const auto& m : adapter.modules()) {
    const auto name = io::llama_gguf_tensor_name(m.name);
    if (!name) {
      std::fprintf(stderr, "no llama.cpp tensor for module %s\n", m.name.c_str());
      return 1;
    }
    updates.emplace_back(*name, m.update());
  }
  io::write_gguf_lora(out, options.architecture, updates, options);
  std::printf("wrote %zu updates for %s (head_count %lld, head_count_kv %lld)%s\n", updates.size(),
              options.architecture.c_str(), options.head_count.empty() ? -1LL : (long long)options.head_count[0],
              options.head_count_kv.empty() ? -1LL : (long long)options.head_count_kv[0],
              as_stored ? " with PEFT's q/k rows" : "");
  return 0;
}

int read(const std::string& adapter, const std::string& base, const std::string& out) {
  const auto options = io::gguf_lora_options::from_model(io::gguf_file::open(base));
  const auto a = io::read_gguf_lora(adapter, options);
  io::safetensors_writer w;
  std::vector<dw::dense<float>> keep;
  keep.reserve(a.tensors.size());
  for (const auto& p : a.tensors) {
    keep.push_back(dw::materialize(a.update(p.base)));
    w.add(p.base, keep.back());
  }
  w.write(out);
  std::printf("read %zu pairs\n", a.tensors.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.size() >= 4 && args[0] == "write")
      return write(args[1], args[2], args[3], args.size() == 5 && args[4] == "--as-stored");
    if (args.size() == 4 && args[0] == "read") return read(args[1], args[2], args[3]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  std::fprintf(stderr,
               "usage: io_llama_cpp_writer write <peft dir> <base.gguf> <out.gguf> [--as-stored]\n"
               "       io_llama_cpp_writer read <adapter.gguf> <base.gguf> <out.safetensors>\n");
  return 2;
}
