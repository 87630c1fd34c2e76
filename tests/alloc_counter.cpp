#include "alloc_counter.hpp"

#include <Eigen/Core>
#include <atomic>
#include <cstdlib>

#ifndef DELTAW_TEST_SANITIZED
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
}

namespace {
std::atomic<bool> recording{false};
std::atomic<std::size_t> largest{0};
void record(std::size_t n) {
  if (!recording.load(std::memory_order_relaxed)) return;
  std::size_t cur = largest.load(std::memory_order_relaxed);
  while (n > cur && !largest.compare_exchange_weak(cur, n)) {
  }
}
}  // namespace

extern "C" {
void* malloc(std::size_t n) {
  record(n);
  return __libc_malloc(n);
}
void* calloc(std::size_t k, std::size_t n) {
  record(k * n);
  return __libc_calloc(k, n);
}
void* realloc(void* p, std::size_t n) {
  record(n);
  return __libc_realloc(p, n);
}
void* memalign(std::size_t a, std::size_t n) {
  record(n);
  return __libc_memalign(a, n);
}
void* aligned_alloc(std::size_t a, std::size_t n) {
  record(n);
  return __libc_memalign(a, n);
}
int posix_memalign(void** p, std::size_t a, std::size_t n) {
  record(n);
  *p = __libc_memalign(a, n);
  return *p ? 0 : 12;  // ENOMEM
}
}

namespace dwt {
bool allocation_counting_available() { return true; }
std::size_t largest_allocation(const std::function<void()>& f) {
  // One Eigen thread while counting: Eigen's OpenMP-parallel GEMM packs the whole left-hand
  // operand (k_c × m, as large as W for k ≤ k_c) into one shared workspace, where one thread
  // packs it panel by panel. That buffer is the product's, in plain Eigen too; what these
  // tests look for is a matrix deltaw itself forms.
  const int threads = Eigen::nbThreads();
  Eigen::setNbThreads(1);
  largest = 0;
  recording = true;
  f();
  recording = false;
  Eigen::setNbThreads(threads);
  return largest.load();
}
}  // namespace dwt
#else
namespace dwt {
bool allocation_counting_available() { return false; }
std::size_t largest_allocation(const std::function<void()>& f) {
  f();
  return 0;
}
}  // namespace dwt
#endif
