// SPDX-License-Identifier: MIT
// Differentiable ops on tape variables: arithmetic, matmul, activations, normalisation,
// embedding, causal attention and the losses (MSE, cross-entropy, the softmax KL). Each
// records its value and a closure with its analytic VJP; each is checked against central
// differences (tests/autograd; the softmax KL in tests/papers/test_trans_lora.cpp).
//
// Shapes are 2-D, row-major: activations [tokens, features]; a sequence batch is
// [batch·seq, features] (attention takes batch and seq explicitly); vectors (bias,
// LayerNorm γ/β) are [1, features].
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numbers>
#include <string>
#include <vector>

#include "../core/parallel.hpp"
#include "tape.hpp"

DELTAW_NAMESPACE_BEGIN
namespace autograd {

namespace detail {
template <class T>
tape<T>& same_tape(const var<T>& a, const var<T>& b, const char* op) {
  if (a.owner() == nullptr || a.owner() != b.owner())
    throw autograd_error(std::string("deltaw::autograd::") + op + ": the operands belong to different tapes");
  return *a.owner();
}
template <class T>
tape<T>& tape_of(const var<T>& a, const char* op) {
  if (a.owner() == nullptr) throw autograd_error(std::string("deltaw::autograd::") + op + ": empty variable");
  return *a.owner();
}
template <class T>
void check_same_shape(const var<T>& a, const var<T>& b, const char* op) {
  if (a.rows() != b.rows() || a.cols() != b.cols())
    throw shape_error(std::string("deltaw::autograd::") + op + ": the operands are " + shape_of(a.rows(), a.cols()) +
                      " and " + shape_of(b.rows(), b.cols()) + "; they must have the same shape");
}
template <class T>
void check_row_vector(const var<T>& v, index_t n, const char* op, const char* what) {
  if (v.rows() != 1 || v.cols() != n)
    throw shape_error(std::string("deltaw::autograd::") + op + ": " + what + " is " + shape_of(v.rows(), v.cols()) +
                      "; expected [1, " + std::to_string(n) + "]");
}
/// Adds g into the gradient of node id if it needs one. A stored g (a matrix or a map) is
/// added in row blocks over threads; an expression (which may hold a product, which a row
/// block would evaluate whole) on the calling thread.
template <class T, class G>
void accumulate(tape<T>& t, index_t id, const G& g) {
  if (!t.needs_grad(id)) return;
  auto [buf, fresh] = t.grad_slot(id);
  dense<T>& b = *buf;
  if constexpr ((int(Eigen::internal::traits<G>::Flags) & Eigen::DirectAccessBit) != 0) {
    deltaw::detail::parallel_rows(b.rows(), b.cols(), [&, fresh = fresh](index_t r0, index_t n) {
      if (fresh)
        b.middleRows(r0, n).noalias() = g.middleRows(r0, n);
      else
        b.middleRows(r0, n).noalias() += g.middleRows(r0, n);
    });
  } else if (fresh) {
    b.noalias() = g;
  } else {
    b.noalias() += g;
  }
}
/// The same for a temporary the op no longer needs: it becomes the gradient when there is
/// none yet (no copy), else it is added and goes back to the tape's pool.
template <class T>
void accumulate(tape<T>& t, index_t id, dense<T>&& g) {
  t.add_grad(id, std::move(g));
}
/// A pooled copy of an elementwise expression's value (row blocks over threads; no
/// products in `e`: a row block of a product would evaluate all of it).
template <class T, class E>
dense<T> pooled(tape<T>& t, const E& e) {
  dense<T> y = t.buffer(e.rows(), e.cols());
  deltaw::detail::parallel_rows(y.rows(), y.cols(), [&](index_t r0, index_t n) {
    y.middleRows(r0, n).noalias() = e.middleRows(r0, n);
  });
  return y;
}
}  // namespace detail

/// a + b (same shape).
template <class T>
var<T> add(const var<T>& a, const var<T>& b) {
  auto& t = detail::same_tape(a, b, "add");
  detail::check_same_shape(a, b, "add");
  dense<T> y = detail::pooled(t, a.value() + b.value());
  const index_t ia = a.id(), ib = b.id();
  return t.record("add", std::move(y), t.requires_grad(a) || t.requires_grad(b), [ia, ib](tape<T>& t, index_t self) {
    detail::accumulate(t, ia, t.upstream(self));
    detail::accumulate(t, ib, t.upstream(self));
  }, /*backward_reads_output=*/false);
}
template <class T>
var<T> operator+(const var<T>& a, const var<T>& b) {
  return add(a, b);
}

/// c·a for a constant c.
template <class T>
var<T> scale(const var<T>& a, double c) {
  auto& t = detail::tape_of(a, "scale");
  dense<T> y = detail::pooled(t, T(c) * a.value());
  const index_t ia = a.id();
  return t.record("scale", std::move(y), t.requires_grad(a), [ia, c](tape<T>& t, index_t self) {
    detail::accumulate(t, ia, T(c) * t.upstream(self));
  }, /*backward_reads_output=*/false);
}

/// x + b with b [1, cols] broadcast over the rows (a bias).
template <class T>
var<T> add_bias(const var<T>& x, const var<T>& b) {
  auto& t = detail::same_tape(x, b, "add_bias");
  detail::check_row_vector(b, x.cols(), "add_bias", "the bias");
  dense<T> y = detail::pooled(t, x.value().rowwise() + b.value().row(0));
  const index_t ix = x.id(), ib = b.id();
  return t.record("add_bias", std::move(y), t.requires_grad(x) || t.requires_grad(b), [ix, ib](tape<T>& t, index_t self) {
    const auto& g = t.upstream(self);
    detail::accumulate(t, ix, g);
    detail::accumulate(t, ib, g.colwise().sum());
  }, /*backward_reads_output=*/false);
}

/// a·b, a [m, k], b [k, n].
template <class T>
var<T> matmul(const var<T>& a, const var<T>& b) {
  auto& t = detail::same_tape(a, b, "matmul");
  if (a.cols() != b.rows())
    throw shape_error("deltaw::autograd::matmul: a is " + detail::shape_of(a.rows(), a.cols()) + " and b is " +
                      detail::shape_of(b.rows(), b.cols()) + "; a·b needs a's columns to equal b's rows");
  dense<T> y = t.buffer(a.rows(), b.cols());
  y.noalias() = a.value() * b.value();
  const index_t ia = a.id(), ib = b.id();
  return t.record("matmul", std::move(y), t.requires_grad(a) || t.requires_grad(b), [ia, ib](tape<T>& t, index_t self) {
    const auto& g = t.upstream(self);
    if (t.needs_grad(ia)) detail::accumulate(t, ia, g * t.value_at(ib).transpose());
    if (t.needs_grad(ib)) detail::accumulate(t, ib, t.value_at(ia).transpose() * g);
  }, /*backward_reads_output=*/false);
}

/// a·bᵀ, a [m, k], b [n, k] (PyTorch's linear with b as the weight).
template <class T>
var<T> matmul_nt(const var<T>& a, const var<T>& b) {
  auto& t = detail::same_tape(a, b, "matmul_nt");
  if (a.cols() != b.cols())
    throw shape_error("deltaw::autograd::matmul_nt: a is " + detail::shape_of(a.rows(), a.cols()) + " and b is " +
                      detail::shape_of(b.rows(), b.cols()) + "; a·bᵀ needs both to have the same number of columns");
  dense<T> y = t.buffer(a.rows(), b.rows());
  y.noalias() = a.value() * b.value().transpose();
  const index_t ia = a.id(), ib = b.id();
  return t.record("matmul_nt", std::move(y), t.requires_grad(a) || t.requires_grad(b), [ia, ib](tape<T>& t, index_t self) {
    const auto& g = t.upstream(self);
    if (t.needs_grad(ia)) detail::accumulate(t, ia, g * t.value_at(ib));
    if (t.needs_grad(ib)) detail::accumulate(t, ib, g.transpose() * t.value_at(ia));
  }, /*backward_reads_output=*/false);
}

namespace detail {
/// An elementwise op y = f(x) with derivative f'(x), evaluated from x at backward time.
template <class T, class F, class DF>
var<T> elementwise(const var<T>& x, const char* name, F f, DF df) {
  auto& t = tape_of(x, name);
  dense<T> y = pooled(t, x.value().unaryExpr(f));
  const index_t ix = x.id();
  return t.record(name, std::move(y), t.requires_grad(x), [ix, df](tape<T>& t, index_t self) {
    accumulate(t, ix, t.upstream(self).cwiseProduct(t.value_at(ix).unaryExpr(df)));
  });
}
}  // namespace detail

/// max(x, 0); the derivative at 0 is taken as 0 (PyTorch's choice).
template <class T>
var<T> relu(const var<T>& x) {
  return detail::elementwise(
      x, "relu", [](T v) { return v > T(0) ? v : T(0); }, [](T v) { return v > T(0) ? T(1) : T(0); });
}

/// GELU, the exact form x·Φ(x) (PyTorch's default, approximate = "none").
template <class T>
var<T> gelu(const var<T>& x) {
  return detail::elementwise(
      x, "gelu", [](T v) { return T(0.5) * v * (T(1) + std::erf(v * T(std::numbers::sqrt2 / 2))); },
      [](T v) {
        const T cdf = T(0.5) * (T(1) + std::erf(v * T(std::numbers::sqrt2 / 2)));
        const T pdf = std::exp(T(-0.5) * v * v) * T(0.5 * std::numbers::inv_sqrtpi * std::numbers::sqrt2);
        return cdf + v * pdf;
      });
}

/// SiLU (swish): x·σ(x).
template <class T>
var<T> silu(const var<T>& x) {
  return detail::elementwise(
      x, "silu", [](T v) { return v / (T(1) + std::exp(-v)); },
      [](T v) {
        const T s = T(1) / (T(1) + std::exp(-v));
        return s * (T(1) + v * (T(1) - s));
      });
}

/// LayerNorm over the features of each row: (x − μ)/√(σ² + ε)·γ + β, γ and β [1, cols].
template <class T>
var<T> layer_norm(const var<T>& x, const var<T>& gamma, const var<T>& beta, double eps = 1e-5) {
  auto& t = detail::same_tape(x, gamma, "layer_norm");
  detail::same_tape(x, beta, "layer_norm");
  detail::check_row_vector(gamma, x.cols(), "layer_norm", "γ");
  detail::check_row_vector(beta, x.cols(), "layer_norm", "β");
  const auto X = x.value();
  const index_t n = X.rows(), d = X.cols();
  auto xhat = t.saved(n, d);
  auto rstd = std::make_shared<Eigen::Matrix<T, Eigen::Dynamic, 1>>(n);
  dense<T> y = t.buffer(n, d);
  const auto G = gamma.value().row(0).array(), Bt = beta.value().row(0).array();
  deltaw::detail::parallel_rows(n, d, [&](index_t r0, index_t m) {
    for (index_t i = r0; i < r0 + m; ++i) {
      const T mu = X.row(i).mean();
      const T var = (X.row(i).array() - mu).square().mean();
      (*rstd)(i) = T(1) / std::sqrt(var + T(eps));
      xhat->row(i) = (X.row(i).array() - mu) * (*rstd)(i);
      y.row(i).array() = xhat->row(i).array() * G + Bt;
    }
  });
  const index_t ix = x.id(), ig = gamma.id(), ib = beta.id();
  const bool rg = t.requires_grad(x) || t.requires_grad(gamma) || t.requires_grad(beta);
  return t.record("layer_norm", std::move(y), rg, [ix, ig, ib, xhat, rstd](tape<T>& t, index_t self) {
    const auto& g = t.upstream(self);
    detail::accumulate(t, ig, g.cwiseProduct(*xhat).colwise().sum());
    detail::accumulate(t, ib, g.colwise().sum());
    if (!t.needs_grad(ix)) return;
    const auto G = t.value_at(ig).row(0).array();
    dense<T> dx = t.buffer(g.rows(), g.cols());
    deltaw::detail::parallel_rows(g.rows(), g.cols(), [&](index_t r0, index_t m) {
      Eigen::Array<T, 1, Eigen::Dynamic> dxhat(g.cols());
      for (index_t i = r0; i < r0 + m; ++i) {
        dxhat = g.row(i).array() * G;
        const T m1 = dxhat.mean();
        const T m2 = (dxhat * xhat->row(i).array()).mean();
        dx.row(i).array() = (*rstd)(i) * (dxhat - m1 - xhat->row(i).array() * m2);
      }
    });
    detail::accumulate(t, ix, std::move(dx));
  });
}

/// RMSNorm: x/√(mean(x²) + ε)·γ, γ [1, cols].
template <class T>
var<T> rms_norm(const var<T>& x, const var<T>& gamma, double eps = 1e-6) {
  auto& t = detail::same_tape(x, gamma, "rms_norm");
  detail::check_row_vector(gamma, x.cols(), "rms_norm", "γ");
  const auto X = x.value();
  const index_t n = X.rows(), d = X.cols();
  auto xhat = t.saved(n, d);
  auto rinv = std::make_shared<Eigen::Matrix<T, Eigen::Dynamic, 1>>(n);
  for (index_t i = 0; i < n; ++i) {
    (*rinv)(i) = T(1) / std::sqrt(X.row(i).squaredNorm() / T(std::max<index_t>(d, 1)) + T(eps));
    xhat->row(i) = X.row(i) * (*rinv)(i);
  }
  dense<T> y = t.buffer(n, d);
  y.array() = xhat->array().rowwise() * gamma.value().row(0).array();
  const index_t ix = x.id(), ig = gamma.id();
  return t.record("rms_norm", std::move(y), t.requires_grad(x) || t.requires_grad(gamma),
                  [ix, ig, xhat, rinv](tape<T>& t, index_t self) {
                    const auto& g = t.upstream(self);
                    detail::accumulate(t, ig, g.cwiseProduct(*xhat).colwise().sum());
                    if (!t.needs_grad(ix)) return;
                    dense<T> dxhat = detail::pooled(t, (g.array().rowwise() * t.value_at(ig).row(0).array()).matrix());
                    dense<T> dx = t.buffer(g.rows(), g.cols());
                    for (index_t i = 0; i < g.rows(); ++i) {
                      const T m2 = dxhat.row(i).cwiseProduct(xhat->row(i)).mean();
                      dx.row(i) = (*rinv)(i) * (dxhat.row(i).array() - xhat->row(i).array() * m2);
                    }
                    t.recycle(std::move(dxhat));
                    detail::accumulate(t, ix, std::move(dx));
                  });
}

/// Rows of table [vocab, d] picked by ids: [ids.size(), d]. The gradient scatters back
/// into the rows of the table (when it is a parameter).
template <class T>
var<T> embedding(const var<T>& table, const std::vector<std::int64_t>& ids) {
  auto& t = detail::tape_of(table, "embedding");
  const auto E = table.value();
  dense<T> y = t.buffer(index_t(ids.size()), E.cols());
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= E.rows())
      throw argument_error("deltaw::autograd::embedding: id " + std::to_string(ids[i]) + " at position " +
                           std::to_string(i) + " is outside the table of " + std::to_string(E.rows()) + " rows");
    y.row(index_t(i)) = E.row(index_t(ids[i]));
  }
  const index_t it = table.id();
  return t.record("embedding", std::move(y), t.requires_grad(table), [it, ids](tape<T>& t, index_t self) {
    const auto& g = t.upstream(self);
    auto& gt = t.grad_accumulator(it);
    for (std::size_t i = 0; i < ids.size(); ++i) gt.row(index_t(ids[i])) += g.row(index_t(i));
  }, /*backward_reads_output=*/false);
}

