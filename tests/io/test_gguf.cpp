// GGUF LoRA: adapters written by the gguf Python package (F32, F16, Q8_0) read back with
// the right dimension order and llama.cpp's scale, reproducing PEFT's outputs; deltaw's
// writer round trip; every malformed container throws format_error.
#include <cstring>

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;

namespace {
const std::pair<const char*, const char*> names[] = {
    {"blocks.0.q", "blk.0.attn_q.weight"}, {"blocks.0.v", "blk.0.attn_v.weight"}, {"head", "output.weight"}};
}

TEST_CASE("gguf: F32 adapter written by gguf.GGUFWriter reproduces PEFT's layer outputs") {
  const auto path = dwio::fixtures() / "gguf" / "lora_f32.gguf";
  const auto f = io::gguf_file::open(path);
  CHECK(f.version() == 3);
  CHECK(f.alignment() == 32);
  CHECK(*f.get_string("general.architecture") == "llama");
  const auto a = io::read_gguf_lora(f, "llama");
  CHECK(a.alpha == 8.0f);
  REQUIRE(a.tensors.size() == 3);
  const auto expected = io::safetensors_file::open(dwio::fixtures() / "gguf" / "expected.safetensors");
  const auto weights = io::safetensors_file::open(dwio::fixtures() / "peft_lora" / "model.safetensors");
  const auto iof = io::safetensors_file::open(dwio::fixtures() / "peft_lora" / "io.safetensors");
  for (const auto& [hf, gg] : names) {
    const std::string gname = gg;  // clang 14 cannot capture structured bindings
    CAPTURE(gname);
    const auto* p = a.find(gg);
    REQUIRE(p != nullptr);
    // numpy order: A [r, in], B [out, r]; GGUF ne reversed.
    const auto& ta = f.at(std::string(gg) + ".lora_a");
    CHECK(ta.ne[0] == std::uint64_t(p->A.view.cols()));
    CHECK(ta.ne[1] == std::uint64_t(p->A.view.rows()));
    CHECK(dwt::rel_err(Eigen::Map<const MatF>(p->A.view.data(), p->A.view.rows(), p->A.view.cols()),
                       dwio::load_matd(expected, std::string("F32.") + gg + ".lora_a")) == 0.0);
    CHECK(static_cast<const void*>(p->A.view.data()) == static_cast<const void*>(f.data(ta).data()));  // zero-copy
    const auto W = weights.matrix<float>(std::string(hf) + ".weight");
    const MatF X = dwio::load_matd(iof, std::string("x.") + hf).cast<float>();
    MatD Y = dw::apply(W.view + a.update(gg), X).cast<double>();
    const auto b = weights.values<double>(std::string(hf) + ".bias");
    for (Eigen::Index i = 0; i < Y.rows(); ++i)
      for (Eigen::Index j = 0; j < Y.cols(); ++j) Y(i, j) += b[std::size_t(j)];
    CHECK(dwt::rel_err(Y, dwio::load_matd(iof, std::string("y.") + hf)) < 1e-5);
  }
}

TEST_CASE("gguf: F16 and Q8_0 tensors convert to the values the gguf package stored") {
  const auto expected = io::safetensors_file::open(dwio::fixtures() / "gguf" / "expected.safetensors");
  const auto a16 = io::read_gguf_lora(dwio::fixtures() / "gguf" / "lora_f16.gguf");
  for (const auto& [hf, gg] : names) {
    const auto* p = a16.find(gg);
    REQUIRE(p != nullptr);
    CHECK(dwt::rel_err(Eigen::Map<const MatF>(p->B.view.data(), p->B.view.rows(), p->B.view.cols()),
                       dwio::load_matd(expected, std::string("F16.") + gg + ".lora_b")) == 0.0);
  }
  const auto f8 = io::gguf_file::open(dwio::fixtures() / "gguf" / "lora_q8_0.gguf");
  CHECK(f8.at("blk.1.attn_q.weight.lora_a").type == 8);
  const auto a8 = io::read_gguf_lora(f8);
  CHECK(a8.alpha == 16.0f);
  const auto* p = a8.find("blk.1.attn_q.weight");
  REQUIRE(p != nullptr);
  CHECK(p->rank() == 32);
  CHECK(p->A.view.cols() == 64);
  CHECK(p->B.view.rows() == 40);
  CHECK(dwt::rel_err(Eigen::Map<const MatF>(p->A.view.data(), 32, 64),
                     dwio::load_matd(expected, "Q8_0.blk.1.attn_q.weight.lora_a")) < 1e-7);
  CHECK(dwt::rel_err(Eigen::Map<const MatF>(p->B.view.data(), 40, 32),
                     dwio::load_matd(expected, "Q8_0.blk.1.attn_q.weight.lora_b")) < 1e-7);
  CHECK(a8.scale(*p) == doctest::Approx(0.5));
}

