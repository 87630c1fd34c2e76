// SPDX-License-Identifier: MIT
// An MPI communicator for dist/federated.hpp (link deltaw::mpi). Empty when <mpi.h> is not
// on the include path.
//
// allgather() is built from point-to-point messages polled against a deadline rather than
// from MPI_Allgather, so that a rank that stops (crashed, stuck, or sending garbage) makes
// the others fail with a dist_error naming the rank, the step and the fault within
// `timeout_s`, instead of waiting forever inside a collective. Each message carries a header
// (magic, version, step, sender, count, FNV-1a checksum of the payload) that the receiver
// checks, and the payload must be finite. A dist_error should end the job: catch it in main,
// print it and call abort_all() (MPI_Abort), which also stops the ranks still waiting.
#pragma once

#if __has_include(<mpi.h>)
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1  // the C API only (no deprecated C++ bindings)
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "error.hpp"

DELTAW_NAMESPACE_BEGIN
namespace dist {


struct wire_header {
  std::uint32_t magic = 0x4c465744u;  // "DWFL"
  std::uint32_t version = 1;
  std::uint64_t step = 0;
  std::uint32_t sender = 0;
  std::uint32_t reserved = 0;
  std::uint64_t count = 0;     ///< doubles that follow
  std::uint64_t checksum = 0;  ///< FNV-1a of the payload bytes
};

inline std::uint64_t fnv1a(const void* p, std::size_t n) {
  std::uint64_t h = 1469598103934665603ull;
  const auto* b = static_cast<const unsigned char*>(p);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

class mpi_comm {
 public:
  explicit mpi_comm(MPI_Comm c = MPI_COMM_WORLD, double timeout_s = 60) : comm_(c), timeout_(timeout_s) {
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  }
  int rank() const { return rank_; }
  int size() const { return size_; }
  double timeout() const { return timeout_; }

  /// Test hook: transforms the bytes of every outgoing message (to send malformed data).
  void (*corrupt_outgoing)(std::vector<unsigned char>&) = nullptr;

  /// Every rank's vector (element i from rank i). Throws dist_error when a peer sends
  /// nothing within the timeout or a message that fails the checks.
  std::vector<std::vector<double>> allgather(std::uint64_t step, const std::vector<double>& mine) {
    const int tag = int(step % 30000);
    std::vector<unsigned char> msg(sizeof(wire_header) + mine.size() * sizeof(double));
    wire_header h;
    h.step = step;
    h.sender = std::uint32_t(rank_);
    h.count = mine.size();
    h.checksum = fnv1a(mine.data(), mine.size() * sizeof(double));
    std::memcpy(msg.data(), &h, sizeof h);
    if (!mine.empty()) std::memcpy(msg.data() + sizeof h, mine.data(), mine.size() * sizeof(double));
    if (corrupt_outgoing) corrupt_outgoing(msg);
    std::vector<MPI_Request> sends;
    for (int r = 0; r < size_; ++r)
      if (r != rank_) {
        sends.emplace_back();
        check(MPI_Isend(msg.data(), int(msg.size()), MPI_BYTE, r, tag, comm_, &sends.back()), "MPI_Isend");
      }
    std::vector<std::vector<double>> all(static_cast<std::size_t>(size_));
    all[std::size_t(rank_)] = mine;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_);
    std::vector<bool> got(std::size_t(size_), false);
    got[std::size_t(rank_)] = true;
    int missing = size_ - 1;
    while (missing > 0) {
      bool progress = false;
      for (int r = 0; r < size_; ++r) {
        if (got[std::size_t(r)]) continue;
        int flag = 0;
        MPI_Status st;
        check(MPI_Iprobe(r, tag, comm_, &flag, &st), "MPI_Iprobe");
        if (!flag) continue;
        int bytes = 0;
        check(MPI_Get_count(&st, MPI_BYTE, &bytes), "MPI_Get_count");
        std::vector<unsigned char> in(std::size_t(std::max(bytes, 0)));
        check(MPI_Recv(in.data(), bytes, MPI_BYTE, r, tag, comm_, MPI_STATUS_IGNORE), "MPI_Recv");
        all[std::size_t(r)] = decode(in, r, step);
        got[std::size_t(r)] = true;
        --missing;
        progress = true;
      }
      if (missing > 0 && !progress) {
        if (std::chrono::steady_clock::now() > deadline) {
          std::string who;
          for (int r = 0; r < size_; ++r)
            if (!got[std::size_t(r)]) who += (who.empty() ? "" : ", ") + std::to_string(r);
          throw dist_error("deltaw::dist::mpi_comm::allgather: rank " + std::to_string(rank_) +
                           " received nothing for step " + std::to_string(step) + " from rank(s) " + who + " within " +
                           std::to_string(timeout_) + " s (a peer died, stalled or left the exchange)");
        }
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    }
    // Our sends: complete by the deadline too (a peer that died never takes a large one).
    for (;;) {
      int done = 0;
      check(MPI_Testall(int(sends.size()), sends.data(), &done, MPI_STATUSES_IGNORE), "MPI_Testall");
      if (done) break;
      if (std::chrono::steady_clock::now() > deadline)
        throw dist_error("deltaw::dist::mpi_comm::allgather: rank " + std::to_string(rank_) +
                         " could not deliver step " + std::to_string(step) + " within " + std::to_string(timeout_) +
                         " s");
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    return all;
  }

  /// MPI_Abort on this communicator: ends every rank (use after a dist_error).
  [[noreturn]] void abort_all(int code = 2) const {
    MPI_Abort(comm_, code);
    std::abort();
  }

 private:
  std::vector<double> decode(const std::vector<unsigned char>& in, int from, std::uint64_t step) const {
    const std::string who = "deltaw::dist::mpi_comm::allgather: rank " + std::to_string(rank_) + " got from rank " +
                            std::to_string(from) + " for step " + std::to_string(step) + " ";
    if (in.size() < sizeof(wire_header))
      throw dist_error(who + "a message of " + std::to_string(in.size()) + " bytes, shorter than its header");
    wire_header h;
    std::memcpy(&h, in.data(), sizeof h);
    const wire_header ok;
    if (h.magic != ok.magic || h.version != ok.version)
      throw dist_error(who + "a message with a bad magic/version (not a deltaw::dist message)");
    if (h.step != step || h.sender != std::uint32_t(from))
      throw dist_error(who + "a message for step " + std::to_string(h.step) + " from sender " +
                       std::to_string(h.sender) + " (out of step)");
    if (h.count != (in.size() - sizeof h) / sizeof(double) || (in.size() - sizeof h) % sizeof(double) != 0)
      throw dist_error(who + "a header announcing " + std::to_string(h.count) + " values but " +
                       std::to_string(in.size() - sizeof h) + " payload bytes");
    std::vector<double> v(h.count);
    if (h.count) std::memcpy(v.data(), in.data() + sizeof h, h.count * sizeof(double));
    if (fnv1a(v.data(), v.size() * sizeof(double)) != h.checksum)
      throw dist_error(who + "a payload whose checksum does not match its header (corrupted)");
    for (double x : v)
      if (!std::isfinite(x)) throw dist_error(who + "a non-finite value");
    return v;
  }
  void check(int rc, const char* what) const {
    if (rc != MPI_SUCCESS) {
      char buf[MPI_MAX_ERROR_STRING];
      int n = 0;
      MPI_Error_string(rc, buf, &n);
      throw dist_error(std::string("deltaw::dist::mpi_comm: ") + what + " failed on rank " + std::to_string(rank_) +
                       ": " + std::string(buf, std::size_t(n)));
    }
  }
  MPI_Comm comm_;
  double timeout_;
  int rank_ = 0, size_ = 1;
};

}  // namespace dist
DELTAW_NAMESPACE_END
#endif
