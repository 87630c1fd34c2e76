// SPDX-License-Identifier: MIT
// deltaw::cuda::buffer<T>: a small owning device array for tests and examples, with
// host upload/download. Real engines keep their own tensors and pass views.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "error.cuh"
#include "view.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

template <storage_type T>
class buffer {
 public:
  buffer() = default;
  /// n uninitialised elements on the current device.
  explicit buffer(std::size_t n) : size_(n) {
    if (n > 0) DELTAW_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data_), n * sizeof(T)));
  }
  /// A copy of n host elements.
  buffer(const T* host, std::size_t n) : buffer(n) { upload(host, n); }
  /// A copy of a host range with contiguous storage (std::vector, Eigen matrix, …) of T.
  template <class R>
    requires requires(const R& r) {
      { r.data() } -> std::convertible_to<const T*>;
      r.size();
    }
  explicit buffer(const R& host) : buffer(host.data(), std::size_t(host.size())) {}

  buffer(buffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  buffer& operator=(buffer&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  buffer(const buffer&) = delete;
  buffer& operator=(const buffer&) = delete;
  ~buffer() { reset(); }

  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }

  /// Copies n host elements in. cudaMemcpy runs on the legacy default stream, which
  /// waits for work already issued on deltaw contexts' (blocking) streams.
  void upload(const T* host, std::size_t n) {
    check_size(n, "upload");
    if (n > 0) DELTAW_CUDA_CHECK(cudaMemcpy(data_, host, n * sizeof(T), cudaMemcpyHostToDevice));
  }
  /// Copies n elements out, after the work issued before it has finished (see upload).
  void download(T* host, std::size_t n) const {
    check_size(n, "download");
    if (n > 0) DELTAW_CUDA_CHECK(cudaMemcpy(host, data_, n * sizeof(T), cudaMemcpyDeviceToHost));
  }
  std::vector<T> to_vector() const {
    std::vector<T> v(size_);
    download(v.data(), size_);
    return v;
  }

  /// Row-major [rows, cols] view of the first rows·cols elements.
  matrix_view<T, device::cuda> view(index_t rows, index_t cols) {
    check_view(rows, cols);
    return matrix_view<T, device::cuda>(data_, rows, cols);
  }
  matrix_view<const T, device::cuda> view(index_t rows, index_t cols) const {
    check_view(rows, cols);
    return matrix_view<const T, device::cuda>(data_, rows, cols);
  }
  /// Strided view (strides in elements); the extent it spans must fit in the buffer.
  matrix_view<T, device::cuda> view(index_t rows, index_t cols, index_t row_stride, index_t col_stride) {
    if (rows > 0 && cols > 0) {
      const index_t last = (rows - 1) * row_stride + (cols - 1) * col_stride;
      if (last < 0 || std::size_t(last) >= size_)
        throw shape_error("deltaw::cuda::buffer::view: a " + ::deltaw::detail::shape_str(rows, cols) + " view with strides (" +
                          std::to_string(row_stride) + ", " + std::to_string(col_stride) +
                          ") reaches past the buffer of " + std::to_string(size_) + " elements");
    }
    return matrix_view<T, device::cuda>(data_, rows, cols, row_stride, col_stride);
  }

 private:
  void reset() noexcept {
    if (data_) cudaFree(data_);
    data_ = nullptr;
    size_ = 0;
  }
  void check_size(std::size_t n, const char* op) const {
    if (n > size_)
      throw shape_error(std::string("deltaw::cuda::buffer::") + op + ": " + std::to_string(n) +
                        " elements requested but the buffer holds " + std::to_string(size_));
  }
  void check_view(index_t rows, index_t cols) const {
    if (rows < 0 || cols < 0 || std::size_t(rows) * std::size_t(cols) > size_)
      throw shape_error("deltaw::cuda::buffer::view: " + ::deltaw::detail::shape_str(rows, cols) + " does not fit in " +
                        std::to_string(size_) + " elements");
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace cuda
DELTAW_NAMESPACE_END
