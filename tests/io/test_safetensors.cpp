// safetensors reader/writer: every dtype against torch's own float64 conversion, zero-copy
// and copy paths, the writer round trip, and every malformed-file check of the reference
// implementation (each must throw format_error, never crash).
#include <cmath>
#include <limits>

#include "io_test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwio::raw_safetensors;

TEST_CASE("safetensors: every dtype written by safetensors.torch reads as torch converts it") {
  const auto f = io::safetensors_file::open(dwio::fixtures() / "safetensors" / "dtypes.safetensors");
  const auto ref = io::safetensors_file::open(dwio::fixtures() / "safetensors" / "dtypes_f64.safetensors");
  CHECK(f.metadata().at("writer") == "safetensors.torch");
  const char* names[] = {"BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32",
                         "U32",  "F32", "F64", "I64", "U64", "F8_E4M3", "F8_E5M2"};
  int checked = 0;
  for (const char* n : names) {
    CAPTURE(n);
    const auto& t = f.at(n);
    CHECK(std::string(io::st_dtype_name(t.dtype)) == n);
    CHECK(t.shape == std::vector<std::uint64_t>{3, 5});
    const auto got = f.values<double>(n);
    const auto want = ref.values<double>(n);
    REQUIRE(got.size() == want.size());
    for (std::size_t i = 0; i < got.size(); ++i) CHECK(got[i] == want[i]);  // all conversions are exact
    ++checked;
  }
  CHECK(checked == 15);
  CHECK(f.at("F32_empty").shape == std::vector<std::uint64_t>{0, 4});
  auto e = f.matrix<float>("F32_empty");
  CHECK(e.view.rows() == 0);
  CHECK(e.view.cols() == 4);
}

TEST_CASE("safetensors: F32/BF16/F16/F64 are viewed without copying when aligned, converted otherwise") {
  const auto f = io::safetensors_file::open(dwio::fixtures() / "safetensors" / "dtypes.safetensors");
  const auto raw = f.data("F32");
  auto m = f.matrix<float>("F32");
  CHECK(f.is_zero_copy<float>("F32"));
  CHECK(static_cast<const void*>(m.view.data()) == static_cast<const void*>(raw.data()));
  CHECK(m.owner == f.owner());  // the mapping stays alive with the view
  auto mb = f.matrix<dw::bf16>("BF16");
  CHECK(static_cast<const void*>(mb.view.data()) == static_cast<const void*>(f.data("BF16").data()));
  auto mh = f.matrix<dw::fp16>("F16");
  CHECK(static_cast<const void*>(mh.view.data()) == static_cast<const void*>(f.data("F16").data()));
  auto md = f.matrix<double>("F64");
  CHECK(static_cast<const void*>(md.view.data()) == static_cast<const void*>(f.data("F64").data()));
  // Converting BF16 to float copies and matches the bf16 values.
  CHECK_FALSE(f.is_zero_copy<float>("BF16"));
  auto mbf = f.matrix<float>("BF16");
  const auto v = f.values<float>("BF16");
  for (index_t i = 0; i < 3; ++i)
    for (index_t j = 0; j < 5; ++j) CHECK(mbf.view(i, j) == v[std::size_t(i * 5 + j)]);
  auto vec = f.vector<float>("F32_vector");
  REQUIRE(vec.view.size() == 7);
  for (index_t i = 0; i < 7; ++i) CHECK(vec.view[i] == doctest::Approx(double(float(i) / 3.0f)).epsilon(1e-7));
  // Survives the file object.
  dw::held_matrix<float> kept;
  {
    const auto g = io::safetensors_file::open(dwio::fixtures() / "safetensors" / "dtypes.safetensors");
    kept = g.matrix<float>("F32");
  }
  CHECK(kept.view(2, 4) == f.matrix<float>("F32").view(2, 4));
}

