/* loop.c -- lunad's event loop: listeners, connections, framing, authentication, replies */
/* SPDX-License-Identifier: MIT */
#include "server/server.h"

#include "core/log.h"
#include "proto/frame.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* Buffers above this size are released once empty. */
#define CONN_KEEP_BYTES 65536u
/* Reading pauses while this many reply bytes wait for a client that does not read. */
#define WRITE_HIGH_WATER (16u << 20)

typedef struct conn {
  int fd;
  uint64_t id;
  int tcp, authed;
  uint8_t *rbuf;
  size_t rlen, rcap;
  uint8_t *wbuf;
  size_t wlen, woff, wcap;
  int refs;                    /* jobs in flight (loop thread only) */
  int close_after_write;       /* framing broke: flush the error, then close */
  int dead;                    /* socket closed; freed when refs reaches 0 */
  double partial_since_ms;     /* a frame started arriving at; 0: none */
  uint32_t events;             /* registered epoll events */
  atomic_int cancelled;
  struct conn *prev, *next;
} conn;

/* epoll data tags for the non-connection descriptors */
enum { TAG_UNIX = 1, TAG_TCP = 2, TAG_WAKE = 3, TAG_SIGNAL = 4 };

static struct {
  int ep;
  int unix_fd, tcp_fd, sig_fd;
  conn *conns;
  conn *graveyard;             /* closed connections, freed at the end of a loop turn */
  uint64_t next_id;
  double stop_deadline_ms;
} L = {.unix_fd = -1, .tcp_fd = -1, .sig_fd = -1};

static atomic_int preloads_cancelled; /* the --preload jobs' cancel flag: set on the stop signal */

/* ---- connections ------------------------------------------------------------------ */

static void conn_update_events(conn *c) {
  uint32_t ev = 0;
  if (!c->close_after_write && c->wlen - c->woff < WRITE_HIGH_WATER) ev |= EPOLLIN;
  if (c->wlen > c->woff) ev |= EPOLLOUT;
  if (ev != c->events) {
    struct epoll_event e = {.events = ev, .data.ptr = c};
    epoll_ctl(L.ep, EPOLL_CTL_MOD, c->fd, &e);
    c->events = ev;
  }
}

static void conn_free(conn *c) {
  free(c->rbuf);
  free(c->wbuf);
  free(c);
}

static void conn_close(conn *c, const char *why) {
  if (c->dead) return;
  log_debug("connection %llu closed: %s", (unsigned long long)c->id, why);
  epoll_ctl(L.ep, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  c->dead = 1;
  atomic_store(&c->cancelled, 1);
  if (c->prev) c->prev->next = c->next;
  else L.conns = c->next;
  if (c->next) c->next->prev = c->prev;
  atomic_fetch_sub(&srv.n_conns, 1);
  /* never freed here: events of this epoll turn may still point at it (ae.c's deferred
  ** delete); bury_dead frees it once no job refers to it either */
  c->prev = NULL;
  c->next = L.graveyard;
  L.graveyard = c;
}

static void bury_dead(void) {
  for (conn **pp = &L.graveyard; *pp;) {
    conn *c = *pp;
    if (c->refs) {
      pp = &c->next;
      continue;
    }
    *pp = c->next;
    conn_free(c);
  }
}

static void conn_queue(conn *c, const uint8_t *data, size_t len) {
  if (c->dead) return;
  if (c->woff && c->woff == c->wlen) c->woff = c->wlen = 0;
  if (c->wlen + len > c->wcap) {
    size_t cap = c->wcap ? c->wcap : 4096;
    while (cap < c->wlen + len) cap *= 2;
    uint8_t *n = realloc(c->wbuf, cap);
    if (!n) {
      conn_close(c, "out of memory for its replies");
      return;
    }
    c->wbuf = n;
    c->wcap = cap;
  }
  memcpy(c->wbuf + c->wlen, data, len);
  c->wlen += len;
}

static void conn_process(conn *c);

/* Send what the socket takes. Frames left unparsed in the read buffer while replies
** were over WRITE_HIGH_WATER are parsed once they are under it again: the socket has
** nothing more to say about them, so no EPOLLIN would come. */
static void conn_flush(conn *c) {
  for (;;) {
    while (!c->dead && c->woff < c->wlen) {
      ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        conn_close(c, strerror(errno));
        return;
      }
      c->woff += (size_t)n;
    }
    if (c->dead) return;
    if (c->woff == c->wlen) {
      c->woff = c->wlen = 0;
      if (c->wcap > CONN_KEEP_BYTES) { /* idle connections hold little memory */
        free(c->wbuf);
        c->wbuf = NULL;
        c->wcap = 0;
      }
      if (c->close_after_write) {
        conn_close(c, "protocol error");
        return;
      }
    }
    size_t before = c->rlen;
    if (!before || c->close_after_write || c->wlen - c->woff >= WRITE_HIGH_WATER) break;
    conn_process(c);
    if (c->dead) return;
    if (c->rlen == before) break; /* only a partial frame there */
  }
  conn_update_events(c);
}

