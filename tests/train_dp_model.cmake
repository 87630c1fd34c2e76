# DP-SGD inside nn models through nn::linear's forward hook, and EVA from a model's forward
# passes (init/eva_model.hpp).
deltaw_add_test(train_dp_model train/test_dp_model.cpp)
deltaw_add_test(init_eva_model init/test_eva_model.cpp)
