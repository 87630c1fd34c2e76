// SPDX-License-Identifier: MIT
// The CUDA adapter pool (cuda/include/deltaw/cuda/pool.cuh): host pages cached in device
// slots. With one slot per host page (the full-size constructor): batches over device
// adapters (sliced_lora on the device) against the CPU's batches over the host pool's
// adapters and a dense reference; a hit copies nothing; pages reused by the host for another
// adapter are copied again (a stale page would show up as a wrong result). Under a device
// budget of a few slots: many adapters cycling through it against a per-token dense
// reference; the slots reused least recently released first, against a model of the
// policy; pinned slots never reused; acquires that need more slots than are free fail,
// release their host pins and leave the pool usable, or wait for releases; concurrent
// acquires from several threads give the serial results bit for bit. Errors of the host
// pool reach the caller. Needs nlohmann-json (the host pool's readers), like test_serve's
// pool. In the nvcc build it joins test_cuda_lora, whose test_cuda_lora.cu skips (exit 77)
// without a usable device.
#if __has_include(<nlohmann/json.hpp>)
#include <deltaw/cuda/cuda.hpp>
#include <deltaw/cuda/pool.cuh>
#include <deltaw/cuda/serve.cuh>
#include <deltaw/deltaw.hpp>
#include <deltaw/serve/pool.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <list>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cuda_test_util.cuh"
#include "test_util.hpp"

namespace dw = deltaw;

namespace cuda_pool_test {

using dw::index_t;
using dwcuda::twin;
using dwt::MatD;
namespace sv = dw::serve;

constexpr index_t out = 16, in = 12;

/// An adapter with one module "layer" of rank r (values from seed), and its ΔW in double.
sv::adapter_loader loader(index_t r, std::uint64_t seed) {
  return [=] {
    using MF = dwt::MatF;
    return std::vector<sv::adapter_module>{{"layer", dw::lora(MF(dwt::random<MF>(out, r, seed)),
                                                              MF(dwt::random<MF>(r, in, seed + 1)),
                                                              dw::alpha(double(2 * r)))}};
  };
}
MatD delta_of(index_t r, std::uint64_t seed) {
  using MF = dwt::MatF;
  const MatD B = dwt::random<MF>(out, r, seed).cast<double>(), A = dwt::random<MF>(r, in, seed + 1).cast<double>();
  return 2.0 * B * A;  // α/r = 2
}
index_t rank_of(int i) { return 3 + 2 * (i % 2); }  // 3 (2 pages) or 5 (3 pages)
std::string name_of(int i) {
  std::string n = "a";
  n += std::to_string(i);
  return n;
}

/// The batch of the named adapters on the device (mirror) and the CPU (host pool), and
/// against X·Wᵀ plus each token's ΔW in double; returns the device result's error.
double check_batch(dw::cuda::context& ctx, sv::adapter_pool& host, dw::cuda::serve::device_pool& dp,
                   const std::vector<int>& ids, std::uint64_t seed) {
  std::vector<dw::cuda::serve::device_adapter> dh;
  std::vector<sv::sliced_lora<float, dw::device::cuda>> dl;
  std::vector<sv::pinned_adapter> hh;
  std::vector<sv::sliced_lora<float>> hl;
  for (int i : ids) {
    dh.push_back(dp.acquire(name_of(i)));
    dl.push_back(dh.back().at("layer"));
    hh.push_back(host.acquire(name_of(i)));
    hl.push_back(hh.back().at("layer"));
  }
  const index_t tokens = 2 * index_t(ids.size()) + 1;
  std::vector<index_t> aot;
  for (index_t t = 0; t < tokens; ++t) aot.push_back(t == tokens - 1 ? sv::no_adapter : t % index_t(ids.size()));
  twin<float> W(dwt::random(out, in, seed)), X(dwt::random(tokens, in, seed + 1));
  auto Yg = dwcuda::nan_output<float>(tokens, out, false), Yc = dwcuda::nan_output<float>(tokens, out, false);
  dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), dl, aot, X.gpu(), Yg.gpu());
  sv::apply_lora_batch(W.cpu(), hl, aot, X.cpu(), Yc.cpu());
  MatD ref = X.host_d() * W.host_d().transpose();
  for (index_t t = 0; t + 1 < tokens; ++t) {
    const int i = ids[std::size_t(aot[std::size_t(t)])];
    ref.row(t) += X.host_d().row(t) * delta_of(rank_of(i), 100 + 10 * std::uint64_t(i)).transpose();
  }
  CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= 1e-6);
  return dwt::rel_err(Yg.dev_d(), ref);
}


