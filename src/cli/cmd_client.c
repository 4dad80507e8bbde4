/* cmd_client.c -- the luna commands that talk to lunad: ping, health, status, models, lora, encode */
/* SPDX-License-Identifier: MIT */
/*
** Every command here connects with the global options (luna.c): --socket PATH, or
** --connect HOST:PORT with --token-file, sends its requests through the client library
** (include/luna.h) and prints what came back. Failures name the command and carry the
** library's message, which starts with the status name (lunad's own for its errors).
*/
#include "cli/commands.h"
#include "core/safetensors.h"
#include "lora/lora.h"
#include "luna.h"
#include "luna_proto.h"

#include <cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Token files and token JSON are small; this only stops a wrong path from reading gigabytes. */
#define MAX_TEXT_FILE (64u << 20)

/* Read the whole file 'path' as a NUL-terminated string into '*out' (caller frees).
** Returns 0, or -1 after printing why on stderr, prefixed with 'cmd'. */
static int read_text_file(const char *cmd, const char *what, const char *path, char **out, size_t *len) {
  *out = NULL;
  FILE *f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "luna %s: cannot open %s %s: %s\n", cmd, what, path, strerror(errno));
    return -1;
  }
  size_t cap = 4096, n = 0;
  char *buf = malloc(cap);
  for (;;) {
    if (!buf) {
      fprintf(stderr, "luna %s: out of memory reading %s\n", cmd, path);
      fclose(f);
      return -1;
    }
    n += fread(buf + n, 1, cap - 1 - n, f);
    if (n < cap - 1) break;
    if (cap > MAX_TEXT_FILE) {
      fprintf(stderr, "luna %s: %s %s is larger than %u bytes\n", cmd, what, path, MAX_TEXT_FILE);
      free(buf);
      fclose(f);
      return -1;
    }
    cap *= 2;
    char *nb = realloc(buf, cap);
    if (!nb) free(buf);
    buf = nb;
  }
  int bad = ferror(f);
  fclose(f);
  if (bad) {
    fprintf(stderr, "luna %s: cannot read %s %s\n", cmd, what, path);
    free(buf);
    return -1;
  }
  buf[n] = 0;
  *out = buf;
  if (len) *len = n;
  return 0;
}

/* Split "HOST:PORT" ("[v6addr]:PORT" for IPv6) into 'host' and '*port'. */
static int parse_host_port(const char *s, char *host, size_t cap, int *port) {
  const char *colon = strrchr(s, ':');
  if (!colon || colon == s || !colon[1]) return -1;
  const char *h = s, *hend = colon;
  if (*h == '[') {
    if (hend[-1] != ']') return -1;
    h++;
    hend--;
  }
  if (hend <= h || (size_t)(hend - h) >= cap) return -1;
  memcpy(host, h, (size_t)(hend - h));
  host[hend - h] = 0;
  char *end;
  errno = 0;
  long p = strtol(colon + 1, &end, 10);
  if (*end || errno || p < 1 || p > 65535) return -1;
  *port = (int)p;
  return 0;
}

/*
** Connect as the global options say. Returns 0 with '*out' set, 1 after printing the
** failure (a connection failure, or an unreadable token file), or 2 for bad options.
*/
int cmd_connect(const cmd_target *t, const char *cmd, luna_client **out) {
  *out = NULL;
  int rc;
  luna_client *c = NULL;
  if (t->connect) {
    char host[256];
    int port;
    if (parse_host_port(t->connect, host, sizeof host, &port)) {
      fprintf(stderr, "luna: --connect wants HOST:PORT (or [IPv6]:PORT), got '%s'\n", t->connect);
      return 2;
    }
    if (!t->token_file) {
      fprintf(stderr, "luna: --connect needs --token-file FILE (the token lunad was started with)\n");
      return 2;
    }
    char *token;
    size_t n;
    if (read_text_file(cmd, "token file", t->token_file, &token, &n)) return 1;
    if (n && token[n - 1] == '\n') token[--n] = 0;
    if (!n || strlen(token) != n) {
      fprintf(stderr, "luna %s: token file %s %s\n", cmd, t->token_file,
              n ? "contains a NUL byte" : "is empty");
      free(token);
      return 1;
    }
    rc = luna_client_connect_tcp(host, port, token, &c);
    memset(token, 0, n);
    free(token);
  } else {
    rc = luna_client_connect_unix(t->socket, &c);
  }
  if (!rc && t->timeout_ms) rc = luna_client_set_timeout(c, t->timeout_ms);
  if (rc) {
    fprintf(stderr, "luna %s: %s\n", cmd, luna_client_errmsg(c));
    luna_client_close(c);
    return 1;
  }
  *out = c;
  return 0;
}

