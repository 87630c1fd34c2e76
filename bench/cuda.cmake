# CUDA benchmarks (only when the CUDA backend is built). nvcc gets its own flags: the
# host-only -march=native of deltaw_add_benchmark is passed through -Xcompiler.
if(DELTAW_HAS_CUDA)
  add_executable(bench_cuda_lora ${CMAKE_CURRENT_LIST_DIR}/bench_cuda_lora.cu)
  target_link_libraries(bench_cuda_lora PRIVATE deltaw::cuda benchmark::benchmark)
  target_compile_definitions(bench_cuda_lora PRIVATE EIGEN_NO_CUDA)
  target_compile_options(bench_cuda_lora PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 -Xcompiler=-march=native>)
endif()
