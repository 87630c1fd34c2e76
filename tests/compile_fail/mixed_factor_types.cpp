#include <deltaw/deltaw.hpp>
int main() {
  Eigen::MatrixXf B(4, 2);
  Eigen::MatrixXd A(2, 3);
  auto l = deltaw::lora(B, A, deltaw::alpha(1));  // float B with double A
  (void)l;
}
