// SPDX-License-Identifier: MIT
// ICM-LoRA: adapters as standardised flat vectors, and a conditional VAE (trained with
// deltaw's autograd) that maps task descriptors to such vectors.
//
// The tensor part is generic: anything that lists its tensors flattens the same way —
//   * an update type, through its for_each_operand(f) (every type in expr/ has one);
//   * a std::vector<autograd::parameter<T>*> (e.g. nn::tiny_transformer's LoRA factors);
//   * a std::tuple of the above (a whole model's adapters), tensors named "<i>.<name>".
// Each tensor is standardised on its own, z = (x − μ)/σ, and (μ, σ, shape) are kept in the
// layout to invert it; integer operands (LDU's permutation) are stored unstandardised.
// With exact_scale (the default) μ is rounded to the tensor's element type and σ to a power
// of two, so that for float, bf16 and fp16 storage unflatten(flatten(u)) reproduces every
// element bit for bit: σ a power of two makes the division and the multiplication exact,
// and the rounding of x − μ and of z·σ + μ in double (≈ 2⁻⁵²·(|x| + |μ|)) stays below half
// an ulp of x in its own type unless |x| is under about 2⁻²⁷·|μ| (zeros are exact).
// For double storage x − μ itself rounds, so the inverse is exact to about one ulp of
// max(|x|, |μ|). Either way, the elements that would not come back bit-identical are
// counted in flat_adapter::inexact. Vectors of different adapters are zero-padded to a
// common length (stack_padded) for the generator; the layout says how much of a padded
// vector is real.
//
// unflatten_into(values, layout, target) writes through the views the target lists: it is
// for targets that view memory the caller owns and may write (an update built over your
// matrices, or parameters). Updates holding an rvalue they own (lora(std::move(B), …))
// must not be targets.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../autograd/ops.hpp"
#include "../autograd/tape.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"
#include "../optim/optim.hpp"

