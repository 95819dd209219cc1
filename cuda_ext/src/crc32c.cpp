// crc32c (Castagnoli), the per-block checksum of partitions. SSE4.2's crc32 instruction
// when the CPU has it (three interleaved streams), a slicing table otherwise.
#include <cstring>

#include "common.h"
#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace sllm {
namespace {

struct Table {
  uint32_t t[8][256];
  Table() {
    for (uint32_t i = 0; i < 256; i++) {
      uint32_t c = i;
      for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
      for (int s = 1; s < 8; s++) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xff];
  }
};
const Table& table() {
  static const Table tb;
  return tb;
}

uint32_t crc_sw(uint32_t crc, const uint8_t* p, size_t n) {
  const auto& t = table().t;
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    v ^= crc;
    crc = t[7][v & 0xff] ^ t[6][(v >> 8) & 0xff] ^ t[5][(v >> 16) & 0xff] ^ t[4][(v >> 24) & 0xff] ^
          t[3][(v >> 32) & 0xff] ^ t[2][(v >> 40) & 0xff] ^ t[1][(v >> 48) & 0xff] ^ t[0][v >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) crc = t[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return crc;
}

// Shifting a raw crc register past `len` zero bytes is linear over GF(2): a 32x32 matrix,
// applied bytewise through four 256-entry tables. Used to combine independent streams.
struct Shift {
  uint32_t t[4][256];
  static void mat_times(uint32_t* out, const uint32_t* mat, const uint32_t* vecs, int n) {
    for (int i = 0; i < n; i++) {
      uint32_t v = vecs[i], r = 0;
      for (int b = 0; v; b++, v >>= 1)
        if (v & 1) r ^= mat[b];
      out[i] = r;
    }
  }
  explicit Shift(size_t len) {
    // op = the operator for one zero bit, squared up to one zero byte, then to len bytes.
    uint32_t op[32], sq[32], acc[32];
    op[0] = 0x82F63B78u;
    for (int b = 1; b < 32; b++) op[b] = 1u << (b - 1);
    for (int k = 0; k < 3; k++) {  // 1 bit -> 8 bits
      mat_times(sq, op, op, 32);
      std::memcpy(op, sq, sizeof op);
    }
    for (int b = 0; b < 32; b++) acc[b] = 1u << b;  // identity
    for (size_t n = len; n; n >>= 1) {
      if (n & 1) {
        mat_times(sq, op, acc, 32);
        std::memcpy(acc, sq, sizeof acc);
      }
      mat_times(sq, op, op, 32);
      std::memcpy(op, sq, sizeof op);
    }
    for (int k = 0; k < 4; k++)
      for (uint32_t i = 0; i < 256; i++) {
        uint32_t v = i << (8 * k), r = 0;
        for (int b = 0; v; b++, v >>= 1)
          if (v & 1) r ^= acc[b];
        t[k][i] = r;
      }
  }
  uint32_t operator()(uint32_t c) const {
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
  }
};

constexpr size_t kStream = 8192;  // bytes per stream per round (3 streams in flight)

const Shift& shift_stream() {
  static const Shift s(kStream);
  return s;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t crc_hw(uint32_t crc, const uint8_t* p, size_t n) {
  // Three independent crc32 chains hide the instruction's 3-cycle latency.
  const Shift& shift = shift_stream();
  while (n >= 3 * kStream) {
    uint64_t c0 = crc, c1 = 0, c2 = 0;
    for (size_t i = 0; i < kStream; i += 8) {
      uint64_t v0, v1, v2;
      std::memcpy(&v0, p + i, 8);
      std::memcpy(&v1, p + kStream + i, 8);
      std::memcpy(&v2, p + 2 * kStream + i, 8);
      c0 = _mm_crc32_u64(c0, v0);
      c1 = _mm_crc32_u64(c1, v1);
      c2 = _mm_crc32_u64(c2, v2);
    }
    uint32_t r = shift(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
    crc = shift(r) ^ static_cast<uint32_t>(c2);
    p += 3 * kStream;
    n -= 3 * kStream;
  }
  uint64_t c = crc;
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return c32;
}
#endif

}  // namespace

bool crc32c_hardware() {
#if defined(__x86_64__)
  static const bool hw = __builtin_cpu_supports("sse4.2");
  return hw;
#else
  return false;
#endif
}

uint32_t crc32c(uint32_t crc, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
#if defined(__x86_64__)
  crc = crc32c_hardware() ? crc_hw(crc, p, n) : crc_sw(crc, p, n);
#else
  crc = crc_sw(crc, p, n);
#endif
  return ~crc;
}

}  // namespace sllm
