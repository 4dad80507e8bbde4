/* frame.h -- encoding and validating lunad frames, shared by the daemon and the clients */
/* SPDX-License-Identifier: MIT */
#ifndef LUNA_PROTO_FRAME_H
#define LUNA_PROTO_FRAME_H

#include "core/safetensors.h"
#include "luna_proto.h"

#include <cJSON.h>
#include <stddef.h>
#include <stdint.h>

/* frame_parse_header's results besides errors. */
#define FRAME_OK 0
#define FRAME_NEED_MORE 1

typedef struct frame_header {
  uint16_t version, type;
  uint32_t flags;
  uint32_t json_len;
  uint64_t request_id;
  uint64_t bin_len;
} frame_header;

/* frame_parse_header reads the fixed header from the 'len' bytes at 'buf'. Returns
** FRAME_NEED_MORE when fewer than LUNA_FRAME_HEADER bytes are there, FRAME_OK when the
** header is valid, or a negative status: LUNA_EPROTO (bad magic), LUNA_EVERSION,
** LUNA_ETOOBIG (the frame would exceed 'max_frame' or the JSON part LUNA_MAX_JSON).
** The header fields are filled whenever 32 bytes were available. */
int frame_parse_header(const uint8_t *buf, size_t len, uint64_t max_frame, frame_header *h, char *err);

/* frame_write_header writes 'h' (magic and layout included) into 'out'. */
void frame_write_header(uint8_t out[LUNA_FRAME_HEADER], const frame_header *h);

/* frame_parse_json parses the JSON part ('len' bytes, not NUL-terminated): it must be
** one UTF-8 JSON object. On success '*out' is owned by the caller (cJSON_Delete). */
int frame_parse_json(const uint8_t *json, size_t len, cJSON **out, char *err);

/* A tensor found in a frame's binary part (a view into it). */
typedef struct frame_tensor {
  st_dtype dtype;
  int n_dims;
  int64_t shape[ST_MAX_DIMS];
  const uint8_t *data;
  uint64_t nbytes;
} frame_tensor;

/* frame_get_tensor looks up "tensors"."name" in the message 'msg' and checks it against
** the binary part 'bin' of 'bin_len' bytes (known dtype, shape product times dtype size
** equal to the byte range, range within the part). LUNA_EMISSING when absent. */
int frame_get_tensor(const cJSON *msg, const char *name, const uint8_t *bin, uint64_t bin_len,
                     frame_tensor *out, char *err);

/* A tensor to put in a frame: described exactly like one written to a safetensors file. */
typedef st_wtensor frame_out_tensor;

/* frame_build serialises a whole frame: header, 'msg' (NULL: "{}") with a "tensors"
** description added for 'tensors', then their bytes. '*out' is malloc'd (caller frees)
** and '*out_len' its size. 'msg' is not modified. */
int frame_build(uint16_t type, uint32_t flags, uint64_t request_id, const cJSON *msg,
                const frame_out_tensor *tensors, size_t n_tensors, uint8_t **out, size_t *out_len,
                char *err);

/* frame_build_error builds the error reply for 'request_id' of 'type':
** {"code": status, "name": luna_status_name(status), "message": message}. */
int frame_build_error(uint16_t type, uint64_t request_id, int status, const char *message,
                      uint8_t **out, size_t *out_len);
/* frame_build_error_with is frame_build_error with the fields of 'extra' (a JSON object,
** or NULL) added, e.g. ENOLORA's "missing". */
int frame_build_error_with(uint16_t type, uint64_t request_id, int status, const char *message,
                           const cJSON *extra, uint8_t **out, size_t *out_len);

#endif
