// SPDX-License-Identifier: MIT
// deltaw::cuda::context: the stream, library handles and scratch memory that CUDA
// operations run with; one default context per host thread and device.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <deltaw/core/view.hpp>

#include "error.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

/// Number of visible CUDA devices, or 0 when CUDA is unusable (no driver, no device);
/// then *why, if given, says why. Never throws: tests use it to skip.
inline int device_count(std::string* why = nullptr) noexcept {
  int n = 0;
  const cudaError_t s = cudaGetDeviceCount(&n);
  if (s != cudaSuccess) {
    if (why) *why = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(s) + ": " + cudaGetErrorString(s);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  if (n == 0 && why) *why = "cudaGetDeviceCount returned 0 devices";
  return n;
}

/// Makes `device` current for its lifetime and restores the previous one, so that an
/// operation runs on its context's device whatever the calling thread had selected.
class device_guard {
 public:
  explicit device_guard(int device) {
    DELTAW_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) DELTAW_CUDA_CHECK(cudaSetDevice(device));
  }
  ~device_guard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  device_guard(const device_guard&) = delete;
  device_guard& operator=(const device_guard&) = delete;

 private:
  int previous_ = 0;
};

/// Where operations run: a stream on one device, a cuBLAS handle bound to it, a cuSOLVER
/// handle (created on first use: most operations never need it) and a growable scratch
/// arena. Operations are asynchronous on stream(), like cuBLAS calls. A context is not
/// thread-safe; use one per host thread (default_context() does).
class context {
 public:
  using device_type = device::cuda;

  /// A context on the current device with its own stream.
  context() : context(current_device()) {}

