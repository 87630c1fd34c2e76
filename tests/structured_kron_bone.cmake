# Kronecker updates (LoKr, DiffuseKronA), block-affine updates (Bone bat, MiSS) and
# LoHa, IA³, OFT, HRA (issue 16).
# One executable; alloc_counter.cpp replaces malloc for the no-dense-ΔW checks of both.
deltaw_add_test(structured_kron_bone expr/test_kron.cpp expr/test_block_affine.cpp expr/test_loha_ia3_oft.cpp expr/test_hra.cpp expr/test_shira.cpp expr/test_road.cpp expr/test_hira.cpp expr/test_delora.cpp expr/test_boft_adalora.cpp expr/test_gralora_unilora.cpp expr/test_kasa_bdlora_tinylora.cpp alloc_counter.cpp)
