/* test-vae.c -- the VAE: loading (LDM, diffusers, prefixes), errors, a naive reference forward, tiling */
/* SPDX-License-Identifier: MIT */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/fp16.h"
#include "core/status.h"
#include "models/vae_impl.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- random tiny VAEs ------------------------------------------------------------ */

static uint64_t rng;
static double urand(void) { /* [-1, 1) */
  rng = rng * 6364136223846793005ull + 1442695040888963407ull;
  return (double)(rng >> 11) / (double)(1ull << 53) * 2.0 - 1.0;
}

typedef struct cfg {
  int ch, n, mult[4], nrb, z, lat, quant, enc, dec;
} cfg;

static vae_hparams hp_of(const cfg *c) {
  vae_hparams h;
  memset(&h, 0, sizeof h);
  h.ch = c->ch;
  h.n_levels = c->n;
  for (int i = 0; i < c->n; i++) h.ch_mult[i] = c->mult[i];
  h.num_res_blocks = c->nrb;
  h.z_channels = c->z;
  h.latent_channels = c->lat;
  h.has_quant = c->quant;
  h.has_encoder = c->enc;
  h.has_decoder = c->dec;
  return h;
}

typedef struct wt {
  char name[200];
  int nd;
  int64_t shape[4];
  float *data;
  st_dtype dtype; /* written as */
} wt;

typedef struct wlist {
  wt *t;
  size_t n, cap;
} wlist;

static void collect(void *ud, const char *name, int nd, const int64_t *shape) {
  wlist *L = ud;
  if (L->n == L->cap) {
    L->cap = L->cap ? 2 * L->cap : 128;
    L->t = realloc(L->t, L->cap * sizeof *L->t);
    assert_non_null(L->t);
  }
  wt *t = &L->t[L->n++];
  memset(t, 0, sizeof *t);
  assert_true(strlen(name) < sizeof t->name);
  strcpy(t->name, name);
  t->nd = nd;
  int64_t n = 1;
  for (int i = 0; i < nd; i++) t->shape[i] = shape[i], n *= shape[i];
  t->data = malloc((size_t)n * sizeof(float));
  t->dtype = ST_F32;
  int is_bias = strstr(name, ".bias") != NULL;
  int64_t fan_in = nd == 4 ? shape[1] * shape[2] * shape[3] : nd == 2 ? shape[1] : 1;
  for (int64_t i = 0; i < n; i++) {
    double v = urand();
    if (is_bias) v *= 0.1;
    else if (nd == 1) v = 1.0 + 0.2 * v; /* a norm's scale */
    else v *= sqrt(3.0 / (double)fan_in);
    t->data[i] = (float)v;
  }
}

static int64_t numel(const wt *t) {
  int64_t n = 1;
  for (int i = 0; i < t->nd; i++) n *= t->shape[i];
  return n;
}

static void wl_free(wlist *L) {
  for (size_t i = 0; i < L->n; i++) free(L->t[i].data);
  free(L->t);
  memset(L, 0, sizeof *L);
}

static wt *wl_find(const wlist *L, const char *name) {
  for (size_t i = 0; i < L->n; i++)
    if (!strcmp(L->t[i].name, name)) return &L->t[i];
  return NULL;
}

static void wl_add(wlist *L, const char *name, int nd, const int64_t *shape) { collect(L, name, nd, shape); }

static void wl_remove(wlist *L, const char *name) {
  wt *t = wl_find(L, name);
  assert_non_null(t);
  free(t->data);
  *t = L->t[--L->n];
}

static wlist make(const cfg *c, const char *prefix, uint64_t seed) {
  wlist L = {0};
  vae_hparams h = hp_of(c);
  rng = seed;
  vae_enumerate(prefix, VAE_LAYOUT_LDM, &h, collect, &L);
  assert_true(L.n > 0);
  return L;
}

static void write_file(const wlist *L, const char *path) {
  st_wtensor *w = calloc(L->n, sizeof *w);
  void **bufs = calloc(L->n, sizeof *bufs);
  for (size_t i = 0; i < L->n; i++) {
    const wt *t = &L->t[i];
    int64_t n = numel(t);
    w[i].name = t->name;
    w[i].dtype = t->dtype;
    w[i].n_dims = t->nd;
    memcpy(w[i].shape, t->shape, sizeof t->shape);
    if (t->dtype == ST_F16 || t->dtype == ST_BF16) {
      uint16_t *h = malloc((size_t)n * 2);
      for (int64_t k = 0; k < n; k++) {
        uint32_t u;
        memcpy(&u, &t->data[k], 4);
        h[k] = t->dtype == ST_F16 ? f32_to_fp16(t->data[k]) : (uint16_t)(u >> 16);
      }
      bufs[i] = h;
      w[i].data = h;
    } else {
      w[i].data = t->data;
    }
  }
  char err[LUNA_ERR_LEN];
  int rc = st_write(path, w, L->n, NULL, 0, err);
  if (rc) fail_msg("st_write: %s", err);
  for (size_t i = 0; i < L->n; i++) free(bufs[i]);
  free(bufs);
  free(w);
}

/* The weights as a 16-bit file stores them (for the reference). */
static void round_to(wlist *L, st_dtype d) {
  for (size_t i = 0; i < L->n; i++) {
    wt *t = &L->t[i];
    t->dtype = d;
    for (int64_t k = 0, n = numel(t); k < n; k++) {
      if (d == ST_F16) t->data[k] = fp16_to_f32(f32_to_fp16(t->data[k]));
      else {
        uint32_t u;
        memcpy(&u, &t->data[k], 4);
        t->data[k] = bf16_to_f32((uint16_t)(u >> 16));
      }
    }
  }
}

static char tmpdir[64];
static const char *tpath(const char *name) {
  static char p[4][256];
  static int k;
  k = (k + 1) % 4;
  snprintf(p[k], sizeof p[k], "%s/%s", tmpdir, name);
  return p[k];
}

static vae *load_ok(const char *path) {
  char err[LUNA_ERR_LEN] = "";
  vae *m = NULL;
  int rc = vae_load(path, &m, err);
  if (rc) fail_msg("vae_load(%s): %s (%s)", path, err, luna_status_name(rc));
  return m;
}

static void expect_load_error(const char *path, int status, const char *needle) {
  char err[LUNA_ERR_LEN] = "";
  vae *m = NULL;
  int rc = vae_load(path, &m, err);
  if (rc != status) fail_msg("vae_load(%s) gave %s (%s), expected %s", path, luna_status_name(rc), err,
                             luna_status_name(status));
  assert_null(m);
  if (!strstr(err, needle)) fail_msg("message '%s' does not name '%s'", err, needle);
}

/* ---- diffusers names, written here independently of the loader's table ---------------- */

