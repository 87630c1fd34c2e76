// SPDX-License-Identifier: MIT
// A BERT encoder (Hugging Face BertModel's layout, e.g. sentence-transformers'
// all-MiniLM-L6-v2) over deltaw's autograd, with sentence embeddings as
// sentence-transformers computes them (mean pooling over the attention mask, then L2
// normalisation) and structured adapters on its linear layers.
//
//   bert_config               config.json's fields that shape the network
//   bert_model<T>::load(dir)  config.json + model.safetensors, mapped: every weight is a
//                             view of the mapping when the file stores T (float for the
//                             published F32 checkpoints; double converts once)
//   model.hidden(tape, …)     last hidden state [batch·seq, hidden]
//   model.embed(tape, batch)  sentence embeddings [batch, hidden], unit rows
//   model.attach(options)     LoRA, DoRA, MiSS, LoKr or VeRA on the modules whose name
//                             matches options.targets (PEFT's suffix rule)
//   model.to_peft()           a LoRA / DoRA adapter as io::peft_adapter (PEFT's names)
//   model.to_peft_structured()  a MiSS / LoKr / VeRA adapter as io::peft_structured_adapter
//
// The network (post-norm, as BERT):
//   x  = LN(word[id] + position[i] + token_type[type])
//   per layer: a = attention(q(x), k(x), v(x)) with the padding keys masked,
//              x = LN(x + o(a)); x = LN(x + down(gelu(up(x))))   (gelu: exact erf form)
// Dropout is left out (inference, and the reference checks run PyTorch in eval mode).
//
// New autograd ops here (not in deltaw.hpp): masked_attention, bert_gelu, masked_mean_pool,
// l2_normalize_rows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <unsupported/Eigen/SpecialFunctions>

#include "../autograd/adapters.hpp"
#include "../backend/cpu/block_affine.hpp"
#include "../backend/cpu/block_affine_vjp.hpp"
#include "../backend/cpu/kron.hpp"
#include "../backend/cpu/kron_vjp.hpp"
#include "../backend/cpu/random_basis.hpp"
#include "../backend/cpu/random_basis_vjp.hpp"
#include "../expr/block_affine.hpp"
#include "../expr/kron.hpp"
#include "../expr/random_basis.hpp"
#include "../io/json.hpp"
#include "../io/peft.hpp"
#include "../io/peft_structured.hpp"
#include "../io/safetensors.hpp"

