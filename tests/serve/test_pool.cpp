// The adapter pool (deltaw/serve/pool.hpp): adapters from PEFT directories, safetensors and
// GGUF files written by the real packages (tests/fixtures), against the io layer's own
// reading in double; paging, LRU eviction order, the budget, pinning, failures confined to
// the requests that name a bad adapter, and concurrent requests against a serial run.
#include <deltaw/serve/pool.hpp>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "test_util.hpp"

namespace dw = deltaw;
namespace sv = deltaw::serve;
namespace fs = std::filesystem;
using dwt::MatD;

namespace {

const fs::path fixtures = DELTAW_IO_FIXTURES;

/// s·B·A in double from the stored float factors (exact products).
MatD dense_of(const dw::low_rank<float>& u) {
  MatD b(u.B().rows(), u.B().cols()), a(u.A().rows(), u.A().cols());
  for (Eigen::Index i = 0; i < b.rows(); ++i)
    for (Eigen::Index j = 0; j < b.cols(); ++j) b(i, j) = u.B()(i, j);
  for (Eigen::Index i = 0; i < a.rows(); ++i)
    for (Eigen::Index j = 0; j < a.cols(); ++j) a(i, j) = u.A()(i, j);
  return u.scale() * b * a;
}
MatD dense_pages(const sv::sliced_lora<float>& s) {
  MatD D = MatD::Zero(s.rows(), s.cols());
  for (const auto& p : s.parts()) D += dense_of(p);
  return D;
}

/// An in-memory adapter of one module "layer" [out, in] of rank r; counts its loads.
sv::adapter_loader memory_adapter(dw::index_t out, dw::index_t in, dw::index_t r, std::uint64_t seed,
                                  std::shared_ptr<std::atomic<int>> loads = nullptr) {
  return [=] {
    if (loads) ++*loads;
    using MF = dwt::MatF;
    return std::vector<sv::adapter_module>{{"layer", dw::lora(MF(dwt::random<MF>(out, r, seed)),
                                                              MF(dwt::random<MF>(r, in, seed + 1)),
                                                              dw::alpha(double(2 * r)))}};
  };
}

/// "a<i>" (appended, not `"a" + to_string(i)`, which trips GCC 12's -Wrestrict).
std::string name_of(int i) {
  std::string n = "a";
  n += std::to_string(i);
  return n;
}

fs::path temp_dir(const std::string& tag) {
  const fs::path d = fs::temp_directory_path() / ("deltaw_serve_" + tag + "_" + std::to_string(std::random_device{}()));
  fs::create_directories(d);
  return d;
}

}  // namespace

