// Shared helpers for deltaw's tests: seeded random matrices and double-precision references.
#pragma once

#include <deltaw/deltaw.hpp>
#include <doctest/doctest.h>

#include <random>
#include <string>

namespace dwt {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using ColMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

/// Uniform(-1, 1) entries from a seeded generator.
template <class M = MatD>
M random(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  M m(rows, cols);
  for (Eigen::Index i = 0; i < rows; ++i)
    for (Eigen::Index j = 0; j < cols; ++j) m(i, j) = typename M::Scalar(u(g));
  return m;
}

/// max |a - b| / max(1, max |b|).
template <class A, class B>
double rel_err(const A& a, const B& b) {
  const MatD da = a.template cast<double>();
  const MatD db = b.template cast<double>();
  REQUIRE(da.rows() == db.rows());
  REQUIRE(da.cols() == db.cols());
  if (da.size() == 0) return 0.0;
  return (da - db).cwiseAbs().maxCoeff() / std::max(1.0, db.cwiseAbs().maxCoeff());
}

/// Runs f and checks it throws E with a message containing every given fragment.
template <class E, class F>
void check_throws_with(F&& f, std::initializer_list<std::string> fragments) {
  bool thrown = false;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    const std::string what = e.what();
    for (const auto& frag : fragments) {
      INFO("message: " << what);
      CHECK(what.find(frag) != std::string::npos);
    }
  }
  CHECK_MESSAGE(thrown, "expected exception not thrown");
}

}  // namespace dwt
