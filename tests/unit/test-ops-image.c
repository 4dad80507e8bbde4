/* test-ops-image.c -- the VAE's image kernels against straightforward double-precision loops */
/* SPDX-License-Identifier: MIT */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "luna.h"
#include "ops/ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define TOL 1e-5 /* relative error: max |y - ref| / max |ref| */

static uint64_t rng = 2024;
static float frand(void) { /* uniform in [-1, 1) */
  rng = rng * 6364136223846793005ull + 1442695040888963407ull;
  return (float)((rng >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}

static float *rand_buf(int64_t n, float scale, float offset) {
  float *b = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
  assert_non_null(b);
  for (int64_t i = 0; i < n; i++) b[i] = frand() * scale + offset;
  return b;
}

static double rel_err(const float *y, const double *ref, int64_t n) {
  double worst = 0, big = 0;
  for (int64_t i = 0; i < n; i++) {
    double d = fabs((double)y[i] - ref[i]);
    if (!(d <= worst)) worst = d; /* NaN counts as the worst */
    if (fabs(ref[i]) > big) big = fabs(ref[i]);
  }
  return big > 0 ? worst / big : worst;
}

/* ---- conv2d ----------------------------------------------------------------------- */

typedef struct {
  int64_t cin, cout, H, W, kh, kw;
  int stride, pt, pl, pb, pr, bias;
} conv_case;

static void conv_ref(const float *x, const conv_case *k, const float *w, const float *b, int64_t Ho,
                     int64_t Wo, double *ref) {
  for (int64_t co = 0; co < k->cout; co++)
    for (int64_t oy = 0; oy < Ho; oy++)
      for (int64_t ox = 0; ox < Wo; ox++) {
        double s = b ? b[co] : 0.0;
        for (int64_t ci = 0; ci < k->cin; ci++)
          for (int64_t ky = 0; ky < k->kh; ky++)
            for (int64_t kx = 0; kx < k->kw; kx++) {
              int64_t iy = oy * k->stride - k->pt + ky, ix = ox * k->stride - k->pl + kx;
              if (iy < 0 || iy >= k->H || ix < 0 || ix >= k->W) continue;
              s += (double)w[((co * k->cin + ci) * k->kh + ky) * k->kw + kx] *
                   x[(ci * k->H + iy) * k->W + ix];
            }
        ref[(co * Ho + oy) * Wo + ox] = s;
      }
}

/* Runs one case on pools of 1 and 2 threads: both within TOL of the reference, and the
** same bits (the strips' sums do not depend on how the positions are split). Returns the
** larger of the two relative errors. */
static double check_conv(const conv_case *k) {
  int64_t Ho = (k->H + k->pt + k->pb - k->kh) / k->stride + 1;
  int64_t Wo = (k->W + k->pl + k->pr - k->kw) / k->stride + 1;
  int64_t K = k->cin * k->kh * k->kw, ny = k->cout * Ho * Wo;
  /* activations of unit size, weights scaled like a trained layer's (~1/sqrt(fan-in)) */
  float *x = rand_buf(k->cin * k->H * k->W, 2.0f, 0.1f);
  float *w = rand_buf(k->cout * K, (float)(1.7 / sqrt((double)K)), 0.0f);
  float *b = k->bias ? rand_buf(k->cout, 0.5f, 0.0f) : NULL;
  double *ref = malloc(sizeof(double) * (size_t)ny);
  float *y1 = malloc(sizeof(float) * (size_t)ny), *y2 = malloc(sizeof(float) * (size_t)ny);
  assert_true(ref && y1 && y2);
  conv_ref(x, k, w, b, Ho, Wo, ref);
  ops_conv c = {k->cout, k->cin, k->kh, k->kw, w, b, NULL};
  double worst = 0;
  for (int threads = 1; threads <= 2; threads++) {
    float *y = threads == 1 ? y1 : y2;
    ops_pool *p = ops_pool_create(threads, 16);
    assert_non_null(p);
    assert_int_equal(ops_pool_reserve(p, ops_conv2d_scratch(&c, k->W)), 0);
    for (int64_t i = 0; i < ny; i++) y[i] = NAN; /* every output must be written */
    ops_conv2d(p, x, k->H, k->W, &c, k->stride, k->pt, k->pl, k->pb, k->pr, y);
    double e = rel_err(y, ref, ny);
    if (e > worst) worst = e;
    if (!(e <= TOL))
      fail_msg("%s conv cin %lld cout %lld %lldx%lld k %lldx%lld s %d pad %d,%d,%d,%d, %d threads: rel error %g",
               ops_conv2d_get_method() == OPS_CONV_WINOGRAD ? "winograd" : "im2col", (long long)k->cin, (long long)k->cout, (long long)k->H, (long long)k->W, (long long)k->kh,
               (long long)k->kw, k->stride, k->pt, k->pl, k->pb, k->pr, threads, e);
    ops_pool_free(p);
  }
  if (memcmp(y1, y2, sizeof(float) * (size_t)ny))
    fail_msg("conv cin %lld %lldx%lld: 1 and 2 threads differ", (long long)k->cin, (long long)k->H,
             (long long)k->W);
  free(x); free(w); free(b); free(ref); free(y1); free(y2);
  return worst;
}

/* Every case with each method (Winograd takes the 3x3 stride-1 ones with cin >= 64). */
static void check_conv_both(const conv_case *cases, size_t n) {
  ops_conv_method was = ops_conv2d_get_method();
  for (int m = 0; m < 2; m++) {
    ops_conv2d_set_method(m ? OPS_CONV_WINOGRAD : OPS_CONV_IM2COL);
    for (size_t i = 0; i < n; i++) check_conv(&cases[i]);
  }
  ops_conv2d_set_method(was);
}

static void test_conv_default_method(void **state) {
  (void)state;
  assert_int_equal(ops_conv2d_get_method(), OPS_CONV_WINOGRAD);
}

static void test_conv_small(void **state) {
  (void)state;
  static const conv_case cases[] = {
      /* cin cout  H   W  kh kw  s  pt pl pb pr bias */
      {5, 7, 9, 11, 3, 3, 1, 1, 1, 1, 1, 1},  /* 3x3 pad 1 (ResBlock) */
      {5, 7, 9, 11, 3, 3, 2, 0, 0, 1, 1, 1},  /* downsample: pad right/bottom, stride 2 */
      {5, 7, 9, 11, 3, 3, 2, 1, 2, 0, 1, 1},  /* stride 2, asymmetric padding */
      {5, 7, 10, 12, 3, 3, 2, 0, 0, 1, 1, 0}, /* even sizes, no bias */
      {5, 7, 9, 11, 1, 1, 1, 0, 0, 0, 0, 1},  /* 1x1: one GEMM on x */
      {5, 7, 9, 11, 1, 1, 2, 0, 0, 0, 0, 1},  /* 1x1 stride 2 */
      {5, 7, 9, 11, 1, 1, 1, 1, 0, 2, 1, 1},  /* 1x1 with padding */
      {5, 7, 9, 11, 2, 3, 1, 0, 1, 1, 0, 0},  /* non-square kernel */
      {3, 4, 7, 5, 5, 5, 3, 2, 2, 2, 2, 1},   /* 5x5 stride 3 */
      {5, 7, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1},   /* a single pixel */
      {1, 1, 9, 11, 3, 3, 1, 1, 1, 1, 1, 1},  /* one channel in and out */
      {4, 3, 9, 11, 3, 3, 1, 3, 3, 3, 3, 1},  /* padding wider than the kernel */
  };
  check_conv_both(cases, sizeof cases / sizeof *cases);
}

static void test_conv_many_strips(void **state) {
  (void)state;
  static const conv_case cases[] = {
      {64, 40, 37, 45, 3, 3, 1, 1, 1, 1, 1, 1},  /* several strips, K = 576 */
      {300, 9, 40, 41, 3, 3, 1, 1, 1, 1, 1, 1},  /* K = 2700: strips narrower than the image */
      {300, 9, 81, 40, 3, 3, 2, 0, 0, 1, 1, 1},  /* the same, downsampling */
      {700, 5, 30, 33, 1, 1, 1, 0, 0, 0, 0, 1},  /* 1x1 with a long dot product */
      {40, 600, 6, 7, 3, 3, 1, 1, 1, 1, 1, 1},   /* many output channels */
  };
  check_conv_both(cases, sizeof cases / sizeof *cases);
}

/* The Winograd method on 3x3 stride-1 shapes with every kind of edge and on the VAE's
** widths; the im2col method's error on the same data is printed beside it. */
static void test_conv_winograd(void **state) {
  (void)state;
  static const conv_case cases[] = { /* Winograd runs when cin >= 64 */
      {64, 7, 9, 11, 3, 3, 1, 1, 1, 1, 1, 1},
      {64, 7, 10, 12, 3, 3, 1, 1, 1, 1, 1, 0},    /* even sizes: whole tiles */
      {64, 7, 9, 11, 3, 3, 1, 0, 0, 0, 0, 1},     /* no padding: odd output */
      {64, 7, 9, 11, 3, 3, 1, 0, 0, 1, 1, 1},     /* right/bottom padding only */
      {64, 7, 9, 11, 3, 3, 1, 1, 2, 0, 1, 1},     /* asymmetric padding */
      {64, 7, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1},      /* a single pixel */
      {64, 3, 9, 11, 3, 3, 1, 3, 3, 3, 3, 1},     /* padding wider than the kernel */
      {64, 1, 3, 3, 3, 3, 1, 0, 0, 0, 0, 1},      /* one output */
      {64, 40, 37, 45, 3, 3, 1, 1, 1, 1, 1, 1},   /* several tile blocks, edges inside blocks */
      {300, 9, 40, 41, 3, 3, 1, 1, 1, 1, 1, 1},
      {70, 600, 6, 7, 3, 3, 1, 1, 1, 1, 1, 1},
      {512, 512, 12, 10, 3, 3, 1, 1, 1, 1, 1, 1}, /* the VAE's widths */
      {128, 256, 33, 31, 3, 3, 1, 1, 1, 1, 1, 1},
      {128, 3, 20, 70, 3, 3, 1, 1, 1, 1, 1, 1},   /* conv_out's shape */
      {16, 8, 9, 11, 3, 3, 1, 1, 1, 1, 1, 1},     /* too few channels: im2col */
  };
  ops_conv_method was = ops_conv2d_set_method(OPS_CONV_IM2COL);
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    uint64_t seed = rng;
    double e_im2col = check_conv(&cases[i]);
    rng = seed; /* the same data */
    assert_int_equal(ops_conv2d_set_method(OPS_CONV_WINOGRAD), OPS_CONV_IM2COL);
    double e_wino = check_conv(&cases[i]);
    assert_int_equal(ops_conv2d_set_method(OPS_CONV_IM2COL), OPS_CONV_WINOGRAD);
    print_message("    cin %4lld cout %4lld %3lldx%-3lld rel error: im2col %.2e, winograd %.2e\n",
                  (long long)cases[i].cin, (long long)cases[i].cout, (long long)cases[i].H,
                  (long long)cases[i].W, e_im2col, e_wino);
    /* different sums, different rounding: the same error means the same method ran */
    if (cases[i].cin >= 64) assert_true(e_wino != e_im2col);
    else assert_true(e_wino == e_im2col);
  }
  /* other shapes ignore the setting */
  ops_conv2d_set_method(OPS_CONV_WINOGRAD);
  conv_case down = {5, 7, 9, 11, 3, 3, 2, 0, 0, 1, 1, 1}, pw = {5, 7, 9, 11, 1, 1, 1, 0, 0, 0, 0, 1};
  check_conv(&down);
  check_conv(&pw);
  ops_conv2d_set_method(was);
}

/* A pool whose scratch was never reserved still convolves (ops_conv2d reserves). */
static void test_conv_reserves_itself(void **state) {
  (void)state;
  ops_pool *p = ops_pool_create(2, 1);
  assert_non_null(p);
  conv_case k = {16, 6, 20, 21, 3, 3, 1, 1, 1, 1, 1, 1};
  float *x = rand_buf(k.cin * k.H * k.W, 1.0f, 0.0f), *w = rand_buf(k.cout * k.cin * 9, 0.3f, 0.0f);
  float *b = rand_buf(k.cout, 0.5f, 0.0f), *y = malloc(sizeof(float) * (size_t)(k.cout * k.H * k.W));
  double *ref = malloc(sizeof(double) * (size_t)(k.cout * k.H * k.W));
  ops_conv c = {k.cout, k.cin, 3, 3, w, b, NULL};
  ops_conv2d(p, x, k.H, k.W, &c, 1, 1, 1, 1, 1, y);
  conv_ref(x, &k, w, b, k.H, k.W, ref);
  assert_true(rel_err(y, ref, k.cout * k.H * k.W) <= TOL);
  ops_pool_free(p);
  free(x); free(w); free(b); free(y); free(ref);
}

/* ---- ops_pool_reserve --------------------------------------------------------------- */

typedef struct {
  size_t floats;
  int ok[8];
} fill_job;

/* Writes and reads back every float of the worker's scratch (ASan checks the bounds). */
static void fill_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  fill_job *j = a;
  for (size_t i = 0; i < j->floats; i++) scratch[i] = (float)(i + (size_t)task);
  int ok = 1;
  for (size_t i = 0; i < j->floats; i++) ok &= scratch[i] == (float)(i + (size_t)task);
  j->ok[task] = ok;
}

