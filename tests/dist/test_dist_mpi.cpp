// Federated rounds and data-parallel adapter training across MPI ranks against the
// single-process simulation (deltaw/dist). Launched by CTest through mpirun (tests/dist.cmake).
//
//   test_dist_mpi equal       every method's final adapter and per-round statistics over the
//                             ranks equal the local_comm run bit for bit (rank 0 checks and
//                             reports; every rank checks its own copy too); data-parallel
//                             training over the ranks equals the single-process run over the
//                             same shards bit for bit and the unsharded run to ≤ 1e-12 (double).
//                             FFA-LoRA with DP-SGD over the ranks equals the local run bit for
//                             bit. EVA with its statistics gathered across the ranks equals the
//                             local run over the same shards bit for bit, and eva_init on the
//                             unsharded batches to rounding (same ranks, components ≤ 1e-9).
//   test_dist_mpi malformed   rank 1 corrupts one payload byte: the others must fail with a
//                             dist_error naming the checksum, and the job ends.
//   test_dist_mpi stall       rank 1 stops taking part (sleeps): the others must fail with a
//                             dist_error naming the timeout within 3 s, and the job ends.
//   test_dist_mpi die         rank 1 exits before the exchange: mpirun ends the job.
// Prints "DIST-OK" on success; CTest matches the expected text for the failure modes.
#include <deltaw/dist.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
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

// FFA-LoRA whose clients train with DP-SGD: the noise of client k in round t depends on
// (seed, t, k) only, so the ranks reproduce the single-process run bit for bit.
void check_ffa_dp(dd::mpi_comm& comm) {
  const int me = comm.rank();
  dd::fed_config c;
  c.rounds = 2;
  c.local_steps = 2;
  c.clients = 4;
  c.dp = deltaw::train::dp_sgd_options{};
  c.dp->clip_norm = 0.5;
  c.dp->noise_multiplier = 0.8;
  c.dp->seed = 99;
  const auto dist = dd::run_federated<float>(comm, c, dd::fed_method::ffa);
  dd::local_comm local;
  const auto ref = dd::run_federated<float>(local, c, dd::fed_method::ffa);
  expect(bitwise_equal(dist.state, ref.state), "FFA-LoRA + DP-SGD: final adapter differs from the single-process run", me);
  for (std::size_t r = 0; r < ref.rounds.size(); ++r)
    expect(dist.rounds[r].eval_loss == ref.rounds[r].eval_loss, "FFA-LoRA + DP-SGD: held-out loss differs", me);
  bool refused = false;
  try {
    (void)dd::run_federated<float>(local, c, dd::fed_method::fedavg);
  } catch (const deltaw::argument_error& e) {
    refused = std::string(e.what()).find("privatises B only") != std::string::npos;
  }
  expect(refused, "FedAvg + DP-SGD: not refused with the reason", me);
  // The noise is there: the private run differs from the plain FFA-LoRA run.
  auto plain = c;
  plain.dp.reset();
  const auto np = dd::run_federated<float>(local, plain, dd::fed_method::ffa);
  double diff = 0;
  for (std::size_t i = 0; i < np.state.size(); ++i) diff = std::max(diff, std::abs(np.state[i] - ref.state[i]));
  expect(diff > 1e-4, "FFA-LoRA + DP-SGD: the private run equals the plain one (no noise?)", me);
  if (me == 0)
    std::printf("FFA-LoRA + DP-SGD (C 0.5, sigma 0.8) over %d ranks: bitwise equal to one process; final loss %.6f "
                "(plain FFA-LoRA %.6f, max |state diff| %.3e)\n",
                comm.size(), dist.rounds.back().eval_loss, np.rounds.back().eval_loss, diff);
}

