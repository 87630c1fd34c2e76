// SPDX-License-Identifier: MIT
// libFuzzer target: adapter_config.json parsing (strict JSON, duplicate keys, regex
// pattern keys). Any input parses or throws deltaw::error; parsed configs are queried.
#include <deltaw/io/peft.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace io = deltaw::io;
  try {
    const auto c = io::parse_peft_config(std::string_view(reinterpret_cast<const char*>(data), size));
    for (const char* m : {"model.layers.0.self_attn.q_proj", "v_proj", "head", ""}) {
      (void)c.rank_for(m);
      (void)c.alpha_for(m);
      (void)c.scale_for(m);
    }
    (void)io::peft_config_json(c).dump();
  } catch (const deltaw::error&) {
  }
  return 0;
}
