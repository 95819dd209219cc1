// Batch-invariant bf16 linear layers for CPUs with AVX512-BF16, and with AMX.
//
// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]): bf16 inputs, float32 accumulation, one rounding
// to bf16 at the end. Every output element has its own accumulator and goes through the same
// instruction sequence whatever the number of rows M and whichever block it falls in: one
// vdpbf16ps per 32 values of k, in k order, the last partial block zero-masked, then the 16
// lanes summed in one fixed order (reduce16), then the bias, then the rounding. So a row's result depends on
// its own inputs only, never on how many other rows share the call (exact numerics, see
// functions/llm/numerics.py), without padding a single decode row to a 16-row tile.
//
// Why it exists: on a CPU without AMX, oneDNN's bf16 product costs about as much for 1 row as
// torch charges for 16 padded rows (measured: [1, 576] @ [576, 1536] 151 us, 16 rows 471 us),
// and exact numerics needs one fixed row count for every call (with AMX oneDNN re-lays the
// weight out on every call, and the AMX form below is 2-4x faster than its tiles). Blocking: 16 zmm accumulators
// (1 input row x 16 weight rows, 2 x 8, or 4 x 4), summed together by one shuffle tree; the
// weight rows are the outer loop, so they stay in L1 while every input row passes over them,
// and one decode row streams the weights once.
//
// AMX (amx_columns below, `amx` in bf16_linear): on a CPU with AMX-BF16 the same contract, computed by tile products.
// The weight is the A operand as it lies in memory (16 weight rows x 32 values of k per tile,
// loaded with the row stride), the input rows are the B operand (packed once per call into
// AMX's pair layout, 16 input rows per tile, zero past M and past K), and each output element
// accumulates one TDPBF16PS per 32 values of k, in k order, in its own float32 lane of a C tile;
// then the bias and the same rounding as above. An element's sequence depends on K only, never
// on M, on the tile it shares or on the thread, so it is batch invariant by construction too.
// Its bits differ from the AVX512 kernel's (another summation order): the two are separate
// `linear` choices, and the numerics fingerprint names which one ran.
//
// Threads: a call may run on several (`threads`: the caller and up to threads - 1 workers of a
// persistent pool, LinearPool below). The work is cut only into whole blocks of NB weight rows
// (the same blocks, padded last block included, as on one thread) and into the products of a
// batched call, never along k, so each output element still goes through its one block and
// instruction sequence: the bits do not depend on the thread count or on which thread ran what.
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "common.h"

// GCC 11 is the first with the AMX intrinsics (the AVX512-BF16 ones came in 10); an older
// compiler builds neither kernel, and both report themselves unsupported.
#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 11 || defined(__clang__))
#define SLLM_BF16_KERNEL 1
// GCC 12's AVX-512 headers initialize a temporary from itself (`__m256d __Y = __Y;`, GCC bug
// 105593), which -Wuninitialized reports at every inlined use; the warning is about the header.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif

