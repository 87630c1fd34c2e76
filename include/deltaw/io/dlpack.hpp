// SPDX-License-Identifier: MIT
// DLPack tensors (PyTorch, JAX, CuPy, NumPy's __dlpack__) as deltaw views, without copying.
//
//   auto W = io::dlpack_matrix<const float>(managed->dl_tensor);          // borrow
//   auto H = io::dlpack_take_matrix<const float>(managed);                // own: deleter on release
//   auto G = io::dlpack_matrix<float, device::cuda>(t);                   // CUDA memory
//
// Mapping (DLPack → deltaw):
//   dtype   float32 → float, float64 → double, float16 → fp16, bfloat16 → bf16; lanes 1.
//   device  device::cpu: kDLCPU and kDLCUDAHost (pinned host memory);
//           device::cuda: kDLCUDA and kDLCUDAManaged. The CUDA view type is core's
//           matrix_view<T, device::cuda>: nothing here needs the CUDA toolkit.
//   layout  data + byte_offset; strides in elements (null = compact row-major). Strides of
//           dimensions of extent 1 are ignored (frameworks report arbitrary ones there).
// Refused, with the problem named: ndim ≠ 2 (matrix) / ≠ 1 (vector): shape_error; a dtype
// that is not T's: argument_error; a device the view type cannot address: device_error;
// negative strides, a misaligned pointer, and layouts deltaw's kernels cannot use:
// layout_error. deltaw's CPU evaluators read any non-negative strides, so a const CPU
// matrix may have any; a writable matrix, or any CUDA matrix, needs a unit stride in one
// dimension (the GEMM backends' rule), and a writable view no zero (broadcast) stride.
// DLManagedTensorVersioned (DLPack ≥ 1.0, when the header in use defines it) additionally:
// a major version other than the header's → argument_error (for the take overloads the
// deleter is then called, as the DLPack spec asks); READ_ONLY with a non-const T →
// argument_error.
//
// The borrowing overloads never call the deleter: the producer's tensor must outlive the
// view. The take overloads wrap the managed tensor in the returned held_matrix's owner,
// which calls the deleter when its last copy goes; if they throw (other than for a version
// mismatch) the caller still owns the tensor.
#pragma once

#include <dlpack/dlpack.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>

#include "../core/view.hpp"

DELTAW_NAMESPACE_BEGIN
namespace io {

namespace detail {

inline std::string dlpack_dtype_name(DLDataType d) {
  std::string base;
  switch (d.code) {
    case kDLInt: base = "int"; break;
    case kDLUInt: base = "uint"; break;
    case kDLFloat: base = "float"; break;
    case kDLBfloat: base = "bfloat"; break;
    case kDLComplex: base = "complex"; break;
    case kDLOpaqueHandle: base = "opaque"; break;
    default:
      base = "code";
      base += std::to_string(int(d.code));
      base += '_';
      break;
  }
  base += std::to_string(int(d.bits));
  if (d.lanes != 1) {
    base += 'x';
    base += std::to_string(int(d.lanes));
  }
  return base;
}

inline std::string dlpack_device_name(DLDeviceType t) {
  switch (t) {
    case kDLCPU: return "kDLCPU";
    case kDLCUDA: return "kDLCUDA";
    case kDLCUDAHost: return "kDLCUDAHost";
    case kDLOpenCL: return "kDLOpenCL";
    case kDLVulkan: return "kDLVulkan";
    case kDLMetal: return "kDLMetal";
    case kDLVPI: return "kDLVPI";
    case kDLROCM: return "kDLROCM";
    case kDLROCMHost: return "kDLROCMHost";
    case kDLExtDev: return "kDLExtDev";
    case kDLCUDAManaged: return "kDLCUDAManaged";
    default: return "device type " + std::to_string(int(t));
  }
}

template <class T>
constexpr DLDataType dlpack_dtype_of() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>) return DLDataType{std::uint8_t(kDLFloat), 32, 1};
  else if constexpr (std::is_same_v<U, double>) return DLDataType{std::uint8_t(kDLFloat), 64, 1};
  else if constexpr (std::is_same_v<U, fp16>) return DLDataType{std::uint8_t(kDLFloat), 16, 1};
  else return DLDataType{std::uint8_t(kDLBfloat), 16, 1};
}

