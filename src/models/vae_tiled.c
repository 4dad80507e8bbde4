/* vae_tiled.c -- ComfyUI's tiled VAE decode and encode: three passes of feathered tiles, averaged */
/* SPDX-License-Identifier: MIT */
#include "models/vae_impl.h"

#include "core/status.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/*
** What ComfyUI does (comfy/sd.py decode_tiled_ / encode_tiled_, comfy/utils.py
** tiled_scale_multidim), per image:
**
**   decode: x = (pass(tile_y = 2t, tile_x = t/2) + pass(t/2, 2t) + pass(t, t)) / 3,
**           image = clamp((x + 1) / 2, 0, 1), with t and the overlap in latent cells
**           (the VAEDecodeTiled node: overlap = tile/4 when tile < 4 overlap, then both
**           divided by the scale, 8);
**   encode: z = pass(t, t); z += pass(t/2, 2t); z += pass(2t, t/2); z /= 3, in pixels
**           (the cropped image), each tile mapped x * 2 - 1 and encoded to its mean.
**
** One pass over an input of size (H, W) with tiles (ty, tx) and overlap o:
**   - if H <= ty and W <= tx the whole input is run at once, unblended;
**   - else the origins along each axis are range(0, size - o, tile - o) (just 0 when
**     size <= tile), each clamped to [0, size - o]; a tile is min(tile, size - pos) long;
**   - the output of a tile lands at round(pos * scale) (Python's round: half to even),
**     scale being 8 for the decoder and 1/8 for the encoder; it is weighted by a mask
**     that starts at 1 and, along each axis whose tile output is longer than the
**     feather f = round(o * scale), is multiplied at positions t and len-1-t by
**     (t + 1) / f for t = 0..f-1 (rows first, then columns, in that order: these are
**     float32 products, like the torch ones);
**   - out += y * mask, div += mask over all tiles; the pass gives out / div.
*/

typedef struct tiler {
  vae_run *r;
  int decode;
  int s;                       /* the VAE's scale */
  const float *src;            /* the image's input, planar [ic, H, W] */
  int64_t ic, H, W;
  int64_t oc, OH, OW;          /* a pass's output [oc, OH, OW] */
  float *acc, *div;            /* [oc, OH, OW] and [OH, OW] */
  float *fy, *fx;              /* a tile's mask factors: two per row (fy) and per column (fx) */
  char *err;
} tiler;

/* Python's round(): to nearest, ties to even (the default rounding mode). */
static int64_t round_half_even(double x) { return (int64_t)nearbyint(x); }

/* Tile origins along an axis (see above); '*out' is malloc'd. */
static int origins(int64_t size, int64_t tile, int64_t ov, int64_t **out, int64_t *n, char *err) {
  int64_t cnt = 1, step = tile - ov;
  if (size > tile) {
    if (step <= 0)
      return luna_fail(err, LUNA_EINVAL, "a tile of %lld with an overlap of %lld does not advance: use a larger tile "
                       "or a smaller overlap", (long long)tile, (long long)ov);
    cnt = (size - ov + step - 1) / step;
  }
  int64_t *p = malloc((size_t)cnt * sizeof *p);
  if (!p) return luna_fail(err, LUNA_ENOMEM, "out of memory");
  for (int64_t i = 0; i < cnt; i++) {
    int64_t v = i * step;
    if (v > size - ov) v = size - ov;
    p[i] = v < 0 ? 0 : v;
  }
  *out = p;
  *n = cnt;
  return 0;
}

/* Mask factors of an axis of 'len' outputs with feather 'f': f2[i] and f2[i+len]... are
** stored as pairs (first, second) in application order, 1 where none applies. */
static void factors(float *pair, int64_t len, int64_t f) {
  for (int64_t i = 0; i < 2 * len; i++) pair[i] = 1.0f;
  if (f <= 0 || f >= len) return;
  uint8_t *used = calloc((size_t)len, 1);
  for (int64_t t = 0; t < f; t++) {
    float a = (float)((double)(t + 1) / (double)f);
    int64_t at2[2] = {t, len - 1 - t};
    for (int k = 0; k < 2; k++) {
      int64_t i = at2[k];
      if (used && used[i] < 2) pair[2 * i + used[i]++] = a;
    }
  }
  free(used);
}

/* Runs the network on the input window [y0, y0+ly) x [x0, x0+lx); returns the output
** buffer (or -1) and its size. */
static int run_window(tiler *T, int64_t y0, int64_t x0, int64_t ly, int64_t lx, int64_t *th, int64_t *tw) {
  vae_run *r = T->r;
  if (r->plan) {
    if ((size_t)(T->ic * ly * lx) > r->need[VAE_BUF_IN]) r->need[VAE_BUF_IN] = (size_t)(T->ic * ly * lx);
  } else {
    float *in = r->buf[VAE_BUF_IN];
    for (int64_t c = 0; c < T->ic; c++)
      for (int64_t y = 0; y < ly; y++)
        memcpy(in + (c * ly + y) * lx, T->src + (c * T->H + y0 + y) * T->W + x0, (size_t)lx * sizeof(float));
  }
  return T->decode ? vae_run_decoder(r, VAE_BUF_IN, ly, lx, th, tw) : vae_run_encoder(r, VAE_BUF_IN, ly, lx, th, tw);
}

/* One pass with tiles (ty, tx) and overlap 'ov' (input units): the result goes to T->acc. */
static int pass(tiler *T, int64_t ty, int64_t tx, int64_t ov) {
  vae_run *r = T->r;
  int64_t th, tw, npix = T->OH * T->OW;
  if (T->H <= ty && T->W <= tx) {
    int o = run_window(T, 0, 0, T->H, T->W, &th, &tw);
    if (o < 0) return r->rc;
    if (th != T->OH || tw != T->OW)
      return luna_fail(T->err, LUNA_EINTERNAL, "tiled VAE: output %lld x %lld, expected %lld x %lld", (long long)th,
                       (long long)tw, (long long)T->OH, (long long)T->OW);
    if (!r->plan) memcpy(T->acc, r->buf[o], (size_t)(T->oc * npix) * sizeof(float));
    return 0;
  }
  int64_t *py = NULL, *px = NULL, ny = 0, nx = 0;
  int rc = origins(T->H, ty, ov, &py, &ny, T->err);
  if (!rc) rc = origins(T->W, tx, ov, &px, &nx, T->err);
  if (!rc && !r->plan) {
    memset(T->acc, 0, (size_t)(T->oc * npix) * sizeof(float));
    memset(T->div, 0, (size_t)npix * sizeof(float));
  }
  int64_t feather = T->decode ? ov * T->s : round_half_even((double)ov / T->s);
  for (int64_t iy = 0; iy < ny && !rc; iy++)
    for (int64_t ix = 0; ix < nx && !rc; ix++) {
      int64_t y0 = py[iy], x0 = px[ix];
      int64_t ly = ty < T->H - y0 ? ty : T->H - y0, lx = tx < T->W - x0 ? tx : T->W - x0;
      if (!T->decode && (ly < T->s || lx < T->s)) {
        rc = luna_fail(T->err, LUNA_EINVAL, "tiling gives a piece of %lld x %lld pixels, smaller than the VAE's %d: "
                       "use a larger tile or overlap", (long long)ly, (long long)lx, T->s);
        break;
      }
      int o = run_window(T, y0, x0, ly, lx, &th, &tw);
      if (o < 0) {
        rc = r->rc;
        break;
      }
      int64_t oy = T->decode ? y0 * T->s : round_half_even((double)y0 / T->s);
      int64_t ox = T->decode ? x0 * T->s : round_half_even((double)x0 / T->s);
      if (th < 1 || tw < 1 || oy + th > T->OH || ox + tw > T->OW) {
        rc = luna_fail(T->err, LUNA_EINVAL, "tiling puts a %lld x %lld output at (%lld, %lld) of %lld x %lld: use a "
                       "tile and overlap that are multiples of %d", (long long)th, (long long)tw, (long long)oy,
                       (long long)ox, (long long)T->OH, (long long)T->OW, T->s);
        break;
      }
      if (r->plan) continue;
      factors(T->fy, th, feather);
      factors(T->fx, tw, feather);
      const float *y = r->buf[o];
      for (int64_t i = 0; i < th; i++) {
        float row = T->fy[2 * i] * T->fy[2 * i + 1];
        float *d = T->div + (oy + i) * T->OW + ox;
        for (int64_t j = 0; j < tw; j++) d[j] += row * T->fx[2 * j] * T->fx[2 * j + 1];
        for (int64_t c = 0; c < T->oc; c++) {
          const float *src = y + (c * th + i) * tw;
          float *a = T->acc + (c * T->OH + oy + i) * T->OW + ox;
          for (int64_t j = 0; j < tw; j++) {
            float mk = row * T->fx[2 * j] * T->fx[2 * j + 1];
            a[j] += src[j] * mk;
          }
        }
      }
    }
  free(py);
  free(px);
  if (rc || r->plan) return rc;
  for (int64_t p = 0; p < npix; p++)
    if (!(T->div[p] > 0.0f))
      return luna_fail(T->err, LUNA_EINVAL, "tiling leaves output (%lld, %lld) uncovered: use a tile and overlap that "
                       "are multiples of %d", (long long)(p / T->OW), (long long)(p % T->OW), T->s);
  for (int64_t c = 0; c < T->oc; c++)
    for (int64_t p = 0; p < npix; p++) T->acc[c * npix + p] /= T->div[p];
  return 0;
}

/* Plans the three passes, then allocates the run's buffers and the tiler's. */
static int setup(tiler *T, vae_run *p, vae_run *r, const int64_t shapes[3][2], int64_t ov, int B,
                 size_t extra_floats, char *err) {
  T->r = p;
  for (int k = 0; k < 3; k++) {
    int rc = pass(T, shapes[k][0], shapes[k][1], ov);
    if (rc) return rc;
  }
  p->done *= B;
  size_t npix = (size_t)(T->OH * T->OW), own = (size_t)T->oc * npix + npix + 4 * (size_t)(T->OH + T->OW);
  int rc = vae_run_alloc(r, p, 1, (own + extra_floats) * sizeof(float), err);
  if (rc) return rc;
  T->r = r;
  T->acc = malloc((size_t)T->oc * npix * sizeof(float));
  T->div = malloc(npix * sizeof(float));
  T->fy = malloc(2 * (size_t)T->OH * sizeof(float));
  T->fx = malloc(2 * (size_t)T->OW * sizeof(float));
  if (!T->acc || !T->div || !T->fy || !T->fx) return luna_fail(err, LUNA_ENOMEM, "out of memory for tiling");
  return 0;
}

static void teardown(tiler *T, vae_run *r) {
  free(T->acc);
  free(T->div);
  free(T->fy);
  free(T->fx);
  vae_run_free(r, 1);
}

int vae_decode_tiled(const vae *m, ops_pool *pool, const float *latent, int B, int64_t h, int64_t w,
                     const vae_tiling *t, float *image, vae_progress_fn progress, void *ud, char *err) {
  int s = m->scale;
  int64_t tile = t->tile, ov = t->overlap;
  if (tile < 1 || ov < 0)
    return luna_fail(err, LUNA_EINVAL, "tiling: tile %d and overlap %d pixels", t->tile, t->overlap);
  if (tile < ov * 4) ov = tile / 4; /* the VAEDecodeTiled node */
  int64_t tl = tile / s, ol = ov / s;
  if (tl < 1) return luna_fail(err, LUNA_EINVAL, "a tile of %d pixels is smaller than a latent cell (%d)", t->tile, s);
  const int64_t shapes[3][2] = {{tl * 2, tl / 2}, {tl / 2, tl * 2}, {tl, tl}};
  int64_t L = m->hp.latent_channels;
  tiler T = {.decode = 1, .s = s, .ic = L, .H = h, .W = w, .oc = 3, .OH = h * s, .OW = w * s, .err = err};
  vae_run p, r;
  vae_run_init(&p, m, pool, 1, "decode");
  vae_run_init(&r, m, pool, 0, "decode");
  r.progress = progress;
  r.ud = ud;
  r.err = err;
  int rc = setup(&T, &p, &r, shapes, ol, B, 0, err);
  size_t npix = (size_t)(T.OH * T.OW);
  for (int b = 0; b < B && !rc; b++) {
    T.src = latent + (size_t)b * (size_t)(L * h * w);
    float *img = image + (size_t)b * npix * 3;
    for (int k = 0; k < 3 && !rc; k++) {
      if ((rc = pass(&T, shapes[k][0], shapes[k][1], ol))) break;
      for (size_t q = 0; q < npix; q++)
        for (int c = 0; c < 3; c++) {
          float v = T.acc[(size_t)c * npix + q];
          img[q * 3 + c] = k ? img[q * 3 + c] + v : v;
        }
    }
    if (rc) break;
    for (size_t q = 0; q < 3 * npix; q++) {
      float v = (img[q] / 3.0f + 1.0f) / 2.0f;
      img[q] = v < 0.0f ? 0.0f : v > 1.0f ? 1.0f : v;
    }
  }
  teardown(&T, &r);
  return rc;
}

int vae_encode_tiled(const vae *m, ops_pool *pool, const float *pixels, int B, int64_t H, int64_t W,
                     const vae_tiling *t, float *latent, vae_progress_fn progress, void *ud, char *err) {
  int s = m->scale;
  int64_t tile = t->tile, ov = t->overlap;
  if (tile < 2 || ov < 0)
    return luna_fail(err, LUNA_EINVAL, "tiling: tile %d and overlap %d pixels", t->tile, t->overlap);
  const int64_t shapes[3][2] = {{tile, tile}, {tile / 2, tile * 2}, {tile * 2, tile / 2}};
  int64_t Hc = H / s * s, Wc = W / s * s, L = m->hp.latent_channels;
  tiler T = {.decode = 0, .s = s, .ic = 3, .H = Hc, .W = Wc, .oc = L, .OH = Hc / s, .OW = Wc / s, .err = err};
  vae_run p, r;
  vae_run_init(&p, m, pool, 1, "encode");
  vae_run_init(&r, m, pool, 0, "encode");
  r.progress = progress;
  r.ud = ud;
  r.err = err;
  int rc = setup(&T, &p, &r, shapes, ov, B, (size_t)(3 * Hc * Wc), err);
  float *img = rc ? NULL : malloc((size_t)(3 * Hc * Wc) * sizeof(float));
  if (!rc && !img) rc = luna_fail(err, LUNA_ENOMEM, "out of memory for a %lld x %lld image", (long long)Hc,
                                  (long long)Wc);
  size_t n = (size_t)(L * T.OH * T.OW);
  for (int b = 0; b < B && !rc; b++) {
    vae_prepare_pixels(m, pixels + (size_t)b * (size_t)(H * W * 3), H, W, img);
    T.src = img;
    float *z = latent + (size_t)b * n;
    for (int k = 0; k < 3 && !rc; k++) {
      if ((rc = pass(&T, shapes[k][0], shapes[k][1], ov))) break;
      for (size_t q = 0; q < n; q++) z[q] = k ? z[q] + T.acc[q] : T.acc[q];
    }
    if (!rc)
      for (size_t q = 0; q < n; q++) z[q] /= 3.0f;
  }
  free(img);
  teardown(&T, &r);
  return rc;
}
