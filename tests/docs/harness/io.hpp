// SPDX-License-Identifier: MIT
// docs/formats.md: `namespace io = deltaw::io;`, a frozen W [out, in] and activations X
// [tokens, in] (float, row-major), LoRA factors B, A and their update `lora`, an Eigen matrix
// and vector to write; for DLPack a managed tensor from a producer (`managed`) and DLTensors
// t (CUDA, bf16) and t1d (1-D). Compiled, never run.
#pragma once
#include <deltaw/io.hpp>
#include <deltaw/io/dlpack.hpp>

namespace io = deltaw::io;
using doc_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
inline doc_matrix W = doc_matrix::Random(64, 32), B = doc_matrix::Random(64, 4), A = doc_matrix::Random(4, 32),
                  X = doc_matrix::Random(8, 32), Y(8, 64), eigen_matrix = doc_matrix::Random(3, 2);
inline Eigen::VectorXf v = Eigen::VectorXf::Random(5);
inline const auto lora = deltaw::lora(B, A, deltaw::alpha(16));
inline DLManagedTensor* managed = nullptr;
inline DLTensor t{}, t1d{};
