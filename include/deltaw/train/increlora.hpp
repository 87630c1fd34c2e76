// SPDX-License-Identifier: MIT
// IncreLoRA (Zhang et al. 2023, arXiv:2308.12043): adapters whose rank grows during
// training where it matters most.
//
//   ΔW = s·B·diag(e)·A,  s = α / (current rank),  B [out, r], e [1, r], A [r, in]
//
// Each module's importance I = Σ|ΔW ⊙ ∂L/∂ΔW| / √(out·in) is smoothed into
// Ī ← β₁Ī + (1−β₁)I and Ū ← β₂Ū + (1−β₂)|I − Ī| (β₁ = β₂ = 0.85, Ū from the updated Ī,
// as AdaLoRA does); every `interval` steps the modules with the largest Ī·Ū get new
// rank-1 components until the total rank reaches the budget.
//
//   train::increlora_adapter<T>   a frozen W with a growable B·diag(e)·A adapter; its
//                                 own tape op (forward, VJP, and the score: inside the
//                                 backward from the tape's X and dY when the module is
//                                 applied once per step, else from copies of each call's)
//   train::increlora_score        the score from the factors and one or several (X, dY)
//                                 batches, without forming ΔW or ∂L/∂ΔW and without
//                                 stacking the batches (blocks of `chunk` rows and tokens)
//   train::increlora<T>           the scores, EMAs and growth as a training method
//
// Growth leaves the layer's output unchanged: a new component starts with e = 0 (A and B
// random, so that ∂L/∂e is not zero and it starts learning at once), and since s = α/r
// shrinks when r grows, the existing e are multiplied by r_new/r_old (s·e unchanged, up
// to one rounding). The grown parameters change shape; a callback tells the optimiser:
// increlora<T>(o, adamw) / resizer(adamw) keeps the old components' moments and step
// count (their next step is the one they would take without growth; the new components'
// moments start at zero and bias-correct with that count, see optim::adamw::resize_state),
// resetter(adamw) restarts the whole state. This holds for A and B (bit for bit when
// r_new/r_old is a power of two, else up to the rounding of s·e); the old e entries are
// rescaled by r_new/r_old, so their gradients shrink by r_old/r_new and their
// kept moments mix the two scales: e's next steps differ from a run without growth.
//
// Reserve components: each adapter keeps `reserve` components drawn in advance from its
// own seeded generator outside the optimiser; growth moves the first ones into the
// parameters (and draws replacements), so the components a module receives do not
// depend on the order in which modules grow.
//
// UNVERIFIED, as options (increlora_options): interval (10 steps), the step of the first
// growth (= interval), modules grown per event (1), components per module and event (1),
// the initial rank (1 per module, increlora_adapter), the init bounds of the new
// components (U(±1/√in) for A, U(±1/√out) for B), whether a module's EMAs restart when
// it grows (no), the reserve size (1), and the paper's extra orthogonality regulariser
// on A and B (not included: add one, e.g. train/o3.hpp's penalty, if wanted).
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../autograd/adapters.hpp"
#include "method.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

