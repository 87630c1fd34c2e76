// SPDX-License-Identifier: MIT
// The adapter pool: many LoRA adapters registered by name, loaded on first use, held under
// a byte budget in fixed-size pages of one arena (S-LoRA's unified paging), evicted least
// recently used when unpinned, pinned while a batch uses them.
//
// Registration records where an adapter lives (a PEFT directory, a safetensors file, a GGUF
// file, or any loader function) and reads nothing. acquire(name) returns a pinned_adapter:
// on a miss the io layer maps the file, the factors are converted to float and copied into
// pages, and the mapping is released. A page of P bytes holds k = ⌊P / (4·(in + out))⌋ rank
// vectors of one module (k rows of A, then the same k columns of B stored as rows of Bᵀ), so
// a module of rank r takes ⌈r/k⌉ pages whatever the ranks of its neighbours: adapters of
// different ranks share one arena, any free page serves any adapter (no external
// fragmentation), and the waste is less than one page per module. The module is handed out
// as a sliced_lora<float> (one slice per page), which apply_lora_batch takes directly.
//
// Thread safety: every member function may be called concurrently. One mutex guards the
// pool's state; files are read and pages filled outside it (a loading adapter is marked so,
// and concurrent requests for it wait instead of loading it twice). A request whose adapter
// is unknown, missing, malformed, of an unsupported type or larger than what the budget can
// free throws adapter_error for that request only; the adapter stays registered and the next
// request tries again.
//
// Waiting for pins: when the pages a request needs are pinned by in-flight requests,
// acquire fails at once by default; with pool_options::pin_wait (or the wait argument of
// acquire) it blocks on a condition variable until enough pins are released, and throws
// pool_timeout_error when the wait runs out. A thread that waits while it holds pins can
// deadlock against another doing the same: release a batch's pins before acquiring the next.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../io.hpp"
#include "batch.hpp"

DELTAW_NAMESPACE_BEGIN
namespace serve {

/// A request for an adapter failed: not registered, its file missing or malformed, a type
/// the pool does not hold, or more pages than unpinned adapters can free. The message names
/// the adapter, its source and the cause.
class adapter_error : public error {
 public:
  using error::error;
};

/// acquire waited for pinned pages to be released (pool_options::pin_wait, or its wait
/// argument) and the time ran out. The pool is unchanged; the request may be retried.
class pool_timeout_error : public adapter_error {
 public:
  using adapter_error::adapter_error;
};

/// One module of an adapter as a loader yields it: its name and ΔW = s·B·A (views that may
/// point into a mapped file, any storage layout; the pool copies them).
struct adapter_module {
  std::string name;
  low_rank<float> lora;
};

/// Reads an adapter's modules. Called outside the pool's lock, possibly from several
/// threads for different adapters; throws whatever the io layer throws.
using adapter_loader = std::function<std::vector<adapter_module>()>;

struct pool_options {
  /// The arena: ⌊budget_bytes / page_bytes⌋ pages, allocated once (untouched until used).
  std::size_t budget_bytes = std::size_t(256) << 20;
  /// Fixed page size; one page must hold a rank vector of every module (4·(in + out) bytes).
  std::size_t page_bytes = std::size_t(256) << 10;
  /// How long acquire(name) waits for in-flight requests to unpin the pages it needs:
  /// zero (the default) fails at once with adapter_error; wait_forever blocks until they do.
  std::chrono::milliseconds pin_wait{0};
  static constexpr std::chrono::milliseconds wait_forever = std::chrono::milliseconds::max();
};

/// Counters (a snapshot).
struct pool_stats {
  std::size_t hits = 0;       ///< acquires that found the adapter resident
  std::size_t misses = 0;     ///< acquires that loaded it (or waited for another's load)
  std::size_t evictions = 0;  ///< adapters evicted to make room
  std::size_t failures = 0;   ///< acquires that threw adapter_error (timeouts included)
  std::size_t pin_waits = 0;  ///< acquires that waited for pinned pages to be released
  std::size_t timeouts = 0;   ///< waits that ran out (pool_timeout_error)
  std::size_t waiting = 0;    ///< acquires waiting for pinned pages now
  std::size_t registered = 0, resident = 0, pinned = 0;
  std::size_t pages_total = 0, pages_used = 0;
  std::size_t page_bytes = 0;
  std::size_t bytes_budget = 0;
  std::size_t bytes_used() const { return pages_used * page_bytes; }
};

class adapter_pool;

namespace detail {
struct pool_entry {
  enum class state : unsigned char { unloaded, loading, resident };
  std::string name, source;
  adapter_loader load;
  state st = state::unloaded;
  std::vector<index_t> pages;
  std::map<std::string, sliced_lora<float>, std::less<>> modules;
  std::uint64_t load_id = 0;  // which load filled `pages` (ids grow; 0: never loaded)
  index_t pins = 0;
  bool in_lru = false;
  std::list<pool_entry*>::iterator lru;
};
}  // namespace detail

/// A resident adapter, pinned (never evicted) while this handle lives. Move-only. The pool
/// must outlive its handles.
class pinned_adapter {
 public:
  pinned_adapter() = default;
  pinned_adapter(const pinned_adapter&) = delete;
  pinned_adapter& operator=(const pinned_adapter&) = delete;
  pinned_adapter(pinned_adapter&& o) noexcept : pool_(std::exchange(o.pool_, nullptr)), e_(std::exchange(o.e_, nullptr)) {}
  pinned_adapter& operator=(pinned_adapter&& o) noexcept {
    if (this != &o) {
      release();
      pool_ = std::exchange(o.pool_, nullptr);
      e_ = std::exchange(o.e_, nullptr);
    }
    return *this;
  }
  ~pinned_adapter() { release(); }

