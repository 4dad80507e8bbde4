/* cmd_demo.c -- 'luna demo-model': writes the built-in demo model, a small random CLIP-L and VAE */
/* SPDX-License-Identifier: MIT */
/*
** The demo model has the real architecture and the real tensor names of an SD1
** checkpoint's text encoder (cond_stage_model.transformer.text_model.*, width 128, 4
** layers) and VAE (first_stage_model.*, 32 base channels instead of 128, 4 levels: the
** real 8x scale), with weights drawn from a fixed-seed generator. It lets 'make run'
** work with no downloads. Its embeddings and images are meaningless: use a real
** checkpoint for pictures.
*/
#include "cli/commands.h"
#include "core/fp16.h"
#include "core/safetensors.h"
#include "core/status.h"
#include "models/clip_text.h"
#include "models/vae.h"

#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEMO_WIDTH 128
#define DEMO_LAYERS 4

typedef struct demo {
  st_wtensor t[512];
  size_t n;
  uint64_t rng;
  int oom;
} demo;

static uint64_t splitmix64(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static double normal(uint64_t *s) {
  double u1 = ((double)(splitmix64(s) >> 11) + 0.5) / 9007199254740992.0;
  double u2 = (double)(splitmix64(s) >> 11) / 9007199254740992.0;
  return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

static void add_tensor(void *ud, const char *name, int n_dims, const int64_t *shape) {
  demo *d = ud;
  if (d->n == sizeof d->t / sizeof *d->t) { d->oom = 1; return; }
  int64_t n = 1;
  for (int i = 0; i < n_dims; i++) n *= shape[i];
  uint16_t *v = malloc((size_t)n * 2);
  char *nm = strdup(name);
  if (!v || !nm) { free(v); free(nm); d->oom = 1; return; }
  size_t len = strlen(name);
  /* norms' scales (1-D weights) near 1, biases small, matrices N(0, 0.02^2); a VAE
  ** convolution N(0, 1/fan_in) so that activations keep their scale */
  int is_norm_w = n_dims == 1 && len > 7 && !strcmp(name + len - 7, ".weight");
  int is_bias = len > 5 && !strcmp(name + len - 5, ".bias");
  double std = 0.02;
  if (n_dims == 4) std = 1.0 / sqrt((double)(shape[1] * shape[2] * shape[3]));
  for (int64_t i = 0; i < n; i++) {
    double x = normal(&d->rng);
    double val = is_norm_w ? 1.0 + 0.05 * x : is_bias ? 0.01 * x : std * x;
    v[i] = f32_to_fp16((float)val);
  }
  st_wtensor *t = &d->t[d->n++];
  t->name = nm;
  t->dtype = ST_F16;
  t->n_dims = n_dims;
  memcpy(t->shape, shape, (size_t)n_dims * sizeof(int64_t));
  t->data = v;
}

int cmd_demo_model(int argc, char **argv) {
  static const struct option opts[] = {{"out", required_argument, 0, 'o'},
                                       {"seed", required_argument, 0, 's'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
  const char *out = NULL;
  unsigned long long seed = 20251012;
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
    if (c == 'o') out = optarg;
    else if (c == 's') seed = strtoull(optarg, NULL, 10);
    else if (c == 'h') {
      printf("usage: luna demo-model --out FILE.safetensors [--seed N]\n\n"
             "Writes the built-in demo model: an SD1 checkpoint with real tensor names holding a\n"
             "CLIP-L text encoder (width %d, %d layers) and a VAE (32 base channels, 4 levels),\n"
             "F16 weights drawn from a fixed seed. Its embeddings and images are meaningless; it\n"
             "exists so that 'make run' works without downloads.\n",
             DEMO_WIDTH, DEMO_LAYERS);
      return 0;
    } else {
      fprintf(stderr, "usage: luna demo-model --out FILE.safetensors [--seed N]\n");
      return 2;
    }
  }
  if (!out || optind < argc) {
    fprintf(stderr, "usage: luna demo-model --out FILE.safetensors [--seed N]\n");
    return 2;
  }
  demo d = {.rng = seed};
  clip_hparams hp = {DEMO_LAYERS, DEMO_WIDTH, DEMO_WIDTH / CLIP_HEAD_DIM, 4 * DEMO_WIDTH, 0};
  clip_text_enumerate("cond_stage_model.transformer.", CLIP_LAYOUT_HF, &hp, add_tensor, &d);
  vae_hparams vh = {.ch = 32, .n_levels = 4, .ch_mult = {1, 2, 4, 4}, .num_res_blocks = 2, .z_channels = 4,
                    .latent_channels = 4, .has_quant = 1, .has_encoder = 1, .has_decoder = 1};
  vae_enumerate("first_stage_model.", VAE_LAYOUT_LDM, &vh, add_tensor, &d);
  char err[LUNA_ERR_LEN] = "out of memory";
  const char *meta[] = {"luna.demo", "random weights from a fixed seed; meaningless embeddings"};
  int rc = d.oom ? 1 : st_write(out, d.t, d.n, meta, 1, err) ? 1 : 0;
  if (rc) fprintf(stderr, "luna demo-model: %s\n", err);
  for (size_t i = 0; i < d.n; i++) {
    free((void *)d.t[i].name);
    free((void *)d.t[i].data);
  }
  return rc;
}
