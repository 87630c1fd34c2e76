# cmake -DSOURCE_DIR=<deltaw> -DCONFIG=<config.cmake> -DWORK_DIR=<dir> [-DJOBS=n] [-DSHARD=i -DSHARDS=n]
#       -P self_contained.cmake
# Compiles `#include <deltaw/X.hpp>` alone, with -fsyntax-only, for every header X under
# include/deltaw (again with DELTAW_PRECOMPILED for those that have a compiled mode); fails
# listing the headers that do not compile, with their diagnostics.
# CONFIG (written by tests/headers.cmake) sets CXX, FLAGS, INCLUDES, DEFINITIONS, OPTIONS,
# JSON_FOUND, JSON_INCLUDES, DLPACK_INCLUDE, FFTW_FOUND, FFTW_INCLUDE, COMPILER_ID and IMPLICIT_INCLUDES (the compiler's own
# directories, left out of -I as CMake does).
cmake_minimum_required(VERSION 3.25)
include(${CONFIG})
if(NOT JOBS OR JOBS LESS 1)
  set(JOBS 1)
endif()
string(TIMESTAMP t0 "%s")

# DELTAW_EIGEN_INSTANCES: nothing is linked, so Eigen's decompositions are taken as explicit
# instantiations (deltaw/core/eigen_dense.hpp) instead of being compiled in every check that
# reaches one from a non-template function (about 1.5 s less for deltaw/compose/merge.hpp).
set(common ${FLAGS} -fsyntax-only ${OPTIONS} -DDELTAW_EIGEN_INSTANCES)
foreach(d IN LISTS DEFINITIONS)
  list(APPEND common -D${d})
endforeach()
function(include_flags out)
  set(flags "")
  foreach(dir IN LISTS ARGN)
    if(dir AND NOT dir IN_LIST IMPLICIT_INCLUDES AND NOT "-I${dir}" IN_LIST flags)
      list(APPEND flags -I${dir})
    endif()
  endforeach()
  set(${out} "${flags}" PARENT_SCOPE)
endfunction()
include_flags(inc ${INCLUDES})
list(APPEND common ${inc})
list(FILTER common EXCLUDE REGEX "^$")

# Eigen/Dense (with deltaw/core/eigen_dense.hpp's declarations) is parsed once into a
# precompiled header (GCC) that every check pre-includes:
# it is most of each check's time (1.1 s of CPU for deltaw.hpp alone, 0.6 s with it).
# Every deltaw header reaches Eigen through its own includes anyway; what this no longer
# catches is a header that names Eigen without including any of it.
set(pch_flag "")
if(COMPILER_ID STREQUAL "GNU")
  file(MAKE_DIRECTORY ${WORK_DIR}/pch)
  file(WRITE ${WORK_DIR}/pch/eigen_dense.hpp "#include <deltaw/core/eigen_dense.hpp>\n")
  set(pch_build ${common})
  list(REMOVE_ITEM pch_build -fsyntax-only)
  execute_process(COMMAND ${CXX} ${pch_build} -x c++-header ${WORK_DIR}/pch/eigen_dense.hpp
                          -o ${WORK_DIR}/pch/eigen_dense.hpp.gch
                  RESULT_VARIABLE pch_rc OUTPUT_QUIET ERROR_VARIABLE pch_err)
  if(pch_rc EQUAL 0)
    set(pch_flag -include ${WORK_DIR}/pch/eigen_dense.hpp)
  else()
    message(STATUS "precompiled Eigen header not built (checks parse Eigen each time): ${pch_err}")
  endif()
endif()

