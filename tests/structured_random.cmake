# Counter-based randomness (core/random.hpp) and the random-basis updates NOLA, VeRA, RandLoRA;
# VB-LoRA and PVeRA (issue 16) with their no-dense checks.
deltaw_add_test(random core/test_random.cpp)
deltaw_add_test(random_basis expr/test_random_basis.cpp)
deltaw_add_test(random_basis_no_dense expr/test_random_basis_no_dense.cpp expr/test_vblora_pvera.cpp alloc_counter.cpp)