  explicit operator bool() const { return e_ != nullptr; }
  const std::string& name() const { return e_->name; }
  /// The module's update, or null when the adapter leaves that module alone.
  const sliced_lora<float>* find(std::string_view module) const {
    auto it = e_->modules.find(module);
    return it == e_->modules.end() ? nullptr : &it->second;
  }
  /// The module's update; adapter_error when the adapter has no such module.
  const sliced_lora<float>& at(std::string_view module) const {
    if (const auto* m = find(module)) return *m;
    std::string have;
    for (const auto& [n, _] : e_->modules) have += (have.empty() ? "" : ", ") + ("\"" + n + "\"");
    throw adapter_error("deltaw::serve::pinned_adapter::at: adapter \"" + e_->name + "\" has no module \"" +
                        std::string(module) + "\" (it adapts " + have + ")");
  }
  std::vector<std::string> modules() const {
    std::vector<std::string> out;
    for (const auto& [n, _] : e_->modules) out.push_back(n);
    return out;
  }
  /// The arena pages the adapter occupies (indices; see adapter_pool::arena()) and the id of
  /// the load that filled them: a page's contents change only when a later load (a larger
  /// id) reuses it, never while it is pinned. What a mirror (the CUDA pool) copies.
  std::span<const index_t> pages() const { return e_->pages; }
  std::uint64_t load_id() const { return e_->load_id; }
  /// Unpins now (the handle becomes empty).
  inline void release();

 private:
  friend class adapter_pool;
  pinned_adapter(adapter_pool* p, detail::pool_entry* e) : pool_(p), e_(e) {}
  adapter_pool* pool_ = nullptr;
  detail::pool_entry* e_ = nullptr;
};

class adapter_pool {
 public:
  explicit adapter_pool(pool_options o = {}) : opt_(o) {
    if (o.page_bytes < 4 * sizeof(float))
      throw argument_error("deltaw::serve::adapter_pool: page_bytes " + std::to_string(o.page_bytes) + " is too small");
    page_floats_ = o.page_bytes / sizeof(float);
    pages_total_ = o.budget_bytes / (page_floats_ * sizeof(float));
    if (pages_total_ == 0)
      throw argument_error("deltaw::serve::adapter_pool: a budget of " + std::to_string(o.budget_bytes) +
                           " bytes holds no page of " + std::to_string(o.page_bytes) + " bytes");
    arena_.reset(new float[pages_total_ * page_floats_]);  // not touched until pages are filled
    free_.reserve(pages_total_);
    for (std::size_t p = pages_total_; p-- > 0;) free_.push_back(index_t(p));
  }
  adapter_pool(const adapter_pool&) = delete;
  adapter_pool& operator=(const adapter_pool&) = delete;

