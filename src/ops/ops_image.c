/* ops_image.c -- the VAE's image kernels: conv2d (im2col or Winograd, on SGEMM), GroupNorm, SiLU, upsampling, attention */
/* SPDX-License-Identifier: MIT */
#include "ops/ops.h"

#include "core/status.h"

#include <cblas.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/*
** Layout: one image's activations are [C, H, W] row-major, so channel 'c' is the HW
** floats at c*H*W. A convolution's output y [cout, Ho, Wo] is then the matrix
** [cout, Ho*Wo], and y = Wmat [cout, cin*kh*kw] x col [cin*kh*kw, Ho*Wo], where row
** (ci, ky, kx) of 'col' holds x[ci, oy*s - pt + ky, ox*s - pl + kx] for every output
** position (0 outside the image). ops_conv2d builds 'col' for a strip of consecutive
** output positions at a time in worker scratch and multiplies it with one SGEMM that
** writes the strip of every output channel in place (ldc = Ho*Wo).
*/

/* im2col budget per worker, in floats (8 MiB). The strip's SGEMM packs the whole weight
** matrix once per call, so strips must be wide enough to amortise that: with cin = 512
** (K = 4608) this gives 448 columns. The strip is written once and read once by
** OpenBLAS's packing, so it need not fit in cache. */
#define CONV_COL_FLOATS (1 << 21)
#define CONV_MIN_COLS 64     /* strips never narrower than this (unless the image is) */
#define CONV_MAX_COLS 4096   /* nor wider: small K would otherwise give one strip */
#define CONV_DIRECT_COLS 8192 /* positions per SGEMM of a 1x1 conv (no scratch) */
#define CONV_TASK_MULT 4     /* task counts are multiples of this (see cut_tasks) */

/* Winograd scratch budget per worker, in floats (8 MiB), and its bounds in tiles. */
#define WINO_FLOATS (1 << 21)
/* Fewer input channels make the 16 products too thin to pay for the transforms (measured:
** 3 -> 128 and 4 -> 512 run 2.5x slower than im2col, 32 -> 32 breaks even). */
#define WINO_MIN_CIN 64
#define WINO_MIN_TILES 32
#define WINO_MAX_TILES 2048
/* Floats between consecutive planes of U, V and M beyond their size: planes of a whole
** number of pages would put the 16 streams that a transform writes or reads at once
** in the same L1 sets. */
#define WINO_PAD 16

/* Queries per attention task: the task's score block is qb x N floats. Each task packs
** all of k and v for its two SGEMMs, so blocks should be wide (256 runs 1.25x faster
** than 64 at N = 4096, C = 512); narrower at large N to keep the block within
** ATTN_FLOATS (16 MiB), never under 64. */
#define ATTN_QBLOCK_MAX 256
#define ATTN_QBLOCK_MIN 64
#define ATTN_FLOATS (1 << 22)

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---- exp, SiLU and softmax rows ---------------------------------------------------- */

/*
** e^x in fp32 for the SiLU and the softmax (glibc's expf is a scalar call). x is clamped
** to [-87, 88] (e^-87 > FLT_MIN, e^88 < FLT_MAX); x = n ln2 + r with |r| <= ln2/2 (ln2
** split in two so that n*ln2_hi is exact), e^r by its Taylor polynomial to degree 7
** (truncation below 6e-9 relative), 2^n built in the exponent bits. Within 2 ulp of the
** exact value over the range; NaN stays NaN. The AVX2 body and the scalar tail do the
** same operations with fused multiply-adds, so they give the same bits.
*/
#define EXP_LO -87.0f
#define EXP_HI 88.0f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693145751953125f
#define EXP_LN2_LO 1.42860682030941723e-6f

static inline float exp_f32(float x) {
  x = x > EXP_LO ? x : (x != x ? x : EXP_LO);
  x = x < EXP_HI ? x : (x != x ? x : EXP_HI);
  float n = nearbyintf(x * EXP_LOG2E);
  float r = fmaf(-n, EXP_LN2_HI, x);
  r = fmaf(-n, EXP_LN2_LO, r);
  float q = 1.0f / 5040.0f;
  q = fmaf(q, r, 1.0f / 720.0f);
  q = fmaf(q, r, 1.0f / 120.0f);
  q = fmaf(q, r, 1.0f / 24.0f);
  q = fmaf(q, r, 1.0f / 6.0f);
  q = fmaf(q, r, 0.5f);
  q = fmaf(q, r, 1.0f);
  q = fmaf(q, r, 1.0f);
  if (x != x) return x;
  int32_t bits = ((int32_t)n + 127) * (1 << 23);
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return q * scale;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1

/* [a0 a2 b0 b2 | a4 a6 b4 b6] (a _mm256_shuffle_ps of a and b) to [a0 a2 a4 a6 b0 b2 b4 b6] */
static inline __m256 even_odd_order(__m256 v) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), _MM_SHUFFLE(3, 1, 2, 0)));
}

static inline __m256 exp8(__m256 x) {
  /* max/min return their second operand when either is NaN: NaN passes through */
  x = _mm256_max_ps(_mm256_set1_ps(EXP_LO), x);
  x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), x);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
  __m256 q = _mm256_set1_ps(1.0f / 5040.0f);
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f / 720.0f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f / 120.0f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f / 24.0f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f / 6.0f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.5f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f));
  __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(q, _mm256_castsi256_ps(bits));
}
#endif

/* x[i] = x[i] * sigmoid(x[i]) = x[i] / (1 + e^-x[i]) for n floats. */
static void silu_span(float *x, int64_t n) {
  int64_t i = 0;
#ifdef HAVE_AVX2
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    __m256 e = exp8(_mm256_xor_ps(v, sign));
    _mm256_storeu_ps(x + i, _mm256_div_ps(v, _mm256_add_ps(one, e)));
  }
