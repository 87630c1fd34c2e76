// Heterogeneous batches (deltaw/serve/batch.hpp) against the per-token dense result in
// double: y_t = W·x_t + ΔW_{a(t)}·x_t, ΔW materialised in double for each adapter.
#include <deltaw/serve/batch.hpp>
#include <deltaw/serve/masked.hpp>

#include <memory>
#include <random>
#include <variant>

#include "alloc_counter.hpp"
#include "test_util.hpp"

namespace dw = deltaw;
namespace sv = deltaw::serve;
using dwt::MatD;
using dwt::MatF;

namespace {

/// Per-token reference: row t of X·Wᵀ plus row t of X·ΔW_aᵀ (ΔW_a dense, double).
MatD reference(const MatD& W, const std::vector<MatD>& dW, const std::vector<dw::index_t>& idx, const MatD& X) {
  MatD Y(X.rows(), W.rows());
  for (Eigen::Index t = 0; t < X.rows(); ++t) {
    Eigen::RowVectorXd y = X.row(t) * W.transpose();
    if (idx[std::size_t(t)] >= 0) y += X.row(t) * dW[std::size_t(idx[std::size_t(t)])].transpose();
    Y.row(t) = y;
  }
  return Y;
}

struct lora_set {
  std::vector<MatD> B, A;
  std::vector<dw::low_rank<double>> u;
  std::vector<MatD> dense;
};

lora_set make_loras(const std::vector<dw::index_t>& ranks, Eigen::Index out, Eigen::Index in, std::uint64_t seed) {
  lora_set s;
  s.B.reserve(ranks.size());
  s.A.reserve(ranks.size());
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    s.B.push_back(dwt::random<MatD>(out, ranks[i], seed + 2 * i));
    s.A.push_back(dwt::random<MatD>(ranks[i], in, seed + 2 * i + 1));
  }
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    s.u.push_back(dw::lora(s.B[i], s.A[i], dw::scale(0.25 + 0.5 * double(i))));
    s.dense.push_back(dw::materialize(s.u.back()));
  }
  return s;
}

std::vector<dw::index_t> random_assignment(Eigen::Index tokens, dw::index_t adapters, std::uint64_t seed,
                                           double none_fraction = 0.2) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(0, 1);
  std::uniform_int_distribution<dw::index_t> a(0, adapters - 1);
  std::vector<dw::index_t> idx(static_cast<std::size_t>(tokens));
  for (auto& i : idx) i = u(g) < none_fraction ? sv::no_adapter : a(g);
  return idx;
}

constexpr sv::strategy all_strategies[] = {sv::strategy::segments, sv::strategy::gather, sv::strategy::automatic};

}  // namespace

TEST_CASE("group_tokens: a stable counting sort, empty groups, contiguity, bad indices") {
  const std::vector<dw::index_t> idx = {2, -1, 0, 2, 2, -1, 0, 4};
  const auto g = sv::group_tokens(idx, 5);
  CHECK(g.order == std::vector<dw::index_t>{2, 6, 0, 3, 4, 7});
  CHECK(g.offsets == std::vector<dw::index_t>{0, 2, 2, 5, 5, 6});
  CHECK(g.used == std::vector<dw::index_t>{0, 2, 4});
  CHECK(g.size(1) == 0);
  CHECK(g.contiguous_start(0) == -1);  // tokens 2 and 6
  CHECK(g.contiguous_start(4) == 7);
  CHECK(sv::group_tokens(std::vector<dw::index_t>{1, 1, 1}, 2).contiguous_start(1) == 0);
  CHECK(g.mean_group_size() == doctest::Approx(2.0));
  CHECK(sv::choose_strategy(g, {.segments_min_tokens = 2.0}) == sv::strategy::segments);
  CHECK(sv::choose_strategy(g, {.segments_min_tokens = 2.5}) == sv::strategy::gather);
  dwt::check_throws_with<dw::argument_error>([&] { (void)sv::group_tokens(std::vector<dw::index_t>{0, 5}, 5); },
                                             {"token 1", "adapter 5", "5 adapters"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)sv::group_tokens(std::vector<dw::index_t>{-2}, 5); },
                                             {"token 0", "adapter -2"});
}

