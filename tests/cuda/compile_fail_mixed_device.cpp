// Must NOT compile: a CPU weight plus a CUDA update. The test passes when the compiler
// reports update.hpp's static_assert ("W and ΔW live on different devices").
#include <deltaw/cuda/view.cuh>
#include <deltaw/deltaw.hpp>

int main() {
  namespace dw = deltaw;
  Eigen::MatrixXf W(4, 3);
  float* B = nullptr;
  float* A = nullptr;
  auto delta = dw::lora(dw::cuda::view(B, 0, 2), dw::cuda::view(A, 2, 0), dw::alpha(1));
  (void)(dw::view(W) + delta);
}
