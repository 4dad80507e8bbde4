/* client.c -- the client library: one blocking connection to lunad per luna_client */
/* SPDX-License-Identifier: MIT */
/*
** Each call builds one request frame (frame_build), writes it whole, then reads one
** reply: the 32-byte header first, validated by frame_parse_header against
** CLIENT_MAX_REPLY before anything is allocated, then the JSON and binary parts in one
** buffer. A handle has at most one request in flight, so the reply must carry that
** request's id and type; anything else means the stream is out of step and the
** connection is dropped (fd = -1). The one exception: frames flagged PROGRESS for that
** request (VAE work), which carry {"progress": fraction} and no binary part, may come
** before its reply; read_reply hands them to the caller's callback and reads on.
**
** LoRA stacks: an encode names each LoRA by its identity (lora_identity over the
** file's text-encoder tensors), which the handle caches per path, inode, size and mtime. When
** lunad lacks some, it answers ENOLORA with their ids in "missing"; read_reply keeps
** that error's JSON (err_json), the client uploads those files (a LORA frame whose
** binary part is the safetensors image lora_extract_te makes) and sends the encode
** again, at most LORA_ROUNDS times.
*/
#include "luna.h"
#include "luna_proto.h"

#include "core/safetensors.h"
#include "core/status.h"
#include "core/utf8.h"
#include "lora/lora.h"
#include "proto/frame.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

/*
** The largest reply this side accepts. lunad's --max-frame (64 MiB by default) bounds
** what it reads, not what it writes: an encode reply grows with the prompt (SDXL:
** 77 * 2048 * 4 = 630,784 bytes per 77-token chunk), so the client allows more. 1 GiB
** is about 1,700 SDXL chunks (130,000 tokens), far past any real prompt, and still
** stops a corrupt header from making us allocate an absurd amount before reading it.
*/
#define CLIENT_MAX_REPLY (1ull << 30)

#define CLIENT_MAX_MODELS 4
#define CLIENT_NAME "libluna"

/* Upload-and-retry rounds of an encode whose LoRAs lunad lacks (ENOLORA). */
#define LORA_ROUNDS 3
/* LoRA identities remembered per handle (the oldest one makes room). */
#define LORA_ID_CACHE 32

/* A file's identity, valid while the file keeps its size and modification time. */
typedef struct lora_id_entry {
  char *path;
  dev_t dev;
  ino_t ino;
  off_t size;
  struct timespec mtime;
  char hex[LORA_ID_HEX];
} lora_id_entry;

struct luna_client {
  int fd;                     /* the connection; -1 once closed or broken */
  uint64_t next_id;           /* request ids count up from 1 */
  char peer[160];             /* "unix:PATH" or "tcp:HOST:PORT", for messages */
  int errcode;                /* status of the most recent call */
  char errmsg[LUNA_ERR_LEN];  /* "NAME: what failed", or "" after a success */
  cJSON *err_json;            /* the most recent error reply's JSON, or NULL */
  lora_id_entry ids[LORA_ID_CACHE];
  int next_slot;              /* the cache slot to reuse next once all are taken */
  int timeout_ms;             /* luna_client_set_timeout; 0: wait as long as it takes */
};

/* A reply: 'buf' owns the JSON and binary parts; 'msg' is the parsed JSON part. */
typedef struct reply {
  uint8_t *buf;
  cJSON *msg;
  uint32_t json_len;
  const uint8_t *bin;
  uint64_t bin_len;
} reply;

static void reply_free(reply *r) {
  cJSON_Delete(r->msg);
  free(r->buf);
  memset(r, 0, sizeof *r);
}

/* Record a failure: the status name, ": ", then the formatted text. Returns 'status'. */
static int set_err(luna_client *c, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int set_err(luna_client *c, int status, const char *fmt, ...) {
  c->errcode = status;
  int n = snprintf(c->errmsg, sizeof c->errmsg, "%s: ", luna_status_name(status));
  if (n < 0 || (size_t)n >= sizeof c->errmsg) n = 0;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->errmsg + n, sizeof c->errmsg - (size_t)n, fmt, ap);
  va_end(ap);
  return status;
}

static void set_ok(luna_client *c) {
  c->errcode = 0;
  c->errmsg[0] = 0;
}

/* Close the connection after a failure that leaves the byte stream unusable. */
static void drop(luna_client *c) {
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
}

static luna_client *client_new(const char *peer_fmt, const char *a, int port) {
  luna_client *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->fd = -1;
  c->next_id = 1;
  if (port >= 0) snprintf(c->peer, sizeof c->peer, peer_fmt, a, port);
  else snprintf(c->peer, sizeof c->peer, peer_fmt, a);
  return c;
}

/* ---- I/O ------------------------------------------------------------------------- */