static void send_error(conn *c, uint16_t type, uint64_t id, int status, const char *msg) {
  uint8_t *buf;
  size_t len;
  if (frame_build_error(type, id, status, msg, &buf, &len) == 0) {
    conn_queue(c, buf, len);
    free(buf);
  }
  atomic_fetch_add(&srv.stats.failed, 1);
}

/* ---- requests --------------------------------------------------------------------- */

static int token_equal(const char *given, size_t len) {
  /* constant time in the token's length: every byte is compared whatever differs */
  size_t n = srv.token_len;
  unsigned diff = (unsigned)(len ^ n);
  for (size_t i = 0; i < n; i++) diff |= (unsigned)(uint8_t)srv.token[i] ^ (unsigned)(i < len ? (uint8_t)given[i] : 0);
  return diff == 0;
}

static void handle_hello(conn *c, const frame_header *h, cJSON *msg) {
  const cJSON *p = cJSON_GetObjectItemCaseSensitive(msg, "protocol");
  if (p && (!cJSON_IsNumber(p) || p->valuedouble != LUNA_PROTO_VERSION)) {
    send_error(c, h->type, h->request_id, LUNA_EVERSION, "hello: \"protocol\" must be 1");
    return;
  }
  if (c->tcp && !c->authed) {
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(msg, "token");
    if (!cJSON_IsString(t) || !token_equal(t->valuestring, strlen(t->valuestring))) {
      log_warn("connection %llu: authentication failed", (unsigned long long)c->id);
      send_error(c, h->type, h->request_id, LUNA_EAUTH, "hello: wrong or missing \"token\"");
      c->close_after_write = 1;
      return;
    }
    c->authed = 1;
  }
  cJSON *r = cJSON_CreateObject();
  cJSON_AddStringToObject(r, "server", "lunad");
  cJSON_AddStringToObject(r, "version", LUNAD_VERSION);
  cJSON_AddNumberToObject(r, "protocol", LUNA_PROTO_VERSION);
  cJSON_AddBoolToObject(r, "authenticated", !c->tcp || c->authed);
  uint8_t *buf;
  size_t len;
  if (frame_build(h->type, LUNA_FLAG_REPLY, h->request_id, r, NULL, 0, &buf, &len, NULL) == 0) {
    conn_queue(c, buf, len);
    free(buf);
  }
  cJSON_Delete(r);
}

