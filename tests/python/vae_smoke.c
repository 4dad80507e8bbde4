/* vae_smoke.c -- the VAE calls of libluna against test_vae_client.py's fake lunad, knowing only include/luna.h */
/* SPDX-License-Identifier: MIT */
/*
** usage: vae_smoke SOCKET
** Prints one line per step, "NAME RC DETAILS", which the test compares. The fake answers
** a decode with image[b, Y, X, c] = latent[b, c % C, Y / 8, X / 8] and an encode with
** latent[b, k, y, x] = pixels[b, oy + 8y, ox + 8x, k % 3] (oy = (H % 8) / 2, likewise
** ox, 4 channels); the model's name picks how it misbehaves around progress frames.
*/
#include "luna.h"
#include "luna_proto.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The fractions one call's progress callback received, as "0.25,0.5,...". */
typedef struct seen {
  char text[256];
  int n;
} seen;

static void on_progress(void *ud, double fraction) {
  seen *s = ud;
  size_t at = strlen(s->text);
  snprintf(s->text + at, sizeof s->text - at, "%s%g", s->n++ ? "," : "", fraction);
}

static float latent_value(int64_t i) { return (float)((i * 37) % 101) / 50.0f - 1.0f; }

/* Decode a [B, C, h, w] latent on 'c' with 'model', printing the outcome as 'name'. */
static int decode(luna_client *c, const char *name, const char *model, int with_progress, int64_t B, int64_t C,
                  int64_t h, int64_t w) {
  int64_t n = B * C * h * w;
  float *lat = malloc((size_t)n * sizeof *lat);
  if (!lat) return -2;
  for (int64_t i = 0; i < n; i++) lat[i] = latent_value(i);
  seen s = {"", 0};
  luna_vae_args a = {model, LUNA_TILED_ON, 256, 32, with_progress ? on_progress : NULL, &s, 500};
  luna_tensor img;
  int rc = luna_client_vae_decode(c, &a, lat, B, C, h, w, &img);
  long bad = 0;
  if (!rc) {
    int64_t H = 8 * h, W = 8 * w;
    for (int64_t b = 0; b < B; b++)
      for (int64_t y = 0; y < H; y++)
        for (int64_t x = 0; x < W; x++)
          for (int k = 0; k < 3; k++) {
            float want = lat[((b * C + k % C) * h + y / 8) * w + x / 8];
            bad += img.data[((b * H + y) * W + x) * 3 + k] != want;
          }
  }
  printf("%s %d dims=%d shape=[%lld,%lld,%lld,%lld] bad=%ld progress=%s null=%d msg='%s'\n", name, rc, img.n_dims,
         (long long)img.shape[0], (long long)img.shape[1], (long long)img.shape[2], (long long)img.shape[3], bad,
         s.n ? s.text : "-", img.data == NULL, luna_client_errmsg(c));
  luna_tensor_free(&img);
  luna_tensor_free(&img); /* again: harmless */
  free(lat);
  return rc;
}

static int encode(luna_client *c, const char *name, const char *model, int64_t B, int64_t H, int64_t W) {
  int64_t n = B * H * W * 3;
  float *pix = malloc((size_t)n * sizeof *pix);
  if (!pix) return -2;
  for (int64_t i = 0; i < n; i++) pix[i] = (float)(i % 256) / 255.0f;
  seen s = {"", 0};
  luna_vae_args a = {model, LUNA_TILED_AUTO, 0, 0, on_progress, &s, 0};
  luna_tensor lat;
  int rc = luna_client_vae_encode(c, &a, pix, B, H, W, &lat);
  long bad = 0;
  if (!rc) {
    int64_t h = H / 8, w = W / 8, oy = (H % 8) / 2, ox = (W % 8) / 2, C = lat.shape[1];
    for (int64_t b = 0; b < B; b++)
      for (int64_t k = 0; k < C; k++)
        for (int64_t y = 0; y < h; y++)
          for (int64_t x = 0; x < w; x++)
            bad += lat.data[((b * C + k) * h + y) * w + x] != pix[((b * H + oy + 8 * y) * W + ox + 8 * x) * 3 + k % 3];
  }
  printf("%s %d shape=[%lld,%lld,%lld,%lld] bad=%ld progress=%s msg='%s'\n", name, rc, (long long)lat.shape[0],
         (long long)lat.shape[1], (long long)lat.shape[2], (long long)lat.shape[3], bad, s.n ? s.text : "-",
         luna_client_errmsg(c));
  luna_tensor_free(&lat);
  free(pix);
  return rc;
}

