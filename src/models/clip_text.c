/* clip_text.c -- CLIP text transformer: tensor names, loading with ComfyUI's fp16 rounding, forward */
/* SPDX-License-Identifier: MIT */
#include "models/clip_text.h"

#include "core/fp16.h"
#include "core/owned.h"
#include "core/status.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <zlib.h>

/* Tensor roles, and their names in each layout (after the prefix); "%d" is the layer. */
enum {
  T_TOK, T_POS, T_LN1_W, T_LN1_B, T_Q_W, T_Q_B, T_K_W, T_K_B, T_V_W, T_V_B, T_O_W, T_O_B,
  T_LN2_W, T_LN2_B, T_FC1_W, T_FC1_B, T_FC2_W, T_FC2_B, T_LNF_W, T_LNF_B, T_N
};

static const char *const names_hf[T_N] = {
    [T_TOK] = "embeddings.token_embedding.weight",
    [T_POS] = "embeddings.position_embedding.weight",
    [T_LN1_W] = "encoder.layers.%d.layer_norm1.weight",
    [T_LN1_B] = "encoder.layers.%d.layer_norm1.bias",
    [T_Q_W] = "encoder.layers.%d.self_attn.q_proj.weight",
    [T_Q_B] = "encoder.layers.%d.self_attn.q_proj.bias",
    [T_K_W] = "encoder.layers.%d.self_attn.k_proj.weight",
    [T_K_B] = "encoder.layers.%d.self_attn.k_proj.bias",
    [T_V_W] = "encoder.layers.%d.self_attn.v_proj.weight",
    [T_V_B] = "encoder.layers.%d.self_attn.v_proj.bias",
    [T_O_W] = "encoder.layers.%d.self_attn.out_proj.weight",
    [T_O_B] = "encoder.layers.%d.self_attn.out_proj.bias",
    [T_LN2_W] = "encoder.layers.%d.layer_norm2.weight",
    [T_LN2_B] = "encoder.layers.%d.layer_norm2.bias",
    [T_FC1_W] = "encoder.layers.%d.mlp.fc1.weight",
    [T_FC1_B] = "encoder.layers.%d.mlp.fc1.bias",
    [T_FC2_W] = "encoder.layers.%d.mlp.fc2.weight",
    [T_FC2_B] = "encoder.layers.%d.mlp.fc2.bias",
    [T_LNF_W] = "final_layer_norm.weight",
    [T_LNF_B] = "final_layer_norm.bias",
};

/* OpenCLIP fuses q, k and v into in_proj (row blocks in that order). */
static const char *const names_openclip[T_N] = {
    [T_TOK] = "token_embedding.weight",
    [T_POS] = "positional_embedding",
    [T_LN1_W] = "transformer.resblocks.%d.ln_1.weight",
    [T_LN1_B] = "transformer.resblocks.%d.ln_1.bias",
    [T_Q_W] = "transformer.resblocks.%d.attn.in_proj_weight",
    [T_Q_B] = "transformer.resblocks.%d.attn.in_proj_bias",
    [T_K_W] = "transformer.resblocks.%d.attn.in_proj_weight",
    [T_K_B] = "transformer.resblocks.%d.attn.in_proj_bias",
    [T_V_W] = "transformer.resblocks.%d.attn.in_proj_weight",
    [T_V_B] = "transformer.resblocks.%d.attn.in_proj_bias",
    [T_O_W] = "transformer.resblocks.%d.attn.out_proj.weight",
    [T_O_B] = "transformer.resblocks.%d.attn.out_proj.bias",
    [T_LN2_W] = "transformer.resblocks.%d.ln_2.weight",
    [T_LN2_B] = "transformer.resblocks.%d.ln_2.bias",
    [T_FC1_W] = "transformer.resblocks.%d.mlp.c_fc.weight",
    [T_FC1_B] = "transformer.resblocks.%d.mlp.c_fc.bias",
    [T_FC2_W] = "transformer.resblocks.%d.mlp.c_proj.weight",
    [T_FC2_B] = "transformer.resblocks.%d.mlp.c_proj.bias",
    [T_LNF_W] = "ln_final.weight",
    [T_LNF_B] = "ln_final.bias",
};

/* Tensors an encoder's files may carry that ComfyUI does not use (after the prefix). */
static const char *const ignored[] = {
    "text_model.embeddings.position_ids", "embeddings.position_ids", "logit_scale", "attn_mask",
};

typedef struct clip_layer {
  float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
  float *q_b, *k_b, *v_b, *o_b, *fc1_b, *fc2_b;
  ops_mat q, k, v, o, fc1, fc2;
} clip_layer;

