// SPDX-License-Identifier: MIT
// Reverse mode over 2-D tensors: a tape of nodes, recorded in the order they are computed
// and replayed backwards from a scalar loss.
//
//   parameter<T>   a trainable tensor that outlives tapes: value and accumulated gradient.
//   tape<T>        one forward pass: nodes (values, saved state, backward closures).
//   var<T>         a handle to a node of a tape.
//   buffer_pool<T> storage recycled between nodes and passes (values, gradients, saved
//                  state): a training loop or a layer-by-layer forward reuses the
//                  buffers of the previous pass instead of faulting in fresh pages.
//                  Tapes share one pool per thread unless given their own.
//
// Leaves are of three kinds: parameters (gradient accumulated into parameter::grad),
// frozen views (caller memory, never copied, no gradient) and inputs that want a gradient
// (caller memory, gradient kept on the tape). Nodes are appended in topological order,
// so backward is one reverse sweep. T is float (training) or double (gradient checks).
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "../core/eigen.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"

DELTAW_NAMESPACE_BEGIN
namespace autograd {

/// Misuse of the tape: backward twice without retaining, a gradient that does not exist,
/// a variable from another tape.
class autograd_error : public error {
 public:
  using error::error;
};

template <class T>
using mat = dense<T>;
template <class T>
using cmap = Eigen::Map<const dense<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

namespace detail {
inline std::string shape_of(index_t r, index_t c) { return deltaw::detail::shape_str(r, c); }

/// A row-major Eigen map over a view of T (the tape's own layout); other layouts copy.
template <class T>
cmap<T> map_view(const matrix_view<const T>& v, dense<T>& scratch) {
  if (v.is_row_major())
    return cmap<T>(v.data(), v.rows(), v.cols(), Eigen::OuterStride<>(v.rows() <= 1 ? std::max<index_t>(v.cols(), 1) : v.row_stride()));
  scratch.resize(v.rows(), v.cols());
  for (index_t i = 0; i < v.rows(); ++i)
    for (index_t j = 0; j < v.cols(); ++j) scratch(i, j) = v(i, j);
  return cmap<T>(scratch.data(), v.rows(), v.cols(), Eigen::OuterStride<>(std::max<index_t>(v.cols(), 1)));
}
}  // namespace detail

/// A trainable tensor: its value and the gradient accumulated over backward passes
/// (zero it with zero_grad(); optimisers read it). Vectors are stored as [1, n].
template <class T>
class parameter {
 public:
  parameter() = default;
  parameter(std::string name, dense<T> value) : name_(std::move(name)), value_(std::move(value)) {
    grad_.setZero(value_.rows(), value_.cols());
  }

  const std::string& name() const { return name_; }
  dense<T>& value() { return value_; }
  const dense<T>& value() const { return value_; }
  dense<T>& grad() { return grad_; }
  const dense<T>& grad() const { return grad_; }
  index_t rows() const { return value_.rows(); }
  index_t cols() const { return value_.cols(); }
  index_t size() const { return value_.size(); }
  matrix_view<const T> view() const { return deltaw::view(value_); }

  /// A frozen parameter still takes part in the forward pass but collects no gradient.
  bool trainable() const { return trainable_; }
  void set_trainable(bool t) { trainable_ = t; }
  void zero_grad() { grad_.setZero(value_.rows(), value_.cols()); }

 private:
  std::string name_;
  dense<T> value_;
  dense<T> grad_;
  bool trainable_ = true;
};

/// Storage recycled between the values, gradients and saved state of tapes. A buffer given
/// back is kept, keyed by its element count, and handed out again for the next request of
/// exactly that count (Eigen's resize keeps the allocation when the count is unchanged), so
/// a training loop that resets its tape, or a forward pass that runs layer by layer on
/// scratch tapes sharing one pool, allocates its buffers once. Without it, glibc returns
/// every large buffer to the kernel on free and each pass faults its pages in again (a
/// third of a MiniLM forward pass on one core was page faults).
///
/// Bounded: idle plus lent bytes never exceed the high-water mark of lent bytes (bytes
/// handed out and not yet returned), so the pool does not raise a process's peak above the
/// largest working set it has served: a request that misses (a new shape) first frees the
/// longest-idle buffers until the new one fits under the mark, as does a buffer given back
/// that was not taken from the pool; set_max_idle_bytes() caps the idle bytes further.
/// Buffers under min_elements are not pooled (malloc serves them well). Thread-safe: tapes
/// on several threads may share one pool.
template <class T>
class buffer_pool {
 public:
  static constexpr index_t min_elements = 4096;

