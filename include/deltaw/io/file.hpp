// SPDX-License-Identifier: MIT
// Bytes of a file for the readers: mapped read-only with mmap (POSIX), read into memory
// otherwise; and an all-or-nothing file writer.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <system_error>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define DELTAW_IO_HAS_MMAP 1
#else
#define DELTAW_IO_HAS_MMAP 0
#endif

#include "errors.hpp"

DELTAW_NAMESPACE_BEGIN
namespace io {

/// A read-only byte range and whatever keeps it alive (a mapping, a vector, or nothing
/// when the caller owns the memory). Views handed out by the readers share `owner`.
struct byte_buffer {
  std::span<const std::byte> bytes;
  std::shared_ptr<const void> owner;
};

namespace detail {
inline std::string os_message(const char* op, const std::filesystem::path& p) {
  return std::string(op) + " '" + p.string() + "': " + std::strerror(errno);
}

#if DELTAW_IO_HAS_MMAP
struct mapping {
  void* addr = nullptr;
  std::size_t size = 0;
  mapping(void* a, std::size_t s) : addr(a), size(s) {}
  mapping(const mapping&) = delete;
  mapping& operator=(const mapping&) = delete;
  ~mapping() {
    if (addr != nullptr) ::munmap(addr, size);
  }
};
struct fd_closer {
  int fd;
  ~fd_closer() {
    if (fd >= 0) ::close(fd);
  }
};
#endif
}  // namespace detail

/// Reads a whole file into memory: one buffer sized from the file's length (no
/// zero-fill, no regrowth), grown only if the file is longer than it said.
inline byte_buffer read_file(const std::filesystem::path& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) throw io_error(detail::os_message("deltaw::io::read_file: cannot open", path));
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> guard(f, &std::fclose);
  std::error_code ec;
  const auto length = std::filesystem::file_size(path, ec);
  // One byte beyond the length lets the first read see the end of the file.
  std::size_t cap = ec ? std::size_t(1) << 16 : std::size_t(length) + 1, size = 0;
  auto data = std::make_unique_for_overwrite<std::byte[]>(cap);
  for (;;) {
    if (size == cap) {
      auto bigger = std::make_unique_for_overwrite<std::byte[]>(2 * cap);
      std::memcpy(bigger.get(), data.get(), size);
      data = std::move(bigger);
      cap *= 2;
    }
    const std::size_t got = std::fread(data.get() + size, 1, cap - size, f);
    size += got;
    if (got == 0) break;
  }
  if (std::ferror(f)) throw io_error(detail::os_message("deltaw::io::read_file: cannot read", path));
  const std::byte* p = data.get();
  std::shared_ptr<const void> owner(data.release(), [](const void* q) { delete[] static_cast<const std::byte*>(q); });
  return {std::span<const std::byte>(p, size), std::move(owner)};
}

/// Maps a file read-only (falls back to read_file where mmap is unavailable). Empty files
/// cannot be mapped and are returned as an empty range.
inline byte_buffer map_file(const std::filesystem::path& path) {
#if DELTAW_IO_HAS_MMAP
  detail::fd_closer fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (fd.fd < 0) throw io_error(detail::os_message("deltaw::io::map_file: cannot open", path));
  struct stat st {};
  if (::fstat(fd.fd, &st) != 0) throw io_error(detail::os_message("deltaw::io::map_file: cannot stat", path));
  if (!S_ISREG(st.st_mode)) throw io_error("deltaw::io::map_file: '" + path.string() + "' is not a regular file");
  const auto size = static_cast<std::size_t>(st.st_size);
  if (size == 0) return {};
  void* addr = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd.fd, 0);
  if (addr == MAP_FAILED) throw io_error(detail::os_message("deltaw::io::map_file: cannot map", path));
  auto m = std::make_shared<const detail::mapping>(addr, size);
  return {std::span<const std::byte>(static_cast<const std::byte*>(addr), size), std::move(m)};
#else
  return read_file(path);
#endif
}

/// Writes bytes to `path` through a temporary file in the same directory and a rename,
/// so a failed write never leaves a truncated file under the final name.
inline void write_file(const std::filesystem::path& path, std::span<const std::byte> bytes) {
  std::filesystem::path tmp = path;
  tmp += ".deltaw-tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) throw io_error(detail::os_message("deltaw::io::write_file: cannot create", tmp));
  // fwrite's buffer must not be null even for zero bytes (an empty span's data() may be).
  const bool ok = bytes.empty() || std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  const bool closed = std::fclose(f) == 0;
  if (!ok || !closed) {
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    throw io_error(detail::os_message("deltaw::io::write_file: cannot write", path));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    throw io_error("deltaw::io::write_file: cannot rename the temporary file onto '" + path.string() + "'");
  }
}

}  // namespace io
DELTAW_NAMESPACE_END