DELTAW_NAMESPACE_BEGIN
namespace models {

using autograd::parameter;
using autograd::tape;
using autograd::var;

// ─────────────────────────────────────────────────────────────────────────────────────────
// Autograd ops of the encoder
// ─────────────────────────────────────────────────────────────────────────────────────────

/// Bidirectional scaled dot-product attention over a batch of padded sequences: q, k, v
/// [batch·seq, heads·dh]; mask [batch·seq] (1 token, 0 padding). Padding keys get exactly
/// zero probability (Hugging Face adds the most negative float, which underflows to 0).
/// Padding query rows are computed like the others (their outputs are pooled away).
template <class T>
var<T> masked_attention(const var<T>& q, const var<T>& k, const var<T>& v, index_t batch, index_t seq, index_t heads,
                        const std::vector<std::int64_t>& mask) {
  autograd::detail::same_tape(q, k, "masked_attention");
  autograd::detail::same_tape(q, v, "masked_attention");
  autograd::detail::check_same_shape(q, k, "masked_attention");
  autograd::detail::check_same_shape(q, v, "masked_attention");
  if (batch * seq != q.rows() || heads < 1 || q.cols() % heads != 0)
    throw shape_error("deltaw::models::masked_attention: q is " + autograd::detail::shape_of(q.rows(), q.cols()) +
                      "; expected [batch·seq, heads·dh] = [" + std::to_string(batch) + "·" + std::to_string(seq) + ", " +
                      std::to_string(heads) + "·dh]");
  if (index_t(mask.size()) != batch * seq)
    throw shape_error("deltaw::models::masked_attention: the mask has " + std::to_string(mask.size()) +
                      " entries for batch " + std::to_string(batch) + " × seq " + std::to_string(seq));
  // Per sequence: -inf on padding keys before the row maximum, then 0/1 after exp, so
  // padding keys get exactly zero probability (the softmax is vectorised: Eigen's packet exp).
  Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> key_bias(batch, seq), key_keep(batch, seq);
  for (index_t b = 0; b < batch; ++b) {
    bool any = false;
    for (index_t j = 0; j < seq; ++j) {
      const bool keep = mask[std::size_t(b * seq + j)] != 0;
      any = any || keep;
      key_bias(b, j) = keep ? T(0) : -std::numeric_limits<T>::infinity();
      key_keep(b, j) = keep ? T(1) : T(0);
    }
    if (!any)
      throw argument_error("deltaw::models::masked_attention: sequence " + std::to_string(b) +
                           " has no unmasked token");
  }
  return autograd::detail::scaled_dot_attention(q, k, v, batch, seq, heads, "masked_attention", [&](auto& P, index_t b) {
    P.array().rowwise() += key_bias.row(b);
    P.array().colwise() -= P.array().rowwise().maxCoeff();
    P.array() = P.array().exp();
    P.array().rowwise() *= key_keep.row(b);
    P.array().colwise() /= P.array().rowwise().sum();
  });
}

/// GELU, exact form x·Φ(x) (Hugging Face's "gelu"), evaluated with Eigen's vectorised erf
/// (a rational approximation within a few ulp on [-4, 4], exactly ±1 outside, in float;
/// std::erf in double) instead of autograd::gelu's scalar std::erf: the encoder's widest
/// activation ([batch·seq, 1536]), where the scalar call cost about 10 % of a forward pass.
template <class T>
var<T> bert_gelu(const var<T>& x) {
  auto& t = autograd::detail::tape_of(x, "bert_gelu");
  constexpr T rsqrt2 = T(0.70710678118654752440);
  dense<T> y = t.buffer(x.rows(), x.cols());
  const auto X = x.value();
  deltaw::detail::parallel_rows(y.rows(), y.cols(), [&](index_t r0, index_t n) {
    const auto Xb = X.middleRows(r0, n).array();
    y.middleRows(r0, n).array() = T(0.5) * Xb * (T(1) + (Xb * rsqrt2).erf());
  });
  const index_t ix = x.id();
  return t.record("bert_gelu", std::move(y), t.requires_grad(x), [ix](tape<T>& t, index_t self) {
    constexpr T r2 = T(0.70710678118654752440), inv_sqrt_2pi = T(0.39894228040143267794);
    const auto Xm = t.value_at(ix);
    const auto& up = t.upstream(self);
    dense<T> g = t.buffer(Xm.rows(), Xm.cols());
    deltaw::detail::parallel_rows(g.rows(), g.cols(), [&](index_t r0, index_t n) {
      const auto X = Xm.middleRows(r0, n).array();
      g.middleRows(r0, n).array() = up.middleRows(r0, n).array() *
                                    (T(0.5) * (T(1) + (X * r2).erf()) + X * (T(-0.5) * X.square()).exp() * inv_sqrt_2pi);
    });
    autograd::detail::accumulate(t, ix, std::move(g));
  });
}

/// Mean of the unmasked rows of each sequence: x [batch·seq, d] → [batch, d],
/// y_b = Σ_i m_bi·x_bi / max(Σ_i m_bi, 1e-9) (sentence-transformers' mean pooling).
template <class T>
var<T> masked_mean_pool(const var<T>& x, index_t batch, index_t seq, const std::vector<std::int64_t>& mask) {
  auto& t = autograd::detail::tape_of(x, "masked_mean_pool");
  if (x.rows() != batch * seq || index_t(mask.size()) != batch * seq)
    throw shape_error("deltaw::models::masked_mean_pool: x is " + autograd::detail::shape_of(x.rows(), x.cols()) +
                      " with a mask of " + std::to_string(mask.size()) + " for batch " + std::to_string(batch) +
                      " × seq " + std::to_string(seq));
  const auto X = x.value();
  auto w = std::make_shared<std::vector<T>>(std::size_t(batch * seq));
  dense<T> y = dense<T>::Zero(batch, x.cols());
  for (index_t b = 0; b < batch; ++b) {
    T n = 0;
    for (index_t i = 0; i < seq; ++i) n += mask[std::size_t(b * seq + i)] != 0 ? T(1) : T(0);
    n = std::max(n, T(1e-9));
    for (index_t i = 0; i < seq; ++i) {
      const T wi = mask[std::size_t(b * seq + i)] != 0 ? T(1) / n : T(0);
      (*w)[std::size_t(b * seq + i)] = wi;
      if (wi != T(0)) y.row(b) += X.row(b * seq + i) * wi;
    }
  }
  const index_t ix = x.id();
  return t.record("masked_mean_pool", std::move(y), t.requires_grad(x), [ix, w, batch, seq](tape<T>& t, index_t self) {
    const auto& g = t.upstream(self);
    auto& gx = t.grad_accumulator(ix);
    for (index_t b = 0; b < batch; ++b)
      for (index_t i = 0; i < seq; ++i) {
        const T wi = (*w)[std::size_t(b * seq + i)];
        if (wi != T(0)) gx.row(b * seq + i) += g.row(b) * wi;
      }
  }, /*backward_reads_output=*/false);
}

/// Each row divided by max(‖row‖, 1e-12) (torch.nn.functional.normalize).
template <class T>
var<T> l2_normalize_rows(const var<T>& x) {
  auto& t = autograd::detail::tape_of(x, "l2_normalize_rows");
  const auto X = x.value();
  auto inv = std::make_shared<std::vector<T>>(std::size_t(X.rows()));
  dense<T> y(X.rows(), X.cols());
  for (index_t i = 0; i < X.rows(); ++i) {
    const T nrm = std::max(X.row(i).norm(), T(1e-12));
    (*inv)[std::size_t(i)] = T(1) / nrm;
    y.row(i) = X.row(i) / nrm;
  }
  const index_t ix = x.id();
  return t.record("l2_normalize_rows", std::move(y), t.requires_grad(x), [ix, inv](tape<T>& t, index_t self) {
    const auto& g = t.upstream(self);
    const auto Y = t.value_at(self);
    dense<T> dx = t.buffer(g.rows(), g.cols());
    for (index_t i = 0; i < g.rows(); ++i) {
      const T dot = g.row(i).dot(Y.row(i));
      dx.row(i) = (g.row(i) - Y.row(i) * dot) * (*inv)[std::size_t(i)];
    }
    autograd::detail::accumulate(t, ix, std::move(dx));
  });
}

// ─────────────────────────────────────────────────────────────────────────────────────────
// Configuration and adapters
// ─────────────────────────────────────────────────────────────────────────────────────────

/// The fields of a Hugging Face BERT config.json that shape the network.
struct bert_config {
  index_t vocab_size = 30522;
  index_t hidden_size = 384;
  index_t num_layers = 6;
  index_t num_heads = 12;
  index_t intermediate_size = 1536;
  index_t max_position = 512;
  index_t type_vocab_size = 2;
  double layer_norm_eps = 1e-12;