// ── helpers of the device-budget tests ─────────────────────────────────────────────────────

namespace dcs = dw::cuda::serve;

/// An adapter of the budget tests: one module "layer" of this rank, factors from this seed.
struct spec {
  index_t rank;
  std::uint64_t seed;
};
constexpr std::size_t page = 256;  // bytes: 2 rank vectors of 4·(out + in) = 112 bytes
index_t pages_for(index_t rank) {
  const index_t per_page = index_t(page / (sizeof(float) * std::size_t(out + in)));
  return (rank + per_page - 1) / per_page;
}
/// Specs of n adapters with ranks cycling through first_rank … first_rank + ranks − 1.
std::vector<spec> specs_of(int n, index_t first_rank, index_t ranks, std::uint64_t seed) {
  std::vector<spec> v;
  for (int i = 0; i < n; ++i) v.push_back({first_rank + index_t(i) % ranks, seed + 10 * std::uint64_t(i)});
  return v;
}
void register_all(sv::adapter_pool& host, const std::vector<spec>& specs, const std::string& prefix) {
  for (std::size_t i = 0; i < specs.size(); ++i)
    host.register_loader(prefix + std::to_string(i), loader(specs[i].rank, specs[i].seed));
}

/// One batch over the device adapters hs (batch adapter k is hs[k], of spec specs[ids[k]]):
/// two tokens per adapter and one without, in interleaved order; the device result's error
/// against X·Wᵀ plus each token's ΔW in double from the original factors.
double device_batch_error(dw::cuda::context& ctx, const std::vector<const dcs::device_adapter*>& hs,
                          const std::vector<spec>& specs, const std::vector<int>& ids, std::uint64_t seed,
                          sv::strategy how = sv::strategy::automatic) {
  std::vector<sv::sliced_lora<float, dw::device::cuda>> dl;
  for (const auto* h : hs) dl.push_back(h->at("layer"));
  const index_t tokens = 2 * index_t(hs.size()) + 1;
  std::vector<index_t> aot;
  for (index_t t = 0; t < tokens; ++t) aot.push_back(t == tokens / 2 ? sv::no_adapter : t % index_t(hs.size()));
  twin<float> W(dwt::random(out, in, seed)), X(dwt::random(tokens, in, seed + 1));
  auto Y = dwcuda::nan_output<float>(tokens, out, false);
  dcs::apply_lora_batch(ctx, W.gpu(), dl, aot, X.gpu(), Y.gpu(), sv::batch_options{.how = how});
  MatD ref = X.host_d() * W.host_d().transpose();
  for (index_t t = 0; t < tokens; ++t) {
    if (aot[std::size_t(t)] == sv::no_adapter) continue;
    const spec& sp = specs[std::size_t(ids[std::size_t(aot[std::size_t(t)])])];
    ref.row(t) += X.host_d().row(t) * delta_of(sp.rank, sp.seed).transpose();
  }
  return dwt::rel_err(Y.dev_d(), ref);
}

/// The slot policy of device_pool, written out for a host pool that keeps every adapter
/// resident (no host page is reloaded): slots hold (adapter, page of the adapter) or
/// nothing; pinned slots are counted; unpinned ones are kept most recently released first,
/// unused ones last; an acquire pins the slots holding its pages, then takes the others
/// from the end of that list (a reuse of a slot that held a page is an eviction), or fails
/// without a change when the unpinned slots other than its own are too few.
struct slot_model {
  struct slot {
    int adapter = -1;
    index_t page = 0;
    int pins = 0;
  };
  std::vector<slot> slots;
  std::list<std::size_t> lru;
  std::size_t copies = 0, evictions = 0;

