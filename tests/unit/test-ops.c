/* test-ops.c -- the CPU kernels against straightforward double-precision loops */
/* SPDX-License-Identifier: MIT */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/fp16.h"
#include "ops/ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng = 12345;
static float frand(void) {
  rng = rng * 6364136223846793005ull + 1442695040888963407ull;
  return (float)((rng >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}

static void check_linear(ops_pool *p, int64_t M, int64_t N, int64_t K, ops_wtype wt, int misalign) {
  float *x = malloc(sizeof(float) * M * K), *y = malloc(sizeof(float) * M * N), *b = malloc(sizeof(float) * N);
  float *wf = malloc(sizeof(float) * N * K);
  uint8_t *raw = malloc((size_t)(N * K) * 4 + 8);
  for (int64_t i = 0; i < M * K; i++) x[i] = frand();
  for (int64_t i = 0; i < N; i++) b[i] = frand();
  for (int64_t i = 0; i < N * K; i++) wf[i] = fp16_to_f32(f32_to_fp16(frand() * 0.1f));
  void *wdata = raw + misalign;
  if (wt == OPS_W_F16) f32_to_fp16_row(wf, wdata, (size_t)(N * K));
  else memcpy(wdata, wf, sizeof(float) * N * K);
  ops_mat w = {wt, N, K, wdata};
  ops_linear(p, x, M, &w, b, y);
  double worst = 0;
  for (int64_t m = 0; m < M; m++)
    for (int64_t n = 0; n < N; n++) {
      double s = b[n];
      for (int64_t k = 0; k < K; k++) s += (double)x[m * K + k] * wf[n * K + k];
      double d = fabs(s - y[m * N + n]);
      if (d > worst) worst = d;
    }
  if (worst > 1e-4) fail_msg("linear M=%lld N=%lld K=%lld type=%d: max error %g", (long long)M,
                             (long long)N, (long long)K, wt, worst);
  free(x); free(y); free(b); free(wf); free(raw);
}

static void test_linear(void **state) {
  (void)state;
  ops_pool *p = ops_pool_create(3, ops_linear_scratch(300));
  assert_non_null(p);
  int64_t shapes[][3] = {{1, 1, 1}, {77, 64, 64}, {5, 300, 17}, {154, 129, 257}, {3, 513, 64}};
  for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++) {
    if (shapes[i][2] > 300) continue;
    check_linear(p, shapes[i][0], shapes[i][1], shapes[i][2], OPS_W_F16, 0);
    check_linear(p, shapes[i][0], shapes[i][1], shapes[i][2], OPS_W_F16, 1); /* odd address */
    check_linear(p, shapes[i][0], shapes[i][1], shapes[i][2], OPS_W_F32, 0);
  }
  ops_pool_free(p);
}

static void test_layer_norm_and_act(void **state) {
  (void)state;
  ops_pool *p = ops_pool_create(2, 16);
  int64_t M = 7, D = 96;
  float x[7 * 96], y[7 * 96], g[96], b[96];
  for (int i = 0; i < M * D; i++) x[i] = frand() * 3 + 1;
  for (int i = 0; i < D; i++) { g[i] = frand(); b[i] = frand(); }
  ops_layer_norm(p, x, M, D, g, b, 1e-5f, y);
  for (int64_t m = 0; m < M; m++) {
    double s = 0, ss = 0;
    for (int64_t i = 0; i < D; i++) s += x[m * D + i];
    double mu = s / D;
    for (int64_t i = 0; i < D; i++) ss += (x[m * D + i] - mu) * (x[m * D + i] - mu);
    double rs = 1 / sqrt(ss / D + 1e-5);
    for (int64_t i = 0; i < D; i++)
      assert_true(fabs((x[m * D + i] - mu) * rs * g[i] + b[i] - y[m * D + i]) < 1e-5);
  }
  float a[5000], q[5000], e[5000];
  for (int i = 0; i < 5000; i++) a[i] = q[i] = e[i] = frand() * 6;
  ops_quick_gelu(p, q, 5000);
  ops_gelu_erf(p, e, 5000);
  for (int i = 0; i < 5000; i++) {
    double v = a[i];
    assert_true(fabs(v / (1 + exp(-1.702 * v)) - q[i]) < 1e-5);
    assert_true(fabs(0.5 * v * (1 + erf(v / sqrt(2.0))) - e[i]) < 1e-5);
  }
  ops_add(p, a, q, 5000);
  ops_pool_free(p);
}

static void test_attention(void **state) {
  (void)state;
  int64_t B = 2, T = 77, H = 3, dh = 64, W = H * dh;
  ops_pool *p = ops_pool_create(2, (size_t)(T * T));
  float *q = malloc(sizeof(float) * B * T * W), *k = malloc(sizeof(float) * B * T * W),
        *v = malloc(sizeof(float) * B * T * W), *o = malloc(sizeof(float) * B * T * W);
  for (int64_t i = 0; i < B * T * W; i++) { q[i] = frand(); k[i] = frand(); v[i] = frand(); }
  ops_attention_causal(p, q, k, v, B, T, H, dh, o);
  double worst = 0, s[77];
  for (int64_t b = 0; b < B; b++)
    for (int64_t h = 0; h < H; h++)
      for (int64_t i = 0; i < T; i++) {
        double mx = -1e300, sum = 0;
        for (int64_t j = 0; j <= i; j++) {
          double d = 0;
          for (int64_t c = 0; c < dh; c++) d += (double)q[(b * T + i) * W + h * dh + c] * k[(b * T + j) * W + h * dh + c];
          s[j] = d / 8.0;
          if (s[j] > mx) mx = s[j];
        }
        for (int64_t j = 0; j <= i; j++) { s[j] = exp(s[j] - mx); sum += s[j]; }
        for (int64_t c = 0; c < dh; c++) {
          double acc = 0;
          for (int64_t j = 0; j <= i; j++) acc += s[j] / sum * v[(b * T + j) * W + h * dh + c];
          double d = fabs(acc - o[(b * T + i) * W + h * dh + c]);
          if (d > worst) worst = d;
        }
      }
  assert_true(worst < 1e-5);
  free(q); free(k); free(v); free(o);
  ops_pool_free(p);
}

typedef struct { int hits[1000]; } count_arg;
static void count_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  scratch[0] = (float)task; /* scratch is writable */
  __atomic_fetch_add(&((count_arg *)a)->hits[task], 1, __ATOMIC_RELAXED);
}

static void test_pool_runs_every_task_once(void **state) {
  (void)state;
  for (int n = 1; n <= 4; n++) {
    ops_pool *p = ops_pool_create(n, 4);
    assert_int_equal(ops_pool_size(p), n);
    for (int round = 0; round < 50; round++) {
      count_arg c;
      memset(&c, 0, sizeof c);
      int tasks = 1 + (round * 37) % 1000;
      ops_pool_run(p, tasks, count_task, &c);
      for (int t = 0; t < tasks; t++) assert_int_equal(c.hits[t], 1);
      for (int t = tasks; t < 1000; t++) assert_int_equal(c.hits[t], 0);
    }
    ops_pool_free(p);
  }
  ops_pool_free(NULL);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_linear),
      cmocka_unit_test(test_layer_norm_and_act),
      cmocka_unit_test(test_attention),
      cmocka_unit_test(test_pool_runs_every_task_once),
  };
  return cmocka_run_group_tests_name("ops", tests, NULL, NULL);
}
