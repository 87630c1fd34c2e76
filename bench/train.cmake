# One LoRA training step against the two GEMMs any step of the layer needs
# (docs/benchmarks.md, "Training step"): bench_train_step with Eigen's own products (and
# no BLAS linked, so that its --rss_steps mode measures deltaw alone), and
# bench_train_step_blas with EIGEN_USE_BLAS (OpenBLAS sgemm under Eigen's products).
deltaw_add_benchmark(bench_train_step ${CMAKE_CURRENT_SOURCE_DIR}/bench_train_step.cpp)
block(SCOPE_FOR VARIABLES)
  set(BLA_VENDOR OpenBLAS)
  find_package(BLAS)
  find_path(DELTAW_CBLAS_INCLUDE_DIR cblas.h
    PATHS /usr/include/x86_64-linux-gnu/openblas-pthread /usr/include/openblas /usr/include/x86_64-linux-gnu
    NO_DEFAULT_PATH)
  if(BLAS_FOUND AND DELTAW_CBLAS_INCLUDE_DIR)
    deltaw_add_benchmark(bench_train_step_blas ${CMAKE_CURRENT_SOURCE_DIR}/bench_train_step.cpp)
    target_link_libraries(bench_train_step_blas PRIVATE BLAS::BLAS)
    target_include_directories(bench_train_step_blas PRIVATE ${DELTAW_CBLAS_INCLUDE_DIR})
    target_compile_definitions(bench_train_step_blas PRIVATE DELTAW_BENCH_HAS_OPENBLAS EIGEN_USE_BLAS)
  else()
    message(STATUS "deltaw: OpenBLAS (with cblas.h) not found; bench_train_step_blas is not built")
  endif()
endblock()
