# CUDA benchmarks (only when the CUDA backend is built). nvcc gets its own flags: the
# host-only -march=native of deltaw_add_benchmark is passed through -Xcompiler.
if(DELTAW_HAS_CUDA)
  foreach(_b bench_cuda_lora bench_cuda_updates)
    add_executable(${_b} ${CMAKE_CURRENT_LIST_DIR}/${_b}.cu)
    target_link_libraries(${_b} PRIVATE deltaw::cuda benchmark::benchmark)
    target_compile_definitions(${_b} PRIVATE EIGEN_NO_CUDA)
    target_compile_options(${_b} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 -Xcompiler=-march=native>)
  endforeach()
endif()