TEST_CASE("safetensors: unaligned data (header length not a multiple of 4) is copied, not misread") {
  // 8 + 13 header bytes: the F32 data starts at offset 21 of an aligned buffer.
  std::string h = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  h += std::string((13 - (8 + h.size()) % 8 + 8) % 8 + 1, ' ');  // make 8 + |h| odd
  REQUIRE((8 + h.size()) % 4 != 0);
  const auto buf = raw_safetensors(h, dwio::f32_bytes({1.5f, -2.25f}));
  const auto f = io::safetensors_file::parse(buf);
  CHECK_FALSE(f.is_zero_copy<float>("a"));
  auto v = f.vector<float>("a");
  CHECK(v.view[0] == 1.5f);
  CHECK(v.view[1] == -2.25f);
  CHECK(v.owner != nullptr);
}

TEST_CASE("safetensors: float8 conversions at the edges") {
  namespace d = io::detail;
  CHECK(d::f8_e4m3_to_float(0x7E) == 448.0f);
  CHECK(std::isnan(d::f8_e4m3_to_float(0x7F)));
  CHECK(std::isnan(d::f8_e4m3_to_float(0xFF)));
  CHECK(d::f8_e4m3_to_float(0x01) == std::ldexp(1.0f, -9));
  CHECK(d::f8_e4m3_to_float(0x38) == 1.0f);
  CHECK(d::f8_e4m3_to_float(0xB8) == -1.0f);
  CHECK(d::f8_e5m2_to_float(0x3C) == 1.0f);
  CHECK(std::isinf(d::f8_e5m2_to_float(0x7C)));
  CHECK(std::isnan(d::f8_e5m2_to_float(0x7E)));
  CHECK(d::f8_e5m2_to_float(0x01) == std::ldexp(1.0f, -16));
  CHECK(d::f8_e5m2_to_float(0x7B) == 57344.0f);
}

TEST_CASE("safetensors: writer round trip for every storage type and layout, with metadata") {
  dwio::temp_dir tmp;
  const auto A = dwt::random<dwt::MatF>(7, 5, 1);
  const dwt::ColMat<double> C = dwt::random<dwt::MatD>(4, 6, 2);  // column-major input
  const dwt::RowMat<Eigen::bfloat16> Hb = dwt::random<dwt::MatF>(3, 3, 3).cast<Eigen::bfloat16>();
  const dwt::RowMat<Eigen::half> Hh = dwt::random<dwt::MatF>(2, 9, 4).cast<Eigen::half>();
  const Eigen::VectorXf m = Eigen::VectorXf::LinSpaced(6, -1, 1);
  io::safetensors_writer w;
  w.add("A", A);
  w.add("C", C);
  w.add("Hb", Hb);
  w.add("Hh", Hh);
  w.add("At", dw::view(A).transpose());  // a strided view is written row-major
  w.add("m", dw::vview(m));
  w.add("empty", dw::matrix_view<const float>(nullptr, 0, 3));
  w.set_metadata("format", "pt");
  w.set_metadata("note", "ünïcode ✓");
  dwt::check_throws_with<dw::argument_error>([&] { w.add("A", A); }, {"already added"});
  dwt::check_throws_with<dw::argument_error>([&] { w.add("__metadata__", A); }, {"reserved"});
  const auto path = tmp.path / "out.safetensors";
  w.write(path);

  const auto bytes = dwio::slurp(path);
  std::uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  CHECK(n % 8 == 0);  // data section 8-byte aligned, as the reference writer does

  const auto f = io::safetensors_file::open(path);
  CHECK(f.size() == 7);
  CHECK(f.metadata().at("note") == "ünïcode ✓");
  CHECK(dwt::rel_err(dwio::load_matd(f, "A"), A) == 0.0);
  CHECK(dwt::rel_err(dwio::load_matd(f, "C"), C) == 0.0);
  CHECK(dwt::rel_err(dwio::load_matd(f, "At"), dwt::MatF(A.transpose())) == 0.0);
  CHECK(f.at("C").dtype == io::st_dtype::F64);
  CHECK(f.at("Hb").dtype == io::st_dtype::BF16);
  CHECK(f.at("Hh").dtype == io::st_dtype::F16);
  CHECK(dwt::rel_err(dwio::load_matd(f, "Hb"), Hb.cast<float>()) == 0.0);
  CHECK(dwt::rel_err(dwio::load_matd(f, "Hh"), Hh.cast<float>()) == 0.0);
  const auto mv = f.values<float>("m");
  for (int i = 0; i < 6; ++i) CHECK(mv[std::size_t(i)] == m(i));
  CHECK(f.at("empty").shape == std::vector<std::uint64_t>{0, 3});
  CHECK(f.is_zero_copy<float>("A"));
}

