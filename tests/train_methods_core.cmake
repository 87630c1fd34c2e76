# Training methods, part 1: LoRA+, LoRA-FA, ALLoRA, LoRA-Pro (train/), the Sylvester solver (linalg/).
deltaw_add_test(train_methods_core train/test_methods_core.cpp)
deltaw_add_test(train_lora_pro train/test_lora_pro.cpp)
