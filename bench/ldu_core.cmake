# LoLDU, core low-rank (LoRA-XS / LoRA-SB / LaMDA) and Block-LoRA against the base GEMM
# and the materialise-then-GEMM strategy (docs/benchmarks.md, "LoLDU, core low-rank, Block-LoRA").
deltaw_add_benchmark(bench_ldu_core ${CMAKE_CURRENT_SOURCE_DIR}/bench_ldu_core.cpp)