static void to_diffusers(const char *ldm, int n, int old_attn, char *out, size_t cap) {
  char s[200], rest[160];
  int i, j;
  snprintf(s, sizeof s, "%s", ldm);
  const char *attn_new[5][2] = {{"norm.", "group_norm."}, {"q.", "to_q."}, {"k.", "to_k."}, {"v.", "to_v."},
                                {"proj_out.", "to_out.0."}};
  const char *attn_old[5][2] = {{"norm.", "group_norm."}, {"q.", "query."}, {"k.", "key."}, {"v.", "value."},
                                {"proj_out.", "proj_attn."}};
  char half[16];
  if (sscanf(s, "encoder.down.%d.block.%d.%159s", &i, &j, rest) == 3)
    snprintf(out, cap, "encoder.down_blocks.%d.resnets.%d.%s", i, j, rest);
  else if (sscanf(s, "encoder.down.%d.downsample.%159s", &i, rest) == 2)
    snprintf(out, cap, "encoder.down_blocks.%d.downsamplers.0.%s", i, rest);
  else if (sscanf(s, "decoder.up.%d.block.%d.%159s", &i, &j, rest) == 3)
    snprintf(out, cap, "decoder.up_blocks.%d.resnets.%d.%s", n - 1 - i, j, rest);
  else if (sscanf(s, "decoder.up.%d.upsample.%159s", &i, rest) == 2)
    snprintf(out, cap, "decoder.up_blocks.%d.upsamplers.0.%s", n - 1 - i, rest);
  else if (sscanf(s, "%7[a-z].mid.block_%d.%159s", half, &i, rest) == 3)
    snprintf(out, cap, "%s.mid_block.resnets.%d.%s", half, i - 1, rest);
  else if (sscanf(s, "%7[a-z].mid.attn_1.%159s", half, rest) == 2) {
    const char *(*tab)[2] = old_attn ? attn_old : attn_new;
    for (int k = 0; k < 5; k++)
      if (!strncmp(rest, tab[k][0], strlen(tab[k][0]))) {
        snprintf(out, cap, "%s.mid_block.attentions.0.%s%s", half, tab[k][1], rest + strlen(tab[k][0]));
        return;
      }
    fail_msg("attention tensor %s", ldm);
  } else if (sscanf(s, "%7[a-z].norm_out.%159s", half, rest) == 2)
    snprintf(out, cap, "%s.conv_norm_out.%s", half, rest);
  else
    snprintf(out, cap, "%s", s);
  char *p = strstr(out, "nin_shortcut");
  if (p) {
    char tail[256];
    snprintf(tail, sizeof tail, "conv_shortcut%s", p + strlen("nin_shortcut"));
    strcpy(p, tail);
  }
}

/* A diffusers copy of 'L' (bare names); attention weights Linear [C, C] unless 'conv_attn'. */
static wlist diffusers_copy(const wlist *L, int n, int old_attn, int conv_attn) {
  wlist D = {0};
  for (size_t i = 0; i < L->n; i++) {
    const wt *t = &L->t[i];
    char name[256];
    to_diffusers(t->name, n, old_attn, name, sizeof name);
    int nd = t->nd;
    if (strstr(t->name, "mid.attn_1.") && nd == 4 && !conv_attn) nd = 2;
    rng = 1;
    wl_add(&D, name, nd, t->shape);
    memcpy(D.t[D.n - 1].data, t->data, (size_t)numel(t) * sizeof(float));
  }
  return D;
}

/* ---- a naive reference forward in double, from the LDM-named weights ------------------------ */

typedef struct img {
  int c, h, w;
  double *d;
} img;

static img mk(int c, int h, int w) {
  img x = {c, h, w, calloc((size_t)c * h * w, sizeof(double))};
  return x;
}

static const float *W(const wlist *L, const char *base, const char *suffix, int64_t *shape) {
  char name[256];
  snprintf(name, sizeof name, "%s%s", base, suffix);
  const wt *t = wl_find(L, name);
  if (!t) return NULL;
  if (shape) memcpy(shape, t->shape, sizeof t->shape);
  return t->data;
}

static img conv_ref(const wlist *L, const char *base, img x, int stride, int pt, int pb) {
  int64_t s[4];
  const float *w = W(L, base, ".weight", s), *b = W(L, base, ".bias", NULL);
  assert_non_null(w);
  assert_int_equal(s[1], x.c);
  int k = (int)s[2], co = (int)s[0];
  int ho = (x.h + pt + pb - k) / stride + 1, wo = (x.w + pt + pb - k) / stride + 1;
  img y = mk(co, ho, wo);
  for (int o = 0; o < co; o++)
    for (int oy = 0; oy < ho; oy++)
      for (int ox = 0; ox < wo; ox++) {
        double acc = b[o];
        for (int i = 0; i < x.c; i++)
          for (int ky = 0; ky < k; ky++)
            for (int kx = 0; kx < k; kx++) {
              int iy = oy * stride - pt + ky, ix = ox * stride - pt + kx;
              if (iy < 0 || ix < 0 || iy >= x.h || ix >= x.w) continue;
              acc += (double)w[((o * x.c + i) * k + ky) * k + kx] * x.d[(i * x.h + iy) * x.w + ix];
            }
        y.d[(o * ho + oy) * wo + ox] = acc;
      }
  return y;
}

static img gn_ref(const wlist *L, const char *base, img x, int silu) {
  const float *g = W(L, base, ".weight", NULL), *b = W(L, base, ".bias", NULL);
  assert_non_null(g);
  img y = mk(x.c, x.h, x.w);
  int cg = x.c / 32, hw = x.h * x.w;
  for (int gi = 0; gi < 32; gi++) {
    double s = 0, ss = 0;
    for (int i = gi * cg * hw; i < (gi + 1) * cg * hw; i++) s += x.d[i];
    double mu = s / (cg * hw);
    for (int i = gi * cg * hw; i < (gi + 1) * cg * hw; i++) ss += (x.d[i] - mu) * (x.d[i] - mu);
    double rs = 1.0 / sqrt(ss / (cg * hw) + 1e-6);
    for (int c = gi * cg; c < (gi + 1) * cg; c++)
      for (int p = 0; p < hw; p++) {
        double v = (x.d[c * hw + p] - mu) * rs * g[c] + b[c];
        y.d[c * hw + p] = silu ? v / (1.0 + exp(-v)) : v;
      }
  }
  return y;
}

static img res_ref(const wlist *L, const char *base, img x) {
  char b[256];
  snprintf(b, sizeof b, "%s.norm1", base);
  img h1 = gn_ref(L, b, x, 1);
  snprintf(b, sizeof b, "%s.conv1", base);
  img h2 = conv_ref(L, b, h1, 1, 1, 1);
  snprintf(b, sizeof b, "%s.norm2", base);
  img h3 = gn_ref(L, b, h2, 1);
  snprintf(b, sizeof b, "%s.conv2", base);
  img h4 = conv_ref(L, b, h3, 1, 1, 1);
  snprintf(b, sizeof b, "%s.nin_shortcut", base);
  img sc = W(L, b, ".weight", NULL) ? conv_ref(L, b, x, 1, 0, 0) : x;
  for (int i = 0; i < h4.c * h4.h * h4.w; i++) h4.d[i] += sc.d[i];
  if (sc.d != x.d) free(sc.d);
  free(h1.d), free(h2.d), free(h3.d), free(x.d);
  return h4;
}

