/* textenc.c -- finds the text encoders in checkpoint files and applies ComfyUI's encode semantics */
/* SPDX-License-Identifier: MIT */
#include "models/textenc.h"

#include "core/status.h"
#include "lora/lora_plan.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TE_MAX_FILES 4

struct te_set {
  te_family family;
  st_file *files[TE_MAX_FILES];
  int n_files;
  clip_text *enc[2];      /* indexed by clip_kind */
};

/* One place an encoder can live, recognised by the presence of its token embedding. */
typedef struct te_layout_rule {
  const char *probe;      /* full name of a tensor that identifies the layout */
  const char *prefix;
  clip_layout layout;
  int kind;               /* CLIP_L, CLIP_G, or -1: decide by layer count */
  const char *proj;       /* projection name for CLIP-G */
  int proj_is_xP;
  const char *what;       /* for messages */
} te_layout_rule;

static const te_layout_rule rules[] = {
    {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
     "cond_stage_model.transformer.", CLIP_LAYOUT_HF, CLIP_L, NULL, 0, "SD1 checkpoint CLIP-L"},
    {"cond_stage_model.transformer.embeddings.token_embedding.weight",
     "cond_stage_model.transformer.", CLIP_LAYOUT_HF_OLD, CLIP_L, NULL, 0, "SD1 checkpoint CLIP-L (old layout)"},
    {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
     "conditioner.embedders.0.transformer.", CLIP_LAYOUT_HF, CLIP_L, NULL, 0, "SDXL checkpoint CLIP-L"},
    {"conditioner.embedders.1.model.token_embedding.weight", "conditioner.embedders.1.model.",
     CLIP_LAYOUT_OPENCLIP, CLIP_G, "conditioner.embedders.1.model.text_projection", 1, "SDXL checkpoint CLIP-G"},
    {"text_model.embeddings.token_embedding.weight", "", CLIP_LAYOUT_HF, -1, NULL, 0, "standalone text encoder"},
    {"token_embedding.weight", "", CLIP_LAYOUT_OPENCLIP, -1, "text_projection", 1, "standalone OpenCLIP text encoder"},
};

/* Layouts we recognise but do not serve, so the error can say what the file is. */
static const struct {
  const char *probe, *what;
} unsupported[] = {
    {"cond_stage_model.model.token_embedding.weight", "an SD2 checkpoint (OpenCLIP ViT-H text encoder)"},
    {"conditioner.embedders.0.model.token_embedding.weight", "an SDXL refiner checkpoint (CLIP-G only)"},
};

static int layer_exists(const st_file *f, const te_layout_rule *r, int layer) {
  char name[256];
  if (r->layout == CLIP_LAYOUT_OPENCLIP)
    snprintf(name, sizeof name, "%stransformer.resblocks.%d.ln_1.weight", r->prefix, layer);
  else
    snprintf(name, sizeof name, "%s%sencoder.layers.%d.mlp.fc1.weight", r->prefix,
             r->layout == CLIP_LAYOUT_HF ? "text_model." : "", layer);
  return st_find(f, name) != NULL;
}

static int load_file(te_set *s, st_file *f, ops_wtype wtype, char *err) {
  int found = 0;
  for (size_t i = 0; i < sizeof unsupported / sizeof *unsupported; i++)
    if (st_find(f, unsupported[i].probe))
      return luna_fail(err, LUNA_EMODEL, "%s: this is %s, which luna does not serve yet", f->path,
                       unsupported[i].what);
  for (size_t i = 0; i < sizeof rules / sizeof *rules; i++) {
    const te_layout_rule *r = &rules[i];
    if (!st_find(f, r->probe)) continue;
    /* a standalone OpenCLIP probe also matches inside nothing else: only at top level */
    int kind = r->kind;
    if (kind < 0) {
      /* ComfyUI's rule for standalone files: a 31st layer means bigG, a 23rd ViT-H */
      if (layer_exists(f, r, 30)) kind = CLIP_G;
      else if (layer_exists(f, r, 22))
        return luna_fail(err, LUNA_EMODEL, "%s: a %d+ layer text encoder without a 31st layer is "
                         "OpenCLIP ViT-H (SD2), which luna does not serve yet", f->path, 23);
      else kind = CLIP_L;
    }
    if (s->enc[kind])
      return luna_fail(err, LUNA_EMODEL, "%s: a second CLIP-%s text encoder (%s); give one of each",
                       f->path, kind == CLIP_G ? "G" : "L", r->what);
    const char *proj = NULL;
    int xP = 0;
    if (kind == CLIP_G) {
      if (r->layout == CLIP_LAYOUT_HF && !r->proj) {
        if (st_find(f, "text_projection.weight")) proj = "text_projection.weight";
        else if (st_find(f, "text_projection")) { proj = "text_projection"; xP = 1; }
        else return luna_fail(err, LUNA_EMISSING, "%s: missing tensor 'text_projection.weight' "
                              "(CLIP-G needs its projection)", f->path);
      } else {
        proj = r->proj;
        xP = r->proj_is_xP;
      }
    }
    clip_source src = {f, r->prefix, r->layout, (clip_kind)kind, proj, xP};
    int rc = clip_text_load(&src, wtype, &s->enc[kind], err);
    if (rc) return rc;
    found++;
    if (r->prefix[0] == '\0') break; /* a standalone file holds one encoder */
  }
  if (!found)
    return luna_fail(err, LUNA_EMODEL, "%s: no CLIP text encoder found (no tensor named "
                     "'cond_stage_model.transformer.text_model.*', 'conditioner.embedders.0.transformer.*', "
                     "'conditioner.embedders.1.model.*' or 'text_model.*')", f->path);
  return 0;
}

