# Composition (issue 18): adapter merges in every PEFT mode, LoRA-LEGO and the federated
# aggregations (FedAvg, FFA, LoRA-FAIR) against dense double references, and the dist/
# drivers in one process (tests/compose/). alloc_counter.cpp for the "no out×in matrix" checks.
deltaw_add_test(compose compose/test_merge.cpp compose/test_lego_fair.cpp compose/test_federated_local.cpp
  alloc_counter.cpp)
# PEFT's own add_weighted_adapter as the reference: the script builds adapters and PEFT's
# merges (DARE masks recorded), runs the skipped doctest case "compose: PEFT fixture" with
# --no-skip, then loads deltaw's merges with PEFT. Skipped (exit 77) without torch / peft.
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  add_test(NAME compose_peft
           COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/compose/check_peft_merge.py
                   --exe $<TARGET_FILE:test_compose> --dir ${CMAKE_CURRENT_BINARY_DIR}/compose_peft)
else()
  add_test(NAME compose_peft COMMAND sh -c "echo 'SKIPPED: python3 not found'; exit 77")
endif()
set_tests_properties(compose_peft PROPERTIES SKIP_RETURN_CODE 77)
