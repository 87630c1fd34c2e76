// SPDX-License-Identifier: MIT
// C3A (Chen et al. 2025, "Parameter-Efficient Fine-Tuning via Circular Convolution",
// arXiv:2407.19342; PEFT 0.21's `c3a`): ΔW [out, in] is block-circulant, an (out/b) × (in/b)
// grid of b × b circulant blocks, each from one length-b kernel w_{m,j} (PEFT's c3a_kernel
// [out/b, in/b, b]), times s (PEFT: s = 1/in, its division by the weight's last dimension):
//     ΔW[m·b + k, j·b + t] = s·w_{m,j}[(t − k) mod b]
// i.e. the output block y_m = s·Σ_j corr(w_{m,j}, x_j), y_m[k] = s·Σ_t w_{m,j}[t]·x_j[(k + t) mod b]
// — the circular correlation PEFT computes as fft(ifft(x)·fft(w)).real.
//
// The kernel is held as a matrix [out/b · in/b, b] (row m·(in/b) + j is w_{m,j}: PEFT's
// tensor flattened over its first two axes). Apply (backend/cpu/c3a.hpp) goes through the
// frequency domain: real FFTs of the in/b input blocks, per frequency one complex product
// with the (out/b) × (in/b) kernel spectra, inverse real FFTs of the out/b output blocks:
// 4·tokens·out·in/b flops plus the FFTs, never ΔW.
#pragma once

#include <string>
#include <utility>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

template <class T, class Device = device::cpu>
class c3a_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "C3A";

  /// kernel [out/b · in/b, b]: row m·(in/b) + j is the kernel of block (m, j).
  c3a_update(held_matrix<T, Device> kernel, index_t out, index_t in, double s)
      : K_(std::move(kernel)), out_(out), in_(in), scale_(detail::checked_scale(s, "deltaw::c3a")) {
    const index_t b = K_.view.cols();
    const std::string shapes = "ΔW [" + std::to_string(out) + ", " + std::to_string(in) + "], kernel " +
                               detail::shape_str(K_.view.rows(), b) + " [out/b · in/b, b]";
    if (b < 1) throw shape_error("deltaw::c3a: the block size b (the kernel's columns) must be at least 1; got " + shapes);
    if (out < 0 || in < 0 || out % b != 0 || in % b != 0)
      throw shape_error("deltaw::c3a: the block size must divide out and in (PEFT's block_size); got " + shapes);
    if (K_.view.rows() != (out / b) * (in / b))
      throw shape_error("deltaw::c3a: the kernel must have out/b · in/b = " + std::to_string((out / b) * (in / b)) +
                        " rows; got " + shapes);
  }

  index_t rows() const { return out_; }
  index_t cols() const { return in_; }
  /// The block size b.
  index_t block_size() const { return K_.view.cols(); }
  index_t row_blocks() const { return out_ / block_size(); }
  index_t col_blocks() const { return in_ / block_size(); }
  double scale() const { return scale_; }
  const matrix_view<const T, Device>& kernel() const { return K_.view; }
  template <class F>
  void for_each_operand(F&& f) const {
    f("kernel", K_.view);
  }

  /// out·in/b values.
  index_t parameter_count() const { return K_.view.rows() * K_.view.cols(); }
  /// Extra flops of apply over the base GEMM: the frequency-domain products
  /// (4·tokens·out·in/b) and, counting a real FFT of length b as 2.5·b·log₂b, the
  /// per-token FFTs of in/b input and out/b output blocks.
  index_t flop_count(index_t tokens) const {
    const index_t b = block_size();
    index_t l = 0;
    while ((index_t(1) << l) < b) ++l;
    return 4 * tokens * out_ * in_ / b + tokens * (in_ + out_) * 5 * l / 2;
  }

  c3a_update with_scale(double s) const { return c3a_update(K_, out_, in_, s); }

 private:
  held_matrix<T, Device> K_;
  index_t out_, in_;
  double scale_;
};

namespace detail {
template <class K>
auto make_c3a(K&& kernel, index_t out, index_t in, double s) {
  auto h = hold(std::forward<K>(kernel));
  using T = std::remove_const_t<typename decltype(h.view)::element_type>;
  return c3a_update<T, typename decltype(h.view)::device_type>(std::move(h), out, in, s);
}
}  // namespace detail

/// C3A over an [out, in] layer with PEFT's scale 1/in. kernel: [out/b · in/b, b] (PEFT's
/// c3a_kernel [out/b, in/b, b] flattened over its first two axes), held by view or owned.
template <class K>
auto c3a(K&& kernel, index_t out, index_t in) {
  return detail::make_c3a(std::forward<K>(kernel), out, in, in > 0 ? 1.0 / double(in) : 1.0);
}
/// C3A with an explicit scale s.
template <class K>
auto c3a(K&& kernel, index_t out, index_t in, scale s) {
  return detail::make_c3a(std::forward<K>(kernel), out, in, s.value);
}

DELTAW_NAMESPACE_END
