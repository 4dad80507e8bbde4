/* lora_math.c -- apply a LoRA/LyCORIS patch to an fp32 weight as ComfyUI's calculate_weight does */
/* SPDX-License-Identifier: MIT */
/*
** Every step rounds where torch rounds (NUMERICS.md 7.3): the delta is formed in fp32,
** multiplied by one fp32 coefficient, then added; the build is C11 (not GNU C), so the
** compiler does not fuse 'w + c * d' into one FMA.
*/
#include "lora/lora.h"

#include "core/status.h"

#include <cblas.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

int lora_patch_is_lowrank(const lora_patch *p) {
  return p->kind == LORA_K_LORA && !p->dora_scale;
}

float lora_patch_coef(const lora_patch *p, double strength) { return (float)(strength * p->scale); }

/* dst [m, n] = a [m, k] @ b [k, n], fp32. */
static void matmul(const float *a, const float *b, float *dst, int64_t m, int64_t k, int64_t n) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, (int)k, 1.0f, a, (int)k, b,
              (int)n, 0.0f, dst, (int)n);
}

/* The unscaled delta dW [out, in] of a LoRA, LoHa or LoKr patch, in a new buffer. */
static int delta(const lora_patch *p, float **out, char *err) {
  size_t n = (size_t)(p->out * p->in);
  float *d = malloc(n * sizeof(float)), *tmp = NULL;
  if (!d) goto oom;
  switch (p->kind) {
  case LORA_K_LORA:
    matmul(p->up, p->down, d, p->out, p->rank, p->in);
    break;
  case LORA_K_LOHA:
    if (!(tmp = malloc(n * sizeof(float)))) goto oom;
    matmul(p->w1a, p->w1b, d, p->out, p->r1, p->in);
    matmul(p->w2a, p->w2b, tmp, p->out, p->r2, p->in);
    for (size_t i = 0; i < n; i++) d[i] *= tmp[i];
    free(tmp);
    break;
  case LORA_K_LOKR:
    /* kron(k1, k2)[i1*R2 + i2, j1*C2 + j2] = k1[i1, j1] * k2[i2, j2] */
    for (int64_t i1 = 0; i1 < p->k1_rows; i1++)
      for (int64_t i2 = 0; i2 < p->k2_rows; i2++) {
        float *row = d + (size_t)((i1 * p->k2_rows + i2) * p->in);
        const float *a = p->k1 + i1 * p->k1_cols, *b = p->k2 + i2 * p->k2_cols;
        for (int64_t j1 = 0; j1 < p->k1_cols; j1++)
          for (int64_t j2 = 0; j2 < p->k2_cols; j2++) row[j1 * p->k2_cols + j2] = a[j1] * b[j2];
      }
    break;
  case LORA_K_DIFF:
    memcpy(d, p->diff, n * sizeof(float));
    break;
  }
  *out = d;
  return 0;
oom:
  free(d);
  return luna_fail(err, LUNA_ENOMEM, "LoRA patch '%s': out of memory for a [%lld, %lld] delta", p->name,
                   (long long)p->out, (long long)p->in);
}

/* ComfyUI's weight_decompose. 'wc' holds dW on entry and is used as Wc. */
static int dora(const lora_patch *p, double strength, float *W, float *wc, char *err) {
  int64_t out = p->out, in = p->in;
  size_t n = (size_t)(out * in);
  float s = (float)p->scale;
  /* 1. Wc = W + scale * dW (strength is not applied here) */
  for (size_t i = 0; i < n; i++) wc[i] = W[i] + s * wc[i];
  if (p->dora_on_out) {
    /* 2. per output row, the norm of the weight before this patch */
    for (int64_t r = 0; r < out; r++) {
      const float *w = W + r * in;
      double sum = 0;
      for (int64_t j = 0; j < in; j++) sum += (double)w[j] * (double)w[j];
      float nrm = (float)sqrt(sum) + FLT_EPSILON;
      float ratio = p->dora_scale[r] / nrm;
      float *x = wc + r * in;
      for (int64_t j = 0; j < in; j++) x[j] *= ratio;
    }
  } else {
    /* 3. per input column, the norm of Wc */
    double *sum = calloc((size_t)in, sizeof(double));
    float *ratio = malloc((size_t)in * sizeof(float));
    if (!sum || !ratio) {
      free(sum);
      free(ratio);
      return luna_fail(err, LUNA_ENOMEM, "LoRA patch '%s': out of memory", p->name);
    }
    for (int64_t r = 0; r < out; r++) {
      const float *x = wc + r * in;
      for (int64_t j = 0; j < in; j++) sum[j] += (double)x[j] * (double)x[j];
    }
    /* 4. n += eps; Wc *= dora_scale / n */
    for (int64_t j = 0; j < in; j++) ratio[j] = p->dora_scale[j] / ((float)sqrt(sum[j]) + FLT_EPSILON);
    for (int64_t r = 0; r < out; r++) {
      float *x = wc + r * in;
      for (int64_t j = 0; j < in; j++) x[j] *= ratio[j];
    }
    free(sum);
    free(ratio);
  }
  /* 5. W = Wc at strength 1, else W += strength * (Wc - W) */
  if (strength == 1.0) {
    memcpy(W, wc, n * sizeof(float));
  } else {
    float st = (float)strength;
    for (size_t i = 0; i < n; i++) W[i] += st * (wc[i] - W[i]);
  }
  return 0;
}

int lora_patch_apply(const lora_patch *p, double strength, float *W, char *err) {
  size_t n = (size_t)(p->out * p->in);
  if (p->kind == LORA_K_DIFF) {
    /* ComfyUI: weight += strength * diff (a diff has no DoRA) */
    float c = (float)strength;
    for (size_t i = 0; i < n; i++) W[i] += c * p->diff[i];
    return 0;
  }
  float *d = NULL;
  int rc = delta(p, &d, err);
  if (rc) return rc;
  if (p->dora_scale) {
    rc = dora(p, strength, W, d, err);
  } else {
    float c = lora_patch_coef(p, strength);
    for (size_t i = 0; i < n; i++) W[i] += c * d[i];
  }
  free(d);
  return rc;
}
