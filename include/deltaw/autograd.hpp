// SPDX-License-Identifier: MIT
// Training adapters: the reverse-mode tape and its ops, differentiable adapted layers over
// every update type's VJP, gradient checks, the tiny-transformer layers (nn) and the
// optimisers (SGD, AdamW and the adapter-specific ones). See docs/training.md.
#pragma once

#include "deltaw.hpp"
#include "autograd/tape.hpp"
#include "autograd/ops.hpp"
#include "autograd/adapters.hpp"
#include "autograd/gradcheck.hpp"
#include "nn/layers.hpp"
#include "optim/optim.hpp"