#endif
  for (; i < n; i++) x[i] = x[i] / (1.0f + exp_f32(-x[i]));
}

/* r[i] = e^(r[i] - mx) for n floats; returns their sum (in eight fp32 lanes, then the
** tail, then the lanes added in order). */
static float exp_shift_span(float *r, int64_t n, float mx) {
  float sum = 0.0f;
  int64_t i = 0;
#ifdef HAVE_AVX2
  __m256 m = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(r + i), m));
    _mm256_storeu_ps(r + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
#endif
  for (; i < n; i++) {
    r[i] = exp_f32(r[i] - mx);
    sum += r[i];
  }
#ifdef HAVE_AVX2
  for (int l = 0; l < 8; l++) sum += lanes[l];
#endif
  return sum;
}

/* Loops below run fixed-width inner blocks of VEC floats: GCC's -O2 cost model only
** vectorises loops whose trip count is a known multiple of the vector width. */
#define VEC 16

/* ---- convolution ----------------------------------------------------------------- */

/* Winograd by default: on a 2-core AVX-512 machine it ran the VAE decoder's 3x3
** convolutions 1.2-1.9x faster than im2col (bench/conv-rate.c) and a full 512x512 decode
** 1.55x faster, with its image as close to PyTorch's (2.6e-6 against 2.4e-6). */
static _Atomic int conv_method = OPS_CONV_WINOGRAD;

ops_conv_method ops_conv2d_set_method(ops_conv_method m) {
  return (ops_conv_method)atomic_exchange(&conv_method, (int)m);
}

ops_conv_method ops_conv2d_get_method(void) { return (ops_conv_method)atomic_load(&conv_method); }

static int64_t conv_k(const ops_conv *c) { return c->cin * c->kh * c->kw; }

/* The widest im2col strip (in output positions) a worker handles for this conv. */
static int64_t conv_strip_max(const ops_conv *c) {
  int64_t n = CONV_COL_FLOATS / conv_k(c) / 16 * 16;
  if (n < CONV_MIN_COLS) n = CONV_MIN_COLS;
  if (n > CONV_MAX_COLS) n = CONV_MAX_COLS;
  return n;
}

/* Tiles per Winograd task: its 16 input planes [cin, n] and 16 product planes [cout, n]
** take 16*(cin+cout)*n floats of scratch. */
static int64_t wino_block_max(const ops_conv *c) {
  int64_t n = WINO_FLOATS / (16 * (c->cin + c->cout)) / 16 * 16;
  if (n < WINO_MIN_TILES) n = WINO_MIN_TILES;
  if (n > WINO_MAX_TILES) n = WINO_MAX_TILES;
  return n;
}

size_t ops_conv2d_scratch(const ops_conv *c, int64_t W) {
  (void)W; /* strips are runs of output positions, so the width does not matter */
  size_t need = (size_t)conv_k(c) * (size_t)conv_strip_max(c);
  if (c->kh == 3 && c->kw == 3 && c->cin >= WINO_MIN_CIN) {
    size_t wino = (size_t)(16 * (c->cin + c->cout)) * (size_t)wino_block_max(c) + 32 * WINO_PAD;
    if (wino > need) need = wino;
  }
  return need;
}

/* Cuts 'n' items into tasks of at most 'max_per' items: the fewest that allow it,
** rounded up to a multiple of CONV_TASK_MULT so that pools of 1, 2 and 4 workers get
** equal shares, but no task under 16 items; the shares differ by at most one. The cut
** depends on the shape alone: the same SGEMMs run whatever the pool, so the same bits. */
static int64_t cut_tasks(int64_t n, int64_t max_per, int64_t *per) {
  int64_t tasks = (n + max_per - 1) / max_per;
  tasks = (tasks + CONV_TASK_MULT - 1) / CONV_TASK_MULT * CONV_TASK_MULT;
  if (tasks > (n + 15) / 16) tasks = (n + 15) / 16;
  *per = (n + tasks - 1) / tasks;
  return (n + *per - 1) / *per;
}

typedef struct {
  const float *x;
  const ops_conv *c;
  float *y;
  int64_t H, W, Ho, Wo, npos, K;
  int stride, pt, pl;
  int64_t strip;   /* output positions (im2col) or tiles (Winograd) per task */
  int direct;      /* 1x1, stride 1, no padding: B is x itself */
  int64_t tw, n_tiles; /* Winograd: tiles per row, tiles in all */
  const float *u;  /* Winograd: transformed weights [16][cout][cin] */
} conv_job;

/* Writes col [K, n] (leading dimension n) for output positions p0 .. p0+n-1. */
static void im2col(const conv_job *j, int64_t p0, int64_t n, float *col) {
  const ops_conv *c = j->c;
  const int64_t H = j->H, W = j->W, Wo = j->Wo, s = j->stride;
  float *dst = col;
  for (int64_t ci = 0; ci < c->cin; ci++)
    for (int64_t ky = 0; ky < c->kh; ky++)
      for (int64_t kx = 0; kx < c->kw; kx++) {
        int64_t p = p0;
        while (p < p0 + n) {
          int64_t oy = p / Wo, ox = p % Wo, seg = min64(Wo - ox, p0 + n - p);
          int64_t iy = oy * s - j->pt + ky;
          if (iy < 0 || iy >= H) {
            memset(dst, 0, (size_t)seg * sizeof(float));
          } else {
            const float *src = j->x + (ci * H + iy) * W;
            int64_t ix0 = ox * s - j->pl + kx; /* input column of the segment's first output */
            /* outputs t in [lo, hi) of the segment read inside the row */
            int64_t lo = ix0 >= 0 ? 0 : (-ix0 + s - 1) / s;
            int64_t hi = ix0 >= W ? 0 : (W - ix0 + s - 1) / s;
            if (lo > seg) lo = seg;
            if (hi > seg) hi = seg;
            if (hi < lo) hi = lo;
            for (int64_t t = 0; t < lo; t++) dst[t] = 0.0f;
            if (s == 1) {
              memcpy(dst + lo, src + ix0 + lo, (size_t)(hi - lo) * sizeof(float));
            } else {
              const float *sp = src + ix0;
              for (int64_t t = lo; t < hi; t++) dst[t] = sp[t * s];
            }
            for (int64_t t = hi; t < seg; t++) dst[t] = 0.0f;
          }
          dst += seg;
          p += seg;
        }
      }
}

