// SPDX-License-Identifier: MIT
// Helpers of the CUDA tests: a matrix held on the host (for the CPU backend) and on the
// device in one layout, and NaN-filled outputs. Included by each test_cuda_*.cu.
#pragma once

#include <deltaw/cuda/cuda.hpp>
#include <deltaw/deltaw.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "test_util.hpp"

namespace dwcuda {
using deltaw::index_t;
using dwt::MatD;
namespace dw = deltaw;

/// A matrix held twice: on the host (for the CPU backend) and on the device, with the
/// same layout, row-major or column-major.
template <class T>
struct twin {
  index_t rows, cols;
  bool col_major;
  std::vector<T> host;
  dw::cuda::buffer<T> dev;

  twin(const MatD& m, bool cm = false) : rows(m.rows()), cols(m.cols()), col_major(cm), host(std::size_t(m.size())) {
    for (index_t i = 0; i < rows; ++i)
      for (index_t j = 0; j < cols; ++j) host[std::size_t(i * rs() + j * cs())] = dw::convert<T>(m(i, j));
    dev = dw::cuda::buffer<T>(host);
  }
  index_t rs() const { return col_major ? 1 : cols; }
  index_t cs() const { return col_major ? rows : 1; }
  auto cpu() { return dw::view(host.data(), rows, cols, rs(), cs()); }
  auto gpu() { return dw::cuda::view(dev.data(), rows, cols, rs(), cs()); }
  /// The host values (what the CPU backend wrote, or the rounded input) in double.
  MatD host_d() const { return to_d(host); }
  /// The device values in double.
  MatD dev_d() const { return to_d(dev.to_vector()); }

 private:
  MatD to_d(const std::vector<T>& v) const {
    MatD m(rows, cols);
    for (index_t i = 0; i < rows; ++i)
      for (index_t j = 0; j < cols; ++j) m(i, j) = dw::convert<double>(v[std::size_t(i * rs() + j * cs())]);
    return m;
  }
};

/// A vector of n values on the host and the device (a column twin).
template <class T>
struct vtwin {
  twin<T> m;
  explicit vtwin(const MatD& v) : m(v) {}
  dw::vector_view<const T> cpu() const { return dw::vector_view<const T>(m.host.data(), m.rows); }
  dw::vector_view<const T, dw::device::cuda> gpu() const {
    return dw::vector_view<const T, dw::device::cuda>(m.dev.data(), m.rows);
  }
};

/// Integer indices in device memory (buffer<T> holds storage types only).
struct dev_indices {
  index_t* p = nullptr;
  index_t n = 0;
  explicit dev_indices(const std::vector<index_t>& h) : n(index_t(h.size())) {
    DELTAW_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p), std::max<std::size_t>(1, h.size()) * sizeof(index_t)));
    if (!h.empty()) DELTAW_CUDA_CHECK(cudaMemcpy(p, h.data(), h.size() * sizeof(index_t), cudaMemcpyHostToDevice));
  }
  dev_indices(const dev_indices&) = delete;
  dev_indices& operator=(const dev_indices&) = delete;
  ~dev_indices() { (void)cudaFree(p); }
  dw::vector_view<const index_t, dw::device::cuda> gpu() const { return {p, n}; }
};

/// LoRA adapters of ranks `ranks` over [out, in], held on the host and the device (B row-major
/// for even a, A for odd a, the other column-major), scale `scaling(a)` (a dw::scale or
/// dw::alpha), and ΔW_a = s·B·A in double from the stored values.
template <class T>
struct lora_twins {
  std::vector<std::unique_ptr<twin<T>>> B, A;
  std::vector<dw::low_rank<T, dw::device::cuda>> gpu;
  std::vector<dw::low_rank<T>> cpu;
  std::vector<MatD> delta;
  template <class Scaling>
  lora_twins(index_t out, index_t in, const std::vector<index_t>& ranks, std::uint64_t seed, Scaling scaling) {
    for (std::size_t a = 0; a < ranks.size(); ++a) {
      const index_t r = ranks[a];
      B.push_back(std::make_unique<twin<T>>(dwt::random(out, r, seed + 2 * a), a % 2 == 0));
      A.push_back(std::make_unique<twin<T>>(dwt::random(r, in, seed + 2 * a + 1), a % 2 == 1));
      gpu.push_back(dw::lora(B.back()->gpu(), A.back()->gpu(), scaling(a)));
      cpu.push_back(dw::lora(B.back()->cpu(), A.back()->cpu(), scaling(a)));
      delta.push_back(cpu.back().scale() * B.back()->host_d() * A.back()->host_d());
    }
  }
};

/// An output filled with NaN, so that a product that reads C when β = 0 shows up.
template <class C>
twin<C> nan_output(index_t rows, index_t cols, bool cm) {
  return twin<C>(MatD::Constant(rows, cols, std::numeric_limits<double>::quiet_NaN()), cm);
}

}  // namespace dwcuda