DELTAW_NAMESPACE_BEGIN
namespace papers {
namespace icm {

/// One tensor of a flattened adapter.
struct tensor_stats {
  std::string name;
  index_t rows = 0, cols = 0;
  double mean = 0, std = 1;  ///< z = (x − mean)/std
  bool integral = false;     ///< an integer operand, stored as is
  index_t offset = 0;        ///< first entry in the flat vector
  index_t size() const { return rows * cols; }
};

/// How a flat vector maps back to tensors.
struct flat_layout {
  std::vector<tensor_stats> tensors;
  index_t length = 0;  ///< real (unpadded) length
};

struct flatten_options {
  /// Standardise each tensor (false: store raw values; mean 0, std 1).
  bool standardize = true;
  /// μ rounded to the element type, σ to a power of two: a bit-exact inverse for float,
  /// bf16, fp16 storage (see the top).
  /// false: μ and σ as computed in double (the inverse is then exact only to rounding).
  bool exact_scale = true;
  /// A tensor whose standard deviation is below this keeps σ = 1 (constant tensors, zeros).
  double min_std = 1e-30;
};

/// A flattened adapter.
struct flat_adapter {
  std::vector<double> values;
  flat_layout layout;
  index_t inexact = 0;  ///< elements whose inverse is not bit-identical (see the top)
};

namespace detail {
template <class V>
index_t view_rows(const V& v) {
  if constexpr (is_matrix_view_v<V>) return v.rows();
  else return 1;
}
template <class V>
index_t view_cols(const V& v) {
  if constexpr (is_matrix_view_v<V>) return v.cols();
  else return v.size();
}
template <class V>
auto* element(const V& v, index_t i, index_t j) {
  using E = std::remove_const_t<typename V::element_type>;
  E* p = const_cast<E*>(v.data());
  if constexpr (is_matrix_view_v<V>) return p + i * v.row_stride() + j * v.col_stride();
  else return p + j * v.stride();
}
template <class V>
constexpr bool is_integral_view = std::is_integral_v<std::remove_const_t<typename V::element_type>>;
template <class V>
void check_cpu(const V&, const std::string& name) {
  if constexpr (!std::is_same_v<typename V::device_type, device::cpu>)
    static_assert(sizeof(V) == 0, "deltaw::papers::icm: flatten/unflatten read host memory; copy device tensors to the CPU first");
  (void)name;
}
template <class E>
double as_double(E x) {
  if constexpr (std::is_integral_v<E> || std::is_same_v<E, float> || std::is_same_v<E, double>) return double(x);
  else return double(static_cast<float>(x));  // bf16 / fp16
}
template <class E>
E from_double(double v) {
  if constexpr (std::is_integral_v<E>) return E(std::llround(v));
  else if constexpr (std::is_same_v<E, float> || std::is_same_v<E, double>) return E(v);
  else return E(float(v));  // bf16 / fp16: through float, round to nearest
}
template <class E>
bool same_bits(E a, E b) {
  if constexpr (std::is_integral_v<E>) return a == b;
  else {
    const double x = as_double(a), y = as_double(b);
    if (std::isnan(x) && std::isnan(y)) return true;
    return x == y && std::signbit(x) == std::signbit(y);
  }
}

/// Calls f(name, view) for every tensor of a listable source.
template <class T, class F>
void list_tensors(const std::vector<autograd::parameter<T>*>& ps, F&& f, const std::string& prefix = "") {
  for (auto* p : ps) {
    if (!p) throw argument_error("deltaw::papers::icm: a null parameter in the list");
    f(prefix + p->name(), deltaw::view(p->value()));
  }
}
template <class U, class F>
  requires requires(const U& u) { u.for_each_operand([](const char*, const auto&) {}); }
void list_tensors(const U& u, F&& f, const std::string& prefix = "") {
  u.for_each_operand([&](const char* name, const auto& v) { f(prefix + name, v); });
}
template <class... Xs, class F>
void list_tensors(const std::tuple<Xs...>& xs, F&& f, const std::string& prefix = "") {
  std::size_t i = 0;
  std::apply([&](const auto&... x) { ((list_tensors(x, f, prefix + std::to_string(i++) + "."), void()), ...); }, xs);
}

inline double pow2_near(double s) {
  int e = 0;
  std::frexp(s, &e);  // s = m·2^e, m ∈ [0.5, 1)
  return std::ldexp(1.0, e - 1);
}
}  // namespace detail

/// Flattens every tensor `x` lists (an update, a parameter list or a tuple of them) into one
/// standardised vector, with the layout that inverts it.
template <class X>
flat_adapter flatten(const X& x, const flatten_options& o = {}) {
  flat_adapter out;
  detail::list_tensors(x, [&](const std::string& name, const auto& v) {
    using V = std::remove_cvref_t<decltype(v)>;
    using E = std::remove_const_t<typename V::element_type>;
    detail::check_cpu(v, name);
    tensor_stats s;
    s.name = name;
    s.rows = detail::view_rows(v);
    s.cols = detail::view_cols(v);
    s.offset = index_t(out.values.size());
    s.integral = detail::is_integral_view<V>;
    const index_t n = s.size();
    if (o.standardize && !s.integral && n > 0) {
      double sum = 0;
      for (index_t i = 0; i < s.rows; ++i)
        for (index_t j = 0; j < s.cols; ++j) sum += detail::as_double(*detail::element(v, i, j));
      double mean = sum / double(n), sq = 0;
      for (index_t i = 0; i < s.rows; ++i)
        for (index_t j = 0; j < s.cols; ++j) {
          const double d = detail::as_double(*detail::element(v, i, j)) - mean;
          sq += d * d;
        }
      double sd = std::sqrt(sq / double(n));
      if (!std::isfinite(mean) || !std::isfinite(sd))
        throw non_finite_error("deltaw::papers::icm::flatten: tensor '" + name + "' " + deltaw::detail::shape_str(s.rows, s.cols) +
                               " has non-finite entries");
      if (!(sd >= o.min_std)) sd = 1.0;
      if (o.exact_scale) {
        mean = double(detail::from_double<E>(mean));
        sd = detail::pow2_near(sd);
      }
      s.mean = mean;
      s.std = sd;
    }
    out.values.reserve(out.values.size() + std::size_t(n));
    for (index_t i = 0; i < s.rows; ++i)
      for (index_t j = 0; j < s.cols; ++j) {
        const E x0 = *detail::element(v, i, j);
        const double z = (detail::as_double(x0) - s.mean) / s.std;
        out.values.push_back(z);
        if (!detail::same_bits(detail::from_double<E>(z * s.std + s.mean), x0)) ++out.inexact;
      }
    out.layout.tensors.push_back(std::move(s));
  });
  out.layout.length = index_t(out.values.size());
  return out;
}

/// Flattens `x` with the statistics (μ, σ) of a given layout instead of its own: the
/// tensors must match the layout's names and shapes. This is how a set of adapters is put
/// on one common scale for the generator (see common_layout), so that a generated vector
/// can be inverted without statistics of its own.
template <class X>
flat_adapter flatten(const X& x, const flat_layout& stats) {
  flat_adapter out;
  out.layout = stats;
  out.values.assign(std::size_t(stats.length), 0.0);
  std::size_t k = 0;
  detail::list_tensors(x, [&](const std::string& name, const auto& v) {
    using V = std::remove_cvref_t<decltype(v)>;
    using E = std::remove_const_t<typename V::element_type>;
    detail::check_cpu(v, name);
    const index_t r = detail::view_rows(v), c = detail::view_cols(v);
    if (k >= stats.tensors.size() || stats.tensors[k].rows != r || stats.tensors[k].cols != c)
      throw shape_error("deltaw::papers::icm::flatten: tensor " + std::to_string(k) + " '" + name + "' " +
                        deltaw::detail::shape_str(r, c) + " does not match the given layout" +
                        (k < stats.tensors.size() ? " ('" + stats.tensors[k].name + "' " +
                                                        deltaw::detail::shape_str(stats.tensors[k].rows, stats.tensors[k].cols) + ")"
                                                  : std::string(" (which has fewer tensors)")));
    const auto& s = stats.tensors[k++];
    index_t at = s.offset;
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < c; ++j) {
        const E x0 = *detail::element(v, i, j);
        const double z = (detail::as_double(x0) - s.mean) / s.std;
        out.values[std::size_t(at++)] = z;
        if (!detail::same_bits(detail::from_double<E>(z * s.std + s.mean), x0)) ++out.inexact;
      }
  });
  if (k != stats.tensors.size())
    throw shape_error("deltaw::papers::icm::flatten: " + std::to_string(k) + " tensors but the given layout has " +
                      std::to_string(stats.tensors.size()));
  return out;
}

/// One layout for a set of adapters of the same structure: per tensor, the pooled mean and
/// standard deviation over the set (μ rounded to T, σ to a power of two, as exact_scale).
template <class T>
flat_layout common_layout(const std::vector<flat_adapter>& xs, double min_std = 1e-30) {
  if (xs.empty()) throw argument_error("deltaw::papers::icm::common_layout: no adapters");
  flat_layout out = xs.front().layout;
  for (std::size_t t = 0; t < out.tensors.size(); ++t) {
    auto& s = out.tensors[t];
    if (s.integral) continue;
    double m1 = 0, m2 = 0;
    for (const auto& x : xs) {
      if (x.layout.tensors.size() != out.tensors.size() || x.layout.tensors[t].rows != s.rows ||
          x.layout.tensors[t].cols != s.cols)
        throw shape_error("deltaw::papers::icm::common_layout: the adapters differ in structure at tensor '" + s.name + "'");
      const auto& u = x.layout.tensors[t];
      // moments of the raw values from the per-adapter statistics and standardised values
      double a = 0, b = 0;
      for (index_t i = 0; i < u.size(); ++i) {
        const double raw = x.values[std::size_t(u.offset + i)] * u.std + u.mean;
        a += raw;
        b += raw * raw;
      }
      m1 += a;
      m2 += b;
    }
    const double cnt = double(s.size()) * double(xs.size());
    const double mean = cnt > 0 ? m1 / cnt : 0.0;
    double sd = cnt > 0 ? std::sqrt(std::max(0.0, m2 / cnt - mean * mean)) : 1.0;
    if (!(sd >= min_std)) sd = 1.0;
    s.mean = double(detail::from_double<T>(mean));
    s.std = detail::pow2_near(sd);
  }
  return out;
}

/// Writes the tensors of `values` (a flat vector, possibly zero-padded past layout.length)
/// into the tensors `target` lists, which must match the layout's names and shapes.
template <class X>
void unflatten_into(const std::vector<double>& values, const flat_layout& layout, const X& target) {
  if (index_t(values.size()) < layout.length)
    throw shape_error("deltaw::papers::icm::unflatten_into: the vector has " + std::to_string(values.size()) +
                      " entries but the layout needs " + std::to_string(layout.length));
  std::size_t k = 0;
  detail::list_tensors(target, [&](const std::string& name, const auto& v) {
    using V = std::remove_cvref_t<decltype(v)>;
    using E = std::remove_const_t<typename V::element_type>;
    detail::check_cpu(v, name);
    if (k >= layout.tensors.size())
      throw shape_error("deltaw::papers::icm::unflatten_into: the target has more tensors than the layout (" +
                        std::to_string(layout.tensors.size()) + "); first extra is '" + name + "'");
    const auto& s = layout.tensors[k++];
    const index_t r = detail::view_rows(v), c = detail::view_cols(v);
    if (s.rows != r || s.cols != c)
      throw shape_error("deltaw::papers::icm::unflatten_into: tensor " + std::to_string(k - 1) + " is '" + s.name + "' " +
                        deltaw::detail::shape_str(s.rows, s.cols) + " in the layout but the target's '" + name + "' is " +
                        deltaw::detail::shape_str(r, c));
    index_t at = s.offset;
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < c; ++j) *detail::element(v, i, j) = detail::from_double<E>(values[std::size_t(at++)] * s.std + s.mean);
  });
  if (k != layout.tensors.size())
    throw shape_error("deltaw::papers::icm::unflatten_into: the target lists " + std::to_string(k) +
                      " tensors but the layout has " + std::to_string(layout.tensors.size()));
}

