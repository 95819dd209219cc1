// Device reader: file -> bounded ring of pinned host buffers -> one device allocation.
// Reader threads fill pinned slots with direct reads (and verify each block's crc32c);
// each filled slot is copied with cudaMemcpyAsync on one of several streams and an event
// marks when the slot may be reused, so disk reads and host-to-device copies overlap and a
// model larger than the pinned budget streams through.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>

#include "common.h"

namespace sllm {
namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}

struct Slot {
  uint8_t* host = nullptr;
  cudaEvent_t done = nullptr;
  bool pending = false;  // an async copy out of this slot may still be running
};

// The pinned ring: slots are handed out one at a time and returned right after their
// copy is enqueued; the next user waits on the slot's event before overwriting it.
// A failure part-way through the constructor releases what was already made.
class Ring {
 public:
  Ring(size_t slots, uint64_t slot_bytes) : slots_(slots) {
    try {
      for (auto& s : slots_) {
        check(cudaHostAlloc(reinterpret_cast<void**>(&s.host), slot_bytes, cudaHostAllocDefault), "cudaHostAlloc");
        check(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming), "cudaEventCreate");
        free_.push_back(&s);
      }
    } catch (...) {
      release();
      throw;
    }
  }
  ~Ring() { release(); }
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;
  Slot* take() {
    Slot* s;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return !free_.empty(); });
      s = free_.front();
      free_.pop_front();
    }
    if (s->pending) check(cudaEventSynchronize(s->done), "cudaEventSynchronize");
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
  std::vector<Slot> slots_;
  std::deque<Slot*> free_;
  std::mutex mu_;
  std::condition_variable cv_;

  // Waits for every slot's last copy, then frees it. Errors are ignored: this is cleanup.
  void release() noexcept {
    for (auto& s : slots_) {
      if (s.done) {
        cudaEventSynchronize(s.done);
        cudaEventDestroy(s.done);
        s.done = nullptr;
      }
      if (s.host) cudaFreeHost(s.host);
      s.host = nullptr;
    }
  }
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

}  // namespace

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

ReadStats read_to_device(const std::string& path, uint64_t file_offset, int device, void* dptr, uint64_t length,
                         const ReadOptions& o, uint64_t pinned_bytes, int streams, CancelToken* cancel) {
  auto t0 = std::chrono::steady_clock::now();
  if (o.chunk_bytes == 0 || o.chunk_bytes % kDirectAlign != 0)
    throw std::invalid_argument("chunk_bytes must be a positive multiple of 4096");
  DeviceScope device_scope(device);
  OpenFile f(path, o.direct);
  if (file_offset + length > f.size)
    throw IoError(ENODATA,
                  "file is " + std::to_string(f.size) + " bytes, range ends at " +
                      std::to_string(file_offset + length) + " (truncated partition?) (" + path + ")",
                  path, file_offset);
  UnitPlan plan = plan_units(length, o);
  const uint64_t units = plan.count();
  int threads = std::max(1, o.threads);
  if (static_cast<uint64_t>(threads) > units) threads = units == 0 ? 1 : static_cast<int>(units);
  streams = std::max(1, streams);
  // At least two slots per thread so a thread reads its next chunk while the last copies.
  size_t nslots = std::max<uint64_t>(2ull * threads, pinned_bytes / o.chunk_bytes);
  Ring ring(nslots, o.chunk_bytes);
  Streams ss(streams);  // destroyed (its work finished) before the ring is freed
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
            Slot* s = ring.take();
            bool recorded = false;
            try {
              f.read_exact(s->host, file_offset + start + off, n);
              if (!o.block_crcs.empty()) crc = crc32c(crc, s->host, n);
              check(cudaMemcpyAsync(out + start + off, s->host, n, cudaMemcpyHostToDevice, st), "cudaMemcpyAsync");
              s->pending = true;  // the copy is queued, whether or not its event gets recorded
              check(cudaEventRecord(s->done, st), "cudaEventRecord");
              recorded = true;
            } catch (...) {
              // A queued copy without its event: wait for the stream so the next user of the
              // slot cannot overwrite it while the copy still reads it.
              if (s->pending && !recorded) cudaStreamSynchronize(st);
              ring.give(s);
              throw;
            }
            ring.give(s);
          }
          if (!o.block_crcs.empty() && crc != o.block_crcs[u])
            throw ChecksumMismatch(path, u, file_offset + start, o.block_crcs[u], crc);
        }
      },
      failed);
  ss.finish();
  ReadStats r;
  r.bytes = length;
  r.direct = f.direct;
  r.threads = threads;
  r.chunk_bytes = o.chunk_bytes;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace sllm