  explicit slot_model(std::size_t n) : slots(n) {
    for (std::size_t s = 0; s < n; ++s) lru.push_back(s);
  }
  void pin(std::size_t s) {
    if (slots[s].pins++ == 0) lru.remove(s);
  }
  /// The slot of each page, or nothing when the acquire fails.
  std::optional<std::vector<std::size_t>> acquire(int a, index_t pages) {
    std::vector<std::optional<std::size_t>> where(static_cast<std::size_t>(pages));
    for (std::size_t s = 0; s < slots.size(); ++s)
      if (slots[s].adapter == a) where[std::size_t(slots[s].page)] = s;
    std::size_t missing = 0, own_unpinned = 0;
    for (const auto& w : where) {
      if (!w) ++missing;
      else if (slots[*w].pins == 0) ++own_unpinned;
    }
    if (missing > lru.size() - own_unpinned) return std::nullopt;
    for (const auto& w : where)
      if (w) pin(*w);
    std::vector<std::size_t> got;
    for (std::size_t k = 0; k < where.size(); ++k) {
      if (!where[k]) {
        const std::size_t s = lru.back();
        if (slots[s].adapter >= 0) ++evictions;
        slots[s].adapter = a;
        slots[s].page = index_t(k);
        pin(s);
        ++copies;
        where[k] = s;
      }
      got.push_back(*where[k]);
    }
    return got;
  }
  void release(const std::vector<std::size_t>& got) {
    for (const std::size_t s : got)
      if (--slots[s].pins == 0) lru.push_front(s);
  }
  std::size_t pinned() const { return slots.size() - lru.size(); }
};

std::set<index_t> slot_set(const dcs::device_adapter& h) { return {h.slots().begin(), h.slots().end()}; }

}  // namespace cuda_pool_test

TEST_CASE("cuda pool: mirrored adapters serve like the host pool's; hits copy nothing; reused pages are copied again") {
  using namespace cuda_pool_test;
  // 112 bytes per rank vector: 2 per 256-byte page; 8 pages in all.
  sv::adapter_pool host({.budget_bytes = 8 * 256, .page_bytes = 256});
  for (int i = 0; i < 5; ++i) host.register_loader(name_of(i), loader(rank_of(i), 100 + 10 * std::uint64_t(i)));
  dw::cuda::serve::device_pool dp(host);
  dw::cuda::context ctx;
  CHECK(dp.stats().pages_total == 8);
  CHECK(dp.stats().slots_total == 8);  // the full-size constructor: a slot per host page

  CHECK(check_batch(ctx, host, dp, {0, 1}, 1) <= 2e-5);
  auto s = dp.stats();
  CHECK(s.copied_pages == 5);  // a0: 2 pages, a1: 3
  CHECK(s.hits == 0);
  CHECK(check_batch(ctx, host, dp, {1, 0}, 2) <= 2e-5);  // both resident: nothing copied
  CHECK(dp.stats().copied_pages == 5);
  CHECK(dp.stats().hits == 2);

  // a2, a3, a4 need 2 + 3 + 2 pages: a0 and a1 are evicted and their pages reused.
  CHECK(check_batch(ctx, host, dp, {2, 3, 4}, 3) <= 2e-5);
  CHECK(host.stats().evictions >= 2);
  const std::size_t before = dp.stats().copied_pages;
  CHECK(before == 5 + 7);
  // a0 again: reloaded on the host into pages that now hold a2…a4's data on the device.
  CHECK(check_batch(ctx, host, dp, {0}, 4) <= 2e-5);
  CHECK(dp.stats().copied_pages == before + 2);
  // One slot per host page: a host page's reload refreshes its own slot, nothing is evicted.
  CHECK(dp.stats().evictions == 0);
  CHECK(dp.stats().slots_used <= dp.stats().slots_total);
  CHECK(dp.stats().slots_pinned == 0);

  // The host pool's errors reach the caller.
  dwt::check_throws_with<sv::adapter_error>([&] { (void)dp.acquire("missing"); }, {"missing"});
  const auto h = dp.acquire(name_of(0));
  dwt::check_throws_with<sv::adapter_error>([&] { (void)h.at("other"); }, {"has no module \"other\""});
}

