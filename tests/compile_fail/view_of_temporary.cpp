#include <deltaw/deltaw.hpp>
int main() {
  auto v = deltaw::view(Eigen::MatrixXf(3, 3));  // would dangle
  (void)v;
}
