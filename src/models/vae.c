/* vae.c -- AutoencoderKL: tensor names (LDM and diffusers), loading, the encoder and the decoder */
/* SPDX-License-Identifier: MIT */
#include "models/vae_impl.h"

#include "core/status.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/*
** Names. A tensor is written as the prefix, a "base" naming its module, and
** ".weight" / ".bias". The LDM layout and diffusers' differ in the bases only; the
** table below holds each layout's formats ("%d" is a level, then a block), so that the
** loader and vae_enumerate walk the same list. Diffusers numbers the decoder's levels
** the other way round: its up_blocks.0 is LDM's up.{n_levels-1}.
*/
typedef struct layout_names {
  const char *enc_levels;  /* what precedes an encoder level's index */
  const char *enc_block;   /* level -> what precedes a block's index */
  const char *enc_down;    /* level -> the downsampling conv */
  const char *dec_levels;
  const char *dec_block;
  const char *dec_up;
  const char *mid_block;   /* half ("encoder", "decoder"), index -> a mid ResBlock */
  int mid_first;           /* index of the first mid ResBlock: 1 (block_1) or 0 (resnets.0) */
  const char *mid_attn;    /* half -> the mid attention block */
  const char *norm_out;    /* half -> the last GroupNorm */
  const char *shortcut;    /* a ResBlock's 1x1 shortcut conv */
  int reversed;            /* decoder levels numbered from the top */
} layout_names;

static const layout_names ldm_names = {
    "encoder.down.",  "encoder.down.%d.block.",  "encoder.down.%d.downsample.conv",
    "decoder.up.",    "decoder.up.%d.block.",    "decoder.up.%d.upsample.conv",
    "%s.mid.block_%d", 1, "%s.mid.attn_1", "%s.norm_out", "nin_shortcut", 0,
};

static const layout_names diffusers_names = {
    "encoder.down_blocks.", "encoder.down_blocks.%d.resnets.", "encoder.down_blocks.%d.downsamplers.0.conv",
    "decoder.up_blocks.",   "decoder.up_blocks.%d.resnets.",   "decoder.up_blocks.%d.upsamplers.0.conv",
    "%s.mid_block.resnets.%d", 0, "%s.mid_block.attentions.0", "%s.conv_norm_out", "conv_shortcut", 1,
};

/* The attention block's modules: norm, q, k, v, output projection. */
enum { A_NORM, A_Q, A_K, A_V, A_OUT, A_N };
static const char *const attn_ldm[A_N] = {"norm", "q", "k", "v", "proj_out"};
static const char *const attn_diffusers[A_N] = {"group_norm", "to_q", "to_k", "to_v", "to_out.0"};
static const char *const attn_diffusers_old[A_N] = {"group_norm", "query", "key", "value", "proj_attn"};

/* Where a checkpoint keeps its VAE, in the order they are tried. */
static const char *const prefixes[] = {"first_stage_model.", "vae.", ""};

/* Tensors a VAE file may carry beyond the model (training leftovers), after the prefix. */
static const char *const ignored_starts[] = {"loss.", "model_ema."};

/* ---- the walk over every tensor ------------------------------------------------- */

/* One walk: enumerate (cb set) or load (f set). In load mode the destinations are
** filled; in enumerate mode they are NULL. */
typedef struct walker {
  const char *prefix;
  const layout_names *nm;
  const char *const *attn[2];  /* attention names of the encoder [0] and the decoder [1] */
  const vae_hparams *hp;
  int64_t width[VAE_MAX_LEVELS];
  vae_tensor_cb cb;            /* enumerate */
  void *ud;
  int lin_attn;                /* enumerate attention q/k/v/out as Linear [C, C] */
  const st_file *f;            /* load */
  int parts;                   /* load: VAE_PART_* to load; the others are only checked */
  int skip;                    /* load: the half being walked is only checked */
  uint8_t *claimed;
  vae *m;
  char *err;
  int rc;
} walker;

static void shape_str(char *out, size_t cap, int nd, const int64_t *shape) {
  size_t o = 0;
  out[0] = 0;
  for (int i = 0; i < nd && o + 24 < cap; i++)
    o += (size_t)snprintf(out + o, cap - o, "%s%lld", i ? ", " : "", (long long)shape[i]);
}

/* One tensor 'base'+'suffix' of shape 'shape'. 'lin_ok': a [C, C, 1, 1] weight may be
** stored as Linear [C, C] (diffusers' attention). */
static void tensor(walker *w, const char *base, const char *suffix, int nd, const int64_t *shape, int lin_ok,
                   float **dst) {
  if (w->rc) return;
  char name[512];
  snprintf(name, sizeof name, "%s%s%s", w->prefix, base, suffix);
  if (w->cb) {
    w->cb(w->ud, name, lin_ok && w->lin_attn ? 2 : nd, shape);
    return;
  }
  const st_file *f = w->f;
  const st_tensor *t = st_find(f, name);
  if (!t) {
    w->rc = luna_fail(w->err, LUNA_EMISSING, "%s: missing tensor '%s'", f->path, name);
    return;
  }
  w->claimed[t - f->tensors] = 1;
  if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16) {
    w->rc = luna_fail(w->err, LUNA_EDTYPE, "%s: tensor '%s' has dtype %s; only F32, F16 and BF16 are supported",
                      f->path, name, st_dtype_name(t->dtype));
    return;
  }
  int ok = t->n_dims == nd;
  for (int i = 0; ok && i < nd; i++) ok = t->shape[i] == shape[i];
  if (!ok && lin_ok && t->n_dims == 2 && t->shape[0] == shape[0] && t->shape[1] == shape[1]) ok = 1;
  if (!ok) {
    char got[160], want[160];
    shape_str(got, sizeof got, t->n_dims, t->shape);
    shape_str(want, sizeof want, nd, shape);
    w->rc = luna_fail(w->err, LUNA_ESHAPE, "%s: tensor '%s' has shape [%s], expected [%s]%s", f->path, name, got,
                      want, lin_ok ? " (or [C, C])" : "");
    return;
  }
  if (w->skip) return;
  int64_t n = st_numel(t);
  float *v = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
  if (!v || owned_add(&w->m->owned, v)) {
    free(v);
    w->rc = luna_fail(w->err, LUNA_ENOMEM, "out of memory loading '%s'", name);
    return;
  }
  if ((w->rc = st_read_f32(f, t, v, n, w->err))) return;
  st_release(f, t);
  w->m->weight_bytes += (size_t)n * sizeof(float);
  *dst = v;
}

static void w_conv(walker *w, const char *base, int64_t cout, int64_t cin, int k, int lin_ok, ops_conv *c) {
  int64_t ws[4] = {cout, cin, k, k}, bs[1] = {cout};
  float *wp = NULL, *bp = NULL;
  tensor(w, base, ".weight", 4, ws, lin_ok, &wp);
  tensor(w, base, ".bias", 1, bs, 0, &bp);
  if (c && !w->rc) *c = (ops_conv){cout, cin, k, k, wp, bp, NULL};
}