namespace sllm {

#ifdef SLLM_BF16_KERNEL
namespace {

#define SLLM_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Calls under this many flops (2 M N K batch) stay on the calling thread whatever `threads` says.
constexpr double kParallelFlops = 1 << 18;
// At most this many units (ranges of items) per thread of a call.
constexpr int kUnitsPerThread = 8;

// The lane where reduce16 puts accumulator p's sum.
constexpr int lane_of(int p) { return 4 * (p % 4) + p / 4; }

// The sums of 16 accumulators at once, accumulator p's in lane lane_of(p). Every accumulator's
// 16 lanes L are added in the same order whatever its position: P8[k] = L[k] + L[k + 8], then
// P4[k] = P8[k] + P8[k + 4], P2[k] = P4[k] + P4[k + 2], and P2[0] + P2[1]; each level pairs
// two vectors' halves with one shuffle each way and one add.
SLLM_BF16_TARGET inline __m512 reduce16(const __m512 (&v)[16]) {
  __m512 s1[8], s2[4], s3[2];
  for (int q = 0; q < 8; q++)  // [a.lo256, b.lo256] + [a.hi256, b.hi256]
    s1[q] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * q], v[2 * q + 1], 0x44),
                          _mm512_shuffle_f32x4(v[2 * q], v[2 * q + 1], 0xEE));
  for (int r = 0; r < 4; r++)  // 128-bit blocks 0, 2 + blocks 1, 3: four accumulators, 4 partials each
    s2[r] = _mm512_add_ps(_mm512_shuffle_f32x4(s1[2 * r], s1[2 * r + 1], 0x88),
                          _mm512_shuffle_f32x4(s1[2 * r], s1[2 * r + 1], 0xDD));
  for (int t = 0; t < 2; t++)  // within each block: lanes 0, 1 + lanes 2, 3
    s3[t] = _mm512_add_ps(_mm512_shuffle_ps(s2[2 * t], s2[2 * t + 1], 0x44),
                          _mm512_shuffle_ps(s2[2 * t], s2[2 * t + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(s3[0], s3[1], 0x88), _mm512_shuffle_ps(s3[0], s3[1], 0xDD));
}

// The weight row j (of NB) of the accumulator whose sum reduce16 puts in lane L: accumulator
// p = lane_of(L) (the map is its own inverse), j = p % NB.
template <int NB>
constexpr int bias_lane(int L) { return lane_of(L) % NB; }

// MB input rows x NB weight rows of outputs (MB * NB == 16), accumulator p = i * NB + j. Rows
// past the valid ones repeat the last valid row (x_rows, w_rows), and their outputs are not
// stored: a block shape never changes an accumulator's instruction sequence. With PF, the loop
// also prefetches the next block's weight rows (pf) into L2, one line of each per 32 values of
// k: the model's weights come from L3 or memory, and hiding that behind this block's products
// took SmolLM2-135M's 30 layers of linear products (random weights) plus its LM head for one row
// from 135-152 to 111-126 ms for 32 rows and from 27-33 to 22-27 ms for one, one thread
// (interleaved A/B, two runs, a shared machine, 2026-12-06). A prefetch changes no arithmetic.
template <int MB, int NB, bool PF>
SLLM_BF16_TARGET inline void block(const uint16_t* const (&xr)[MB], int mvalid, const uint16_t* const (&wr)[NB],
                                   int nvalid, const uint16_t* bias, uint16_t* y, int64_t ldy, int64_t K,
                                   const uint16_t* const (&pf)[NB]) {
  static_assert(MB * NB == 16, "one reduce16 per block");
  __m512 acc[16];
  for (int p = 0; p < 16; p++) acc[p] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if constexpr (PF)
      for (int j = 0; j < NB; j++) _mm_prefetch(reinterpret_cast<const char*>(pf[j] + k), _MM_HINT_T1);
    __m512i wv[NB];
    for (int j = 0; j < NB; j++) wv[j] = _mm512_loadu_si512(wr[j] + k);
    for (int i = 0; i < MB; i++) {
      const __m512i xv = _mm512_loadu_si512(xr[i] + k);
      for (int j = 0; j < NB; j++) acc[i * NB + j] = _mm512_dpbf16_ps(acc[i * NB + j], (__m512bh)xv, (__m512bh)wv[j]);
    }
  }
  if (k < K) {  // the last K % 32 values, the rest of the vector zero: adds exact zeros
    const __mmask32 mask = static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512i wv[NB];
    for (int j = 0; j < NB; j++) wv[j] = _mm512_maskz_loadu_epi16(mask, wr[j] + k);
    for (int i = 0; i < MB; i++) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, xr[i] + k);
      for (int j = 0; j < NB; j++) acc[i * NB + j] = _mm512_dpbf16_ps(acc[i * NB + j], (__m512bh)xv, (__m512bh)wv[j]);
    }
  }
  __m512 sums = reduce16(acc);
  if (bias) {  // bias[j] as float32 (exact) in the lanes of accumulators i * NB + j; 0 past nvalid
    const __m512i lanes = _mm512_set_epi32(
        bias_lane<NB>(15), bias_lane<NB>(14), bias_lane<NB>(13), bias_lane<NB>(12), bias_lane<NB>(11),
        bias_lane<NB>(10), bias_lane<NB>(9), bias_lane<NB>(8), bias_lane<NB>(7), bias_lane<NB>(6), bias_lane<NB>(5),
        bias_lane<NB>(4), bias_lane<NB>(3), bias_lane<NB>(2), bias_lane<NB>(1), bias_lane<NB>(0));
    const __m256i b16 = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << nvalid) - 1), bias);
    const __m512 b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b16), 16));
    sums = _mm512_add_ps(sums, _mm512_permutexvar_ps(lanes, b));
  }
  // float32 -> bf16, round to nearest even (denormals flushed to zero, a NaN stays a NaN); then the
  // outputs in row-major order (accumulator p from lane lane_of(p)), a row's NB at once
  const __m256i order = _mm256_set_epi16(lane_of(15), lane_of(14), lane_of(13), lane_of(12), lane_of(11), lane_of(10),
                                         lane_of(9), lane_of(8), lane_of(7), lane_of(6), lane_of(5), lane_of(4),
                                         lane_of(3), lane_of(2), lane_of(1), lane_of(0));
  alignas(32) uint16_t out[16];
  const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(sums);
  _mm256_store_si256(reinterpret_cast<__m256i*>(out), _mm256_permutexvar_epi16(order, rounded));
  if (nvalid == NB) {
    for (int i = 0; i < mvalid; i++) std::memcpy(y + i * ldy, out + i * NB, NB * sizeof(uint16_t));
  } else {
    for (int i = 0; i < mvalid; i++)
      for (int j = 0; j < nvalid; j++) y[i * ldy + j] = out[i * NB + j];
  }
}

