/* tokens_json.c -- token/weight chunks as JSON, in the shape of ComfyUI's CLIP.tokenize() */
/* SPDX-License-Identifier: MIT */
#include "text/tokenizer.h"

#include "core/status.h"

#include <cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
** {"g": [[[id, weight], ... 77 pairs], ... chunks], "l": [...]}
**
** Reading is strict: every chunk has exactly TOK_CHUNK pairs, ids are integers in
** [0, TOK_VOCAB), weights finite numbers. A pair may carry a third element (ComfyUI's
** word id with return_word_ids=True); it is ignored.
*/

/* ---- parse ---- */

static int parse_root(const char *json, size_t len, cJSON **root, char *err) {
  const char *end = NULL;
  *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
  if (*root) return 0;
  size_t pos = end && end >= json && end <= json + len ? (size_t)(end - json) : 0;
  int line = 1, col = 1;
  for (size_t i = 0; i < pos; i++) {
    if (json[i] == '\n') line++, col = 1;
    else col++;
  }
  return luna_fail(err, LUNA_EJSON, "invalid JSON at line %d, column %d", line, col);
}

int tok_json_parse(const char *json, size_t len, const char *key, tok_chunks *out, char *err) {
  memset(out, 0, sizeof *out);
  if (!json || !key) return luna_fail(err, LUNA_EINVAL, "tok_json_parse: no input");
  cJSON *root;
  int rc = parse_root(json, len, &root, err);
  if (rc) return rc;
  const cJSON *list = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, key) : NULL;
  if (!cJSON_IsObject(root)) {
    rc = luna_fail(err, LUNA_ETOKENS, "expected an object with \"l\" and/or \"g\" token chunks");
    goto out;
  }
  if (!list) {
    if (err) err[0] = '\0';
    rc = LUNA_EMISSING;
    goto out;
  }
  int n = cJSON_IsArray(list) ? cJSON_GetArraySize(list) : -1;
  if (n <= 0) {
    rc = luna_fail(err, LUNA_ETOKENS, "\"%s\": expected a non-empty list of chunks", key);
    goto out;
  }
  out->ids = malloc((size_t)n * TOK_CHUNK * sizeof *out->ids);
  out->weights = malloc((size_t)n * TOK_CHUNK * sizeof *out->weights);
  if (!out->ids || !out->weights) {
    rc = luna_fail(err, LUNA_ENOMEM, "\"%s\": out of memory for %d chunks", key, n);
    goto out;
  }
  int ci = 0;
  for (const cJSON *chunk = list->child; chunk; chunk = chunk->next, ci++) {
    int np = cJSON_IsArray(chunk) ? cJSON_GetArraySize(chunk) : -1;
    if (np != TOK_CHUNK) {
      if (np < 0) rc = luna_fail(err, LUNA_ETOKENS, "\"%s\" chunk %d: not a list of [id, weight] pairs", key, ci);
      else rc = luna_fail(err, LUNA_ETOKENS, "\"%s\" chunk %d: %d pairs; every chunk has %d", key, ci, np, TOK_CHUNK);
      goto out;
    }
    int pj = 0;
    for (const cJSON *pair = chunk->child; pair; pair = pair->next, pj++) {
      int ne = cJSON_IsArray(pair) ? cJSON_GetArraySize(pair) : -1;
      if (ne != 2 && ne != 3) {
        rc = luna_fail(err, LUNA_ETOKENS, "\"%s\" chunk %d position %d: expected [id, weight]", key, ci, pj);
        goto out;
      }
      const cJSON *id = pair->child, *w = id->next;
      double d = cJSON_IsNumber(id) ? id->valuedouble : -1.0;
      if (!cJSON_IsNumber(id) || !(d >= 0 && d < TOK_VOCAB) || d != floor(d)) {
        rc = luna_fail(err, LUNA_ETOKENS, "\"%s\" chunk %d position %d: the token id must be an integer in [0, %d)",
                       key, ci, pj, TOK_VOCAB);
        goto out;
      }
      if (!cJSON_IsNumber(w) || !isfinite(w->valuedouble)) {
        rc = luna_fail(err, LUNA_ETOKENS, "\"%s\" chunk %d position %d: the weight must be a finite number", key,
                       ci, pj);
        goto out;
      }
      size_t at = (size_t)ci * TOK_CHUNK + (size_t)pj;
      out->ids[at] = (int32_t)d;
      out->weights[at] = w->valuedouble;
    }
  }
  out->n_chunks = n;