/// The tensors of a flat vector as owned matrices (in layout order), for rebuilding a type.
template <class T>
std::vector<dense<T>> unflatten_tensors(const std::vector<double>& values, const flat_layout& layout) {
  if (index_t(values.size()) < layout.length)
    throw shape_error("deltaw::papers::icm::unflatten_tensors: the vector has " + std::to_string(values.size()) +
                      " entries but the layout needs " + std::to_string(layout.length));
  std::vector<dense<T>> out;
  for (const auto& s : layout.tensors) {
    dense<T> m(s.rows, s.cols);
    index_t at = s.offset;
    for (index_t i = 0; i < s.rows; ++i)
      for (index_t j = 0; j < s.cols; ++j) m(i, j) = detail::from_double<T>(values[std::size_t(at++)] * s.std + s.mean);
    out.push_back(std::move(m));
  }
  return out;
}

/// Zero-pads each vector to the longest (or to `length` when larger) and stacks them as rows.
inline dense<double> stack_padded(const std::vector<flat_adapter>& xs, index_t length = 0) {
  for (const auto& x : xs) length = std::max(length, index_t(x.values.size()));
  dense<double> m = dense<double>::Zero(index_t(xs.size()), length);
  for (std::size_t i = 0; i < xs.size(); ++i)
    for (std::size_t j = 0; j < xs[i].values.size(); ++j) m(index_t(i), index_t(j)) = xs[i].values[j];
  return m;
}

