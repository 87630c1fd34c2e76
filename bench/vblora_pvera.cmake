# VB-LoRA and PVeRA (issue 16) against the base GEMM and PEFT's strategies
# (docs/benchmarks.md, "VB-LoRA and PVeRA at 4096").
deltaw_add_benchmark(bench_vblora_pvera ${CMAKE_CURRENT_SOURCE_DIR}/bench_vblora_pvera.cpp)
