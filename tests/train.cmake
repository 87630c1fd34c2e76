# Training: the loop and methods (train/), optimiser extensions, full fine-tuning.
deltaw_add_test(train_loop train/test_loop.cpp)
