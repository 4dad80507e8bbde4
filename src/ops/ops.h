/* ops.h -- CPU compute: a worker pool and the kernels of the text encoders and the VAE (OpenBLAS GEMM) */
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

/* ---- image ops (the VAE). Activations of one image are [C, H, W], row-major (NCHW
** without the batch). ---------------------------------------------------------- */

/* A 2-D convolution's weights: w [cout, cin, kh, kw] (torch layout), b [cout] or NULL. */
typedef struct ops_conv {
  int64_t cout, cin, kh, kw;
  const float *w;
  const float *b;
  const float *wino; /* optional: ops_conv_winograd_weights(w), reused across calls */
} ops_conv;

/* y [cout, Ho, Wo] = conv2d(x [cin, H, W]) with 'stride' and zero padding top/left/
** bottom/right, Ho = (H + pt + pb - kh) / stride + 1 (likewise Wo). fp32, the sum over
** (cin, kh, kw) as one dot product per output (im2col; see ops_conv2d_set_method for
** Winograd). Splits the output across the pool; each worker needs
** ops_conv2d_scratch(c, W) floats of scratch (ops_pool_reserve). The output positions
** (Ho*Wo, row-major; 2x2 tiles for Winograd) are cut into tasks by the shape alone,
** never by the pool's size, so any pool gives the same bits. 'y' must not overlap 'x'.
** Nothing is done when the padded input is smaller than the kernel (Ho or Wo < 1).
** ops_conv2d_scratch depends on 'c' only ('W' is accepted for callers that size per
** layer): for im2col, cin*kh*kw floats per column of a strip whose width is fixed by 'c';
** for a 3x3 kernel, at least what the Winograd method needs too, so one reservation
** serves either method. ops_conv2d itself grows the scratch (ops_pool_reserve) when the
** caller did not, and if that fails, falls back to a slow loop that needs none. */
void ops_conv2d(ops_pool *p, const float *x, int64_t H, int64_t W, const ops_conv *c, int stride, int pt,
                int pl, int pb, int pr, float *y);
size_t ops_conv2d_scratch(const ops_conv *c, int64_t W);

/* How ops_conv2d computes 3x3 stride-1 convolutions with cin >= 64 (all other shapes
** always use im2col):
** OPS_CONV_WINOGRAD, the default: Winograd F(2x2, 3x3): the weights and 4x4 input tiles
**   transformed, 16 SGEMMs per block of tiles, 2x2 output tiles transformed back: 2.25x
**   fewer multiplications. Its rounding error is 1.0-1.5x im2col's (about 4e-7 of the
**   largest output at 512 channels); a full-size SD VAE decode (512x512) lands 2.6e-6
**   from PyTorch's image, im2col's 2.4e-6. It transforms the weights on every call into
**   a buffer of 16*(cout*cin + 16) floats that it allocates and frees (16 MiB at 512
**   channels), and uses im2col when that allocation fails.
** OPS_CONV_IM2COL: im2col strips times the weights, one SGEMM per strip.
** ops_conv2d_set_method sets the method for the whole process (an atomic store; calls
** already running keep theirs) and returns the previous one; both methods give the
** same bits for any pool size, not the same bits as each other. */
typedef enum ops_conv_method { OPS_CONV_IM2COL = 0, OPS_CONV_WINOGRAD = 1 } ops_conv_method;
ops_conv_method ops_conv2d_set_method(ops_conv_method m);
ops_conv_method ops_conv2d_get_method(void);

/* The Winograd transform of c's weights, for a caller that runs the same convolution on
** many pieces of a map (row bands): set it as c->wino and ops_conv2d uses it instead of
** transforming the weights on every call. NULL when ops_conv2d would not use Winograd
** for this convolution at stride 1 (or out of memory: ops_conv2d then transforms as
** usual). Free with free(). */
float *ops_conv_winograd_weights(ops_pool *p, const ops_conv *c);

/* GroupNorm over x [C, HW]: 'groups' groups of C/groups channels; mean and biased
** variance per group over (C/groups)*HW values (summed in double, one task per group);
** y = (x - m) / sqrt(v + eps) * g + b per channel. 'y' may equal 'x'. */
void ops_group_norm(ops_pool *p, const float *x, int64_t C, int64_t HW, int groups, const float *g,
                    const float *b, float eps, float *y);