namespace detail {
/// Scaled dot-product attention per (sequence, head): q, k, v [batch·seq, heads·dh], rows
/// b·seq … b·seq + seq − 1 one sequence, columns h·dh … one head. `softmax(P, b)` turns
/// the scaled scores P [seq, seq] of sequence b into probabilities in place (the mask is
/// its business; masked entries must come out exactly zero). The probabilities of every
/// (sequence, head) are saved in one pooled buffer when a gradient is wanted; the backward
/// pass is the softmax VJP, the same for every mask. Shapes are checked by the callers.
template <class T, class Softmax>
var<T> scaled_dot_attention(const var<T>& q, const var<T>& k, const var<T>& v, index_t batch, index_t seq,
                            index_t heads, const char* name, Softmax softmax) {
  auto& t = tape_of(q, name);
  const index_t dh = q.cols() / heads;
  const T sc = T(1) / std::sqrt(T(std::max<index_t>(dh, 1)));
  const auto Q = q.value(), K = k.value(), V = v.value();
  const bool rg = t.requires_grad(q) || t.requires_grad(k) || t.requires_grad(v);
  // Every (sequence, head)'s probabilities, stacked, when the backward pass needs them;
  // one sequence's otherwise. The heads of a sequence run over threads (each head's small
  // products on its own thread) when deltaw's loops are threaded, else in order with the
  // products threaded by the BLAS.
  const bool par = deltaw::detail::elementwise_parallel() && seq * seq * heads >= (index_t(1) << 15);
  auto probs = t.saved((rg ? batch : 1) * heads * seq, seq);
  dense<T> y = t.buffer(q.rows(), q.cols());
  for (index_t b = 0; b < batch; ++b)
    deltaw::detail::parallel_for(heads, par, [&](index_t h) {
      auto P = probs->middleRows(((rg ? b : 0) * heads + h) * seq, seq);
      P.noalias() = sc * (Q.block(b * seq, h * dh, seq, dh) * K.block(b * seq, h * dh, seq, dh).transpose());
      softmax(P, b);
      y.block(b * seq, h * dh, seq, dh).noalias() = P * V.block(b * seq, h * dh, seq, dh);
    });
  const index_t iq = q.id(), ik = k.id(), iv = v.id();
  if (!rg) probs.reset();
  return t.record(name, std::move(y), rg, [iq, ik, iv, probs, batch, seq, heads, dh, sc, par](tape<T>& t, index_t self) {
    const auto& g = t.upstream(self);
    const auto Q = t.value_at(iq), K = t.value_at(ik), V = t.value_at(iv);
    dense<T> dQ = t.buffer(Q.rows(), Q.cols()), dK = t.buffer(Q.rows(), Q.cols()), dV = t.buffer(Q.rows(), Q.cols());
    dense<T> dS = t.buffer(heads * seq, seq);  // one sequence's heads
    for (index_t b = 0; b < batch; ++b)
      deltaw::detail::parallel_for(heads, par, [&](index_t h) {
        const auto P = std::as_const(*probs).middleRows((b * heads + h) * seq, seq);
        const auto G = g.block(b * seq, h * dh, seq, dh);
        auto D = dS.middleRows(h * seq, seq);
        dV.block(b * seq, h * dh, seq, dh).noalias() = P.transpose() * G;
        D.noalias() = G * V.block(b * seq, h * dh, seq, dh).transpose();  // dP
        // softmax VJP row by row: dS = P ⊙ (dP − ⟨dP, P⟩_row), then the 1/√dh scale
        const Eigen::Matrix<T, Eigen::Dynamic, 1> dots = D.cwiseProduct(P).rowwise().sum();
        D = P.cwiseProduct(D.colwise() - dots) * sc;
        dQ.block(b * seq, h * dh, seq, dh).noalias() = D * K.block(b * seq, h * dh, seq, dh);
        dK.block(b * seq, h * dh, seq, dh).noalias() = D.transpose() * Q.block(b * seq, h * dh, seq, dh);
      });
    t.recycle(std::move(dS));
    accumulate(t, iq, std::move(dQ));
    accumulate(t, ik, std::move(dK));
    accumulate(t, iv, std::move(dV));
  });
}
}  // namespace detail

