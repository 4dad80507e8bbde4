/* config.c -- lunad's options: one table drives the flags, --config files and --help */
/* SPDX-License-Identifier: MIT */
#include "server/server.h"

#include "core/log.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { OPT_STR, OPT_STR_LIST, OPT_INT, OPT_BYTES, OPT_SECONDS, OPT_MODE, OPT_FLAG, OPT_LEVEL, OPT_LORA_MODE } opt_kind;

typedef struct opt {
  const char *name;       /* flag without dashes, and --config key */
  opt_kind kind;
  size_t off;             /* field in srv_config */
  size_t count_off;       /* for lists: the count field */
  int max;                /* lists: capacity; ints: upper bound */
  const char *arg, *help;
} opt;

#define F(x) offsetof(srv_config, x)
static const opt opts[] = {
    {"socket", OPT_STR, F(socket_path), 0, 0, "PATH", "Unix socket to listen on (default: $LUNA_SOCKET, else $XDG_RUNTIME_DIR/lunad.sock, else /tmp/lunad-UID.sock)"},
    {"socket-mode", OPT_MODE, F(socket_mode), 0, 0, "OCTAL", "file mode of the socket (default 0600: only this user)"},
    {"listen", OPT_STR, F(listen), 0, 0, "HOST:PORT", "also listen on TCP; needs --token-file"},
    {"token-file", OPT_STR, F(token_file), 0, 0, "FILE", "the token every TCP client must send in its hello"},
    {"models-dir", OPT_STR_LIST, F(models_dirs), F(n_models_dirs), SRV_MAX_DIRS, "DIR", "folder of model files clients may name (repeatable)"},
    {"preload", OPT_STR_LIST, F(preload), F(n_preload), SRV_MAX_PRELOAD, "REL[+REL]", "load this model at start (paths relative to a models folder; '+' joins a clip_l and a clip_g file)"},
    {"tokenizer", OPT_STR, F(tokenizer_dir), 0, 0, "DIR", "vocab.json + merges.txt folder, for requests that send text"},
    {"max-model-mem", OPT_BYTES, F(max_model_mem), 0, 0, "BYTES", "unload idle models, least recently used first, above this (K/M/G suffixes; 0: no limit)"},
    {"max-frame", OPT_BYTES, F(max_frame), 0, 0, "BYTES", "largest frame accepted (default 64M)"},
    {"cache-mem", OPT_BYTES, F(cache_mem), 0, 0, "BYTES", "result cache for identical encode requests (default 256M; 0 disables it)"},
    {"max-queue", OPT_INT, F(max_queue), 0, 1000000, "N", "queued requests before replying busy (default 256)"},
    {"batch-max", OPT_INT, F(batch_max), 0, 256, "N", "queued encode requests for one model run as one forward pass, at most N (default 8; 1: no batching)"},
    {"workers", OPT_INT, F(workers), 0, 64, "N", "compute workers (default 1)"},
    {"threads", OPT_INT, F(threads_per_worker), 0, 1024, "N", "compute threads per worker (default: one per CPU)"},
    {"grace", OPT_SECONDS, F(grace_s), 0, 0, "SECONDS", "on SIGTERM/SIGINT, time allowed to finish in-flight work (default 30)"},
    {"io-timeout", OPT_SECONDS, F(io_timeout_s), 0, 0, "SECONDS", "close a connection whose started frame stalls this long (default 60)"},
    {"deadline", OPT_SECONDS, F(deadline_s), 0, 0, "SECONDS", "default deadline of a request's wait in the queue (default 0: none)"},
    {"weight-dtype-f32", OPT_FLAG, F(weight_f32), 0, 0, NULL, "keep weights as fp32 (twice the memory, slightly faster) instead of fp16"},
    {"loras-dir", OPT_STR_LIST, F(loras_dirs), F(n_loras_dirs), SRV_MAX_DIRS, "DIR", "folder of LoRA files clients may name (repeatable); others are uploaded by the clients"},
    {"lora-cache-mem", OPT_BYTES, F(lora_cache_mem), 0, 0, "BYTES", "LoRA cache budget, least recently used idle entries evicted above it (default 1G)"},
    {"lora-mode", OPT_LORA_MODE, F(lora_mode), 0, 0, "MODE", "how LoRA stacks run: lock (merge under the model's lock), functional (never merge) or auto (default: merged when one stack dominates)"},
    {"vae-max-mem", OPT_BYTES, F(vae_max_mem), 0, 0, "BYTES", "VAE decodes and encodes that would need more activation memory run tiled, unless the request says (default 2G)"},
    {"log-level", OPT_LEVEL, F(log_level), 0, 0, "LEVEL", "error, warn, info (default) or debug"},
};
#define N_OPTS (sizeof opts / sizeof *opts)

