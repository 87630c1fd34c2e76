# cmake -DSOURCE_DIR=... -DWORK_DIR=... -DMODE=find_package|add_subdirectory -P run_consumer.cmake
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
endfunction()

set(common -G ${GENERATOR} -DCMAKE_BUILD_TYPE=Release)
if(MODE STREQUAL "find_package")
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/deltaw-build ${common}
      -DDELTAW_BUILD_TESTS=OFF -DDELTAW_BUILD_BENCHMARKS=OFF -DDELTAW_BUILD_EXAMPLES=OFF -DDELTAW_CUDA=OFF)
  run(${CMAKE_COMMAND} --build ${WORK_DIR}/deltaw-build)  # deltaw::precompiled, when built
  run(${CMAKE_COMMAND} --install ${WORK_DIR}/deltaw-build --prefix ${WORK_DIR}/prefix)
  # Relocatable: the package must work after the install tree is moved.
  file(RENAME ${WORK_DIR}/prefix ${WORK_DIR}/moved-prefix)
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/consumer/project -B ${WORK_DIR}/consumer-build ${common}
      -DCMAKE_PREFIX_PATH=${WORK_DIR}/moved-prefix)
else()
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/consumer/project -B ${WORK_DIR}/consumer-build ${common}
      -DDELTAW_SOURCE_DIR=${SOURCE_DIR} -DDELTAW_CUDA=OFF)
endif()
run(${CMAKE_COMMAND} --build ${WORK_DIR}/consumer-build)
run(${WORK_DIR}/consumer-build/consumer)
if(EXISTS ${WORK_DIR}/consumer-build/consumer_precompiled)
  run(${WORK_DIR}/consumer-build/consumer_precompiled)
endif()
