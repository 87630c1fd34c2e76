# Eigen's product against OpenBLAS's on this machine, to choose DELTAW_USE_BLAS (README).
set(BLA_VENDOR OpenBLAS)
find_package(BLAS QUIET)
if(BLAS_FOUND AND NOT DELTAW_USE_BLAS)
  deltaw_add_example(which_gemm ${CMAKE_CURRENT_SOURCE_DIR}/which_gemm.cpp)
  target_link_libraries(which_gemm PRIVATE BLAS::BLAS)
elseif(NOT BLAS_FOUND)
  message(STATUS "deltaw: OpenBLAS not found; examples/which_gemm not built")
endif()
