// The fake CUDA runtime declared in cuda_runtime.h (see there for what it models).
#include "cuda_runtime.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <thread>

namespace {

std::mutex g_mu;  // guards the maps below
std::map<std::string, int> g_calls;
std::map<std::string, int> g_fail_at;  // api -> the call number that fails
std::map<const void*, size_t> g_host;   // pinned allocations
std::map<const void*, std::shared_ptr<std::atomic<int>>> g_inflight;  // copies still reading a pinned block
std::atomic<int> g_events{0}, g_streams{0}, g_memcpys{0};
std::atomic<int> g_devices{2};
std::atomic<int> g_max_delay_us{200};
std::atomic<size_t> g_host_misalign{0};
std::map<const void*, void*> g_host_base;  // what cudaHostAlloc returned -> what aligned_alloc did
std::function<void(int)> g_memcpy_hook;
thread_local int t_device = 0;
thread_local cudaError_t t_last = cudaSuccess;

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "fake_cuda: misuse: %s\n", what);
  std::abort();
}

// Counts the call and says whether it was chosen to fail.
bool inject(const char* api) {
  std::lock_guard<std::mutex> g(g_mu);
  int n = ++g_calls[api];
  auto it = g_fail_at.find(api);
  return it != g_fail_at.end() && it->second == n;
}

cudaError_t ret(cudaError_t e) {
  if (e != cudaSuccess) t_last = e;
  return e;
}

struct EventState {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t recorded = 0, completed = 0;
  int device = 0;
};

}  // namespace

struct FakeCudaEvent {
  std::shared_ptr<EventState> st = std::make_shared<EventState>();
};

struct FakeCudaStream {
  int device = 0;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> q;
  bool busy = false, stop = false;
  std::thread worker;
  std::mt19937 rng;

  explicit FakeCudaStream(int dev, unsigned seed) : device(dev), rng(seed) {
    worker = std::thread([this] { run(); });
  }
  void run() {
    std::unique_lock<std::mutex> lk(mu);
    for (;;) {
      cv.wait(lk, [&] { return stop || !q.empty(); });
      if (q.empty()) return;  // stop with nothing left
      auto op = std::move(q.front());
      q.pop_front();
      busy = true;
      lk.unlock();
      op();
      lk.lock();
      busy = false;
      cv.notify_all();
    }
  }
  void push(std::function<void()> op) {
    {
      std::lock_guard<std::mutex> g(mu);
      q.push_back(std::move(op));
    }
    cv.notify_all();
  }
  void drain() {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return q.empty() && !busy; });
  }
  ~FakeCudaStream() {
    {
      std::lock_guard<std::mutex> g(mu);
      stop = true;
    }
    cv.notify_all();
    worker.join();
  }
  int delay_us() {
    int m = g_max_delay_us.load();
    if (m <= 0) return 0;
    std::lock_guard<std::mutex> g(mu);
    return static_cast<int>(rng() % static_cast<unsigned>(m + 1));
  }
};

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory (injected)";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    default: return "unknown error (injected)";
  }
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    default: return "cudaErrorUnknown";
  }
}

cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* v) {
  *v = g_devices.load() > 0 ? 13000 : 0;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  cudaError_t e = t_last;
  t_last = cudaSuccess;
  return e;
}

cudaError_t cudaGetDeviceCount(int* n) {
  if (inject("cudaGetDeviceCount")) return ret(cudaErrorUnknown);
  *n = g_devices.load();
  return *n > 0 ? cudaSuccess : ret(cudaErrorNoDevice);
}

cudaError_t cudaSetDevice(int device) {
  if (inject("cudaSetDevice")) return ret(cudaErrorUnknown);
  if (device < 0 || device >= g_devices.load()) return ret(cudaErrorInvalidDevice);
  t_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  if (inject("cudaGetDevice")) return ret(cudaErrorUnknown);
  *device = t_device;
  return cudaSuccess;
}

cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned int) {
  if (inject("cudaHostAlloc")) return ret(cudaErrorMemoryAllocation);
  const size_t skew = g_host_misalign.load();
  size_t n = ((bytes ? bytes : 1) + skew + 4095) / 4096 * 4096;
  void* m = std::aligned_alloc(4096, n);
  if (!m) return ret(cudaErrorMemoryAllocation);
  void* user = static_cast<char*>(m) + skew;
  std::lock_guard<std::mutex> g(g_mu);
  g_host[user] = bytes;
  g_host_base[user] = m;
  g_inflight[user] = std::make_shared<std::atomic<int>>(0);
  *p = user;
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* p) {
  if (inject("cudaFreeHost")) return ret(cudaErrorUnknown);
  if (!p) return cudaSuccess;
  std::lock_guard<std::mutex> g(g_mu);
  auto it = g_host.find(p);
  if (it == g_host.end()) die("cudaFreeHost of a pointer that cudaHostAlloc did not return");
  if (g_inflight[p]->load() != 0) die("cudaFreeHost while a queued copy still reads the buffer");
  g_host.erase(it);
  g_inflight.erase(p);
  std::free(g_host_base[p]);
  g_host_base.erase(p);
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int) {
  if (inject("cudaEventCreate")) return ret(cudaErrorUnknown);
  *e = new FakeCudaEvent;
  (*e)->st->device = t_device;
  g_events++;
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, 0); }

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  if (inject("cudaEventRecord")) return ret(cudaErrorUnknown);
  if (!e || !s) die("cudaEventRecord with a null event or stream");
  if (e->st->device != s->device) return ret(cudaErrorInvalidResourceHandle);
  std::shared_ptr<EventState> st = e->st;
  uint64_t gen;
  {
    std::lock_guard<std::mutex> g(st->mu);
    gen = ++st->recorded;
  }
  s->push([st, gen] {
    std::lock_guard<std::mutex> g(st->mu);
    if (gen > st->completed) st->completed = gen;
    st->cv.notify_all();
  });
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  if (inject("cudaEventSynchronize")) return ret(cudaErrorUnknown);
  if (!e) die("cudaEventSynchronize of a null event");
  std::unique_lock<std::mutex> lk(e->st->mu);
  uint64_t want = e->st->recorded;
  e->st->cv.wait(lk, [&] { return e->st->completed >= want; });
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t e) {
  if (inject("cudaEventDestroy")) return ret(cudaErrorUnknown);
  if (!e) die("cudaEventDestroy of a null event");
  delete e;  // queued records keep the state alive, as CUDA releases it once complete
  g_events--;
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int) {
  if (inject("cudaStreamCreate")) return ret(cudaErrorUnknown);
  static std::atomic<unsigned> seed{12345};
  *s = new FakeCudaStream(t_device, seed++);
  g_streams++;
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, 0); }

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  if (inject("cudaStreamSynchronize")) return ret(cudaErrorUnknown);
  if (!s) die("cudaStreamSynchronize of a null stream");
  s->drain();
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t s) {
  if (inject("cudaStreamDestroy")) return ret(cudaErrorUnknown);
  if (!s) die("cudaStreamDestroy of a null stream");
  delete s;  // runs what is queued, then stops (CUDA also finishes queued work)
  g_streams--;
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t s) {
  if (inject("cudaMemcpyAsync")) return ret(cudaErrorUnknown);
  if (kind != cudaMemcpyHostToDevice) die("only host-to-device copies are modelled");
  if (!s) die("cudaMemcpyAsync on the null stream");
  std::shared_ptr<std::atomic<int>> inflight;
  {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_host.upper_bound(src);
    if (it == g_host.begin()) die("cudaMemcpyAsync source is not pinned memory");
    --it;
    auto b = static_cast<const char*>(it->first), p = static_cast<const char*>(src);
    if (p + n > b + it->second) die("cudaMemcpyAsync source runs past its pinned allocation");
    inflight = g_inflight[it->first];
  }
  (*inflight)++;
  int delay = s->delay_us();
  s->push([dst, src, n, delay, inflight] {
    if (delay) std::this_thread::sleep_for(std::chrono::microseconds(delay));
    std::memcpy(dst, src, n);
    (*inflight)--;
  });
  int k = ++g_memcpys;
  if (g_memcpy_hook) g_memcpy_hook(k);
  return cudaSuccess;
}

namespace fake_cuda {
void fail_at(const std::string& api, int n) {
  std::lock_guard<std::mutex> g(g_mu);
  if (n <= 0) {
    g_fail_at.erase(api);
  } else {
    g_fail_at[api] = g_calls[api] + n;
  }
}
void reset() {
  std::lock_guard<std::mutex> g(g_mu);
  g_fail_at.clear();
  g_calls.clear();
  g_memcpys = 0;
  g_memcpy_hook = nullptr;
  t_last = cudaSuccess;
}
int live_host() {
  std::lock_guard<std::mutex> g(g_mu);
  return static_cast<int>(g_host.size());
}
size_t live_host_bytes() {
  std::lock_guard<std::mutex> g(g_mu);
  size_t n = 0;
  for (const auto& kv : g_host) n += kv.second;
  return n;
}
int live_events() { return g_events.load(); }
int live_streams() { return g_streams.load(); }
int calls(const std::string& api) {
  std::lock_guard<std::mutex> g(g_mu);
  auto it = g_calls.find(api);
  return it == g_calls.end() ? 0 : it->second;
}
int device_count() { return g_devices.load(); }
void set_device_count(int n) { g_devices = n; }
void set_max_delay_us(int us) { g_max_delay_us = us; }
void set_host_misalign(size_t bytes) { g_host_misalign = bytes; }
void on_memcpy(std::function<void(int)> hook) { g_memcpy_hook = std::move(hook); }
}  // namespace fake_cuda
