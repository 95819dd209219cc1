// Device reader: file -> bounded ring of pinned host buffers -> one device allocation.
// Reader threads fill pinned slots with direct reads (and verify each block's crc32c);
// each filled slot is copied with cudaMemcpyAsync on one of several streams and an event
// marks when the slot may be reused, so disk reads and host-to-device copies overlap and a
// model larger than the pinned budget streams through.
#include <cuda_runtime.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>

#include "common.h"

namespace sllm {
namespace {

// A failed CUDA call. After one, the pinned ring of that read is freed rather than kept.
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw CudaError(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}

struct Slot {
  uint8_t* host = nullptr;
  cudaEvent_t done = nullptr;
  bool pending = false;  // an async copy out of this slot may still be running
};

// The pinned ring: one cudaHostAlloc carved into slots of slot_bytes (a multiple of 4096, so
// every slot is aligned for O_DIRECT when the allocation is; nothing documents that it is, and
// aligned() says). Slots are handed out one at a time and returned right
// after their copy is enqueued; the next user waits on the slot's event before overwriting it.
// A failure part-way through the constructor releases what was already made.
class Ring {
 public:
  Ring(size_t slots, uint64_t slot_bytes) : slot_bytes_(slot_bytes), slots_(slots) {
    try {
      check(cudaHostAlloc(reinterpret_cast<void**>(&base_), slots * slot_bytes, cudaHostAllocDefault),
            "cudaHostAlloc");
      for (size_t i = 0; i < slots; i++) {
        slots_[i].host = base_ + i * slot_bytes;
        check(cudaEventCreateWithFlags(&slots_[i].done, cudaEventDisableTiming), "cudaEventCreate");
        free_.push_back(&slots_[i]);
      }
    } catch (...) {
      release();
      throw;
    }
  }
  ~Ring() { release(); }
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;
  size_t size() const { return slots_.size(); }
  uint64_t slot_bytes() const { return slot_bytes_; }
  bool aligned() const { return reinterpret_cast<uintptr_t>(base_) % kDirectAlign == 0; }
  // Every slot is back (no read holds one): the ring may serve another read.
  bool idle() {
    std::lock_guard<std::mutex> g(mu_);
    return free_.size() == slots_.size();
  }
  Slot* take() {
    Slot* s;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return !free_.empty(); });
      s = free_.front();
      free_.pop_front();
    }
    if (s->pending) {
      try {
        check(cudaEventSynchronize(s->done), "cudaEventSynchronize");
      } catch (...) {
        give(s);
        throw;
      }
    }
    s->pending = false;
    return s;
  }
  void give(Slot* s) {
    {
      std::lock_guard<std::mutex> g(mu_);
      free_.push_back(s);
    }
    cv_.notify_one();
  }

 private:
  uint64_t slot_bytes_;
  uint8_t* base_ = nullptr;
  std::vector<Slot> slots_;
  std::deque<Slot*> free_;
  std::mutex mu_;
  std::condition_variable cv_;

  // Waits for every slot's last copy, then frees the ring. Errors are ignored: this is cleanup.
  void release() noexcept {
    for (auto& s : slots_) {
      if (s.done) {
        cudaEventSynchronize(s.done);
        cudaEventDestroy(s.done);
        s.done = nullptr;
      }
      s.host = nullptr;
    }
    if (base_) cudaFreeHost(base_);
    base_ = nullptr;
  }
};

// One pinned ring per device, kept between reads: pinning hundreds of MiB costs far more than
// most reads it serves (review finding F1). A read takes the device's ring when it is free and
// large enough, else makes its own; the ring goes back to the cache after the read unless a CUDA
// call failed (or another read already put one back: then it is freed). Never destroyed at exit
// (the CUDA runtime may be gone by then); release_pinned() frees the cached rings.
class RingCache {
 public:
  std::unique_ptr<Ring> acquire(int device, size_t slots, size_t min_slots, uint64_t slot_bytes) {
    std::unique_ptr<Ring> r;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = rings_.find(device);
      if (it != rings_.end()) r = std::move(it->second);
    }
    // Fits: slots at least as large, at least as many pinned bytes, enough slots for the threads.
    if (r && r->slot_bytes() >= slot_bytes && r->size() >= min_slots && r->size() * r->slot_bytes() >= slots * slot_bytes)
      return r;
    r.reset();  // too small: freed before a new one is pinned
    return std::make_unique<Ring>(slots, slot_bytes);
  }
  void give_back(int device, std::unique_ptr<Ring> r) {
    if (!r->idle()) return;  // a slot was lost on an error path: free it
    std::unique_ptr<Ring> extra;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto& cached = rings_[device];
      if (cached) extra = std::move(r);  // freed below, outside the lock
      else cached = std::move(r);
    }
  }
  void clear() {
    std::map<int, std::unique_ptr<Ring>> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      drop.swap(rings_);
    }
  }

 private:
  std::mutex mu_;
  std::map<int, std::unique_ptr<Ring>> rings_;
};

