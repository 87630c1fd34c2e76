// SPDX-License-Identifier: MIT
// Reference TU: one LoRA apply, Y = X·Wᵀ + s·(X·Aᵀ)·Bᵀ, written in plain Eigen.
#include <Eigen/Core>
#include <cstdio>

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

int main() {
  const Mat W = Mat::Random(256, 128), B = Mat::Random(256, 8), A = Mat::Random(8, 128), X = Mat::Random(32, 128);
  const float s = 2.0f;
  Mat Y(32, 256);
  Y.noalias() = X * W.transpose();
  Mat Z(32, 8);
  Z.noalias() = X * A.transpose();
  Y.noalias() += s * Z * B.transpose();
  std::printf("%f\n", double(Y.sum()));
}
