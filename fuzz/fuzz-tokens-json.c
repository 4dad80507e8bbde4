/* fuzz-tokens-json.c -- libFuzzer target for the token JSON parser (--tokens files) */
/* SPDX-License-Identifier: MIT */
#include "core/status.h"
#include "text/tokenizer.h"

#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const char *keys[] = {"l", "g"};
  char err[LUNA_ERR_LEN];
  for (int k = 0; k < 2; k++) {
    tok_chunks c = {0};
    if (tok_json_parse((const char *)data, size, keys[k], &c, err) == 0) {
      for (int64_t i = 0; i < (int64_t)c.n_chunks * TOK_CHUNK; i++)
        if (c.ids[i] < 0 || c.ids[i] >= TOK_VOCAB) abort();
    }
    tok_chunks_free(&c);
  }
  return 0;
}