RingCache& ring_cache() {
  static RingCache* c = new RingCache;  // deliberately leaked, see above
  return *c;
}

// A read's use of a ring: back to the cache on the way out unless discard()ed.
class RingLease {
 public:
  RingLease(int device, size_t slots, size_t min_slots, uint64_t slot_bytes)
      : device_(device), ring_(ring_cache().acquire(device, slots, min_slots, slot_bytes)) {}
  ~RingLease() {
    if (keep_) ring_cache().give_back(device_, std::move(ring_));
  }
  RingLease(const RingLease&) = delete;
  RingLease& operator=(const RingLease&) = delete;
  Ring* operator->() { return ring_.get(); }
  void discard() { keep_ = false; }

 private:
  int device_;
  std::unique_ptr<Ring> ring_;
  bool keep_ = true;
};

// The copy streams. A failure part-way through creating them destroys those already made;
// finish() synchronises and destroys every stream even when one of them fails, then throws
// the first error. The destructor (error paths) does the same without throwing.
class Streams {
 public:
  explicit Streams(int n) {
    ss_.reserve(static_cast<size_t>(n));
    try {
      for (int i = 0; i < n; i++) {
        cudaStream_t st = nullptr;
        check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreate");
        ss_.push_back(st);
      }
    } catch (...) {
      destroy_all();
      throw;
    }
  }
  ~Streams() { destroy_all(); }
  Streams(const Streams&) = delete;
  Streams& operator=(const Streams&) = delete;
  cudaStream_t operator[](size_t i) const { return ss_[i]; }
  void finish() {
    cudaError_t first = cudaSuccess;
    const char* what = "";
    for (auto st : ss_) {
      cudaError_t e = cudaStreamSynchronize(st);
      if (e != cudaSuccess && first == cudaSuccess) first = e, what = "cudaStreamSynchronize";
      e = cudaStreamDestroy(st);
      if (e != cudaSuccess && first == cudaSuccess) first = e, what = "cudaStreamDestroy";
    }
    ss_.clear();
    check(first, what);
  }

 private:
  std::vector<cudaStream_t> ss_;
  void destroy_all() noexcept {
    for (auto st : ss_) {
      cudaStreamSynchronize(st);
      cudaStreamDestroy(st);
    }
    ss_.clear();
  }
};

// Sets the calling thread's current device and restores the previous one on the way out, so
// a read on cuda:N does not change what a later plain "cuda" means on the caller's thread.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() { cudaSetDevice(prev_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int prev_ = 0;
};

// Where a read's bytes come from (review finding F3). Direct reads land in cudaHostAlloc memory:
// if the ring is not 4096-aligned, or the kernel refuses a direct read into driver-pinned pages
// (EINVAL or EFAULT), the read goes on buffered from then on, and says why (ReadStats).
class Source {
 public:
  Source(const OpenFile& file, bool ring_aligned) : file_(file), direct_(file.direct && ring_aligned) {
    if (file.direct) buffered_ = std::make_unique<OpenFile>(file.path, false);
    if (file.direct && !ring_aligned) why_ = "the pinned ring is not 4096-aligned";
  }
  void read(uint8_t* dst, uint64_t off, uint64_t n) {
    if (direct_.load()) {
      try {
        file_.read_exact(dst, off, n);
        return;
      } catch (const IoError& e) {
        if (e.err != EINVAL && e.err != EFAULT) throw;
        std::lock_guard<std::mutex> g(mu_);
        if (direct_.exchange(false)) why_ = std::string("a direct read into pinned memory failed: ") + e.what();
      }
    }
    (buffered_ ? *buffered_ : file_).read_exact(dst, off, n);
  }
  bool direct() const { return direct_.load(); }
  std::string fallback() {
    std::lock_guard<std::mutex> g(mu_);
    return why_;
  }

 private:
  const OpenFile& file_;
  std::unique_ptr<OpenFile> buffered_;
  std::atomic<bool> direct_;
  std::mutex mu_;
  std::string why_;
};

}  // namespace

void release_pinned() { ring_cache().clear(); }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

