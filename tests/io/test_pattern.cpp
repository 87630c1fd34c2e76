// The NFA pattern matcher used for PEFT's rank_pattern / alpha_pattern / target_modules,
// against Python's `re` (the expected booleans were computed with re.fullmatch and with
// PEFT's re.match(rf"(.*\.)?({key})$", module)); and its guarantees on hostile patterns.
#include <chrono>

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;

namespace {
struct cse {
  const char* pattern;
  std::string text;
  bool python;
};
}  // namespace

TEST_CASE("pattern: full matches agree with Python's re.fullmatch") {
  const std::vector<cse> cases = {
      {R"(q_proj)", "q_proj", true},
      {R"(q_proj)", "xq_proj", false},
      {R"(.*\.(q|v)_proj)", "model.layers.0.q_proj", true},
      {R"(.*\.(q|v)_proj)", "model.layers.0.k_proj", false},
      {R"(layers\.[0-9]+\.mlp)", "layers.12.mlp", true},
      {R"(layers\.[0-9]+\.mlp)", "layers.x.mlp", false},
      {R"(a{2,3})", "aaa", true},
      {R"(a{2,3})", "aaaa", false},
      {R"(a{2})", "aa", true},
      {R"(a{,2})", "", true},
      {R"((?:ab)+)", "ababab", true},
      {R"((?:ab)+)", "abba", false},
      {R"([^.]+)", "abc", true},
      {R"([^.]+)", "a.c", false},
      {R"(\w+\d)", "abc1", true},
      {R"(\w+\d)", "abc", false},
      {R"(x{)", "x{", true},
      {R"([]a])", "]", true},
      {R"([a-c\-])", "-", true},
      {R"((a|a)*b)", "aaaaaaaaaaaa", false},
      {R"((a|a)*b)", "aaaaaaaaaaaab", true},
      {R"(^q$)", "q", true},
      {R"(.*?proj)", "qproj", true},
      {R"(a|)", "", true},
      {R"(\.)", ".", true},
      {R"((a*)*)", "aaaa", true},
      {R"([\d_]+)", "1_2", true},
  };
  for (const auto& c : cases) {
    CAPTURE(std::string(c.pattern));
    CAPTURE(c.text);
    CHECK(io::pattern(c.pattern).full_match(c.text) == c.python);
  }
}

TEST_CASE("pattern: PEFT's key rule (.*\\.)?(key)$ agrees with Python") {
  const std::vector<cse> cases = {
      {R"(v)", "blocks.0.v", true},
      {R"(v)", "blocks.0.xv", false},
      {R"(q_proj)", "model.layers.0.q_proj", true},
      {R"(layers\.0\.q_proj)", "model.layers.0.q_proj", true},
      {R"(layers\.0\.q_proj)", "model.layers.10.q_proj", false},
      {R"(^q)", "x.q", false},
      {R"(^q)", "q", true},
      {R"(0\.q)", "blocks.0.q", true},
      {R"(.*)", "anything", true},
      {R"(proj)", "a.q_proj", false},
      {R"(q_proj$)", "a.q_proj", true},
  };
  for (const auto& c : cases) {
    CAPTURE(std::string(c.pattern));
    CAPTURE(c.text);
    CHECK(io::pattern(c.pattern).matches_module(c.text) == c.python);
  }
}

TEST_CASE("pattern: hostile patterns stay polynomial; unsupported syntax is refused") {
  // Exponential for backtracking engines (Python's re and std::regex take minutes here).
  const std::string text(5000, 'a');
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_FALSE(io::pattern("(a|a)*(a*)*b").full_match(text));
  CHECK(io::pattern("(a|aa)*").full_match(text));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(secs < 5.0);  // generous: milliseconds in practice
  dwt::check_throws_with<dw::unsupported_error>([] { (void)io::pattern(R"((a)\1)"); }, {"back-reference"});
  dwt::check_throws_with<dw::unsupported_error>([] { (void)io::pattern(R"(a\75555555555555555555)"); }, {"back-reference"});
  dwt::check_throws_with<dw::unsupported_error>([] { (void)io::pattern("(?=a)a"); }, {"(?…) group"});
  dwt::check_throws_with<dw::unsupported_error>([] { (void)io::pattern(R"(\bq)"); }, {"escape \\b"});
  dwt::check_throws_with<dw::unsupported_error>([] { (void)io::pattern("a^b"); }, {"anchor"});
  dwt::check_throws_with<dw::format_error>([] { (void)io::pattern("(a"); }, {"missing ')'"});
  dwt::check_throws_with<dw::format_error>([] { (void)io::pattern("a)"); }, {"unbalanced"});
  dwt::check_throws_with<dw::format_error>([] { (void)io::pattern("*a"); }, {"nothing to repeat"});
  dwt::check_throws_with<dw::format_error>([] { (void)io::pattern("a**"); }, {"multiple repeat"});
  dwt::check_throws_with<dw::format_error>([] { (void)io::pattern("[a"); }, {"missing ']'"});
  dwt::check_throws_with<dw::format_error>([] { (void)io::pattern("[z-a]"); }, {"reversed"});
  dwt::check_throws_with<dw::format_error>([] { (void)io::pattern("a{99999999999}"); }, {"above 1000"});
  dwt::check_throws_with<dw::format_error>([] { (void)io::pattern("a{3,2}"); }, {"m < n"});
  dwt::check_throws_with<dw::format_error>([] { (void)io::pattern("(a{1000}){1000}"); }, {"too large"});
  dwt::check_throws_with<dw::format_error>([] { (void)io::pattern(std::string(100, '(') + std::string(100, ')')); },
                                           {"nested more than 64"});
  dwt::check_throws_with<dw::format_error>([] { (void)io::pattern(std::string(2000, 'a')); }, {"longer than 1024"});
}