// Every row of x against weight-row blocks nb0 .. nb1 - 1 of one product (block b: weight rows
// b * NB .. b * NB + NB - 1, fewer in the last block of N), MB rows at a time. A thread's share is
// a range of whole blocks, so every output goes through the block it has single-threaded. The
// first MB rows against a block prefetch the next block's weight rows (clamped to the last row)
// when the weights are over 64 KiB: a small product's (a decode row's keys) are in cache already.
template <int MB, int NB>
SLLM_BF16_TARGET void columns(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N,
                              const uint16_t* bias, uint16_t* y, int64_t nb0, int64_t nb1) {
  const bool prefetch = N * K * 2 > (64 << 10);
  for (int64_t n = nb0 * NB; n < nb1 * NB && n < N; n += NB) {
    const int nvalid = static_cast<int>(N - n < NB ? N - n : NB);
    const uint16_t* wr[NB];
    const uint16_t* next[NB];
    for (int j = 0; j < NB; j++) {
      wr[j] = w + (n + (j < nvalid ? j : nvalid - 1)) * K;
      next[j] = w + (n + NB + j < N ? n + NB + j : N - 1) * K;
    }
    const uint16_t* b = bias ? bias + n : nullptr;
    for (int64_t m = 0; m < M; m += MB) {
      const int mvalid = static_cast<int>(M - m < MB ? M - m : MB);
      const uint16_t* xr[MB];
      for (int i = 0; i < MB; i++) xr[i] = x + (m + (i < mvalid ? i : mvalid - 1)) * K;
      if (m == 0 && prefetch) block<MB, NB, true>(xr, mvalid, wr, nvalid, b, y + m * N + n, N, K, next);
      else block<MB, NB, false>(xr, mvalid, wr, nvalid, b, y + m * N + n, N, K, next);
    }
  }
}

#define SLLM_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

