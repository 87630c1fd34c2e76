# VJPs of the Kronecker (LoKr, DiffuseKronA), block-affine (Bone bat, MiSS) and Block-LoRA
# updates; alloc_counter.cpp replaces malloc for the no-dense-gradient check.
deltaw_add_test(autograd_vjp_kron_bone autograd/test_vjp_kron_bone.cpp alloc_counter.cpp)
