/* sgemm-rate.c -- measures this machine's OpenBLAS SGEMM rate on a large square product */
/* SPDX-License-Identifier: MIT */
/*
** Prints one JSON line: {"gflops": best rate, "n": size, "threads": t, "core": kernel}.
** The product runs on OpenBLAS's own threads (one per CPU unless OPENBLAS_NUM_THREADS
** says otherwise), with the kernel selection luna itself uses (ops_blas_setup).
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

int main(int argc, char **argv) {
  int n = 4096, reps = 5;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      printf("usage: sgemm-rate [--n N] [--reps R]\n"
             "Times C = A*B for N x N fp32 matrices (default 4096) R times (default 5) with\n"
             "OpenBLAS on every CPU and prints the best rate as JSON.\n");
      return 0;
    } else if (!strcmp(argv[i], "--n") && i + 1 < argc) n = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
    else {
      fprintf(stderr, "sgemm-rate: unknown argument '%s' (see --help)\n", argv[i]);
      return 2;
    }
  }
  if (n < 64 || n > 16384 || reps < 1) {
    fprintf(stderr, "sgemm-rate: --n must be in [64, 16384] and --reps >= 1\n");
    return 2;
  }
  ops_blas_setup(argv);
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  openblas_set_num_threads(cpus > 0 ? (int)cpus : 1);
  size_t sz = (size_t)n * (size_t)n;
  float *a = malloc(sz * 4), *b = malloc(sz * 4), *c = malloc(sz * 4);
  if (!a || !b || !c) {
    fprintf(stderr, "sgemm-rate: out of memory for three %dx%d matrices\n", n, n);
    return 1;
  }
  for (size_t i = 0; i < sz; i++) {
    a[i] = (float)((i * 7919) % 1000) * 1e-3f;
    b[i] = (float)((i * 104729) % 1000) * 1e-3f;
  }
  double best = 1e30;
  for (int r = 0; r < reps + 1; r++) {
    double t = now_s();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
    t = now_s() - t;
    if (r > 0 && t < best) best = t; /* the first run warms up */
  }
  printf("{\"gflops\": %.1f, \"n\": %d, \"threads\": %d, \"core\": \"%s\"}\n",
         2.0 * n * (double)n * n / best / 1e9, n, openblas_get_num_threads(), ops_blas_core());
  free(a);
  free(b);
  free(c);
  return 0;
}
