// SPDX-License-Identifier: MIT
// Bytes of a file for the readers: mapped read-only with mmap (POSIX), read into memory
// otherwise (regular files only, never blocking on a FIFO); and an all-or-nothing file
// writer (exclusive unique temporary, fsync, rename).
#pragma once

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
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

/// The largest adapter_config.json (or other small text file) the readers accept: real
/// configs are kilobytes, and a cap keeps a hostile one from exhausting memory.
inline constexpr std::size_t max_config_bytes = std::size_t(16) << 20;

namespace detail {
#if DELTAW_IO_HAS_MMAP
/// Opens `path` read-only without blocking (a FIFO would block in open()) and refuses
/// anything that is not a regular file (FIFOs, devices such as /dev/zero, directories,
/// sockets). Returns the descriptor and fills `st`.
inline int open_regular(const std::filesystem::path& path, const char* op, struct stat& st) {
  int fd;
  do fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) throw io_error(os_message((std::string(op) + ": cannot open").c_str(), path));
  if (::fstat(fd, &st) != 0) {
    const std::string msg = os_message((std::string(op) + ": cannot stat").c_str(), path);
    ::close(fd);
    throw io_error(msg);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw io_error(std::string(op) + ": '" + path.string() + "' is not a regular file");
  }
  return fd;
}
#endif
}  // namespace detail

/// Reads a whole regular file into memory: one buffer sized from the file's length (no
/// zero-fill, no regrowth). Anything but a regular file (a FIFO, /dev/zero, a directory)
/// is refused with io_error without blocking; a file longer than `max_bytes` (checked
/// before and while reading) throws format_error. Pass max_config_bytes for configs.
inline byte_buffer read_file(const std::filesystem::path& path,
                             std::size_t max_bytes = std::numeric_limits<std::size_t>::max()) {
  const char* op = "deltaw::io::read_file";
  auto too_long = [&](std::uint64_t n) {
    return format_error(std::string(op) + ": '" + path.string() + "' has " + (n == ~std::uint64_t(0) ? "more than " + std::to_string(max_bytes) : std::to_string(n)) +
                        " bytes, more than the limit of " + std::to_string(max_bytes));
  };
  // The buffer: `cap` bytes, `size` of them read. One byte beyond the expected length lets
  // the first read see the end of the file; a file that grows while being read is read up
  // to max_bytes + 1 bytes, then refused.
  std::size_t cap = 0, size = 0;
  std::unique_ptr<std::byte[]> data;
  const auto make_room = [&] {  // before a read: a full buffer doubles (up to max_bytes + 1)
    if (size < cap) return;
    if (cap > max_bytes) throw too_long(~std::uint64_t(0));
    const std::size_t next = cap > max_bytes / 2 ? max_bytes + 1 : 2 * cap;
    auto bigger = std::make_unique_for_overwrite<std::byte[]>(next);
    if (size > 0) std::memcpy(bigger.get(), data.get(), size);
    data = std::move(bigger);
    cap = next;
  };
#if DELTAW_IO_HAS_MMAP
  struct stat st {};
  detail::fd_closer fd{detail::open_regular(path, op, st)};
  const auto length = std::uint64_t(st.st_size);
  if (length > max_bytes) throw too_long(length);
  cap = std::size_t(length) + 1;
  data = std::make_unique_for_overwrite<std::byte[]>(cap);
  for (;;) {
    make_room();
    const ::ssize_t got = ::read(fd.fd, data.get() + size, cap - size);
    if (got < 0) {
      if (errno == EINTR) continue;
      throw io_error(detail::os_message("deltaw::io::read_file: cannot read", path));
    }
    if (got == 0) break;
    size += std::size_t(got);
  }
  if (size > max_bytes) throw too_long(~std::uint64_t(0));
#else
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    throw io_error(std::string(op) + ": '" + path.string() + "' is not a regular file");
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) throw io_error(detail::os_message("deltaw::io::read_file: cannot open", path));
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> guard(f, &std::fclose);
  const auto length = std::filesystem::file_size(path, ec);
  if (!ec && length > max_bytes) throw too_long(length);
  cap = ec ? std::size_t(1) << 16 : std::size_t(length) + 1;
  data = std::make_unique_for_overwrite<std::byte[]>(cap);
  for (;;) {
    make_room();
    const std::size_t got = std::fread(data.get() + size, 1, cap - size, f);
    size += got;
    if (got == 0) break;
  }
  if (std::ferror(f)) throw io_error(detail::os_message("deltaw::io::read_file: cannot read", path));
  if (size > max_bytes) throw too_long(~std::uint64_t(0));
#endif
  const std::byte* p = data.get();
  std::shared_ptr<const void> owner(data.release(), [](const void* q) { delete[] static_cast<const std::byte*>(q); });
  return {std::span<const std::byte>(p, size), std::move(owner)};
}

