// SPDX-License-Identifier: MIT
// models/ without any download: the WordPiece tokenizer on a small tokenizer.json written
// here, and a tiny random BERT (written as a safetensors checkpoint, read back zero-copy
// in double) with each adapter type:
//   - every adapter starts as the identity (PEFT's inits);
//   - with random non-zero adapter tensors the adapted model equals the model whose
//     checkpoint holds the merged weights W + ΔW, ΔW formed densely in double from the
//     method's formula (VeRA: deltaw::materialize of the update);
//   - gradients of the embeddings w.r.t. the adapter tensors equal central differences;
//   - padding does not change a sentence's embedding (the attention and pooling masks).
#include <doctest/doctest.h>

#include <deltaw/models.hpp>

#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "autograd/grad_util.hpp"

namespace ag = deltaw::autograd;
namespace md = deltaw::models;
using deltaw::index_t;
using MatD = deltaw::dense<double>;

namespace {

// ── Tokenizer ───────────────────────────────────────────────────────────────────────────

std::string tiny_tokenizer_json(const std::string& normalizer = R"({"type": "BertNormalizer", "clean_text": true,
    "handle_chinese_chars": true, "strip_accents": null, "lowercase": true})") {
  const std::vector<std::string> vocab = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cafe", "naive", "un",
                                          "##aff", "##able", "##s", ",", ".", "!", "—", "東", "京", "a", "##b",
                                          "hello", "world", "elan", "ι", "σ", "ας"};
  std::string v;
  for (std::size_t i = 0; i < vocab.size(); ++i) v += (i ? ", \"" : "\"") + vocab[i] + "\": " + std::to_string(i);
  return R"({"version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [{"id": 0, "content": "[PAD]", "special": true, "normalized": false},
                   {"id": 2, "content": "[CLS]", "special": true, "normalized": false},
                   {"id": 3, "content": "[SEP]", "special": true, "normalized": false}],
  "normalizer": )" + normalizer + R"(,
  "pre_tokenizer": {"type": "BertPreTokenizer"},
  "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 12, "vocab": {)" + v + "}}}";
}

std::vector<std::string> toks(const md::wordpiece_tokenizer& t, const std::string& s) { return t.tokenize(s); }
using S = std::vector<std::string>;

}  // namespace

TEST_CASE("wordpiece: BERT normaliser, punctuation split and greedy longest-match pieces") {
  const auto t = md::wordpiece_tokenizer::from_json_text(tiny_tokenizer_json());
  CHECK(t.vocab_size() == 26);
  // Lowercase + accents stripped (NFD, Mn dropped), punctuation its own word.
  CHECK(toks(t, "Café, NAÏVE!") == S{"cafe", ",", "naive", "!"});
  // Greedy longest match: un + ##aff + ##able; a word with an unknown piece is [UNK] whole.
  CHECK(toks(t, "unaffable unaffablex") == S{"un", "##aff", "##able", "[UNK]"});
  // CJK ideographs are words of their own; the em dash (Pd) is punctuation.
  CHECK(toks(t, "the—東京") == S{"the", "—", "東", "京"});
  // clean_text: control characters dropped, tabs / newlines / NBSP are spaces.
  CHECK(toks(t, "hello\x01\tworld\xC2\xA0the\n") == S{"hello", "world", "the"});
  // Longer than max_input_chars_per_word (12): [UNK] without trying pieces.
  CHECK(toks(t, "abbbbbbbbbbbb") == S{"[UNK]"});
  CHECK(toks(t, "abbbbbbbbbbb") == S{"a", "##b", "##b", "##b", "##b", "##b", "##b", "##b", "##b", "##b", "##b", "##b"});
  // Greek: per-character lowercase (Σ → σ, no final-sigma rule), accents stripped (ί → ι).
  CHECK(t.normalize("ΊΣ") == "ισ");
  // Special tokens in the raw text are kept whole, not normalised or split.
  CHECK(toks(t, "hello[SEP]world") == S{"hello", "[SEP]", "world"});
  CHECK(t.normalize("Élan") == "elan");
}