TEST_CASE("apply_lora_batch: mixed ranks (rank 1 included), random assignment, every strategy, in double") {
  const Eigen::Index out = 23, in = 17;
  const MatD W = dwt::random<MatD>(out, in, 1);
  const auto L = make_loras({1, 3, 8, 2, 16, 5}, out, in, 100);
  for (const Eigen::Index tokens : {1, 2, 7, 40, 129}) {
    for (const double none : {0.0, 0.3}) {
      const auto idx = random_assignment(tokens, dw::index_t(L.u.size()), 7 * tokens + (none > 0 ? 1 : 0), none);
      const MatD X = dwt::random<MatD>(tokens, in, 11 + tokens);
      const MatD ref = reference(W, L.dense, idx, X);
      for (const auto how : all_strategies) {
        for (const bool parallel : {true, false}) {
          CAPTURE(tokens);
          CAPTURE(none);
          const std::string how_name = sv::strategy_name(how);
          CAPTURE(how_name);
          CAPTURE(parallel);
          MatD Y(tokens, out);
          const auto used = sv::apply_lora_batch(W, L.u, idx, X, Y, {.how = how, .parallel = parallel});
          if (how != sv::strategy::automatic) CHECK(used == how);
          CHECK(dwt::rel_err(Y, ref) <= 1e-12);
        }
      }
    }
  }
}

TEST_CASE("gemv_add_many: slabs of rows or of columns give every vector M·x_j, both layouts, strided vectors") {
  // Small slabs (slab_bytes of a few rows or columns) so that M is cut, with a remainder.
  const Eigen::Index rows = 37, cols = 29, m = 5;
  const MatD M = dwt::random<MatD>(rows, cols, 41);
  const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor> Mc = M;
  const MatD X = dwt::random<MatD>(m, 2 * cols, 42);  // x_j: every other entry of row j
  const MatD Y0 = dwt::random<MatD>(m, 3 * rows, 43);  // y_j: every third entry of row j
  for (const std::size_t slab : {std::size_t(1), 3 * sizeof(double) * std::size_t(cols), std::size_t(1) << 20}) {
    for (const bool col_major : {false, true}) {
      CAPTURE(slab);
      CAPTURE(col_major);
      const dw::matrix_view<const double> Mv =
          col_major ? dw::matrix_view<const double>(Mc.data(), rows, cols, 1, rows) : dw::matrix_view<const double>(M.data(), rows, cols, cols, 1);
      for (const Eigen::Index count : {Eigen::Index(1), m}) {
        MatD Y = Y0;
        sv::detail::gemv_add_many<double>(
            -0.75, Mv, count, [&](dw::index_t j) { return X.data() + j * X.cols(); }, 2,
            [&](dw::index_t j) { return Y.data() + j * Y.cols(); }, 3, slab);
        MatD ref = Y0;
        for (Eigen::Index j = 0; j < count; ++j) {
          const Eigen::VectorXd x = X.row(j).transpose()(Eigen::seq(0, 2 * cols - 2, 2));
          const Eigen::VectorXd y = -0.75 * (M * x);
          for (Eigen::Index i = 0; i < rows; ++i) ref(j, 3 * i) += y(i);
        }
        CHECK(dwt::rel_err(Y, ref) <= 1e-14);
      }
    }
  }
}

TEST_CASE("apply_lora_batch: gather with popular adapters over matrices larger than a slab, in double") {
  // in = out = 1024: an A of rank 32 (256 KiB) and a B of rank 64 are cut into several slabs,
  // each applied to all tokens of the adapter before the next.
  const Eigen::Index out = 1024, in = 1024, tokens = 48;
  const MatD W = dwt::random<MatD>(out, in, 5);
  const auto L = make_loras({64, 8, 32}, out, in, 300);
  std::vector<dw::index_t> idx(static_cast<std::size_t>(tokens));
  for (std::size_t t = 0; t < idx.size(); ++t) idx[t] = t % 7 == 3 ? sv::no_adapter : dw::index_t((t * t) % 3);
  const MatD X = dwt::random<MatD>(tokens, in, 6);
  const MatD ref = reference(W, L.dense, idx, X);
  for (const bool parallel : {true, false}) {
    CAPTURE(parallel);
    MatD Y(tokens, out);
    CHECK(sv::apply_lora_batch(W, L.u, idx, X, Y, {.how = sv::strategy::gather, .parallel = parallel}) ==
          sv::strategy::gather);
    CHECK(dwt::rel_err(Y, ref) <= 1e-12);
  }
}