/* Write all 'len' bytes (retrying short writes and EINTR). Returns 0 or an errno. */
static int write_all(int fd, const uint8_t *p, size_t len) {
  while (len) {
    ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

/* Read exactly 'len' bytes; 'what' names the part of the reply being read. */
static int read_all(luna_client *c, uint8_t *p, size_t len, const char *what) {
  size_t got = 0;
  while (got < len) {
    ssize_t n = recv(c->fd, p + got, len - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      drop(c);
      if (e == EAGAIN || e == EWOULDBLOCK) /* SO_RCVTIMEO: the reply's place in the stream is lost */
        return set_err(c, LUNA_ETIMEDOUT, "%s: nothing from lunad for %d ms while waiting for the reply's %s "
                       "(the client's timeout); the connection is closed", c->peer, c->timeout_ms, what);
      return set_err(c, LUNA_ECONN, "%s: reading the reply's %s: %s", c->peer, what, strerror(e));
    }
    if (n == 0) {
      drop(c);
      if (got == 0 && !strcmp(what, "header"))
        return set_err(c, LUNA_ECONN, "%s: lunad closed the connection without replying", c->peer);
      return set_err(c, LUNA_ECONN, "%s: lunad closed the connection in the middle of the reply's %s "
                     "(%zu of %zu bytes)", c->peer, what, got, len);
    }
    got += (size_t)n;
  }
  return 0;
}

/*
** A progress frame (flags REPLY|PROGRESS) whose header is 'h', for request 'id' of
** 'type': its JSON {"progress": fraction} is read and handed to 'progress' (when not
** NULL). It must belong to the pending request and carry no binary part; anything else
** is a protocol error, and the connection is dropped: the request's own reply is still
** on its way.
*/
static int take_progress(luna_client *c, const frame_header *h, uint16_t type, uint64_t id,
                         luna_progress_fn progress, void *ud) {
  if (h->flags & LUNA_FLAG_ERROR) {
    drop(c);
    return set_err(c, LUNA_EPROTO, "%s: a progress frame with the ERROR flag came back (flags 0x%x)", c->peer,
                   h->flags);
  }
  if (h->request_id != id || h->type != type) {
    drop(c);
    return set_err(c, LUNA_EPROTO, "%s: progress for request %llu of type %u, expected request %llu of type %u",
                   c->peer, (unsigned long long)h->request_id, h->type, (unsigned long long)id, type);
  }
  if (h->bin_len) {
    drop(c);
    return set_err(c, LUNA_EPROTO, "%s: a progress frame for request %llu has a %llu-byte binary part", c->peer,
                   (unsigned long long)id, (unsigned long long)h->bin_len);
  }
  uint8_t *buf = malloc(h->json_len ? h->json_len : 1);
  if (!buf) {
    drop(c);
    return set_err(c, LUNA_ENOMEM, "%s: out of memory for a %u-byte progress frame", c->peer, h->json_len);
  }
  int rc = read_all(c, buf, h->json_len, "progress JSON part");
  if (rc) {
    free(buf);
    return rc;
  }
  cJSON *msg = NULL;
  char err[LUNA_ERR_LEN] = "";
  rc = frame_parse_json(buf, h->json_len, &msg, err);
  free(buf);
  if (rc) {
    drop(c);
    return set_err(c, LUNA_EPROTO, "%s: progress of request %llu: %s", c->peer, (unsigned long long)id, err);
  }
  const cJSON *p = cJSON_GetObjectItemCaseSensitive(msg, "progress");
  double v = cJSON_IsNumber(p) ? p->valuedouble : NAN;
  cJSON_Delete(msg);
  if (!isfinite(v)) {
    drop(c);
    return set_err(c, LUNA_EPROTO, "%s: progress of request %llu without a numeric \"progress\"", c->peer,
                   (unsigned long long)id);
  }
  /* a fraction by definition: rounding on lunad's side must not reach the caller */
  if (v < 0) v = 0;
  if (v > 1) v = 1;
  if (progress) progress(ud, v);
  return 0;
}

/*
** Read the reply to request 'id' of message 'type' into 'r'. Progress frames for it
** that come first go to 'progress' (NULL: read and ignored). A reply with the ERROR
** flag is turned into the daemon's status and message.
*/
static int read_reply(luna_client *c, uint16_t type, uint64_t id, luna_progress_fn progress, void *ud, reply *r) {
  memset(r, 0, sizeof *r);
  uint8_t hdr[LUNA_FRAME_HEADER];
  frame_header h;
  char err[LUNA_ERR_LEN] = "";
  int rc;
  for (;;) {
    if ((rc = read_all(c, hdr, sizeof hdr, "header"))) return rc;
    rc = frame_parse_header(hdr, sizeof hdr, CLIENT_MAX_REPLY, &h, err);
    if (rc != FRAME_OK) {
      drop(c);
      return set_err(c, rc < 0 ? LUNA_EPROTO : LUNA_EINTERNAL, "%s: reply %s", c->peer, err);
    }
    if (!(h.flags & LUNA_FLAG_REPLY)) {
      drop(c);
      return set_err(c, LUNA_EPROTO, "%s: a frame without the REPLY flag came back (flags 0x%x)", c->peer, h.flags);
    }
    if (!(h.flags & LUNA_FLAG_PROGRESS)) break;
    if ((rc = take_progress(c, &h, type, id, progress, ud))) return rc;
  }
  /* An error reply about a frame lunad could not take (ETOOBIG, ...) is still worth
  ** reading whatever its id says; any other stray reply means the stream is lost. */
  int stray = h.request_id != id || h.type != type;
  if (stray && !(h.flags & LUNA_FLAG_ERROR)) {
    drop(c);
    return set_err(c, LUNA_EPROTO, "%s: reply for request %llu of type %u, expected request %llu of type %u",
                   c->peer, (unsigned long long)h.request_id, h.type, (unsigned long long)id, type);
  }
  /* frame_parse_header bounded the total by CLIENT_MAX_REPLY, so this fits a size_t. */
  size_t total = (size_t)h.json_len + (size_t)h.bin_len;
  r->buf = malloc(total ? total : 1);
  if (!r->buf) {
    drop(c);
    return set_err(c, LUNA_ENOMEM, "%s: out of memory for a %zu-byte reply", c->peer, total);
  }
  if ((rc = read_all(c, r->buf, total, h.bin_len ? "JSON and binary parts" : "JSON part"))) {
    reply_free(r);
    return rc;
  }
  r->json_len = h.json_len;
  r->bin = r->buf + h.json_len;
  r->bin_len = h.bin_len;
  if ((rc = frame_parse_json(r->buf, h.json_len, &r->msg, err))) {
    reply_free(r);
    return set_err(c, LUNA_EPROTO, "%s: reply to request %llu: %s", c->peer, (unsigned long long)id, err);
  }
  if (!(h.flags & LUNA_FLAG_ERROR)) return 0;

  /* {"code": -N, "name": "E...", "message": "..."} */
  const cJSON *code = cJSON_GetObjectItemCaseSensitive(r->msg, "code");
  const cJSON *name = cJSON_GetObjectItemCaseSensitive(r->msg, "name");
  const cJSON *message = cJSON_GetObjectItemCaseSensitive(r->msg, "message");
  double v = cJSON_IsNumber(code) ? code->valuedouble : 0;
  if (!(v < 0 && v >= -1e6 && v == (double)(int)v)) {
    reply_free(r);
    return set_err(c, LUNA_EPROTO, "%s: error reply without a valid negative \"code\"", c->peer);
  }
  int status = (int)v;
  const char *nm = cJSON_IsString(name) ? name->valuestring : luna_status_name(status);
  const char *text = cJSON_IsString(message) ? message->valuestring : luna_strerror(status);
  c->errcode = status;
  snprintf(c->errmsg, sizeof c->errmsg, "%s: %s", nm, text);
  /* Kept for the fields some errors carry besides their message (ENOLORA: "missing"). */
  cJSON_Delete(c->err_json);
  c->err_json = r->msg;
  r->msg = NULL;
  reply_free(r);
  if (stray) drop(c);
  return status;
}

/*
** Send 'msg' (NULL: {}) as a request of 'type', with 'bin_len' bytes at 'bin' as its
** binary part (sent as they are: 'msg' describes them in "tensors" or "embeds", or not
** at all), and read its reply into 'r', progress frames before it going to 'progress'.
** On success the caller frees 'r' with reply_free and calls set_ok itself.
*/
static int exchange_full(luna_client *c, uint16_t type, const cJSON *msg, const uint8_t *bin, size_t bin_len,
                         luna_progress_fn progress, void *ud, reply *r) {
  memset(r, 0, sizeof *r);
  cJSON_Delete(c->err_json);
  c->err_json = NULL;
  if (c->fd < 0)
    return set_err(c, LUNA_ECONN, "%s: not connected (the connection failed or was closed earlier; "
                   "connect again)", c->peer);
  uint64_t id = c->next_id++;
  uint8_t *frame = NULL;
  size_t len = 0;
  char err[LUNA_ERR_LEN] = "";
  int rc = frame_build(type, 0, id, msg, NULL, 0, &frame, &len, err);
  if (rc) return set_err(c, rc, "building the request: %s", err);
  if (len - LUNA_FRAME_HEADER > LUNA_MAX_JSON) {
    free(frame);
    return set_err(c, LUNA_ETOOBIG, "the request's JSON part has %zu bytes, more than the protocol's %u",
                   len - LUNA_FRAME_HEADER, LUNA_MAX_JSON);
  }
  if (bin_len) {
    /* frame_build wrote bin_len 0: the same header with the raw part's length. */
    frame_header h;
    if (frame_parse_header(frame, len, UINT64_MAX, &h, err) != FRAME_OK) {
      free(frame);
      return set_err(c, LUNA_EINTERNAL, "building the request: %s", err);
    }
    h.bin_len = bin_len;
    frame_write_header(frame, &h);
  }
  int e = write_all(c->fd, frame, len);
  free(frame);
  if (!e && bin_len) e = write_all(c->fd, bin, bin_len);
  if (e) {
    /* lunad may have refused the frame and closed: its error reply, if it got that
    ** far, is still waiting to be read and says more than EPIPE does. */
    if ((e == EPIPE || e == ECONNRESET) && read_reply(c, type, id, NULL, NULL, r) < 0 && c->errcode != LUNA_ECONN &&
        c->errcode != LUNA_EPROTO) {
      drop(c);
      return c->errcode;
    }
    reply_free(r);
    drop(c);
    if (e == EAGAIN || e == EWOULDBLOCK) /* SO_SNDTIMEO */
      return set_err(c, LUNA_ETIMEDOUT, "%s: lunad took none of the request for %d ms (the client's timeout); "
                     "the connection is closed", c->peer, c->timeout_ms);
    return set_err(c, LUNA_ECONN, "%s: sending a request: %s", c->peer, strerror(e));
  }
  return read_reply(c, type, id, progress, ud, r);
}

static int exchange_bin(luna_client *c, uint16_t type, const cJSON *msg, const uint8_t *bin, size_t bin_len,
                        reply *r) {
  return exchange_full(c, type, msg, bin, bin_len, NULL, NULL, r);
}

static int exchange(luna_client *c, uint16_t type, const cJSON *msg, reply *r) {
  return exchange_bin(c, type, msg, NULL, 0, r);
}

/* ---- connecting ------------------------------------------------------------------ */

int luna_client_set_timeout(luna_client *c, int timeout_ms) {
  if (!c) return LUNA_EINVAL;
  if (timeout_ms < 0) return set_err(c, LUNA_EINVAL, "timeout %d ms: must be 0 (none) or more", timeout_ms);
  if (c->fd < 0) return set_err(c, LUNA_ECONN, "%s: not connected", c->peer);
  struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  if (setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0 ||
      setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0)
    return set_err(c, LUNA_ECONN, "%s: setting the socket's timeout: %s", c->peer, strerror(errno));
  c->timeout_ms = timeout_ms;
  set_ok(c);
  return 0;
}

int luna_client_connect_unix(const char *path, luna_client **out) {
  if (!out) return LUNA_EINVAL;
  if (!path) path = luna_default_socket();
  luna_client *c = *out = client_new("unix:%s", path, -1);
  if (!c) return LUNA_ENOMEM;
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  size_t n = strlen(path);
  if (n == 0) return set_err(c, LUNA_EINVAL, "the socket path is empty");
  if (n >= sizeof sa.sun_path)
    return set_err(c, LUNA_EINVAL, "%s: socket path has %zu bytes, more than the %zu a Unix socket allows",
                   path, n, sizeof sa.sun_path - 1);
  memcpy(sa.sun_path, path, n);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return set_err(c, LUNA_ECONN, "socket(AF_UNIX): %s", strerror(errno));
  int rc;
  do rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
  while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    int e = errno;
    close(fd);
    return set_err(c, LUNA_ECONN, "cannot connect to lunad at %s: %s%s", path, strerror(e),
                   e == ENOENT || e == ECONNREFUSED ? " (is lunad running with this --socket?)" : "");
  }
  c->fd = fd;
  set_ok(c);
  return 0;
}

int luna_client_connect_tcp(const char *host, int port, const char *token, luna_client **out) {
  if (!out) return LUNA_EINVAL;
  luna_client *c = *out = client_new("tcp:%s:%d", host ? host : "", port);
  if (!c) return LUNA_ENOMEM;
  if (!host || !*host) return set_err(c, LUNA_EINVAL, "no host to connect to");
  if (port < 1 || port > 65535) return set_err(c, LUNA_EINVAL, "port %d is not in 1..65535", port);
  if (!token || !*token) return set_err(c, LUNA_EINVAL, "a TCP connection needs lunad's token, and none was given");

  char service[16];
  snprintf(service, sizeof service, "%d", port);
  struct addrinfo hints, *res = NULL;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  int g = getaddrinfo(host, service, &hints, &res);
  if (g) return set_err(c, LUNA_ECONN, "cannot resolve '%s': %s", host, gai_strerror(g));
  int last = 0;
  for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last = errno;
      continue;
    }
    int rc;
    do rc = connect(fd, ai->ai_addr, ai->ai_addrlen);
    while (rc < 0 && errno == EINTR);
    if (rc == 0) {
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* small requests, no Nagle delay */
      c->fd = fd;
      break;
    }
    last = errno;
    close(fd);
  }
  freeaddrinfo(res);
  if (c->fd < 0) return set_err(c, LUNA_ECONN, "cannot connect to lunad at %s:%d: %s", host, port, strerror(last));

  /* The hello authenticates the connection; lunad answers anything else with EAUTH. */
  cJSON *m = cJSON_CreateObject();
  if (!m || !cJSON_AddNumberToObject(m, "protocol", LUNA_PROTO_VERSION) ||
      !cJSON_AddStringToObject(m, "client", CLIENT_NAME) || !cJSON_AddStringToObject(m, "token", token)) {
    cJSON_Delete(m);
    return set_err(c, LUNA_ENOMEM, "out of memory building the hello");
  }
  reply r;
  int rc = exchange(c, LUNA_MSG_HELLO, m, &r);
  cJSON_Delete(m);
  if (rc) {
    drop(c); /* lunad closes the connection after a failed hello */
    return rc;
  }
  const cJSON *auth = cJSON_GetObjectItemCaseSensitive(r.msg, "authenticated");
  int ok = cJSON_IsTrue(auth);
  reply_free(&r);
  if (!ok) {
    drop(c);
    return set_err(c, LUNA_EAUTH, "%s: lunad answered the hello without \"authenticated\": true", c->peer);
  }
  set_ok(c);
  return 0;
}