/* Parse the options of a command whose only option is --help (plus 'extra' flags given
** as a long option, stored in '*flag'). Returns -1 to go on, else the exit status. */
/* Parse --help and the optional flag 'extra'. Returns -1 to go on, or the exit status.
** With 'no_args' set, any argument left over is a usage error. */
static int simple_opts(int argc, char **argv, const char *cmd, void (*usage)(FILE *), const char *extra, int *flag,
                       int no_args) {
  struct option opts[3] = {{"help", no_argument, 0, 'h'}, {0, 0, 0, 0}, {0, 0, 0, 0}};
  if (extra) opts[1] = (struct option){extra, no_argument, 0, 'x'};
  optind = 1;
  opterr = 0;
  int c;
  while ((c = getopt_long(argc, argv, "+h", opts, NULL)) != -1) {
    switch (c) {
    case 'h': usage(stdout); return 0;
    case 'x': *flag = 1; break;
    default:
      fprintf(stderr, "luna %s: unknown option '%s'\n", cmd, argv[optind - 1]);
      usage(stderr);
      return 2;
    }
  }
  if (no_args && optind < argc) {
    fprintf(stderr, "luna %s: unexpected argument '%s'\n", cmd, argv[optind]);
    return 2;
  }
  return -1;
}

/* Send one JSON request of 'type' and print the reply pretty-printed on stdout; with
** 'ready' set, fail unless the reply says "ready": true. */
static int call_and_print(const cmd_target *t, const char *cmd, int type, const cJSON *msg, int ready) {
  luna_client *c;
  int rc = cmd_connect(t, cmd, &c);
  if (rc) return rc;
  char *req = msg ? cJSON_PrintUnformatted(msg) : NULL;
  char *reply = NULL;
  if (msg && !req) {
    fprintf(stderr, "luna %s: out of memory\n", cmd);
    luna_client_close(c);
    return 1;
  }
  rc = luna_client_call_json(c, type, req, &reply);
  cJSON_free(req);
  if (rc) {
    fprintf(stderr, "luna %s: %s\n", cmd, luna_client_errmsg(c));
    luna_client_close(c);
    return 1;
  }
  luna_client_close(c);
  cJSON *v = cJSON_Parse(reply);
  char *pretty = v ? cJSON_Print(v) : NULL;
  printf("%s\n", pretty ? pretty : reply);
  int status = 0;
  if (ready && !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(v, "ready"))) {
    fprintf(stderr, "luna %s: lunad is live but not ready\n", cmd);
    status = 1;
  }
  cJSON_free(pretty);
  cJSON_Delete(v);
  luna_free(reply);
  return status;
}

/* ---- ping -------------------------------------------------------------------------- */

static void ping_usage(FILE *f) {
  fprintf(f, "usage: luna [--socket PATH | --connect HOST:PORT --token-file F] ping\n"
             "\n"
             "Connects to lunad, sends one ping and prints the round-trip time (the time of the\n"
             "ping itself, after connecting).\n"
             "\n"
             "  -h, --help   this text\n"
             "\n"
             "Exit status: 0 lunad answered, 1 it did not (the message says why), 2 usage error.\n");
}

int cmd_ping(const cmd_target *t, int argc, char **argv) {
  int flag = 0, rc = simple_opts(argc, argv, "ping", ping_usage, NULL, &flag, 1);
  if (rc >= 0) return rc;
  luna_client *c;
  if ((rc = cmd_connect(t, "ping", &c))) return rc;
  double t0 = cmd_now_ms();
  rc = luna_client_ping(c);
  double ms = cmd_now_ms() - t0;
  if (rc) fprintf(stderr, "luna ping: %s\n", luna_client_errmsg(c));
  else printf("pong from lunad at %s in %.3f ms\n", t->connect ? t->connect : t->socket ? t->socket : luna_default_socket(), ms);
  luna_client_close(c);
  return rc ? 1 : 0;
}