  /// Parses config.json text: format_error for a missing field, unsupported_error for an
  /// activation other than "gelu" or a position embedding other than "absolute".
  static bert_config from_json_text(std::string_view text, const std::string& source = "config.json") {
    const auto j = io::parse_json_strict(text, source);
    const std::string op = "deltaw::models::bert_config (" + source + ")";
    auto num = [&](const char* k) -> index_t {
      if (!j.contains(k) || !j.at(k).is_number_integer() || j.at(k).get<std::int64_t>() < 1)
        throw format_error(op + ": \"" + k + "\" is missing or not a positive integer");
      return index_t(j.at(k).get<std::int64_t>());
    };
    bert_config c;
    c.vocab_size = num("vocab_size");
    c.hidden_size = num("hidden_size");
    c.num_layers = num("num_hidden_layers");
    c.num_heads = num("num_attention_heads");
    c.intermediate_size = num("intermediate_size");
    c.max_position = num("max_position_embeddings");
    c.type_vocab_size = j.contains("type_vocab_size") ? num("type_vocab_size") : 2;
    if (j.contains("layer_norm_eps") && j.at("layer_norm_eps").is_number()) c.layer_norm_eps = j.at("layer_norm_eps").get<double>();
    if (j.contains("hidden_act") && j.at("hidden_act") != "gelu")
      throw unsupported_error(op + ": hidden_act \"" + j.at("hidden_act").get<std::string>() +
                                  "\" is not supported (\"gelu\", the exact erf form, only)");
    if (j.contains("position_embedding_type") && j.at("position_embedding_type") != "absolute")
      throw unsupported_error(op + ": position_embedding_type \"" + j.at("position_embedding_type").get<std::string>() +
                                  "\" is not supported (\"absolute\" only)");
    if (c.hidden_size % c.num_heads != 0)
      throw format_error(op + ": hidden_size " + std::to_string(c.hidden_size) + " is not a multiple of num_attention_heads " +
                         std::to_string(c.num_heads));
    return c;
  }
  static bert_config from_file(const std::filesystem::path& path) {
    const auto buf = io::read_file(path, io::max_config_bytes);
    return from_json_text(std::string_view(reinterpret_cast<const char*>(buf.bytes.data()), buf.bytes.size()), path.string());
  }
};

enum class adapter_type { lora, dora, miss, lokr, vera };

inline const char* adapter_type_name(adapter_type a) {
  switch (a) {
    case adapter_type::lora: return "LoRA";
    case adapter_type::dora: return "DoRA";
    case adapter_type::miss: return "MiSS";
    case adapter_type::lokr: return "LoKr";
    case adapter_type::vera: return "VeRA";
  }
  return "?";
}

/// What attach() puts on the model. Inits follow PEFT's defaults, so that every adapted
/// layer starts equal to the frozen one: LoRA / DoRA A kaiming-uniform U(±1/√in), B = 0
/// (DoRA's magnitude = the row norms of W); MiSS D [r, out] = 0; LoKr w1 = 0, w2 (or
/// w2_a, w2_b) U(±1/√fan_in) with PEFT's factorisation (lokr_shapes); VeRA shared bases
/// (vera_shared_basis), λ_d = vera_d_initial, λ_b = 0.
struct adapter_options {
  adapter_type type = adapter_type::lora;
  index_t r = 8;
  double alpha = 16;  ///< LoRA / DoRA / LoKr: s = α/r (MiSS and VeRA have no scale)
  /// PEFT's target_modules list rule: a module is adapted when its name equals an entry
  /// or ends with "." + entry. The default is every attention and MLP projection.
  std::vector<std::string> targets = {"query", "key", "value", "dense"};
  std::uint64_t seed = 0;
  double vera_d_initial = 0.1;
};

inline bool module_targeted(const std::string& name, const std::vector<std::string>& targets) {
  for (const auto& t : targets)
    if (name == t || (name.size() > t.size() && name.ends_with(t) && name[name.size() - t.size() - 1] == '.')) return true;
  return false;
}

/// A frozen linear layer of the encoder (W [out, in] and bias [out] viewed from the
/// checkpoint) with an optional adapter of one of the five types.
template <class T>
class bert_linear {
 public:
  bert_linear(std::string name, held_matrix<T> W, held_vector<T> b)
      : name_(std::move(name)), W_(std::move(W)), b_(std::move(b)) {
    if (b_.view.size() != W_.view.rows())
      throw shape_error("deltaw::models::bert_linear(" + name_ + "): bias of " + std::to_string(b_.view.size()) +
                        " entries for a weight " + deltaw::detail::shape_str(W_.view.rows(), W_.view.cols()));
  }
  bert_linear(bert_linear&&) noexcept = default;
  bert_linear& operator=(bert_linear&&) noexcept = default;

