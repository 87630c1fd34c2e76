// SPDX-License-Identifier: MIT
// LoRA vs full fine-tuning on a toy regression task, seen through the spectrum of the
// fine-tuned weight (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
// Equivalence"): intruder dimensions are top singular vectors of the fine-tuned weight
// that resemble none of the pre-trained weight's.
//
// The "pre-trained" layer W₀ [64, 64] has a decaying spectrum. The fine-tuning data, like
// real activations, occupy a low-dimensional subspace: x = z·Pᵀ + small noise with P
// [64, 8] orthonormal. The task is a teacher W* = W₀ + ΔW_task whose change acts on that
// subspace (rank 8, ΔW_task = Q·diag(t)·Pᵀ), observed through noisy samples
// y = x·W*ᵀ + ε. Both runs train with deltaw's autograd and AdamW:
//   LoRA    W₀ frozen (a view, never copied), B·A trained at rank 8 (lora_linear), α = 8
//   full    W itself a parameter (matmul_nt)
// Then it prints the intruder counts (k = 10, ε = 0.5) and the spectrum report of each
// update, and writes the singular values of W₀, W_lora, W_full to a data file for
// examples/plot_spectra.gp. Usage: intruder_spectra [output.dat [rank [strength]]]
//
// Why LoRA can grow intruders here: A starts random over all 64 input dimensions, and its
// gradient Bᵀ·dYᵀ·X lies in the data subspace, so the part of A outside it never changes;
// as B grows to fit the task, B·A_⊥ grows with it: a large update the data never see,
// along random directions. Full fine-tuning's gradient dYᵀ·X lies in the data subspace.
#include <deltaw/autograd/adapters.hpp>
#include <deltaw/optim/optim.hpp>
#include <deltaw/spectral/intruder.hpp>
#include <deltaw/spectral/report.hpp>

#include <Eigen/QR>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>

namespace dw = deltaw;
namespace ag = deltaw::autograd;
namespace op = deltaw::optim;
using Mat = dw::dense<float>;

namespace {
constexpr Eigen::Index dim = 64, sub = 8, samples = 2048, batch = 128, steps = 800;

Eigen::MatrixXd orthonormal(Eigen::Index n, Eigen::Index k, std::mt19937_64& g) {
  std::normal_distribution<double> z;
  Eigen::MatrixXd G(n, k);
  for (Eigen::Index i = 0; i < G.size(); ++i) G.data()[i] = z(g);
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(G);
  return qr.householderQ() * Eigen::MatrixXd::Identity(n, k);
}

struct task {
  Mat X, Y;  // [samples, dim]
};

/// Mean squared error of x·Wᵀ against the teacher over all samples.
double full_loss(const task& d, const Mat& W) { return double((d.X * W.transpose() - d.Y).squaredNorm()) / double(d.Y.size()); }

Eigen::VectorXd singular_values(const Eigen::MatrixXd& M) { return Eigen::BDCSVD<Eigen::MatrixXd>(M).singularValues(); }

void print_report(const char* name, const dw::intruder_report& ir, const dw::spectrum_report& sr) {
  std::printf("%-5s intruder dimensions (k = 10, eps = 0.5): %td   max overlap c_j:", name, ir.count());
  for (Eigen::Index j = 0; j < ir.similarity.size(); ++j) std::printf(" %.2f", ir.similarity(j));
  std::printf("\n      update: ||dW||_F %.3f, effective rank %.2f, energy in top 4: %.1f %% (%s SVD)\n", sr.frobenius_norm,
              sr.effective_rank(), 100.0 * sr.energy(std::min<Eigen::Index>(4, sr.singular_values.size())), sr.method);
}
}  // namespace

