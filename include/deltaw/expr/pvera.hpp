// SPDX-License-Identifier: MIT
// PVeRA (probabilistic VeRA; PEFT 0.21's `pvera`, which cites arXiv:2512.07703): VeRA whose down
// projection has twice the rank and produces a mean and a log-variance,
//     [μ, log σ²] = (x·A₂ᵀ)·diag(λ_d),   A₂ [2r, in] (rows 0..r−1: μ, rows r..2r−1: log σ²),
//     y += diag(λ_b)·B·z,   z = μ (deterministic)  or  z = μ + ε ⊙ exp(½·log σ²) (sampled),
// with λ_d [2r] (pvera_lambda_d), λ_b [out] (pvera_lambda_b) and the frozen shared pair
// A₂ [2r, in_max], B [out_max, r] (PEFT's pvera_A / pvera_B, kaiming-uniform as VeRA's).
//
// The update type is the deterministic (mean) path, the one PEFT merges and runs in eval
// without sample_at_inference:
//     ΔW = diag(λ_b)·B[:out]·diag(λ_d[:r])·A₂[:r, :in]
// i.e. exactly a vera_update with λ_d's first half; the evaluators and VJPs are VeRA's
// (mean()), so the bases are VeRA's seeded ones (expr/random_basis.hpp): the same
// vera_basis (seed, r, out_max, in_max), the log-variance rows r..2r−1 of A₂ continuing tensor
// 0's stream at flat index (r + k)·in_max + j, same bound √(6/in_max) (kaiming on [2r, in_max]
// has the fan_in of [r, in_max]).
//
// The sampled path (PEFT's training forward, and eval with sample_at_inference) is not a
// fixed linear update: the noise scale depends on x. It is offered as
// cpu::pvera_apply_sampled(u, X, eps, Y) with the noise ε [tokens, r] given by the caller
// (deltaw does not reproduce torch's generator); its VJP is not provided, so training
// through the sampled path is left to the caller (see docs/methods.md).
#pragma once

#include <string>
#include <type_traits>
#include <utility>

#include "random_basis.hpp"

DELTAW_NAMESPACE_BEGIN

template <class T, class Device = device::cpu>
class pvera_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "PVeRA";

  pvera_update(const vera_basis& basis, index_t out, index_t in, held_vector<T, Device> lambda_d,
               held_vector<T, Device> lambda_b)
      : d_(std::move(lambda_d)),
        mean_(basis, out, in, check_half(d_, basis.r), std::move(lambda_b)) {}

  index_t rows() const { return mean_.rows(); }
  index_t cols() const { return mean_.cols(); }
  index_t rank() const { return mean_.rank(); }
  const vera_basis& basis() const { return mean_.basis(); }
  /// λ_d [2r]: the mean half, then the log-variance half.
  const vector_view<const T, Device>& lambda_d() const { return d_.view; }
  const vector_view<const T, Device>& lambda_b() const { return mean_.lambda_b(); }
  /// The deterministic path as VeRA: λ_d's first r entries (viewed), λ_b, the same bases.
  const vera_update<T, Device>& mean() const { return mean_; }
  template <class F>
  void for_each_operand(F&& f) const {
    f("lambda_d", d_.view);
    f("lambda_b", mean_.lambda_b());
  }

  /// 2r + out trainable values.
  index_t parameter_count() const { return 2 * rank() + rows(); }
  index_t flop_count(index_t tokens) const { return mean_.flop_count(tokens); }

 private:
  static held_vector<T, Device> check_half(const held_vector<T, Device>& d, index_t r) {
    if (r < 1 || d.view.size() != 2 * r)
      throw shape_error("deltaw::pvera: lambda_d has " + std::to_string(d.view.size()) +
                        " entries; PVeRA's is [2r] = [" + std::to_string(2 * r) + "] (mean, then log-variance)");
    return {vector_view<const T, Device>(d.view.data(), r, d.view.stride()), d.owner};
  }
  held_vector<T, Device> d_;
  vera_update<T, Device> mean_;
};

/// The shared PVeRA bases for layers up to [out_max, in_max]: VeRA's (the log-variance rows
/// of A₂ continue its stream).
inline vera_basis pvera_shared_basis(std::uint64_t seed, index_t r, index_t out_max, index_t in_max) {
  return vera_shared_basis(seed, r, out_max, in_max);
}

/// PVeRA over a layer [out, in]; lambda_d [2r] and lambda_b [out] as Eigen vectors or views.
template <class FD, class FB>
auto pvera(const vera_basis& basis, index_t out, index_t in, FD&& lambda_d, FB&& lambda_b) {
  auto hd = hold_vector(std::forward<FD>(lambda_d));
  auto hb = hold_vector(std::forward<FB>(lambda_b));
  static_assert(std::is_same_v<decltype(hd), decltype(hb)>,
                "deltaw::pvera: lambda_d and lambda_b must have the same element type and device");
  using T = detail::held_vector_value_t<decltype(hd)>;
  return pvera_update<T, typename decltype(hd.view)::device_type>(basis, out, in, std::move(hd), std::move(hb));
}

DELTAW_NAMESPACE_END
