// The federated and data-parallel drivers of deltaw/dist in one process (local_comm): the
// aggregation errors order as the math says, and sharded data-parallel training equals the
// unsharded run. The same drivers over MPI are compared with these runs in tests/dist.
#include <deltaw/dist/federated.hpp>

#include "test_util.hpp"

namespace dd = deltaw::dist;

TEST_CASE("dist: federated rounds in one process: FFA exact, LoRA-FAIR no worse than FedAvg") {
  dd::fed_config c;
  c.rounds = 2;
  c.local_steps = 2;
  dd::local_comm local;
  const auto avg = dd::run_federated<float>(local, c, dd::fed_method::fedavg);
  const auto fair = dd::run_federated<float>(local, c, dd::fed_method::fair);
  const auto ffa = dd::run_federated<float>(local, c, dd::fed_method::ffa);
  // Round 1 starts from the same global adapter, so the clients are the same for FedAvg and
  // FAIR; the ridge optimum is no worse than ΔB = 0.
  CHECK(avg.rounds[0].aggregation_error > 0);
  CHECK(fair.rounds[0].aggregation_error <= avg.rounds[0].aggregation_error);
  CHECK(ffa.rounds[0].aggregation_relative < 1e-12);
  CHECK(ffa.rounds[1].aggregation_relative < 1e-12);
  for (const auto* r : {&avg, &fair, &ffa}) CHECK(r->rounds.back().eval_loss < std::log(32.0));
  // Deterministic: a second run gives the same bits.
  const auto again = dd::run_federated<float>(local, c, dd::fed_method::fair);
  CHECK(again.state == fair.state);
}

TEST_CASE("dist: data-parallel adapter training over shards equals the unsharded run") {
  dd::dp_config d;
  d.steps = 3;
  dd::local_comm local;
  std::vector<double> l1, l4;
  const auto full = dd::run_data_parallel<double>(local, d, 1, &l1);
  const auto sharded = dd::run_data_parallel<double>(local, d, 4, &l4);
  REQUIRE(full.size() == sharded.size());
  double diff = 0;
  for (std::size_t i = 0; i < full.size(); ++i) diff = std::max(diff, std::abs(full[i] - sharded[i]));
  CHECK(diff < 1e-12);
  for (std::size_t i = 0; i < l1.size(); ++i) CHECK(l4[i] == doctest::Approx(l1[i]).epsilon(1e-12));
  dwt::check_throws_with<deltaw::argument_error>([&] { (void)dd::run_data_parallel<double>(local, d, 3); },
                                                 {"8 sequences", "3 equal shards"});
}