TEST_CASE("cuda pool: concurrent acquires and batches from four threads give the serial results") {
  using namespace cuda_pool_test;
  // 14 pages: four threads pin at most 4 × 3 while the six adapters need 15, so adapters
  // are still evicted and their pages reused while others are in flight.
  sv::adapter_pool host({.budget_bytes = 14 * 256, .page_bytes = 256});
  for (int i = 0; i < 6; ++i) host.register_loader(name_of(i), loader(rank_of(i), 100 + 10 * std::uint64_t(i)));
  dw::cuda::serve::device_pool dp(host);
  std::atomic<int> bad{0};
  std::mutex first_error_mutex;
  std::string first_error;
  std::vector<std::thread> threads;
  for (int th = 0; th < 4; ++th)
    threads.emplace_back([&, th] {
      dw::cuda::context ctx;
      for (int it = 0; it < 20; ++it) try {
        const int i = (th * 7 + it * 3) % 6;
        auto a = dp.acquire(name_of(i));
        const auto& l = a.at("layer");
        twin<float> W(dwt::random(out, in, 50 + it)), X(dwt::random(3, in, 60 + it));
        auto Y = dwcuda::nan_output<float>(3, out, false);
        const std::vector<sv::sliced_lora<float, dw::device::cuda>> one = {l};
        const std::vector<index_t> aot = {0, 0, 0};
        dw::cuda::serve::apply_lora_batch(ctx, W.gpu(), one, aot, X.gpu(), Y.gpu());
        const MatD ref = X.host_d() * (W.host_d() + delta_of(rank_of(i), 100 + 10 * std::uint64_t(i))).transpose();
        if (!(dwt::rel_err(Y.dev_d(), ref) <= 2e-5)) ++bad;
      } catch (const std::exception& e) {
        ++bad;
        const std::lock_guard lk(first_error_mutex);
        if (first_error.empty()) first_error = e.what();
      }
    });
  for (auto& t : threads) t.join();
  INFO("first error: " << first_error);
  CHECK(bad.load() == 0);
  CHECK(dp.stats().acquires == 80);
  CHECK(host.stats().evictions > 0);
}

TEST_CASE("cuda pool: a device budget of a few slots serves many adapters cycling through it") {
  using namespace cuda_pool_test;
  // 16 adapters of ranks 1…6 (1 to 3 pages, 31 in all) in a host pool of 20 pages (the host
  // evicts and reloads too) and 6 device slots: a batch of two adapters (at most 6 pages)
  // always fits, and most acquires reuse slots.
  const auto specs = specs_of(16, 1, 6, 300);
  sv::adapter_pool host({.budget_bytes = 20 * page, .page_bytes = page});
  register_all(host, specs, "c");
  dcs::device_pool dp(host, std::size_t(6 * page + page / 2));  // a partial page is no slot
  dw::cuda::context ctx;
  CHECK(dp.stats().slots_total == 6);
  CHECK(dp.stats().pages_total == 20);
  CHECK(dp.stats().device_bytes() == 6 * page);

  std::mt19937 g(7);
  std::uniform_int_distribution<int> pick(0, 15);
  std::size_t pages_acquired = 0, worst_pinned = 0;
  double worst = 0;
  for (int b = 0; b < 60; ++b) {
    const int i = pick(g);
    int j = pick(g);
    if (j == i) j = (i + 1) % 16;
    const auto hi = dp.acquire("c" + std::to_string(i));
    const auto hj = dp.acquire("c" + std::to_string(j));
    CHECK(index_t(hi.slots().size()) == pages_for(specs[std::size_t(i)].rank));
    CHECK(index_t(hj.slots().size()) == pages_for(specs[std::size_t(j)].rank));
    pages_acquired += hi.slots().size() + hj.slots().size();
    // The two adapters' slots are distinct and both pinned.
    std::set<index_t> both = slot_set(hi);
    both.insert(hj.slots().begin(), hj.slots().end());
    CHECK(both.size() == hi.slots().size() + hj.slots().size());
    worst_pinned = std::max(worst_pinned, dp.stats().slots_pinned);
    CHECK(dp.stats().slots_pinned == both.size());
    const auto how = b % 3 == 0 ? sv::strategy::segments : b % 3 == 1 ? sv::strategy::gather : sv::strategy::automatic;
    worst = std::max(worst, device_batch_error(ctx, {&hi, &hj}, specs, {i, j}, 1000 + std::uint64_t(b), how));
  }
  CHECK(worst <= 2e-5);
  const auto s = dp.stats();
  CHECK(s.acquires == 120);
  CHECK(s.failures == 0);
  CHECK(s.page_hits + s.copied_pages == pages_acquired);
  CHECK(s.copied_pages > s.slots_total);  // slots were reused …
  CHECK(s.evictions > 0);                 // … displacing other pages' mirrors
  CHECK(s.page_hits > 0);
  CHECK(s.slots_used <= s.slots_total);
  CHECK(s.slots_pinned == 0);
  CHECK(worst_pinned <= 6);
  CHECK(host.stats().evictions > 0);
  CHECK(host.stats().pinned == 0);
}

