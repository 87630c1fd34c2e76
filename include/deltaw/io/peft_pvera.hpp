// SPDX-License-Identifier: MIT
// PEFT PVERA adapter files (PEFT 0.21.2's `pvera`, checked against its save_pretrained: see
// tests/fixtures/peft_pvera): the module type and the tensor reading / writing that
// io::peft_structured_adapter dispatches to (read_peft returns these modules; the writer is
// peft_structured_adapter::add_pvera + write_peft_structured_adapter).
//
// Keys:
//   base_model.pvera_A                     [2r, in_max]  shared (rows r..2r−1: log-variance)
//   base_model.pvera_B                     [out_max, r]  shared
//   base_model.model.<module>.pvera_lambda_b   [out]
//   base_model.model.<module>.pvera_lambda_d   [2r]  (mean half, then log-variance half)
// Config: r (PEFT's default 256), projection_prng_key, save_projection, sample_at_inference,
// generator_seed (the last two only change PEFT's sampling; kept as read).
//
// Documented choices (as VeRA's, io/peft_structured.hpp):
//  - The bases are torch.Generator draws from projection_prng_key, which deltaw does not
//    reproduce: an adapter is read only when it stores them (save_projection = true, PEFT's
//    default), else unsupported_error. Read modules are the deterministic path as a low_rank
//    update with the same ΔW: B' = diag(λ_b)·B[:out]·diag(λ_d[:r]) [out, r] formed, A a
//    zero-copy slice A[:r, :in]; peft_pvera_module::apply_sampled gives PEFT's sampled forward
//    on the stored bases with the caller's noise.
//  - Written from deltaw's pvera_update, the seeded bases (VeRA's, both halves of A) are
//    materialised and stored with save_projection = true, so PEFT loads exactly deltaw's ΔW.
//  - Refused (unsupported_error): fan_in_fan_out.
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "../expr/low_rank.hpp"
#include "../backend/cpu/pvera.hpp"
#include "peft.hpp"

DELTAW_NAMESPACE_BEGIN
namespace io {

/// One PVeRA module with the adapter's stored bases.
struct peft_pvera_module {
  std::string name;
  held_vector<float> lambda_b;  ///< [out]
  held_vector<float> lambda_d;  ///< [2r]
  held_matrix<float> A;         ///< the shared pvera_A [2r, in_max]
  held_matrix<float> B;         ///< the shared pvera_B [out_max, r]