/* y[co, p] += b[co] for the n positions from p0. */
static void add_bias(const conv_job *j, int64_t p0, int64_t n) {
  const ops_conv *c = j->c;
  if (!c->b) return;
  for (int64_t co = 0; co < c->cout; co++) {
    float *row = j->y + co * j->npos + p0, bv = c->b[co];
    int64_t i = 0;
    for (; i + VEC <= n; i += VEC)
      for (int l = 0; l < VEC; l++) row[i + l] += bv;
    for (; i < n; i++) row[i] += bv;
  }
}

static void conv_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  const conv_job *j = a;
  const ops_conv *c = j->c;
  int64_t p0 = (int64_t)task * j->strip, n = min64(j->strip, j->npos - p0);
  const float *B;
  blasint ldb;
  if (j->direct) {
    B = j->x + p0;
    ldb = (blasint)j->npos;
  } else {
    im2col(j, p0, n, scratch);
    B = scratch;
    ldb = (blasint)n;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)c->cout, (blasint)n, (blasint)j->K, 1.0f,
              c->w, (blasint)j->K, B, ldb, 0.0f, j->y + p0, (blasint)j->npos);
  add_bias(j, p0, n);
}

/* Used only when the strip scratch cannot be had: one output channel per task, no
** scratch, the same sum order as the im2col dot product (ci, ky, kx). */
static void conv_plain_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  (void)scratch;
  const conv_job *j = a;
  const ops_conv *c = j->c;
  int64_t co = task;
  const float *wr = c->w + co * j->K;
  for (int64_t oy = 0; oy < j->Ho; oy++)
    for (int64_t ox = 0; ox < j->Wo; ox++) {
      float s = 0.0f;
      for (int64_t ci = 0; ci < c->cin; ci++)
        for (int64_t ky = 0; ky < c->kh; ky++) {
          int64_t iy = oy * j->stride - j->pt + ky;
          if (iy < 0 || iy >= j->H) continue;
          for (int64_t kx = 0; kx < c->kw; kx++) {
            int64_t ix = ox * j->stride - j->pl + kx;
            if (ix < 0 || ix >= j->W) continue;
            s += wr[(ci * c->kh + ky) * c->kw + kx] * j->x[(ci * j->H + iy) * j->W + ix];
          }
        }
      j->y[co * j->npos + oy * j->Wo + ox] = s + (c->b ? c->b[co] : 0.0f);
    }
}

/*
** Winograd F(2x2, 3x3). Output tile (ty, tx) is y[:, 2ty .. 2ty+1, 2tx .. 2tx+1]; it reads
** the 4x4 input patch d at rows 2ty - pt .., columns 2tx - pl .. (0 outside the image).
** With B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5;
** 0 0 1] and A^T = [1 1 1 0; 0 1 -1 -1]:
**   U[co, ci] = G g[co, ci] G^T, V[ci] = B^T d[ci] B (4x4 each),
**   M[co] = sum over ci of U[co, ci] .* V[ci], y tile = A^T M[co] A + b[co].
** The sum over ci is, for each of the 16 elements e of the 4x4, one SGEMM
** M_e [cout, tiles] = U_e [cout, cin] x V_e [cin, tiles].
*/

/* U [16][cout][cin] from the weights; one task per output channel. */
static void wino_weights_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  (void)scratch;
  const conv_job *j = a;
  const ops_conv *c = j->c;
  int64_t co = task, cin = c->cin, plane = c->cout * cin + WINO_PAD;
  float *u = (float *)j->u + co * cin;
  for (int64_t ci = 0; ci < cin; ci++) {
    const float *g = c->w + (co * cin + ci) * 9;
    float t[4][3]; /* G g: rows */
    for (int k = 0; k < 3; k++) {
      t[0][k] = g[k];
      t[1][k] = 0.5f * (g[k] + g[3 + k] + g[6 + k]);
      t[2][k] = 0.5f * (g[k] - g[3 + k] + g[6 + k]);
      t[3][k] = g[6 + k];
    }
    for (int r = 0; r < 4; r++) { /* (G g) G^T: columns */
      u[(r * 4 + 0) * plane + ci] = t[r][0];
      u[(r * 4 + 1) * plane + ci] = 0.5f * (t[r][0] + t[r][1] + t[r][2]);
      u[(r * 4 + 2) * plane + ci] = 0.5f * (t[r][0] - t[r][1] + t[r][2]);
      u[(r * 4 + 3) * plane + ci] = t[r][2];
    }
  }
}