static img attn_ref(const wlist *L, const char *base, img x) {
  char b[256];
  snprintf(b, sizeof b, "%s.norm", base);
  img h = gn_ref(L, b, x, 0);
  snprintf(b, sizeof b, "%s.q", base);
  img q = conv_ref(L, b, h, 1, 0, 0);
  snprintf(b, sizeof b, "%s.k", base);
  img k = conv_ref(L, b, h, 1, 0, 0);
  snprintf(b, sizeof b, "%s.v", base);
  img v = conv_ref(L, b, h, 1, 0, 0);
  int C = x.c, N = x.h * x.w;
  img o = mk(C, x.h, x.w);
  double *sc = malloc((size_t)N * sizeof(double));
  for (int i = 0; i < N; i++) {
    double mx = -1e300, sum = 0;
    for (int j = 0; j < N; j++) {
      double d = 0;
      for (int c = 0; c < C; c++) d += q.d[c * N + i] * k.d[c * N + j];
      sc[j] = d / sqrt((double)C);
      if (sc[j] > mx) mx = sc[j];
    }
    for (int j = 0; j < N; j++) sum += (sc[j] = exp(sc[j] - mx));
    for (int c = 0; c < C; c++) {
      double a = 0;
      for (int j = 0; j < N; j++) a += sc[j] * v.d[c * N + j];
      o.d[c * N + i] = a / sum;
    }
  }
  snprintf(b, sizeof b, "%s.proj_out", base);
  img p = conv_ref(L, b, o, 1, 0, 0);
  for (int i = 0; i < C * N; i++) p.d[i] += x.d[i];
  free(sc), free(h.d), free(q.d), free(k.d), free(v.d), free(o.d), free(x.d);
  return p;
}

static img step(img old, img fresh) {
  free(old.d);
  return fresh;
}

static img mid_ref(const wlist *L, const char *half, img x) {
  char b[64];
  snprintf(b, sizeof b, "%s.mid.block_1", half);
  x = res_ref(L, b, x);
  snprintf(b, sizeof b, "%s.mid.attn_1", half);
  x = attn_ref(L, b, x);
  snprintf(b, sizeof b, "%s.mid.block_2", half);
  return res_ref(L, b, x);
}

/* Decoder of one latent [C, h, w] -> raw [3, H, W]. */
static img dec_ref(const wlist *L, const cfg *c, img x) {
  char b[64];
  if (c->quant) x = step(x, conv_ref(L, "post_quant_conv", x, 1, 0, 0));
  x = step(x, conv_ref(L, "decoder.conv_in", x, 1, 1, 1));
  x = mid_ref(L, "decoder", x);
  for (int i = c->n - 1; i >= 0; i--) {
    for (int j = 0; j < c->nrb + 1; j++) {
      snprintf(b, sizeof b, "decoder.up.%d.block.%d", i, j);
      x = res_ref(L, b, x);
    }
    if (i > 0) {
      img u = mk(x.c, 2 * x.h, 2 * x.w);
      for (int ch = 0; ch < x.c; ch++)
        for (int y = 0; y < u.h; y++)
          for (int xx = 0; xx < u.w; xx++) u.d[(ch * u.h + y) * u.w + xx] = x.d[(ch * x.h + y / 2) * x.w + xx / 2];
      x = step(x, u);
      snprintf(b, sizeof b, "decoder.up.%d.upsample.conv", i);
      x = step(x, conv_ref(L, b, x, 1, 1, 1));
    }
  }
  x = step(x, gn_ref(L, "decoder.norm_out", x, 1));
  return step(x, conv_ref(L, "decoder.conv_out", x, 1, 1, 1));
}

/* Encoder of one planar image [3, H, W] (already x * 2 - 1) -> mean [lat, h, w]. */
static img enc_ref(const wlist *L, const cfg *c, img x) {
  char b[64];
  x = step(x, conv_ref(L, "encoder.conv_in", x, 1, 1, 1));
  for (int i = 0; i < c->n; i++) {
    for (int j = 0; j < c->nrb; j++) {
      snprintf(b, sizeof b, "encoder.down.%d.block.%d", i, j);
      x = res_ref(L, b, x);
    }
    if (i < c->n - 1) {
      snprintf(b, sizeof b, "encoder.down.%d.downsample.conv", i);
      x = step(x, conv_ref(L, b, x, 2, 0, 1));
    }
  }
  x = mid_ref(L, "encoder", x);
  x = step(x, gn_ref(L, "encoder.norm_out", x, 1));
  x = step(x, conv_ref(L, "encoder.conv_out", x, 1, 1, 1));
  if (c->quant) x = step(x, conv_ref(L, "quant_conv", x, 1, 0, 0));
  x.c = c->lat; /* the mean: the first channels */
  return x;
}

/* ---- fixtures ------------------------------------------------------------------------ */

static ops_pool *pool;

static const cfg small = {32, 2, {1, 2}, 1, 4, 4, 1, 1, 1};          /* scale 2 */
static const cfg sd_like = {32, 4, {1, 2, 4, 4}, 2, 4, 4, 1, 1, 1};  /* scale 8, SD's shape at 1/4 width */
static const cfg flux_like = {32, 4, {1, 2, 4, 4}, 1, 16, 16, 0, 1, 1}; /* 16 channels, no quant convs */

static float *rand_buf(size_t n, double lo, double hi) {
  float *x = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) x[i] = (float)(lo + (hi - lo) * (urand() + 1) / 2);
  return x;
}

static int setup(void **state) {
  (void)state;
  snprintf(tmpdir, sizeof tmpdir, "/tmp/luna-test-vae-XXXXXX");
  if (!mkdtemp(tmpdir)) return -1;
  pool = ops_pool_create(2, 16);
  return pool ? 0 : -1;
}

static int teardown(void **state) {
  (void)state;
  ops_pool_free(pool);
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
  return system(cmd) == 0 ? 0 : -1;
}

static void check_hp(const vae *m, const cfg *c) {
  const vae_hparams *h = vae_get_hparams(m);
  assert_int_equal(h->ch, c->ch);
  assert_int_equal(h->n_levels, c->n);
  for (int i = 0; i < c->n; i++) assert_int_equal(h->ch_mult[i], c->mult[i]);
  assert_int_equal(h->num_res_blocks, c->nrb);
  assert_int_equal(h->z_channels, c->z);
  assert_int_equal(h->latent_channels, c->lat);
  assert_int_equal(h->has_quant, c->quant);
  assert_int_equal(h->has_encoder, c->enc);
  assert_int_equal(h->has_decoder, c->dec);
  assert_int_equal(vae_scale(m), 1 << (c->n - 1));
}

static void decode_ok(const vae *m, const float *lat, int B, int h, int w, const vae_tiling *t, float *out) {
  char err[LUNA_ERR_LEN] = "";
  int rc = vae_decode(m, pool, lat, B, h, w, t, out, NULL, NULL, err);
  if (rc) fail_msg("vae_decode: %s (%s)", err, luna_status_name(rc));
}

static void encode_ok(const vae *m, const float *px, int B, int H, int W, const vae_tiling *t, float *lat) {
  char err[LUNA_ERR_LEN] = "";
  int rc = vae_encode(m, pool, px, B, H, W, t, lat, NULL, NULL, err);
  if (rc) fail_msg("vae_encode: %s (%s)", err, luna_status_name(rc));
}

/* ---- tests ---------------------------------------------------------------------------- */