/// Maps a regular file read-only (falls back to read_file where mmap is unavailable).
/// FIFOs, devices and directories are refused without blocking. Empty files cannot be
/// mapped and are returned as an empty range.
inline byte_buffer map_file(const std::filesystem::path& path) {
#if DELTAW_IO_HAS_MMAP
  struct stat st {};
  detail::fd_closer fd{detail::open_regular(path, "deltaw::io::map_file", st)};
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

namespace detail {
/// A name for a temporary sibling of `target`: ".<name>.<tag>-<random>" (hidden, unique
/// per process, call and try).
inline std::filesystem::path temp_sibling(const std::filesystem::path& target, const char* tag) {
  static std::atomic<std::uint64_t> counter{0};
  int local = 0;
  std::uint64_t x = std::uint64_t(std::chrono::steady_clock::now().time_since_epoch().count()) ^
                    (counter.fetch_add(1) * 0x9E3779B97F4A7C15ull) ^ std::uint64_t(reinterpret_cast<std::uintptr_t>(&local));
#if DELTAW_IO_HAS_MMAP
  x ^= std::uint64_t(::getpid()) << 40;
#endif
  // splitmix64 finaliser: every input bit moves every output bit.
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  static constexpr char digits[] = "0123456789abcdefghijklmnopqrstuvwxyz";
  std::string suffix;
  for (int i = 0; i < 12; ++i, x /= 36) suffix += digits[x % 36];
  auto dir = target.parent_path();
  return dir / ("." + target.filename().string() + "." + tag + "-" + suffix);
}
}  // namespace detail

/// fsyncs a directory, so that a rename or a new entry in it survives a crash. Throws
/// io_error when the directory cannot be opened or the sync reports an I/O error (file
/// systems that cannot sync a directory are accepted). No-op without POSIX.
inline void sync_directory(const std::filesystem::path& dir) {
#if DELTAW_IO_HAS_MMAP
  const std::filesystem::path d = dir.empty() ? std::filesystem::path(".") : dir;
  detail::fd_closer fd{::open(d.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  if (fd.fd < 0) throw io_error(detail::os_message("deltaw::io::sync_directory: cannot open", d));
  if (::fsync(fd.fd) != 0 && errno != EINVAL && errno != ENOTSUP && errno != EROFS)
    throw io_error(detail::os_message("deltaw::io::sync_directory: cannot sync", d));
#else
  (void)dir;
#endif
}

/// Creates a new, empty directory with a unique hidden name next to `target`
/// (".<name>.<tag>-<random>", mode 0777 less the umask) and returns its path; never
/// reuses an existing entry, so a planted file or symlink cannot redirect what is
/// written into it. Throws io_error when it cannot be created.
inline std::filesystem::path make_unique_sibling_directory(const std::filesystem::path& target, const char* tag = "deltaw-tmp") {
  for (int attempt = 0; attempt < 100; ++attempt) {
    const auto p = detail::temp_sibling(target, tag);
#if DELTAW_IO_HAS_MMAP
    if (::mkdir(p.c_str(), 0777) == 0) return p;
    if (errno != EEXIST) throw io_error(detail::os_message("deltaw::io::make_unique_sibling_directory: cannot create", p));
#else
    std::error_code ec;
    if (std::filesystem::create_directory(p, ec)) return p;
    if (ec) throw io_error("deltaw::io::make_unique_sibling_directory: cannot create '" + p.string() + "': " + ec.message());
#endif
  }
  throw io_error("deltaw::io::make_unique_sibling_directory: no unused name next to '" + target.string() + "'");
}

/// Writes bytes to `path` all-or-nothing: into a new temporary file with a unique name in
/// the same directory, created exclusively (O_CREAT | O_EXCL | O_NOFOLLOW: a planted file
/// or symlink is never written through), fsynced, given the permission bits of the file
/// it replaces (new files: 0666 less the umask), then renamed over `path` and the
/// directory fsynced. Concurrent writers of one destination each write their own
/// temporary: the destination ends up holding one writer's complete bytes. On every
/// failure the temporary is removed and io_error thrown; `path` is left as it was.
inline void write_file(const std::filesystem::path& path, std::span<const std::byte> bytes) {
#if DELTAW_IO_HAS_MMAP
  // The bits of the file being replaced (not of a symlink's target: the rename replaces
  // the link itself).
  ::mode_t mode = 0666;
  bool keep_mode = false;
  {
    struct stat st {};
    if (::lstat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
      mode = st.st_mode & 07777;
      keep_mode = true;
    }
  }
  std::filesystem::path tmp;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    tmp = detail::temp_sibling(path, "deltaw-tmp");
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST && errno != EINTR)
      throw io_error(detail::os_message("deltaw::io::write_file: cannot create", tmp));
  }
  if (fd < 0) throw io_error("deltaw::io::write_file: no unused temporary name next to '" + path.string() + "'");
  auto fail = [&](const char* what) {
    const std::string msg = detail::os_message(what, path);
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw io_error(msg);
  };
  for (std::size_t done = 0; done < bytes.size();) {
    const ::ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("deltaw::io::write_file: cannot write");
    }
    done += std::size_t(n);
  }
  if (keep_mode && ::fchmod(fd, mode) != 0) fail("deltaw::io::write_file: cannot set the permission bits of");
  if (::fsync(fd) != 0) fail("deltaw::io::write_file: cannot sync");
  const int c = ::close(fd);
  fd = -1;
  if (c != 0) fail("deltaw::io::write_file: cannot close the temporary file for");
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("deltaw::io::write_file: cannot rename the temporary file onto");
  sync_directory(path.parent_path());
#else
  std::filesystem::path tmp = detail::temp_sibling(path, "deltaw-tmp");
  std::FILE* f = std::fopen(tmp.c_str(), "wbx");  // C11 exclusive mode
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
#endif
}

}  // namespace io
DELTAW_NAMESPACE_END
