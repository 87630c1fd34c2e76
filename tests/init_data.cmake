# Data-driven initialisations: LoRA-GA, LoRA-SB, LoLDU (residual form), CorDA, incremental PCA, EVA.
deltaw_add_test(init_data init/test_init_data.cpp init/test_init_data_factor.cpp init/test_init_data_eva.cpp)

# PEFT as the second reference (LoRA-GA, incremental PCA, CorDA): deltaw writes, Python
# compares. Skipped (exit 77) when python3, torch or peft is missing.
add_executable(init_peft_writer init/init_peft_writer.cpp)
target_link_libraries(init_peft_writer PRIVATE deltaw::deltaw deltaw::eigen_instances)
target_compile_options(init_peft_writer PRIVATE -Wall -Wextra)
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  add_test(NAME init_data_peft
           COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/init/check_init_peft.py
                   --writer $<TARGET_FILE:init_peft_writer> --dir ${CMAKE_CURRENT_BINARY_DIR}/init_data_peft)
else()
  add_test(NAME init_data_peft COMMAND sh -c "echo 'SKIPPED: python3 not found'; exit 77")
endif()
set_tests_properties(init_data_peft PROPERTIES SKIP_RETURN_CODE 77)
