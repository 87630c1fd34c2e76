// SPDX-License-Identifier: MIT
// Host implementation of the CUDA runtime entry points declared in
// cuda/host/include/cuda_runtime.h. Every call completes before it returns.
#include <cuda_runtime.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>

#include "shim.hpp"

using deltaw_cuda_host::detail::device_range_locked;
using deltaw_cuda_host::detail::reg;
using deltaw_cuda_host::detail::valid_stream_locked;

struct CUstream_st {
  unsigned flags;
};
struct CUevent_st {
  unsigned flags;
  bool recorded = false;
  std::chrono::steady_clock::time_point when{};
};

namespace {

thread_local cudaError_t last_error = cudaSuccess;
thread_local int current_device = 0;
constexpr int device_count = 1;
constexpr std::size_t alignment = 256;  // cudaMalloc's guarantee

/// Records a failure as the thread's last error (as the runtime does) and returns it.
cudaError_t fail(cudaError_t e) {
  last_error = e;
  return e;
}

bool device_range(const void* p, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(reg().mutex);
  return device_range_locked(p, bytes);
}

bool valid_stream(cudaStream_t s) {
  std::lock_guard<std::mutex> lock(reg().mutex);
  return valid_stream_locked(s);
}

/// The checks of a copy: the device side(s) named by kind inside live allocations.
cudaError_t check_copy(void* dst, const void* src, std::size_t count, cudaMemcpyKind kind) {
  if (count == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return cudaErrorInvalidValue;
  switch (kind) {
    case cudaMemcpyHostToHost: return cudaSuccess;
    case cudaMemcpyHostToDevice: return device_range(dst, count) ? cudaSuccess : cudaErrorInvalidValue;
    case cudaMemcpyDeviceToHost: return device_range(src, count) ? cudaSuccess : cudaErrorInvalidValue;
    case cudaMemcpyDeviceToDevice:
      return device_range(dst, count) && device_range(src, count) ? cudaSuccess : cudaErrorInvalidValue;
    case cudaMemcpyDefault: return cudaSuccess;
  }
  return cudaErrorInvalidMemcpyDirection;
}

}  // namespace

namespace deltaw_cuda_host {
bool is_device_range(const void* p, std::size_t bytes) noexcept { return device_range(p, bytes); }
std::size_t device_bytes_in_use() noexcept {
  std::lock_guard<std::mutex> lock(reg().mutex);
  std::size_t t = 0;
  for (const auto& a : reg().allocations) t += a.second;
  return t;
}
}  // namespace deltaw_cuda_host

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
  if (count == nullptr) return fail(cudaErrorInvalidValue);
  *count = device_count;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return fail(cudaErrorInvalidValue);
  *device = current_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= device_count) return fail(cudaErrorInvalidDevice);
  current_device = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidPitchValue: return "cudaErrorInvalidPitchValue";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorUnknown: return "cudaErrorUnknown";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidPitchValue: return "invalid pitch argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorUnknown: return "unknown error";
  }
  return "unrecognized error code";
}

