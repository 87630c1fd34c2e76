# Training methods, part 2: FFA-LoRA + DP-SGD + federated averaging, Flat-LoRA / LoRA-GGPO, LISA.
deltaw_add_test(train_methods_ffa train/test_methods_ffa_dp.cpp train/test_methods_flat_lisa.cpp)
