// Helpers for the io tests: fixture paths, raw file builders, temporary directories.
#pragma once

#include <deltaw/io.hpp>

#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "test_util.hpp"

using deltaw::index_t;

namespace dwio {

namespace fs = std::filesystem;

inline fs::path fixtures() { return fs::path(DELTAW_IO_FIXTURES); }
inline fs::path corpus() { return fs::path(DELTAW_IO_FUZZ_CORPUS); }

/// A fresh empty directory under the system temp dir, removed at scope exit.
struct temp_dir {
  fs::path path;
  temp_dir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("deltaw_io_test_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

inline std::vector<std::byte> bytes_of(const std::string& s) {
  std::vector<std::byte> b(s.size());
  if (!s.empty()) std::memcpy(b.data(), s.data(), s.size());
  return b;
}

/// A safetensors buffer: 8-byte length of `header` (as given, unpadded), then header, then data.
inline std::vector<std::byte> raw_safetensors(const std::string& header, const std::vector<std::byte>& data = {},
                                              std::uint64_t length_override = ~std::uint64_t(0)) {
  std::vector<std::byte> out(8);
  const std::uint64_t n = length_override == ~std::uint64_t(0) ? header.size() : length_override;
  std::memcpy(out.data(), &n, 8);
  auto h = bytes_of(header);
  out.insert(out.end(), h.begin(), h.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

inline std::vector<std::byte> f32_bytes(std::initializer_list<float> v) {
  std::vector<std::byte> b(v.size() * 4);
  std::memcpy(b.data(), std::data(v), b.size());
  return b;
}

inline std::vector<std::byte> zeros(std::size_t n) { return std::vector<std::byte>(n); }

inline std::vector<std::byte> slurp(const fs::path& p) {
  auto b = deltaw::io::read_file(p);
  return {b.bytes.begin(), b.bytes.end()};
}

inline void write_text(const fs::path& p, const std::string& s) {
  auto b = bytes_of(s);
  deltaw::io::write_file(p, b);
}

/// Loads a 2-D F32/F64 tensor of a safetensors file as a double matrix.
inline dwt::MatD load_matd(const deltaw::io::safetensors_file& f, const std::string& name) {
  const auto& t = f.at(name);
  const auto v = f.values<double>(name);
  const Eigen::Index r = Eigen::Index(t.shape.size() == 2 ? t.shape[0] : 1);
  const Eigen::Index c = Eigen::Index(t.shape.size() == 2 ? t.shape[1] : t.shape.at(0));
  return Eigen::Map<const dwt::MatD>(v.data(), r, c);
}

}  // namespace dwio