/* The LDM names under each prefix, with other models' tensors beside them; F32, F16, BF16. */
static void test_load_ldm(void **state) {
  (void)state;
  const cfg *cs[] = {&small, &sd_like, &flux_like};
  const char *pre[] = {"", "first_stage_model.", "vae."};
  const st_dtype dts[] = {ST_F32, ST_F16, ST_BF16};
  for (int i = 0; i < 3; i++) {
    wlist L = make(cs[i], pre[i], 100 + (uint64_t)i);
    if (*pre[i]) { /* a checkpoint: the UNet and the text encoder sit beside the VAE */
      int64_t s[2] = {3, 5};
      wl_add(&L, "model.diffusion_model.input_blocks.0.0.weight", 2, s);
      wl_add(&L, "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", 2, s);
    } else { /* a training leftover */
      int64_t s[1] = {1};
      wl_add(&L, "model_ema.decay", 1, s);
    }
    for (size_t k = 0; k < L.n; k++) L.t[k].dtype = dts[i];
    write_file(&L, tpath("ldm.safetensors"));
    vae *m = load_ok(tpath("ldm.safetensors"));
    check_hp(m, cs[i]);
    assert_int_equal(vae_get_layout(m), VAE_LAYOUT_LDM);
    size_t params = 0;
    for (size_t k = 0; k < L.n; k++)
      if (!strncmp(L.t[k].name, pre[i], strlen(pre[i])) && !strstr(L.t[k].name, "model_ema")) params += (size_t)numel(&L.t[k]);
    assert_int_equal(vae_weight_bytes(m), params * sizeof(float));
    vae_free(m);
    wl_free(&L);
  }
}

/* Decoder and encoder against the naive double-precision reference (shapes, block order,
** shortcuts, attention, up/downsampling, quant convs, crop). */
static void test_reference(void **state) {
  (void)state;
  const cfg *cs[] = {&small, &sd_like, &flux_like};
  for (int ci = 0; ci < 3; ci++) {
    const cfg *c = cs[ci];
    wlist L = make(c, "", 7 + (uint64_t)ci);
    if (ci == 1) round_to(&L, ST_F16);
    write_file(&L, tpath("ref.safetensors"));
    vae *m = load_ok(tpath("ref.safetensors"));
    int s = vae_scale(m), h = s > 2 ? 2 : 3, w = s > 2 ? 3 : 5, B = 2;
    float *lat = rand_buf((size_t)(B * c->lat * h * w), -2, 2);
    float *im = malloc(sizeof(float) * (size_t)(B * h * s * w * s * 3));
    decode_ok(m, lat, B, h, w, NULL, im);
    double worst = 0;
    long inside = 0, total = 0;
    for (int b = 0; b < B; b++) {
      img x = mk(c->lat, h, w);
      for (int i = 0; i < c->lat * h * w; i++) x.d[i] = lat[b * c->lat * h * w + i];
      img y = dec_ref(&L, c, x);
      assert_int_equal(y.c, 3);
      assert_int_equal(y.h, h * s);
      assert_int_equal(y.w, w * s);
      for (int yy = 0; yy < y.h; yy++)
        for (int xx = 0; xx < y.w; xx++)
          for (int ch = 0; ch < 3; ch++) {
            double want = (y.d[(ch * y.h + yy) * y.w + xx] + 1) / 2;
            want = want < 0 ? 0 : want > 1 ? 1 : want;
            float got = im[((b * y.h + yy) * y.w + xx) * 3 + ch];
            assert_true(got >= 0.0f && got <= 1.0f);
            if (fabs(got - want) > worst) worst = fabs(got - want);
            inside += got > 0.0f && got < 1.0f; total++;
          }
      free(y.d);
    }
    assert_true(inside > total / 2); /* most pixels unclamped: the comparison means something */
    if (worst > 2e-4) fail_msg("config %d: decoder differs from the reference by %g", ci, worst);

    /* encode an image whose sides are not multiples of the scale: centered crop */
    int H = 4 * s + 3 + (s > 2 ? 2 : 0), Wd = 3 * s + 5;
    float *px = rand_buf((size_t)(B * H * Wd * 3), 0, 1);
    int Hc = H / s * s, Wc = Wd / s * s, oy = (H % s) / 2, ox = (Wd % s) / 2;
    float *z = malloc(sizeof(float) * (size_t)(B * c->lat * (Hc / s) * (Wc / s)));
    encode_ok(m, px, B, H, Wd, NULL, z);
    worst = 0;
    double mag = 0;
    for (int b = 0; b < B; b++) {
      img x = mk(3, Hc, Wc);
      for (int ch = 0; ch < 3; ch++)
        for (int yy = 0; yy < Hc; yy++)
          for (int xx = 0; xx < Wc; xx++)
            x.d[(ch * Hc + yy) * Wc + xx] = px[((b * H + oy + yy) * Wd + ox + xx) * 3 + ch] * 2.0 - 1.0;
      img y = enc_ref(&L, c, x);
      assert_int_equal(y.h, Hc / s);
      assert_int_equal(y.w, Wc / s);
      int n = c->lat * y.h * y.w;
      for (int i = 0; i < n; i++) {
        double d = fabs(z[b * n + i] - y.d[i]);
        if (d > worst) worst = d;
        if (fabs(y.d[i]) > mag) mag = fabs(y.d[i]);
      }
      free(y.d);
    }
    if (worst > 2e-4 * (1 + mag)) fail_msg("config %d: encoder differs from the reference by %g", ci, worst);

    /* one image at a time gives the same as the batch */
    float *one = malloc(sizeof(float) * (size_t)(h * s * w * s * 3));
    decode_ok(m, lat + c->lat * h * w, 1, h, w, NULL, one);
    assert_memory_equal(one, im + h * s * w * s * 3, sizeof(float) * (size_t)(h * s * w * s * 3));
    free(one);
    free(px), free(z), free(lat), free(im);
    vae_free(m);
    wl_free(&L);
  }
}

/* Diffusers names (new and old attention names, Linear or conv attention weights) load to
** the same model as the LDM file. */
static void test_diffusers(void **state) {
  (void)state;
  const cfg *cs[] = {&sd_like, &small, &flux_like};
  for (int v = 0; v < 3; v++) {
    const cfg *c = cs[v];
    wlist L = make(c, "", 55);
    write_file(&L, tpath("a.safetensors"));
    wlist D = diffusers_copy(&L, c->n, v == 1, v == 2);
    assert_non_null(wl_find(&D, "decoder.up_blocks.0.resnets.0.norm1.weight"));
    write_file(&D, tpath("d.safetensors"));
    vae *a = load_ok(tpath("a.safetensors")), *d = load_ok(tpath("d.safetensors"));
    check_hp(d, c);
    assert_int_equal(vae_get_layout(d), VAE_LAYOUT_DIFFUSERS);
    assert_int_equal(vae_weight_bytes(a), vae_weight_bytes(d));
    int s = vae_scale(a), h = 2, w = 3;
    float *lat = rand_buf((size_t)(c->lat * h * w), -1, 1);
    size_t n = (size_t)(h * s * w * s * 3);
    float *ia = malloc(n * sizeof(float)), *id = malloc(n * sizeof(float));
    decode_ok(a, lat, 1, h, w, NULL, ia);
    decode_ok(d, lat, 1, h, w, NULL, id);
    assert_memory_equal(ia, id, n * sizeof(float));
    float *px = rand_buf((size_t)(2 * s * 3 * s * 3), 0, 1);
    size_t nz = (size_t)(c->lat * 2 * 3);
    float *za = malloc(nz * sizeof(float)), *zd = malloc(nz * sizeof(float));
    encode_ok(a, px, 1, 2 * s, 3 * s, NULL, za);
    encode_ok(d, px, 1, 2 * s, 3 * s, NULL, zd);
    assert_memory_equal(za, zd, nz * sizeof(float));
    free(lat), free(ia), free(id), free(px), free(za), free(zd);
    vae_free(a);
    vae_free(d);
    wl_free(&L);
    wl_free(&D);
  }
}