cudaError_t cudaMalloc(void** devPtr, std::size_t size) {
  if (devPtr == nullptr) return fail(cudaErrorInvalidValue);
  *devPtr = nullptr;
  if (size == 0) return cudaSuccess;
  const std::size_t rounded = (size + alignment - 1) / alignment * alignment;
  if (rounded < size) return fail(cudaErrorMemoryAllocation);
  void* p = std::aligned_alloc(alignment, rounded);
  if (p == nullptr) return fail(cudaErrorMemoryAllocation);
  std::memset(p, 0xFF, rounded);  // NaN in every float format: reads of unwritten memory show
  try {
    std::lock_guard<std::mutex> lock(reg().mutex);
    reg().allocations.emplace(reinterpret_cast<std::uintptr_t>(p), size);
  } catch (const std::bad_alloc&) {
    std::free(p);
    return fail(cudaErrorMemoryAllocation);
  }
  *devPtr = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void* devPtr) {
  if (devPtr == nullptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lock(reg().mutex);
    if (reg().allocations.erase(reinterpret_cast<std::uintptr_t>(devPtr)) == 0) return fail(cudaErrorInvalidValue);
  }
  std::free(devPtr);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t count, cudaMemcpyKind kind) {
  if (const cudaError_t e = check_copy(dst, src, count, kind); e != cudaSuccess) return fail(e);
  if (count > 0) std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t count, cudaMemcpyKind kind, cudaStream_t stream) {
  if (!valid_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  return cudaMemcpy(dst, src, count, kind);
}

cudaError_t cudaMemset(void* devPtr, int value, std::size_t count) {
  if (!device_range(devPtr, count)) return fail(cudaErrorInvalidValue);
  if (count > 0) std::memset(devPtr, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* devPtr, int value, std::size_t count, cudaStream_t stream) {
  if (!valid_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  return cudaMemset(devPtr, value, count);
}

cudaError_t cudaMemset2DAsync(void* devPtr, std::size_t pitch, int value, std::size_t width, std::size_t height,
                              cudaStream_t stream) {
  if (!valid_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  if (width == 0 || height == 0) return cudaSuccess;
  if (height > 1 && width > pitch) return fail(cudaErrorInvalidValue);
  if (!device_range(devPtr, pitch * (height - 1) + width)) return fail(cudaErrorInvalidValue);
  for (std::size_t r = 0; r < height; ++r) std::memset(static_cast<char*>(devPtr) + r * pitch, value, width);
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* pStream, unsigned int flags) {
  if (pStream == nullptr || (flags & ~unsigned(cudaStreamNonBlocking)) != 0) return fail(cudaErrorInvalidValue);
  auto* s = new (std::nothrow) CUstream_st{flags};
  if (s == nullptr) return fail(cudaErrorMemoryAllocation);
  std::lock_guard<std::mutex> lock(reg().mutex);
  reg().streams.insert(s);
  *pStream = s;
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* pStream) { return cudaStreamCreateWithFlags(pStream, cudaStreamDefault); }

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  {
    std::lock_guard<std::mutex> lock(reg().mutex);
    if (stream == nullptr || reg().streams.erase(stream) == 0) return fail(cudaErrorInvalidResourceHandle);
  }
  delete stream;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  return valid_stream(stream) ? cudaSuccess : fail(cudaErrorInvalidResourceHandle);
}

cudaError_t cudaStreamQuery(cudaStream_t stream) {
  return valid_stream(stream) ? cudaSuccess : fail(cudaErrorInvalidResourceHandle);
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags) {
  constexpr unsigned known = cudaEventBlockingSync | cudaEventDisableTiming;
  if (event == nullptr || (flags & ~known) != 0) return fail(cudaErrorInvalidValue);
  auto* e = new (std::nothrow) CUevent_st{flags};
  if (e == nullptr) return fail(cudaErrorMemoryAllocation);
  std::lock_guard<std::mutex> lock(reg().mutex);
  reg().events.insert(e);
  *event = e;
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, cudaEventDefault); }

namespace {
bool valid_event(cudaEvent_t e) {
  std::lock_guard<std::mutex> lock(reg().mutex);
  return e != nullptr && reg().events.count(e) != 0;
}
}  // namespace

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  {
    std::lock_guard<std::mutex> lock(reg().mutex);
    if (event == nullptr || reg().events.erase(event) == 0) return fail(cudaErrorInvalidResourceHandle);
  }
  delete event;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  if (!valid_event(event) || !valid_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  event->recorded = true;
  event->when = std::chrono::steady_clock::now();
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  return valid_event(event) ? cudaSuccess : fail(cudaErrorInvalidResourceHandle);
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (ms == nullptr) return fail(cudaErrorInvalidValue);
  if (!valid_event(start) || !valid_event(end)) return fail(cudaErrorInvalidResourceHandle);
  if ((start->flags | end->flags) & cudaEventDisableTiming) return fail(cudaErrorInvalidResourceHandle);
  if (!start->recorded || !end->recorded) return fail(cudaErrorInvalidResourceHandle);
  *ms = std::chrono::duration<float, std::milli>(end->when - start->when).count();
  return cudaSuccess;
}

}  // extern "C"