template <class Device>
bool dlpack_device_ok(DLDeviceType t) {
  if constexpr (std::is_same_v<Device, device::cpu>) return t == kDLCPU || t == kDLCUDAHost;
  else if constexpr (std::is_same_v<Device, device::cuda>) return t == kDLCUDA || t == kDLCUDAManaged;
  else return false;
}

/// Checks everything but the dimensions and returns the first element's address.
template <class T, class Device>
T* dlpack_checked_data(const DLTensor& t, int want_ndim, const char* op) {
  static_assert(storage_type<std::remove_const_t<T>>,
                "deltaw::io::dlpack: T must be float, double, deltaw::bf16 or deltaw::fp16 (const for read-only)");
  const std::string where = std::string("deltaw::io::") + op + ": ";
  if (!dlpack_device_ok<Device>(t.device.device_type))
    throw device_error(where + "a " + dlpack_device_name(t.device.device_type) + " tensor cannot be viewed as a " +
                       Device::name + " view (" +
                       (std::is_same_v<Device, device::cpu> ? "kDLCPU or kDLCUDAHost" : "kDLCUDA or kDLCUDAManaged") +
                       " needed)");
  if (t.ndim != want_ndim)
    throw shape_error(where + "the tensor has ndim " + std::to_string(t.ndim) + "; a " +
                      (want_ndim == 2 ? "matrix" : "vector") + " view needs " + std::to_string(want_ndim));
  const DLDataType want = dlpack_dtype_of<T>();
  if (t.dtype.code != want.code || t.dtype.bits != want.bits || t.dtype.lanes != 1)
    throw argument_error(where + "the tensor's dtype is " + dlpack_dtype_name(t.dtype) + " but the view's element type is " +
                         dlpack_dtype_name(want));
  for (int i = 0; i < t.ndim; ++i)
    if (t.shape[i] < 0) throw shape_error(where + "negative extent " + std::to_string(t.shape[i]) + " in dimension " + std::to_string(i));
  auto addr = reinterpret_cast<std::uintptr_t>(t.data) + std::uintptr_t(t.byte_offset);
  if (addr % alignof(T) != 0)
    throw layout_error(where + "data + byte_offset (" + std::to_string(t.byte_offset) + ") is not aligned for " +
                       dtype_name<std::remove_const_t<T>>());
  return reinterpret_cast<T*>(addr);
}

/// For a non-empty rows × cols tensor with non-negative strides: whether its element count
/// and the byte span it reaches ((rows−1)·rs + (cols−1)·cs + 1 elements) fit in an
/// int64 (a hostile or buggy producer can claim any shape: [2^62, 4] overflowed).
template <class T>
bool dlpack_extent_fits(std::int64_t rows, std::int64_t cols, std::int64_t rs, std::int64_t cs) {
  if (rows == 0 || cols == 0) return true;
  std::int64_t n, a, b, span, bytes;
  return !__builtin_mul_overflow(rows, cols, &n) && !__builtin_mul_overflow(rows - 1, rs, &a) &&
         !__builtin_mul_overflow(cols - 1, cs, &b) && !__builtin_add_overflow(a, b, &span) &&
         !__builtin_add_overflow(span, std::int64_t(1), &span) &&
         !__builtin_mul_overflow(span, std::int64_t(sizeof(T)), &bytes);
}

inline std::string strides_text(std::int64_t a, std::int64_t b) {
  std::string s("(");  // appended piece by piece: GCC 12's false -Wrestrict, as in shape_str
  s += std::to_string(a);
  s += ", ";
  s += std::to_string(b);
  s += ')';
  return s;
}

}  // namespace detail

