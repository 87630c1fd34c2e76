// SPDX-License-Identifier: MIT
// DoRA: W' = diag(m / n)·(W + s·B·A), n the row norms of W + s·B·A, treated as constants
// (PEFT detaches them). As an update of W it is
//     ΔW = W' − W = diag(g − 1)·W + diag(g)·s·B·A,   g = m / n,
// so it composes in the lazy sum like any other update. The norms are computed once,
// without the dense matrix (backend/cpu/dora.hpp), and cached here; unmerge uses them.
#pragma once

#include <memory>
#include <vector>

#include "low_rank.hpp"

DELTAW_NAMESPACE_BEGIN

template <class T, class TW, class Device = device::cpu>
class dora_update {
 public:
  using value_type = T;
  using weight_type = TW;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "DoRA";

  /// norms: the cached row norms n of W + s·B·A (size out), on the host.
  dora_update(held_matrix<TW, Device> W, low_rank<T, Device> lora, held_vector<T, Device> m,
       std::shared_ptr<const std::vector<double>> norms)
      : W_(std::move(W)), lora_(std::move(lora)), m_(std::move(m)), norms_(std::move(norms)) {
    if (W_.view.rows() != lora_.rows() || W_.view.cols() != lora_.cols())
      throw shape_error("deltaw::dora: W is " + detail::shape_str(W_.view.rows(), W_.view.cols()) +
                        " but the LoRA update is " + detail::shape_str(lora_.rows(), lora_.cols()));
    if (m_.view.size() != lora_.rows())
      throw shape_error("deltaw::dora: the magnitude vector has " + std::to_string(m_.view.size()) +
                        " entries; W has " + std::to_string(lora_.rows()) + " rows");
    if (!norms_ || index_t(norms_->size()) != lora_.rows())
      throw shape_error("deltaw::dora: cached row norms missing or of the wrong size");
  }

  index_t rows() const { return lora_.rows(); }
  index_t cols() const { return lora_.cols(); }
  index_t rank() const { return lora_.rank(); }
  const low_rank<T, Device>& lora() const { return lora_; }
  const matrix_view<const TW, Device>& W() const { return W_.view; }
  const vector_view<const T, Device>& magnitude() const { return m_.view; }
  /// Calls f(name, view) for every view ΔW reads except the weight W() (the aliasing checks of the
  /// operations that write).
  template <class F>
  void for_each_operand(F&& f) const {
    lora_.for_each_operand(f);
    f("m", m_.view);
  }
  /// Cached ‖w_o + s·b_o·A‖ per output row o.
  const std::vector<double>& norms() const { return *norms_; }
  /// g_o = m_o / n_o (a zero norm gives g_o = 0 for m_o = 0, else +inf: a loud failure).
  double gain(index_t o) const { return double(convert<double>(m_.view[o])) / (*norms_)[std::size_t(o)]; }

  /// LoRA's r·(out + in) plus the magnitude vector.
  index_t parameter_count() const { return lora_.parameter_count() + rows(); }
  /// LoRA's extra flops plus the column scaling of the output.
  index_t flop_count(index_t tokens) const { return lora_.flop_count(tokens) + tokens * rows(); }

 private:
  held_matrix<TW, Device> W_;
  low_rank<T, Device> lora_;
  held_vector<T, Device> m_;
  std::shared_ptr<const std::vector<double>> norms_;
};

DELTAW_NAMESPACE_END
