# The foundation benchmarks (docs/benchmarks.md, "LoRA"): bench_lora with Eigen's own
# products, bench_lora_blas from the same source with EIGEN_USE_BLAS (DELTAW_USE_BLAS mode).
# Both link OpenBLAS for the direct cblas_sgemm reference.
block(SCOPE_FOR VARIABLES)
  set(BLA_VENDOR OpenBLAS)
  find_package(BLAS)
  find_path(DELTAW_CBLAS_INCLUDE_DIR cblas.h
    PATHS /usr/include/x86_64-linux-gnu/openblas-pthread /usr/include/openblas /usr/include/x86_64-linux-gnu
    NO_DEFAULT_PATH)
  if(BLAS_FOUND AND DELTAW_CBLAS_INCLUDE_DIR)
    foreach(_variant IN ITEMS bench_lora bench_lora_blas)
      deltaw_add_benchmark(${_variant} ${CMAKE_CURRENT_SOURCE_DIR}/bench_lora.cpp)
      target_link_libraries(${_variant} PRIVATE BLAS::BLAS)
      target_include_directories(${_variant} PRIVATE ${DELTAW_CBLAS_INCLUDE_DIR})
    endforeach()
    target_compile_definitions(bench_lora_blas PRIVATE EIGEN_USE_BLAS DELTAW_USE_BLAS)
  else()
    message(STATUS "deltaw: OpenBLAS (with cblas.h) not found; bench_lora and bench_lora_blas are not built")
  endif()
endblock()