/* GroupNorm in two steps, for a map normalized a band of rows at a time:
** ops_group_norm_stats computes what ops_group_norm computes of each group of x [C, HW]
** ('groups' entries in 'st'); ops_group_norm_rows then writes y [C, r1 - r0, W], rows
** r0 .. r1-1 of GroupNorm(x [C, H, W]) and then SiLU when 'silu': the same bits as
** those rows of ops_group_norm (and ops_silu). */
typedef struct ops_gn_stat {
  float mh, ml; /* the mean as a float pair */
  double rstd;  /* 1 / sqrt(var + eps) */
} ops_gn_stat;
void ops_group_norm_stats(ops_pool *p, const float *x, int64_t C, int64_t HW, int groups, float eps,
                          ops_gn_stat *st);
void ops_group_norm_rows(ops_pool *p, const float *x, int64_t C, int64_t H, int64_t W, int groups,
                         const ops_gn_stat *st, const float *g, const float *b, int64_t r0, int64_t r1, int silu,
                         float *y);

/* A 1x1 convolution in place: 'x' holds [cin, HW] in a buffer of at least
** max(cin, cout) * HW floats; afterwards its first cout * HW floats are y [cout, HW]. The
** positions go in blocks of OPS_CONV1X1_COLS (one task each, by the shape alone), each
** computed into worker scratch (ops_conv1x1_inplace_scratch floats, grown when short;
** a slow path without scratch otherwise) and then written over its own columns, which
** no other block reads. The same dot products as ops_conv2d's 1x1 path. */
#define OPS_CONV1X1_COLS 4096
void ops_conv1x1_inplace(ops_pool *p, float *x, int64_t HW, const ops_conv *c);
size_t ops_conv1x1_inplace_scratch(const ops_conv *c);

/* In place: x * sigmoid(x), with a vectorised exp within 2 ulp of expf. */
void ops_silu(ops_pool *p, float *x, int64_t n);

/* y [C, 2H, 2W] = nearest-neighbour 2x upsampling of x [C, H, W]. */
void ops_upsample2x(ops_pool *p, const float *x, int64_t C, int64_t H, int64_t W, float *y);

/* Single-head attention over N positions with C channels, channel-major (as 1x1 convs
** leave them): q, k, v, out [C, N]; out[:, i] = sum_j softmax_j(q[:, i] . k[:, j] * scale) v[:, j].
** Queries are processed in blocks (256, fewer when N > 16384) so memory stays
** O(block * N); the softmax subtracts the row's max, in fp32. Needs
** ops_attention_single_scratch(N) floats of worker scratch; like ops_conv2d, it grows
** the scratch itself when the caller did not, and if that fails, runs a slow path that
** needs none. Query blocks depend on N alone: any pool gives the same bits. */
void ops_attention_single(ops_pool *p, const float *q, const float *k, const float *v, int64_t C, int64_t N,
                          float scale, float *out);
size_t ops_attention_single_scratch(int64_t N);

/* ops_pool_reserve grows every worker's scratch to at least 'floats' (never shrinks).
** Called by the pool's owner between runs. Returns 0, or LUNA_ENOMEM (the pool keeps
** its old scratch). */
int ops_pool_reserve(ops_pool *p, size_t floats);

/* ops_blas_setup makes sure OpenBLAS runs kernels that fit this CPU: OpenBLAS 0.3.21
** does not know recent Intel cores and falls back to its slowest ("Prescott") kernels.
** When OPENBLAS_CORETYPE is unset and the CPU has AVX-512 (or AVX2+FMA), it sets the
** variable and re-executes the program with 'argv' (once); likewise with OPENBLAS_NUM_THREADS=1
** when that is unset and OpenBLAS would start threads of its own. Returns normally
** otherwise. */
void ops_blas_setup(char **argv);

/* Fixes glibc's mmap threshold at 1 MiB for the process. By default it rises to the
** size of the largest mmap'd block freed (up to 32 MiB): transient buffers such as the
** Winograd weights (16 MiB at 512 channels) then come from per-thread heaps and stay
** resident after they are freed, about 100 MiB more at the peak of a VAE decode. Call
** before starting threads. */
void ops_memory_setup(void);

/* The OpenBLAS kernel family in use, e.g. "SkylakeX". */
const char *ops_blas_core(void);

#endif
