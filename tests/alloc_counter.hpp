// Counts allocations for the "no hidden dense ΔW" tests (DESIGN.md principle 1). Link
// alloc_counter.cpp into the test executable: it replaces malloc and friends (glibc) and
// records the largest single allocation while a callable runs. Under sanitizers, which own
// malloc, counting is unavailable and the tests say so.
#pragma once

#include <cstddef>
#include <functional>

namespace dwt {
/// False in sanitizer builds, where malloc is not ours to replace.
bool allocation_counting_available();
/// Largest single allocation, in bytes, made while f runs (0 when counting is unavailable).
/// f runs with one Eigen thread (Eigen's parallel GEMM packs a whole operand; see the .cpp).
std::size_t largest_allocation(const std::function<void()>& f);
}  // namespace dwt
