#include <deltaw/deltaw.hpp>
int main() {
  Eigen::MatrixXf W(4, 3), X(2, 3);
  Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, Eigen::Dynamic> Y(2, 4);
  deltaw::apply(deltaw::view(W), X, Y);  // outputs are float or double
}
