# The training methods side by side on one frozen tiny transformer (README's main demo).
deltaw_add_example(compare_methods ${CMAKE_CURRENT_SOURCE_DIR}/compare_methods.cpp)
