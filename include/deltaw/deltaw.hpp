// deltaw: structured weight updates (LoRA and its family) as lazy expressions.
// Umbrella header for the CPU side.
#pragma once

#include "core/config.hpp"
#include "core/dtype.hpp"
#include "core/eigen.hpp"
#include "core/error.hpp"
#include "core/view.hpp"
#include "expr/block_lora.hpp"
#include "expr/core_low_rank.hpp"
#include "expr/dora.hpp"
#include "expr/ldu.hpp"
#include "expr/low_rank.hpp"
#include "expr/update.hpp"
#include "backend/cpu/block_lora.hpp"
#include "backend/cpu/core_low_rank.hpp"
#include "backend/cpu/dora.hpp"
#include "backend/cpu/eigen_bridge.hpp"
#include "backend/cpu/evaluator.hpp"
#include "backend/cpu/ldu.hpp"
#include "backend/cpu/low_rank.hpp"
#include "backend/cpu/ops.hpp"