TEST_CASE("pool: PEFT directories, safetensors and GGUF adapters, paged, equal the io layer's reading") {
  // Pages of 320 bytes (80 floats) hold 2 rank vectors of q (24 + 16), 1 of v (20 + 24),
  // 2 of head (8 + 20): every module spans several pages.
  sv::adapter_pool pool({.budget_bytes = 64 * 320, .page_bytes = 320});
  pool.register_peft("lora", fixtures / "peft_lora" / "adapter");
  const auto named = pool.register_peft_directory(fixtures / "peft_named" / "adapter", "named/");
  CHECK(named == std::vector<std::string>{"named/default", "named/second"});
  pool.register_safetensors("st", fixtures / "peft_lora" / "adapter" / "adapter_model.safetensors", dw::alpha(8));
  dw::io::gguf_lora_options as_stored;
  as_stored.permute_qk = false;
  pool.register_gguf("gguf", fixtures / "gguf" / "lora_f32.gguf", as_stored);
  CHECK(pool.stats().registered == 5);
  CHECK(pool.stats().pages_used == 0);

  const auto ref = dw::io::read_peft(fixtures / "peft_lora" / "adapter");
  for (const std::string name : {"lora", "st"}) {
    CAPTURE(name);
    auto h = pool.acquire(name);
    CHECK(h.modules().size() == ref.size());
    for (const auto& m : ref.lora()->modules()) {
      const auto& s = h.at(m.name);
      CHECK(s.rank() == m.rank);
      CHECK(s.parts().size() > 1);
      // The bare safetensors file carries no alpha_pattern ("head": 3): α = 8 for all.
      const auto u = name == "st" ? m.update().with_scale(8.0 / double(m.rank)) : m.update();
      CHECK(dwt::rel_err(dense_pages(s), dense_of(u)) <= 1e-15);
    }
  }
  CHECK(pool.pages_of("lora") == 2 + 2 + 2);  // q: r 4 → 2 pages; v: r 2 → 2; head: r 4 → 2
  {
    auto h = pool.acquire("named/default");
    const auto r = dw::io::read_peft(fixtures / "peft_named" / "adapter");
    for (const auto& m : r.lora()->modules()) CHECK(dwt::rel_err(dense_pages(h.at(m.name)), dense_of(m.update())) <= 1e-15);
  }
  // The second adapter of that directory is DoRA, which reads the base weight: refused.
  dwt::check_throws_with<sv::adapter_error>([&] { (void)pool.acquire("named/second"); },
                                            {"adapter \"named/second\"", "(adapter \"second\")", "DoRA"});
  {
    auto h = pool.acquire("gguf");
    const auto g = dw::io::read_gguf_lora(fixtures / "gguf" / "lora_f32.gguf", as_stored);
    CHECK(h.modules().size() == g.tensors.size());
    for (const auto& p : g.tensors) CHECK(dwt::rel_err(dense_pages(h.at(p.base)), dense_of(g.update(p.base))) <= 1e-15);
    dwt::check_throws_with<sv::adapter_error>([&] { (void)h.at("blk.9.nothing"); },
                                              {"adapter \"gguf\"", "no module \"blk.9.nothing\"", "blk.0.attn_q.weight"});
  }
  // A paged module in a batch: the same output as the file's own update.
  const auto& qm = ref.lora()->at("blocks.0.q");
  auto h = pool.acquire("lora");
  std::vector<sv::sliced_lora<float>> batch = {h.at("blocks.0.q")};
  const MatD W = dwt::random<MatD>(24, 16, 1), X = dwt::random<MatD>(6, 16, 2);
  const std::vector<dw::index_t> idx = {0, -1, 0, 0, -1, 0};
  MatD Y(6, 24);
  sv::apply_lora_batch(W, batch, idx, X, Y);
  MatD ref_y = X * W.transpose();
  for (int t : {0, 2, 3, 5}) ref_y.row(t) += X.row(t) * dense_of(qm.update()).transpose();
  CHECK(dwt::rel_err(Y, ref_y) <= 1e-12);
  const auto st = pool.stats();
  CHECK(st.misses == 5);
  CHECK(st.hits == 1);
  CHECK(st.failures == 1);
  CHECK(st.evictions == 0);
  CHECK(st.bytes_used() <= st.bytes_budget);
}

TEST_CASE("pool: lazy loading, LRU eviction order, the budget, pinning") {
  // Pages of 64 floats; "layer" [16, 16] holds 2 rank vectors per page: rank r takes ⌈r/2⌉.
  sv::adapter_pool pool({.budget_bytes = 8 * 256, .page_bytes = 256});
  CHECK(pool.stats().pages_total == 8);
  auto loads = std::make_shared<std::atomic<int>>(0);
  for (int i = 0; i < 6; ++i)
    pool.register_loader(name_of(i), memory_adapter(16, 16, 3 + (i % 2), 100 + 10 * i, loads));  // 2 pages each
  pool.register_loader("big", memory_adapter(16, 16, 12, 999, loads));                                         // 6 pages
  CHECK(*loads == 0);  // registration reads nothing
  auto use = [&](const std::string& n) {
    auto h = pool.acquire(n);
    CHECK(h.at("layer").rank() >= 3);
    const auto s = pool.stats();
    CHECK(s.bytes_used() <= s.bytes_budget);
    CHECK(s.pages_used <= s.pages_total);
  };
  use("a0");
  use("a1");
  use("a2");
  use("a3");  // 8 pages used
  CHECK(*loads == 4);
  CHECK(pool.lru_order() == std::vector<std::string>{"a3", "a2", "a1", "a0"});
  use("a1");  // a hit moves it to the front
  CHECK(*loads == 4);
  CHECK(pool.lru_order() == std::vector<std::string>{"a1", "a3", "a2", "a0"});
  use("a4");  // evicts the least recently used: a0
  CHECK_FALSE(pool.is_resident("a0"));
  CHECK(pool.lru_order() == std::vector<std::string>{"a4", "a1", "a3", "a2"});
  use("a5");  // then a2
  CHECK_FALSE(pool.is_resident("a2"));
  CHECK(pool.stats().evictions == 2);
  // Pinned adapters are never evicted: hold a3 and a4, then ask for "big" (6 pages): only
  // a1 and a5 (4 pages) can be freed.
  {
    auto p3 = pool.acquire("a3");
    auto p4 = pool.acquire("a4");
    CHECK(pool.lru_order() == std::vector<std::string>{"a5", "a1"});
    dwt::check_throws_with<sv::adapter_error>([&] { (void)pool.acquire("big"); },
                                              {"adapter \"big\" needs 6 pages", "4 are pinned"});
    CHECK(pool.is_resident("a3"));
    CHECK(pool.is_resident("a4"));
    CHECK(pool.is_resident("a1"));  // nothing was evicted for the failed request
    CHECK(pool.is_resident("a5"));
    // Values stay intact while pinned, and a hit on a pinned adapter shares its pages.
    auto p3b = pool.acquire("a3");
    CHECK(&p3b.at("layer") == &p3.at("layer"));
    sv::pinned_adapter moved = std::move(p4);
    CHECK_FALSE(p4);
    CHECK(moved);
  }
  // Handles die in reverse order: a4 (moved), then a3 twice (unpinned by the last one).
  CHECK(pool.lru_order() == std::vector<std::string>{"a3", "a4", "a5", "a1"});
  use("big");  // now evicts a1, a5, a4 (LRU first) and keeps a3
  CHECK(pool.is_resident("a3"));
  CHECK_FALSE(pool.is_resident("a1"));
  CHECK_FALSE(pool.is_resident("a5"));
  CHECK_FALSE(pool.is_resident("a4"));
  CHECK(pool.stats().pages_used == 8);
  // An evicted adapter reloads with the same values.
  auto again = pool.acquire("a0");
  const auto fresh = memory_adapter(16, 16, 3, 100)();
  CHECK(dwt::rel_err(dense_pages(again.at("layer")), dense_of(fresh[0].lora)) <= 1e-15);
  CHECK(pool.stats().failures == 1);
}