void config_usage(FILE *f) {
  fprintf(f, "usage: lunad [options]\n\n"
             "The luna daemon: loads each text encoder once and serves encode requests to every\n"
             "client over a Unix socket (and optionally TCP with a token). Runs in the foreground\n"
             "and logs one line per event to stderr. Stop it with SIGTERM or SIGINT.\n\noptions:\n");
  for (size_t i = 0; i < N_OPTS; i++) {
    char left[64];
    snprintf(left, sizeof left, "--%s%s%s", opts[i].name, opts[i].arg ? " " : "", opts[i].arg ? opts[i].arg : "");
    fprintf(f, "  %-28s %s\n", left, opts[i].help);
  }
  fprintf(f, "  %-28s %s\n  %-28s %s\n", "--config FILE",
          "read options from FILE: one 'key value' per line, keys as the flags without '--', # comments",
          "-h, --help", "this text");
}

static int parse_bytes(const char *s, uint64_t *out) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (end == s || errno || v < 0) return -1;
  double mul = 1;
  if (*end == 'K' || *end == 'k') mul = 1024.0, end++;
  else if (*end == 'M' || *end == 'm') mul = 1024.0 * 1024, end++;
  else if (*end == 'G' || *end == 'g') mul = 1024.0 * 1024 * 1024, end++;
  if (*end == 'i' && mul > 1) end++;
  if (*end == 'B') end++;
  if (*end || v * mul > 1.8e19) return -1;
  *out = (uint64_t)(v * mul);
  return 0;
}

static int set_opt(srv_config *cfg, const opt *o, const char *val, const char *where, char *err) {
  char *base = (char *)cfg;
  char *end;
  switch (o->kind) {
  case OPT_STR: *(const char **)(base + o->off) = val; return 0;
  case OPT_STR_LIST: {
    int *n = (int *)(base + o->count_off);
    if (*n >= o->max) return luna_fail(err, LUNA_EINVAL, "%s: at most %d --%s values", where, o->max, o->name);
    ((const char **)(base + o->off))[(*n)++] = val;
    return 0;
  }
  case OPT_INT: {
    errno = 0;
    long v = strtol(val, &end, 10);
    if (!*val || *end || errno || v < 0 || v > o->max)
      return luna_fail(err, LUNA_EINVAL, "%s: --%s wants an integer in [0, %d], got '%s'", where, o->name, o->max, val);
    *(int *)(base + o->off) = (int)v;
    return 0;
  }
  case OPT_BYTES:
    if (parse_bytes(val, (uint64_t *)(base + o->off)))
      return luna_fail(err, LUNA_EINVAL, "%s: --%s wants a size like 512M or 2G, got '%s'", where, o->name, val);
    return 0;
  case OPT_SECONDS: {
    errno = 0;
    double v = strtod(val, &end);
    if (end == val || *end || errno || v < 0 || v > 1e7)
      return luna_fail(err, LUNA_EINVAL, "%s: --%s wants seconds >= 0, got '%s'", where, o->name, val);
    *(double *)(base + o->off) = v;
    return 0;
  }
  case OPT_MODE: {
    errno = 0;
    unsigned long v = strtoul(val, &end, 8);
    if (!*val || *end || errno || v > 0777)
      return luna_fail(err, LUNA_EINVAL, "%s: --%s wants an octal mode like 0660, got '%s'", where, o->name, val);
    *(unsigned *)(base + o->off) = (unsigned)v;
    return 0;
  }
  case OPT_FLAG:
    if (val && strcmp(val, "1") && strcmp(val, "yes") && strcmp(val, "true"))
      return luna_fail(err, LUNA_EINVAL, "%s: --%s takes no value (in a config file: yes/true/1)", where, o->name);
    *(int *)(base + o->off) = 1;
    return 0;
  case OPT_LORA_MODE:
    if (!strcmp(val, "auto")) *(int *)(base + o->off) = SRV_LORA_AUTO;
    else if (!strcmp(val, "lock")) *(int *)(base + o->off) = SRV_LORA_LOCK;
    else if (!strcmp(val, "functional")) *(int *)(base + o->off) = SRV_LORA_FUNCTIONAL;
    else return luna_fail(err, LUNA_EINVAL, "%s: --%s is lock, functional or auto, not '%s'", where, o->name, val);
    return 0;
  case OPT_LEVEL: {
    int l = log_parse_level(val);
    if (l < 0) return luna_fail(err, LUNA_EINVAL, "%s: --%s is error, warn, info or debug, not '%s'", where, o->name, val);
    *(int *)(base + o->off) = l;
    return 0;
  }
  }
  return luna_fail(err, LUNA_EINTERNAL, "bad option kind");
}

static const opt *find_opt(const char *name) {
  for (size_t i = 0; i < N_OPTS; i++)
    if (!strcmp(opts[i].name, name)) return &opts[i];
  return NULL;
}

