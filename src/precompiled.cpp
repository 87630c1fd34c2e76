// SPDX-License-Identifier: MIT
// deltaw::precompiled: the heavy non-template entry points of the file layer (PEFT adapter
// directories, GGUF LoRA), compiled once here. A target linking deltaw::precompiled gets
// DELTAW_PRECOMPILED, under which the headers only declare these functions, so a file that
// reads an adapter does not compile the JSON and safetensors parsers again ({fmt}'s compiled
// mode). Everything else stays header-only.
#define DELTAW_PRECOMPILED_SOURCE
#include <deltaw/io.hpp>
