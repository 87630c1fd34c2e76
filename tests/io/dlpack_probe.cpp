// A shared library for tests/io/check_dlpack.py: views a DLManagedTensor that PyTorch
// produced (torch.utils.dlpack.to_dlpack) through deltaw::io::dlpack_matrix and copies the
// view, element by element through its strides, into a row-major double buffer, so the
// Python side can compare it with the tensor itself. Borrows only (never calls the deleter).
#include <deltaw/io/dlpack.hpp>

#include <cstring>
#include <string>

namespace {
template <class T>
int copy_out(const DLManagedTensor* m, double* out, long cap, long* rows, long* cols) {
  const auto v = deltaw::io::dlpack_matrix<const T>(*m);
  *rows = long(v.rows());
  *cols = long(v.cols());
  if (long(v.size()) > cap) return -2;
  for (deltaw::index_t i = 0; i < v.rows(); ++i)
    for (deltaw::index_t j = 0; j < v.cols(); ++j) {
      if constexpr (deltaw::is_storage16_v<T>) out[i * v.cols() + j] = double(deltaw::convert<float>(v(i, j)));
      else out[i * v.cols() + j] = double(v(i, j));
    }
  return 0;
}
}  // namespace

/// kind: 0 float, 1 double, 2 fp16, 3 bf16; writable != 0 asks for a writable view.
/// Returns 0, -1 with the deltaw error's message in err, or -2 when out is too small.
extern "C" int deltaw_dlpack_probe(const void* managed, int kind, int writable, double* out, long cap, long* rows,
                                   long* cols, char* err, long errcap) {
  const auto* m = static_cast<const DLManagedTensor*>(managed);
  try {
    if (writable) {
      const auto v = deltaw::io::dlpack_matrix<float>(*m);
      *rows = long(v.rows());
      *cols = long(v.cols());
      return 0;
    }
    switch (kind) {
      case 0: return copy_out<float>(m, out, cap, rows, cols);
      case 1: return copy_out<double>(m, out, cap, rows, cols);
      case 2: return copy_out<deltaw::fp16>(m, out, cap, rows, cols);
      default: return copy_out<deltaw::bf16>(m, out, cap, rows, cols);
    }
  } catch (const deltaw::error& e) {
    std::strncpy(err, e.what(), std::size_t(errcap - 1));
    err[errcap - 1] = '\0';
    return -1;
  }
}
