// SPDX-License-Identifier: MIT
// Merges PEFT LoRA adapters with every mode PEFT's add_weighted_adapter has (and deltaw's
// exact linear_exact), and prints how far each result is from Σ w_i·ΔW_i.
//
//   merge_adapters [--mode M] [--density D] [--rank K] [--out DIR] W1 DIR1 [W2 DIR2 ...]
//   merge_adapters                      (no adapters: two random ones, weights 1 and −1)
//
// --mode M     merge with M only (default: every mode, a table); with --out, write the result
// --density D  the fraction the pruning modes keep (ties, dare_*, magnitude_prune*; 0.5)
// --rank K     the rank of the svd modes (default: the largest input rank, as PEFT)
// --out DIR    write the merged adapter as a PEFT directory (needs --mode)
//
// The error is √(Σ_m ‖merged_m − Σ_i w_i ΔW_{i,m}‖² / Σ_m ‖Σ_i w_i ΔW_{i,m}‖²) over the modules,
// computed in factored form (compose::merge_relative_error). PEFT's linear, ties, dare_* and
// magnitude_prune combine the A's and the B's separately, which is not the weighted sum of
// the updates; cat, linear_exact and svd (up to its rank) are.
#include <deltaw/compose.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace cp = deltaw::compose;
namespace io = deltaw::io;

namespace {

int usage(const char* why) {
  std::fprintf(stderr,
               "merge_adapters: %s\nusage: merge_adapters [--mode M] [--density D] [--rank K] [--out DIR] W1 DIR1 "
               "[W2 DIR2 ...]\n",
               why);
  return 2;
}

// Two LoRA adapters of rank 6 on the same two modules, written as PEFT directories.
std::vector<std::filesystem::path> write_demo_adapters(const std::filesystem::path& root) {
  std::mt19937 g(3);
  std::normal_distribution<double> n(0.0, 1.0);
  std::vector<std::filesystem::path> dirs;
  const deltaw::index_t ranks[2] = {6, 6};
  for (int a = 0; a < 2; ++a) {
    io::peft_adapter ad;
    ad.config.r = ranks[a];
    ad.config.lora_alpha = 2.0 * double(ranks[a]);
    ad.config.target_modules = {"q_proj", "v_proj"};
    for (const char* name : {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}) {
      deltaw::dense<double> B(48, ranks[a]), A(ranks[a], 40);
      for (auto* M : {&B, &A})
        for (Eigen::Index i = 0; i < M->size(); ++i) M->data()[i] = 0.1 * n(g);
      ad.add(name, deltaw::lora(B, A, deltaw::scale(2.0)));
    }
    dirs.push_back(root / ("adapter_" + std::to_string(a)));
    io::write_peft_adapter(dirs.back(), ad);
  }
  return dirs;
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode_arg, out;
  double density = 0.5;
  deltaw::index_t rank = 0;
  std::vector<double> w;
  std::vector<std::filesystem::path> dirs;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (a == "--mode" || a == "--density" || a == "--rank" || a == "--out") {
      const char* v = next();
      if (!v) return usage((a + " needs a value").c_str());
      if (a == "--mode") mode_arg = v;
      else if (a == "--density") density = std::atof(v);
      else if (a == "--rank") rank = std::atol(v);
      else out = v;
    } else {
      const char* d = next();
      if (!d) return usage(("weight " + a + " has no adapter directory after it").c_str());
      char* end = nullptr;
      w.push_back(std::strtod(a.c_str(), &end));
      if (end == a.c_str() || *end) return usage(("\"" + a + "\" is not a weight").c_str());
      dirs.emplace_back(d);
    }
  }
  if (!out.empty() && mode_arg.empty()) return usage("--out needs --mode");
  try {
    if (dirs.empty()) {
      const auto root = std::filesystem::temp_directory_path() / "deltaw_merge_adapters_demo";
      dirs = write_demo_adapters(root);
      w = {1.0, -1.0};
      std::printf("No adapters given: two random rank-6 LoRA adapters (q_proj and v_proj [48, 40]) in %s,\n"
                  "weights 1 and -1 (where PEFT's linear mode is furthest from the weighted sum).\n\n",
                  root.string().c_str());
    }
    std::vector<io::peft_adapter> ads;
    for (const auto& d : dirs) ads.push_back(io::read_peft_adapter(d));

    std::vector<cp::merge_mode> modes;
    if (mode_arg.empty())
      modes.assign(std::begin(cp::all_merge_modes), std::end(cp::all_merge_modes));
    else
      modes.push_back(cp::parse_merge_mode(mode_arg));

    std::printf("| mode | rank | rel. error vs Σ w_i·ΔW_i | forms ΔW |\n|---|---:|---:|---|\n");
    for (const auto m : modes) {
      cp::merge_options o;
      o.mode = m;
      o.svd_rank = rank;
      o.seed = 1234;
      if (cp::needs_density(m)) o.density = density;
      io::peft_adapter merged;
      try {
        merged = cp::is_materializing(m) ? cp::merge_peft_materializing(ads, w, o) : cp::merge_peft(ads, w, o);
      } catch (const deltaw::error& e) {  // e.g. PEFT's factor-wise modes need equal ranks
        std::printf("| %s | - | refused: %s | |\n", std::string(cp::mode_name(m)).c_str(), e.what());
        continue;
      }
      deltaw::index_t r = 0;
      for (const auto& mod : merged.modules()) r = std::max(r, mod.rank);
      std::printf("| %s | %td | %.3e | %s |\n", std::string(cp::mode_name(m)).c_str(), r, cp::merge_relative_error(merged, ads, w),
                  cp::is_materializing(m) ? "yes (PEFT's definition)" : "no");
      if (!out.empty()) {
        io::write_peft_adapter(out, merged);
        std::printf("\nwrote %s (PEFT loads it with PeftModel.from_pretrained)\n", out.c_str());
      }
    }
  } catch (const deltaw::error& e) {
    std::fprintf(stderr, "merge_adapters: %s\n", e.what());
    return 1;
  }
  return 0;
}
