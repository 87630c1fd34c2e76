// DLPack: hand-built DLManagedTensors (and DLManagedTensorVersioned when the dlpack.h in
// use has it; test_io_dlpack_v1 compiles this file against PyTorch's DLPack 1.x header)
// viewed as deltaw views without copying: element addresses, strides, byte_offset and
// dtypes checked against independent indexing; every refusal names its problem.
#include <deltaw/io/dlpack.hpp>

#include <cstring>
#include <vector>

#include "test_util.hpp"

namespace dw = deltaw;
namespace io = deltaw::io;
using dwt::MatD;
using dwt::MatF;
using deltaw::index_t;

namespace {

DLDataType dt(std::uint8_t code, std::uint8_t bits, std::uint16_t lanes = 1) { return DLDataType{code, bits, lanes}; }

// A DLTensor over caller storage; shape and strides kept in the struct.
struct tensor {
  std::vector<std::int64_t> shape, strides;
  DLTensor t{};
  tensor(void* data, std::vector<std::int64_t> sh, std::vector<std::int64_t> st, DLDataType d,
         std::uint64_t byte_offset = 0, DLDeviceType dev = kDLCPU)
      : shape(std::move(sh)), strides(std::move(st)) {
    t.data = data;
    t.device = DLDevice{dev, 0};
    t.ndim = int(shape.size());
    t.dtype = d;
    t.shape = shape.data();
    t.strides = strides.empty() ? nullptr : strides.data();
    t.byte_offset = byte_offset;
  }
};

const DLDataType f32 = dt(kDLFloat, 32), f64 = dt(kDLFloat, 64), f16 = dt(kDLFloat, 16), b16 = dt(kDLBfloat, 16);

}  // namespace

TEST_CASE("dlpack: compact row-major float32 is viewed in place") {
  std::vector<float> buf(12);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = float(i) * 0.5f - 2;
  tensor x(buf.data(), {3, 4}, {}, f32);
  const auto v = io::dlpack_matrix<float>(x.t);
  CHECK(v.data() == buf.data());
  CHECK(v.rows() == 3);
  CHECK(v.cols() == 4);
  for (index_t i = 0; i < 3; ++i)
    for (index_t j = 0; j < 4; ++j) CHECK(&v(i, j) == &buf[std::size_t(i * 4 + j)]);
  // Writable: writes land in the producer's memory.
  v(2, 3) = 42;
  CHECK(buf[11] == 42);
  // Explicit compact strides give the same view.
  tensor y(buf.data(), {3, 4}, {4, 1}, f32);
  CHECK(dw::same_view(io::dlpack_matrix<const float>(y.t), dw::matrix_view<const float>(buf.data(), 3, 4)));
}

TEST_CASE("dlpack: strides and byte_offset (column-major, padded, sliced) are honoured") {
  // A [5, 7] column-major block with leading dimension 6, starting 3 elements in.
  std::vector<double> buf(3 + 6 * 7);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = double(i);
  tensor cm(buf.data(), {5, 7}, {1, 6}, f64, 3 * sizeof(double));
  const auto v = io::dlpack_matrix<double>(cm.t);
  CHECK(v.row_stride() == 1);
  CHECK(v.col_stride() == 6);
  for (index_t i = 0; i < 5; ++i)
    for (index_t j = 0; j < 7; ++j) CHECK(v(i, j) == buf[std::size_t(3 + i + 6 * j)]);

  // A view that deltaw computes with: ΔW = B·A with B given column-major through DLPack.
  const MatF Bsrc = dwt::random<MatF>(6, 2, 1), A = dwt::random<MatF>(2, 5, 2);
  std::vector<float> Bcm(12);
  for (int i = 0; i < 6; ++i)
    for (int k = 0; k < 2; ++k) Bcm[std::size_t(i + 6 * k)] = Bsrc(i, k);
  tensor bt(Bcm.data(), {6, 2}, {1, 6}, f32);
  const MatD got = dw::materialize(dw::lora(io::dlpack_matrix<const float>(bt.t), A, dw::scale(0.5))).cast<double>();
  const MatD ref = 0.5 * Bsrc.cast<double>() * A.cast<double>();
  CHECK(dwt::rel_err(got, ref) < 1e-6);

  // A const view may have no unit stride (every other row and column of a [6, 8]).
  std::vector<float> g(48);
  for (std::size_t i = 0; i < g.size(); ++i) g[i] = float(i);
  tensor sl(g.data(), {3, 4}, {16, 2}, f32, 4 * sizeof(float));
  const auto s = io::dlpack_matrix<const float>(sl.t);
  for (index_t i = 0; i < 3; ++i)
    for (index_t j = 0; j < 4; ++j) CHECK(s(i, j) == g[std::size_t(4 + 16 * i + 2 * j)]);

  // Extent-1 dimensions: arbitrary strides there are ignored.
  tensor row(g.data(), {1, 5}, {999, 1}, f32);
  const auto r = io::dlpack_matrix<float>(row.t);
  CHECK(r(0, 4) == g[4]);
  tensor col(g.data(), {5, 1}, {8, 123}, f32);
  const auto c = io::dlpack_matrix<float>(col.t);
  CHECK(c(4, 0) == g[32]);

  // A const broadcast (zero stride) is a valid read-only view.
  tensor bc(g.data(), {3, 4}, {0, 1}, f32);
  CHECK(io::dlpack_matrix<const float>(bc.t)(2, 3) == g[3]);
}

