/* luna_proto.h -- the lunad wire format: frame header, message types, flags, limits */
/* SPDX-License-Identifier: MIT */
/*
** Every message, in both directions, is one frame:
**
**   offset size  field        value
**   0      4     magic        the bytes 'L' 'U' 'N' 'A' (0x4C 0x55 0x4E 0x41)
**   4      2     version      LUNA_PROTO_VERSION (u16, little-endian)
**   6      2     type         LUNA_MSG_* (u16)
**   8      4     flags        LUNA_FLAG_* bits (u32)
**   12     4     json_len     bytes of the JSON part (u32)
**   16     8     request_id   chosen by the client, echoed by the reply (u64)
**   24     8     bin_len      bytes of the binary part (u64)
**   32     json_len          one UTF-8 JSON object
**   32+json_len  bin_len     raw tensor bytes, described by the JSON's "tensors"
**
** All integers are little-endian. 32 + json_len + bin_len must not exceed the
** receiver's maximum frame size (lunad: --max-frame). Tensors in the binary part are
** described as safetensors describes them:
**   "tensors": {"cond": {"dtype": "F32", "shape": [1, 77, 768], "data_offsets": [0, 236544]}}
** with offsets relative to the start of the binary part, end exclusive.
**
** A reply has LUNA_FLAG_REPLY set, the request's type and request_id. A failed request
** gets a reply with LUNA_FLAG_ERROR and the JSON {"code": -N, "name": "E...",
** "message": "..."}, code being a luna status (luna.h). Replies may come back in any
** order; a client may pipeline many requests on one connection. docs/PROTOCOL.md
** documents each message's JSON.
*/
#ifndef LUNA_PROTO_H
#define LUNA_PROTO_H

#define LUNA_PROTO_MAGIC "LUNA"
#define LUNA_PROTO_VERSION 1
#define LUNA_FRAME_HEADER 32

/* Message types. Always add new ones at the end. */
#define LUNA_MSG_HELLO 1   /* version check; authentication on TCP */
#define LUNA_MSG_PING 2    /* empty round trip */
#define LUNA_MSG_HEALTH 3  /* live and ready, per model */
#define LUNA_MSG_STATUS 4  /* counters, memory, queue, models */
#define LUNA_MSG_MODELS 5  /* list, load, unload */
#define LUNA_MSG_ENCODE 6  /* text encoders: tokens or text in, cond and pooled out */
#define LUNA_MSG_LORA 7    /* LoRA cache: upload, list, evict, pin, unpin */
#define LUNA_MSG_VAE_DECODE 8 /* VAE: latent in, image out */
#define LUNA_MSG_VAE_ENCODE 9 /* VAE: image in, latent (posterior mean) out */

/* Flags. */
#define LUNA_FLAG_REPLY 0x1u /* set on every frame the daemon sends */
#define LUNA_FLAG_ERROR 0x2u /* the reply reports a failure */
#define LUNA_FLAG_PROGRESS 0x4u /* a non-final reply: {"progress": fraction} of a long request */

/* Default limits of lunad. */
#define LUNA_DEFAULT_MAX_FRAME (64u << 20) /* 64 MiB */
#define LUNA_MAX_JSON (16u << 20)          /* the JSON part is never larger than this */

#endif
