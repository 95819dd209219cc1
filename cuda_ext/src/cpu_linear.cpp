// A batch-invariant bf16 linear layer for CPUs with AVX512-BF16 and no AMX.
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
// and exact numerics needs one fixed row count for every call. Blocking: 16 zmm accumulators
// (1 input row x 16 weight rows, 2 x 8, or 4 x 4), summed together by one shuffle tree; the
// weight rows are the outer loop, so they stay in L1 while every input row passes over them,
// and one decode row streams the weights once.
#include <cstdint>
#include <cstring>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 10 || defined(__clang__))
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

#define SLLM_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

inline float from_bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

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

// MB input rows x NB weight rows of outputs (MB * NB == 16), accumulator p = i * NB + j. Rows
// past the valid ones repeat the last valid row (x_rows, w_rows), and their outputs are not
// stored: a block shape never changes an accumulator's instruction sequence.
template <int MB, int NB>
SLLM_BF16_TARGET inline void block(const uint16_t* const (&xr)[MB], int mvalid, const uint16_t* const (&wr)[NB],
                                   int nvalid, const uint16_t* bias, uint16_t* y, int64_t ldy, int64_t K) {
  static_assert(MB * NB == 16, "one reduce16 per block");
  __m512 acc[16];
  for (int p = 0; p < 16; p++) acc[p] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
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
  if (bias) {
    alignas(64) float b[16] = {};
    for (int i = 0; i < MB; i++)
      for (int j = 0; j < nvalid; j++) b[lane_of(i * NB + j)] = from_bf16(bias[j]);
    sums = _mm512_add_ps(sums, _mm512_load_ps(b));
  }
  // float32 -> bf16, round to nearest even (denormals flushed to zero, a NaN stays a NaN)
  alignas(32) uint16_t out[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(sums));
  for (int i = 0; i < mvalid; i++)
    for (int j = 0; j < nvalid; j++) y[i * ldy + j] = out[lane_of(i * NB + j)];
}

// Every row of x against weight rows n .. n + NB - 1 (fewer at the end), MB rows at a time.
template <int MB, int NB>
SLLM_BF16_TARGET void columns(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N,
                              const uint16_t* bias, uint16_t* y) {
  for (int64_t n = 0; n < N; n += NB) {
    const int nvalid = static_cast<int>(N - n < NB ? N - n : NB);
    const uint16_t* wr[NB];
    for (int j = 0; j < NB; j++) wr[j] = w + (n + (j < nvalid ? j : nvalid - 1)) * K;
    for (int64_t m = 0; m < M; m += MB) {
      const int mvalid = static_cast<int>(M - m < MB ? M - m : MB);
      const uint16_t* xr[MB];
      for (int i = 0; i < MB; i++) xr[i] = x + (m + (i < mvalid ? i : mvalid - 1)) * K;
      block<MB, NB>(xr, mvalid, wr, nvalid, bias ? bias + n : nullptr, y + m * N + n, N, K);
    }
  }
}

}  // namespace

bool bf16_linear_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
}

void bf16_linear(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t M, int64_t N,
                 int64_t K, int64_t batch) {
  if (!bf16_linear_supported()) throw std::runtime_error("bf16_linear: this CPU has no AVX512-BF16");
  if (M == 0) return;
  // Each of `batch` products in turn (x, w and y advance by one product each; the bias is shared).
  // One row streams 16 weight rows at once; two rows 8; more rows 4 by 4 (the weight rows stay in
  // L1 while every input row passes over them).
  for (int64_t b = 0; b < batch; b++, x += M * K, w += N * K, y += M * N) {
    if (M == 1) columns<1, 16>(x, M, K, w, N, bias, y);
    else if (M == 2) columns<2, 8>(x, M, K, w, N, bias, y);
    else columns<4, 4>(x, M, K, w, N, bias, y);
  }
}

#else  // no compiler support for the intrinsics: the function reports itself unsupported

bool bf16_linear_supported() { return false; }

void bf16_linear(const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t, int64_t, int64_t) {
  throw std::runtime_error("bf16_linear: built without AVX512-BF16 support");
}

#endif

}  // namespace sllm
