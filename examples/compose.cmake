# merge_adapters: PEFT adapters merged with every mode, with the error table. Needs nlohmann-json
# (deltaw/compose.hpp reads PEFT files).
find_package(nlohmann_json 3.10 QUIET)
if(nlohmann_json_FOUND)
  deltaw_add_example(merge_adapters ${CMAKE_CURRENT_SOURCE_DIR}/merge_adapters.cpp)
  target_link_libraries(merge_adapters PRIVATE nlohmann_json::nlohmann_json)
else()
  message(STATUS "deltaw: nlohmann_json not found; example merge_adapters skipped (install nlohmann-json3-dev)")
endif()
