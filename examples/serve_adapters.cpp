// SPDX-License-Identifier: MIT
// Serves a stream of requests, each naming one of many LoRA adapters, through an adapter
// pool whose byte budget holds only a fraction of them (deltaw/serve/pool.hpp), in
// heterogeneous batches (serve::apply_lora_batch) over one frozen two-projection layer.
//
//   serve_adapters [REQUESTS [THREADS]]     (defaults 5000 and 1)
//
// THREADS is the number of threads one batch uses (Eigen's products and the batch's own
// loops). The batches here are small (≤ 256 tokens of 256 features): on a 2-core machine
// shared with other jobs, OpenMP threads that spin waiting for each other lose their time
// slices, and two threads served 15 to 25 times fewer requests per second than one.
//
// At start it writes 96 adapters of ranks 8, 16, 32 and 64 into a temporary directory, two
// in three as PEFT directories (adapter_config.json + adapter_model.safetensors) and the
// others as bare safetensors files, plus one adapter with a truncated tensors file and one
// registered directory that is deleted before serving. Requests pick adapters by Zipf(1.0)
// popularity; one in eight is a 32-token prefill, the others decode one token. A scheduler
// admits requests in order into batches (≤ 256 tokens, ≤ 12 distinct adapters, so that a
// batch's pins always fit the budget), acquires and pins their adapters, applies both
// projections and releases the pins. Requests naming the broken adapters fail alone. It
// prints a progress line (requests/s, hit rate, evictions), then tables, and checks sampled
// outputs against a double-precision reference computed from the factors as generated.
#include <deltaw/serve/pool.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace dw = deltaw;
namespace sv = deltaw::serve;
namespace io = deltaw::io;
namespace fs = std::filesystem;