static void handle_frame(conn *c, const frame_header *h, const uint8_t *json) {
  char err[LUNA_ERR_LEN];
  if (c->tcp && !c->authed && h->type != LUNA_MSG_HELLO) {
    send_error(c, h->type, h->request_id, LUNA_EAUTH, "authenticate first: the first frame on TCP must be a hello with the token");
    c->close_after_write = 1;
    return;
  }
  cJSON *msg;
  if (frame_parse_json(json, h->json_len, &msg, err)) {
    send_error(c, h->type, h->request_id, LUNA_EJSON, err);
    return;
  }
  if (h->type == LUNA_MSG_HELLO) {
    handle_hello(c, h, msg);
    cJSON_Delete(msg);
    return;
  }
  if (atomic_load(&srv.stopping) && h->type != LUNA_MSG_PING && h->type != LUNA_MSG_HEALTH &&
      h->type != LUNA_MSG_STATUS) {
    send_error(c, h->type, h->request_id, LUNA_ESHUTDOWN, "the daemon is shutting down and takes no new work");
    cJSON_Delete(msg);
    return;
  }
  job *j = calloc(1, sizeof *j);
  if (!j) {
    send_error(c, h->type, h->request_id, LUNA_ENOMEM, "out of memory");
    cJSON_Delete(msg);
    return;
  }
  j->c = c;
  j->cancelled = &c->cancelled;
  j->type = h->type;
  j->request_id = h->request_id;
  j->msg = msg;
  j->received_ms = srv_now_ms();
  double dl = srv.cfg.deadline_s * 1000.0;
  const cJSON *d = cJSON_GetObjectItemCaseSensitive(msg, "deadline_ms");
  if (d && cJSON_IsNumber(d) && d->valuedouble > 0 && (dl <= 0 || d->valuedouble < dl)) dl = d->valuedouble;
  if (d && (!cJSON_IsNumber(d) || d->valuedouble <= 0)) {
    send_error(c, h->type, h->request_id, LUNA_EINVAL, "\"deadline_ms\" must be a positive number");
    cJSON_Delete(msg);
    free(j);
    return;
  }
  j->deadline_ms = dl > 0 ? j->received_ms + dl : 0;
  if ((h->type == LUNA_MSG_LORA || h->type == LUNA_MSG_VAE_DECODE || h->type == LUNA_MSG_VAE_ENCODE ||
       h->type == LUNA_MSG_ENCODE) &&
      h->bin_len) { /* an upload, an image or an encode's input embeddings: the worker reads it */
    j->bin = malloc((size_t)h->bin_len);
    if (!j->bin) {
      send_error(c, h->type, h->request_id, LUNA_ENOMEM, "out of memory for the frame's binary part");
      cJSON_Delete(msg);
      free(j);
      return;
    }
    memcpy(j->bin, json + h->json_len, (size_t)h->bin_len);
    j->bin_len = (size_t)h->bin_len;
  }
  if (dispatch_inline(c, j)) {
    conn_queue(c, j->reply, j->reply_len);
    atomic_fetch_add(j->failed ? &srv.stats.failed : &srv.stats.served, 1);
    free(j->reply);
    free(j->bin);
    cJSON_Delete(j->msg);
    free(j);
    return;
  }
  j->batch_key = dispatch_batch_key(j);
  int rc = work_submit(j);
  if (rc) {
    free(j->batch_key);
    free(j->bin);
    if (rc == LUNA_EBUSY) atomic_fetch_add(&srv.stats.busy, 1);
    send_error(c, h->type, h->request_id, rc,
               rc == LUNA_EBUSY ? "the work queue is full (--max-queue); retry later" : "the daemon is shutting down");
    cJSON_Delete(j->msg);
    free(j);
    return;
  }
  c->refs++;
}

/* Parse every complete frame in the read buffer. */
static void conn_process(conn *c) {
  size_t off = 0;
  char err[LUNA_ERR_LEN];
  while (!c->dead && !c->close_after_write && c->wlen - c->woff < WRITE_HIGH_WATER) {
    frame_header h = {0};
    int rc = frame_parse_header(c->rbuf + off, c->rlen - off, srv.cfg.max_frame, &h, err);
    if (rc == FRAME_NEED_MORE) break;
    if (rc < 0) {
      log_warn("connection %llu: %s", (unsigned long long)c->id, err);
      send_error(c, h.type, h.request_id, rc, err);
      c->close_after_write = 1; /* the stream cannot be resynchronised */
      off = c->rlen;
      break;
    }
    size_t total = LUNA_FRAME_HEADER + (size_t)h.json_len + (size_t)h.bin_len;
    if (c->rlen - off < total) {
      if (c->rcap < total) { /* room for the whole frame, checked against --max-frame already */
        if (off) {
          memmove(c->rbuf, c->rbuf + off, c->rlen - off);
          c->rlen -= off;
          off = 0;
        }
        uint8_t *n = realloc(c->rbuf, total);
        if (!n) {
          send_error(c, h.type, h.request_id, LUNA_ENOMEM, "out of memory for the frame");
          c->close_after_write = 1;
          break;
        }
        c->rbuf = n;
        c->rcap = total;
      }
      break;
    }
    handle_frame(c, &h, c->rbuf + off + LUNA_FRAME_HEADER);
    off += total;
  }
  if (off) {
    memmove(c->rbuf, c->rbuf + off, c->rlen - off);
    c->rlen -= off;
  }
  c->partial_since_ms = c->rlen ? (c->partial_since_ms ? c->partial_since_ms : srv_now_ms()) : 0;
  if (!c->rlen && c->rcap > CONN_KEEP_BYTES) {
    free(c->rbuf);
    c->rbuf = NULL;
    c->rcap = 0;
  }
}