static void w_norm(walker *w, const char *base, int64_t ch, vae_gnorm *n) {
  int64_t s[1] = {ch};
  float *g = NULL, *b = NULL;
  tensor(w, base, ".weight", 1, s, 0, &g);
  tensor(w, base, ".bias", 1, s, 0, &b);
  if (n && !w->rc) *n = (vae_gnorm){ch, g, b};
}

static void w_res(walker *w, const char *base, int64_t cin, int64_t cout, vae_res *r) {
  char b[320];
  vae_res tmp;
  memset(&tmp, 0, sizeof tmp);
  tmp.cin = cin;
  tmp.cout = cout;
  tmp.has_sc = cin != cout;
  snprintf(b, sizeof b, "%s.norm1", base);
  w_norm(w, b, cin, &tmp.n1);
  snprintf(b, sizeof b, "%s.conv1", base);
  w_conv(w, b, cout, cin, 3, 0, &tmp.c1);
  snprintf(b, sizeof b, "%s.norm2", base);
  w_norm(w, b, cout, &tmp.n2);
  snprintf(b, sizeof b, "%s.conv2", base);
  w_conv(w, b, cout, cout, 3, 0, &tmp.c2);
  if (tmp.has_sc) {
    snprintf(b, sizeof b, "%s.%s", base, w->nm->shortcut);
    w_conv(w, b, cout, cin, 1, 0, &tmp.sc);
  }
  if (r && !w->rc) *r = tmp;
}

static void w_attn(walker *w, const char *base, const char *const *names, int64_t c, vae_attn *a) {
  char b[320];
  vae_attn tmp;
  memset(&tmp, 0, sizeof tmp);
  tmp.c = c;
  snprintf(b, sizeof b, "%s.%s", base, names[A_NORM]);
  w_norm(w, b, c, &tmp.n);
  ops_conv *dst[A_N] = {NULL, &tmp.q, &tmp.k, &tmp.v, &tmp.o};
  for (int i = A_Q; i < A_N; i++) {
    snprintf(b, sizeof b, "%s.%s", base, names[i]);
    w_conv(w, b, c, c, 1, w->nm == &diffusers_names, dst[i]);
  }
  if (a && !w->rc) *a = tmp;
}

/* A block's base name: 'fmt' formatted with the level, then the block index. */
static void block_base(char *out, size_t cap, const char *fmt, int level, int block) {
  char head[128];
  snprintf(head, sizeof head, fmt, level);
  snprintf(out, cap, "%s%d", head, block);
}

static void w_mid(walker *w, const char *half, int h, int64_t c, vae_res *b1, vae_attn *a, vae_res *b2) {
  char b[256];
  snprintf(b, sizeof b, w->nm->mid_block, half, w->nm->mid_first);
  w_res(w, b, c, c, b1);
  snprintf(b, sizeof b, w->nm->mid_attn, half);
  w_attn(w, b, w->attn[h], c, a);
  snprintf(b, sizeof b, w->nm->mid_block, half, w->nm->mid_first + 1);
  w_res(w, b, c, c, b2);
}

/* Every tensor of the VAE in 'w->hp', in a fixed order. */
static void walk(walker *w) {
  const vae_hparams *hp = w->hp;
  const layout_names *nm = w->nm;
  vae *m = w->m;
  int n = hp->n_levels, nrb = hp->num_res_blocks;
  int64_t top = w->width[n - 1], z = hp->z_channels, lat = hp->latent_channels;
  char b[256];
  if (hp->has_encoder) {
    vae_half *e = m ? &m->enc : NULL;
    w->skip = m && !(w->parts & VAE_PART_ENCODER);
    w_conv(w, "encoder.conv_in", hp->ch, 3, 3, 0, e ? &e->conv_in : NULL);
    int64_t cin = hp->ch;
    for (int i = 0; i < n; i++) {
      for (int j = 0; j < nrb; j++) {
        block_base(b, sizeof b, nm->enc_block, i, j);
        w_res(w, b, cin, w->width[i], e ? &e->blocks[i * nrb + j] : NULL);
        cin = w->width[i];
      }
      if (i < n - 1) {
        snprintf(b, sizeof b, nm->enc_down, i);
        w_conv(w, b, w->width[i], w->width[i], 3, 0, e ? &e->resample[i] : NULL);
      }
    }
    w_mid(w, "encoder", 0, top, e ? &e->mid1 : NULL, e ? &e->attn : NULL, e ? &e->mid2 : NULL);
    snprintf(b, sizeof b, nm->norm_out, "encoder");
    w_norm(w, b, top, e ? &e->norm_out : NULL);
    w_conv(w, "encoder.conv_out", 2 * z, top, 3, 0, e ? &e->conv_out : NULL);
    if (hp->has_quant) w_conv(w, "quant_conv", 2 * lat, 2 * z, 1, 0, m ? &m->quant : NULL);
  }
  if (hp->has_decoder) {
    vae_half *d = m ? &m->dec : NULL;
    w->skip = m && !(w->parts & VAE_PART_DECODER);
    if (hp->has_quant) w_conv(w, "post_quant_conv", z, lat, 1, 0, m ? &m->post_quant : NULL);
    w_conv(w, "decoder.conv_in", top, z, 3, 0, d ? &d->conv_in : NULL);
    w_mid(w, "decoder", 1, top, d ? &d->mid1 : NULL, d ? &d->attn : NULL, d ? &d->mid2 : NULL);
    int64_t cin = top;
    for (int i = n - 1; i >= 0; i--) {
      int idx = nm->reversed ? n - 1 - i : i;
      for (int j = 0; j < nrb + 1; j++) {
        block_base(b, sizeof b, nm->dec_block, idx, j);
        w_res(w, b, cin, w->width[i], d ? &d->blocks[i * (nrb + 1) + j] : NULL);
        cin = w->width[i];
      }
      if (i > 0) {
        snprintf(b, sizeof b, nm->dec_up, idx);
        w_conv(w, b, w->width[i], w->width[i], 3, 0, d ? &d->resample[i] : NULL);
      }
    }
    snprintf(b, sizeof b, nm->norm_out, "decoder");
    w_norm(w, b, w->width[0], d ? &d->norm_out : NULL);
    w_conv(w, "decoder.conv_out", 3, w->width[0], 3, 0, d ? &d->conv_out : NULL);
  }
}

void vae_enumerate(const char *prefix, vae_layout layout, const vae_hparams *hp, vae_tensor_cb cb, void *ud) {
  if (hp->n_levels < 1 || hp->n_levels > VAE_MAX_LEVELS || hp->num_res_blocks < 0) return;
  vae_hparams h = *hp;
  if (!h.has_encoder && !h.has_decoder) h.has_encoder = h.has_decoder = 1;
  int dif = layout == VAE_LAYOUT_DIFFUSERS;
  walker w = {.prefix = prefix ? prefix : "", .nm = dif ? &diffusers_names : &ldm_names, .hp = &h, .cb = cb,
              .ud = ud, .lin_attn = dif};
  w.attn[0] = w.attn[1] = dif ? attn_diffusers : attn_ldm;
  for (int i = 0; i < h.n_levels; i++) w.width[i] = (int64_t)h.ch * h.ch_mult[i];
  walk(&w);
}

