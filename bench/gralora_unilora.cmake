# GraLoRA and UniLoRA (issue 16) against the base GEMM and PEFT's strategies
# (docs/benchmarks.md, "GraLoRA and UniLoRA at 4096").
deltaw_add_benchmark(bench_gralora_unilora ${CMAKE_CURRENT_SOURCE_DIR}/bench_gralora_unilora.cpp)
