/* lora_file.c -- parse a LoRA/LyCORIS file into text-encoder patches: key mapping, validation */
/* SPDX-License-Identifier: MIT */
/*
** Parsing runs in three passes over the file's tensors (sorted by name):
**   1. each text-encoder tensor is matched against the target prefixes (lora.h); a
**      recognised suffix that luna cannot apply is an error right there;
**   2. the tensors are grouped by target prefix and each group is read as ComfyUI's
**      load_lora would: LoRA, then LoHa, then LoKr, then diff; the first adapter found
**      makes the patch and consumes its tensors;
**   3. text-encoder tensors nobody consumed are counted as unmapped.
*/
#include "lora/lora.h"

#include "core/fp16.h"
#include "core/status.h"

#include <cblas.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Bounds that keep a hostile file from asking for absurd memory: no text-encoder matrix
** comes near a side of 2^20, and a LoKr factor multiplied out at parse holds at most 2^26
** floats (256 MiB). */
#define MAX_SIDE ((int64_t)1 << 20)
#define MAX_FACTOR ((int64_t)1 << 26)
#define MAX_LAYER 63

static const char *const mods_kohya[LORA_M_PROJ] = {
    [LORA_M_Q] = "self_attn_q_proj",  [LORA_M_K] = "self_attn_k_proj",
    [LORA_M_V] = "self_attn_v_proj",  [LORA_M_O] = "self_attn_out_proj",
    [LORA_M_FC1] = "mlp_fc1",         [LORA_M_FC2] = "mlp_fc2",
};

static const char *const mods_hf[LORA_M_PROJ] = {
    [LORA_M_Q] = "self_attn.q_proj",  [LORA_M_K] = "self_attn.k_proj",
    [LORA_M_V] = "self_attn.v_proj",  [LORA_M_O] = "self_attn.out_proj",
    [LORA_M_FC1] = "mlp.fc1",         [LORA_M_FC2] = "mlp.fc2",
};

/* Per-layer target prefixes: head, layer number, separator, module name. */
static const struct {
  const char *head;
  int enc;
  int hf; /* 1: '.'-separated HF module names; 0: kohya's '_' names */
} layer_forms[] = {
    {"lora_te_text_model_encoder_layers_", 0, 0},
    {"lora_te1_text_model_encoder_layers_", 0, 0},
    {"lora_te2_text_model_encoder_layers_", 1, 0},
    {"text_encoder.text_model.encoder.layers.", 0, 1},
    {"text_encoder_2.text_model.encoder.layers.", 1, 1},
    {"text_encoders.clip_l.transformer.text_model.encoder.layers.", 0, 1},
    {"text_encoders.clip_g.transformer.text_model.encoder.layers.", 1, 1},
};

static const struct {
  const char *prefix;
  int enc;
} proj_forms[] = {
    {"lora_te2_text_projection", 1},
    {"lora_prior_te_text_projection", 1},
    {"text_encoders.clip_g.transformer.text_projection", 1},
    {"lora_te1_text_projection", 0},
    {"text_encoders.clip_l.transformer.text_projection", 0},
};

/* LoRA up names in ComfyUI's order of preference, and the matching down names. */
#define N_LORA_FORMS 7
static const char *const up_sfx[N_LORA_FORMS] = {
    ".lora_up.weight", "_lora.up.weight", ".lora_B.weight", ".lora.up.weight",
    ".lora_B", ".lora_linear_layer.up.weight", ".lora_B.default.weight",
};
static const char *const down_sfx[N_LORA_FORMS] = {
    ".lora_down.weight", "_lora.down.weight", ".lora_A.weight", ".lora.down.weight",
    ".lora_A", ".lora_linear_layer.down.weight", ".lora_A.default.weight",
};

