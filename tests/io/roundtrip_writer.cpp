// Writes files with deltaw for tests/io/check_roundtrip.py, which reads them with the
// Python packages (safetensors, gguf, PEFT) and checks them independently.
//   io_roundtrip_writer <dir> formats | peft
#include <deltaw/io.hpp>
#include <deltaw/io/peft_gralora.hpp>
#include <deltaw/io/peft_unilora.hpp>
#include <deltaw/init/kasa.hpp>
#include <deltaw/io/peft_kasa_bdlora_tinylora.hpp>

#include <cmath>
#include <cstdio>
#include <algorithm>
#include <random>
#include <string>

namespace dw = deltaw;
namespace io = deltaw::io;
using MatF = dw::dense<float>;

namespace {

// Formulas the Python side recomputes (exact in every dtype used).
template <class M>
M formula(Eigen::Index r, Eigen::Index c, double step, double offset) {
  M m(r, c);
  for (Eigen::Index i = 0; i < r; ++i)
    for (Eigen::Index j = 0; j < c; ++j) m(i, j) = typename M::Scalar(double(i * c + j) * step + offset);
  return m;
}

void write_formats(const std::string& dir) {
  io::safetensors_writer w;
  const auto f32 = formula<MatF>(5, 7, 0.125, -2);
  const auto f64 = formula<dw::dense<double>>(3, 4, 1.0 / 3.0, 0);
  const auto bf = formula<MatF>(4, 6, 0.25, -1).cast<Eigen::bfloat16>().eval();
  const dw::dense<Eigen::half> hf = formula<MatF>(2, 3, 0.5, -1).cast<Eigen::half>();
  const Eigen::VectorXf vec = Eigen::VectorXf::LinSpaced(6, 0, 2.5);
  w.add("f32", f32);
  w.add("f64", f64);
  w.add("bf16", bf);
  w.add("f16", hf);
  w.add("f32_transposed", dw::view(f32).transpose());
  w.add("vec", dw::vview(vec));
  w.set_metadata("writer", "deltaw");
  w.set_metadata("k", "v");
  w.write(dir + "/st.safetensors");

  // GGUF LoRA: two updates with different s; the second s is folded into its B.
  static const MatF A1 = formula<MatF>(3, 8, 0.0625, -0.5), B1 = formula<MatF>(6, 3, 0.125, -1);
  static const MatF A2 = formula<MatF>(2, 8, 0.25, -1), B2 = formula<MatF>(4, 2, 0.5, -2);
  std::vector<std::pair<std::string, dw::low_rank<float>>> ups = {
      {"blk.0.attn_q.weight", dw::lora(B1, A1, dw::alpha(6))},  // s = 2, alpha = 6
      {"blk.0.attn_v.weight", dw::lora(B2, A2, dw::scale(0.5))}};
  io::gguf_lora_options o;
  o.name = "deltaw round trip";
  o.permute_qk = false;  // rows as given (check_roundtrip.py compares them to the formula)
  io::write_gguf_lora(dir + "/lora.gguf", "llama", ups, o);
}

// The Tiny model of check_roundtrip.py: blocks.0.q [24,16], blocks.0.v [20,24], head [8,20].
struct layer {
  std::string name;
  MatF W;
  Eigen::VectorXf b;
};

MatF randm(std::mt19937& g, Eigen::Index r, Eigen::Index c, float s) {
  std::normal_distribution<float> n(0, s);
  MatF m(r, c);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = n(g);
  return m;
}

void write_peft(const std::string& dir) {
  std::mt19937 g(42);
  std::vector<layer> layers = {{"blocks.0.q", randm(g, 24, 16, 0.3f), {}},
                               {"blocks.0.v", randm(g, 20, 24, 0.3f), {}},
                               {"head", randm(g, 8, 20, 0.3f), {}}};
  io::safetensors_writer base;
  for (auto& l : layers) {
    l.b = randm(g, l.W.rows(), 1, 0.1f);
    base.add(l.name + ".weight", l.W);
    base.add(l.name + ".bias", dw::vview(l.b));
  }
  base.write(dir + "/model.safetensors");
  const MatF x = randm(g, 5, 16, 1.0f);

  const int ranks[] = {4, 2, 4};
  const double scales[] = {2.0, 0.75, 1.5};  // three different α: alpha_pattern entries
  std::vector<MatF> As, Bs;
  for (int k = 0; k < 3; ++k) {
    As.push_back(randm(g, ranks[k], layers[std::size_t(k)].W.cols(), 0.3f));
    Bs.push_back(randm(g, layers[std::size_t(k)].W.rows(), ranks[k], 0.3f));
  }
  io::safetensors_writer out;
  out.add("x", x);
  for (const char* variant : {"lora", "rslora", "dora"}) {
    io::peft_adapter a;
    a.config.use_rslora = std::string(variant) == "rslora";
    MatF h = x;
    std::vector<Eigen::VectorXf> mags(3);
    for (int k = 0; k < 3; ++k) {
      const auto& l = layers[std::size_t(k)];
      auto u = dw::lora(dw::view(Bs[std::size_t(k)]), dw::view(As[std::size_t(k)]), dw::scale(scales[k]));
      MatF y;
      if (std::string(variant) == "dora") {
        const auto m0 = dw::dora_magnitude(dw::view(l.W), u);
        mags[std::size_t(k)] = m0.array() * (1.0f + 0.1f * float(k + 1));  // a trained magnitude
        a.add(l.name, u, dw::vector_view<const float>(mags[std::size_t(k)].data(), mags[std::size_t(k)].size()));
        y = dw::apply(dw::view(l.W) + dw::dora(dw::view(l.W), u, dw::vview(mags[std::size_t(k)])), h);
      } else {
        a.add(l.name, u);
        y = dw::apply(dw::view(l.W) + u, h);
      }
      y.rowwise() += l.b.transpose();
      h = k < 2 ? MatF(y.cwiseMax(0.0f)) : y;
    }
    io::write_peft_adapter(dir + "/adapter_" + variant, a);
    out.add(std::string("y_") + variant, h);
  }

  // The structured types: deltaw's own updates (VeRA and RandLoRA with deltaw's seeded
  // bases, which the writer stores) and deltaw's forward; PEFT must load them and agree.
  auto forward = [&](const std::string& variant, auto&& add_and_apply) {
    io::peft_structured_adapter a;
    MatF h = x;
    for (int k = 0; k < 3; ++k) {
      const auto& l = layers[std::size_t(k)];
      MatF y = add_and_apply(a, k, l, h);
      y.rowwise() += l.b.transpose();
      h = k < 2 ? MatF(y.cwiseMax(0.0f)) : y;
    }
    io::write_peft_structured_adapter(dir + "/adapter_" + variant, a);
    out.add("y_" + variant, h);
  };
  forward("lokr", [&](io::peft_structured_adapter& a, int k, const layer& l, const MatF& h) {
    const dw::index_t r = 2;
    const auto L = dw::lokr_shapes(l.W.rows(), l.W.cols(), r);
    const MatF w1 = randm(g, L.a, L.c, 0.3f), w2a = randm(g, L.b, r, 0.3f), w2b = randm(g, r, L.d, 0.3f);
    const auto u = dw::lokr(w1, dw::kron_factor(w2a, w2b), dw::alpha(k == 2 ? 5.0 : 3.0), r);
    a.add_lokr(l.name, u, r);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  forward("miss", [&](io::peft_structured_adapter& a, int, const layer& l, const MatF& h) {
    const auto u = dw::miss(randm(g, 3, l.W.rows(), 0.3f), l.W.cols());  // in % 3 != 0 for q and head
    a.add_miss(l.name, u);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  forward("miss_bat", [&](io::peft_structured_adapter& a, int, const layer& l, const MatF& h) {
    const auto u = dw::bone_bat(dw::view(l.W), randm(g, l.W.rows(), 4, 0.3f));
    a.add_bone_bat(l.name, u);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  const auto vb = dw::vera_shared_basis(3, 4, 24, 24);
  forward("vera", [&](io::peft_structured_adapter& a, int, const layer& l, const MatF& h) {
    const Eigen::VectorXf d = randm(g, 4, 1, 0.5f).col(0), b = randm(g, l.W.rows(), 1, 0.5f).col(0);
    const auto u = dw::vera(vb, l.W.rows(), l.W.cols(), d, b);
    a.add_vera(l.name, u);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  const auto rb = dw::randlora_shared_basis(5, 4, 24, 24);
  forward("randlora", [&](io::peft_structured_adapter& a, int, const layer& l, const MatF& h) {
    const dw::index_t mn = std::min(l.W.rows(), l.W.cols()), N = (mn + 3) / 4;
    const auto u = dw::randlora(rb, l.W.rows(), l.W.cols(), randm(g, 4, N, 0.3f), randm(g, N, mn, 0.3f), dw::alpha(6));
    a.add_randlora(l.name, u);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  // Issue 16: LoHa (rank 3, α per layer), IA³ (v scales its input: a feed-forward
  // module; q and head their output and bias), OFT (Cayley–Neumann, b = 4 everywhere) and
  // OFT with exact Cayley and one shared block.
  forward("loha", [&](io::peft_structured_adapter& a, int k, const layer& l, const MatF& h) {
    const dw::index_t r = 3, out = l.W.rows(), in = l.W.cols();
    const auto u = dw::loha(randm(g, out, r, 0.3f), randm(g, r, in, 0.3f), randm(g, out, r, 0.3f), randm(g, r, in, 0.3f),
                            dw::alpha(k == 1 ? 5.0 : 2.0));
    a.add_loha(l.name, u);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  std::vector<Eigen::VectorXf> ls;
  ls.reserve(3);
  forward("ia3", [&](io::peft_structured_adapter& a, int k, const layer& l, const MatF& h) {
    const bool input = k == 1;
    ls.push_back((Eigen::VectorXf::Ones(input ? l.W.cols() : l.W.rows()) + randm(g, input ? l.W.cols() : l.W.rows(), 1, 0.3f)).eval());
    const auto u = dw::ia3(dw::view(l.W), dw::vview(ls.back()), input ? dw::ia3_side::input : dw::ia3_side::output);
    a.add_ia3(l.name, u);
    MatF y = dw::apply(dw::view(l.W) + u, h);
    if (!input) y.rowwise() += (l.b.cwiseProduct(ls.back()) - l.b).transpose();  // PEFT scales the bias
    return y;
  });
  forward("oft", [&](io::peft_structured_adapter& a, int, const layer& l, const MatF& h) {
    const auto u = dw::oft(dw::view(l.W), randm(g, l.W.cols() / 4, 6, 0.2f));
    a.add_oft(l.name, u);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  forward("oft_share", [&](io::peft_structured_adapter& a, int, const layer& l, const MatF& h) {
    const auto u = dw::oft(dw::view(l.W), randm(g, 1, 6, 0.3f), dw::oft_options{false, 5});
    a.add_oft(l.name, u);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  // HRA: r = 3 reflections (plain) and r = 2 with Gram–Schmidt (apply_GS).
  forward("hra", [&](io::peft_structured_adapter& a, int, const layer& l, const MatF& h) {
    const auto u = dw::hra(dw::view(l.W), randm(g, l.W.cols(), 3, 0.3f));
    a.add_hra(l.name, u);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  forward("hra_gs", [&](io::peft_structured_adapter& a, int, const layer& l, const MatF& h) {
    const auto u = dw::hra(dw::view(l.W), randm(g, l.W.cols(), 2, 0.3f), dw::hra_options{true});
    a.add_hra(l.name, u);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  // BOFT: m = 1, b = 4 (what PEFT runs on a CPU) and m = 2, b = 2 (PEFT's CUDA path; the check
  // stands in for PEFT's fbd_cuda extension); AdaLoRA with init_r = 4, q and head pruned
  // (rank_pattern) and v full.
  std::vector<Eigen::VectorXf> bs;
  bs.reserve(6);
  forward("boft", [&](io::peft_structured_adapter& a, int, const layer& l, const MatF& h) {
    bs.push_back((Eigen::VectorXf::Ones(l.W.rows()) + randm(g, l.W.rows(), 1, 0.2f)).eval());
    const auto u = dw::boft(dw::view(l.W), randm(g, l.W.cols(), 4, 0.3f), dw::vview(bs.back()));
    a.add_boft(l.name, u);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  forward("boft_butterfly", [&](io::peft_structured_adapter& a, int, const layer& l, const MatF& h) {
    bs.push_back((Eigen::VectorXf::Ones(l.W.rows()) + randm(g, l.W.rows(), 1, 0.2f)).eval());
    const auto u = dw::boft(dw::view(l.W), randm(g, 2 * l.W.cols(), 2, 0.4f), dw::vview(bs.back()));
    a.add_boft(l.name, u);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  std::vector<Eigen::VectorXf> es;
  es.reserve(3);
  forward("adalora", [&](io::peft_structured_adapter& a, int k, const layer& l, const MatF& h) {
    const dw::index_t r = k == 0 ? 2 : k == 1 ? 4 : 3;
    es.push_back(randm(g, r, 1, 0.5f).col(0));
    const auto u = dw::adalora(randm(g, l.W.rows(), r, 0.3f), dw::vview(es.back()), randm(g, r, l.W.cols(), 0.3f),
                               dw::alpha(6), 4);
    if (k == 0) a.add_adalora(l.name, u, 4, {true, false, false, true});
    else a.add_adalora(l.name, u, 4);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  // Issue 16 (peftb): SHiRA (r = 2, a random pattern in random order; the update's scale is
  // folded into the stored values), RoAd (road_1, group_size 4; PEFT rotates the bias too),
  // HiRA (r = 3) and DeLoRA (r = 3, head r = 2 through rank_pattern; w = W's column norms).
  std::vector<std::vector<std::int32_t>> shira_idx;
  std::vector<Eigen::VectorXf> shira_v;
  shira_idx.reserve(6);
  shira_v.reserve(3);
  forward("shira", [&](io::peft_structured_adapter& a, int, const layer& l, const MatF& h) {
    const dw::index_t out = l.W.rows(), in = l.W.cols(), nnz = 2 * (out + in);
    std::vector<dw::index_t> all(std::size_t(out * in));
    for (std::size_t i = 0; i < all.size(); ++i) all[i] = dw::index_t(i);
    std::shuffle(all.begin(), all.end(), g);
    std::vector<std::int32_t> rows, cols;
    for (dw::index_t k = 0; k < nnz; ++k) {
      rows.push_back(std::int32_t(all[std::size_t(k)] / in));
      cols.push_back(std::int32_t(all[std::size_t(k)] % in));
    }
    shira_idx.push_back(std::move(rows));
    shira_idx.push_back(std::move(cols));
    shira_v.push_back(randm(g, nnz, 1, 0.3f).col(0));
    const auto u = dw::shira(out, in, std::span<const std::int32_t>(shira_idx[shira_idx.size() - 2]),
                             std::span<const std::int32_t>(shira_idx.back()), dw::vview(shira_v.back()), dw::scale(1.5));
    a.add_shira(l.name, u);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  std::vector<Eigen::VectorXf> road_p;
  road_p.reserve(6);
  forward("road", [&](io::peft_structured_adapter& a, int, const layer& l, const MatF& h) {
    const dw::index_t n = l.W.rows() / 2;
    road_p.push_back(randm(g, n, 1, 0.5f).col(0));
    road_p.push_back((Eigen::VectorXf::Ones(n) + randm(g, n, 1, 0.2f)).eval());
    const auto th = dw::vview(road_p[road_p.size() - 2]), al = dw::vview(road_p.back());
    const auto u = dw::road(dw::view(l.W), th, al, dw::road_variant::road_1, 4);
    a.add_road(l.name, u);
    MatF y = dw::apply(dw::view(l.W) + u, h);
    const MatF bcol = l.b;  // R·b − b: the update over the bias as a one-column weight
    const MatF db = dw::materialize(dw::road(bcol, th, al, dw::road_variant::road_1, 4));
    y.rowwise() += db.col(0).transpose();
    return y;
  });
  forward("hira", [&](io::peft_structured_adapter& a, int, const layer& l, const MatF& h) {
    const auto u = dw::hira(dw::view(l.W), randm(g, l.W.rows(), 3, 0.5f), randm(g, 3, l.W.cols(), 0.5f));
    a.add_hira(l.name, u);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  std::vector<Eigen::VectorXf> del_w;
  del_w.reserve(3);
  const Eigen::VectorXf del_l = Eigen::VectorXf::Constant(1, 2.5f);
  forward("delora", [&](io::peft_structured_adapter& a, int k, const layer& l, const MatF& h) {
    const dw::index_t r = k == 2 ? 2 : 3;
    del_w.push_back(dw::delora_weight_norms(l.W).cast<float>());
    const auto u = dw::delora(randm(g, l.W.rows(), r, 0.5f), randm(g, r, l.W.cols(), 0.5f), dw::vview(del_l),
                              dw::vview(del_w.back()));
    a.add_delora(l.name, u);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  // VB-LoRA (vector length 4, one bank of 10 vectors shared by the three layers, r = 2,
  // topk 2; full logits and save_only_topk_weights) and PVeRA (r = 3, deltaw's seeded bases,
  // both halves of pvera_A, stored).
  const MatF vb_bank = randm(g, 10, 4, 0.5f);
  for (const bool topk_only : {false, true})
    forward(topk_only ? "vblora_topk" : "vblora", [&](io::peft_structured_adapter& a, int, const layer& l, const MatF& h) {
      const dw::index_t r = 2, L = 4;
      const auto u = dw::vblora(randm(g, r * l.W.cols() / L, 10, 2.0f), randm(g, l.W.rows() / L * r, 10, 2.0f),
                                dw::view(vb_bank), r, 2);
      a.add_vblora(l.name, u, topk_only);
      return MatF(dw::apply(dw::view(l.W) + u, h));
    });
  const auto pvb = dw::pvera_shared_basis(9, 3, 24, 24);
  forward("pvera", [&](io::peft_structured_adapter& a, int, const layer& l, const MatF& h) {
    const Eigen::VectorXf d = randm(g, 6, 1, 0.5f).col(0), b = randm(g, l.W.rows(), 1, 0.5f).col(0);
    const auto u = dw::pvera(pvb, l.W.rows(), l.W.cols(), d, b);
    a.add_pvera(l.name, u);
    return MatF(dw::apply(dw::view(l.W) + u, h));
  });
  // GraLoRA (k = 4, r = 4, hybrid_r = 2, alpha 3) and UniLoRA (r = 3, one θ of 60 shared by the
  // three layers, random indices with PEFT's 1/√count scales; written with save_indices).
  auto forward_own = [&](const std::string& variant, auto&& add_and_apply, auto&& write) {
    MatF h = x;
    for (int k = 0; k < 3; ++k) {
      const auto& l = layers[std::size_t(k)];
      MatF y = add_and_apply(k, l, h);
      y.rowwise() += l.b.transpose();
      h = k < 2 ? MatF(y.cwiseMax(0.0f)) : y;
    }
    write(dir + "/adapter_" + variant);
    out.add("y_" + variant, h);
  };
  {
    io::peft_gralora_adapter a;
    forward_own("gralora", [&](int, const layer& l, const MatF& h) {
      const dw::index_t k = 4, r = 4, out_ = l.W.rows(), in = l.W.cols();
      const auto u = dw::gralora(randm(g, in, r, 0.4f), randm(g, k * r, out_ / k, 0.4f), k, randm(g, 2, in, 0.3f),
                                 randm(g, out_, 2, 0.3f), dw::scale(3.0 / 6.0));
      a.add(l.name, u);
      return MatF(dw::apply(dw::view(l.W) + u, h));
    }, [&](const std::string& p) { io::write_peft_gralora_adapter(p, a); });
  }
  {
    const dw::index_t d = 60, r = 3;
    const Eigen::VectorXf theta = randm(g, d, 1, 0.5f).col(0);
    std::vector<std::vector<std::int64_t>> idx;
    std::uniform_int_distribution<std::int64_t> pick(0, d - 1);
    for (const auto& l : layers) {
      idx.emplace_back(std::size_t(r * l.W.cols()));
      idx.emplace_back(std::size_t(l.W.rows() * r));
    }
    for (auto& v : idx)
      for (auto& e : v) e = pick(g);
    std::vector<std::span<const std::int64_t>> all(idx.begin(), idx.end());
    const auto inv = dw::unilora_inverse_sqrt_counts<std::int64_t>(d, all);
    io::peft_unilora_adapter a;
    forward_own("unilora", [&](int k, const layer& l, const MatF& h) {
      std::vector<double> sa, sb;
      for (auto e : idx[std::size_t(2 * k)]) sa.push_back(inv[std::size_t(e)]);
      for (auto e : idx[std::size_t(2 * k + 1)]) sb.push_back(inv[std::size_t(e)]);
      const auto u = dw::unilora(l.W.rows(), l.W.cols(), r, std::span<const std::int64_t>(idx[std::size_t(2 * k)]),
                                 std::span<const std::int64_t>(idx[std::size_t(2 * k + 1)]), std::span<const double>(sa),
                                 std::span<const double>(sb), dw::vview(theta));
      a.add(l.name, u);
      return MatF(dw::apply(dw::view(l.W) + u, h));
    }, [&](const std::string& p) { io::write_peft_unilora_adapter(p, a); });
  }
  // KaSA (r = 3, alpha 5; PEFT truncates the original base when it loads the adapter, so the
  // expected output is over deltaw's truncation of W), BD-LoRA (r = 4, 4 blocks: q and head
  // block-diagonal A, v block-diagonal B) and TinyLoRA (r = 2, u = 3, weight_tying 0.5: q
  // in group 0, v and head share group 1) (io/peft_kasa_bdlora_tinylora.hpp).
  {
    io::peft_kasa_adapter a;
    std::vector<Eigen::VectorXf> ds;
    ds.reserve(3);
    forward_own("kasa", [&](int, const layer& l, const MatF& h) {
      MatF Wt = l.W;
      dw::kasa_truncate_base_dense(Wt, 3);
      ds.push_back(randm(g, 3, 1, 0.8f).col(0));
      const auto u = dw::kasa(randm(g, l.W.rows(), 3, 0.4f), dw::vview(ds.back()), randm(g, 3, l.W.cols(), 0.4f),
                              dw::alpha(5));
      a.add(l.name, u);
      return MatF(dw::apply(dw::view(Wt) + u, h));
    }, [&](const std::string& p) { io::write_peft_kasa_adapter(p, a); });
  }
  {
    io::peft_bdlora_adapter a;
    forward_own("bdlora", [&](int k, const layer& l, const MatF& h) {
      const dw::index_t r = 4, nb = 4, out_ = l.W.rows(), in = l.W.cols();
      const bool bd_b = k == 1;
      const auto u = bd_b ? dw::bd_lora(randm(g, out_, r / nb, 0.4f), randm(g, r, in, 0.4f), dw::bd_side::B, nb, dw::alpha(6))
                          : dw::bd_lora(randm(g, out_, r, 0.4f), randm(g, r, in / nb, 0.4f), dw::bd_side::A, nb, dw::alpha(6));
      a.add(l.name, u);
      return MatF(dw::apply(dw::view(l.W) + u, h));
    }, [&](const std::string& p) { io::write_peft_bdlora_adapter(p, a); });
  }
  {
    io::peft_tinylora_adapter a;
    a.config.weight_tying = 0.5;
    const Eigen::VectorXf v0 = randm(g, 3, 1, 0.8f).col(0), v1 = randm(g, 3, 1, 0.8f).col(0);
    forward_own("tinylora", [&](int k, const layer& l, const MatF& h) {
      const auto u = dw::tinylora(randm(g, l.W.rows(), 2, 0.4f), dw::vview(k == 0 ? v0 : v1), randm(g, 3, 4, 0.6f),
                                  randm(g, 2, l.W.cols(), 0.4f));
      a.add(l.name, u, k == 0 ? 0 : 1);
      return MatF(dw::apply(dw::view(l.W) + u, h));
    }, [&](const std::string& p) { io::write_peft_tinylora_adapter(p, a, {"blocks.0.q", "blocks.0.v", "head"}); });
  }
  out.write(dir + "/io.safetensors");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <dir> formats|peft\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1], part = argv[2];
  try {
    if (part == "formats") write_formats(dir);
    else if (part == "peft") write_peft(dir);
    else return 2;
  } catch (const dw::error& e) {
    std::fprintf(stderr, "deltaw error: %s\n", e.what());
    return 1;
  }
  return 0;
}