/* ---- health and status ----------------------------------------------------------- */

static void health_usage(FILE *f) {
  fprintf(f, "usage: luna [--socket PATH | --connect HOST:PORT --token-file F] health [--ready]\n"
             "\n"
             "Prints lunad's health reply as JSON: whether it is live and ready, and the state\n"
             "of each model (loading, ready or failed).\n"
             "\n"
             "  --ready      exit 1 unless lunad is ready (no model loading, not shutting down)\n"
             "  -h, --help   this text\n"
             "\n"
             "Exit status: 0 success, 1 failure (or not ready, with --ready), 2 usage error.\n");
}

int cmd_health(const cmd_target *t, int argc, char **argv) {
  int ready = 0, rc = simple_opts(argc, argv, "health", health_usage, "ready", &ready, 1);
  if (rc >= 0) return rc;
  return call_and_print(t, "health", LUNA_MSG_HEALTH, NULL, ready);
}

static void status_usage(FILE *f) {
  fprintf(f, "usage: luna [--socket PATH | --connect HOST:PORT --token-file F] status\n"
             "\n"
             "Prints lunad's status reply as JSON: version, uptime, memory, connections, queue,\n"
             "request counters, cache and the loaded models.\n"
             "\n"
             "  -h, --help   this text\n"
             "\n"
             "Exit status: 0 success, 1 failure, 2 usage error.\n");
}

int cmd_status(const cmd_target *t, int argc, char **argv) {
  int flag = 0, rc = simple_opts(argc, argv, "status", status_usage, NULL, &flag, 1);
  if (rc >= 0) return rc;
  return call_and_print(t, "status", LUNA_MSG_STATUS, NULL, 0);
}

/* ---- models ---------------------------------------------------------------------- */

static void models_usage(FILE *f) {
  fprintf(f, "usage: luna [--socket PATH | --connect HOST:PORT --token-file F] models\n"
             "            [list | load REL [REL...] | unload REL [REL...] | verify REL [REL...]]\n"
             "\n"
             "  list (default)   print the models lunad has, with their state and memory\n"
             "  load REL...      load one model and wait until it is ready (or failed); several\n"
             "                   paths name one model made of several files (a clip_l and a\n"
             "                   clip_g), as several --model options do for encode\n"
             "  unload REL...    unload that model (once its last request finishes)\n"
             "  verify REL...    the CRC-32 of each encoder's weights as lunad holds them (equal to\n"
             "                   the file's for F16 files: proof that no LoRA changed them)\n"
             "\n"
             "REL paths are relative to one of lunad's --models-dir folders. The reply is printed\n"
             "as JSON.\n"
             "\n"
             "  -h, --help   this text\n"
             "\n"
             "Exit status: 0 success, 1 failure (e.g. ENOTFOUND: no such model file), 2 usage error.\n");
}

int cmd_models(const cmd_target *t, int argc, char **argv) {
  int flag = 0, rc = simple_opts(argc, argv, "models", models_usage, NULL, &flag, 0);
  if (rc >= 0) return rc;
  const char *action = optind < argc ? argv[optind++] : "list";
  int n = argc - optind;
  if (strcmp(action, "list") && strcmp(action, "load") && strcmp(action, "unload") && strcmp(action, "verify")) {
    fprintf(stderr, "luna models: unknown action '%s' (list, load, unload or verify)\n", action);
    models_usage(stderr);
    return 2;
  }
  if (!strcmp(action, "list") ? n != 0 : (n < 1 || n > 4)) {
    fprintf(stderr, "luna models: %s\n", !strcmp(action, "list") ? "'list' takes no arguments"
                                                                  : "load, unload and verify take 1 to 4 model paths");
    return 2;
  }
  cJSON *m = cJSON_CreateObject();
  int ok = m && cJSON_AddStringToObject(m, "action", action);
  if (ok && n == 1) {
    ok = cJSON_AddStringToObject(m, "model", argv[optind]) != NULL;
  } else if (ok && n > 1) {
    cJSON *arr = cJSON_CreateStringArray((const char *const *)(argv + optind), n);
    ok = arr && cJSON_AddItemToObject(m, "model", arr);
    if (arr && !ok) cJSON_Delete(arr);
  }
  if (!ok) {
    cJSON_Delete(m);
    fprintf(stderr, "luna models: out of memory\n");
    return 1;
  }
  rc = call_and_print(t, "models", LUNA_MSG_MODELS, m, 0);
  cJSON_Delete(m);
  return rc;
}