/* ---- loading ---------------------------------------------------------------------- */

static int starts_with(const char *s, const char *p) { return strncmp(s, p, strlen(p)) == 0; }

/* Is any tensor named 'prefix'+'start'...? */
static int any_under(const st_file *f, const char *prefix, const char *start) {
  char s[256];
  snprintf(s, sizeof s, "%s%s", prefix, start);
  for (size_t i = 0; i < f->n_tensors; i++)
    if (starts_with(f->tensors[i].name, s)) return 1;
  return 0;
}

static int exists(const st_file *f, const char *prefix, const char *name) {
  char s[512];
  snprintf(s, sizeof s, "%s%s", prefix, name);
  return st_find(f, s) != NULL;
}

/* 1 + the largest index N among tensors named 'head'N'.'..., 0 when there are none. */
static int count_indices(const st_file *f, const char *head) {
  size_t hl = strlen(head);
  int best = 0;
  for (size_t i = 0; i < f->n_tensors; i++) {
    const char *s = f->tensors[i].name;
    if (strncmp(s, head, hl)) continue;
    s += hl;
    int v = 0, nd = 0;
    while (*s >= '0' && *s <= '9' && nd < 4) v = v * 10 + (*s++ - '0'), nd++;
    if (nd && *s == '.' && v + 1 > best) best = v + 1;
  }
  return best;
}

/* The tensor 'prefix'+'name', which must exist with 'nd' dimensions. */
static int need_tensor(const st_file *f, const char *prefix, const char *name, int nd, const st_tensor **out,
                       char *err) {
  char s[512];
  snprintf(s, sizeof s, "%s%s", prefix, name);
  const st_tensor *t = st_find(f, s);
  if (!t) return luna_fail(err, LUNA_EMISSING, "%s: missing tensor '%s'", f->path, s);
  if (t->n_dims != nd) {
    char got[160];
    shape_str(got, sizeof got, t->n_dims, t->shape);
    return luna_fail(err, LUNA_ESHAPE, "%s: tensor '%s' has shape [%s], expected %d dimensions", f->path, s, got,
                     nd);
  }
  *out = t;
  return 0;
}

static int check_unclaimed(const st_file *f, const char *prefix, const uint8_t *claimed, char *err) {
  size_t n_bad = 0, plen = strlen(prefix);
  char list[320] = "";
  for (size_t i = 0; i < f->n_tensors; i++) {
    const char *name = f->tensors[i].name;
    if (claimed[i] || strncmp(name, prefix, plen)) continue;
    int skip = 0;
    for (size_t k = 0; k < sizeof ignored_starts / sizeof *ignored_starts; k++)
      if (starts_with(name + plen, ignored_starts[k])) skip = 1;
    /* a bare file's other models: only the VAE's own modules are its tensors */
    if (!plen && !starts_with(name, "encoder.") && !starts_with(name, "decoder.") &&
        !starts_with(name, "quant_conv.") && !starts_with(name, "post_quant_conv."))
      skip = 1;
    if (skip) continue;
    if (n_bad < 3) {
      size_t o = strlen(list);
      snprintf(list + o, sizeof list - o, "%s'%s'", n_bad ? ", " : "", name);
    }
    n_bad++;
  }
  if (n_bad)
    return luna_fail(err, LUNA_EUNEXPECTED, "%s: %zu unexpected tensor%s in the VAE: %s%s", f->path, n_bad,
                     n_bad > 1 ? "s" : "", list, n_bad > 3 ? ", ..." : "");
  return 0;
}

/* Reads the dimensions of the VAE under 'P' from its tensors' shapes. */
static int detect(const st_file *f, const char *P, const layout_names *nm, vae_hparams *hp,
                  int64_t width[VAE_MAX_LEVELS], char *err) {
  char s[256], head[320], name[320];
  const st_tensor *t;
  int rc;
  memset(hp, 0, sizeof *hp);
  hp->has_encoder = any_under(f, P, "encoder.");
  hp->has_decoder = any_under(f, P, "decoder.");
  int n_enc = 0, n_dec = 0, b_enc = 0, b_dec = 0;
  if (hp->has_encoder) {
    snprintf(head, sizeof head, "%s%s", P, nm->enc_levels);
    n_enc = count_indices(f, head);
    snprintf(s, sizeof s, nm->enc_block, 0);
    snprintf(head, sizeof head, "%s%s", P, s);
    b_enc = count_indices(f, head);
  }
  if (hp->has_decoder) {
    snprintf(head, sizeof head, "%s%s", P, nm->dec_levels);
    n_dec = count_indices(f, head);
    snprintf(s, sizeof s, nm->dec_block, 0);
    snprintf(head, sizeof head, "%s%s", P, s);
    b_dec = count_indices(f, head);
  }
  int n = hp->has_encoder ? n_enc : n_dec;
  if (n == 0 || (hp->has_encoder ? b_enc : b_dec) == 0) {
    block_base(s, sizeof s, hp->has_encoder ? nm->enc_block : nm->dec_block, 0, 0);
    return luna_fail(err, LUNA_EMISSING, "%s: missing tensor '%s%s.conv1.weight' (no ResBlocks found)", f->path, P,
                     s);
  }
  if (n > VAE_MAX_LEVELS)
    return luna_fail(err, LUNA_EMODEL, "%s: the VAE has %d levels; at most %d are supported", f->path, n,
                     VAE_MAX_LEVELS);
  if (hp->has_encoder && hp->has_decoder && n_enc != n_dec)
    return luna_fail(err, LUNA_EMODEL, "%s: the encoder has %d levels but the decoder %d", f->path, n_enc, n_dec);
  if (hp->has_encoder && hp->has_decoder && b_dec != b_enc + 1)
    return luna_fail(err, LUNA_EMODEL, "%s: the encoder has %d ResBlocks per level, so the decoder needs %d, not %d",
                     f->path, b_enc, b_enc + 1, b_dec);
  if ((hp->has_encoder ? b_enc : b_dec - 1) > VAE_MAX_RES_BLOCKS)
    return luna_fail(err, LUNA_EMODEL, "%s: too many ResBlocks per level", f->path);
  hp->n_levels = n;
  hp->num_res_blocks = hp->has_encoder ? b_enc : b_dec - 1;

  /* widths: each level's first ResBlock makes them */
  for (int i = 0; i < n; i++) {
    int idx = hp->has_encoder || !nm->reversed ? i : n - 1 - i;
    block_base(s, sizeof s, hp->has_encoder ? nm->enc_block : nm->dec_block, idx, 0);
    snprintf(name, sizeof name, "%s.conv1.weight", s);
    if ((rc = need_tensor(f, P, name, 4, &t, err))) return rc;
    width[i] = t->shape[0];
  }
  if (hp->has_encoder) {
    if ((rc = need_tensor(f, P, "encoder.conv_in.weight", 4, &t, err))) return rc;
    if (t->shape[0] < 1 || t->shape[0] > (1 << 20))
      return luna_fail(err, LUNA_ESHAPE, "%s: tensor '%sencoder.conv_in.weight' has %lld output channels", f->path,
                       P, (long long)t->shape[0]);
    hp->ch = (int)t->shape[0];
  } else {
    hp->ch = (int)(width[0] > 0 && width[0] <= (1 << 20) ? width[0] : 1);
  }
  for (int i = 0; i < n; i++) {
    if (width[i] < 1 || width[i] > (1 << 20) || width[i] % VAE_GN_GROUPS || width[i] % hp->ch)
      return luna_fail(err, LUNA_EMODEL, "%s: level %d is %lld channels wide: a VAE's widths must be multiples of "
                       "%d (GroupNorm) and of conv_in's %d", f->path, i, (long long)width[i], VAE_GN_GROUPS, hp->ch);
    hp->ch_mult[i] = (int)(width[i] / hp->ch);
  }
  if (hp->ch % VAE_GN_GROUPS)
    return luna_fail(err, LUNA_EMODEL, "%s: conv_in gives %d channels, not a multiple of %d (GroupNorm)", f->path,
                     hp->ch, VAE_GN_GROUPS);

  /* latent widths */
  if (hp->has_encoder) {
    if ((rc = need_tensor(f, P, "encoder.conv_out.weight", 4, &t, err))) return rc;
    if (t->shape[0] < 2 || t->shape[0] % 2 || t->shape[0] > 4096)
      return luna_fail(err, LUNA_ESHAPE, "%s: tensor '%sencoder.conv_out.weight' gives %lld channels; expected "
                       "2 * z_channels (mean and log-variance)", f->path, P, (long long)t->shape[0]);
    hp->z_channels = (int)(t->shape[0] / 2);
  } else {
    if ((rc = need_tensor(f, P, "decoder.conv_in.weight", 4, &t, err))) return rc;
    if (t->shape[1] < 1 || t->shape[1] > 4096)
      return luna_fail(err, LUNA_ESHAPE, "%s: tensor '%sdecoder.conv_in.weight' takes %lld channels", f->path, P,
                       (long long)t->shape[1]);
    hp->z_channels = (int)t->shape[1];
  }
  int q_enc = hp->has_encoder && (exists(f, P, "quant_conv.weight") || exists(f, P, "quant_conv.bias"));
  int q_dec = hp->has_decoder && (exists(f, P, "post_quant_conv.weight") || exists(f, P, "post_quant_conv.bias"));
  hp->has_quant = q_enc || q_dec;
  hp->latent_channels = hp->z_channels;
  if (hp->has_quant) {
    if (hp->has_decoder && exists(f, P, "post_quant_conv.weight")) {
      if ((rc = need_tensor(f, P, "post_quant_conv.weight", 4, &t, err))) return rc;
      hp->latent_channels = (int)(t->shape[1] >= 1 && t->shape[1] <= 4096 ? t->shape[1] : 1);
    } else if (hp->has_encoder && exists(f, P, "quant_conv.weight")) {
      if ((rc = need_tensor(f, P, "quant_conv.weight", 4, &t, err))) return rc;
      hp->latent_channels = (int)(t->shape[0] >= 2 && t->shape[0] <= 8192 ? t->shape[0] / 2 : 1);
    }
  }
  return 0;
}

