# SPDX-License-Identifier: MIT
# deltaw's host-device configuration (docs/cuda.md): the CUDA backend's headers compiled by
# the C++ compiler and run on the CPU, against
#   - cuda/host/include: headers named cuda_runtime.h, cublas_v2.h and cusolverDn.h that
#     declare the CUDA runtime, cuBLAS and cuSOLVER entry points deltaw calls, and
#   - deltaw_cuda_host_runtime: their host implementation over OpenBLAS (cuda/host/src),
#   - Thrust (from the CUDA toolkit's CCCL, or any Thrust ≥ 2) with its OpenMP device
#     system (C++ system without OpenMP).
# Included by the top-level CMakeLists.txt with DELTAW_CUDA_HOST set to ON, OFF or AUTO.
# Sets DELTAW_HAS_CUDA_HOST and, when ON, the target deltaw::cuda_host (consumers: the
# host-device tests). Nothing here is installed or exported, and none of it reaches
# deltaw::cuda: the real CUDA build never sees the shim.

set(DELTAW_HAS_CUDA_HOST OFF)
if(NOT DELTAW_CUDA_HOST)  # OFF, or a false value
  return()
endif()

# OpenBLAS through CBLAS. BLA_VENDOR is set for this lookup only.
set(_dw_saved_vendor "${BLA_VENDOR}")
set(BLA_VENDOR OpenBLAS)
find_package(BLAS QUIET)
set(BLA_VENDOR "${_dw_saved_vendor}")
find_path(DELTAW_CBLAS_INCLUDE_DIR cblas.h PATH_SUFFIXES openblas)
# Thrust: the CUDA toolkit's CCCL directory first (CUDA 13 keeps it in include/cccl; a
# CUDA 12 toolkit's include/ also works, the shim's directory comes first on the path).
find_package(CUDAToolkit QUIET)
set(_dw_thrust_hints)
foreach(_d IN LISTS CUDAToolkit_INCLUDE_DIRS)
  list(APPEND _dw_thrust_hints ${_d}/cccl ${_d})
endforeach()
find_path(DELTAW_THRUST_INCLUDE_DIR thrust/version.h
  HINTS ${_dw_thrust_hints} /usr/local/cuda/include/cccl /usr/local/cuda/include)

set(_dw_missing)
if(NOT BLAS_FOUND)
  list(APPEND _dw_missing "OpenBLAS")
endif()
if(NOT DELTAW_CBLAS_INCLUDE_DIR)
  list(APPEND _dw_missing "cblas.h")
endif()
if(NOT DELTAW_THRUST_INCLUDE_DIR)
  list(APPEND _dw_missing "Thrust (thrust/version.h)")
endif()
if(_dw_missing)
  if(DELTAW_CUDA_HOST STREQUAL "AUTO")
    message(STATUS "deltaw: host-device CUDA configuration off (not found: ${_dw_missing})")
    return()
  endif()
  message(FATAL_ERROR "deltaw: DELTAW_CUDA_HOST=ON needs ${_dw_missing}")
endif()
set(DELTAW_HAS_CUDA_HOST ON)

add_library(deltaw_cuda_host_runtime STATIC
  ${CMAKE_CURRENT_LIST_DIR}/src/runtime.cpp
  ${CMAKE_CURRENT_LIST_DIR}/src/cublas.cpp
  ${CMAKE_CURRENT_LIST_DIR}/src/cusolver.cpp)
target_include_directories(deltaw_cuda_host_runtime
  PUBLIC ${CMAKE_CURRENT_LIST_DIR}/include
  PRIVATE ${DELTAW_CBLAS_INCLUDE_DIR})
target_compile_features(deltaw_cuda_host_runtime PUBLIC cxx_std_20)
target_compile_options(deltaw_cuda_host_runtime PRIVATE $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra>)
# Only the core headers (dtype.hpp: bf16/fp16 rounding), not Eigen or OpenMP.
target_include_directories(deltaw_cuda_host_runtime PRIVATE ${PROJECT_SOURCE_DIR}/include)
target_link_libraries(deltaw_cuda_host_runtime PRIVATE BLAS::BLAS)

add_library(deltaw_cuda_host INTERFACE)
add_library(deltaw::cuda_host ALIAS deltaw_cuda_host)
# The shim's include directory comes before Thrust's, which may be a CUDA toolkit's
# include/ holding the real cuda_runtime.h.
target_include_directories(deltaw_cuda_host INTERFACE ${CMAKE_CURRENT_LIST_DIR}/include ${PROJECT_SOURCE_DIR}/cuda/include)
target_include_directories(deltaw_cuda_host SYSTEM INTERFACE ${DELTAW_THRUST_INCLUDE_DIR})
if(DELTAW_HAS_OPENMP)
  set(_dw_thrust_system THRUST_DEVICE_SYSTEM_OMP)
else()
  set(_dw_thrust_system THRUST_DEVICE_SYSTEM_CPP)
endif()
# libcu++ would include the toolkit's cuda_fp16.h and cuda_bf16.h where they are on the path;
# deltaw has its own bf16/fp16 types and the toolkit's headers must not mix with the shim.
target_compile_definitions(deltaw_cuda_host INTERFACE DELTAW_CUDA DELTAW_CUDA_HOST CCCL_DISABLE_FP16_SUPPORT CCCL_DISABLE_BF16_SUPPORT
  THRUST_DEVICE_SYSTEM=${_dw_thrust_system})
target_link_libraries(deltaw_cuda_host INTERFACE deltaw deltaw_cuda_host_runtime)
message(STATUS "deltaw: host-device CUDA configuration on (Thrust ${_dw_thrust_system} from ${DELTAW_THRUST_INCLUDE_DIR}, "
               "BLAS ${BLAS_LIBRARIES})")