namespace detail {
// Σ_{o,j} |ΔW_oj · G_oj| with ΔW = s·B·diag(e)·A and G = Σ_k dY_kᵀ·X_k over `batches`
// pairs (x_at(k), dy_at(k)), in double. Output rows go in blocks of `chunk`, and within a
// block the tokens of each batch go in blocks of `chunk` too, so only [chunk, in] blocks of
// ΔW and G and [chunk, in] / [chunk, chunk] slices of a batch (cast to double when T is
// float) exist: no copy of X, dY or their concatenation, and no [tokens, in] packing
// buffer inside the products either.
template <class MB, class ME, class MA, class XAt, class DYAt>
double increlora_score_sum(const MB& B, const ME& e, const MA& A, double s, std::size_t batches, const XAt& x_at,
                           const DYAt& dy_at, index_t chunk, const std::string& op) {
  const index_t out = B.rows(), in = A.cols(), r = A.rows();
  auto shapes = [&](std::size_t k) {
    std::string m = "B " + deltaw::detail::shape_str(B.rows(), B.cols()) + ", e " + std::to_string(e.size()) +
                    " entries, A " + deltaw::detail::shape_str(A.rows(), A.cols());
    if (k < batches) {
      m += ", " + (batches > 1 ? "batch " + std::to_string(k) + ": " : std::string()) + "X " +
           deltaw::detail::shape_str(x_at(k).rows(), x_at(k).cols()) + ", dY " +
           deltaw::detail::shape_str(dy_at(k).rows(), dy_at(k).cols());
    }
    return m + " do not chain";
  };
  if (B.cols() != r || e.size() != r) throw shape_error(op + ": " + shapes(batches));
  for (std::size_t k = 0; k < batches; ++k)
    if (x_at(k).cols() != in || dy_at(k).cols() != out || x_at(k).rows() != dy_at(k).rows())
      throw shape_error(op + ": " + shapes(k));
  if (chunk < 1) throw argument_error(op + ": chunk must be ≥ 1");
  if (out == 0 || in == 0) return 0;
  using Md = dense<double>;
  const Md Ad = A.template cast<double>();  // factor-sized copies
  Md Be = B.template cast<double>();
  for (index_t k = 0; k < r; ++k) Be.col(k) *= s * double(e(k));
  double total = 0;
  Md dW, G, Xb, Db;
  for (index_t o0 = 0; o0 < out; o0 += chunk) {
    const index_t c = std::min(chunk, out - o0);
    dW.noalias() = Be.middleRows(o0, c) * Ad;
    G.setZero(c, in);
    for (std::size_t k = 0; k < batches; ++k) {
      const auto& X = x_at(k);
      const auto& dY = dy_at(k);
      using SX = typename std::decay_t<decltype(X)>::Scalar;
      using SY = typename std::decay_t<decltype(dY)>::Scalar;
      const index_t tokens = X.rows();
      for (index_t t0 = 0; t0 < tokens; t0 += chunk) {
        const index_t tb = std::min(chunk, tokens - t0);
        if constexpr (std::is_same_v<SX, double> && std::is_same_v<SY, double>) {
          G.noalias() += dY.block(t0, o0, tb, c).transpose() * X.middleRows(t0, tb);
        } else {
          Xb = X.middleRows(t0, tb).template cast<double>();
          Db = dY.block(t0, o0, tb, c).template cast<double>();
          G.noalias() += Db.transpose() * Xb;
        }
      }
    }
    total += dW.cwiseProduct(G).cwiseAbs().sum();
  }
  return total / std::sqrt(double(out) * double(in));
}
}  // namespace detail

/// I = Σ_{o,j} |ΔW_oj · G_oj| / √(out·in) with ΔW = s·B·diag(e)·A and G = dYᵀ·X the
/// gradient of the loss with respect to ΔW (y = x·(W + ΔW)ᵀ; X [tokens, in], dY
/// [tokens, out]). The absolute value does not factor, so this costs
/// O(out·in·(r + tokens)) time, like a dense weight gradient, but only `chunk` rows of
/// ΔW and of G exist at a time, and X and dY are read in blocks of `chunk` tokens (memory
/// O(chunk·in); nothing of size tokens × in or out × in is allocated).
template <class MB, class ME, class MA, class MX, class MG>
double increlora_score(const MB& B, const ME& e, const MA& A, double s, const MX& X, const MG& dY, index_t chunk = 64) {
  return detail::increlora_score_sum(
      B, e, A, s, 1, [&](std::size_t) -> const MX& { return X; }, [&](std::size_t) -> const MG& { return dY; }, chunk,
      "deltaw::train::increlora_score");
}

/// The same score for G = Σ_k dY_kᵀ·X_k over several batches (a module applied several
/// times per step), read batch by batch: the batches are neither copied nor stacked.
template <class MB, class ME, class MA, class MX, class MG>
double increlora_score(const MB& B, const ME& e, const MA& A, double s, const std::vector<MX>& X,
                       const std::vector<MG>& dY, index_t chunk = 64) {
  if (X.size() != dY.size())
    throw shape_error("deltaw::train::increlora_score: " + std::to_string(X.size()) + " X batches but " +
                      std::to_string(dY.size()) + " dY batches");
  return detail::increlora_score_sum(
      B, e, A, s, X.size(), [&](std::size_t k) -> const MX& { return X[k]; },
      [&](std::size_t k) -> const MG& { return dY[k]; }, chunk, "deltaw::train::increlora_score");
}

/// How an increlora_adapter keeps what its score needs while capturing.
enum class capture_policy {
  /// Applied once before its first backward in a capture window (one forward and one
  /// backward per step, as train::fit runs): the score is computed inside the backward
  /// from the tape's own X and dY, nothing is copied. Applied k > 1 times on one tape
  /// (a shared module): each call's X and dY are copied, as keep_batches. Applied again
  /// after a backward already took the score (gradient accumulation over several tapes):
  /// the forward throws argument_error, since the first batch was not kept.
  automatic,
  /// Every backward copies its X [tokens, in] and dY [tokens, out] (exact for any number
  /// of forward/backward passes per capture window).
  keep_batches,
};

