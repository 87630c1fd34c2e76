# Federated LoRA (FedAvg, FFA-LoRA, LoRA-FAIR) on the tiny transformer; over MPI when deltaw::mpi exists.
deltaw_add_example(federated ${CMAKE_CURRENT_SOURCE_DIR}/federated.cpp)
if(TARGET deltaw::mpi)
  target_link_libraries(federated PRIVATE deltaw::mpi)
endif()
