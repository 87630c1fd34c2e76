# The foundation benchmarks (docs/benchmarks.md, "LoRA"): bench_lora with Eigen's own
# products, bench_lora_blas from the same source with EIGEN_USE_BLAS (DELTAW_USE_BLAS mode).
# Both link OpenBLAS for the direct cblas_sgemm reference.
if(DELTAW_BENCH_HAVE_OPENBLAS)
  foreach(_variant IN ITEMS bench_lora bench_lora_blas)
    deltaw_add_benchmark(${_variant} ${CMAKE_CURRENT_SOURCE_DIR}/bench_lora.cpp)
    deltaw_link_openblas(${_variant})
  endforeach()
  target_compile_definitions(bench_lora_blas PRIVATE EIGEN_USE_BLAS DELTAW_USE_BLAS)
else()
  message(STATUS "deltaw: OpenBLAS (with cblas.h) not found; bench_lora and bench_lora_blas are not built")
endif()