void luna_client_close(luna_client *c) {
  if (!c) return;
  drop(c);
  cJSON_Delete(c->err_json);
  for (int i = 0; i < LORA_ID_CACHE; i++) free(c->ids[i].path);
  free(c);
}

int luna_client_errcode(const luna_client *c) { return c ? c->errcode : LUNA_ENOMEM; }

const char *luna_client_errmsg(const luna_client *c) { return c ? c->errmsg : "out of memory"; }

/* ---- requests -------------------------------------------------------------------- */

int luna_client_ping(luna_client *c) {
  if (!c) return LUNA_EINVAL;
  reply r;
  int rc = exchange(c, LUNA_MSG_PING, NULL, &r);
  if (rc) return rc;
  reply_free(&r);
  set_ok(c);
  return 0;
}

int luna_client_call_json(luna_client *c, int type, const char *json, char **reply_json) {
  if (reply_json) *reply_json = NULL;
  if (!c) return LUNA_EINVAL;
  if (type < 1 || type > 0xffff) return set_err(c, LUNA_EINVAL, "message type %d is not in 1..65535", type);
  cJSON *m = NULL;
  if (json) {
    char err[LUNA_ERR_LEN] = "";
    if (frame_parse_json((const uint8_t *)json, strlen(json), &m, err))
      return set_err(c, LUNA_EINVAL, "the request's JSON: %s", err);
  }
  reply r;
  int rc = exchange(c, (uint16_t)type, m, &r);
  cJSON_Delete(m);
  if (rc) return rc;
  if (reply_json) {
    char *s = malloc((size_t)r.json_len + 1);
    if (!s) {
      reply_free(&r);
      return set_err(c, LUNA_ENOMEM, "out of memory for a %u-byte reply", r.json_len);
    }
    memcpy(s, r.buf, r.json_len);
    s[r.json_len] = 0;
    *reply_json = s;
  }
  reply_free(&r);
  set_ok(c);
  return 0;
}