static void conn_read(conn *c) {
  for (;;) {
    if (c->rlen == c->rcap) {
      size_t cap = c->rcap ? c->rcap * 2 : 16384;
      if (cap > srv.cfg.max_frame + 65536) cap = srv.cfg.max_frame + 65536;
      if (cap <= c->rcap) { /* buffer full of complete frames waiting for writes to drain */
        conn_update_events(c);
        break;
      }
      uint8_t *n = realloc(c->rbuf, cap);
      if (!n) {
        conn_close(c, "out of memory");
        return;
      }
      c->rbuf = n;
      c->rcap = cap;
    }
    ssize_t n = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      conn_close(c, strerror(errno));
      return;
    }
    if (n == 0) {
      conn_close(c, "peer closed");
      return;
    }
    c->rlen += (size_t)n;
    c->partial_since_ms = c->partial_since_ms ? c->partial_since_ms : srv_now_ms();
    conn_process(c);
    if (c->dead || c->close_after_write) break;
  }
  if (!c->dead) conn_flush(c);
}

static void accept_all(int lfd, int tcp) {
  for (;;) {
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) log_warn("accept: %s", strerror(errno));
      return;
    }
    conn *c = calloc(1, sizeof *c);
    if (!c) {
      close(fd);
      log_error("out of memory accepting a connection");
      continue;
    }
    c->fd = fd;
    c->id = ++L.next_id;
    c->tcp = tcp;
    c->events = EPOLLIN;
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(L.ep, EPOLL_CTL_ADD, fd, &e) < 0) {
      close(fd);
      free(c);
      continue;
    }
    c->next = L.conns;
    if (L.conns) L.conns->prev = c;
    L.conns = c;
    atomic_fetch_add(&srv.n_conns, 1);
    log_debug("connection %llu accepted (%s)", (unsigned long long)c->id, tcp ? "tcp" : "unix");
  }
}

static void deliver_done(void) {
  job *j = work_take_done();
  while (j) {
    job *next = j->next;
    conn *c = j->c;
    if (j->is_note) { /* progress: its job still holds the connection */
      if (c && !c->dead) {
        conn_queue(c, j->reply, j->reply_len);
        conn_flush(c);
      }
      free(j->reply);
      free(j);
      j = next;
      continue;
    }
    if (!c) { /* a --preload */
      atomic_fetch_sub(&srv.preloads_pending, 1);
      const char *name = cJSON_GetObjectItem(j->msg, "model")->valuestring;
      if (j->failed) log_error("--preload %s failed", name);
      else if (!j->reply) log_info("--preload %s skipped: lunad is stopping", name);
    }
    if (c) {
      c->refs--;
      if (c->dead) {
        if (j->reply) atomic_fetch_add(&srv.stats.dropped, 1);
      } else if (j->reply) {
        atomic_fetch_add(j->failed ? &srv.stats.failed : &srv.stats.served, 1);
        conn_queue(c, j->reply, j->reply_len);
        conn_flush(c); /* parses frames whose reading paused, too */
      }
    }
    free(j->reply);
    free(j->batch_key);
    free(j->bin);
    cJSON_Delete(j->msg);
    free(j);
    j = next;
  }
}