// AMX tiles: 0-3 the C tiles (2 weight-row halves x 2 input-row blocks, c = 2 * half + block),
// 4-5 the A tiles (the two halves of 32 weight rows), 6-7 the B tiles (two blocks of 16 input
// rows); every tile 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

SLLM_AMX_TARGET inline void amx_configure() {
  TileConfig c;
  for (int t = 0; t < 8; t++) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  _tile_loadconfig(&c);
}

// x [M, K] into B tiles: [ceil(M / 16) blocks][ceil(K / 32) k tiles][16 pairs of k][16 rows], one
// 32-bit word per (pair, row): x[m][2p] in its low half, x[m][2p + 1] in its high half. Zero past M
// and past K, so the padding multiplies to exact zeros.
void amx_pack(const uint16_t* x, int64_t M, int64_t K, uint32_t* out) {
  const int64_t mblocks = (M + 15) / 16, ktiles = (K + 31) / 32;
  std::memset(out, 0, static_cast<size_t>(mblocks * ktiles * 256) * sizeof(uint32_t));
  for (int64_t m = 0; m < M; m++) {
    const uint16_t* row = x + m * K;
    uint32_t* base = out + (m / 16) * ktiles * 256 + (m % 16);
    for (int64_t k = 0; k < K; k += 2) {
      const uint32_t hi = k + 1 < K ? row[k + 1] : 0;
      base[(k / 32) * 256 + ((k % 32) / 2) * 16] = row[k] | (hi << 16);
    }
  }
}

// Weight rows n0 .. n0 + 15 (those under N; zero rows past it), k values from k0 (zero past K),
// as one A tile's 16 x 32 values in `tile`.
inline void amx_a_scratch(const uint16_t* w, int64_t N, int64_t K, int64_t n0, int64_t k0, uint16_t* tile) {
  std::memset(tile, 0, 16 * 32 * sizeof(uint16_t));
  const int64_t kn = K - k0 < 32 ? K - k0 : 32;
  for (int r = 0; r < 16 && n0 + r < N; r++) std::memcpy(tile + r * 32, w + (n0 + r) * K + k0, kn * sizeof(uint16_t));
}

// The four C tiles (c[2 * half + block] [16 weight rows][16 input rows], float32), plus the bias,
// rounded to bf16 and stored as y rows: input row b0 * 16 + j, weight row n0 + 16 * half + i.
SLLM_AMX_TARGET inline void amx_store(const float (&c)[4][16][16], int halves, int blocks, int64_t b0, int64_t n0,
                                      int64_t M, int64_t N, const uint16_t* bias, uint16_t* y) {
  for (int h = 0; h < halves; h++) {
    const int64_t n = n0 + 16 * h;
    const int nvalid = static_cast<int>(N - n < 16 ? N - n : 16);
    for (int bl = 0; bl < blocks; bl++) {
      const int64_t m0 = (b0 + bl) * 16;
      const int mvalid = static_cast<int>(M - m0 < 16 ? M - m0 : 16);
      alignas(32) uint16_t out[16][16];  // [weight row i][input row j]
      for (int i = 0; i < nvalid; i++) {
        __m512 sums = _mm512_load_ps(c[2 * h + bl][i]);
        if (bias) {
          const uint32_t b = static_cast<uint32_t>(bias[n + i]) << 16;
          float bf;
          std::memcpy(&bf, &b, sizeof(bf));
          sums = _mm512_add_ps(sums, _mm512_set1_ps(bf));
        }
        _mm256_store_si256(reinterpret_cast<__m256i*>(out[i]), (__m256i)_mm512_cvtneps_pbh(sums));
      }
      for (int j = 0; j < mvalid; j++)
        for (int i = 0; i < nvalid; i++) y[(m0 + j) * N + n + i] = out[i][j];
    }
  }
}

