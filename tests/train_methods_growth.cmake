# Training methods, part 3: LaMDA freezing, IncreLoRA growth, DiffoRA gates, O3 regulariser,
# AdaLoRA rank allocation.
# alloc_counter.cpp replaces malloc for the check that IncreLoRA's score copies nothing big.
deltaw_add_test(train_methods_growth train/test_methods_growth.cpp train/test_methods_gates.cpp
                train/test_methods_growth_float.cpp train/test_adalora.cpp alloc_counter.cpp)
