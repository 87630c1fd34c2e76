// SPDX-License-Identifier: MIT
// Exceptions thrown by deltaw. Every runtime failure derives from deltaw::error.
#pragma once

#include <stdexcept>
#include <string>
#include <initializer_list>

#include "config.hpp"

DELTAW_NAMESPACE_BEGIN

/// Base class of everything deltaw throws.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Operand shapes are incompatible for the named operation.
class shape_error : public error {
 public:
  using error::error;
};

/// A rank (r) that the method does not allow, e.g. r = 0.
class rank_error : public error {
 public:
  using error::error;
};

/// A null data pointer for a non-empty tensor.
class null_data_error : public error {
 public:
  using error::error;
};

/// A non-finite (NaN/Inf) scalar or a merge whose result would be non-finite.
class non_finite_error : public error {
 public:
  using error::error;
};

/// A layout (strides) or storage the operation cannot use.
class layout_error : public error {
 public:
  using error::error;
};

/// Operands that live on different devices, or a device the build does not support.
class device_error : public error {
 public:
  using error::error;
};

/// An invalid argument that is not a shape, rank or finiteness problem.
class argument_error : public error {
 public:
  using error::error;
};

/// A writable operand of an operation overlaps another of its operands (apply's Y and X,
/// merge's W and B, two gradient buffers, …). deltaw refuses such calls instead of
/// returning a result that depends on the order of its internal reads and writes.
class aliasing_error : public argument_error {
 public:
  using argument_error::argument_error;
};

namespace detail {
inline std::string shape_str(index_t rows, index_t cols) {
  // Appended piece by piece: `"[" + std::to_string(...)` trips GCC 12's false -Wrestrict.
  std::string s("[");
  s += std::to_string(rows);
  s += ", ";
  s += std::to_string(cols);
  s += ']';
  return s;
}
}  // namespace detail

DELTAW_NAMESPACE_END
