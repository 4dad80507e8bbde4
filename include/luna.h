/* luna.h -- the public interface of luna: status codes and the client library */
/* SPDX-License-Identifier: MIT */
/*
** If a function or constant does not appear in this file, it is not a published
** API of luna. Everything under src/ is internal and may change at any time.
*/
#ifndef LUNA_H
#define LUNA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LUNA_API __attribute__((visibility("default")))

/*
** Status codes. Every call returns 0 on success or one of these negative values.
** The numbers are stable: they travel on the wire and are mirrored by the Python
** client. Always add new codes at the end.
*/
#define LUNA_STATUS_MAP(XX)                                                   \
  XX(OK,          0, "success")                                               \
  XX(EINVAL,     -1, "invalid argument")                                      \
  XX(ENOMEM,     -2, "out of memory")                                         \
  XX(EIO,        -3, "input/output error")                                    \
  XX(EFORMAT,    -4, "malformed file")                                        \
  XX(EDTYPE,     -5, "unsupported dtype")                                     \
  XX(EMISSING,   -6, "missing tensor")                                        \
  XX(EUNEXPECTED,-7, "unexpected tensor")                                     \
  XX(ESHAPE,     -8, "tensor shape mismatch")                                 \
  XX(EMODEL,     -9, "unsupported or unrecognised model")                     \
  XX(ETOKENS,   -10, "invalid token input")                                   \
  XX(EJSON,     -11, "invalid JSON")                                          \
  XX(EUTF8,     -12, "invalid UTF-8")                                         \
  XX(EINTERNAL, -13, "internal error")                                        \
  XX(EPROTO,    -14, "protocol error")                                        \
  XX(EVERSION,  -15, "unsupported protocol version")                          \
  XX(EAUTH,     -16, "authentication required or failed")                     \
  XX(ETOOBIG,   -17, "frame too large")                                       \
  XX(EBUSY,     -18, "server busy: queue full")                               \
  XX(ETIMEDOUT, -19, "deadline expired")                                      \
  XX(ENOTFOUND, -20, "model not found")                                       \
  XX(EACCES,    -21, "path outside the models folders")                       \
  XX(ESHUTDOWN, -22, "server shutting down")                                  \
  XX(ECONN,     -23, "connection failed or closed")                           \
  XX(EUNKNOWN,  -24, "unknown message type")                                  \
  XX(ENOLORA,   -25, "LoRA not in the daemon's cache: upload it")

enum luna_status {
#define LUNA_XX_(name, code, text) LUNA_##name = (code),
  LUNA_STATUS_MAP(LUNA_XX_)
#undef LUNA_XX_
};

/* Size of the message buffers that internal calls fill ('char err[LUNA_ERR_LEN]'). */
#define LUNA_ERR_LEN 512

/* luna_strerror returns a static description of 'status' ("unknown status" if none). */
LUNA_API const char *luna_strerror(int status);

/* luna_status_name returns the code's name without the prefix, e.g. "EFORMAT". */
LUNA_API const char *luna_status_name(int status);

/*
** ---------------------------------------------------------------------------------
** The client library: libluna.a / libluna.so (link a static build with -lcjson -lnettle -lm).
**
** A luna_client is one connection to lunad, over its Unix socket or over TCP. Every
** call blocks until the daemon's reply has arrived (or the connection fails) and
** returns 0 or a negative status. Statuses that lunad sent back (ENOTFOUND, EBUSY,
** ETIMEDOUT, ...) are returned as they came; failures on this side are LUNA_ECONN
** (connecting, reading or writing), LUNA_EPROTO (a reply that breaks the protocol),
** LUNA_EINVAL (a bad argument) or LUNA_ENOMEM. After any call, luna_client_errcode
** and luna_client_errmsg tell what happened.
**
** After a connection-level failure (LUNA_ECONN, or a reply that cannot be framed) the
** handle is disconnected: later calls fail with LUNA_ECONN until it is closed and a
** new one is connected. A status that the daemon sent leaves the connection usable.
**
** Threads: a handle is used by one thread at a time (calls on one handle must not
** overlap); different handles are independent and may be used from different threads
** at once. To encode from several threads in parallel, give each its own handle.
** Nothing in this library installs signal handlers; writes use MSG_NOSIGNAL, so a
** daemon that goes away is reported as LUNA_ECONN instead of raising SIGPIPE.
*/
typedef struct luna_client luna_client;

