// SPDX-License-Identifier: MIT
#pragma once
// Eigen's decomposition modules (LU, Cholesky, QR, SVD, eigenvalues: Eigen/Dense without
// Geometry), included by every deltaw header that factorises a matrix.
//
// Compile cost. Instantiating Eigen's decompositions dominates the compile time of a file that
// uses them: one BDCSVD<MatrixXd> costs about 23 s of GCC 12 at -O3 (-O0 about the same, it is
// the front end), a JacobiSVD about 5 s, a QR about 3 s. A target that links
// deltaw::eigen_instances gets DELTAW_EIGEN_INSTANCES, under which this header declares the
// decompositions listed below as explicit instantiations (`extern template class`), so the
// file compiles none of their non-template members: src/eigen_instances*.cpp compiles them
// once. Member templates (solve(), the constructors from an expression) are still
// instantiated where used.
//
// The library must be compiled with the same Eigen configuration as the files that link it
// (vectorisation flags, EIGEN_MAX_ALIGN_BYTES, EIGEN_USE_BLAS, EIGEN_DEFAULT_DENSE_INDEX_TYPE):
// within one CMake build it is. Under nvcc, Eigen is another configuration unless its CUDA
// support is off: the declarations are seen by nvcc's host pass only with EIGEN_NO_CUDA
// (as deltaw's CUDA tests compile), never by a device pass.
#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <Eigen/LU>
#include <Eigen/QR>
#include <Eigen/SVD>

// X is `template` (the definitions, in src/) or `extern template` (the declarations, here).
// The list: what deltaw's headers and its tests instantiate in more than one file: every
// decomposition on MatrixXd; the SVDs, QRs, symmetric eigensolver, LLT and partial-pivot LU on
// MatrixXf; the LUs, QRs and JacobiSVD on deltaw's row-major dense<double>.
#define DELTAW_EIGEN_INSTANCES_DOUBLE(X)                                                  \
  X class Eigen::BDCSVD<Eigen::MatrixXd>;                                                 \
  X class Eigen::JacobiSVD<Eigen::MatrixXd>;                                              \
  X class Eigen::HouseholderQR<Eigen::MatrixXd>;                                          \
  X class Eigen::ColPivHouseholderQR<Eigen::MatrixXd>;                                    \
  X class Eigen::CompleteOrthogonalDecomposition<Eigen::MatrixXd>;                        \
  X class Eigen::FullPivLU<Eigen::MatrixXd>;                                              \
  X class Eigen::PartialPivLU<Eigen::MatrixXd>;                                           \
  X class Eigen::LLT<Eigen::MatrixXd>;                                                    \
  X class Eigen::LDLT<Eigen::MatrixXd>;                                                   \
  X class Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>;
#define DELTAW_EIGEN_INSTANCES_FLOAT(X)                                                   \
  X class Eigen::BDCSVD<Eigen::MatrixXf>;                                                 \
  X class Eigen::JacobiSVD<Eigen::MatrixXf>;                                              \
  X class Eigen::HouseholderQR<Eigen::MatrixXf>;                                          \
  X class Eigen::ColPivHouseholderQR<Eigen::MatrixXf>;                                    \
  X class Eigen::PartialPivLU<Eigen::MatrixXf>;                                           \
  X class Eigen::LLT<Eigen::MatrixXf>;                                                    \
  X class Eigen::SelfAdjointEigenSolver<Eigen::MatrixXf>;
#define DELTAW_EIGEN_INSTANCES_ROW_MAJOR(X)                                               \
  X class Eigen::JacobiSVD<Eigen::Matrix<double, -1, -1, Eigen::RowMajor>>;               \
  X class Eigen::HouseholderQR<Eigen::Matrix<double, -1, -1, Eigen::RowMajor>>;           \
  X class Eigen::ColPivHouseholderQR<Eigen::Matrix<double, -1, -1, Eigen::RowMajor>>;     \
  X class Eigen::FullPivLU<Eigen::Matrix<double, -1, -1, Eigen::RowMajor>>;               \
  X class Eigen::PartialPivLU<Eigen::Matrix<double, -1, -1, Eigen::RowMajor>>;

#if defined(DELTAW_EIGEN_INSTANCES) && !defined(DELTAW_EIGEN_INSTANCES_SOURCE) && \
    (!defined(__CUDACC__) || (defined(EIGEN_NO_CUDA) && !defined(__CUDA_ARCH__)))
DELTAW_EIGEN_INSTANCES_DOUBLE(extern template)
DELTAW_EIGEN_INSTANCES_FLOAT(extern template)
DELTAW_EIGEN_INSTANCES_ROW_MAJOR(extern template)
#endif