TEST_CASE("cuda pool: hits copy nothing and slots are reused least recently released first") {
  using namespace cuda_pool_test;
  dw::cuda::context ctx;
  SUBCASE("explicit order") {
    const auto specs = specs_of(3, 3, 1, 400);  // rank 3: 2 pages each
    sv::adapter_pool host({.budget_bytes = 32 * page, .page_bytes = page});
    register_all(host, specs, "b");
    dcs::device_pool dp(host, std::size_t(4 * page));
    std::set<index_t> b0_slots, b1_slots, b2_slots;
    {
      const auto h = dp.acquire("b0");
      b0_slots = slot_set(h);
      CHECK(dp.stats().copied_pages == 2);
    }
    {
      const auto h = dp.acquire("b0");  // a hit: the same slots, nothing copied
      CHECK(slot_set(h) == b0_slots);
      CHECK(dp.stats().copied_pages == 2);
      CHECK(dp.stats().hits == 1);
      CHECK(dp.stats().page_hits == 2);
      CHECK(device_batch_error(ctx, {&h}, specs, {0}, 1) <= 2e-5);
    }
    {
      const auto h = dp.acquire("b1");  // the two unused slots
      b1_slots = slot_set(h);
      CHECK(dp.stats().copied_pages == 4);
      CHECK(dp.stats().evictions == 0);
      CHECK(dp.stats().slots_used == 4);
    }
    { const auto h = dp.acquire("b0"); }  // b0 released after b1: b1 is the least recent
    {
      const auto h = dp.acquire("b2");
      b2_slots = slot_set(h);
      CHECK(b2_slots == b1_slots);
      CHECK(dp.stats().evictions == 2);
      CHECK(device_batch_error(ctx, {&h}, specs, {2}, 2) <= 2e-5);
    }
    {
      const auto h = dp.acquire("b0");  // still cached
      CHECK(slot_set(h) == b0_slots);
      CHECK(dp.stats().copied_pages == 6);
    }
    {
      const auto h = dp.acquire("b1");  // b2 released before b0: b2's slots are reused
      CHECK(slot_set(h) == b2_slots);
      CHECK(dp.stats().copied_pages == 8);
      CHECK(dp.stats().evictions == 4);
      CHECK(device_batch_error(ctx, {&h}, specs, {1}, 3) <= 2e-5);
    }
    const auto s = dp.stats();
    CHECK(s.acquires == 7);
    CHECK(s.hits == 3);
    CHECK(s.page_hits + s.copied_pages == 14);
  }
  SUBCASE("a random sequence against a model of the policy") {
    // 7 adapters of 1 to 3 pages, 5 slots; up to three adapters held at once (some
    // acquires fail), the same adapter sometimes twice.
    const auto specs = specs_of(7, 1, 6, 500);
    sv::adapter_pool host({.budget_bytes = 32 * page, .page_bytes = page});
    register_all(host, specs, "m");
    dcs::device_pool dp(host, std::size_t(5 * page));
    slot_model model(5);
    struct held {
      int id;
      dcs::device_adapter h;
      std::vector<std::size_t> model_slots;
    };
    std::vector<held> hold;
    std::mt19937 g(11);
    std::size_t failures = 0, mismatches = 0;
    double worst = 0;
    for (int step = 0; step < 400; ++step) {
      if (!hold.empty() && (hold.size() >= 3 || g() % 2 == 0)) {
        const std::size_t k = g() % hold.size();
        model.release(hold[k].model_slots);
        if (g() % 2 == 0) hold[k].h.release();  // or the destructor
        hold.erase(hold.begin() + std::ptrdiff_t(k));
      } else {
        const int a = int(g() % 7);
        const auto expect = model.acquire(a, pages_for(specs[std::size_t(a)].rank));
        try {
          auto h = dp.acquire("m" + std::to_string(a));
          if (!expect) ++mismatches;
          else hold.push_back({a, std::move(h), *expect});
        } catch (const dcs::device_slots_error& e) {
          ++failures;
          if (expect) ++mismatches;
          CHECK(std::string(e.what()).find("\"m" + std::to_string(a) + "\"") != std::string::npos);
        }
      }
      const auto s = dp.stats();
      if (s.copied_pages != model.copies || s.evictions != model.evictions || s.slots_pinned != model.pinned())
        ++mismatches;
      if (step % 16 == 0 && !hold.empty()) {
        std::vector<const dcs::device_adapter*> hs;
        std::vector<int> ids;
        for (const auto& x : hold) {
          hs.push_back(&x.h);
          ids.push_back(x.id);
        }
        worst = std::max(worst, device_batch_error(ctx, hs, specs, ids, 2000 + std::uint64_t(step)));
      }
    }
    CHECK(mismatches == 0);
    CHECK(failures > 0);
    CHECK(failures == dp.stats().failures);
    CHECK(model.evictions > 0);
    CHECK(worst <= 2e-5);
    hold.clear();
    CHECK(dp.stats().slots_pinned == 0);
    CHECK(host.stats().pinned == 0);
  }
}

