/* fuzz-lora.c -- libFuzzer target for the LoRA parser (key mapping, validation) and its math */
/* SPDX-License-Identifier: MIT */
#include "core/status.h"
#include "lora/lora.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lora_file *f = NULL;
  char err[LUNA_ERR_LEN];
  if (lora_file_parse(data, size, "fuzz", &f, err) == 0) {
    if (strlen(f->id_hex) != 64 || f->n_unmapped > f->n_te_tensors) abort();
    for (int i = 0; i < f->n_patches; i++) {
      const lora_patch *p = &f->patches[i];
      if (p->out <= 0 || p->in <= 0) abort();
      /* apply the small ones: every factor the parser accepted must be in bounds */
      if (p->out * p->in > 4096) continue;
      float *W = calloc((size_t)(p->out * p->in), sizeof(float));
      if (!W) continue;
      for (int64_t k = 0; k < p->out * p->in; k++) W[k] = (float)(k % 7) - 3.0f;
      if (lora_patch_apply(p, 0.75, W, err) == 0 && p->dora_scale) lora_patch_apply(p, 1.0, W, err);
      free(W);
    }
    lora_file_free(f);
  }
  return 0;
}