  const std::string& name() const { return name_; }
  matrix_view<const T> weight() const { return W_.view; }
  index_t out_features() const { return W_.view.rows(); }
  index_t in_features() const { return W_.view.cols(); }
  bool has_adapter() const { return !params_.empty(); }
  adapter_type type() const { return type_; }
  double scale() const { return s_; }
  index_t rank() const { return r_; }
  /// The adapter's tensors in the VJP factor order: LoRA {B [out, r], A [r, in]}, DoRA
  /// {B, A, m [1, out]}, MiSS {D [r, out]}, LoKr {w1, w2} or {w1, w2_a, w2_b}, VeRA
  /// {λ_d [1, r], λ_b [1, out]}.
  std::vector<parameter<T>*> adapter_parameters() const {
    std::vector<parameter<T>*> out;
    for (const auto& p : params_) out.push_back(p.get());
    return out;
  }

  void attach(const adapter_options& o, std::mt19937_64& g, const vera_basis* basis = nullptr) {
    const std::string op = "deltaw::models::bert_linear(" + name_ + ")::attach";
    if (o.r < 1) throw rank_error(op + ": the rank must be at least 1; got " + std::to_string(o.r));
    if (has_adapter()) throw argument_error(op + ": the layer already has an adapter");
    type_ = o.type;
    r_ = o.r;
    s_ = o.alpha / double(o.r);
    const index_t out = out_features(), in = in_features();
    auto uni = [&g](index_t rows, index_t cols, double bound) {
      std::uniform_real_distribution<double> u(-bound, bound);
      dense<T> m(rows, cols);
      for (index_t i = 0; i < m.size(); ++i) m.data()[i] = T(u(g));
      return m;
    };
    auto add = [&](const char* n, dense<T> v) { params_.push_back(std::make_unique<parameter<T>>(name_ + "." + n, std::move(v))); };
    switch (o.type) {
      case adapter_type::lora:
      case adapter_type::dora:
        add("lora_B", dense<T>::Zero(out, o.r));
        add("lora_A", uni(o.r, in, 1.0 / std::sqrt(double(in))));
        if (o.type == adapter_type::dora) {
          dense<T> m(1, out);
          for (index_t i = 0; i < out; ++i) {
            double sq = 0;
            for (index_t j = 0; j < in; ++j) sq += double(W_.view(i, j)) * double(W_.view(i, j));
            m(0, i) = T(std::sqrt(sq));
          }
          add("lora_magnitude_vector", std::move(m));
        }
        break;
      case adapter_type::miss:
        if (in % o.r != 0)
          throw shape_error(op + ": MiSS needs in_features " + std::to_string(in) + " to be a multiple of r " + std::to_string(o.r));
        add("miss_block", dense<T>::Zero(o.r, out));
        break;
      case adapter_type::lokr: {
        lokr_ = lokr_shapes(out, in, o.r);
        add("lokr_w1", dense<T>::Zero(lokr_.a, lokr_.c));
        if (lokr_.w2_dense) {
          add("lokr_w2", uni(lokr_.b, lokr_.d, 1.0 / std::sqrt(double(lokr_.d))));
        } else {
          add("lokr_w2_a", uni(lokr_.b, o.r, 1.0 / std::sqrt(double(o.r))));
          add("lokr_w2_b", uni(o.r, lokr_.d, 1.0 / std::sqrt(double(lokr_.d))));
        }
        break;
      }
      case adapter_type::vera: {
        if (basis == nullptr) throw argument_error(op + ": VeRA needs the model's shared basis");
        add("vera_lambda_d", dense<T>::Constant(1, basis->r, T(o.vera_d_initial)));
        add("vera_lambda_b", dense<T>::Zero(1, out));
        vera_.emplace(*basis, out, in, held_vector<T>{vector_view<const T>(params_[0]->value().data(), basis->r), nullptr},
                      held_vector<T>{vector_view<const T>(params_[1]->value().data(), out), nullptr});
        r_ = basis->r;
        break;
      }
    }
  }

