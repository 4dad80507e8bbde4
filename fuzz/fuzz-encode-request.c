/* fuzz-encode-request.c -- libFuzzer target for an encode request's "tokens" with {"embed": i} slots and its "embeds" */
/* SPDX-License-Identifier: MIT */
#include "core/status.h"
#include "text/tokenizer.h"

#include <cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/*
** The input is the request's JSON, a NUL byte, then the frame's binary part (all of it
** JSON when there is no NUL). What lunad does with a request: the "embeds" matrices
** first, then each encoder's chunks with their slots. On success every id is in the
** vocabulary and every slot points inside its matrix's rows.
*/
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const uint8_t *nul = memchr(data, 0, size);
  size_t jlen = nul ? (size_t)(nul - data) : size;
  const uint8_t *bin = nul ? nul + 1 : data + size;
  uint64_t bin_len = (uint64_t)(size - jlen - (nul ? 1 : 0));
  cJSON *msg = cJSON_ParseWithLength((const char *)data, jlen);
  if (!msg) return 0;
  char err[LUNA_ERR_LEN];
  tok_embeds emb[2];
  memset(emb, 0, sizeof emb);
  const cJSON *tokens = cJSON_GetObjectItemCaseSensitive(msg, "tokens");
  if (tok_embeds_parse(cJSON_GetObjectItemCaseSensitive(msg, "embeds"), bin, bin_len, emb, err) == 0 && tokens) {
    static const char *keys[] = {"l", "g"};
    for (int k = 0; k < 2; k++) {
      tok_chunks c = {0};
      if (tok_json_parse_slots(tokens, keys[k], &c, &emb[k], err) == 0) {
        for (int64_t i = 0; i < (int64_t)c.n_chunks * TOK_CHUNK; i++)
          if (c.ids[i] < 0 || c.ids[i] >= TOK_VOCAB) abort();
        for (int s = 0; s < emb[k].n; s++)
          if (emb[k].row[s] < 0 || emb[k].row[s] >= emb[k].n_rows || emb[k].slot[s] < 0 ||
              emb[k].slot[s] >= c.n_chunks * TOK_CHUNK)
            abort();
      }
      tok_chunks_free(&c);
    }
    for (int k = 0; k < 2; k++)
      if (emb[k].rows && (int64_t)(emb[k].end - emb[k].begin) != (int64_t)emb[k].n_rows * emb[k].dim * 4) abort();
  }
  tok_embeds_free(&emb[0]);
  tok_embeds_free(&emb[1]);
  cJSON_Delete(msg);
  return 0;
}