TEST_CASE("safetensors: add_raw checks the byte count") {
  io::safetensors_writer w;
  std::vector<std::byte> b(6);
  w.add_raw("ok", io::st_dtype::I16, {3}, b);
  dwt::check_throws_with<dw::shape_error>([&] { w.add_raw("bad", io::st_dtype::F32, {3}, b); }, {"needs 12 bytes", "got 6"});
  const auto f = io::safetensors_file::parse(w.serialize());
  CHECK(f.at("ok").dtype == io::st_dtype::I16);
}

namespace {
// Each case must throw format_error whose message contains `frag`.
struct bad_case {
  const char* name;
  std::vector<std::byte> bytes;
  const char* frag;
};
}  // namespace

TEST_CASE("safetensors: every malformed file throws format_error with a specific message") {
  const auto d4 = dwio::f32_bytes({1, 2});
  const std::string e1 = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  std::vector<bad_case> cases = {
      {"fewer than 8 bytes", {std::byte{1}, std::byte{0}}, "fewer than the 8-byte"},
      {"huge length prefix", raw_safetensors("{}", {}, ~std::uint64_t(0) - 1), "exceeds the limit"},
      {"header over 100,000,000", raw_safetensors("{}", {}, 100'000'001), "exceeds the limit"},
      {"length past EOF", raw_safetensors("{}", {}, 4096), "runs past the end"},
      {"invalid UTF-8", raw_safetensors("{\"\xff\":1}"), "not valid UTF-8"},
      {"overlong UTF-8", raw_safetensors("{\"\xc0\xaf\":1}"), "not valid UTF-8"},
      {"not JSON", raw_safetensors("{abc"), "invalid JSON"},
      {"trailing garbage", raw_safetensors("{} x"), "invalid JSON"},
      {"not an object", raw_safetensors("[1,2]"), "not a JSON object"},
      {"duplicate tensor", raw_safetensors(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", d4), "duplicate JSON key \"a\""},
      {"duplicate field", raw_safetensors(R"({"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}})", d4), "duplicate JSON key \"dtype\""},
      {"duplicate metadata key", raw_safetensors(R"({"__metadata__":{"k":"1","k":"2"}})"), "duplicate JSON key \"k\""},
      {"overlapping offsets", raw_safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", d4), "no gaps or overlaps"},
      {"gap", raw_safetensors(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", d4), "no gaps or overlaps"},
      {"offsets reversed", raw_safetensors(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", d4), "no gaps or overlaps"},
      {"out of range", raw_safetensors(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", d4), "the file has 8"},
      {"trailing bytes", raw_safetensors(e1, dwio::f32_bytes({1, 2, 3})), "the file has 12"},
      {"shape/size mismatch", raw_safetensors(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", d4), "needs 12 bytes"},
      {"dtype/size mismatch", raw_safetensors(R"({"a":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}})", d4), "needs 16 bytes"},
      {"shape overflow", raw_safetensors(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"), "overflows"},
      {"byte size overflow", raw_safetensors(R"({"a":{"dtype":"F64","shape":[2305843009213693953],"data_offsets":[0,8]}})", d4), "overflows"},
      {"unknown dtype", raw_safetensors(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", d4), "unknown dtype \"Q4\""},
      {"missing dtype", raw_safetensors(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", d4), "no string \"dtype\""},
      {"missing shape", raw_safetensors(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", d4), "no array \"shape\""},
      {"negative shape", raw_safetensors(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", d4), "non-negative integer"},
      {"float shape", raw_safetensors(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", d4), "non-negative integer"},
      {"three offsets", raw_safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", d4), "data_offsets"},
      {"negative offset", raw_safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", d4), "data_offsets"},
      {"entry not object", raw_safetensors(R"({"a":[1]})"), "is not an object"},
      {"metadata not strings", raw_safetensors(R"({"__metadata__":{"k":1}})"), "is not a string"},
      {"metadata not object", raw_safetensors(R"({"__metadata__":"x"})"), "__metadata__ must be"},
      {"deep nesting", raw_safetensors(std::string(5000, '[') + std::string(5000, ']')), "nested deeper"},
      {"NUL in header", raw_safetensors(std::string("{}\0", 3)), "NUL byte"},  // nlohmann stops at NUL
  };
  for (const auto& c : cases) {
    CAPTURE(std::string(c.name));
    dwt::check_throws_with<dw::format_error>([&] { (void)io::safetensors_file::parse(c.bytes); }, {c.frag});
  }
  CHECK(cases.size() == 33);
}

TEST_CASE("safetensors: what the reference accepts is accepted") {
  CHECK(io::safetensors_file::parse(raw_safetensors("{}")).size() == 0);
  CHECK(io::safetensors_file::parse(raw_safetensors("  {}  \n\t")).size() == 0);  // JSON whitespace both sides
  CHECK(io::safetensors_file::parse(raw_safetensors(R"({"__metadata__":null})")).metadata().empty());
  // Zero-size tensors may share offset 0; unknown fields in an entry are ignored.
  const auto f = io::safetensors_file::parse(raw_safetensors(
      R"({"z":{"dtype":"F16","shape":[0,3],"data_offsets":[0,0]},"y":{"dtype":"U8","shape":[],"data_offsets":[0,1],"extra":1},"x":{"dtype":"BOOL","shape":[0],"data_offsets":[0,0]}})",
      {std::byte{7}}));
  CHECK(f.size() == 3);
  CHECK(f.values<double>("y") == std::vector<double>{7.0});  // a scalar: shape []
  dwt::check_throws_with<dw::shape_error>([&] { (void)f.matrix<float>("y"); }, {"needs 2 dimensions"});
  dwt::check_throws_with<dw::format_error>([&] { (void)f.at("nope"); }, {"no tensor named \"nope\""});
}

TEST_CASE("safetensors: files the OS refuses throw io_error") {
  dwt::check_throws_with<dw::io_error>([] { (void)io::safetensors_file::open("/nonexistent/deltaw.safetensors"); },
                                       {"cannot open"});
  dwt::check_throws_with<dw::io_error>([] { (void)io::safetensors_file::open(dwio::fixtures()); }, {"not a regular file"});
  dwio::temp_dir tmp;
  dwio::write_text(tmp.path / "empty.safetensors", "");
  dwt::check_throws_with<dw::format_error>([&] { (void)io::safetensors_file::open(tmp.path / "empty.safetensors"); },
                                           {"fewer than the 8-byte"});
}

TEST_CASE("safetensors: every seed of the fuzz corpus parses or throws deltaw::error") {
  int n = 0, ok = 0;
  for (const auto& e : std::filesystem::directory_iterator(dwio::corpus() / "safetensors")) {
    ++n;
    const auto b = dwio::slurp(e.path());
    try {
      const auto f = io::safetensors_file::parse(b);
      for (const auto& t : f.tensors()) (void)f.values<double>(t.name);
      ++ok;
    } catch (const dw::error&) {
    }
  }
  CHECK(n >= 25);
  CHECK(ok >= 4);
}
