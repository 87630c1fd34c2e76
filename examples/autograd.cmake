# Autograd-lite: LoRA training of a frozen tiny transformer.
deltaw_add_example(train_tiny_transformer ${CMAKE_CURRENT_SOURCE_DIR}/train_tiny_transformer.cpp)
