// SPDX-License-Identifier: MIT
// Dense factorizations and triangular solves over views, for the inits and analyses
// (PiSSA, OLoRA, LoRA-GA, EVA, LoLDU, spectra): thin QR, thin SVD, symmetric eigen-
// decomposition, triangular solve. Kept out of kernels.hpp because Eigen's QR, SVD and
// eigensolvers are heavy to parse; include this header where a factorization is needed.
//
// The CPU implementation works on a column-major double-or-float copy of the input (the
// factorizations copy anyway) and writes the factors into caller views of any layout.
#pragma once

#include <deltaw/core/eigen_dense.hpp>
#include <string>

#include "context.hpp"
#include "gemm.hpp"  // kernels::op

DELTAW_NAMESPACE_BEGIN
namespace kernels {

enum class side : unsigned char { left, right };
enum class uplo : unsigned char { lower, upper };
enum class diag : unsigned char { non_unit, unit };

namespace detail {
template <class C>
using cm_matrix = Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

template <class C, class T>
cm_matrix<C> to_col_major(const matrix_view<const T>& v) {
  cm_matrix<C> m(v.rows(), v.cols());
  for (index_t j = 0; j < v.cols(); ++j)
    for (index_t i = 0; i < v.rows(); ++i) m(i, j) = deltaw::convert<C>(v(i, j));
  return m;
}
template <class M, class C>
void store(const M& m, const matrix_view<C>& out, const char* op, const char* what) {
  if (out.rows() != m.rows() || out.cols() != m.cols())
    throw shape_error(std::string(op) + ": " + what + " is " + deltaw::detail::shape_str(out.rows(), out.cols()) +
                      "; expected " + deltaw::detail::shape_str(m.rows(), m.cols()));
  for (index_t i = 0; i < out.rows(); ++i)
    for (index_t j = 0; j < out.cols(); ++j) out(i, j) = C(m(i, j));
}
inline void check_present(bool ok, const char* op, const std::string& msg) {
  if (!ok) throw shape_error(std::string(op) + ": " + msg);
}
}  // namespace detail

/// B ← α·op(T)⁻¹·B (side::left) or α·B·op(T)⁻¹ (side::right), T square triangular (only
/// its `uplo` triangle is read; diag::unit takes its diagonal as ones). B: any layout.
template <class C>
void trsm(const cpu_context&, side s, uplo u, op o, diag d, std::type_identity_t<C> alpha, const matrix_view<const C>& T,
          const matrix_view<C>& B) {
  constexpr const char* opname = "deltaw::kernels::trsm";
  const index_t n = s == side::left ? B.rows() : B.cols();
  detail::check_present(T.rows() == n && T.cols() == n, opname,
                        "T is " + deltaw::detail::shape_str(T.rows(), T.cols()) + " but B is " +
                            deltaw::detail::shape_str(B.rows(), B.cols()) + "; T must be square of the size of B's " +
                            (s == side::left ? "rows" : "columns"));
  detail::cm_matrix<C> t = detail::to_col_major<C>(T);
  if (o == op::trans) t.transposeInPlace();
  const bool lower = (u == uplo::lower) != (o == op::trans);  // transposing swaps the triangles
  detail::cm_matrix<C> b = detail::to_col_major<C>(matrix_view<const C>(B));
  if (s == side::left) {
    if (lower && d == diag::unit) t.template triangularView<Eigen::UnitLower>().solveInPlace(b);
    else if (lower) t.template triangularView<Eigen::Lower>().solveInPlace(b);
    else if (d == diag::unit) t.template triangularView<Eigen::UnitUpper>().solveInPlace(b);
    else t.template triangularView<Eigen::Upper>().solveInPlace(b);
  } else {  // X·T = B  ⇔  Tᵀ·Xᵀ = Bᵀ
    detail::cm_matrix<C> bt = b.transpose();
    detail::cm_matrix<C> tt = t.transpose();
    if (!lower && d == diag::unit) tt.template triangularView<Eigen::UnitLower>().solveInPlace(bt);
    else if (!lower) tt.template triangularView<Eigen::Lower>().solveInPlace(bt);
    else if (d == diag::unit) tt.template triangularView<Eigen::UnitUpper>().solveInPlace(bt);
    else tt.template triangularView<Eigen::Upper>().solveInPlace(bt);
    b = bt.transpose();
  }
  if (alpha != C(1)) b *= alpha;
  detail::store(b, B, opname, "B");
}

/// Thin QR of A [m, n], m ≥ n, by Householder reflections: Q [m, n] with orthonormal
/// columns and (when R is present) R [n, n] upper triangular, A = Q·R.
template <class C, class T>
void qr_thin(const cpu_context&, const matrix_view<const T>& A, const matrix_view<C>& Q,
             const matrix_view<C>& R = {}) {
  constexpr const char* opname = "deltaw::kernels::qr_thin";
  const index_t m = A.rows(), n = A.cols();
  detail::check_present(m >= n, opname, "A is " + deltaw::detail::shape_str(m, n) + "; the thin QR needs rows ≥ columns");
  const detail::cm_matrix<C> a = detail::to_col_major<C>(A);
  const Eigen::HouseholderQR<detail::cm_matrix<C>> qr(a);
  const detail::cm_matrix<C> q = qr.householderQ() * detail::cm_matrix<C>::Identity(m, n);
  detail::store(q, Q, opname, "Q");
  if (R.data() || R.rows() || R.cols()) {
    const detail::cm_matrix<C> r = qr.matrixQR().topRows(n).template triangularView<Eigen::Upper>();
    detail::store(r, R, opname, "R");
  }
}

/// Thin SVD of A [m, n], k = min(m, n): U [m, k], S [k] (descending), V [n, k],
/// A = U·diag(S)·Vᵀ. Divide and conquer (Eigen's BDCSVD).
template <class C, class T>
void svd_thin(const cpu_context&, const matrix_view<const T>& A, const matrix_view<C>& U, const vector_view<C>& S,
              const matrix_view<C>& V) {
  constexpr const char* opname = "deltaw::kernels::svd_thin";
  const detail::cm_matrix<C> a = detail::to_col_major<C>(A);
  const Eigen::BDCSVD<detail::cm_matrix<C>> svd(a, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const index_t k = std::min(A.rows(), A.cols());
  detail::check_present(S.size() == k, opname,
                        "S has " + std::to_string(S.size()) + " entries; A " +
                            deltaw::detail::shape_str(A.rows(), A.cols()) + " has " + std::to_string(k) +
                            " singular values");
  detail::store(svd.matrixU(), U, opname, "U");
  detail::store(svd.matrixV(), V, opname, "V");
  for (index_t i = 0; i < k; ++i) S[i] = svd.singularValues()(i);
}

/// Eigen-decomposition of a symmetric A [n, n] (only its lower triangle is read):
/// eigenvalues ascending in w [n], orthonormal eigenvectors in the columns of Z [n, n].
template <class C, class T>
void symmetric_eigen(const cpu_context&, const matrix_view<const T>& A, const vector_view<C>& w,
                     const matrix_view<C>& Z) {
  constexpr const char* opname = "deltaw::kernels::symmetric_eigen";
  detail::check_present(A.rows() == A.cols() && w.size() == A.rows(), opname,
                        "A is " + deltaw::detail::shape_str(A.rows(), A.cols()) + " and w has " +
                            std::to_string(w.size()) + " entries; A must be square and w of its size");
  const detail::cm_matrix<C> a = detail::to_col_major<C>(A);
  const Eigen::SelfAdjointEigenSolver<detail::cm_matrix<C>> es(a);
  if (es.info() != Eigen::Success) throw error(std::string(opname) + ": the eigensolver did not converge");
  for (index_t i = 0; i < A.rows(); ++i) w[i] = es.eigenvalues()(i);
  detail::store(es.eigenvectors(), Z, opname, "Z");
}

}  // namespace kernels
DELTAW_NAMESPACE_END
