/* lora.h -- LoRA and LyCORIS files for the text encoders: key mapping, identity, weight math */
/* SPDX-License-Identifier: MIT */
/*
** A LoRA file is parsed once into model-independent patches: each names its target
** (encoder, layer, module) and holds its factors in fp32. Which model it is applied to
** is decided later (lora_plan), so one parsed file serves every model and request.
**
** Key mapping (NUMERICS.md 7.1, ComfyUI's model_lora_keys_clip, for the families luna
** serves, which always have CLIP-L):
**   lora_te_text_model_encoder_layers_{b}_{m}      CLIP-L   (m: self_attn_q_proj, ..., mlp_fc2)
**   lora_te1_text_model_encoder_layers_{b}_{m}     CLIP-L
**   lora_te2_text_model_encoder_layers_{b}_{m}     CLIP-G
**   text_encoder.text_model.encoder.layers.{b}.{mod}    CLIP-L (diffusers, PEFT; mod: self_attn.q_proj, ...)
**   text_encoder_2.text_model.encoder.layers.{b}.{mod}  CLIP-G
**   text_encoders.clip_l.transformer.text_model.encoder.layers.{b}.{mod}   CLIP-L (generic)
**   text_encoders.clip_g.transformer.text_model.encoder.layers.{b}.{mod}   CLIP-G (generic)
**   lora_te2_text_projection, lora_prior_te_text_projection,
**   text_encoders.clip_g.transformer.text_projection                       CLIP-G projection
**   lora_te1_text_projection, text_encoders.clip_l.transformer.text_projection
**                                                  CLIP-L projection (unused by SD1/SDXL conditioning)
** A "text-encoder key" is a tensor whose name starts with lora_te_, lora_te1_, lora_te2_,
** lora_te3_, lora_prior_te_, text_encoder., text_encoder_2. or text_encoders.; every other
** tensor (UNet, ...) is ignored silently. Text-encoder keys that map to no target are
** counted and the first LORA_MAX_REPORT names kept, never dropped silently.
**
** Identity: SHA-256 over the text-encoder tensors only, sorted by name (bytewise), each
** encoded as u64 name length, name bytes, u64 dtype-name length, dtype name ("F16"...),
** u64 n_dims, n_dims x u64 shape, u64 byte length, the tensor's bytes; all integers
** little-endian. The same tensors give the same identity whatever the file name, the
** metadata, the tensor order in the file or the UNet tensors beside them.
*/
#ifndef LUNA_LORA_LORA_H
#define LUNA_LORA_LORA_H

#include "core/safetensors.h"

#include <stddef.h>
#include <stdint.h>

#define LORA_ID_LEN 32
#define LORA_ID_HEX 65          /* 64 hex digits and a NUL */
#define LORA_MAX_REPORT 3

/* The weight a patch targets, in ComfyUI's (HF) names. */
typedef enum lora_module {
  LORA_M_Q, LORA_M_K, LORA_M_V, LORA_M_O, LORA_M_FC1, LORA_M_FC2, LORA_M_PROJ, LORA_M_N
} lora_module;

typedef enum lora_kind {
  LORA_K_LORA = 0,  /* up/down (+alpha, +dora_scale): kohya, diffusers, PEFT, DoRA */
  LORA_K_LOHA = 1,  /* hada_w1_a/b, hada_w2_a/b */
  LORA_K_LOKR = 2,  /* lokr_w1 or w1_a/b, lokr_w2 or w2_a/b */
  LORA_K_DIFF = 3,  /* {x}.diff: a full delta */
} lora_kind;