/* A missing, a misshapen, an unexpected and a wrongly typed tensor: each named. */
static void test_errors(void **state) {
  (void)state;
  const char *p = tpath("bad.safetensors");
  wlist L = make(&small, "first_stage_model.", 9);
  wl_remove(&L, "first_stage_model.decoder.mid.attn_1.q.bias");
  write_file(&L, p);
  expect_load_error(p, LUNA_EMISSING, "first_stage_model.decoder.mid.attn_1.q.bias");
  wl_free(&L);

  L = make(&small, "", 9);
  wt *t = wl_find(&L, "decoder.up.0.block.1.conv2.weight");
  assert_non_null(t);
  t->shape[1] = 16; /* [32, 16, 3, 3]: half the data */
  write_file(&L, p);
  expect_load_error(p, LUNA_ESHAPE, "decoder.up.0.block.1.conv2.weight");
  wl_free(&L);

  L = make(&small, "", 9);
  int64_t s[1] = {32};
  wl_add(&L, "decoder.mid.attn_1.extra.weight", 1, s);
  write_file(&L, p);
  expect_load_error(p, LUNA_EUNEXPECTED, "decoder.mid.attn_1.extra.weight");
  wl_free(&L);

  /* the shortcut of a block whose width does not change */
  L = make(&small, "vae.", 9);
  int64_t sc[4] = {64, 64, 1, 1};
  wl_add(&L, "vae.decoder.up.1.block.1.nin_shortcut.weight", 4, sc);
  write_file(&L, p);
  expect_load_error(p, LUNA_EUNEXPECTED, "vae.decoder.up.1.block.1.nin_shortcut.weight");
  wl_free(&L);

  L = make(&small, "", 9);
  wl_find(&L, "encoder.conv_in.bias")->dtype = ST_I32;
  write_file(&L, p);
  expect_load_error(p, LUNA_EDTYPE, "encoder.conv_in.bias");
  wl_free(&L);

  /* quant_conv without post_quant_conv */
  L = make(&small, "", 9);
  wl_remove(&L, "post_quant_conv.weight");
  wl_remove(&L, "post_quant_conv.bias");
  write_file(&L, p);
  expect_load_error(p, LUNA_EMISSING, "post_quant_conv.weight");
  wl_free(&L);

  /* not a VAE at all */
  wlist N = {0};
  int64_t s2[2] = {4, 4};
  wl_add(&N, "text_model.embeddings.token_embedding.weight", 2, s2);
  write_file(&N, p);
  expect_load_error(p, LUNA_EMODEL, "no VAE");
  wl_free(&N);
}

/* Files with one half: the other operation fails clearly. */
static void test_halves(void **state) {
  (void)state;
  cfg dec = small, enc = small;
  dec.enc = 0;
  enc.dec = 0;
  char err[LUNA_ERR_LEN];
  float lat[4 * 2 * 2] = {0}, im[4 * 4 * 3], px[4 * 4 * 3] = {0}, z[4];

  wlist L = make(&dec, "", 3);
  write_file(&L, tpath("dec.safetensors"));
  vae *m = load_ok(tpath("dec.safetensors"));
  check_hp(m, &dec);
  decode_ok(m, lat, 1, 2, 2, NULL, im);
  assert_int_equal(vae_encode(m, pool, px, 1, 4, 4, NULL, z, NULL, NULL, err), LUNA_EMODEL);
  assert_non_null(strstr(err, "no encoder"));
  assert_int_equal(vae_encode_bytes(m, 64, 64), 0);
  vae_free(m);
  wl_free(&L);

  L = make(&enc, "", 3);
  write_file(&L, tpath("enc.safetensors"));
  m = load_ok(tpath("enc.safetensors"));
  check_hp(m, &enc);
  float z2[4 * 2 * 2];
  encode_ok(m, px, 1, 4, 4, NULL, z2);
  assert_int_equal(vae_decode(m, pool, lat, 1, 2, 2, NULL, im, NULL, NULL, err), LUNA_EMODEL);
  assert_non_null(strstr(err, "no decoder"));
  vae_free(m);
  /* the half a file lacks cannot be asked for */
  assert_int_equal(vae_load_parts(tpath("enc.safetensors"), VAE_PART_DECODER, &m, err), LUNA_EMODEL);
  assert_null(m);
  assert_non_null(strstr(err, "no decoder"));
  assert_int_equal(vae_load_parts(tpath("enc.safetensors"), 4, &m, err), LUNA_EINVAL);
  wl_free(&L);
}

/* Loading one half of a whole VAE: the same results as the whole model, about the
** weights of that half only, and the other half refused as if the file lacked it. */
static void test_load_parts(void **state) {
  (void)state;
  char err[LUNA_ERR_LEN];
  wlist L = make(&small, "", 5);
  write_file(&L, tpath("parts.safetensors"));
  vae *all = load_ok(tpath("parts.safetensors")), *d = NULL, *e = NULL;
  assert_int_equal(vae_load_parts(tpath("parts.safetensors"), VAE_PART_DECODER, &d, err), 0);
  assert_int_equal(vae_load_parts(tpath("parts.safetensors"), VAE_PART_ENCODER, &e, err), 0);
  assert_true(vae_weight_bytes(d) < vae_weight_bytes(all) && vae_weight_bytes(e) < vae_weight_bytes(all));
  assert_int_equal(vae_weight_bytes(d) + vae_weight_bytes(e), vae_weight_bytes(all));
  int h = 3, w = 5, S = vae_scale(all);
  float *lat = rand_buf((size_t)(4 * h * w), -1, 1), *px = rand_buf((size_t)(h * S * w * S * 3), 0, 1);
  size_t ni = (size_t)(h * S * w * S * 3), nl = (size_t)(4 * h * w);
  float *i1 = malloc(ni * sizeof(float)), *i2 = malloc(ni * sizeof(float));
  float *z1 = malloc(nl * sizeof(float)), *z2 = malloc(nl * sizeof(float));
  decode_ok(all, lat, 1, h, w, NULL, i1);
  decode_ok(d, lat, 1, h, w, NULL, i2);
  assert_memory_equal(i1, i2, ni * sizeof(float));
  encode_ok(all, px, 1, h * S, w * S, NULL, z1);
  encode_ok(e, px, 1, h * S, w * S, NULL, z2);
  assert_memory_equal(z1, z2, nl * sizeof(float));
  assert_int_equal(vae_encode(d, pool, px, 1, h * S, w * S, NULL, z2, NULL, NULL, err), LUNA_EMODEL);
  assert_non_null(strstr(err, "loaded without one"));
  assert_int_equal(vae_decode(e, pool, lat, 1, h, w, NULL, i2, NULL, NULL, err), LUNA_EMODEL);
  free(lat), free(px), free(i1), free(i2), free(z1), free(z2);
  vae_free(all), vae_free(d), vae_free(e);
  wl_free(&L);
}