std::string cuda_error() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaSuccess && n > 0) return "";
  cudaGetLastError();
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  auto version = [](int v) { return v ? std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10) : "none"; };
  std::string why = e == cudaSuccess ? std::string("no CUDA device")
                                     : std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  // The extension links the CUDA runtime statically: a driver older than it (CUDA 13 needs 580 or
  // newer) shows up here as cudaErrorInsufficientDriver.
  return why + " (the extension's CUDA runtime is " + version(runtime) + ", the driver supports " + version(driver) + ")";
}

ReadStats read_to_device(const std::string& path, uint64_t file_offset, int device, void* dptr, uint64_t length,
                         const ReadOptions& o, uint64_t pinned_bytes, int streams, CancelToken* cancel) {
  auto t0 = std::chrono::steady_clock::now();
  if (o.chunk_bytes == 0 || o.chunk_bytes % kDirectAlign != 0)
    throw std::invalid_argument("chunk_bytes must be a positive multiple of 4096");
  DeviceScope device_scope(device);
  OpenFile f(path, o.direct);  // for its size; Source below decides how the bytes are read
  if (file_offset + length > f.size)
    throw IoError(ENODATA,
                  "file is " + std::to_string(f.size) + " bytes, range ends at " +
                      std::to_string(file_offset + length) + " (truncated partition?) (" + path + ")",
                  path, file_offset);
  UnitPlan plan = plan_units(length, o);
  const uint64_t units = plan.count();
  ReadStats r;
  r.direct = f.direct;
  r.chunk_bytes = o.chunk_bytes;
  if (units == 0) {  // nothing to copy: no ring, no streams
    r.threads = 1;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return r;
  }
  int threads = std::max(1, o.threads);
  if (static_cast<uint64_t>(threads) > units) threads = static_cast<int>(units);
  streams = std::max(1, streams);
  // At least two slots per thread so a thread reads its next chunk while the last copies, and
  // never more slots than the read has chunks (a small read pins only what it copies).
  const uint64_t chunks = (length + o.chunk_bytes - 1) / o.chunk_bytes;
  const size_t nslots =
      static_cast<size_t>(std::min<uint64_t>(chunks, std::max<uint64_t>(2ull * threads, pinned_bytes / o.chunk_bytes)));
  const size_t min_slots = static_cast<size_t>(std::min<uint64_t>(chunks, 2ull * threads));
  RingLease ring(device, nslots, min_slots, o.chunk_bytes);
  Source source(f, ring->aligned());
  try {
    Streams ss(streams);  // destroyed (its work finished) before the ring goes back or is freed
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    auto* out = static_cast<uint8_t*>(dptr);
    run_threads(
        threads,
        [&](int t) {
          check(cudaSetDevice(device), "cudaSetDevice");
          cudaStream_t st = ss[static_cast<size_t>(t % streams)];
          for (;;) {
            if (failed.load()) return;
            if (cancel && cancel->is_cancelled()) throw Cancelled();
            uint64_t u = next.fetch_add(1);
            if (u >= units) return;
            uint64_t start = plan.start(u), size = plan.size(u);
            uint32_t crc = 0;
            for (uint64_t off = 0; off < size; off += o.chunk_bytes) {
              if (cancel && cancel->is_cancelled()) throw Cancelled();
              uint64_t n = std::min(o.chunk_bytes, size - off);
              Slot* s = ring->take();
              bool recorded = false;
              try {
                source.read(s->host, file_offset + start + off, n);
                if (!o.block_crcs.empty()) crc = crc32c(crc, s->host, n);
                check(cudaMemcpyAsync(out + start + off, s->host, n, cudaMemcpyHostToDevice, st), "cudaMemcpyAsync");
                s->pending = true;  // the copy is queued, whether or not its event gets recorded
                check(cudaEventRecord(s->done, st), "cudaEventRecord");
                recorded = true;
              } catch (...) {
                // A queued copy without its event: wait for the stream so the next user of the
                // slot cannot overwrite it while the copy still reads it.
                if (s->pending && !recorded) cudaStreamSynchronize(st);
                ring->give(s);
                throw;
              }
              ring->give(s);
            }
            if (!o.block_crcs.empty() && crc != o.block_crcs[u])
              throw ChecksumMismatch(path, u, file_offset + start, o.block_crcs[u], crc);
          }
        },
        failed);
    ss.finish();
  } catch (const CudaError&) {
    ring.discard();
    throw;
  }
  r.bytes = length;
  r.direct = source.direct();
  r.direct_fallback = source.fallback();
  r.threads = threads;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace sllm
