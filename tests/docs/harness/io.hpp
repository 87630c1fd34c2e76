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
// The PEFT sections: layer sizes out × in = 64 × 32 and the factors of each structured type
// at that size (LoKr w1 ⊗ (w2a·w2b), MiSS D, Bone bat b, VeRA's shared basis and λ's,
// RandLoRA's basis, λ and γ).
inline const deltaw::index_t out = 64, in = 32;
inline doc_matrix w1 = doc_matrix::Random(4, 4), w2a = doc_matrix::Random(16, 4), w2b = doc_matrix::Random(4, 8),
                  D = doc_matrix::Random(4, 64), b = doc_matrix::Random(64, 4),
                  rl_lambda = doc_matrix::Random(4, 8), rl_gamma = doc_matrix::Random(8, 32);
inline const auto basis = deltaw::vera_shared_basis(1, 4, out, in);
inline const auto rl_basis = deltaw::randlora_shared_basis(2, 4, out, in);
inline Eigen::VectorXf lambda_d = Eigen::VectorXf::Ones(4), lambda_b = Eigen::VectorXf::Ones(out);