static const char *const supported_sfx[] = {
    ".alpha",      ".dora_scale", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a",  ".hada_w2_b",
    ".lokr_w1",    ".lokr_w1_a",  ".lokr_w1_b", ".lokr_w2",   ".lokr_w2_a",  ".lokr_w2_b",
    ".diff",
};

/* Adapters and patches that ComfyUI applies and luna does not. */
static const struct {
  const char *sfx;
  const char *what;
} unsupported_sfx[] = {
    {".lora_mid.weight", "a LoCon Tucker factor (lora_mid)"},
    {".reshape_weight", "a LoRA reshape (reshape_weight)"},
    {".hada_t1", "a LoHa Tucker factor (hada_t1)"},
    {".hada_t2", "a LoHa Tucker factor (hada_t2)"},
    {".lokr_t2", "a LoKr Tucker factor (lokr_t2)"},
    {".a1.weight", "a GLoRA factor"},
    {".a2.weight", "a GLoRA factor"},
    {".b1.weight", "a GLoRA factor"},
    {".b2.weight", "a GLoRA factor"},
    {".diff_b", "a bias patch (diff_b)"},
    {".set_weight", "a weight replacement (set_weight)"},
    {".w_norm", "a norm patch (w_norm)"},
    {".b_norm", "a norm patch (b_norm)"},
};

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* What luna cannot apply about suffix 's' after a target prefix, or NULL. */
static const char *unsupported(const char *s) {
  for (size_t i = 0; i < COUNT(unsupported_sfx); i++)
    if (!strcmp(s, unsupported_sfx[i].sfx)) return unsupported_sfx[i].what;
  if (s[0] == '.' && strstr(s, "oft_")) return "an OFT/BOFT adapter";
  return NULL;
}

/* 1 when 's' is a suffix some adapter reads (supported or not). */
static int recognised(const char *s) {
  if (unsupported(s)) return 1;
  for (size_t i = 0; i < N_LORA_FORMS; i++)
    if (!strcmp(s, up_sfx[i]) || !strcmp(s, down_sfx[i])) return 1;
  for (size_t i = 0; i < COUNT(supported_sfx); i++)
    if (!strcmp(s, supported_sfx[i])) return 1;
  return 0;
}

/* A layer number 0..MAX_LAYER written without leading zeros; its length, or 0. */
static size_t parse_layer(const char *s, int *layer) {
  size_t n = 0;
  int v = 0;
  while (s[n] >= '0' && s[n] <= '9') {
    if (n == 2) return 0;
    v = v * 10 + (s[n] - '0');
    n++;
  }
  if (n == 0 || (n > 1 && s[0] == '0') || v > MAX_LAYER) return 0;
  *layer = v;
  return n;
}

typedef struct target {
  size_t ti;      /* the tensor's index in the st_file */
  size_t plen;    /* length of the target prefix at the start of its name */
  int enc, layer;
  lora_module mod;
} target;

/* Match 'name' against the target prefixes; fills 't' (not ti) and returns 1, or 0. */
static int map_target(const char *name, target *t) {
  for (size_t i = 0; i < COUNT(proj_forms); i++) {
    size_t n = strlen(proj_forms[i].prefix);
    if (!strncmp(name, proj_forms[i].prefix, n)) {
      t->plen = n;
      t->enc = proj_forms[i].enc;
      t->layer = -1;
      t->mod = LORA_M_PROJ;
      return 1;
    }
  }
  for (size_t i = 0; i < COUNT(layer_forms); i++) {
    size_t n = strlen(layer_forms[i].head);
    if (strncmp(name, layer_forms[i].head, n)) continue;
    int layer;
    size_t d = parse_layer(name + n, &layer);
    if (!d) return 0;
    const char *p = name + n + d;
    if (*p != (layer_forms[i].hf ? '.' : '_')) return 0;
    p++;
    const char *const *mods = layer_forms[i].hf ? mods_hf : mods_kohya;
    for (int m = 0; m < LORA_M_PROJ; m++) {
      size_t ml = strlen(mods[m]);
      if (!strncmp(p, mods[m], ml)) {
        t->plen = (size_t)(p + ml - name);
        t->enc = layer_forms[i].enc;
        t->layer = layer;
        t->mod = (lora_module)m;
        return 1;
      }
    }
    return 0;
  }
  return 0;
}

