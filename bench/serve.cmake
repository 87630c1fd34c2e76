# Multi-adapter serving (docs/benchmarks.md, "Multi-adapter serving"): heterogeneous batches
# by segments and gather against the base GEMM, the generic grouped path and per-adapter
# serial serving. The PEFT side is bench/compare/peft_mixed_batch.py.
deltaw_add_benchmark(bench_serve ${CMAKE_CURRENT_SOURCE_DIR}/bench_serve.cpp)
