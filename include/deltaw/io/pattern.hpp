// SPDX-License-Identifier: MIT
// A small regular-expression matcher for PEFT's rank_pattern / alpha_pattern keys and
// target_modules strings. Compiled to a Thompson NFA and simulated state-set by
// state-set, so matching is O(|text|·|pattern|) on every input: std::regex (libstdc++)
// backtracks exponentially on keys such as "(a|a)*b" and overflows integers on long
// back-reference numbers, both found by fuzzing the config parser.
//
// Syntax (Python's `re` for these constructs): literals, `.`, classes `[a-z_]`, `[^…]`,
// escapes `\. \d \w \s \D \W \S \n \t` and escaped punctuation, groups `(…)` and `(?:…)`,
// alternation `|`, quantifiers `* + ? {n} {n,} {,m} {n,m}` (lazy `?` suffix accepted;
// n, m ≤ 1000), `^` at the very start and `$` at the very end. Anything else
// (back-references, look-arounds, `\b`, named groups, flags) throws unsupported_error;
// malformed patterns throw format_error. `\w`, `\d`, `\s` are ASCII.
#pragma once

#include <bitset>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "errors.hpp"

DELTAW_NAMESPACE_BEGIN
namespace io {

class pattern {
 public:
  /// Compiles `re`. `what` names the pattern in error messages.
  explicit pattern(std::string_view re, const std::string& what = "pattern") : what_(what), src_(re) {
    if (re.size() > max_length)
      throw format_error("deltaw::io::pattern: " + what_ + " is longer than " + std::to_string(max_length) + " characters");
    if (!src_.empty() && src_.front() == '^') {
      anchored_start_ = true;
      ++pos_;
    }
    std::size_t end = src_.size();
    if (end > pos_ && src_[end - 1] == '$' && !(end >= 2 && src_[end - 2] == '\\')) {
      anchored_end_ = true;
      --end;
    }
    end_ = end;
    auto ast = parse_alt(0);
    if (pos_ != end_) fail("unbalanced ')'");
    states_.push_back({kind::match, {}, {}});
    match_ = 0;
    start_ = compile(*ast, match_);
  }

  /// True when the whole of `text` matches (Python's re.fullmatch).
  bool full_match(std::string_view text) const { return run(text, false); }

  /// PEFT's rule for rank_pattern / alpha_pattern keys: the key matches `text` as
  /// `(.*\.)?(key)$`, i.e. the whole of text or a suffix of it that starts after a '.'
  /// (only the whole text when the key starts with '^'). One pass over text: the NFA's
  /// start state joins the state set after every '.', so the cost is
  /// O(|text|·|states|) whatever the pattern (restarting a match at each '.' was
  /// quadratic in the name).
  bool matches_module(std::string_view text) const { return run(text, !anchored_start_); }

  /// Whether `^` / `$` were given (they are implied by full matching).
  bool anchored_start() const { return anchored_start_; }
  bool anchored_end() const { return anchored_end_; }

  static constexpr std::size_t max_length = 1024;
  static constexpr std::size_t max_states = 20000;
  static constexpr int max_repeat = 1000;
  static constexpr int max_depth = 64;

 private:
  enum class kind { chars, split, match };
  struct state {
    kind k;
    std::bitset<256> set;
    std::vector<int> out;
  };
  struct node {
    enum type { chars, concat, alt, repeat, empty } t = empty;
    std::bitset<256> set;
    std::vector<std::unique_ptr<node>> kids;
    int min = 0, max = 0;  // max < 0: unbounded
  };
  using node_ptr = std::unique_ptr<node>;

  [[noreturn]] void fail(const std::string& msg) const {
    throw format_error("deltaw::io::pattern: " + what_ + " \"" + std::string(src_) + "\": " + msg);
  }
  [[noreturn]] void unsupported(const std::string& msg) const {
    throw unsupported_error("deltaw::io::pattern: " + what_ + " \"" + std::string(src_) + "\": " + msg +
                            " is not supported");
  }
  bool at_end() const { return pos_ >= end_; }
  char peek() const { return src_[pos_]; }

