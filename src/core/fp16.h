/* fp16.h -- conversions between fp32 and the 16-bit float formats (F16, BF16) */
/* SPDX-License-Identifier: MIT */
#ifndef LUNA_CORE_FP16_H
#define LUNA_CORE_FP16_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

/* IEEE half -> float, exact. */
static inline float fp16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

/* float -> IEEE half with round-to-nearest-even (torch's .to(float16)). */
static inline uint16_t f32_to_fp16(float f) {
  return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
}

/* bfloat16 -> float, exact. */
static inline float bf16_to_f32(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* Convert 'n' halves at 'src' (any alignment) to floats at 'dst'. */
void fp16_to_f32_row(const void *src, float *dst, size_t n);
/* Convert 'n' bfloat16 values at 'src' (any alignment) to floats at 'dst'. */
void bf16_to_f32_row(const void *src, float *dst, size_t n);
/* Round 'n' floats to halves (RNE) at 'dst' (any alignment). */
void f32_to_fp16_row(const float *src, void *dst, size_t n);

#endif
