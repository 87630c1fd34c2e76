// SPDX-License-Identifier: MIT
// Loops split over OpenMP threads when deltaw is built with OpenMP (DELTAW_OPENMP), in
// order on the calling thread otherwise. deltaw starts no threads of its own: these use
// the OpenMP pool that Eigen's products use (OMP_NUM_THREADS), and run serially when
// called from inside a parallel region.
#pragma once

#include <algorithm>
#include <exception>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "config.hpp"
#include "view.hpp"

#if defined(EIGEN_USE_BLAS)
// OpenBLAS's thread count, when the BLAS linked is OpenBLAS (weak: null otherwise).
extern "C" int openblas_get_num_threads(void) __attribute__((weak));
#endif

DELTAW_NAMESPACE_BEGIN
namespace detail {

/// Whether the external BLAS runs each call on the calling thread only (OpenBLAS with one
/// thread). False without EIGEN_USE_BLAS, and for a BLAS that does not say.
inline bool blas_single_threaded() {
#if defined(EIGEN_USE_BLAS)
  return openblas_get_num_threads != nullptr && openblas_get_num_threads() == 1;
#else
  return false;
#endif
}

/// Threads a parallel loop would use here: 1 without OpenMP, inside a parallel region, or
/// when `parallel` is false.
inline int max_threads(bool parallel = true) {
#if defined(_OPENMP)
  return parallel && !omp_in_parallel() ? omp_get_max_threads() : 1;
#else
  (void)parallel;
  return 1;
#endif
}

/// The calling thread's index within the current parallel loop (0 outside one).
inline int thread_index() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

/// Runs body(i) for i in [0, n): over OpenMP threads (dynamic schedule) when `parallel`,
/// else in order. The first exception is rethrown on the calling thread.
template <class F>
void parallel_for(index_t n, bool parallel, F&& body) {
#if defined(_OPENMP)
  if (parallel && n > 1 && max_threads() > 1) {
    std::exception_ptr failure;
#pragma omp parallel for schedule(dynamic, 1)
    for (index_t i = 0; i < n; ++i) {
      try {
        body(i);
      } catch (...) {
#pragma omp critical(deltaw_parallel_failure)
        if (!failure) failure = std::current_exception();
      }
    }
    if (failure) std::rethrow_exception(failure);
    return;
  }
#else
  (void)parallel;
#endif
  for (index_t i = 0; i < n; ++i) body(i);
}

/// Whether deltaw's own loops — elementwise work (parallel_rows), the attention ops'
/// per-head loops, and in a BLAS build the split of large products (kernels::gemm) — use
/// OpenMP threads. Always with Eigen's products (one OpenMP pool for everything). Where
/// products go to an external BLAS (EIGEN_USE_BLAS), only when that BLAS runs one thread
/// per call (OpenBLAS with OPENBLAS_NUM_THREADS=1, read at run time): BLAS worker threads
/// spin after every product, and an OpenMP team beside them loses far more than it gains
/// (MiniLM's forward pass at two threads went from 0.50 s to 1.49 s). With one BLAS thread,
/// OMP_NUM_THREADS threads do everything, the products split by deltaw.
/// DELTAW_BLAS_ELEMENTWISE_THREADS forces the loops on in a BLAS build.
inline bool elementwise_parallel() {
#if defined(EIGEN_USE_BLAS) && !defined(DELTAW_BLAS_ELEMENTWISE_THREADS)
  return blas_single_threaded();
#else
  return true;
#endif
}

/// Elementwise work over the rows of a [rows, cols] array: body(r0, count) on contiguous
/// row ranges, one per thread when the array has at least `min_elements` entries (below,
/// threads cost more than they save) and elementwise_parallel(), else body(0, rows) on the
/// calling thread.
template <class F>
void parallel_rows(index_t rows, index_t cols, F&& body, index_t min_elements = index_t(1) << 15) {
  const index_t threads =
      elementwise_parallel() && rows * cols >= min_elements ? std::min<index_t>(max_threads(), rows) : 1;
  if (threads <= 1) {
    if (rows > 0) body(index_t(0), rows);
    return;
  }
  const index_t step = (rows + threads - 1) / threads;
  parallel_for(threads, true, [&](index_t c) {
    const index_t r0 = c * step, n = std::min(step, rows - r0);
    if (n > 0) body(r0, n);
  });
}

}  // namespace detail
DELTAW_NAMESPACE_END