static void free_model(vae *m) {
  if (!m) return;
  owned_free(&m->owned);
  free(m->enc.blocks);
  free(m->dec.blocks);
  free(m);
}

int vae_load(const char *path, vae **out, char *err) { return vae_load_parts(path, VAE_PART_ALL, out, err); }

int vae_load_parts(const char *path, int parts, vae **out, char *err) {
  *out = NULL;
  if (!(parts & VAE_PART_ALL) || (parts & ~VAE_PART_ALL))
    return luna_fail(err, LUNA_EINVAL, "%s: loading VAE parts %#x: want encoder, decoder or both", path, parts);
  st_file *f;
  int rc = st_open(path, &f, err);
  if (rc) return rc;
  const char *P = NULL;
  for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes && !P; i++)
    if (any_under(f, prefixes[i], "encoder.") || any_under(f, prefixes[i], "decoder.")) P = prefixes[i];
  if (!P) {
    rc = luna_fail(err, LUNA_EMODEL, "%s: no VAE found: no tensor named 'encoder.*' or 'decoder.*' (bare, or under "
                   "'first_stage_model.' or 'vae.')", path);
    st_close(f);
    return rc;
  }
  int dif = any_under(f, P, "encoder.down_blocks.") || any_under(f, P, "decoder.up_blocks.") ||
            any_under(f, P, "encoder.mid_block.") || any_under(f, P, "decoder.mid_block.");
  vae *m = calloc(1, sizeof *m);
  uint8_t *claimed = calloc(f->n_tensors + 1, 1);
  walker w = {.prefix = P, .nm = dif ? &diffusers_names : &ldm_names, .f = f, .parts = parts, .claimed = claimed,
              .m = m, .err = err};
  if (!m || !claimed) {
    rc = luna_fail(err, LUNA_ENOMEM, "out of memory");
    goto done;
  }
  m->layout = dif ? VAE_LAYOUT_DIFFUSERS : VAE_LAYOUT_LDM;
  if ((rc = detect(f, P, w.nm, &m->hp, m->width, err))) goto done;
  const vae_hparams *hp = &m->hp;
  if (parts != VAE_PART_ALL &&
      (((parts & VAE_PART_ENCODER) && !hp->has_encoder) || ((parts & VAE_PART_DECODER) && !hp->has_decoder))) {
    rc = luna_fail(err, LUNA_EMODEL, "%s: the VAE has no %s (the file holds only its %s)", path,
                   hp->has_encoder ? "decoder" : "encoder", hp->has_encoder ? "encoder" : "decoder");
    goto done;
  }
  memcpy(w.width, m->width, sizeof w.width);
  w.hp = hp;
  for (int h = 0; h < 2; h++) {
    w.attn[h] = attn_ldm;
    if (dif) {
      char base[128], name[256];
      snprintf(base, sizeof base, w.nm->mid_attn, h ? "decoder" : "encoder");
      snprintf(name, sizeof name, "%s.%s.weight", base, attn_diffusers[A_Q]);
      int modern = exists(f, P, name);
      snprintf(name, sizeof name, "%s.%s.weight", base, attn_diffusers_old[A_Q]);
      w.attn[h] = !modern && exists(f, P, name) ? attn_diffusers_old : attn_diffusers;
    }
  }
  m->scale = 1 << (hp->n_levels - 1);
  int n = hp->n_levels, nrb = hp->num_res_blocks;
  if (hp->has_encoder && !(m->enc.blocks = calloc((size_t)(n * nrb + 1), sizeof(vae_res)))) {
    rc = luna_fail(err, LUNA_ENOMEM, "out of memory");
    goto done;
  }
  if (hp->has_decoder && !(m->dec.blocks = calloc((size_t)(n * (nrb + 1)), sizeof(vae_res)))) {
    rc = luna_fail(err, LUNA_ENOMEM, "out of memory");
    goto done;
  }
  walk(&w);
  if ((rc = w.rc)) goto done;
  rc = check_unclaimed(f, P, claimed, err);
  if (!(parts & VAE_PART_ENCODER)) m->hp.has_encoder = 0;
  if (!(parts & VAE_PART_DECODER)) m->hp.has_decoder = 0;
