// SPDX-License-Identifier: MIT
// An NCCL communicator for the GPU path of dist/ (link deltaw::nccl). Empty when <nccl.h> is
// not on the include path.
//
//   nccl_comm(id, nranks, rank, stream, timeout_s)   one rank of an NCCL clique (the id from
//                                                    rank 0's make_id(), shared e.g. by MPI)
//   allgather(step, host vector)   the communicator interface of dist/federated.hpp and
//                                  dist/eva.hpp: run_federated, run_data_parallel and eva_init
//                                  run over NCCL unchanged (staged through device buffers)
//   allreduce_sum(device ptr, n)   in-place sum of a device-resident buffer (float, double):
//                                  adapter gradients that live on the GPU
//   allgather_device(send, recv, n)   every rank's n device values into recv [size·n]
//
// Every collective is enqueued on the communicator's stream and waited for against a
// deadline: the wait polls cudaStreamQuery and ncclCommGetAsyncError, and a peer that stalls
// or an NCCL error makes the call abort the communicator (ncclCommAbort) and throw
// dist_error naming the rank, the operation and the cause, instead of blocking forever. A
// dist_error leaves the communicator unusable. allgather() also checks that every rank is at
// the same step and that the payload is finite, as mpi_comm does.
//
// Reduction order: allgather() hands every rank all vectors and the callers sum in rank
// order (bitwise reproducible, as over MPI); allreduce_sum() leaves the order to NCCL (ring
// or tree), so its sums agree to rounding only.
#pragma once
#if __has_include(<nccl.h>)

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "error.hpp"

DELTAW_NAMESPACE_BEGIN
namespace dist {

class nccl_comm {
 public:
  /// A fresh clique id (call on one rank and send its bytes to the others).
  static ncclUniqueId make_id() {
    ncclUniqueId id;
    check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId", -1);
    return id;
  }

  /// Joins the clique `id` as `rank` of `nranks` (blocks until every rank has joined, as
  /// ncclCommInitRank does). Collectives run on `stream` (0: the legacy default stream).
  nccl_comm(const ncclUniqueId& id, int nranks, int rank, cudaStream_t stream = nullptr, double timeout_s = 60)
      : stream_(stream), timeout_(timeout_s), rank_(rank), size_(nranks) {
    if (nranks < 1 || rank < 0 || rank >= nranks)
      throw argument_error("deltaw::dist::nccl_comm: rank " + std::to_string(rank) + " of " + std::to_string(nranks));
    check_nccl(ncclCommInitRank(&comm_, nranks, id, rank), "ncclCommInitRank", rank);
  }
  nccl_comm(const nccl_comm&) = delete;
  nccl_comm& operator=(const nccl_comm&) = delete;
  ~nccl_comm() {
    if (dev_) cudaFree(dev_);
    if (comm_) ncclCommDestroy(comm_);
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  double timeout() const { return timeout_; }
  cudaStream_t stream() const { return stream_; }
  ncclComm_t native() const { return comm_; }

  /// Every rank's vector (element i from rank i), through NCCL: first each rank's (step,
  /// count), then the payloads padded to the longest. Throws dist_error when a rank is at
  /// another step, a value is not finite, or the exchange does not finish within the timeout.
  std::vector<std::vector<double>> allgather(std::uint64_t step, const std::vector<double>& mine) {
    const std::size_t n = std::size_t(size_);
    // Header: (step, count) per rank, as doubles (exact below 2⁵³).
    const double head[2] = {double(step), double(mine.size())};
    std::vector<double> heads(2 * n);
    exchange(head, 2, heads.data(), step, "allgather (header)");
    std::size_t longest = 0;
    for (std::size_t r = 0; r < n; ++r) {
      if (heads[2 * r] != double(step))
        throw dist_error(who(step) + "rank " + std::to_string(r) + " is at step " + std::to_string(heads[2 * r]) +
                         " (out of step)");
      longest = std::max(longest, std::size_t(heads[2 * r + 1]));
    }
    std::vector<double> send(longest, 0.0), all(longest * n);
    std::copy(mine.begin(), mine.end(), send.begin());
    if (longest) exchange(send.data(), longest, all.data(), step, "allgather (payload)");
    std::vector<std::vector<double>> out(n);
    for (std::size_t r = 0; r < n; ++r) {
      const auto* p = all.data() + r * longest;
      out[r].assign(p, p + std::size_t(heads[2 * r + 1]));
      for (double x : out[r])
        if (!std::isfinite(x)) throw dist_error(who(step) + "rank " + std::to_string(r) + " sent a non-finite value");
    }
    return out;
  }

  /// In-place sum over the ranks of `count` values at device pointer `data` (float or double).
  template <class T>
  void allreduce_sum(T* data, std::size_t count) {
    check_nccl(ncclAllReduce(data, data, count, nccl_type<T>(), ncclSum, comm_, stream_), "ncclAllReduce", rank_);
    wait("allreduce_sum", 0);
  }

  /// Every rank's `count` device values at `send` into device `recv` [size·count], rank order.
  template <class T>
  void allgather_device(const T* send, T* recv, std::size_t count) {
    check_nccl(ncclAllGather(send, recv, count, nccl_type<T>(), comm_, stream_), "ncclAllGather", rank_);
    wait("allgather_device", 0);
  }

 private:
  template <class T>
  static constexpr ncclDataType_t nccl_type() {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "deltaw::dist::nccl_comm: float or double buffers");
    return std::is_same_v<T, float> ? ncclFloat32 : ncclFloat64;
  }

