// Layers: a whole tiny transformer with LoRA (and DoRA) adapters checked end to end by
// central differences, and an MLP with biases.
#include <deltaw/nn/layers.hpp>

#include "grad_util.hpp"

using namespace dwag;
namespace nn = deltaw::nn;

TEST_CASE("tiny transformer with adapters: end-to-end gradient check") {
  for (auto kind : {nn::adapter_kind::lora, nn::adapter_kind::rslora, nn::adapter_kind::dora}) {
    nn::transformer_config c{7, 3, 4, 2, 6, 1, 3};
    nn::tiny_transformer<double> model(c);
    model.attach(kind, 2, 4.0);
    auto params = model.trainable_parameters();
    CHECK(params.size() == (kind == nn::adapter_kind::dora ? 18u : 12u));
    std::uint64_t seed = 1;
    for (auto* p : params)  // B = 0 at init would make ∂L/∂A vanish: move off it
      if (p->name().find("lora_B") != std::string::npos) p->value() = 0.3 * dwt::random<MatD>(p->rows(), p->cols(), seed++);
    const std::vector<std::int64_t> ids{1, 4, 6, 0, 2, 2};
    const std::vector<std::int64_t> labels{4, 6, ag::ignore_label, 2, 2, 5};
    // DoRA's detached norms must stay fixed while differencing: check LoRA fully, and
    // DoRA's magnitudes (whose finite difference does not move the norms).
    std::vector<P*> checked;
    for (auto* p : params)
      if (kind != nn::adapter_kind::dora || p->name().find("magnitude") != std::string::npos) checked.push_back(p);
    const auto rep = ag::gradcheck([&](auto& t) { return ag::cross_entropy(model(t, ids, 2), labels); }, checked);
    std::printf("gradcheck tiny transformer (%s): %td entries, max rel err %.2e\n",
                kind == nn::adapter_kind::lora ? "lora" : kind == nn::adapter_kind::rslora ? "rslora" : "dora",
                rep.entries, rep.max_rel_error);
    CHECK(rep.max_rel_error < 1e-6);
    CHECK(rep.min_grad_norm > 0);
  }
}

TEST_CASE("MLP with trainable biases, RMSNorm and SiLU: gradient check") {
  const MatD W1 = dwt::random<MatD>(5, 3, 1), W2 = dwt::random<MatD>(2, 5, 2);
  nn::linear<double> l1("l1", deltaw::view(W1)), l2("l2", deltaw::view(W2));
  l1.set_bias(dwt::random<MatD>(1, 5, 3), true);
  l2.set_bias(dwt::random<MatD>(1, 2, 4), true);
  std::mt19937_64 g(5);
  l1.attach(nn::adapter_kind::lora, 2, 2.0, g);
  l1.lora_B()->value() = dwt::random<MatD>(5, 2, 6);
  nn::rms_norm<double> norm("norm", 5);
  norm.gamma().set_trainable(true);
  std::vector<P*> ps;
  l1.collect(ps);
  l2.collect(ps);
  norm.collect(ps);
  CHECK(ps.size() == 5u);
  const MatD X = dwt::random<MatD>(4, 3, 7), Y = dwt::random<MatD>(4, 2, 8);
  const auto rep = ag::gradcheck(
      [&](auto& t) { return ag::mse(l2(t, ag::silu(norm(t, l1(t, t.frozen(X))))), t.frozen(Y)); }, ps);
  std::printf("gradcheck mlp: %td entries, max rel err %.2e\n", rep.entries, rep.max_rel_error);
  CHECK(rep.max_rel_error < 1e-6);
}
