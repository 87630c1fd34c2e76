// SPDX-License-Identifier: MIT
// FourierFT (Gao et al. 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier
// Transform", arXiv:2405.03003; PEFT 0.21's `fourierft`): ΔW [out, in] is the real part of
// the inverse 2-D DFT of a sparse spectrum S with n trainable coefficients c_k at fixed
// frequencies (r_k, q_k), times a scale s (PEFT's `scaling`, default 150):
//     ΔW = s·Re(ifft2(S)),  ΔW[p, j] = s/(out·in)·Σ_k c_k·cos(2π(r_k·p/out + q_k·j/in))
// (torch.fft.ifft2's default "backward" norm: 1/(out·in); r indexes the out axis, q the in
// axis, as PEFT's dense_spectrum[indices[0], indices[1]] over an [out, in] matrix).
//
// Indices. PEFT keeps them out of the checkpoint: it draws them at load time as
// torch.randperm(out·in, generator=torch.Generator().manual_seed(random_loc_seed))[:n],
// then r = idx / in, q = idx % in. torch's CPU generator is the 32-bit Mersenne Twister
// (std::mt19937 seeded with the seed) and its randperm, for out·in < 2³²/20, is the
// Fisher–Yates shuffle whose step i swaps i with i + (mt() mod (out·in − i)); the first n
// steps fix the first n entries, so fourierft_peft_indices() reproduces PEFT's indices
// exactly in O(n) time and memory (checked against torch in tests/fourier). Beyond that
// size torch switches algorithm and deltaw refuses (argument_error): pass the indices
// explicitly then.
//
// Apply (backend/cpu/fourierft.hpp) never forms ΔW: per token, a real FFT of x over in,
// a gather of the n frequencies, a scatter into the out-spectrum and an inverse real FFT,
// O(in·log in + out·log out + n) per token.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// The frequencies of a FourierFT spectrum: row (out-axis) and column (in-axis) index of
/// each coefficient.
struct fourierft_indices {
  std::vector<index_t> rows, cols;
};

/// PEFT's FourierFT frequencies for an [out, in] layer with n coefficients and
/// random_loc_seed `seed` (torch.randperm(out·in, manual_seed(seed))[:n], split as
/// (idx / in, idx % in)). argument_error when out·in ≥ 2³²/20, where torch uses
/// another permutation algorithm.
inline fourierft_indices fourierft_peft_indices(index_t out, index_t in, index_t n, std::uint64_t seed) {
  const std::string shapes = "[" + std::to_string(out) + ", " + std::to_string(in) + "] with n = " + std::to_string(n);
  if (out < 1 || in < 1 || n < 1 || n > out * in)
    throw argument_error("deltaw::fourierft_peft_indices: need 1 ≤ n ≤ out·in; got " + shapes);
  const std::uint64_t N = std::uint64_t(out) * std::uint64_t(in);
  if (N >= std::uint64_t(0xffffffffu) / 20)
    throw argument_error("deltaw::fourierft_peft_indices: torch's randperm uses another algorithm for out·in ≥ 2^32/20; " +
                            shapes + " (pass the indices explicitly)");
  std::mt19937 g(static_cast<std::uint32_t>(seed));  // torch's CPU generator: mt19937 on the seed's low 32 bits
  std::unordered_map<std::uint64_t, std::uint64_t> moved;  // the shuffled array, sparse
  auto at = [&](std::uint64_t i) {
    auto it = moved.find(i);
    return it == moved.end() ? i : it->second;
  };
  fourierft_indices f;
  f.rows.reserve(std::size_t(n));
  f.cols.reserve(std::size_t(n));
  for (std::uint64_t i = 0; i < std::uint64_t(n); ++i) {
    // torch: for i < N − 1, z = random() % (N − i); swap(r[i], r[z + i]). The last step is
    // the identity (z = 0).
    const std::uint64_t z = i + 1 < N ? std::uint64_t(g()) % (N - i) : 0;
    const std::uint64_t a = at(i), b = at(z + i);
    moved[z + i] = a;
    moved[i] = b;
    f.rows.push_back(index_t(b / std::uint64_t(in)));
    f.cols.push_back(index_t(b % std::uint64_t(in)));
  }
  return f;
}