static luna_client *reconnect(luna_client *c, const char *path) {
  luna_client_close(c);
  c = NULL;
  if (luna_client_connect_unix(path, &c)) {
    printf("reconnect failed: %s\n", luna_client_errmsg(c));
    exit(1);
  }
  return c;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: vae_smoke SOCKET\n");
    return 2;
  }
  luna_client *c = reconnect(NULL, argv[1]);

  decode(c, "decode", "vae.safetensors", 1, 2, 4, 3, 5);
  encode(c, "encode", "vae.safetensors", 1, 20, 18);
  decode(c, "decode-quiet", "always-progress.safetensors", 0, 1, 4, 2, 2);
  decode(c, "fail-after-progress", "fail-after-progress.safetensors", 1, 1, 4, 2, 2);
  printf("ping-after-error %d\n", luna_client_ping(c));

  decode(c, "wrong-id", "progress-wrong-id.safetensors", 1, 1, 4, 2, 2);
  printf("ping-after-eproto %d\n", luna_client_ping(c));
  c = reconnect(c, argv[1]);
  decode(c, "binary", "progress-binary.safetensors", 1, 1, 4, 2, 2);
  c = reconnect(c, argv[1]);
  decode(c, "bad-progress", "progress-bad.safetensors", 1, 1, 4, 2, 2);
  c = reconnect(c, argv[1]);
  decode(c, "wrong-type", "progress-wrong-type.safetensors", 1, 1, 4, 2, 2);
  c = reconnect(c, argv[1]);
  decode(c, "bad-shape", "bad-shape.safetensors", 1, 1, 4, 2, 2);
  c = reconnect(c, argv[1]);

  /* arguments refused before anything is sent */
  float one[4 * 8 * 8 * 3] = {0};
  luna_tensor t;
  luna_vae_args bad = {"vae.safetensors", 7, 0, 0, NULL, NULL, 0};
  printf("bad-tiled %d\n", luna_client_vae_decode(c, &bad, one, 1, 4, 1, 1, &t));
  luna_vae_args ov = {"vae.safetensors", LUNA_TILED_ON, 64, 64, NULL, NULL, 0};
  printf("bad-overlap %d\n", luna_client_vae_decode(c, &ov, one, 1, 4, 1, 1, &t));
  luna_vae_args ok = {"vae.safetensors", LUNA_TILED_AUTO, 0, 0, NULL, NULL, 0};
  printf("null-latent %d\n", luna_client_vae_decode(c, &ok, NULL, 1, 4, 1, 1, &t));
  printf("zero-dim %d\n", luna_client_vae_decode(c, &ok, one, 1, 0, 1, 1, &t));
  printf("tiny-image %d null=%d\n", luna_client_vae_encode(c, &ok, one, 1, 4, 8, &t), t.data == NULL);
  luna_vae_args nomodel = {NULL, 0, 0, 0, NULL, NULL, 0};
  printf("no-model %d\n", luna_client_vae_encode(c, &nomodel, one, 1, 8, 8, &t));
  printf("null-client %d\n", luna_client_vae_encode(NULL, &ok, one, 1, 8, 8, &t));
  printf("ping-at-end %d\n", luna_client_ping(c));
  luna_tensor_free(NULL);
  luna_client_close(c);
  return 0;
}
