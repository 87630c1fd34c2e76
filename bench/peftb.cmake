# SHiRA, RoAd, HiRA, DeLoRA (issue 16) against the base GEMM and PEFT's strategies
# (docs/benchmarks.md, "PEFT methods at 4096").
deltaw_add_benchmark(bench_peftb ${CMAKE_CURRENT_SOURCE_DIR}/bench_peftb.cpp)