// Every input row against weight-row blocks nb0 .. nb1 - 1 of one product (block b: weight rows
// 32 b .. 32 b + 31), 32 input rows at a time. A full half of 16 weight rows is loaded straight
// from the weight (stride K); a half past N, and the last k tile when K % 32 != 0, from a zero-
// padded copy. The first pass over a block prefetches the next block's rows into L2.
SLLM_AMX_TARGET void amx_columns(const uint32_t* packed, int64_t M, int64_t K, const uint16_t* w, int64_t N,
                                 const uint16_t* bias, uint16_t* y, int64_t nb0, int64_t nb1) {
  const int64_t mblocks = (M + 15) / 16, ktiles = (K + 31) / 32, kfull = K / 32;
  const int64_t stride = K * static_cast<int64_t>(sizeof(uint16_t));
  alignas(64) uint16_t scratch[2][16 * 32];
  alignas(64) float c[4][16][16];
  for (int64_t blk = nb0; blk < nb1; blk++) {
    const int64_t n0 = blk * 32;
    const int halves = N - n0 > 16 ? 2 : 1;
    const bool whole[2] = {N - n0 >= 16, N - n0 >= 32};  // the half's 16 rows all exist
    for (int64_t b0 = 0; b0 < mblocks; b0 += 2) {
      const int blocks = mblocks - b0 > 1 ? 2 : 1;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint32_t* p0 = packed + b0 * ktiles * 256;
      const uint32_t* p1 = p0 + ktiles * 256;
      for (int64_t t = 0; t < ktiles; t++) {
        if (b0 == 0 && n0 + 32 < N)
          for (int r = 0; r < 32 && n0 + 32 + r < N; r++)
            _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + 32 + r) * K + t * 32), _MM_HINT_T1);
        for (int h = 0; h < halves; h++) {
          if (whole[h] && t < kfull) continue;
          amx_a_scratch(w, N, K, n0 + 16 * h, t * 32, scratch[h]);
        }
        if (whole[0] && t < kfull) _tile_loadd(4, w + n0 * K + t * 32, stride);
        else _tile_loadd(4, scratch[0], 64);
        _tile_loadd(6, p0 + t * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (halves == 2) {
          if (whole[1] && t < kfull) _tile_loadd(5, w + (n0 + 16) * K + t * 32, stride);
          else _tile_loadd(5, scratch[1], 64);
          _tile_dpbf16ps(2, 5, 6);
        }
        if (blocks == 2) {
          _tile_loadd(7, p1 + t * 256, 64);
          _tile_dpbf16ps(1, 4, 7);
          if (halves == 2) _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      _tile_stored(2, c[2], 64);
      _tile_stored(3, c[3], 64);
      amx_store(c, halves, blocks, b0, n0, M, N, bias, y);
    }
  }
}

