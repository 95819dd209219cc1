// Runs the real sllm::read_to_device (device_reader.cu compiled as C++) against the fake CUDA
// runtime in this directory. Built and run under ASan/UBSan and TSan by
// tests/checkpoint/test_device_reader_fake.py. Usage: driver <scratch dir>. Exit 0 = all passed.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common.h"

using namespace sllm;

namespace {

int g_failures = 0;
std::string g_dir;
std::vector<uint8_t> g_data;  // the test file's bytes
std::string g_path;

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                   \
      std::fprintf(stderr, "\n");                                          \
      g_failures++;                                                        \
    }                                                                      \
  } while (0)

void make_file(size_t n) {
  std::mt19937_64 rng(42);
  g_data.resize(n);
  for (auto& b : g_data) b = static_cast<uint8_t>(rng());
  g_path = g_dir + "/data.bin";
  std::ofstream f(g_path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(g_data.data()), static_cast<std::streamsize>(n));
}

std::vector<uint32_t> block_crcs(uint64_t off, uint64_t len, uint64_t block) {
  std::vector<uint32_t> v;
  for (uint64_t s = 0; s < len; s += block) v.push_back(crc32c(0, g_data.data() + off + s, std::min(block, len - s)));
  return v;
}

// The device's pinned ring is kept between reads (F1): free it, then nothing may be left.
void check_no_leaks(const char* what) {
  release_pinned();
  CHECK(fake_cuda::live_host() == 0 && fake_cuda::live_events() == 0 && fake_cuda::live_streams() == 0,
        "%s: leaked %d pinned buffers, %d events, %d streams", what, fake_cuda::live_host(),
        fake_cuda::live_events(), fake_cuda::live_streams());
}

struct Case {
  const char* name;
  uint64_t off, len, chunk;
  int threads, streams;
  uint64_t pinned, block;
  bool direct;
};

ReadStats run(const Case& c, std::vector<uint8_t>& dev, const std::vector<uint32_t>& crcs, CancelToken* cancel,
              int device = 0) {
  ReadOptions o;
  o.chunk_bytes = c.chunk;
  o.threads = c.threads;
  o.direct = c.direct;
  o.block_bytes = crcs.empty() ? 0 : c.block;
  o.block_crcs = crcs;
  dev.assign(c.len + 64, 0xEE);  // 64 guard bytes past the end must stay untouched
  return read_to_device(g_path, c.off, device, dev.data(), c.len, o, c.pinned, c.streams, cancel);
}

const Case kIntact[] = {
    // name, offset, length, chunk, threads, streams, pinned, block (0 = no checksums), direct
    {"aligned, no checksums", 0, 3u << 20, 16384, 4, 3, 65536, 0, false},
    // Direct reads need 4096-aligned file offsets (reader.cpp opens the file O_DIRECT): callers only
    // read unaligned offsets buffered (the follow path).
    {"unaligned offset and length, checksums, buffered", 12345, (1u << 20) + 777, 8192, 3, 2, 32768, 65536, false},
    {"aligned offset, unaligned length, checksums, direct", 8192, (1u << 20) + 777, 8192, 3, 2, 32768, 65536, true},
    {"4 KiB chunks, many blocks, slots = 2/thread", 20480, (2u << 20) + 4096 * 3 + 5, 4096, 8, 4, 0, 12288, true},
    {"one thread, one stream", 4096, 700001, 4096, 1, 1, 8192, 0, true},
    {"more threads than units", 7, 10000, 8192, 16, 4, 1u << 20, 8192, false},
};

void test_intact() {
  for (const auto& c : kIntact) {
    fake_cuda::reset();
    std::vector<uint8_t> dev;
    auto crcs = c.block ? block_crcs(c.off, c.len, c.block) : std::vector<uint32_t>{};
    ReadStats st = run(c, dev, crcs, nullptr);
    CHECK(st.bytes == c.len, "%s: bytes %llu", c.name, static_cast<unsigned long long>(st.bytes));
    CHECK(std::memcmp(dev.data(), g_data.data() + c.off, c.len) == 0, "%s: data differs", c.name);
    bool guard = true;
    for (size_t i = c.len; i < dev.size(); i++) guard &= dev[i] == 0xEE;
    CHECK(guard, "%s: wrote past the end", c.name);
    uint64_t chunks = 0;
    uint64_t unit = c.block ? c.block : c.chunk;
    for (uint64_t s = 0; s < c.len; s += unit) chunks += (std::min(unit, c.len - s) + c.chunk - 1) / c.chunk;
    CHECK(fake_cuda::calls("cudaMemcpyAsync") == static_cast<int>(chunks), "%s: %d copies, expected %llu", c.name,
          fake_cuda::calls("cudaMemcpyAsync"), static_cast<unsigned long long>(chunks));
    check_no_leaks(c.name);
    std::printf("ok   intact: %s (%d copies)\n", c.name, fake_cuda::calls("cudaMemcpyAsync"));
  }
}

