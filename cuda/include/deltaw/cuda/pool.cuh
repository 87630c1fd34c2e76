// SPDX-License-Identifier: MIT
// The CUDA side of the adapter pool (deltaw/serve/pool.hpp, docs/serving.md): a device
// cache of the host pool's pages in device slots, under a device budget that may be smaller
// than the host arena. The host pool decides what is resident in host memory (byte budget,
// fixed-size pages, LRU eviction, pins); device_pool holds ⌊device budget / page bytes⌋
// slots of one page each, in one device allocation, and maps a host page to a slot when an
// adapter that occupies the page is acquired.
//
//   device_pool dp(host_pool, std::size_t(64) << 20);  // 64 MiB of slots (or dp(host_pool):
//                                                        // as many slots as host pages)
//   auto h = dp.acquire("name");               // pins on the host, maps and copies pages
//   const auto& q = h.at("model.layers.0.self_attn.q_proj");  // sliced_lora<float, device::cuda>
//   cuda::serve::apply_lora_batch(ctx, W, std::vector{q, …}, adapter_of_token, X, Y);
//
// A slot's mirror is current while the host page still holds the load it was copied from
// (each load of an adapter has an id; a host page's contents change only when a later load
// reuses it, never while it is pinned) and the slot was not reused: acquiring an adapter
// whose pages are all current copies nothing. A host page whose slot holds an older load is
// copied again into that same slot. Slots used by live device_adapters are pinned (a count
// per slot); the other slots are reused least recently released first, slots never used
// before that. A module's slices each lie inside one host page, so a device module is one
// slice per page, each viewed in its own slot wherever that slot is.
//
// When the unpinned slots are too few for an acquire, it throws device_slots_error (a
// serve::adapter_error) naming the adapter and the slots it needed, has and are pinned, with
// the host pin released and nothing changed; acquire(name, wait) waits up to `wait` for
// device_adapters to be released instead. A thread must not wait while it holds device
// adapters of its own (two such threads can block each other).
//
// The device adapter keeps the host pin (and so its host pages) and its slot pins until it
// is destroyed or released. Copies are synchronous (cudaMemcpy) and made under the pool's
// lock, so a slot is complete on the device before any thread sees it current; the legacy
// default stream they run on also orders them after work already issued on the contexts'
// blocking streams (which may still read a slot that was just released; work on a borrowed
// non-blocking stream is not ordered so: synchronise it before releasing). Thread-safe:
// acquire and release from any thread. The host pool must outlive the device pool, and the
// device pool its adapters.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <list>
#include <map>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <deltaw/serve/pool.hpp>

#include "context.cuh"
#include "error.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda::serve {

/// An acquire found too few device slots that could be reused (the others pinned by live
/// device_adapters), at once or after its wait, or the adapter has more pages than the
/// device pool has slots. Nothing changed: the host pin was released and the request may
/// be retried.
class device_slots_error : public ::deltaw::serve::adapter_error {
 public:
  using ::deltaw::serve::adapter_error::adapter_error;
};

/// Counters of a device_pool (a snapshot).
struct device_pool_stats {
  std::size_t acquires = 0;      ///< acquire calls that returned an adapter
  std::size_t hits = 0;          ///< acquires whose pages were all current on the device
  std::size_t page_hits = 0;     ///< pages found current on the device (nothing copied)
  std::size_t copied_pages = 0;  ///< host pages copied into device slots
  /// Slot reuses that displaced the latest mirror of another host page. The pool learns that
  /// the host reloaded a page only when the page is next acquired, so a mirror the host had
  /// already made stale without a device acquire counts too.
  std::size_t evictions = 0;
  std::size_t failures = 0;      ///< acquires that threw device_slots_error (timeouts included)
  std::size_t slot_waits = 0;    ///< acquires that waited for slots to be unpinned
  std::size_t timeouts = 0;      ///< waits that ran out
  std::size_t waiting = 0;       ///< acquires waiting for slots now
  std::size_t page_bytes = 0;
  std::size_t pages_total = 0;   ///< host pages
  std::size_t slots_total = 0;   ///< device slots (one page each)
  std::size_t slots_used = 0;    ///< slots holding a page's mirror
  std::size_t slots_pinned = 0;  ///< slots used by live device_adapters
  std::size_t device_bytes() const { return slots_total * page_bytes; }
};

class device_pool;

