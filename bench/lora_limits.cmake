# Computational limits of LoRA (issue 20): exact vs chained low-rank LoRA gradient of
# attention from 128 to 8192 tokens (docs/papers.md).
deltaw_add_benchmark(bench_lora_limits ${CMAKE_CURRENT_SOURCE_DIR}/bench_lora_limits.cpp)
