// SPDX-License-Identifier: MIT
// Adapter initialisations from the weights (and data): PiSSA, OLoRA, LoRA-GA, EVA,
// LoRA-SB, LoLDU, CorDA. EVA from a model's forward passes (init/eva_model.hpp) needs the
// nn layers and lives in deltaw/train.hpp.
#pragma once

#include "linalg.hpp"
#include "spectral.hpp"
#include "init/factors.hpp"
#include "init/pissa.hpp"
#include "init/olora.hpp"
#include "init/lora_ga.hpp"
#include "init/eva.hpp"
#include "init/lora_sb.hpp"
#include "init/loldu.hpp"
#include "init/corda.hpp"
#include "init/kasa.hpp"
#include "init/tinylora.hpp"
