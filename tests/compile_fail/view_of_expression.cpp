#include <deltaw/deltaw.hpp>
int main() {
  Eigen::MatrixXf A(3, 3);
  auto v = deltaw::view(A * 2.0f);  // an expression has no memory to view
  (void)v;
}