/// Scaled dot-product attention with a causal mask over a batch of sequences:
/// q, k, v [batch·seq, heads·dh], rows b·seq … b·seq + seq − 1 one sequence, columns
/// h·dh … one head. softmax(QKᵀ/√dh + mask)·V per (sequence, head). The probabilities
/// [seq, seq] per (sequence, head) are saved for the backward pass.
template <class T>
var<T> causal_attention(const var<T>& q, const var<T>& k, const var<T>& v, index_t batch, index_t seq, index_t heads) {
  detail::same_tape(q, k, "causal_attention");
  detail::same_tape(q, v, "causal_attention");
  detail::check_same_shape(q, k, "causal_attention");
  detail::check_same_shape(q, v, "causal_attention");
  if (batch * seq != q.rows() || heads < 1 || q.cols() % heads != 0)
    throw shape_error("deltaw::autograd::causal_attention: q is " + detail::shape_of(q.rows(), q.cols()) +
                      "; expected [batch·seq, heads·dh] = [" + std::to_string(batch) + "·" + std::to_string(seq) +
                      ", " + std::to_string(heads) + "·dh]");
  return detail::scaled_dot_attention(q, k, v, batch, seq, heads, "causal_attention", [seq](auto& P, index_t) {
    for (index_t i = 0; i < seq; ++i) {
      const T mx = P.row(i).head(i + 1).maxCoeff();
      P.row(i).head(i + 1) = (P.row(i).head(i + 1).array() - mx).exp();
      P.row(i).head(i + 1) /= P.row(i).head(i + 1).sum();
      P.row(i).tail(seq - i - 1).setZero();  // masked: exactly zero probability
    }
  });
}

