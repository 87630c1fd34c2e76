# deltaw inside PyTorch (python/deltaw_torch): the C++ extension built against the
# installed torch wheel (torch.utils.cpp_extension, ninja, one job) into
# <build>/torch_ext on the first run and reused after; swapped PEFT layers against PEFT's
# own outputs and gradients. Skipped (exit 77, reason printed) without python3, torch,
# peft, ninja or a compiler, so it costs CI (no torch) nothing.
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  add_test(NAME torch_peft_swap
           COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/../python/tests/check_peft_swap.py
                   --build-dir ${CMAKE_BINARY_DIR}/torch_ext)
else()
  add_test(NAME torch_peft_swap COMMAND sh -c "echo 'SKIPPED: python3 not found'; exit 77")
endif()
set_tests_properties(torch_peft_swap PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 900)