// ---------------------------------------------------------------------------------------
// The conditional VAE.

struct cvae_config {
  index_t x_dim = 0;   ///< flat (padded) adapter length
  index_t c_dim = 0;   ///< task-descriptor length
  index_t hidden = 64;
  index_t latent = 8;
  double beta = 1.0;   ///< weight of the KL term
  std::uint64_t seed = 1;
};

namespace detail {
/// a ⊙ b (same shape).
template <class T>
autograd::var<T> hadamard(const autograd::var<T>& a, const autograd::var<T>& b) {
  auto& t = autograd::detail::same_tape(a, b, "hadamard");
  autograd::detail::check_same_shape(a, b, "hadamard");
  dense<T> y = a.value().cwiseProduct(b.value());
  const index_t ia = a.id(), ib = b.id();
  return t.record("hadamard", std::move(y), t.requires_grad(a) || t.requires_grad(b), [ia, ib](autograd::tape<T>& t, index_t self) {
    const auto& g = t.upstream(self);
    if (t.needs_grad(ia)) autograd::detail::accumulate(t, ia, g.cwiseProduct(t.value_at(ib)));
    if (t.needs_grad(ib)) autograd::detail::accumulate(t, ib, g.cwiseProduct(t.value_at(ia)));
  }, false);
}
template <class T>
autograd::var<T> tanh_op(const autograd::var<T>& x) {
  return autograd::detail::elementwise(
      x, "tanh", [](T v) { return std::tanh(v); }, [](T v) { const T h = std::tanh(v); return T(1) - h * h; });
}
}  // namespace detail