TEST_CASE("wordpiece: [CLS]/[SEP], truncation and padding") {
  const auto t = md::wordpiece_tokenizer::from_json_text(tiny_tokenizer_json());
  const auto e = t.encode("hello world the cafe", 4);
  CHECK(e.ids == std::vector<std::int64_t>{2, 20, 21, 3});
  CHECK(e.mask == std::vector<std::int64_t>{1, 1, 1, 1});
  CHECK_THROWS_AS(t.encode("hello", 1), deltaw::argument_error);
  const auto b = t.encode_batch({"hello", "hello world the"});
  CHECK(b.batch == 2);
  CHECK(b.seq == 5);
  CHECK(b.ids == std::vector<std::int64_t>{2, 20, 3, 0, 0, 2, 20, 21, 5, 3});
  CHECK(b.mask == std::vector<std::int64_t>{1, 1, 1, 0, 0, 1, 1, 1, 1, 1});
}

TEST_CASE("wordpiece: malformed files and text are refused by name") {
  CHECK_THROWS_AS(md::wordpiece_tokenizer::from_json_text(R"({"model": {"type": "BPE", "vocab": {}}})"), deltaw::format_error);
  CHECK_THROWS_WITH_AS(md::wordpiece_tokenizer::from_json_text(tiny_tokenizer_json(R"({"type": "NFC"})")),
                       doctest::Contains("BertNormalizer"), deltaw::format_error);
  const auto t = md::wordpiece_tokenizer::from_json_text(tiny_tokenizer_json());
  CHECK_THROWS_AS(t.encode("bad \xFF byte"), deltaw::format_error);
  CHECK_THROWS_AS(t.encode("overlong \xC0\xAF"), deltaw::format_error);
}

// ── Tiny BERT ───────────────────────────────────────────────────────────────────────────

namespace {

constexpr index_t H = 12, I = 24, L = 2, NH = 3, V = 40, P = 16;

const char* tiny_config = R"({"vocab_size": 40, "hidden_size": 12, "num_hidden_layers": 2, "num_attention_heads": 3,
  "intermediate_size": 24, "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
  "hidden_act": "gelu", "position_embedding_type": "absolute"})";

/// A random BERT checkpoint: name → tensor ([1, n] for the 1-D ones).
std::map<std::string, MatD> tiny_weights() {
  std::mt19937_64 g(42);
  std::normal_distribution<double> n(0.0, 0.4);
  auto r = [&](index_t a, index_t b) {
    MatD m(a, b);
    for (index_t i = 0; i < m.size(); ++i) m.data()[i] = n(g);
    return m;
  };
  std::map<std::string, MatD> w;
  w["embeddings.word_embeddings.weight"] = r(V, H);
  w["embeddings.position_embeddings.weight"] = r(P, H);
  w["embeddings.token_type_embeddings.weight"] = r(2, H);
  w["embeddings.LayerNorm.weight"] = MatD::Ones(1, H) + r(1, H) * 0.2;
  w["embeddings.LayerNorm.bias"] = r(1, H) * 0.2;
  for (index_t l = 0; l < L; ++l) {
    const std::string p = "encoder.layer." + std::to_string(l) + ".";
    for (const char* m : {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}) {
      w[p + m + ".weight"] = r(H, H) * 0.6;
      w[p + m + ".bias"] = r(1, H) * 0.2;
    }
    w[p + "intermediate.dense.weight"] = r(I, H) * 0.6;
    w[p + "intermediate.dense.bias"] = r(1, I) * 0.2;
    w[p + "output.dense.weight"] = r(H, I) * 0.4;
    w[p + "output.dense.bias"] = r(1, H) * 0.2;
    for (const char* m : {"attention.output.LayerNorm", "output.LayerNorm"}) {
      w[p + m + ".weight"] = MatD::Ones(1, H) + r(1, H) * 0.2;
      w[p + m + ".bias"] = r(1, H) * 0.2;
    }
  }
  return w;
}

md::bert_model<double> tiny_model(const std::map<std::string, MatD>& w) {
  deltaw::io::safetensors_writer sw;
  for (const auto& [name, m] : w) {
    if (m.rows() == 1 && !name.ends_with("embeddings.weight"))
      sw.add(name, deltaw::vector_view<const double>(m.data(), m.cols()));
    else
      sw.add(name, deltaw::view(m));
  }
  const auto f = deltaw::io::safetensors_file::parse(sw.serialize(), "tiny_bert");
  return md::bert_model<double>::from_safetensors(md::bert_config::from_json_text(tiny_config), f);
}

