// SPDX-License-Identifier: MIT
// Loading a 1 GiB safetensors file: mapped (safetensors_file::open, mmap) against read into
// memory (read_file + parse), (a) to the first usable view (one tensor viewed, one element
// read) and (b) through every byte (all tensors summed), fp32, one thread.
//
//   open_mapped_first_view   map + validate header + matrix<float>("t0") + one element
//   open_read_first_view     read the whole file + validate + the same view + one element
//   mapped_sum_all           map, then sum every element of every tensor
//   read_sum_all             read, then sum every element of every tensor
//
// The file (16 tensors F32 [4096, 4096] = 1 GiB of data) is generated in the temp
// directory at start and deleted at the end. The page cache cannot be dropped here (no
// privileges), and generating the file fills it: every figure is a warm-cache figure, so
// "mapped" measures mapping and page-table work, not disk reads.
// Each benchmark: 3 repetitions of 3 iterations; read the median real_time.
//
// Header parsing at 10^6 entries (issue 14: ordered_json made it quadratic, 20.7 s at 160k):
//   header_parse_1M          safetensors_file::parse of a 10^6-entry header (zero-size
//                            tensors "t<i>" F32 [0]; 57 MB of JSON), from memory
//   config_parse_1M          parse_json_strict of a 10^6-key object ("<i>": 8; 12 MB)
//   header_write_1M          safetensors_writer::serialize of 10^6 zero-size tensors
// These need no file: run them alone with --benchmark_filter='_1M' (the 1 GiB file is made
// only when a file benchmark runs).

#include <benchmark/benchmark.h>

#include <cstdlib>
#include <cstring>

#include <cstdio>
#include <deltaw/io/json.hpp>
#include <deltaw/io/safetensors.hpp>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace dw = deltaw;
namespace io = deltaw::io;

namespace {

constexpr int n_tensors = 16;
constexpr std::int64_t side = 4096;  // 16 × 4096² × 4 B = 1 GiB
constexpr std::uint64_t tensor_bytes = std::uint64_t(side * side) * sizeof(float);
constexpr std::uint64_t total_bytes = tensor_bytes * n_tensors;

std::filesystem::path& path_slot() {
  static std::filesystem::path p;
  return p;
}
double sum_all(const io::safetensors_file& f);
io::safetensors_file open_read(const std::filesystem::path& p);
void make_file(const std::filesystem::path& p);

// The 1 GiB file, made (and checked: both paths see the same values) on first use.
const std::filesystem::path& file_path() {
  static const bool made = [] {
    std::random_device rd;
    path_slot() = std::filesystem::temp_directory_path() / ("deltaw_bench_io_" + std::to_string(rd()) + ".safetensors");
    make_file(path_slot());
    const double a = sum_all(io::safetensors_file::open(path_slot())), b = sum_all(open_read(path_slot()));
    std::printf("bench_io: %s, %.3f GiB, page cache warm (generated just now); sums mapped %.6g read %.6g\n",
                path_slot().c_str(), double(std::filesystem::file_size(path_slot())) / double(1ull << 30), a, b);
    if (a != b) {
      std::fprintf(stderr, "bench_io: mapped and read sums differ\n");
      std::exit(1);
    }
    return true;
  }();
  (void)made;
  return path_slot();
}

// Writes the header by hand and streams the data in 64 MiB pieces (the writer class would
// hold the whole gigabyte in memory twice).
void make_file(const std::filesystem::path& p) {
  std::string h = "{";
  for (int i = 0; i < n_tensors; ++i) {
    if (i) h += ",";
    h += "\"t" + std::to_string(i) + "\":{\"dtype\":\"F32\",\"shape\":[" + std::to_string(side) + "," +
         std::to_string(side) + "],\"data_offsets\":[" + std::to_string(tensor_bytes * std::uint64_t(i)) + "," +
         std::to_string(tensor_bytes * std::uint64_t(i + 1)) + "]}";
  }
  h += "}";
  while (h.size() % 8) h += ' ';
  std::ofstream f(p, std::ios::binary);
  const std::uint64_t n = h.size();
  f.write(reinterpret_cast<const char*>(&n), 8);
  f.write(h.data(), std::streamsize(h.size()));
  std::vector<float> piece(std::size_t(side * side));
  for (int i = 0; i < n_tensors; ++i) {
    for (std::size_t k = 0; k < piece.size(); ++k) piece[k] = float(i) + float(k % 1024) * (1.0f / 1024);
    f.write(reinterpret_cast<const char*>(piece.data()), std::streamsize(tensor_bytes));
  }
  if (!f) throw std::runtime_error("bench_io: cannot write " + p.string());
}

double sum_all(const io::safetensors_file& f) {
  double s = 0;
  for (const auto& t : f.tensors()) {
    const auto m = f.matrix<float>(t.name);
    const float* p = m.view.data();
    float acc = 0;
    for (std::int64_t k = 0; k < m.view.size(); ++k) acc += p[k];
    s += acc;
  }
  return s;
}

io::safetensors_file open_read(const std::filesystem::path& p) {
  auto buf = io::read_file(p);
  return io::safetensors_file::parse(buf.bytes, std::move(buf.owner), p.string());
}

void open_mapped_first_view(benchmark::State& st) {
  const auto& path = file_path();  // made before the timing starts
  for (auto _ : st) {
    const auto f = io::safetensors_file::open(path);
    const auto m = f.matrix<float>("t0");
    benchmark::DoNotOptimize(m.view(side - 1, side - 1));
  }
}
void open_read_first_view(benchmark::State& st) {
  const auto& path = file_path();  // made before the timing starts
  for (auto _ : st) {
    const auto f = open_read(path);
    const auto m = f.matrix<float>("t0");
    benchmark::DoNotOptimize(m.view(side - 1, side - 1));
  }
  st.SetBytesProcessed(std::int64_t(total_bytes) * st.iterations());
}
void mapped_sum_all(benchmark::State& st) {
  const auto& path = file_path();  // made before the timing starts
  for (auto _ : st) benchmark::DoNotOptimize(sum_all(io::safetensors_file::open(path)));
  st.SetBytesProcessed(std::int64_t(total_bytes) * st.iterations());
}
void read_sum_all(benchmark::State& st) {
  const auto& path = file_path();  // made before the timing starts
  for (auto _ : st) benchmark::DoNotOptimize(sum_all(open_read(path)));
  st.SetBytesProcessed(std::int64_t(total_bytes) * st.iterations());
}

constexpr int header_entries = 1'000'000;

std::vector<std::byte> many_entry_file() {
  std::string h = "{";
  for (int i = 0; i < header_entries; ++i) {
    if (i) h += ',';
    h += "\"t" + std::to_string(i) + "\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}";
  }
  h += '}';
  while (h.size() % 8) h += ' ';
  std::vector<std::byte> out(8 + h.size());
  const std::uint64_t n = h.size();
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, h.data(), h.size());
  return out;
}