TEST_CASE("apply_lora_batch: contiguous requests (segments read X and write Y in place) and sorted batches") {
  const Eigen::Index out = 31, in = 20;
  const MatD W = dwt::random<MatD>(out, in, 2);
  const auto L = make_loras({4, 1, 9}, out, in, 200);
  // Prefill-like: three requests of consecutive tokens, then a base-only one.
  std::vector<dw::index_t> idx;
  for (dw::index_t a : {2, 0, 1, -1})
    for (int k = 0; k < 6; ++k) idx.push_back(a);
  const MatD X = dwt::random<MatD>(Eigen::Index(idx.size()), in, 3);
  const MatD ref = reference(W, L.dense, idx, X);
  for (const auto how : all_strategies) {
    MatD Y(X.rows(), out);
    sv::apply_lora_batch(W, L.u, idx, X, Y, {.how = how});
    CHECK(dwt::rel_err(Y, ref) <= 1e-12);
  }
}

TEST_CASE("apply_lora_batch: all tokens without adapter, empty adapter list, no tokens, one adapter for all") {
  const Eigen::Index out = 9, in = 6;
  const MatD W = dwt::random<MatD>(out, in, 4);
  const auto L = make_loras({2, 3}, out, in, 300);
  const MatD X = dwt::random<MatD>(5, in, 5);
  const MatD base = X * W.transpose();
  for (const auto how : all_strategies) {
    MatD Y(5, out);
    sv::apply_lora_batch(W, L.u, std::vector<dw::index_t>(5, sv::no_adapter), X, Y, {.how = how});
    CHECK(dwt::rel_err(Y, base) <= 1e-14);
    MatD Y2(5, out);
    sv::apply_lora_batch(W, std::vector<dw::low_rank<double>>{}, std::vector<dw::index_t>(5, sv::no_adapter), X, Y2,
                         {.how = how});
    CHECK(dwt::rel_err(Y2, base) <= 1e-14);
    MatD Y0(0, out);
    sv::apply_lora_batch(W, L.u, std::vector<dw::index_t>{}, MatD(0, in), Y0, {.how = how});
    // Every token on adapter 1: the single-adapter apply.
    MatD Y3(5, out);
    sv::apply_lora_batch(W, L.u, std::vector<dw::index_t>(5, 1), X, Y3, {.how = how});
    CHECK(dwt::rel_err(Y3, X * (W + L.dense[1]).transpose()) <= 1e-12);
    const MatD single = dw::apply(dw::view(W) + L.u[1], X);
    CHECK(dwt::rel_err(Y3, single) <= 1e-13);
  }
}