/// Σ x: a [1, 1] loss.
template <class T>
var<T> sum(const var<T>& x) {
  auto& t = detail::tape_of(x, "sum");
  dense<T> y(1, 1);
  y(0, 0) = x.value().sum();
  const index_t ix = x.id();
  return t.record("sum", std::move(y), t.requires_grad(x), [ix](tape<T>& t, index_t self) {
    const T g = t.upstream(self)(0, 0);
    const auto X = t.value_at(ix);
    detail::accumulate(t, ix, dense<T>::Constant(X.rows(), X.cols(), g));
  });
}

/// Σ x ⊙ c for a constant c of x's shape: a [1, 1] loss whose gradient is c (tests use it
/// to send a generic upstream gradient into an op).
template <class T>
var<T> weighted_sum(const var<T>& x, const dense<T>& c) {
  auto& t = detail::tape_of(x, "weighted_sum");
  if (c.rows() != x.rows() || c.cols() != x.cols())
    throw shape_error("deltaw::autograd::weighted_sum: x is " + detail::shape_of(x.rows(), x.cols()) +
                      " but the weights are " + detail::shape_of(c.rows(), c.cols()));
  dense<T> y(1, 1);
  y(0, 0) = x.value().cwiseProduct(c).sum();
  const index_t ix = x.id();
  return t.record("weighted_sum", std::move(y), t.requires_grad(x),
                  [ix, c](tape<T>& t, index_t self) { detail::accumulate(t, ix, t.upstream(self)(0, 0) * c); });
}

