/* ops_cpu.c -- the CPU backend: worker pool, OpenBLAS-backed linear layers, norms, attention */
/* SPDX-License-Identifier: MIT */
#include "ops/ops.h"

#include "core/fp16.h"
#include "core/status.h"

#include <cblas.h>
#include <malloc.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* Rows of an F16 weight widened per GEMM call: big enough for OpenBLAS to run near its
** best, small enough that the widened panel stays in L2 next to the activations. */
#define LINEAR_PANEL 128

/*
** Pool. Lock order: only 'mu' exists. The caller publishes a job under 'mu', bumps
** 'generation' and broadcasts; workers claim task indices with an atomic counter and the
** last one to finish signals 'done_cv'.
*/
struct ops_pool {
  int n;                     /* workers including the caller */
  pthread_t *threads;        /* n-1 threads */
  float **scratch;           /* n blocks */
  size_t scratch_floats;     /* floats in each block (grown by ops_pool_reserve) */
  pthread_mutex_t mu;
  pthread_cond_t work_cv, done_cv;
  uint64_t generation;       /* bumped per job */
  int stopping;
  ops_task_fn fn;            /* current job */
  void *arg;
  int n_tasks;
  atomic_int next_task;
  int active;                /* workers still inside the current job */
  float *ws;                 /* the owner's activation workspace (grow-only) */
  size_t ws_floats;
};

typedef struct {
  ops_pool *p;
  int id;
} worker_arg;

static void run_tasks(ops_pool *p, int worker) {
  for (;;) {
    int t = atomic_fetch_add(&p->next_task, 1);
    if (t >= p->n_tasks) break;
    p->fn(p->arg, t, worker, p->scratch[worker]);
  }
}

static void *worker_main(void *a) {
  worker_arg wa = *(worker_arg *)a;
  free(a);
  ops_pool *p = wa.p;
  uint64_t seen = 0;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    while (!p->stopping && p->generation == seen) pthread_cond_wait(&p->work_cv, &p->mu);
    if (p->stopping) break;
    seen = p->generation;
    pthread_mutex_unlock(&p->mu);
    run_tasks(p, wa.id);
    pthread_mutex_lock(&p->mu);
    if (--p->active == 0) pthread_cond_signal(&p->done_cv);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

ops_pool *ops_pool_create(int n_threads, size_t scratch_floats) {
  if (n_threads <= 0) {
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    n_threads = c > 0 ? (int)c : 1;
  }
  ops_pool *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  p->n = n_threads;
  p->threads = calloc((size_t)n_threads, sizeof(pthread_t));
  p->scratch = calloc((size_t)n_threads, sizeof(float *));
  if (!p->threads || !p->scratch) goto fail;
  p->scratch_floats = scratch_floats;
  for (int i = 0; i < n_threads; i++) {
    p->scratch[i] = aligned_alloc(64, ((scratch_floats * sizeof(float)) + 63) / 64 * 64 + 64);
    if (!p->scratch[i]) goto fail;
  }
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->work_cv, NULL);
  pthread_cond_init(&p->done_cv, NULL);
  for (int i = 1; i < n_threads; i++) {
    worker_arg *wa = malloc(sizeof *wa);
    if (!wa) goto fail_threads;
    wa->p = p;
    wa->id = i;
    if (pthread_create(&p->threads[i], NULL, worker_main, wa)) {
      free(wa);
      p->n = i;
      goto fail_threads;
    }
  }
  return p;
fail_threads:
  ops_pool_free(p);
  return NULL;
fail:
  if (p->scratch)
    for (int i = 0; i < n_threads; i++) free(p->scratch[i]);
  free(p->scratch);
  free(p->threads);
  free(p);
  return NULL;
}

void ops_pool_free(ops_pool *p) {
  if (!p) return;
  pthread_mutex_lock(&p->mu);
  p->stopping = 1;
  pthread_cond_broadcast(&p->work_cv);
  pthread_mutex_unlock(&p->mu);
  for (int i = 1; i < p->n; i++) pthread_join(p->threads[i], NULL);
  for (int i = 0; i < p->n; i++) free(p->scratch[i]);
  free(p->ws);
  pthread_mutex_destroy(&p->mu);
  pthread_cond_destroy(&p->work_cv);
  pthread_cond_destroy(&p->done_cv);
  free(p->scratch);
  free(p->threads);
  free(p);
}

int ops_pool_size(const ops_pool *p) { return p->n; }