/* Bad inputs: non-finite values (named, with the first index), sizes. */
static void test_bad_inputs(void **state) {
  (void)state;
  wlist L = make(&small, "", 4);
  write_file(&L, tpath("in.safetensors"));
  vae *m = load_ok(tpath("in.safetensors"));
  char err[LUNA_ERR_LEN];
  int B = 2, h = 3, w = 4;
  float *lat = rand_buf((size_t)(B * 4 * h * w), -1, 1), *im = malloc(sizeof(float) * (size_t)(B * 6 * 8 * 3));
  lat[((1 * 4 + 2) * h + 1) * w + 3] = NAN;
  assert_int_equal(vae_decode(m, pool, lat, B, h, w, NULL, im, NULL, NULL, err), LUNA_EINVAL);
  assert_non_null(strstr(err, "\"latent\""));
  assert_non_null(strstr(err, "[1, 2, 1, 3]"));
  vae_tiling t = {512, 64};
  assert_int_equal(vae_decode(m, pool, lat, B, h, w, &t, im, NULL, NULL, err), LUNA_EINVAL);
  lat[((1 * 4 + 2) * h + 1) * w + 3] = 0.5f;
  lat[0] = INFINITY;
  assert_int_equal(vae_decode(m, pool, lat, B, h, w, NULL, im, NULL, NULL, err), LUNA_EINVAL);
  assert_non_null(strstr(err, "[0, 0, 0, 0]"));
  lat[0] = 0;
  assert_int_equal(vae_decode(m, pool, lat, 0, h, w, NULL, im, NULL, NULL, err), LUNA_EINVAL);
  assert_int_equal(vae_decode(m, pool, lat, 1, 0, w, NULL, im, NULL, NULL, err), LUNA_EINVAL);
  assert_int_equal(vae_decode(m, pool, lat, 1, h, 1 << 20, NULL, im, NULL, NULL, err), LUNA_EINVAL);

  float *px = rand_buf(3 * 5 * 7 * 3, 0, 1), z[4 * 2 * 3];
  px[(2 * 7 + 6) * 3 + 1] = -INFINITY;
  assert_int_equal(vae_encode(m, pool, px, 1, 5, 7, NULL, z, NULL, NULL, err), LUNA_EINVAL);
  assert_non_null(strstr(err, "\"image\""));
  assert_non_null(strstr(err, "[0, 2, 6, 1]"));
  px[(2 * 7 + 6) * 3 + 1] = 0.25f;
  assert_int_equal(vae_encode(m, pool, px, 1, 1, 7, NULL, z, NULL, NULL, err), LUNA_EINVAL);
  encode_ok(m, px, 1, 5, 7, NULL, z); /* 4 x 6 after the crop */
  free(lat), free(im), free(px);
  vae_free(m);
  wl_free(&L);
}

/* A tile that covers the image: all three passes run whole, so tiled = untiled up to the
** averaging's rounding. */
static void test_tiled_whole(void **state) {
  (void)state;
  wlist L = make(&sd_like, "", 12);
  write_file(&L, tpath("t.safetensors"));
  vae *m = load_ok(tpath("t.safetensors"));
  int h = 5, w = 7, s = vae_scale(m);
  size_t n = (size_t)(2 * h * s * w * s * 3);
  float *lat = rand_buf((size_t)(2 * 4 * h * w), -2, 2), *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
  decode_ok(m, lat, 2, h, w, NULL, a);
  vae_tiling t = {512, 64}; /* 64 latent cells: passes of 128 x 32, 32 x 128 and 64 x 64 */
  decode_ok(m, lat, 2, h, w, &t, b);
  for (size_t i = 0; i < n; i++) assert_true(fabsf(a[i] - b[i]) <= 1e-6f);

  int H = h * s, W = w * s;
  float *px = rand_buf((size_t)(2 * H * W * 3), 0, 1);
  size_t nz = (size_t)(2 * 4 * h * w);
  float *za = malloc(nz * sizeof(float)), *zb = malloc(nz * sizeof(float));
  encode_ok(m, px, 2, H, W, NULL, za);
  encode_ok(m, px, 2, H, W, &t, zb);
  for (size_t i = 0; i < nz; i++) assert_true(fabsf(za[i] - zb[i]) <= 1e-6f * (1 + fabsf(za[i])));
  free(lat), free(a), free(b), free(px), free(za), free(zb);
  vae_free(m);
  wl_free(&L);
}

/* The tiling against a straightforward transcription of ComfyUI's tiled_scale_multidim:
** positions, lengths, a 2-D mask built by in-place multiplications, out / div, the three
** passes. The network runs through the library's single-tile path (vae_run_*). */
typedef struct ref_tiler {
  const vae *m;
  int decode;
} ref_tiler;

static float *net(const vae *m, int decode, const float *in, int64_t ic, int64_t ly, int64_t lx, int64_t *th,
                  int64_t *tw, int64_t oc) {
  vae_run p, r;
  vae_run_init(&p, m, pool, 1, "t");
  p.need[VAE_BUF_IN] = (size_t)(ic * ly * lx);
  int o = decode ? vae_run_decoder(&p, VAE_BUF_IN, ly, lx, th, tw) : vae_run_encoder(&p, VAE_BUF_IN, ly, lx, th, tw);
  vae_run_init(&r, m, pool, 0, "t");
  char err[LUNA_ERR_LEN];
  assert_int_equal(vae_run_alloc(&r, &p, 1, 0, err), 0);
  memcpy(r.buf[VAE_BUF_IN], in, (size_t)(ic * ly * lx) * sizeof(float));
  o = decode ? vae_run_decoder(&r, VAE_BUF_IN, ly, lx, th, tw) : vae_run_encoder(&r, VAE_BUF_IN, ly, lx, th, tw);
  assert_true(o >= 0);
  float *y = malloc((size_t)(oc * *th * *tw) * sizeof(float));
  memcpy(y, r.buf[o], (size_t)(oc * *th * *tw) * sizeof(float));
  vae_run_free(&r, 1);
  return y;
}

static double py_round(double x) {
  double f = floor(x), d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return fmod(f, 2) == 0 ? f : f + 1;
}

