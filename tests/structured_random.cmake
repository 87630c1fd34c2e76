# Counter-based randomness (core/random.hpp) and the random-basis updates NOLA, VeRA, RandLoRA.
deltaw_add_test(random core/test_random.cpp)
deltaw_add_test(random_basis expr/test_random_basis.cpp)
deltaw_add_test(random_basis_no_dense expr/test_random_basis_no_dense.cpp alloc_counter.cpp)