/// A frozen W [out, in] with a growable adapter s·B·diag(e)·A.
template <class T>
class increlora_adapter {
 public:
  /// initial_rank ≥ 1 components (A, B random, e = 0: ΔW = 0 at the start), s = α/r.
  increlora_adapter(std::string name, matrix_view<const T> W, index_t initial_rank, double alpha, std::uint64_t seed,
                    index_t reserve = 1)
      : name_(std::move(name)), W_(W), alpha_(alpha), gen_(seed), reserve_count_(reserve) {
    const std::string op = "deltaw::train::increlora_adapter(" + name_ + ")";
    if (initial_rank < 1) throw rank_error(op + ": the initial rank must be at least 1; got " + std::to_string(initial_rank));
    if (!std::isfinite(alpha)) throw non_finite_error(op + ": alpha must be finite");
    if (reserve < 0) throw argument_error(op + ": reserve must be ≥ 0");
    B_ = std::make_unique<autograd::parameter<T>>(name_ + ".B", dense<T>(W.rows(), 0));
    e_ = std::make_unique<autograd::parameter<T>>(name_ + ".e", dense<T>(1, 0));
    A_ = std::make_unique<autograd::parameter<T>>(name_ + ".A", dense<T>(0, W.cols()));
    rA_.resize(0, W.cols());
    rB_.resize(W.rows(), 0);
    refill();
    append(initial_rank);
    s_ = alpha_ / double(rank());
  }
  increlora_adapter(const increlora_adapter&) = delete;  // optimisers and tapes hold pointers into it
  increlora_adapter& operator=(const increlora_adapter&) = delete;

  index_t rank() const { return e_->cols(); }
  double scale() const { return s_; }
  double alpha() const { return alpha_; }
  const std::string& name() const { return name_; }
  matrix_view<const T> weight() const { return W_; }
  autograd::parameter<T>& B() { return *B_; }
  autograd::parameter<T>& e() { return *e_; }
  autograd::parameter<T>& A() { return *A_; }
  std::vector<autograd::parameter<T>*> parameters() { return {B_.get(), e_.get(), A_.get()}; }
  /// The reserve components (rows of A, columns of B) the next growth will use.
  const dense<T>& reserve_A() const { return rA_; }
  const dense<T>& reserve_B() const { return rB_; }

  /// y = x·Wᵀ + s·((x·Aᵀ) ⊙ e)·Bᵀ on x's tape; never forms ΔW.
  autograd::var<T> forward(const autograd::var<T>& x) {
    using namespace autograd;
    auto& t = autograd::detail::tape_of(x, "increlora_adapter");
    autograd::detail::check_linear(x, W_, "increlora_adapter");
    const var<T> vb = t.param(*B_), ve = t.param(*e_), va = t.param(*A_);
    const auto X = x.value();
    dense<T> y(X.rows(), W_.rows());
    deltaw::apply(W_, X, y);
    const T s = T(s_);
    dense<T> H = X * A_->value().transpose();                           // [tokens, r]
    dense<T> He = H * e_->value().row(0).asDiagonal();
    y.noalias() += s * (He * B_->value().transpose());
    const index_t ix = x.id(), ib = vb.id(), ie = ve.id(), ia = va.id();
    const bool rg = t.requires_grad(x) || t.requires_grad(vb) || t.requires_grad(ve) || t.requires_grad(va);
    if (capturing_ && rg && t.grad_enabled()) count_use();
    increlora_adapter* self_ad = this;
    const matrix_view<const T> W = W_;
    return t.record("increlora_adapter", std::move(y), rg,
                    [ix, ib, ie, ia, s, W, self_ad, H = std::move(H), He = std::move(He)](tape<T>& t, index_t self) {
                      const auto& dY = t.upstream(self);
                      const auto Xv = t.value_at(ix);
                      const auto Bv = t.value_at(ib);
                      const auto ev = t.value_at(ie);
                      const auto Av = t.value_at(ia);
                      if (self_ad->capturing_) self_ad->capture(Bv, ev, Av, s, Xv, dY);
                      autograd::detail::base_input_grad(t, ix, W, dY);
                      const dense<T> D = dY * Bv;  // [tokens, r]
                      if (t.needs_grad(ib)) autograd::detail::accumulate(t, ib, s * (dY.transpose() * He));
                      if (t.needs_grad(ie)) autograd::detail::accumulate(t, ie, s * D.cwiseProduct(H).colwise().sum());
                      if (t.needs_grad(ia) || t.needs_grad(ix)) {
                        const dense<T> De = D * ev.row(0).asDiagonal();
                        if (t.needs_grad(ia)) autograd::detail::accumulate(t, ia, s * (De.transpose() * Xv));
                        if (t.needs_grad(ix)) autograd::detail::accumulate(t, ix, s * (De * Av));
                      }
                    },
                    /*backward_reads_output=*/false);
  }

