/* tokens_embeds.c -- an encode request's {"embed": i} token slots and its "embeds" matrices (textual inversion) */
/* SPDX-License-Identifier: MIT */
#include "text/tokenizer.h"

#include "core/safetensors.h"
#include "core/status.h"

#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void tok_embeds_free(tok_embeds *e) {
  free(e->rows);
  free(e->slot);
  free(e->row);
  memset(e, 0, sizeof *e);
}

/* Replace each {"embed": i} slot of the chunks 'list' (a copy of "tokens"."key") by the
** id 0 and record it in 'e': tok_json_parse then checks everything else as for ids. */
static int take_slots(cJSON *list, const char *key, tok_embeds *e, char *err) {
  if (!cJSON_IsArray(list)) return 0; /* tok_json_parse says what is wrong */
  int ci = 0;
  for (cJSON *chunk = list->child; chunk; chunk = chunk->next, ci++) {
    if (!cJSON_IsArray(chunk)) continue;
    int pj = 0;
    for (cJSON *pair = chunk->child; pair; pair = pair->next, pj++) {
      cJSON *first = cJSON_IsArray(pair) ? pair->child : NULL;
      if (!cJSON_IsObject(first)) continue;
      const cJSON *ix = cJSON_GetObjectItemCaseSensitive(first, "embed");
      double d = cJSON_IsNumber(ix) ? ix->valuedouble : -1.0;
      if (!ix || cJSON_GetArraySize(first) != 1 || !cJSON_IsNumber(ix) || !(d >= 0 && d < 2147483647.0) ||
          d != floor(d))
        return luna_fail(err, LUNA_ETOKENS, "\"%s\" chunk %d position %d: a slot is an integer id or {\"embed\": i} "
                         "with i a row of \"embeds\".\"%s\"", key, ci, pj, key);
      if (!e->rows)
        return luna_fail(err, LUNA_ETOKENS, "\"%s\" chunk %d position %d: {\"embed\": %d} but the request has no "
                         "\"embeds\".\"%s\" matrix", key, ci, pj, (int)d, key);
      if (d >= e->n_rows)
        return luna_fail(err, LUNA_ETOKENS, "\"%s\" chunk %d position %d: {\"embed\": %d} but \"embeds\".\"%s\" "
                         "has %d rows", key, ci, pj, (int)d, key, e->n_rows);
      if (pj >= TOK_CHUNK) continue; /* an overlong chunk: tok_json_parse refuses it */
      if (e->n == e->cap) {
        int cap = e->cap ? 2 * e->cap : 16;
        int32_t *a = realloc(e->slot, (size_t)cap * sizeof *a);
        if (a) e->slot = a;
        int32_t *b = a ? realloc(e->row, (size_t)cap * sizeof *b) : NULL;
        if (b) e->row = b;
        if (!a || !b) return luna_fail(err, LUNA_ENOMEM, "out of memory");
        e->cap = cap;
      }
      e->slot[e->n] = ci * TOK_CHUNK + pj;
      e->row[e->n++] = (int32_t)d;
      cJSON_ReplaceItemInArray(pair, 0, cJSON_CreateNumber(0));
    }
  }
  return 0;
}

/* The tokens of one encoder from the request's "tokens" object; its {"embed": i}
** slots go to 'e'. */
int tok_json_parse_slots(const cJSON *tokens, const char *key, tok_chunks *out, tok_embeds *e, char *err) {
  const cJSON *k = cJSON_GetObjectItemCaseSensitive(tokens, key);
  if (!k) return luna_fail(err, LUNA_ETOKENS, "\"tokens\" has no \"%s\" chunks; this model needs them", key);
  cJSON *wrap = cJSON_CreateObject(), *copy = cJSON_Duplicate(k, 1);
  cJSON_AddItemToObject(wrap, key, copy);
  int rc = copy ? take_slots(copy, key, e, err) : luna_fail(err, LUNA_ENOMEM, "out of memory");
  char *s = rc ? NULL : cJSON_PrintUnformatted(wrap);
  cJSON_Delete(wrap);
  if (rc) return rc;
  if (!s) return luna_fail(err, LUNA_ENOMEM, "out of memory");
  rc = tok_json_parse(s, strlen(s), key, out, err);
  free(s);
  return rc;
}

