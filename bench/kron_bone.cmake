# Kronecker (LoKr) and block-affine (Bone bat, MiSS) updates against the base GEMM and
# PEFT's strategies (docs/benchmarks.md, "Kronecker and block-affine updates").
deltaw_add_benchmark(bench_kron_bone ${CMAKE_CURRENT_SOURCE_DIR}/bench_kron_bone.cpp)