/* Check the vectors 'e' of the field 'name' (embeds_l or embeds_g) before sending. */
static int check_embeds(luna_client *c, const luna_encode_args *a, const luna_embeds *e, const char *name) {
  if (!e->n) return 0;
  if (e->n < 0 || e->n > LUNA_MAX_EMBED_ROWS)
    return set_err(c, LUNA_EINVAL, "encode: %s.n is %d; give 1 to %d rows (0: none)", name, e->n, LUNA_MAX_EMBED_ROWS);
  if (!e->data) return set_err(c, LUNA_EINVAL, "encode: %s.data is NULL with %s.n = %d", name, name, e->n);
  if (e->width < 1 || e->width > LUNA_MAX_EMBED_WIDTH)
    return set_err(c, LUNA_EINVAL, "encode: %s.width is %d; give 1 to %d floats per row", name, e->width,
                   LUNA_MAX_EMBED_WIDTH);
  if (!a->tokens_json)
    return set_err(c, LUNA_EINVAL, "encode: %s goes with tokens_json (slots {\"embed\": i}), not with text", name);
  size_t total = (size_t)e->n * (size_t)e->width;
  for (size_t i = 0; i < total; i++)
    if (!isfinite(e->data[i]))
      return set_err(c, LUNA_EINVAL, "encode: %s row %zu column %zu is not finite (%g)", name, i / (size_t)e->width,
                     i % (size_t)e->width, (double)e->data[i]);
  return 0;
}

/* Describe the vectors 'e' as "embeds".'key' of 'm' at bytes [begin, begin + their size) of
** the binary part; returns the end, or 0 when out of memory. */
static uint64_t add_embeds_desc(cJSON *m, const char *key, const luna_embeds *e, uint64_t begin) {
  uint64_t end = begin + (uint64_t)e->n * (uint64_t)e->width * sizeof(float);
  cJSON *all = cJSON_GetObjectItemCaseSensitive(m, "embeds");
  if (!all) all = cJSON_AddObjectToObject(m, "embeds");
  cJSON *d = all ? cJSON_AddObjectToObject(all, key) : NULL;
  cJSON *shape = d && cJSON_AddStringToObject(d, "dtype", "F32") ? cJSON_AddArrayToObject(d, "shape") : NULL;
  cJSON *off = shape ? cJSON_AddArrayToObject(d, "data_offsets") : NULL;
  double v[4] = {e->n, e->width, (double)begin, (double)end};
  for (int i = 0; off && i < 4; i++) {
    cJSON *x = cJSON_CreateNumber(v[i]);
    if (!x || !cJSON_AddItemToArray(i < 2 ? shape : off, x)) {
      cJSON_Delete(x);
      return 0;
    }
  }
  return off ? end : 0;
}

/* Build the encode request's JSON from 'a', or fail naming the bad field. */
static int encode_msg(luna_client *c, const luna_encode_args *a, cJSON **out) {
  *out = NULL;
  if (a->n_models < 1 || a->n_models > CLIENT_MAX_MODELS || !a->models)
    return set_err(c, LUNA_EINVAL, "encode: n_models is %d; give 1 to %d model paths", a->n_models, CLIENT_MAX_MODELS);
  for (int i = 0; i < a->n_models; i++)
    if (!a->models[i] || !a->models[i][0]) return set_err(c, LUNA_EINVAL, "encode: models[%d] is empty", i);
  if (!a->text == !a->tokens_json)
    return set_err(c, LUNA_EINVAL, "encode: give exactly one of 'text' and 'tokens_json'");
  if (a->clip_layer > 0)
    return set_err(c, LUNA_EINVAL, "encode: clip_layer is %d; it is -N (CLIPSetLastLayer) or 0", a->clip_layer);
  if (a->deadline_ms < 0) return set_err(c, LUNA_EINVAL, "encode: deadline_ms is negative (%d)", a->deadline_ms);
  if (a->n_loras < 0 || a->n_loras > LUNA_MAX_LORAS || (a->n_loras && !a->loras))
    return set_err(c, LUNA_EINVAL, "encode: n_loras is %d; give 0 to %d LoRAs%s", a->n_loras, LUNA_MAX_LORAS,
                   a->n_loras > 0 && a->n_loras <= LUNA_MAX_LORAS ? " in 'loras', which is NULL" : "");
  for (int i = 0; i < a->n_loras; i++) {
    const luna_lora *l = &a->loras[i];
    if (!l->path || !l->path[0]) return set_err(c, LUNA_EINVAL, "encode: loras[%d].path is empty", i);
    if (!isfinite(l->strength))
      return set_err(c, LUNA_EINVAL, "encode: loras[%d] (%s): strength is not a finite number", i, l->path);
    if (l->daemon_path && !l->daemon_path[0])
      return set_err(c, LUNA_EINVAL, "encode: loras[%d] (%s): daemon_path is empty (NULL for none)", i, l->path);
  }
  int rc_e = check_embeds(c, a, &a->embeds_l, "embeds_l");
  if (!rc_e) rc_e = check_embeds(c, a, &a->embeds_g, "embeds_g");
  if (rc_e) return rc_e;

  cJSON *m = cJSON_CreateObject(), *tokens = NULL;
  if (!m) goto oom;
  if (a->n_models == 1) {
    if (!cJSON_AddStringToObject(m, "model", a->models[0])) goto oom;
  } else {
    cJSON *arr = cJSON_AddArrayToObject(m, "model");
    if (!arr) goto oom;
    for (int i = 0; i < a->n_models; i++) {
      cJSON *s = cJSON_CreateString(a->models[i]);
      if (!s || !cJSON_AddItemToArray(arr, s)) {
        cJSON_Delete(s);
        goto oom;
      }
    }
  }
  if (a->tokens_json) {
    char err[LUNA_ERR_LEN] = "";
    int rc = frame_parse_json((const uint8_t *)a->tokens_json, strlen(a->tokens_json), &tokens, err);
    if (rc) {
      cJSON_Delete(m);
      return set_err(c, LUNA_EINVAL, "encode: tokens_json: %s", err);
    }
    if (!cJSON_AddItemToObject(m, "tokens", tokens)) goto oom;
    tokens = NULL;
  } else {
    size_t bad;
    if (!utf8_valid((const uint8_t *)a->text, strlen(a->text), &bad)) {
      cJSON_Delete(m);
      return set_err(c, LUNA_EUTF8, "encode: text is not valid UTF-8 (byte %zu)", bad);
    }
    if (!cJSON_AddStringToObject(m, "text", a->text)) goto oom;
  }
  if (a->clip_layer && !cJSON_AddNumberToObject(m, "clip_layer", a->clip_layer)) goto oom;
  if (a->deadline_ms && !cJSON_AddNumberToObject(m, "deadline_ms", a->deadline_ms)) goto oom;
  if (a->no_cache && !cJSON_AddBoolToObject(m, "cache", 0)) goto oom;
  /* the binary part: l's rows, then g's (embeds_bin) */
  uint64_t at = 0;
  if (a->embeds_l.n && !(at = add_embeds_desc(m, "l", &a->embeds_l, at))) goto oom;
  if (a->embeds_g.n && !add_embeds_desc(m, "g", &a->embeds_g, at)) goto oom;
  *out = m;
  return 0;
oom:
  cJSON_Delete(tokens);
  cJSON_Delete(m);
  return set_err(c, LUNA_ENOMEM, "encode: out of memory building the request");
}

