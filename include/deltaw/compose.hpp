// SPDX-License-Identifier: MIT
// Composition of adapters: merges of N LoRA updates in every mode of PEFT's
// add_weighted_adapter (and exact ones), in factored form; LoRA-LEGO; the federated
// aggregations (FedAvg, LoRA-FAIR); PEFT adapters merged module by
// module when nlohmann-json is available (deltaw/io). Not included by deltaw.hpp.
#pragma once

#include "compose/federated.hpp"
#include "compose/lego.hpp"
#include "compose/merge.hpp"
#if __has_include(<nlohmann/json.hpp>)
#include "compose/peft_merge.hpp"
#endif
