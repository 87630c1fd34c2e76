// Intruder dimensions of a LoRA-updated weight (two SVDs through Eigen's BDCSVD): the cost of a
// file that analyses spectra, header-only and with deltaw::eigen_instances (DELTAW_EIGEN_INSTANCES).
#include <deltaw/deltaw.hpp>
#include <deltaw/spectral/intruder.hpp>

#include <cstdio>

int main() {
  namespace dw = deltaw;
  const Eigen::MatrixXd W0 = Eigen::MatrixXd::Random(96, 64);
  const Eigen::MatrixXd A = Eigen::MatrixXd::Random(4, 64), B = Eigen::MatrixXd::Random(96, 4);
  const auto r = dw::intruder_dimensions(W0, W0 + 2.0 * B * A);
  std::printf("%d intruders\n", int(r.count()));
}