namespace serve_example {

constexpr dw::index_t dim = 256;  // in = out of both projections
constexpr int adapter_count = 96;
const char* const module_names[2] = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"};

using matf = dw::dense<float>;
using matd = dw::dense<double>;

dw::index_t rank_of(int a) { return dw::index_t(8) << (a % 4); }
std::string name_of(int a) {
  char b[16];
  std::snprintf(b, sizeof b, "user%03d", a);
  return b;
}

/// The factors of adapter a, module m: B [dim, r], A [r, dim] from a fixed seed.
std::pair<matf, matf> factors(int a, int m) {
  const dw::index_t r = rank_of(a);
  std::mt19937 g(unsigned(1000 + 2 * a + m));
  std::normal_distribution<float> n(0.0f, 0.05f);
  matf B(dim, r), A(r, dim);
  for (auto* M : {&B, &A})
    for (Eigen::Index i = 0; i < M->size(); ++i) M->data()[i] = n(g);
  return {std::move(B), std::move(A)};
}

/// Writes the adapters; returns, per adapter, whether it is a PEFT directory.
std::vector<bool> write_adapters(const fs::path& root) {
  std::vector<bool> peft(adapter_count);
  for (int a = 0; a < adapter_count; ++a) {
    const dw::index_t r = rank_of(a);
    peft[std::size_t(a)] = a % 3 != 2;
    if (peft[std::size_t(a)]) {
      io::peft_adapter ad;
      ad.config.r = r;
      ad.config.lora_alpha = 2.0 * double(r);
      ad.config.target_modules = {"q_proj", "v_proj"};
      for (int m = 0; m < 2; ++m) {
        const auto [B, A] = factors(a, m);
        ad.add(module_names[m], dw::lora(B, A, dw::alpha(2.0 * double(r))));
      }
      io::write_peft_adapter(root / name_of(a), ad);
    } else {
      io::safetensors_writer w;
      for (int m = 0; m < 2; ++m) {
        const auto [B, A] = factors(a, m);
        const std::string key = std::string("base_model.model.") + module_names[m];
        w.add(key + ".lora_A.weight", A);
        w.add(key + ".lora_B.weight", B);
      }
      w.write(root / (name_of(a) + ".safetensors"));
    }
  }
  // "broken": a PEFT directory whose tensors file is cut short; "deleted": removed below.
  fs::create_directories(root / "broken");
  fs::copy_file(root / name_of(0) / "adapter_config.json", root / "broken" / "adapter_config.json");
  {
    std::ifstream in(root / name_of(0) / "adapter_model.safetensors", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(root / "broken" / "adapter_model.safetensors", std::ios::binary).write(bytes.data(), 4000);
  }
  fs::copy(root / name_of(1), root / "deleted");
  return peft;
}

struct request {
  int adapter;  // 0 … adapter_count − 1, or adapter_count ("broken"), adapter_count + 1 ("deleted")
  dw::index_t tokens;
};

std::string request_name(int a) {
  return a < adapter_count ? name_of(a) : a == adapter_count ? std::string("broken") : std::string("deleted");
}

}  // namespace serve_example

int main(int argc, char** argv) {
  namespace ex = serve_example;
  using clock = std::chrono::steady_clock;
  using ex::matf;
  using ex::matd;
  const long total = argc > 1 ? std::strtol(argv[1], nullptr, 10) : 5000;
  const long threads = argc > 2 ? std::strtol(argv[2], nullptr, 10) : 1;
  if (total <= 0 || threads <= 0) {
    std::fprintf(stderr, "usage: serve_adapters [REQUESTS [THREADS]]\n");
    return 2;
  }
  Eigen::setNbThreads(int(threads));
  const sv::batch_options batch_opts{.parallel = threads > 1};
  const fs::path root = fs::temp_directory_path() / ("deltaw_serve_adapters_" + std::to_string(std::random_device{}()));
  fs::create_directories(root);
  struct remove_at_exit {
    fs::path p;
    ~remove_at_exit() {
      std::error_code e;
      fs::remove_all(p, e);
    }
  } cleanup{root};

  const auto t_write = clock::now();
  const auto is_peft = ex::write_adapters(root);
  std::uintmax_t disk = 0;
  for (const auto& f : fs::recursive_directory_iterator(root))
    if (f.is_regular_file()) disk += f.file_size();

  // 3 MiB in pages of 16 KiB: a page holds 8 rank vectors of a [256, 256] module, so an
  // adapter takes 2 (rank 8) to 16 pages (rank 64); about a quarter of them fit, and 12
  // pinned adapters of rank 64 exactly.
  sv::adapter_pool pool({.budget_bytes = std::size_t(3) << 20, .page_bytes = std::size_t(16) << 10});
  for (int a = 0; a < ex::adapter_count; ++a) {
    if (is_peft[std::size_t(a)]) pool.register_peft(ex::name_of(a), root / ex::name_of(a));
    else pool.register_safetensors(ex::name_of(a), root / (ex::name_of(a) + ".safetensors"), dw::alpha(2.0 * double(ex::rank_of(a))));
  }
  pool.register_peft("broken", root / "broken");
  pool.register_peft("deleted", root / "deleted");
  fs::remove_all(root / "deleted");
  std::printf("wrote %d adapters (%.1f MiB) in %.2f s; pool budget %.1f MiB in %zu pages of %zu KiB\n",
              ex::adapter_count + 2, double(disk) / (1 << 20), std::chrono::duration<double>(clock::now() - t_write).count(),
              double(pool.stats().bytes_budget) / (1 << 20), pool.stats().pages_total, pool.stats().page_bytes >> 10);

  // The stream: Zipf(1.0) over a shuffled popularity order; 1 in 8 a 32-token prefill.
  std::mt19937 g(7);
  std::vector<int> by_popularity(ex::adapter_count);
  for (int a = 0; a < ex::adapter_count; ++a) by_popularity[std::size_t(a)] = a;
  std::shuffle(by_popularity.begin(), by_popularity.end(), g);
  std::vector<double> zipf(ex::adapter_count);
  for (int k = 0; k < ex::adapter_count; ++k) zipf[std::size_t(k)] = 1.0 / double(k + 1);
  std::discrete_distribution<int> pick(zipf.begin(), zipf.end());
  std::uniform_int_distribution<int> die(0, 399);
  std::deque<ex::request> queue;
  for (long i = 0; i < total; ++i) {
    const int roll = die(g);
    const int a = roll == 0 ? ex::adapter_count : roll == 1 ? ex::adapter_count + 1 : by_popularity[std::size_t(pick(g))];
    queue.push_back({a, die(g) % 8 == 0 ? dw::index_t(32) : dw::index_t(1)});
  }

  const matf W[2] = {matf::Random(ex::dim, ex::dim) * 0.05f, matf::Random(ex::dim, ex::dim) * 0.05f};
  struct per_adapter {
    long requests = 0, tokens = 0, loads = 0;
  };
  std::map<int, per_adapter> seen;
  std::map<std::string, std::string> first_error;
  long served = 0, failed = 0, tokens = 0, batches = 0, checked = 0;
  double max_rel = 0;
  const auto t0 = clock::now();
  long next_report = total / 5;
  while (!queue.empty()) {
    // Admit requests in order while the batch has room.
    std::vector<ex::request> batch;
    std::map<int, dw::index_t> slot;  // adapter → index in this batch's adapter list
    std::vector<sv::pinned_adapter> pins;
    std::vector<sv::sliced_lora<float>> q, v;
    dw::index_t n_tokens = 0;
    while (!queue.empty() && n_tokens + queue.front().tokens <= 256) {
      const ex::request r = queue.front();
      if (!slot.count(r.adapter)) {
        if (slot.size() == 12) break;
        const std::string name = ex::request_name(r.adapter);
        const bool resident = pool.is_resident(name);
        try {
          pins.push_back(pool.acquire(name));
        } catch (const sv::adapter_error& e) {
          first_error.emplace(name, e.what());
          ++failed;  // this request fails; the batch goes on
          queue.pop_front();
          continue;
        }
        if (!resident) ++seen[r.adapter].loads;
        slot.emplace(r.adapter, dw::index_t(q.size()));
        q.push_back(pins.back().at(ex::module_names[0]));
        v.push_back(pins.back().at(ex::module_names[1]));
      }
      batch.push_back(r);
      n_tokens += r.tokens;
      queue.pop_front();
    }
    if (batch.empty()) continue;
    const matf X = matf::Random(n_tokens, ex::dim);
    std::vector<dw::index_t> adapter_of_token;
    for (const auto& r : batch) adapter_of_token.insert(adapter_of_token.end(), std::size_t(r.tokens), slot.at(r.adapter));
    matf Yq(n_tokens, ex::dim), Yv(n_tokens, ex::dim);
    sv::apply_lora_batch(W[0], q, adapter_of_token, X, Yq, batch_opts);
    sv::apply_lora_batch(W[1], v, adapter_of_token, X, Yv, batch_opts);
    // Every 16th batch: its first request against x·Wᵀ + (2r/r)·(x·Aᵀ)·Bᵀ in double.
    if (batches % 16 == 0) {
      const int a = batch.front().adapter;
      const dw::index_t nt = batch.front().tokens;
      for (int m = 0; m < 2; ++m) {
        const auto [B, A] = ex::factors(a, m);
        const matd x = X.topRows(nt).cast<double>();
        const matd ref = x * W[m].cast<double>().transpose() + 2.0 * (x * A.cast<double>().transpose()) * B.cast<double>().transpose();
        const matd got = (m == 0 ? Yq : Yv).topRows(nt).cast<double>();
        max_rel = std::max(max_rel, (got - ref).norm() / ref.norm());
      }
      ++checked;
    }
    pins.clear();  // unpinned: the adapters may be evicted from here on
    for (const auto& r : batch) {
      ++seen[r.adapter].requests;
      seen[r.adapter].tokens += r.tokens;
    }
    served += long(batch.size());
    tokens += n_tokens;
    ++batches;
    if (served + failed >= next_report || queue.empty()) {
      next_report += total / 5;
      const auto s = pool.stats();
      const double secs = std::chrono::duration<double>(clock::now() - t0).count();
      std::printf("%7ld requests  %8.0f req/s  hit rate %5.1f %%  evictions %5zu  resident %3zu  pool %4.1f / %.1f MiB\n",
                  served + failed, double(served + failed) / secs, 100.0 * double(s.hits) / double(s.hits + s.misses),
                  s.evictions, s.resident, double(s.bytes_used()) / (1 << 20), double(s.bytes_budget) / (1 << 20));
    }
  }
  const double secs = std::chrono::duration<double>(clock::now() - t0).count();
  const auto s = pool.stats();

  std::printf("\n%-10s %-12s %5s %9s %8s %6s\n", "adapter", "source", "rank", "requests", "tokens", "loads");
  std::vector<std::pair<int, per_adapter>> rows(seen.begin(), seen.end());
  std::sort(rows.begin(), rows.end(), [](const auto& x, const auto& y) { return x.second.requests > y.second.requests; });
  for (std::size_t i = 0; i < rows.size() && i < 8; ++i) {
    const int a = rows[i].first;
    std::printf("%-10s %-12s %5ld %9ld %8ld %6ld\n", ex::name_of(a).c_str(), is_peft[std::size_t(a)] ? "PEFT dir" : "safetensors",
                long(ex::rank_of(a)), rows[i].second.requests, rows[i].second.tokens, rows[i].second.loads);
  }
  std::printf("(%zu adapters used; the table shows the 8 most requested)\n\n", rows.size());
  std::printf("%-28s %12s\n", "requests served", std::to_string(served).c_str());
  std::printf("%-28s %12s\n", "requests failed", std::to_string(failed).c_str());
  std::printf("%-28s %12s\n", "tokens", std::to_string(tokens).c_str());
  std::printf("%-28s %12s\n", "batches", std::to_string(batches).c_str());
  std::printf("%-28s %12.0f\n", "requests / s", double(served + failed) / secs);
  std::printf("%-28s %12.0f\n", "tokens / s", double(tokens) / secs);
  std::printf("%-28s %11.1f %%\n", "pool hit rate", 100.0 * double(s.hits) / double(s.hits + s.misses));
  std::printf("%-28s %12zu\n", "loads (misses)", s.misses);
  std::printf("%-28s %12zu\n", "evictions", s.evictions);
  std::printf("%-28s %12zu\n", "acquire failures", s.failures);
  std::printf("%-28s %12.2e\n", "max rel. error vs double", max_rel);
  std::printf("%-28s %12ld\n", "  (requests checked)", checked);
  for (const auto& [name, what] : first_error) std::printf("\n%s fails its requests: %s\n", name.c_str(), what.c_str());
  return max_rel < 1e-5 && served > 0 ? 0 : 1;
}