/// An adapter pinned on the host with its pages current in pinned device slots: its modules
/// as sliced_lora<float, device::cuda> over those slots. Move-only; release() or the
/// destructor unpins (from any thread; a moved-from handle is empty).
class device_adapter {
 public:
  device_adapter() = default;
  device_adapter(const device_adapter&) = delete;
  device_adapter& operator=(const device_adapter&) = delete;
  device_adapter(device_adapter&& o) noexcept
      : host_(std::move(o.host_)),
        pool_(std::exchange(o.pool_, nullptr)),
        slots_(std::exchange(o.slots_, {})),
        modules_(std::exchange(o.modules_, {})) {}
  device_adapter& operator=(device_adapter&& o) noexcept {
    if (this != &o) {
      release();
      host_ = std::move(o.host_);
      pool_ = std::exchange(o.pool_, nullptr);
      slots_ = std::exchange(o.slots_, {});
      modules_ = std::exchange(o.modules_, {});
    }
    return *this;
  }
  ~device_adapter() { release(); }

  explicit operator bool() const { return bool(host_); }
  const std::string& name() const { return host_.name(); }
  /// The module's update on the device, or null when the adapter leaves that module alone.
  const ::deltaw::serve::sliced_lora<float, device::cuda>* find(std::string_view module) const {
    auto it = modules_.find(module);
    return it == modules_.end() ? nullptr : &it->second;
  }
  /// The module's update on the device; adapter_error (naming the modules it has) otherwise.
  const ::deltaw::serve::sliced_lora<float, device::cuda>& at(std::string_view module) const {
    if (const auto* m = find(module)) return *m;
    (void)host_.at(module);  // throws the host pool's adapter_error
    throw ::deltaw::serve::adapter_error("deltaw::cuda::serve::device_adapter::at: no module \"" +
                                         std::string(module) + "\"");
  }
  std::vector<std::string> modules() const { return host_.modules(); }
  /// The device slots it pins, one per host page (pinned_adapter::pages() order).
  const std::vector<index_t>& slots() const { return slots_; }
  /// Unpins its slots, then the host pages (the handle becomes empty; the device views must
  /// no longer be used).
  inline void release() noexcept;

 private:
  friend class device_pool;
  device_adapter(::deltaw::serve::pinned_adapter h, device_pool* pool, std::vector<index_t> slots)
      : host_(std::move(h)), pool_(pool), slots_(std::move(slots)) {}

  ::deltaw::serve::pinned_adapter host_;
  device_pool* pool_ = nullptr;
  std::vector<index_t> slots_;
  std::map<std::string, ::deltaw::serve::sliced_lora<float, device::cuda>, std::less<>> modules_;
};

/// The device cache of a host adapter_pool's pages (the host pool must outlive it, and it
/// its adapters).
class device_pool {
 public:
  /// As many device slots as the host arena has pages (a page never waits for a slot).
  /// `device`: the device (default: the current one).
  explicit device_pool(::deltaw::serve::adapter_pool& host, int device = -1)
      : device_pool(host, checked_device(device), host.page_count(), 0) {}

  /// ⌊device_budget_bytes / page bytes⌋ slots (at least one: argument_error otherwise) on
  /// `device` (default: the current one). Pass the budget as std::size_t: an int second
  /// argument is the device of the constructor above.
  device_pool(::deltaw::serve::adapter_pool& host, std::size_t device_budget_bytes, int device = -1)
      : device_pool(host, checked_device(device), slots_for(host, device_budget_bytes), device_budget_bytes) {}

  device_pool(const device_pool&) = delete;
  device_pool& operator=(const device_pool&) = delete;
  ~device_pool() {
    device_guard g(device_);
    (void)cudaFree(arena_);
  }

  /// Pins `name` on the host (loading it there if needed, with the host pool's errors and
  /// waits) and makes its pages current in pinned device slots; device_slots_error at once
  /// when the unpinned slots are too few.
  device_adapter acquire(std::string_view name) { return acquire(name, std::chrono::milliseconds::zero()); }