TEST_CASE("cuda pool: too few free slots fail the acquire, release its host pin and leave the pool usable") {
  using namespace cuda_pool_test;
  // e0: 2 pages, e1: 3 pages, e2: 5 pages; 4 device slots.
  const std::vector<spec> specs = {{3, 600}, {5, 610}, {9, 620}};
  sv::adapter_pool host({.budget_bytes = 32 * page, .page_bytes = page});
  register_all(host, specs, "e");
  dcs::device_pool dp(host, std::size_t(4 * page));
  dw::cuda::context ctx;

  auto h0 = dp.acquire("e0");
  dwt::check_throws_with<dcs::device_slots_error>(
      [&] { (void)dp.acquire("e1"); },
      {"device_pool::acquire", "adapter \"e1\"", "occupies 3 host pages", "for 3 of them",
       "only 2 of the device pool's 4 slots", "2 are pinned", "device budget of 1024 bytes"});
  CHECK(host.stats().pinned == 1);  // e1's host pin was released
  CHECK(host.is_resident("e1"));    // … and the host pool kept the adapter
  CHECK(dp.stats().failures == 1);
  CHECK(dp.stats().slots_pinned == 2);
  CHECK(dp.stats().copied_pages == 2);  // nothing was copied or displaced
  CHECK(dp.stats().evictions == 0);

  // Larger than the whole device pool: fails at once, whatever the wait.
  const auto t0 = std::chrono::steady_clock::now();
  dwt::check_throws_with<dcs::device_slots_error>([&] { (void)dp.acquire("e2", std::chrono::seconds(30)); },
                                                   {"adapter \"e2\"", "occupies 5 host pages", "has only 4 slots", "raise it"});
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10));
  CHECK(host.stats().pinned == 1);

  // A wait that runs out.
  dwt::check_throws_with<dcs::device_slots_error>([&] { (void)dp.acquire("e1", std::chrono::milliseconds(30)); },
                                                   {"adapter \"e1\"", "waited 30 ms", "2 are pinned"});
  CHECK(dp.stats().timeouts == 1);
  CHECK(dp.stats().slot_waits == 1);
  CHECK(dp.stats().failures == 3);
  CHECK(host.stats().pinned == 1);

  // A wait that another thread's release ends (released once this acquire is waiting).
  std::thread releaser([&] {
    while (dp.stats().waiting == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    h0.release();
  });
  auto h1 = dp.acquire("e1", std::chrono::seconds(60));
  releaser.join();
  CHECK(dp.stats().slot_waits == 2);
  CHECK(dp.stats().timeouts == 1);
  CHECK(dp.stats().waiting == 0);
  CHECK(!h0);
  CHECK(device_batch_error(ctx, {&h1}, specs, {1}, 5) <= 2e-5);

  // Usable: release, reacquire, serve; moved-from handles release nothing.
  h1 = dcs::device_adapter{};
  CHECK(dp.stats().slots_pinned == 0);
  auto a = dp.acquire("e0");
  auto b = std::move(a);
  a.release();  // empty: a no-op
  CHECK(dp.stats().slots_pinned == 2);
  CHECK(host.stats().pinned == 1);
  dcs::device_adapter c;
  c = std::move(b);
  CHECK(device_batch_error(ctx, {&c}, specs, {0}, 6) <= 2e-5);
  std::thread([&] { c.release(); }).join();  // from another thread
  c.release();                                // twice: a no-op
  CHECK(dp.stats().slots_pinned == 0);
  CHECK(host.stats().pinned == 0);
  const auto h = dp.acquire("e1");
  CHECK(device_batch_error(ctx, {&h}, specs, {1}, 7) <= 2e-5);

  // A budget below one page, and an int where the budget was meant (the device overload).
  dwt::check_throws_with<dw::argument_error>([&] { dcs::device_pool bad(host, std::size_t(page - 1)); },
                                             {"a device budget of 255 bytes holds no page", "256 bytes"});
  dwt::check_throws_with<dw::argument_error>([&] { dcs::device_pool bad(host, 1024); },
                                             {"device 1024 does not exist", "std::size_t"});
}