int main(int argc, char** argv) {
  const std::string out_path = argc > 1 ? argv[1] : "intruder_spectra.dat";
  const Eigen::Index lora_rank = argc > 2 ? std::stol(argv[2]) : 8;
  const double strength = argc > 3 ? std::stod(argv[3]) : 3.0;
  const auto t0 = std::chrono::steady_clock::now();
  std::mt19937_64 g(2024);
  std::normal_distribution<double> z;

  // W₀ = U·diag(σ)·Vᵀ with σ_i = 5·0.93^i: a few strong directions, a long tail.
  Eigen::VectorXd s0(dim);
  for (Eigen::Index i = 0; i < dim; ++i) s0(i) = 5.0 * std::pow(0.93, double(i));
  const Eigen::MatrixXd W0d = orthonormal(dim, dim, g) * s0.asDiagonal() * orthonormal(dim, dim, g).transpose();
  // The data subspace P and ΔW_task = Q·diag(strength·0.9^j)·Pᵀ acting on it.
  const Eigen::MatrixXd P = orthonormal(dim, sub, g);
  Eigen::VectorXd st(sub);
  for (Eigen::Index j = 0; j < sub; ++j) st(j) = strength * std::pow(0.9, double(j));
  const Eigen::MatrixXd dTask = orthonormal(dim, sub, g) * st.asDiagonal() * P.transpose();
  const Mat W0 = W0d.cast<float>();
  task d{Mat(samples, dim), Mat()};
  Eigen::MatrixXd Z(samples, sub), E(samples, dim);
  for (Eigen::Index i = 0; i < Z.size(); ++i) Z.data()[i] = z(g);
  for (Eigen::Index i = 0; i < E.size(); ++i) E.data()[i] = 0.01 * z(g);
  const Eigen::MatrixXd Xd = Z * P.transpose() + E;
  d.X = Xd.cast<float>();
  d.Y = (Xd * (W0d + dTask).transpose()).cast<float>();
  for (Eigen::Index i = 0; i < d.Y.size(); ++i) d.Y.data()[i] += float(0.05 * z(g));
  std::printf("task: y = x (W0 + dW_task)^T + noise; %td samples in an %td-dim subspace of %td; W0 sigma 5 * 0.93^i; "
              "dW_task rank %td, sigma %.2f * 0.9^j\n",
              samples, sub, dim, sub, strength);
  std::printf("loss of W0 itself: %.4f\n", full_loss(d, W0));

  // LoRA: B = 0, A small random (PEFT's default init up to the distribution), s = α/r = 2.
  const double s = 8.0 / double(lora_rank);
  ag::parameter<float> B("B", Mat::Zero(dim, lora_rank)), A("A", Mat(lora_rank, dim));
  for (Eigen::Index i = 0; i < A.size(); ++i) A.value().data()[i] = float(z(g) / std::sqrt(double(dim)));
  ag::parameter<float> W("W", W0);

  const auto batch_of = [&](Eigen::Index step) {
    const Eigen::Index r0 = (step * batch) % samples;
    return std::pair{d.X.middleRows(r0, batch), d.Y.middleRows(r0, batch)};
  };
  {
    op::adamw<float> opt({&B, &A}, {.lr = 1e-2, .weight_decay = 0.0});
    for (Eigen::Index step = 0; step < steps; ++step) {
      const auto [xb, yb] = batch_of(step);
      ag::tape<float> t;
      const auto pred = ag::lora_linear(t.frozen(xb), dw::view(W0), t.param(B), t.param(A), s);
      t.backward(ag::mse(pred, t.frozen(yb)));
      opt.step();
      opt.zero_grad();
    }
  }
  {
    op::adamw<float> opt({&W}, {.lr = 1e-3, .weight_decay = 0.0});
    for (Eigen::Index step = 0; step < steps; ++step) {
      const auto [xb, yb] = batch_of(step);
      ag::tape<float> t;
      t.backward(ag::mse(ag::matmul_nt(t.frozen(xb), t.param(W)), t.frozen(yb)));
      opt.step();
      opt.zero_grad();
    }
  }

  // The LoRA weight stays lazy: W₀ + s·B·A as an expression for the analysis.
  const auto lora = dw::lora(B.value(), A.value(), dw::scale(s));
  const Mat W_lora = dw::materialize(dw::view(W0) + lora);
  const Mat dFull = W.value() - W0;
  std::printf("after %td AdamW steps (batch %td): loss LoRA r = %td: %.4f, full fine-tuning: %.4f, teacher: %.4f\n", steps,
              batch, lora_rank, full_loss(d, W_lora), full_loss(d, W.value()),
              full_loss(d, (W0d + dTask).cast<float>().eval()));

  const auto ir_lora = dw::intruder_dimensions(W0, dw::view(W0) + lora);
  const auto ir_full = dw::intruder_dimensions(W0, W.value());
  print_report("LoRA", ir_lora, dw::spectrum(lora));
  print_report("full", ir_full, dw::spectrum(dFull));
  // How much of each update the data never see: ‖ΔW·(I − P·Pᵀ)‖²_F / ‖ΔW‖²_F.
  const auto unseen = [&](const Eigen::MatrixXd& D) { return (D - D * P * P.transpose()).squaredNorm() / D.squaredNorm(); };
  std::printf("share of ||dW||^2 outside the data subspace: LoRA %.1f %%, full %.1f %%\n",
              100.0 * unseen(dw::materialize(lora).cast<double>()), 100.0 * unseen(dFull.cast<double>()));
  const auto ir_task = dw::intruder_dimensions(W0d, Eigen::MatrixXd(W0d + dTask));
  std::printf("(the teacher W0 + dW_task itself has %td intruder dimensions)\n", ir_task.count());

  const Eigen::VectorXd sv0 = singular_values(W0.cast<double>()), svl = singular_values(W_lora.cast<double>()),
                        svf = singular_values(W.value().cast<double>());
  std::FILE* f = std::fopen(out_path.c_str(), "w");
  if (!f) {
    std::fprintf(stderr, "cannot write %s\n", out_path.c_str());
    return 1;
  }
  std::fprintf(f, "# index  sigma(W0)  sigma(W_lora, r = %td)  sigma(W_full)\n", lora_rank);
  for (Eigen::Index i = 0; i < dim; ++i) std::fprintf(f, "%td %.8g %.8g %.8g\n", i + 1, sv0(i), svl(i), svf(i));
  std::fclose(f);
  std::printf("wrote %s; plot it with:\n  gnuplot -e \"datafile='%s'; outfile='intruder_spectra.png'\" examples/plot_spectra.gp\n",
              out_path.c_str(), out_path.c_str());
  std::printf("total %.1f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return 0;
}
