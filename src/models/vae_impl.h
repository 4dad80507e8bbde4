/* vae_impl.h -- the VAE's internals shared by vae.c (model, forward) and vae_tiled.c (tiling) */
/* SPDX-License-Identifier: MIT */
#ifndef LUNA_MODELS_VAE_IMPL_H
#define LUNA_MODELS_VAE_IMPL_H

#include "models/vae.h"
#include "core/owned.h"

#define VAE_MAX_LEVELS 8         /* len(ch_mult) at most (vae_hparams.ch_mult) */
#define VAE_MAX_RES_BLOCKS 64
#define VAE_MAX_SIDE 65536       /* pixels per side of an image, at most */
#define VAE_BAND_FLOATS ((size_t)1 << 22) /* an upsampling band's rows, in and out (16 MiB) */

typedef struct vae_gnorm {
  int64_t c;
  const float *g, *b;
} vae_gnorm;

typedef struct vae_res {        /* ResnetBlock(cin -> cout) */
  int64_t cin, cout;
  vae_gnorm n1, n2;
  ops_conv c1, c2, sc;          /* sc: 1x1 shortcut, when has_sc (cin != cout) */
  int has_sc;
} vae_res;

typedef struct vae_attn {       /* AttnBlock over C channels, q/k/v/o as 1x1 convs */
  int64_t c;
  vae_gnorm n;
  ops_conv q, k, v, o;
} vae_attn;

typedef struct vae_half {       /* the encoder or the decoder */
  ops_conv conv_in;
  vae_res *blocks;              /* level-major: level i, block j at i * per_level + j */
  ops_conv resample[VAE_MAX_LEVELS]; /* encoder: downsample of levels < n-1; decoder: upsample of levels > 0 */
  vae_res mid1, mid2;
  vae_attn attn;
  vae_gnorm norm_out;
  ops_conv conv_out;
} vae_half;

struct vae {
  vae_hparams hp;
  vae_layout layout;
  int64_t width[VAE_MAX_LEVELS]; /* channels of each level: ch * ch_mult[i] */
  int scale;                    /* pixels per latent cell each way: 2^(n_levels-1) */
  vae_half enc, dec;
  ops_conv quant, post_quant;   /* when hp.has_quant */
  owned_list owned;             /* the fp32 weights */
  size_t weight_bytes;
};

/*
** One run of the encoder or the decoder over an image. Activations live in buffers 0
** and 1, which the blocks pass around (a block's input and output in one, its middle
** map in the other), row bands in VAE_BUF_BAND, and the input in VAE_BUF_IN. In plan mode
** nothing is computed: the same code only records what each buffer must hold, the
** worker scratch and the FLOPs, so that buffers are allocated once, for the largest
** stage, and the estimates are exact.
*/
enum { VAE_BUF_BAND = 2, VAE_BUF_IN = 3, VAE_N_BUF = 4 };

typedef struct vae_run {
  const vae *m;
  ops_pool *pool;
  int plan;
  float *buf[VAE_N_BUF];
  size_t need[VAE_N_BUF];       /* floats, recorded in plan mode */
  size_t scratch;               /* floats of worker scratch, recorded in plan mode */
  double done, total;           /* FLOPs */
  size_t band_floats;           /* upsampling band budget; 0: VAE_BAND_FLOATS (tests set it) */
  vae_progress_fn progress;
  void *ud;
  const char *what;             /* "decode" / "encode", for messages */
  char *err;
  int rc;                       /* set when the progress callback stopped the run */
} vae_run;

void vae_run_init(vae_run *r, const vae *m, ops_pool *pool, int plan, const char *what);
/* Returns the buffer (0..2) holding the output: [3, oh, ow] for the decoder; the
** encoder's [2 * latent_channels, oh, ow] (quant_conv's output, or conv_out's), whose
** first latent_channels channels are the mean. -1 when stopped (r->rc). */
int vae_run_decoder(vae_run *r, int in, int64_t h, int64_t w, int64_t *oh, int64_t *ow);
int vae_run_encoder(vae_run *r, int in, int64_t h, int64_t w, int64_t *oh, int64_t *ow);
size_t vae_run_bytes(const vae_run *r, int with_in);
/* Allocates 'r''s buffers as 'plan' measured them (VAE_BUF_IN too when 'with_in'), after
** checking them and 'extra_bytes' against the machine's memory; sets r->total and
** reserves the pool's scratch. */
int vae_run_alloc(vae_run *r, const vae_run *plan, int with_in, size_t extra_bytes, char *err);
void vae_run_free(vae_run *r, int with_in);

int vae_check_finite(const char *what, const float *x, int64_t d0, int64_t d1, int64_t d2, int64_t d3,
                     const char *dims, char *err);
int vae_check_decode(const vae *m, ops_pool *pool, const float *latent, int B, int64_t h, int64_t w,
                     const float *image, char *err);
int vae_check_encode(const vae *m, ops_pool *pool, const float *pixels, int B, int64_t H, int64_t W,
                     const float *latent, char *err);
void vae_prepare_pixels(const vae *m, const float *pixels, int64_t H, int64_t W, float *dst);

/* vae_tiled.c (arguments already checked) */
int vae_decode_tiled(const vae *m, ops_pool *pool, const float *latent, int B, int64_t h, int64_t w,
                     const vae_tiling *t, float *image, vae_progress_fn progress, void *ud, char *err);
int vae_encode_tiled(const vae *m, ops_pool *pool, const float *pixels, int B, int64_t H, int64_t W,
                     const vae_tiling *t, float *latent, vae_progress_fn progress, void *ud, char *err);

#endif