/// A DLTensor of ndim 2 as a matrix_view<T, Device>, no copy (see the file comment for what
/// is refused). The tensor must outlive the view.
template <class T, class Device = device::cpu>
matrix_view<T, Device> dlpack_matrix(const DLTensor& t) {
  constexpr const char* op = "dlpack_matrix";
  T* p = detail::dlpack_checked_data<T, Device>(t, 2, op);
  const std::int64_t rows = t.shape[0], cols = t.shape[1];
  std::int64_t rs = t.strides ? t.strides[0] : cols, cs = t.strides ? t.strides[1] : 1;
  const std::string where = std::string("deltaw::io::") + op + ": ";
  // Extent-1 dimensions: their stride never multiplies a non-zero index.
  if (cols <= 1) cs = 1;
  if (rows <= 1 && (cols <= 1 || __builtin_mul_overflow(cols, cs, &rs))) rs = 1;
  if (rs < 0 || cs < 0)
    throw layout_error(where + "negative strides " + detail::strides_text(rs, cs) + " (a flipped tensor) cannot be viewed; "
                       "make it contiguous first");
  if (!detail::dlpack_extent_fits<T>(rows, cols, rs, cs))
    throw shape_error(where + "a " + std::to_string(rows) + " × " + std::to_string(cols) + " tensor with strides " +
                      detail::strides_text(rs, cs) + " spans more elements than can be addressed");
  constexpr bool writable = !std::is_const_v<T>;
  constexpr bool cuda = std::is_same_v<Device, device::cuda>;
  if ((writable || cuda) && rows > 0 && cols > 0 && rs != 1 && cs != 1)
    throw layout_error(where + "strides " + detail::strides_text(rs, cs) + " of a " +
                       deltaw::detail::shape_str(index_t(rows), index_t(cols)) + " tensor have no unit stride; " + (cuda ? "CUDA views" : "writable views") +
                       " need one contiguous dimension (row- or column-major, possibly padded)");
  if (writable && ((rows > 1 && rs == 0) || (cols > 1 && cs == 0)))
    throw layout_error(where + "a zero (broadcast) stride " + detail::strides_text(rs, cs) +
                       " would alias writes; view it as const");
  return matrix_view<T, Device>(p, index_t(rows), index_t(cols), index_t(rs), index_t(cs));
}

/// A DLTensor of ndim 1 as a vector_view<T, Device>, no copy.
template <class T, class Device = device::cpu>
vector_view<T, Device> dlpack_vector(const DLTensor& t) {
  constexpr const char* op = "dlpack_vector";
  T* p = detail::dlpack_checked_data<T, Device>(t, 1, op);
  const std::int64_t n = t.shape[0];
  std::int64_t s = t.strides && n > 1 ? t.strides[0] : 1;
  if (s < 0)
    throw layout_error("deltaw::io::dlpack_vector: negative stride " + std::to_string(s) + " cannot be viewed");
  if (!std::is_const_v<T> && n > 1 && s == 0)
    throw layout_error("deltaw::io::dlpack_vector: a zero (broadcast) stride would alias writes; view it as const");
  if (!detail::dlpack_extent_fits<T>(n, 1, s, 1))
    throw shape_error("deltaw::io::dlpack_vector: " + std::to_string(n) + " elements with stride " + std::to_string(s) +
                      " span more than can be addressed");
  return vector_view<T, Device>(p, index_t(n), index_t(s));
}

/// Borrowing views of a DLManagedTensor (its deleter is not called).
template <class T, class Device = device::cpu>
matrix_view<T, Device> dlpack_matrix(const DLManagedTensor& m) {
  return dlpack_matrix<T, Device>(m.dl_tensor);
}
template <class T, class Device = device::cpu>
vector_view<T, Device> dlpack_vector(const DLManagedTensor& m) {
  return dlpack_vector<T, Device>(m.dl_tensor);
}

namespace detail {
template <class M>
std::shared_ptr<const void> dlpack_owner(M* m) {
  return std::shared_ptr<const void>(m, [](const void* p) {
    auto* mm = static_cast<M*>(const_cast<void*>(p));
    if (mm->deleter) mm->deleter(mm);
  });
}
template <class M>
void dlpack_require(M* m, const char* op) {
  if (m == nullptr) throw null_data_error(std::string("deltaw::io::") + op + ": null managed tensor");
}
}  // namespace detail