TEST_CASE("dlpack: dtypes map to deltaw's storage types; vectors") {
  std::vector<std::uint16_t> h(6), b(6);
  for (int i = 0; i < 6; ++i) {
    h[std::size_t(i)] = dw::fp16(float(i) - 2.5f).bits;
    b[std::size_t(i)] = dw::bf16(float(i) * 0.25f).bits;
  }
  tensor th(h.data(), {2, 3}, {}, f16), tb(b.data(), {2, 3}, {}, b16);
  const auto vh = io::dlpack_matrix<const dw::fp16>(th.t);
  const auto vb = io::dlpack_matrix<const dw::bf16>(tb.t);
  for (index_t i = 0; i < 2; ++i)
    for (index_t j = 0; j < 3; ++j) {
      CHECK(float(vh(i, j)) == float(i * 3 + j) - 2.5f);
      CHECK(float(vb(i, j)) == float(i * 3 + j) * 0.25f);
    }
  std::vector<float> v(10);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = float(i);
  tensor tv(v.data(), {4}, {2}, f32, sizeof(float));
  const auto vv = io::dlpack_vector<float>(tv.t);
  CHECK(vv.size() == 4);
  CHECK(vv.stride() == 2);
  CHECK(vv[3] == v[7]);
  tensor tc(v.data(), {10}, {}, f32);
  CHECK(io::dlpack_vector<const float>(tc.t)[9] == 9);
}

TEST_CASE("dlpack: CUDA device types give device::cuda views; devices are checked") {
  std::vector<float> fake(12);  // never dereferenced: only the view's geometry is checked
  tensor cu(fake.data(), {3, 4}, {}, f32, 0, kDLCUDA);
  const auto v = io::dlpack_matrix<const float, dw::device::cuda>(cu.t);
  static_assert(std::is_same_v<decltype(v)::device_type, dw::device::cuda>);
  CHECK(v.data() == fake.data());
  CHECK(v.row_stride() == 4);
  tensor managed(fake.data(), {3, 4}, {1, 3}, f32, 0, kDLCUDAManaged);
  CHECK(io::dlpack_matrix<const float, dw::device::cuda>(managed.t).col_stride() == 3);
  tensor pinned(fake.data(), {3, 4}, {}, f32, 0, kDLCUDAHost);
  CHECK(io::dlpack_matrix<const float>(pinned.t).rows() == 3);

  dwt::check_throws_with<dw::device_error>([&] { (void)io::dlpack_matrix<const float>(cu.t); },
                                           {"dlpack_matrix", "kDLCUDA tensor", "cpu view"});
  tensor cpu(fake.data(), {3, 4}, {}, f32);
  dwt::check_throws_with<dw::device_error>([&] { (void)io::dlpack_matrix<const float, dw::device::cuda>(cpu.t); },
                                           {"kDLCPU tensor", "cuda view"});
  tensor rocm(fake.data(), {3, 4}, {}, f32, 0, kDLROCM);
  dwt::check_throws_with<dw::device_error>([&] { (void)io::dlpack_matrix<const float>(rocm.t); }, {"kDLROCM"});
  // CUDA kernels need one unit stride even for const views.
  tensor cus(fake.data(), {2, 3}, {6, 2}, f32, 0, kDLCUDA);
  dwt::check_throws_with<dw::layout_error>(
      [&] { (void)io::dlpack_matrix<const float, dw::device::cuda>(cus.t); }, {"(6, 2)", "CUDA views", "no unit stride"});
}