// Whether this process may use AMX tiles: the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX
// bits 24 and 22), and Linux grants the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM; the
// permission is the process's, kept by its threads and by a forked child).
bool amx_permitted() {
  unsigned a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  if (!((d >> 24) & 1) || !((d >> 22) & 1)) return false;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

// One call: `batch` products y[b] = x[b] @ w[b]^T (+ bias), cut into items, one item a product's
// block of NB weight rows (product-major). Any range of items can go to any thread: the items
// write disjoint outputs and each is computed exactly as single-threaded.
struct Problem {
  const uint16_t* x;
  const uint16_t* w;
  const uint16_t* bias;
  uint16_t* y;
  int64_t M, N, K, batch;
  int nb;           // weight rows per block: 16 for one input row, 8 for two, else 4; 32 with AMX
  int64_t nblocks;  // blocks per product
  int64_t wstride;  // elements from one product's weight to the next (N * K when they are packed)
  const uint32_t* packed = nullptr;  // AMX: x as B tiles (amx_pack), `pstride` words per product
  int64_t pstride = 0;

  // One input row streams 16 weight rows at once; two rows 8; more rows 4 by 4 (the weight rows
  // stay in L1 while every input row passes over them).
  Problem(const uint16_t* x_, const uint16_t* w_, const uint16_t* b_, uint16_t* y_, int64_t m, int64_t n, int64_t k,
          int64_t batch_, int64_t wstride_)
      : x(x_), w(w_), bias(b_), y(y_), M(m), N(n), K(k), batch(batch_), nb(m == 1 ? 16 : m == 2 ? 8 : 4),
        nblocks((n + nb - 1) / nb), wstride(wstride_) {}

  // The AMX form: blocks of 32 weight rows, x already packed (pstride words per product).
  Problem(const uint32_t* packed_, int64_t pstride_, const uint16_t* w_, const uint16_t* b_, uint16_t* y_, int64_t m,
          int64_t n, int64_t k, int64_t batch_, int64_t wstride_)
      : x(nullptr), w(w_), bias(b_), y(y_), M(m), N(n), K(k), batch(batch_), nb(32), nblocks((n + 31) / 32),
        wstride(wstride_), packed(packed_), pstride(pstride_) {}

  int64_t items() const { return batch * nblocks; }

  // Items [i0, i1), product by product.
  void run(int64_t i0, int64_t i1) const {
    if (packed) {
      run_amx(i0, i1);
      return;
    }
    while (i0 < i1) {
      const int64_t b = i0 / nblocks, nb0 = i0 % nblocks;
      const int64_t nb1 = nb0 + (i1 - i0) < nblocks ? nb0 + (i1 - i0) : nblocks;
      const uint16_t* xb = x + b * M * K;
      const uint16_t* wb = w + b * wstride;
      uint16_t* yb = y + b * M * N;
      if (M == 1) columns<1, 16>(xb, M, K, wb, N, bias, yb, nb0, nb1);
      else if (M == 2) columns<2, 8>(xb, M, K, wb, N, bias, yb, nb0, nb1);
      else columns<4, 4>(xb, M, K, wb, N, bias, yb, nb0, nb1);
      i0 += nb1 - nb0;
    }
  }

  // The same with AMX: this thread's tiles are configured for the range and released after it.
  SLLM_AMX_TARGET void run_amx(int64_t i0, int64_t i1) const {
    amx_configure();
    while (i0 < i1) {
      const int64_t b = i0 / nblocks, nb0 = i0 % nblocks;
      const int64_t nb1 = nb0 + (i1 - i0) < nblocks ? nb0 + (i1 - i0) : nblocks;
      amx_columns(packed + b * pstride, M, K, w + b * wstride, N, bias, y + b * M * N, nb0, nb1);
      i0 += nb1 - nb0;
    }
    _tile_release();
  }
};

// The worker threads of multi-threaded calls: a small persistent pool (std::thread, not OpenMP:
// torch brings its own OpenMP runtime). A call publishes its Problem under a new generation and
// computes with the workers: each claims units (ranges of items) from one atomic word that holds
// the generation, the next unit and the unit count, so a worker late for a generation can never
// claim a unit of the next one; the caller returns when every unit is done. A worker spins for
// kSpin (200 us) after its last unit, so the calls of a step find it awake, then sleeps on a
// condition variable: an idle engine leaves the cores alone. The caller computes too and never
// waits for a worker to wake, only for units a worker claimed (spinning, then sleeping: a worker
// preempted mid-unit may need the caller's core).
//
// One call at a time (dispatch(), a mutex: two Python threads may call at once). The pool is
// created on first use and never destroyed (no exit-time ordering; its threads are detached and
// end with the process). Fork: the child has none of the pool's threads, so a pthread_atfork
// handler holds the dispatch mutex across fork() (no call is half-published) and, in the child,
// forgets the pool; the child's first multi-threaded call starts a new one.
class LinearPool {
 public:
  // Measured on SmolLM2-135M's steps with 2 threads (interleaved, one process): with 50 us the
  // workers often slept between a step's calls (the gaps are torch's ops on the caller), and a
  // decode step took 29-31 ms (8 streams 58 ms); with 100-1000 us, 26-30 ms (48-53 ms).
  static constexpr auto kSpin = std::chrono::microseconds(200);

  // Runs `units` units of problem p, unit u = items [u * items / units, (u + 1) * items / units),
  // on the caller and parts - 1 workers. Called with dispatch() held.
  void run(const Problem& p, int64_t units, int parts) {
    grow(parts - 1);
    job_ = &p;
    done_.store(0, std::memory_order_relaxed);
    participants_.store(parts - 1, std::memory_order_relaxed);
    const uint64_t g = gen_.load(std::memory_order_relaxed) + 1;
    claim_.store((g << 32) | static_cast<uint64_t>(units), std::memory_order_release);
    gen_.store(g, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(mu_); }
      cv_.notify_all();
    }
    work(g);
    // The units other threads claimed: spin, then sleep (a worker preempted mid-unit may need
    // this core, and an idle core pulls it over sooner than a busy one).
    const auto start = std::chrono::steady_clock::now();
    for (int spins = 0; done_.load(std::memory_order_acquire) < units;) {
      _mm_pause();
      if (++spins % 64 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
        std::unique_lock<std::mutex> lk(mu_);
        caller_waits_.store(true, std::memory_order_seq_cst);
        while (done_.load(std::memory_order_seq_cst) < units) done_cv_.wait(lk);
        caller_waits_.store(false, std::memory_order_relaxed);
        break;
      }
    }
  }

  static std::mutex& dispatch() {
    static std::mutex* m = new std::mutex;  // never destroyed: a worker or atfork may outlive statics
    return *m;
  }

  static LinearPool& get() {
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork([] { dispatch().lock(); }, [] { dispatch().unlock(); }, [] {
                                current() = nullptr;  // its threads did not survive the fork (leaked)
                                dispatch().unlock();
                              }); });
    if (!current()) current() = new LinearPool;
    return *current();
  }

 private:
  static LinearPool*& current() {
    static LinearPool* p = nullptr;
    return p;
  }

  // Claim word: generation (high 32 bits), next unit (bits 16..31), unit count (low 16 bits).
  static constexpr uint64_t kNext = 1ull << 16;

  // Claims and computes units of generation g until none is left.
  void work(uint64_t g) {
    uint64_t c = claim_.load(std::memory_order_acquire);
    for (;;) {
      if ((c >> 32) != (g & 0xffffffffull)) return;
      const uint64_t u = (c >> 16) & 0xffff, units = c & 0xffff;
      if (u >= units) return;
      if (!claim_.compare_exchange_weak(c, c + kNext, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      // The unit is ours and not done, so the caller of g is still waiting: job_ is g's problem.
      const Problem& p = *job_;
      const int64_t items = p.items();
      p.run(static_cast<int64_t>(u) * items / static_cast<int64_t>(units),
            static_cast<int64_t>(u + 1) * items / static_cast<int64_t>(units));
      done_.fetch_add(1, std::memory_order_seq_cst);
      if (caller_waits_.load(std::memory_order_seq_cst)) {
        { std::lock_guard<std::mutex> lk(mu_); }
        done_cv_.notify_one();
      }
      c = claim_.load(std::memory_order_acquire);
    }
  }

  void grow(int workers) {
    while (static_cast<int>(count_) < workers) {
      const int index = static_cast<int>(count_);
      // Workers block every signal: Python's handlers run on its own threads.
      sigset_t all, old;
      sigfillset(&all);
      pthread_sigmask(SIG_SETMASK, &all, &old);
      try {
        std::thread worker([this, index] { loop(index); });
        pthread_setname_np(worker.native_handle(), "sllm-linear");  // named before the call returns
        worker.detach();
      } catch (...) {
        pthread_sigmask(SIG_SETMASK, &old, nullptr);
        throw;
      }
      pthread_sigmask(SIG_SETMASK, &old, nullptr);
      count_++;
    }
  }

  void loop(int index) {
    uint64_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      uint64_t g = gen_.load(std::memory_order_acquire);
      const auto start = std::chrono::steady_clock::now();
      for (int spins = 0; g == seen; g = gen_.load(std::memory_order_acquire)) {
        _mm_pause();
        if (++spins % 64 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lk(mu_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          while ((g = gen_.load(std::memory_order_seq_cst)) == seen) cv_.wait(lk);
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
          break;
        }
      }
      seen = g;
      if (index < participants_.load(std::memory_order_relaxed)) work(g);
    }
  }

  // The word the idle workers poll, apart from the words a call's threads write.
  alignas(64) std::atomic<uint64_t> gen_{0};
  alignas(64) std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> participants_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> caller_waits_{false};
  const Problem* job_ = nullptr;  // written before gen_ is published, read after a claim
  size_t count_ = 0;  // workers started (under dispatch())
  std::mutex mu_;
  std::condition_variable cv_;       // a new generation, for sleeping workers
  std::condition_variable done_cv_;  // the last unit done, for a sleeping caller
};

}  // namespace

