/* textenc.h -- a model family's text encoders (SD1: CLIP-L; SDXL: CLIP-L + CLIP-G) and ComfyUI's encode */
/* SPDX-License-Identifier: MIT */
#ifndef LUNA_MODELS_TEXTENC_H
#define LUNA_MODELS_TEXTENC_H

#include "models/clip_text.h"
#include "text/tokenizer.h"

typedef enum te_family { TE_SD1 = 1, TE_SDXL = 2 } te_family;

typedef struct te_set te_set;

/* te_set_load opens the 'n' files at 'paths' (one checkpoint, or standalone clip_l and
** clip_g files), finds the text encoders in them by key prefix and loads them. The
** family follows from what was found. Errors name the file and what is missing,
** unsupported or unexpected. */
int te_set_load(const char *const *paths, int n, ops_wtype wtype, te_set **out, char *err);
void te_set_free(te_set *s);

te_family te_set_family(const te_set *s);
const char *te_family_name(te_family f);
/* The encoder of that kind, or NULL when the family has none. */
const clip_text *te_set_encoder(const te_set *s, clip_kind k);
/* Bytes of weights in memory across encoders. */
size_t te_set_weight_bytes(const te_set *s);
/* Worker scratch (floats) an ops_pool needs to run this set. */
size_t te_set_scratch(const te_set *s);

/* The conditioning ComfyUI's CLIPTextEncode produces: 'cond' [n_tokens, dim] (batch 1)
** and 'pooled' [pooled_dim], both malloc'd (free with te_output_free). */
typedef struct te_output {
  float *cond;
  int64_t n_tokens, dim;
  float *pooled;
  int64_t pooled_dim;
} te_output;

/*
** te_set_encode follows ComfyUI's encode_token_weights for each encoder: all chunks in
** one batch, plus the empty sequence when any weight differs from 1, then
** z = (z - z_empty) * w + z_empty on the selected layer. 'clip_layer' is 0 for the
** family's default or -k as CLIPSetLastLayer(-k). SD1 needs 'l'; SDXL needs 'l' and 'g'.
*/
int te_set_encode(const te_set *s, ops_pool *pool, const tok_chunks *l, const tok_chunks *g,
                  int clip_layer, te_output *out, char *err);
void te_output_free(te_output *o);

struct lora_plan;

/*
** Vectors given instead of token ids in some slots of one encoder's chunks (textual
** inversion embeddings, as ComfyUI's tokenizer puts them in the token list): slot
** 'slot[i]' (chunk * TOK_CHUNK + position, strictly ascending) takes row 'row[i]' of
** 'rows' [n_rows, dim] (fp32) as its input embedding; the position embedding is added
** and the slot's weight applies as for an id. 'dim' must be the encoder's width. The
** ids of those slots are ignored.
*/
typedef struct te_embeds {
  int n;
  const int32_t *slot;
  const int32_t *row;
  const float *rows;
  int n_rows;
  int64_t dim;
} te_embeds;

/* One request of a batch: its tokens ('g' ignored for SD1), clip layer, LoRA plan
** (NULL: the base weights) and input embeddings per encoder (NULL: none). */
typedef struct te_request {
  const tok_chunks *l, *g;
  int clip_layer;
  const struct lora_plan *plan;
  const te_embeds *emb_l, *emb_g;
} te_request;

/* te_set_encode_batch encodes 'n' requests sharing one clip layer in one forward pass
** per encoder; out[i] is request i's result, bit-identical to encoding it alone. */
int te_set_encode_batch(const te_set *s, ops_pool *pool, const te_request *req, int n,
                        te_output *out, char *err);

/*
** te_request_tokens reads the tokens of an encode request for the set 's' as lunad
** does (docs/PROTOCOL.md, 6 encode), so that `luna encode --local` builds the same
** request: the "embeds" matrices ('embeds', NULL or null: none; their bytes in 'bin')
** into emb[0] (l) and emb[1] (g) with tok_embeds_parse, the "l" chunks of 'tokens'
** (and "g" for SDXL) with their {"embed": i} slots (tok_json_parse_slots), then the
** width of each matrix against the encoder it is for (a matrix for an encoder the set
** lacks is ignored). Errors name the field, encoder, chunk and slot. The caller frees
** 'l', 'g' and 'emb' (tok_chunks_free, tok_embeds_free) whatever the result; all must
** be zeroed before the call.
*/
int te_request_tokens(const te_set *s, const struct cJSON *tokens, const struct cJSON *embeds, const uint8_t *bin,
                      uint64_t bin_len, tok_chunks *l, tok_chunks *g, tok_embeds emb[2], char *err);

/* te_embeds_view fills 'te' with the encoder's view of 'e' and returns it, or returns
** NULL when no slot uses a vector (te_request.emb_l / emb_g). */
const te_embeds *te_embeds_view(const tok_embeds *e, te_embeds *te);

#endif
