# bench_io: a 1 GiB safetensors file mapped versus read, to the first usable view and
# through every byte (docs/formats.md, "Loading cost"). Needs nlohmann-json (io headers).
find_package(nlohmann_json 3.10 QUIET)
if(nlohmann_json_FOUND)
  deltaw_add_benchmark(bench_io ${CMAKE_CURRENT_SOURCE_DIR}/bench_io.cpp)
  target_link_libraries(bench_io PRIVATE nlohmann_json::nlohmann_json)
else()
  message(STATUS "deltaw: nlohmann_json not found; bench_io is not built")
endif()