/// The terms of one ELBO evaluation (all [1, 1], averaged over the batch rows).
template <class T>
struct elbo_terms {
  autograd::var<T> loss, recon, kl;
};

/// q(z | x, c) = N(μ(x, c), diag e^{lv(x, c)}), p(x | z, c) = N(x̂(z, c), I), prior N(0, I).
/// Encoder h = tanh(W_ex·x + W_ec·c + b_e); decoder g = tanh(W_dz·z + W_dc·c + b_d),
/// x̂ = W_o·g + b_o. loss = (½‖x − x̂‖² + β·½Σ(μ² + e^{lv} − lv − 1)) / n, the negative ELBO
/// up to a constant, with z = μ + e^{lv/2} ⊙ ε (ε given: the reparameterisation).
template <class T>
class cvae {
 public:
  using param = autograd::parameter<T>;

  explicit cvae(const cvae_config& c) : c_(c) {
    if (c.x_dim < 1 || c.c_dim < 1 || c.hidden < 1 || c.latent < 1)
      throw argument_error("deltaw::papers::icm::cvae: x_dim, c_dim, hidden, latent must be ≥ 1; got " +
                           std::to_string(c.x_dim) + ", " + std::to_string(c.c_dim) + ", " + std::to_string(c.hidden) +
                           ", " + std::to_string(c.latent));
    std::mt19937_64 g(c.seed);
    auto init = [&](const char* n, index_t r, index_t k) {
      std::normal_distribution<double> d(0.0, 1.0 / std::sqrt(double(k)));
      dense<T> m(r, k);
      for (index_t i = 0; i < m.size(); ++i) m.data()[i] = T(d(g));
      return param(n, std::move(m));
    };
    auto zero = [](const char* n, index_t k) { return param(n, dense<T>::Zero(1, k)); };
    ex_ = init("enc.x", c.hidden, c.x_dim);
    ec_ = init("enc.c", c.hidden, c.c_dim);
    eb_ = zero("enc.b", c.hidden);
    mw_ = init("mu.w", c.latent, c.hidden);
    mb_ = zero("mu.b", c.latent);
    lw_ = init("logvar.w", c.latent, c.hidden);
    lb_ = zero("logvar.b", c.latent);
    dz_ = init("dec.z", c.hidden, c.latent);
    dc_ = init("dec.c", c.hidden, c.c_dim);
    db_ = zero("dec.b", c.hidden);
    ow_ = init("out.w", c.x_dim, c.hidden);
    ob_ = zero("out.b", c.x_dim);
  }

  const cvae_config& config() const { return c_; }
  std::vector<param*> parameters() { return {&ex_, &ec_, &eb_, &mw_, &mb_, &lw_, &lb_, &dz_, &dc_, &db_, &ow_, &ob_}; }

