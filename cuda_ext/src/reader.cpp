// Host reader: many threads, large chunks, O_DIRECT into aligned memory, per-block crc32c.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

#include "common.h"

namespace sllm {
namespace {

std::string describe(const std::string& what, const std::string& path, uint64_t off) {
  return what + " (" + path + " at offset " + std::to_string(off) + ")";
}

bool aligned(uint64_t v) { return v % kDirectAlign == 0; }

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

}  // namespace

OpenFile::OpenFile(const std::string& p, bool want_direct) : path(p) {
  if (want_direct) {
    fd = ::open(p.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd >= 0) direct = true;
    // EINVAL: the file system refuses O_DIRECT (tmpfs). Anything else is reported below.
  }
  if (fd < 0) fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(errno, describe(std::string("cannot open: ") + std::strerror(errno), p, 0), p, 0);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    throw IoError(e, describe("cannot stat", p, 0), p, 0);
  }
  size = static_cast<uint64_t>(st.st_size);
}

OpenFile::~OpenFile() {
  if (fd >= 0) ::close(fd);
}

uint64_t OpenFile::pread_some(uint8_t* buf, uint64_t n, uint64_t at) const {
  for (;;) {
    ssize_t r = ::pread(fd, buf, n, static_cast<off_t>(at));
    if (r >= 0) return static_cast<uint64_t>(r);
    if (errno == EINTR) continue;
    int e = errno;
    throw IoError(e, describe(std::string("read failed: ") + std::strerror(e), path, at), path, at);
  }
}

void OpenFile::ended_early(uint64_t end, uint64_t at) const {
  throw IoError(ENODATA,
                describe("unexpected end of file: file is " + std::to_string(size) + " bytes, needed " +
                             std::to_string(end) + " (truncated partition?)",
                         path, at),
                path, at);
}

// O_DIRECT refuses an unaligned file offset, length or destination: read the aligned blocks that
// cover [off, off + n) into an aligned bounce buffer, a window at a time, and keep only the bytes
// asked for.
void OpenFile::bounce_read(uint8_t* out, uint64_t off, uint64_t n) const {
  constexpr uint64_t kMaxWindow = 1 << 20;  // a multiple of kDirectAlign
  const uint64_t cover = (off + n + kDirectAlign - 1) / kDirectAlign * kDirectAlign - off / kDirectAlign * kDirectAlign;
  const uint64_t window = std::min(kMaxWindow, cover);  // a tail needs a block or two, not 1 MiB
  void* raw = nullptr;
  if (posix_memalign(&raw, kDirectAlign, window) != 0) throw std::bad_alloc();
  std::unique_ptr<void, AlignedFree> bounce(raw);
  auto* buf = static_cast<uint8_t*>(raw);
  const uint64_t end = off + n;
  uint64_t pos = off;  // the next byte wanted
  while (pos < end) {
    const uint64_t start = pos - pos % kDirectAlign;
    const uint64_t want = std::min(window, ((end - start + kDirectAlign - 1) / kDirectAlign) * kDirectAlign);
    uint64_t got = 0;
    while (got < want) {
      uint64_t r = pread_some(buf + got, want - got, start + got);
      if (r == 0) break;
      got += r;
      if (!aligned(got)) break;  // a short read off-alignment: the end of the file
    }
    if (start + got <= pos) ended_early(end, pos);
    const uint64_t take = std::min(end, start + got) - pos;
    std::memcpy(out + (pos - off), buf + (pos - start), take);
    pos += take;
  }
}

void OpenFile::read_exact(void* dst, uint64_t off, uint64_t n) const {
  auto* out = static_cast<uint8_t*>(dst);
  if (direct && !(aligned(off) && aligned(reinterpret_cast<uintptr_t>(dst)))) {
    bounce_read(out, off, n);
    return;
  }
  uint64_t body = direct ? (n / kDirectAlign) * kDirectAlign : n;
  uint64_t done = 0;
  // Aligned body (or everything, buffered). pread may return short counts: loop.
  while (done < body) {
    uint64_t r = pread_some(out + done, body - done, off + done);
    if (r == 0) ended_early(off + n, off + done);
    done += r;
    if (direct && !aligned(done) && done < body) {
      // A short direct read that ends off-alignment can only happen at end of file.
      body = done;
    }
  }
  // The unaligned tail of a direct read (or what is left after a short read at the end of the
  // file): through the bounce buffer, which keeps only the bytes asked for (never drops the tail)
  // and reports a file that ends too early.
  if (done < n) bounce_read(out + done, off + done, n - done);
}

