# Multi-adapter serving (deltaw/serve.hpp, issue 17): heterogeneous batches, masked
# composition and its VJP, the adapter pool. One executable, `test_serve`; the pool's tests
# need nlohmann-json (deltaw/io.hpp) and join it when it is found.
find_package(nlohmann_json 3.10 QUIET)
# alloc_counter.cpp replaces malloc for the "no out × in allocation" check.
set(_serve_sources serve/test_batch.cpp serve/test_masked.cpp alloc_counter.cpp)
if(nlohmann_json_FOUND)
  list(APPEND _serve_sources serve/test_pool.cpp serve/test_pool_wait.cpp)
else()
  message(STATUS "deltaw: nlohmann_json not found; the adapter pool's tests are left out of test_serve")
endif()
deltaw_add_test(serve ${_serve_sources})
if(nlohmann_json_FOUND)
  target_link_libraries(test_serve PRIVATE nlohmann_json::nlohmann_json)
  target_compile_definitions(test_serve PRIVATE DELTAW_IO_FIXTURES="${CMAKE_CURRENT_SOURCE_DIR}/fixtures")
endif()