done:
  free(claimed);
  st_close(f);
  if (rc) free_model(m);
  else *out = m;
  return rc;
}

void vae_free(vae *m) { free_model(m); }
const vae_hparams *vae_get_hparams(const vae *m) { return &m->hp; }
size_t vae_weight_bytes(const vae *m) { return m->weight_bytes; }
int vae_scale(const vae *m) { return m->scale; }
vae_layout vae_get_layout(const vae *m) { return m->layout; }

/* ---- the forward pass ----------------------------------------------------------------- */

static float *at(vae_run *r, int b, size_t off, size_t n) {
  if (r->plan) {
    if (off + n > r->need[b]) r->need[b] = off + n;
    return NULL;
  }
  return r->buf[b] + off;
}

static void want_scratch(vae_run *r, size_t n) {
  if (n > r->scratch) r->scratch = n;
}

/* Buffer roles: a block's input and output live in buffer 0 or 1, its intermediate map in
** the other one, and buffer VAE_BUF_BAND holds row bands (and attention's normalized
** map): so the plan sizes two full maps and a band, not three maps. */
static int other(int a) { return a == 0 ? 1 : 0; }

/* Between blocks: report progress, and stop when the callback says so. */
static int tick(vae_run *r) {
  if (r->rc) return 1;
  if (!r->plan && r->progress) {
    int s = r->progress(r->ud, r->done, r->total);
    if (s) {
      r->rc = s;
      luna_fail(r->err, s, "VAE %s stopped: %s", r->what, luna_strerror(s));
    }
  }
  return r->rc != 0;
}

static void conv(vae_run *r, const ops_conv *c, int sb, size_t so, int64_t H, int64_t W, int stride, int pad_tl,
                 int pad_br, int db, size_t dof, int64_t *Ho, int64_t *Wo) {
  int64_t ho = (H + pad_tl + pad_br - c->kh) / stride + 1, wo = (W + pad_tl + pad_br - c->kw) / stride + 1;
  const float *x = at(r, sb, so, (size_t)(c->cin * H * W));
  float *y = at(r, db, dof, (size_t)(c->cout * ho * wo));
  want_scratch(r, ops_conv2d_scratch(c, W));
  if (!r->plan) ops_conv2d(r->pool, x, H, W, c, stride, pad_tl, pad_tl, pad_br, pad_br, y);
  r->done += 2.0 * (double)(c->cout * c->cin * c->kh * c->kw) * (double)(ho * wo);
  if (Ho) *Ho = ho;
  if (Wo) *Wo = wo;
}

/* y = GroupNorm(x), then SiLU when 'silu'; 'sb' may equal 'db'. */
static void norm(vae_run *r, const vae_gnorm *n, int sb, int db, int64_t HW, int silu) {
  const float *x = at(r, sb, 0, (size_t)(n->c * HW));
  float *y = at(r, db, 0, (size_t)(n->c * HW));
  if (r->plan) return;
  ops_group_norm(r->pool, x, n->c, HW, VAE_GN_GROUPS, n->g, n->b, VAE_GN_EPS, y);
  if (silu) ops_silu(r->pool, y, n->c * HW);
}

static void add(vae_run *r, int xb, int yb, size_t n) {
  float *x = at(r, xb, 0, n), *y = at(r, yb, 0, n);
  if (!r->plan) ops_add(r->pool, x, y, (int64_t)n);
}

/* Rows per band when 'per_row' floats of band buffer go with each row: a band holds its
** output rows and, for a 3x3 kernel, two more input rows. Even, so that Winograd's 2x2
** tiles never straddle bands needlessly. */
static int64_t band_rows(const vae_run *r, int64_t per_row, int64_t H) {
  int64_t R = (int64_t)(r->band_floats ? r->band_floats : VAE_BAND_FLOATS) / per_row - 2;
  R &= ~(int64_t)1;
  if (R < 2) R = 2;
  return R < H ? R : H;
}

typedef struct out_job {
  const float *out; /* [cout, n, W]: a band's output */
  float *y;         /* [cout, H, W] */
  int64_t H, W, y0, n;
  int acc;
} out_job;

static void band_store_task(void *arg, int c, int worker, float *scratch) {
  (void)worker, (void)scratch;
  const out_job *j = arg;
  int64_t n = j->n * j->W;
  float *dst = j->y + ((int64_t)c * j->H + j->y0) * j->W;
  const float *src = j->out + (int64_t)c * n;
  if (j->acc)
    for (int64_t i = 0; i < n; i++) dst[i] += src[i];
  else
    memcpy(dst, src, (size_t)n * sizeof(float));
}

/*
** y = conv(silu(GroupNorm(x))) with a 3x3 stride-1 pad-1 conv (y += that when 'acc'),
** without a normalized copy of x: each band of output rows normalizes the input rows
** it reads (one more above and below) into the band buffer from statistics taken over
** the whole map first, convolves them there and stores (or adds) its rows. Every output
** is the same dot product over the same values as with the whole map normalized; only
** the residual's addition moves into the store.
*/
static void norm_conv(vae_run *r, const vae_gnorm *n, const ops_conv *c, int xb, int64_t H, int64_t W, int yb,
                      int acc) {
  int64_t C = c->cin, co = c->cout, HW = H * W;
  int64_t R = band_rows(r, (C + co) * W, H);
  const float *x = at(r, xb, 0, (size_t)(C * HW));
  float *y = at(r, yb, 0, (size_t)(co * HW));
  int64_t in_rows = R + 2 < H ? R + 2 : H;
  float *band = at(r, VAE_BUF_BAND, 0, (size_t)((C * in_rows + co * R) * W));
  want_scratch(r, ops_conv2d_scratch(c, W));
  r->done += 2.0 * (double)(co * C * c->kh * c->kw) * (double)HW;
  if (r->plan) return;
  ops_gn_stat st[VAE_GN_GROUPS];
  ops_group_norm_stats(r->pool, x, C, HW, VAE_GN_GROUPS, VAE_GN_EPS, st);
  float *out = band + C * in_rows * W;
  ops_conv cw = *c; /* the Winograd weights once for all bands */
  float *u = R < H ? ops_conv_winograd_weights(r->pool, c) : NULL;
  cw.wino = u;
  for (int64_t y0 = 0; y0 < H; y0 += R) {
    int64_t y1 = y0 + R < H ? y0 + R : H, a = y0 > 0 ? y0 - 1 : 0, b = y1 < H ? y1 + 1 : H;
    ops_group_norm_rows(r->pool, x, C, H, W, VAE_GN_GROUPS, st, n->g, n->b, a, b, 1, band);
    ops_conv2d(r->pool, band, b - a, W, &cw, 1, y0 == 0, 1, y1 == H, 1, out);
    out_job j = {out, y, H, W, y0, y1 - y0, acc};
    ops_pool_run(r->pool, (int)co, band_store_task, &j);
  }
  free(u);
}

