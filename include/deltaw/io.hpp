// SPDX-License-Identifier: MIT
// deltaw's readers and writers: safetensors, PEFT adapter directories (LoRA / rsLoRA /
// DoRA, and LoKr / MiSS / Bone bat / VeRA / RandLoRA; read_peft reads any of them), GGUF
// LoRA; DLPack views when dlpack/dlpack.h is available.
// Kept out of deltaw.hpp because it needs nlohmann-json (find_package(nlohmann_json),
// target nlohmann_json::nlohmann_json).
#pragma once

#include "deltaw.hpp"
#include "io/errors.hpp"
#include "io/file.hpp"
#include "io/gguf.hpp"
#include "io/json.hpp"
#include "io/peft.hpp"
#include "io/peft_adapter.hpp"
#include "io/peft_structured.hpp"
#include "io/safetensors.hpp"
#if __has_include(<dlpack/dlpack.h>)
#include "io/dlpack.hpp"
#endif
