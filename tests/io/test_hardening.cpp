// SPDX-License-Identifier: MIT
// Hostile files, concurrent writers and overflow (issue 14, items 1, 3, 4, 5, 7, 8): each
// case builds the hostile input itself (a planted symlink, a FIFO, a second process, a
// crafted header) and checks for a clean deltaw::error, the right bytes, bounded time or
// bounded memory. Its own executable: it forks writer processes and replaces operator
// new / delete to measure the live bytes a reader allocates (also under ASan, where
// malloc is the sanitizer's: the count sits above it).
#include <doctest/doctest.h>

#include "io_test_util.hpp"

#include <deltaw/io/json.hpp>
#include <deltaw/io/pattern.hpp>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <new>
#include <set>

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#if __has_include(<dlpack/dlpack.h>)
#include <deltaw/io/dlpack.hpp>
#define DELTAW_TEST_HAS_DLPACK 1
#endif

namespace io = deltaw::io;
namespace fs = std::filesystem;
using dwio::bytes_of;

// ---- live-byte accounting: every operator new / delete of this executable ----------------
namespace {
std::atomic<std::size_t> live_bytes{0}, peak_bytes{0};
std::atomic<bool> counting{false};

constexpr std::size_t header_for(std::size_t align) { return align < 16 ? 16 : align; }

void* counted_alloc(std::size_t n, std::size_t align) {
  const std::size_t h = header_for(align);
  void* raw = nullptr;
  if (align <= 16) raw = std::malloc(n + h);
  else if (::posix_memalign(&raw, align, n + h) != 0) raw = nullptr;
  if (raw == nullptr) return nullptr;
  auto* user = static_cast<unsigned char*>(raw) + h;
  std::memcpy(user - sizeof(std::size_t), &n, sizeof n);
  if (counting.load(std::memory_order_relaxed)) {
    const std::size_t now = live_bytes.fetch_add(n) + n;
    std::size_t p = peak_bytes.load();
    while (now > p && !peak_bytes.compare_exchange_weak(p, now)) {
    }
  }
  return user;
}
void counted_free(void* p, std::size_t align) noexcept {
  if (p == nullptr) return;
  auto* user = static_cast<unsigned char*>(p);
  std::size_t n;
  std::memcpy(&n, user - sizeof(std::size_t), sizeof n);
  if (counting.load(std::memory_order_relaxed)) live_bytes.fetch_sub(std::min(n, live_bytes.load()));
  std::free(user - header_for(align));
}
void* counted_new(std::size_t n, std::size_t align) {
  if (void* p = counted_alloc(n, align)) return p;
  throw std::bad_alloc();
}

/// The peak of live operator-new bytes while f runs, above what was live before it.
template <class F>
std::size_t peak_allocation(F&& f) {
  live_bytes = 0;
  peak_bytes = 0;
  counting = true;
  try {
    f();
  } catch (...) {
    counting = false;
    throw;
  }
  counting = false;
  return peak_bytes.load();
}
}  // namespace

