# LoRAPrune (train/lora_prune.hpp). alloc_counter.cpp replaces malloc for the check that
# the importance forms no out×in matrix.
deltaw_add_test(train_lora_prune train/test_lora_prune.cpp alloc_counter.cpp)