/* The 1x1 shortcut over buffer 'xb' in place (the buffer grows to the wider side). */
static void shortcut(vae_run *r, const ops_conv *c, int xb, int64_t HW) {
  int64_t wide = c->cin > c->cout ? c->cin : c->cout;
  float *x = at(r, xb, 0, (size_t)(wide * HW));
  want_scratch(r, ops_conv1x1_inplace_scratch(c));
  r->done += 2.0 * (double)(c->cout * c->cin) * (double)HW;
  if (!r->plan) ops_conv1x1_inplace(r->pool, x, HW, c);
}

/*
** ResnetBlock: x + conv2(silu(norm2(conv1(silu(norm1(x)))))), the residual through the
** 1x1 shortcut when the width changes. 'x' (buffer 0 or 1) holds the input and gets the
** output; the other one holds conv1's output. Once conv1 has read x, the shortcut
** replaces x in place, and conv2 adds onto it band by band: the block needs its input,
** one map of its width and a band.
*/
static void resblock(vae_run *r, const vae_res *b, int x, int64_t H, int64_t W) {
  int u = other(x);
  norm_conv(r, &b->n1, &b->c1, x, H, W, u, 0);
  if (b->has_sc) shortcut(r, &b->sc, x, H * W);
  norm_conv(r, &b->n2, &b->c2, u, H, W, x, 1);
}

/* AttnBlock: x + proj_out(softmax(q^T k / sqrt(C)) v) over the H*W positions, one head. */
static void attention(vae_run *r, const vae_attn *a, int x, int64_t H, int64_t W) {
  int64_t C = a->c, N = H * W;
  size_t cn = (size_t)(C * N);
  int t = VAE_BUF_BAND, u = other(x);
  norm(r, &a->n, x, t, N, 0);
  conv(r, &a->q, t, 0, H, W, 1, 0, 0, u, 0, NULL, NULL);
  conv(r, &a->k, t, 0, H, W, 1, 0, 0, u, cn, NULL, NULL);
  conv(r, &a->v, t, 0, H, W, 1, 0, 0, u, 2 * cn, NULL, NULL);
  const float *q = at(r, u, 0, cn), *k = at(r, u, cn, cn), *v = at(r, u, 2 * cn, cn);
  float *o = at(r, t, 0, cn);
  want_scratch(r, ops_attention_single_scratch(N));
  if (!r->plan) ops_attention_single(r->pool, q, k, v, C, N, (float)(1.0 / sqrt((double)C)), o);
  r->done += 4.0 * (double)C * (double)N * (double)N;
  conv(r, &a->o, t, 0, H, W, 1, 0, 0, u, 0, NULL, NULL);
  add(r, x, u, cn);
}

/*
** Upsample: nearest 2x, then a 3x3 conv. The upsampled map would be the largest of the
** decoder (4x the input's cells at the input's width), so it is built band by band:
** each band of output rows upsamples the input rows it reads (one more above and below)
** into a scratch buffer, convolves them and copies the rows out. Every output is the
** same dot product over the same values as with the whole map.
*/
typedef struct band_job {
  const float *x;    /* [C, H, W] */
  float *up;         /* [C, rows, 2W]: upsampled rows a .. a+rows-1 */
  const float *out;  /* [cout, n, 2W]: the band's conv output */
  float *y;          /* [cout, 2H, 2W] */
  int64_t H, W, a, rows, y0, n;
} band_job;

static void band_up_task(void *arg, int c, int worker, float *scratch) {
  (void)worker, (void)scratch;
  const band_job *j = arg;
  int64_t W2 = 2 * j->W;
  for (int64_t i = 0; i < j->rows; i++) {
    const float *src = j->x + ((int64_t)c * j->H + (j->a + i) / 2) * j->W;
    float *dst = j->up + ((int64_t)c * j->rows + i) * W2;
    for (int64_t x = 0; x < j->W; x++) dst[2 * x] = dst[2 * x + 1] = src[x];
  }
}

static void band_out_task(void *arg, int c, int worker, float *scratch) {
  (void)worker, (void)scratch;
  const band_job *j = arg;
  int64_t W2 = 2 * j->W;
  memcpy(j->y + ((int64_t)c * 2 * j->H + j->y0) * W2, j->out + (int64_t)c * j->n * W2,
         (size_t)(j->n * W2) * sizeof(float));
}

static void upsample_conv(vae_run *r, const ops_conv *c, int xb, int64_t H, int64_t W, int yb, int tb) {
  int64_t C = c->cin, co = c->cout, H2 = 2 * H, W2 = 2 * W;
  int64_t R = band_rows(r, (C + co) * W2, H2);
  if (R >= H2) { /* one band: the whole map */
    const float *x = at(r, xb, 0, (size_t)(C * H * W));
    float *u = at(r, tb, 0, (size_t)(C * H2 * W2));
    if (!r->plan) ops_upsample2x(r->pool, x, C, H, W, u);
    conv(r, c, tb, 0, H2, W2, 1, 1, 1, yb, 0, NULL, NULL);
    return;
  }
  const float *x = at(r, xb, 0, (size_t)(C * H * W));
  float *y = at(r, yb, 0, (size_t)(co * H2 * W2));
  float *band = at(r, tb, 0, (size_t)((C * (R + 2) + co * R) * W2));
  want_scratch(r, ops_conv2d_scratch(c, W2));
  r->done += 2.0 * (double)(co * C * c->kh * c->kw) * (double)(H2 * W2);
  if (r->plan) return;
  ops_conv cw = *c;
  float *u = ops_conv_winograd_weights(r->pool, c);
  cw.wino = u;
  for (int64_t y0 = 0; y0 < H2; y0 += R) {
    int64_t y1 = y0 + R < H2 ? y0 + R : H2, a = y0 > 0 ? y0 - 1 : 0, b = y1 < H2 ? y1 + 1 : H2;
    band_job j = {x, band, band + C * (R + 2) * W2, y, H, W, a, b - a, y0, y1 - y0};
    ops_pool_run(r->pool, (int)C, band_up_task, &j);
    ops_conv2d(r->pool, band, b - a, W2, &cw, 1, y0 == 0, 1, y1 == H2, 1, band + C * (R + 2) * W2);
    ops_pool_run(r->pool, (int)co, band_out_task, &j);
  }
  free(u);
}

static void mid(vae_run *r, const vae_half *h, int x, int64_t H, int64_t W) {
  resblock(r, &h->mid1, x, H, W);
  if (tick(r)) return;
  attention(r, &h->attn, x, H, W);
  if (tick(r)) return;
  resblock(r, &h->mid2, x, H, W);
  tick(r);
}

