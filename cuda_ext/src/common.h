// Shared declarations of the sllm-knative loader extension.
// The extension deals only in raw pointers, byte counts and file paths: it never
// includes or links PyTorch, so it survives torch upgrades (see docs/format.md).
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace sllm {

constexpr uint64_t kDirectAlign = 4096;

// A load can be cancelled from another thread; readers poll it between chunks.
struct CancelToken {
  std::atomic<bool> cancelled{false};
  void cancel() { cancelled.store(true); }
  bool is_cancelled() const { return cancelled.load(); }
};

// An I/O failure: the Python layer turns it into OSError(errno, message, path).
struct IoError : std::runtime_error {
  int err;
  std::string path;
  uint64_t offset;
  IoError(int e, const std::string& msg, std::string p, uint64_t off)
      : std::runtime_error(msg), err(e), path(std::move(p)), offset(off) {}
};

// A block whose crc32c differs from the index: the Python layer raises ChecksumError.
struct ChecksumMismatch : std::runtime_error {
  std::string path;
  uint64_t block;
  uint64_t offset;
  uint32_t expected, actual;
  ChecksumMismatch(std::string p, uint64_t b, uint64_t off, uint32_t e, uint32_t a)
      : std::runtime_error("checksum mismatch"), path(std::move(p)), block(b), offset(off), expected(e), actual(a) {}
};

struct Cancelled : std::runtime_error {
  Cancelled() : std::runtime_error("load cancelled") {}
};

struct ReadOptions {
  uint64_t chunk_bytes = 16ull << 20;  // one pread
  int threads = 8;                     // concurrent preads in flight
  bool direct = true;                  // try O_DIRECT, fall back to buffered
  // Fault the destination in ahead of the readers (host reads into fresh memory): the kernel
  // then does the page allocation/zeroing on its own thread instead of inside each pread,
  // so the disk queue does not drain while readers fault.
  bool prefault = false;
  // Verification: crc32c of every block_bytes-sized block of the range. Empty = no check.
  uint64_t block_bytes = 0;
  std::vector<uint32_t> block_crcs;
};

struct ReadStats {
  uint64_t bytes = 0;
  double seconds = 0;
  bool direct = false;
  // Why a read asked to be direct went buffered part-way (device reads: F3); empty otherwise.
  std::string direct_fallback;
  int threads = 0;
  uint64_t chunk_bytes = 0;
};

uint32_t crc32c(uint32_t crc, const void* data, size_t n);
bool crc32c_hardware();

// The batch-invariant bf16 linear layer of exact numerics on CPUs with AVX512-BF16
// (cpu_linear.cpp): y [M, N] = x [M, K] @ w [N, K]^T (+ bias [N]), all contiguous bf16; `batch`
// such products (x [batch, M, K], w [batch, N, K], y [batch, M, N]; product b's weight at
// w + b * w_stride, 0 for N * K), on up to `threads` threads (the caller's and a persistent
// pool's; the same bits for any count).
constexpr int kMaxLinearThreads = 256;
// With `amx`, the same contract computed with AMX tiles (other bits: see cpu_linear.cpp).
bool bf16_linear_supported();
bool amx_linear_supported();
void bf16_linear(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t M, int64_t N,
                 int64_t K, int64_t batch = 1, int threads = 1, bool amx = false, int64_t w_stride = 0);
// A decoder layer's elementwise steps beside it (cpu_norm.cpp), where bf16_linear_supported():
// RMSNorm of `rows` rows of n (y = w * bf16(x * rsqrt(mean(x^2) + eps))), and the rotary
// embedding of x [rows, heads, d] with cos, sin [rows, d] (d a multiple of 32); contiguous bf16,
// each row computed on its own (batch invariant).
void rms_norm_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t rows, int64_t n, float eps);
void rotary_bf16(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, uint16_t* y, int64_t rows,
                 int64_t heads, int64_t d);

// A file opened for the reader: O_DIRECT when the file system allows it.
struct OpenFile {
  int fd = -1;
  bool direct = false;
  uint64_t size = 0;
  std::string path;
  OpenFile(const std::string& p, bool want_direct);
  ~OpenFile();
  OpenFile(const OpenFile&) = delete;
  OpenFile& operator=(const OpenFile&) = delete;
  // Read exactly n bytes at off into dst. Short reads at end of file raise IoError(ENODATA).
  // Direct: an aligned offset and destination are read in place, their unaligned tail through a
  // bounce buffer; an unaligned offset or destination goes through the bounce buffer whole.
  void read_exact(void* dst, uint64_t off, uint64_t n) const;

 private:
  void bounce_read(uint8_t* out, uint64_t off, uint64_t n) const;
  // One pread at `at`, retried on EINTR; a failure is an IoError naming the file and offset.
  // Returns the bytes read (0: end of file).
  uint64_t pread_some(uint8_t* buf, uint64_t n, uint64_t at) const;
  // The IoError(ENODATA) of a file that ends at `at`, before `end`.
  [[noreturn]] void ended_early(uint64_t end, uint64_t at) const;
};

// Work distribution shared by the host and device readers: the range [0, length) is cut
// into units (a checksum block when verifying, else a chunk); threads claim units in order.
struct UnitPlan {
  uint64_t length;
  uint64_t unit;
  uint64_t count() const { return unit == 0 ? 0 : (length + unit - 1) / unit; }
  uint64_t start(uint64_t i) const { return i * unit; }
  uint64_t size(uint64_t i) const {
    uint64_t s = start(i);
    return (s + unit <= length) ? unit : length - s;
  }
};
UnitPlan plan_units(uint64_t length, const ReadOptions& o);

// Runs fn(thread_index) on n threads and rethrows the first exception after all joined.
void run_threads(int n, const std::function<void(int)>& fn, std::atomic<bool>& failed);

ReadStats read_to_host(const std::string& path, uint64_t file_offset, void* dst, uint64_t length,
                       const ReadOptions& o, CancelToken* cancel);

#ifdef SLLM_WITH_CUDA
int cuda_device_count();
// "" when the CUDA runtime sees a device; else why not: the CUDA error and the runtime and
// driver versions (a driver too old for the static runtime is the usual cause).
std::string cuda_error();
ReadStats read_to_device(const std::string& path, uint64_t file_offset, int device, void* dptr,
                         uint64_t length, const ReadOptions& o, uint64_t pinned_bytes, int streams,
                         CancelToken* cancel);
// Frees the pinned rings read_to_device keeps between reads (one per device, allocated by the
// first read on that device). The next read pins a new one.
void release_pinned();
#endif

}  // namespace sllm
