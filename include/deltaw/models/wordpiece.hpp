// SPDX-License-Identifier: MIT
// A BERT WordPiece tokenizer that reads a Hugging Face tokenizer.json (the "WordPiece"
// model with the "BertNormalizer" normaliser, the "BertPreTokenizer" and a [CLS] $A [SEP]
// template), the way Hugging Face tokenizers encodes a single sentence:
//
//   1. added tokens ("special": [CLS], [SEP], [PAD], …; "normalized": false) are matched
//      literally in the raw text and kept whole;
//   2. normaliser: clean_text (drop NUL, U+FFFD and control characters other than \t \n \r,
//      whitespace becomes ' '), handle_chinese_chars (CJK ideographs get spaces around
//      them), strip_accents (NFD, drop Mn marks; by default it follows lowercase),
//      lowercase;
//   3. pre-tokenizer: split on whitespace, every punctuation character (ASCII punctuation
//      or Unicode category P*) a word of its own;
//   4. WordPiece: greedy longest match first, continuation pieces prefixed "##"; a word
//      longer than max_input_chars_per_word characters, or with a piece not in the
//      vocabulary, becomes the unknown token;
//   5. [CLS] ids [SEP], truncated to max_length (specials included), padded with the pad id.
//
// The Unicode classes come from models/unicode_tables.hpp (generated from Python's
// unicodedata). Lowercase is the per-character full mapping (Greek final sigma is not
// context dependent, as in tokenizers). Unassigned code points are kept, where tokenizers'
// clean_text drops them (its control test includes Cn).
//
// Non-template inline code: behind the models umbrella (deltaw/models.hpp), not deltaw.hpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../io/errors.hpp"
#include "../io/file.hpp"
#include "../io/json.hpp"
#include "unicode_tables.hpp"

