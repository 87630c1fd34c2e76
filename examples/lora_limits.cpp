// SPDX-License-Identifier: MIT
// Computational limits of LoRA: (1) as the entries of X·W*ᵀ grow, the norm quantity Γ
// crosses κ·√(ln n) and the chained low-rank gradient (polynomial kernel) stops matching
// the exact one; (2) LoRA on W_Q and W_V trained with the chained gradient while the norm
// monitor watches the layer, the exact loss and the gradient error printed along the way.
#include <deltaw/papers/lora_limits.hpp>

#include <chrono>
#include <cstdio>
#include <random>

namespace ll = deltaw::papers::lora_limits;
using deltaw::index_t;
using Mat = deltaw::dense<float>;

namespace {
Mat randn(index_t r, index_t c, double sd, std::mt19937_64& g) {
  std::normal_distribution<double> n(0.0, sd);
  Mat m(r, c);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = float(n(g));
  return m;
}
struct layer_data {
  Mat W[3], B[3], A[3];
  double s = 2.0;
  ll::attention_layer<float> layer() const {
    ll::attention_layer<float> L;
    ll::lora_projection<float>* ps[3] = {&L.q, &L.k, &L.v};
    for (int i = 0; i < 3; ++i) *ps[i] = {deltaw::view(W[i]), deltaw::view(B[i]), deltaw::view(A[i]), s};
    return L;
  }
};
double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}
}  // namespace

int main() {
  const index_t n = 512, d_in = 32, d = 8, dv = 8, r = 4;
  std::mt19937_64 g(5);
  layer_data ld;
  for (int i = 0; i < 3; ++i) {
    ld.W[i] = randn(d, d_in, 0.3 / std::sqrt(double(d_in)), g);
    ld.B[i] = randn(d, r, 0.01, g);
    ld.A[i] = randn(r, d_in, 1.0 / std::sqrt(double(d_in)), g);
  }
  const Mat X0 = randn(n, d_in, 1.0, g);
  const Mat Y = randn(n, dv, 0.5, g);

  std::printf("(1) entries grow: X scaled by c, n = %td, d = %td, threshold κ·√(ln n) with κ = 1\n\n", n, d);
  std::printf("| c | Γ (entries) | Γ (norm product) | threshold | below | logit bound | rel. error g=2 | g=3 | g=4 |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  for (double c : {0.5, 1.0, 2.0, 4.0, 8.0}) {
    const Mat X = float(c) * X0;
    const auto L = ld.layer();
    const auto m = ll::measure(X, L);
    ll::threshold_options op;
    op.kind = ll::gamma_kind::norm_product;
    const auto mp = ll::measure(X, L, op);
    ll::gradient_options o;
    o.full = true;
    const auto exact = ll::attention_lora_grad_dense(X, Y, L, o);
    double e[3];
    for (int k = 0; k < 3; ++k) {
      o.degree = 2 + k;
      try {
        e[k] = ll::gradient_rel_error(ll::attention_lora_grad_chained(X, Y, L, o), exact);
      } catch (const deltaw::error&) {
        e[k] = INFINITY;  // the kernel's row sum went non-positive
      }
    }
    std::printf("| %.1f | %.3f | %.3f | %.3f | %s | %.3f | %.2e | %.2e | %.2e |\n", c, m.gamma, mp.gamma, m.threshold,
                m.below ? "yes" : "no", m.logit_bound, e[0], e[1], e[2]);
  }

  std::fflush(stdout);
  std::printf("\n(2) LoRA on W_Q, W_V (partial) trained by the chained gradient (degree 3), monitored\n\n");
  std::printf("| step | exact loss | Γ | below | ‖sBA‖₂ (Q) | ‖sBA‖₂ (V) | grad rel. error | chained ms | exact ms |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  ll::norm_monitor mon;
  const double lr = 0.02;
  ll::gradient_options o;
  o.degree = 3;
  for (int step = 0; step <= 60; ++step) {
    const auto L = ld.layer();
    const auto t0 = std::chrono::steady_clock::now();
    ll::lora_gradients<float> gc;
    try {
      gc = ll::attention_lora_grad_chained(X0, Y, L, o);
    } catch (const deltaw::error& e) {
      const auto& m = mon(step, X0, L);
      std::printf("| %d | — | %.3f | %s | stopped: %s |\n", step, m.gamma, m.below ? "yes" : "no", e.what());
      break;
    }
    const double tc = seconds_since(t0);
    if (step % 10 == 0) {
      const auto t1 = std::chrono::steady_clock::now();
      const auto ge = ll::attention_lora_grad_dense(X0, Y, L, o);
      const double te = seconds_since(t1);
      const auto& m = mon(step, X0, L);
      std::printf("| %d | %.4f | %.3f | %s | %.3f | %.3f | %.2e | %.2f | %.2f |\n", step, ge.loss, m.gamma, m.below ? "yes" : "no",
                  m.delta_spec[0], m.delta_spec[2], ll::gradient_rel_error(gc, ge), 1e3 * tc, 1e3 * te);
    }
    for (int i : {0, 2}) {
      ld.B[i] -= float(lr) * gc.dB[i];
      ld.A[i] -= float(lr) * gc.dA[i];
    }
  }
  std::printf("\nfirst step above the threshold: %lld (-1: none)\n", (long long)mon.first_crossing());
  return 0;
}