TEST_CASE("gguf: deltaw's writer round trip folds per-tensor scales into B exactly") {
  dwio::temp_dir tmp;
  const MatF B1 = dwt::random<MatF>(6, 3, 1), A1 = dwt::random<MatF>(3, 5, 2);
  const MatF B2 = dwt::random<MatF>(4, 2, 3), A2 = dwt::random<MatF>(2, 6, 4);
  std::vector<std::pair<std::string, dw::low_rank<float>>> ups = {
      {"blk.0.attn_q.weight", dw::lora(B1, A1, dw::alpha(12))}, {"blk.0.attn_k.weight", dw::lora(B2, A2, dw::scale(0.3))}};
  io::write_gguf_lora(tmp.path / "a.gguf", "llama", ups, "test adapter");
  const auto a = io::read_gguf_lora(tmp.path / "a.gguf", "llama");
  CHECK(a.alpha == 12.0f);
  CHECK(*io::gguf_file::open(tmp.path / "a.gguf").get_string("general.name") == "test adapter");
  for (const auto& [name, u] : ups) {
    const std::string tname = name;  // clang 14 cannot capture structured bindings
    CAPTURE(tname);
    CHECK(dwt::rel_err(dw::materialize(a.update(name)), dw::materialize(u)) < 1e-6);
  }
  dwt::check_throws_with<dw::format_error>([&] { (void)io::read_gguf_lora(tmp.path / "a.gguf", "qwen2"); },
                                           {"for \"llama\" but the model is \"qwen2\""});
  // The generic writer: typed KVs, arrays, alignment 64.
  io::gguf_writer w(64);
  w.add_kv("general.type", io::gguf_value::string("model"));
  io::gguf_value arr{io::gguf_type::ARRAY, io::gguf_type::INT32, std::vector<io::gguf_value>{io::gguf_value::i32(-1), io::gguf_value::i32(2)}};
  w.add_kv("arr", arr);
  w.add_kv("flag", io::gguf_value::boolean(true));
  w.add_kv("big", io::gguf_value::u64(1ull << 40));
  const dwt::RowMat<Eigen::half> H = dwt::random<MatF>(3, 5, 9).cast<Eigen::half>();
  w.add_tensor("h", dw::view(H));
  w.add_tensor("t", dw::view(A1).transpose());
  const auto g = io::gguf_file::parse(w.serialize());
  CHECK(g.alignment() == 64);
  CHECK(std::get<std::vector<io::gguf_value>>(g.find_kv("arr")->value).size() == 2);
  CHECK_FALSE(g.find_kv("arr")->as_number().has_value());
  CHECK(std::get<bool>(g.find_kv("flag")->value));
  CHECK(*g.find_kv("big")->as_number() == double(1ull << 40));
  CHECK(g.at("h").ne == std::vector<std::uint64_t>{5, 3});  // GGUF order
  CHECK(g.at("h").shape() == std::vector<std::uint64_t>{3, 5});
  const auto hm = g.matrix<dw::fp16>("h");
  for (index_t i = 0; i < 3; ++i)
    for (index_t j = 0; j < 5; ++j) CHECK(hm.view(i, j).bits == dw::fp16(float(H(i, j))).bits);
  CHECK(dwt::rel_err(Eigen::Map<const MatF>(g.matrix<float>("t").view.data(), 5, 3), MatF(A1.transpose())) == 0.0);
  dwt::check_throws_with<dw::format_error>([&] { (void)io::read_gguf_lora(g); }, {"general.type is \"model\""});
}

namespace {
// Raw GGUF bytes, field by field.
struct gguf_bytes {
  std::vector<std::byte> b;
  void raw(const void* p, std::size_t n) {
    const auto* c = static_cast<const std::byte*>(p);
    b.insert(b.end(), c, c + n);
  }
  gguf_bytes& u32(std::uint32_t v) { raw(&v, 4); return *this; }
  gguf_bytes& u64(std::uint64_t v) { raw(&v, 8); return *this; }
  gguf_bytes& str(const std::string& s) { u64(s.size()); raw(s.data(), s.size()); return *this; }
  gguf_bytes& header(std::uint64_t nt, std::uint64_t nkv, std::uint32_t version = 3) {
    raw("GGUF", 4);
    return u32(version).u64(nt).u64(nkv);
  }
  gguf_bytes& kv_str(const std::string& k, const std::string& v) { return str(k).u32(8).str(v); }
  gguf_bytes& kv_u32(const std::string& k, std::uint32_t v) { return str(k).u32(4).u32(v); }
  gguf_bytes& tensor(const std::string& name, std::vector<std::uint64_t> ne, std::uint32_t type, std::uint64_t off) {
    str(name).u32(std::uint32_t(ne.size()));
    for (auto d : ne) u64(d);
    return u32(type).u64(off);
  }
  gguf_bytes& pad(std::size_t a = 32) { b.resize((b.size() + a - 1) / a * a); return *this; }
  gguf_bytes& data(std::size_t n) { b.resize(b.size() + n); return *this; }
};
}  // namespace

