/* lora_id.c -- a LoRA's content identity (SHA-256 of its text-encoder tensors) and the upload image */
/* SPDX-License-Identifier: MIT */
/*
** This file depends only on src/core/, cJSON and nettle: the client library carries it,
** so that a client computes the same identity as the daemon and uploads only what the
** daemon reads (the text-encoder tensors).
*/
#include "lora/lora.h"

#include "core/status.h"

#include <cJSON.h>
#include <nettle/sha2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const te_prefixes[] = {
    "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_prior_te_",
    "text_encoder.", "text_encoder_2.", "text_encoders.",
};

int lora_is_te_key(const char *name) {
  for (size_t i = 0; i < sizeof te_prefixes / sizeof te_prefixes[0]; i++)
    if (!strncmp(name, te_prefixes[i], strlen(te_prefixes[i]))) return 1;
  return 0;
}

/* Feed 'v' to the hash as 8 little-endian bytes. */
static void hash_u64(struct sha256_ctx *c, uint64_t v) {
  uint8_t b[8];
  for (int i = 0; i < 8; i++) b[i] = (uint8_t)(v >> (8 * i));
  sha256_update(c, sizeof b, b);
}

static void hash_bytes(struct sha256_ctx *c, const void *p, size_t n) {
  hash_u64(c, n);
  if (n) sha256_update(c, n, p);
}

void lora_identity(const st_file *f, uint8_t id[LORA_ID_LEN]) {
  struct sha256_ctx c;
  sha256_init(&c);
  /* f->tensors is sorted by strcmp, which compares bytes as unsigned char */
  for (size_t i = 0; i < f->n_tensors; i++) {
    const st_tensor *t = &f->tensors[i];
    if (!lora_is_te_key(t->name)) continue;
    const char *dt = st_dtype_name(t->dtype);
    hash_bytes(&c, t->name, strlen(t->name));
    hash_bytes(&c, dt, strlen(dt));
    hash_u64(&c, (uint64_t)t->n_dims);
    for (int d = 0; d < t->n_dims; d++) hash_u64(&c, (uint64_t)t->shape[d]);
    hash_bytes(&c, t->data, (size_t)(t->end - t->begin));
  }
  sha256_digest(&c, LORA_ID_LEN, id);
}

void lora_id_hex(const uint8_t id[LORA_ID_LEN], char hex[LORA_ID_HEX]) {
  static const char digits[] = "0123456789abcdef";
  for (int i = 0; i < LORA_ID_LEN; i++) {
    hex[2 * i] = digits[id[i] >> 4];
    hex[2 * i + 1] = digits[id[i] & 15];
  }
  hex[2 * LORA_ID_LEN] = '\0';
}

static int hex_digit(char ch) {
  if (ch >= '0' && ch <= '9') return ch - '0';
  if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
  return -1;
}

int lora_id_parse(const char *hex, uint8_t id[LORA_ID_LEN]) {
  if (!hex || strlen(hex) != 2 * LORA_ID_LEN) return LUNA_EINVAL;
  uint8_t tmp[LORA_ID_LEN];
  for (int i = 0; i < LORA_ID_LEN; i++) {
    int hi = hex_digit(hex[2 * i]), lo = hex_digit(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return LUNA_EINVAL;
    tmp[i] = (uint8_t)(hi << 4 | lo);
  }
  memcpy(id, tmp, sizeof tmp);
  return 0;
}

/* Add 'key': [v0, v1, ...] written as exact integers (cJSON would print doubles). */
static int add_int_array(cJSON *obj, const char *key, const uint64_t *v, int n) {
  char buf[ST_MAX_DIMS * 22 + 3];
  size_t at = 0;
  buf[at++] = '[';
  for (int i = 0; i < n; i++)
    at += (size_t)snprintf(buf + at, sizeof buf - at, "%s%llu", i ? "," : "", (unsigned long long)v[i]);
  buf[at++] = ']';
  buf[at] = '\0';
  return cJSON_AddRawToObject(obj, key, buf) != NULL;
}

int lora_extract_te(const st_file *f, uint8_t **out, size_t *len, char *err) {
  *out = NULL;
  *len = 0;
  cJSON *root = cJSON_CreateObject();
  char *json = NULL;
  int rc = 0;
  if (!root) return luna_fail(err, LUNA_ENOMEM, "%s: out of memory", f->path);
  uint64_t off = 0;
  for (size_t i = 0; i < f->n_tensors; i++) {
    const st_tensor *t = &f->tensors[i];
    if (!lora_is_te_key(t->name)) continue;
    uint64_t shape[ST_MAX_DIMS], offs[2] = {off, off + (t->end - t->begin)};
    for (int d = 0; d < t->n_dims; d++) shape[d] = (uint64_t)t->shape[d];
    cJSON *e = cJSON_AddObjectToObject(root, t->name);
    if (!e || !cJSON_AddStringToObject(e, "dtype", st_dtype_name(t->dtype)) ||
        !add_int_array(e, "shape", shape, t->n_dims) || !add_int_array(e, "data_offsets", offs, 2)) {
      rc = luna_fail(err, LUNA_ENOMEM, "%s: out of memory", f->path);
      goto done;
    }
    off = offs[1];
  }
  json = cJSON_PrintUnformatted(root);
  if (!json) { rc = luna_fail(err, LUNA_ENOMEM, "%s: out of memory", f->path); goto done; }
  size_t hl = strlen(json), padded = (hl + 7) & ~(size_t)7, total = 8 + padded + (size_t)off;
  uint8_t *b = malloc(total);
  if (!b) {
    rc = luna_fail(err, LUNA_ENOMEM, "%s: out of memory for a %zu-byte image", f->path, total);
    goto done;
  }
  for (int i = 0; i < 8; i++) b[i] = (uint8_t)((uint64_t)padded >> (8 * i));
  memcpy(b + 8, json, hl);
  memset(b + 8 + hl, ' ', padded - hl);
  uint8_t *data = b + 8 + padded;
  for (size_t i = 0; i < f->n_tensors; i++) {
    const st_tensor *t = &f->tensors[i];
    if (!lora_is_te_key(t->name)) continue;
    size_t n = (size_t)(t->end - t->begin);
    if (n) memcpy(data, t->data, n);
    data += n;
  }
  *out = b;
  *len = total;
done:
  free(json);
  cJSON_Delete(root);
  return rc;
}