/* tiled_scale_multidim for one planar image [ic, H, W]; result [oc, OH, OW]. */
static float *ref_pass(const vae *m, int decode, const float *x, int64_t ic, int64_t H, int64_t W, int64_t ty,
                       int64_t tx, int64_t ov, int64_t oc, double up, int64_t OH, int64_t OW) {
  float *out = calloc((size_t)(oc * OH * OW), sizeof(float)), *dv = calloc((size_t)(oc * OH * OW), sizeof(float));
  int64_t th, tw;
  if (H <= ty && W <= tx) {
    float *y = net(m, decode, x, ic, H, W, &th, &tw, oc);
    free(out), free(dv);
    return y;
  }
  int64_t sizes[2] = {H, W}, tiles[2] = {ty, tx};
  int64_t pos[2][4096], np[2];
  for (int d = 0; d < 2; d++) {
    np[d] = 0;
    if (sizes[d] <= tiles[d]) pos[d][np[d]++] = 0;
    else
      for (int64_t p = 0; p < sizes[d] - ov; p += tiles[d] - ov) pos[d][np[d]++] = p;
  }
  for (int64_t a = 0; a < np[0]; a++)
    for (int64_t b = 0; b < np[1]; b++) {
      int64_t p[2], l[2], u[2];
      int64_t it[2] = {pos[0][a], pos[1][b]};
      for (int d = 0; d < 2; d++) {
        p[d] = it[d] < sizes[d] - ov ? it[d] : sizes[d] - ov;
        if (p[d] < 0) p[d] = 0;
        l[d] = tiles[d] < sizes[d] - p[d] ? tiles[d] : sizes[d] - p[d];
        u[d] = (int64_t)py_round((double)p[d] * up);
      }
      float *in = malloc((size_t)(ic * l[0] * l[1]) * sizeof(float));
      for (int64_t c = 0; c < ic; c++)
        for (int64_t yy = 0; yy < l[0]; yy++)
          for (int64_t xx = 0; xx < l[1]; xx++)
            in[(c * l[0] + yy) * l[1] + xx] = x[(c * H + p[0] + yy) * W + p[1] + xx];
      float *y = net(m, decode, in, ic, l[0], l[1], &th, &tw, oc);
      float *mask = malloc((size_t)(oc * th * tw) * sizeof(float));
      for (int64_t i = 0; i < oc * th * tw; i++) mask[i] = 1.0f;
      int64_t msh[2] = {th, tw};
      for (int d = 0; d < 2; d++) {
        int64_t f = (int64_t)py_round((double)ov * up);
        if (f >= msh[d]) continue;
        for (int64_t t = 0; t < f; t++) {
          float av = (float)((double)(t + 1) / (double)f);
          int64_t rows[2] = {t, msh[d] - 1 - t};
          for (int k = 0; k < 2; k++)
            for (int64_t c = 0; c < oc; c++)
              for (int64_t i = 0; i < th; i++)
                for (int64_t j = 0; j < tw; j++)
                  if ((d == 0 ? i : j) == rows[k]) mask[(c * th + i) * tw + j] *= av;
        }
      }
      for (int64_t c = 0; c < oc; c++)
        for (int64_t i = 0; i < th; i++)
          for (int64_t j = 0; j < tw; j++) {
            int64_t o = (c * OH + u[0] + i) * OW + u[1] + j;
            float mk = mask[(c * th + i) * tw + j];
            out[o] += y[(c * th + i) * tw + j] * mk;
            dv[o] += mk;
          }
      free(in), free(y), free(mask);
    }
  for (int64_t i = 0; i < oc * OH * OW; i++) out[i] /= dv[i];
  free(dv);
  return out;
}

static void test_tiled_reference(void **state) {
  (void)state;
  const cfg *cs[] = {&sd_like, &small};
  for (int ci = 0; ci < 2; ci++) {
    wlist L = make(cs[ci], "", 21);
    write_file(&L, tpath("tr.safetensors"));
    vae *m = load_ok(tpath("tr.safetensors"));
    int s = vae_scale(m);
    int64_t h = 9, w = 7, C = 4, OH = h * s, OW = w * s;
    /* decode: tile 64 px, overlap 24 px -> reduced to 16 (tile < 4 overlap) */
    vae_tiling t = {8 * s, 3 * s};
    int64_t tl = t.tile / s, ol = (t.tile / 4) / s;
    float *lat = rand_buf((size_t)(C * h * w), -2, 2);
    float *got = malloc(sizeof(float) * (size_t)(OH * OW * 3));
    decode_ok(m, lat, 1, (int)h, (int)w, &t, got);
    float *p1 = ref_pass(m, 1, lat, C, h, w, tl * 2, tl / 2, ol, 3, s, OH, OW);
    float *p2 = ref_pass(m, 1, lat, C, h, w, tl / 2, tl * 2, ol, 3, s, OH, OW);
    float *p3 = ref_pass(m, 1, lat, C, h, w, tl, tl, ol, 3, s, OH, OW);
    double worst = 0;
    for (int64_t c = 0; c < 3; c++)
      for (int64_t i = 0; i < OH * OW; i++) {
        int64_t k = c * OH * OW + i;
        float v = ((p1[k] + p2[k] + p3[k]) / 3.0f + 1.0f) / 2.0f;
        v = v < 0 ? 0 : v > 1 ? 1 : v;
        double d = fabs(v - got[i * 3 + c]);
        if (d > worst) worst = d;
      }
    if (worst > 1e-6) fail_msg("tiled decode (scale %d) differs from the reference by %g", s, worst);
    free(p1), free(p2), free(p3), free(got), free(lat);

    /* encode: an image of 9s+3 x 7s+1 pixels, tile 8s, overlap 2s (pixels) */
    int64_t H = 9 * s + 3, W = 7 * s + 1, Hc = H / s * s, Wc = W / s * s;
    float *px = rand_buf((size_t)(H * W * 3), 0, 1);
    vae_tiling te = {8 * s, 2 * s};
    float *z = malloc(sizeof(float) * (size_t)(C * (Hc / s) * (Wc / s)));
    encode_ok(m, px, 1, (int)H, (int)W, &te, z);
    float *x = malloc(sizeof(float) * (size_t)(3 * Hc * Wc));
    vae_prepare_pixels(m, px, H, W, x);
    double up = 1.0 / s;
    int64_t T = te.tile, O = te.overlap;
    float *q1 = ref_pass(m, 0, x, 3, Hc, Wc, T, T, O, C, up, Hc / s, Wc / s);
    float *q2 = ref_pass(m, 0, x, 3, Hc, Wc, T / 2, T * 2, O, C, up, Hc / s, Wc / s);
    float *q3 = ref_pass(m, 0, x, 3, Hc, Wc, T * 2, T / 2, O, C, up, Hc / s, Wc / s);
    worst = 0;
    for (int64_t i = 0; i < C * (Hc / s) * (Wc / s); i++) {
      float v = q1[i];
      v += q2[i];
      v += q3[i];
      v /= 3.0f;
      double d = fabs(v - z[i]) / (1 + fabs(v));
      if (d > worst) worst = d;
    }
    if (worst > 1e-6) fail_msg("tiled encode (scale %d) differs from the reference by %g", s, worst);
    free(q1), free(q2), free(q3), free(x), free(z), free(px);
    vae_free(m);
    wl_free(&L);
  }
}

/* Bad tilings fail cleanly. */
static void test_tiling_errors(void **state) {
  (void)state;
  wlist L = make(&sd_like, "", 5);
  write_file(&L, tpath("te.safetensors"));
  vae *m = load_ok(tpath("te.safetensors"));
  char err[LUNA_ERR_LEN];
  float *lat = rand_buf(4 * 20 * 20, -1, 1), *im = malloc(sizeof(float) * 160 * 160 * 3);
  vae_tiling t = {8, 0}; /* one latent cell: its half-width passes cannot advance */
  assert_int_equal(vae_decode(m, pool, lat, 1, 20, 20, &t, im, NULL, NULL, err), LUNA_EINVAL);
  t = (vae_tiling){4, 0};
  assert_int_equal(vae_decode(m, pool, lat, 1, 20, 20, &t, im, NULL, NULL, err), LUNA_EINVAL);
  float *px = rand_buf(160 * 160 * 3, 0, 1), z[4 * 20 * 20];
  t = (vae_tiling){64, 40}; /* overlap over half the tile */
  assert_int_equal(vae_encode(m, pool, px, 1, 160, 160, &t, z, NULL, NULL, err), LUNA_EINVAL);
  free(lat), free(im), free(px);
  vae_free(m);
  wl_free(&L);
}

