// GGUF LoRA: adapters written by the gguf Python package (F32, F16, Q8_0) read back with
// the right dimension order and llama.cpp's scale, reproducing PEFT's outputs; deltaw's
// writer round trip; llama.cpp's rotary row order of attn_q / attn_k (checked against a
// dense reference and against attention scores under both rotary conventions); every
// malformed container throws format_error.
#include <cstring>

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;

namespace {
const std::pair<const char*, const char*> names[] = {
    {"blocks.0.q", "blk.0.attn_q.weight"}, {"blocks.0.v", "blk.0.attn_v.weight"}, {"head", "output.weight"}};
// The fixtures were written by gguf.GGUFWriter straight from PEFT's tensors (no rotary
// reordering, and no heads: the toy q is [24, 16]), so they are read with the rows as stored.
io::gguf_lora_options as_stored(const std::string& arch = "") {
  io::gguf_lora_options o;
  o.architecture = arch;
  o.permute_qk = false;
  return o;
}
}

TEST_CASE("gguf: F32 adapter written by gguf.GGUFWriter reproduces PEFT's layer outputs") {
  const auto path = dwio::fixtures() / "gguf" / "lora_f32.gguf";
  const auto f = io::gguf_file::open(path);
  CHECK(f.version() == 3);
  CHECK(f.alignment() == 32);
  CHECK(*f.get_string("general.architecture") == "llama");
  dwt::check_throws_with<dw::argument_error>([&] { (void)io::read_gguf_lora(f, "llama"); },
                                             {"\"blk.0.attn_q.weight\"", "head_count", "permute_qk = false"});
  const auto a = io::read_gguf_lora(f, as_stored("llama"));
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
  const auto a16 = io::read_gguf_lora(dwio::fixtures() / "gguf" / "lora_f16.gguf", as_stored());
  for (const auto& [hf, gg] : names) {
    const auto* p = a16.find(gg);
    REQUIRE(p != nullptr);
    CHECK(dwt::rel_err(Eigen::Map<const MatF>(p->B.view.data(), p->B.view.rows(), p->B.view.cols()),
                       dwio::load_matd(expected, std::string("F16.") + gg + ".lora_b")) == 0.0);
  }
  const auto f8 = io::gguf_file::open(dwio::fixtures() / "gguf" / "lora_q8_0.gguf");
  CHECK(f8.at("blk.1.attn_q.weight.lora_a").type == 8);
  const auto a8 = io::read_gguf_lora(f8, as_stored());
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
  const MatF B1 = dwt::random<MatF>(8, 3, 1), A1 = dwt::random<MatF>(3, 5, 2);
  const MatF B2 = dwt::random<MatF>(4, 2, 3), A2 = dwt::random<MatF>(2, 6, 4);
  std::vector<std::pair<std::string, dw::low_rank<float>>> ups = {
      {"blk.0.attn_q.weight", dw::lora(B1, A1, dw::alpha(12))}, {"blk.0.attn_k.weight", dw::lora(B2, A2, dw::scale(0.3))}};
  io::gguf_lora_options o;
  o.head_count = {2};  // q: 2 heads of 4, k: 1 head of 4
  o.head_count_kv = {1};
  o.name = "test adapter";
  io::write_gguf_lora(tmp.path / "a.gguf", "llama", ups, o);
  o.architecture = "llama";
  const auto a = io::read_gguf_lora(tmp.path / "a.gguf", o);
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
  CHECK(g.find_kv("arr")->array_size() == 2);  // read back packed (gguf_packed_array)
  CHECK(std::get<std::int64_t>(g.find_kv("arr")->element(0).value) == -1);
  CHECK(std::get<std::int64_t>(g.find_kv("arr")->element(1).value) == 2);
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

namespace {
// Reference for llama.cpp's converter (LlamaModel.permute): the rows of a [heads·D, c] matrix
// viewed as [heads, 2, D/2, c], axes 1 and 2 swapped, viewed back; built here in double as a
// permutation matrix P, so that the GGUF matrix is P·M.
MatD rope_permutation(Eigen::Index heads, Eigen::Index rows) {
  const Eigen::Index D = rows / heads, half = D / 2;
  MatD P = MatD::Zero(rows, rows);
  // Flat row index of [h, s, i] in the [heads, 2, D/2] view, and of [h, i, s] after the swap.
  for (Eigen::Index h = 0; h < heads; ++h)
    for (Eigen::Index s = 0; s < 2; ++s)
      for (Eigen::Index i = 0; i < half; ++i) P((h * half + i) * 2 + s, (h * 2 + s) * half + i) = 1.0;
  return P;
}
// Rotary embedding of one head's vector at position p: Hugging Face's rotate-half pairs
// (i, i + D/2), llama.cpp's normal mode pairs (2i, 2i + 1); same frequencies θᵢ = 10000^(−2i/D).
Eigen::VectorXd rope(const Eigen::VectorXd& x, double p, bool interleaved) {
  const Eigen::Index D = x.size(), half = D / 2;
  Eigen::VectorXd y(D);
  for (Eigen::Index i = 0; i < half; ++i) {
    const double t = p * std::pow(10000.0, -2.0 * double(i) / double(D)), c = std::cos(t), sn = std::sin(t);
    const Eigen::Index a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    y(a) = x(a) * c - x(b) * sn;
    y(b) = x(b) * c + x(a) * sn;
  }
  return y;
}
}  // namespace

TEST_CASE("gguf: attn_q / attn_k rows follow llama.cpp's rotary order (dense reference, attention scores)") {
  dwio::temp_dir tmp;
  const Eigen::Index heads = 4, kv_heads = 2, D = 6, in = 10;
  const MatF Bq = dwt::random<MatF>(heads * D, 3, 11), Aq = dwt::random<MatF>(3, in, 12);
  const MatF Bk = dwt::random<MatF>(kv_heads * D, 2, 13), Ak = dwt::random<MatF>(2, in, 14);
  const MatF Bv = dwt::random<MatF>(kv_heads * D, 2, 15), Av = dwt::random<MatF>(2, in, 16);
  const auto q = dw::lora(Bq, Aq, dw::alpha(6)), k = dw::lora(Bk, Ak, dw::scale(0.7)), v = dw::lora(Bv, Av, dw::alpha(2));
  io::gguf_lora_options o;
  o.head_count = {heads};
  o.head_count_kv = {kv_heads};
  // The documented call shape: a braced list of {name, update}; mixed element types.
  const auto kd = dw::lora(dwt::MatD(Bk.cast<double>()), dwt::MatD(Ak.cast<double>()), dw::scale(0.7));
  io::write_gguf_lora(tmp.path / "a.gguf", "llama",
                      {{"blk.1.attn_q.weight", q}, {"blk.1.attn_k.weight", kd}, {"blk.1.attn_v.weight", v}}, o);

  // As stored: ΔW_gguf = P·ΔW_hf for q (4 heads) and k (2 KV heads), v unchanged.
  const auto raw = io::read_gguf_lora(tmp.path / "a.gguf", as_stored("llama"));
  const MatD Wq = dw::materialize(q).cast<double>(), Wk = dw::materialize(k).cast<double>();
  const MatD Gq = dw::materialize(raw.update("blk.1.attn_q.weight")).cast<double>();
  const MatD Gk = dw::materialize(raw.update("blk.1.attn_k.weight")).cast<double>();
  CHECK(dwt::rel_err(Gq, rope_permutation(heads, heads * D) * Wq) < 1e-6);
  CHECK(dwt::rel_err(Gk, rope_permutation(kv_heads, kv_heads * D) * Wk) < 1e-6);
  CHECK(dwt::rel_err(Gq, Wq) > 0.1);  // the reordering is not the identity here
  CHECK(dwt::rel_err(dw::materialize(raw.update("blk.1.attn_v.weight")), dw::materialize(v)) < 1e-6);
  // A is untouched (only B's rows move).
  CHECK(dwt::rel_err(Eigen::Map<const MatF>(raw.find("blk.1.attn_q.weight")->A.view.data(), 3, in), Aq) == 0.0);

  // What the order means: attention scores with Hugging Face's rotary on the PEFT rows equal
  // those with llama.cpp's interleaved rotary on the stored rows (GQA: q head h uses k head h/2).
  const Eigen::VectorXd x1 = dwt::random<MatD>(in, 1, 17), x2 = dwt::random<MatD>(in, 1, 18);
  const Eigen::VectorXd qh = Wq * x1, kh = Wk * x2, qg = Gq * x1, kg = Gk * x2;
  double worst = 0, scale = 0;
  for (Eigen::Index h = 0; h < heads; ++h) {
    const Eigen::Index g = h / (heads / kv_heads);
    const double s_hf = rope(qh.segment(h * D, D), 5, false).dot(rope(kh.segment(g * D, D), 2, false));
    const double s_gg = rope(qg.segment(h * D, D), 5, true).dot(rope(kg.segment(g * D, D), 2, true));
    worst = std::max(worst, std::abs(s_hf - s_gg));
    scale = std::max(scale, std::abs(s_hf));
  }
  CHECK(scale > 0.1);
  CHECK(worst / scale < 1e-5);

  // Read with the head counts: PEFT's rows again.
  auto ro = o;
  ro.architecture = "llama";
  const auto a = io::read_gguf_lora(tmp.path / "a.gguf", ro);
  CHECK(dwt::rel_err(dw::materialize(a.update("blk.1.attn_q.weight")), dw::materialize(q)) < 1e-6);
  CHECK(dwt::rel_err(dw::materialize(a.update("blk.1.attn_k.weight")), dw::materialize(k)) < 1e-6);

  // Per-layer head counts (as in a GGUF with per-layer arrays): layer 1's entry is used.
  io::gguf_lora_options per_layer;
  per_layer.head_count = {1, heads, 7};
  per_layer.head_count_kv = {1, kv_heads, 7};
  const auto b = io::read_gguf_lora(io::gguf_file::open(tmp.path / "a.gguf"), per_layer);
  CHECK(dwt::rel_err(dw::materialize(b.update("blk.1.attn_k.weight")), dw::materialize(k)) < 1e-6);

  // An architecture llama.cpp does not reorder: rows as given, and no heads needed.
  io::write_gguf_lora(tmp.path / "qwen.gguf", "qwen2", {{"blk.0.attn_q.weight", q}});
  const auto w = io::read_gguf_lora(tmp.path / "qwen.gguf", "qwen2");
  CHECK(dwt::rel_err(dw::materialize(w.update("blk.0.attn_q.weight")), dw::materialize(q)) == 0.0);
  CHECK(io::gguf_lora_permutes_qk("llama"));
  CHECK(io::gguf_lora_permutes_qk("granite"));
  CHECK_FALSE(io::gguf_lora_permutes_qk("qwen2"));
  CHECK_FALSE(io::gguf_lora_permutes_qk("llama4"));
  // permute_qk = true forces it.
  auto forced = o;
  forced.permute_qk = true;
  io::write_gguf_lora(tmp.path / "forced.gguf", "qwen2", {{"blk.0.attn_q.weight", q}}, forced);
  const auto fr = io::read_gguf_lora(tmp.path / "forced.gguf", as_stored());
  CHECK(dwt::rel_err(dw::materialize(fr.update("blk.0.attn_q.weight")).cast<double>(),
                     rope_permutation(heads, heads * D) * Wq) < 1e-6);
}

TEST_CASE("gguf: head counts from a base model's GGUF, and every refusal") {
  dwio::temp_dir tmp;
  {
    io::gguf_writer m;
    m.add_kv("general.architecture", io::gguf_value::string("llama"));
    m.add_kv("general.type", io::gguf_value::string("model"));
    m.add_kv("llama.attention.head_count", io::gguf_value::u32(4));
    m.add_kv("llama.attention.head_count_kv", io::gguf_value::u32(2));
    const auto o = io::gguf_lora_options::from_model(io::gguf_file::parse(m.serialize()));
    CHECK(o.architecture == "llama");
    CHECK(o.head_count == std::vector<std::int64_t>{4});
    CHECK(o.head_count_kv == std::vector<std::int64_t>{2});
  }
  {
    io::gguf_writer m;  // per-layer arrays (e.g. deci), no head_count_kv
    m.add_kv("general.architecture", io::gguf_value::string("deci"));
    m.add_kv("deci.attention.head_count",
             io::gguf_value{io::gguf_type::ARRAY, io::gguf_type::INT32,
                            std::vector<io::gguf_value>{io::gguf_value::i32(8), io::gguf_value::i32(0), io::gguf_value::i32(4)}});
    const auto o = io::gguf_lora_options::from_model(io::gguf_file::parse(m.serialize()));
    CHECK(o.head_count == std::vector<std::int64_t>{8, 0, 4});
    CHECK(o.head_count_kv.empty());
  }
  {
    io::gguf_writer m;
    m.add_kv("general.architecture", io::gguf_value::string("llama"));
    m.add_kv("llama.attention.head_count", io::gguf_value::i32(-2));
    dwt::check_throws_with<dw::format_error>(
        [&] { (void)io::gguf_lora_options::from_model(io::gguf_file::parse(m.serialize())); },
        {"llama.attention.head_count", "non-negative integer"});
  }
  const MatF B = dwt::random<MatF>(8, 2, 1), A = dwt::random<MatF>(2, 5, 2);
  const auto u = dw::lora(B, A, dw::alpha(4));
  const auto out = tmp.path / "x.gguf";
  dwt::check_throws_with<dw::argument_error>(
      [&] { io::write_gguf_lora(out, "llama", std::vector<io::gguf_lora_update>{}); }, {"no updates"});
  dwt::check_throws_with<dw::argument_error>(
      [&] { io::write_gguf_lora(out, "llama", std::vector<std::pair<std::string, dw::low_rank<float>>>{}); },
      {"no updates"});
  dwt::check_throws_with<dw::argument_error>([&] { io::write_gguf_lora(out, "llama", {{"blk.0.attn_q.weight", u}}); },
                                             {"\"blk.0.attn_q.weight\"", "head_count", "from_model"});
  CHECK_FALSE(std::filesystem::exists(out));
  // v needs no heads.
  io::write_gguf_lora(out, "llama", {{"blk.0.attn_v.weight", u}});
  io::gguf_lora_options o;
  o.head_count = {3};
  dwt::check_throws_with<dw::argument_error>([&] { io::write_gguf_lora(out, "llama", {{"blk.0.attn_k.weight", u}}, o); },
                                             {"8 rows do not split into 3 heads"});
  o.head_count = {8};  // heads of 1 row: odd
  dwt::check_throws_with<dw::argument_error>([&] { io::write_gguf_lora(out, "llama", {{"blk.0.attn_q.weight", u}}, o); },
                                             {"heads of an even size"});
  o.head_count = {2, 2};
  dwt::check_throws_with<dw::argument_error>([&] { io::write_gguf_lora(out, "llama", {{"blk.5.attn_q.weight", u}}, o); },
                                             {"layer 5", "2 per-layer values"});
  o.head_count = {2, 0};
  dwt::check_throws_with<dw::argument_error>([&] { io::write_gguf_lora(out, "llama", {{"blk.1.attn_q.weight", u}}, o); },
                                             {"head_count is 0"});
  o.head_count = {2};
  o.architecture = "qwen2";
  dwt::check_throws_with<dw::argument_error>([&] { io::write_gguf_lora(out, "llama", {{"blk.0.attn_q.weight", u}}, o); },
                                             {"for \"llama\" but the options are for \"qwen2\""});
  dwt::check_throws_with<dw::argument_error>([&] { io::write_gguf_lora(out, "", {{"blk.0.attn_q.weight", u}}); },
                                             {"architecture is empty"});
  // Reading: an attn_k needs heads too (the stored file has 2 KV heads of 4 rows).
  o.architecture.clear();
  o.head_count_kv = {2};
  io::write_gguf_lora(out, "llama", {{"blk.0.attn_k.weight", u}}, o);
  dwt::check_throws_with<dw::argument_error>([&] { (void)io::read_gguf_lora(out, "llama"); },
                                             {"read_gguf_lora", "\"blk.0.attn_k.weight\"", "head_count"});
  io::gguf_lora_options r;
  r.head_count = {3};  // head_count_kv empty: k uses head_count
  dwt::check_throws_with<dw::argument_error>([&] { (void)io::read_gguf_lora(out, r); },
                                             {"\"blk.0.attn_k.weight.lora_b\"", "8 rows do not split into 3 heads"});
  r.architecture = "mistral3";
  dwt::check_throws_with<dw::format_error>([&] { (void)io::read_gguf_lora(out, r); },
                                           {"for \"llama\" but the model is \"mistral3\""});
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
      (void)io::read_gguf_lora(f, as_stored());
      ++ok;
    } catch (const dw::error&) {
    }
  }
  CHECK(n >= 10);
  CHECK(ok >= 3);
}