static void test_pool_reserve(void **state) {
  (void)state;
  ops_pool *p = ops_pool_create(2, 16);
  assert_non_null(p);
  fill_job j = {16, {0}};
  ops_pool_run(p, 8, fill_task, &j);
  assert_int_equal(ops_pool_reserve(p, 100000), 0);
  j.floats = 100000;
  ops_pool_run(p, 8, fill_task, &j);
  for (int t = 0; t < 8; t++) assert_true(j.ok[t]);
  assert_int_equal(ops_pool_reserve(p, 10), 0); /* never shrinks */
  memset(j.ok, 0, sizeof j.ok);
  ops_pool_run(p, 8, fill_task, &j);
  for (int t = 0; t < 8; t++) assert_true(j.ok[t]);
  assert_int_equal(ops_pool_reserve(p, SIZE_MAX / 2), LUNA_ENOMEM);
  memset(j.ok, 0, sizeof j.ok);
  ops_pool_run(p, 8, fill_task, &j); /* the old blocks are still there */
  for (int t = 0; t < 8; t++) assert_true(j.ok[t]);
  ops_pool_free(p);
}

/* ---- GroupNorm, SiLU, upsampling ---------------------------------------------------- */

static void check_group_norm(int64_t C, int64_t HW, int groups, float offset, int in_place) {
  float *x = rand_buf(C * HW, 3.0f, offset), *g = rand_buf(C, 1.0f, 0.5f), *b = rand_buf(C, 1.0f, 0.0f);
  float *y = malloc(sizeof(float) * (size_t)(C * HW)), *y2 = malloc(sizeof(float) * (size_t)(C * HW));
  double *ref = malloc(sizeof(double) * (size_t)(C * HW));
  int64_t cpg = C / groups, n = cpg * HW;
  for (int gi = 0; gi < groups; gi++) {
    const float *xg = x + gi * n;
    double s = 0, ss = 0;
    for (int64_t i = 0; i < n; i++) s += xg[i];
    double m = s / (double)n;
    for (int64_t i = 0; i < n; i++) ss += (xg[i] - m) * (xg[i] - m);
    double rs = 1.0 / sqrt(ss / (double)n + 1e-6);
    for (int64_t c = gi * cpg; c < (gi + 1) * cpg; c++)
      for (int64_t i = 0; i < HW; i++) ref[c * HW + i] = (x[c * HW + i] - m) * rs * g[c] + b[c];
  }
  for (int threads = 1; threads <= 2; threads++) {
    float *out = threads == 1 ? y : y2;
    ops_pool *p = ops_pool_create(threads, 16);
    assert_non_null(p);
    if (in_place) {
      memcpy(out, x, sizeof(float) * (size_t)(C * HW));
      ops_group_norm(p, out, C, HW, groups, g, b, 1e-6f, out);
    } else {
      ops_group_norm(p, x, C, HW, groups, g, b, 1e-6f, out);
    }
    double e = rel_err(out, ref, C * HW);
    if (!(e <= TOL))
      fail_msg("group_norm C %lld HW %lld groups %d offset %g: rel error %g", (long long)C, (long long)HW,
               groups, offset, e);
    ops_pool_free(p);
  }
  assert_memory_equal(y, y2, sizeof(float) * (size_t)(C * HW));
  free(x); free(g); free(b); free(y); free(y2); free(ref);
}

