// SPDX-License-Identifier: MIT
// Training across processes: federated LoRA rounds (FedAvg, FFA-LoRA, LoRA-FAIR) and
// data-parallel adapter training over a communicator (dist/federated.hpp; local_comm runs
// everything in one process), EVA's statistics across ranks (dist/eva.hpp), the MPI
// communicator (dist/mpi.hpp, target deltaw::mpi; compiled only when <mpi.h> is on the
// include path) and the NCCL one (dist/nccl.hpp, target deltaw::nccl; only with <nccl.h>).
// Not included by deltaw.hpp.
#pragma once

#include "dist/eva.hpp"
#include "dist/federated.hpp"
#include "dist/mpi.hpp"
#include "dist/nccl.hpp"
