// Views over Eigen objects and raw pointers: shapes, strides, zero copy, errors.
#include "test_util.hpp"

namespace dw = deltaw;
using dwt::ColMat;
using dwt::RowMat;

TEST_CASE("views of Eigen matrices in both storage orders are zero-copy") {
  RowMat<float> R = dwt::random<RowMat<float>>(3, 5, 1);
  ColMat<float> C = dwt::random<ColMat<float>>(3, 5, 2);
  auto vr = dw::view(R);
  auto vc = dw::view(C);
  CHECK(vr.data() == R.data());
  CHECK(vc.data() == C.data());
  CHECK(vr.row_stride() == 5);
  CHECK(vr.col_stride() == 1);
  CHECK(vc.row_stride() == 1);
  CHECK(vc.col_stride() == 3);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 5; ++j) {
      CHECK(vr(i, j) == R(i, j));
      CHECK(vc(i, j) == C(i, j));
    }
  static_assert(std::is_same_v<decltype(vr), dw::matrix_view<float>>);
  const auto& Rc = R;
  static_assert(std::is_same_v<decltype(dw::view(Rc)), dw::matrix_view<const float>>);
}

TEST_CASE("views of blocks, Maps, transposes and raw strided pointers") {
  RowMat<double> M = dwt::random<RowMat<double>>(6, 7, 3);
  auto b = dw::view(M.block(1, 2, 3, 4));
  CHECK(b.rows() == 3);
  CHECK(b.cols() == 4);
  CHECK(b(2, 3) == M(3, 5));
  auto vb = dw::view(M).block(1, 2, 3, 4);
  CHECK(vb.data() == b.data());
  auto t = dw::view(M).transpose();
  CHECK(t(4, 1) == M(1, 4));
  std::vector<float> buf(24);
  for (int i = 0; i < 24; ++i) buf[std::size_t(i)] = float(i);
  auto s = dw::view(buf.data(), 3, 4, 8, 2);  // every other column of a 3x8 array
  CHECK(s(2, 3) == 22.0f);
  Eigen::Map<Eigen::MatrixXf> map(buf.data(), 4, 6);
  CHECK(dw::view(map)(1, 2) == 9.0f);
}

TEST_CASE("bad views raise specific errors") {
  float x = 0;
  dwt::check_throws_with<dw::null_data_error>([] { dw::view(static_cast<float*>(nullptr), 2, 3); },
                                              {"null data", "[2, 3]"});
  dwt::check_throws_with<dw::shape_error>([&] { dw::view(&x, -1, 3); }, {"negative shape"});
  RowMat<float> M(4, 4);
  dwt::check_throws_with<dw::shape_error>([&] { dw::view(M).block(2, 2, 3, 1); }, {"outside", "[4, 4]"});
  CHECK_NOTHROW(dw::view(static_cast<float*>(nullptr), 0, 3));  // empty views may be null
}