void header_parse_1M(benchmark::State& st) {
  const auto file = many_entry_file();
  for (auto _ : st) {
    const auto f = io::safetensors_file::parse(std::span<const std::byte>(file));
    if (f.size() != std::size_t(header_entries)) st.SkipWithError("wrong entry count");
    benchmark::DoNotOptimize(f.tensors().data());
  }
  st.SetBytesProcessed(std::int64_t(file.size()) * st.iterations());
  st.counters["entries"] = header_entries;
}
void config_parse_1M(benchmark::State& st) {
  std::string t = "{";
  for (int i = 0; i < header_entries; ++i) t += (i ? ",\"" : "\"") + std::to_string(i) + "\":8";
  t += '}';
  for (auto _ : st) {
    const auto j = io::parse_json_strict(t, "bench");
    if (j.size() != std::size_t(header_entries)) st.SkipWithError("wrong key count");
    benchmark::DoNotOptimize(j.size());
  }
  st.SetBytesProcessed(std::int64_t(t.size()) * st.iterations());
}
void header_write_1M(benchmark::State& st) {
  io::safetensors_writer w;
  const Eigen::MatrixXf z(0, 0);
  for (int i = 0; i < header_entries; ++i) w.add("t" + std::to_string(i), z);
  for (auto _ : st) benchmark::DoNotOptimize(w.serialize().size());
}

}  // namespace

BENCHMARK(header_parse_1M)->Unit(benchmark::kMillisecond)->Iterations(3)->Repetitions(3)->UseRealTime();
BENCHMARK(config_parse_1M)->Unit(benchmark::kMillisecond)->Iterations(3)->Repetitions(3)->UseRealTime();
BENCHMARK(header_write_1M)->Unit(benchmark::kMillisecond)->Iterations(3)->Repetitions(3)->UseRealTime();
BENCHMARK(open_mapped_first_view)->Unit(benchmark::kMillisecond)->Iterations(3)->Repetitions(3)->UseRealTime();
BENCHMARK(open_read_first_view)->Unit(benchmark::kMillisecond)->Iterations(3)->Repetitions(3)->UseRealTime();
BENCHMARK(mapped_sum_all)->Unit(benchmark::kMillisecond)->Iterations(3)->Repetitions(3)->UseRealTime();
BENCHMARK(read_sum_all)->Unit(benchmark::kMillisecond)->Iterations(3)->Repetitions(3)->UseRealTime();

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (!path_slot().empty()) {
    std::error_code ec;
    std::filesystem::remove(path_slot(), ec);
  }
  return 0;
}
