/* conv-rate.c -- measures ops_conv2d on the full-size VAE decoder's 3x3 convolutions next to this machine's SGEMM rate */
/* SPDX-License-Identifier: MIT */
/*
** Prints a markdown table: per shape the best time of ops_conv2d over R runs (after one
** warm-up run) and its rate in GFLOP/s (2 * cout * cin * 9 * H * W per convolution),
** next to OpenBLAS's own SGEMM rate on a 4096^2 product measured in the same run on all
** CPUs, for the im2col and the Winograd methods (the latter's rate counts the direct
** method's FLOPs, so the two compare as times do). The convolutions run on a luna pool of T threads, with OpenBLAS single-threaded
** inside each worker, as the daemon runs them.
*/
#include "ops/ops.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static float *filled(size_t n, float scale, uint64_t seed) {
  float *b = malloc(n * sizeof(float));
  if (!b) return NULL;
  for (size_t i = 0; i < n; i++) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    b[i] = ((float)(seed >> 40) / (float)(1 << 24) * 2.0f - 1.0f) * scale;
  }
  return b;
}

/* Best time in seconds of a 4096^2 SGEMM on OpenBLAS's threads (one per CPU). */
static double sgemm_rate(int n, int reps) {
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  openblas_set_num_threads(cpus > 0 ? (int)cpus : 1);
  size_t sz = (size_t)n * (size_t)n;
  float *a = filled(sz, 1.0f, 1), *b = filled(sz, 1.0f, 2), *c = malloc(sz * sizeof(float));
  double best = 1e30;
  if (a && b && c)
    for (int r = 0; r < reps + 1; r++) {
      double t = now_s();
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
      t = now_s() - t;
      if (r > 0 && t < best) best = t;
    }
  free(a);
  free(b);
  free(c);
  openblas_set_num_threads(1);
  return 2.0 * n * (double)n * n / best / 1e9;
}

typedef struct {
  int cin, cout, h, w;
} shape;

int main(int argc, char **argv) {
  int threads = 2, reps = 3, n_custom = 0, methods = 3; /* bit 0 im2col, bit 1 Winograd */
  shape custom[16];
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      printf("usage: conv-rate [--threads T] [--reps R] [--method im2col|winograd|both] [--shape CIN,COUT,H,W]...\n"
             "Times ops_conv2d (3x3, stride 1, pad 1) on the full-size VAE decoder's shapes\n"
             "(or the given ones) on a pool of T threads (default 2), best of R runs (default 3),\n"
             "with each method (default both), and prints a markdown table with this machine's\n"
             "SGEMM rate (4096^2) beside it. Winograd's rate counts the direct method's FLOPs.\n");
      return 0;
    } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--method") && i + 1 < argc) {
      i++;
      methods = !strcmp(argv[i], "im2col") ? 1 : !strcmp(argv[i], "winograd") ? 2 : !strcmp(argv[i], "both") ? 3 : 0;
      if (!methods) {
        fprintf(stderr, "conv-rate: --method is im2col, winograd or both\n");
        return 2;
      }
    }
    else if (!strcmp(argv[i], "--shape") && i + 1 < argc && n_custom < 16) {
      shape *s = &custom[n_custom];
      if (sscanf(argv[++i], "%d,%d,%d,%d", &s->cin, &s->cout, &s->h, &s->w) != 4 || s->cin < 1 ||
          s->cout < 1 || s->h < 1 || s->w < 1) {
        fprintf(stderr, "conv-rate: --shape wants CIN,COUT,H,W (positive)\n");
        return 2;
      }
      n_custom++;
    } else {
      fprintf(stderr, "conv-rate: unknown argument '%s' (see --help)\n", argv[i]);
      return 2;
    }
  }
  if (threads < 1 || threads > 256 || reps < 1) {
    fprintf(stderr, "conv-rate: --threads must be in [1, 256] and --reps >= 1\n");
    return 2;
  }
  ops_blas_setup(argv);
  static const shape decoder[] = {{512, 512, 64, 64}, {512, 512, 128, 128}, {256, 256, 256, 256}, {128, 128, 512, 512}};
  const shape *shapes = n_custom ? custom : decoder;
  int n_shapes = n_custom ? n_custom : (int)(sizeof decoder / sizeof *decoder);

  double sgemm = sgemm_rate(4096, 3);
  usleep(500 * 1000); /* OpenBLAS's idle threads spin for a while before they sleep */
  ops_pool *p = ops_pool_create(threads, 16);
  if (!p) {
    fprintf(stderr, "conv-rate: cannot start %d threads\n", threads);
    return 1;
  }
  printf("OpenBLAS core %s; SGEMM 4096^2 on %ld CPUs: %.1f GFLOP/s; convolutions on %d threads, best of %d\n\n",
         ops_blas_core(), sysconf(_SC_NPROCESSORS_ONLN), sgemm, threads, reps);
  printf("| conv 3x3 pad 1 | GFLOP |");
  for (int m = 0; m < 2; m++)
    if (methods & (1 << m)) printf(" %s ms | GFLOP/s | of SGEMM |", m ? "Winograd" : "im2col");
  printf("\n|---|---:|");
  for (int m = 0; m < 2; m++)
    if (methods & (1 << m)) printf("---:|---:|---:|");
  printf("\n");
  int rc = 0;
  for (int s = 0; s < n_shapes; s++) {
    const shape *sh = &shapes[s];
    size_t nx = (size_t)sh->cin * sh->h * sh->w, ny = (size_t)sh->cout * sh->h * sh->w;
    size_t nw = (size_t)sh->cout * sh->cin * 9;
    float *x = filled(nx, 1.0f, 3), *w = filled(nw, 0.02f, 4), *b = filled((size_t)sh->cout, 0.1f, 5);
    float *y = malloc(ny * sizeof(float));
    ops_conv c = {sh->cout, sh->cin, 3, 3, w, b, NULL};
    if (!x || !w || !b || !y || ops_pool_reserve(p, ops_conv2d_scratch(&c, sh->w)) != 0) {
      fprintf(stderr, "conv-rate: out of memory for %d -> %d at %dx%d\n", sh->cin, sh->cout, sh->h, sh->w);
      rc = 1;
    } else {
      double gflop = 2.0 * sh->cout * (double)sh->cin * 9 * sh->h * sh->w / 1e9;
      printf("| %d -> %d at %dx%d | %.1f |", sh->cin, sh->cout, sh->h, sh->w, gflop);
      for (int m = 0; m < 2; m++) {
        if (!(methods & (1 << m))) continue;
        ops_conv2d_set_method(m ? OPS_CONV_WINOGRAD : OPS_CONV_IM2COL);
        double best = 1e30;
        for (int r = 0; r < reps + 1; r++) {
          double t = now_s();
          ops_conv2d(p, x, sh->h, sh->w, &c, 1, 1, 1, 1, 1, y);
          t = now_s() - t;
          if (r > 0 && t < best) best = t;
        }
        printf(" %.1f | %.1f | %.0f%% |", best * 1e3, gflop / best, 100.0 * gflop / best / sgemm);
      }
      printf("\n");
      fflush(stdout);
    }
    free(x);
    free(w);
    free(b);
    free(y);
  }
  ops_pool_free(p);
  return rc;
}
