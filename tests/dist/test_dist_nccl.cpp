// SPDX-License-Identifier: MIT
// dist::nccl_comm (deltaw/dist/nccl.hpp), launched by CTest through mpirun (tests/dist.cmake).
// Built twice: against the host shim of NCCL over MPI (cuda/host: runs in CI without a GPU)
// and, where the CUDA build and NCCL exist, against the real NCCL and CUDA runtime (one rank
// per GPU; skipped, exit 77, without a GPU). MPI only carries the clique id.
//
//   test_dist_nccl equal   federated rounds (LoRA-FAIR) and data-parallel training over the
//                          NCCL communicator equal the single-process run bit for bit;
//                          allreduce_sum and allgather_device of device buffers give the
//                          exact sums / the ranks' values in rank order.
//   test_dist_nccl step    rank 1 calls allgather one step ahead: every rank must throw a
//                          dist_error saying "out of step".
// Prints "DIST-OK" on success.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <deltaw/dist/federated.hpp>
#include <deltaw/dist/nccl.hpp>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace dd = deltaw::dist;

namespace {
int failures = 0;
void expect(bool ok, const std::string& what, int rank) {
  if (!ok) {
    std::fprintf(stderr, "rank %d: FAILED: %s\n", rank, what.c_str());
    ++failures;
  }
}
bool bitwise_equal(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
}

void check_equal(dd::nccl_comm& comm) {
  const int me = comm.rank(), n = comm.size();
  dd::fed_config c;
  c.rounds = 2;
  c.local_steps = 2;
  c.clients = 4;
  const auto dist = dd::run_federated<float>(comm, c, dd::fed_method::fair);
  dd::local_comm local;
  const auto ref = dd::run_federated<float>(local, c, dd::fed_method::fair);
  expect(bitwise_equal(dist.state, ref.state), "LoRA-FAIR over NCCL: final adapter differs from one process", me);
  expect(dist.rounds.back().eval_loss == ref.rounds.back().eval_loss, "LoRA-FAIR over NCCL: loss differs", me);

  dd::dp_config d;
  d.steps = 3;
  const auto dp = dd::run_data_parallel<double>(comm, d, 4);
  const auto dp_ref = dd::run_data_parallel<double>(local, d, 4);
  expect(bitwise_equal(dp, dp_ref), "data-parallel over NCCL: differs from one process over the same shards", me);

  // Device buffers: rank r holds v_i = (r + 1)·(i + 1) + 0.25·i (exact in float and double).
  constexpr std::size_t count = 1000;
  std::vector<double> host(count), want(count), got(count);
  for (std::size_t i = 0; i < count; ++i) {
    host[i] = double(me + 1) * double(i + 1) + 0.25 * double(i);
    want[i] = double(n * (n + 1) / 2) * double(i + 1) + 0.25 * double(i) * n;
  }
  double* dev = nullptr;
  double* all = nullptr;
  expect(cudaMalloc(reinterpret_cast<void**>(&dev), count * sizeof(double)) == cudaSuccess, "cudaMalloc", me);
  expect(cudaMalloc(reinterpret_cast<void**>(&all), count * sizeof(double) * std::size_t(n)) == cudaSuccess, "cudaMalloc",
         me);
  cudaMemcpy(dev, host.data(), count * sizeof(double), cudaMemcpyHostToDevice);
  comm.allgather_device(dev, all, count);
  std::vector<double> gathered(count * std::size_t(n));
  cudaMemcpy(gathered.data(), all, gathered.size() * sizeof(double), cudaMemcpyDeviceToHost);
  bool gather_ok = true;
  for (int r = 0; r < n; ++r)
    for (std::size_t i = 0; i < count; ++i)
      gather_ok &= gathered[std::size_t(r) * count + i] == double(r + 1) * double(i + 1) + 0.25 * double(i);
  expect(gather_ok, "allgather_device: a rank's values are not in its slot", me);
  comm.allreduce_sum(dev, count);
  cudaMemcpy(got.data(), dev, count * sizeof(double), cudaMemcpyDeviceToHost);
  expect(got == want, "allreduce_sum: the device sums differ from the exact sums", me);
  cudaFree(dev);
  cudaFree(all);
  if (me == 0)
    std::printf("NCCL communicator over %d ranks: LoRA-FAIR rounds and data-parallel training bitwise equal to one "
                "process; allgather_device / allreduce_sum of %zu device doubles exact\n",
                n, count);
}
}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const std::string mode = argc > 1 ? argv[1] : "equal";
  int me = 0, n = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < 1) {
    if (me == 0) std::printf("SKIPPED: no CUDA device\n");
    MPI_Finalize();
    return 77;
  }
  cudaSetDevice(me % devices);
  ncclUniqueId id;
  if (me == 0) id = dd::nccl_comm::make_id();
  MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
  int rc = 0;
  {
    dd::nccl_comm comm(id, n, me, nullptr, mode == "equal" ? 120.0 : 10.0);
    if (mode == "equal") {
      check_equal(comm);
    } else if (mode == "step") {
      try {
        (void)comm.allgather(me == 1 ? 5 : 4, {1.0, 2.0});
        expect(false, "a rank one step ahead was not detected", me);
      } catch (const dd::dist_error& e) {
        expect(std::string(e.what()).find("out of step") != std::string::npos,
               std::string("the error does not say 'out of step': ") + e.what(), me);
        if (me == 0) std::printf("rank 0: %s\n", e.what());
      }
    }
    rc = failures ? 1 : 0;
    int worst = rc;
    MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    rc = worst;
    if (me == 0 && rc == 0) std::printf("DIST-OK\n");
  }
  MPI_Finalize();
  return rc;
}