  /// The same, waiting up to `slot_wait` (serve::pool_options::wait_forever: without limit)
  /// for device_adapters to be released when the unpinned slots are too few;
  /// device_slots_error when they are not in time, or at once when the adapter has more
  /// pages than the pool has slots. The host pin is held while waiting.
  device_adapter acquire(std::string_view name, std::chrono::milliseconds slot_wait) {
    auto h = host_.acquire(name);
    const std::span<const index_t> pages = h.pages();
    const std::uint64_t load = h.load_id();
    std::unique_lock lk(m_);
    auto plan = plan_locked(pages, load);
    if (pages.size() > slots_.size()) {  // all its pages need slots at once
      ++failures_;
      throw device_slots_error(head(h.name(), pages.size(), plan.missing) + " but the device pool has only " +
                               std::to_string(slots_.size()) + " slots (" + budget_text() + "; raise it)");
    }
    if (plan.missing > plan.reusable) {
      bool timed_out = false;
      if (slot_wait > std::chrono::milliseconds::zero()) {
        ++slot_waits_;
        ++waiting_;
        const bool forever = slot_wait >= std::chrono::hours(24 * 365);
        const auto deadline = forever ? std::chrono::steady_clock::time_point::max()
                                      : std::chrono::steady_clock::now() + slot_wait;
        while (plan.missing > plan.reusable) {
          if (forever) {
            cv_.wait(lk);
          } else if (cv_.wait_until(lk, deadline) == std::cv_status::timeout) {
            plan = plan_locked(pages, load);
            timed_out = plan.missing > plan.reusable;
            break;
          }
          plan = plan_locked(pages, load);
        }
        --waiting_;
      }
      if (plan.missing > plan.reusable) {
        ++failures_;
        if (timed_out) ++timeouts_;
        const std::size_t pinned = slots_.size() - lru_.size();
        std::string msg = head(h.name(), pages.size(), plan.missing);
        if (timed_out) msg += "; waited " + std::to_string(slot_wait.count()) + " ms for device adapters to be released,";
        msg += " but only " + std::to_string(plan.reusable) + " of the device pool's " + std::to_string(slots_.size()) +
               " slots can be reused (" + std::to_string(pinned) + " are pinned by live device adapters";
        if (plan.unpinned_hits > 0) msg += ", " + std::to_string(plan.unpinned_hits) + " hold this adapter's current pages";
        msg += "; " + budget_text() + ")";
        throw device_slots_error(msg);  // h's destructor releases the host pin after lk's
      }
    }
    std::vector<index_t> taken = take_slots_locked(pages, load);
    lk.unlock();
    // From here the handle owns the pins (its destructor releases them if building the
    // views throws); the views read only the pinned host entry and the slot list.
    device_adapter out(std::move(h), this, std::move(taken));
    out.modules_ = device_modules(out.host_, out.slots_);
    return out;
  }

  device_pool_stats stats() const {
    std::lock_guard lk(m_);
    device_pool_stats s;
    s.acquires = acquires_;
    s.hits = hits_;
    s.page_hits = page_hits_;
    s.copied_pages = copied_pages_;
    s.evictions = evictions_;
    s.failures = failures_;
    s.slot_waits = slot_waits_;
    s.timeouts = timeouts_;
    s.waiting = waiting_;
    s.page_bytes = page_bytes_;
    s.pages_total = host_.page_count();
    s.slots_total = slots_.size();
    for (const auto& sl : slots_) s.slots_used += sl.page >= 0 ? 1 : 0;
    s.slots_pinned = slots_.size() - lru_.size();
    return s;
  }
  ::deltaw::serve::adapter_pool& host() { return host_; }
  std::size_t slot_count() const { return slots_.size(); }
  /// The device arena: slot s holds page_bytes() bytes from arena() + s·page_bytes()/4.
  const float* arena() const { return arena_; }
  std::size_t page_bytes() const { return page_bytes_; }

 private:
  friend class device_adapter;

  struct slot {
    index_t page = -1;       // the host page mirrored here (-1: none)
    std::uint64_t load = 0;  // the host load it was copied from
    index_t pins = 0;        // live device_adapters using it
    std::list<index_t>::iterator lru;  // its place in lru_ while unpinned
  };
  struct plan_t {
    std::size_t missing = 0;        // pages of the adapter not current on the device
    std::size_t reusable = 0;       // unpinned slots other than the adapter's current ones
    std::size_t unpinned_hits = 0;  // the adapter's current pages in unpinned slots
  };