/* The generic form can also name embeddings and LayerNorms, which luna does not patch:
** the length of such a prefix at the start of 'name', or 0. */
static size_t generic_unpatchable(const char *name) {
  static const char *const heads[] = {"text_encoders.clip_l.transformer.text_model.",
                                      "text_encoders.clip_g.transformer.text_model."};
  static const char *const fixed[] = {"embeddings.token_embedding", "embeddings.position_embedding",
                                      "final_layer_norm"};
  for (size_t i = 0; i < COUNT(heads); i++) {
    size_t n = strlen(heads[i]);
    if (strncmp(name, heads[i], n)) continue;
    const char *p = name + n;
    for (size_t k = 0; k < COUNT(fixed); k++)
      if (!strncmp(p, fixed[k], strlen(fixed[k]))) return (size_t)(p - name) + strlen(fixed[k]);
    static const char layers[] = "encoder.layers.";
    if (strncmp(p, layers, sizeof layers - 1)) return 0;
    p += sizeof layers - 1;
    int layer;
    size_t d = parse_layer(p, &layer);
    if (!d) return 0;
    p += d;
    if (!strncmp(p, ".layer_norm1", 12) || !strncmp(p, ".layer_norm2", 12))
      return (size_t)(p - name) + 12;
    return 0;
  }
  return 0;
}

/* The state of one parse. */
typedef struct ctx {
  const st_file *st;
  const char *label;
  char *err;
  uint8_t *used;        /* per tensor: consumed by a patch */
  size_t n_used;
  char x[192];          /* the current target prefix */
} ctx;

static const st_tensor *find(ctx *c, const char *sfx) {
  char name[256];
  snprintf(name, sizeof name, "%s%s", c->x, sfx);
  return st_find(c->st, name);
}

static void use(ctx *c, const st_tensor *t) {
  c->n_used += !c->used[t - c->st->tensors];
  c->used[t - c->st->tensors] = 1;
}

