# The random-basis benchmarks (docs/benchmarks.md, "Random-basis updates"): NOLA, VeRA and
# RandLoRA against the base GEMM and PEFT's strategies, one program, one thread.
deltaw_add_benchmark(bench_random_basis ${CMAKE_CURRENT_SOURCE_DIR}/bench_random_basis.cpp)