TEST_CASE("pool: a bad or missing adapter fails only the requests that name it") {
  const fs::path tmp = temp_dir("bad");
  // A corrupted copy of a real adapter: the config kept, the tensors file truncated.
  fs::create_directories(tmp / "corrupt");
  fs::copy_file(fixtures / "peft_lora" / "adapter" / "adapter_config.json", tmp / "corrupt" / "adapter_config.json");
  {
    std::ifstream in(fixtures / "peft_lora" / "adapter" / "adapter_model.safetensors", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(tmp / "corrupt" / "adapter_model.safetensors", std::ios::binary).write(bytes.data(), 100);
  }
  sv::adapter_pool pool({.budget_bytes = 1 << 20, .page_bytes = 4096});
  pool.register_peft("good", fixtures / "peft_lora" / "adapter");
  pool.register_peft("corrupt", tmp / "corrupt");
  pool.register_peft("missing", tmp / "nowhere");
  pool.register_peft("loha", fixtures / "peft_loha" / "adapter");
  pool.register_gguf("missing.gguf", tmp / "nowhere.gguf");
  pool.register_loader("too wide", memory_adapter(2000, 2000, 1, 5));  // 16000 bytes per rank vector
  for (int round = 0; round < 2; ++round) {  // failures are not cached: the second round retries
    dwt::check_throws_with<sv::adapter_error>([&] { (void)pool.acquire("corrupt"); },
                                              {"adapter \"corrupt\"", "corrupt", "cannot be loaded"});
    dwt::check_throws_with<sv::adapter_error>([&] { (void)pool.acquire("missing"); },
                                              {"adapter \"missing\"", "nowhere", "cannot be loaded"});
    dwt::check_throws_with<sv::adapter_error>([&] { (void)pool.acquire("loha"); },
                                              {"adapter \"loha\"", "LOHA", "apply_grouped"});
    dwt::check_throws_with<sv::adapter_error>([&] { (void)pool.acquire("missing.gguf"); },
                                              {"adapter \"missing.gguf\"", "nowhere.gguf"});
    dwt::check_throws_with<sv::adapter_error>([&] { (void)pool.acquire("too wide"); },
                                              {"adapter \"too wide\"", "16000 bytes per rank vector", "page_bytes"});
    dwt::check_throws_with<sv::adapter_error>([&] { (void)pool.acquire("unregistered"); },
                                              {"no adapter named \"unregistered\"", "6 are"});
    auto h = pool.acquire("good");
    CHECK(h.at("blocks.0.q").rank() == 4);
  }
  const auto s = pool.stats();
  CHECK(s.failures == 12);
  CHECK(s.resident == 1);
  CHECK(s.pinned == 0);
  CHECK(s.pages_used == pool.pages_of("good"));
  dwt::check_throws_with<dw::argument_error>([&] { pool.register_peft("good", tmp); }, {"\"good\" is already registered"});
  fs::remove_all(tmp);
}

TEST_CASE("pool: 8 threads, concurrent requests with loads and evictions, results identical to a serial run") {
  constexpr int adapters = 24, threads = 8, per_thread = 1250;  // 10,000 requests
  constexpr dw::index_t out = 20, in = 12, tokens = 3;
  auto make_pool = [&] {
    // Pages of 256 bytes hold 2 rank vectors of [20, 12]; ranks 1 … 8 take 1 … 4 pages, 60
    // pages for all 24 adapters. 32 pages: room for 8 pinned adapters of rank 8, not for all.
    auto p = std::make_unique<sv::adapter_pool>(sv::pool_options{.budget_bytes = 32 * 256, .page_bytes = 256});
    for (int a = 0; a < adapters; ++a)
      p->register_loader(name_of(a), memory_adapter(out, in, 1 + a % 8, 1000 + 7 * a));
    p->register_peft("bad", fs::path("/nonexistent/deltaw/adapter"));
    return p;
  };
  const MatD W = dwt::random<MatD>(out, in, 1);
  std::vector<MatD> X;
  for (int a = 0; a < adapters; ++a) X.push_back(dwt::random<MatD>(tokens, in, 50 + a));
  const std::vector<dw::index_t> idx = {0, -1, 0};
  auto request = [&](sv::adapter_pool& pool, int a) {
    auto h = pool.acquire(name_of(a));
    std::vector<sv::sliced_lora<float>> one = {h.at("layer")};
    MatD Y(tokens, out);
    sv::apply_lora_batch(W, one, idx, X[std::size_t(a)], Y, {.parallel = false});
    return Y;
  };
  // The request sequence of each thread (fixed seeds), and the serial answers.
  std::vector<std::vector<int>> seq(threads);
  for (int t = 0; t < threads; ++t) {
    std::mt19937 g(unsigned(t + 1));
    std::uniform_int_distribution<int> d(0, adapters);  // `adapters` stands for "bad"
    for (int i = 0; i < per_thread; ++i) seq[std::size_t(t)].push_back(d(g));
  }
  std::vector<MatD> serial(adapters);
  {
    auto pool = make_pool();
    for (int a = 0; a < adapters; ++a) serial[std::size_t(a)] = request(*pool, a);
  }
  for (int a = 0; a < adapters; ++a) {
    MatD ref = X[std::size_t(a)] * W.transpose();
    const auto m = memory_adapter(out, in, 1 + a % 8, 1000 + 7 * a)();
    for (int t : {0, 2}) ref.row(t) += X[std::size_t(a)].row(t) * dense_of(m[0].lora).transpose();
    CHECK(dwt::rel_err(serial[std::size_t(a)], ref) <= 1e-12);
  }
  auto pool = make_pool();
  std::atomic<int> mismatches{0}, bad_failed{0}, good_failed{0}, over_budget{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      for (const int a : seq[std::size_t(t)]) {
        if (a == adapters) {
          try {
            (void)pool->acquire("bad");
          } catch (const sv::adapter_error&) {
            ++bad_failed;
          }
          continue;
        }
        try {
          const MatD Y = request(*pool, a);
          if (!(Y.array() == serial[std::size_t(a)].array()).all()) ++mismatches;
        } catch (const sv::adapter_error&) {
          ++good_failed;
        }
        const auto s = pool->stats();
        if (s.pages_used > s.pages_total || s.bytes_used() > s.bytes_budget) ++over_budget;
      }
    });
  for (auto& th : ts) th.join();
  int bad_requests = 0, good_requests = 0;
  for (const auto& s : seq)
    for (const int a : s) (a == adapters ? bad_requests : good_requests)++;
  CHECK(mismatches == 0);
  CHECK(over_budget == 0);
  CHECK(bad_failed == bad_requests);
  const auto st = pool->stats();
  MESSAGE("concurrent: " << good_requests << " good requests, " << bad_requests << " bad; " << st.hits << " hits, " << st.misses << " misses, " << st.evictions
                         << " evictions");
  CHECK(st.evictions > 0);
  CHECK(st.pinned == 0);
  CHECK(good_failed == 0);
}
