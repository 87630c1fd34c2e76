# Every public header compiles on its own: one `-fsyntax-only` compiler run per header under
# include/deltaw (umbrellas included), with deltaw::deltaw's include directories (Eigen's
# from Eigen3::Eigen), definitions and options. deltaw.hpp no longer brings in training,
# init, linalg and spectral, so a header that leaned on it for a name fails here. The io/
# headers also get nlohmann-json's include directory and io/dlpack.hpp dlpack's; without
# them those headers are skipped, and configure and the test output say so; likewise the
# Fourier headers (deltaw/fourier.hpp, io/peft_fourier.hpp, their backend/cpu/ headers) need
# FFTW3's fftw3.h (DELTAW_HAS_FFTW). Headers with a
# compiled mode (DELTAW_PRECOMPILED) are checked in both modes. GCC and Clang only.
if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  message(STATUS "deltaw: headers_self_contained skipped (needs GCC or Clang for -fsyntax-only)")
  return()
endif()
find_package(nlohmann_json 3.10 QUIET)
find_path(DELTAW_DLPACK_INCLUDE_DIR dlpack/dlpack.h)
if(NOT nlohmann_json_FOUND)
  message(STATUS "deltaw: headers_self_contained skips io.hpp and io/ (nlohmann-json not found)")
endif()
if(NOT DELTAW_DLPACK_INCLUDE_DIR)
  message(STATUS "deltaw: headers_self_contained skips io/dlpack.hpp (dlpack/dlpack.h not found)")
endif()

set(_hdr_std "${CMAKE_CXX20_STANDARD_COMPILE_OPTION}")
if(NOT _hdr_std)
  set(_hdr_std -std=c++20)
endif()
separate_arguments(_hdr_flags NATIVE_COMMAND "${CMAKE_CXX_FLAGS}")
set(_hdr_json_inc "")
if(nlohmann_json_FOUND)
  set(_hdr_json_inc "$<TARGET_PROPERTY:nlohmann_json::nlohmann_json,INTERFACE_INCLUDE_DIRECTORIES>")
endif()
# The properties are evaluated at generate time (build-interface paths, transitive through
# Eigen3::Eigen) into a file the script reads, so that lists and generator expressions
# survive intact.
# OpenMP's interface options depend on the compile language ($<COMPILE_LANGUAGE:CXX>), so
# the file is generated once per enabled language and the script reads the CXX one.
file(GENERATE OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/headers_self_contained/config_$<COMPILE_LANGUAGE>.cmake CONTENT
"set(CXX [==[${CMAKE_CXX_COMPILER}]==])
set(COMPILER_ID [==[${CMAKE_CXX_COMPILER_ID}]==])
set(FLAGS [==[${_hdr_std};${_hdr_flags}]==])
set(INCLUDES [==[$<TARGET_PROPERTY:deltaw,INTERFACE_INCLUDE_DIRECTORIES>;$<TARGET_PROPERTY:Eigen3::Eigen,INTERFACE_INCLUDE_DIRECTORIES>]==])
set(DEFINITIONS [==[$<TARGET_PROPERTY:deltaw,INTERFACE_COMPILE_DEFINITIONS>]==])
set(OPTIONS [==[$<TARGET_PROPERTY:deltaw,INTERFACE_COMPILE_OPTIONS>]==])
set(JSON_FOUND [==[${nlohmann_json_FOUND}]==])
set(JSON_INCLUDES [==[${_hdr_json_inc}]==])
set(DLPACK_INCLUDE [==[${DELTAW_DLPACK_INCLUDE_DIR}]==])
set(FFTW_FOUND [==[${DELTAW_HAS_FFTW}]==])
set(FFTW_INCLUDE [==[${DELTAW_FFTW_INCLUDE_DIR}]==])
set(IMPLICIT_INCLUDES [==[${CMAKE_CXX_IMPLICIT_INCLUDE_DIRECTORIES}]==])
")
# Four shards, each a sequential test (one compiler at a time): CTest runs them beside the
# other tests, where one test running JOBS compilers in lock-step batches held every core and
# waited on the slowest header of each batch.
foreach(_shard RANGE 3)
  add_test(NAME headers_self_contained_${_shard}
    COMMAND ${CMAKE_COMMAND} -DSOURCE_DIR=${PROJECT_SOURCE_DIR}
            -DCONFIG=${CMAKE_CURRENT_BINARY_DIR}/headers_self_contained/config_CXX.cmake
            -DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/headers_self_contained/shard_${_shard} -DJOBS=1
            -DSHARD=${_shard} -DSHARDS=4
            -P ${CMAKE_CURRENT_SOURCE_DIR}/headers/self_contained.cmake)
endforeach()
