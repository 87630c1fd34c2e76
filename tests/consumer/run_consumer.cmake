# cmake -DSOURCE_DIR=... -DWORK_DIR=... -DMODE=find_package|add_subdirectory -P run_consumer.cmake
#
# find_package: deltaw is configured as on the machine (CUDA when nvcc is there), installed,
# and the install tree moved (the package must be relocatable). Then:
#   1. a CPU-only consumer: CUDAToolkit made unfindable (CMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit),
#      find_package(deltaw) without components must succeed; it builds and runs its programs;
#   2. when the package has CUDA: find_package(deltaw COMPONENTS cuda) gives deltaw::cuda, and
#      the same request on a machine without the toolkit fails with a message that says so.
# add_subdirectory: the consumer builds deltaw as a subproject.
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

set(common -G ${GENERATOR} -DCMAKE_BUILD_TYPE=Release)
set(project ${SOURCE_DIR}/tests/consumer/project)
if(MODE STREQUAL "find_package")
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/deltaw-build ${common}
      -DDELTAW_BUILD_TESTS=OFF -DDELTAW_BUILD_BENCHMARKS=OFF -DDELTAW_BUILD_EXAMPLES=OFF -DDELTAW_CUDA=AUTO)
  run(${CMAKE_COMMAND} --build ${WORK_DIR}/deltaw-build)  # deltaw::precompiled, when built
  run(${CMAKE_COMMAND} --install ${WORK_DIR}/deltaw-build --prefix ${WORK_DIR}/prefix)
  file(RENAME ${WORK_DIR}/prefix ${WORK_DIR}/moved-prefix)
  set(prefix -DCMAKE_PREFIX_PATH=${WORK_DIR}/moved-prefix)
  run(${CMAKE_COMMAND} -S ${project} -B ${WORK_DIR}/consumer-build ${common} ${prefix}
      -DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON)
  file(READ ${WORK_DIR}/moved-prefix/share/deltaw/cmake/deltawConfig.cmake _config)
  if(_config MATCHES "set\\(deltaw_HAS_CUDA ON\\)")
    message(STATUS "consumer: the package has CUDA; checking the cuda component")
    run(${CMAKE_COMMAND} -S ${project} -B ${WORK_DIR}/consumer-cuda ${common} ${prefix}
        "-DDELTAW_CONSUMER_COMPONENTS=cuda")
    execute_process(COMMAND ${CMAKE_COMMAND} -S ${project} -B ${WORK_DIR}/consumer-nocuda ${common} ${prefix}
                            "-DDELTAW_CONSUMER_COMPONENTS=cuda" -DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON
                    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
    if(rc EQUAL 0 OR NOT "${out}${err}" MATCHES "CUDA toolkit")
      message(FATAL_ERROR "COMPONENTS cuda without a CUDA toolkit should fail naming it (rc ${rc}):\n${out}\n${err}")
    endif()
  else()
    message(STATUS "consumer: the package was built without CUDA (no nvcc); the cuda component is not checked")
  endif()
  # pkg-config: the same program compiled with the flags of the installed deltaw.pc.
  find_program(PKG_CONFIG pkg-config)
  find_program(CXX NAMES c++ g++ clang++)
  if(PKG_CONFIG AND CXX)
    set(ENV{PKG_CONFIG_PATH} ${WORK_DIR}/moved-prefix/share/pkgconfig)
    execute_process(COMMAND ${PKG_CONFIG} --cflags --libs deltaw RESULT_VARIABLE rc OUTPUT_VARIABLE pcflags
                    ERROR_VARIABLE err OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "pkg-config --cflags --libs deltaw failed: ${err}")
    endif()
    separate_arguments(pcflags UNIX_COMMAND "${pcflags}")
    run(${CXX} -O1 ${project}/main.cpp -o ${WORK_DIR}/consumer-pkgconfig ${pcflags})
    run(${WORK_DIR}/consumer-pkgconfig)
  else()
    message(STATUS "consumer: pkg-config or a C++ compiler driver not found; deltaw.pc not checked")
  endif()
else()
  # deltaw::precompiled is checked by the find_package mode; compiling it again here would
  # only add half a minute to the suite.
  run(${CMAKE_COMMAND} -S ${project} -B ${WORK_DIR}/consumer-build ${common}
      -DDELTAW_SOURCE_DIR=${SOURCE_DIR} -DDELTAW_CUDA=OFF -DDELTAW_BUILD_PRECOMPILED=OFF)
endif()
run(${CMAKE_COMMAND} --build ${WORK_DIR}/consumer-build)
run(${WORK_DIR}/consumer-build/consumer)
if(EXISTS ${WORK_DIR}/consumer-build/consumer_precompiled)
  run(${WORK_DIR}/consumer-build/consumer_precompiled)
endif()