/* The 4x4 patches of 8 tiles from tile column tx (fewer when 'cnt' < 8; the rest read as
** 0), input row by row: row r of patch i is x[iy0 + r, 2(tx + i) - pl + c], c = 0..3.
** Writes the transformed tiles to dst[e * plane + i], e = 0..15, i < cnt. */
static void wino_in8(const conv_job *j, const float *xc, int64_t iy0, int64_t tx, int cnt, float *dst,
                     int64_t plane, const float *next) {
  const int64_t H = j->H, W = j->W, c0 = 2 * tx - j->pl;
  /* the same columns of the next channel, for the next call on them: each channel's
  ** rows are short runs far apart, which the hardware prefetchers do not see coming */
  if (next)
    for (int r = 0; r < 4; r++) {
      int64_t iy = iy0 + r < 0 ? 0 : iy0 + r >= H ? H - 1 : iy0 + r, ix = c0 < 0 ? 0 : c0 >= W ? W - 1 : c0;
      __builtin_prefetch(next + iy * W + ix);
      __builtin_prefetch(next + iy * W + min64(ix + 16, W - 1));
    }
#ifdef HAVE_AVX2
  __m256 h[4][4];
  for (int r = 0; r < 4; r++) {
    int64_t iy = iy0 + r;
    __m256 a, b, a2, b2; /* columns c0 .. c0+15 and c0+2 .. c0+17 */
    if (iy >= 0 && iy < H && cnt == 8 && c0 >= 0 && c0 + 18 <= W) {
      const float *s = xc + iy * W + c0;
      a = _mm256_loadu_ps(s);
      b = _mm256_loadu_ps(s + 8);
      a2 = _mm256_loadu_ps(s + 2);
      b2 = _mm256_loadu_ps(s + 10);
    } else { /* at an edge: the columns inside the image, zeros around them */
      float buf[18] = {0};
      int64_t lo = c0 < 0 ? -c0 : 0, hi = min64(min64(18, W - c0), 2 * cnt + 2);
      if (iy >= 0 && iy < H && lo < hi)
        memcpy(buf + lo, xc + iy * W + c0 + lo, (size_t)(hi - lo) * sizeof(float));
      a = _mm256_loadu_ps(buf);
      b = _mm256_loadu_ps(buf + 8);
      a2 = _mm256_loadu_ps(buf + 2);
      b2 = _mm256_loadu_ps(buf + 10);
    }
    /* d0, d1 = even and odd columns from c0; d2, d3 the same from c0 + 2 */
    __m256 d0 = even_odd_order(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
    __m256 d1 = even_odd_order(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
    __m256 d2 = even_odd_order(_mm256_shuffle_ps(a2, b2, _MM_SHUFFLE(2, 0, 2, 0)));
    __m256 d3 = even_odd_order(_mm256_shuffle_ps(a2, b2, _MM_SHUFFLE(3, 1, 3, 1)));
    h[r][0] = _mm256_sub_ps(d0, d2);
    h[r][1] = _mm256_add_ps(d1, d2);
    h[r][2] = _mm256_sub_ps(d2, d1);
    h[r][3] = _mm256_sub_ps(d1, d3);
  }
  __m256 v[16];
  for (int k = 0; k < 4; k++) {
    v[k] = _mm256_sub_ps(h[0][k], h[2][k]);
    v[4 + k] = _mm256_add_ps(h[1][k], h[2][k]);
    v[8 + k] = _mm256_sub_ps(h[2][k], h[1][k]);
    v[12 + k] = _mm256_sub_ps(h[1][k], h[3][k]);
  }
  if (cnt == 8) {
    for (int e = 0; e < 16; e++) _mm256_storeu_ps(dst + e * plane, v[e]);
  } else {
    for (int e = 0; e < 16; e++) {
      float tmp[8];
      _mm256_storeu_ps(tmp, v[e]);
      for (int i = 0; i < cnt; i++) dst[e * plane + i] = tmp[i];
    }
  }
#else
  for (int i = 0; i < 8; i++) {
    float d[4][4], h[4][4];
    for (int r = 0; r < 4; r++)
      for (int c = 0; c < 4; c++) {
        int64_t iy = iy0 + r, ix = c0 + 2 * i + c;
        d[r][c] = i < cnt && iy >= 0 && iy < H && ix >= 0 && ix < W ? xc[iy * W + ix] : 0.0f;
      }
    for (int r = 0; r < 4; r++) {
      h[r][0] = d[r][0] - d[r][2];
      h[r][1] = d[r][1] + d[r][2];
      h[r][2] = d[r][2] - d[r][1];
      h[r][3] = d[r][1] - d[r][3];
    }
    if (i >= cnt) break;
    for (int k = 0; k < 4; k++) {
      dst[k * plane + i] = h[0][k] - h[2][k];
      dst[(4 + k) * plane + i] = h[1][k] + h[2][k];
      dst[(8 + k) * plane + i] = h[2][k] - h[1][k];
      dst[(12 + k) * plane + i] = h[1][k] - h[3][k];
    }
  }
#endif
}

/* V_e [cin, n] (leading dimension n) for the n tiles from t0. */
static void wino_input(const conv_job *j, int64_t t0, int64_t n, float *v) {
  const int64_t cin = j->c->cin, plane = cin * n + WINO_PAD;
  /* tile-row segments: 'len' tiles of tile row 'ty' from column 'tx0', at 'off' in the block */
  for (int64_t t = t0; t < t0 + n;) {
    int64_t ty = t / j->tw, tx0 = t % j->tw, len = min64(j->tw - tx0, t0 + n - t), off = t - t0;
    for (int64_t ci = 0; ci < cin; ci++) {
      const float *xc = j->x + ci * j->H * j->W;
      float *vc = v + ci * n + off;
      const float *next = ci + 1 < cin ? xc + j->H * j->W : NULL;
      for (int64_t i = 0; i < len; i += 8)
        wino_in8(j, xc, 2 * ty - j->pt, tx0 + i, (int)min64(8, len - i), vc + i, plane, next);
    }
    t += len;
  }
}

/* y tiles from M_e [cout, n] (leading dimension n) for the n tiles from t0. */
static void wino_output(const conv_job *j, int64_t t0, int64_t n, const float *m) {
  const ops_conv *c = j->c;
  const int64_t Ho = j->Ho, Wo = j->Wo, plane = c->cout * n + WINO_PAD;
  for (int64_t t = t0; t < t0 + n;) { /* tile-row segments, as in wino_input */
    int64_t ty = t / j->tw, tx0 = t % j->tw, len = min64(j->tw - tx0, t0 + n - t), off = t - t0;
    for (int64_t co = 0; co < c->cout; co++) {
      const float *mc = m + co * n + off;
      float bv = c->b ? c->b[co] : 0.0f;
      for (int64_t i = 0; i < len; i += 8) {
        int cnt = (int)min64(8, len - i);
        float rows[2][16]; /* the two output rows of the 8 tiles, 16 columns each */
#ifdef HAVE_AVX2
        __m256 mv[16], s[2][4];
        if (co + 1 < c->cout && !(i & 8)) /* the next channel's products, a cache line per plane */
          for (int e = 0; e < 16; e++) __builtin_prefetch(mc + n + e * plane + i);
        if (cnt == 8) {
          for (int e = 0; e < 16; e++) mv[e] = _mm256_loadu_ps(mc + e * plane + i);
        } else {
          for (int e = 0; e < 16; e++) {
            float tmp[8] = {0};
            for (int q = 0; q < cnt; q++) tmp[q] = mc[e * plane + i + q];
            mv[e] = _mm256_loadu_ps(tmp);
          }
        }
        for (int k = 0; k < 4; k++) { /* A^T M */
          s[0][k] = _mm256_add_ps(_mm256_add_ps(mv[k], mv[4 + k]), mv[8 + k]);
          s[1][k] = _mm256_sub_ps(_mm256_sub_ps(mv[4 + k], mv[8 + k]), mv[12 + k]);
        }
        __m256 bb = _mm256_set1_ps(bv);
        for (int r = 0; r < 2; r++) { /* (A^T M) A, interleaved into output columns */
          __m256 y0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s[r][0], s[r][1]), s[r][2]), bb);
          __m256 y1 = _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(s[r][1], s[r][2]), s[r][3]), bb);
          __m256 lo = _mm256_unpacklo_ps(y0, y1), hi = _mm256_unpackhi_ps(y0, y1);
          _mm256_storeu_ps(rows[r], _mm256_permute2f128_ps(lo, hi, 0x20));
          _mm256_storeu_ps(rows[r] + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
        }
#else
        for (int q = 0; q < cnt; q++) {
          float s[2][4];
          for (int k = 0; k < 4; k++) {
            float m0 = mc[k * plane + i + q], m1 = mc[(4 + k) * plane + i + q];
            float m2 = mc[(8 + k) * plane + i + q], m3 = mc[(12 + k) * plane + i + q];
            s[0][k] = m0 + m1 + m2;
            s[1][k] = m1 - m2 - m3;
          }
          for (int r = 0; r < 2; r++) {
            rows[r][2 * q] = s[r][0] + s[r][1] + s[r][2] + bv;
            rows[r][2 * q + 1] = s[r][1] - s[r][2] - s[r][3] + bv;
          }
        }
#endif
        int64_t ox = 2 * (tx0 + i), w = min64(2 * cnt, Wo - ox);
        for (int r = 0; r < 2 && 2 * ty + r < Ho; r++) {
          float *yr = j->y + co * j->npos + (2 * ty + r) * Wo + ox;
          if (w == 16) memcpy(yr, rows[r], 16 * sizeof(float)); /* a fixed size: inlined */
          else
            for (int q = 0; q < w; q++) yr[q] = rows[r][q];
        }
      }
    }
    t += len;
  }
}