TEST_CASE("dlpack: what cannot be viewed is refused with the problem named") {
  std::vector<float> buf(64);
  tensor t3(buf.data(), {2, 2, 2}, {}, f32);
  dwt::check_throws_with<dw::shape_error>([&] { (void)io::dlpack_matrix<float>(t3.t); }, {"ndim 3", "matrix view needs 2"});
  tensor t2(buf.data(), {2, 4}, {}, f32);
  dwt::check_throws_with<dw::shape_error>([&] { (void)io::dlpack_vector<float>(t2.t); }, {"ndim 2", "vector view needs 1"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)io::dlpack_matrix<double>(t2.t); },
                                             {"dtype is float32", "element type is float64"});
  tensor th(buf.data(), {2, 4}, {}, f16);
  dwt::check_throws_with<dw::argument_error>([&] { (void)io::dlpack_matrix<float>(th.t); }, {"float16"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)io::dlpack_matrix<dw::bf16>(th.t); },
                                             {"float16", "bfloat16"});
  tensor ti(buf.data(), {2, 4}, {}, dt(kDLInt, 32));
  dwt::check_throws_with<dw::argument_error>([&] { (void)io::dlpack_matrix<float>(ti.t); }, {"int32"});
  tensor tl(buf.data(), {2, 4}, {}, dt(kDLFloat, 32, 4));
  dwt::check_throws_with<dw::argument_error>([&] { (void)io::dlpack_matrix<float>(tl.t); }, {"float32x4"});
  tensor neg(buf.data() + 20, {3, 4}, {-4, 1}, f32);
  dwt::check_throws_with<dw::layout_error>([&] { (void)io::dlpack_matrix<const float>(neg.t); },
                                           {"negative strides (-4, 1)"});
  tensor nounit(buf.data(), {3, 4}, {16, 2}, f32);
  dwt::check_throws_with<dw::layout_error>([&] { (void)io::dlpack_matrix<float>(nounit.t); },
                                           {"(16, 2)", "writable views", "no unit stride"});
  tensor bc(buf.data(), {3, 4}, {0, 1}, f32);
  dwt::check_throws_with<dw::layout_error>([&] { (void)io::dlpack_matrix<float>(bc.t); }, {"zero (broadcast) stride"});
  tensor mis(buf.data(), {3, 4}, {}, f32, 2);
  dwt::check_throws_with<dw::layout_error>([&] { (void)io::dlpack_matrix<const float>(mis.t); },
                                           {"byte_offset (2)", "not aligned"});
  tensor negshape(buf.data(), {-1, 4}, {}, f32);
  dwt::check_throws_with<dw::shape_error>([&] { (void)io::dlpack_matrix<const float>(negshape.t); }, {"negative extent"});
  tensor nul(nullptr, {3, 4}, {}, f32);
  dwt::check_throws_with<dw::null_data_error>([&] { (void)io::dlpack_matrix<const float>(nul.t); }, {"null data"});
}

namespace {
int deleted = 0;
struct owned_tensor {
  std::vector<float> data;
  std::vector<std::int64_t> shape;
};
DLManagedTensor* make_managed(std::vector<std::int64_t> shape, DLDataType d = f32) {
  auto* ctx = new owned_tensor{std::vector<float>(64, 1.5f), std::move(shape)};
  auto* m = new DLManagedTensor{};
  m->dl_tensor.data = ctx->data.data();
  m->dl_tensor.device = DLDevice{kDLCPU, 0};
  m->dl_tensor.ndim = int(ctx->shape.size());
  m->dl_tensor.dtype = d;
  m->dl_tensor.shape = ctx->shape.data();
  m->manager_ctx = ctx;
  m->deleter = [](DLManagedTensor* self) {
    delete static_cast<owned_tensor*>(self->manager_ctx);
    delete self;
    ++deleted;
  };
  return m;
}
}  // namespace