/// Takes ownership of `m`: the returned owner calls m->deleter(m) when released. On a
/// throw the caller keeps ownership.
template <class T, class Device = device::cpu>
held_matrix<std::remove_const_t<T>, Device> dlpack_take_matrix(DLManagedTensor* m) {
  detail::dlpack_require(m, "dlpack_take_matrix");
  auto v = dlpack_matrix<const std::remove_const_t<T>, Device>(m->dl_tensor);
  return {v, detail::dlpack_owner(m)};
}
template <class T, class Device = device::cpu>
held_vector<std::remove_const_t<T>, Device> dlpack_take_vector(DLManagedTensor* m) {
  detail::dlpack_require(m, "dlpack_take_vector");
  auto v = dlpack_vector<const std::remove_const_t<T>, Device>(m->dl_tensor);
  return {v, detail::dlpack_owner(m)};
}

#if defined(DLPACK_MAJOR_VERSION) && DLPACK_MAJOR_VERSION >= 1
namespace detail {
template <class T>
void dlpack_check_versioned(const DLManagedTensorVersioned& m, const char* op) {
  const std::string where = std::string("deltaw::io::") + op + ": ";
  if (m.version.major != DLPACK_MAJOR_VERSION)
    throw argument_error(where + "DLPack major version " + std::to_string(m.version.major) + " (this build reads " +
                         std::to_string(DLPACK_MAJOR_VERSION) + ")");
  if (!std::is_const_v<T> && (m.flags & DLPACK_FLAG_BITMASK_READ_ONLY))
    throw argument_error(where + "the tensor is flagged READ_ONLY; view it with a const element type");
}
}  // namespace detail

/// Borrowing views of a DLManagedTensorVersioned (version and READ_ONLY checked).
template <class T, class Device = device::cpu>
matrix_view<T, Device> dlpack_matrix(const DLManagedTensorVersioned& m) {
  detail::dlpack_check_versioned<T>(m, "dlpack_matrix");
  return dlpack_matrix<T, Device>(m.dl_tensor);
}
template <class T, class Device = device::cpu>
vector_view<T, Device> dlpack_vector(const DLManagedTensorVersioned& m) {
  detail::dlpack_check_versioned<T>(m, "dlpack_vector");
  return dlpack_vector<T, Device>(m.dl_tensor);
}
/// Takes ownership (see dlpack_take_matrix(DLManagedTensor*)); on a version mismatch the
/// deleter is called before throwing, as the DLPack spec requires of a consumer.
template <class T, class Device = device::cpu>
held_matrix<std::remove_const_t<T>, Device> dlpack_take_matrix(DLManagedTensorVersioned* m) {
  detail::dlpack_require(m, "dlpack_take_matrix");
  if (m->version.major != DLPACK_MAJOR_VERSION) {
    const auto major = m->version.major;
    if (m->deleter) m->deleter(m);
    throw argument_error("deltaw::io::dlpack_take_matrix: DLPack major version " + std::to_string(major) +
                         " (this build reads " + std::to_string(DLPACK_MAJOR_VERSION) + "); the tensor was released");
  }
  auto v = dlpack_matrix<const std::remove_const_t<T>, Device>(*m);
  return {v, detail::dlpack_owner(m)};
}
template <class T, class Device = device::cpu>
held_vector<std::remove_const_t<T>, Device> dlpack_take_vector(DLManagedTensorVersioned* m) {
  detail::dlpack_require(m, "dlpack_take_vector");
  if (m->version.major != DLPACK_MAJOR_VERSION) {
    const auto major = m->version.major;
    if (m->deleter) m->deleter(m);
    throw argument_error("deltaw::io::dlpack_take_vector: DLPack major version " + std::to_string(major) +
                         " (this build reads " + std::to_string(DLPACK_MAJOR_VERSION) + "); the tensor was released");
  }
  auto v = dlpack_vector<const std::remove_const_t<T>, Device>(*m);
  return {v, detail::dlpack_owner(m)};
}
#endif

}  // namespace io
DELTAW_NAMESPACE_END