float *ops_pool_workspace(ops_pool *p, size_t floats) {
  if (floats <= p->ws_floats) return p->ws;
  size_t want = floats + floats / 4; /* some headroom against small growth steps */
  float *n = aligned_alloc(64, (want * sizeof(float) + 63) / 64 * 64);
  if (!n) return NULL;
  free(p->ws);
  p->ws = n;
  p->ws_floats = want;
  return n;
}

void ops_pool_run(ops_pool *p, int n_tasks, ops_task_fn fn, void *arg) {
  if (n_tasks <= 0) return;
  if (p->n == 1 || n_tasks == 1) {
    for (int t = 0; t < n_tasks; t++) fn(arg, t, 0, p->scratch[0]);
    return;
  }
  pthread_mutex_lock(&p->mu);
  p->fn = fn;
  p->arg = arg;
  p->n_tasks = n_tasks;
  atomic_store(&p->next_task, 0);
  p->active = p->n - 1;
  p->generation++;
  pthread_cond_broadcast(&p->work_cv);
  pthread_mutex_unlock(&p->mu);
  run_tasks(p, 0);
  pthread_mutex_lock(&p->mu);
  while (p->active > 0) pthread_cond_wait(&p->done_cv, &p->mu);
  pthread_mutex_unlock(&p->mu);
}

/* Grows every block before it frees any, so a failure leaves the old blocks in place.
** Workers only touch p->scratch[i] inside a job, and the owner calls this between jobs;
** the next job's publication under 'mu' orders these writes before their reads. */
int ops_pool_reserve(ops_pool *p, size_t floats) {
  if (floats <= p->scratch_floats) return 0;
  if (floats > (SIZE_MAX - 128) / sizeof(float)) return LUNA_ENOMEM;
  size_t bytes = ((floats * sizeof(float)) + 63) / 64 * 64 + 64;
  float **fresh = calloc((size_t)p->n, sizeof(float *));
  if (!fresh) return LUNA_ENOMEM;
  for (int i = 0; i < p->n; i++) {
    fresh[i] = aligned_alloc(64, bytes);
    if (!fresh[i]) {
      for (int k = 0; k < i; k++) free(fresh[k]);
      free(fresh);
      return LUNA_ENOMEM;
    }
  }
  pthread_mutex_lock(&p->mu);
  for (int i = 0; i < p->n; i++) {
    free(p->scratch[i]);
    p->scratch[i] = fresh[i];
  }
  p->scratch_floats = floats;
  pthread_mutex_unlock(&p->mu);
  free(fresh);
  return 0;
}

/* ---- linear ---------------------------------------------------------------------- */

size_t ops_linear_scratch(int64_t max_cols) { return (size_t)LINEAR_PANEL * (size_t)max_cols; }

typedef struct {
  const float *x;
  int64_t M;
  const ops_mat *w;
  const float *bias;
  float *y;
  int64_t panel;
} linear_job;

static void linear_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  const linear_job *j = a;
  const ops_mat *w = j->w;
  int64_t n0 = (int64_t)task * j->panel;
  int64_t nn = w->rows - n0 < j->panel ? w->rows - n0 : j->panel;
  const float *wp;
  if (w->type == OPS_W_F16) {
    fp16_to_f32_row((const uint8_t *)w->data + 2 * n0 * w->cols, scratch, (size_t)(nn * w->cols));
    wp = scratch;
  } else {
    wp = (const float *)w->data + n0 * w->cols;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)j->M, (blasint)nn, (blasint)w->cols,
              1.0f, j->x, (blasint)w->cols, wp, (blasint)w->cols, 0.0f, j->y + n0, (blasint)w->rows);
  if (j->bias)
    for (int64_t m = 0; m < j->M; m++) {
      float *row = j->y + m * w->rows + n0;
      const float *b = j->bias + n0;
      for (int64_t i = 0; i < nn; i++) row[i] += b[i];
    }
}

void ops_linear(ops_pool *p, const float *x, int64_t M, const ops_mat *w, const float *bias, float *y) {
  linear_job j = {x, M, w, bias, y, LINEAR_PANEL};
  if (w->type == OPS_W_F32) {
    /* no widening needed: one slice per worker, multiples of 16 rows */
    int64_t per = (w->rows + p->n - 1) / p->n;
    j.panel = (per + 15) / 16 * 16;
  }
  int n_tasks = (int)((w->rows + j.panel - 1) / j.panel);
  ops_pool_run(p, n_tasks, linear_task, &j);
}

/* ---- low-rank terms -------------------------------------------------------------- */

#define LOWRANK_ROWS 32

