/* frame.c -- encoding and validating lunad frames, shared by the daemon and the clients */
/* SPDX-License-Identifier: MIT */
#include "proto/frame.h"

#include "core/status.h"
#include "core/utf8.h"

#include <stdlib.h>
#include <string.h>

static uint64_t get_le(const uint8_t *p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

static void put_le(uint8_t *p, uint64_t v, int n) {
  for (int i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
}

int frame_parse_header(const uint8_t *buf, size_t len, uint64_t max_frame, frame_header *h, char *err) {
  if (len < LUNA_FRAME_HEADER) return FRAME_NEED_MORE;
  h->version = (uint16_t)get_le(buf + 4, 2);
  h->type = (uint16_t)get_le(buf + 6, 2);
  h->flags = (uint32_t)get_le(buf + 8, 4);
  h->json_len = (uint32_t)get_le(buf + 12, 4);
  h->request_id = get_le(buf + 16, 8);
  h->bin_len = get_le(buf + 24, 8);
  if (memcmp(buf, LUNA_PROTO_MAGIC, 4))
    return luna_fail(err, LUNA_EPROTO, "frame header: bad magic %02x %02x %02x %02x (expected 'LUNA')",
                     buf[0], buf[1], buf[2], buf[3]);
  if (h->version != LUNA_PROTO_VERSION)
    return luna_fail(err, LUNA_EVERSION, "frame header: protocol version %u, this side speaks %d",
                     h->version, LUNA_PROTO_VERSION);
  if (h->json_len > LUNA_MAX_JSON)
    return luna_fail(err, LUNA_ETOOBIG, "frame header: json_len %u exceeds %u", h->json_len, LUNA_MAX_JSON);
  /* compared by subtraction: no sum can wrap */
  if (max_frame < LUNA_FRAME_HEADER || h->json_len > max_frame - LUNA_FRAME_HEADER ||
      h->bin_len > max_frame - LUNA_FRAME_HEADER - h->json_len)
    return luna_fail(err, LUNA_ETOOBIG, "frame header: %llu bytes of payload exceed the maximum frame of %llu",
                     (unsigned long long)((uint64_t)h->json_len + (h->bin_len > max_frame ? max_frame : h->bin_len)),
                     (unsigned long long)max_frame);
  return FRAME_OK;
}

void frame_write_header(uint8_t out[LUNA_FRAME_HEADER], const frame_header *h) {
  memcpy(out, LUNA_PROTO_MAGIC, 4);
  put_le(out + 4, h->version, 2);
  put_le(out + 6, h->type, 2);
  put_le(out + 8, h->flags, 4);
  put_le(out + 12, h->json_len, 4);
  put_le(out + 16, h->request_id, 8);
  put_le(out + 24, h->bin_len, 8);
}

static int cmp_key(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The first key that appears twice in object 'o', or NULL (sorted: n log n, whatever a
** client sends). */
static const char *duplicate_key(const cJSON *o, int *oom) {
  size_t n = 0;
  for (const cJSON *e = o->child; e; e = e->next) n++;
  if (n < 2) return NULL;
  const char **keys = malloc(n * sizeof *keys);
  if (!keys) {
    *oom = 1;
    return NULL;
  }
  size_t i = 0;
  for (const cJSON *e = o->child; e; e = e->next) keys[i++] = e->string;
  qsort(keys, n, sizeof *keys, cmp_key);
  const char *dup = NULL;
  for (i = 1; i < n && !dup; i++)
    if (!strcmp(keys[i], keys[i - 1])) dup = keys[i];
  free(keys);
  return dup;
}

int frame_parse_json(const uint8_t *json, size_t len, cJSON **out, char *err) {
  *out = NULL;
  if (len == 0) return luna_fail(err, LUNA_EJSON, "JSON part is empty (send {} for no fields)");
  size_t bad;
  if (!utf8_valid(json, len, &bad)) return luna_fail(err, LUNA_EJSON, "JSON part is not valid UTF-8 (byte %zu)", bad);
  if (memchr(json, 0, len)) return luna_fail(err, LUNA_EJSON, "JSON part contains a NUL byte");
  const char *end = NULL;
  cJSON *v = cJSON_ParseWithLengthOpts((const char *)json, len, &end, 0);
  if (!v) return luna_fail(err, LUNA_EJSON, "JSON part does not parse (near byte %zu)",
                           end ? (size_t)(end - (const char *)json) : (size_t)0);
  for (const char *p = end; p < (const char *)json + len; p++)
    if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
      cJSON_Delete(v);
      return luna_fail(err, LUNA_EJSON, "trailing bytes after the JSON object (byte %zu)",
                       (size_t)(p - (const char *)json));
    }
  if (!cJSON_IsObject(v)) {
    cJSON_Delete(v);
    return luna_fail(err, LUNA_EJSON, "JSON part is not an object");
  }
  /* a repeated key would mean one thing to one reader and another to the next */
  const cJSON *ts = cJSON_GetObjectItemCaseSensitive(v, "tensors");
  int oom = 0;
  const char *dup = duplicate_key(v, &oom);
  const char *where = "";
  if (!dup && !oom && cJSON_IsObject(ts)) {
    dup = duplicate_key(ts, &oom);
    where = "\"tensors\" ";
  }
  if (dup || oom) {
    int rc = oom ? luna_fail(err, LUNA_ENOMEM, "out of memory checking the JSON part")
                 : luna_fail(err, LUNA_EJSON, "JSON part: %skey '%.64s' appears more than once", where, dup);
    cJSON_Delete(v);
    return rc;
  }
  *out = v;
  return 0;
}

int frame_get_tensor(const cJSON *msg, const char *name, const uint8_t *bin, uint64_t bin_len,
                     frame_tensor *out, char *err) {
  const cJSON *ts = cJSON_GetObjectItemCaseSensitive(msg, "tensors");
  const cJSON *e = ts && cJSON_IsObject(ts) ? cJSON_GetObjectItemCaseSensitive(ts, name) : NULL;
  if (!e) return LUNA_EMISSING;
  st_tensor t = {0};
  int rc = st_parse_entry(e, &t, "frame", err);
  if (rc) return rc;
  if (t.end > bin_len)
    return luna_fail(err, LUNA_EPROTO, "frame: tensor '%s' ends at %llu, past the %llu-byte binary part",
                     name, (unsigned long long)t.end, (unsigned long long)bin_len);
  out->dtype = t.dtype;
  out->n_dims = t.n_dims;
  memcpy(out->shape, t.shape, sizeof t.shape);
  out->data = bin + t.begin;
  out->nbytes = t.end - t.begin;
  return 0;
}

int frame_build(uint16_t type, uint32_t flags, uint64_t request_id, const cJSON *msg,
                const frame_out_tensor *tensors, size_t n_tensors, uint8_t **out, size_t *out_len,
                char *err) {
  *out = NULL;
  *out_len = 0;
  cJSON *m = msg ? cJSON_Duplicate(msg, 1) : cJSON_CreateObject();
  if (!m) return luna_fail(err, LUNA_ENOMEM, "out of memory building a frame");
  uint64_t off = 0;
  if (n_tensors) {
    while (cJSON_GetObjectItemCaseSensitive(m, "tensors")) cJSON_DeleteItemFromObjectCaseSensitive(m, "tensors");
    cJSON *ts = cJSON_AddObjectToObject(m, "tensors");
    for (size_t i = 0; ts && i < n_tensors; i++) {
      const frame_out_tensor *t = &tensors[i];
      uint64_t bytes = st_dtype_size(t->dtype);
      for (int d = 0; d < t->n_dims; d++) bytes *= (uint64_t)t->shape[d];
      cJSON *e = cJSON_AddObjectToObject(ts, t->name);
      if (!e) break;
      cJSON_AddStringToObject(e, "dtype", st_dtype_name(t->dtype));
      cJSON *sh = cJSON_AddArrayToObject(e, "shape");
      for (int d = 0; d < t->n_dims; d++) cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)t->shape[d]));
      cJSON *o = cJSON_AddArrayToObject(e, "data_offsets");
      cJSON_AddItemToArray(o, cJSON_CreateNumber((double)off));
      cJSON_AddItemToArray(o, cJSON_CreateNumber((double)(off + bytes)));
      off += bytes;
    }
  }
  char *json = cJSON_PrintUnformatted(m);
  cJSON_Delete(m);
  if (!json) return luna_fail(err, LUNA_ENOMEM, "out of memory building a frame");
  size_t jl = strlen(json);
  size_t total = LUNA_FRAME_HEADER + jl + (size_t)off;
  uint8_t *buf = malloc(total);
  if (!buf) {
    free(json);
    return luna_fail(err, LUNA_ENOMEM, "out of memory for a %zu-byte frame", total);
  }
  frame_header h = {LUNA_PROTO_VERSION, type, flags, (uint32_t)jl, request_id, off};
  frame_write_header(buf, &h);
  memcpy(buf + LUNA_FRAME_HEADER, json, jl);
  free(json);
  uint8_t *p = buf + LUNA_FRAME_HEADER + jl;
  for (size_t i = 0; i < n_tensors; i++) {
    uint64_t bytes = st_dtype_size(tensors[i].dtype);
    for (int d = 0; d < tensors[i].n_dims; d++) bytes *= (uint64_t)tensors[i].shape[d];
    if (bytes) memcpy(p, tensors[i].data, (size_t)bytes);
    p += bytes;
  }
  *out = buf;
  *out_len = total;
  return 0;
}

int frame_build_error(uint16_t type, uint64_t request_id, int status, const char *message,
                      uint8_t **out, size_t *out_len) {
  return frame_build_error_with(type, request_id, status, message, NULL, out, out_len);
}

int frame_build_error_with(uint16_t type, uint64_t request_id, int status, const char *message,
                           const cJSON *extra, uint8_t **out, size_t *out_len) {
  cJSON *m = extra ? cJSON_Duplicate(extra, 1) : cJSON_CreateObject();
  if (!m) return LUNA_ENOMEM;
  cJSON_AddNumberToObject(m, "code", status);
  cJSON_AddStringToObject(m, "name", luna_status_name(status));
  char *clean = strdup(message ? message : luna_strerror(status));
  if (!clean) {
    cJSON_Delete(m);
    return LUNA_ENOMEM;
  }
  utf8_sanitize(clean); /* messages quote client bytes, possibly cut mid-character */
  cJSON_AddStringToObject(m, "message", clean);
  free(clean);
  int rc = frame_build(type, LUNA_FLAG_REPLY | LUNA_FLAG_ERROR, request_id, m, NULL, 0, out, out_len, NULL);
  cJSON_Delete(m);
  return rc;
}