  struct stats_t {
    std::size_t hits = 0, misses = 0;  // requests served from the pool / by a fresh allocation
    std::size_t idle_bytes = 0, idle_buffers = 0;
    std::size_t lent_bytes = 0, lent_high_water = 0;
  };

  buffer_pool() = default;
  explicit buffer_pool(std::size_t max_idle_bytes) : max_idle_(max_idle_bytes) {}
  buffer_pool(const buffer_pool&) = delete;
  buffer_pool& operator=(const buffer_pool&) = delete;

  /// An uninitialised [rows, cols] matrix, recycled when a buffer of rows·cols elements is idle.
  dense<T> take(index_t rows, index_t cols) {
    dense<T> m;
    const index_t n = rows * cols;
    if (n >= min_elements) {
      std::lock_guard<std::mutex> lock(mu_);
      lent_ += bytes(n);
      stats_.lent_high_water = std::max(stats_.lent_high_water, lent_);
      auto it = idle_.find(n);
      if (it != idle_.end() && !it->second.empty()) {
        m = std::move(it->second.back().m);
        it->second.pop_back();
        idle_bytes_ -= bytes(n);
        --idle_count_;
        ++stats_.hits;
      } else {
        ++stats_.misses;
        trim();
      }
    }
    m.resize(rows, cols);
    return m;
  }
  /// Gives a buffer back (any dense<T>, pooled or not); m is left empty.
  void give(dense<T>&& m) {
    const index_t n = m.size();
    if (n < min_elements) {
      m = dense<T>();
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    lent_ = lent_ >= bytes(n) ? lent_ - bytes(n) : 0;
    idle_[n].push_back(entry{std::move(m), ++clock_});
    idle_bytes_ += bytes(n);
    ++idle_count_;
    trim();
    m = dense<T>();
  }
  /// Frees every idle buffer.
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.clear();
    idle_bytes_ = 0;
    idle_count_ = 0;
  }
  /// The most idle bytes kept (the default is unbounded, under the high-water mark).
  void set_max_idle_bytes(std::size_t b) {
    std::lock_guard<std::mutex> lock(mu_);
    max_idle_ = b;
    trim();
  }
  stats_t stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    stats_t s = stats_;
    s.idle_bytes = idle_bytes_;
    s.idle_buffers = idle_count_;
    s.lent_bytes = lent_;
    return s;
  }

 private:
  struct entry {
    dense<T> m;
    std::uint64_t when;
  };
  static std::size_t bytes(index_t n) { return std::size_t(n) * sizeof(T); }
  void trim() {  // the caller holds mu_
    while (idle_count_ > 0 && (idle_bytes_ > max_idle_ || idle_bytes_ + lent_ > stats_.lent_high_water)) evict_oldest();
  }
  void evict_oldest() {  // the caller holds mu_; few distinct sizes, so a scan of the fronts
    auto oldest = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it)
      if (!it->second.empty() && (oldest == idle_.end() || it->second.front().when < oldest->second.front().when))
        oldest = it;
    if (oldest == idle_.end()) return;
    idle_bytes_ -= bytes(oldest->first);
    --idle_count_;
    oldest->second.pop_front();
    if (oldest->second.empty()) idle_.erase(oldest);
  }

  mutable std::mutex mu_;
  std::map<index_t, std::deque<entry>> idle_;  // by element count; back = most recently given
  std::size_t idle_bytes_ = 0, idle_count_ = 0, lent_ = 0;
  std::size_t max_idle_ = std::numeric_limits<std::size_t>::max();
  std::uint64_t clock_ = 0;
  stats_t stats_;
};