  // ── registration (reads nothing) ──────────────────────────────────────────────────────

  /// Any source: `load` is called on a miss. argument_error when `name` is taken.
  void register_loader(std::string name, adapter_loader load, std::string source = "a loader function") {
    std::lock_guard lk(m_);
    if (entries_.count(name))
      throw argument_error("deltaw::serve::adapter_pool: an adapter named \"" + name + "\" is already registered");
    auto e = std::make_unique<detail::pool_entry>();
    e->name = name;
    e->source = std::move(source);
    e->load = std::move(load);
    entries_.emplace(std::move(name), std::move(e));
  }

  /// The PEFT adapter `adapter_name` saved under `dir` (io::read_peft's layout: "default" is
  /// dir itself). LoRA and rsLoRA; other types fail their requests with adapter_error.
  void register_peft(std::string name, const std::filesystem::path& dir, std::string adapter_name = "default") {
    const std::string src = "PEFT directory '" + dir.string() + "' (adapter \"" + adapter_name + "\")";
    register_loader(std::move(name), [dir, adapter_name] { return load_peft(dir, adapter_name); }, src);
  }
  /// Every adapter io::list_peft_adapters finds under `dir`, named prefix + its PEFT name.
  /// Returns the names registered.
  std::vector<std::string> register_peft_directory(const std::filesystem::path& dir, const std::string& prefix = "") {
    std::vector<std::string> names;
    for (const auto& n : io::list_peft_adapters(dir)) {
      register_peft(prefix + n, dir, n);
      names.push_back(prefix + n);
    }
    return names;
  }
  /// A safetensors file of LoRA factors keyed as PEFT writes them ("<module>.lora_A.weight"
  /// and ".lora_B.weight", the "base_model.model." prefix optional), with ΔW = (α/r)·B·A.
  void register_safetensors(std::string name, const std::filesystem::path& file, alpha a) {
    register_safetensors_impl(std::move(name), file, a.value, false);
  }
  /// The same with one explicit scale s for every module.
  void register_safetensors(std::string name, const std::filesystem::path& file, scale s) {
    register_safetensors_impl(std::move(name), file, s.value, true);
  }
  /// A llama.cpp LoRA adapter (GGUF); modules are the base tensor names ("blk.0.attn_q.weight").
  /// `options` as io::read_gguf_lora takes them (the head counts that undo llama.cpp's
  /// attn_q / attn_k row order, or permute_qk = false to keep the rows as stored).
  void register_gguf(std::string name, const std::filesystem::path& file, io::gguf_lora_options options = {}) {
    register_loader(
        std::move(name),
        [file, options] {
          const auto g = io::read_gguf_lora(file, options);
          std::vector<adapter_module> out;
          for (const auto& p : g.tensors) out.push_back({p.base, low_rank<float>(p.B, p.A, g.scale(p))});
          return out;
        },
        "GGUF file '" + file.string() + "'");
  }

  // ── requests ──────────────────────────────────────────────────────────────────────────

  /// The adapter `name`, resident and pinned. Loads it on a miss (evicting least recently
  /// used unpinned adapters as needed); adapter_error when it cannot be served. When the
  /// pages it needs are pinned, waits up to pool_options::pin_wait for them.
  pinned_adapter acquire(std::string_view name) { return acquire(name, opt_.pin_wait); }