bool bf16_linear_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

bool amx_linear_supported() {
  static const bool ok = bf16_linear_supported() && amx_permitted();
  return ok;
}

namespace {

// Runs a call's problem on up to `threads` threads (see bf16_linear).
void dispatch_problem(const Problem& p, double flops, int threads) {
  const int64_t items = p.items();
  // Threads only for calls worth it (a decode step makes about 400 calls, many of them small), and
  // at most kUnitsPerThread units per thread: enough to balance a busy core, few enough to share
  // one claim word.
  int parts = threads > 1 && flops >= kParallelFlops ? threads : 1;
  const int64_t units = std::min<int64_t>({items, int64_t{kUnitsPerThread} * parts, 0xffff});
  if (units < parts) parts = static_cast<int>(units);
  if (parts <= 1) {
    p.run(0, items);
    return;
  }
  std::lock_guard<std::mutex> lk(LinearPool::dispatch());
  LinearPool::get().run(p, units, parts);
}

}  // namespace

void bf16_linear(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t M, int64_t N,
                 int64_t K, int64_t batch, int threads, bool amx, int64_t w_stride) {
  if (w_stride == 0) w_stride = N * K;
  if (!bf16_linear_supported()) throw std::runtime_error("bf16_linear: this CPU has no AVX512-BF16");
  if (amx && !amx_linear_supported())
    throw std::runtime_error("bf16_linear: amx: this CPU has no AMX-BF16, or Linux did not grant its tiles");
  if (M == 0 || batch == 0) return;
  const double flops = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) *
                       static_cast<double>(batch);
  if (!amx) {
    dispatch_problem(Problem(x, w, bias, y, M, N, K, batch, w_stride), flops, threads);
    return;
  }
  // x as B tiles, once per call, on the caller (the workers read it while the caller waits)
  thread_local std::vector<uint32_t> packed;
  const int64_t pstride = ((M + 15) / 16) * ((K + 31) / 32) * 256;
  packed.resize(static_cast<size_t>(pstride * batch));
  for (int64_t b = 0; b < batch; b++) amx_pack(x + b * M * K, M, K, packed.data() + b * pstride);
  dispatch_problem(Problem(packed.data(), pstride, w, bias, y, M, N, K, batch, w_stride), flops, threads);
  // A long context's attention packs a few rows as 16 (a decode row's keys at 64k positions: 2 MiB
  // per head); kept between calls up to 64 MiB, given back above that.
  if (packed.capacity() > (size_t{16} << 20)) std::vector<uint32_t>().swap(packed);
}

#else  // no compiler support for the intrinsics: the function reports itself unsupported

bool bf16_linear_supported() { return false; }
bool amx_linear_supported() { return false; }

void bf16_linear(const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t, int64_t, int64_t,
                 int, bool, int64_t) {
  throw std::runtime_error("bf16_linear: built without AVX512-BF16 support");
}

#endif

}  // namespace sllm