void* operator new(std::size_t n) { return counted_new(n, 0); }
void* operator new[](std::size_t n) { return counted_new(n, 0); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n, 0); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return counted_new(n, std::size_t(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_new(n, std::size_t(a)); }
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept { return counted_alloc(n, std::size_t(a)); }
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept { return counted_alloc(n, std::size_t(a)); }
void operator delete(void* p) noexcept { counted_free(p, 0); }
void operator delete[](void* p) noexcept { counted_free(p, 0); }
void operator delete(void* p, std::size_t) noexcept { counted_free(p, 0); }
void operator delete[](void* p, std::size_t) noexcept { counted_free(p, 0); }
void operator delete(void* p, const std::nothrow_t&) noexcept { counted_free(p, 0); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { counted_free(p, 0); }
void operator delete(void* p, std::align_val_t a) noexcept { counted_free(p, std::size_t(a)); }
void operator delete[](void* p, std::align_val_t a) noexcept { counted_free(p, std::size_t(a)); }
void operator delete(void* p, std::size_t, std::align_val_t a) noexcept { counted_free(p, std::size_t(a)); }
void operator delete[](void* p, std::size_t, std::align_val_t a) noexcept { counted_free(p, std::size_t(a)); }
void operator delete(void* p, std::align_val_t a, const std::nothrow_t&) noexcept { counted_free(p, std::size_t(a)); }
void operator delete[](void* p, std::align_val_t a, const std::nothrow_t&) noexcept { counted_free(p, std::size_t(a)); }

namespace {

std::set<std::string> entries(const fs::path& dir) {
  std::set<std::string> s;
  for (const auto& e : fs::directory_iterator(dir)) s.insert(e.path().filename().string());
  return s;
}

std::string slurp_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

double seconds_of(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// A GGUF v3 buffer built byte by byte (the writer cannot make hostile files).
struct gguf_bytes {
  std::vector<std::byte> b;
  template <class I>
  void num(I v) {
    const auto* p = reinterpret_cast<const std::byte*>(&v);
    b.insert(b.end(), p, p + sizeof v);
  }
  void str(const std::string& s) {
    num(std::uint64_t(s.size()));
    const auto* p = reinterpret_cast<const std::byte*>(s.data());
    b.insert(b.end(), p, p + s.size());
  }
  gguf_bytes(std::uint64_t tensors, std::uint64_t kvs) {
    str("");
    b.clear();
    for (char c : std::string("GGUF")) b.push_back(std::byte(c));
    num(std::uint32_t(3));
    num(tensors);
    num(kvs);
  }
  void kv_string(const std::string& k, const std::string& v) {
    str(k);
    num(std::uint32_t(8));
    str(v);
  }
  void tensor(const std::string& name, std::vector<std::uint64_t> ne, std::uint32_t type, std::uint64_t offset) {
    str(name);
    num(std::uint32_t(ne.size()));
    for (auto d : ne) num(d);
    num(type);
    num(offset);
  }
  void pad() {
    while (b.size() % 32) b.push_back(std::byte{0});
  }
};

}  // namespace

// ---- item 1: writers -----------------------------------------------------------------------

TEST_CASE("write_file never writes through a planted symlink and leaves no temporary") {
  dwio::temp_dir tmp;
  const fs::path victim = tmp.path / "victim.txt", dest = tmp.path / "out.safetensors";
  dwio::write_text(victim, "VICTIM");
  // The fixed name earlier versions used, and the destination's own name as a link.
  fs::create_symlink(victim, tmp.path / "out.safetensors.deltaw-tmp");
  io::safetensors_writer w;
  const Eigen::MatrixXf M = Eigen::MatrixXf::Constant(3, 4, 2.5f);
  w.add("m", M);
  w.write(dest);
  CHECK(slurp_text(victim) == "VICTIM");
  CHECK(io::safetensors_file::open(dest).values<float>("m") == std::vector<float>(12, 2.5f));
  CHECK(entries(tmp.path) == std::set<std::string>{"victim.txt", "out.safetensors", "out.safetensors.deltaw-tmp"});

  // A destination that is a symlink: the link is replaced, its target untouched.
  const fs::path link = tmp.path / "link.txt";
  fs::create_symlink(victim, link);
  dwio::write_text(link, "NEW");
  CHECK(slurp_text(victim) == "VICTIM");
  CHECK(fs::is_regular_file(fs::symlink_status(link)));
  CHECK(slurp_text(link) == "NEW");
}

TEST_CASE("write_file keeps the destination's permission bits; new files get 0666 less the umask") {
  dwio::temp_dir tmp;
  const fs::path p = tmp.path / "cfg.json";
  dwio::write_text(p, "a");
  const ::mode_t um = ::umask(0);
  ::umask(um);
  struct stat st {};
  REQUIRE(::stat(p.c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == (0666 & ~um));
  REQUIRE(::chmod(p.c_str(), 0640) == 0);
  dwio::write_text(p, "bb");
  REQUIRE(::stat(p.c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0640);
  CHECK(slurp_text(p) == "bb");
}

TEST_CASE("write_file removes its temporary when the final rename fails") {
  dwio::temp_dir tmp;
  const fs::path d = tmp.path / "occupied";
  fs::create_directories(d / "inside");  // a non-empty directory: rename onto it fails, even as root
  dwt::check_throws_with<deltaw::io_error>([&] { dwio::write_text(d, "x"); }, {"cannot rename", "occupied"});
  CHECK(entries(tmp.path) == std::set<std::string>{"occupied"});
  dwt::check_throws_with<deltaw::io_error>([&] { dwio::write_text(tmp.path / "missing_dir" / "f", "x"); },
                                       {"cannot create", "missing_dir"});
}

TEST_CASE("two processes writing one destination: it always holds one writer's complete bytes") {
  dwio::temp_dir tmp;
  const fs::path dest = tmp.path / "shared.bin";
  constexpr std::size_t size = std::size_t(1) << 20;
  constexpr int rounds = 40;
  pid_t kids[2];
  for (int k = 0; k < 2; ++k) {
    kids[k] = ::fork();
    REQUIRE(kids[k] >= 0);
    if (kids[k] == 0) {
      int rc = 0;
      try {
        // Writer k: every byte is 'A' + k, and the lengths differ.
        const std::vector<std::byte> b(size + std::size_t(k) * 4096, std::byte('A' + k));
        for (int r = 0; r < rounds; ++r) io::write_file(dest, b);
      } catch (...) {
        rc = 3;
      }
      ::_exit(rc);
    }
  }
  // Meanwhile: every read sees a whole file from one writer, never a mix or a truncation.
  int reads = 0, bad = 0, running = 2;
  int status[2] = {0, 0};
  bool done[2] = {false, false};
  while (running > 0) {
    for (int k = 0; k < 2; ++k)
      if (!done[k] && ::waitpid(kids[k], &status[k], WNOHANG) == kids[k]) done[k] = true, --running;
    std::error_code ec;
    if (!fs::exists(dest, ec)) continue;
    const auto b = dwio::slurp(dest);
    ++reads;
    const bool a_ok = b.size() == size && std::all_of(b.begin(), b.end(), [](std::byte x) { return x == std::byte('A'); });
    const bool b_ok = b.size() == size + 4096 && std::all_of(b.begin(), b.end(), [](std::byte x) { return x == std::byte('B'); });
    if (!a_ok && !b_ok) ++bad;
  }
  for (int k = 0; k < 2; ++k) {
    CHECK(WIFEXITED(status[k]));
    CHECK(WEXITSTATUS(status[k]) == 0);  // both writers reported success, and truly succeeded
  }
  CHECK(bad == 0);
  MESSAGE("concurrent reads checked: " << reads);
  const auto b = dwio::slurp(dest);
  CHECK((b.size() == size || b.size() == size + 4096));
  CHECK(std::all_of(b.begin(), b.end(), [&](std::byte x) { return x == b.front(); }));
  CHECK(entries(tmp.path) == std::set<std::string>{"shared.bin"});  // no temporary left behind
}

TEST_CASE("make_unique_sibling_directory and sync_directory") {
  dwio::temp_dir tmp;
  const auto a = io::make_unique_sibling_directory(tmp.path / "adapter"), b = io::make_unique_sibling_directory(tmp.path / "adapter");
  CHECK(a != b);
  CHECK(fs::is_directory(a));
  CHECK(a.parent_path() == tmp.path);
  CHECK(a.filename().string().starts_with(".adapter.deltaw-tmp-"));
  io::sync_directory(tmp.path);
  CHECK_THROWS_AS(io::sync_directory(tmp.path / "nope"), deltaw::io_error);
}

// ---- item 3: unbounded and blocking reads --------------------------------------------------

TEST_CASE("FIFOs and devices are refused without blocking; configs are capped") {
  dwio::temp_dir tmp;
  const fs::path fifo = tmp.path / "pipe";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  ::alarm(20);  // a regression blocks in open(): SIGALRM ends the run instead of hanging it
  dwt::check_throws_with<deltaw::io_error>([&] { (void)io::read_file(fifo); }, {"not a regular file", "pipe"});
  dwt::check_throws_with<deltaw::io_error>([&] { (void)io::map_file(fifo); }, {"not a regular file"});
  dwt::check_throws_with<deltaw::io_error>([&] { (void)io::safetensors_file::open(fifo); }, {"not a regular file"});
  dwt::check_throws_with<deltaw::io_error>([&] { (void)io::gguf_file::open(fifo); }, {"not a regular file"});
  dwt::check_throws_with<deltaw::io_error>([&] { (void)io::read_file("/dev/zero"); }, {"not a regular file", "/dev/zero"});
  dwt::check_throws_with<deltaw::io_error>([&] { (void)io::read_file(tmp.path); }, {"not a regular file"});

  // A PEFT directory whose config is /dev/zero (was: bad_alloc after 2 GB) or a FIFO.
  for (int k = 0; k < 2; ++k) {
    const fs::path dir = tmp.path / ("adapter" + std::to_string(k));
    fs::create_directories(dir);
    fs::copy_file(dwio::fixtures() / "peft_lora" / "adapter" / "adapter_model.safetensors", dir / "adapter_model.safetensors");
    if (k == 0) fs::create_symlink("/dev/zero", dir / "adapter_config.json");
    else REQUIRE(::mkfifo((dir / "adapter_config.json").c_str(), 0600) == 0);
    CHECK_THROWS_AS((void)io::read_peft_adapter(dir), deltaw::error);
    if (k == 1) {  // and as the weights
      fs::remove(dir / "adapter_config.json");
      fs::copy_file(dwio::fixtures() / "peft_lora" / "adapter" / "adapter_config.json", dir / "adapter_config.json");
      fs::remove(dir / "adapter_model.safetensors");
      REQUIRE(::mkfifo((dir / "adapter_model.safetensors").c_str(), 0600) == 0);
      CHECK_THROWS_AS((void)io::read_peft_adapter(dir), deltaw::error);
    }
  }
  ::alarm(0);

  // The size cap: at the limit read, one byte over refused before allocating it.
  const fs::path p = tmp.path / "c.json";
  dwio::write_text(p, std::string(100, ' '));
  CHECK(io::read_file(p, 100).bytes.size() == 100);
  dwt::check_throws_with<deltaw::format_error>([&] { (void)io::read_file(p, 99); }, {"c.json", "limit of 99"});
  CHECK(io::max_config_bytes >= (std::size_t(1) << 20));
  CHECK(io::max_config_bytes <= (std::size_t(64) << 20));
}

// ---- item 4: linear-time parsing ------------------------------------------------------------

namespace {
std::string many_entries_header(std::size_t n) {
  std::string h = "{";
  for (std::size_t i = 0; i < n; ++i) {
    if (i) h += ',';
    h += "\"t" + std::to_string(i) + "\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}";
  }
  return h + "}";
}
}  // namespace

TEST_CASE("a safetensors header of 160k entries parses in linear time (was 20.7 s)") {
  const std::size_t n = 160'000;
  auto file = dwio::raw_safetensors(many_entries_header(n));
  std::size_t size = 0;
  const double s = seconds_of([&] { size = io::safetensors_file::parse(std::move(file)).size(); });
  CHECK(size == n);
  MESSAGE("160k-entry header: " << s << " s");
  CHECK(s < 10.0);  // ~0.2 s optimised, a few s under ASan; the quadratic parser took 20.7 s
  // An eighth of the entries: the time scales about linearly (quadratic: 64 times).
  auto small = dwio::raw_safetensors(many_entries_header(n / 8));
  const double s8 = seconds_of([&] { (void)io::safetensors_file::parse(std::move(small)); });
  MESSAGE("20k-entry header: " << s8 << " s");
  CHECK(s < 24 * s8 + 0.05);
}

TEST_CASE("parse_json_strict: linear in the member count, order kept, duplicates still refused") {
  std::string t = "{";
  for (int i = 0; i < 200'000; ++i) t += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":" + std::to_string(i);
  t += "}";
  io::json j;
  const double s = seconds_of([&] { j = io::parse_json_strict(t, "big"); });
  MESSAGE("200k-key object: " << s << " s");
  CHECK(s < 10.0);
  REQUIRE(j.size() == 200'000);
  int i = 0;
  bool in_order = true;
  for (const auto& [k, v] : j.items()) in_order = in_order && k == "k" + std::to_string(i) && v.get<int>() == i, ++i;
  CHECK(in_order);
  // Lookups of the DOM still work (ordered_json).
  CHECK(j.at("k199999").get<int>() == 199999);
  dwt::check_throws_with<deltaw::format_error>([] { (void)io::parse_json_strict(R"({"a":{"x":1,"y":2,"x":3}})", "cfg"); },
                                           {"cfg", "duplicate JSON key \"x\""});
  dwt::check_throws_with<deltaw::format_error>([] { (void)io::parse_json_strict("[[[1]]]", "cfg", 2); }, {"deeper than 2"});
  dwt::check_throws_with<deltaw::format_error>([] { (void)io::parse_json_strict("{\"a\":1e999}", "cfg"); }, {"cfg", "invalid JSON"});
  CHECK(io::parse_json_strict(R"( {"z":[1,{"b":null,"a":true}],"y":"s"} )", "cfg").dump() ==
        R"({"z":[1,{"b":null,"a":true}],"y":"s"})");
}

TEST_CASE("safetensors header: duplicates and malformed entries refused by the one-pass parser") {
  auto bad = [](const std::string& header, std::initializer_list<std::string> frags) {
    dwt::check_throws_with<deltaw::format_error>([&] { (void)io::safetensors_file::parse(dwio::raw_safetensors(header)); }, frags);
  };
  const std::string e = R"({"dtype":"F32","shape":[0],"data_offsets":[0,0]})";
  bad("{\"a\":" + e + ",\"a\":" + e + "}", {"duplicate JSON key \"a\""});
  bad(R"({"__metadata__":{"k":"1","k":"2"}})", {"duplicate JSON key \"k\""});
  bad(R"({"__metadata__":{},"__metadata__":{}})", {"duplicate JSON key \"__metadata__\""});
  bad(R"({"a":{"dtype":"F32","dtype":"F32","shape":[0],"data_offsets":[0,0]}})", {"duplicate JSON key \"dtype\""});
  bad(R"({"a":{"dtype":["F32"],"shape":[0],"data_offsets":[0,0]}})", {"no string \"dtype\""});
  bad(R"({"a":{"dtype":"F32","shape":{"x":1},"data_offsets":[0,0]}})", {"no array \"shape\""});
  bad(R"({"a":{"dtype":"F32","shape":[[1]],"data_offsets":[0,0]}})", {"not a non-negative integer"});
  bad(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0,0]}})", {"data_offsets"});
  bad(R"({"a":{"dtype":"F32","shape":[0]}})", {"data_offsets"});
  bad(R"({"a":{"shape":[0],"data_offsets":[0,0]}})", {"no string \"dtype\""});
  bad(R"({"a":[1]})", {"entry \"a\" is not an object"});
  bad(R"([1])", {"not a JSON object"});
  bad(R"({"__metadata__":{"k":1}})", {"__metadata__ value for \"k\" is not a string"});
  bad(R"({"__metadata__":"x"})", {"__metadata__ must be an object"});
  bad(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":[[[[[[[[1]]]]]]]]}})", {"nested deeper than 8"});
  // Extra fields are ignored (not stored), wherever they are and whatever they hold.
  const auto f = io::safetensors_file::parse(dwio::raw_safetensors(
      R"({"x":{"extra":{"deep":[1,{"k":"v"}]},"dtype":"F32","data_offsets":[0,4],"shape":[1],"more":null},"__metadata__":null})",
      dwio::f32_bytes({7.0f})));
  CHECK(f.values<float>("x") == std::vector<float>{7.0f});
  CHECK(f.metadata().empty());
}

TEST_CASE("safetensors writer: header bytes as nlohmann's dump of the same object, in linear time") {
  io::safetensors_writer w;
  const Eigen::MatrixXf A = Eigen::MatrixXf::Constant(2, 3, 1.0f);
  const Eigen::VectorXd v = Eigen::VectorXd::Constant(4, 2.0);
  w.add("zeta \"quoted\" \xc3\xa9", A);
  w.add("alpha", v);
  w.set_metadata("format", "pt");
  w.set_metadata("b\n", "tab\t");
  const auto bytes = w.serialize();
  std::uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  std::string header(reinterpret_cast<const char*>(bytes.data()) + 8, n);
  while (!header.empty() && header.back() == ' ') header.pop_back();
  nlohmann::ordered_json ref = nlohmann::ordered_json::object();
  ref["__metadata__"] = {{"b\n", "tab\t"}, {"format", "pt"}};
  ref["zeta \"quoted\" \xc3\xa9"] = {{"dtype", "F32"}, {"shape", {2, 3}}, {"data_offsets", {0, 24}}};
  ref["alpha"] = {{"dtype", "F64"}, {"shape", {4, 1}}, {"data_offsets", {24, 56}}};  // an Eigen vector is a 4 × 1 matrix
  CHECK(header == ref.dump());
  CHECK(n % 8 == 0);

  io::safetensors_writer big;
  const Eigen::MatrixXf z(0, 0);
  for (int i = 0; i < 100'000; ++i) big.add("t" + std::to_string(i), z);
  std::vector<std::byte> out;
  const double s = seconds_of([&] { out = big.serialize(); });
  MESSAGE("100k-entry serialize: " << s << " s");
  CHECK(s < 10.0);
  CHECK(io::safetensors_file::parse(std::move(out)).size() == 100'000);
  io::safetensors_writer bad;
  bad.add("\xff", A);
  CHECK_THROWS_AS((void)bad.serialize(), deltaw::argument_error);
}

// ---- item 5: linear pattern matching ---------------------------------------------------------

TEST_CASE("pattern::matches_module is one pass: (.*){1000}Z against 3,990 dots (was 218 s)") {
  const io::pattern p("(.*){1000}Z", "rank_pattern key");
  const std::string name(3990, '.');
  bool m = true;
  const double s = seconds_of([&] { m = p.matches_module(name); });
  CHECK_FALSE(m);
  MESSAGE("(.*){1000}Z over 3990 dots: " << s << " s");
  CHECK(s < 10.0);
  CHECK(p.matches_module(name + "Z"));
}

TEST_CASE("pattern::matches_module equals (.*\\.)?(key) by restarting at every '.'") {
  // The definition, evaluated naively through full_match on every suffix after a '.'.
  auto reference = [](const io::pattern& p, std::string_view t) {
    if (p.full_match(t)) return true;
    if (p.anchored_start()) return false;
    for (std::size_t i = 0; i < t.size(); ++i) {
      if (t[i] == '\n') return false;  // `.*` of the prefix cannot cross a newline
      if (t[i] == '.' && p.full_match(t.substr(i + 1))) return true;
    }
    return false;
  };
  const std::vector<std::string> keys = {"q_proj", "^q_proj", "layers\\.0\\.q_proj", "(q|v)_proj", ".*\\.q_proj", "\\d+\\.mlp",
                                         "a.b", "a*", "", ".", "\\.", "x\\.?y", "[^.]+", "(a|ab)(c|bcd)(d*)", "^.*proj$"};
  const std::vector<std::string> names = {"q_proj", "model.layers.0.q_proj", "model.layers.0.v_proj", "layers.0.q_proj",
                                          "x.q_proj.y", "12.mlp", "a.b", "xa.b", "aaa", "", ".", "..", "x.y", "xy", "x..y",
                                          "abcd", "z.abcd", "a\n.q_proj", "abbcd", "m.abbcdd", "q_proj.", "model.proj"};
  int checked = 0, positives = 0;
  for (const auto& k : keys) {
    const io::pattern p(k, "key");
    for (const auto& n : names) {
      CAPTURE(k);
      CAPTURE(n);
      const bool want = reference(p, n);
      CHECK(p.matches_module(n) == want);
      ++checked;
      positives += want;
    }
  }
  CHECK(positives > 20);  // both outcomes exercised
  CHECK(checked - positives > 20);
}

// ---- item 7: overflow on huge zero-byte shapes ------------------------------------------------

TEST_CASE("LoKr and RandLoRA files with huge zero-byte shapes: format_error naming the file") {
  const auto lokr_cfg = io::parse_peft_structured_config(R"({"peft_type":"LOKR","r":8,"alpha":8,"target_modules":["layer"]})");
  // lokr_w1 [2^62 + 1, 0] ⊗ lokr_w2 [4, 0]: out = 2^64 + 4 overflowed int64.
  const auto lokr = io::safetensors_file::parse(
      dwio::raw_safetensors(R"({"base_model.model.layer.lokr_w1":{"dtype":"F32","shape":[4611686018427387905,0],"data_offsets":[0,0]},)"
                            R"("base_model.model.layer.lokr_w2":{"dtype":"F32","shape":[4,0],"data_offsets":[0,0]}})"),
      "lokr.safetensors");
  dwt::check_throws_with<deltaw::format_error>(
      [&] { (void)io::peft_structured_adapter::from_safetensors(lokr_cfg, lokr, "hostile_lokr"); }, {"hostile_lokr", "layer", "too large"});

  // randlora_B [2^63, 0, 2]: a format_error, not a shape_error about a negative view.
  const auto rl_cfg = io::parse_peft_structured_config(R"({"peft_type":"RANDLORA","r":2,"target_modules":["layer"]})");
  const auto rl = io::safetensors_file::parse(dwio::raw_safetensors(
      R"({"base_model.randlora_A":{"dtype":"F32","shape":[2,1,0],"data_offsets":[0,0]},)"
      R"("base_model.randlora_B":{"dtype":"F32","shape":[9223372036854775808,0,2],"data_offsets":[0,0]}})"));
  dwt::check_throws_with<deltaw::format_error>([&] { (void)io::peft_structured_adapter::from_safetensors(rl_cfg, rl, "hostile_randlora"); },
                                           {"hostile_randlora", "randlora_B"});

  // The expression refuses the product itself (for callers that build one by hand).
  const deltaw::matrix_view<const float> big(nullptr, index_t(1) << 62, 0), four(nullptr, 4, 0);
  using F = deltaw::kron_dense_factor<float>;
  CHECK_THROWS_AS((deltaw::kron_update<F, F>(F(deltaw::hold(big)), F(deltaw::hold(four)), 1.0)), deltaw::shape_error);
  CHECK_NOTHROW((deltaw::kron_update<F, F>(F(deltaw::hold(four)), F(deltaw::hold(four)), 1.0)));
}

TEST_CASE("GGUF: dimensions of 2^63 and above refused, as llama.cpp") {
  for (const auto& ne : std::vector<std::vector<std::uint64_t>>{{0, std::uint64_t(1) << 63, std::uint64_t(1) << 63},
                                                                 {0, std::uint64_t(1) << 62, std::uint64_t(1) << 62},
                                                                 {~std::uint64_t(0), 0}}) {
    gguf_bytes g(1, 0);
    g.tensor("t", ne, 0, 0);
    g.pad();
    dwt::check_throws_with<deltaw::format_error>([&] { (void)io::gguf_file::parse(std::vector<std::byte>(g.b), "hostile.gguf"); },
                                             {"hostile.gguf", "tensor \"t\""});
  }
  gguf_bytes ok(1, 0);
  ok.tensor("t", {0, std::uint64_t(1) << 40, 4}, 0, 0);
  ok.pad();
  CHECK(io::gguf_file::parse(std::vector<std::byte>(ok.b)).tensors().at(0).element_count() == 0);
}

TEST_CASE("GGUF: an f64 adapter.lora.alpha of 1e300 is refused naming the key") {
  gguf_bytes g(2, 4);
  g.kv_string("general.architecture", "llama");
  g.kv_string("general.type", "adapter");
  g.kv_string("adapter.type", "lora");
  g.str("adapter.lora.alpha");
  g.num(std::uint32_t(12));
  g.num(1e300);
  g.tensor("blk.0.attn_q.weight.lora_a", {2, 1}, 0, 0);   // [r = 1, in = 2]
  g.tensor("blk.0.attn_q.weight.lora_b", {1, 2}, 0, 32);  // [out = 2, r = 1]
  g.pad();
  const auto data = dwio::f32_bytes({1, 2, 0, 0, 0, 0, 0, 0, 3, 4});
  g.b.insert(g.b.end(), data.begin(), data.end());
  const auto f = io::gguf_file::parse(std::vector<std::byte>(g.b), "alpha.gguf");
  bool thrown = false;
  try {
    (void)io::read_gguf_lora(f, "", "alpha.gguf");
  } catch (const deltaw::error& e) {
    thrown = true;
    const std::string what = e.what();
    CHECK(what.find("adapter.lora.alpha") != std::string::npos);
    CHECK(what.find("alpha.gguf") != std::string::npos);
  }
  CHECK(thrown);
}

#ifdef DELTAW_TEST_HAS_DLPACK
TEST_CASE("DLPack: a [2^62, 4] tensor is refused instead of overflowing") {
  alignas(16) float data[4] = {};
  std::int64_t shape[2] = {std::int64_t(1) << 62, 4};
  DLTensor t{};
  t.data = data;
  t.device = {kDLCPU, 0};
  t.ndim = 2;
  t.dtype = {std::uint8_t(kDLFloat), 32, 1};
  t.shape = shape;
  CHECK_THROWS_AS((void)io::dlpack_matrix<const float>(t), deltaw::shape_error);
  CHECK_THROWS_AS((void)io::dlpack_matrix<float>(t), deltaw::shape_error);
  std::int64_t strides[2] = {std::int64_t(1) << 61, 1};
  std::int64_t shape2[2] = {8, 4};
  t.shape = shape2;
  t.strides = strides;
  CHECK_THROWS_AS((void)io::dlpack_matrix<const float>(t), deltaw::shape_error);
  std::int64_t one_row[2] = {1, std::int64_t(1) << 62};
  std::int64_t wide_strides[2] = {1, 4};
  t.shape = one_row;
  t.strides = wide_strides;  // the row stride of a 1-row view would be cols·cs = 2^64
  CHECK_THROWS_AS((void)io::dlpack_matrix<const float>(t), deltaw::shape_error);
  std::int64_t vshape[1] = {std::int64_t(1) << 62};
  std::int64_t vstride[1] = {4};
  t.ndim = 1;
  t.shape = vshape;
  t.strides = vstride;
  CHECK_THROWS_AS((void)io::dlpack_vector<const float>(t), deltaw::shape_error);
  std::int64_t ok_shape[2] = {2, 2};
  t.ndim = 2;
  t.shape = ok_shape;
  t.strides = nullptr;
  CHECK(io::dlpack_matrix<const float>(t).rows() == 2);
}
#endif

// ---- item 8: memory bounded by a small multiple of the input ---------------------------------

TEST_CASE("readers allocate a small multiple of the bytes they are given") {
  // A 4 MB GGUF whose one KV is a 4 M-element u8 array (was 194 MB, 49×).
  {
    gguf_bytes g(0, 1);
    g.str("big");
    g.num(std::uint32_t(9));
    g.num(std::uint32_t(0));
    g.num(std::uint64_t(4'000'000));
    g.b.resize(g.b.size() + 4'000'000, std::byte{7});
    const std::span<const std::byte> s(g.b);
    std::size_t n = 0;
    const std::size_t peak = peak_allocation([&] { n = io::gguf_file::parse(s).find_kv("big")->array_size(); });
    CHECK(n == 4'000'000);
    MESSAGE("GGUF u8 array: peak " << peak << " bytes for a " << g.b.size() << "-byte file");
    CHECK(peak < 2 * g.b.size());
    const auto f = io::gguf_file::parse(s);
    CHECK(std::get<std::uint64_t>(f.find_kv("big")->element(3'999'999).value) == 7);
  }
  // An 8 MB safetensors header whose shape holds 4 M ones (was 198 MB, 25×).
  {
    std::string h = R"({"t":{"dtype":"F32","data_offsets":[0,4],"shape":[1)";
    h.reserve(8'000'100);
    for (int i = 1; i < 4'000'000; ++i) h += ",1";
    h += "]}}";
    const auto file = dwio::raw_safetensors(h, dwio::f32_bytes({1.0f}));
    const std::span<const std::byte> s(file);
    std::size_t rank = 0;
    const std::size_t peak = peak_allocation([&] { rank = io::safetensors_file::parse(s).tensors().at(0).shape.size(); });
    CHECK(rank == 4'000'000);
    MESSAGE("safetensors 4M-dim shape: peak " << peak << " bytes for a " << file.size() << "-byte file");
    CHECK(peak < 8 * file.size());  // the shape itself: 8 bytes per 2-byte ",1"
  }
  // An ignored 8 MB extra field (was 139 MB, 17×): skipped, not stored.
  {
    std::string h = R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":[0)";
    h.reserve(8'000'100);
    for (int i = 1; i < 4'000'000; ++i) h += ",0";
    h += "]}}";
    const auto file = dwio::raw_safetensors(h, dwio::f32_bytes({1.0f}));
    const std::span<const std::byte> s(file);
    const std::size_t peak = peak_allocation([&] { (void)io::safetensors_file::parse(s); });
    MESSAGE("safetensors ignored field: peak " << peak << " bytes for a " << file.size() << "-byte file");
    CHECK(peak < file.size() / 4);
  }
  // A config of 400k small keys: the DOM stays within a bounded multiple.
  {
    std::string t = "{\"rank_pattern\":{";
    for (int i = 0; i < 400'000; ++i) t += (i ? ",\"" : "\"") + std::to_string(i) + "\":8";
    t += "}}";
    const std::size_t peak = peak_allocation([&] { (void)io::parse_json_strict(t, "cfg"); });
    MESSAGE("400k-key config: peak " << peak << " bytes for " << t.size() << " bytes of JSON");
    CHECK(peak < 16 * t.size());
  }
}