  /// The same, waiting up to `wait` (wait_forever, or a year or more: without limit) for
  /// in-flight requests to unpin the pages it needs; pool_timeout_error when they do not in
  /// time. An adapter larger than the whole pool fails at once whatever `wait` says.
  pinned_adapter acquire(std::string_view name, std::chrono::milliseconds wait) {
    std::unique_lock lk(m_);
    auto it = entries_.find(std::string(name));
    if (it == entries_.end()) {
      ++failures_;
      throw adapter_error("deltaw::serve::adapter_pool::acquire: no adapter named \"" + std::string(name) +
                          "\" is registered (" + std::to_string(entries_.size()) + " are)");
    }
    detail::pool_entry* e = it->second.get();
    bool waited = false;
    while (e->st == detail::pool_entry::state::loading) {
      waited = true;
      cv_.wait(lk);
    }
    if (e->st == detail::pool_entry::state::resident) {
      if (waited) ++misses_;
      else ++hits_;
      pin(e);
      return pinned_adapter(this, e);
    }
    // A miss: this request loads it.
    ++misses_;
    e->st = detail::pool_entry::state::loading;
    lk.unlock();
    std::vector<adapter_module> mods;
    std::vector<std::pair<std::size_t, index_t>> plan;  // per module: rank vectors per page, pages
    index_t need = 0;
    try {
      mods = e->load();
      for (const auto& m : mods) {
        const std::size_t per = std::size_t(m.lora.rows() + m.lora.cols());
        const std::size_t k = page_floats_ / per;
        if (k == 0)
          throw adapter_error("module \"" + m.name + "\" (" + deltaw::detail::shape_str(m.lora.rows(), m.lora.cols()) +
                              ") needs " + std::to_string(per * sizeof(float)) +
                              " bytes per rank vector, more than a page of " + std::to_string(opt_.page_bytes) +
                              " bytes (raise pool_options::page_bytes)");
        const index_t pages = (m.lora.rank() + index_t(k) - 1) / index_t(k);
        plan.emplace_back(k, pages);
        need += pages;
      }
    } catch (const std::exception& ex) {
      fail_load(e, lk);
      throw adapter_error("deltaw::serve::adapter_pool::acquire: adapter \"" + e->name + "\" from " + e->source +
                          " cannot be loaded: " + ex.what());
    }
    lk.lock();
    const bool fits = std::size_t(need) <= pages_total_;
    bool got = fits && reserve(need, e->pages);
    bool timed_out = false;
    if (!got && fits && wait > std::chrono::milliseconds::zero()) {
      // Wait for unpins (unpin notifies while someone waits); the entry stays `loading`, so
      // other requests for this adapter wait for this one.
      ++pin_waits_;
      ++waiting_;
      const bool forever = wait >= std::chrono::hours(24 * 365);  // wait_forever, or as good as
      const auto deadline = forever ? std::chrono::steady_clock::time_point::max() : std::chrono::steady_clock::now() + wait;
      while (!(got = reserve(need, e->pages))) {
        if (forever) {
          cv_.wait(lk);
        } else if (cv_.wait_until(lk, deadline) == std::cv_status::timeout) {
          got = reserve(need, e->pages);
          timed_out = !got;
          break;
        }
      }
      --waiting_;
    }
    if (!got) {
      const std::size_t pinned_pages = pinned_pages_locked();
      e->st = detail::pool_entry::state::unloaded;
      ++failures_;
      if (timed_out) ++timeouts_;
      cv_.notify_all();
      const std::string head = "deltaw::serve::adapter_pool::acquire: adapter \"" + e->name + "\" needs " +
                               std::to_string(need) + " pages of " + std::to_string(opt_.page_bytes) + " bytes";
      if (!fits)
        throw adapter_error(head + " but the pool has only " + std::to_string(pages_total_) + " (a budget of " +
                            std::to_string(opt_.budget_bytes) + " bytes; raise pool_options::budget_bytes)");
      const std::string tail = "only " + std::to_string(pages_total_ - pinned_pages) + " of the pool's " +
                               std::to_string(pages_total_) + " can be freed (" + std::to_string(pinned_pages) +
                               " are pinned by in-flight requests)";
      if (timed_out)
        throw pool_timeout_error(head + "; waited " + std::to_string(wait.count()) +
                                 " ms for pinned adapters to be released, but " + tail);
      throw adapter_error(head + " but " + tail);
    }
    lk.unlock();
    // Fill the reserved pages (no other thread reads or writes them now).
    std::map<std::string, sliced_lora<float>, std::less<>> built;
    std::size_t next = 0;
    for (std::size_t i = 0; i < mods.size(); ++i) {
      const auto& u = mods[i].lora;
      const index_t out = u.rows(), in = u.cols(), k = index_t(plan[i].first);
      std::vector<low_rank<float>> parts;
      for (index_t r0 = 0; r0 < u.rank(); r0 += k) {
        const index_t kc = std::min(k, u.rank() - r0);
        float* page = arena_.get() + std::size_t(e->pages[next++]) * page_floats_;
        const auto A = u.A(), B = u.B();
        for (index_t a = 0; a < kc; ++a)
          for (index_t j = 0; j < in; ++j) page[a * in + j] = A(r0 + a, j);
        float* bt = page + kc * in;  // Bᵀ rows: B[:, r0 + a]
        for (index_t a = 0; a < kc; ++a)
          for (index_t o = 0; o < out; ++o) bt[a * out + o] = B(o, r0 + a);
        parts.emplace_back(held_matrix<float>{matrix_view<const float>(bt, out, kc, 1, std::max<index_t>(out, 1)), nullptr},
                           held_matrix<float>{matrix_view<const float>(page, kc, in, std::max<index_t>(in, 1), 1), nullptr},
                           u.scale());
      }
      built.emplace(mods[i].name, sliced_lora<float>(std::move(parts)));
    }
    mods.clear();  // drops the file mappings
    lk.lock();
    e->modules = std::move(built);
    e->load_id = ++loads_;
    e->st = detail::pool_entry::state::resident;
    pin(e);
    cv_.notify_all();
    return pinned_adapter(this, e);
  }

