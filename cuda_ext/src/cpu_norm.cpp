// The elementwise steps of a Llama decoder layer in bf16 on CPUs with AVX512-BF16, beside the
// linear kernels of cpu_linear.cpp: RMSNorm and the rotary position embedding. In exact numerics
// torch runs these on one thread as about 15 small ops per layer (a decode step of SmolLM2-135M
// makes about 900 of them); each function here is one call.
//
// Both compute every row on its own, in a fixed instruction sequence that depends on the row's
// length only, so a row's result never depends on the other rows of the call (batch invariant,
// as the linear kernels are). They follow the transformers modules' roundings:
//
//   rms_norm_bf16: x32 = float(x); r = 1 / sqrt(sum(x32^2) / n + eps); y = bf16(w * bf16(x32 * r))
//     The sum of squares is 16 float32 lanes (lane l takes the elements i with i % 16 == l, in
//     order; a square of a bf16 is exact in float32) added in a fixed tree. Its order differs
//     from torch's mean, so the bits may differ from torch's by the last place of r.
//   rotary_bf16: y = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), rotate_half(x) = [-x2, x1]
//     Each product and the sum are rounded to bf16 as torch's bf16 ops round them.
//
// Rounding to bf16 is VCVTNEPS2BF16 (nearest even; a denormal in or out is zero), the linear
// kernels' rounding. They run where the linear kernels run (bf16_linear_supported).
#include <cmath>
#include <cstdint>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 11 || defined(__clang__))
#define SLLM_NORM_KERNEL 1
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif

namespace sllm {

#ifdef SLLM_NORM_KERNEL
namespace {

#define SLLM_NORM_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// 16 bf16 values (the first `count`, zero past them) as float32.
SLLM_NORM_TARGET inline __m512 load16(const uint16_t* p, int count = 16) {
  const __m256i v = count == 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// float32 -> bf16 -> float32: the value a bf16 tensor would hold.
SLLM_NORM_TARGET inline __m512 round16(__m512 v) {
  const __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

SLLM_NORM_TARGET inline void store16(uint16_t* p, __m512 v, int count = 16) {
  const __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
  if (count == 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), b);
  else _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << count) - 1), b);
}

SLLM_NORM_TARGET void norm_row(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t n, float eps) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = load16(x + i, n - i < 16 ? static_cast<int>(n - i) : 16);
    acc = _mm512_fmadd_ps(v, v, acc);  // the square is exact: one rounding, the add's
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc);
  for (int width = 8; width >= 1; width /= 2)  // a fixed tree: lanes[k] += lanes[k + width]
    for (int k = 0; k < width; k++) lanes[k] += lanes[k + width];
  const float r = 1.0f / std::sqrt(lanes[0] / static_cast<float>(n) + eps);
  const __m512 rv = _mm512_set1_ps(r);
  for (int64_t i = 0; i < n; i += 16) {
    const int count = n - i < 16 ? static_cast<int>(n - i) : 16;
    const __m512 normed = round16(_mm512_mul_ps(load16(x + i, count), rv));
    store16(y + i, _mm512_mul_ps(load16(w + i, count), normed), count);
  }
}

// One head of one row: d values, half = d / 2 a multiple of 16.
SLLM_NORM_TARGET void rotate_head(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, uint16_t* y,
                                  int64_t d) {
  const int64_t half = d / 2;
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t j = 0; j < d; j += 16) {
    // rotate_half: [-x[half:], x[:half]]
    const __m512 other = j < half ? _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(load16(x + j + half)), sign)) : load16(x + j - half);
    const __m512 a = round16(_mm512_mul_ps(load16(x + j), load16(cos + j)));
    const __m512 b = round16(_mm512_mul_ps(other, load16(sin + j)));
    store16(y + j, _mm512_add_ps(a, b));
  }
}

}  // namespace

void rms_norm_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t rows, int64_t n, float eps) {
  if (!bf16_linear_supported()) throw std::runtime_error("rms_norm_bf16: this CPU has no AVX512-BF16");
  for (int64_t r = 0; r < rows; r++) norm_row(x + r * n, w, y + r * n, n, eps);
}

void rotary_bf16(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, uint16_t* y, int64_t rows,
                 int64_t heads, int64_t d) {
  if (!bf16_linear_supported()) throw std::runtime_error("rotary_bf16: this CPU has no AVX512-BF16");
  for (int64_t r = 0; r < rows; r++)
    for (int64_t h = 0; h < heads; h++)
      rotate_head(x + (r * heads + h) * d, cos + r * d, sin + r * d, y + (r * heads + h) * d, d);
}

#else  // no compiler support for the intrinsics

void rms_norm_bf16(const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t, float) {
  throw std::runtime_error("rms_norm_bf16: built without AVX512-BF16 support");
}

void rotary_bf16(const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t, int64_t) {
  throw std::runtime_error("rotary_bf16: built without AVX512-BF16 support");
}

#endif

}  // namespace sllm