struct tiny_batch {
  std::vector<std::int64_t> ids, types, mask;
  index_t batch = 3, seq = 6;
};
tiny_batch make_batch() {
  tiny_batch b;
  b.ids = {2, 5, 9, 13, 3, 0, /**/ 2, 7, 3, 0, 0, 0, /**/ 2, 11, 17, 23, 31, 3};
  b.types = {0, 0, 0, 0, 0, 0, /**/ 0, 0, 0, 0, 0, 0, /**/ 0, 0, 0, 1, 1, 1};
  b.mask = {1, 1, 1, 1, 1, 0, /**/ 1, 1, 1, 0, 0, 0, /**/ 1, 1, 1, 1, 1, 1};
  return b;
}

MatD embed(const md::bert_model<double>& m, const tiny_batch& b) {
  ag::tape<double> t;
  return m.embed(t, b.ids, b.types, b.mask, b.batch, b.seq).value();
}

/// Random non-zero values in every adapter tensor (DoRA's magnitude stays positive).
void randomize(md::bert_model<double>& m, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> n(0.0, 0.3);
  for (auto* l : m.adapted_layers())
    for (auto* p : l->adapter_parameters()) {
      const bool magnitude = p->name().ends_with("magnitude_vector");
      for (index_t i = 0; i < p->size(); ++i)
        p->value().data()[i] = magnitude ? p->value().data()[i] * (1.0 + 0.3 * std::tanh(n(g))) : n(g);
    }
}

/// ΔW of layer l, dense in double, from the method's formula.
MatD dense_delta(const md::bert_linear<double>& l, const deltaw::vera_basis& basis) {
  const auto ps = l.adapter_parameters();
  const index_t out = l.out_features(), in = l.in_features();
  MatD W(out, in);
  for (index_t i = 0; i < out; ++i)
    for (index_t j = 0; j < in; ++j) W(i, j) = l.weight()(i, j);
  switch (l.type()) {
    case md::adapter_type::lora: return l.scale() * ps[0]->value() * ps[1]->value();
    case md::adapter_type::dora: {
      const MatD Wp = W + l.scale() * ps[0]->value() * ps[1]->value();
      MatD out_m(out, in);
      for (index_t i = 0; i < out; ++i) out_m.row(i) = Wp.row(i) * (ps[2]->value()(0, i) / Wp.row(i).norm());
      return out_m - W;
    }
    case md::adapter_type::miss: {
      const MatD& D = ps[0]->value();  // [r, out]
      MatD d(out, in);
      for (index_t o = 0; o < out; ++o)
        for (index_t c = 0; c < in; ++c) d(o, c) = D(c % D.rows(), o);
      return d;
    }
    case md::adapter_type::lokr: {
      const MatD& w1 = ps[0]->value();
      const MatD w2 = ps.size() == 2 ? ps[1]->value() : MatD(ps[1]->value() * ps[2]->value());
      MatD d(out, in);
      for (index_t i = 0; i < w1.rows(); ++i)
        for (index_t j = 0; j < w1.cols(); ++j)
          d.block(i * w2.rows(), j * w2.cols(), w2.rows(), w2.cols()) = l.scale() * w1(i, j) * w2;
      return d;
    }
    case md::adapter_type::vera: {
      const deltaw::vector_view<const double> ld(ps[0]->value().data(), ps[0]->cols()), lb(ps[1]->value().data(), ps[1]->cols());
      return deltaw::materialize(deltaw::vera(basis, out, in, ld, lb));
    }
  }
  return MatD();
}

const md::adapter_type all_types[] = {md::adapter_type::lora, md::adapter_type::dora, md::adapter_type::miss,
                                      md::adapter_type::lokr, md::adapter_type::vera};

}  // namespace

TEST_CASE("tiny BERT: weights are viewed, padding does not change an embedding") {
  const auto w = tiny_weights();
  const auto m = tiny_model(w);
  CHECK(m.zero_copy());
  const auto b = make_batch();
  const auto e = embed(m, b);
  CHECK(e.rows() == 3);
  for (index_t i = 0; i < 3; ++i) CHECK(e.row(i).norm() == doctest::Approx(1.0).epsilon(1e-12));
  // Sentence 1 alone (seq 3, no padding) against its padded row in the batch.
  tiny_batch one;
  one.batch = 1;
  one.seq = 3;
  one.ids = {2, 7, 3};
  one.types = {0, 0, 0};
  one.mask = {1, 1, 1};
  const auto e1 = embed(m, one);
  CHECK((e1.row(0) - e.row(1)).norm() < 1e-12);
  // A changed padding id changes nothing either.
  auto b2 = b;
  b2.ids[5] = 39;
  b2.ids[10] = 17;
  CHECK((embed(m, b2) - e).norm() < 1e-12);
  // …but a changed real token does.
  b2.ids[1] = 6;
  CHECK((embed(m, b2) - e).norm() > 1e-3);
}