struct clip_text {
  clip_kind kind;
  clip_hparams hp;
  ops_wtype wtype;
  ops_mat tok;           /* [49408, D] */
  float *pos;            /* [77, D] */
  clip_layer *layers;
  float *lnf_w, *lnf_b;
  ops_mat proj;          /* Linear form [d_proj, D], when d_proj > 0 */
  owned_list owned;      /* converted buffers */
  size_t weight_bytes;
};

typedef struct loader {
  const clip_source *src;
  clip_text *m;
  const char *const *names;
  uint8_t *claimed;      /* per file tensor */
  char *err;
} loader;

static void full_name(const loader *L, int role, int layer, char *out, size_t cap) {
  char rel[256];
  snprintf(rel, sizeof rel, L->names[role], layer);
  snprintf(out, cap, "%s%s%s", L->src->prefix, L->src->layout == CLIP_LAYOUT_HF ? "text_model." : "", rel);
}

/* Find 'name' and check its shape; marks it claimed. 'rows_mult' allows the fused
** in_proj ([3*rows, ...]). */
static int find_checked(loader *L, const char *name, int n_dims, int64_t d0, int64_t d1,
                        const st_tensor **out) {
  const st_file *f = L->src->file;
  const st_tensor *t = st_find(f, name);
  if (!t) return luna_fail(L->err, LUNA_EMISSING, "%s: missing tensor '%s'", f->path, name);
  L->claimed[t - f->tensors] = 1;
  if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16)
    return luna_fail(L->err, LUNA_EDTYPE, "%s: tensor '%s' has dtype %s; only F32, F16 and BF16 are supported",
                     f->path, name, st_dtype_name(t->dtype));
  int ok = t->n_dims == n_dims && t->shape[0] == d0 && (n_dims < 2 || t->shape[1] == d1);
  if (!ok) {
    char got[128] = "", want[64];
    size_t o = 0;
    for (int i = 0; i < t->n_dims && o < sizeof got - 24; i++)
      o += (size_t)snprintf(got + o, sizeof got - o, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (n_dims == 1) snprintf(want, sizeof want, "%lld", (long long)d0);
    else snprintf(want, sizeof want, "%lld, %lld", (long long)d0, (long long)d1);
    return luna_fail(L->err, LUNA_ESHAPE, "%s: tensor '%s' has shape [%s], expected [%s]", f->path, name, got, want);
  }
  *out = t;
  return 0;
}

