# Multi-adapter serving (docs/benchmarks.md, "Multi-adapter serving"): heterogeneous batches
# by segments and gather against the base GEMM, the generic grouped path and per-adapter
# serial serving. The PEFT side is bench/compare/peft_mixed_batch.py.
deltaw_add_benchmark(bench_serve ${CMAKE_CURRENT_SOURCE_DIR}/bench_serve.cpp)
# bench_serve_regimes: decode and prefill regimes over 1 … 4096 registered adapters with four
# popularity laws, the pool's hit path, serial serving (docs/benchmarks.md, "Serving regimes").
find_package(nlohmann_json 3.10 QUIET)
# bench_serve_regimes_blas: the same with Eigen's products on OpenBLAS (DELTAW_USE_BLAS mode),
# the build bench/compare/serve_peft.py sets against PEFT on torch.
if(nlohmann_json_FOUND)
  deltaw_add_benchmark(bench_serve_regimes ${CMAKE_CURRENT_SOURCE_DIR}/bench_serve_regimes.cpp)
  target_link_libraries(bench_serve_regimes PRIVATE nlohmann_json::nlohmann_json)
  if(DELTAW_BENCH_HAVE_OPENBLAS)
    deltaw_add_benchmark(bench_serve_regimes_blas ${CMAKE_CURRENT_SOURCE_DIR}/bench_serve_regimes.cpp)
    target_link_libraries(bench_serve_regimes_blas PRIVATE nlohmann_json::nlohmann_json)
    deltaw_link_openblas(bench_serve_regimes_blas)
    target_compile_definitions(bench_serve_regimes_blas PRIVATE EIGEN_USE_BLAS DELTAW_USE_BLAS)
  endif()
else()
  message(STATUS "deltaw: nlohmann_json not found; bench_serve_regimes is not built")
endif()