  /// A context on `device` with its own stream. The stream is a blocking one, so plain
  /// cudaMemcpy calls (the legacy default stream) are ordered with it.
  explicit context(int device) : device_(device), owns_stream_(true) {
    device_guard g(device_);
    DELTAW_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamDefault));
    init_blas();
  }

  /// A context on `device` that borrows the caller's stream (not destroyed here), to
  /// run inside an engine that owns its streams.
  context(int device, cudaStream_t stream) : device_(device), stream_(stream), owns_stream_(false) {
    device_guard g(device_);
    init_blas();
  }

  ~context() { release_all(); }

  context(const context&) = delete;
  context& operator=(const context&) = delete;

  int device() const noexcept { return device_; }
  cudaStream_t stream() const noexcept { return stream_; }
  cublasHandle_t cublas() const noexcept { return cublas_; }

  /// The cuSOLVER handle, created on first use and bound to stream().
  cusolverDnHandle_t cusolver() {
    if (!cusolver_) {
      device_guard g(device_);
      DELTAW_CUDA_CHECK(cusolverDnCreate(&cusolver_));
      DELTAW_CUDA_CHECK(cusolverDnSetStream(cusolver_, stream_));
    }
    return cusolver_;
  }

  /// Waits for everything issued on stream().
  void synchronize() const { DELTAW_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  // ---- scratch arena ----------------------------------------------------------------
  // Operations take scratch with allocate<T>(n) between begin_operation() and the end of
  // the public call. Because every use is ordered on stream(), scratch is reused by the
  // next operation without waiting. Growth adds a chunk (earlier pointers stay valid);
  // begin_operation() folds the chunks into one when no operation is in flight on the
  // host side, synchronising the stream once per growth. Taking scratch is allowed
  // through a const context (the primitives and evaluators hold it as `const Ctx&`, like
  // the stateless CPU context): the arena is the context's working memory, not its value.

  /// Marks the start of a public operation.
  void begin_operation() {
    if (chunks_.size() > 1) {
      std::size_t total = 0;
      for (auto& c : chunks_) total += c.bytes;
      DELTAW_CUDA_CHECK(cudaStreamSynchronize(stream_));
      for (auto& c : chunks_) DELTAW_CUDA_CHECK(cudaFree(c.ptr));
      chunks_.clear();
      add_chunk(total);
    }
    current_ = 0;
    offset_ = 0;
  }

  /// Scratch for n elements of T, aligned to 256 bytes; valid until the end of the
  /// current operation (or until release() of an earlier mark).
  template <class T>
  T* allocate(std::size_t n) const {
    return static_cast<T*>(allocate_bytes(n * sizeof(T)));
  }

  /// A position in the arena, to give back the scratch of a loop iteration.
  struct mark {
    std::size_t chunk;
    std::size_t offset;
  };
  mark position() const noexcept { return {current_, offset_}; }
  void release(mark m) const noexcept {
    current_ = m.chunk;
    offset_ = m.offset;
  }

  /// Bytes of scratch held now.
  std::size_t workspace_bytes() const noexcept {
    std::size_t t = 0;
    for (auto& c : chunks_) t += c.bytes;
    return t;
  }

  /// The most scratch in use at once (bytes, alignment included) and the largest single
  /// request since construction or reset_scratch_statistics(): what tests read to show
  /// that no operation asks for a dense out × in matrix.
  std::size_t scratch_high_water_bytes() const noexcept { return high_water_; }
  std::size_t largest_scratch_request_bytes() const noexcept { return largest_request_; }
  void reset_scratch_statistics() noexcept { high_water_ = largest_request_ = 0; }

 private:
  struct chunk {
    void* ptr;
    std::size_t bytes;
  };

  static int current_device() {
    int d = 0;
    DELTAW_CUDA_CHECK(cudaGetDevice(&d));
    return d;
  }

  void init_blas() {
    try {
      init_blas_unguarded();
    } catch (...) {
      release_all();  // the destructor will not run for a half-built context
      throw;
    }
  }
  void init_blas_unguarded() {
    DELTAW_CUDA_CHECK(cublasCreate(&cublas_));
    DELTAW_CUDA_CHECK(cublasSetStream(cublas_, stream_));
    // fp32 products stay fp32 (no TF32), and 16-bit outputs are not reduced in 16 bits:
    // deltaw accumulates in fp32 or wider.
    DELTAW_CUDA_CHECK(cublasSetMathMode(
        cublas_, cublasMath_t(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  }

  // Errors are ignored: this runs in the destructor, and at process exit the runtime may
  // already be shutting down.
  void release_all() noexcept {
    int prev = -1;
    cudaGetDevice(&prev);
    if (prev != device_) cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);  // pending work may still use the scratch
    for (auto& c : chunks_) cudaFree(c.ptr);
    chunks_.clear();
    if (cusolver_) cusolverDnDestroy(cusolver_);
    if (cublas_) cublasDestroy(cublas_);
    if (owns_stream_ && stream_) cudaStreamDestroy(stream_);
    cusolver_ = nullptr;
    cublas_ = nullptr;
    stream_ = nullptr;
    if (prev >= 0 && prev != device_) cudaSetDevice(prev);
  }

  void add_chunk(std::size_t bytes) const {
    device_guard g(device_);
    void* p = nullptr;
    DELTAW_CUDA_CHECK(cudaMalloc(&p, bytes));
    chunks_.push_back({p, bytes});
  }

  /// Bytes in use: the chunks before the current one (wholly, as the arena skips their
  /// tails) and the current one's offset.
  std::size_t in_use_bytes() const noexcept {
    std::size_t t = offset_;
    for (std::size_t i = 0; i < current_ && i < chunks_.size(); ++i) t += chunks_[i].bytes;
    return t;
  }

  void* allocate_bytes(std::size_t bytes) const {
    constexpr std::size_t align = 256;
    bytes = std::max<std::size_t>(align, (bytes + align - 1) / align * align);
    largest_request_ = std::max(largest_request_, bytes);
    void* p = take_bytes(bytes);
    high_water_ = std::max(high_water_, in_use_bytes());
    return p;
  }

  void* take_bytes(std::size_t bytes) const {
    while (current_ < chunks_.size()) {
      if (chunks_[current_].bytes - offset_ >= bytes) {
        void* p = static_cast<char*>(chunks_[current_].ptr) + offset_;
        offset_ += bytes;
        return p;
      }
      ++current_;
      offset_ = 0;
    }
    // Geometric growth (at least doubling what is held) keeps folds, and so stream
    // synchronisations, to O(log) over a run whose token counts grow.
    add_chunk(std::max({bytes, workspace_bytes(), std::size_t(1) << 20}));
    current_ = chunks_.size() - 1;
    offset_ = bytes;
    return chunks_.back().ptr;
  }

  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  bool owns_stream_ = true;
  cublasHandle_t cublas_ = nullptr;
  cusolverDnHandle_t cusolver_ = nullptr;
  mutable std::vector<chunk> chunks_;
  mutable std::size_t current_ = 0;
  mutable std::size_t offset_ = 0;
  mutable std::size_t high_water_ = 0;
  mutable std::size_t largest_request_ = 0;
};

/// The calling thread's context for the current device, created on first use and
/// destroyed when the thread exits.
inline context& default_context() {
  int dev = 0;
  DELTAW_CUDA_CHECK(cudaGetDevice(&dev));
  thread_local std::vector<std::unique_ptr<context>> per_device;
  if (per_device.size() <= std::size_t(dev)) per_device.resize(std::size_t(dev) + 1);
  if (!per_device[std::size_t(dev)]) per_device[std::size_t(dev)] = std::make_unique<context>(dev);
  return *per_device[std::size_t(dev)];
}

}  // namespace cuda
DELTAW_NAMESPACE_END