static void test_group_norm(void **state) {
  (void)state;
  check_group_norm(64, 99, 32, 0.0f, 0);
  check_group_norm(64, 99, 32, 20.0f, 1); /* mean far from zero, in place */
  check_group_norm(64, 1000, 32, -3.0f, 0);
  check_group_norm(96, 17 * 19, 32, 1.0f, 1);
  check_group_norm(7, 5, 7, 0.5f, 0);
  check_group_norm(64, 1, 32, 0.0f, 0); /* two values per group */
}

/* Winograd weights transformed once and reused (c->wino): the same bits as ops_conv2d
** transforming them itself; shapes that never use Winograd get none. */
static void test_conv_prepared_weights(void **state) {
  (void)state;
  int64_t cin = 64, cout = 32, H = 9, W = 14;
  float *x = rand_buf(cin * H * W, 1.0f, 0.0f), *w = rand_buf(cout * cin * 9, 0.1f, 0.0f), *b = rand_buf(cout, 1.0f, 0.0f);
  float *y1 = malloc(sizeof(float) * (size_t)(cout * H * W)), *y2 = malloc(sizeof(float) * (size_t)(cout * H * W));
  ops_pool *p = ops_pool_create(2, 16);
  ops_conv c = {cout, cin, 3, 3, w, b, NULL};
  ops_conv2d(p, x, H, W, &c, 1, 1, 1, 1, 1, y1);
  float *u = ops_conv_winograd_weights(p, &c);
  assert_non_null(u);
  c.wino = u;
  ops_conv2d(p, x, H, W, &c, 1, 1, 1, 1, 1, y2);
  assert_memory_equal(y1, y2, sizeof(float) * (size_t)(cout * H * W));
  free(u);
  ops_conv thin = {cout, 32, 3, 3, w, b, NULL}, one = {cout, cin, 1, 1, w, b, NULL};
  assert_null(ops_conv_winograd_weights(p, &thin));
  assert_null(ops_conv_winograd_weights(p, &one));
  ops_pool_free(p);
  free(x); free(w); free(b); free(y1); free(y2);
}

