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

#include <benchmark/benchmark.h>

#include <cstdio>
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

std::filesystem::path& file_path() {
  static std::filesystem::path p;
  return p;
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
  for (auto _ : st) {
    const auto f = io::safetensors_file::open(file_path());
    const auto m = f.matrix<float>("t0");
    benchmark::DoNotOptimize(m.view(side - 1, side - 1));
  }
}
void open_read_first_view(benchmark::State& st) {
  for (auto _ : st) {
    const auto f = open_read(file_path());
    const auto m = f.matrix<float>("t0");
    benchmark::DoNotOptimize(m.view(side - 1, side - 1));
  }
  st.SetBytesProcessed(std::int64_t(total_bytes) * st.iterations());
}
void mapped_sum_all(benchmark::State& st) {
  for (auto _ : st) benchmark::DoNotOptimize(sum_all(io::safetensors_file::open(file_path())));
  st.SetBytesProcessed(std::int64_t(total_bytes) * st.iterations());
}
void read_sum_all(benchmark::State& st) {
  for (auto _ : st) benchmark::DoNotOptimize(sum_all(open_read(file_path())));
  st.SetBytesProcessed(std::int64_t(total_bytes) * st.iterations());
}

}  // namespace

BENCHMARK(open_mapped_first_view)->Unit(benchmark::kMillisecond)->Iterations(3)->Repetitions(3)->UseRealTime();
BENCHMARK(open_read_first_view)->Unit(benchmark::kMillisecond)->Iterations(3)->Repetitions(3)->UseRealTime();
BENCHMARK(mapped_sum_all)->Unit(benchmark::kMillisecond)->Iterations(3)->Repetitions(3)->UseRealTime();
BENCHMARK(read_sum_all)->Unit(benchmark::kMillisecond)->Iterations(3)->Repetitions(3)->UseRealTime();

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  std::random_device rd;
  file_path() = std::filesystem::temp_directory_path() / ("deltaw_bench_io_" + std::to_string(rd()) + ".safetensors");
  make_file(file_path());
  // Both paths must see the same values before anything is timed.
  const double a = sum_all(io::safetensors_file::open(file_path())), b = sum_all(open_read(file_path()));
  std::printf("bench_io: %s, %.3f GiB, page cache warm (generated just now); sums mapped %.6g read %.6g\n",
              file_path().c_str(), double(std::filesystem::file_size(file_path())) / double(1ull << 30), a, b);
  int rc = 0;
  if (a != b) {
    std::fprintf(stderr, "bench_io: mapped and read sums differ\n");
    rc = 1;
  } else {
    benchmark::RunSpecifiedBenchmarks();
  }
  benchmark::Shutdown();
  std::error_code ec;
  std::filesystem::remove(file_path(), ec);
  return rc;
}
