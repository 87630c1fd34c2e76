// deltaw's readers and writers: safetensors, PEFT adapter directories, GGUF LoRA.
// Kept out of deltaw.hpp because it needs nlohmann-json (find_package(nlohmann_json),
// target nlohmann_json::nlohmann_json).
#pragma once

#include "deltaw.hpp"
#include "io/errors.hpp"
#include "io/file.hpp"
#include "io/gguf.hpp"
#include "io/json.hpp"
#include "io/peft.hpp"
#include "io/safetensors.hpp"