/* ---- lora ------------------------------------------------------------------------- */

/* The actions of 'luna lora': their arguments and what they do, for the help texts. */
typedef struct lora_action {
  const char *name, *args, *help;
  int daemon; /* talks to lunad */
} lora_action;

static const lora_action lora_actions[] = {
    {"id", "FILE", "print the identity of a LoRA file (64 hex digits): the SHA-256 of its\n"
                   "text-encoder tensors, as lunad computes it. File name, metadata, tensor\n"
                   "order and UNet tensors do not change it. Runs locally.", 0},
    {"upload", "FILE", "send the text-encoder tensors of a LoRA file to lunad's LoRA cache and\n"
                       "print its identity (encode with --lora uploads by itself when needed).", 1},
    {"list", "", "print lunad's LoRA cache as JSON: each entry's id, source, bytes, patches,\n"
                 "refs, pinned, hits and idle seconds, and the bytes used and allowed.", 1},
    {"evict", "ID", "drop a LoRA from lunad's cache (once its requests finish when in use).", 1},
    {"pin", "ID", "keep a LoRA in lunad's cache: the LRU never evicts a pinned entry.", 1},
    {"unpin", "ID", "let the LRU evict a LoRA again.", 1},
};
#define N_LORA_ACTIONS ((int)(sizeof lora_actions / sizeof lora_actions[0]))

static void lora_usage(FILE *f) {
  fprintf(f, "usage: luna [--socket PATH | --connect HOST:PORT --token-file F] lora ACTION [ARGS]\n"
             "\n"
             "LoRA files and lunad's LoRA cache. A LoRA is named by its identity, the\n"
             "SHA-256 of its text-encoder tensors (64 hex digits).\n"
             "\n");
  for (int i = 0; i < N_LORA_ACTIONS; i++) {
    const lora_action *a = &lora_actions[i];
    char head[32];
    snprintf(head, sizeof head, "%s %s", a->name, a->args);
    fprintf(f, "  %-13s", head);
    for (const char *p = a->help; *p; p++) {
      fputc(*p, f);
      if (*p == '\n') fputs("               ", f);
    }
    fputc('\n', f);
  }
  fprintf(f, "\n"
             "  -h, --help   this text ('luna lora ACTION --help': that action's)\n"
             "\n"
             "Exit status: 0 success, 1 failure (the message names what failed, with lunad's\n"
             "error name when it was lunad's), 2 usage error.\n");
}

static void lora_action_usage(FILE *f, const lora_action *a) {
  fprintf(f, "usage: luna %slora %s%s%s\n\n%c%s\n\n  -h, --help   this text\n\n"
             "Exit status: 0 success, 1 failure, 2 usage error.\n",
          a->daemon ? "[--socket PATH | --connect HOST:PORT --token-file F] " : "", a->name, a->args[0] ? " " : "",
          a->args, toupper((unsigned char)a->help[0]), a->help + 1);
}

/* Print the identity of the LoRA file 'path' (with the reader's messages on failure). */
static int lora_id_cmd(const char *path) {
  st_file *f = NULL;
  char err[LUNA_ERR_LEN] = "";
  if (st_open(path, &f, err)) {
    fprintf(stderr, "luna lora id: %s\n", err);
    return 1;
  }
  uint8_t id[LORA_ID_LEN];
  char hex[LORA_ID_HEX];
  lora_identity(f, id);
  lora_id_hex(id, hex);
  st_close(f);
  printf("%s\n", hex);
  return 0;
}

