// SPDX-License-Identifier: MIT
// The FFTW3 glue of the Fourier update types (FourierFT, C3A; deltaw/fourier.hpp): batched
// real-to-complex and complex-to-real plans in float (fftw3f) or double (fftw3), owned by
// RAII handles. Needs <fftw3.h> and linking libfftw3 / libfftw3f (the CMake target
// deltaw::fft), which is why nothing under deltaw/deltaw.hpp includes it.
//
// Plans are made with FFTW_ESTIMATE (no measuring, microseconds for the sizes here) on the
// caller's own buffers, once per call, and executed on those buffers. FFTW's planner is not
// thread-safe, so planning and destroying take one process-wide mutex (the only shared
// state of these headers); executing a plan does not.
#pragma once

#include <fftw3.h>

#include <climits>
#include <complex>
#include <mutex>
#include <string>
#include <type_traits>

#include "../../core/error.hpp"
#include "../../core/view.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu::fft {

/// The mutex serialising FFTW's planner (fftw_plan_* and fftw_destroy_plan).
inline std::mutex& planner_mutex() {
  static std::mutex m;
  return m;
}

template <class C>
struct fftw_api;
template <>
struct fftw_api<double> {
  using plan = fftw_plan;
  using complex = fftw_complex;
  static plan r2c(int n, int howmany, double* in, int idist, complex* out, int odist) {
    return fftw_plan_many_dft_r2c(1, &n, howmany, in, nullptr, 1, idist, out, nullptr, 1, odist, FFTW_ESTIMATE);
  }
  static plan c2r(int n, int howmany, complex* in, int idist, double* out, int odist) {
    return fftw_plan_many_dft_c2r(1, &n, howmany, in, nullptr, 1, idist, out, nullptr, 1, odist, FFTW_ESTIMATE);
  }
  static void execute(plan p) { fftw_execute(p); }
  static void destroy(plan p) { fftw_destroy_plan(p); }
};
template <>
struct fftw_api<float> {
  using plan = fftwf_plan;
  using complex = fftwf_complex;
  static plan r2c(int n, int howmany, float* in, int idist, complex* out, int odist) {
    return fftwf_plan_many_dft_r2c(1, &n, howmany, in, nullptr, 1, idist, out, nullptr, 1, odist, FFTW_ESTIMATE);
  }
  static plan c2r(int n, int howmany, complex* in, int idist, float* out, int odist) {
    return fftwf_plan_many_dft_c2r(1, &n, howmany, in, nullptr, 1, idist, out, nullptr, 1, odist, FFTW_ESTIMATE);
  }
  static void execute(plan p) { fftwf_execute(p); }
  static void destroy(plan p) { fftwf_destroy_plan(p); }
};

namespace detail {
inline int checked_int(index_t v, const char* op, const char* what) {
  if (v < 0 || v > index_t(INT_MAX))
    throw shape_error(std::string(op) + ": " + what + " = " + std::to_string(v) + " exceeds FFTW's int sizes");
  return int(v);
}
}  // namespace detail

/// howmany real transforms of length n, unnormalised (FFTW's sign −1):
/// out[j][f] = Σ_t in[j·n + t]·e^{−2πi·f·t/n}, f ≤ n/2 (out rows of n/2 + 1).
/// c2r is the unnormalised inverse of the half spectrum of a Hermitian sequence (sign +1);
/// it overwrites its input.
template <class C>
class plan {
 public:
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>, "deltaw::cpu::fft: float or double");
  using api = fftw_api<C>;

  static plan r2c(index_t n, index_t howmany, C* in, std::complex<C>* out, const char* op) {
    plan p;
    if (n < 1 || howmany < 1) return p;
    const int ni = detail::checked_int(n, op, "the transform length");
    const int hi = detail::checked_int(howmany, op, "the number of transforms");
    detail::checked_int(n * howmany, op, "the transformed values");
    const std::lock_guard<std::mutex> lock(planner_mutex());
    p.p_ = api::r2c(ni, hi, in, ni, reinterpret_cast<typename api::complex*>(out), ni / 2 + 1);
    if (!p.p_) throw argument_error(std::string(op) + ": FFTW could not plan a real transform of length " + std::to_string(n));
    return p;
  }
  static plan c2r(index_t n, index_t howmany, std::complex<C>* in, C* out, const char* op) {
    plan p;
    if (n < 1 || howmany < 1) return p;
    const int ni = detail::checked_int(n, op, "the transform length");
    const int hi = detail::checked_int(howmany, op, "the number of transforms");
    detail::checked_int(n * howmany, op, "the transformed values");
    const std::lock_guard<std::mutex> lock(planner_mutex());
    p.p_ = api::c2r(ni, hi, reinterpret_cast<typename api::complex*>(in), ni / 2 + 1, out, ni);
    if (!p.p_) throw argument_error(std::string(op) + ": FFTW could not plan an inverse real transform of length " + std::to_string(n));
    return p;
  }

  plan() = default;
  plan(plan&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  plan& operator=(plan&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = o.p_;
      o.p_ = nullptr;
    }
    return *this;
  }
  plan(const plan&) = delete;
  plan& operator=(const plan&) = delete;
  ~plan() { reset(); }

  /// Runs the transform on the buffers it was planned on (no-op for an empty plan).
  void operator()() const {
    if (p_) api::execute(p_);
  }

 private:
  void reset() {
    if (!p_) return;
    const std::lock_guard<std::mutex> lock(planner_mutex());
    api::destroy(p_);
    p_ = nullptr;
  }
  typename api::plan p_ = nullptr;
};

}  // namespace cpu::fft
DELTAW_NAMESPACE_END