  node_ptr parse_alt(int depth) {
    if (depth > max_depth) fail("groups nested more than 64 deep");
    auto first = parse_concat(depth);
    if (at_end() || peek() != '|') return first;
    auto n = std::make_unique<node>();
    n->t = node::alt;
    n->kids.push_back(std::move(first));
    while (!at_end() && peek() == '|') {
      ++pos_;
      n->kids.push_back(parse_concat(depth));
    }
    return n;
  }
  node_ptr parse_concat(int depth) {
    auto n = std::make_unique<node>();
    n->t = node::concat;
    while (!at_end() && peek() != '|' && peek() != ')') n->kids.push_back(parse_repeat(depth));
    return n;
  }
  bool parse_braces(int& lo, int& hi) {  // at '{'; false (and no advance) when a literal '{'
    std::size_t p = pos_ + 1;
    auto num = [&](int& v) {
      std::size_t s = p;
      long x = 0;
      while (p < end_ && src_[p] >= '0' && src_[p] <= '9') {
        x = x * 10 + (src_[p] - '0');
        if (x > max_repeat) fail("repeat count above 1000");
        ++p;
      }
      v = int(x);
      return p > s;
    };
    const bool has_lo = num(lo);
    if (!has_lo) lo = 0;
    if (p < end_ && src_[p] == '}') {
      if (!has_lo) return false;
      hi = lo;
    } else if (p < end_ && src_[p] == ',') {
      ++p;
      if (!num(hi)) hi = -1;
      if (p >= end_ || src_[p] != '}') return false;
    } else {
      return false;
    }
    pos_ = p + 1;
    if (hi >= 0 && hi < lo) fail("repeat {n,m} with m < n");
    return true;
  }
  node_ptr parse_repeat(int depth) {
    auto a = parse_atom(depth);
    while (!at_end()) {
      int lo, hi;
      const char c = peek();
      if (c == '*') lo = 0, hi = -1, ++pos_;
      else if (c == '+') lo = 1, hi = -1, ++pos_;
      else if (c == '?') lo = 0, hi = 1, ++pos_;
      else if (c == '{' && parse_braces(lo, hi)) {
      } else break;
      if (!at_end() && peek() == '?') ++pos_;  // lazy: the same set of full matches
      else if (!at_end() && peek() == '+') unsupported("a possessive quantifier");
      if (!at_end() && (peek() == '*' || peek() == '+' || peek() == '?' || peek() == '{')) {
        int l2, h2;
        const std::size_t save = pos_;
        if (peek() != '{' || parse_braces(l2, h2)) fail("multiple repeat");
        pos_ = save;
      }
      auto r = std::make_unique<node>();
      r->t = node::repeat;
      r->min = lo;
      r->max = hi;
      r->kids.push_back(std::move(a));
      a = std::move(r);
    }
    return a;
  }
  static std::bitset<256> class_of(char e) {
    std::bitset<256> s;
    for (int c = 0; c < 256; ++c) {
      const bool d = c >= '0' && c <= '9';
      const bool w = d || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
      const bool sp = c == ' ' || (c >= '\t' && c <= '\r');
      const char l = char(e | 0x20);
      const bool v = l == 'd' ? d : l == 'w' ? w : sp;
      s[std::size_t(c)] = (e >= 'a') ? v : !v;
    }
    return s;
  }
  // An escape at pos_ (just after '\'): its character set.
  std::bitset<256> parse_escape(bool in_class) {
    if (at_end()) fail("a trailing backslash");
    const char e = src_[pos_++];
    std::bitset<256> s;
    switch (e) {
      case 'd': case 'D': case 'w': case 'W': case 's': case 'S': return class_of(e);
      case 'n': s.set('\n'); return s;
      case 't': s.set('\t'); return s;
      case 'r': s.set('\r'); return s;
      case 'f': s.set('\f'); return s;
      case 'v': s.set('\v'); return s;
      default: break;
    }
    if (e >= '0' && e <= '9') unsupported(in_class ? "an octal escape" : "a back-reference");
    if ((e >= 'a' && e <= 'z') || (e >= 'A' && e <= 'Z')) unsupported(std::string("the escape \\") + e);
    s.set(static_cast<unsigned char>(e));
    return s;
  }
  node_ptr parse_atom(int depth) {
    auto n = std::make_unique<node>();
    n->t = node::chars;
    const char c = peek();
    ++pos_;
    switch (c) {
      case '(': {
        if (!at_end() && peek() == '?') {
          if (pos_ + 1 < end_ && src_[pos_ + 1] == ':') pos_ += 2;
          else unsupported("a (?…) group other than (?:…)");
        }
        auto inner = parse_alt(depth + 1);
        if (at_end() || peek() != ')') fail("missing ')'");
        ++pos_;
        return inner;
      }
      case '*': case '+': case '?': fail("nothing to repeat");
      case '^': case '$': unsupported("an anchor inside the pattern");
      case '.':
        n->set.set();
        n->set.reset('\n');
        return n;
      case '\\': n->set = parse_escape(false); return n;
      case '[': {
        bool neg = false;
        if (!at_end() && peek() == '^') neg = true, ++pos_;
        bool first = true;
        for (;;) {
          if (at_end()) fail("missing ']'");
          char a = peek();
          if (a == ']' && !first) {
            ++pos_;
            break;
          }
          first = false;
          ++pos_;
          std::bitset<256> item;
          int lo_c = -1;
          if (a == '\\') {
            item = parse_escape(true);
            if (item.count() == 1)
              for (int k = 0; k < 256; ++k)
                if (item[std::size_t(k)]) lo_c = k;
          } else {
            lo_c = static_cast<unsigned char>(a);
            item.set(std::size_t(lo_c));
          }
          if (lo_c >= 0 && pos_ + 1 < end_ && peek() == '-' && src_[pos_ + 1] != ']') {
            ++pos_;
            int hi_c;
            if (peek() == '\\') {
              ++pos_;
              auto h = parse_escape(true);
              if (h.count() != 1) fail("a class range ending in a class escape");
              hi_c = 0;
              for (int k = 0; k < 256; ++k)
                if (h[std::size_t(k)]) hi_c = k;
            } else {
              hi_c = static_cast<unsigned char>(peek());
              ++pos_;
            }
            if (hi_c < lo_c) fail("a reversed class range");
            for (int k = lo_c; k <= hi_c; ++k) item.set(std::size_t(k));
          }
          n->set |= item;
        }
        if (neg) n->set.flip();
        return n;
      }
      default:
        n->set.set(static_cast<unsigned char>(c));
        return n;
    }
  }