/// Mean squared error mean((a − b)²) over all entries: a [1, 1] loss.
template <class T>
var<T> mse(const var<T>& pred, const var<T>& target) {
  auto& t = detail::same_tape(pred, target, "mse");
  if (pred.rows() != target.rows() || pred.cols() != target.cols())
    throw shape_error("deltaw::autograd::mse: the prediction is " + detail::shape_of(pred.rows(), pred.cols()) +
                      " but the target is " + detail::shape_of(target.rows(), target.cols()) +
                      "; they must have the same shape");
  const index_t n = pred.rows() * pred.cols();
  dense<T> y(1, 1);
  y(0, 0) = n == 0 ? T(0) : (pred.value() - target.value()).squaredNorm() / T(n);
  const index_t ip = pred.id(), it = target.id();
  return t.record("mse", std::move(y), t.requires_grad(pred) || t.requires_grad(target), [ip, it, n](tape<T>& t, index_t self) {
    if (n == 0) return;
    const T c = T(2) * t.upstream(self)(0, 0) / T(n);
    if (t.needs_grad(ip)) detail::accumulate(t, ip, c * (t.value_at(ip) - t.value_at(it)));
    if (t.needs_grad(it)) detail::accumulate(t, it, -c * (t.value_at(ip) - t.value_at(it)));
  });
}

