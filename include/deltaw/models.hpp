// SPDX-License-Identifier: MIT
// Pretrained models over deltaw's autograd: a BERT encoder loaded from a Hugging Face
// checkpoint (models/bert.hpp: sentence-transformers' all-MiniLM-L6-v2 and other BERTs)
// with LoRA / DoRA / MiSS / LoKr / VeRA adapters, and the WordPiece tokenizer that reads
// tokenizer.json (models/wordpiece.hpp). See docs/models.md.
// Kept out of deltaw.hpp: it needs nlohmann-json (target nlohmann_json::nlohmann_json) and
// holds non-template code and Unicode tables.
#pragma once

#include "deltaw.hpp"
#include "io.hpp"
#include "models/bert.hpp"
#include "models/wordpiece.hpp"