DELTAW_NAMESPACE_BEGIN
namespace models {

namespace detail {

template <std::size_t N>
inline bool in_ranges(const std::uint32_t (&r)[N][2], std::uint32_t c) {
  std::size_t lo = 0, hi = N;
  while (lo < hi) {
    const std::size_t mid = (lo + hi) / 2;
    if (c < r[mid][0]) hi = mid;
    else if (c > r[mid][1]) lo = mid + 1;
    else return true;
  }
  return false;
}

/// UTF-8 to code points. Invalid sequences throw format_error (tokenizers takes Rust
/// strings, always valid).
inline std::u32string utf8_decode(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  for (std::size_t i = 0; i < n;) {
    const unsigned c = p[i];
    std::uint32_t cp;
    std::size_t len;
    if (c < 0x80) { cp = c; len = 1; }
    else if ((c & 0xE0) == 0xC0) { cp = c & 0x1F; len = 2; }
    else if ((c & 0xF0) == 0xE0) { cp = c & 0x0F; len = 3; }
    else if ((c & 0xF8) == 0xF0) { cp = c & 0x07; len = 4; }
    else throw format_error("deltaw::models::wordpiece: invalid UTF-8 lead byte at offset " + std::to_string(i));
    if (i + len > n) throw format_error("deltaw::models::wordpiece: truncated UTF-8 sequence at offset " + std::to_string(i));
    for (std::size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80)
        throw format_error("deltaw::models::wordpiece: invalid UTF-8 continuation byte at offset " + std::to_string(i + k));
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    static constexpr std::uint32_t min_of_len[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_of_len[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
      throw format_error("deltaw::models::wordpiece: invalid UTF-8 code point at offset " + std::to_string(i));
    out.push_back(cp);
    i += len;
  }
  return out;
}

inline void utf8_append(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

inline bool is_chinese(std::uint32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
         (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B820 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}
inline bool is_space(std::uint32_t c) { return in_ranges(unicode::space, c); }
inline bool is_control(std::uint32_t c) { return in_ranges(unicode::control, c); }
inline bool is_punct(std::uint32_t c) {
  if (c < 0x80) return (c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126);
  return in_ranges(unicode::punct, c);
}

/// Appends strip-accents(c) (and its lowercase when `lower`) to out.
inline void fold_into(std::u32string& out, std::uint32_t c, bool strip, bool lower) {
  if (strip && c >= 0xAC00 && c <= 0xD7A3) {  // Hangul syllable: its NFD is L V (T) jamo
    const std::uint32_t s = c - 0xAC00;
    out.push_back(0x1100 + s / 588);
    out.push_back(0x1161 + (s % 588) / 28);
    if (s % 28) out.push_back(0x11A7 + s % 28);
    return;
  }
  if (strip && in_ranges(unicode::removed, c)) return;
  if (strip && lower) {
    constexpr std::size_t n = sizeof(unicode::fold) / sizeof(unicode::fold[0]);
    const auto* e = std::lower_bound(&unicode::fold[0], &unicode::fold[0] + n, c,
                                     [](const std::uint32_t(&row)[3], std::uint32_t v) { return row[0] < v; });
    if (e != &unicode::fold[0] + n && (*e)[0] == c) {
      for (std::uint32_t k = 0; k < (*e)[2]; ++k) out.push_back(unicode::fold_pool[(*e)[1] + k]);
      return;
    }
    out.push_back(c);
    return;
  }
  // Only one of the two: the table combines them, so only the ASCII / Latin-1 fast paths
  // are exact here; BERT configs set both (strip_accents null follows lowercase).
  if (lower && c < 0x80 && c >= 'A' && c <= 'Z') c += 32;
  out.push_back(c);
}

}  // namespace detail

/// One encoded sentence: ids, token type ids (all 0 for one sentence) and the attention
/// mask (1 for tokens, 0 for padding).
struct encoding {
  std::vector<std::int64_t> ids;
  std::vector<std::int64_t> type_ids;
  std::vector<std::int64_t> mask;
  /// Tokens before padding.
  std::size_t length() const {
    std::size_t n = 0;
    for (auto m : mask) n += m != 0;
    return n;
  }
};

/// A batch padded to one length: row b is ids[b·seq … b·seq + seq − 1].
struct batch_encoding {
  std::vector<std::int64_t> ids, type_ids, mask;
  std::int64_t batch = 0, seq = 0;
};

class wordpiece_tokenizer {
 public:
  /// Reads tokenizer.json. Throws format_error when it is not a WordPiece / BERT tokenizer
  /// (naming the field), io_error when unreadable.
  static wordpiece_tokenizer from_file(const std::filesystem::path& path) {
    const auto buf = io::read_file(path, std::size_t(64) << 20);
    return from_json_text(std::string_view(reinterpret_cast<const char*>(buf.bytes.data()), buf.bytes.size()), path.string());
  }

  static wordpiece_tokenizer from_json_text(std::string_view text, const std::string& source = "tokenizer.json") {
    const auto j = io::parse_json_strict(text, source);
    const std::string op = "deltaw::models::wordpiece_tokenizer (" + source + ")";
    auto need = [&](const io::json& o, const char* k) -> const io::json& {
      if (!o.is_object() || !o.contains(k)) throw format_error(op + ": missing field \"" + k + "\"");
      return o.at(k);
    };
    wordpiece_tokenizer t;
    const auto& model = need(j, "model");
    if (!need(model, "type").is_string() || model.at("type").get<std::string>() != "WordPiece")
      throw format_error(op + ": model.type is not \"WordPiece\"");
    const auto& vocab = need(model, "vocab");
    if (!vocab.is_object() || vocab.empty()) throw format_error(op + ": model.vocab is not a non-empty object");
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      if (!it.value().is_number_integer() || it.value().get<std::int64_t>() < 0)
        throw format_error(op + ": model.vocab[\"" + it.key() + "\"] is not a non-negative integer");
      t.vocab_.emplace(it.key(), it.value().get<std::int64_t>());
    }
    t.unk_ = need(model, "unk_token").get<std::string>();
    t.prefix_ = model.contains("continuing_subword_prefix") ? model.at("continuing_subword_prefix").get<std::string>() : "##";
    if (model.contains("max_input_chars_per_word")) t.max_chars_ = model.at("max_input_chars_per_word").get<std::size_t>();
    t.unk_id_ = t.id_of(t.unk_, op);

    if (j.contains("normalizer") && !j.at("normalizer").is_null()) {
      const auto& n = j.at("normalizer");
      if (need(n, "type").get<std::string>() != "BertNormalizer")
        throw format_error(op + ": normalizer.type \"" + n.at("type").get<std::string>() + "\" is not supported (BertNormalizer only)");
      auto flag = [&](const char* k, bool dflt) { return n.contains(k) && n.at(k).is_boolean() ? n.at(k).get<bool>() : dflt; };
      t.clean_text_ = flag("clean_text", true);
      t.chinese_ = flag("handle_chinese_chars", true);
      t.lowercase_ = flag("lowercase", true);
      t.strip_accents_ = n.contains("strip_accents") && n.at("strip_accents").is_boolean() ? n.at("strip_accents").get<bool>()
                                                                                          : t.lowercase_;
      if (t.strip_accents_ != t.lowercase_)
        throw format_error(op + ": strip_accents differs from lowercase; only the BERT default (both or neither) is supported");
    } else {
      t.clean_text_ = t.chinese_ = t.lowercase_ = t.strip_accents_ = false;
    }
    if (j.contains("pre_tokenizer") && !j.at("pre_tokenizer").is_null() &&
        need(j.at("pre_tokenizer"), "type").get<std::string>() != "BertPreTokenizer")
      throw format_error(op + ": pre_tokenizer.type \"" + j.at("pre_tokenizer").at("type").get<std::string>() +
                         "\" is not supported (BertPreTokenizer only)");
    if (j.contains("added_tokens") && j.at("added_tokens").is_array())
      for (const auto& a : j.at("added_tokens")) {
        const auto content = need(a, "content").get<std::string>();
        if (content.empty()) continue;
        t.added_.push_back({content, need(a, "id").get<std::int64_t>()});
      }
    // Longest first, so that "[CLS]x" never matches a shorter prefix token first.
    std::stable_sort(t.added_.begin(), t.added_.end(), [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    t.cls_id_ = t.id_of("[CLS]", op);
    t.sep_id_ = t.id_of("[SEP]", op);
    t.pad_id_ = t.vocab_.count("[PAD]") ? t.vocab_.at("[PAD]") : 0;
    if (j.contains("padding") && j.at("padding").is_object() && j.at("padding").contains("pad_id"))
      t.pad_id_ = j.at("padding").at("pad_id").get<std::int64_t>();
    if (j.contains("truncation") && j.at("truncation").is_object() && j.at("truncation").contains("max_length"))
      t.default_max_length_ = j.at("truncation").at("max_length").get<std::size_t>();
    return t;
  }

  std::size_t vocab_size() const { return vocab_.size(); }
  std::int64_t cls_id() const { return cls_id_; }
  std::int64_t sep_id() const { return sep_id_; }
  std::int64_t pad_id() const { return pad_id_; }
  std::int64_t unk_id() const { return unk_id_; }
  /// The file's truncation.max_length (0 when it sets none).
  std::size_t file_max_length() const { return default_max_length_; }

  /// The normalised text (step 2 above), as UTF-8.
  std::string normalize(std::string_view text) const {
    std::string out;
    for (auto c : normalize32(detail::utf8_decode(text))) detail::utf8_append(out, c);
    return out;
  }

  /// The WordPiece tokens of `text` (no [CLS] / [SEP]).
  std::vector<std::string> tokenize(std::string_view text) const {
    std::vector<std::string> toks;
    for (auto id : encode_ids(text)) toks.push_back(token_of(id));
    return toks;
  }

  /// The ids of `text` without special tokens and without truncation.
  std::vector<std::int64_t> encode_ids(std::string_view text) const {
    std::vector<std::int64_t> ids;
    // 1. added tokens split the raw text.
    std::size_t pos = 0;
    while (pos <= text.size()) {
      std::size_t best = std::string_view::npos, len = 0;
      std::int64_t id = -1;
      for (const auto& [content, aid] : added_) {
        const auto f = text.find(content, pos);
        if (f != std::string_view::npos && (f < best || (f == best && content.size() > len))) {
          best = f;
          len = content.size();
          id = aid;
        }
      }
      const auto end = best == std::string_view::npos ? text.size() : best;
      encode_plain(text.substr(pos, end - pos), ids);
      if (best == std::string_view::npos) break;
      ids.push_back(id);
      pos = best + len;
    }
    return ids;
  }

  /// [CLS] ids [SEP], the ids cut so that the whole is at most max_length (0: no limit).
  encoding encode(std::string_view text, std::size_t max_length = 0) const {
    auto body = encode_ids(text);
    if (max_length != 0) {
      if (max_length < 2)
        throw argument_error("deltaw::models::wordpiece_tokenizer::encode: max_length " + std::to_string(max_length) +
                             " leaves no room for [CLS] and [SEP]");
      if (body.size() > max_length - 2) body.resize(max_length - 2);
    }
    encoding e;
    e.ids.reserve(body.size() + 2);
    e.ids.push_back(cls_id_);
    e.ids.insert(e.ids.end(), body.begin(), body.end());
    e.ids.push_back(sep_id_);
    e.type_ids.assign(e.ids.size(), 0);
    e.mask.assign(e.ids.size(), 1);
    return e;
  }

  /// Encodes every text and pads to the longest (right padding with the pad id, mask 0).
  batch_encoding encode_batch(const std::vector<std::string>& texts, std::size_t max_length = 0) const {
    std::vector<encoding> es;
    es.reserve(texts.size());
    std::size_t seq = 0;
    for (const auto& s : texts) {
      es.push_back(encode(s, max_length));
      seq = std::max(seq, es.back().ids.size());
    }
    batch_encoding b;
    b.batch = std::int64_t(texts.size());
    b.seq = std::int64_t(seq);
    for (const auto& e : es) {
      for (std::size_t i = 0; i < seq; ++i) {
        const bool tok = i < e.ids.size();
        b.ids.push_back(tok ? e.ids[i] : pad_id_);
        b.type_ids.push_back(0);
        b.mask.push_back(tok ? 1 : 0);
      }
    }
    return b;
  }

  const std::string& token_of(std::int64_t id) const {
    if (inverse_.empty()) {
      std::int64_t mx = 0;
      for (const auto& [k, v] : vocab_) mx = std::max(mx, v);
      inverse_.assign(std::size_t(mx + 1), std::string());
      for (const auto& [k, v] : vocab_) inverse_[std::size_t(v)] = k;
    }
    if (id < 0 || std::size_t(id) >= inverse_.size())
      throw argument_error("deltaw::models::wordpiece_tokenizer::token_of: id " + std::to_string(id) + " is not in the vocabulary");
    return inverse_[std::size_t(id)];
  }

 private:
  std::int64_t id_of(const std::string& tok, const std::string& op) const {
    auto it = vocab_.find(tok);
    if (it == vocab_.end()) throw format_error(op + ": the vocabulary has no \"" + tok + "\"");
    return it->second;
  }

  std::u32string normalize32(const std::u32string& in) const {
    std::u32string out;
    out.reserve(in.size());
    for (auto c : in) {
      if (clean_text_) {
        if (c == 0 || c == 0xFFFD || detail::is_control(c)) continue;
        if (detail::is_space(c)) {
          out.push_back(U' ');
          continue;
        }
      }
      if (chinese_ && detail::is_chinese(c)) {
        out.push_back(U' ');
        out.push_back(c);
        out.push_back(U' ');
        continue;
      }
      detail::fold_into(out, c, strip_accents_, lowercase_);
    }
    return out;
  }

  void encode_plain(std::string_view text, std::vector<std::int64_t>& ids) const {
    if (text.empty()) return;
    const auto norm = normalize32(detail::utf8_decode(text));
    std::u32string word;
    auto flush = [&] {
      if (!word.empty()) wordpiece(word, ids);
      word.clear();
    };
    for (auto c : norm) {
      if (detail::is_space(c)) {
        flush();
      } else if (detail::is_punct(c)) {
        flush();
        word.push_back(c);
        flush();
      } else {
        word.push_back(c);
      }
    }
    flush();
  }

  void wordpiece(const std::u32string& word, std::vector<std::int64_t>& ids) const {
    if (word.size() > max_chars_) {
      ids.push_back(unk_id_);
      return;
    }
    const std::size_t first = ids.size();
    std::size_t start = 0;
    std::string piece;
    while (start < word.size()) {
      std::size_t end = word.size();
      std::int64_t found = -1;
      while (start < end) {
        piece = start > 0 ? prefix_ : std::string();
        for (std::size_t k = start; k < end; ++k) detail::utf8_append(piece, word[k]);
        auto it = vocab_.find(piece);
        if (it != vocab_.end()) {
          found = it->second;
          break;
        }
        --end;
      }
      if (found < 0) {
        ids.resize(first);
        ids.push_back(unk_id_);
        return;
      }
      ids.push_back(found);
      start = end;
    }
  }

  std::unordered_map<std::string, std::int64_t> vocab_;
  mutable std::vector<std::string> inverse_;
  std::vector<std::pair<std::string, std::int64_t>> added_;
  std::string unk_ = "[UNK]", prefix_ = "##";
  std::size_t max_chars_ = 100, default_max_length_ = 0;
  std::int64_t unk_id_ = 0, cls_id_ = 0, sep_id_ = 0, pad_id_ = 0;
  bool clean_text_ = true, chinese_ = true, lowercase_ = true, strip_accents_ = true;
};

}  // namespace models
DELTAW_NAMESPACE_END
