/* clip_text.h -- one CLIP text transformer (CLIP-L or OpenCLIP bigG) loaded from safetensors */
/* SPDX-License-Identifier: MIT */
#ifndef LUNA_MODELS_CLIP_TEXT_H
#define LUNA_MODELS_CLIP_TEXT_H

#include "core/safetensors.h"
#include "ops/ops.h"

#include <stdint.h>

#define CLIP_CTX 77
#define CLIP_VOCAB 49408
#define CLIP_HEAD_DIM 64
#define CLIP_LN_EPS 1e-5f

typedef enum clip_kind { CLIP_L = 0, CLIP_G = 1 } clip_kind;

/* How the tensors are named inside the file, after the prefix. */
typedef enum clip_layout {
  CLIP_LAYOUT_HF = 0,       /* text_model.* (Hugging Face CLIPTextModel) */
  CLIP_LAYOUT_HF_OLD = 1,   /* the same without the "text_model." segment */
  CLIP_LAYOUT_OPENCLIP = 2, /* token_embedding, transformer.resblocks.*, fused in_proj */
} clip_layout;

typedef struct clip_hparams {
  int n_layers, d_model, n_heads, d_mlp, d_proj; /* d_proj 0: no projection loaded */
} clip_hparams;

typedef struct clip_text clip_text;

/* Where an encoder sits in a file: 'prefix' is prepended to every name of the layout
** (e.g. "conditioner.embedders.1.model."); 'proj_name' is the projection's full name
** or NULL; 'proj_is_xP' says it is stored as x @ P (OpenCLIP) rather than Linear form. */
typedef struct clip_source {
  const st_file *file;
  const char *prefix;
  clip_layout layout;
  clip_kind kind;
  const char *proj_name;
  int proj_is_xP;
} clip_source;

/* clip_text_load reads and checks every tensor of the encoder: dimensions come from the
** shapes (heads = width / 64). Weights are rounded to fp16 as ComfyUI does and kept as
** 'wtype' (F16 tensors of an F16 file are used in place, zero copy). Every tensor under
** the prefix must be claimed: missing, misshapen and unexpected tensors are errors that
** name them. The file must outlive the model. */
int clip_text_load(const clip_source *src, ops_wtype wtype, clip_text **out, char *err);
void clip_text_free(clip_text *m);

const clip_hparams *clip_text_hparams(const clip_text *m);
clip_kind clip_text_kind(const clip_text *m);
/* Bytes of weights held in memory (mapped or converted). */
size_t clip_text_weight_bytes(const clip_text *m);

/* Worker scratch (floats) clip_text_forward needs from the pool. */
size_t clip_text_scratch(const clip_text *m);

/* The weight matrices a request may change, per layer; CLIP_MAT_PROJ is the projection. */
typedef enum clip_mat {
  CLIP_MAT_Q, CLIP_MAT_K, CLIP_MAT_V, CLIP_MAT_O, CLIP_MAT_FC1, CLIP_MAT_FC2, CLIP_MAT_PROJ, CLIP_MAT_N
} clip_mat;

/* One unmerged low-rank term: y += coef * (x down^T) up^T, down [rank, in], up [out, rank]. */
typedef struct clip_lowrank {
  const float *down, *up;
  int64_t rank;
  float coef;
} clip_lowrank;

/*
** What a request changes in one weight matrix, without writing the shared weights:
**   replace   an fp32 [out, in] matrix used instead of the base (a merged copy), or NULL
**   build     (when no 'replace') fills 'w', which holds the base widened to fp32, with
**             the request's weight; run in scratch memory for each forward pass
**   terms     low-rank terms added after the base (or 'replace')
*/
typedef struct clip_mat_patch {
  const float *replace;
  int (*build)(const void *ud, float *w, char *err);
  const void *build_ud;
  const clip_lowrank *terms;
  int n_terms;
} clip_mat_patch;

/* A request's changes to one encoder: 'mats' has n_layers * 6 + 1 entries, entry
** [layer * 6 + which] for the layer matrices and [n_layers * 6] for the projection;
** an all-zero entry leaves that matrix as it is. */
typedef struct clip_overlay {
  const clip_mat_patch *mats;
  int n_layers;
} clip_overlay;

/* Sequences [first, first + count) of a batch that run with one overlay (NULL: none). */
typedef struct clip_group {
  int first, count;
  const clip_overlay *ov;
} clip_group;

/* The base weight matrix 'which' of 'layer' (the projection: CLIP_MAT_PROJ, any layer),
** or NULL when the encoder has none. */
const ops_mat *clip_text_matrix(const clip_text *m, int layer, clip_mat which);

/* CRC-32 (zlib) of every weight matrix as held in memory, layer by layer in the order
** q, k, v, out, fc1, fc2, then the projection: proof that the shared weights are intact. */
uint32_t clip_text_checksum(const clip_text *m);

/*
** Input embeddings given instead of token ids at some positions of a batch (textual
** inversion, ComfyUI's process_tokens): position 'at[i]' (sequence * CLIP_CTX + position,
** strictly ascending) takes the fp32 vector 'vec[i]' (d_model floats) in place of its
** token embedding; the position embedding is added as for an id. The ids at those
** positions are ignored. The pooled output then follows ComfyUI's num_tokens: the
** position (count of id positions up to and including the first end token, or all of
** them when there is none) + (count of vector positions) - 1.
*/
typedef struct clip_embeds {
  int n;
  const int64_t *at;
  const float *const *vec;
} clip_embeds;

/*
** clip_text_forward runs 'B' sequences of CLIP_CTX token ids through every layer.
** 'hidden' [B, 77, D] receives the output after 0-based layer 'layer_idx', passed
** through the final LayerNorm when 'final_ln' is set. 'pooled' [B, D] (or [B, d_proj]
** when 'project' and a projection exists) receives the final-LN output at each
** sequence's first end token (the last position when there is none). Either output may
** be NULL. Token ids must be in [0, CLIP_VOCAB).
*/
int clip_text_forward(const clip_text *m, ops_pool *pool, const int32_t *ids, int B,
                      int layer_idx, int final_ln, int project, float *hidden, float *pooled,
                      char *err);

/* clip_text_forward_groups is clip_text_forward where each of the 'n_groups' groups
** (covering the B sequences in order) runs with its own overlay, and 'emb' (NULL: none)
** gives input embeddings for some positions. Groups that use the same weights for a
** matrix share one GEMM; a sequence's result does not depend on the others. */
int clip_text_forward_groups(const clip_text *m, ops_pool *pool, const int32_t *ids, int B,
                             const clip_group *groups, int n_groups, const clip_embeds *emb,
                             int layer_idx, int final_ln, int project, float *hidden, float *pooled,
                             char *err);

/* clip_text_enumerate calls 'cb' once per tensor an encoder with 'hp' has in 'layout'
** under 'prefix' (the projection excluded), with its full name and shape. Writers of
** test and demo models use it so that names live in one table. */
typedef void (*clip_tensor_cb)(void *ud, const char *name, int n_dims, const int64_t *shape);
void clip_text_enumerate(const char *prefix, clip_layout layout, const clip_hparams *hp,
                         clip_tensor_cb cb, void *ud);

#endif