out:
  cJSON_Delete(root);
  if (rc) {
    free(out->ids);
    free(out->weights);
    memset(out, 0, sizeof *out);
  }
  return rc;
}

int tok_json_parse_file(const char *path, const char *key, tok_chunks *out, char *err) {
  memset(out, 0, sizeof *out);
  char *text;
  size_t len;
  int rc = tok_read_file(path, &text, &len, err);
  if (rc) return rc;
  char msg[LUNA_ERR_LEN] = "";
  rc = tok_json_parse(text, len, key, out, msg);
  free(text);
  if (rc == LUNA_EMISSING && !msg[0]) {
    if (err) err[0] = '\0';
    return rc;
  }
  if (rc) return luna_fail(err, rc, "%s: %s", path, msg);
  return 0;
}

/* ---- write ---- */

typedef struct sbuf {
  char *s;
  size_t n, cap;
  int oom;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void sb_printf(sbuf *b, const char *fmt, ...) {
  if (b->oom) return;
  for (;;) {
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(b->s + b->n, b->cap - b->n, fmt, ap);
    va_end(ap);
    if (k < 0) {
      b->oom = 1;
      return;
    }
    if ((size_t)k < b->cap - b->n) {
      b->n += (size_t)k;
      return;
    }
    size_t cap = b->cap * 2 + (size_t)k + 64;
    char *s = realloc(b->s, cap);
    if (!s) {
      b->oom = 1;
      return;
    }
    b->s = s;
    b->cap = cap;
  }
}

/* The shortest "%.*g" text that reads back as 'w', with ".0" added to whole numbers so
** they stay floats; non-finite values as Python's json module writes them. */
static void fmt_weight(double w, char *buf, size_t cap) {
  if (isnan(w)) {
    snprintf(buf, cap, "NaN");
    return;
  }
  if (isinf(w)) {
    snprintf(buf, cap, w > 0 ? "Infinity" : "-Infinity");
    return;
  }
  for (int prec = 1; prec <= 17; prec++) {
    snprintf(buf, cap, "%.*g", prec, w);
    if (strtod(buf, NULL) == w) break;
  }
  if (!strpbrk(buf, ".e")) strncat(buf, ".0", cap - strlen(buf) - 1);
}

static void write_chunks(sbuf *b, const char *key, const tok_chunks *c) {
  sb_printf(b, "\"%s\": [", key);
  for (int i = 0; i < c->n_chunks; i++) {
    sb_printf(b, i ? ", [" : "[");
    for (int j = 0; j < TOK_CHUNK; j++) {
      size_t at = (size_t)i * TOK_CHUNK + (size_t)j;
      char w[40];
      fmt_weight(c->weights[at], w, sizeof w);
      sb_printf(b, j ? ", [%d, %s]" : "[%d, %s]", (int)c->ids[at], w);
    }
    sb_printf(b, "]");
  }
  sb_printf(b, "]");
}

int tok_json_write(const tok_chunks *l, const tok_chunks *g, char **out, char *err) {
  *out = NULL;
  sbuf b = {0};
  b.cap = 4096;
  b.s = malloc(b.cap);
  if (!b.s) return luna_fail(err, LUNA_ENOMEM, "out of memory");
  b.s[0] = '\0';
  sb_printf(&b, "{");
  if (g) write_chunks(&b, "g", g);
  if (l) {
    if (g) sb_printf(&b, ", ");
    write_chunks(&b, "l", l);
  }
  sb_printf(&b, "}");
  if (b.oom) {
    free(b.s);
    return luna_fail(err, LUNA_ENOMEM, "out of memory writing token JSON");
  }
  *out = b.s;
  return 0;
}