  /// The negative ELBO of rows X [n, x_dim] with descriptors C [n, c_dim] and noise
  /// eps [n, latent]; X, C, eps must outlive the tape (they are viewed, not copied).
  elbo_terms<T> elbo(autograd::tape<T>& t, const dense<T>& X, const dense<T>& C, const dense<T>& eps) {
    namespace ag = autograd;
    const index_t n = X.rows();
    if (X.cols() != c_.x_dim || C.rows() != n || C.cols() != c_.c_dim || eps.rows() != n || eps.cols() != c_.latent)
      throw shape_error("deltaw::papers::icm::cvae::elbo: X " + deltaw::detail::shape_str(X.rows(), X.cols()) + ", C " +
                        deltaw::detail::shape_str(C.rows(), C.cols()) + ", eps " + deltaw::detail::shape_str(eps.rows(), eps.cols()) +
                        "; expected [n, " + std::to_string(c_.x_dim) + "], [n, " + std::to_string(c_.c_dim) + "], [n, " +
                        std::to_string(c_.latent) + "]");
    if (n < 1) throw shape_error("deltaw::papers::icm::cvae::elbo: an empty batch");
    const auto x = t.frozen(X, "x"), c = t.frozen(C, "c"), e = t.frozen(eps, "eps");
    const auto h = detail::tanh_op(ag::add_bias(ag::add(ag::matmul_nt(x, t.param(ex_)), ag::matmul_nt(c, t.param(ec_))), t.param(eb_)));
    const auto mu = ag::add_bias(ag::matmul_nt(h, t.param(mw_)), t.param(mb_));
    const auto lv = ag::add_bias(ag::matmul_nt(h, t.param(lw_)), t.param(lb_));
    const auto sd = ag::detail::elementwise(lv, "exp_half", [](T v) { return std::exp(v / 2); }, [](T v) { return std::exp(v / 2) / 2; });
    const auto z = ag::add(mu, detail::hadamard(sd, e));
    const auto xh = decode(t, z, c);
    // ½‖x − x̂‖² = ½·(n·x_dim)·mse
    const auto recon = ag::scale(ag::mse(xh, x), 0.5 * double(c_.x_dim));
    const auto kl_lv = ag::sum(ag::detail::elementwise(lv, "kl_logvar", [](T v) { return std::exp(v) - v - T(1); },
                                                       [](T v) { return std::exp(v) - T(1); }));
    const auto kl_mu = ag::sum(ag::detail::elementwise(mu, "square", [](T v) { return v * v; }, [](T v) { return 2 * v; }));
    const auto kl = ag::scale(ag::add(kl_lv, kl_mu), 0.5 / double(n));
    return {ag::add(recon, ag::scale(kl, c_.beta)), recon, kl};
  }

  /// Decodes descriptors C [n, c_dim] with latent Z [n, latent] (zeros: the prior's mean).
  dense<T> generate(const dense<T>& C, const dense<T>* Z = nullptr) {
    if (C.cols() != c_.c_dim)
      throw shape_error("deltaw::papers::icm::cvae::generate: C is " + deltaw::detail::shape_str(C.rows(), C.cols()) +
                        "; expected [n, " + std::to_string(c_.c_dim) + "]");
    const dense<T> z0 = Z ? *Z : dense<T>(dense<T>::Zero(C.rows(), c_.latent));
    if (z0.rows() != C.rows() || z0.cols() != c_.latent)
      throw shape_error("deltaw::papers::icm::cvae::generate: Z is " + deltaw::detail::shape_str(z0.rows(), z0.cols()) +
                        "; expected [" + std::to_string(C.rows()) + ", " + std::to_string(c_.latent) + "]");
    autograd::tape<T> t;
    autograd::no_grad<T> ng(t);
    const auto y = decode(t, t.frozen(z0, "z"), t.frozen(C, "c"));
    return dense<T>(y.value());
  }

  /// Adam on the negative ELBO over all rows at once (the data sets here are tens of
  /// adapters); returns the loss per epoch.
  std::vector<double> train(const dense<T>& X, const dense<T>& C, index_t epochs, double lr, std::uint64_t seed) {
    optim::adamw<T> opt(parameters(), {lr, 0.9, 0.999, 1e-8, 0.0});
    std::mt19937_64 g(seed);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::vector<double> losses;
    dense<T> eps(X.rows(), c_.latent);
    for (index_t ep = 0; ep < epochs; ++ep) {
      for (index_t i = 0; i < eps.size(); ++i) eps.data()[i] = T(nd(g));
      autograd::tape<T> t;
      const auto terms = elbo(t, X, C, eps);
      t.backward(terms.loss);
      opt.step(1.0);
      opt.zero_grad();
      losses.push_back(double(terms.loss.value()(0, 0)));
    }
    return losses;
  }

 private:
  autograd::var<T> decode(autograd::tape<T>& t, const autograd::var<T>& z, const autograd::var<T>& c) {
    namespace ag = autograd;
    const auto g = detail::tanh_op(ag::add_bias(ag::add(ag::matmul_nt(z, t.param(dz_)), ag::matmul_nt(c, t.param(dc_))), t.param(db_)));
    return ag::add_bias(ag::matmul_nt(g, t.param(ow_)), t.param(ob_));
  }

  cvae_config c_;
  param ex_, ec_, eb_, mw_, mb_, lw_, lb_, dz_, dc_, db_, ow_, ob_;
};

}  // namespace icm
}  // namespace papers
DELTAW_NAMESPACE_END
