# One LoRA training step against the two GEMMs any step of the layer needs
# (docs/benchmarks.md, "Training step"): bench_train_step with Eigen's own products (and
# no BLAS linked, so that its --rss_steps mode measures deltaw alone), and
# bench_train_step_blas with EIGEN_USE_BLAS (OpenBLAS sgemm under Eigen's products).
deltaw_add_benchmark(bench_train_step ${CMAKE_CURRENT_SOURCE_DIR}/bench_train_step.cpp)
if(DELTAW_BENCH_HAVE_OPENBLAS)
  deltaw_add_benchmark(bench_train_step_blas ${CMAKE_CURRENT_SOURCE_DIR}/bench_train_step.cpp)
  deltaw_link_openblas(bench_train_step_blas)
  target_compile_definitions(bench_train_step_blas PRIVATE DELTAW_BENCH_HAS_OPENBLAS EIGEN_USE_BLAS)
else()
  message(STATUS "deltaw: OpenBLAS (with cblas.h) not found; bench_train_step_blas is not built")
endif()