TEST_CASE("gguf: every malformed container throws format_error (or unsupported_error) with a specific message") {
  struct cse {
    const char* name;
    std::vector<std::byte> bytes;
    const char* frag;
    bool unsupported = false;
  };
  auto valid = [] { return gguf_bytes{}.header(1, 1).kv_str("general.type", "adapter").tensor("x.lora_a", {4, 2}, 0, 0).pad().data(32); };
  auto with = [](std::vector<std::byte> b, std::size_t at, std::uint64_t v, std::size_t n) {
    std::memcpy(b.data() + at, &v, n);
    return b;
  };
  const auto ok = valid().b;
  REQUIRE_NOTHROW(io::gguf_file::parse(ok));
  std::vector<cse> cases = {
      {"short", std::vector<std::byte>(10), "fewer than a GGUF header"},
      {"bad magic", with(ok, 0, 0x58554747, 4), "bad magic"},
      {"version 1", with(ok, 4, 1, 4), "version 1", true},
      {"big-endian", with(ok, 4, 0x03000000, 4), "big-endian"},
      {"version 7", with(ok, 4, 7, 4), "unknown GGUF version 7"},
      {"huge tensor count", with(ok, 8, 1ull << 62, 8), "tensor count"},
      {"huge KV count", with(ok, 16, ~0ull, 8), "KV count"},
      {"huge key length", with(ok, 24, ~0ull - 7, 8), "truncated: a key"},
      {"unknown value type", with(ok, 24 + 8 + 12, 99, 4), "unknown value type 99"},
      {"huge string value", with(ok, 24 + 8 + 12 + 4, 1ull << 40, 8), "truncated: a string value"},
      {"truncated infos", std::vector<std::byte>(ok.begin(), ok.begin() + 80), "truncated"},
      {"truncated data", std::vector<std::byte>(ok.begin(), ok.end() - 8), "runs past the end of the data section"},
      {"alignment not power of two", gguf_bytes{}.header(0, 1).kv_u32("general.alignment", 24).b, "not a power of two"},
      {"alignment zero", gguf_bytes{}.header(0, 1).kv_u32("general.alignment", 0).b, "not a power of two"},
      {"alignment wrong type", gguf_bytes{}.header(0, 1).kv_str("general.alignment", "32").b, "must be a u32"},
      {"duplicate key", gguf_bytes{}.header(0, 2).kv_str("a", "1").kv_str("a", "2").b, "duplicate key \"a\""},
      {"duplicate tensor", gguf_bytes{}.header(2, 0).tensor("t", {1}, 0, 0).tensor("t", {1}, 0, 32).pad().data(64).b, "duplicate tensor name"},
      {"five dims", gguf_bytes{}.header(1, 0).tensor("t", {1, 1, 1, 1, 1}, 0, 0).pad().data(32).b, "at most 4"},
      {"unknown ggml type", gguf_bytes{}.header(1, 0).tensor("t", {1}, 77, 0).pad().data(32).b, "unknown ggml type 77"},
      {"row not a block multiple", gguf_bytes{}.header(1, 0).tensor("t", {16, 2}, 8, 0).pad().data(64).b, "block size 32"},
      {"element overflow", gguf_bytes{}.header(1, 0).tensor("t", {1ull << 32, 1ull << 32}, 0, 0).pad().b, "overflows"},
      {"byte overflow", gguf_bytes{}.header(1, 0).tensor("t", {1ull << 62}, 0, 0).pad().b, "byte size overflows"},
      {"offset + size past end", gguf_bytes{}.header(1, 0).tensor("t", {1ull << 40}, 0, 0).pad().data(32).b, "runs past the end"},
      {"misaligned offset", gguf_bytes{}.header(1, 0).tensor("t", {1}, 0, 4).pad().data(32).b, "not a multiple of the alignment"},
      {"offset past end", gguf_bytes{}.header(1, 0).tensor("t", {1}, 0, 1ull << 60).pad().data(32).b, "runs past the end"},
      {"overlap", gguf_bytes{}.header(2, 0).tensor("a", {16}, 0, 0).tensor("b", {1}, 0, 32).pad().data(64).b, "overlap"},
      {"nested too deep", gguf_bytes{}.header(0, 1).str("k").u32(9).u32(9).u64(1).u32(9).u64(1).u32(9).u64(1).u32(9).u64(1).u32(4).u64(1).u32(0).b, "nested too deeply"},
      {"array too long", gguf_bytes{}.header(0, 1).str("k").u32(9).u32(4).u64(1ull << 40).b, "does not fit"},
      {"bad array type", gguf_bytes{}.header(0, 1).str("k").u32(9).u32(13).u64(0).b, "unknown array element type"},
  };
  for (const auto& c : cases) {
    CAPTURE(std::string(c.name));
    auto f = [&] { (void)io::gguf_file::parse(c.bytes); };
    if (c.unsupported) dwt::check_throws_with<dw::unsupported_error>(f, {c.frag});
    else dwt::check_throws_with<dw::format_error>(f, {c.frag});
  }
  CHECK(cases.size() == 29);
  // Types the reader validates but does not convert.
  const auto q4 = io::gguf_file::parse(gguf_bytes{}.header(1, 0).tensor("t", {32}, 2, 0).pad().data(32).b);
  dwt::check_throws_with<dw::unsupported_error>([&] { (void)q4.values<float>("t"); }, {"Q4_0"});
}

