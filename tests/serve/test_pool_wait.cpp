// The adapter pool's waiting acquire (deltaw/serve/pool.hpp, pool_options::pin_wait): a
// request whose pages are pinned by in-flight requests blocks until they are released,
// instead of failing; a bounded wait throws pool_timeout_error; an adapter larger than the
// whole pool fails at once. Threads are synchronised through the pool's own state
// (stats().waiting), never by sleeping.
#include <deltaw/serve/pool.hpp>

#include <atomic>
#include <memory>
#include <optional>
#include <random>
#include <thread>

#include "test_util.hpp"

namespace dw = deltaw;
namespace sv = deltaw::serve;

namespace pool_wait_test {

using MatD = dwt::MatD;
using MatF = dwt::MatF;

/// One module "layer" [out, in] of rank r, ΔW = (2r / r)·B·A, from fixed seeds.
sv::adapter_loader layer_adapter(dw::index_t out, dw::index_t in, dw::index_t r, std::uint64_t seed) {
  return [=] {
    return std::vector<sv::adapter_module>{
        {"layer", dw::lora(MatF(dwt::random<MatF>(out, r, seed)), MatF(dwt::random<MatF>(r, in, seed + 1)),
                           dw::alpha(double(2 * r)))}};
  };
}

/// A float view (any strides) in double.
MatD to_double(const dw::matrix_view<const float>& v) {
  MatD d(v.rows(), v.cols());
  for (Eigen::Index i = 0; i < d.rows(); ++i)
    for (Eigen::Index j = 0; j < d.cols(); ++j) d(i, j) = v(i, j);
  return d;
}
/// s·B·A in double, summed over the pages of a pooled module.
MatD dense_paged(const sv::sliced_lora<float>& s) {
  MatD D = MatD::Zero(s.rows(), s.cols());
  for (const auto& p : s.parts()) D += p.scale() * to_double(p.B()) * to_double(p.A());
  return D;
}
MatD dense_loaded(const sv::adapter_loader& l) {
  const auto m = l();
  return m[0].lora.scale() * to_double(m[0].lora.B()) * to_double(m[0].lora.A());
}

/// Spins (yielding) until `n` acquires wait for pinned pages: the pool's state, not a timer.
void until_waiting(const sv::adapter_pool& pool, std::size_t n) {
  while (pool.stats().waiting < n) std::this_thread::yield();
}

std::string adapter_name(int i) {
  std::string n = "w";
  n += std::to_string(i);
  return n;
}

}  // namespace pool_wait_test

TEST_CASE("pool: acquire waits for pinned pages to be released, then evicts them") {
  namespace pw = pool_wait_test;
  // Pages of 64 floats hold 2 rank vectors of [16, 16]: rank 8 takes 4 pages, rank 12 takes 6.
  sv::adapter_pool pool({.budget_bytes = 8 * 256, .page_bytes = 256, .pin_wait = sv::pool_options::wait_forever});
  pool.register_loader("a", pw::layer_adapter(16, 16, 8, 10));
  pool.register_loader("b", pw::layer_adapter(16, 16, 8, 20));
  pool.register_loader("big", pw::layer_adapter(16, 16, 12, 30));
  auto pa = pool.acquire("a");
  auto pb = pool.acquire("b");
  CHECK(pool.stats().pages_used == 8);

  std::optional<sv::pinned_adapter> got, got_too;
  std::thread first([&] { got.emplace(pool.acquire("big")); });
  pw::until_waiting(pool, 1);
  // A second request for the same adapter waits for the first one's load (it does not
  // count as waiting for pages itself).
  std::thread second([&] { got_too.emplace(pool.acquire("big")); });
  CHECK_FALSE(pool.is_resident("big"));
  pa.release();  // 4 pages evictable: still 2 short, so the request keeps waiting
  CHECK(pool.stats().waiting == 1);
  CHECK_FALSE(pool.is_resident("big"));
  CHECK(pool.is_resident("a"));  // nothing is evicted while the request cannot be served
  pb.release();
  first.join();
  second.join();
  REQUIRE(got.has_value());
  REQUIRE(got_too.has_value());
  CHECK(&got->at("layer") == &got_too->at("layer"));  // one load, shared pages
  CHECK(dwt::rel_err(pw::dense_paged(got->at("layer")), pw::dense_loaded(pw::layer_adapter(16, 16, 12, 30))) <= 1e-15);
  CHECK_FALSE(pool.is_resident("a"));
  CHECK_FALSE(pool.is_resident("b"));
  const auto s = pool.stats();
  CHECK(s.evictions == 2);
  CHECK(s.pin_waits == 1);
  CHECK(s.waiting == 0);
  CHECK(s.failures == 0);
  CHECK(s.timeouts == 0);
  CHECK(s.pages_used == 6);
  CHECK(s.pinned == 1);
}