TEST_CASE("cuda pool: pinned slots are never reused while their device adapter lives") {
  using namespace cuda_pool_test;
  const auto specs = specs_of(9, 1, 6, 700);  // 1 to 3 pages
  sv::adapter_pool host({.budget_bytes = 64 * page, .page_bytes = page});
  register_all(host, specs, "p");
  dcs::device_pool dp(host, std::size_t(5 * page));
  dw::cuda::context ctx;
  const auto kept = dp.acquire("p2");  // rank 3: 2 pages pinned throughout
  const auto kept_slots = slot_set(kept);
  REQUIRE(kept_slots.size() == 2);
  {
    const auto again = dp.acquire("p2");  // a second handle: a hit on the pinned slots
    CHECK(slot_set(again) == kept_slots);
    CHECK(dp.stats().hits == 1);
    CHECK(dp.stats().slots_pinned == 2);
  }
  CHECK(dp.stats().slots_pinned == 2);  // still pinned by `kept`
  std::size_t overlaps = 0;
  double worst = 0;
  for (int it = 0; it < 40; ++it) {
    const int i = std::array{0, 1, 3, 4, 5, 6, 7, 8}[std::size_t(it % 8)];
    const auto h = dp.acquire("p" + std::to_string(i));
    for (const index_t sl : h.slots()) overlaps += kept_slots.count(sl);
    worst = std::max(worst, device_batch_error(ctx, {&h, &kept}, specs, {i, 2}, 3000 + std::uint64_t(it)));
  }
  CHECK(overlaps == 0);
  CHECK(worst <= 2e-5);
  CHECK(dp.stats().evictions > 0);
  CHECK(dp.stats().slots_pinned == 2);
  CHECK(device_batch_error(ctx, {&kept}, specs, {2}, 4000) <= 2e-5);  // its data intact
}