int te_set_load(const char *const *paths, int n, ops_wtype wtype, te_set **out, char *err) {
  *out = NULL;
  if (n < 1 || n > TE_MAX_FILES)
    return luna_fail(err, LUNA_EINVAL, "give between 1 and %d model files (got %d)", TE_MAX_FILES, n);
  te_set *s = calloc(1, sizeof *s);
  if (!s) return luna_fail(err, LUNA_ENOMEM, "out of memory");
  int rc = 0;
  for (int i = 0; i < n && !rc; i++) {
    rc = st_open(paths[i], &s->files[i], err);
    if (!rc) {
      s->n_files++;
      rc = load_file(s, s->files[i], wtype, err);
    }
  }
  if (!rc) {
    if (s->enc[CLIP_L] && s->enc[CLIP_G]) s->family = TE_SDXL;
    else if (s->enc[CLIP_L]) s->family = TE_SD1;
    else
      rc = luna_fail(err, LUNA_EMODEL, "%s: only a CLIP-G text encoder was found; SDXL needs the "
                     "CLIP-L too (give both files)", paths[0]);
  }
  if (rc) te_set_free(s);
  else *out = s;
  return rc;
}

void te_set_free(te_set *s) {
  if (!s) return;
  clip_text_free(s->enc[0]);
  clip_text_free(s->enc[1]);
  for (int i = 0; i < s->n_files; i++) st_close(s->files[i]);
  free(s);
}

te_family te_set_family(const te_set *s) { return s->family; }
const char *te_family_name(te_family f) { return f == TE_SDXL ? "sdxl" : "sd1"; }
const clip_text *te_set_encoder(const te_set *s, clip_kind k) { return s->enc[k]; }

size_t te_set_weight_bytes(const te_set *s) {
  size_t b = 0;
  for (int k = 0; k < 2; k++)
    if (s->enc[k]) b += clip_text_weight_bytes(s->enc[k]);
  return b;
}

size_t te_set_scratch(const te_set *s) {
  size_t b = 0;
  for (int k = 0; k < 2; k++)
    if (s->enc[k] && clip_text_scratch(s->enc[k]) > b) b = clip_text_scratch(s->enc[k]);
  return b;
}

void te_output_free(te_output *o) {
  if (!o) return;
  free(o->cond);
  free(o->pooled);
  o->cond = o->pooled = NULL;
}

/* Layer selection of one encoder, as SDClipModel.clip_layer and its family set it. */
static void select_layer(te_family fam, int n_layers, int clip_layer, int *idx, int *final_ln) {
  if (clip_layer == 0) {
    if (fam == TE_SD1) { *idx = n_layers - 1; *final_ln = 1; }   /* "last" */
    else { *idx = n_layers - 2; *final_ln = 0; }                /* SDXL: hidden -2 */
    return;
  }
  if (-clip_layer > n_layers) { *idx = n_layers - 1; *final_ln = 1; return; } /* "last" */
  *idx = n_layers + clip_layer;
  *final_ln = fam == TE_SD1;   /* SD1 sets layer_norm_hidden_state, SDXL does not */
}

/* One encoder's part of a request: its chunks in, its cond and pooled out. */
typedef struct enc_item {
  const tok_chunks *c;
  float *cond;       /* [n_tok, D], malloc'd */
  int64_t n_tok;
  float *pooled;     /* [dp], malloc'd */
  int first, n_seq;  /* its sequences in the batch */
  int has_w;
  const clip_overlay *ov; /* its LoRA overlay on this encoder, or NULL */
  const te_embeds *emb;   /* its input embeddings on this encoder, or NULL */
} enc_item;