TEST_CASE("apply_lora_batch: float storage with double arithmetic, float arithmetic, strided and column-major views") {
  const Eigen::Index out = 40, in = 33, tokens = 57;
  const MatF Wf = dwt::random<MatF>(out, in, 6);
  std::vector<MatF> Bf, Af;
  const std::vector<dw::index_t> ranks = {1, 8, 16, 3};
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    Bf.push_back(dwt::random<MatF>(out, ranks[i], 60 + i));
    Af.push_back(dwt::random<MatF>(ranks[i], in, 70 + i));
  }
  std::vector<dw::low_rank<float>> uf;
  std::vector<MatD> dense;
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    uf.push_back(dw::lora(Bf[i], Af[i], dw::alpha(double(2 * ranks[i]))));
    dense.push_back(uf.back().scale() * (Bf[i].cast<double>() * Af[i].cast<double>()));  // exact in double
  }
  const auto idx = random_assignment(tokens, 4, 8);
  const MatD X = dwt::random<MatD>(tokens, in, 9);
  const MatD ref = reference(Wf.cast<double>(), dense, idx, X);
  for (const auto how : all_strategies) {
    const std::string how_name = sv::strategy_name(how);
    CAPTURE(how_name);
    MatD Y(tokens, out);  // double arithmetic over float factors: exact products of the stored values
    sv::apply_lora_batch(Wf, uf, idx, X, Y, {.how = how});
    CHECK(dwt::rel_err(Y, ref) <= 1e-12);
    const MatF Xf = X.cast<float>();
    MatF Yf(tokens, out);
    sv::apply_lora_batch(Wf, uf, idx, Xf, Yf, {.how = how});
    CHECK(dwt::rel_err(Yf, reference(Wf.cast<double>(), dense, idx, Xf.cast<double>())) <= 2e-5);
    // Column-major X and a strided output (every other column of a wider buffer).
    const dwt::ColMat<double> Xc = X;
    MatD wide = MatD::Zero(tokens, 2 * out);
    sv::apply_lora_batch(Wf, uf, idx, Xc, dw::view(wide.data(), tokens, out, 2 * out, 2), {.how = how});
    MatD got(tokens, out);
    for (Eigen::Index j = 0; j < out; ++j) got.col(j) = wide.col(2 * j);
    CHECK(dwt::rel_err(got, ref) <= 1e-12);
  }
}

TEST_CASE("apply_lora_batch: sliced adapters (rank slices in separate buffers) equal the unsliced ones") {
  const Eigen::Index out = 21, in = 13, tokens = 45;
  const MatD W = dwt::random<MatD>(out, in, 3);
  const auto L = make_loras({7, 1, 12}, out, in, 500);
  // Slices of ranks {3, 4}, {1}, {5, 5, 2}: copies into separate buffers, B's columns stored
  // column-major as the pool's pages hold them.
  const std::vector<std::vector<dw::index_t>> cuts = {{3, 4}, {1}, {5, 5, 2}};
  std::vector<std::unique_ptr<MatD>> keep;
  std::vector<sv::sliced_lora<double>> sl;
  for (std::size_t a = 0; a < cuts.size(); ++a) {
    std::vector<dw::low_rank<double>> parts;
    dw::index_t off = 0;
    for (const dw::index_t k : cuts[a]) {
      keep.push_back(std::make_unique<MatD>(L.A[a].middleRows(off, k)));
      const MatD* Ap = keep.back().get();
      keep.push_back(std::make_unique<MatD>(L.B[a].middleCols(off, k).transpose()));  // Bᵀ rows
      const MatD* Bt = keep.back().get();
      parts.emplace_back(dw::held_matrix<double>{dw::matrix_view<const double>(Bt->data(), out, k, 1, out), nullptr},
                         dw::held_matrix<double>{dw::view(*Ap), nullptr}, L.u[a].scale());
      off += k;
    }
    sl.emplace_back(std::move(parts));
    CHECK(sl.back().rank() == L.u[a].rank());
  }
  const auto idx = random_assignment(tokens, 3, 31);
  const MatD X = dwt::random<MatD>(tokens, in, 32);
  const MatD ref = reference(W, L.dense, idx, X);
  for (const auto how : all_strategies) {
    MatD Y(tokens, out);
    sv::apply_lora_batch(W, sl, idx, X, Y, {.how = how});
    CHECK(dwt::rel_err(Y, ref) <= 1e-12);
  }
  std::vector<dw::index_t> contiguous(std::size_t(tokens), 2);
  MatD Y(tokens, out);
  sv::apply_lora_batch(W, sl, contiguous, X, Y, {.how = sv::strategy::segments});
  CHECK(dwt::rel_err(Y, X * (W + L.dense[2]).transpose()) <= 1e-12);
  dwt::check_throws_with<dw::argument_error>([] { sv::sliced_lora<double>(std::vector<dw::low_rank<double>>{}); },
                                             {"sliced_lora", "no slices"});
}