TEST_CASE("cuda pool: 4 threads x 200 requests under tight budgets give the serial results bit for bit") {
  using namespace cuda_pool_test;
  // 10 adapters (1 to 3 pages, 20 in all), a host pool of 7 pages and 5 device slots: four
  // threads holding one adapter each pin up to 12 host pages and 12 slots, so acquires wait
  // for each other on the host and on the device, and both evict.
  const auto specs = specs_of(10, 1, 6, 800);
  constexpr int threads = 4, requests = 200;
  std::vector<int> adapter_of(threads * requests);
  {
    std::mt19937 g(13);
    for (auto& a : adapter_of) a = int(g() % 10);
  }
  twin<float> W(dwt::random(out, in, 900));
  const auto Wg = W.gpu();
  const std::vector<index_t> aot = {0, sv::no_adapter, 0};
  // Request k: its adapter over X_k (3 tokens, the middle one without adapter).
  auto serve = [&](dcs::device_pool& dp, dw::cuda::context& ctx, int k) {
    const auto h = dp.acquire("r" + std::to_string(adapter_of[std::size_t(k)]), std::chrono::seconds(60));
    const std::vector<sv::sliced_lora<float, dw::device::cuda>> one = {h.at("layer")};
    twin<float> X(dwt::random(3, in, 10000 + std::uint64_t(k)));
    auto Y = dwcuda::nan_output<float>(3, out, false);
    dcs::apply_lora_batch(ctx, Wg, one, aot, X.gpu(), Y.gpu(), sv::batch_options{.parallel = false});
    return Y.dev_d();
  };
  auto make_host = [&] {
    auto p = std::make_unique<sv::adapter_pool>(
        sv::pool_options{.budget_bytes = 7 * page, .page_bytes = page, .pin_wait = std::chrono::seconds(60)});
    register_all(*p, specs, "r");
    return p;
  };

  std::vector<MatD> parallel(adapter_of.size()), serial(adapter_of.size());
  const auto host = make_host();
  dcs::device_pool dp(*host, std::size_t(5 * page));
  std::mutex first_error_mutex;
  std::string first_error;
  std::vector<std::thread> pool;
  for (int th = 0; th < threads; ++th)
    pool.emplace_back([&, th] {
      dw::cuda::context ctx;
      for (int it = 0; it < requests; ++it) {
        const int k = th * requests + it;
        try {
          parallel[std::size_t(k)] = serve(dp, ctx, k);
        } catch (const std::exception& e) {
          const std::lock_guard lk(first_error_mutex);
          if (first_error.empty()) first_error = e.what();
        }
      }
    });
  for (auto& t : pool) t.join();
  INFO("first error: " << first_error);
  CHECK(first_error.empty());

  {
    const auto host_serial = make_host();
    dcs::device_pool dp_serial(*host_serial, std::size_t(5 * page));
    dw::cuda::context ctx;
    for (int k = 0; k < threads * requests; ++k) serial[std::size_t(k)] = serve(dp_serial, ctx, k);
  }
  std::size_t differ = 0;
  double worst = 0;
  for (std::size_t k = 0; k < serial.size(); ++k) {
    if (parallel[k].rows() != serial[k].rows() || parallel[k] != serial[k]) ++differ;
    const spec& sp = specs[std::size_t(adapter_of[k])];
    const MatD X = dwt::random(3, in, 10000 + std::uint64_t(k)).cast<float>().cast<double>();
    MatD ref = X * W.host_d().transpose();
    ref.row(0) += X.row(0) * delta_of(sp.rank, sp.seed).transpose();
    ref.row(2) += X.row(2) * delta_of(sp.rank, sp.seed).transpose();
    worst = std::max(worst, dwt::rel_err(serial[k], ref));
  }
  CHECK(differ == 0);
  CHECK(worst <= 2e-5);
  const auto s = dp.stats();
  CHECK(s.acquires == std::size_t(threads * requests));
  CHECK(s.failures == 0);
  CHECK(s.evictions > 0);
  CHECK(s.slots_pinned == 0);
  CHECK(s.waiting == 0);
  CHECK(host->stats().pinned == 0);
  CHECK(host->stats().evictions > 0);
  MESSAGE("device waits " << s.slot_waits << ", host waits " << host->stats().pin_waits << ", copied pages "
                          << s.copied_pages << ", evictions " << s.evictions);
}
#endif
