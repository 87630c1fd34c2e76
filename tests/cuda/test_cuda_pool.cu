// SPDX-License-Identifier: MIT
// The CUDA adapter pool (cuda/include/deltaw/cuda/pool.cuh): a device mirror of the host
// pool's pages. Batches over mirrored adapters (sliced_lora on the device) against the CPU's
// batches over the host pool's adapters and a dense reference; a hit copies nothing; pages
// reused by the host for another adapter are copied again (a stale page would show up as
// a wrong result); concurrent acquires from several threads; errors of the host pool
// reach the caller. Needs nlohmann-json (the host pool's readers), like test_serve's pool.
// In the nvcc build it joins test_cuda_lora, whose test_cuda_lora.cu skips (exit 77)
// without a usable device.
#if __has_include(<nlohmann/json.hpp>)
#include <deltaw/cuda/cuda.hpp>
#include <deltaw/cuda/pool.cuh>
#include <deltaw/cuda/serve.cuh>
#include <deltaw/deltaw.hpp>
#include <deltaw/serve/pool.hpp>

#include <atomic>
#include <mutex>
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

}  // namespace cuda_pool_test

TEST_CASE("cuda pool: mirrored adapters serve like the host pool's; hits copy nothing; reused pages are copied again") {
  using namespace cuda_pool_test;
  // 112 bytes per rank vector: 2 per 256-byte page; 8 pages in all.
  sv::adapter_pool host({.budget_bytes = 8 * 256, .page_bytes = 256});
  for (int i = 0; i < 5; ++i) host.register_loader(name_of(i), loader(rank_of(i), 100 + 10 * std::uint64_t(i)));
  dw::cuda::serve::device_pool dp(host);
  dw::cuda::context ctx;
  CHECK(dp.stats().pages_total == 8);

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
#endif
