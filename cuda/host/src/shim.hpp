// SPDX-License-Identifier: MIT
// Internal to the host shim (cuda/host/src): the registry of live allocations, streams,
// events and library handles that the entry points check their arguments against.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <set>

namespace deltaw_cuda_host::detail {

struct registry {
  std::mutex mutex;
  std::map<std::uintptr_t, std::size_t> allocations;  // base address -> bytes
  std::set<const void*> streams, events, blas_handles, solver_handles;
};

/// The process-wide registry; never destroyed, so that handles released from
/// thread-local or static destructors at exit still find it.
inline registry& reg() {
  static registry* r = new registry;
  return *r;
}

/// [p, p + bytes) inside one live allocation; the caller holds reg().mutex.
inline bool device_range_locked(const void* p, std::size_t bytes) {
  if (bytes == 0) return true;
  if (p == nullptr) return false;
  const auto& a = reg().allocations;
  const auto addr = reinterpret_cast<std::uintptr_t>(p);
  auto it = a.upper_bound(addr);
  if (it == a.begin()) return false;
  --it;
  return addr - it->first <= it->second && bytes <= it->second - (addr - it->first);
}

/// A stream argument the runtime accepts: 0, the legacy or per-thread stream, or a live one.
inline bool valid_stream_locked(cudaStream_t s) {
  return s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread || reg().streams.count(s) != 0;
}

}  // namespace deltaw_cuda_host::detail