const Case kSmall = {"small", 4096, (1u << 20) + 100, 8192, 4, 3, 32768, 32768, true};

void test_checksum_mismatch() {
  fake_cuda::reset();
  std::vector<uint8_t> dev;
  auto crcs = block_crcs(kSmall.off, kSmall.len, kSmall.block);
  crcs[5] ^= 1;
  bool thrown = false;
  try {
    run(kSmall, dev, crcs, nullptr);
  } catch (const ChecksumMismatch& e) {
    thrown = true;
    CHECK(e.block == 5 && e.offset == kSmall.off + 5 * kSmall.block && e.expected == crcs[5] && e.actual != e.expected,
          "mismatch fields: block %llu offset %llu", static_cast<unsigned long long>(e.block),
          static_cast<unsigned long long>(e.offset));
  }
  CHECK(thrown, "a wrong block checksum did not raise ChecksumMismatch");
  check_no_leaks("checksum mismatch");
  std::printf("ok   checksum mismatch raises ChecksumMismatch(block 5)\n");
}

void test_cancel() {
  for (int when : {0, 1, 20}) {
    fake_cuda::reset();
    CancelToken token;
    if (when == 0) token.cancel();
    else fake_cuda::on_memcpy([&, when](int k) { if (k == when) token.cancel(); });
    std::vector<uint8_t> dev;
    bool thrown = false;
    try {
      run(kSmall, dev, {}, &token);
    } catch (const Cancelled&) {
      thrown = true;
    }
    CHECK(thrown, "cancel at copy %d: no Cancelled", when);
    int copies = fake_cuda::calls("cudaMemcpyAsync");
    CHECK(copies < static_cast<int>(kSmall.len / kSmall.chunk), "cancel at copy %d: all %d copies ran", when, copies);
    if (when == 0) CHECK(copies == 0, "cancelled before the read, yet %d copies", copies);
    check_no_leaks("cancel");
    fake_cuda::reset();
    std::printf("ok   cancel %s copy %d stops the read after %d copies\n", when ? "at" : "before", when, copies);
  }
}

struct Inject {
  const char* api;
  int nth;
};

const Inject kInject[] = {
    {"cudaSetDevice", 1},        {"cudaSetDevice", 2},        {"cudaHostAlloc", 1},
    {"cudaStreamCreate", 1},     {"cudaMemcpyAsync", 1},      {"cudaMemcpyAsync", 7},
    {"cudaEventRecord", 1},      {"cudaEventRecord", 9},      {"cudaEventSynchronize", 1},
    {"cudaEventSynchronize", 5},
    // Part-way through setting up the ring and the streams, and the final synchronize: the
    // slots, events and streams made before the failure are released (review finding F4).
    {"cudaGetDevice", 1},
    {"cudaEventCreate", 1},      {"cudaEventCreate", 4},      {"cudaStreamCreate", 2},
    {"cudaStreamCreate", 3},     {"cudaStreamSynchronize", 1}, {"cudaStreamSynchronize", 2},
};

void test_injected_failures() {
  for (const auto& inj : kInject) {
    fake_cuda::reset();
    fake_cuda::fail_at(inj.api, inj.nth);
    std::vector<uint8_t> dev;
    std::string msg;
    try {
      run(kSmall, dev, {}, nullptr);
    } catch (const std::runtime_error& e) {
      msg = e.what();
    }
    std::string name = inj.api;
    CHECK(msg.find("CUDA error in " + name) != std::string::npos, "%s #%d: error was '%s'", inj.api, inj.nth,
          msg.c_str());
    fake_cuda::reset();
    check_no_leaks(inj.api);
    std::printf("ok   injected failure of %s #%d raises and leaks nothing\n", inj.api, inj.nth);
  }
}