/* Check a request's embeddings against its chunks and the encoder's width 'D'. */
static int check_embeds(const te_embeds *e, const tok_chunks *c, int64_t D, const char *enc, int r, char *err) {
  if (!e || !e->n) return 0;
  if (e->dim != D)
    return luna_fail(err, LUNA_EINVAL, "request %d: CLIP-%s input embeddings are %lld wide (chunk %d slot %d); "
                     "this encoder's width is %lld", r, enc, (long long)e->dim, e->slot[0] / TOK_CHUNK,
                     e->slot[0] % TOK_CHUNK, (long long)D);
  for (int i = 0; i < e->n; i++) {
    if (e->slot[i] < 0 || e->slot[i] >= c->n_chunks * TOK_CHUNK || (i && e->slot[i] <= e->slot[i - 1]))
      return luna_fail(err, LUNA_EINVAL, "request %d: CLIP-%s input embedding %d is for slot %d, outside its %d "
                       "chunks or not after the previous one", r, enc, i, e->slot[i], c->n_chunks);
    if (e->row[i] < 0 || e->row[i] >= e->n_rows)
      return luna_fail(err, LUNA_EINVAL, "request %d: CLIP-%s chunk %d slot %d: row %d of %d", r, enc,
                       e->slot[i] / TOK_CHUNK, e->slot[i] % TOK_CHUNK, e->row[i], e->n_rows);
  }
  return 0;
}

/* encode_token_weights for 'n' requests on one encoder, as one forward pass: every
** request's chunks, each followed by its empty sequence when it has weights (or no
** chunks at all). Each item gets [n_chunks*77, D] (or the empty sequence's [77, D]
** when it has no chunks) and its chunk 0's pooled output. Rows do not influence each
** other, so the result of a request does not depend on what it is batched with. */
static int encode_many(const clip_text *m, te_family fam, ops_pool *pool, enc_item *it, int n,
                       int32_t pad, int clip_layer, int project, char *err) {
  const clip_hparams *hp = clip_text_hparams(m);
  int64_t D = hp->d_model, T = TOK_CHUNK;
  int64_t dp = project && hp->d_proj ? hp->d_proj : D;
  int B = 0;
  for (int r = 0; r < n; r++) {
    const tok_chunks *c = it[r].c;
    it[r].has_w = 0;
    for (int64_t i = 0; i < (int64_t)c->n_chunks * T; i++)
      if (c->weights[i] != 1.0) it[r].has_w = 1;
    it[r].first = B;
    it[r].n_seq = c->n_chunks + (it[r].has_w || c->n_chunks == 0);
    B += it[r].n_seq;
  }
  int n_emb = 0, rc = 0, n_groups = 0;
  for (int r = 0; r < n && !rc; r++) {
    rc = check_embeds(it[r].emb, it[r].c, D, clip_text_kind(m) == CLIP_G ? "G" : "L", r, err);
    if (it[r].emb) n_emb += it[r].emb->n;
  }
  if (rc) return rc;
  int32_t *ids = malloc((size_t)B * T * sizeof(int32_t));
  float *hid = malloc((size_t)(B * T * D) * sizeof(float));
  float *pool_out = malloc((size_t)(B * dp) * sizeof(float));
  clip_group *groups = malloc((size_t)n * sizeof *groups);
  int64_t *emb_at = n_emb ? malloc((size_t)n_emb * sizeof *emb_at) : NULL;
  const float **emb_vec = n_emb ? malloc((size_t)n_emb * sizeof *emb_vec) : NULL;
  if (!ids || !hid || !pool_out || !groups || (n_emb && (!emb_at || !emb_vec))) {
    rc = luna_fail(err, LUNA_ENOMEM, "out of memory for a batch of %d sequences", B);
    goto done;
  }
  /* every request's vectors, at their places in the batch (requests in order, so the
  ** positions stay ascending) */
  for (int r = 0, k = 0; r < n; r++)
    for (int i = 0; it[r].emb && i < it[r].emb->n; i++, k++) {
      const te_embeds *e = it[r].emb;
      emb_at[k] = (int64_t)it[r].first * T + e->slot[i];
      emb_vec[k] = e->rows + (int64_t)e->row[i] * D;
    }
  clip_embeds ce = {n_emb, emb_at, emb_vec};
  for (int r = 0; r < n; r++) {
    const tok_chunks *c = it[r].c;
    int32_t *dst = ids + (int64_t)it[r].first * T;
    if (c->n_chunks) memcpy(dst, c->ids, (size_t)c->n_chunks * T * sizeof(int32_t));
    if (it[r].n_seq > c->n_chunks) {
      int32_t *e = dst + (int64_t)c->n_chunks * T;
      e[0] = TOK_BOS;
      e[1] = TOK_EOS;
      for (int64_t t = 2; t < T; t++) e[t] = pad;
    }
  }
  /* one group per run of requests with the same overlay */
  for (int r = 0; r < n; r++) {
    if (n_groups && groups[n_groups - 1].ov == it[r].ov) groups[n_groups - 1].count += it[r].n_seq;
    else groups[n_groups++] = (clip_group){it[r].first, it[r].n_seq, it[r].ov};
  }
  int idx, final_ln;
  select_layer(fam, hp->n_layers, clip_layer, &idx, &final_ln);
  if ((rc = clip_text_forward_groups(m, pool, ids, B, groups, n_groups, n_emb ? &ce : NULL, idx, final_ln, project,
                                     hid, pool_out, err)))
    goto done;
  for (int r = 0; r < n && !rc; r++) {
    const tok_chunks *c = it[r].c;
    int64_t nc = c->n_chunks;
    float *z0 = hid + (int64_t)it[r].first * T * D;
    if (it[r].has_w) {
      const float *e = z0 + nc * T * D;
      for (int64_t k = 0; k < nc; k++)
        for (int64_t j = 0; j < T; j++) {
          double w = c->weights[k * T + j];
          if (w == 1.0) continue;
          float fw = (float)w, *z = z0 + (k * T + j) * D;
          const float *ze = e + j * D;
          for (int64_t d = 0; d < D; d++) z[d] = (z[d] - ze[d]) * fw + ze[d];
        }
    }
    /* with no chunks ComfyUI returns the empty sequence itself */
    it[r].n_tok = nc ? nc * T : T;
    it[r].cond = malloc((size_t)(it[r].n_tok * D) * sizeof(float));
    it[r].pooled = malloc((size_t)dp * sizeof(float));
    if (!it[r].cond || !it[r].pooled) {
      rc = luna_fail(err, LUNA_ENOMEM, "out of memory");
      break;
    }
    memcpy(it[r].cond, z0, (size_t)(it[r].n_tok * D) * sizeof(float));
    memcpy(it[r].pooled, pool_out + (int64_t)it[r].first * dp, (size_t)dp * sizeof(float));
  }
done:
  if (rc)
    for (int r = 0; r < n; r++) {
      free(it[r].cond);
      free(it[r].pooled);
      it[r].cond = it[r].pooled = NULL;
    }
  free(ids);
  free(hid);
  free(pool_out);
  free(groups);
  free(emb_at);
  free(emb_vec);
  return rc;
}

