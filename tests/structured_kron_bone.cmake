# Kronecker updates (LoKr, DiffuseKronA) and block-affine updates (Bone bat, MiSS).
# One executable; alloc_counter.cpp replaces malloc for the no-dense-ΔW checks of both.
deltaw_add_test(structured_kron_bone expr/test_kron.cpp expr/test_block_affine.cpp alloc_counter.cpp)