/* After loop_run and work_stop: the jobs that finished once the loop had stopped (their
** connections are all closed) and the connections they held are freed. */
void loop_finish(void) {
  deliver_done();
  bury_dead();
}

/* ---- listeners -------------------------------------------------------------------- */

static int listen_unix(char *err) {
  const char *path = srv.cfg.socket_path;
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof a.sun_path)
    return luna_fail(err, LUNA_EINVAL, "--socket %s: path longer than %zu bytes", path, sizeof a.sun_path - 1);
  strcpy(a.sun_path, path);
  struct stat sb;
  if (lstat(path, &sb) == 0) {
    if (!S_ISSOCK(sb.st_mode)) return luna_fail(err, LUNA_EIO, "--socket %s: exists and is not a socket", path);
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe >= 0 && connect(probe, (struct sockaddr *)&a, sizeof a) == 0) {
      close(probe);
      return luna_fail(err, LUNA_EIO, "--socket %s: another daemon is listening there", path);
    }
    if (probe >= 0) close(probe);
    log_info("replacing stale socket %s", path);
    unlink(path);
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return luna_fail(err, LUNA_EIO, "socket: %s", strerror(errno));
  mode_t old = umask(0777 & ~srv.cfg.socket_mode);
  int rc = bind(fd, (struct sockaddr *)&a, sizeof a);
  umask(old);
  if (rc < 0 || chmod(path, srv.cfg.socket_mode) < 0 || listen(fd, 512) < 0) {
    int e = errno;
    close(fd);
    return luna_fail(err, LUNA_EIO, "--socket %s: %s", path, strerror(e));
  }
  L.unix_fd = fd;
  return 0;
}

static int listen_tcp(char *err) {
  char host[256];
  const char *spec = srv.cfg.listen, *colon = strrchr(spec, ':');
  if (!colon || colon == spec || (size_t)(colon - spec) >= sizeof host || !colon[1])
    return luna_fail(err, LUNA_EINVAL, "--listen %s: expected HOST:PORT", spec);
  memcpy(host, spec, (size_t)(colon - spec));
  host[colon - spec] = 0;
  char *h = host;
  if (h[0] == '[' && h[strlen(h) - 1] == ']') { /* [::1]:port */
    h[strlen(h) - 1] = 0;
    h++;
  }
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *res;
  int g = getaddrinfo(h, colon + 1, &hints, &res);
  if (g) return luna_fail(err, LUNA_EINVAL, "--listen %s: %s", spec, gai_strerror(g));
  int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
  if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 512) < 0) {
    int e = errno;
    if (fd >= 0) close(fd);
    freeaddrinfo(res);
    return luna_fail(err, LUNA_EIO, "--listen %s: %s", spec, strerror(e));
  }
  freeaddrinfo(res);
  L.tcp_fd = fd;
  return 0;
}

static void ep_add(int fd, uint64_t tag) {
  struct epoll_event e = {.events = EPOLLIN, .data.u64 = tag};
  epoll_ctl(L.ep, EPOLL_CTL_ADD, fd, &e);
}

static void stop_listening(void) {
  if (L.unix_fd >= 0) {
    epoll_ctl(L.ep, EPOLL_CTL_DEL, L.unix_fd, NULL);
    close(L.unix_fd);
    unlink(srv.cfg.socket_path);
    L.unix_fd = -1;
  }
  if (L.tcp_fd >= 0) {
    epoll_ctl(L.ep, EPOLL_CTL_DEL, L.tcp_fd, NULL);
    close(L.tcp_fd);
    L.tcp_fd = -1;
  }
}

/* Submit the --preload models as jobs with no connection. */
static void submit_preloads(void) {
  atomic_store(&srv.preloads_pending, srv.cfg.n_preload);
  for (int i = 0; i < srv.cfg.n_preload; i++) {
    job *j = calloc(1, sizeof *j);
    if (!j) return;
    j->cancelled = &preloads_cancelled;
    j->type = LUNA_MSG_MODELS;
    j->msg = cJSON_CreateObject();
    cJSON_AddStringToObject(j->msg, "action", "load");
    cJSON_AddStringToObject(j->msg, "model", srv.cfg.preload[i]);
    j->received_ms = srv_now_ms();
    if (work_submit(j)) {
      atomic_fetch_sub(&srv.preloads_pending, 1);
      cJSON_Delete(j->msg);
      free(j);
    }
  }
}