size_t ops_lowrank_scratch(int64_t rank) { return (size_t)LOWRANK_ROWS * (size_t)rank; }

typedef struct {
  const float *x, *down, *up;
  int64_t M, in, rank, out;
  float coef;
  float *y;
} lowrank_job;

static void lowrank_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  const lowrank_job *j = a;
  int64_t m0 = (int64_t)task * LOWRANK_ROWS;
  int64_t mm = j->M - m0 < LOWRANK_ROWS ? j->M - m0 : LOWRANK_ROWS;
  /* t = x down^T: [mm, rank]; y += coef * t up^T */
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)mm, (blasint)j->rank, (blasint)j->in,
              1.0f, j->x + m0 * j->in, (blasint)j->in, j->down, (blasint)j->in, 0.0f, scratch, (blasint)j->rank);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)mm, (blasint)j->out, (blasint)j->rank,
              j->coef, scratch, (blasint)j->rank, j->up, (blasint)j->rank, 1.0f, j->y + m0 * j->out, (blasint)j->out);
}

void ops_lowrank_add(ops_pool *p, const float *x, int64_t M, int64_t in, const float *down,
                     const float *up, int64_t rank, int64_t out, float coef, float *y) {
  if (M <= 0 || rank <= 0) return;
  lowrank_job j = {x, down, up, M, in, rank, out, coef, y};
  ops_pool_run(p, (int)((M + LOWRANK_ROWS - 1) / LOWRANK_ROWS), lowrank_task, &j);
}

void ops_mat_to_f32(const ops_mat *w, float *dst) {
  size_t n = (size_t)(w->rows * w->cols);
  if (w->type == OPS_W_F16) fp16_to_f32_row(w->data, dst, n);
  else memcpy(dst, w->data, n * sizeof(float));
}

/* ---- elementwise and norms ------------------------------------------------------- */

typedef struct {
  const float *x;
  float *y;
  const float *g, *b;
  int64_t rows, D, per;
  float eps;
} rows_job;

static void layer_norm_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  (void)scratch;
  const rows_job *j = a;
  int64_t r0 = task * j->per, r1 = r0 + j->per < j->rows ? r0 + j->per : j->rows;
  for (int64_t r = r0; r < r1; r++) {
    const float *x = j->x + r * j->D;
    float *y = j->y + r * j->D;
    double s = 0, ss = 0;
    for (int64_t i = 0; i < j->D; i++) s += x[i];
    double mean = s / (double)j->D;
    for (int64_t i = 0; i < j->D; i++) {
      double d = x[i] - mean;
      ss += d * d;
    }
    float fm = (float)mean, rstd = (float)(1.0 / sqrt(ss / (double)j->D + (double)j->eps));
    for (int64_t i = 0; i < j->D; i++) y[i] = (x[i] - fm) * rstd * j->g[i] + j->b[i];
  }
}

static int split_tasks(const ops_pool *p, int64_t rows, int64_t *per) {
  int n = p->n * 2;
  if (n > rows) n = (int)rows;
  if (n < 1) n = 1;
  *per = (rows + n - 1) / n;
  return (int)((rows + *per - 1) / *per);
}

void ops_layer_norm(ops_pool *p, const float *x, int64_t M, int64_t D, const float *g,
                    const float *b, float eps, float *y) {
  rows_job j = {.x = x, .y = y, .g = g, .b = b, .rows = M, .D = D, .eps = eps};
  int n = split_tasks(p, M, &j.per);
  ops_pool_run(p, n, layer_norm_task, &j);
}

typedef struct {
  float *x;
  const float *y;
  int64_t n, per;
  int kind;
} elt_job;

static void elt_task(void *a, int task, int worker, float *scratch) {
  (void)worker;
  (void)scratch;
  const elt_job *j = a;
  int64_t i0 = task * j->per, i1 = i0 + j->per < j->n ? i0 + j->per : j->n;
  float *x = j->x;
  switch (j->kind) {
  case 0:
    for (int64_t i = i0; i < i1; i++) x[i] = x[i] / (1.0f + expf(-1.702f * x[i]));
    break;
  case 1:
    for (int64_t i = i0; i < i1; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * (float)M_SQRT1_2));
    break;
  default:
    for (int64_t i = i0; i < i1; i++) x[i] += j->y[i];
    break;
  }
}

static void elementwise(ops_pool *p, float *x, const float *y, int64_t n, int kind) {
  elt_job j = {x, y, n, 0, kind};
  int tasks = split_tasks(p, (n + 1023) / 1024, &j.per);
  j.per *= 1024;
  tasks = (int)((n + j.per - 1) / j.per);
  ops_pool_run(p, tasks, elt_task, &j);
}

