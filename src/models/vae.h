/* vae.h -- AutoencoderKL (SD1/SD2/SDXL, SD3/Flux) loaded from safetensors: ComfyUI's VAE encode and decode */
/* SPDX-License-Identifier: MIT */
#ifndef LUNA_MODELS_VAE_H
#define LUNA_MODELS_VAE_H

#include "core/safetensors.h"
#include "ops/ops.h"

#include <stdint.h>

#define VAE_SCALE 8            /* pixels per latent cell, each way */
#define VAE_GN_GROUPS 32
#define VAE_GN_EPS 1e-6f

typedef struct vae_hparams {
  int ch;                      /* base width (conv_in's out channels), e.g. 128 */
  int n_levels;                /* len(ch_mult), e.g. 4 */
  int ch_mult[8];              /* widths are ch * ch_mult[i], read from the shapes */
  int num_res_blocks;          /* encoder ResBlocks per level (decoder: one more) */
  int z_channels;              /* encoder conv_out gives 2 * z_channels (mean, logvar) */
  int latent_channels;         /* decoder.conv_in.weight.shape[1]: 4 (SD) or 16 (SD3, Flux) */
  int has_quant;               /* quant_conv / post_quant_conv present */
  int has_encoder, has_decoder;
} vae_hparams;

typedef enum vae_layout { VAE_LAYOUT_LDM = 0, VAE_LAYOUT_DIFFUSERS = 1 } vae_layout;

typedef struct vae vae;

/* vae_load opens 'path' and loads the VAE found in it: a checkpoint's first_stage_model.*
** (or vae.*), a standalone LDM file (encoder.*, decoder.*, quant_conv, post_quant_conv) or
** a diffusers file (encoder.down_blocks.*, decoder.up_blocks.*, mid_block attention as
** Linear or 1x1 conv weights). Dimensions come from the shapes. Weights are kept fp32
** (ComfyUI's CPU dtype). Missing, misshapen and unexpected tensors are errors naming them. */
int vae_load(const char *path, vae **out, char *err);
/* vae_load_parts loads only the encoder, only the decoder or both (VAE_PART_*): the other
** half is still checked tensor by tensor but holds no memory, and the model then acts as
** one whose file lacks it (a decode-only SD VAE holds 60% of the weights). VAE_PART_ALL
** loads what the file has; one half must be in the file. */
enum { VAE_PART_ENCODER = 1, VAE_PART_DECODER = 2, VAE_PART_ALL = 3 };
int vae_load_parts(const char *path, int parts, vae **out, char *err);
void vae_free(vae *m);
const vae_hparams *vae_get_hparams(const vae *m);
size_t vae_weight_bytes(const vae *m);
/* Pixels per latent cell each way: 2^(n_levels-1), i.e. VAE_SCALE (8) for every SD1/SD2/
** SDXL/SD3/Flux VAE (4 levels); smaller for toy models with fewer levels. The sizes below
** that say 8 mean this number. */
int vae_scale(const vae *m);
vae_layout vae_get_layout(const vae *m);

/* Called between blocks with the work done so far and the total (in convolution FLOPs);
** a nonzero return stops the work, which then fails with that status (e.g. LUNA_ECONN
** when the client left). */
typedef int (*vae_progress_fn)(void *ud, double done, double total);

/* Tiling as ComfyUI's tiled nodes do it: three passes with tile shapes (x/2, 2y),
** (2x, y/2) and (x, y), feathered blending, averaged (NUMERICS.md 6.4). Sizes in pixels. */
typedef struct vae_tiling {
  int tile;                    /* tile size in pixels (default 512) */
  int overlap;                 /* overlap in pixels (default 64) */
} vae_tiling;

/*
** vae_decode: latent [B, C, h, w] (unscaled, as ComfyUI passes it; C = latent_channels)
** to image [B, 8h, 8w, 3] in [0, 1] (clamp((x + 1) / 2, 0, 1), after averaging when
** tiled). 'tiling' NULL: untiled; else the tile and overlap are pixels as the
** VAEDecodeTiled node takes them (overlap becomes tile/4 when tile < 4 * overlap).
** Returns 0 or a status naming the problem: LUNA_EMODEL (no decoder), LUNA_EINVAL (sizes,
** non-finite input: the tensor and the first bad index), LUNA_ENOMEM, or the progress
** callback's status.
*/
int vae_decode(const vae *m, ops_pool *pool, const float *latent, int B, int64_t h, int64_t w,
               const vae_tiling *tiling, float *image, vae_progress_fn progress, void *ud, char *err);

/*
** vae_encode: pixels [B, H, W, 3] in [0, 1] to the posterior mean [B, C, H8, W8] with
** H8 = (H / 8), after ComfyUI's centered crop of H and W to multiples of 8 (offset
** (dim % 8) / 2), x * 2 - 1. 'tiling' NULL: untiled; else as VAEEncodeTiled (pixels,
** overlap used as given). H and W must be at least 8.
*/
int vae_encode(const vae *m, ops_pool *pool, const float *pixels, int B, int64_t H, int64_t W,
               const vae_tiling *tiling, float *latent, vae_progress_fn progress, void *ud, char *err);

/* Scratch (floats per worker) the pool needs for images of these sizes (pixels). */
size_t vae_scratch(const vae *m, int64_t H, int64_t W);
/* Peak activation memory (bytes) of an untiled decode of an h x w latent / encode of an
** H x W image: what lunad compares with --vae-max-mem to choose tiling. Exact: the
** buffers a run allocates (three activation buffers, each as large as the largest stage
** it holds, plus the encoder's planar input), measured by a dry run of the same code.
** Not included: the caller's input and output, and the per-worker scratch
** (vae_scratch floats per worker). 0 when the VAE lacks that half. */
size_t vae_decode_bytes(const vae *m, int64_t h, int64_t w);
size_t vae_encode_bytes(const vae *m, int64_t H, int64_t W);

/* vae_enumerate calls 'cb' for every tensor of a VAE with 'hp' in 'layout' under 'prefix':
** what writers of test models use, so that names live in one table (the loader walks
** the same one). It reads ch, n_levels, ch_mult, num_res_blocks, z_channels,
** latent_channels, has_quant and has_encoder / has_decoder (both 0: both). Widths are
** ch * ch_mult[i], multiples of 32. Diffusers attention weights come as Linear [C, C]. */
typedef void (*vae_tensor_cb)(void *ud, const char *name, int n_dims, const int64_t *shape);
void vae_enumerate(const char *prefix, vae_layout layout, const vae_hparams *hp, vae_tensor_cb cb, void *ud);

#endif