void test_zero_length_and_range() {
  fake_cuda::reset();
  std::vector<uint8_t> dev;
  Case z = kSmall;
  z.len = 0;
  ReadStats st = run(z, dev, {}, nullptr);
  CHECK(st.bytes == 0, "zero-length read: %llu bytes", static_cast<unsigned long long>(st.bytes));
  CHECK(fake_cuda::calls("cudaMemcpyAsync") == 0, "zero-length read made copies");
  for (uint8_t b : dev) CHECK(b == 0xEE, "zero-length read wrote");
  check_no_leaks("zero length");
  std::printf("ok   zero-length read\n");

  Case past = kSmall;
  past.off = g_data.size() - 100;
  past.len = 101;
  bool thrown = false;
  try {
    run(past, dev, {}, nullptr);
  } catch (const IoError& e) {
    thrown = e.err == ENODATA;
  }
  CHECK(thrown, "a range past the end of the file did not raise IoError(ENODATA)");
  check_no_leaks("range past end");
  std::printf("ok   range past the end raises IoError(ENODATA)\n");
}

int current_device() {
  int d = -1;
  cudaGetDevice(&d);
  return d;
}

// The caller's current device is the same after a read on another device, failed or not (F5).
void test_device_restored() {
  fake_cuda::reset();
  std::vector<uint8_t> dev;
  cudaSetDevice(1);
  run(kSmall, dev, {}, nullptr, 0);
  CHECK(std::memcmp(dev.data(), g_data.data() + kSmall.off, kSmall.len) == 0, "read on device 0: data differs");
  CHECK(current_device() == 1, "after a read on device 0 the caller is on device %d, was 1", current_device());
  fake_cuda::fail_at("cudaMemcpyAsync", 3);
  bool thrown = false;
  try {
    run(kSmall, dev, {}, nullptr, 0);
  } catch (const std::runtime_error&) {
    thrown = true;
  }
  CHECK(thrown && current_device() == 1, "after a failed read on device 0 the caller is on device %d", current_device());
  fake_cuda::reset();
  cudaSetDevice(0);
  run(kSmall, dev, {}, nullptr, 1);
  CHECK(std::memcmp(dev.data(), g_data.data() + kSmall.off, kSmall.len) == 0, "read on device 1: data differs");
  CHECK(current_device() == 0, "after a read on device 1 the caller is on device %d, was 0", current_device());
  thrown = false;
  try {
    run(kSmall, dev, {}, nullptr, 7);
  } catch (const std::runtime_error& e) {
    thrown = std::string(e.what()).find("cudaSetDevice") != std::string::npos;
  }
  CHECK(thrown && current_device() == 0, "a read on a missing device: thrown %d, device %d", thrown, current_device());
  check_no_leaks("device");
  std::printf("ok   the caller's current device is restored after reads on another device\n");
}

// The pinned ring is allocated once (one allocation), reused by later reads on the device,
// sized to the read when that is smaller than the budget, and safe to share between threads (F1).
void test_ring_reused() {
  release_pinned();
  fake_cuda::reset();
  std::vector<uint8_t> dev;
  for (int i = 0; i < 3; i++) {
    run(kSmall, dev, {}, nullptr);
    CHECK(std::memcmp(dev.data(), g_data.data() + kSmall.off, kSmall.len) == 0, "read %d: data differs", i);
  }
  CHECK(fake_cuda::calls("cudaHostAlloc") == 1, "3 reads pinned %d times", fake_cuda::calls("cudaHostAlloc"));
  CHECK(fake_cuda::live_host() == 1 && fake_cuda::live_streams() == 0, "between reads: %d rings, %d streams",
        fake_cuda::live_host(), fake_cuda::live_streams());
  // A checksum failure or a cancel keeps the ring; a CUDA failure frees it.
  auto crcs = block_crcs(kSmall.off, kSmall.len, kSmall.block);
  crcs[2] ^= 1;
  try {
    run(kSmall, dev, crcs, nullptr);
  } catch (const ChecksumMismatch&) {
  }
  CHECK(fake_cuda::live_host() == 1 && fake_cuda::calls("cudaHostAlloc") == 1, "ring not kept after a bad checksum");
  fake_cuda::fail_at("cudaMemcpyAsync", 2);
  try {
    run(kSmall, dev, {}, nullptr);
  } catch (const std::runtime_error&) {
  }
  CHECK(fake_cuda::live_host() == 0, "ring kept after a CUDA error");
  check_no_leaks("ring reuse");

  // Small reads pin only their chunks: one 8 KiB chunk with a 1 MiB budget, then nothing for 0 bytes.
  fake_cuda::reset();
  Case one = {"one chunk", 0, 8192, 8192, 4, 2, 1u << 20, 0, false};
  run(one, dev, {}, nullptr);
  CHECK(fake_cuda::live_host_bytes() == 8192, "a one-chunk read pinned %zu bytes", fake_cuda::live_host_bytes());
  release_pinned();
  Case none = one;
  none.len = 0;
  run(none, dev, {}, nullptr);
  CHECK(fake_cuda::calls("cudaHostAlloc") == 1 && fake_cuda::live_host() == 0, "a zero-length read pinned memory");
  // A larger read replaces a ring that is too small.
  run(kSmall, dev, {}, nullptr);
  CHECK(fake_cuda::live_host() == 1 && fake_cuda::live_host_bytes() == 8 * kSmall.chunk,
        "after a larger read: %d rings, %zu bytes", fake_cuda::live_host(), fake_cuda::live_host_bytes());
  check_no_leaks("ring sizing");

  // Concurrent reads on one device: one takes the cached ring, the others pin their own.
  fake_cuda::reset();
  std::vector<std::thread> ts;
  std::atomic<int> bad{0};
  for (int t = 0; t < 3; t++) {
    ts.emplace_back([&, t] {
      std::vector<uint8_t> d;
      for (int i = 0; i < 3; i++) {
        Case c = kSmall;
        c.off = kSmall.off + 4096u * static_cast<unsigned>(t);
        run(c, d, {}, nullptr);
        if (std::memcmp(d.data(), g_data.data() + c.off, c.len) != 0) bad++;
      }
    });
  }
  for (auto& th : ts) th.join();
  CHECK(bad == 0, "%d concurrent reads returned wrong data", bad.load());
  CHECK(fake_cuda::live_host() == 1, "after concurrent reads %d rings are kept", fake_cuda::live_host());
  check_no_leaks("concurrent reads");
  std::printf("ok   the pinned ring is pinned once, reused, sized to the read, shared safely (%d allocations "
              "for 9 concurrent reads)\n", fake_cuda::calls("cudaHostAlloc"));
}

