/* fuzz-frame.c -- libFuzzer target for the frame codec, driven the way lunad reads a frame */
/* SPDX-License-Identifier: MIT */
/*
** The input is the byte stream of one frame. As the daemon does: validate the header
** (stop when it is refused or the frame is not all there), parse the JSON part, then
** look up every tensor that "tensors" names and touch its first and last byte. When
** every tensor was valid, the message is rebuilt with frame_build and taken apart
** again: the bytes must come back identical. An error reply carrying the last
** message is built and parsed too, as the daemon answers bad requests.
*/
#include "core/status.h"
#include "proto/frame.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TENSORS 16

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Parse a frame built here: it must be valid, with a JSON object. */
static cJSON *reparse(const uint8_t *f, size_t len, frame_header *h) {
  char err[LUNA_ERR_LEN];
  cJSON *m = NULL;
  if (frame_parse_header(f, len, 1ull << 40, h, err) != FRAME_OK) abort();
  if (LUNA_FRAME_HEADER + (uint64_t)h->json_len + h->bin_len != len) abort();
  if (frame_parse_json(f + LUNA_FRAME_HEADER, h->json_len, &m, err)) abort();
  return m;
}

static void rebuild(const frame_header *h, const cJSON *msg, const frame_out_tensor *outs, size_t n) {
  uint8_t *f = NULL;
  size_t len = 0;
  char err[LUNA_ERR_LEN];
  if (frame_build(h->type, h->flags, h->request_id, msg, outs, n, &f, &len, err)) return; /* out of memory */
  frame_header g;
  cJSON *m = reparse(f, len, &g);
  if (g.type != h->type || g.flags != h->flags || g.request_id != h->request_id) abort();
  const uint8_t *bin = f + LUNA_FRAME_HEADER + g.json_len;
  for (size_t i = 0; i < n; i++) {
    frame_tensor t;
    if (frame_get_tensor(m, outs[i].name, bin, g.bin_len, &t, err)) abort();
    uint64_t bytes = st_dtype_size(outs[i].dtype);
    for (int d = 0; d < outs[i].n_dims; d++) bytes *= (uint64_t)outs[i].shape[d];
    if (t.dtype != outs[i].dtype || t.n_dims != outs[i].n_dims || t.nbytes != bytes) abort();
    if (bytes && memcmp(t.data, outs[i].data, (size_t)bytes)) abort();
  }
  cJSON_Delete(m);
  free(f);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  frame_header h;
  char err[LUNA_ERR_LEN] = "";
  int rc = frame_parse_header(data, size, LUNA_DEFAULT_MAX_FRAME, &h, err);
  if (rc != FRAME_OK) return 0;
  /* what the header check promises, computed without any chance of wrapping */
  if (h.json_len > LUNA_MAX_JSON || h.bin_len > LUNA_DEFAULT_MAX_FRAME ||
      LUNA_FRAME_HEADER + (uint64_t)h.json_len + h.bin_len > LUNA_DEFAULT_MAX_FRAME)
    abort();
  if (size < LUNA_FRAME_HEADER + (uint64_t)h.json_len + h.bin_len) return 0; /* lunad waits for the rest */
  const uint8_t *json = data + LUNA_FRAME_HEADER, *bin = json + h.json_len;

  cJSON *msg = NULL;
  if (frame_parse_json(json, h.json_len, &msg, err) == 0) {
    frame_out_tensor outs[MAX_TENSORS];
    size_t n = 0;
    int all_ok = 1;
    const cJSON *ts = cJSON_GetObjectItemCaseSensitive(msg, "tensors");
    for (const cJSON *e = cJSON_IsObject(ts) ? ts->child : NULL; e; e = e->next) {
      frame_tensor t;
      if (frame_get_tensor(msg, e->string, bin, h.bin_len, &t, err)) {
        all_ok = 0;
        continue;
      }
      if (t.data < bin || t.nbytes > h.bin_len || (uint64_t)(t.data - bin) > h.bin_len - t.nbytes) abort();
      volatile uint8_t sink = 0;
      if (t.nbytes) sink ^= t.data[0] ^ t.data[t.nbytes - 1];
      (void)sink;
      if (n < MAX_TENSORS) {
        frame_out_tensor *o = &outs[n++];
        o->name = e->string;
        o->dtype = t.dtype;
        o->n_dims = t.n_dims;
        memcpy(o->shape, t.shape, sizeof o->shape);
        o->data = t.data;
      } else {
        all_ok = 0;
      }
    }
    if (all_ok && n) rebuild(&h, msg, outs, n);
    cJSON_Delete(msg);
  }

  /* the error reply the daemon would send, with this frame's message in it */
  uint8_t *f = NULL;
  size_t len = 0;
  if (frame_build_error(h.type, h.request_id, LUNA_EPROTO, err[0] ? err : NULL, &f, &len) == 0) {
    frame_header g;
    cJSON *m = reparse(f, len, &g);
    if (g.flags != (LUNA_FLAG_REPLY | LUNA_FLAG_ERROR) || g.request_id != h.request_id) abort();
    cJSON_Delete(m);
    free(f);
  }
  return 0;
}
