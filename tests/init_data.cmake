# Data-driven initialisations: LoRA-GA, LoRA-SB, LoLDU (residual form), CorDA, incremental PCA, EVA.
deltaw_add_test(init_data init/test_init_data.cpp init/test_init_data_factor.cpp init/test_init_data_eva.cpp)