int te_set_encode_batch(const te_set *s, ops_pool *pool, const te_request *req, int n, te_output *out,
                        char *err) {
  memset(out, 0, sizeof *out * (size_t)(n > 0 ? n : 0));
  if (n < 1) return luna_fail(err, LUNA_EINVAL, "empty batch");
  int clip_layer = req[0].clip_layer;
  for (int r = 0; r < n; r++) {
    if (req[r].clip_layer > 0)
      return luna_fail(err, LUNA_EINVAL, "clip layer %d must be negative (-1 is the last layer)", req[r].clip_layer);
    if (req[r].clip_layer != clip_layer)
      return luna_fail(err, LUNA_EINVAL, "a batch must share one clip layer");
    if (!req[r].l) return luna_fail(err, LUNA_ETOKENS, "no tokens for the CLIP-L encoder (\"l\")");
    if (s->family == TE_SDXL && !req[r].g)
      return luna_fail(err, LUNA_ETOKENS, "no tokens for the CLIP-G encoder (\"g\"); SDXL needs both \"l\" and \"g\"");
  }
  const clip_text *L = s->enc[CLIP_L], *G = s->enc[CLIP_G];
  enc_item *il = calloc((size_t)n, sizeof *il), *ig = calloc((size_t)n, sizeof *ig);
  int rc = 0;
  if (!il || !ig) { rc = luna_fail(err, LUNA_ENOMEM, "out of memory"); goto done; }
  for (int r = 0; r < n; r++) {
    il[r].c = req[r].l;
    ig[r].c = req[r].g;
    il[r].ov = req[r].plan ? lora_plan_overlay(req[r].plan, CLIP_L) : NULL;
    ig[r].ov = req[r].plan ? lora_plan_overlay(req[r].plan, CLIP_G) : NULL;
    il[r].emb = req[r].emb_l;
    ig[r].emb = req[r].emb_g;
  }
  if ((rc = encode_many(L, s->family, pool, il, n, TOK_PAD_L, clip_layer, 0, err))) goto done;
  int64_t dl = clip_text_hparams(L)->d_model;
  if (s->family == TE_SD1) {
    for (int r = 0; r < n; r++) {
      out[r].cond = il[r].cond;
      out[r].pooled = il[r].pooled;
      il[r].cond = il[r].pooled = NULL;
      out[r].n_tokens = il[r].n_tok;
      out[r].dim = dl;
      out[r].pooled_dim = dl;
    }
    goto done;
  }
  if ((rc = encode_many(G, s->family, pool, ig, n, TOK_PAD_G, clip_layer, 1, err))) goto done;
  const clip_hparams *hg = clip_text_hparams(G);
  int64_t dg = hg->d_model;
  for (int r = 0; r < n && !rc; r++) {
    /* SDXL: L then G on the feature axis, cut to the shorter; pooled from G */
    int64_t cut = il[r].n_tok < ig[r].n_tok ? il[r].n_tok : ig[r].n_tok;
    out[r].cond = malloc((size_t)(cut * (dl + dg)) * sizeof(float));
    if (!out[r].cond) { rc = luna_fail(err, LUNA_ENOMEM, "out of memory"); break; }
    for (int64_t t = 0; t < cut; t++) {
      memcpy(out[r].cond + t * (dl + dg), il[r].cond + t * dl, (size_t)dl * sizeof(float));
      memcpy(out[r].cond + t * (dl + dg) + dl, ig[r].cond + t * dg, (size_t)dg * sizeof(float));
    }
    out[r].n_tokens = cut;
    out[r].dim = dl + dg;
    out[r].pooled = ig[r].pooled;
    ig[r].pooled = NULL;
    out[r].pooled_dim = hg->d_proj ? hg->d_proj : dg;
  }
done:
  for (int r = 0; il && ig && r < n; r++) {
    free(il[r].cond);
    free(il[r].pooled);
    free(ig[r].cond);
    free(ig[r].pooled);
  }
  free(il);
  free(ig);
  if (rc)
    for (int r = 0; r < n; r++) te_output_free(&out[r]);
  return rc;
}