  /// Adds n components with e = 0 from the reserve; multiplies the existing e by
  /// r_new/r_old and sets s = α/r_new, so the output is unchanged.
  void grow(index_t n) {
    if (n < 0) throw argument_error("deltaw::train::increlora_adapter(" + name_ + ")::grow: n must be ≥ 0");
    if (n == 0) return;
    const index_t r0 = rank();
    append(n);
    const index_t r1 = rank();
    e_->value().leftCols(r0) *= T(double(r1) / double(r0));
    s_ = alpha_ / double(r1);
  }

  /// While capturing, each backward through this adapter contributes its X and dY to the
  /// score (the gradient ∂L/∂ΔW = Σ dYᵢᵀ·Xᵢ sums over the calls of the capture window,
  /// which clear_capture() or take_score() ends). With capture_policy::automatic (the
  /// default) a single application is scored inside its backward without copying X or dY.
  void set_capturing(bool c) { capturing_ = c; }
  bool capturing() const { return capturing_; }
  void set_capture_policy(capture_policy p) { policy_ = p; }
  capture_policy policy() const { return policy_; }
  /// Row and token block of the score (memory O(chunk·in)); the method sets its own.
  void set_score_chunk(index_t chunk) {
    if (chunk < 1) throw argument_error("deltaw::train::increlora_adapter(" + name_ + ")::set_score_chunk: chunk must be ≥ 1");
    chunk_ = chunk;
  }
  bool has_capture() const { return scored_ || !cap_X_.empty(); }
  /// Batches whose X and dY were copied in this window (0 when the score was taken inside
  /// the backward).
  index_t captured_batches() const { return index_t(cap_X_.size()); }
  /// The score over this capture window (increlora_score of the summed gradient), then
  /// forgets it. `chunk` applies to copied batches; a score taken inside the backward used
  /// set_score_chunk's.
  double take_score(index_t chunk = 64) {
    if (!has_capture()) throw argument_error("deltaw::train::increlora_adapter(" + name_ + ")::take_score: nothing captured");
    const double v = scored_ ? score_
                             : increlora_score(B_->value(), e_->value().row(0), A_->value(), s_, cap_X_, cap_dY_, chunk);
    clear_capture();
    return v;
  }
  void clear_capture() {
    cap_X_.clear();
    cap_dY_.clear();
    uses_ = backwards_ = 0;
    scored_ = false;
    score_ = 0;
  }

 private:
  // Draws reserve components until there are reserve_count_ (or `need`) of them.
  void refill(index_t need = 0) {
    const index_t want = std::max(reserve_count_, need);
    const index_t have = rA_.rows();
    if (have >= want) return;
    const index_t out = W_.rows(), in = W_.cols();
    std::uniform_real_distribution<double> ua(-1 / std::sqrt(double(in)), 1 / std::sqrt(double(in)));
    std::uniform_real_distribution<double> ub(-1 / std::sqrt(double(out)), 1 / std::sqrt(double(out)));
    dense<T> nA(want, in), nB(out, want);
    nA.topRows(have) = rA_;
    nB.leftCols(have) = rB_;
    for (index_t k = have; k < want; ++k) {
      for (index_t j = 0; j < in; ++j) nA(k, j) = T(ua(gen_));
      for (index_t o = 0; o < out; ++o) nB(o, k) = T(ub(gen_));
    }
    rA_ = std::move(nA);
    rB_ = std::move(nB);
  }
  // Moves n reserve components into the parameters with e = 0; resizes the gradients.
  void append(index_t n) {
    refill(n);
    const index_t r0 = rank(), out = W_.rows(), in = W_.cols();
    dense<T> B(out, r0 + n), A(r0 + n, in), e(1, r0 + n);
    B.leftCols(r0) = B_->value();
    B.rightCols(n) = rB_.leftCols(n);
    A.topRows(r0) = A_->value();
    A.bottomRows(n) = rA_.topRows(n);
    e.leftCols(r0) = e_->value();
    e.rightCols(n).setZero();
    B_->value() = std::move(B);
    A_->value() = std::move(A);
    e_->value() = std::move(e);
    for (auto* p : parameters()) p->zero_grad();
    const index_t left = rA_.rows() - n;
    rA_ = dense<T>(rA_.bottomRows(left));
    rB_ = dense<T>(rB_.rightCols(left));
    refill();
  }