/* GroupNorm a band of rows at a time: the same values as the whole map normalized and
** then SiLU'd (within 1 ulp: SiLU's vector and scalar tails may round apart). */
static void test_group_norm_rows(void **state) {
  (void)state;
  int64_t C = 64, H = 13, W = 11, HW = H * W;
  float *x = rand_buf(C * HW, 2.0f, 5.0f), *g = rand_buf(C, 1.0f, 0.5f), *b = rand_buf(C, 1.0f, 0.0f);
  float *whole = malloc(sizeof(float) * (size_t)(C * HW)), *band = malloc(sizeof(float) * (size_t)(C * HW));
  ops_pool *p = ops_pool_create(2, 16);
  assert_non_null(p);
  ops_group_norm(p, x, C, HW, 32, g, b, 1e-6f, whole);
  ops_silu(p, whole, C * HW);
  ops_gn_stat st[32];
  ops_group_norm_stats(p, x, C, HW, 32, 1e-6f, st);
  for (int64_t r0 = 0; r0 < H; r0 += 5) {
    int64_t r1 = r0 + 5 < H ? r0 + 5 : H;
    ops_group_norm_rows(p, x, C, H, W, 32, st, g, b, r0, r1, 1, band);
    for (int64_t c = 0; c < C; c++)
      for (int64_t i = 0; i < (r1 - r0) * W; i++) {
        float a = whole[c * HW + r0 * W + i], v = band[c * (r1 - r0) * W + i];
        if (!(fabsf(a - v) <= 1e-6f * fabsf(a) + 1e-30f))
          fail_msg("group_norm_rows channel %lld rows %lld..%lld: %g, whole map %g", (long long)c, (long long)r0,
                   (long long)r1, v, a);
      }
  }
  ops_pool_free(p);
  free(x); free(g); free(b); free(whole); free(band);
}

