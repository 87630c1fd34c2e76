// SPDX-License-Identifier: MIT
// Training strategies from the papers (LoRA+, LoRA-FA, ALLoRA, LoRA-Pro, FFA/DP-SGD,
// Flat-LoRA, LISA, LaMDA, IncreLoRA, DiffoRA, O3, CBQ LoRA-Rounding, LoRAPrune), the
// training loop, and EVA from a model's forward passes. Includes autograd and init.
#pragma once

#include "autograd.hpp"
#include "init.hpp"
#include "init/eva_model.hpp"
#include "train/method.hpp"
#include "train/loop.hpp"
#include "train/lora_plus.hpp"
#include "train/lora_fa.hpp"
#include "train/allora.hpp"
#include "train/lora_pro.hpp"
#include "train/ffa_dp.hpp"
#include "train/flat_lora.hpp"
#include "train/lisa.hpp"
#include "train/lamda.hpp"
#include "train/increlora.hpp"
#include "train/adalora.hpp"
#include "train/diffora.hpp"
#include "train/o3.hpp"
#include "train/cbq_rounding.hpp"
#include "train/cbq_cross_block.hpp"
#include "train/lora_prune.hpp"
#include "train/kasa.hpp"