/// Label that cross_entropy skips (PyTorch's ignore_index default).
inline constexpr std::int64_t ignore_label = -100;

/// τ²·(1/n)·Σᵢ KL(pᵢ ‖ qᵢ) with p = softmax(teacher/τ), q = softmax(student/τ), rows of
/// the logits [n, classes]; teacher logits are constants. ∂/∂student = τ·(q − p)/n.
template <class T>
var<T> softmax_kl(const var<T>& student, const dense<T>& teacher, double temperature = 1.0) {
  constexpr const char* op = "deltaw::autograd::softmax_kl";
  auto& t = detail::tape_of(student, "softmax_kl");
  const auto S = student.value();
  if (S.rows() != teacher.rows() || S.cols() != teacher.cols())
    throw shape_error(std::string(op) + ": the student logits are " + deltaw::detail::shape_str(S.rows(), S.cols()) +
                      " but the teacher logits are " + deltaw::detail::shape_str(teacher.rows(), teacher.cols()) +
                      "; they must have the same shape");
  if (!(temperature > 0) || !std::isfinite(temperature))
    throw argument_error(std::string(op) + ": the temperature must be finite and > 0; got " + std::to_string(temperature));
  const index_t n = S.rows(), V = S.cols();
  auto diff = std::make_shared<dense<T>>(n, V);  // q − p
  double total = 0;
  std::vector<double> lp(static_cast<std::size_t>(V)), lq(static_cast<std::size_t>(V));
  for (index_t i = 0; i < n; ++i) {
    double mt = -std::numeric_limits<double>::infinity(), ms = mt;
    for (index_t v = 0; v < V; ++v) {
      mt = std::max(mt, double(teacher(i, v)) / temperature);
      ms = std::max(ms, double(S(i, v)) / temperature);
    }
    double zt = 0, zs = 0;
    for (index_t v = 0; v < V; ++v) {
      zt += std::exp(double(teacher(i, v)) / temperature - mt);
      zs += std::exp(double(S(i, v)) / temperature - ms);
    }
    for (index_t v = 0; v < V; ++v) {
      lp[std::size_t(v)] = double(teacher(i, v)) / temperature - mt - std::log(zt);
      lq[std::size_t(v)] = double(S(i, v)) / temperature - ms - std::log(zs);
      const double p = std::exp(lp[std::size_t(v)]);
      total += p * (lp[std::size_t(v)] - lq[std::size_t(v)]);
      (*diff)(i, v) = T(std::exp(lq[std::size_t(v)]) - p);
    }
  }
  dense<T> y(1, 1);
  y(0, 0) = n == 0 ? T(0) : T(temperature * temperature * total / double(n));
  const index_t is = student.id();
  return t.record(op, std::move(y), t.requires_grad(student), [is, diff, temperature, n](tape<T>& t, index_t self) {
    if (n == 0) return;
    const T c = T(double(t.upstream(self)(0, 0)) * temperature / double(n));
    detail::accumulate(t, is, c * (*diff));
  });
}