static void fmt_shape(const st_tensor *t, char *buf, size_t len) {
  size_t at = (size_t)snprintf(buf, len, "[");
  for (int d = 0; d < t->n_dims && at < len; d++)
    at += (size_t)snprintf(buf + at, len - at, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
  if (at < len) snprintf(buf + at, len - at, "]");
}

static int check_dtype(ctx *c, const st_tensor *t) {
  if (t->dtype == ST_F32 || t->dtype == ST_F16 || t->dtype == ST_BF16) return 0;
  return luna_fail(c->err, LUNA_EDTYPE, "%s: tensor '%s' has dtype %s; LoRA tensors must be F32, F16 or BF16",
                   c->label, t->name, st_dtype_name(t->dtype));
}

static int check_finite(ctx *c, const st_tensor *t, const float *v, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (!isfinite(v[i]))
      return luna_fail(c->err, LUNA_EFORMAT, "%s: tensor '%s' holds a non-finite value (%g at element %lld)",
                       c->label, t->name, (double)v[i], (long long)i);
  return 0;
}

/* Read 't' as an fp32 matrix: 2-D, or 4-D with trailing dimensions 1 (a 1x1 conv). */
static int read_matrix(ctx *c, const st_tensor *t, int64_t *rows, int64_t *cols, float **out) {
  *out = NULL;
  int rc = check_dtype(c, t);
  if (rc) return rc;
  char sh[128];
  fmt_shape(t, sh, sizeof sh);
  if (!(t->n_dims == 2 || (t->n_dims == 4 && t->shape[2] == 1 && t->shape[3] == 1)))
    return luna_fail(c->err, LUNA_ESHAPE, "%s: tensor '%s' has shape %s; expected a matrix "
                     "([rows, cols] or [rows, cols, 1, 1])", c->label, t->name, sh);
  int64_t r = t->shape[0], k = t->shape[1];
  if (r == 0 || k == 0 || r > MAX_SIDE || k > MAX_SIDE)
    return luna_fail(c->err, LUNA_ESHAPE, "%s: tensor '%s' has shape %s: empty or too large",
                     c->label, t->name, sh);
  float *v = malloc((size_t)(r * k) * sizeof(float));
  if (!v) return luna_fail(c->err, LUNA_ENOMEM, "%s: tensor '%s': out of memory", c->label, t->name);
  if ((rc = st_read_f32(c->st, t, v, r * k, c->err)) || (rc = check_finite(c, t, v, r * k))) {
    free(v);
    return rc;
  }
  use(c, t);
  *rows = r;
  *cols = k;
  *out = v;
  return 0;
}

/* alpha: one element of a float dtype, read as double (torch's .item()). */
static int read_alpha(ctx *c, const st_tensor *t, double *alpha) {
  if (st_numel(t) != 1) {
    char sh[128];
    fmt_shape(t, sh, sizeof sh);
    return luna_fail(c->err, LUNA_ESHAPE, "%s: tensor '%s' has shape %s; alpha must be a scalar",
                     c->label, t->name, sh);
  }
  uint16_t h;
  float f;
  switch (t->dtype) {
  case ST_F64: memcpy(alpha, t->data, 8); break;
  case ST_F32: memcpy(&f, t->data, 4); *alpha = f; break;
  case ST_F16: memcpy(&h, t->data, 2); *alpha = fp16_to_f32(h); break;
  case ST_BF16: memcpy(&h, t->data, 2); *alpha = bf16_to_f32(h); break;
  default:
    return luna_fail(c->err, LUNA_EDTYPE, "%s: tensor '%s' has dtype %s; alpha must be a float",
                     c->label, t->name, st_dtype_name(t->dtype));
  }
  if (!isfinite(*alpha))
    return luna_fail(c->err, LUNA_EFORMAT, "%s: tensor '%s' holds a non-finite value (%g)", c->label,
                     t->name, *alpha);
  use(c, t);
  return 0;
}

static int missing(ctx *c, const char *have, const char *want_sfx) {
  return luna_fail(c->err, LUNA_EMISSING, "%s: tensor '%s' has no partner: '%s%s' is missing",
                   c->label, have, c->x, want_sfx);
}

static int rank_mismatch(ctx *c, const st_tensor *a, const st_tensor *b, const char *what) {
  char sa[128], sb[128];
  fmt_shape(a, sa, sizeof sa);
  fmt_shape(b, sb, sizeof sb);
  return luna_fail(c->err, LUNA_ESHAPE, "%s: tensors '%s' %s and '%s' %s disagree on %s", c->label,
                   a->name, sa, b->name, sb, what);
}

/* Product a [m, r] @ b [r, n] in fp32, into a new buffer. */
static int matmul_new(ctx *c, const st_tensor *ta, const float *a, const float *b, int64_t m,
                      int64_t r, int64_t n, float **out) {
  if (m * n > MAX_FACTOR)
    return luna_fail(c->err, LUNA_ESHAPE, "%s: tensor '%s': the LoKr factor would hold %lld values "
                     "(at most %lld)", c->label, ta->name, (long long)(m * n), (long long)MAX_FACTOR);
  float *p = malloc((size_t)(m * n) * sizeof(float));
  if (!p) return luna_fail(c->err, LUNA_ENOMEM, "%s: tensor '%s': out of memory", c->label, ta->name);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, (int)r, 1.0f, a, (int)r,
              b, (int)n, 0.0f, p, (int)n);
  *out = p;
  return 0;
}