  /// DoRA: fixes the row norms n of W + s·B·A at their current values (the forward pass
  /// then divides by these instead of recomputing them; the backward pass treats them as
  /// constants either way, as PEFT). For a gradient check against central differences,
  /// which must see the same constants. `on = false` recomputes them again.
  void freeze_dora_norms(bool on) {
    dora_norms_.reset();
    if (!on || type_ != adapter_type::dora || !has_adapter()) return;
    const index_t out = out_features(), in = in_features();
    auto n = std::make_shared<std::vector<double>>(std::size_t(out));
    const auto& B = params_[0]->value();
    const auto& A = params_[1]->value();
    for (index_t i = 0; i < out; ++i) {
      double sq = 0;
      for (index_t j = 0; j < in; ++j) {
        double v = double(W_.view(i, j));
        for (index_t k = 0; k < B.cols(); ++k) v += s_ * double(B(i, k)) * double(A(k, j));
        sq += v * v;
      }
      (*n)[std::size_t(i)] = std::sqrt(sq);
    }
    dora_norms_ = std::move(n);
  }

  var<T> operator()(tape<T>& t, const var<T>& x) const {
    const matrix_view<const T> W = W_.view;
    const vector_view<const T> bias = b_.view;
    if (!has_adapter()) return autograd::linear(x, W, bias);
    auto p = [&](std::size_t i) { return t.param(*params_[i]); };
    switch (type_) {
      case adapter_type::lora: return autograd::lora_linear(x, W, p(0), p(1), s_, bias);
      case adapter_type::dora: return autograd::dora_linear(x, W, p(0), p(1), p(2), s_, dora_norms_, bias);
      case adapter_type::miss: {
        const index_t in = in_features();
        return autograd::adapted_linear<T, 1>(x, W, {p(0)}, [in](const auto& v) { return deltaw::miss(v[0], in); },
                                              "miss_linear", bias);
      }
      case adapter_type::lokr: {
        const index_t r = r_;
        const double a = s_ * double(r_);
        if (lokr_.w2_dense)
          return autograd::adapted_linear<T, 2>(x, W, {p(0), p(1)}, [a, r](const auto& v) {
            return deltaw::lokr(deltaw::kron_factor(v[0]), deltaw::kron_factor(v[1]), deltaw::alpha(a), r);
          }, "lokr_linear", bias);
        return autograd::adapted_linear<T, 3>(x, W, {p(0), p(1), p(2)}, [a, r](const auto& v) {
          return deltaw::lokr(deltaw::kron_factor(v[0]), deltaw::kron_factor(v[1], v[2]), deltaw::alpha(a), r);
        }, "lokr_linear", bias);
      }
      case adapter_type::vera: {
        const auto& proto = *vera_;
        return autograd::adapted_linear<T, 2>(x, W, {p(0), p(1)}, [&proto](const auto& v) {
          return cpu::vjp<vera_update<T, device::cpu>>::rebind(proto, v);
        }, "vera_linear", bias);
      }
    }
    throw argument_error("deltaw::models::bert_linear: unknown adapter type");
  }