TEST_CASE("apply_lora_batch: errors name the operation and the shapes") {
  const MatD W = dwt::random<MatD>(8, 6, 1);
  const auto L = make_loras({2, 3}, 8, 6, 10);
  const auto Lbad = make_loras({2}, 8, 7, 20);
  const MatD X = dwt::random<MatD>(4, 6, 2);
  MatD Y(4, 8);
  const std::vector<dw::index_t> idx = {0, 1, -1, 0};
  dwt::check_throws_with<dw::shape_error>([&] { sv::apply_lora_batch(W, L.u, std::vector<dw::index_t>{0, 1}, X, Y); },
                                          {"apply_lora_batch", "2 adapter indices", "4 tokens"});
  dwt::check_throws_with<dw::shape_error>([&] { sv::apply_lora_batch(W, Lbad.u, idx, X, Y); },
                                          {"apply_lora_batch", "adapter 0", "[8, 7]", "[8, 6]"});
  dwt::check_throws_with<dw::argument_error>(
      [&] { sv::apply_lora_batch(W, L.u, std::vector<dw::index_t>{0, 1, 2, 0}, X, Y); }, {"token 2", "adapter 2"});
  MatD Ybad(4, 9);
  dwt::check_throws_with<dw::shape_error>([&] { sv::apply_lora_batch(W, L.u, idx, X, Ybad); }, {"output", "[4, 9]"});
  // The output overlapping an adapter's factor.
  MatD buf = dwt::random<MatD>(8, 8, 3);
  MatD Bw = buf.leftCols(2);
  auto lo = dw::lora(dw::view(buf).middle_cols(0, 2), L.A[0], dw::scale(1));
  std::vector<dw::low_rank<double>> ov = {lo};
  dwt::check_throws_with<dw::aliasing_error>(
      [&] { sv::apply_lora_batch(W, ov, std::vector<dw::index_t>{0, 0, 0, 0}, X, dw::view(buf.data(), 4, 8)); },
      {"apply_lora_batch", "output Y", "B"});
}

