// SPDX-License-Identifier: MIT
// The error of the communicators (dist/mpi.hpp, dist/nccl.hpp): a peer timed out, sent a
// malformed or out-of-step message, or the transport reported an error.
#pragma once

#include "../core/error.hpp"

DELTAW_NAMESPACE_BEGIN
namespace dist {

/// A peer failed: timed out, sent a malformed message, or MPI / NCCL reported an error.
class dist_error : public error {
 public:
  using error::error;
};

}  // namespace dist
DELTAW_NAMESPACE_END