/* Progress is monotonic and ends at the total; a nonzero return stops the work with it. */
typedef struct prog {
  double last, total;
  int calls, stop_at;
} prog;

static int on_progress(void *ud, double done, double total) {
  prog *p = ud;
  assert_true(done >= p->last);
  assert_true(total > 0);
  p->last = done;
  p->total = total;
  if (++p->calls == p->stop_at) return LUNA_ECONN;
  return 0;
}

static void test_progress(void **state) {
  (void)state;
  wlist L = make(&small, "", 6);
  write_file(&L, tpath("p.safetensors"));
  vae *m = load_ok(tpath("p.safetensors"));
  char err[LUNA_ERR_LEN];
  float *lat = rand_buf(2 * 4 * 6 * 6, -1, 1), *im = malloc(sizeof(float) * 2 * 12 * 12 * 3);
  prog p = {0, 0, 0, 0};
  assert_int_equal(vae_decode(m, pool, lat, 2, 6, 6, NULL, im, on_progress, &p, err), 0);
  assert_true(p.calls > 10);
  assert_true(fabs(p.last - p.total) <= 1e-9 * p.total);
  p = (prog){0, 0, 0, 0};
  vae_tiling t = {4, 0}; /* 2-cell tiles: many of them */
  assert_int_equal(vae_decode(m, pool, lat, 2, 6, 6, &t, im, on_progress, &p, err), 0);
  assert_true(fabs(p.last - p.total) <= 1e-9 * p.total);
  p = (prog){0, 0, 0, 5};
  assert_int_equal(vae_decode(m, pool, lat, 2, 6, 6, NULL, im, on_progress, &p, err), LUNA_ECONN);
  assert_int_equal(p.calls, 5);
  p = (prog){0, 0, 0, 7};
  assert_int_equal(vae_decode(m, pool, lat, 2, 6, 6, &t, im, on_progress, &p, err), LUNA_ECONN);
  float px[12 * 12 * 3] = {0}, z[4 * 6 * 6];
  p = (prog){0, 0, 0, 3};
  assert_int_equal(vae_encode(m, pool, px, 1, 12, 12, NULL, z, on_progress, &p, err), LUNA_ECONN);
  free(lat), free(im);
  vae_free(m);
  wl_free(&L);
}

/* The decoder's upsampling in bands of rows gives what the whole map gives. */
static float *decode_raw(const vae *m, const float *lat, int64_t h, int64_t w, size_t band, size_t *need2) {
  vae_run p, r;
  int64_t oh, ow;
  char err[LUNA_ERR_LEN];
  vae_run_init(&p, m, pool, 1, "t");
  p.band_floats = band;
  vae_run_decoder(&p, VAE_BUF_IN, h, w, &oh, &ow);
  vae_run_init(&r, m, pool, 0, "t");
  r.band_floats = band;
  assert_int_equal(vae_run_alloc(&r, &p, 0, 0, err), 0);
  r.buf[VAE_BUF_IN] = (float *)lat;
  int o = vae_run_decoder(&r, VAE_BUF_IN, h, w, &oh, &ow);
  assert_true(o >= 0);
  float *y = malloc((size_t)(3 * oh * ow) * sizeof(float));
  memcpy(y, r.buf[o], (size_t)(3 * oh * ow) * sizeof(float));
  *need2 = vae_run_bytes(&p, 0);
  vae_run_free(&r, 0);
  return y;
}

static void test_banded_upsampling(void **state) {
  (void)state;
  wlist L = make(&sd_like, "", 31);
  write_file(&L, tpath("b.safetensors"));
  vae *m = load_ok(tpath("b.safetensors"));
  int64_t h = 5, w = 6, n = 3 * 40 * 48;
  float *lat = rand_buf((size_t)(4 * h * w), -2, 2);
  size_t whole_bytes, b1_bytes, b3_bytes;
  float *whole = decode_raw(m, lat, h, w, 0, &whole_bytes);
  float *one = decode_raw(m, lat, h, w, 1, &b1_bytes);      /* one row per band */
  float *three = decode_raw(m, lat, h, w, 5 * 256 * 96, &b3_bytes); /* 3 rows at the last level */
  double worst = 0;
  for (int64_t i = 0; i < n; i++) {
    /* the same sums, up to the GEMM's rounding for other strip shapes */
    double d1 = fabs(whole[i] - one[i]) / (1 + fabs(whole[i])), d3 = fabs(whole[i] - three[i]) / (1 + fabs(whole[i]));
    worst = d1 > worst ? d1 : worst;
    worst = d3 > worst ? d3 : worst;
  }
  if (worst > 1e-5) fail_msg("banded upsampling differs by %g", worst);
  assert_true(b1_bytes < whole_bytes);
  free(whole), free(one), free(three), free(lat);
  vae_free(m);
  wl_free(&L);
}

/* The estimates: what a decode allocates, by hand for the 2-level model. */
static void test_estimates(void **state) {
  (void)state;
  wlist L = make(&small, "", 8);
  write_file(&L, tpath("e.safetensors"));
  vae *m = load_ok(tpath("e.safetensors"));
  int64_t h = 10, w = 12;
  /* decoder widths 64 (level 1, h x w) and 32 (level 0, 2h x 2w), buffer by buffer: the
  ** upsampling conv's 64 x 2h x 2w output; up.0.block.0's conv1 output, 32 x 2h x 2w;
  ** the band buffer, one band at this size: up.0.block.0's whole input normalized
  ** (64 x 2h x 2w) and conv1's output rows (32 x 2h x 2w), larger than the upsampled map
  ** and the mid attention's normalized map */
  size_t big = 64 * (size_t)(4 * h * w), half = 32 * (size_t)(4 * h * w);
  assert_int_equal(vae_decode_bytes(m, h, w), (2 * big + 2 * half) * sizeof(float));
  assert_true(vae_encode_bytes(m, 2 * h, 2 * w) >= 3 * 4 * (size_t)(h * w) * sizeof(float));
  assert_true(vae_scratch(m, 2 * h, 2 * w) >= ops_attention_single_scratch(h * w));
  vae_free(m);
  wl_free(&L);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_load_ldm),        cmocka_unit_test(test_reference),
      cmocka_unit_test(test_diffusers),       cmocka_unit_test(test_errors),
      cmocka_unit_test(test_halves),          cmocka_unit_test(test_load_parts),
      cmocka_unit_test(test_bad_inputs),
      cmocka_unit_test(test_tiled_whole),     cmocka_unit_test(test_tiled_reference),
      cmocka_unit_test(test_tiling_errors),   cmocka_unit_test(test_progress),
      cmocka_unit_test(test_banded_upsampling), cmocka_unit_test(test_estimates),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