int vae_run_decoder(vae_run *r, int in, int64_t h, int64_t w, int64_t *oh, int64_t *ow) {
  const vae *m = r->m;
  const vae_half *d = &m->dec;
  const vae_hparams *hp = &m->hp;
  int n = hp->n_levels, nb = hp->num_res_blocks + 1, cur = in;
  int64_t H = h, W = w;
  if (hp->has_quant) {
    int dst = other(cur);
    conv(r, &m->post_quant, cur, 0, H, W, 1, 0, 0, dst, 0, NULL, NULL);
    cur = dst;
  }
  int dst = other(cur);
  conv(r, &d->conv_in, cur, 0, H, W, 1, 1, 1, dst, 0, NULL, NULL);
  cur = dst;
  if (tick(r)) return -1;
  mid(r, d, cur, H, W);
  if (r->rc) return -1;
  for (int i = n - 1; i >= 0; i--) {
    for (int j = 0; j < nb; j++) {
      resblock(r, &d->blocks[i * nb + j], cur, H, W);
      if (tick(r)) return -1;
    }
    if (i > 0) {
      int t = other(cur);
      upsample_conv(r, &d->resample[i], cur, H, W, t, VAE_BUF_BAND);
      cur = t;
      H *= 2;
      W *= 2;
      if (tick(r)) return -1;
    }
  }
  int o = other(cur);
  norm_conv(r, &d->norm_out, &d->conv_out, cur, H, W, o, 0);
  if (tick(r)) return -1;
  *oh = H;
  *ow = W;
  return o;
}

int vae_run_encoder(vae_run *r, int in, int64_t h, int64_t w, int64_t *oh, int64_t *ow) {
  const vae *m = r->m;
  const vae_half *e = &m->enc;
  const vae_hparams *hp = &m->hp;
  int n = hp->n_levels, nb = hp->num_res_blocks;
  int64_t H = h, W = w;
  int cur = other(in);
  conv(r, &e->conv_in, in, 0, H, W, 1, 1, 1, cur, 0, NULL, NULL);
  if (tick(r)) return -1;
  for (int i = 0; i < n; i++) {
    for (int j = 0; j < nb; j++) {
      resblock(r, &e->blocks[i * nb + j], cur, H, W);
      if (tick(r)) return -1;
    }
    if (i < n - 1) {
      /* pad right and bottom by one, then a 3x3 stride-2 conv */
      int t = other(cur);
      conv(r, &e->resample[i], cur, 0, H, W, 2, 0, 1, t, 0, &H, &W);
      cur = t;
      if (tick(r)) return -1;
    }
  }
  mid(r, e, cur, H, W);
  if (r->rc) return -1;
  int o = other(cur);
  norm_conv(r, &e->norm_out, &e->conv_out, cur, H, W, o, 0);
  cur = o;
  if (hp->has_quant) {
    o = other(cur);
    conv(r, &m->quant, cur, 0, H, W, 1, 0, 0, o, 0, NULL, NULL);
    cur = o;
  }
  if (tick(r)) return -1;
  *oh = H;
  *ow = W;
  return cur;
}

/* ---- the API: checks, buffers, untiled runs ----------------------------------------- */

void vae_run_init(vae_run *r, const vae *m, ops_pool *pool, int plan, const char *what) {
  memset(r, 0, sizeof *r);
  r->m = m;
  r->pool = pool;
  r->plan = plan;
  r->what = what;
}

size_t vae_run_bytes(const vae_run *r, int with_in) {
  size_t n = r->need[0] + r->need[1] + r->need[2] + (with_in ? r->need[VAE_BUF_IN] : 0);
  return n * sizeof(float);
}

static size_t phys_bytes(void) {
  long pages = sysconf(_SC_PHYS_PAGES), pg = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || pg <= 0) return (size_t)1 << 40;
  return (size_t)pages * (size_t)pg;
}

int vae_run_alloc(vae_run *r, const vae_run *plan, int with_in, size_t extra_bytes, char *err) {
  size_t bytes = vae_run_bytes(plan, with_in) + extra_bytes, phys = phys_bytes();
  if (bytes > phys / 10 * 9)
    return luna_fail(err, LUNA_ENOMEM, "this VAE %s needs %.2f GiB of activations, more than this machine has "
                     "(%.2f GiB): use tiling", r->what, (double)bytes / 1073741824.0, (double)phys / 1073741824.0);
  for (int b = 0; b < VAE_N_BUF; b++) {
    if (b == VAE_BUF_IN && !with_in) continue;
    r->need[b] = plan->need[b];
    r->buf[b] = malloc((plan->need[b] ? plan->need[b] : 1) * sizeof(float));
    if (!r->buf[b])
      return luna_fail(err, LUNA_ENOMEM, "out of memory for %.2f GiB of VAE activations",
                       (double)bytes / 1073741824.0);
  }
  r->total = plan->done;
  if (ops_pool_reserve(r->pool, plan->scratch))
    return luna_fail(err, LUNA_ENOMEM, "out of memory for %zu floats of scratch per worker", plan->scratch);
  return 0;
}

void vae_run_free(vae_run *r, int with_in) {
  for (int b = 0; b < VAE_N_BUF; b++)
    if (b != VAE_BUF_IN || with_in) free(r->buf[b]);
}

int vae_check_finite(const char *what, const float *x, int64_t d0, int64_t d1, int64_t d2, int64_t d3,
                     const char *dims, char *err) {
  int64_t n = d0 * d1 * d2 * d3;
  for (int64_t i = 0; i < n; i++)
    if (!isfinite(x[i])) {
      int64_t a = i / (d1 * d2 * d3), b = i / (d2 * d3) % d1, c = i / d3 % d2, d = i % d3;
      return luna_fail(err, LUNA_EINVAL, "tensor \"%s\" %s has a non-finite value (%g) at [%lld, %lld, %lld, %lld]",
                       what, dims, (double)x[i], (long long)a, (long long)b, (long long)c, (long long)d);
    }
  return 0;
}

int vae_check_decode(const vae *m, ops_pool *pool, const float *latent, int B, int64_t h, int64_t w,
                     const float *image, char *err) {
  if (!m || !pool || !latent || !image) return luna_fail(err, LUNA_EINVAL, "vae_decode: NULL argument");
  if (!m->hp.has_decoder)
    return luna_fail(err, LUNA_EMODEL, "this VAE has no decoder (its file holds only an encoder, or it was loaded without one): it cannot decode");
  if (B < 1) return luna_fail(err, LUNA_EINVAL, "vae_decode: a batch of %d latents", B);
  int64_t max = VAE_MAX_SIDE / m->scale;
  if (h < 1 || w < 1 || h > max || w > max)
    return luna_fail(err, LUNA_EINVAL, "a latent of %lld x %lld cells: each side must be in [1, %lld] (%d pixels)",
                     (long long)h, (long long)w, (long long)max, VAE_MAX_SIDE);
  return vae_check_finite("latent", latent, B, m->hp.latent_channels, h, w, "[B, C, h, w]", err);
}