static int try_lora(ctx *c, lora_patch *p, int *found) {
  const st_tensor *up = NULL, *down = NULL;
  int form = -1;
  for (int i = 0; i < N_LORA_FORMS && !up; i++)
    if ((up = find(c, up_sfx[i]))) form = i;
  if (!up) {
    /* a down factor alone is a broken file, not something to skip */
    for (int i = 0; i < N_LORA_FORMS; i++)
      if ((down = find(c, down_sfx[i]))) return missing(c, down->name, up_sfx[i]);
    return 0;
  }
  if (!(down = find(c, down_sfx[form]))) return missing(c, up->name, down_sfx[form]);
  *found = 1;
  int64_t r2;
  int rc;
  if ((rc = read_matrix(c, up, &p->out, &p->rank, &p->up)) ||
      (rc = read_matrix(c, down, &r2, &p->in, &p->down)))
    return rc;
  if (r2 != p->rank) return rank_mismatch(c, up, down, "the rank");
  p->kind = LORA_K_LORA;
  return 0;
}

static int try_loha(ctx *c, lora_patch *p, int *found) {
  static const char *const names[4] = {".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"};
  const st_tensor *t[4];
  int any = -1;
  for (int i = 0; i < 4; i++)
    if ((t[i] = find(c, names[i])) && any < 0) any = i;
  if (any < 0) return 0;
  for (int i = 0; i < 4; i++)
    if (!t[i]) return missing(c, t[any]->name, names[i]);
  *found = 1;
  int64_t o2, r1b, i2, r2b;
  int rc;
  if ((rc = read_matrix(c, t[0], &p->out, &p->r1, &p->w1a)) ||
      (rc = read_matrix(c, t[1], &r1b, &p->in, &p->w1b)) ||
      (rc = read_matrix(c, t[2], &o2, &p->r2, &p->w2a)) ||
      (rc = read_matrix(c, t[3], &r2b, &i2, &p->w2b)))
    return rc;
  if (r1b != p->r1) return rank_mismatch(c, t[0], t[1], "the rank");
  if (r2b != p->r2) return rank_mismatch(c, t[2], t[3], "the rank");
  if (o2 != p->out) return rank_mismatch(c, t[0], t[2], "the output size");
  if (i2 != p->in) return rank_mismatch(c, t[1], t[3], "the input size");
  p->kind = LORA_K_LOHA;
  return 0;
}

/* One LoKr factor: full 'full' or the product of 'a' and 'b'. 'dim' gets the rank when
** factorised (b's rows), and is left alone otherwise. */
static int lokr_factor(ctx *c, const char *full_sfx, const char *a_sfx, const char *b_sfx,
                       int64_t *rows, int64_t *cols, float **out, int64_t *dim) {
  const st_tensor *full = find(c, full_sfx), *a = find(c, a_sfx), *b = find(c, b_sfx);
  if (full) {
    if (a || b)
      return luna_fail(c->err, LUNA_EFORMAT, "%s: tensor '%s' comes both whole and factorised ('%s')",
                       c->label, full->name, (a ? a : b)->name);
    return read_matrix(c, full, rows, cols, out);
  }
  if (!a && !b) return luna_fail(c->err, LUNA_EMISSING, "%s: LoKr target '%s': '%s%s' is missing",
                                 c->label, c->x, c->x, full_sfx);
  if (!a) return missing(c, b->name, a_sfx);
  if (!b) return missing(c, a->name, b_sfx);
  float *fa = NULL, *fb = NULL;
  int64_t m, r, r2, n;
  int rc;
  if (!(rc = read_matrix(c, a, &m, &r, &fa)) && !(rc = read_matrix(c, b, &r2, &n, &fb))) {
    if (r2 != r) rc = rank_mismatch(c, a, b, "the rank");
    else if (!(rc = matmul_new(c, a, fa, fb, m, r, n, out))) {
      *rows = m;
      *cols = n;
      *dim = r;
    }
  }
  free(fa);
  free(fb);
  return rc;
}

