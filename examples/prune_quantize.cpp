// SPDX-License-Identifier: MIT
// Issue 20, item 5, in one small program: aLoDD picks the boundary points of an activation set
// with its adaptive ratio; coupled LoRAPrune removes whole attention heads and MLP channels of a
// tiny transformer while its LoRA trains, and the pruned layers are physically sliced and saved;
// CBQ quantises a stack of three blocks to 3 bits over cross-block windows with learned steps.
// Every number printed is computed here; the checks behind them are in tests/spectral/
// test_alodd.cpp, tests/train/test_lora_prune_coupled.cpp and tests/train/test_cbq_cross_block.cpp.
#include <deltaw/spectral.hpp>
#include <deltaw/train/cbq_cross_block.hpp>
#include <deltaw/train/lora_prune_export.hpp>
#include <deltaw/train/loop.hpp>

#include <cstdio>
#include <filesystem>
#include <random>
#include <vector>

namespace dw = deltaw;
namespace tr = deltaw::train;
namespace nn = deltaw::nn;
namespace ag = deltaw::autograd;
using Mat = dw::dense<double>;

static Mat gaussian(dw::index_t n, dw::index_t d, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> N;
  Mat m(n, d);
  for (dw::index_t i = 0; i < n; ++i)
    for (dw::index_t j = 0; j < d; ++j) m(i, j) = N(g);
  return m;
}

int main() {
  // 1. aLoDD on 400 points of an anisotropic 2-D Gaussian.
  {
    Mat X = gaussian(400, 2, 1);
    X.col(0) *= 2.0;
    const auto r = dw::lodd_boundary_adaptive(X, {.lodd = {.k = 15}});
    double inner = 0, outer = 0;
    std::vector<bool> is_boundary(400, false);
    for (auto i : r.boundary) is_boundary[std::size_t(i)] = true;
    for (dw::index_t i = 0; i < 400; ++i) (is_boundary[std::size_t(i)] ? outer : inner) += X.row(i).norm();
    std::printf("aLoDD: d_I = %d, ratio = %.4f, %zu boundary points of 400; mean radius %.3f on the boundary, %.3f inside\n",
                int(r.intrinsic_dim), r.ratio, r.boundary.size(), outer / double(r.boundary.size()),
                inner / double(400 - r.boundary.size()));
  }

  // 2. Coupled LoRAPrune on a 2-block tiny transformer (4 heads, d_ff 32), to sparsity 0.5.
  {
    nn::transformer_config c;
    c.vocab = 16;
    c.seq = 8;
    c.d_model = 16;
    c.heads = 4;
    c.d_ff = 32;
    c.layers = 2;
    c.seed = 9;
    nn::tiny_transformer<double> model(c);
    model.attach(nn::adapter_kind::lora, 2, 4.0);
    dw::optim::adamw<double> opt(model.trainable_parameters(), {.lr = 2e-2});
    std::vector<std::int64_t> ids, labels;  // four sequences counting up modulo 16
    for (std::int64_t s0 : {3, 7, 11, 14})
      for (dw::index_t i = 0; i < c.seq; ++i) {
        ids.push_back((s0 + i) % 16);
        labels.push_back((s0 + i + 1) % 16);
      }
    tr::lora_prune_options o;
    o.target_sparsity = 0.5;
    tr::fit_options fo;
    fo.steps = 30;
    fo.log_every = 0;
    tr::lora_prune<double> pr(o, tr::transformer_couplings<double>(model.projections(), c.heads));
    const auto r = tr::fit<double>(
        [&](ag::tape<double>& t, dw::index_t) { return ag::cross_entropy(model(t, ids, 4), labels); }, opt, {&pr}, fo);
    const auto sliced = tr::slice_pruned(pr);
    std::size_t before = 0, after = 0;
    for (const auto& l : sliced) {
      before += std::size_t(l.out_features * l.in_features);
      after += std::size_t(l.weight.size());
    }
    const auto path = std::filesystem::temp_directory_path() / "deltaw_pruned_example.safetensors";
    tr::save_sliced(sliced, path);
    const auto back = tr::load_sliced<double>(path);
    std::printf("LoRAPrune (coupled): loss %.4f -> %.4f; heads kept per block %d of 4, MLP channels %d of 32; "
                "projection weights %zu -> %zu; %zu layers saved to and read back from %s (%ju bytes)\n",
                r.first_loss, r.final_loss, int(sliced[0].weight.rows() / 4), int(sliced[4].weight.rows()), before, after,
                back.size(), path.c_str(), std::uintmax_t(std::filesystem::file_size(path)));
    std::filesystem::remove(path);
  }

  // 3. CBQ: three Linear + GELU blocks (8 -> 12 -> 12 -> 6), 3-bit, windows of 2 blocks.
  {
    const Mat W0 = 0.4 * gaussian(12, 8, 21), W1 = 0.3 * gaussian(12, 12, 22), W2 = 0.3 * gaussian(6, 12, 23);
    const Mat b0 = 0.1 * gaussian(1, 12, 25), b1 = 0.1 * gaussian(1, 12, 26), b2 = Mat::Zero(1, 6);
    std::vector<tr::cbq_block<double>> blocks{{dw::view(W0), b0}, {dw::view(W1), b1}, {dw::view(W2), b2, tr::cbq_activation::none}};
    const Mat X = gaussian(192, 8, 24);
    tr::cbq_cross_block_options o;
    o.bits = 3;
    o.rank = 4;
    o.steps = 250;
    o.lr = 2e-2;
    o.step.learn = false;
    const auto fixed = tr::cbq_reconstruct_blocks<double>(blocks, dw::view(X), o);
    o.step.learn = true;
    const auto learned = tr::cbq_reconstruct_blocks<double>(blocks, dw::view(X), o);
    std::printf("CBQ (3 blocks, 3-bit, %zu windows of 2): output error ||f(X) - f^(X)||^2/n: round-to-nearest %.4f, "
                "LoRA-Rounding with fixed steps %.4f, with learned steps %.4f\n",
                learned.windows.size(), learned.rtn_error, fixed.error, learned.error);
  }
}