/// Softmax cross-entropy: logits [n, classes], labels [n]; the mean over the rows whose
/// label is not −100 (ignored rows get no gradient). All rows ignored gives 0.
template <class T>
var<T> cross_entropy(const var<T>& logits, const std::vector<std::int64_t>& labels) {
  auto& t = detail::tape_of(logits, "cross_entropy");
  const auto L = logits.value();
  if (index_t(labels.size()) != L.rows())
    throw shape_error("deltaw::autograd::cross_entropy: the logits are " + detail::shape_of(L.rows(), L.cols()) +
                      " but there are " + std::to_string(labels.size()) + " labels; expected one per row");
  auto probs = std::make_shared<dense<T>>(L.rows(), L.cols());
  double total = 0;
  index_t count = 0;
  for (index_t i = 0; i < L.rows(); ++i) {
    const auto lab = labels[std::size_t(i)];
    if (lab == ignore_label) continue;
    if (lab < 0 || lab >= L.cols())
      throw argument_error("deltaw::autograd::cross_entropy: label " + std::to_string(lab) + " at row " +
                           std::to_string(i) + " is outside [0, " + std::to_string(L.cols()) +
                           ") and is not the ignore label −100");
    const T mx = L.row(i).maxCoeff();
    probs->row(i) = (L.row(i).array() - mx).exp();
    const T z = probs->row(i).sum();
    probs->row(i) /= z;
    total += double(mx + std::log(z) - L(i, index_t(lab)));
    ++count;
  }
  dense<T> y(1, 1);
  y(0, 0) = count == 0 ? T(0) : T(total / double(count));
  const index_t il = logits.id();
  return t.record("cross_entropy", std::move(y), t.requires_grad(logits), [il, probs, labels, count](tape<T>& t, index_t self) {
    if (count == 0) return;
    const T c = t.upstream(self)(0, 0) / T(count);
    dense<T> g = dense<T>::Zero(probs->rows(), probs->cols());
    for (index_t i = 0; i < g.rows(); ++i) {
      const auto lab = labels[std::size_t(i)];
      if (lab == ignore_label) continue;
      g.row(i) = c * probs->row(i);
      g(i, index_t(lab)) -= c;
    }
    detail::accumulate(t, il, g);
  });
}