/*
** luna_client_connect_unix connects to lunad's Unix socket at 'path' (NULL: the
** default, luna_default_socket()). luna_client_connect_tcp connects to 'host':'port'
** (a name or a numeric IPv4/IPv6 address) and sends the hello that authenticates the
** connection with 'token' (required, the content of lunad's --token-file); a wrong
** token fails with LUNA_EAUTH.
**
** Both return a status and store a handle in '*out' even on failure, so that
** luna_client_errmsg can say what went wrong; the caller closes it either way. Only
** when memory for the handle itself cannot be had is '*out' NULL (LUNA_ENOMEM).
*/
LUNA_API int luna_client_connect_unix(const char *path, luna_client **out);
LUNA_API int luna_client_connect_tcp(const char *host, int port, const char *token, luna_client **out);

/* luna_client_close closes the connection and frees 'c'. Closing NULL is a harmless no-op. */
LUNA_API void luna_client_close(luna_client *c);

/*
** luna_client_errcode returns the status of the most recent call on 'c' (0 when it
** succeeded). luna_client_errmsg returns its message: "" after a success, otherwise
** the status name followed by what failed, e.g.
**   "ENOTFOUND: model 'sdxl.safetensors' is in none of the models folders"
** where the text after the name is the daemon's own message for statuses the daemon
** sent. The string belongs to 'c' and is valid until the next call on it. For NULL
** (a handle that could not be allocated) they return LUNA_ENOMEM and "out of memory".
*/
LUNA_API int luna_client_errcode(const luna_client *c);
LUNA_API const char *luna_client_errmsg(const luna_client *c);

/*
** luna_client_set_timeout bounds every later wait on 'c': a call fails with
** LUNA_ETIMEDOUT when lunad sends nothing (or takes none of a request) for
** 'timeout_ms' milliseconds, and the connection is closed, since the stream has lost
** its place. A long decode's progress frames count as something: only a silent lunad
** times out. 0 (the default) waits as long as it takes. Negative: LUNA_EINVAL. A
** handle that is not connected: LUNA_ECONN.
*/
LUNA_API int luna_client_set_timeout(luna_client *c, int timeout_ms);

/* luna_client_ping sends a ping and waits for the reply. */
LUNA_API int luna_client_ping(luna_client *c);

/*
** luna_client_call_json sends one request of message type 'type' (LUNA_MSG_* in
** luna_proto.h: health, status, models, the LoRA cache's list, evict, pin and unpin,
** ...) whose JSON part is 'json' (a JSON object;
** NULL sends {}), and waits for the reply. On success, when 'reply_json' is not NULL,
** '*reply_json' receives the reply's JSON part as a NUL-terminated string that the
** caller frees with luna_free (a binary part, if any, is discarded; use
** luna_client_encode for encodes; progress frames before the reply are skipped). On
** failure '*reply_json' is NULL.
*/
LUNA_API int luna_client_call_json(luna_client *c, int type, const char *json, char **reply_json);

/*
** One entry of a LoRA stack (docs/PROTOCOL.md, "7 lora"), applied to the text encoders
** as ComfyUI's LoraLoader applies strength_clip:
**   path         a LoRA file (safetensors) on this side. The client reads it to compute
**                its identity (SHA-256 over its text-encoder tensors, luna_lora_identity)
**                and uploads its text-encoder tensors when lunad does not have them yet
**   strength     any finite number (0, negative and above 1 allowed)
**   daemon_path  optional (NULL: none): the same file's name relative to lunad's
**                --loras-dir, which lunad tries before asking for an upload
*/
typedef struct luna_lora {
  const char *path;
  double strength;
  const char *daemon_path;
} luna_lora;

/* The most entries a LoRA stack may have. */
#define LUNA_MAX_LORAS 16

/*
** Textual-inversion vectors for one text encoder (docs/PROTOCOL.md, "embeds" in
** "6 encode"), as ComfyUI's tokenizer puts an "embedding:name" into the token list:
**   data   n * width floats, row-major, all finite; row i is the input embedding of
**          every token slot {"embed": i} (written in place of an id) of that encoder's
**          chunks in luna_encode_args.tokens_json
**   n      rows, 1 to LUNA_MAX_EMBED_ROWS; 0: none (then data and width are ignored).
**          Every slot's i must be < n (lunad answers LUNA_ETOKENS naming the slot)
**   width  floats per row, 1 to LUNA_MAX_EMBED_WIDTH: the encoder's width (CLIP-L 768,
**          CLIP-G 1280 in real models; lunad answers LUNA_EINVAL for another)
** The floats are sent as they are and used in fp32; rows no slot uses change nothing.
*/
typedef struct luna_embeds {
  const float *data;
  int n;
  int width;
} luna_embeds;

/* The bounds of luna_embeds.n and .width. */
#define LUNA_MAX_EMBED_ROWS 1000000
#define LUNA_MAX_EMBED_WIDTH 65536