int vae_check_encode(const vae *m, ops_pool *pool, const float *pixels, int B, int64_t H, int64_t W,
                     const float *latent, char *err) {
  if (!m || !pool || !pixels || !latent) return luna_fail(err, LUNA_EINVAL, "vae_encode: NULL argument");
  if (!m->hp.has_encoder)
    return luna_fail(err, LUNA_EMODEL, "this VAE has no encoder (its file holds only a decoder, or it was loaded without one): it cannot encode");
  if (B < 1) return luna_fail(err, LUNA_EINVAL, "vae_encode: a batch of %d images", B);
  if (H < m->scale || W < m->scale || H > VAE_MAX_SIDE || W > VAE_MAX_SIDE)
    return luna_fail(err, LUNA_EINVAL, "an image of %lld x %lld pixels: each side must be in [%d, %d]", (long long)H,
                     (long long)W, m->scale, VAE_MAX_SIDE);
  return vae_check_finite("image", pixels, B, H, W, 3, "[B, H, W, 3]", err);
}

/* Image 'b' of 'pixels' [B, H, W, 3]: ComfyUI's centered crop to Hc x Wc, then x * 2 - 1,
** written planar [3, Hc, Wc]. */
void vae_prepare_pixels(const vae *m, const float *pixels, int64_t H, int64_t W, float *dst) {
  int s = m->scale;
  int64_t Hc = H / s * s, Wc = W / s * s, oy = (H % s) / 2, ox = (W % s) / 2;
  for (int64_t y = 0; y < Hc; y++) {
    const float *row = pixels + ((oy + y) * W + ox) * 3;
    for (int64_t x = 0; x < Wc; x++)
      for (int c = 0; c < 3; c++) dst[(c * Hc + y) * Wc + x] = row[x * 3 + c] * 2.0f - 1.0f;
  }
}

/* The decoder's planar [3, H, W] output as ComfyUI's image: clamp((x + 1) / 2, 0, 1), [H, W, 3]. */
static void write_image(const float *x, int64_t H, int64_t W, float *img) {
  for (int64_t y = 0; y < H; y++)
    for (int64_t xx = 0; xx < W; xx++)
      for (int c = 0; c < 3; c++) {
        float v = (x[(c * H + y) * W + xx] + 1.0f) / 2.0f;
        v = v < 0.0f ? 0.0f : v > 1.0f ? 1.0f : v; /* NaN passes through, as in torch.clamp */
        img[(y * W + xx) * 3 + c] = v;
      }
}

int vae_decode(const vae *m, ops_pool *pool, const float *latent, int B, int64_t h, int64_t w,
               const vae_tiling *tiling, float *image, vae_progress_fn progress, void *ud, char *err) {
  int rc = vae_check_decode(m, pool, latent, B, h, w, image, err);
  if (rc) return rc;
  if (tiling) return vae_decode_tiled(m, pool, latent, B, h, w, tiling, image, progress, ud, err);
  vae_run p, r;
  int64_t oh = 0, ow = 0, C = m->hp.latent_channels;
  vae_run_init(&p, m, pool, 1, "decode");
  vae_run_decoder(&p, VAE_BUF_IN, h, w, &oh, &ow);
  p.done *= B;
  vae_run_init(&r, m, pool, 0, "decode");
  r.progress = progress;
  r.ud = ud;
  r.err = err;
  if (!(rc = vae_run_alloc(&r, &p, 0, 0, err))) {
    for (int b = 0; b < B && !rc; b++) {
      r.buf[VAE_BUF_IN] = (float *)(latent + (size_t)b * (size_t)(C * h * w));
      int o = vae_run_decoder(&r, VAE_BUF_IN, h, w, &oh, &ow);
      if ((rc = r.rc)) break;
      write_image(r.buf[o], oh, ow, image + (size_t)b * (size_t)(oh * ow * 3));
    }
  }
  vae_run_free(&r, 0);
  return rc;
}

int vae_encode(const vae *m, ops_pool *pool, const float *pixels, int B, int64_t H, int64_t W,
               const vae_tiling *tiling, float *latent, vae_progress_fn progress, void *ud, char *err) {
  int rc = vae_check_encode(m, pool, pixels, B, H, W, latent, err);
  if (rc) return rc;
  if (tiling) return vae_encode_tiled(m, pool, pixels, B, H, W, tiling, latent, progress, ud, err);
  int s = m->scale;
  int64_t Hc = H / s * s, Wc = W / s * s, oh = 0, ow = 0, L = m->hp.latent_channels;
  vae_run p, r;
  vae_run_init(&p, m, pool, 1, "encode");
  at(&p, VAE_BUF_IN, 0, (size_t)(3 * Hc * Wc));
  vae_run_encoder(&p, VAE_BUF_IN, Hc, Wc, &oh, &ow);
  p.done *= B;
  vae_run_init(&r, m, pool, 0, "encode");
  r.progress = progress;
  r.ud = ud;
  r.err = err;
  if (!(rc = vae_run_alloc(&r, &p, 1, 0, err))) {
    for (int b = 0; b < B && !rc; b++) {
      vae_prepare_pixels(m, pixels + (size_t)b * (size_t)(H * W * 3), H, W, r.buf[VAE_BUF_IN]);
      int o = vae_run_encoder(&r, VAE_BUF_IN, Hc, Wc, &oh, &ow);
      if ((rc = r.rc)) break;
      memcpy(latent + (size_t)b * (size_t)(L * oh * ow), r.buf[o], (size_t)(L * oh * ow) * sizeof(float));
    }
  }
  vae_run_free(&r, 1);
  return rc;
}

/* ---- estimates ------------------------------------------------------------------------ */

size_t vae_decode_bytes(const vae *m, int64_t h, int64_t w) {
  if (!m->hp.has_decoder || h < 1 || w < 1) return 0;
  vae_run p;
  int64_t oh, ow;
  vae_run_init(&p, m, NULL, 1, "decode");
  vae_run_decoder(&p, VAE_BUF_IN, h, w, &oh, &ow);
  return vae_run_bytes(&p, 0);
}

size_t vae_encode_bytes(const vae *m, int64_t H, int64_t W) {
  int s = m->scale;
  if (!m->hp.has_encoder || H < s || W < s) return 0;
  vae_run p;
  int64_t oh, ow, Hc = H / s * s, Wc = W / s * s;
  vae_run_init(&p, m, NULL, 1, "encode");
  at(&p, VAE_BUF_IN, 0, (size_t)(3 * Hc * Wc));
  vae_run_encoder(&p, VAE_BUF_IN, Hc, Wc, &oh, &ow);
  return vae_run_bytes(&p, 1);
}

size_t vae_scratch(const vae *m, int64_t H, int64_t W) {
  int s = m->scale;
  size_t best = 0;
  int64_t oh, ow;
  vae_run p;
  if (m->hp.has_decoder && H >= 1 && W >= 1) {
    vae_run_init(&p, m, NULL, 1, "decode");
    vae_run_decoder(&p, VAE_BUF_IN, H / s > 0 ? H / s : 1, W / s > 0 ? W / s : 1, &oh, &ow);
    best = p.scratch;
  }
  if (m->hp.has_encoder && H >= s && W >= s) {
    vae_run_init(&p, m, NULL, 1, "encode");
    vae_run_encoder(&p, VAE_BUF_IN, H / s * s, W / s * s, &oh, &ow);
    if (p.scratch > best) best = p.scratch;
  }
  return best;
}