static void wino_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  const conv_job *j = a;
  const ops_conv *c = j->c;
  int64_t t0 = (int64_t)task * j->strip, n = min64(j->strip, j->n_tiles - t0);
  int64_t vp = c->cin * n + WINO_PAD, mp = c->cout * n + WINO_PAD, up = c->cout * c->cin + WINO_PAD;
  float *v = scratch, *m = scratch + 16 * vp;
  wino_input(j, t0, n, v);
  for (int e = 0; e < 16; e++)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)c->cout, (blasint)n, (blasint)c->cin, 1.0f,
                j->u + e * up, (blasint)c->cin, v + e * vp, (blasint)n, 0.0f, m + e * mp, (blasint)n);
  wino_output(j, t0, n, m);
}

/* Runs the Winograd method; returns 0, or -1 (nothing done) when the transformed weights
** cannot be had. */
/* U for conv 'c' in a new buffer (NULL when out of memory). */
static float *wino_transform(ops_pool *p, const ops_conv *c) {
  size_t bytes = (size_t)(16 * (c->cout * c->cin + WINO_PAD)) * sizeof(float);
  float *u = aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (!u) return NULL;
  conv_job j = {.c = c, .u = u};
  ops_pool_run(p, (int)c->cout, wino_weights_task, &j);
  return u;
}

static int wino_applies(const ops_conv *c, int stride) {
  return c->kh == 3 && c->kw == 3 && stride == 1 && c->cin >= WINO_MIN_CIN;
}

float *ops_conv_winograd_weights(ops_pool *p, const ops_conv *c) {
  if (!wino_applies(c, 1) || ops_conv2d_get_method() != OPS_CONV_WINOGRAD) return NULL;
  return wino_transform(p, c);
}