 private:
  std::string name_;
  held_matrix<T> W_;
  held_vector<T> b_;
  adapter_type type_ = adapter_type::lora;
  index_t r_ = 0;
  double s_ = 1.0;
  lokr_layout lokr_{};
  std::optional<vera_update<T, device::cpu>> vera_;
  std::shared_ptr<const std::vector<double>> dora_norms_;
  std::vector<std::unique_ptr<parameter<T>>> params_;
};

/// A frozen LayerNorm (γ, β viewed from the checkpoint).
template <class T>
struct bert_norm {
  held_vector<T> gamma, beta;
  double eps = 1e-12;
  var<T> operator()(tape<T>& t, const var<T>& x) const {
    const index_t d = gamma.view.size();
    return autograd::layer_norm(x, t.frozen(matrix_view<const T>(gamma.view.data(), 1, d), "ln.weight"),
                                t.frozen(matrix_view<const T>(beta.view.data(), 1, d), "ln.bias"), eps);
  }
};

// ─────────────────────────────────────────────────────────────────────────────────────────
// The model
// ─────────────────────────────────────────────────────────────────────────────────────────

template <class T>
class bert_model {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "deltaw::models::bert_model: T is float or double");

 public:
  struct layer {
    bert_linear<T> query, key, value, attn_out, up, down;
    bert_norm<T> ln_attn, ln_out;
  };

  /// config.json and model.safetensors of a Hugging Face BERT directory.
  static bert_model load(const std::filesystem::path& dir) {
    return from_safetensors(bert_config::from_file(dir / "config.json"), io::safetensors_file::open(dir / "model.safetensors"));
  }

  /// Builds over the tensors of `f` (BertModel's names, with or without a "bert." prefix).
  /// Tensors stored as T are viewed (the mapping stays alive as long as the model);
  /// others are converted once. Shapes are checked against the config (shape_error).
  static bert_model from_safetensors(const bert_config& c, const io::safetensors_file& f) {
    bert_model m;
    m.c_ = c;
    const std::string pre = f.contains("bert.embeddings.word_embeddings.weight") ? "bert." : "";
    auto mat = [&](const std::string& n, index_t rows, index_t cols) {
      auto h = f.matrix<T>(pre + n);
      if (h.view.rows() != rows || h.view.cols() != cols)
        throw shape_error("deltaw::models::bert_model: tensor \"" + pre + n + "\" is " +
                          deltaw::detail::shape_str(h.view.rows(), h.view.cols()) + "; the config makes it " +
                          deltaw::detail::shape_str(rows, cols));
      return h;
    };
    auto vec = [&](const std::string& n, index_t size) {
      auto h = f.vector<T>(pre + n);
      if (h.view.size() != size)
        throw shape_error("deltaw::models::bert_model: tensor \"" + pre + n + "\" has " + std::to_string(h.view.size()) +
                          " entries; the config makes it " + std::to_string(size));
      return h;
    };
    const index_t H = c.hidden_size, I = c.intermediate_size;
    m.word_ = mat("embeddings.word_embeddings.weight", c.vocab_size, H);
    m.pos_ = mat("embeddings.position_embeddings.weight", c.max_position, H);
    m.type_ = mat("embeddings.token_type_embeddings.weight", c.type_vocab_size, H);
    m.ln_emb_ = {vec("embeddings.LayerNorm.weight", H), vec("embeddings.LayerNorm.bias", H), c.layer_norm_eps};
    auto lin = [&](const std::string& n, index_t out, index_t in) {
      return bert_linear<T>(n, mat(n + ".weight", out, in), vec(n + ".bias", out));
    };
    for (index_t l = 0; l < c.num_layers; ++l) {
      const std::string p = "encoder.layer." + std::to_string(l) + ".";
      m.layers_.push_back(std::make_unique<layer>(layer{
          lin(p + "attention.self.query", H, H), lin(p + "attention.self.key", H, H), lin(p + "attention.self.value", H, H),
          lin(p + "attention.output.dense", H, H), lin(p + "intermediate.dense", I, H), lin(p + "output.dense", H, I),
          bert_norm<T>{vec(p + "attention.output.LayerNorm.weight", H), vec(p + "attention.output.LayerNorm.bias", H), c.layer_norm_eps},
          bert_norm<T>{vec(p + "output.LayerNorm.weight", H), vec(p + "output.LayerNorm.bias", H), c.layer_norm_eps}}));
    }
    m.zero_copy_ = f.is_zero_copy<T>(pre + "embeddings.word_embeddings.weight");
    return m;
  }

  const bert_config& config() const { return c_; }
  /// Whether the weights are views of the mapped file (no copy was made).
  bool zero_copy() const { return zero_copy_; }

  /// Every linear layer in checkpoint order (per layer: query, key, value,
  /// attention.output.dense, intermediate.dense, output.dense).
  std::vector<bert_linear<T>*> linears() {
    std::vector<bert_linear<T>*> out;
    for (auto& L : layers_)
      for (auto* l : {&L->query, &L->key, &L->value, &L->attn_out, &L->up, &L->down}) out.push_back(l);
    return out;
  }
  std::vector<bert_linear<T>*> adapted_layers() {
    std::vector<bert_linear<T>*> out;
    for (auto* l : linears())
      if (l->has_adapter()) out.push_back(l);
    return out;
  }

