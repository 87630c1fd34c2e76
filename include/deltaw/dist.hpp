// SPDX-License-Identifier: MIT
// Training across processes: federated LoRA rounds (FedAvg, FFA-LoRA, LoRA-FAIR) and
// data-parallel adapter training over a communicator (dist/federated.hpp; local_comm runs
// everything in one process), and the MPI communicator (dist/mpi.hpp, target deltaw::mpi;
// compiled only when <mpi.h> is on the include path). Not included by deltaw.hpp.
#pragma once

#include "dist/eva.hpp"
#include "dist/federated.hpp"
#include "dist/mpi.hpp"
