# Training across processes (issue 18): federated rounds and data-parallel adapter training
# over MPI against the single-process simulation, launched by mpirun with 2 and 4 ranks
# (tests/dist/test_dist_mpi.cpp); a rank that sends malformed data, stalls or dies makes the
# job fail with a clear error (never hang: CTest TIMEOUT). Needs deltaw::mpi (DELTAW_MPI).
if(NOT TARGET deltaw::mpi)
  message(STATUS "deltaw: MPI tests skipped (no MPI; DELTAW_MPI=${DELTAW_MPI})")
  return()
endif()
add_executable(test_dist_mpi dist/test_dist_mpi.cpp)
target_link_libraries(test_dist_mpi PRIVATE deltaw::mpi deltaw::eigen_instances)
target_compile_options(test_dist_mpi PRIVATE -Wall -Wextra)
# mpirun refuses root without these (CI containers run as root); harmless otherwise.
set(_dist_env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1)
set(_dist_run ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG})
add_test(NAME dist_mpi_np2 COMMAND ${_dist_run} 2 --oversubscribe $<TARGET_FILE:test_dist_mpi> equal)
add_test(NAME dist_mpi_np4 COMMAND ${_dist_run} 4 --oversubscribe $<TARGET_FILE:test_dist_mpi> equal)
set_tests_properties(dist_mpi_np2 dist_mpi_np4 PROPERTIES ENVIRONMENT "${_dist_env}" TIMEOUT 300
                     PASS_REGULAR_EXPRESSION "DIST-OK" FAIL_REGULAR_EXPRESSION "FAILED")
add_test(NAME dist_mpi_malformed COMMAND ${_dist_run} 2 --oversubscribe $<TARGET_FILE:test_dist_mpi> malformed)
set_tests_properties(dist_mpi_malformed PROPERTIES PASS_REGULAR_EXPRESSION "DIST-ERROR[^\n]*checksum")
add_test(NAME dist_mpi_stall COMMAND ${_dist_run} 2 --oversubscribe $<TARGET_FILE:test_dist_mpi> stall)
set_tests_properties(dist_mpi_stall PROPERTIES PASS_REGULAR_EXPRESSION "DIST-ERROR[^\n]*within 3")
add_test(NAME dist_mpi_die COMMAND ${_dist_run} 2 --oversubscribe $<TARGET_FILE:test_dist_mpi> die)
set_tests_properties(dist_mpi_die PROPERTIES PASS_REGULAR_EXPRESSION "DIST-ERROR|exited|non-zero status")
set_tests_properties(dist_mpi_malformed dist_mpi_stall dist_mpi_die PROPERTIES ENVIRONMENT "${_dist_env}" TIMEOUT 60
                     FAIL_REGULAR_EXPRESSION "DIST-OK")

# The NCCL communicator (deltaw/dist/nccl.hpp, tests/dist/test_dist_nccl.cpp): against the host
# shim of NCCL over MPI (cuda/host/src/nccl.cpp) in the host-device configuration, so that it
# runs here without a GPU; and, with the CUDA build and NCCL (deltaw::nccl), against the real
# NCCL: compiled in CI, run where a GPU is (exit 77, skipped, without one).
if(DELTAW_HAS_CUDA_HOST)
  add_library(deltaw_cuda_host_nccl STATIC ${PROJECT_SOURCE_DIR}/cuda/host/src/nccl.cpp)
  target_link_libraries(deltaw_cuda_host_nccl PUBLIC deltaw::cuda_host MPI::MPI_CXX)
  add_executable(test_dist_nccl_host dist/test_dist_nccl.cpp)
  target_link_libraries(test_dist_nccl_host PRIVATE deltaw::mpi deltaw_cuda_host_nccl deltaw::eigen_instances)
  target_compile_options(test_dist_nccl_host PRIVATE -Wall -Wextra)
  add_test(NAME dist_nccl_host_np2 COMMAND ${_dist_run} 2 --oversubscribe $<TARGET_FILE:test_dist_nccl_host> equal)
  add_test(NAME dist_nccl_host_step COMMAND ${_dist_run} 2 --oversubscribe $<TARGET_FILE:test_dist_nccl_host> step)
  set_tests_properties(dist_nccl_host_np2 dist_nccl_host_step PROPERTIES ENVIRONMENT "${_dist_env}" TIMEOUT 300
                       PASS_REGULAR_EXPRESSION "DIST-OK" FAIL_REGULAR_EXPRESSION "FAILED")
endif()
if(TARGET deltaw::nccl)
  # Needs a GPU to run (exit 77 without one), so the default build leaves it out (CI time: the
  # same source is compiled and run against the shim above); tools/cuda_check.sh builds it.
  add_executable(test_dist_nccl_cuda EXCLUDE_FROM_ALL dist/test_dist_nccl.cpp)
  target_link_libraries(test_dist_nccl_cuda PRIVATE deltaw::mpi deltaw::nccl deltaw::eigen_instances)
  add_test(NAME dist_nccl_cuda
           COMMAND sh -c "if [ ! -x \"$0\" ]; then echo 'SKIPPED: test_dist_nccl_cuda is built by tools/cuda_check.sh (a GPU run), not by the default build'; exit 77; fi; exec \"$@\""
                   $<TARGET_FILE:test_dist_nccl_cuda> ${_dist_run} 1 $<TARGET_FILE:test_dist_nccl_cuda> equal)
  set_tests_properties(dist_nccl_cuda PROPERTIES ENVIRONMENT "${_dist_env}" TIMEOUT 300 SKIP_RETURN_CODE 77 LABELS cuda)
endif()
