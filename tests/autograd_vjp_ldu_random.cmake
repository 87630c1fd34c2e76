# VJPs of LoLDU, NOLA, VeRA and RandLoRA (issue 4, part 2), VB-LoRA and PVeRA (issue 16);
# alloc_counter.cpp for the "backward never allocates out x in" case.
deltaw_add_test(autograd_vjp_ldu_random autograd/test_vjp_ldu_random.cpp autograd/test_vjp_vblora_pvera.cpp alloc_counter.cpp)
