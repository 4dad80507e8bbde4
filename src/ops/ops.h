/* ops.h -- CPU compute: a worker pool and the kernels of the text encoders (OpenBLAS GEMM) */
/* SPDX-License-Identifier: MIT */
#ifndef LUNA_OPS_OPS_H
#define LUNA_OPS_OPS_H

#include <stddef.h>
#include <stdint.h>

/* In-memory dtype of a weight matrix. Both hold exactly the fp16-rounded values that
** ComfyUI computes with; F32 trades twice the memory for no conversion per GEMM. */
typedef enum ops_wtype { OPS_W_F16 = 0, OPS_W_F32 = 1 } ops_wtype;

/* A weight matrix in torch Linear layout: 'rows' = out features, 'cols' = in features,
** row-major, 'data' not owned (may point into a file mapping, at any alignment). */
typedef struct ops_mat {
  ops_wtype type;
  int64_t rows, cols;
  const void *data;
} ops_mat;

/* A fixed set of compute threads. The calling thread takes part as worker 0, so a pool
** of 'n' uses n-1 extra threads. One caller at a time (each request worker owns one). */
typedef struct ops_pool ops_pool;

/* ops_pool_create starts 'n_threads' workers (0 = one per online CPU). Each worker
** reserves 'scratch_floats' floats of scratch up front. Returns NULL on failure. */
ops_pool *ops_pool_create(int n_threads, size_t scratch_floats);
void ops_pool_free(ops_pool *p);
int ops_pool_size(const ops_pool *p);

/* ops_pool_workspace returns the pool owner's activation workspace of at least 'floats'
** floats, valid until the next call. It grows when needed and never shrinks, so in a
** steady state no compute step allocates. NULL when out of memory. */
float *ops_pool_workspace(ops_pool *p, size_t floats);

/* ops_pool_run calls fn(arg, task, worker, scratch) for task = 0..n_tasks-1 across the
** workers and returns when all are done. 'scratch' is the worker's reserved block. */
typedef void (*ops_task_fn)(void *arg, int task, int worker, float *scratch);
void ops_pool_run(ops_pool *p, int n_tasks, ops_task_fn fn, void *arg);

/* Scratch each worker needs for ops_linear on matrices of 'max_cols' input features. */
size_t ops_linear_scratch(int64_t max_cols);

/* y[M, w->rows] = x[M, w->cols] * w^T + bias (bias may be NULL). fp32 activations and
** accumulation; F16 weights are widened panel by panel into worker scratch. */
void ops_linear(ops_pool *p, const float *x, int64_t M, const ops_mat *w, const float *bias, float *y);

/* y[M, out] += coef * (x[M, in] * down[rank, in]^T) * up[out, rank]^T: a LoRA term run
** unmerged (shrink, then expand). Rows are split across the workers; each needs
** ops_lowrank_scratch(rank) floats of scratch. */
void ops_lowrank_add(ops_pool *p, const float *x, int64_t M, int64_t in, const float *down,
                     const float *up, int64_t rank, int64_t out, float coef, float *y);
size_t ops_lowrank_scratch(int64_t rank);

/* ops_mat_to_f32 widens a whole weight matrix into 'dst' (rows*cols floats). */
void ops_mat_to_f32(const ops_mat *w, float *dst);

/* Row-wise LayerNorm over 'D' features with biased variance and epsilon 'eps':
** y = (x - mean) / sqrt(var + eps) * g + b. 'y' may equal 'x'. */
void ops_layer_norm(ops_pool *p, const float *x, int64_t M, int64_t D, const float *g,
                    const float *b, float eps, float *y);

/* In place: a*sigmoid(1.702a) (CLIP-L) or exact 0.5a(1+erf(a/sqrt2)) (CLIP-G). */
void ops_quick_gelu(ops_pool *p, float *x, int64_t n);
void ops_gelu_erf(ops_pool *p, float *x, int64_t n);

/* Causal multi-head self-attention for 'B' sequences of 'T' tokens. 'q', 'k', 'v' and
** 'out' are [B*T, H*dh] row-major; out = softmax(q k^T / sqrt(dh) + causal) v per head.
** Needs T*T floats of worker scratch. */
void ops_attention_causal(ops_pool *p, const float *q, const float *k, const float *v,
                          int64_t B, int64_t T, int64_t H, int64_t dh, float *out);

/* x += y, elementwise over 'n' floats. */
void ops_add(ops_pool *p, float *x, const float *y, int64_t n);

/* ops_blas_setup makes sure OpenBLAS runs kernels that fit this CPU: OpenBLAS 0.3.21
** does not know recent Intel cores and falls back to its slowest ("Prescott") kernels.
** When OPENBLAS_CORETYPE is unset and the CPU has AVX-512 (or AVX2+FMA), it sets the
** variable and re-executes the program with 'argv' (once). Returns normally otherwise. */
void ops_blas_setup(char **argv);

/* The OpenBLAS kernel family in use, e.g. "SkylakeX". */
const char *ops_blas_core(void);

#endif
