# KaSA, BD-LoRA and TinyLoRA (issue 16) against the base GEMM and PEFT's forward strategies
# (docs/benchmarks.md, "PEFT methods at 4096").
deltaw_add_benchmark(bench_kasa_bdlora_tinylora ${CMAKE_CURRENT_SOURCE_DIR}/bench_kasa_bdlora_tinylora.cpp)