static int conv_winograd(ops_pool *p, conv_job *j) {
  const ops_conv *c = j->c;
  float *u = c->wino ? NULL : wino_transform(p, c);
  if (!c->wino && !u) return -1;
  j->u = c->wino ? c->wino : u;
  j->tw = (j->Wo + 1) / 2;
  j->n_tiles = (j->Ho + 1) / 2 * j->tw;
  int64_t tasks = cut_tasks(j->n_tiles, wino_block_max(c), &j->strip);
  ops_pool_run(p, (int)tasks, wino_task, j);
  free(u);
  return 0;
}

void ops_conv2d(ops_pool *p, const float *x, int64_t H, int64_t W, const ops_conv *c, int stride, int pt,
                int pl, int pb, int pr, float *y) {
  LUNA_ASSERT(stride >= 1 && pt >= 0 && pl >= 0 && pb >= 0 && pr >= 0);
  LUNA_ASSERT(c->cout > 0 && c->cin > 0 && c->kh > 0 && c->kw > 0);
  if (H <= 0 || W <= 0 || H + pt + pb < c->kh || W + pl + pr < c->kw) return;
  int64_t Ho = (H + pt + pb - c->kh) / stride + 1, Wo = (W + pl + pr - c->kw) / stride + 1;
  conv_job j = {.x = x, .c = c, .y = y, .H = H, .W = W, .Ho = Ho, .Wo = Wo, .npos = Ho * Wo,
                .K = conv_k(c), .stride = stride, .pt = pt, .pl = pl};
  j.direct = c->kh == 1 && c->kw == 1 && stride == 1 && !pt && !pl && !pb && !pr;
  if (!j.direct && ops_pool_reserve(p, ops_conv2d_scratch(c, W)) != 0) {
    ops_pool_run(p, (int)c->cout, conv_plain_task, &j);
    return;
  }
  if (wino_applies(c, stride) && (c->wino || ops_conv2d_get_method() == OPS_CONV_WINOGRAD) &&
      conv_winograd(p, &j) == 0)
    return;
  int64_t tasks = cut_tasks(j.npos, j.direct ? CONV_DIRECT_COLS : conv_strip_max(c), &j.strip);
  ops_pool_run(p, (int)tasks, conv_task, &j);
}

typedef struct {
  float *x;
  const ops_conv *c;
  int64_t HW;
} c1x1_job;

/* Bias, then copy the block's result [cout, n] at 'r' over columns p0.. of 'y'. */
static void c1x1_store(const c1x1_job *j, const float *r, int64_t p0, int64_t n) {
  const ops_conv *c = j->c;
  for (int64_t co = 0; co < c->cout; co++) {
    float *dst = j->x + co * j->HW + p0, bv = c->b ? c->b[co] : 0.0f;
    const float *src = r + co * n;
    for (int64_t i = 0; i < n; i++) dst[i] = src[i] + bv;
  }
}

static void c1x1_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  const c1x1_job *j = a;
  const ops_conv *c = j->c;
  int64_t p0 = (int64_t)task * OPS_CONV1X1_COLS, n = min64(OPS_CONV1X1_COLS, j->HW - p0);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)c->cout, (blasint)n, (blasint)c->cin, 1.0f,
              c->w, (blasint)c->cin, j->x + p0, (blasint)j->HW, 0.0f, scratch, (blasint)n);
  c1x1_store(j, scratch, p0, n);
}

/* Without scratch: one position at a time on the calling thread, through the stack
** (the VAE's widths are at most 1024). */
static void c1x1_plain(const c1x1_job *j) {
  const ops_conv *c = j->c;
  float col[1024], out[1024];
  LUNA_ASSERT(c->cin <= 1024 && c->cout <= 1024);
  for (int64_t p = 0; p < j->HW; p++) {
    for (int64_t ci = 0; ci < c->cin; ci++) col[ci] = j->x[ci * j->HW + p];
    for (int64_t co = 0; co < c->cout; co++) {
      float s = 0.0f;
      for (int64_t ci = 0; ci < c->cin; ci++) s += c->w[co * c->cin + ci] * col[ci];
      out[co] = s;
    }
    c1x1_store(j, out, p, 1);
  }
}

size_t ops_conv1x1_inplace_scratch(const ops_conv *c) { return (size_t)c->cout * OPS_CONV1X1_COLS; }

void ops_conv1x1_inplace(ops_pool *p, float *x, int64_t HW, const ops_conv *c) {
  LUNA_ASSERT(c->kh == 1 && c->kw == 1 && c->cout > 0 && c->cin > 0);
  if (HW <= 0) return;
  c1x1_job j = {x, c, HW};
  if (ops_pool_reserve(p, ops_conv1x1_inplace_scratch(c)) != 0) {
    c1x1_plain(&j);
    return;
  }
  ops_pool_run(p, (int)((HW + OPS_CONV1X1_COLS - 1) / OPS_CONV1X1_COLS), c1x1_task, &j);
}

/* ---- GroupNorm ------------------------------------------------------------------- */

typedef struct {
  const float *x;
  float *y;
  const float *g, *b;
  int64_t HW, cpg; /* channels per group */
  float eps;
} gn_job;