  /// Attaches an adapter to every linear layer whose module name matches o.targets.
  /// Returns how many layers got one (argument_error when none matched).
  index_t attach(const adapter_options& o) {
    std::mt19937_64 g(o.seed + 0x5eed);
    std::vector<bert_linear<T>*> targeted;
    index_t out_max = 0, in_max = 0;
    for (auto* l : linears())
      if (module_targeted(l->name(), o.targets)) {
        targeted.push_back(l);
        out_max = std::max(out_max, l->out_features());
        in_max = std::max(in_max, l->in_features());
      }
    if (targeted.empty()) throw argument_error("deltaw::models::bert_model::attach: no module matches the targets");
    if (!adapted_layers().empty()) throw argument_error("deltaw::models::bert_model::attach: the model already has an adapter");
    // VeRA's shared bases cover the largest targeted layer, as PEFT sizes vera_A / vera_B.
    vera_basis_ = vera_shared_basis(o.seed, o.r, out_max, in_max);
    for (auto* l : targeted) l->attach(o, g, &vera_basis_);
    const index_t n = index_t(targeted.size());
    adapter_ = o;
    return n;
  }
  const vera_basis& shared_vera_basis() const { return vera_basis_; }

  std::vector<parameter<T>*> trainable_parameters() {
    std::vector<parameter<T>*> out;
    for (auto* l : adapted_layers())
      for (auto* p : l->adapter_parameters())
        if (p->trainable()) out.push_back(p);
    return out;
  }
  index_t trainable_count() {
    index_t n = 0;
    for (auto* p : trainable_parameters()) n += p->size();
    return n;
  }

  /// The last hidden state [batch·seq, hidden] of padded ids (row b·seq + i is token i of
  /// sequence b), token type ids and the attention mask (1 token, 0 padding).
  var<T> hidden(tape<T>& t, const std::vector<std::int64_t>& ids, const std::vector<std::int64_t>& type_ids,
                const std::vector<std::int64_t>& mask, index_t batch, index_t seq) const {
    const auto n = std::size_t(batch * seq);
    if (ids.size() != n || type_ids.size() != n || mask.size() != n)
      throw shape_error("deltaw::models::bert_model::hidden: " + std::to_string(ids.size()) + " ids, " +
                        std::to_string(type_ids.size()) + " type ids and " + std::to_string(mask.size()) +
                        " mask entries for batch " + std::to_string(batch) + " × seq " + std::to_string(seq));
    if (seq > c_.max_position)
      throw shape_error("deltaw::models::bert_model::hidden: seq " + std::to_string(seq) + " exceeds max_position_embeddings " +
                        std::to_string(c_.max_position));
    std::vector<std::int64_t> positions(n);
    for (std::size_t i = 0; i < n; ++i) positions[i] = std::int64_t(i % std::size_t(seq));
    auto x = autograd::add(autograd::add(autograd::embedding(t.frozen(word_.view, "word_embeddings"), ids),
                                         autograd::embedding(t.frozen(pos_.view, "position_embeddings"), positions)),
                           autograd::embedding(t.frozen(type_.view, "token_type_embeddings"), type_ids));
    x = ln_emb_(t, x);
    auto run_layer = [&](tape<T>& lt, const layer& L, var<T> h) {
      const auto a = masked_attention(L.query(lt, h), L.key(lt, h), L.value(lt, h), batch, seq, c_.num_heads, mask);
      h = L.ln_attn(lt, autograd::add(h, L.attn_out(lt, a)));
      return L.ln_out(lt, autograd::add(h, L.down(lt, bert_gelu(L.up(lt, h)))));
    };
    if (!t.grad_enabled()) {
      // Inference (no_grad): nothing will read the intermediate values, so each layer runs
      // on a scratch tape freed when the layer is done, and only the last hidden state is
      // recorded on t. Peak memory: one layer's activations instead of all six.
      dense<T> h = x.value();
      for (const auto& L : layers_) {
        tape<T> lt(t.pool());  // the layers reuse each other's buffers
        autograd::no_grad ng(lt);
        h = run_layer(lt, *L, lt.frozen(deltaw::view(std::as_const(h)), "hidden")).value();
      }
      return t.record("bert_encoder", std::move(h), false);
    }
    for (const auto& L : layers_) x = run_layer(t, *L, x);
    return x;
  }