TEST_CASE("dlpack: take_* owns the managed tensor and calls its deleter exactly once") {
  deleted = 0;
  {
    auto* m = make_managed({4, 8});
    CHECK(io::dlpack_matrix<const float>(*m).cols() == 8);  // borrowing: no deleter call
    CHECK(deleted == 0);
    auto h = io::dlpack_take_matrix<float>(m);
    CHECK(h.view(3, 7) == 1.5f);
    // An update operand that keeps the tensor alive after the held_matrix is gone.
    const MatF A = dwt::random<MatF>(8, 3, 5);
    const dw::low_rank<float> u(h, dw::hold(A), 1.0);
    h = {};
    CHECK(deleted == 0);
    const MatD ones = MatD::Constant(4, 8, 1.5);
    const MatD ref = ones * A.cast<double>();
    CHECK(dwt::rel_err(dw::materialize(u).cast<double>(), ref) < 1e-6);
  }
  CHECK(deleted == 1);
  {
    auto v = io::dlpack_take_vector<float>(make_managed({16}));
    CHECK(v.view.size() == 16);
  }
  CHECK(deleted == 2);
  // Refused: the caller keeps ownership, nothing is deleted.
  auto* bad = make_managed({2, 2, 2});
  dwt::check_throws_with<dw::shape_error>([&] { (void)io::dlpack_take_matrix<float>(bad); }, {"ndim 3"});
  CHECK(deleted == 2);
  bad->deleter(bad);
  CHECK(deleted == 3);
  dwt::check_throws_with<dw::null_data_error>([&] { (void)io::dlpack_take_matrix<float>(static_cast<DLManagedTensor*>(nullptr)); },
                                              {"null managed tensor"});
}

#if defined(DLPACK_MAJOR_VERSION) && DLPACK_MAJOR_VERSION >= 1
namespace {
DLManagedTensorVersioned* make_versioned(std::uint32_t major, std::uint64_t flags) {
  auto* ctx = new owned_tensor{std::vector<float>(64, 2.5f), {4, 8}};
  auto* m = new DLManagedTensorVersioned{};
  m->version = DLPackVersion{major, 0};
  m->flags = flags;
  m->dl_tensor.data = ctx->data.data();
  m->dl_tensor.device = DLDevice{kDLCPU, 0};
  m->dl_tensor.ndim = 2;
  m->dl_tensor.dtype = f32;
  m->dl_tensor.shape = ctx->shape.data();
  m->manager_ctx = ctx;
  m->deleter = [](DLManagedTensorVersioned* self) {
    delete static_cast<owned_tensor*>(self->manager_ctx);
    delete self;
    ++deleted;
  };
  return m;
}
}  // namespace

TEST_CASE("dlpack: DLManagedTensorVersioned (DLPack >= 1.0): version and READ_ONLY are honoured") {
  MESSAGE("DLPack header version " << DLPACK_MAJOR_VERSION << "." << DLPACK_MINOR_VERSION);
  deleted = 0;
  auto* ro = make_versioned(DLPACK_MAJOR_VERSION, DLPACK_FLAG_BITMASK_READ_ONLY);
  CHECK(io::dlpack_matrix<const float>(*ro)(3, 7) == 2.5f);
  dwt::check_throws_with<dw::argument_error>([&] { (void)io::dlpack_matrix<float>(*ro); }, {"READ_ONLY", "const"});
  {
    auto h = io::dlpack_take_matrix<const float>(ro);
    CHECK(h.view.cols() == 8);
  }
  CHECK(deleted == 1);
  auto* rw = make_versioned(DLPACK_MAJOR_VERSION, 0);
  io::dlpack_matrix<float>(*rw)(0, 0) = 7;
  CHECK(io::dlpack_matrix<const float>(*rw)(0, 0) == 7);
  rw->deleter(rw);
  CHECK(deleted == 2);
  auto* future = make_versioned(DLPACK_MAJOR_VERSION + 1, 0);
  dwt::check_throws_with<dw::argument_error>([&] { (void)io::dlpack_matrix<const float>(*future); }, {"major version"});
  CHECK(deleted == 2);
  // Taking a tensor of another major version releases it, as the DLPack spec asks.
  dwt::check_throws_with<dw::argument_error>([&] { (void)io::dlpack_take_matrix<const float>(future); },
                                             {"major version", "released"});
  CHECK(deleted == 3);
}
#else
TEST_CASE("dlpack: this dlpack.h predates DLManagedTensorVersioned") {
  MESSAGE("DLPACK_VERSION " << DLPACK_VERSION << ": the versioned overloads are not compiled here (test_io_dlpack_v1 covers them)");
  CHECK(DLPACK_VERSION < 100);
}
#endif
