// A consumer of deltaw: applies a LoRA to a small layer and checks it against the dense sum.
#include <deltaw/deltaw.hpp>
#include <iostream>

int main() {
  namespace dw = deltaw;
  const Eigen::MatrixXd W = Eigen::MatrixXd::Random(12, 10), B = Eigen::MatrixXd::Random(12, 3),
                        A = Eigen::MatrixXd::Random(3, 10), X = Eigen::MatrixXd::Random(4, 10);
  const auto Y = dw::apply(dw::view(W) + dw::lora(B, A, dw::alpha(6)), X);
  const Eigen::MatrixXd ref = X * (W + 2.0 * B * A).transpose();
  const double err = (Y - ref).cwiseAbs().maxCoeff();
  std::cout << "deltaw " << DELTAW_VERSION_STRING << " consumer: max error " << err
            << ", Eigen threads " << Eigen::nbThreads() << "\n";
#if defined(DELTAW_CONSUMER_EXPECT_OPENMP) && !defined(_OPENMP)
  std::cout << "deltaw::deltaw did not bring OpenMP to a consumer on a machine that has it\n";
  return 1;
#endif
  return err < 1e-12 ? 0 : 1;
}