template <class T, class Device = device::cpu>
class fourierft_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "FourierFT";

  fourierft_update(held_vector<T, Device> spectrum, std::shared_ptr<const fourierft_indices> idx, index_t out, index_t in,
                   double s)
      : c_(std::move(spectrum)), idx_(std::move(idx)), out_(out), in_(in), scale_(detail::checked_scale(s, "deltaw::fourierft")) {
    const std::string shapes = "ΔW [" + std::to_string(out) + ", " + std::to_string(in) + "], spectrum of " +
                               std::to_string(c_.view.size()) + " coefficients";
    if (out < 1 || in < 1) throw shape_error("deltaw::fourierft: out and in must be at least 1; got " + shapes);
    if (!idx_ || idx_->rows.size() != idx_->cols.size() || index_t(idx_->rows.size()) != c_.view.size())
      throw shape_error("deltaw::fourierft: one (row, column) frequency per coefficient is needed; got " + shapes + " and " +
                        std::to_string(idx_ ? idx_->rows.size() : 0) + " row / " +
                        std::to_string(idx_ ? idx_->cols.size() : 0) + " column indices");
    std::vector<std::uint64_t> keys;
    keys.reserve(idx_->rows.size());
    for (std::size_t k = 0; k < idx_->rows.size(); ++k) {
      const index_t r = idx_->rows[k], q = idx_->cols[k];
      if (r < 0 || r >= out || q < 0 || q >= in)
        throw shape_error("deltaw::fourierft: frequency " + std::to_string(k) + " is (" + std::to_string(r) + ", " +
                          std::to_string(q) + "), outside " + shapes);
      keys.push_back(std::uint64_t(r) * std::uint64_t(in) + std::uint64_t(q));
    }
    std::sort(keys.begin(), keys.end());
    if (std::adjacent_find(keys.begin(), keys.end()) != keys.end())
      throw argument_error("deltaw::fourierft: a frequency appears twice (PEFT's indices are distinct); " + shapes);
  }

  index_t rows() const { return out_; }
  index_t cols() const { return in_; }
  /// The number of coefficients n.
  index_t size() const { return c_.view.size(); }
  double scale() const { return scale_; }
  const vector_view<const T, Device>& spectrum() const { return c_.view; }
  const fourierft_indices& indices() const { return *idx_; }
  const std::shared_ptr<const fourierft_indices>& shared_indices() const { return idx_; }
  template <class F>
  void for_each_operand(F&& f) const {
    if (c_.view.size() > 0) f("spectrum", matrix_view<const T, Device>(c_.view.data(), 1, c_.view.size(), c_.view.size() * c_.view.stride(), c_.view.stride()));
  }

  /// n values.
  index_t parameter_count() const { return size(); }
  /// Extra flops of apply over the base GEMM, counting a real FFT of length m as
  /// 2.5·m·log₂m: per token one over in, one over out and 8 per coefficient.
  index_t flop_count(index_t tokens) const {
    auto fl = [](index_t m) {
      index_t l = 0;
      while ((index_t(1) << l) < m) ++l;
      return 5 * m * l / 2;
    };
    return tokens * (fl(in_) + fl(out_) + 8 * size());
  }

  fourierft_update with_scale(double s) const { return fourierft_update(c_, idx_, out_, in_, s); }

 private:
  held_vector<T, Device> c_;
  std::shared_ptr<const fourierft_indices> idx_;
  index_t out_, in_;
  double scale_;
};

namespace detail {
template <class V>
auto make_fourierft(V&& spectrum, std::shared_ptr<const fourierft_indices> idx, index_t out, index_t in, double s) {
  auto h = hold_vector(std::forward<V>(spectrum));
  using T = std::remove_const_t<typename decltype(h.view)::element_type>;
  return fourierft_update<T, typename decltype(h.view)::device_type>(std::move(h), std::move(idx), out, in, s);
}
}  // namespace detail

/// FourierFT over an [out, in] layer: ΔW = s·Re(ifft2(S)), S holding spectrum[k] at
/// (idx.rows[k], idx.cols[k]). spectrum: a deltaw vector view or an Eigen vector (held by
/// view, or owned if a temporary); s is PEFT's `scaling`.
template <class V>
auto fourierft(V&& spectrum, fourierft_indices idx, index_t out, index_t in, scale s) {
  return detail::make_fourierft(std::forward<V>(spectrum), std::make_shared<const fourierft_indices>(std::move(idx)), out, in,
                                s.value);
}
/// FourierFT with PEFT's frequencies for random_loc_seed `seed` (PEFT's default 777).
template <class V>
auto fourierft(V&& spectrum, index_t out, index_t in, std::uint64_t seed, scale s) {
  auto h = hold_vector(std::forward<V>(spectrum));
  auto idx = std::make_shared<const fourierft_indices>(fourierft_peft_indices(out, in, h.view.size(), seed));
  using T = std::remove_const_t<typename decltype(h.view)::element_type>;
  return fourierft_update<T, typename decltype(h.view)::device_type>(std::move(h), std::move(idx), out, in, s.value);
}

DELTAW_NAMESPACE_END