static int try_lokr(ctx *c, lora_patch *p, int *found, int64_t *dim) {
  static const char *const names[6] = {".lokr_w1", ".lokr_w1_a", ".lokr_w1_b",
                                       ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b"};
  int any = 0;
  for (int i = 0; i < 6; i++) any |= find(c, names[i]) != NULL;
  if (!any) return 0;
  *found = 1;
  int64_t dim1 = 0, dim2 = 0;
  int rc;
  if ((rc = lokr_factor(c, names[0], names[1], names[2], &p->k1_rows, &p->k1_cols, &p->k1, &dim1)) ||
      (rc = lokr_factor(c, names[3], names[4], names[5], &p->k2_rows, &p->k2_cols, &p->k2, &dim2)))
    return rc;
  *dim = dim2 ? dim2 : dim1;
  if (__builtin_mul_overflow(p->k1_rows, p->k2_rows, &p->out) ||
      __builtin_mul_overflow(p->k1_cols, p->k2_cols, &p->in) || p->out > MAX_SIDE || p->in > MAX_SIDE)
    return luna_fail(c->err, LUNA_ESHAPE, "%s: LoKr target '%s': the Kronecker product of [%lld, %lld] "
                     "and [%lld, %lld] is too large", c->label, c->x, (long long)p->k1_rows,
                     (long long)p->k1_cols, (long long)p->k2_rows, (long long)p->k2_cols);
  p->kind = LORA_K_LOKR;
  return 0;
}

static int try_diff(ctx *c, lora_patch *p, int *found) {
  const st_tensor *t = find(c, ".diff");
  if (!t) return 0;
  *found = 1;
  p->kind = LORA_K_DIFF;
  return read_matrix(c, t, &p->out, &p->in, &p->diff);
}

static int read_dora(ctx *c, lora_patch *p, const st_tensor *t) {
  int rc = check_dtype(c, t);
  if (rc) return rc;
  int on_out = t->n_dims == 2 && t->shape[0] == p->out;
  if (!(t->n_dims == 2 && (on_out ? t->shape[1] == 1 : t->shape[0] == 1 && t->shape[1] == p->in))) {
    char sh[128];
    fmt_shape(t, sh, sizeof sh);
    return luna_fail(c->err, LUNA_ESHAPE, "%s: tensor '%s' has shape %s; a DoRA scale for a "
                     "[%lld, %lld] weight must be [%lld, 1] or [1, %lld]", c->label, t->name, sh,
                     (long long)p->out, (long long)p->in, (long long)p->out, (long long)p->in);
  }
  int64_t r, k;
  if ((rc = read_matrix(c, t, &r, &k, &p->dora_scale))) return rc;
  p->dora_on_out = on_out;
  return 0;
}

static void patch_clear(lora_patch *p) {
  free(p->name);
  free(p->up);
  free(p->down);
  free(p->w1a);
  free(p->w1b);
  free(p->w2a);
  free(p->w2b);
  free(p->k1);
  free(p->k2);
  free(p->diff);
  free(p->dora_scale);
  memset(p, 0, sizeof *p);
}

static size_t patch_bytes(const lora_patch *p) {
  int64_t n = 0;
  switch (p->kind) {
  case LORA_K_LORA: n = p->rank * (p->out + p->in); break;
  case LORA_K_LOHA: n = p->r1 * (p->out + p->in) + p->r2 * (p->out + p->in); break;
  case LORA_K_LOKR: n = p->k1_rows * p->k1_cols + p->k2_rows * p->k2_cols; break;
  case LORA_K_DIFF: n = p->out * p->in; break;
  }
  if (p->dora_scale) n += p->dora_on_out ? p->out : p->in;
  return (size_t)n * sizeof(float);
}

/* Build the patch of target 'tg' (prefix in c->x). Returns 0 with *made set when a patch
** was made, 0 with *made = 0 when no adapter is there, or an error. */
static int build_patch(ctx *c, const target *tg, lora_patch *p, int *made) {
  int found = 0, rc = 0;
  int64_t lokr_dim = 0;
  *made = 0;
  memset(p, 0, sizeof *p);
  p->enc = tg->enc;
  p->layer = tg->layer;
  p->module = tg->mod;
  if (!(rc = try_lora(c, p, &found)) && !found && !(rc = try_loha(c, p, &found)) && !found &&
      !(rc = try_lokr(c, p, &found, &lokr_dim)) && !found)
    rc = try_diff(c, p, &found);
  if (rc || !found) goto done;

  p->scale = 1.0;
  if (p->kind != LORA_K_DIFF) {
    /* alpha and dora_scale mean nothing to a diff; left unconsumed, they are reported */
    const st_tensor *a = find(c, ".alpha"), *d = find(c, ".dora_scale");
    double alpha = 0;
    if (a && (rc = read_alpha(c, a, &alpha))) goto done;
    if (d && (rc = read_dora(c, p, d))) goto done;
    int64_t dim = p->kind == LORA_K_LORA ? p->rank : p->kind == LORA_K_LOHA ? p->r1 : lokr_dim;
    if (a && dim) p->scale = alpha / (double)dim;
  }
  if (!(p->name = strdup(c->x))) {
    rc = luna_fail(c->err, LUNA_ENOMEM, "%s: out of memory", c->label);
    goto done;
  }
  *made = 1;
done:
  if (rc || !*made) patch_clear(p);
  return rc;
}

static int cmp_target(const void *a, const void *b, void *arg) {
  const target *x = a, *y = b;
  const st_file *st = arg;
  size_t n = x->plen < y->plen ? x->plen : y->plen;
  int c = memcmp(st->tensors[x->ti].name, st->tensors[y->ti].name, n);
  if (c) return c;
  if (x->plen != y->plen) return x->plen < y->plen ? -1 : 1;
  return x->ti < y->ti ? -1 : x->ti > y->ti;
}

static int cmp_patch(const void *a, const void *b) {
  const lora_patch *x = a, *y = b;
  if (x->enc != y->enc) return x->enc < y->enc ? -1 : 1;
  if (x->layer != y->layer) return x->layer < y->layer ? -1 : 1;
  if (x->module != y->module) return x->module < y->module ? -1 : 1;
  return strcmp(x->name, y->name);
}

static int same_prefix(const st_file *st, const target *a, const target *b) {
  return a->plen == b->plen && !memcmp(st->tensors[a->ti].name, st->tensors[b->ti].name, a->plen);
}

/* The identity is hashed on a second thread while the factors are converted: a miss
** then costs about as much as reading the file. */
typedef struct id_job {
  const st_file *st;
  uint8_t id[LORA_ID_LEN];
} id_job;

static void *hash_thread(void *arg) {
  id_job *j = arg;
  lora_identity(j->st, j->id);
  return NULL;
}

static int build(const st_file *st, const char *label, lora_file **out, char *err) {
  *out = NULL;
  int rc = 0;
  id_job idj = {st, {0}};
  pthread_t hasher;
  int threaded = !pthread_create(&hasher, NULL, hash_thread, &idj);
  size_t n_tg = 0;
  lora_file *f = calloc(1, sizeof *f);
  target *tg = calloc(st->n_tensors ? st->n_tensors : 1, sizeof *tg);
  ctx c = {.st = st, .label = label, .err = err};
  c.used = calloc(st->n_tensors ? st->n_tensors : 1, 1);
  if (!f || !tg || !c.used || !(f->source = strdup(label))) {
    rc = luna_fail(err, LUNA_ENOMEM, "%s: out of memory", label);
    goto done;
  }
  /* pass 1: targets, and what luna refuses */
  for (size_t i = 0; i < st->n_tensors; i++) {
    const char *name = st->tensors[i].name;
    if (!lora_is_te_key(name)) continue;
    f->n_te_tensors++;
    size_t gl = generic_unpatchable(name);
    if (gl && recognised(name + gl)) {
      rc = luna_fail(err, LUNA_EFORMAT, "%s: tensor '%s' patches an embedding or a LayerNorm, "
                     "which luna does not apply", label, name);
      goto done;
    }
    target t = {.ti = i};
    if (!map_target(name, &t)) continue;
    const char *what = unsupported(name + t.plen);
    if (what) {
      rc = luna_fail(err, LUNA_EFORMAT, "%s: tensor '%s' is %s, which luna does not apply", label,
                     name, what);
      goto done;
    }
    tg[n_tg++] = t;
  }
  /* pass 2: one patch per distinct target prefix */
  qsort_r(tg, n_tg, sizeof *tg, cmp_target, (void *)st);
  size_t n_groups = 0;
  for (size_t i = 0; i < n_tg; i++) n_groups += i == 0 || !same_prefix(st, &tg[i - 1], &tg[i]);
  f->patches = calloc(n_groups ? n_groups : 1, sizeof(lora_patch));
  if (!f->patches) { rc = luna_fail(err, LUNA_ENOMEM, "%s: out of memory", label); goto done; }
  for (size_t i = 0; i < n_tg; i++) {
    if (i > 0 && same_prefix(st, &tg[i - 1], &tg[i])) continue;
    if (tg[i].plen >= sizeof c.x) continue; /* cannot happen: the prefixes are short */
    memcpy(c.x, st->tensors[tg[i].ti].name, tg[i].plen);
    c.x[tg[i].plen] = '\0';
    int made;
    size_t before = c.n_used;
    if ((rc = build_patch(&c, &tg[i], &f->patches[f->n_patches], &made))) goto done;
    if (made) f->patches[f->n_patches].n_tensors = (int)(c.n_used - before);
    if (made) f->bytes += patch_bytes(&f->patches[f->n_patches++]);
  }
  qsort(f->patches, (size_t)f->n_patches, sizeof(lora_patch), cmp_patch);
  /* pass 3: what nobody consumed */
  for (size_t i = 0; i < st->n_tensors; i++) {
    if (c.used[i] || !lora_is_te_key(st->tensors[i].name)) continue;
    if (f->n_unmapped < LORA_MAX_REPORT && !(f->unmapped[f->n_unmapped] = strdup(st->tensors[i].name))) {
      rc = luna_fail(err, LUNA_ENOMEM, "%s: out of memory", label);
      goto done;
    }
    f->n_unmapped++;
  }
done:
  if (threaded) pthread_join(hasher, NULL);
  else hash_thread(&idj);
  if (!rc) {
    memcpy(f->id, idj.id, LORA_ID_LEN);
    lora_id_hex(f->id, f->id_hex);
  }
  free(tg);
  free(c.used);
  if (rc) lora_file_free(f);
  else *out = f;
  return rc;
}

int lora_file_load(const char *path, lora_file **out, char *err) {
  *out = NULL;
  st_file *st;
  int rc = st_open(path, &st, err);
  if (rc) return rc;
  rc = build(st, path, out, err);
  st_close(st);
  return rc;
}

int lora_file_parse(const uint8_t *buf, size_t len, const char *label, lora_file **out, char *err) {
  *out = NULL;
  st_file *st;
  int rc = st_parse(buf, len, label, &st, err);
  if (rc) return rc;
  rc = build(st, label, out, err);
  st_close(st);
  return rc;
}

void lora_file_free(lora_file *f) {
  if (!f) return;
  for (int i = 0; i < f->n_patches; i++) patch_clear(&f->patches[i]);
  free(f->patches);
  for (int i = 0; i < LORA_MAX_REPORT; i++) free(f->unmapped[i]);
  free(f->source);
  free(f);
}