/* Read the request's "embeds" matrices ({"l": tensor, "g": tensor}, described like the
** "tensors" of a frame, in the binary part) into aligned copies, checking dtype, shape,
** range, overlap and values (the width: embeds_width, once the slots are known). */
int tok_embeds_parse(const cJSON *o, const uint8_t *bin, uint64_t bin_len, tok_embeds emb[2], char *err) {
  if (!o || cJSON_IsNull(o)) return 0;
  if (!cJSON_IsObject(o))
    return luna_fail(err, LUNA_EINVAL, "\"embeds\" must be an object {\"l\": tensor, \"g\": tensor}");
  for (const cJSON *e = o->child; e; e = e->next) {
    int k = !strcmp(e->string, "l") ? 0 : !strcmp(e->string, "g") ? 1 : -1;
    if (k < 0)
      return luna_fail(err, LUNA_EINVAL, "\"embeds\" has a key \"%.40s\"; only \"l\" and \"g\" are encoders",
                       e->string);
    if (emb[k].rows) return luna_fail(err, LUNA_EINVAL, "\"embeds\".\"%s\" is given twice", e->string);
    st_tensor t = {0};
    char e2[LUNA_ERR_LEN];
    int rc = st_parse_entry(e, &t, "embeds", e2);
    if (rc) return luna_fail(err, rc, "\"embeds\".\"%s\": %s", e->string, e2);
    if (t.dtype != ST_F32)
      return luna_fail(err, LUNA_EDTYPE, "\"embeds\".\"%s\" must be F32, not %s", e->string, st_dtype_name(t.dtype));
    if (t.n_dims != 2 || t.shape[0] < 1 || t.shape[1] < 1 || t.shape[0] > 1000000)
      return luna_fail(err, LUNA_ESHAPE, "\"embeds\".\"%s\" must be 2-D [n, width] with 1 to 1000000 rows",
                       e->string);
    if (t.end > bin_len)
      return luna_fail(err, LUNA_EPROTO, "\"embeds\".\"%s\" ends at byte %llu, past the %llu-byte binary part",
                       e->string, (unsigned long long)t.end, (unsigned long long)bin_len);
    emb[k].n_rows = (int)t.shape[0];
    emb[k].dim = t.shape[1];
    emb[k].begin = t.begin;
    emb[k].end = t.end;
    if (!(emb[k].rows = malloc((size_t)t.end - (size_t)t.begin)))
      return luna_fail(err, LUNA_ENOMEM, "out of memory for \"embeds\".\"%s\"", e->string);
    memcpy(emb[k].rows, bin + t.begin, (size_t)(t.end - t.begin)); /* aligned, whatever the offset */
    for (int64_t i = 0; i < t.shape[0] * t.shape[1]; i++)
      if (!isfinite(emb[k].rows[i]))
        return luna_fail(err, LUNA_EINVAL, "\"embeds\".\"%s\" row %lld column %lld is not finite (%g)", e->string,
                         (long long)(i / t.shape[1]), (long long)(i % t.shape[1]), (double)emb[k].rows[i]);
  }
  if (emb[0].rows && emb[1].rows && emb[0].begin < emb[1].end && emb[1].begin < emb[0].end)
    return luna_fail(err, LUNA_EINVAL, "\"embeds\": \"l\" [%llu, %llu) and \"g\" [%llu, %llu) overlap in the binary part",
                     (unsigned long long)emb[0].begin, (unsigned long long)emb[0].end,
                     (unsigned long long)emb[1].begin, (unsigned long long)emb[1].end);
  return 0;
}

