# VJPs of the Kronecker (LoKr, DiffuseKronA), block-affine (Bone bat, MiSS) and Block-LoRA
# updates, and of LoHa, IA³, OFT and HRA (issue 16); alloc_counter.cpp replaces malloc for the
# no-dense-gradient checks.
deltaw_add_test(autograd_vjp_kron_bone autograd/test_vjp_kron_bone.cpp autograd/test_vjp_loha_ia3_oft.cpp autograd/test_vjp_hra.cpp autograd/test_vjp_boft_adalora.cpp autograd/test_vjp_shira.cpp autograd/test_vjp_road.cpp autograd/test_vjp_hira.cpp autograd/test_vjp_delora.cpp autograd/test_vjp_gralora_unilora.cpp autograd/test_vjp_kasa_bdlora_tinylora.cpp alloc_counter.cpp)