// EVA's statistics gathered across the ranks (dist::eva_init) against the same shards in one
// process (bitwise) and against init's eva_init on the unsharded batches (rounding).
void check_eva(dd::mpi_comm& comm) {
  const int me = comm.rank();
  using model_t = deltaw::nn::tiny_transformer<double>;
  const deltaw::nn::transformer_config mc{/*vocab*/ 24, /*seq*/ 6, /*d_model*/ 16, /*heads*/ 2, /*d_ff*/ 32,
                                          /*layers*/ 1, /*seed*/ 3};
  constexpr deltaw::index_t shards = 4, per = 2;
  auto shard = [&](deltaw::index_t b, deltaw::index_t s) {
    deltaw::eva_batch e;
    e.batch = per;
    std::mt19937_64 g(1000 * std::uint64_t(b) + std::uint64_t(s) + 17);
    for (deltaw::index_t i = 0; i < per * mc.seq; ++i) e.ids.push_back(std::int64_t(g() % std::uint64_t(mc.vocab)));
    for (deltaw::index_t i = 0; i < per * mc.seq; ++i) e.labels.push_back(g() % 5 == 0 ? -100 : 1);
    return e;
  };
  auto whole = [&](deltaw::index_t b) {
    deltaw::eva_batch e;
    for (deltaw::index_t s = 0; s < shards; ++s) {
      const auto p = shard(b, s);
      e.ids.insert(e.ids.end(), p.ids.begin(), p.ids.end());
      e.labels.insert(e.labels.end(), p.labels.begin(), p.labels.end());
      e.batch += p.batch;
    }
    return e;
  };
  deltaw::eva_model_options o;
  o.eva.alpha = 6;
  o.eva.tau = 0.95;
  o.max_batches = 40;
  o.allow_unconverged = true;
  auto fresh = [&] {
    auto m = std::make_unique<model_t>(mc);
    m->attach(deltaw::nn::adapter_kind::lora, 3, 6.0);
    return m;
  };
  auto m1 = fresh(), m2 = fresh(), m3 = fresh();
  const auto dist = dd::eva_init<double>(comm, *m1, shard, shards, o);
  dd::local_comm local;
  const auto sim = dd::eva_init<double>(local, *m2, shard, shards, o);
  const auto one = deltaw::eva_init(*m3, whole, o);
  expect(dist.batches == sim.batches && dist.ranks == sim.ranks && dist.converged == sim.converged,
         "EVA: batches / ranks / convergence differ from the single-process run over the same shards", me);
  expect(dist.ranks == one.ranks && dist.batches == one.batches, "EVA: ranks or batches differ from unsharded eva_init",
         me);
  double worst = 0;
  bool same_bits = dist.adapters.size() == sim.adapters.size();
  for (std::size_t l = 0; same_bits && l < dist.adapters.size(); ++l) {
    const auto& a = dist.adapters[l].factors.A;
    const auto& b = sim.adapters[l].factors.A;
    const auto& c = one.adapters[l].factors.A;
    same_bits = a.rows() == b.rows() && a.cols() == b.cols() &&
                (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(double) * std::size_t(a.size())) == 0);
    if (a.rows() == c.rows() && a.cols() == c.cols() && a.size() > 0) worst = std::max(worst, (a - c).cwiseAbs().maxCoeff());
    // Applied to this rank's model as to the reference's.
    expect(m1->adapted_layers()[l]->has_adapter() == (dist.ranks[l] > 0), "EVA: the result was not applied", me);
  }
  expect(same_bits, "EVA: components differ from the single-process run over the same shards", me);
  expect(worst <= 1e-9, "EVA: components differ from unsharded eva_init by " + std::to_string(worst), me);
  deltaw::index_t total = 0;
  for (auto r : dist.ranks) total += r;
  expect(total == 3 * deltaw::index_t(dist.ranks.size()), "EVA: the redistributed ranks do not keep the budget", me);
  if (me == 0)
    std::printf("EVA over %d ranks (%td shards, %td batches, converged %d): bitwise equal to one process over the "
                "same shards; vs unsharded eva_init max |dA| %.3e\n",
                comm.size(), shards, dist.batches, int(dist.converged), worst);
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
  check_ffa_dp(comm);
  check_eva(comm);
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