  int new_state(kind k, std::bitset<256> set = {}, std::vector<int> out = {}) {
    if (states_.size() >= max_states) fail("too large once repeats are expanded");
    states_.push_back({k, set, std::move(out)});
    return int(states_.size() - 1);
  }
  // Compiles n so that it continues to `next`; returns its entry state.
  int compile(const node& n, int next) {
    switch (n.t) {
      case node::empty: return next;
      case node::chars: return new_state(kind::chars, n.set, {next});
      case node::concat: {
        int e = next;
        for (auto it = n.kids.rbegin(); it != n.kids.rend(); ++it) e = compile(**it, e);
        return e;
      }
      case node::alt: {
        std::vector<int> outs;
        for (const auto& k : n.kids) outs.push_back(compile(*k, next));
        return new_state(kind::split, {}, std::move(outs));
      }
      case node::repeat: {
        const node& c = *n.kids[0];
        int e;
        if (n.max < 0) {
          const int loop = new_state(kind::split);
          const int body = compile(c, loop);
          states_[std::size_t(loop)].out = {body, next};
          e = loop;
        } else {
          e = next;
          for (int i = 0; i < n.max - n.min; ++i) {
            const int body = compile(c, e);
            e = new_state(kind::split, {}, {body, next});
          }
        }
        for (int i = 0; i < n.min; ++i) e = compile(c, e);
        return e;
      }
    }
    return next;
  }
  // Simulates the NFA over text. With restart_after_dot, a new match may also begin after
  // any '.' reached through a prefix without '\n' (the `(.*\.)?` of PEFT's rule).
  bool run(std::string_view text, bool restart_after_dot) const {
    std::vector<int> cur, nxt;
    std::vector<std::size_t> mark(states_.size(), 0);
    std::size_t gen = 1;
    add(cur, start_, mark, gen);
    bool prefix_open = restart_after_dot;  // `.*` of the prefix has not met a '\n'
    for (unsigned char c : text) {
      ++gen;
      nxt.clear();
      for (int s : cur)
        if (states_[std::size_t(s)].k == kind::chars && states_[std::size_t(s)].set.test(c))
          add(nxt, states_[std::size_t(s)].out[0], mark, gen);
      if (c == '\n') prefix_open = false;
      else if (c == '.' && prefix_open) add(nxt, start_, mark, gen);
      cur.swap(nxt);
      if (cur.empty() && !prefix_open) return false;
    }
    for (int s : cur)
      if (s == match_) return true;
    return false;
  }
  void add(std::vector<int>& set, int s, std::vector<std::size_t>& mark, std::size_t gen) const {
    std::vector<int> stack{s};
    while (!stack.empty()) {
      const int x = stack.back();
      stack.pop_back();
      if (mark[std::size_t(x)] == gen) continue;
      mark[std::size_t(x)] = gen;
      const auto& st = states_[std::size_t(x)];
      if (st.k == kind::split) {
        for (auto it = st.out.rbegin(); it != st.out.rend(); ++it) stack.push_back(*it);
      } else {
        set.push_back(x);
      }
    }
  }

  std::string what_;
  std::string src_;
  std::size_t pos_ = 0, end_ = 0;
  bool anchored_start_ = false, anchored_end_ = false;
  std::vector<state> states_;
  int start_ = 0, match_ = 0;
};

}  // namespace io
DELTAW_NAMESPACE_END
