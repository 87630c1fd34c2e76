# serve_adapters: a stream of requests over an adapter pool smaller than its adapters
# (deltaw/serve/pool.hpp). Needs nlohmann-json (the pool reads PEFT files).
find_package(nlohmann_json 3.10 QUIET)
if(nlohmann_json_FOUND)
  deltaw_add_example(serve_adapters ${CMAKE_CURRENT_SOURCE_DIR}/serve_adapters.cpp)
  target_link_libraries(serve_adapters PRIVATE nlohmann_json::nlohmann_json)
else()
  message(STATUS "deltaw: nlohmann_json not found; example serve_adapters skipped (install nlohmann-json3-dev)")
endif()