  // ── inspection ────────────────────────────────────────────────────────────────────────

  /// The arena: page p holds page_bytes() bytes from arena() + p·page_bytes()/4 (floats),
  /// page_count() pages. A pinned adapter's pages (pinned_adapter::pages()) may be read
  /// without the pool's lock while the pin lasts.
  const float* arena() const { return arena_.get(); }
  std::size_t page_bytes() const { return page_floats_ * sizeof(float); }
  std::size_t page_count() const { return pages_total_; }

  pool_stats stats() const {
    std::lock_guard lk(m_);
    pool_stats s;
    s.hits = hits_;
    s.misses = misses_;
    s.evictions = evictions_;
    s.failures = failures_;
    s.pin_waits = pin_waits_;
    s.timeouts = timeouts_;
    s.waiting = waiting_;
    s.registered = entries_.size();
    for (const auto& [_, e] : entries_) {
      if (e->st == detail::pool_entry::state::resident) ++s.resident;
      if (e->pins > 0) ++s.pinned;
    }
    s.pages_total = pages_total_;
    s.pages_used = pages_total_ - free_.size();
    s.page_bytes = page_floats_ * sizeof(float);
    s.bytes_budget = opt_.budget_bytes;
    return s;
  }
  bool is_registered(std::string_view name) const {
    std::lock_guard lk(m_);
    return entries_.count(std::string(name)) > 0;
  }
  bool is_resident(std::string_view name) const {
    std::lock_guard lk(m_);
    auto it = entries_.find(std::string(name));
    return it != entries_.end() && it->second->st == detail::pool_entry::state::resident;
  }
  /// The resident unpinned adapters, most recently used first (the eviction order reversed).
  std::vector<std::string> lru_order() const {
    std::lock_guard lk(m_);
    std::vector<std::string> out;
    for (const auto* e : lru_) out.push_back(e->name);
    return out;
  }
  /// Pages an adapter occupies while resident (0 when it is not).
  std::size_t pages_of(std::string_view name) const {
    std::lock_guard lk(m_);
    auto it = entries_.find(std::string(name));
    return it == entries_.end() ? 0 : it->second->pages.size();
  }

 private:
  friend class pinned_adapter;

  static std::vector<adapter_module> load_peft(const std::filesystem::path& dir, const std::string& adapter_name) {
    const auto a = io::read_peft(dir, adapter_name);
    const auto* l = a.lora();
    if (!l)
      throw unsupported_error("the pool holds LoRA adapters; this one is " + a.peft_type() +
                                  " (apply it with serve::apply_grouped)");
    std::vector<adapter_module> out;
    for (const auto& m : l->modules()) {
      if (m.magnitude)
        throw unsupported_error("module \"" + m.name + "\" is DoRA (use_dora), which reads the base weight; the pool "
                                    "holds LoRA and rsLoRA");
      out.push_back({m.name, m.update()});
    }
    return out;
  }