/* ---- LoRAs ------------------------------------------------------------------------ */

/* The identity of the LoRA file at 'path' into 'hex'; on failure 'err' says why. */
static int file_identity(const char *path, char hex[LORA_ID_HEX], char *err) {
  st_file *f = NULL;
  int rc = st_open(path, &f, err);
  if (rc) return rc;
  uint8_t id[LORA_ID_LEN];
  lora_identity(f, id);
  lora_id_hex(id, hex);
  st_close(f);
  return 0;
}

int luna_lora_identity(const char *path, char id_hex[65]) {
  if (id_hex) id_hex[0] = 0;
  if (!path || !path[0] || !id_hex) return LUNA_EINVAL;
  char err[LUNA_ERR_LEN] = "";
  return file_identity(path, id_hex, err);
}

static int same_file(const lora_id_entry *e, const struct stat *st) {
  return e->dev == st->st_dev && e->ino == st->st_ino && e->size == st->st_size &&
         e->mtime.tv_sec == st->st_mtim.tv_sec && e->mtime.tv_nsec == st->st_mtim.tv_nsec;
}

/* The identity of 'path', from the handle's cache while the file keeps its inode, size
** and modification time, else computed (and remembered). */
static int cached_identity(luna_client *c, const char *path, char hex[LORA_ID_HEX]) {
  struct stat st;
  if (stat(path, &st)) return set_err(c, LUNA_EIO, "LoRA %s: %s", path, strerror(errno));
  lora_id_entry *slot = NULL;
  for (int i = 0; i < LORA_ID_CACHE; i++) {
    lora_id_entry *e = &c->ids[i];
    if (e->path && !strcmp(e->path, path)) {
      if (same_file(e, &st)) {
        memcpy(hex, e->hex, LORA_ID_HEX);
        return 0;
      }
      slot = e; /* the file changed: its entry is replaced */
    }
  }
  char err[LUNA_ERR_LEN] = "";
  int rc = file_identity(path, hex, err);
  if (rc) return set_err(c, rc, "%s", err);
  /* Remembered only when the file did not change while it was read. */
  struct stat after;
  if (stat(path, &after) || after.st_dev != st.st_dev || after.st_ino != st.st_ino || after.st_size != st.st_size ||
      after.st_mtim.tv_sec != st.st_mtim.tv_sec || after.st_mtim.tv_nsec != st.st_mtim.tv_nsec)
    return 0;
  for (int i = 0; !slot && i < LORA_ID_CACHE; i++)
    if (!c->ids[i].path) slot = &c->ids[i];
  if (!slot) {
    slot = &c->ids[c->next_slot];
    c->next_slot = (c->next_slot + 1) % LORA_ID_CACHE;
  }
  char *copy = strdup(path);
  if (!copy) return 0; /* not remembered; the identity itself is fine */
  free(slot->path);
  slot->path = copy;
  slot->dev = st.st_dev;
  slot->ino = st.st_ino;
  slot->size = st.st_size;
  slot->mtime = st.st_mtim;
  memcpy(slot->hex, hex, LORA_ID_HEX);
  return 0;
}

/* Put "uploading LoRA PATH" between the status name and the rest of the current error
** message (cut at the end when it does not fit). */
static void upload_context(luna_client *c, const char *path) {
  char old[LUNA_ERR_LEN];
  memcpy(old, c->errmsg, sizeof old);
  const char *sep = strstr(old, ": ");
  if (!sep) return;
  int n = snprintf(c->errmsg, sizeof c->errmsg, "%.*s: uploading LoRA %s: %s", (int)(sep - old), old, path, sep + 2);
  if (n < 0) memcpy(c->errmsg, old, sizeof old);
}

/*
** Upload the text-encoder tensors of 'path' to lunad; 'want' (or NULL) is the identity
** the caller expects the file to have. The identity is written into 'out' (or NULL).
*/
static int upload_file(luna_client *c, const char *path, const char *want, char *out) {
  st_file *f = NULL;
  char err[LUNA_ERR_LEN] = "";
  int rc = st_open(path, &f, err);
  if (rc) return set_err(c, rc, "%s", err);
  uint8_t id[LORA_ID_LEN];
  char hex[LORA_ID_HEX];
  lora_identity(f, id);
  lora_id_hex(id, hex);
  if (want && strcmp(want, hex)) {
    st_close(f);
    return set_err(c, LUNA_EINVAL, "LoRA %s changed while in use: its identity is now %s, it was %s", path, hex, want);
  }
  uint8_t *img = NULL;
  size_t img_len = 0;
  rc = lora_extract_te(f, &img, &img_len, err);
  st_close(f);
  if (rc) return set_err(c, rc, "%s", err);
  cJSON *m = cJSON_CreateObject();
  if (!m || !cJSON_AddStringToObject(m, "action", "upload") || !cJSON_AddStringToObject(m, "id", hex)) {
    cJSON_Delete(m);
    free(img);
    return set_err(c, LUNA_ENOMEM, "out of memory building the upload of %s", path);
  }
  reply r;
  rc = exchange_bin(c, LUNA_MSG_LORA, m, img, img_len, &r);
  cJSON_Delete(m);
  free(img);
  if (rc) {
    upload_context(c, path);
    return rc;
  }
  const cJSON *rid = cJSON_GetObjectItemCaseSensitive(r.msg, "id");
  if (cJSON_IsString(rid) && strcasecmp(rid->valuestring, hex)) {
    rc = set_err(c, LUNA_EPROTO, "%s: lunad stored LoRA %s as %s", c->peer, path, rid->valuestring);
    reply_free(&r);
    return rc;
  }
  reply_free(&r);
  if (out) memcpy(out, hex, LORA_ID_HEX);
  set_ok(c);
  return 0;
}