typedef struct lora_patch {
  char *name;            /* the key prefix in the file, for messages */
  int n_tensors;         /* file tensors it consumed (factors, alpha, dora_scale) */
  int enc;               /* 0: CLIP-L, 1: CLIP-G (the values of clip_kind) */
  int layer;             /* 0-based transformer layer; -1 for LORA_M_PROJ */
  lora_module module;
  lora_kind kind;
  int64_t out, in;       /* the target weight's shape, as the factors imply it */
  double scale;          /* alpha / dim, or 1 without alpha (NUMERICS 7.3), in double */
  /* factors, fp32, row-major, owned:
  **   LORA: up [out, rank], down [rank, in]
  **   LOHA: w1a [out, r1], w1b [r1, in], w2a [out, r2], w2b [r2, in]
  **   LOKR: k1 [k1_rows, k1_cols], k2 [k2_rows, k2_cols], k1_rows*k2_rows = out and
  **         k1_cols*k2_cols = in (factorised parts multiplied out in fp32 at parse)
  **   DIFF: diff [out, in] */
  int64_t rank;
  float *up, *down;
  int64_t r1, r2;
  float *w1a, *w1b, *w2a, *w2b;
  int64_t k1_rows, k1_cols, k2_rows, k2_cols;
  float *k1, *k2;
  float *diff;
  /* DoRA: NULL, or a 2-D [out, 1] (dora_on_out = 1) or [1, in] (dora_on_out = 0) magnitude */
  float *dora_scale;
  int dora_on_out;
} lora_patch;

typedef struct lora_file {
  uint8_t id[LORA_ID_LEN];
  char id_hex[LORA_ID_HEX];
  char *source;                  /* path or label, for messages */
  lora_patch *patches;           /* sorted by (enc, layer, module), then name */
  int n_patches;
  int n_te_tensors;              /* tensors with a text-encoder prefix */
  int n_unmapped;                /* text-encoder tensors that map to no target */
  char *unmapped[LORA_MAX_REPORT];
  size_t bytes;                  /* memory held by the factors */
} lora_file;

/* lora_file_load reads the LoRA at 'path'; lora_file_parse reads a whole safetensors
** image in memory (what a client uploads), 'label' naming it in messages. Errors name
** the file and the tensor: bad dtype (F32, F16, BF16 only), inconsistent factor shapes
** or ranks, a missing partner (up without down), a non-scalar alpha, a DoRA scale of
** the wrong shape, an adapter luna does not apply (GLoRA, OFT, BOFT, LoHa/LoKr Tucker
** factors, lora_mid, diff_b, set_weight, w_norm, b_norm, a patch on an embedding or a
** LayerNorm). Non-finite values are rejected. Per target the first adapter found in
** ComfyUI's order (LoRA, LoHa, LoKr, diff) makes the patch; tensors of another adapter on
** the same target, and an alpha or dora_scale beside a diff, are reported as unmapped. */
int lora_file_load(const char *path, lora_file **out, char *err);
int lora_file_parse(const uint8_t *buf, size_t len, const char *label, lora_file **out, char *err);
void lora_file_free(lora_file *f);

/* 1 when 'name' has a text-encoder prefix. */
int lora_is_te_key(const char *name);

/* lora_identity computes the identity of the text-encoder tensors of 'f'. */
void lora_identity(const st_file *f, uint8_t id[LORA_ID_LEN]);
void lora_id_hex(const uint8_t id[LORA_ID_LEN], char hex[LORA_ID_HEX]);
/* lora_id_parse reads 64 hex digits (either case); LUNA_EINVAL otherwise. */
int lora_id_parse(const char *hex, uint8_t id[LORA_ID_LEN]);

/* lora_extract_te builds, in a malloc'd buffer, a safetensors image holding only the
** text-encoder tensors of 'f' (same names, dtypes, shapes and bytes; no metadata): what
** a client uploads. Its identity equals lora_identity(f). */
int lora_extract_te(const st_file *f, uint8_t **out, size_t *len, char *err);

/* 1 when the patch can run unmerged as y += c * (x down^T) up^T: a plain LoRA without
** DoRA. Others need the full per-request weight (lora_patch_apply). */
int lora_patch_is_lowrank(const lora_patch *p);
/* The coefficient of a low-rank patch at 'strength': (float)(strength * scale), the
** scalar formed in double and applied in fp32 as ComfyUI does. */
float lora_patch_coef(const lora_patch *p, double strength);

/* lora_patch_apply applies 'p' at 'strength' to the fp32 weight 'W' [p->out, p->in]
** in place, as ComfyUI's calculate_weight does in fp32 (NUMERICS 7.3): LoRA, LoHa, LoKr
** and diff add strength*scale*dW; DoRA follows weight_decompose (the norm of the weight
** before this patch when the scale is per output row). Returns 0 or LUNA_ENOMEM. */
int lora_patch_apply(const lora_patch *p, double strength, float *W, char *err);

#endif