/* The 1x1 conv in place, narrowing and widening, over more positions than one block:
** within TOL of the reference, the same bits on 1 and 2 threads. */
static void test_conv1x1_inplace(void **state) {
  (void)state;
  int64_t HW = OPS_CONV1X1_COLS * 2 + 77;
  int64_t shapes[2][2] = {{48, 24}, {24, 40}};
  for (int s = 0; s < 2; s++) {
    conv_case k = {shapes[s][0], shapes[s][1], 1, HW, 1, 1, 1, 0, 0, 0, 0, 1};
    int64_t wide = k.cin > k.cout ? k.cin : k.cout;
    float *x = rand_buf(k.cin * HW, 1.0f, 0.0f), *w = rand_buf(k.cout * k.cin, 0.3f, 0.0f), *b = rand_buf(k.cout, 1.0f, 0.0f);
    double *ref = malloc(sizeof(double) * (size_t)(k.cout * HW));
    conv_ref(x, &k, w, b, 1, HW, ref);
    ops_conv c = {k.cout, k.cin, 1, 1, w, b, NULL};
    float *y[2];
    for (int t = 0; t < 2; t++) {
      y[t] = malloc(sizeof(float) * (size_t)(wide * HW));
      memcpy(y[t], x, sizeof(float) * (size_t)(k.cin * HW));
      ops_pool *p = ops_pool_create(t + 1, 16);
      ops_conv1x1_inplace(p, y[t], HW, &c);
      ops_pool_free(p);
      double e = rel_err(y[t], ref, k.cout * HW);
      if (!(e <= TOL)) fail_msg("conv1x1_inplace %lld -> %lld: rel error %g", (long long)k.cin, (long long)k.cout, e);
    }
    assert_memory_equal(y[0], y[1], sizeof(float) * (size_t)(k.cout * HW));
    free(x); free(w); free(b); free(ref); free(y[0]); free(y[1]);
  }
}