/*
** An encode request (docs/PROTOCOL.md, "6 encode"). Zero-initialise it and fill in:
**   models       1 to 4 paths relative to the daemon's models folders: a checkpoint, or
**                a clip_l and a clip_g file
**   n_models     how many
**   text         the prompt, tokenized by the daemon (which needs --tokenizer), or NULL
**   tokens_json  the JSON text of ComfyUI's tokens object {"l": [...], "g": [...]}, or
**                NULL; exactly one of 'text' and 'tokens_json' is set
**   clip_layer   -N as CLIPSetLastLayer(-N); 0: the family's default
**   deadline_ms  drop the request if its work has not started within this many ms; 0: none
**   no_cache     nonzero: bypass the daemon's result cache
**   loras        the LoRA stack, in the order the LoRAs apply, or NULL
**   n_loras      how many (0 to LUNA_MAX_LORAS)
**   embeds_l     the vectors of the CLIP-L slots {"embed": i} in tokens_json["l"]
**   embeds_g     the same for CLIP-G (tokens_json["g"]); an SD1 model ignores them.
**                Only a tokens_json request may carry vectors (n > 0); zeroed: none
*/
typedef struct luna_encode_args {
  const char *const *models;
  int n_models;
  const char *text;
  const char *tokens_json;
  int clip_layer;
  int deadline_ms;
  int no_cache;
  const luna_lora *loras;
  int n_loras;
  luna_embeds embeds_l;
  luna_embeds embeds_g;
} luna_encode_args;

/*
** The result of an encode: ComfyUI's conditioning. 'cond' holds cond_shape[0] *
** cond_shape[1] * cond_shape[2] floats ([1, 77 * chunks, D]), 'pooled' pooled_shape[0]
** * pooled_shape[1] ([1, Dp]), both row-major and owned by the result. 'family' is
** "sd1" or "sdxl"; 'cached' is nonzero when the daemon answered from its cache.
** With a LoRA stack, 'lora_mode' is how lunad applied it ("lock", "functional" or
** "merged"), 'lora_patched' the number of weight matrices it changed and
** 'lora_unmapped' the number of its text-encoder keys that match nothing in this model
** (CLIP-G keys on an SD1 model, say); without one they are "", 0 and 0.
*/
typedef struct luna_encode_result {
  float *cond;
  int64_t cond_shape[3];
  float *pooled;
  int64_t pooled_shape[2];
  char family[8];
  int cached;
  char lora_mode[16];
  int lora_patched;
  int lora_unmapped;
} luna_encode_result;

/*
** luna_client_encode runs the text encoders of 'a'->models on the daemon and fills
** 'r', which it overwrites without freeing (free a previous result first). On failure
** 'r' is left empty (NULL pointers) and luna_encode_result_free on it is harmless.
** The values equal `luna encode --local` on the same files, bit for bit.
**
** With a LoRA stack the request names each LoRA by its identity, computed once per
** file (the handle remembers it for the same path, size and modification time). When
** lunad answers LUNA_ENOLORA it lists the identities it lacks; the client uploads
** those files (as luna_client_lora_upload) and sends the request again, at most 3
** times, then returns the last error. A file that cannot be read fails with
** LUNA_EIO, LUNA_EFORMAT, ... naming it.
**
** Vectors (embeds_l, embeds_g) travel in the request's binary part, l's rows first.
** Before anything is sent, NULL data with n > 0, n or width out of range, a non-finite
** value, or vectors with 'text' fail with LUNA_EINVAL naming the field (and the row
** and column of a non-finite value).
*/
LUNA_API int luna_client_encode(luna_client *c, const luna_encode_args *a, luna_encode_result *r);

/* luna_encode_result_free frees the result's buffers and empties it; NULL is a no-op. */
LUNA_API void luna_encode_result_free(luna_encode_result *r);

/*
** luna_lora_identity computes the identity of the LoRA file at 'path' as lunad does:
** the SHA-256 over its text-encoder tensors only (names, dtypes, shapes and bytes, in
** name order), written into 'id_hex' as 64 lowercase hex digits and a NUL. File name,
** metadata, tensor order and UNet tensors do not change it. Returns 0, or a negative
** status (LUNA_EIO: cannot read it, LUNA_EFORMAT: not a valid safetensors file, ...)
** with 'id_hex' set to "".
*/
LUNA_API int luna_lora_identity(const char *path, char id_hex[65]);

/*
** luna_client_lora_upload sends the text-encoder tensors of the LoRA file at 'path'
** to lunad's LoRA cache (a LORA "upload" whose binary part is a safetensors image of
** those tensors alone) and, on success, writes its identity into 'id_hex' (which may
** be NULL). lunad checks the tensors and the identity; what it refuses comes back as
** its status (LUNA_EINVAL, LUNA_EDTYPE, LUNA_ETOOBIG for a file over its --max-frame,
** ...). Uploading a LoRA that lunad already has is harmless.
*/
LUNA_API int luna_client_lora_upload(luna_client *c, const char *path, char id_hex[65]);

