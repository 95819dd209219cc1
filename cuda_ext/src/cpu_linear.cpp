// A batch-invariant bf16 linear layer for CPUs with AVX512-BF16 and no AMX.
//
// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]): bf16 inputs, float32 accumulation, one rounding
// to bf16 at the end. Every output element has its own accumulator and goes through the same
// instruction sequence whatever the number of rows M and whichever block it falls in: one
// vdpbf16ps per 32 values of k, in k order, the last partial block zero-masked, then a fixed
// horizontal sum of the 16 lanes, then the bias, then the rounding. So a row's result depends on
// its own inputs only, never on how many other rows share the call (exact numerics, see
// functions/llm/numerics.py), without padding a single decode row to a 16-row tile.
//
// Why it exists: on a CPU without AMX, oneDNN's bf16 product costs about as much for 1 row as
// torch charges for 16 padded rows (measured: [1, 576] @ [576, 1536] 151 us, 16 rows 471 us),
// and exact numerics needs one fixed row count for every call. Blocking: 4 weight rows x up to 4
// input rows in 16 zmm accumulators; the weight rows are the outer loop, so each stays in L1
// while every input row passes over it, and one decode row streams the weights once.
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

// float32 -> bf16, round to nearest even; a NaN stays a (quiet) NaN. torch rounds the same way.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float from_bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The 16 lanes' sum in one fixed order, spelled out: halves, quarters, pairs.
SLLM_BF16_TARGET inline float lane_sum(__m512 a) {
  const __m256 lo = _mm512_castps512_ps256(a);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
  const __m256 s8 = _mm256_add_ps(lo, hi);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_shuffle_ps(s4, s4, 1));
  return _mm_cvtss_f32(s4);
}

// MB input rows x NB weight rows of outputs. The instruction sequence of one accumulator does
// not depend on MB or NB (they only say how many run side by side).
template <int MB, int NB>
SLLM_BF16_TARGET inline void block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw,
                                   const uint16_t* bias, uint16_t* y, int64_t ldy, int64_t K) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[NB];
    for (int j = 0; j < NB; j++) wv[j] = _mm512_loadu_si512(w + j * ldw + k);
    for (int i = 0; i < MB; i++) {
      __m512i xv = _mm512_loadu_si512(x + i * ldx + k);
      for (int j = 0; j < NB; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
    }
  }
  if (k < K) {  // the last K % 32 values, the rest of the vector zero: adds exact zeros
    const __mmask32 mask = static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512i wv[NB];
    for (int j = 0; j < NB; j++) wv[j] = _mm512_maskz_loadu_epi16(mask, w + j * ldw + k);
    for (int i = 0; i < MB; i++) {
      __m512i xv = _mm512_maskz_loadu_epi16(mask, x + i * ldx + k);
      for (int j = 0; j < NB; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
    }
  }
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) {
      float v = lane_sum(acc[i][j]);
      if (bias) v += from_bf16(bias[j]);
      y[i * ldy + j] = to_bf16(v);
    }
}

// All M rows against NB weight rows.
template <int NB>
SLLM_BF16_TARGET void column(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, const uint16_t* bias,
                             uint16_t* y, int64_t N) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) block<4, NB>(x + m * K, K, w, K, bias, y + m * N, N, K);
  switch (M - m) {
    case 3: block<3, NB>(x + m * K, K, w, K, bias, y + m * N, N, K); break;
    case 2: block<2, NB>(x + m * K, K, w, K, bias, y + m * N, N, K); break;
    case 1: block<1, NB>(x + m * K, K, w, K, bias, y + m * N, N, K); break;
    default: break;
  }
}

}  // namespace

bool bf16_linear_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
}

void bf16_linear(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t M, int64_t N,
                 int64_t K) {
  if (!bf16_linear_supported()) throw std::runtime_error("bf16_linear: this CPU has no AVX512-BF16");
  int64_t n = 0;
  for (; n + 4 <= N; n += 4) column<4>(x, M, K, w + n * K, bias ? bias + n : nullptr, y + n, N);
  for (; n < N; n++) column<1>(x, M, K, w + n * K, bias ? bias + n : nullptr, y + n, N);
}

#else  // no compiler support for the intrinsics: the function reports itself unsupported

bool bf16_linear_supported() { return false; }

void bf16_linear(const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t, int64_t) {
  throw std::runtime_error("bf16_linear: built without AVX512-BF16 support");
}

#endif

}  // namespace sllm