  device_pool(::deltaw::serve::adapter_pool& host, int device, std::size_t slots, std::size_t budget)
      : host_(host),
        device_(device),
        page_bytes_(host.page_bytes()),
        budget_bytes_(budget),
        slots_(slots),
        slot_of_page_(host.page_count(), -1) {
    for (std::size_t s = 0; s < slots_.size(); ++s) slots_[s].lru = lru_.insert(lru_.end(), index_t(s));
    device_guard g(device_);
    DELTAW_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&arena_), std::max<std::size_t>(slots * page_bytes_, 1)));
  }

  static int checked_device(int device) {
    if (device < 0) {
      int d = 0;
      DELTAW_CUDA_CHECK(cudaGetDevice(&d));
      return d;
    }
    int n = 0;
    DELTAW_CUDA_CHECK(cudaGetDeviceCount(&n));
    if (device >= n)
      throw argument_error("deltaw::cuda::serve::device_pool: device " + std::to_string(device) + " does not exist (" +
                           std::to_string(n) + " visible); a device budget in bytes is passed as std::size_t");
    return device;
  }
  static std::size_t slots_for(const ::deltaw::serve::adapter_pool& host, std::size_t budget) {
    const std::size_t n = budget / host.page_bytes();
    if (n == 0)
      throw argument_error("deltaw::cuda::serve::device_pool: a device budget of " + std::to_string(budget) +
                           " bytes holds no page of the host pool (" + std::to_string(host.page_bytes()) +
                           " bytes); it needs at least one page, and as many as the largest adapter's pages");
    return n;
  }

  std::string head(const std::string& name, std::size_t pages, std::size_t missing) const {
    return "deltaw::cuda::serve::device_pool::acquire: adapter \"" + name + "\" occupies " + std::to_string(pages) +
           " host pages of " + std::to_string(page_bytes_) + " bytes and needs device slots for " +
           std::to_string(missing) + " of them";
  }
  std::string budget_text() const {
    return budget_bytes_ > 0 ? "a device budget of " + std::to_string(budget_bytes_) + " bytes"
                             : "one slot per host page";
  }

  /// Whether host page p's mirror in its slot is current for `load`.
  bool current_locked(index_t p, std::uint64_t load) const {
    const index_t s = slot_of_page_[std::size_t(p)];
    return s >= 0 && slots_[std::size_t(s)].page == p && slots_[std::size_t(s)].load == load;
  }
  plan_t plan_locked(std::span<const index_t> pages, std::uint64_t load) const {
    plan_t pl;
    for (const index_t p : pages) {
      if (!current_locked(p, load)) ++pl.missing;
      else if (slots_[std::size_t(slot_of_page_[std::size_t(p)])].pins == 0) ++pl.unpinned_hits;
    }
    pl.reusable = lru_.size() - pl.unpinned_hits;
    return pl;
  }
  void pin_locked(index_t s) {
    auto& sl = slots_[std::size_t(s)];
    if (sl.pins++ == 0) lru_.erase(sl.lru);
  }
  void unpin_locked(index_t s) {
    auto& sl = slots_[std::size_t(s)];
    if (--sl.pins == 0) sl.lru = sl.page >= 0 ? lru_.insert(lru_.begin(), s) : lru_.insert(lru_.end(), s);
  }
  /// Pins a slot for every page (plan_locked said there are enough): current ones as they
  /// are, a page whose slot holds an older load of it in that slot, the others in slots
  /// taken from the LRU end; copies those pages. Returns the slots in page order.
  std::vector<index_t> take_slots_locked(std::span<const index_t> pages, std::uint64_t load) {
    std::vector<index_t> taken(pages.size(), -1);
    std::vector<std::size_t> copy;  // positions in `pages` to copy
    for (std::size_t i = 0; i < pages.size(); ++i) {
      const index_t p = pages[i];
      const index_t s = slot_of_page_[std::size_t(p)];
      if (current_locked(p, load)) {
        taken[i] = s;
        pin_locked(s);
      } else if (s >= 0 && slots_[std::size_t(s)].page == p && slots_[std::size_t(s)].pins == 0) {
        taken[i] = s;  // an older load of this page: refreshed in place
        pin_locked(s);
        copy.push_back(i);
      }
    }
    for (std::size_t i = 0; i < pages.size(); ++i) {
      if (taken[i] >= 0) continue;
      const index_t s = lru_.back();  // least recently released (or never used)
      auto& sl = slots_[std::size_t(s)];
      if (sl.page >= 0 && slot_of_page_[std::size_t(sl.page)] == s) {
        slot_of_page_[std::size_t(sl.page)] = -1;
        ++evictions_;
      }
      sl.page = -1;
      taken[i] = s;
      pin_locked(s);
      copy.push_back(i);
    }
    const std::size_t pf = page_bytes_ / sizeof(float);
    std::size_t done = 0;
    try {
      device_guard g(device_);
      for (; done < copy.size(); ++done) {
        const std::size_t i = copy[done];
        const index_t p = pages[i], s = taken[i];
        auto& sl = slots_[std::size_t(s)];
        sl.page = -1;  // not current until its copy completes
        DELTAW_CUDA_CHECK(cudaMemcpy(arena_ + std::size_t(s) * pf, host_.arena() + std::size_t(p) * pf, page_bytes_,
                                     cudaMemcpyHostToDevice));
        sl.page = p;
        sl.load = load;
        slot_of_page_[std::size_t(p)] = s;
      }
    } catch (...) {
      for (std::size_t k = done; k < copy.size(); ++k) {
        const index_t p = pages[copy[k]], s = taken[copy[k]];
        if (slot_of_page_[std::size_t(p)] == s) slot_of_page_[std::size_t(p)] = -1;
        slots_[std::size_t(s)].page = -1;
      }
      for (const index_t s : taken) unpin_locked(s);
      if (waiting_ > 0) cv_.notify_all();
      throw;
    }
    ++acquires_;
    copied_pages_ += copy.size();
    page_hits_ += pages.size() - copy.size();
    if (copy.empty()) ++hits_;
    return taken;
  }
  /// The adapter's modules over the device slots: each slice (a rank block of k rows of A
  /// and k rows of Bᵀ) lies in one host page, found from its A's address, and is viewed at
  /// the same offset in that page's slot.
  std::map<std::string, ::deltaw::serve::sliced_lora<float, device::cuda>, std::less<>> device_modules(
      const ::deltaw::serve::pinned_adapter& h, const std::vector<index_t>& taken) const {
    std::vector<std::pair<index_t, index_t>> slot_of;  // (host page, slot), sorted by page
    const auto pages = h.pages();
    for (std::size_t i = 0; i < pages.size(); ++i) slot_of.emplace_back(pages[i], taken[i]);
    std::sort(slot_of.begin(), slot_of.end());
    const std::ptrdiff_t pf = std::ptrdiff_t(page_bytes_ / sizeof(float));
    const float* host_base = host_.arena();
    auto on_device = [&](const matrix_view<const float>& v, std::ptrdiff_t page, index_t s) {
      const float* page_start = host_base + page * pf;
      return matrix_view<const float, device::cuda>(arena_ + std::ptrdiff_t(s) * pf + (v.data() - page_start), v.rows(),
                                                   v.cols(), v.row_stride(), v.col_stride());
    };
    std::map<std::string, ::deltaw::serve::sliced_lora<float, device::cuda>, std::less<>> out;
    for (const auto& name : h.modules()) {
      std::vector<low_rank<float, device::cuda>> parts;
      for (const auto& part : h.at(name).parts()) {
        const std::ptrdiff_t page = (part.A().data() - host_base) / pf;
        const auto it = std::lower_bound(slot_of.begin(), slot_of.end(), std::pair<index_t, index_t>(index_t(page), -1));
        if (it == slot_of.end() || it->first != index_t(page))
          throw error("deltaw::cuda::serve::device_pool: a slice of module \"" + name + "\" of adapter \"" +
                            h.name() + "\" lies outside the adapter's pages");
        parts.emplace_back(held_matrix<float, device::cuda>{on_device(part.B(), page, it->second), nullptr},
                           held_matrix<float, device::cuda>{on_device(part.A(), page, it->second), nullptr},
                           part.scale());
      }
      out.emplace(name, ::deltaw::serve::sliced_lora<float, device::cuda>(std::move(parts)));
    }
    return out;
  }
  void release_slots(const std::vector<index_t>& taken) noexcept {
    std::lock_guard lk(m_);
    for (const index_t s : taken) unpin_locked(s);
    if (waiting_ > 0) cv_.notify_all();
  }

  ::deltaw::serve::adapter_pool& host_;
  int device_ = 0;
  std::size_t page_bytes_ = 0, budget_bytes_ = 0;  // budget 0: one slot per host page
  float* arena_ = nullptr;
  mutable std::mutex m_;
  std::condition_variable cv_;
  std::vector<slot> slots_;
  std::vector<index_t> slot_of_page_;  // per host page: the slot that last mirrored it (-1: none)
  std::list<index_t> lru_;             // unpinned slots, most recently released first, unused last
  std::size_t acquires_ = 0, hits_ = 0, page_hits_ = 0, copied_pages_ = 0, evictions_ = 0;
  std::size_t failures_ = 0, slot_waits_ = 0, timeouts_ = 0, waiting_ = 0;
};

inline void device_adapter::release() noexcept {
  modules_.clear();
  // The slots first: a pinned slot means its host page is pinned, so no acquire may find
  // the page reloaded (and its slot stale) while the slot still counts this handle's pin.
  if (pool_) pool_->release_slots(slots_);
  pool_ = nullptr;
  slots_.clear();
  host_.release();
}

}  // namespace cuda::serve
DELTAW_NAMESPACE_END
