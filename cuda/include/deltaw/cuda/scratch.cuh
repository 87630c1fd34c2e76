// SPDX-License-Identifier: MIT
// The primitive layer's scratch matrix on CUDA: kernels::scratch<C, device::cuda>, taken
// from a cuda::context's arena, which is what kernels::make_scratch, kernels::operand and
// the evaluators written against the primitive layer (deltaw/backend/cpu/) get when they
// run with a cuda::context.
#pragma once

#include <algorithm>
#include <cstddef>
#include <utility>

#include <deltaw/kernels/context.hpp>

#include "context.cuh"

DELTAW_NAMESPACE_BEGIN
namespace kernels {

/// A rows × cols dense row-major matrix of C in ctx's scratch arena (contents
/// unspecified). It lives at most until the end of the public operation it was taken in
/// (the arena is reused by the next one). Destroyed while it is the arena's most recent
/// allocation, it gives its memory back at once, so scratch taken and dropped in a loop
/// does not accumulate; otherwise the memory returns when the operation ends.
template <class C>
class scratch<C, device::cuda> {
 public:
  scratch() = default;
  scratch(const cuda::context& ctx, index_t rows, index_t cols)
      : ctx_(&ctx), rows_(rows), cols_(cols), start_(ctx.position()) {
    if (rows > 0 && cols > 0) data_ = ctx.allocate<C>(std::size_t(rows) * std::size_t(cols));
    end_ = ctx.position();
  }
  scratch(scratch&& o) noexcept { take(o); }
  scratch& operator=(scratch&& o) noexcept {
    if (this != &o) {
      give_back();
      take(o);
    }
    return *this;
  }
  scratch(const scratch&) = delete;
  scratch& operator=(const scratch&) = delete;
  ~scratch() { give_back(); }

  index_t rows() const { return rows_; }
  index_t cols() const { return cols_; }
  C* data() { return data_; }
  const C* data() const { return data_; }
  matrix_view<C, device::cuda> view() { return {data_, rows_, cols_, std::max<index_t>(cols_, 1), 1}; }
  matrix_view<const C, device::cuda> view() const { return {data_, rows_, cols_, std::max<index_t>(cols_, 1), 1}; }
  matrix_view<const C, device::cuda> cview() const { return view(); }

 private:
  void take(scratch& o) noexcept {
    ctx_ = std::exchange(o.ctx_, nullptr);
    data_ = std::exchange(o.data_, nullptr);
    rows_ = std::exchange(o.rows_, 0);
    cols_ = std::exchange(o.cols_, 0);
    start_ = o.start_;
    end_ = o.end_;
  }
  void give_back() noexcept {
    if (!ctx_) return;
    const auto now = ctx_->position();
    if (now.chunk == end_.chunk && now.offset == end_.offset) ctx_->release(start_);
    ctx_ = nullptr;
  }

  const cuda::context* ctx_ = nullptr;
  C* data_ = nullptr;
  index_t rows_ = 0, cols_ = 0;
  cuda::context::mark start_{0, 0}, end_{0, 0};
};

}  // namespace kernels
DELTAW_NAMESPACE_END