TEST_CASE("apply_grouped: every update type, one heterogeneous batch, against the dense per-token result") {
  const Eigen::Index out = 12, in = 16, tokens = 50;
  const MatD W = dwt::random<MatD>(out, in, 1);
  const MatD B = dwt::random<MatD>(out, 3, 2), A = dwt::random<MatD>(3, in, 3);
  const Eigen::VectorXd m = Eigen::VectorXd::Constant(out, 1.3) + 0.1 * dwt::random<MatD>(out, 1, 4).col(0);
  const MatD B1 = dwt::random<MatD>(out, 2, 5), A1 = dwt::random<MatD>(2, in, 6), B2 = dwt::random<MatD>(out, 2, 7),
             A2 = dwt::random<MatD>(2, in, 8);
  const Eigen::VectorXd l3 = Eigen::VectorXd::Constant(out, 0.8) + 0.2 * dwt::random<MatD>(out, 1, 9).col(0);
  const MatD Q = 0.2 * dwt::random<MatD>(in / 4, 6, 10);
  const MatD U = dwt::random<MatD>(in, 3, 11);
  const MatD k1 = dwt::random<MatD>(3, 4, 12), k2 = dwt::random<MatD>(4, 4, 13);
  const MatD bb = 0.3 * dwt::random<MatD>(out, 4, 14);
  const MatD D = dwt::random<MatD>(4, out, 15);
  const auto vb = dw::vera_shared_basis(16, 4, out, in);
  const Eigen::VectorXd ld = dwt::random<MatD>(4, 1, 17).col(0), lb = dwt::random<MatD>(out, 1, 18).col(0);
  const Eigen::VectorXd na = dwt::random<MatD>(3, 1, 19).col(0), nb = dwt::random<MatD>(2, 1, 20).col(0);
  const MatD R = dwt::random<MatD>(3, 3, 21);
  const MatD BB = dwt::random<MatD>(out, 6, 22), A0 = dwt::random<MatD>(2, in, 23);

  auto lora = dw::lora(B, A, dw::alpha(6));
  auto dora = dw::dora(W, lora, m);
  auto loha = dw::loha(B1, A1, B2, A2, dw::alpha(4));
  auto ia3 = dw::ia3(W, l3, dw::ia3_side::output);
  auto oft = dw::oft(W, Q);
  auto hra = dw::hra(W, U);
  auto kron = dw::kron(k1, k2, dw::scale(0.5));
  auto bat = dw::bone_bat(W, bb);
  auto miss = dw::miss(D, in);
  auto vera = dw::vera(vb, out, in, ld, lb);
  auto nola = dw::nola(out, in, 3, 24, na, nb, dw::alpha(2));
  auto loldu = dw::loldu(W, 3, dw::alpha(1.5));
  auto xs = dw::lora_xs(B, R, A, dw::alpha(3));
  auto blk = dw::block_lora(BB, A0, dw::alpha(2));
  using V = std::variant<decltype(lora), decltype(dora), decltype(loha), decltype(ia3), decltype(oft), decltype(hra),
                         decltype(kron), decltype(bat), decltype(miss), decltype(vera), decltype(nola), decltype(loldu),
                         decltype(xs), decltype(blk)>;
  const std::vector<V> ups = {lora, dora, loha, ia3, oft, hra, kron, bat, miss, vera, nola, loldu, xs, blk};
  std::vector<MatD> dense;
  for (const auto& v : ups) dense.push_back(std::visit([](const auto& u) { return MatD(dw::materialize(u)); }, v));
  const auto idx = random_assignment(tokens, dw::index_t(ups.size()), 25, 0.1);
  const MatD X = dwt::random<MatD>(tokens, in, 26);
  const MatD ref = reference(W, dense, idx, X);
  for (const bool parallel : {true, false}) {
    MatD Y(tokens, out);
    sv::apply_grouped(W, ups, idx, X, Y, {.parallel = parallel});
    CHECK(dwt::rel_err(Y, ref) <= 1e-12);
  }
  // One type alone (no variant) agrees with the LoRA fast path.
  const auto L = make_loras({2, 5, 1}, out, in, 400);
  const auto idx3 = random_assignment(tokens, 3, 27);
  MatD Yg(tokens, out), Yl(tokens, out);
  sv::apply_grouped(W, L.u, idx3, X, Yg);
  sv::apply_lora_batch(W, L.u, idx3, X, Yl);
  CHECK(dwt::rel_err(Yg, reference(W, L.dense, idx3, X)) <= 1e-12);
  CHECK(dwt::rel_err(Yg, Yl) <= 1e-12);
  // An update over another weight than the batch's is refused.
  const MatD W2 = dwt::random<MatD>(out, in, 28);
  const std::vector<V> other = {dw::dora(W2, lora, m)};
  MatD Y(tokens, out);
  dwt::check_throws_with<dw::argument_error>(
      [&] { sv::apply_grouped(W, other, std::vector<dw::index_t>(std::size_t(tokens), 0), X, Y); },
      {"apply_grouped", "adapter 0", "its own base weight"});
}

TEST_CASE("apply_lora_batch, apply_grouped, apply_masked: no out × in allocation") {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("skipped: allocation counting is unavailable under sanitizers");
    return;
  }
  const Eigen::Index out = 640, in = 512, tokens = 96;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);
  using MF = dwt::MatF;
  const MF W = dwt::random<MF>(out, in, 1), X = dwt::random<MF>(tokens, in, 2);
  std::vector<MF> B, A;
  for (int i = 0; i < 6; ++i) {
    B.push_back(dwt::random<MF>(out, 4 << (i % 3), 10 + i));
    A.push_back(dwt::random<MF>(4 << (i % 3), in, 20 + i));
  }
  std::vector<dw::low_rank<float>> u;
  for (int i = 0; i < 6; ++i) u.push_back(dw::lora(B[std::size_t(i)], A[std::size_t(i)], dw::alpha(8)));
  const auto idx = random_assignment(tokens, 6, 3);
  MF Y(tokens, out), M = dwt::random<MF>(tokens, 6, 4);
  for (const auto how : all_strategies)
    CHECK(dwt::largest_allocation([&] { sv::apply_lora_batch(W, u, idx, X, Y, {.how = how}); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { sv::apply_grouped(W, u, idx, X, Y); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { sv::apply_masked(W, u, M, X, Y); }) < dense_bytes);
  // The control: materialising one adapter is seen.
  CHECK(dwt::largest_allocation([&] { (void)dw::materialize(u[0]); }) >= dense_bytes);
}
