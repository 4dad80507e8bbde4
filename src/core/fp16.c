/* fp16.c -- vectorised row conversions between fp32, F16 and BF16 */
/* SPDX-License-Identifier: MIT */
#include "core/fp16.h"

void fp16_to_f32_row(const void *src, float *dst, size_t n) {
  const uint8_t *s = src;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128((const __m128i *)(s + 2 * i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; i++) {
    uint16_t h;
    memcpy(&h, s + 2 * i, 2);
    dst[i] = fp16_to_f32(h);
  }
}

void bf16_to_f32_row(const void *src, float *dst, size_t n) {
  const uint8_t *s = src;
  for (size_t i = 0; i < n; i++) {
    uint16_t b;
    memcpy(&b, s + 2 * i, 2);
    dst[i] = bf16_to_f32(b);
  }
}

void f32_to_fp16_row(const float *src, void *dst, size_t n) {
  uint8_t *d = dst;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128((__m128i *)(d + 2 * i), h);
  }
  for (; i < n; i++) {
    uint16_t h = f32_to_fp16(src[i]);
    memcpy(d + 2 * i, &h, 2);
  }
}