file(GLOB_RECURSE headers RELATIVE ${SOURCE_DIR}/include ${SOURCE_DIR}/include/deltaw/*.hpp)
list(SORT headers)
# SHARD of SHARDS (0-based): every SHARDS-th header from the SHARD-th, so that CTest schedules
# the shards beside the other tests instead of one test holding every core.
if(SHARDS GREATER 1)
  set(mine "")
  set(k 0)
  foreach(h IN LISTS headers)
    math(EXPR r "${k} % ${SHARDS}")
    if(r EQUAL SHARD)
      list(APPEND mine "${h}")
    endif()
    math(EXPR k "${k} + 1")
  endforeach()
  set(headers ${mine})
endif()
file(REMOVE_RECURSE ${WORK_DIR}/src)
set(checked "")
set(skipped "")
set(cmds "")
foreach(h IN LISTS headers)
  set(extra "")
  # The Fourier types include <fftw3.h> (deltaw::fft): checked only where FFTW was found.
  if(h MATCHES "^deltaw/(fourier\\.hpp|io/peft_fourier\\.hpp|backend/cpu/(fftw|fourierft|fourierft_vjp|c3a|c3a_vjp)\\.hpp)$")
    if(NOT FFTW_FOUND)
      list(APPEND skipped "${h} (FFTW3 not found: DELTAW_FFTW)")
      continue()
    endif()
    include_flags(extra ${FFTW_INCLUDE})
  endif()
  if(h STREQUAL "deltaw/io/dlpack.hpp")
    # DLPack views need dlpack/dlpack.h, not nlohmann-json.
    if(NOT DLPACK_INCLUDE)
      list(APPEND skipped "${h} (dlpack/dlpack.h not found)")
      continue()
    endif()
    include_flags(extra ${DLPACK_INCLUDE})
  elseif(h STREQUAL "deltaw/io.hpp" OR h MATCHES "^deltaw/io/" OR h STREQUAL "deltaw/serve.hpp" OR h STREQUAL "deltaw/serve/pool.hpp"
         OR h STREQUAL "deltaw/models.hpp" OR h MATCHES "^deltaw/models/")
    if(NOT JSON_FOUND)
      list(APPEND skipped "${h} (nlohmann-json not found)")
      continue()
    endif()
    include_flags(json_extra ${JSON_INCLUDES} ${DLPACK_INCLUDE})  # io.hpp takes dlpack.h when it is there
    list(APPEND extra ${json_extra})
  endif()
  string(REPLACE "/" "__" stem "${h}")
  set(src ${WORK_DIR}/src/${stem}.cpp)
  file(WRITE ${src} "#include <${h}>\n")
  list(APPEND checked "${h}")
  # One command line per check, its arguments joined by '|' (no header path holds one).
  string(REPLACE ";" "|" cmd "${CXX};${common};${pch_flag};${extra};${src}")
  list(APPEND cmds "${cmd}")
  # Headers with a compiled mode (core/precompiled.hpp) are checked in it too.
  file(STRINGS ${SOURCE_DIR}/include/${h} pc REGEX "DELTAW_PRECOMPILED" LIMIT_COUNT 1)
  if(pc)
    list(APPEND checked "${h} (DELTAW_PRECOMPILED)")
    string(REPLACE ";" "|" cmd "${CXX};${common};${pch_flag};-DDELTAW_PRECOMPILED;${extra};${src}")
    list(APPEND cmds "${cmd}")
  endif()
endforeach()

# JOBS compilers at a time: execute_process runs its COMMANDs concurrently.
set(failed "")
list(LENGTH checked n)
set(i 0)
while(i LESS n)
  set(batch "")
  set(names "")
  set(j ${i})
  math(EXPR end "${i} + ${JOBS}")
  while(j LESS end AND j LESS n)
    list(GET cmds ${j} cmd)
    string(REPLACE "|" ";" cmd "${cmd}")
    list(APPEND batch COMMAND ${cmd})
    list(GET checked ${j} h)
    list(APPEND names "${h}")
    math(EXPR j "${j} + 1")
  endwhile()
  execute_process(${batch} RESULTS_VARIABLE rcs OUTPUT_QUIET ERROR_QUIET)
  foreach(h rc IN ZIP_LISTS names rcs)
    if(NOT rc EQUAL 0)
      list(APPEND failed "${h}")
    endif()
  endforeach()
  set(i ${j})
endwhile()

string(TIMESTAMP t1 "%s")
math(EXPR secs "${t1} - ${t0}")
foreach(s IN LISTS skipped)
  message(STATUS "skipped: ${s}")
endforeach()
if(failed)
  foreach(h IN LISTS failed)
    list(FIND checked "${h}" k)
    list(GET cmds ${k} cmd)
    string(REPLACE "|" ";" cmd "${cmd}")
    execute_process(COMMAND ${cmd} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
    string(SUBSTRING "${out}${err}" 0 4000 diag)
    message(NOTICE "=== ${h} does not compile on its own:\n${diag}")
  endforeach()
  list(LENGTH failed nf)
  string(REPLACE ";" ", " list "${failed}")
  message(FATAL_ERROR "${nf} of ${n} checks failed (${secs} s): ${list}")
endif()
list(LENGTH skipped ns)
list(FILTER checked EXCLUDE REGEX " ")
list(LENGTH checked nh)
math(EXPR npc "${n} - ${nh}")
message(STATUS "${nh} headers compile on their own (${npc} also with DELTAW_PRECOMPILED), ${ns} skipped "
               "(${secs} s, ${JOBS} at a time)")
