# BOFT and AdaLoRA (issue 16) against the base GEMM and PEFT's strategies
# (docs/benchmarks.md, "PEFT methods at 4096").
deltaw_add_benchmark(bench_boft_adalora ${CMAKE_CURRENT_SOURCE_DIR}/bench_boft_adalora.cpp)