// Pinned memory that is not 4096-aligned cannot take direct reads: the read goes buffered, says
// why, and the data is intact (F3). A refused direct read (EINVAL/EFAULT) takes the same switch.
void test_misaligned_ring() {
  const Case& c = kIntact[2];  // aligned offset, unaligned length, checksums, direct
  auto crcs = block_crcs(c.off, c.len, c.block);
  std::vector<uint8_t> dev;
  release_pinned();
  fake_cuda::reset();
  ReadStats aligned = run(c, dev, crcs, nullptr);
  CHECK(aligned.direct_fallback.empty(), "an aligned ring fell back: %s", aligned.direct_fallback.c_str());
  release_pinned();
  fake_cuda::set_host_misalign(512);
  ReadStats st = run(c, dev, crcs, nullptr);
  fake_cuda::set_host_misalign(0);
  CHECK(std::memcmp(dev.data(), g_data.data() + c.off, c.len) == 0, "misaligned ring: data differs");
  CHECK(!st.direct, "a misaligned ring still read direct");
  if (aligned.direct)  // the scratch file system takes O_DIRECT: the fallback must say why
    CHECK(st.direct_fallback.find("not 4096-aligned") != std::string::npos, "fallback reason: '%s'",
          st.direct_fallback.c_str());
  check_no_leaks("misaligned ring");
  std::printf("ok   a misaligned pinned ring reads buffered (direct before: %d, reason: %s)\n", aligned.direct,
              st.direct_fallback.c_str());
}

// cuda_error() is empty with a device and names the CUDA error and versions without one (F9).
void test_cuda_error() {
  fake_cuda::reset();
  CHECK(cuda_error().empty(), "with devices: '%s'", cuda_error().c_str());
  fake_cuda::set_device_count(0);
  std::string none = cuda_error();
  fake_cuda::set_device_count(2);
  CHECK(none.find("cudaErrorNoDevice: ") == 0 && none.find("runtime is 13.0, the driver supports none") != std::string::npos,
        "without devices: '%s'", none.c_str());
  fake_cuda::fail_at("cudaGetDeviceCount", 1);
  std::string failed = cuda_error();
  CHECK(failed.find("cudaErrorUnknown: ") == 0, "a failing runtime: '%s'", failed.c_str());
  CHECK(cuda_device_count() == 2, "the failure stuck: %d devices", cuda_device_count());
  fake_cuda::reset();
  std::printf("ok   cuda_error: '%s' / '%s'\n", none.c_str(), failed.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <scratch dir>\n", argv[0]);
    return 2;
  }
  g_dir = argv[1];
  make_file((4u << 20) + 12345);
  for (auto* t : {test_intact, test_checksum_mismatch, test_cancel, test_injected_failures, test_zero_length_and_range,
                 test_device_restored, test_ring_reused, test_misaligned_ring, test_cuda_error}) {
    try {
      t();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "FAIL: unexpected exception: %s\n", e.what());
      g_failures++;
    }
  }
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all fake-CUDA checks passed\n");
  return 0;
}