void ops_quick_gelu(ops_pool *p, float *x, int64_t n) { elementwise(p, x, NULL, n, 0); }
void ops_gelu_erf(ops_pool *p, float *x, int64_t n) { elementwise(p, x, NULL, n, 1); }
void ops_add(ops_pool *p, float *x, const float *y, int64_t n) { elementwise(p, x, y, n, 2); }

/* ---- attention ------------------------------------------------------------------- */

typedef struct {
  const float *q, *k, *v;
  float *out;
  int64_t T, H, dh;
} attn_job;

static void attn_task(void *a, int task, int worker, float *S) {
  (void)worker;
  const attn_job *j = a;
  int64_t b = task / j->H, h = task % j->H, T = j->T, ld = j->H * j->dh;
  const float *q = j->q + b * T * ld + h * j->dh;
  const float *k = j->k + b * T * ld + h * j->dh;
  const float *v = j->v + b * T * ld + h * j->dh;
  float *o = j->out + b * T * ld + h * j->dh;
  float scale = 1.0f / sqrtf((float)j->dh);
  /* S = q k^T * scale, then a causal softmax row by row (masked entries are exactly 0,
  ** as exp(-FLT_MAX - max) is in fp32) */
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)T, (blasint)T, (blasint)j->dh, scale,
              q, (blasint)ld, k, (blasint)ld, 0.0f, S, (blasint)T);
  for (int64_t i = 0; i < T; i++) {
    float *r = S + i * T, mx = r[0], sum = 0;
    for (int64_t c = 1; c <= i; c++) mx = r[c] > mx ? r[c] : mx;
    for (int64_t c = 0; c <= i; c++) {
      r[c] = expf(r[c] - mx);
      sum += r[c];
    }
    float inv = 1.0f / sum;
    for (int64_t c = 0; c <= i; c++) r[c] *= inv;
    for (int64_t c = i + 1; c < T; c++) r[c] = 0.0f;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)T, (blasint)j->dh, (blasint)T, 1.0f,
              S, (blasint)T, v, (blasint)ld, 0.0f, o, (blasint)ld);
}

void ops_attention_causal(ops_pool *p, const float *q, const float *k, const float *v,
                          int64_t B, int64_t T, int64_t H, int64_t dh, float *out) {
  attn_job j = {q, k, v, out, T, H, dh};
  ops_pool_run(p, (int)(B * H), attn_task, &j);
}

/* ---- OpenBLAS kernel selection ---------------------------------------------------- */

const char *ops_blas_core(void) { return openblas_get_corename(); }

void ops_memory_setup(void) { mallopt(M_MMAP_THRESHOLD, 1 << 20); }

void ops_blas_setup(char **argv) {
  const char *core = openblas_get_corename();
  static const char *good[] = {"Haswell", "Zen", "SkylakeX", "Cooperlake", "SapphireRapids"};
  int is_good = 0;
  for (size_t i = 0; i < sizeof good / sizeof *good; i++)
    if (core && !strcasecmp(core, good[i])) is_good = 1;
  const char *want = NULL;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    want = "SkylakeX";
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    want = "Haswell";
  int upgrade = want && !getenv("OPENBLAS_CORETYPE") && !getenv("LUNA_BLAS_REEXEC") &&
                (!is_good || (!strcmp(want, "SkylakeX") && !strcasecmp(core, "Haswell")));
  /* OpenBLAS's own threads start before main() and so do not block the signals lunad
  ** reads from a signalfd: a SIGTERM would kill the process instead of stopping it */
  int own_threads = !getenv("OPENBLAS_NUM_THREADS") && !getenv("LUNA_BLAS_REEXEC") && openblas_get_num_threads() > 1;
  if ((upgrade || own_threads) && argv) {
    if (upgrade) setenv("OPENBLAS_CORETYPE", want, 1);
    /* luna runs its own workers; keep OpenBLAS from starting idle ones of its own */
    if (!getenv("OPENBLAS_NUM_THREADS")) setenv("OPENBLAS_NUM_THREADS", "1", 1);
    setenv("LUNA_BLAS_REEXEC", "1", 1);
    execv("/proc/self/exe", argv);
    fprintf(stderr, "luna: warning: could not re-execute with OPENBLAS_CORETYPE=%s; "
                    "OpenBLAS runs its slow '%s' kernels\n", want, core ? core : "?");
  }
  unsetenv("LUNA_BLAS_REEXEC");
  openblas_set_num_threads(1);
}