int luna_client_lora_upload(luna_client *c, const char *path, char id_hex[65]) {
  if (id_hex) id_hex[0] = 0;
  if (!c) return LUNA_EINVAL;
  if (!path || !path[0]) return set_err(c, LUNA_EINVAL, "lora upload: no file given");
  return upload_file(c, path, NULL, id_hex);
}

/* Add "loras" to the encode request 'm', the identities going into 'ids'. */
static int add_loras(luna_client *c, const luna_encode_args *a, cJSON *m, char ids[][LORA_ID_HEX]) {
  cJSON *arr = cJSON_AddArrayToObject(m, "loras");
  if (!arr) goto oom;
  for (int i = 0; i < a->n_loras; i++) {
    const luna_lora *l = &a->loras[i];
    int rc = cached_identity(c, l->path, ids[i]);
    if (rc) return rc;
    cJSON *e = cJSON_CreateObject();
    if (!e || !cJSON_AddItemToArray(arr, e)) {
      cJSON_Delete(e);
      goto oom;
    }
    if (!cJSON_AddStringToObject(e, "id", ids[i]) || !cJSON_AddNumberToObject(e, "strength", l->strength) ||
        (l->daemon_path && !cJSON_AddStringToObject(e, "path", l->daemon_path)))
      goto oom;
  }
  return 0;
oom:
  return set_err(c, LUNA_ENOMEM, "encode: out of memory building the request");
}

/*
** After ENOLORA: upload the stack's files whose identities the error's "missing"
** lists. Returns 0 to try again, or the status to give up with (ENOLORA as it came
** when the error names nothing to upload).
*/
static int upload_missing(luna_client *c, const luna_encode_args *a, char ids[][LORA_ID_HEX]) {
  const cJSON *missing = c->err_json ? cJSON_GetObjectItemCaseSensitive(c->err_json, "missing") : NULL;
  if (!cJSON_IsArray(missing) || !cJSON_GetArraySize(missing)) return c->errcode;
  int want[LUNA_MAX_LORAS] = {0}, n = 0;
  const cJSON *e;
  cJSON_ArrayForEach(e, missing) {
    int found = 0;
    for (int i = 0; cJSON_IsString(e) && i < a->n_loras; i++)
      if (!strcasecmp(ids[i], e->valuestring)) want[i] = found = 1;
    if (!found)
      return set_err(c, LUNA_EPROTO, "%s: lunad asks for LoRA %.80s, which is not in this request's stack", c->peer,
                     cJSON_IsString(e) ? e->valuestring : "(not a string)");
  }
  /* the error's JSON goes with the next exchange: 'want' holds what it said */
  for (int i = 0; i < a->n_loras; i++) {
    if (!want[i]) continue;
    for (int j = i + 1; j < a->n_loras; j++)
      if (!strcmp(ids[j], ids[i])) want[j] = 0; /* the same file twice in the stack: once is enough */
    int rc = upload_file(c, a->loras[i].path, ids[i], NULL);
    if (rc) return rc;
    n++;
  }
  return n ? 0 : LUNA_ENOLORA;
}

/* Copy tensor 'name' of the reply into a new float buffer after checking it is F32
** with 'n_dims' dimensions, the first being 1 and the others positive. */
static int take_f32(luna_client *c, const reply *r, const char *name, int n_dims, int64_t *shape, float **out) {
  frame_tensor t;
  char err[LUNA_ERR_LEN] = "";
  int rc = frame_get_tensor(r->msg, name, r->bin, r->bin_len, &t, err);
  if (rc == LUNA_EMISSING && !err[0])
    return set_err(c, LUNA_EPROTO, "%s: the encode reply has no tensor '%s'", c->peer, name);
  if (rc) return set_err(c, LUNA_EPROTO, "%s: encode reply: %s", c->peer, err);
  if (t.dtype != ST_F32)
    return set_err(c, LUNA_EPROTO, "%s: encode reply: tensor '%s' is %s, expected F32", c->peer, name,
                   st_dtype_name(t.dtype));
  int good = t.n_dims == n_dims && t.shape[0] == 1;
  for (int d = 1; good && d < n_dims; d++) good = t.shape[d] > 0;
  if (!good)
    return set_err(c, LUNA_EPROTO, "%s: encode reply: tensor '%s' has %d dimensions [%lld, ...], expected %s",
                   c->peer, name, t.n_dims, t.n_dims ? (long long)t.shape[0] : 0LL,
                   n_dims == 3 ? "[1, tokens, width]" : "[1, width]");
  /* The binary part may start at any byte, so the floats are copied, not aliased. */
  float *f = malloc((size_t)t.nbytes);
  if (!f) return set_err(c, LUNA_ENOMEM, "out of memory for the %llu-byte tensor '%s'", (unsigned long long)t.nbytes, name);
  memcpy(f, t.data, (size_t)t.nbytes);
  memcpy(shape, t.shape, (size_t)n_dims * sizeof *shape);
  *out = f;
  return 0;
}

/*
** The binary part of an encode with vectors, as encode_msg described it: one
** encoder's floats in place, or a copy holding l's then g's ('*owned', to free).
** Floats go as they are in memory: little-endian on every machine luna builds for.
*/
static int embeds_bin(luna_client *c, const luna_encode_args *a, const uint8_t **bin, size_t *len, uint8_t **owned) {
  size_t nl = a->embeds_l.n ? (size_t)a->embeds_l.n * (size_t)a->embeds_l.width * sizeof(float) : 0;
  size_t ng = a->embeds_g.n ? (size_t)a->embeds_g.n * (size_t)a->embeds_g.width * sizeof(float) : 0;
  *owned = NULL;
  *len = nl + ng;
  if (!nl || !ng) {
    *bin = (const uint8_t *)(nl ? a->embeds_l.data : ng ? a->embeds_g.data : NULL);
    return 0;
  }
  if (!(*owned = malloc(nl + ng)))
    return set_err(c, LUNA_ENOMEM, "encode: out of memory for the %zu bytes of embeds_l and embeds_g", nl + ng);
  memcpy(*owned, a->embeds_l.data, nl);
  memcpy(*owned + nl, a->embeds_g.data, ng);
  *bin = *owned;
  return 0;
}