UnitPlan plan_units(uint64_t length, const ReadOptions& o) {
  uint64_t unit = o.block_crcs.empty() ? o.chunk_bytes : o.block_bytes;
  if (unit == 0) throw std::invalid_argument("chunk_bytes and block_bytes must be > 0");
  UnitPlan p{length, unit};
  if (!o.block_crcs.empty() && o.block_crcs.size() != p.count())
    throw std::invalid_argument("expected " + std::to_string(p.count()) + " block checksums, got " +
                                std::to_string(o.block_crcs.size()));
  return p;
}

void run_threads(int n, const std::function<void(int)>& fn, std::atomic<bool>& failed) {
  std::exception_ptr first;
  std::mutex mu;
  std::vector<std::thread> pool;
  pool.reserve(n);
  for (int t = 0; t < n; t++) {
    pool.emplace_back([&, t] {
      try {
        fn(t);
      } catch (...) {
        std::lock_guard<std::mutex> g(mu);
        if (!first) first = std::current_exception();
        failed.store(true);
      }
    });
  }
  for (auto& th : pool) th.join();
  if (first) std::rethrow_exception(first);
}

ReadStats read_to_host(const std::string& path, uint64_t file_offset, void* dst, uint64_t length,
                       const ReadOptions& o, CancelToken* cancel) {
  auto t0 = std::chrono::steady_clock::now();
  if (o.chunk_bytes == 0 || o.chunk_bytes % kDirectAlign != 0)
    throw std::invalid_argument("chunk_bytes must be a positive multiple of 4096");
  OpenFile f(path, o.direct);
  if (file_offset + length > f.size)
    throw IoError(ENODATA,
                  describe("file is " + std::to_string(f.size) + " bytes, range ends at " +
                               std::to_string(file_offset + length) + " (truncated partition?)",
                           path, file_offset),
                  path, file_offset);
  UnitPlan plan = plan_units(length, o);
  const uint64_t units = plan.count();
  int threads = o.threads < 1 ? 1 : o.threads;
  if (static_cast<uint64_t>(threads) > units) threads = units == 0 ? 1 : static_cast<int>(units);
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  auto* base = static_cast<uint8_t*>(dst);
  std::thread prefaulter;
  if (o.prefault && aligned(reinterpret_cast<uintptr_t>(dst))) {
    prefaulter = std::thread([&] {
      constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE, Linux 5.14+
      for (uint64_t u = next.load(); u < units && !failed.load(); u++) {
        if (u < next.load()) continue;  // the readers got there first
        uint64_t len = ((plan.size(u) + kDirectAlign - 1) / kDirectAlign) * kDirectAlign;
        if (::madvise(base + plan.start(u), len, kPopulateWrite) != 0) return;  // unsupported: readers fault
      }
    });
  }
  struct Join {
    std::thread& t;
    ~Join() {
      if (t.joinable()) t.join();
    }
  } join_prefaulter{prefaulter};
  run_threads(
      threads,
      [&](int) {
        for (;;) {
          if (failed.load()) return;
          if (cancel && cancel->is_cancelled()) throw Cancelled();
          uint64_t u = next.fetch_add(1);
          if (u >= units) return;
          uint64_t start = plan.start(u), size = plan.size(u);
          for (uint64_t off = 0; off < size; off += o.chunk_bytes) {
            if (cancel && cancel->is_cancelled()) throw Cancelled();
            uint64_t n = std::min(o.chunk_bytes, size - off);
            f.read_exact(base + start + off, file_offset + start + off, n);
          }
          if (!o.block_crcs.empty()) {
            uint32_t c = crc32c(0, base + start, size);
            if (c != o.block_crcs[u]) throw ChecksumMismatch(path, u, file_offset + start, o.block_crcs[u], c);
          }
        }
      },
      failed);
  ReadStats s;
  s.bytes = length;
  s.direct = f.direct;
  s.threads = threads;
  s.chunk_bytes = o.chunk_bytes;
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return s;
}

}  // namespace sllm
