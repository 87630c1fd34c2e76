# Checks of the repository itself rather than of the library's behaviour.
add_test(NAME repo_licence
  COMMAND ${CMAKE_COMMAND} -DSOURCE_DIR=${PROJECT_SOURCE_DIR} -P ${CMAKE_CURRENT_SOURCE_DIR}/repo/licence.cmake)

# Every ```cpp block of README.md and docs/*.md compiles (tests/docs/check_snippets.py), with
# deltaw::deltaw's flags plus nlohmann-json's and dlpack's include directories (the io
# snippets) and, where CUDA is configured, nvcc for the CUDA snippets. Nothing is linked, so
# the snippets see Eigen's decompositions as explicit instantiations (DELTAW_EIGEN_INSTANCES,
# deltaw/core/eigen_dense.hpp) and do not compile them: ~20 s less per snippet that merges.
find_package(Python3 COMPONENTS Interpreter QUIET)
find_package(nlohmann_json 3.10 QUIET)
find_path(DELTAW_DLPACK_INCLUDE_DIR dlpack/dlpack.h)
set(_doc_inc "$<TARGET_PROPERTY:deltaw,INTERFACE_INCLUDE_DIRECTORIES>;$<TARGET_PROPERTY:Eigen3::Eigen,INTERFACE_INCLUDE_DIRECTORIES>")
if(nlohmann_json_FOUND)
  string(APPEND _doc_inc ";$<TARGET_PROPERTY:nlohmann_json::nlohmann_json,INTERFACE_INCLUDE_DIRECTORIES>")
endif()
if(DELTAW_DLPACK_INCLUDE_DIR)
  string(APPEND _doc_inc ";${DELTAW_DLPACK_INCLUDE_DIR}")
endif()
set(_doc_cxx_flags "\"-std=c++20\", \"-DDELTAW_EIGEN_INSTANCES\", \"-I$<JOIN:${_doc_inc},\", \"-I>\", \"-I${PROJECT_SOURCE_DIR}/cuda/include\"")
set(_doc_cuda "")
set(_doc_cuda_flags "")
if(DELTAW_HAS_CUDA)
  set(_doc_cuda "${CMAKE_CUDA_COMPILER}")
  set(_doc_cuda_flags "\"-std=c++20\", \"-DEIGEN_NO_CUDA\", \"-DDELTAW_EIGEN_INSTANCES\", \"-I$<JOIN:${_doc_inc},\", \"-I>\", \"-I${PROJECT_SOURCE_DIR}/cuda/include\"")
endif()
file(GENERATE OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/docs_snippets/config_$<COMPILE_LANGUAGE>.json CONTENT
"{\"cxx\": \"${CMAKE_CXX_COMPILER}\", \"cxx_flags\": [${_doc_cxx_flags}],
  \"cuda_compiler\": \"${_doc_cuda}\", \"cuda_flags\": [${_doc_cuda_flags}],
  \"implicit\": [\"$<JOIN:${CMAKE_CXX_IMPLICIT_INCLUDE_DIRECTORIES},\", \">\"]}
")
cmake_host_system_information(RESULT _doc_jobs QUERY NUMBER_OF_LOGICAL_CORES)
if(Python3_Interpreter_FOUND)
  add_test(NAME docs_snippets
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/docs/check_snippets.py
            --source-dir ${PROJECT_SOURCE_DIR} --config ${CMAKE_CURRENT_BINARY_DIR}/docs_snippets/config_CXX.json
            --work-dir ${CMAKE_CURRENT_BINARY_DIR}/docs_snippets --jobs ${_doc_jobs})
  set_tests_properties(docs_snippets PROPERTIES PROCESSORS ${_doc_jobs})
else()
  message(WARNING "deltaw: python3 not found; docs_snippets (the README's and docs' C++ blocks compile) not registered")
endif()

add_test(NAME repo_doc_paths
  COMMAND ${CMAKE_COMMAND} -DSOURCE_DIR=${PROJECT_SOURCE_DIR} -P ${CMAKE_CURRENT_SOURCE_DIR}/repo/doc_paths.cmake)