int luna_client_encode(luna_client *c, const luna_encode_args *a, luna_encode_result *r) {
  if (r) memset(r, 0, sizeof *r);
  if (!c) return LUNA_EINVAL;
  if (!a || !r) return set_err(c, LUNA_EINVAL, "encode: the arguments or the result are NULL");
  cJSON *m;
  int rc = encode_msg(c, a, &m);
  if (rc) return rc;
  char ids[LUNA_MAX_LORAS][LORA_ID_HEX];
  const uint8_t *bin = NULL;
  uint8_t *bin_owned = NULL;
  size_t bin_len = 0;
  if ((a->n_loras && (rc = add_loras(c, a, m, ids))) || (rc = embeds_bin(c, a, &bin, &bin_len, &bin_owned))) {
    cJSON_Delete(m);
    return rc;
  }
  reply rep;
  for (int round = 0;; round++) {
    rc = exchange_bin(c, LUNA_MSG_ENCODE, m, bin, bin_len, &rep);
    if (rc != LUNA_ENOLORA || !a->n_loras) break;
    if (round == LORA_ROUNDS) {
      size_t len = strlen(c->errmsg);
      snprintf(c->errmsg + len, sizeof c->errmsg - len, " (still missing after %d rounds of uploads)", LORA_ROUNDS);
      break;
    }
    if ((rc = upload_missing(c, a, ids))) break;
  }
  cJSON_Delete(m);
  free(bin_owned);
  if (rc) return rc;

  const cJSON *fam = cJSON_GetObjectItemCaseSensitive(rep.msg, "family");
  const cJSON *cached = cJSON_GetObjectItemCaseSensitive(rep.msg, "cached");
  if (!cJSON_IsString(fam) || !fam->valuestring[0] || strlen(fam->valuestring) >= sizeof r->family) {
    rc = set_err(c, LUNA_EPROTO, "%s: the encode reply has no valid \"family\"", c->peer);
    goto done;
  }
  if ((rc = take_f32(c, &rep, "cond", 3, r->cond_shape, &r->cond)) ||
      (rc = take_f32(c, &rep, "pooled", 2, r->pooled_shape, &r->pooled)))
    goto done;
  strcpy(r->family, fam->valuestring);
  r->cached = cJSON_IsTrue(cached);
  /* "lora": {"mode", "patched", "unmapped", ...}; read leniently, it only informs */
  const cJSON *lo = cJSON_GetObjectItemCaseSensitive(rep.msg, "lora");
  if (cJSON_IsObject(lo)) {
    const cJSON *mode = cJSON_GetObjectItemCaseSensitive(lo, "mode");
    const cJSON *patched = cJSON_GetObjectItemCaseSensitive(lo, "patched");
    const cJSON *unmapped = cJSON_GetObjectItemCaseSensitive(lo, "unmapped");
    if (cJSON_IsString(mode) && strlen(mode->valuestring) < sizeof r->lora_mode) strcpy(r->lora_mode, mode->valuestring);
    if (cJSON_IsNumber(patched) && patched->valuedouble >= 0 && patched->valuedouble <= 1e9)
      r->lora_patched = (int)patched->valuedouble;
    if (cJSON_IsNumber(unmapped) && unmapped->valuedouble >= 0 && unmapped->valuedouble <= 1e9)
      r->lora_unmapped = (int)unmapped->valuedouble;
  }
  set_ok(c);
done:
  reply_free(&rep);
  if (rc) luna_encode_result_free(r);
  return rc;
}

void luna_encode_result_free(luna_encode_result *r) {
  if (!r) return;
  free(r->cond);
  free(r->pooled);
  memset(r, 0, sizeof *r);
}

/* ---- VAE -------------------------------------------------------------------------- */

/* The largest tensor a VAE call sends or expects back, in bytes (a reply is bounded
** by CLIENT_MAX_REPLY anyway; this keeps the size arithmetic far from overflow). */
#define VAE_MAX_BYTES (1ull << 40)

/* The bytes of an F32 tensor of 'shape' (n dims), or 0 when a dimension is not
** positive or the total exceeds VAE_MAX_BYTES. */
static uint64_t f32_bytes(const int64_t *shape, int n) {
  uint64_t bytes = sizeof(float);
  for (int d = 0; d < n; d++) {
    if (shape[d] <= 0 || (uint64_t)shape[d] > VAE_MAX_BYTES) return 0;
    bytes *= (uint64_t)shape[d];
    if (bytes > VAE_MAX_BYTES) return 0;
  }
  return bytes;
}

/* Describe one F32 tensor 'name' of 'shape' as the whole binary part of 'm'. */
static int add_tensor_desc(cJSON *m, const char *name, const int64_t *shape, int n, uint64_t bytes) {
  cJSON *ts = cJSON_AddObjectToObject(m, "tensors");
  cJSON *e = ts ? cJSON_AddObjectToObject(ts, name) : NULL;
  cJSON *sh = e && cJSON_AddStringToObject(e, "dtype", "F32") ? cJSON_AddArrayToObject(e, "shape") : NULL;
  if (!sh) return -1;
  for (int d = 0; d < n; d++) {
    cJSON *v = cJSON_CreateNumber((double)shape[d]);
    if (!v || !cJSON_AddItemToArray(sh, v)) {
      cJSON_Delete(v);
      return -1;
    }
  }
  cJSON *off = cJSON_AddArrayToObject(e, "data_offsets");
  cJSON *b = cJSON_CreateNumber(0), *end = cJSON_CreateNumber((double)bytes);
  int ok = off && b && end && cJSON_AddItemToArray(off, b);
  if (!ok) cJSON_Delete(b);
  if (!ok || !cJSON_AddItemToArray(off, end)) {
    cJSON_Delete(end);
    return -1;
  }
  return 0;
}

/* Build a VAE request's JSON from 'a' and the input tensor 'name' of 'shape', or fail
** naming the bad field ('what': "vae_decode" or "vae_encode"). */
static int vae_msg(luna_client *c, const char *what, const luna_vae_args *a, const char *name, const int64_t *shape,
                   uint64_t bytes, cJSON **out) {
  *out = NULL;
  if (!a->model || !a->model[0]) return set_err(c, LUNA_EINVAL, "%s: no model", what);
  if (a->tiled != LUNA_TILED_AUTO && a->tiled != LUNA_TILED_ON && a->tiled != LUNA_TILED_OFF)
    return set_err(c, LUNA_EINVAL, "%s: tiled is %d; it is LUNA_TILED_AUTO, LUNA_TILED_ON or LUNA_TILED_OFF", what,
                   a->tiled);
  if (a->tile < 0) return set_err(c, LUNA_EINVAL, "%s: tile is negative (%d)", what, a->tile);
  if (a->overlap < 0) return set_err(c, LUNA_EINVAL, "%s: overlap is negative (%d)", what, a->overlap);
  if (a->overlap && a->overlap >= (a->tile ? a->tile : 512))
    return set_err(c, LUNA_EINVAL, "%s: overlap %d is not smaller than the tile size %d", what, a->overlap,
                   a->tile ? a->tile : 512);
  if (a->deadline_ms < 0) return set_err(c, LUNA_EINVAL, "%s: deadline_ms is negative (%d)", what, a->deadline_ms);

  cJSON *m = cJSON_CreateObject();
  int ok = m && cJSON_AddStringToObject(m, "model", a->model);
  if (ok && a->tiled == LUNA_TILED_AUTO) ok = cJSON_AddStringToObject(m, "tiled", "auto") != NULL;
  else if (ok) ok = cJSON_AddBoolToObject(m, "tiled", a->tiled == LUNA_TILED_ON) != NULL;
  if (ok && a->tile) ok = cJSON_AddNumberToObject(m, "tile", a->tile) != NULL;
  if (ok && a->overlap) ok = cJSON_AddNumberToObject(m, "overlap", a->overlap) != NULL;
  if (ok && a->progress) ok = cJSON_AddTrueToObject(m, "progress") != NULL;
  if (ok && a->deadline_ms) ok = cJSON_AddNumberToObject(m, "deadline_ms", a->deadline_ms) != NULL;
  if (ok) ok = !add_tensor_desc(m, name, shape, 4, bytes);
  if (!ok) {
    cJSON_Delete(m);
    return set_err(c, LUNA_ENOMEM, "%s: out of memory building the request", what);
  }
  *out = m;
  return 0;
}