TEST_CASE("tiny BERT: each adapter starts as the identity and equals its merged dense weights") {
  const auto w = tiny_weights();
  const auto b = make_batch();
  const auto e0 = embed(tiny_model(w), b);
  for (auto type : all_types) {
    CAPTURE(md::adapter_type_name(type));
    auto m = tiny_model(w);
    md::adapter_options o;
    o.type = type;
    o.r = 2;
    o.alpha = 3;
    o.seed = 9;
    CHECK(m.attach(o) == 6 * L);
    CHECK((embed(m, b) - e0).norm() < 1e-12);  // PEFT's inits: ΔW = 0
    randomize(m, 5);
    auto merged = w;
    for (auto* l : m.adapted_layers()) merged[l->name() + ".weight"] += dense_delta(*l, m.shared_vera_basis());
    const auto ea = embed(m, b), em = embed(tiny_model(merged), b);
    CHECK((ea - e0).norm() > 1e-2);  // the adapter matters
    CHECK((ea - em).norm() < 1e-10);
  }
}

TEST_CASE("tiny BERT: adapter gradients of the embeddings equal central differences") {
  const auto w = tiny_weights();
  const auto b = make_batch();
  for (auto type : all_types) {
    auto m = tiny_model(w);
    md::adapter_options o;
    o.type = type;
    o.r = 2;
    o.alpha = 3;
    o.targets = {"layer.1.attention.self.query", "layer.0.attention.self.value", "output.dense", "intermediate.dense"};
    m.attach(o);
    randomize(m, 11);
    // DoRA's norms are constants of the backward pass (PEFT detaches them): fixed here so
    // that the central differences see the same function.
    for (auto* l : m.adapted_layers()) l->freeze_dora_norms(true);
    dwag::check(std::string("bert ") + md::adapter_type_name(type),
                [&](ag::tape<double>& t) { return m.embed(t, b.ids, b.types, b.mask, b.batch, b.seq); },
                m.trainable_parameters(), 17, 1e-6);
  }
}

TEST_CASE("tiny BERT: a LoRA adapter as a PEFT adapter keeps names, factors and scale") {
  auto m = tiny_model(tiny_weights());
  md::adapter_options o;
  o.r = 2;
  o.alpha = 5;
  o.targets = {"query", "value"};
  m.attach(o);
  randomize(m, 3);
  const auto a = m.to_peft();
  CHECK(a.size() == 2 * L);
  const auto& q = a.at("encoder.layer.1.attention.self.value");
  CHECK(q.scale == doctest::Approx(2.5));
  auto* l = m.linears()[6 + 2];
  REQUIRE(l->name() == "encoder.layer.1.attention.self.value");
  CHECK(double(q.B.view(3, 1)) == doctest::Approx(l->adapter_parameters()[0]->value()(3, 1)).epsilon(1e-6));
  CHECK(double(q.A.view(1, 7)) == doctest::Approx(l->adapter_parameters()[1]->value()(1, 7)).epsilon(1e-6));
  auto m2 = tiny_model(tiny_weights());
  o.type = md::adapter_type::miss;
  m2.attach(o);
  CHECK_THROWS_AS(m2.to_peft(), deltaw::unsupported_error);
}

TEST_CASE("tiny BERT: loud errors") {
  CHECK_THROWS_WITH_AS(md::bert_config::from_json_text(R"({"vocab_size": 4})"), doctest::Contains("hidden_size"),
                       deltaw::format_error);
  auto w = tiny_weights();
  w["encoder.layer.1.output.dense.weight"] = MatD::Zero(H, I + 1);
  CHECK_THROWS_WITH_AS(tiny_model(w), doctest::Contains("encoder.layer.1.output.dense.weight"), deltaw::shape_error);
  auto m = tiny_model(tiny_weights());
  auto b = make_batch();
  b.mask = std::vector<std::int64_t>(18, 0);
  ag::tape<double> t;
  CHECK_THROWS_AS(m.embed(t, b.ids, b.types, b.mask, b.batch, b.seq), deltaw::argument_error);
  md::adapter_options o;
  o.targets = {"nothing"};
  CHECK_THROWS_AS(m.attach(o), deltaw::argument_error);
}