/// Argmax accuracy of logits [n, classes] against labels [n], over the rows whose label
/// is not −100: the fraction whose largest logit (the first, on ties) is at the label; 0
/// when every row is ignored. A metric, not recorded on the tape.
template <class T>
double accuracy(const var<T>& logits, const std::vector<std::int64_t>& labels) {
  const auto L = logits.value();
  if (index_t(labels.size()) != L.rows())
    throw shape_error("deltaw::autograd::accuracy: the logits are " + detail::shape_of(L.rows(), L.cols()) +
                      " but there are " + std::to_string(labels.size()) + " labels; expected one per row");
  index_t correct = 0, counted = 0;
  for (index_t i = 0; i < L.rows(); ++i) {
    const auto lab = labels[std::size_t(i)];
    if (lab == ignore_label) continue;
    if (lab < 0 || lab >= L.cols())
      throw argument_error("deltaw::autograd::accuracy: label " + std::to_string(lab) + " at row " + std::to_string(i) +
                           " is outside [0, " + std::to_string(L.cols()) + ") and is not the ignore label −100");
    Eigen::Index arg = 0;
    L.row(i).maxCoeff(&arg);
    correct += index_t(arg) == index_t(lab);
    ++counted;
  }
  return counted == 0 ? 0.0 : double(correct) / double(counted);
}

}  // namespace autograd
DELTAW_NAMESPACE_END
