// SPDX-License-Identifier: MIT
// The host shim of the NCCL entry points in cuda/host/include/nccl.h, over MPI_COMM_WORLD.
// Buffers must be the shim's "device" allocations (cudaMalloc) or host memory; the calls
// are synchronous (the stream is checked, then ignored). MPI errors come back as
// ncclSystemError; the communicator's asynchronous error stays ncclSuccess.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#include <mpi.h>
#include <nccl.h>

#include <cstring>
#include <random>

struct ncclComm {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0, size = 1;
};

namespace {

bool mpi_type(ncclDataType_t t, MPI_Datatype* out) {
  switch (t) {
    case ncclInt8: *out = MPI_INT8_T; return true;
    case ncclUint8: *out = MPI_UINT8_T; return true;
    case ncclInt32: *out = MPI_INT32_T; return true;
    case ncclUint32: *out = MPI_UINT32_T; return true;
    case ncclInt64: *out = MPI_INT64_T; return true;
    case ncclUint64: *out = MPI_UINT64_T; return true;
    case ncclFloat32: *out = MPI_FLOAT; return true;
    case ncclFloat64: *out = MPI_DOUBLE; return true;
    default: return false;  // fp16 / bf16: not in the shim
  }
}

bool mpi_op(ncclRedOp_t op, MPI_Op* out) {
  switch (op) {
    case ncclSum: *out = MPI_SUM; return true;
    case ncclProd: *out = MPI_PROD; return true;
    case ncclMax: *out = MPI_MAX; return true;
    case ncclMin: *out = MPI_MIN; return true;
    default: return false;  // ncclAvg: not in the shim
  }
}

}  // namespace

extern "C" {

ncclResult_t ncclGetVersion(int* version) {
  if (!version) return ncclInvalidArgument;
  *version = NCCL_MAJOR * 10000 + NCCL_MINOR * 100 + NCCL_PATCH;
  return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  if (!id) return ncclInvalidArgument;
  std::random_device rd;
  for (auto& c : id->internal) c = char(rd());
  return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId, int rank) {
  if (!comm) return ncclInvalidArgument;
  int init = 0;
  MPI_Initialized(&init);
  if (!init) return ncclInvalidUsage;
  auto* c = new ncclComm;
  MPI_Comm_size(MPI_COMM_WORLD, &c->size);
  MPI_Comm_rank(MPI_COMM_WORLD, &c->rank);
  if (nranks != c->size || rank != c->rank || MPI_Comm_dup(MPI_COMM_WORLD, &c->comm) != MPI_SUCCESS) {
    delete c;
    return ncclInvalidArgument;
  }
  MPI_Comm_set_errhandler(c->comm, MPI_ERRORS_RETURN);
  *comm = c;
  return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (!comm) return ncclInvalidArgument;
  MPI_Comm_free(&comm->comm);
  delete comm;
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  if (!comm) return ncclInvalidArgument;
  delete comm;  // the communicator's MPI handle is left to MPI_Finalize / MPI_Abort
  return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
  if (!comm || !count) return ncclInvalidArgument;
  *count = comm->size;
  return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
  if (!comm || !rank) return ncclInvalidArgument;
  *rank = comm->rank;
  return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* asyncError) {
  if (!comm || !asyncError) return ncclInvalidArgument;
  *asyncError = ncclSuccess;
  return ncclSuccess;
}

const char* ncclGetErrorString(ncclResult_t r) {
  switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error (the host shim's MPI call failed)";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
  }
}

ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, std::size_t count, ncclDataType_t datatype,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  MPI_Datatype t;
  MPI_Op o;
  if (!comm || !mpi_type(datatype, &t) || !mpi_op(op, &o) || count > std::size_t(1) << 30 ||
      (count && (!sendbuff || !recvbuff)))
    return ncclInvalidArgument;
  if (cudaStreamQuery(stream) != cudaSuccess) return ncclInvalidArgument;
  const void* in = sendbuff == recvbuff ? MPI_IN_PLACE : sendbuff;
  return MPI_Allreduce(in, recvbuff, int(count), t, o, comm->comm) == MPI_SUCCESS ? ncclSuccess : ncclSystemError;
}

ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, std::size_t sendcount, ncclDataType_t datatype,
                           ncclComm_t comm, cudaStream_t stream) {
  MPI_Datatype t;
  if (!comm || !mpi_type(datatype, &t) || sendcount > std::size_t(1) << 30 || (sendcount && (!sendbuff || !recvbuff)))
    return ncclInvalidArgument;
  if (cudaStreamQuery(stream) != cudaSuccess) return ncclInvalidArgument;
  int bytes = 0;
  MPI_Type_size(t, &bytes);
  // NCCL allows sendbuff == recvbuff + rank·sendcount (in place).
  const void* in = static_cast<const char*>(recvbuff) + std::size_t(comm->rank) * sendcount * std::size_t(bytes) == sendbuff
                       ? MPI_IN_PLACE
                       : sendbuff;
  return MPI_Allgather(in, int(sendcount), t, recvbuff, int(sendcount), t, comm->comm) == MPI_SUCCESS ? ncclSuccess
                                                                                                      : ncclSystemError;
}

}  // extern "C"