/* Sums of d and d^2 over n floats, d = x - shift, in double, VEC independent lanes
** (vectorisable). With 'shift' a value of the group, the mean and the variance come
** from one pass without the cancellation of E[x^2] - E[x]^2 far from zero. */
static void moments_f64(const float *x, int64_t n, double shift, double *s1, double *s2) {
  double a1[VEC] = {0}, a2[VEC] = {0};
  int64_t i = 0;
  for (; i + VEC <= n; i += VEC)
    for (int l = 0; l < VEC; l++) {
      double d = (double)x[i + l] - shift;
      a1[l] += d;
      a2[l] += d * d;
    }
  double t1 = 0, t2 = 0;
  for (; i < n; i++) {
    double d = (double)x[i] - shift;
    t1 += d;
    t2 += d * d;
  }
  for (int l = 0; l < VEC; l++) {
    t1 += a1[l];
    t2 += a2[l];
  }
  *s1 = t1;
  *s2 = t2;
}

/* y = (x - m) * sc + sh over n floats, the mean as the float pair mh + ml: x - mh is
** exact when x is near the mean, where a rounded mean would cost the most; two versions so that neither needs an alias
** check to vectorise ('y' may be 'x'). */
static void affine_inplace(float *x, int64_t n, float mh, float ml, float sc, float sh) {
  int64_t i = 0;
  for (; i + VEC <= n; i += VEC)
    for (int l = 0; l < VEC; l++) x[i + l] = ((x[i + l] - mh) - ml) * sc + sh;
  for (; i < n; i++) x[i] = ((x[i] - mh) - ml) * sc + sh;
}

static void affine_copy(float *restrict y, const float *restrict x, int64_t n, float mh, float ml, float sc,
                        float sh) {
  int64_t i = 0;
  for (; i + VEC <= n; i += VEC)
    for (int l = 0; l < VEC; l++) y[i + l] = ((x[i + l] - mh) - ml) * sc + sh;
  for (; i < n; i++) y[i] = ((x[i] - mh) - ml) * sc + sh;
}

/* The statistics of the group of n floats at x, as ops_group_norm uses them. */
static ops_gn_stat gn_stat(const float *x, int64_t n, float eps) {
  double shift = x[0], s1, s2;
  moments_f64(x, n, shift, &s1, &s2);
  double dm = s1 / (double)n, mean = shift + dm, var = s2 / (double)n - dm * dm;
  if (var < 0) var = 0;
  ops_gn_stat st;
  st.mh = (float)mean;
  st.ml = (float)(mean - (double)st.mh);
  st.rstd = 1.0 / sqrt(var + (double)eps);
  return st;
}

static void gn_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  (void)scratch;
  const gn_job *j = a;
  int64_t c0 = (int64_t)task * j->cpg;
  const float *x = j->x + c0 * j->HW;
  ops_gn_stat st = gn_stat(x, j->cpg * j->HW, j->eps);
  for (int64_t c = 0; c < j->cpg; c++) {
    const float *xc = x + c * j->HW;
    float *yc = j->y + (c0 + c) * j->HW;
    float sc = (float)(st.rstd * j->g[c0 + c]), sh = j->b[c0 + c];
    if (yc == xc) affine_inplace(yc, j->HW, st.mh, st.ml, sc, sh);
    else affine_copy(yc, xc, j->HW, st.mh, st.ml, sc, sh);
  }
}

void ops_group_norm(ops_pool *p, const float *x, int64_t C, int64_t HW, int groups, const float *g,
                    const float *b, float eps, float *y) {
  LUNA_ASSERT(groups > 0 && C % groups == 0);
  if (HW <= 0) return;
  gn_job j = {x, y, g, b, HW, C / groups, eps};
  ops_pool_run(p, groups, gn_task, &j);
}

typedef struct {
  const float *x;
  float *y;
  ops_gn_stat *st;
  const float *g, *b;
  int64_t H, W, cpg, r0, r1;
  float eps;
  int silu;
} gn_rows_job;

static void gn_stats_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  (void)scratch;
  const gn_rows_job *j = a;
  int64_t n = j->cpg * j->H * j->W;
  j->st[task] = gn_stat(j->x + (int64_t)task * n, n, j->eps);
}

void ops_group_norm_stats(ops_pool *p, const float *x, int64_t C, int64_t HW, int groups, float eps,
                          ops_gn_stat *st) {
  LUNA_ASSERT(groups > 0 && C % groups == 0);
  if (HW <= 0) return;
  gn_rows_job j = {.x = x, .st = st, .H = 1, .W = HW, .cpg = C / groups, .eps = eps};
  ops_pool_run(p, groups, gn_stats_task, &j);
}

static void gn_rows_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  (void)scratch;
  const gn_rows_job *j = a;
  int64_t c = task, n = (j->r1 - j->r0) * j->W;
  const ops_gn_stat *st = &j->st[c / j->cpg];
  float *yc = j->y + c * n;
  affine_copy(yc, j->x + (c * j->H + j->r0) * j->W, n, st->mh, st->ml, (float)(st->rstd * j->g[c]), j->b[c]);
  if (j->silu) silu_span(yc, n);
}

void ops_group_norm_rows(ops_pool *p, const float *x, int64_t C, int64_t H, int64_t W, int groups,
                         const ops_gn_stat *st, const float *g, const float *b, int64_t r0, int64_t r1, int silu,
                         float *y) {
  LUNA_ASSERT(groups > 0 && C % groups == 0 && 0 <= r0 && r0 <= r1 && r1 <= H);
  if (r1 == r0 || W <= 0) return;
  gn_rows_job j = {x, y, (ops_gn_stat *)st, g, b, H, W, C / groups, r0, r1, 0.0f, silu};
  ops_pool_run(p, (int)C, gn_rows_task, &j);
}

/* ---- SiLU and upsampling --------------------------------------------------------- */

typedef struct {
  float *x;
  int64_t n, per;
} silu_job;

static void silu_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  (void)scratch;
  const silu_job *j = a;
  int64_t i = (int64_t)task * j->per;
  silu_span(j->x + i, min64(j->per, j->n - i));
}