  /// Sentence embeddings [batch, hidden]: mean pooling over the mask, then unit rows.
  var<T> embed(tape<T>& t, const std::vector<std::int64_t>& ids, const std::vector<std::int64_t>& type_ids,
               const std::vector<std::int64_t>& mask, index_t batch, index_t seq) const {
    return l2_normalize_rows(masked_mean_pool(hidden(t, ids, type_ids, mask, batch, seq), batch, seq, mask));
  }

  /// The LoRA / DoRA adapter as a PEFT adapter (module names as Hugging Face's BertModel
  /// has them; full names in target_modules, as write_peft_adapter writes). unsupported_error for the other types
  /// (their writers are io/peft_structured.hpp's).
  io::peft_adapter to_peft(const std::string& base_model = "sentence-transformers/all-MiniLM-L6-v2") {
    if (adapted_layers().empty()) throw argument_error("deltaw::models::bert_model::to_peft: the model has no adapter");
    if (adapter_.type != adapter_type::lora && adapter_.type != adapter_type::dora)
      throw unsupported_error(std::string("deltaw::models::bert_model::to_peft: ") + adapter_type_name(adapter_.type) +
                                  " adapters are not written by this function (LoRA and DoRA only)");
    io::peft_adapter a;
    a.config.r = adapter_.r;
    a.config.lora_alpha = adapter_.alpha;
    a.config.use_dora = adapter_.type == adapter_type::dora;
    a.config.base_model_name_or_path = base_model;
    for (auto* l : adapted_layers()) {
      auto ps = l->adapter_parameters();
      const auto lr = deltaw::lora(ps[0]->view(), ps[1]->view(), deltaw::scale(l->scale()));
      if (adapter_.type == adapter_type::dora) {
        std::vector<float> mag(std::size_t(l->out_features()));
        for (index_t i = 0; i < l->out_features(); ++i) mag[std::size_t(i)] = float(ps[2]->value()(0, i));
        a.add(l->name(), lr, std::optional<vector_view<const float>>(vector_view<const float>(mag.data(), index_t(mag.size()))));
      } else {
        a.add(l->name(), lr);
      }
    }
    return a;
  }

  /// A MiSS, LoKr or VeRA adapter as a PEFT adapter (io::peft_structured_adapter, written
  /// by io::write_peft_structured_adapter; VeRA's bases are materialised into vera_A /
  /// vera_B with save_projection). unsupported_error for LoRA / DoRA (use to_peft()).
  io::peft_structured_adapter to_peft_structured(const std::string& base_model = "sentence-transformers/all-MiniLM-L6-v2") {
    if (adapted_layers().empty())
      throw argument_error("deltaw::models::bert_model::to_peft_structured: the model has no adapter");
    io::peft_structured_adapter a;
    a.config.base_model_name_or_path = base_model;
    a.config.r = adapter_.r;
    a.config.alpha = adapter_.alpha;
    for (auto* l : adapted_layers()) {
      auto ps = l->adapter_parameters();
      std::vector<dense<float>> f;  // float copies: PEFT files hold F32
      for (auto* p : ps) f.push_back(p->value().template cast<float>());
      switch (adapter_.type) {
        case adapter_type::miss: a.add_miss(l->name(), deltaw::miss(deltaw::view(std::as_const(f[0])), l->in_features())); break;
        case adapter_type::lokr: {
          const auto al = deltaw::alpha(adapter_.alpha);
          if (f.size() == 2)
            a.add_lokr(l->name(), deltaw::lokr(deltaw::kron_factor(deltaw::view(std::as_const(f[0]))),
                                               deltaw::kron_factor(deltaw::view(std::as_const(f[1]))), al, adapter_.r), adapter_.r);
          else
            a.add_lokr(l->name(), deltaw::lokr(deltaw::kron_factor(deltaw::view(std::as_const(f[0]))),
                                               deltaw::kron_factor(deltaw::view(std::as_const(f[1])), deltaw::view(std::as_const(f[2]))),
                                               al, adapter_.r), adapter_.r);
          break;
        }
        case adapter_type::vera:
          a.add_vera(l->name(), deltaw::vera(vera_basis_, l->out_features(), l->in_features(),
                                             vector_view<const float>(f[0].data(), f[0].size()),
                                             vector_view<const float>(f[1].data(), f[1].size())));
          break;
        default:
          throw unsupported_error(std::string("deltaw::models::bert_model::to_peft_structured: ") +
                                  adapter_type_name(adapter_.type) + " adapters are written by to_peft()");
      }
    }
    return a;
  }

 private:
  bert_model() = default;
  bert_config c_;
  held_matrix<T> word_, pos_, type_;
  bert_norm<T> ln_emb_;
  std::vector<std::unique_ptr<layer>> layers_;
  vera_basis vera_basis_;
  adapter_options adapter_;
  bool zero_copy_ = false;
};

}  // namespace models
DELTAW_NAMESPACE_END