TEST_CASE("gguf: LoRA-level checks (type, architecture, pairs, shapes)") {
  auto lora = [](const std::string& gtype, const std::string& atype, bool arch) {
    io::gguf_writer w;
    if (arch) w.add_kv("general.architecture", io::gguf_value::string("llama"));
    w.add_kv("general.type", io::gguf_value::string(gtype));
    w.add_kv("adapter.type", io::gguf_value::string(atype));
    return w;
  };
  const MatF A = dwt::random<MatF>(2, 5, 1), B = dwt::random<MatF>(3, 2, 2), B3 = dwt::random<MatF>(3, 3, 3);
  {
    auto w = lora("adapter", "control_vector", true);
    dwt::check_throws_with<dw::unsupported_error>([&] { (void)io::read_gguf_lora(io::gguf_file::parse(w.serialize())); },
                                                  {"adapter.type \"control_vector\""});
  }
  {
    auto w = lora("adapter", "lora", false);
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_gguf_lora(io::gguf_file::parse(w.serialize())); },
                                             {"general.architecture is missing"});
  }
  {
    auto w = lora("adapter", "lora", true);
    w.add_tensor("x.lora_a", dw::view(A));
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_gguf_lora(io::gguf_file::parse(w.serialize())); },
                                             {"lacks its .lora_b"});
  }
  {
    auto w = lora("adapter", "lora", true);
    w.add_tensor("x.weight", dw::view(A));
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_gguf_lora(io::gguf_file::parse(w.serialize())); },
                                             {"neither a .lora_a nor a .lora_b"});
  }
  {
    auto w = lora("adapter", "lora", true);
    w.add_tensor("x.lora_a", dw::view(A));
    w.add_tensor("x.lora_b", dw::view(B3));
    dwt::check_throws_with<dw::format_error>([&] { (void)io::read_gguf_lora(io::gguf_file::parse(w.serialize())); },
                                             {"must be [r, in]"});
  }
  {
    auto w = lora("adapter", "lora", true);  // no alpha: llama.cpp uses scale 1
    w.add_tensor("x.lora_a", dw::view(A));
    w.add_tensor("x.lora_b", dw::view(B));
    const auto a = io::read_gguf_lora(io::gguf_file::parse(w.serialize()));
    CHECK(a.alpha == 0.0f);
    CHECK(a.update("x").scale() == 1.0);
    dwt::check_throws_with<dw::argument_error>([&] { (void)a.update("y"); }, {"no LoRA for \"y\""});
  }
}

TEST_CASE("gguf: Llama module names map to llama.cpp tensor names") {
  CHECK(*io::llama_gguf_tensor_name("model.layers.3.self_attn.q_proj") == "blk.3.attn_q.weight");
  CHECK(*io::llama_gguf_tensor_name("model.layers.12.mlp.down_proj.weight") == "blk.12.ffn_down.weight");
  CHECK(*io::llama_gguf_tensor_name("model.layers.0.self_attn.o_proj") == "blk.0.attn_output.weight");
  CHECK_FALSE(io::llama_gguf_tensor_name("model.layers.x.self_attn.q_proj"));
  CHECK_FALSE(io::llama_gguf_tensor_name("model.embed_tokens"));
}

TEST_CASE("gguf: every seed of the fuzz corpus parses or throws deltaw::error") {
  int n = 0, ok = 0;
  for (const auto& e : std::filesystem::directory_iterator(dwio::corpus() / "gguf")) {
    ++n;
    const auto b = dwio::slurp(e.path());
    try {
      const auto f = io::gguf_file::parse(b);
      for (const auto& t : f.tensors()) (void)f.values<double>(t.name);
      (void)io::read_gguf_lora(f);
      ++ok;
    } catch (const dw::error&) {
    }
  }
  CHECK(n >= 10);
  CHECK(ok >= 3);
}