/* Splits n items into about four tasks per worker of a multiple of 'align' items. */
static int split(const ops_pool *p, int64_t n, int64_t align, int64_t *per) {
  int64_t want = (int64_t)ops_pool_size(p) * 4;
  int64_t units = (n + align - 1) / align;
  if (want > units) want = units;
  if (want < 1) want = 1;
  *per = (units + want - 1) / want * align;
  return (int)((n + *per - 1) / *per);
}

void ops_silu(ops_pool *p, float *x, int64_t n) {
  if (n <= 0) return;
  silu_job j = {x, n, 0};
  int tasks = split(p, n, 4096, &j.per);
  ops_pool_run(p, tasks, silu_task, &j);
}

typedef struct {
  const float *x;
  float *y;
  int64_t rows, W, per; /* rows = C*H input rows */
} up_job;

static void up_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  (void)scratch;
  const up_job *j = a;
  int64_t r0 = (int64_t)task * j->per, r1 = min64(r0 + j->per, j->rows), W = j->W;
  for (int64_t r = r0; r < r1; r++) {
    const float *src = j->x + r * W;
    float *d0 = j->y + 2 * r * 2 * W; /* output rows 2r and 2r+1 of the same channel */
    for (int64_t i = 0; i < W; i++) d0[2 * i] = d0[2 * i + 1] = src[i];
    memcpy(d0 + 2 * W, d0, (size_t)(2 * W) * sizeof(float));
  }
}

void ops_upsample2x(ops_pool *p, const float *x, int64_t C, int64_t H, int64_t W, float *y) {
  if (C <= 0 || H <= 0 || W <= 0) return;
  up_job j = {x, y, C * H, W, 0};
  int tasks = split(p, C * H, 1, &j.per);
  ops_pool_run(p, tasks, up_task, &j);
}

/* ---- single-head attention ------------------------------------------------------- */

static int64_t attn_qblock(int64_t N) {
  int64_t qb = N > 0 ? ATTN_FLOATS / N / 16 * 16 : ATTN_QBLOCK_MAX;
  return qb > ATTN_QBLOCK_MAX ? ATTN_QBLOCK_MAX : qb < ATTN_QBLOCK_MIN ? ATTN_QBLOCK_MIN : qb;
}

size_t ops_attention_single_scratch(int64_t N) { return (size_t)attn_qblock(N) * (size_t)(N > 0 ? N : 0); }

typedef struct {
  const float *q, *k, *v;
  float *out;
  int64_t C, N, qb; /* qb: queries per task */
  float scale;
} attn1_job;

/* Softmax of one row of n scores in place: max subtracted, fp32 throughout. */
static void softmax_row(float *r, int64_t n) {
  float mx = r[0];
  for (int64_t i = 1; i < n; i++) mx = r[i] > mx ? r[i] : mx;
  float inv = 1.0f / exp_shift_span(r, n, mx);
  int64_t i = 0;
  for (; i + VEC <= n; i += VEC)
    for (int l = 0; l < VEC; l++) r[i + l] *= inv;
  for (; i < n; i++) r[i] *= inv;
}

static void attn1_task(void *a, int task, int worker, float *S) {
  (void)worker;
  const attn1_job *j = a;
  int64_t N = j->N, i0 = (int64_t)task * j->qb, nb = min64(j->qb, N - i0);
  /* S [nb, N] = q[:, i0:i0+nb]^T k * scale */
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (blasint)nb, (blasint)N, (blasint)j->C, j->scale,
              j->q + i0, (blasint)N, j->k, (blasint)N, 0.0f, S, (blasint)N);
  for (int64_t r = 0; r < nb; r++) softmax_row(S + r * N, N);
  /* out[:, i0:i0+nb] = v [C, N] S^T */
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)j->C, (blasint)nb, (blasint)N, 1.0f, j->v,
              (blasint)N, S, (blasint)N, 0.0f, j->out + i0, (blasint)N);
}

/* Used only when the score block cannot be had: one query per task, no scratch, the
** column of 'out' accumulated in place from two passes over the keys. */
static void attn1_plain_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  (void)scratch;
  const attn1_job *j = a;
  int64_t N = j->N, C = j->C, i = task;
  float mx = -INFINITY, sum = 0.0f;
  for (int64_t t = 0; t < N; t++) {
    float s = 0.0f;
    for (int64_t c = 0; c < C; c++) s += j->q[c * N + i] * j->k[c * N + t];
    s *= j->scale;
    mx = s > mx ? s : mx;
  }
  for (int64_t c = 0; c < C; c++) j->out[c * N + i] = 0.0f;
  for (int64_t t = 0; t < N; t++) {
    float s = 0.0f;
    for (int64_t c = 0; c < C; c++) s += j->q[c * N + i] * j->k[c * N + t];
    float e = exp_f32(s * j->scale - mx);
    sum += e;
    for (int64_t c = 0; c < C; c++) j->out[c * N + i] += e * j->v[c * N + t];
  }
  for (int64_t c = 0; c < C; c++) j->out[c * N + i] /= sum;
}

void ops_attention_single(ops_pool *p, const float *q, const float *k, const float *v, int64_t C, int64_t N,
                          float scale, float *out) {
  if (N <= 0 || C <= 0) return;
  attn1_job j = {q, k, v, out, C, N, attn_qblock(N), scale};
  if (ops_pool_reserve(p, ops_attention_single_scratch(N)) != 0) {
    ops_pool_run(p, (int)N, attn1_plain_task, &j);
    return;
  }
  ops_pool_run(p, (int)((N + j.qb - 1) / j.qb), attn1_task, &j);
}
