// Federated rounds and data-parallel adapter training across MPI ranks against the
// single-process simulation (deltaw/dist). Launched by CTest through mpirun (tests/dist.cmake).
//
//   test_dist_mpi equal       every method's final adapter and per-round statistics over the
//                             ranks equal the local_comm run bit for bit (rank 0 checks and
//                             reports; every rank checks its own copy too); data-parallel
//                             training over the ranks equals the single-process run over the
//                             same shards bit for bit and the unsharded run to ≤ 1e-12 (double).
//   test_dist_mpi malformed   rank 1 corrupts one payload byte: the others must fail with a
//                             dist_error naming the checksum, and the job ends.
//   test_dist_mpi stall       rank 1 stops taking part (sleeps): the others must fail with a
//                             dist_error naming the timeout within 3 s, and the job ends.
//   test_dist_mpi die         rank 1 exits before the exchange: mpirun ends the job.
// Prints "DIST-OK" on success; CTest matches the expected text for the failure modes.
#include <deltaw/dist.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

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

void check_equal(dd::mpi_comm& comm) {
  const int me = comm.rank();
  dd::fed_config c;
  c.rounds = 3;
  c.local_steps = 2;
  c.clients = 4;
  for (auto m : {dd::fed_method::fedavg, dd::fed_method::ffa, dd::fed_method::fair}) {
    const auto dist = dd::run_federated<float>(comm, c, m);
    dd::local_comm local;
    const auto ref = dd::run_federated<float>(local, c, m);
    const std::string name = dd::fed_method_name(m);
    expect(bitwise_equal(dist.state, ref.state), name + ": final adapter differs from the single-process run", me);
    for (std::size_t r = 0; r < ref.rounds.size(); ++r) {
      expect(dist.rounds[r].eval_loss == ref.rounds[r].eval_loss, name + ": held-out loss differs", me);
      expect(dist.rounds[r].aggregation_error == ref.rounds[r].aggregation_error, name + ": aggregation error differs",
             me);
    }
    expect(ref.rounds.back().eval_loss < ref.rounds.front().eval_loss + 1e-9 || m == dd::fed_method::ffa,
           name + ": loss did not decrease", me);
    if (me == 0)
      std::printf("%s over %d ranks: final loss %.6f, aggregation error %.3e (bitwise equal to one process)\n",
                  name.c_str(), comm.size(), dist.rounds.back().eval_loss, dist.rounds.back().aggregation_error);
  }
  dd::dp_config d;
  d.steps = 4;
  d.batch = 8;
  const auto dist = dd::run_data_parallel<double>(comm, d, 4);
  dd::local_comm local;
  std::vector<double> l4, l1;
  const auto sim = dd::run_data_parallel<double>(local, d, 4, &l4);
  const auto full = dd::run_data_parallel<double>(local, d, 1, &l1);
  expect(bitwise_equal(dist, sim), "data-parallel: differs from the single-process run over the same shards", me);
  double diff = 0, mx = 0;
  for (std::size_t i = 0; i < full.size(); ++i) {
    diff = std::max(diff, std::abs(dist[i] - full[i]));
    mx = std::max(mx, std::abs(full[i]));
  }
  expect(diff <= 1e-12 * std::max(1.0, mx), "data-parallel: differs from the unsharded run by " + std::to_string(diff),
         me);
  if (me == 0)
    std::printf("data-parallel over %d ranks (4 shards): bitwise equal to one process; vs unsharded max diff %.3e; "
                "loss %.4f -> %.4f\n",
                comm.size(), diff, l1.front(), l1.back());
}
}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const std::string mode = argc > 1 ? argv[1] : "equal";
  int rc = 0;
  {
    dd::mpi_comm comm(MPI_COMM_WORLD, mode == "equal" ? 120.0 : 3.0);
    try {
      if (mode == "equal") {
        check_equal(comm);
      } else {
        dd::fed_config c;
        c.rounds = 2;
        c.local_steps = 1;
        if (comm.rank() == 1) {
          if (mode == "malformed")
            comm.corrupt_outgoing = [](std::vector<unsigned char>& m) { m[m.size() - 3] ^= 0x40; };
          else if (mode == "stall")
            std::this_thread::sleep_for(std::chrono::seconds(600));
          else if (mode == "die")
            std::_Exit(3);
        }
        (void)dd::run_federated<float>(comm, c, dd::fed_method::fair);
        std::fprintf(stderr, "rank %d: FAILED: mode %s finished without an error\n", comm.rank(), mode.c_str());
        ++failures;
      }
    } catch (const dd::dist_error& e) {
      std::fprintf(stderr, "DIST-ERROR %s\n", e.what());
      std::fflush(stderr);
      comm.abort_all(2);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "rank %d: unexpected error: %s\n", comm.rank(), e.what());
      comm.abort_all(3);
    }
    rc = failures ? 1 : 0;
    int all = rc;
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    rc = all;
    if (comm.rank() == 0 && rc == 0) std::printf("DIST-OK\n");
  }
  MPI_Finalize();
  return rc;
}