/*
** Take tensor 'name' of the reply 'r' into 't' after checking it is F32 [want...]
** (a 'want' entry of -1 takes any positive size). The floats are moved to the start
** of the reply's buffer, which 't' then owns: no second copy of a large image.
*/
static int take_vae_tensor(luna_client *c, const char *what, reply *r, const char *name, const int64_t want[4],
                           luna_tensor *t) {
  frame_tensor ft;
  char err[LUNA_ERR_LEN] = "";
  int rc = frame_get_tensor(r->msg, name, r->bin, r->bin_len, &ft, err);
  if (rc == LUNA_EMISSING && !err[0])
    return set_err(c, LUNA_EPROTO, "%s: the %s reply has no tensor '%s'", c->peer, what, name);
  if (rc) return set_err(c, LUNA_EPROTO, "%s: %s reply: %s", c->peer, what, err);
  if (ft.dtype != ST_F32)
    return set_err(c, LUNA_EPROTO, "%s: %s reply: tensor '%s' is %s, expected F32", c->peer, what, name,
                   st_dtype_name(ft.dtype));
  int good = ft.n_dims == 4;
  for (int d = 0; good && d < 4; d++) good = want[d] < 0 ? ft.shape[d] > 0 : ft.shape[d] == want[d];
  if (!good) {
    char got[96] = "", exp[96] = "";
    size_t at = 0, ae = 0;
    for (int d = 0; d < ft.n_dims && d < ST_MAX_DIMS && at < sizeof got; d++)
      at += (size_t)snprintf(got + at, sizeof got - at, "%s%lld", d ? ", " : "", (long long)ft.shape[d]);
    for (int d = 0; d < 4 && ae < sizeof exp; d++)
      ae += want[d] < 0 ? (size_t)snprintf(exp + ae, sizeof exp - ae, "%sC", d ? ", " : "")
                        : (size_t)snprintf(exp + ae, sizeof exp - ae, "%s%lld", d ? ", " : "", (long long)want[d]);
    return set_err(c, LUNA_EPROTO, "%s: %s reply: tensor '%s' is [%s], expected [%s]", c->peer, what, name, got, exp);
  }
  memmove(r->buf, ft.data, (size_t)ft.nbytes);
  uint8_t *shrunk = realloc(r->buf, (size_t)ft.nbytes);
  t->data = (float *)(shrunk ? shrunk : r->buf);
  r->buf = NULL;
  r->bin = NULL;
  r->bin_len = 0;
  memcpy(t->shape, ft.shape, sizeof t->shape);
  t->n_dims = 4;
  return 0;
}

/* One VAE request: 'in_shape' of the input tensor 'in_name' at 'data', the reply's
** tensor 'out_name' checked against 'want'. */
static int vae_call(luna_client *c, uint16_t type, const char *what, const luna_vae_args *a, const char *in_name,
                    const int64_t in_shape[4], const float *data, const char *out_name, const int64_t want[4],
                    luna_tensor *out) {
  uint64_t in_bytes = f32_bytes(in_shape, 4);
  int64_t want_any[4];
  for (int d = 0; d < 4; d++) want_any[d] = want[d] < 0 ? 1 : want[d];
  if (!in_bytes || in_bytes > SIZE_MAX || !f32_bytes(want_any, 4))
    return set_err(c, LUNA_EINVAL, "%s: shape [%lld, %lld, %lld, %lld] of '%s' is empty, negative or too large", what,
                   (long long)in_shape[0], (long long)in_shape[1], (long long)in_shape[2], (long long)in_shape[3],
                   in_name);
  if (!data) return set_err(c, LUNA_EINVAL, "%s: '%s' is NULL", what, in_name);
  cJSON *m;
  int rc = vae_msg(c, what, a, in_name, in_shape, in_bytes, &m);
  if (rc) return rc;
  reply rep;
  rc = exchange_full(c, type, m, (const uint8_t *)data, (size_t)in_bytes, a->progress, a->progress_ud, &rep);
  cJSON_Delete(m);
  if (rc) return rc;
  rc = take_vae_tensor(c, what, &rep, out_name, want, out);
  reply_free(&rep);
  if (!rc) set_ok(c);
  return rc;
}

int luna_client_vae_decode(luna_client *c, const luna_vae_args *a, const float *latent, int64_t B, int64_t C,
                           int64_t h, int64_t w, luna_tensor *image) {
  if (image) memset(image, 0, sizeof *image);
  if (!c) return LUNA_EINVAL;
  if (!a || !image) return set_err(c, LUNA_EINVAL, "vae_decode: the arguments or the result are NULL");
  const int64_t in[4] = {B, C, h, w};
  /* 8h and 8w cannot overflow: f32_bytes bounds h and w first */
  int64_t want[4] = {B, h > 0 && h < (1ll << 40) ? 8 * h : 0, w > 0 && w < (1ll << 40) ? 8 * w : 0, 3};
  return vae_call(c, LUNA_MSG_VAE_DECODE, "vae_decode", a, "latent", in, latent, "image", want, image);
}

int luna_client_vae_encode(luna_client *c, const luna_vae_args *a, const float *pixels, int64_t B, int64_t H,
                           int64_t W, luna_tensor *latent) {
  if (latent) memset(latent, 0, sizeof *latent);
  if (!c) return LUNA_EINVAL;
  if (!a || !latent) return set_err(c, LUNA_EINVAL, "vae_encode: the arguments or the result are NULL");
  const int64_t in[4] = {B, H, W, 3};
  if (H > 0 && W > 0 && (H < 8 || W < 8))
    return set_err(c, LUNA_EINVAL, "vae_encode: a %lldx%lld image is smaller than one 8x8 latent cell", (long long)H,
                   (long long)W);
  int64_t want[4] = {B, -1, H / 8, W / 8};
  return vae_call(c, LUNA_MSG_VAE_ENCODE, "vae_encode", a, "image", in, pixels, "latent", want, latent);
}

void luna_tensor_free(luna_tensor *t) {
  if (!t) return;
  free(t->data);
  memset(t, 0, sizeof *t);
}

void luna_free(void *p) { free(p); }

const char *luna_default_socket(void) {
  static _Thread_local char path[4096];
  const char *s = getenv("LUNA_SOCKET");
  if (s && *s) {
    snprintf(path, sizeof path, "%s", s);
    return path;
  }
  const char *dir = getenv("XDG_RUNTIME_DIR");
  if (dir && *dir) snprintf(path, sizeof path, "%s/lunad.sock", dir);
  else snprintf(path, sizeof path, "/tmp/lunad-%lu.sock", (unsigned long)getuid());
  return path;
}
