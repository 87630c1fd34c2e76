// SPDX-License-Identifier: MIT
// The CUDA side of the adapter pool (deltaw/serve/pool.hpp, docs/serving.md): a device
// mirror of the host pool's arena, page for page. The host pool decides what is resident
// (byte budget, fixed-size pages, LRU eviction, pins); device_pool holds one device
// allocation of the same size and copies a host page to its device twin when an adapter
// that occupies it is acquired and the twin holds an older load (each load of an adapter
// has an id; a page's contents change only when a later load reuses it, never while it is
// pinned). A hit copies nothing.
//
//   device_pool dp(host_pool);                 // cudaMalloc of host_pool's arena size
//   auto h = dp.acquire("name");               // pins on the host, mirrors missing pages
//   const auto& q = h.at("model.layers.0.self_attn.q_proj");  // sliced_lora<float, device::cuda>
//   cuda::serve::apply_lora_batch(ctx, W, std::vector{q, …}, adapter_of_token, X, Y);
//
// The device adapter keeps the host pin (and so both pages) until it is destroyed or
// released. Copies are synchronous (cudaMemcpy) and made under the mirror's lock, so a
// page is complete on the device before any thread sees it marked current; the legacy
// default stream they run on also orders them after work already issued on the
// contexts' blocking streams. Thread-safe: acquire from any thread.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <deltaw/serve/pool.hpp>

#include "context.cuh"
#include "error.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda::serve {

/// Counters of a device_pool.
struct device_pool_stats {
  std::size_t acquires = 0;      ///< acquire calls that returned an adapter
  std::size_t copied_pages = 0;  ///< host pages copied to the device
  std::size_t hits = 0;          ///< acquires whose pages were all current on the device
  std::size_t page_bytes = 0, pages_total = 0;
};

/// An adapter pinned on the host with its pages current on the device: its modules as
/// sliced_lora<float, device::cuda> over the device pages. Move-only.
class device_adapter {
 public:
  device_adapter() = default;
  device_adapter(device_adapter&&) noexcept = default;
  device_adapter& operator=(device_adapter&&) noexcept = default;

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
  /// Unpins now (the handle becomes empty; the device views must no longer be used).
  void release() {
    modules_.clear();
    host_.release();
  }

 private:
  friend class device_pool;
  device_adapter(::deltaw::serve::pinned_adapter h, const float* host_base, float* dev_base) : host_(std::move(h)) {
    for (const auto& name : host_.modules()) {
      std::vector<low_rank<float, device::cuda>> parts;
      for (const auto& p : host_.at(name).parts())
        parts.emplace_back(held_matrix<float, device::cuda>{on_device(p.B(), host_base, dev_base), nullptr},
                           held_matrix<float, device::cuda>{on_device(p.A(), host_base, dev_base), nullptr}, p.scale());
      modules_.emplace(name, ::deltaw::serve::sliced_lora<float, device::cuda>(std::move(parts)));
    }
  }
  /// The same view over the device twin of the host arena.
  static matrix_view<const float, device::cuda> on_device(const matrix_view<const float>& v, const float* host_base,
                                                         float* dev_base) {
    return {dev_base + (v.data() - host_base), v.rows(), v.cols(), v.row_stride(), v.col_stride()};
  }

  ::deltaw::serve::pinned_adapter host_;
  std::map<std::string, ::deltaw::serve::sliced_lora<float, device::cuda>, std::less<>> modules_;
};

/// The device mirror of a host adapter_pool (which must outlive it and its adapters).
class device_pool {
 public:
  /// Allocates the device twin of host's arena on `device` (default: the current one).
  explicit device_pool(::deltaw::serve::adapter_pool& host, int device = -1)
      : host_(host), device_(device >= 0 ? device : current_device()), stamp_(host.page_count(), 0) {
    device_guard g(device_);
    const std::size_t bytes = host.page_count() * host.page_bytes();
    DELTAW_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&arena_), std::max<std::size_t>(bytes, 1)));
  }
  device_pool(const device_pool&) = delete;
  device_pool& operator=(const device_pool&) = delete;
  ~device_pool() {
    device_guard g(device_);
    (void)cudaFree(arena_);
  }

  /// Pins `name` on the host (loading it there if needed, with the host pool's errors and
  /// waits) and makes its pages current on the device.
  device_adapter acquire(std::string_view name) {
    auto h = host_.acquire(name);
    const std::size_t pb = host_.page_bytes(), pf = pb / sizeof(float);
    std::lock_guard lk(m_);
    std::size_t copied = 0;
    for (const index_t p : h.pages()) {
      if (stamp_[std::size_t(p)] == h.load_id()) continue;
      device_guard g(device_);
      DELTAW_CUDA_CHECK(cudaMemcpy(arena_ + std::size_t(p) * pf, host_.arena() + std::size_t(p) * pf, pb,
                                   cudaMemcpyHostToDevice));
      stamp_[std::size_t(p)] = h.load_id();
      ++copied;
    }
    ++stats_.acquires;
    stats_.copied_pages += copied;
    if (copied == 0) ++stats_.hits;
    return device_adapter(std::move(h), host_.arena(), arena_);
  }

  device_pool_stats stats() const {
    std::lock_guard lk(m_);
    auto s = stats_;
    s.page_bytes = host_.page_bytes();
    s.pages_total = host_.page_count();
    return s;
  }
  ::deltaw::serve::adapter_pool& host() { return host_; }

 private:
  static int current_device() {
    int d = 0;
    DELTAW_CUDA_CHECK(cudaGetDevice(&d));
    return d;
  }

  ::deltaw::serve::adapter_pool& host_;
  int device_ = 0;
  float* arena_ = nullptr;
  mutable std::mutex m_;
  std::vector<std::uint64_t> stamp_;  // per page: the load id its device twin holds (0: none)
  device_pool_stats stats_;
};

}  // namespace cuda::serve
DELTAW_NAMESPACE_END