static void test_silu(void **state) {
  (void)state;
  int64_t n = 20011;
  float *x = rand_buf(n, 20.0f, 0.0f), *x2 = malloc(sizeof(float) * (size_t)n);
  static const float special[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 87.0f, 88.5f, 100.0f, -87.0f, -88.5f, -100.0f,
                                  -1e4f, 1e4f, 0.5f, -0.5f, 3.0f, -3.0f};
  memcpy(x + 100, special, sizeof special); /* in the vector part */
  memcpy(x + n - 5, special + 5, 5 * sizeof(float)); /* and in the tail */
  double *ref = malloc(sizeof(double) * (size_t)n);
  for (int64_t i = 0; i < n; i++) ref[i] = (double)x[i] / (1.0 + exp(-(double)x[i]));
  memcpy(x2, x, sizeof(float) * (size_t)n);
  ops_pool *p1 = ops_pool_create(1, 16), *p2 = ops_pool_create(2, 16);
  ops_silu(p1, x, n);
  ops_silu(p2, x2, n);
  assert_memory_equal(x, x2, sizeof(float) * (size_t)n);
  for (int64_t i = 0; i < n; i++) {
    double d = fabs(x[i] - ref[i]);
    /* relative per element; below 1e-30 (x < -64) both are zero for any purpose */
    if (!(d <= TOL * fabs(ref[i]) + 1e-30)) fail_msg("silu(%g) = %g, want %g", (double)x2[i], x[i], ref[i]);
  }
  float nan_in = NAN;
  ops_silu(p1, &nan_in, 1);
  assert_true(isnan(nan_in));
  float nans[20];
  for (int i = 0; i < 20; i++) nans[i] = NAN;
  ops_silu(p1, nans, 20);
  for (int i = 0; i < 20; i++) assert_true(isnan(nans[i]));
  ops_pool_free(p1);
  ops_pool_free(p2);
  free(x); free(x2); free(ref);
}