/// The pool of the tapes constructed without one: one per thread (and element type), so
/// that a training loop that builds a fresh tape every step, or a forward pass repeated
/// over batches, reuses the previous step's buffers. It keeps at most the largest working
/// set seen (see buffer_pool); default_pool<T>()->clear() frees it, and a tape given a
/// pool of its own (tape(std::make_shared<buffer_pool<T>>())) leaves it alone.
template <class T>
const std::shared_ptr<buffer_pool<T>>& default_pool() {
  thread_local const std::shared_ptr<buffer_pool<T>> pool = std::make_shared<buffer_pool<T>>();
  return pool;
}

template <class T>
class tape;

/// A handle to a node of a tape (cheap to copy; valid while the tape is not reset).
template <class T>
class var {
 public:
  var() = default;
  var(tape<T>* t, index_t id) : tape_(t), id_(id) {}
  tape<T>* owner() const { return tape_; }
  index_t id() const { return id_; }
  index_t rows() const;
  index_t cols() const;
  /// The value as a row-major Eigen map (no copy).
  cmap<T> value() const;

 private:
  tape<T>* tape_ = nullptr;
  index_t id_ = -1;
};

/// One forward pass. Ops (autograd/ops.hpp) append nodes; backward(loss) sweeps them in
/// reverse. reset() clears the tape for the next step; parameters keep their gradients.
template <class T>
class tape {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "deltaw::autograd::tape: T must be float or double (bf16/fp16 are storage types)");

 public:
  enum class kind { computed, parameter, frozen, input };

  struct node {
    kind k = kind::computed;
    std::string op;
    dense<T> storage;              // computed values live here
    matrix_view<const T> value;    // storage, a parameter's value or caller memory
    dense<T> grad;                 // allocated on the first contribution
    bool has_grad = false;
    bool requires_grad = false;
    bool reads_output = true;  // the backward closure reads this node's value
    bool released = false;     // value and gradient freed by a release_values backward
    parameter<T>* param = nullptr;
    std::function<void(tape&, index_t)> backward;  // pushes this node's grad (node id given) to its inputs
  };

  /// A tape drawing from this thread's default_pool<T>().
  tape() : pool_(default_pool<T>()) {}
  /// A tape that draws its buffers from `pool` (shared with other tapes, e.g. the scratch
  /// tapes of a layer-by-layer forward pass, or one tape per thread).
  explicit tape(std::shared_ptr<buffer_pool<T>> pool) : pool_(std::move(pool)) {
    if (!pool_) throw autograd_error("deltaw::autograd::tape: the buffer pool is null");
  }
  tape(const tape&) = delete;
  tape& operator=(const tape&) = delete;
  ~tape() { reset(); }

  /// The pool this tape's buffers come from and go back to.
  const std::shared_ptr<buffer_pool<T>>& pool() const { return pool_; }
  /// An uninitialised [rows, cols] buffer from the pool, for a value an op will record
  /// (or any temporary; give it back with recycle()).
  dense<T> buffer(index_t rows, index_t cols) { return pool_->take(rows, cols); }
  /// Gives a temporary back to the pool.
  void recycle(dense<T>&& m) { pool_->give(std::move(m)); }
  /// Saved state for a backward closure: a pooled [rows, cols] buffer that goes back to the
  /// pool when the last copy of the pointer is dropped (closures are dropped by backward(),
  /// reset() and release_values).
  std::shared_ptr<dense<T>> saved(index_t rows, index_t cols) {
    auto pool = pool_;
    return std::shared_ptr<dense<T>>(new dense<T>(pool->take(rows, cols)), [pool](dense<T>* m) {
      pool->give(std::move(*m));
      delete m;
    });
  }

  /// A parameter as a leaf: its value is viewed, its gradient accumulates into p.grad().
  var<T> param(parameter<T>& p) {
    auto& n = push(kind::parameter, "parameter " + p.name());
    n.value = p.view();
    n.param = &p;
    n.requires_grad = p.trainable() && grad_enabled_;
    return last();
  }
  /// A frozen tensor: a view of caller memory (never copied), no gradient.
  var<T> frozen(matrix_view<const T> v, std::string name = "frozen") {
    auto& n = push(kind::frozen, std::move(name));
    n.value = v;
    return last();
  }
  template <class M>
    requires eigen_dense<M>
  var<T> frozen(const M& m, std::string name = "frozen") {
    return frozen(matrix_view<const T>(deltaw::view(m)), std::move(name));
  }
  /// An input that wants a gradient (e.g. the activations entering a layer under test):
  /// a view of caller memory, its gradient kept on the tape (grad(v)).
  var<T> input(matrix_view<const T> v, std::string name = "input") {
    auto& n = push(kind::input, std::move(name));
    n.value = v;
    n.requires_grad = grad_enabled_;
    return last();
  }
  template <class M>
    requires eigen_dense<M>
  var<T> input(const M& m, std::string name = "input") {
    return input(matrix_view<const T>(deltaw::view(m)), std::move(name));
  }

  /// Records a computed node with value `v`. Ops call this: `backward(tape&)` is recorded
  /// only when some input requires a gradient and recording is enabled.
  /// `backward_reads_output`: whether the closure reads this node's own value; ops whose
  /// backward does not (linear maps, sums) pass false, so that release_values can free
  /// the value before the closure runs.
  var<T> record(std::string op, dense<T> v, bool requires_grad, std::function<void(tape&, index_t)> backward = {},
                bool backward_reads_output = true) {
    auto& n = push(kind::computed, std::move(op));
    n.storage = std::move(v);
    n.value = deltaw::view(std::as_const(n.storage));
    n.requires_grad = requires_grad && grad_enabled_;
    n.reads_output = backward_reads_output;
    if (n.requires_grad) n.backward = std::move(backward);
    return last();
  }

  /// Memory mode for training loops: a backward() without retain_graph frees each
  /// computed node's value and gradient as soon as the reverse sweep no longer needs
  /// them (as PyTorch frees saved tensors), so the activations of a step are not all
  /// alive at once. The loss keeps its value. Reading a freed value or gradient
  /// afterwards throws autograd_error. Off by default.
  void set_release_values(bool on) { release_values_ = on; }
  bool release_values() const { return release_values_; }

  bool requires_grad(const var<T>& v) const { return at(v, "requires_grad").requires_grad; }
  /// Whether ops record backward closures (false inside a no_grad scope).
  bool grad_enabled() const { return grad_enabled_; }
  void set_grad_enabled(bool e) { grad_enabled_ = e; }

  index_t size() const { return index_t(nodes_.size()); }
  const node& at(const var<T>& v, const char* op) const { return const_cast<tape*>(this)->at(v, op); }
  node& at(const var<T>& v, const char* op) {
    if (v.owner() != this)
      throw autograd_error(std::string("deltaw::autograd::") + op +
                           ": the variable belongs to another tape (or to none)");
    if (v.id() < 0 || v.id() >= size())
      throw autograd_error(std::string("deltaw::autograd::") + op + ": variable " + std::to_string(v.id()) +
                           " is not on this tape (was the tape reset?)");
    return *nodes_[std::size_t(v.id())];
  }
  cmap<T> value(const var<T>& v) const {
    check_not_released(at(v, "value"), "value");
    const auto& vv = at(v, "value").value;
    if (vv.is_row_major())
      return cmap<T>(vv.data(), vv.rows(), vv.cols(),
                     Eigen::OuterStride<>(vv.rows() <= 1 ? std::max<index_t>(vv.cols(), 1) : vv.row_stride()));
    throw layout_error("deltaw::autograd: variable '" + at(v, "value").op +
                       "' is a view without unit column stride; pass row-major views to the tape");
  }

  /// The gradient of the last backward() with respect to v (a parameter, an input or an
  /// intermediate). Frozen views have none.
  const dense<T>& grad(const var<T>& v) const {
    const auto& n = at(v, "grad");
    if (n.k == kind::frozen)
      throw autograd_error("deltaw::autograd::grad: '" + n.op +
                           "' is a frozen view, which has no gradient; make it a parameter or an input to get one");
    if (!n.requires_grad)
      throw autograd_error("deltaw::autograd::grad: '" + n.op +
                           "' does not require a gradient (a frozen parameter, or recorded under no_grad)");
    if (!backward_done_)
      throw autograd_error("deltaw::autograd::grad: no backward() has run on this tape yet");
    check_not_released(n, "grad");
    if (!n.has_grad) const_cast<tape*>(this)->zero_grad_of(const_cast<node&>(n));
    return n.grad;
  }

  /// The accumulator for the gradient of an input of an op: zeroed on first use.
  dense<T>& grad_accumulator(index_t id) {
    node& n = *nodes_[std::size_t(id)];
    if (!n.has_grad) zero_grad_of(n);
    return n.grad;
  }
  /// For ops whose first contribution can be written rather than added: true and an
  /// uninitialised [rows, cols] buffer when the gradient is still empty.
  std::pair<dense<T>*, bool> grad_slot(index_t id) {
    node& n = *nodes_[std::size_t(id)];
    if (n.has_grad) return {&n.grad, false};
    if (n.grad.rows() != n.value.rows() || n.grad.cols() != n.value.cols()) {
      pool_->give(std::move(n.grad));
      n.grad = pool_->take(n.value.rows(), n.value.cols());
    }
    n.has_grad = true;
    return {&n.grad, true};
  }
  /// Adds g to the gradient of node id; g becomes the gradient when there is none yet
  /// (no copy), else it is added and given back to the pool.
  void add_grad(index_t id, dense<T>&& g) {
    node& n = *nodes_[std::size_t(id)];
    if (!n.requires_grad) {
      pool_->give(std::move(g));
      return;
    }
    if (g.rows() != n.value.rows() || g.cols() != n.value.cols())
      throw shape_error("deltaw::autograd: a gradient of shape " + detail::shape_of(g.rows(), g.cols()) + " for '" + n.op +
                        "' of shape " + detail::shape_of(n.value.rows(), n.value.cols()));
    if (!n.has_grad) {
      pool_->give(std::move(n.grad));
      n.grad = std::move(g);
      n.has_grad = true;
    } else {
      n.grad += g;
      pool_->give(std::move(g));
    }
  }
  /// The value of node `id` (for backward closures).
  cmap<T> value_at(index_t id) const { return value(var<T>(const_cast<tape*>(this), id)); }
  bool needs_grad(index_t id) const { return nodes_[std::size_t(id)]->requires_grad; }
  /// The upstream gradient of the node being processed.
  const dense<T>& upstream(index_t id) const { return nodes_[std::size_t(id)]->grad; }

  /// Reverse sweep from a scalar [1, 1] loss, seeded with dL/dL = 1. Parameter
  /// gradients accumulate into parameter::grad(). Without retain_graph the saved state
  /// and closures are released and a second backward() throws.
  void backward(const var<T>& loss, bool retain_graph = false) {
    auto& l = at(loss, "backward");
    if (consumed_)
      throw autograd_error(
          "deltaw::autograd::backward: this tape was already consumed by a backward() that did not retain it; "
          "pass retain_graph = true to the earlier call to run backward twice");
    if (l.value.rows() != 1 || l.value.cols() != 1)
      throw shape_error("deltaw::autograd::backward: the loss must be a scalar [1, 1]; got '" + l.op + "' of shape " +
                        detail::shape_of(l.value.rows(), l.value.cols()));
    if (!l.requires_grad)
      throw autograd_error("deltaw::autograd::backward: the loss '" + l.op +
                           "' does not depend on any parameter or input that requires a gradient");
    // Intermediate gradients of an earlier retained sweep are recomputed, not added to.
    for (auto& n : nodes_)
      if (n->k == kind::computed || n->k == kind::parameter) {
        n->has_grad = false;
        pool_->give(std::move(n->grad));
      }
    l.grad.setOnes(1, 1);
    l.has_grad = true;
    // Node i's value is read only by its own closure and by its consumers' (later nodes,
    // already swept), so a release_values sweep can free it once it reaches i.
    const bool release = release_values_ && !retain_graph;
    for (index_t i = loss.id(); i >= 0; --i) {
      node& n = *nodes_[std::size_t(i)];
      const bool freeable = release && n.k == kind::computed && i != loss.id();
      if (freeable && !n.reads_output) release_value(n);
      if (n.has_grad && n.requires_grad) {
        if (n.k == kind::computed && n.backward) n.backward(*this, i);
        if (n.k == kind::parameter && n.param) n.param->grad() += n.grad;
      }
      if (freeable) {
        release_value(n);
        pool_->give(std::move(n.grad));
        n.backward = nullptr;  // and whatever the closure saved
      }
    }
    backward_done_ = true;
    if (!retain_graph) {
      consumed_ = true;
      // Releases the state the closures saved; values stay readable.
      for (auto& n : nodes_) n->backward = nullptr;
    }
  }

  /// Clears the tape for the next forward pass (parameters keep their gradients).
  void reset() {
    for (auto& n : nodes_) {
      n->backward = nullptr;  // saved state first (pooled buffers go back)
      pool_->give(std::move(n->storage));
      pool_->give(std::move(n->grad));
    }
    nodes_.clear();
    consumed_ = false;
    backward_done_ = false;
  }

 private:
  node& push(kind k, std::string op) {
    nodes_.push_back(std::make_unique<node>());
    auto& n = *nodes_.back();
    n.k = k;
    n.op = std::move(op);
    return n;
  }
  var<T> last() { return var<T>(this, size() - 1); }
  // n.value keeps its shape (rows()/cols() stay valid); every path that reads its data
  // checks `released` first.
  void release_value(node& n) {
    pool_->give(std::move(n.storage));
    n.released = true;
  }
  static void check_not_released(const node& n, const char* what) {
    if (n.released)
      throw autograd_error(std::string("deltaw::autograd::") + what + ": '" + n.op +
                           "' was freed by a backward() with release_values on; read it before backward(), or turn "
                           "release_values off for this tape");
  }
  void zero_grad_of(node& n) {
    if (n.grad.rows() != n.value.rows() || n.grad.cols() != n.value.cols()) {
      pool_->give(std::move(n.grad));
      n.grad = pool_->take(n.value.rows(), n.value.cols());
    }
    n.grad.setZero();
    n.has_grad = true;
  }

  std::shared_ptr<buffer_pool<T>> pool_;  // declared first: destroyed after the nodes
  std::vector<std::unique_ptr<node>> nodes_;
  bool grad_enabled_ = true;
  bool release_values_ = false;
  bool consumed_ = false;
  bool backward_done_ = false;
};

template <class T>
index_t var<T>::rows() const {
  return tape_->at(*this, "rows").value.rows();
}
template <class T>
index_t var<T>::cols() const {
  return tape_->at(*this, "cols").value.cols();
}
template <class T>
cmap<T> var<T>::value() const {
  return tape_->value(*this);
}

/// Evaluation without recording: inside the scope ops compute values only.
template <class T>
class no_grad {
 public:
  explicit no_grad(tape<T>& t) : t_(t), prev_(t.grad_enabled()) { t_.set_grad_enabled(false); }
  ~no_grad() { t_.set_grad_enabled(prev_); }
  no_grad(const no_grad&) = delete;
  no_grad& operator=(const no_grad&) = delete;

 private:
  tape<T>& t_;
  bool prev_;
};

/// Sets every parameter's gradient to zero.
template <class T>
void zero_grad(const std::vector<parameter<T>*>& ps) {
  for (auto* p : ps) p->zero_grad();
}

}  // namespace autograd
DELTAW_NAMESPACE_END
