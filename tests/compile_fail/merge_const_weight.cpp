#include <deltaw/deltaw.hpp>
int main() {
  const Eigen::MatrixXf W(4, 3);
  Eigen::MatrixXf B(4, 2), A(2, 3);
  deltaw::merge(W, deltaw::lora(B, A, deltaw::alpha(1)));  // W is const
}