  std::string name_;
  matrix_view<const T> W_;
  double alpha_;
  double s_ = 1;
  std::mt19937_64 gen_;
  index_t reserve_count_;
  std::unique_ptr<autograd::parameter<T>> B_, e_, A_;
  dense<T> rA_, rB_;
  // A forward recorded for a backward while capturing.
  void count_use() {
    if (scored_ && policy_ == capture_policy::automatic)
      throw argument_error("deltaw::train::increlora_adapter(" + name_ +
                           "): applied again after a backward pass scored it in the same capture window (gradient "
                           "accumulation over several tapes?); the earlier batch was not kept, so the summed gradient's "
                           "score cannot be formed: set_capture_policy(capture_policy::keep_batches)");
    ++uses_;
  }
  // From the backward: score at once when this is the window's only application, else copy.
  template <class MB, class ME, class MA, class MX>
  void capture(const MB& B, const ME& e, const MA& A, T s, const MX& X, const dense<T>& dY) {
    ++backwards_;
    if (policy_ == capture_policy::automatic && uses_ <= 1 && backwards_ == 1 && cap_X_.empty()) {
      score_ = increlora_score(B, e.row(0), A, double(s), X, dY, chunk_);
      scored_ = true;
      return;
    }
    if (scored_)  // a second backward over the one application (retain_graph)
      throw argument_error("deltaw::train::increlora_adapter(" + name_ +
                           "): a second backward pass in one capture window after the first was scored without "
                           "keeping its batch; set_capture_policy(capture_policy::keep_batches) for that");
    cap_X_.emplace_back(X);
    cap_dY_.emplace_back(dY);
  }

  bool capturing_ = false;
  capture_policy policy_ = capture_policy::automatic;
  index_t chunk_ = 64;
  index_t uses_ = 0, backwards_ = 0;
  bool scored_ = false;
  double score_ = 0;
  std::vector<dense<T>> cap_X_, cap_dY_;
};

struct increlora_options {
  /// The total rank over all modules never exceeds this (required, ≥ the initial total).
  index_t budget = 0;
  double beta1 = 0.85;  ///< EMA of the importance
  double beta2 = 0.85;  ///< EMA of its uncertainty
  index_t interval = 10;          ///< steps between growth events
  index_t first_growth = -1;      ///< steps before the first event; −1: = interval
  index_t modules_per_event = 1;  ///< top modules grown at each event
  index_t components = 1;         ///< rank added to each of them
  bool reset_score_on_growth = false;
  index_t chunk = 64;             ///< row and token block of increlora_score
  /// Score (and update the EMAs) every this many steps: the score costs as much as a
  /// dense weight gradient per module, so large models may want to thin it out.
  index_t score_every = 1;
};

/// Importance scores and growth over registered adapters.
template <class T>
class increlora : public method<T> {
 public:
  using reset_fn = std::function<void(autograd::parameter<T>*)>;

  /// `reset` is called for every parameter whose shape changed (B, e, A of a grown
  /// module): pass resizer(optimiser) to keep the old components' moments (or
  /// resetter(optimiser) to restart them), or use the constructor taking the optimiser.
  increlora(increlora_options o, reset_fn reset) : o_(o), reset_(std::move(reset)) {
    constexpr const char* op = "deltaw::train::increlora";
    if (o.budget < 1) throw argument_error(std::string(op) + ": the rank budget must be ≥ 1; got " + std::to_string(o.budget));
    if (!(o.beta1 >= 0 && o.beta1 < 1) || !(o.beta2 >= 0 && o.beta2 < 1))
      throw argument_error(std::string(op) + ": betas must lie in [0, 1)");
    if (o.interval < 1 || o.modules_per_event < 1 || o.components < 1 || o.chunk < 1 || o.score_every < 1)
      throw argument_error(std::string(op) +
                           ": interval, modules_per_event, components, chunk and score_every must be ≥ 1");
  }
  /// Growth keeps the optimiser state of the existing components: resizer(opt).
  template <class Optimiser>
    requires requires(Optimiser& op, autograd::parameter<T>* p) { op.resize_state(p); }
  increlora(increlora_options o, Optimiser& opt) : increlora(o, resizer(opt)) {}
  /// Keeps the moments (and the step count) of the old components bit for bit, zero for
  /// the new ones: the optimiser's resize_state (optim::adamw, optim::sgd).
  template <class Optimiser>
  static reset_fn resizer(Optimiser& opt) {
    return [&opt](autograd::parameter<T>* p) { opt.resize_state(p); };
  }
  /// Restarts the grown parameters' whole state (old components too): reset_state.
  template <class Optimiser>
  static reset_fn resetter(Optimiser& opt) {
    return [&opt](autograd::parameter<T>* p) { opt.reset_state(p); };
  }
  std::string name() const override { return "IncreLoRA"; }