  index_t rank() const { return B.view.cols(); }
  index_t out_features() const { return lambda_b.view.size(); }
  /// Empty when a layer [out, in] fits the module, else why not.
  std::string layer_mismatch(index_t out, index_t in) const {
    if (out == lambda_b.view.size() && in >= 1 && in <= A.view.cols() && out <= B.view.rows()) return {};
    return "pvera_lambda_b is [" + std::to_string(lambda_b.view.size()) + "] (out) and the shared bases cover in ≤ " +
           std::to_string(A.view.cols()) + ", out ≤ " + std::to_string(B.view.rows());
  }
  /// The deterministic ΔW as a low_rank update B'·A[:r, :in], B' = diag(λ_b)·B[:out]·diag(λ_d[:r])
  /// formed here. shape_error when the layer does not fit.
  low_rank<float> update(index_t out, index_t in) const {
    const index_t r = rank();
    if (const std::string why = layer_mismatch(out, in); !why.empty())
      throw shape_error("deltaw::io::peft_pvera_module::update: \"" + name + "\": the layer " +
                        deltaw::detail::shape_str(out, in) + " does not fit: " + why);
    auto buf = std::make_shared<std::vector<float>>(std::size_t(out * r));
    for (index_t i = 0; i < out; ++i)
      for (index_t k = 0; k < r; ++k) (*buf)[std::size_t(i * r + k)] = lambda_b.view[i] * B.view(i, k) * lambda_d.view[k];
    return low_rank<float>(held_matrix<float>{matrix_view<const float>(buf->data(), out, r), buf},
                           {A.view.block(0, 0, r, in), A.owner}, 1.0);
  }
  /// PEFT's sampled forward of the adapter branch (training, or sample_at_inference) for X
  /// [tokens, in] and the noise eps [tokens, r]: ((μ + ε ⊙ exp(½·log σ²))·(diag(λ_b)·B[:out])ᵀ
  /// with [μ, log σ²] = X·(diag(λ_d)·A[:, :in])ᵀ, in double; returns [tokens, out] (the base
  /// layer's output is not included).
  template <class XM, class EM>
  dense<double> apply_sampled(index_t out, const XM& X_, const EM& eps_) const {
    const auto X = view(X_);
    const auto E = view(eps_);
    const index_t r = rank(), in = X.cols(), T = X.rows();
    if (const std::string why = layer_mismatch(out, in); !why.empty() || E.rows() != T || E.cols() != r)
      throw shape_error("deltaw::io::peft_pvera_module::apply_sampled: \"" + name + "\": X " +
                        deltaw::detail::shape_str(X.rows(), X.cols()) + " and eps " +
                        deltaw::detail::shape_str(E.rows(), E.cols()) + " do not fit the layer [" + std::to_string(out) +
                        ", in] with r = " + std::to_string(r) + (why.empty() ? "" : ": " + why));
    dense<double> Y = dense<double>::Zero(T, out);
    std::vector<double> h(static_cast<std::size_t>(2 * r)), z(static_cast<std::size_t>(r));
    for (index_t t = 0; t < T; ++t) {
      for (index_t k = 0; k < 2 * r; ++k) {
        double s = 0;
        for (index_t j = 0; j < in; ++j) s += convert<double>(X(t, j)) * double(A.view(k, j));
        h[std::size_t(k)] = s * double(lambda_d.view[k]);
      }
      for (index_t k = 0; k < r; ++k)
        z[std::size_t(k)] = h[std::size_t(k)] + convert<double>(E(t, k)) * std::exp(0.5 * h[std::size_t(r + k)]);
      for (index_t o = 0; o < out; ++o) {
        double s = 0;
        for (index_t k = 0; k < r; ++k) s += z[std::size_t(k)] * double(B.view(o, k));
        Y(t, o) = s * double(lambda_b.view[o]);
      }
    }
    return Y;
  }
};

namespace detail {

/// Reads the PVERA tensors of `f` (config r from `config`) and calls add(peft_pvera_module)
/// for each module (name order); A_out / B_out receive the shared bases.
template <class Add>
void read_pvera_modules(const json& config, const safetensors_file& f, const std::string& source,
                        held_matrix<float>& A_out, held_matrix<float>& B_out, Add&& add) {
  auto fail = [&](const std::string& m) { throw format_error("deltaw::io::peft (" + source + "): " + m); };
  index_t r = 256;
  if (auto it = config.find("r"); it != config.end() && !it->is_null()) r = peft_rank(*it, "r", source);
  if (peft_bool(config, "fan_in_fan_out", source))
    throw unsupported_error("deltaw::io::peft (" + source + "): fan_in_fan_out for PVERA is not supported");
  const std::string P = "base_model.model.";
  const st_tensor_info *ta = nullptr, *tb = nullptr;
  std::map<std::string, std::pair<const st_tensor_info*, const st_tensor_info*>> parts;  // λ_b, λ_d
  for (const auto& t : f.tensors()) {
    std::string_view k = t.name;
    if (k == "base_model.pvera_A") { ta = &t; continue; }
    if (k == "base_model.pvera_B") { tb = &t; continue; }
    bool found = false;
    if (k.starts_with(P)) {
      k.remove_prefix(P.size());
      for (std::string_view s : {std::string_view("pvera_lambda_b"), std::string_view("pvera_lambda_d")})
        if (k.size() > s.size() + 1 && k.ends_with(s) && k[k.size() - s.size() - 1] == '.') {
          auto& e = parts[std::string(k.substr(0, k.size() - s.size() - 1))];
          auto& slot = s.back() == 'b' ? e.first : e.second;
          if (slot) fail("two tensors named \"" + t.name + "\"");
          slot = &t;
          found = true;
        }
    }
    if (!found) fail("unknown key \"" + t.name + "\" for a PVERA adapter");
  }
  if (!ta || !tb) fail("a PVERA adapter with save_projection needs base_model.pvera_A and base_model.pvera_B");
  if (ta->shape.size() != 2 || tb->shape.size() != 2 || ta->shape[0] != 2 * std::uint64_t(r) ||
      tb->shape[1] != std::uint64_t(r) || ta->shape[1] == 0 || tb->shape[0] == 0)
    fail("pvera_A " + shape_string(ta->shape) + " and pvera_B " + shape_string(tb->shape) +
         " must be [2r, in_max] and [out_max, r] with the config's r = " + std::to_string(r));
  A_out = f.matrix<float>(ta->name);
  B_out = f.matrix<float>(tb->name);
  for (const auto& [mod, p] : parts) {
    const std::string where = "module \"" + mod + "\"";
    if (!p.first || !p.second) fail(where + " lacks " + std::string(p.first ? "pvera_lambda_d" : "pvera_lambda_b"));
    if (p.first->shape.size() != 1 || p.first->shape[0] == 0 || p.first->shape[0] > tb->shape[0])
      fail(where + ": pvera_lambda_b is " + shape_string(p.first->shape) + "; expected [out] with out ≤ out_max = " +
           std::to_string(tb->shape[0]));
    if (p.second->shape.size() != 1 || p.second->shape[0] != 2 * std::uint64_t(r))
      fail(where + ": pvera_lambda_d is " + shape_string(p.second->shape) + "; expected [2r] = [" + std::to_string(2 * r) + "]");
    add(peft_pvera_module{mod, f.vector<float>(p.first->name), f.vector<float>(p.second->name), A_out, B_out});
  }
}

/// A module for the writer from a deltaw update: the seeded bases are materialised into A / B
/// (both halves of A) on the first module; later modules must use the same vera_basis.
template <class T, class D>
peft_pvera_module pvera_module_from(std::string name, const pvera_update<T, D>& u, held_matrix<float>& A,
                                    held_matrix<float>& B, std::uint64_t& seed, bool first) {
  static_assert(std::is_same_v<D, device::cpu>, "deltaw::io::peft: copy device factors to the host first");
  const auto& b = u.basis();
  if (first) {
    auto a = std::make_shared<std::vector<float>>(std::size_t(2 * b.r * b.in_max));
    fill_entries(b.A(), 0, a->size(), a->data());
    auto bb = std::make_shared<std::vector<float>>(std::size_t(b.out_max * b.r));
    fill_entries(b.B(), 0, bb->size(), bb->data());
    A = {matrix_view<const float>(a->data(), 2 * b.r, b.in_max), a};
    B = {matrix_view<const float>(bb->data(), b.out_max, b.r), bb};
    seed = b.seed;
  } else if (2 * b.r != A.view.rows() || b.in_max != A.view.cols() || b.out_max != B.view.rows() || b.seed != seed) {
    throw argument_error("deltaw::io::peft_structured_adapter::add_pvera: \"" + name +
                         "\" uses other shared bases than the modules already added (PEFT shares one pair)");
  }
  auto vec = [](const auto& v) {
    auto buf = std::make_shared<std::vector<float>>(std::size_t(v.size()));
    for (index_t i = 0; i < v.size(); ++i) (*buf)[std::size_t(i)] = convert<float>(v[i]);
    return held_vector<float>{vector_view<const float>(buf->data(), v.size()), buf};
  };
  return peft_pvera_module{std::move(name), vec(u.lambda_b()), vec(u.lambda_d()), A, B};
}

/// One module's tensors under `key` (base_model.model.<module>).
inline void add_pvera_tensors(safetensors_writer& w, const std::string& key, const peft_pvera_module& m) {
  w.add(key + ".pvera_lambda_b", m.lambda_b.view);
  w.add(key + ".pvera_lambda_d", m.lambda_d.view);
}
inline void add_pvera_bases(safetensors_writer& w, const held_matrix<float>& A, const held_matrix<float>& B) {
  w.add("base_model.pvera_A", A.view);
  w.add("base_model.pvera_B", B.view);
}

}  // namespace detail
}  // namespace io
DELTAW_NAMESPACE_END
