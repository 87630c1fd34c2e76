// SPDX-License-Identifier: MIT
// Views over CUDA device memory. Plain C++ (no CUDA headers needed), so host code
// compiled by any compiler can build CUDA expressions.
#pragma once

#include <deltaw/core/view.hpp>

DELTAW_NAMESPACE_BEGIN
namespace cuda {

/// Row-major contiguous [rows, cols] view of device memory (the pointer must be
/// device-accessible: cudaMalloc, cudaMallocManaged, or a tensor's device storage).
template <storage_type T>
matrix_view<T, device::cuda> view(T* data, index_t rows, index_t cols) {
  return matrix_view<T, device::cuda>(data, rows, cols);
}

/// Strided view of device memory (strides in elements). The CUDA operations need a unit
/// stride in one dimension (row-major or column-major with padding); others throw
/// layout_error when used.
template <storage_type T>
matrix_view<T, device::cuda> view(T* data, index_t rows, index_t cols, index_t row_stride, index_t col_stride) {
  return matrix_view<T, device::cuda>(data, rows, cols, row_stride, col_stride);
}

}  // namespace cuda
DELTAW_NAMESPACE_END