/*
** ---------------------------------------------------------------------------------
** The VAE (docs/PROTOCOL.md, "8 vae_decode" and "9 vae_encode"): ComfyUI's VAEDecode /
** VAEEncode and their tiled forms, run by lunad on a checkpoint's VAE or a VAE file.
*/

/* Tiling of a VAE request (luna_vae_args.tiled). */
#define LUNA_TILED_AUTO 0 /* lunad decides: tiled when untiled work would exceed its --vae-max-mem */
#define LUNA_TILED_ON 1   /* always tiled (VAEDecodeTiled / VAEEncodeTiled) */
#define LUNA_TILED_OFF 2  /* never tiled */

/*
** A progress callback: 'fraction' is the share of the work done, 0 to 1, as lunad
** reports it between blocks of the network. It runs on the calling thread, inside the
** luna_client_vae_* call, while the reply is awaited; it must not call into the same
** handle.
*/
typedef void (*luna_progress_fn)(void *ud, double fraction);

/*
** A VAE request. Zero-initialise it and fill in:
**   model        a path relative to lunad's models folders: a checkpoint (its
**                first_stage_model) or a VAE file
**   tiled        LUNA_TILED_AUTO (0, the default), LUNA_TILED_ON or LUNA_TILED_OFF
**   tile         tile size in pixels; 0: lunad's default, 512 (ComfyUI's)
**   overlap      overlap between tiles in pixels, smaller than the tile; 0: lunad's
**                default, 64 (ComfyUI's). Both only matter when the work is tiled
**   progress     called with lunad's progress reports; NULL: none are asked for
**   progress_ud  passed to 'progress' as it is
**   deadline_ms  drop the request if its work has not started within this many ms; 0: none
*/
typedef struct luna_vae_args {
  const char *model;
  int tiled;
  int tile, overlap;
  luna_progress_fn progress;
  void *progress_ud;
  int deadline_ms;
} luna_vae_args;

/*
** A float tensor returned by the library: 'n_dims' dimensions in shape[0..n_dims-1]
** (outermost first), the values row-major in 'data', which the tensor owns (free it
** with luna_tensor_free).
*/
typedef struct luna_tensor {
  float *data;
  int64_t shape[4];
  int n_dims;
} luna_tensor;

/*
** luna_client_vae_decode decodes the latent 'latent' (F32 [B, C, h, w], row-major, as
** ComfyUI passes it to VAEDecode: not scaled) on lunad into '*image': F32
** [B, 8h, 8w, 3] with values in [0, 1], ComfyUI's IMAGE layout.
**
** luna_client_vae_encode encodes 'pixels' (F32 [B, H, W, 3], values in [0, 1]) into
** '*latent': F32 [B, C, H/8, W/8], the posterior mean, after ComfyUI's centered crop of
** H and W to multiples of 8 (C is the VAE's latent channels: 4, or 16 for SD3/Flux).
**
** Both overwrite the result without freeing it (free a previous one first) and leave
** it empty (data NULL) on failure. While lunad works, 'a'->progress (when set) is
** called with each progress report; the call returns once the final reply arrived. A
** request lunad refuses (ENOTFOUND, ESHAPE for a latent of the wrong channel count,
** EINVAL for non-finite values, ETOOBIG for a request over its --max-frame, ...) comes
** back as its status. A reply whose tensor is not F32 of the expected shape is EPROTO.
*/
LUNA_API int luna_client_vae_decode(luna_client *c, const luna_vae_args *a, const float *latent, int64_t B,
                                    int64_t C, int64_t h, int64_t w, luna_tensor *image);
LUNA_API int luna_client_vae_encode(luna_client *c, const luna_vae_args *a, const float *pixels, int64_t B,
                                    int64_t H, int64_t W, luna_tensor *latent);

/* luna_tensor_free frees the tensor's data and empties it; NULL is a no-op. */
LUNA_API void luna_tensor_free(luna_tensor *t);

/* luna_free frees memory that this library returned (luna_client_call_json's reply). */
LUNA_API void luna_free(void *p);

/*
** luna_default_socket returns the socket path that lunad and its clients use when
** none is given: $LUNA_SOCKET if set and not empty, else $XDG_RUNTIME_DIR/lunad.sock
** if that variable is set and not empty, else /tmp/lunad-<uid>.sock. The string is
** valid until the calling thread calls luna_default_socket again.
*/
LUNA_API const char *luna_default_socket(void);

#ifdef __cplusplus
}
#endif
#endif /* LUNA_H */
