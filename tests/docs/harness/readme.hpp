// SPDX-License-Identifier: MIT
// README.md "Use": W [out, in] row-major weights the caller owns, the LoRA factors B [out, r]
// and A [r, in], activations X [tokens, in], an upstream gradient dY [tokens, out] and an
// output buffer Yout [tokens, out].
#pragma once
#include <deltaw/deltaw.hpp>

using doc_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
inline doc_matrix W = doc_matrix::Random(64, 32), B = doc_matrix::Random(64, 4), A = doc_matrix::Random(4, 32),
                  X = doc_matrix::Random(8, 32), dY = doc_matrix::Random(8, 64), Yout(8, 64);