static void test_upsample(void **state) {
  (void)state;
  int64_t dims[][3] = {{3, 5, 7}, {1, 1, 1}, {16, 9, 11}, {2, 1, 13}};
  ops_pool *p = ops_pool_create(2, 16);
  for (size_t d = 0; d < sizeof dims / sizeof *dims; d++) {
    int64_t C = dims[d][0], H = dims[d][1], W = dims[d][2];
    float *x = rand_buf(C * H * W, 1.0f, 0.0f), *y = malloc(sizeof(float) * (size_t)(4 * C * H * W));
    ops_upsample2x(p, x, C, H, W, y);
    for (int64_t c = 0; c < C; c++)
      for (int64_t i = 0; i < 2 * H; i++)
        for (int64_t k = 0; k < 2 * W; k++)
          assert_true(y[(c * 2 * H + i) * 2 * W + k] == x[(c * H + i / 2) * W + k / 2]);
    free(x);
    free(y);
  }
  ops_pool_free(p);
}

/* ---- single-head attention ---------------------------------------------------------- */

static void check_attention(int64_t C, int64_t N, float mag) {
  float *q = rand_buf(C * N, mag, 0.0f), *k = rand_buf(C * N, mag, 0.0f), *v = rand_buf(C * N, 1.0f, 0.2f);
  float *o1 = malloc(sizeof(float) * (size_t)(C * N)), *o2 = malloc(sizeof(float) * (size_t)(C * N));
  double *ref = malloc(sizeof(double) * (size_t)(C * N)), *s = malloc(sizeof(double) * (size_t)N);
  float scale = 1.0f / sqrtf((float)C);
  for (int64_t i = 0; i < N; i++) {
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < N; j++) {
      double d = 0;
      for (int64_t c = 0; c < C; c++) d += (double)q[c * N + i] * k[c * N + j];
      s[j] = d * scale;
      if (s[j] > mx) mx = s[j];
    }
    for (int64_t j = 0; j < N; j++) sum += (s[j] = exp(s[j] - mx));
    for (int64_t c = 0; c < C; c++) {
      double acc = 0;
      for (int64_t j = 0; j < N; j++) acc += s[j] * v[c * N + j];
      ref[c * N + i] = acc / sum;
    }
  }
  for (int threads = 1; threads <= 2; threads++) {
    float *o = threads == 1 ? o1 : o2;
    ops_pool *p = ops_pool_create(threads, 16);
    assert_int_equal(ops_pool_reserve(p, ops_attention_single_scratch(N)), 0);
    ops_attention_single(p, q, k, v, C, N, scale, o);
    double e = rel_err(o, ref, C * N);
    if (!(e <= TOL)) fail_msg("attention C %lld N %lld: rel error %g", (long long)C, (long long)N, e);
    ops_pool_free(p);
  }
  assert_memory_equal(o1, o2, sizeof(float) * (size_t)(C * N));
  free(q); free(k); free(v); free(o1); free(o2); free(ref); free(s);
}

static void test_attention_single(void **state) {
  (void)state;
  check_attention(8, 1, 1.0f);
  check_attention(8, 17, 1.0f);
  check_attention(8, 300, 1.0f);
  check_attention(8, 300, 4.0f); /* peaky softmax */
  check_attention(33, 130, 2.0f);
  /* blocks of 256 queries, narrower past N = 16384 to stay within 16 MiB, never under 64 */
  assert_int_equal(ops_attention_single_scratch(1), 256);
  assert_int_equal(ops_attention_single_scratch(4096), 256 * 4096);
  assert_int_equal(ops_attention_single_scratch(20000), 208 * 20000);
  assert_int_equal(ops_attention_single_scratch(65536), 64 * 65536);
  assert_int_equal(ops_attention_single_scratch(1 << 20), 64 << 20);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_conv_default_method),
      cmocka_unit_test(test_conv_small),
      cmocka_unit_test(test_conv_many_strips),
      cmocka_unit_test(test_conv_winograd),
      cmocka_unit_test(test_conv_reserves_itself),
      cmocka_unit_test(test_pool_reserve),
      cmocka_unit_test(test_group_norm),
      cmocka_unit_test(test_group_norm_rows),
      cmocka_unit_test(test_conv_prepared_weights),
      cmocka_unit_test(test_conv1x1_inplace),
      cmocka_unit_test(test_silu),
      cmocka_unit_test(test_upsample),
      cmocka_unit_test(test_attention_single),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