TEST_CASE("pool: a bounded wait for pinned pages times out with a clear error; too large fails at once") {
  namespace pw = pool_wait_test;
  sv::adapter_pool pool({.budget_bytes = 8 * 256, .page_bytes = 256});  // pin_wait 0: fail at once
  pool.register_loader("a", pw::layer_adapter(16, 16, 8, 10));
  pool.register_loader("b", pw::layer_adapter(16, 16, 8, 20));
  pool.register_loader("big", pw::layer_adapter(16, 16, 12, 30));
  pool.register_loader("huge", pw::layer_adapter(16, 16, 20, 40));  // 10 pages > 8
  {
    auto pa = pool.acquire("a");
    auto pb = pool.acquire("b");
    dwt::check_throws_with<sv::pool_timeout_error>([&] { (void)pool.acquire("big", std::chrono::milliseconds(30)); },
                                                   {"adapter \"big\" needs 6 pages", "waited 30 ms", "8 are pinned"});
    // The default (no wait) is an adapter_error, not a timeout.
    bool timeout = false, refused = false;
    try {
      (void)pool.acquire("big");
    } catch (const sv::pool_timeout_error&) {
      timeout = true;
    } catch (const sv::adapter_error&) {
      refused = true;
    }
    CHECK_FALSE(timeout);
    CHECK(refused);
    // Larger than the pool: no wait could serve it, so even wait_forever fails at once.
    dwt::check_throws_with<sv::adapter_error>([&] { (void)pool.acquire("huge", sv::pool_options::wait_forever); },
                                              {"adapter \"huge\" needs 10 pages", "the pool has only 8", "budget_bytes"});
    CHECK(pool.is_resident("a"));
    CHECK(pool.is_resident("b"));
    const auto s = pool.stats();
    CHECK(s.timeouts == 1);
    CHECK(s.pin_waits == 1);
    CHECK(s.failures == 3);
    CHECK(s.waiting == 0);
  }
  // Nothing was cached by the failures: with the pins gone the same request is served.
  auto big = pool.acquire("big", std::chrono::milliseconds(30));
  CHECK(big.at("layer").rank() == 12);
  CHECK(pool.stats().evictions == 2);
}

TEST_CASE("pool: 6 threads over a pool that holds one adapter, waiting: every request served and exact") {
  namespace pw = pool_wait_test;
  constexpr int adapters = 10, threads = 6, per_thread = 200;
  constexpr dw::index_t out = 16, in = 16, tokens = 2;
  // 5 pages; ranks 5 … 8 take 3 or 4 pages: one adapter fits at a time, so a request for
  // another one waits while the first is pinned (with pin_wait 0 it would fail).
  sv::adapter_pool pool({.budget_bytes = 5 * 256, .page_bytes = 256, .pin_wait = sv::pool_options::wait_forever});
  for (int a = 0; a < adapters; ++a) pool.register_loader(pw::adapter_name(a), pw::layer_adapter(out, in, 5 + a % 4, 500 + 3 * a));
  const dwt::MatD W = dwt::random<dwt::MatD>(out, in, 1);
  std::vector<dwt::MatD> X, ref;
  for (int a = 0; a < adapters; ++a) {
    X.push_back(dwt::random<dwt::MatD>(tokens, in, 60 + a));
    ref.push_back(X.back() * (W + pw::dense_loaded(pw::layer_adapter(out, in, 5 + a % 4, 500 + 3 * a))).transpose());
  }
  const std::vector<dw::index_t> idx = {0, 0};
  std::atomic<int> wrong{0}, failed{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      std::mt19937 g(unsigned(t + 7));
      std::uniform_int_distribution<int> d(0, adapters - 1);
      for (int i = 0; i < per_thread; ++i) {
        const int a = d(g);
        try {
          auto h = pool.acquire(pw::adapter_name(a));  // one pin per thread at a time
          std::vector<sv::sliced_lora<float>> one = {h.at("layer")};
          dwt::MatD Y(tokens, out);
          sv::apply_lora_batch(W, one, idx, X[std::size_t(a)], Y, {.parallel = false});
          if (!((Y - ref[std::size_t(a)]).norm() <= 1e-12 * ref[std::size_t(a)].norm())) ++wrong;
        } catch (const sv::adapter_error&) {
          ++failed;
        }
      }
    });
  for (auto& th : ts) th.join();
  const auto s = pool.stats();
  MESSAGE("waiting pool: " << s.hits << " hits, " << s.misses << " misses, " << s.evictions << " evictions, " << s.pin_waits
                           << " waits for pins");
  CHECK(wrong == 0);
  CHECK(failed == 0);
  CHECK(s.failures == 0);
  CHECK(s.hits + s.misses == std::size_t(threads * per_thread));
  CHECK(s.pinned == 0);
  CHECK(s.waiting == 0);
  CHECK(s.pages_used <= s.pages_total);
}