/* Values read from config files, owned here until config_free. */
static char **kept;
static size_t n_kept;

static char *keep(const char *v) {
  char **k = realloc(kept, (n_kept + 1) * sizeof *kept);
  if (!k) return NULL;
  kept = k;
  return kept[n_kept] = strdup(v), kept[n_kept] ? kept[n_kept++] : NULL;
}

void config_free(void) {
  for (size_t i = 0; i < n_kept; i++) free(kept[i]);
  free(kept);
  kept = NULL;
  n_kept = 0;
}

/* Config files outlive parsing: their strings are kept until config_free. */
static int read_config(srv_config *cfg, const char *path, char *err) {
  FILE *f = fopen(path, "r");
  if (!f) return luna_fail(err, LUNA_EIO, "--config %s: %s", path, strerror(errno));
  char line[4096];
  int lineno = 0, rc = 0;
  while (!rc && fgets(line, sizeof line, f)) {
    lineno++;
    char *p = line;
    while (isspace((unsigned char)*p)) p++;
    if (!*p || *p == '#') continue;
    char *key = p;
    while (*p && !isspace((unsigned char)*p)) p++;
    char *val = NULL;
    if (*p) {
      *p++ = 0;
      while (isspace((unsigned char)*p)) p++;
      val = p;
      char *e = val + strlen(val);
      while (e > val && isspace((unsigned char)e[-1])) *--e = 0;
      if (!*val) val = NULL;
    }
    char where[512];
    snprintf(where, sizeof where, "%s:%d", path, lineno);
    const opt *o = find_opt(key);
    if (!o || !strcmp(key, "config")) {
      rc = luna_fail(err, LUNA_EINVAL, "%s: unknown key '%s'", where, key);
      break;
    }
    if (o->kind != OPT_FLAG && !val) {
      rc = luna_fail(err, LUNA_EINVAL, "%s: key '%s' needs a value", where, key);
      break;
    }
    char *v = val ? keep(val) : NULL;
    if (val && !v) rc = luna_fail(err, LUNA_ENOMEM, "out of memory");
    else rc = set_opt(cfg, o, v, where, err);
  }
  fclose(f);
  return rc;
}

int config_parse_args(srv_config *cfg, int argc, char **argv, char *err) {
  memset(cfg, 0, sizeof *cfg);
  cfg->socket_mode = 0600;
  cfg->max_frame = LUNA_DEFAULT_MAX_FRAME;
  cfg->max_queue = 256;
  cfg->cache_mem = 256u << 20;
  cfg->batch_max = 8;
  cfg->workers = 1;
  cfg->grace_s = 30;
  cfg->io_timeout_s = 60;
  cfg->log_level = LOG_INFO;
  cfg->lora_mode = SRV_LORA_AUTO;
  cfg->lora_cache_mem = 1ull << 30;
  cfg->vae_max_mem = 2ull << 30;
  struct option lo[N_OPTS + 3];
  for (size_t i = 0; i < N_OPTS; i++)
    lo[i] = (struct option){opts[i].name, opts[i].kind == OPT_FLAG ? no_argument : required_argument, 0, (int)(256 + i)};
  lo[N_OPTS] = (struct option){"config", required_argument, 0, 'c'};
  lo[N_OPTS + 1] = (struct option){"help", no_argument, 0, 'h'};
  lo[N_OPTS + 2] = (struct option){0, 0, 0, 0};
  int c;
  optind = 1;
  opterr = 0;
  while ((c = getopt_long(argc, argv, ":h", lo, NULL)) != -1) {
    int rc = 0;
    if (c == 'h') return 1;
    if (c == 'c') rc = read_config(cfg, optarg, err);
    else if (c >= 256 && c < 256 + (int)N_OPTS) rc = set_opt(cfg, &opts[c - 256], optarg, "command line", err);
    else if (c == ':') rc = luna_fail(err, LUNA_EINVAL, "option '%s' needs a value", argv[optind - 1]);
    else rc = luna_fail(err, LUNA_EINVAL, "unknown option '%s' (see --help)", argv[optind - 1]);
    if (rc) return rc;
  }
  if (optind < argc) return luna_fail(err, LUNA_EINVAL, "unexpected argument '%s' (see --help)", argv[optind]);
  if (cfg->listen && !cfg->token_file)
    return luna_fail(err, LUNA_EINVAL, "--listen %s needs --token-file: every TCP client must authenticate", cfg->listen);
  if (cfg->workers < 1) cfg->workers = 1;
  if (cfg->max_queue < 1) cfg->max_queue = 1;
  if (cfg->batch_max < 1) cfg->batch_max = 1;
  if (cfg->max_frame < 4096) return luna_fail(err, LUNA_EINVAL, "--max-frame must be at least 4096 bytes");
  return 0;
}