/* Drop the file pages of a tensor that was converted (they are no longer needed). */
static void release_pages(const st_file *f, const st_tensor *t) {
  if (!f->map) return;
  long pg = sysconf(_SC_PAGESIZE);
  uintptr_t a = ((uintptr_t)t->data + (uintptr_t)pg - 1) & ~(uintptr_t)(pg - 1);
  uintptr_t b = ((uintptr_t)t->data + (t->end - t->begin)) & ~(uintptr_t)(pg - 1);
  if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

/* Read 'n' values starting at element 'off' of 't', rounded through fp16, into floats. */
static void read_rounded(const st_tensor *t, int64_t off, int64_t n, float *dst) {
  const uint8_t *p = t->data + off * (int64_t)st_dtype_size(t->dtype);
  if (t->dtype == ST_F16) {
    fp16_to_f32_row(p, dst, (size_t)n);
    return;
  }
  if (t->dtype == ST_BF16) bf16_to_f32_row(p, dst, (size_t)n);
  else memcpy(dst, p, (size_t)n * sizeof(float));
  for (int64_t i = 0; i < n; i++) dst[i] = fp16_to_f32(f32_to_fp16(dst[i]));
}

static int load_vec(loader *L, int role, int layer, int64_t n, int64_t part, float **out) {
  char name[512];
  const st_tensor *t;
  full_name(L, role, layer, name, sizeof name);
  int rc = find_checked(L, name, 1, part >= 0 ? 3 * n : n, 0, &t);
  if (rc) return rc;
  float *v = malloc((size_t)n * sizeof(float));
  if (!v || owned_add(&L->m->owned, v)) { free(v); return luna_fail(L->err, LUNA_ENOMEM, "out of memory loading '%s'", name); }
  read_rounded(t, part >= 0 ? part * n : 0, n, v);
  L->m->weight_bytes += (size_t)n * sizeof(float);
  *out = v;
  return 0;
}

/* Load a [rows, cols] weight (rows 'part*rows'.. of a fused tensor when part >= 0). */
static int load_mat(loader *L, const char *name, int64_t rows, int64_t cols, int64_t part, ops_mat *out) {
  const st_tensor *t;
  int rc = find_checked(L, name, 2, part >= 0 ? 3 * rows : rows, cols, &t);
  if (rc) return rc;
  int64_t off = part >= 0 ? part * rows * cols : 0, n = rows * cols;
  clip_text *m = L->m;
  out->rows = rows;
  out->cols = cols;
  out->type = m->wtype;
  if (m->wtype == OPS_W_F16 && t->dtype == ST_F16) {
    out->data = t->data + 2 * off; /* zero copy */
    m->weight_bytes += (size_t)n * 2;
    return 0;
  }
  size_t esz = m->wtype == OPS_W_F16 ? 2 : 4;
  void *buf = aligned_alloc(64, ((size_t)n * esz + 63) / 64 * 64);
  float *row = malloc((size_t)cols * sizeof(float));
  if (!buf || !row || owned_add(&m->owned, buf)) {
    free(buf);
    free(row);
    return luna_fail(L->err, LUNA_ENOMEM, "out of memory loading '%s'", name);
  }
  for (int64_t r = 0; r < rows; r++) {
    read_rounded(t, off + r * cols, cols, row);
    if (m->wtype == OPS_W_F16) f32_to_fp16_row(row, (uint8_t *)buf + 2 * r * cols, (size_t)cols);
    else memcpy((float *)buf + r * cols, row, (size_t)cols * sizeof(float));
  }
  free(row);
  if (part < 0 || part == 2) release_pages(L->src->file, t);
  out->data = buf;
  m->weight_bytes += (size_t)n * esz;
  return 0;
}

static int load_layer_mat(loader *L, int role, int layer, int64_t rows, int64_t cols, int64_t part, ops_mat *out) {
  char name[512];
  full_name(L, role, layer, name, sizeof name);
  return load_mat(L, name, rows, cols, part, out);
}

static int has_layer(const loader *L, int layer) {
  char name[512];
  full_name(L, T_LN1_W, layer, name, sizeof name);
  return st_find(L->src->file, name) != NULL;
}

/* The OpenCLIP projection is stored as x @ P ([in, out]); make it Linear [out, in]. */
static int load_proj_transposed(loader *L, const char *name, int64_t D, ops_mat *out) {
  const st_tensor *t = st_find(L->src->file, name);
  if (!t) return luna_fail(L->err, LUNA_EMISSING, "%s: missing tensor '%s'", L->src->file->path, name);
  if (t->n_dims != 2 || t->shape[0] != D)
    return luna_fail(L->err, LUNA_ESHAPE, "%s: tensor '%s' must have shape [%lld, out]",
                     L->src->file->path, name, (long long)D);
  int64_t dout = t->shape[1];
  int rc = find_checked(L, name, 2, D, dout, &t);
  if (rc) return rc;
  clip_text *m = L->m;
  size_t esz = m->wtype == OPS_W_F16 ? 2 : 4;
  float *all = malloc((size_t)(D * dout) * sizeof(float));
  void *buf = aligned_alloc(64, ((size_t)(D * dout) * esz + 63) / 64 * 64);
  if (!all || !buf || owned_add(&m->owned, buf)) {
    free(all);
    free(buf);
    return luna_fail(L->err, LUNA_ENOMEM, "out of memory loading '%s'", name);
  }
  read_rounded(t, 0, D * dout, all);
  for (int64_t o = 0; o < dout; o++)
    for (int64_t i = 0; i < D; i++) {
      float v = all[i * dout + o];
      if (esz == 2) {
        uint16_t h = f32_to_fp16(v);
        memcpy((uint8_t *)buf + 2 * (o * D + i), &h, 2);
      } else {
        ((float *)buf)[o * D + i] = v;
      }
    }
  free(all);
  out->type = m->wtype;
  out->rows = dout;
  out->cols = D;
  out->data = buf;
  m->weight_bytes += (size_t)(D * dout) * esz;
  return 0;
}

static int check_unclaimed(loader *L) {
  const st_file *f = L->src->file;
  size_t plen = strlen(L->src->prefix), n_bad = 0;
  char list[320] = "";
  for (size_t i = 0; i < f->n_tensors; i++) {
    const char *name = f->tensors[i].name;
    if (L->claimed[i] || strncmp(name, L->src->prefix, plen)) continue;
    int skip = 0;
    for (size_t k = 0; k < sizeof ignored / sizeof *ignored; k++)
      if (!strcmp(name + plen, ignored[k])) skip = 1;
    /* a projection that this encoder does not use (CLIP-L's) */
    if (!strcmp(name + plen, "text_projection.weight") || !strcmp(name + plen, "text_projection") ||
        !strcmp(name + plen, "text_model.text_projection.weight"))
      skip = 1;
    if (skip) continue;
    if (n_bad < 3) {
      size_t o = strlen(list);
      snprintf(list + o, sizeof list - o, "%s'%s'", n_bad ? ", " : "", name);
    }
    n_bad++;
  }
  if (n_bad)
    return luna_fail(L->err, LUNA_EUNEXPECTED, "%s: %zu unexpected tensor%s in the text encoder: %s%s",
                     f->path, n_bad, n_bad > 1 ? "s" : "", list, n_bad > 3 ? ", ..." : "");
  return 0;
}

int clip_text_load(const clip_source *src, ops_wtype wtype, clip_text **out, char *err) {
  *out = NULL;
  clip_text *m = calloc(1, sizeof *m);
  loader L = {src, m, src->layout == CLIP_LAYOUT_OPENCLIP ? names_openclip : names_hf,
              calloc(src->file->n_tensors + 1, 1), err};
  int rc = 0;
  if (!m || !L.claimed) { rc = luna_fail(err, LUNA_ENOMEM, "out of memory"); goto done; }
  m->kind = src->kind;
  m->wtype = wtype;

  /* dimensions from the token embedding and the layer count */
  char name[512];
  full_name(&L, T_TOK, 0, name, sizeof name);
  const st_tensor *tok = st_find(src->file, name);
  if (!tok) { rc = luna_fail(err, LUNA_EMISSING, "%s: missing tensor '%s'", src->file->path, name); goto done; }
  if (tok->n_dims != 2 || tok->shape[0] != CLIP_VOCAB || tok->shape[1] < CLIP_HEAD_DIM ||
      tok->shape[1] % CLIP_HEAD_DIM) {
    rc = luna_fail(err, LUNA_ESHAPE, "%s: tensor '%s' must be [%d, D] with D a multiple of %d",
                   src->file->path, name, CLIP_VOCAB, CLIP_HEAD_DIM);
    goto done;
  }
  int64_t D = tok->shape[1];
  clip_hparams *hp = &m->hp;
  hp->d_model = (int)D;
  hp->n_heads = (int)(D / CLIP_HEAD_DIM);
  while (hp->n_layers < 4096 && has_layer(&L, hp->n_layers)) hp->n_layers++;
  if (hp->n_layers == 0) {
    full_name(&L, T_LN1_W, 0, name, sizeof name);
    rc = luna_fail(err, LUNA_EMISSING, "%s: missing tensor '%s' (no transformer layers)", src->file->path, name);
    goto done;
  }
  full_name(&L, T_FC1_W, 0, name, sizeof name);
  const st_tensor *fc1 = st_find(src->file, name);
  if (!fc1) { rc = luna_fail(err, LUNA_EMISSING, "%s: missing tensor '%s'", src->file->path, name); goto done; }
  if (fc1->n_dims != 2 || fc1->shape[0] < 1 || fc1->shape[1] != D) {
    rc = luna_fail(err, LUNA_ESHAPE, "%s: tensor '%s' has shape [%lld, %lld], expected [d_mlp, %lld] "
                   "(the width %lld comes from the token embedding)", src->file->path, name,
                   (long long)fc1->shape[0], (long long)(fc1->n_dims > 1 ? fc1->shape[1] : 0),
                   (long long)D, (long long)D);
    goto done;
  }
  int64_t F = fc1->shape[0];
  hp->d_mlp = (int)F;

  full_name(&L, T_TOK, 0, name, sizeof name);
  if ((rc = load_mat(&L, name, CLIP_VOCAB, D, -1, &m->tok))) goto done;
  full_name(&L, T_POS, 0, name, sizeof name);
  {
    const st_tensor *t;
    if ((rc = find_checked(&L, name, 2, CLIP_CTX, D, &t))) goto done;
    if (!(m->pos = malloc((size_t)(CLIP_CTX * D) * sizeof(float))) || owned_add(&m->owned, m->pos)) {
      rc = luna_fail(err, LUNA_ENOMEM, "out of memory");
      goto done;
    }
    read_rounded(t, 0, CLIP_CTX * D, m->pos);
    m->weight_bytes += (size_t)(CLIP_CTX * D) * sizeof(float);
  }
  m->layers = calloc((size_t)hp->n_layers, sizeof(clip_layer));
  if (!m->layers) { rc = luna_fail(err, LUNA_ENOMEM, "out of memory"); goto done; }
  int fused = src->layout == CLIP_LAYOUT_OPENCLIP;
  for (int l = 0; l < hp->n_layers; l++) {
    clip_layer *y = &m->layers[l];
    if ((rc = load_vec(&L, T_LN1_W, l, D, -1, &y->ln1_w)) || (rc = load_vec(&L, T_LN1_B, l, D, -1, &y->ln1_b)) ||
        (rc = load_layer_mat(&L, T_Q_W, l, D, D, fused ? 0 : -1, &y->q)) ||
        (rc = load_vec(&L, T_Q_B, l, D, fused ? 0 : -1, &y->q_b)) ||
        (rc = load_layer_mat(&L, T_K_W, l, D, D, fused ? 1 : -1, &y->k)) ||
        (rc = load_vec(&L, T_K_B, l, D, fused ? 1 : -1, &y->k_b)) ||
        (rc = load_layer_mat(&L, T_V_W, l, D, D, fused ? 2 : -1, &y->v)) ||
        (rc = load_vec(&L, T_V_B, l, D, fused ? 2 : -1, &y->v_b)) ||
        (rc = load_layer_mat(&L, T_O_W, l, D, D, -1, &y->o)) || (rc = load_vec(&L, T_O_B, l, D, -1, &y->o_b)) ||
        (rc = load_vec(&L, T_LN2_W, l, D, -1, &y->ln2_w)) || (rc = load_vec(&L, T_LN2_B, l, D, -1, &y->ln2_b)) ||
        (rc = load_layer_mat(&L, T_FC1_W, l, F, D, -1, &y->fc1)) || (rc = load_vec(&L, T_FC1_B, l, F, -1, &y->fc1_b)) ||
        (rc = load_layer_mat(&L, T_FC2_W, l, D, F, -1, &y->fc2)) || (rc = load_vec(&L, T_FC2_B, l, D, -1, &y->fc2_b)))
      goto done;
  }
  if ((rc = load_vec(&L, T_LNF_W, 0, D, -1, &m->lnf_w)) || (rc = load_vec(&L, T_LNF_B, 0, D, -1, &m->lnf_b))) goto done;
  if (src->proj_name) {
    if (src->proj_is_xP) rc = load_proj_transposed(&L, src->proj_name, D, &m->proj);
    else {
      const st_tensor *t = st_find(src->file, src->proj_name);
      int64_t dout = t && t->n_dims == 2 ? t->shape[0] : D;
      rc = load_mat(&L, src->proj_name, dout, D, -1, &m->proj);
    }
    if (rc) goto done;
    hp->d_proj = (int)m->proj.rows;
  }
  rc = check_unclaimed(&L);
done:
  free(L.claimed);
  if (rc) clip_text_free(m);
  else *out = m;
  return rc;
}

void clip_text_free(clip_text *m) {
  if (!m) return;
  owned_free(&m->owned);
  free(m->layers);
  free(m);
}

const clip_hparams *clip_text_hparams(const clip_text *m) { return &m->hp; }
clip_kind clip_text_kind(const clip_text *m) { return m->kind; }
size_t clip_text_weight_bytes(const clip_text *m) { return m->weight_bytes; }

size_t clip_text_scratch(const clip_text *m) {
  size_t a = ops_linear_scratch(m->hp.d_mlp > m->hp.d_model ? m->hp.d_mlp : m->hp.d_model);
  size_t b = (size_t)CLIP_CTX * CLIP_CTX;
  return a > b ? a : b;
}

const ops_mat *clip_text_matrix(const clip_text *m, int layer, clip_mat which) {
  if (which == CLIP_MAT_PROJ) return m->hp.d_proj ? &m->proj : NULL;
  if (layer < 0 || layer >= m->hp.n_layers) return NULL;
  const clip_layer *y = &m->layers[layer];
  switch (which) {
  case CLIP_MAT_Q: return &y->q;
  case CLIP_MAT_K: return &y->k;
  case CLIP_MAT_V: return &y->v;
  case CLIP_MAT_O: return &y->o;
  case CLIP_MAT_FC1: return &y->fc1;
  case CLIP_MAT_FC2: return &y->fc2;
  default: return NULL;
  }
}

uint32_t clip_text_checksum(const clip_text *m) {
  uLong crc = crc32(0L, Z_NULL, 0);
  for (int l = 0; l < m->hp.n_layers; l++)
    for (int w = CLIP_MAT_Q; w <= CLIP_MAT_FC2; w++) {
      const ops_mat *a = clip_text_matrix(m, l, (clip_mat)w);
      size_t bytes = (size_t)(a->rows * a->cols) * (a->type == OPS_W_F16 ? 2 : 4);
      for (size_t off = 0; off < bytes; off += 1u << 30) /* crc32 takes a uInt length */
        crc = crc32(crc, (const Bytef *)a->data + off, (uInt)(bytes - off < (1u << 30) ? bytes - off : (1u << 30)));
    }
  if (m->hp.d_proj) {
    size_t bytes = (size_t)(m->proj.rows * m->proj.cols) * (m->proj.type == OPS_W_F16 ? 2 : 4);
    crc = crc32(crc, m->proj.data, (uInt)bytes);
  }
  return (uint32_t)crc;
}

/* One forward pass: the batch, its groups, and a scratch matrix for per-request weights. */
typedef struct fwd {
  const clip_text *m;
  ops_pool *pool;
  const clip_group *g;
  int n_g;
  float *wbuf;        /* fp32 weights built for one request */
  size_t wbuf_floats;
  const clip_mat_patch *built; /* whose weights 'wbuf' holds */
  char *err;
} fwd;

static const clip_mat_patch *patch_of(const fwd *f, int gi, int layer, clip_mat which) {
  const clip_overlay *ov = f->g[gi].ov;
  if (!ov) return NULL;
  const clip_mat_patch *p = &ov->mats[which == CLIP_MAT_PROJ ? ov->n_layers * 6 : layer * 6 + (int)which];
  return p->replace || p->build || p->n_terms ? p : NULL;
}

/* The weights a group computes with, as an identity: the base (NULL), a merged copy, or
** the group's own built matrix. */
static const void *weight_id(const clip_mat_patch *p) {
  if (!p) return NULL;
  if (p->replace) return p->replace;
  if (p->build) return p;
  return NULL;
}

/* Build the weight of patch 'p' into the forward's scratch matrix (kept while the
** same patch asks again). */
static int built(fwd *f, const clip_mat_patch *p, const ops_mat *W, const float **out) {
  if (f->built == p) {
    *out = f->wbuf;
    return 0;
  }
  size_t need = (size_t)(W->rows * W->cols);
  if (f->wbuf_floats < need) {
    free(f->wbuf);
    f->wbuf = malloc(need * sizeof(float));
    f->wbuf_floats = f->wbuf ? need : 0;
    if (!f->wbuf)
      return luna_fail(f->err, LUNA_ENOMEM, "out of memory for a %lld x %lld LoRA weight", (long long)W->rows,
                       (long long)W->cols);
  }
  f->built = NULL;
  ops_mat_to_f32(W, f->wbuf);
  int rc = p->build(p->build_ud, f->wbuf, f->err);
  if (rc) return rc;
  f->built = p;
  *out = f->wbuf;
  return 0;
}

/* y = x W^T + b for every group of the batch, each with its own weights and terms.
** Consecutive groups with the same weights share one GEMM. */
static int lin(fwd *f, const float *x, int layer, clip_mat which, const ops_mat *W, const float *bias,
               float *y) {
  const int64_t T = CLIP_CTX, in = W->cols, out = W->rows;
  for (int a = 0; a < f->n_g;) {
    const clip_mat_patch *pa = patch_of(f, a, layer, which);
    const void *id = weight_id(pa);
    int b = a + 1;
    while (b < f->n_g && weight_id(patch_of(f, b, layer, which)) == id) b++;
    int64_t r0 = (int64_t)f->g[a].first * T, rows = (int64_t)(f->g[b - 1].first + f->g[b - 1].count) * T - r0;
    if (!pa || (!pa->replace && !pa->build)) {
      ops_linear(f->pool, x + r0 * in, rows, W, bias, y + r0 * out);
    } else if (pa->replace) {
      ops_mat R = {OPS_W_F32, out, in, pa->replace};
      ops_linear(f->pool, x + r0 * in, rows, &R, bias, y + r0 * out);
    } else {
      const float *w;
      int rc = built(f, pa, W, &w);
      if (rc) return rc;
      ops_mat R = {OPS_W_F32, out, in, w};
      ops_linear(f->pool, x + r0 * in, rows, &R, bias, y + r0 * out);
    }
    a = b;
  }
  for (int a = 0; a < f->n_g; a++) {
    const clip_mat_patch *p = patch_of(f, a, layer, which);
    if (!p || !p->n_terms) continue;
    int64_t r0 = (int64_t)f->g[a].first * T, rows = (int64_t)f->g[a].count * T;
    for (int t = 0; t < p->n_terms; t++)
      ops_lowrank_add(f->pool, x + r0 * in, rows, in, p->terms[t].down, p->terms[t].up, p->terms[t].rank, out,
                      p->terms[t].coef, y + r0 * out);
  }
  return 0;
}

/* The projection of one pooled row of group 'gi' (one row at a time: see the caller). */
static int proj_row(fwd *f, int gi, const float *x, float *y) {
  const ops_mat *W = &f->m->proj;
  const clip_mat_patch *p = patch_of(f, gi, 0, CLIP_MAT_PROJ);
  if (!p || (!p->replace && !p->build)) ops_linear(f->pool, x, 1, W, NULL, y);
  else {
    const float *w = p->replace;
    int rc = w ? 0 : built(f, p, W, &w);
    if (rc) return rc;
    ops_mat R = {OPS_W_F32, W->rows, W->cols, w};
    ops_linear(f->pool, x, 1, &R, NULL, y);
  }
  for (int t = 0; p && t < p->n_terms; t++)
    ops_lowrank_add(f->pool, x, 1, W->cols, p->terms[t].down, p->terms[t].up, p->terms[t].rank, W->rows,
                    p->terms[t].coef, y);
  return 0;
}

static int check_groups(const clip_text *m, const clip_group *g, int n, int B, char *err) {
  int next = 0;
  for (int i = 0; i < n; i++) {
    if (g[i].first != next || g[i].count < 1)
      return luna_fail(err, LUNA_EINVAL, "group %d covers sequences [%d, %d); expected to start at %d", i,
                       g[i].first, g[i].first + g[i].count, next);
    if (g[i].ov && g[i].ov->n_layers != m->hp.n_layers)
      return luna_fail(err, LUNA_EINVAL, "group %d: overlay for %d layers on a %d-layer encoder", i,
                       g[i].ov->n_layers, m->hp.n_layers);
    next += g[i].count;
  }
  if (next != B) return luna_fail(err, LUNA_EINVAL, "groups cover %d of %d sequences", next, B);
  return 0;
}

int clip_text_forward(const clip_text *m, ops_pool *pool, const int32_t *ids, int B, int layer_idx,
                      int final_ln, int project, float *hidden, float *pooled, char *err) {
  clip_group all = {0, B, NULL};
  return clip_text_forward_groups(m, pool, ids, B, &all, 1, NULL, layer_idx, final_ln, project, hidden, pooled,
                                  err);
}

/* Mark the positions 'emb' gives as vectors in 'is_vec' [M] (zeroed by the caller),
** checking that they are ascending and inside the batch. */
static int mark_embeds(const clip_embeds *emb, int64_t M, uint8_t *is_vec, char *err) {
  for (int i = 0; i < emb->n; i++) {
    int64_t at = emb->at[i];
    if (at < 0 || at >= M || (i && at <= emb->at[i - 1]))
      return luna_fail(err, LUNA_EINVAL, "input embedding %d: position %lld is outside the batch's %lld or not "
                       "after the previous one", i, (long long)at, (long long)M);
    if (!emb->vec[i]) return luna_fail(err, LUNA_EINVAL, "input embedding %d has no vector", i);
    is_vec[at] = 1;
  }
  return 0;
}

int clip_text_forward_groups(const clip_text *m, ops_pool *pool, const int32_t *ids, int B,
                             const clip_group *groups, int n_groups, const clip_embeds *emb,
                             int layer_idx, int final_ln, int project, float *hidden, float *pooled,
                             char *err) {
  const clip_hparams *hp = &m->hp;
  int64_t D = hp->d_model, F = hp->d_mlp, T = CLIP_CTX, M = (int64_t)B * T;
  if (B < 1) return luna_fail(err, LUNA_EINVAL, "clip_text_forward: no sequences");
  if (hidden && (layer_idx < 0 || layer_idx >= hp->n_layers))
    return luna_fail(err, LUNA_EINVAL, "layer index %d out of range [0, %d)", layer_idx, hp->n_layers);
  int rc = check_groups(m, groups, n_groups, B, err);
  if (rc) return rc;
  /* which positions take a given vector instead of an id's embedding */
  uint8_t *is_vec = NULL;
  if (emb && emb->n > 0) {
    if (!(is_vec = calloc((size_t)M, 1))) return luna_fail(err, LUNA_ENOMEM, "out of memory");
    if ((rc = mark_embeds(emb, M, is_vec, err))) {
      free(is_vec);
      return rc;
    }
  }
  for (int64_t i = 0; i < M; i++)
    if ((!is_vec || !is_vec[i]) && (ids[i] < 0 || ids[i] >= CLIP_VOCAB)) {
      free(is_vec);
      return luna_fail(err, LUNA_ETOKENS, "token id %d at sequence %lld position %lld is outside [0, %d)",
                       ids[i], (long long)(i / T), (long long)(i % T), CLIP_VOCAB);
    }
  size_t need = (size_t)M * (size_t)(6 * D + F);
  float *buf = ops_pool_workspace(pool, need);
  if (!buf) {
    free(is_vec);
    return luna_fail(err, LUNA_ENOMEM, "out of memory for %lld activations", (long long)need);
  }
  float *x = buf, *h = x + M * D, *q = h + M * D, *k = q + M * D, *v = k + M * D, *a = v + M * D,
        *mlp = a + M * D;
  fwd f = {m, pool, groups, n_groups, NULL, 0, NULL, err};

  for (int64_t i = 0, e = 0; i < M; i++) {
    float *row = x + i * D;
    const float *pos = m->pos + (i % T) * D;
    if (is_vec && is_vec[i]) memcpy(row, emb->vec[e++], (size_t)D * sizeof(float)); /* fp32 as given */
    else if (m->tok.type == OPS_W_F16) fp16_to_f32_row((const uint8_t *)m->tok.data + 2 * (int64_t)ids[i] * D, row, (size_t)D);
    else memcpy(row, (const float *)m->tok.data + (int64_t)ids[i] * D, (size_t)D * sizeof(float));
    for (int64_t c = 0; c < D; c++) row[c] += pos[c];
  }
  /* the pooled output needs every layer; the hidden state alone only up to 'layer_idx' */
  int last = pooled || !hidden ? hp->n_layers - 1 : layer_idx;
  for (int l = 0; l <= last && !rc; l++) {
    const clip_layer *y = &m->layers[l];
    ops_layer_norm(pool, x, M, D, y->ln1_w, y->ln1_b, CLIP_LN_EPS, h);
    if ((rc = lin(&f, h, l, CLIP_MAT_Q, &y->q, y->q_b, q)) || (rc = lin(&f, h, l, CLIP_MAT_K, &y->k, y->k_b, k)) ||
        (rc = lin(&f, h, l, CLIP_MAT_V, &y->v, y->v_b, v)))
      break;
    ops_attention_causal(pool, q, k, v, B, T, hp->n_heads, CLIP_HEAD_DIM, a);
    if ((rc = lin(&f, a, l, CLIP_MAT_O, &y->o, y->o_b, h))) break;
    ops_add(pool, x, h, M * D);
    ops_layer_norm(pool, x, M, D, y->ln2_w, y->ln2_b, CLIP_LN_EPS, h);
    if ((rc = lin(&f, h, l, CLIP_MAT_FC1, &y->fc1, y->fc1_b, mlp))) break;
    if (m->kind == CLIP_G) ops_gelu_erf(pool, mlp, M * F);
    else ops_quick_gelu(pool, mlp, M * F);
    if ((rc = lin(&f, mlp, l, CLIP_MAT_FC2, &y->fc2, y->fc2_b, h))) break;
    ops_add(pool, x, h, M * D);
    if (hidden && l == layer_idx) {
      if (final_ln) ops_layer_norm(pool, x, M, D, m->lnf_w, m->lnf_b, CLIP_LN_EPS, hidden);
      else memcpy(hidden, x, (size_t)(M * D) * sizeof(float));
    }
  }
  if (!rc && pooled) {
    /* final LN of each sequence's first end token (ComfyUI: num_tokens - 1) */
    for (int b = 0; b < B; b++) {
      /* ComfyUI's num_tokens - 1: id positions count up to the first end token, vector
      ** positions always; with ids only this is the first end token (the last position
      ** when there is none) */
      int64_t n_tok = 0;
      int eos = 0;
      for (int64_t t = 0; t < T; t++) {
        if (is_vec && is_vec[b * T + t]) n_tok++;
        else if (!eos) {
          n_tok++;
          eos = ids[b * T + t] == 49407;
        }
      }
      int64_t at = n_tok - 1;
      memcpy(h + b * D, x + (b * T + at) * D, (size_t)D * sizeof(float));
    }
    ops_layer_norm(pool, h, B, D, m->lnf_w, m->lnf_b, CLIP_LN_EPS, h);
    /* one row at a time: a GEMM's summation order may depend on its row count, and a
    ** sequence's result must not depend on the batch it ran in */
    if (project && hp->d_proj) {
      for (int gi = 0; gi < n_groups && !rc; gi++)
        for (int b = groups[gi].first; b < groups[gi].first + groups[gi].count && !rc; b++)
          rc = proj_row(&f, gi, h + (int64_t)b * D, pooled + (int64_t)b * hp->d_proj);
    } else memcpy(pooled, h, (size_t)(B * D) * sizeof(float));
  }
  free(f.wbuf);
  free(is_vec);
  return rc;
}

void clip_text_enumerate(const char *prefix, clip_layout layout, const clip_hparams *hp,
                         clip_tensor_cb cb, void *ud) {
  const char *const *names = layout == CLIP_LAYOUT_OPENCLIP ? names_openclip : names_hf;
  int64_t D = hp->d_model, F = hp->d_mlp;
  for (int role = 0; role < T_N; role++) {
    int per_layer = strstr(names[role], "%d") != NULL;
    int fused = layout == CLIP_LAYOUT_OPENCLIP && role >= T_Q_W && role <= T_V_B;
    if (fused && role > T_Q_B) continue; /* in_proj is one tensor for q, k and v */
    for (int l = 0; l < (per_layer ? hp->n_layers : 1); l++) {
      char rel[256], full[512];
      snprintf(rel, sizeof rel, names[role], l);
      snprintf(full, sizeof full, "%s%s%s", prefix, layout == CLIP_LAYOUT_HF ? "text_model." : "", rel);
      int64_t shape[2];
      int nd = 1;
      switch (role) {
      case T_TOK: nd = 2; shape[0] = CLIP_VOCAB; shape[1] = D; break;
      case T_POS: nd = 2; shape[0] = CLIP_CTX; shape[1] = D; break;
      case T_Q_W: case T_K_W: case T_V_W: case T_O_W: nd = 2; shape[0] = D; shape[1] = D; break;
      case T_FC1_W: nd = 2; shape[0] = F; shape[1] = D; break;
      case T_FC2_W: nd = 2; shape[0] = D; shape[1] = F; break;
      case T_FC1_B: shape[0] = F; break;
      default: shape[0] = D; break;
      }
      if (fused) shape[0] *= 3;
      cb(ud, full, nd, shape);
    }
  }
}