  index_t add(increlora_adapter<T>* a) {
    if (a == nullptr) throw argument_error("deltaw::train::increlora::add: null adapter");
    if (total_rank() + a->rank() > o_.budget)
      throw rank_error("deltaw::train::increlora::add: the initial ranks (" + std::to_string(total_rank() + a->rank()) +
                       ") exceed the budget " + std::to_string(o_.budget));
    a->set_score_chunk(o_.chunk);
    mods_.push_back({a, 0, 0, 0});
    return index_t(mods_.size()) - 1;
  }
  index_t total_rank() const {
    index_t r = 0;
    for (const auto& m : mods_) r += m.a->rank();
    return r;
  }
  index_t module_count() const { return index_t(mods_.size()); }
  /// The last raw score I, its EMAs Ī and Ū, and the growth score Ī·Ū of module i.
  double importance(index_t i) const { return at(i).I; }
  double importance_ema(index_t i) const { return at(i).Ibar; }
  double uncertainty_ema(index_t i) const { return at(i).Ubar; }
  double score(index_t i) const { return at(i).Ibar * at(i).Ubar; }
  index_t growth_events() const { return events_; }

  void before_forward(const step_context& ctx) override {
    const bool score = ctx.step % o_.score_every == 0;
    for (auto& m : mods_) {
      m.a->clear_capture();
      m.a->set_capturing(score);
    }
  }
  void after_backward(const step_context&) override {
    for (auto& m : mods_) {
      m.a->set_capturing(false);
      if (!m.a->has_capture()) continue;  // not used this step: its EMAs stay
      m.I = m.a->take_score(o_.chunk);
      m.Ibar = o_.beta1 * m.Ibar + (1 - o_.beta1) * m.I;
      m.Ubar = o_.beta2 * m.Ubar + (1 - o_.beta2) * std::abs(m.I - m.Ibar);
    }
  }
  void after_step(const step_context& ctx) override {
    const index_t done = ctx.step + 1;
    const index_t first = o_.first_growth >= 0 ? o_.first_growth : o_.interval;
    if (done < first || (done - first) % o_.interval != 0) return;
    grow_now();
  }

  /// One growth event now: the top modules by Ī·Ū (ties: lower index) get `components`
  /// ranks each while the budget allows. Returns the rank added.
  index_t grow_now() {
    index_t left = o_.budget - total_rank();
    if (left <= 0 || mods_.empty()) return 0;
    std::vector<index_t> order(mods_.size());
    std::iota(order.begin(), order.end(), index_t(0));
    std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return score(a) > score(b); });
    index_t added = 0;
    for (index_t k = 0; k < std::min<index_t>(o_.modules_per_event, module_count()) && left > 0; ++k) {
      auto& m = mods_[std::size_t(order[std::size_t(k)])];
      const index_t n = std::min(o_.components, left);
      m.a->grow(n);
      for (auto* p : m.a->parameters())
        if (reset_) reset_(p);
      if (o_.reset_score_on_growth) m.I = m.Ibar = m.Ubar = 0;
      left -= n;
      added += n;
    }
    if (added > 0) ++events_;
    return added;
  }

 private:
  struct module {
    increlora_adapter<T>* a;
    double I, Ibar, Ubar;
  };
  const module& at(index_t i) const {
    if (i < 0 || i >= module_count())
      throw argument_error("deltaw::train::increlora: module " + std::to_string(i) + " of " +
                           std::to_string(module_count()));
    return mods_[std::size_t(i)];
  }

  increlora_options o_;
  reset_fn reset_;
  std::vector<module> mods_;
  index_t events_ = 0;
};

}  // namespace train
DELTAW_NAMESPACE_END