static int lora_upload_cmd(const cmd_target *t, const char *path) {
  luna_client *c;
  int rc = cmd_connect(t, "lora upload", &c);
  if (rc) return rc;
  char hex[65];
  rc = luna_client_lora_upload(c, path, hex);
  if (rc) fprintf(stderr, "luna lora upload: %s\n", luna_client_errmsg(c));
  else printf("%s\n", hex);
  luna_client_close(c);
  return rc ? 1 : 0;
}

int cmd_lora(const cmd_target *t, int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "luna lora: which action? (id, upload, list, evict, pin or unpin)\n");
    lora_usage(stderr);
    return 2;
  }
  if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
    lora_usage(stdout);
    return 0;
  }
  const lora_action *a = NULL;
  for (int i = 0; i < N_LORA_ACTIONS; i++)
    if (!strcmp(argv[1], lora_actions[i].name)) a = &lora_actions[i];
  if (!a) {
    fprintf(stderr, "luna lora: unknown action '%s' (id, upload, list, evict, pin or unpin)\n", argv[1]);
    lora_usage(stderr);
    return 2;
  }
  /* the action's own options: only --help */
  static const struct option opts[] = {{"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
  int n = argc - 1;
  char **v = argv + 1;
  optind = 1;
  opterr = 0;
  int ch;
  while ((ch = getopt_long(n, v, "+h", opts, NULL)) != -1) {
    if (ch == 'h') {
      lora_action_usage(stdout, a);
      return 0;
    }
    fprintf(stderr, "luna lora %s: unknown option '%s'\n", a->name, v[optind - 1]);
    lora_action_usage(stderr, a);
    return 2;
  }
  int want = a->args[0] ? 1 : 0, got = n - optind;
  if (got != want) {
    if (got > want) fprintf(stderr, "luna lora %s: unexpected argument '%s'\n", a->name, v[optind + want]);
    else fprintf(stderr, "luna lora %s: missing %s\n", a->name, a->args);
    lora_action_usage(stderr, a);
    return 2;
  }
  const char *arg = want ? v[optind] : NULL;
  if (!a->daemon) {
    if (cmd_target_given(t)) {
      fprintf(stderr, "luna lora id: runs locally; --socket, --connect and --timeout do not apply\n");
      return 2;
    }
    return lora_id_cmd(arg);
  }
  if (!strcmp(a->name, "upload")) return lora_upload_cmd(t, arg);

  char id[LORA_ID_HEX] = "";
  if (arg) {
    uint8_t raw[LORA_ID_LEN];
    if (lora_id_parse(arg, raw)) {
      fprintf(stderr, "luna lora %s: '%s' is not a LoRA identity (64 hex digits; 'luna lora id FILE' prints one)\n",
              a->name, arg);
      return 2;
    }
    lora_id_hex(raw, id);
  }
  char cmd[32];
  snprintf(cmd, sizeof cmd, "lora %s", a->name);
  cJSON *m = cJSON_CreateObject();
  int ok = m && cJSON_AddStringToObject(m, "action", a->name) && (!arg || cJSON_AddStringToObject(m, "id", id));
  if (!ok) {
    cJSON_Delete(m);
    fprintf(stderr, "luna %s: out of memory\n", cmd);
    return 1;
  }
  int rc = call_and_print(t, cmd, LUNA_MSG_LORA, m, 0);
  cJSON_Delete(m);
  return rc;
}

/* ---- encode through lunad --------------------------------------------------------- */

int cmd_encode_daemon(const cmd_target *t, const cmd_encode_opts *o) {
  char *tokens = NULL;
  char err[LUNA_ERR_LEN] = "";
  cmd_embeds ev = {0};
  if (o->tokens_file && read_text_file("encode", "tokens file", o->tokens_file, &tokens, NULL)) return 1;
  if (o->embeds_file && cmd_embeds_load(o->embeds_file, &ev, err)) {
    fprintf(stderr, "luna encode: %s\n", err);
    free(tokens);
    return 1;
  }
  luna_client *c = NULL;
  int rc = cmd_connect(t, "encode", &c);
  if (rc) {
    free(tokens);
    cmd_embeds_free(&ev);
    return rc;
  }
  luna_encode_args a = {.models = o->models, .n_models = o->n_models, .text = o->text, .tokens_json = tokens,
                        .clip_layer = o->clip_layer, .deadline_ms = o->deadline_ms, .no_cache = o->no_cache,
                        .loras = o->loras, .n_loras = o->n_loras,
                        .embeds_l = {ev.data[0], ev.n[0], ev.width[0]},
                        .embeds_g = {ev.data[1], ev.n[1], ev.width[1]}};
  luna_encode_result r = {0};
  double *times = NULL;
  char *lora_meta = NULL;
  int status = 1, hits = 0;

  double t0 = cmd_now_ms();
  if (luna_client_encode(c, &a, &r)) goto fail_client;
  double first_ms = cmd_now_ms() - t0;
  int first_cached = r.cached;
  if (r.lora_unmapped > 0)
    fprintf(stderr, "luna encode: note: %d text-encoder key(s) of the LoRA stack match nothing in this model\n",
            r.lora_unmapped);

  if (o->n_loras) {
    /* The identities of the stack, for the metadata (the files were read fine just now). */
    char ids[LUNA_MAX_LORAS][65];
    double strengths[LUNA_MAX_LORAS];
    for (int i = 0; i < o->n_loras; i++) {
      int rc_id = luna_lora_identity(o->loras[i].path, ids[i]);
      if (rc_id) {
        fprintf(stderr, "luna encode: LoRA %s: %s\n", o->loras[i].path, luna_strerror(rc_id));
        goto done;
      }
      strengths[i] = o->loras[i].strength;
    }
    if (!(lora_meta = cmd_lora_meta((const char (*)[65])ids, strengths, o->n_loras))) {
      fprintf(stderr, "luna encode: out of memory\n");
      goto done;
    }
  }
  if (cmd_write_conditioning(o->out_path, r.cond, r.cond_shape[1], r.cond_shape[2], r.pooled, r.pooled_shape[1],
                             r.family, lora_meta, err)) {
    fprintf(stderr, "luna encode: %s\n", err);
    goto done;
  }
  if (o->bench > 0) {
    times = malloc((size_t)o->bench * sizeof *times);
    if (!times) {
      fprintf(stderr, "luna encode: out of memory\n");
      goto done;
    }
    for (long i = 0; i < o->bench; i++) {
      luna_encode_result b;
      double s = cmd_now_ms();
      if (luna_client_encode(c, &a, &b)) goto fail_client;
      times[i] = cmd_now_ms() - s;
      hits += b.cached != 0;
      luna_encode_result_free(&b);
    }
    double med = cmd_median_ms(times, o->bench);
    fprintf(stderr,
            "{\"mode\": \"daemon\", \"median_ms\": %.3f, \"min_ms\": %.3f, \"runs\": %ld, \"first_ms\": %.3f, "
            "\"cache\": %s, \"cached_runs\": %d, \"family\": \"%s\"}\n",
            med, times[0], o->bench, first_ms, o->no_cache ? "false" : "true", hits, r.family);
  }
  if (o->summary) {
    printf("family %s, %lld chunk(s), encoded by lunad in %.1f ms (round trip%s)\n", r.family,
           (long long)(r.cond_shape[1] / 77), first_ms, first_cached ? ", from its cache" : "");
    if (o->n_loras)
      printf("LoRA stack of %d: %d weight matrices patched (%s), %d key(s) unmapped\n", o->n_loras, r.lora_patched,
             r.lora_mode[0] ? r.lora_mode : "mode not reported", r.lora_unmapped);
    cmd_print_conditioning(r.cond, r.cond_shape[1], r.cond_shape[2], r.pooled, r.pooled_shape[1], o->out_path);
  }
  status = 0;
  goto done;
fail_client:
  if (o->tokens_file) {
    char msg[2 * LUNA_ERR_LEN];
    cmd_tokens_error(luna_client_errcode(c), luna_client_errmsg(c), o->tokens_file, o->embeds_file, 0, msg,
                     sizeof msg);
    fprintf(stderr, "luna encode: %s\n", msg);
  } else {
    fprintf(stderr, "luna encode: %s\n", luna_client_errmsg(c));
  }
done:
  free(times);
  free(lora_meta);
  free(tokens);
  cmd_embeds_free(&ev);
  luna_encode_result_free(&r);
  luna_client_close(c);
  return status;
}