int loop_run(char *err) {
  L.ep = epoll_create1(EPOLL_CLOEXEC);
  if (L.ep < 0) return luna_fail(err, LUNA_EIO, "epoll_create1: %s", strerror(errno));
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  L.sig_fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
  if (L.sig_fd < 0) return luna_fail(err, LUNA_EIO, "signalfd: %s", strerror(errno));
  int rc = listen_unix(err);
  if (!rc && srv.cfg.listen) rc = listen_tcp(err);
  if (rc) return rc;
  ep_add(L.unix_fd, TAG_UNIX);
  if (L.tcp_fd >= 0) ep_add(L.tcp_fd, TAG_TCP);
  ep_add(srv.wake_fd, TAG_WAKE);
  ep_add(L.sig_fd, TAG_SIGNAL);
  log_info("lunad %s listening on %s%s%s", LUNAD_VERSION, srv.cfg.socket_path,
           srv.cfg.listen ? " and tcp " : "", srv.cfg.listen ? srv.cfg.listen : "");
  submit_preloads();

  struct epoll_event evs[64];
  for (;;) {
    int n = epoll_wait(L.ep, evs, 64, 250);
    if (n < 0 && errno != EINTR) return luna_fail(err, LUNA_EIO, "epoll_wait: %s", strerror(errno));
    for (int i = 0; i < n; i++) {
      uint64_t tag = evs[i].data.u64;
      if (tag == TAG_UNIX) accept_all(L.unix_fd, 0);
      else if (tag == TAG_TCP) accept_all(L.tcp_fd, 1);
      else if (tag == TAG_WAKE) deliver_done();
      else if (tag == TAG_SIGNAL) {
        struct signalfd_siginfo si;
        while (read(L.sig_fd, &si, sizeof si) == (ssize_t)sizeof si) {
          if (!atomic_load(&srv.stopping)) {
            log_info("signal %u: no new connections or work; finishing in-flight work (grace %.0f s)",
                     si.ssi_signo, srv.cfg.grace_s);
            atomic_store(&srv.stopping, 1);
            atomic_store(&preloads_cancelled, 1); /* a model nobody will use: not worth loading now */
            L.stop_deadline_ms = srv_now_ms() + srv.cfg.grace_s * 1000.0;
            stop_listening();
          } else {
            log_warn("second signal %u: stopping now", si.ssi_signo);
            L.stop_deadline_ms = srv_now_ms();
          }
        }
      } else {
        conn *c = evs[i].data.ptr;
        if (c->dead) continue;
        if (evs[i].events & (EPOLLERR | EPOLLHUP) && !(evs[i].events & EPOLLIN)) {
          conn_close(c, "hang-up");
          continue;
        }
        if (evs[i].events & EPOLLIN) conn_read(c);
        if (!c->dead && (evs[i].events & EPOLLOUT)) conn_flush(c);
      }
    }
    bury_dead();
    /* stalled partial frames */
    double now = srv_now_ms();
    for (conn *c = L.conns, *next; c; c = next) {
      next = c->next;
      if (c->partial_since_ms && srv.cfg.io_timeout_s > 0 && now - c->partial_since_ms > srv.cfg.io_timeout_s * 1000.0)
        conn_close(c, "a frame stalled past --io-timeout");
    }
    if (atomic_load(&srv.stopping)) {
      int pending_writes = 0;
      for (conn *c = L.conns; c; c = c->next) pending_writes |= c->wlen > c->woff;
      if (work_idle() && !pending_writes) {
        log_info("in-flight work finished; exiting");
        break;
      }
      if (now >= L.stop_deadline_ms) {
        log_warn("grace period over with work still in flight; exiting");
        break;
      }
    }
  }
  while (L.conns) conn_close(L.conns, "daemon exiting");
  bury_dead(); /* connections still referenced by unfinished jobs stay: the process ends */
  close(L.sig_fd);
  close(L.ep);
  return 0;
}
