/* fuzz-safetensors.c -- libFuzzer target for the safetensors header parser */
/* SPDX-License-Identifier: MIT */
#include "core/safetensors.h"
#include "core/status.h"

#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  st_file *f = NULL;
  char err[LUNA_ERR_LEN];
  if (st_parse(data, size, "fuzz", &f, err) == 0) {
    /* touch everything the parser promised is in bounds */
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < f->n_tensors; i++) {
      const st_tensor *t = &f->tensors[i];
      if (t->end > t->begin) sink ^= t->data[0] ^ t->data[t->end - t->begin - 1];
      if (st_find(f, t->name) != t) abort();
    }
    (void)sink;
    st_close(f);
  }
  return 0;
}