  std::string who(std::uint64_t step) const {
    return "deltaw::dist::nccl_comm::allgather: rank " + std::to_string(rank_) + ", step " + std::to_string(step) + ": ";
  }

  // `count` host doubles from every rank into host `out` [size·count], staged through one
  // device buffer that grows as needed.
  void exchange(const double* in, std::size_t count, double* out, std::uint64_t step, const char* what) {
    const std::size_t need = count * (std::size_t(size_) + 1) * sizeof(double);
    if (need > dev_bytes_) {
      if (dev_) cudaFree(dev_);
      dev_ = nullptr;
      dev_bytes_ = 0;
      check_cuda(cudaMalloc(&dev_, need), "cudaMalloc");
      dev_bytes_ = need;
    }
    auto* send = static_cast<double*>(dev_);
    auto* recv = send + count;
    check_cuda(cudaMemcpyAsync(send, in, count * sizeof(double), cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
    check_nccl(ncclAllGather(send, recv, count, ncclFloat64, comm_, stream_), "ncclAllGather", rank_);
    check_cuda(cudaMemcpyAsync(out, recv, count * std::size_t(size_) * sizeof(double), cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpyAsync");
    wait(what, step);
  }

  // Waits for the stream against the deadline, watching NCCL's asynchronous error.
  void wait(const char* what, std::uint64_t step) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_);
    for (;;) {
      const cudaError_t q = cudaStreamQuery(stream_);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) {
        abort_comm();
        throw dist_error("deltaw::dist::nccl_comm::" + std::string(what) + ": rank " + std::to_string(rank_) +
                         ": CUDA error " + cudaGetErrorString(q));
      }
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess && async != ncclInProgress) {
        abort_comm();
        throw dist_error("deltaw::dist::nccl_comm::" + std::string(what) + ": rank " + std::to_string(rank_) +
                         ": NCCL error " + ncclGetErrorString(async) + " (a peer failed)");
      }
      if (std::chrono::steady_clock::now() > deadline) {
        abort_comm();
        throw dist_error("deltaw::dist::nccl_comm::" + std::string(what) + ": rank " + std::to_string(rank_) +
                         " waited more than " + std::to_string(timeout_) + " s at step " + std::to_string(step) +
                         " (a peer died, stalled or left the exchange); the communicator was aborted");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }

  void abort_comm() {
    if (comm_) ncclCommAbort(comm_);
    comm_ = nullptr;
  }

  static void check_nccl(ncclResult_t r, const char* what, int rank) {
    if (r != ncclSuccess && r != ncclInProgress)
      throw dist_error(std::string("deltaw::dist::nccl_comm: ") + what + " failed on rank " + std::to_string(rank) + ": " +
                       ncclGetErrorString(r));
  }
  void check_cuda(cudaError_t e, const char* what) const {
    if (e != cudaSuccess)
      throw dist_error(std::string("deltaw::dist::nccl_comm: ") + what + " failed on rank " + std::to_string(rank_) +
                       ": " + cudaGetErrorString(e));
  }

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  double timeout_;
  int rank_, size_;
  void* dev_ = nullptr;
  std::size_t dev_bytes_ = 0;
};

}  // namespace dist
DELTAW_NAMESPACE_END
#endif