  void register_safetensors_impl(std::string name, const std::filesystem::path& file, double v, bool is_scale) {
    register_loader(
        std::move(name),
        [file, v, is_scale] {
          const auto f = io::safetensors_file::open(file);
          std::map<std::string, std::pair<const io::st_tensor_info*, const io::st_tensor_info*>> found;
          for (const auto& t : f.tensors()) {
            std::string_view k = t.name;
            if (k.starts_with("base_model.model.")) k.remove_prefix(17);
            for (const auto& [suffix, which] : {std::pair<std::string_view, int>{".lora_A.weight", 0}, {".lora_B.weight", 1}})
              if (k.ends_with(suffix) && k.size() > suffix.size()) {
                auto& slot = found[std::string(k.substr(0, k.size() - suffix.size()))];
                (which == 0 ? slot.first : slot.second) = &t;
              }
          }
          if (found.empty()) throw format_error("no \"<module>.lora_A.weight\" / \".lora_B.weight\" tensors");
          std::vector<adapter_module> out;
          for (const auto& [mod, p] : found) {
            if (!p.first || !p.second)
              throw format_error("module \"" + mod + "\" lacks " + (p.first ? "lora_B.weight" : "lora_A.weight"));
            auto A = f.matrix<float>(p.first->name);
            auto B = f.matrix<float>(p.second->name);
            low_rank<float> u(std::move(B), std::move(A), 1.0);  // validates the shapes
            out.push_back({mod, u.with_scale(is_scale ? v : v / double(u.rank()))});
          }
          return out;
        },
        "safetensors file '" + file.string() + "'");
  }

  void pin(detail::pool_entry* e) {
    if (e->pins++ == 0 && e->in_lru) {
      lru_.erase(e->lru);
      e->in_lru = false;
    }
  }
  void unpin(detail::pool_entry* e) {
    std::lock_guard lk(m_);
    if (--e->pins == 0) {
      lru_.push_front(e);
      e->lru = lru_.begin();
      e->in_lru = true;
      if (waiting_ > 0) cv_.notify_all();  // its pages can be evicted now
    }
  }
  void fail_load(detail::pool_entry* e, std::unique_lock<std::mutex>& lk) {
    lk.lock();
    e->st = detail::pool_entry::state::unloaded;
    ++failures_;
    cv_.notify_all();
    lk.unlock();
  }
  std::size_t pinned_pages_locked() const {
    std::size_t n = 0;
    for (const auto& [_, e] : entries_)
      if (e->pins > 0 || e->st == detail::pool_entry::state::loading) n += e->pages.size();
    return n;
  }
  /// Takes `need` free pages into `pages`, evicting from the LRU tail as needed. False (and
  /// nothing evicted) when even evicting every unpinned adapter would not free enough.
  bool reserve(index_t need, std::vector<index_t>& pages) {
    std::size_t can = free_.size();
    for (const auto* e : lru_) can += e->pages.size();
    if (std::size_t(need) > can) return false;
    while (free_.size() < std::size_t(need)) {
      detail::pool_entry* v = lru_.back();
      lru_.pop_back();
      v->in_lru = false;
      free_.insert(free_.end(), v->pages.begin(), v->pages.end());
      v->pages.clear();
      v->modules.clear();
      v->st = detail::pool_entry::state::unloaded;
      ++evictions_;
    }
    pages.assign(free_.end() - need, free_.end());
    free_.resize(free_.size() - std::size_t(need));
    return true;
  }

  pool_options opt_;
  std::size_t page_floats_ = 0, pages_total_ = 0;
  std::unique_ptr<float[]> arena_;
  mutable std::mutex m_;
  std::condition_variable cv_;
  std::unordered_map<std::string, std::unique_ptr<detail::pool_entry>> entries_;
  std::vector<index_t> free_;
  std::list<detail::pool_entry*> lru_;  // unpinned resident adapters, most recent first
  std::uint64_t loads_ = 0;
  std::size_t hits_ = 0, misses_ = 0, evictions_ = 0, failures_ = 0;
  std::size_t pin_waits_ = 0, timeouts_ = 0, waiting_ = 0;
};

inline void pinned_adapter::release() {
  if (pool_ && e_) pool_->unpin(e_);
  pool_ = nullptr;
  e_ = nullptr;
}

}  // namespace serve
DELTAW_NAMESPACE_END