int te_set_encode(const te_set *s, ops_pool *pool, const tok_chunks *l, const tok_chunks *g,
                  int clip_layer, te_output *out, char *err) {
  te_request r = {.l = l, .g = s->family == TE_SDXL ? g : NULL, .clip_layer = clip_layer};
  return te_set_encode_batch(s, pool, &r, 1, out, err);
}

/* Each matrix must be as wide as the set's encoder it is for (a set without that
** encoder ignores it, as it ignores those tokens): the error names the encoder and the
** first slot that would have used it. */
static int embeds_width(const te_set *set, const tok_embeds emb[2], char *err) {
  for (int k = 0; k < 2; k++) {
    const clip_text *enc = te_set_encoder(set, (clip_kind)k);
    if (!emb[k].rows || !enc || emb[k].dim == clip_text_hparams(enc)->d_model) continue;
    const char *key = k ? "g" : "l";
    char where[80] = "no slot uses it";
    if (emb[k].n)
      snprintf(where, sizeof where, "first used at \"%s\" chunk %d slot %d", key, emb[k].slot[0] / TOK_CHUNK,
               emb[k].slot[0] % TOK_CHUNK);
    return luna_fail(err, LUNA_EINVAL, "\"embeds\".\"%s\" is %lld wide but this model's CLIP-%s encoder is %d wide "
                     "(%s)", key, (long long)emb[k].dim, k ? "G" : "L", clip_text_hparams(enc)->d_model, where);
  }
  return 0;
}

int te_request_tokens(const te_set *s, const struct cJSON *tokens, const struct cJSON *embeds, const uint8_t *bin,
                      uint64_t bin_len, tok_chunks *l, tok_chunks *g, tok_embeds emb[2], char *err) {
  int rc = tok_embeds_parse(embeds, bin, bin_len, emb, err);
  if (!rc) rc = tok_json_parse_slots(tokens, "l", l, &emb[0], err);
  if (!rc && s->family == TE_SDXL) rc = tok_json_parse_slots(tokens, "g", g, &emb[1], err);
  if (!rc) rc = embeds_width(s, emb, err);
  return rc;
}

const te_embeds *te_embeds_view(const tok_embeds *e, te_embeds *te) {
  if (!e->n) return NULL;
  *te = (te_embeds){e->n, e->slot, e->row, e->rows, e->n_rows, e->dim};
  return te;
}
