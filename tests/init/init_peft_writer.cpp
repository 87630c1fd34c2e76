// The deltaw side of check_init_peft.py: reads raw float64 matrices from the directory in
// argv[1], writes deltaw's LoRA-GA, incremental PCA and CorDA results there as raw float64.
#include <deltaw/init/corda.hpp>
#include <deltaw/init/eva.hpp>
#include <deltaw/init/lora_ga.hpp>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
namespace dw = deltaw;
using M = dw::dense<double>;
static std::string dir;
M load(const std::string& name, long r, long c) {
  M m(r, c);
  std::ifstream f(dir + "/" + name, std::ios::binary);
  if (!f.read(reinterpret_cast<char*>(m.data()), r * c * 8)) throw std::runtime_error("cannot read " + dir + "/" + name);
  return m;
}
void save(const std::string& name, const M& m) {
  std::ofstream f(dir + "/" + name, std::ios::binary);
  f.write(reinterpret_cast<const char*>(m.data()), m.size() * 8);
}
int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: init_peft_writer DIR\n";
    return 2;
  }
  dir = argv[1];
  // LoRA-GA: W [64, 48], G [64, 48], r = 4, s = 2 (alpha 8 / r 4).
  for (int v = 0; v < 2; ++v) {
    M W = load("W.bin", 64, 48);
    const M G = load("G.bin", 64, 48);
    const auto f = dw::lora_ga(W, G, 4, 2.0,
                               dw::lora_ga_options{.variant = v == 0 ? dw::lora_ga_variant::paper : dw::lora_ga_variant::peft});
    save(v == 0 ? "ga_paper_A.bin" : "ga_peft_A.bin", f.A);
    save(v == 0 ? "ga_paper_B.bin" : "ga_peft_B.bin", f.B);
    save(v == 0 ? "ga_paper_W.bin" : "ga_peft_W.bin", W);
  }
  // Incremental PCA: X [600, 40] in 12 batches of 50, k = 6.
  {
    const M X = load("X.bin", 600, 40);
    dw::incremental_pca p(6);
    for (int b = 0; b < 12; ++b) p.partial_fit(X.middleRows(b * 50, 50));
    save("ipca_C.bin", p.components());
    save("ipca_S.bin", M(p.singular_values().transpose()));
    save("ipca_R.bin", M(p.explained_variance_ratio().transpose()));
  }
  // CorDA: W [24, 30], C [30, 30], r = 4, s = 2.
  for (int v = 0; v < 2; ++v) {
    M W = load("Wc.bin", 24, 30);
    const M C = load("C.bin", 30, 30);
    const auto f = dw::corda(W, Eigen::MatrixXd(C), 4, 2.0,
                             dw::corda_options{.method = v == 0 ? dw::corda_method::ipm : dw::corda_method::kpm});
    save(v == 0 ? "corda_ipm_sBA.bin" : "corda_kpm_sBA.bin", M(f.s * f.B * f.A));
  }
  std::cout << "ok\n";
}
