/* cmd_encode.c -- 'luna encode': prompt or tokens in, ComfyUI's conditioning out as safetensors */
/* SPDX-License-Identifier: MIT */
#include "cli/commands.h"
#include "core/safetensors.h"
#include "core/status.h"
#include "lora/lora.h"
#include "lora/lora_plan.h"
#include "models/textenc.h"
#include "ops/ops.h"
#include "text/tokenizer.h"

#include <cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_MODELS 4

static void usage(FILE *f) {
  fprintf(f,
          "usage: luna [--socket PATH | --connect HOST:PORT --token-file F] encode\n"
          "                   --model REL [--model REL2] (--text TEXT | --tokens FILE.json [--embeds E])\n"
          "                   [--clip-layer -N] [--lora FILE:STRENGTH ...] --out OUT.safetensors\n"
          "                   [--deadline-ms N] [--no-cache]\n"
          "       luna encode --local --model FILE [--model FILE2]\n"
          "                   (--text TEXT --tokenizer DIR | --tokens FILE.json [--embeds E])\n"
          "                   [--clip-layer -N] [--lora FILE:STRENGTH ...] --out OUT.safetensors [options]\n"
          "\n"
          "Encodes a prompt exactly as ComfyUI's CLIPTextEncode does and writes 'cond'\n"
          "(F32 [1, 77*chunks, D]) and 'pooled' (F32 [1, Dp]) to OUT.safetensors, with the\n"
          "metadata luna.family (sd1 or sdxl). Without --local, lunad does the work: model\n"
          "paths are relative to its models folders and --text is tokenized by lunad (which\n"
          "then needs its own --tokenizer). The results are the same bit for bit.\n"
          "\n"
          "  --local             run the encoders in this process instead of asking lunad\n"
          "  --model FILE        an SD1/SDXL checkpoint, or a clip_l / clip_g file (repeatable);\n"
          "                      the family (SD1 or SDXL) follows from the encoders found\n"
          "  --text TEXT         the prompt, with ComfyUI's (weight:1.2) syntax\n"
          "  --tokenizer DIR     (--local) folder with vocab.json and merges.txt (ComfyUI's\n"
          "                      comfy/sd1_tokenizer)\n"
          "  --tokens FILE.json  token/weight chunks as ComfyUI's CLIP.tokenize() returns them:\n"
          "                      {\"l\": [[[id, weight], ...77], ...], \"g\": [...]}; a slot may be\n"
          "                      [{\"embed\": i}, weight] instead: row i of --embeds' vectors\n"
          "  --embeds E.safetensors\n"
          "                      (with --tokens) textual-inversion vectors for the {\"embed\": i} slots:\n"
          "                      tensors \"l\" (CLIP-L) and/or \"g\" (CLIP-G), each [n, width] in F32,\n"
          "                      F16 or BF16 (read as F32); a slot takes row i of its encoder's\n"
          "                      tensor as its input embedding (ComfyUI's \"embedding:name\").\n"
          "                      ComfyUI's embedding files work as they are: \"clip_l\" and\n"
          "                      \"emb_params\" are read as \"l\", \"clip_g\" as \"g\"\n"
          "  --clip-layer -N     CLIPSetLastLayer(-N); default: the family's own layer\n"
          "  --lora FILE:STRENGTH\n"
          "                      apply a LoRA (or LyCORIS) file to the text encoders at STRENGTH,\n"
          "                      as ComfyUI's LoraLoader does with strength_clip: any finite number\n"
          "                      (0, negative, above 1). Repeatable, applied in the order given (at\n"
          "                      most %d); split at the last ':'. FILE is read here: through lunad\n"
          "                      it is named by its identity (luna lora id) and uploaded when\n"
          "                      lunad does not have it yet. The stack goes into the output's\n"
          "                      metadata as luna.lora = \"ID:STRENGTH,...\"\n"
          "  --out FILE          output safetensors file\n"
          "  --bench N           encode N more times and print timing JSON on stderr (through\n"
          "                      lunad: whole round trips, \"mode\": \"daemon\")\n"
          "  --deadline-ms N     (lunad) give up if the work has not started within N ms\n"
          "  --no-cache          (lunad) bypass lunad's result cache\n"
          "  --weight-dtype T    (--local) in-memory weights: f16 (default, half the memory) or f32\n"
          "  --threads N         (--local) compute threads (default: one per CPU)\n"
          "  --summary           print the outputs' shapes and first values\n"
          "  -h, --help          this text\n"
          "\n"
          "Exit status: 0 success, 1 failure (the message names what failed, with lunad's\n"
          "error name when it was lunad's), 2 usage error.\n",
          LUNA_MAX_LORAS);
}

double cmd_now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static double rss_mib(void) {
  FILE *f = fopen("/proc/self/statm", "r");
  long size = 0, res = 0;
  if (f) {
    if (fscanf(f, "%ld %ld", &size, &res) != 2) res = 0;
    fclose(f);
  }
  return (double)res * (double)sysconf(_SC_PAGESIZE) / (1024.0 * 1024.0);
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

double cmd_median_ms(double *ms, long n) {
  qsort(ms, (size_t)n, sizeof(double), cmp_double);
  return n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
}

int cmd_write_conditioning(const char *path, const float *cond, int64_t n_tokens, int64_t dim,
                           const float *pooled, int64_t pooled_dim, const char *family, const char *lora,
                           char *err) {
  st_wtensor outs[2] = {
      {"cond", ST_F32, 3, {1, n_tokens, dim}, cond},
      {"pooled", ST_F32, 2, {1, pooled_dim}, pooled},
  };
  const char *meta[] = {"luna.family", family, "luna.lora", lora};
  return st_write(path, outs, 2, meta, lora ? 2 : 1, err);
}

/* The shortest "%.Ng" that reads back as 'v'. */
static void format_double(char *buf, size_t cap, double v) {
  for (int prec = 1; prec <= 17; prec++) {
    snprintf(buf, cap, "%.*g", prec, v);
    if (strtod(buf, NULL) == v) return;
  }
}

char *cmd_lora_meta(const char (*ids)[65], const double *strengths, int n) {
  size_t cap = (size_t)n * (64 + 1 + 32 + 1) + 1;
  char *s = malloc(cap);
  if (!s) return NULL;
  size_t at = 0;
  s[0] = 0;
  for (int i = 0; i < n; i++) {
    char num[32];
    format_double(num, sizeof num, strengths[i]);
    at += (size_t)snprintf(s + at, cap - at, "%s%s:%s", i ? "," : "", ids[i], num);
  }
  return s;
}

/*
** Parse one --lora argument "FILE:STRENGTH" (split at the last ':') into 'out', the
** file part malloc'd. STRENGTH must be a finite decimal number, nothing else. Prints
** why and returns -1 when the argument is bad.
*/
static int parse_lora(const char *arg, luna_lora *out) {
  const char *colon = strrchr(arg, ':');
  if (!colon) {
    fprintf(stderr, "luna encode: --lora '%s' wants FILE:STRENGTH (no ':' in it)\n", arg);
    return -1;
  }
  if (colon == arg) {
    fprintf(stderr, "luna encode: --lora '%s' wants FILE:STRENGTH (no file before the ':')\n", arg);
    return -1;
  }
  const char *num = colon + 1;
  char *end = NULL;
  errno = 0;
  double v = *num && !isspace((unsigned char)*num) ? strtod(num, &end) : NAN;
  if (!end || *end || errno || !isfinite(v)) {
    fprintf(stderr, "luna encode: --lora '%s': the strength '%s' is not a finite number\n", arg, num);
    return -1;
  }
  char *path = strndup(arg, (size_t)(colon - arg));
  if (!path) {
    fprintf(stderr, "luna encode: out of memory\n");
    return -1;
  }
  *out = (luna_lora){path, v, NULL};
  return 0;
}

void cmd_embeds_free(cmd_embeds *e) {
  free(e->data[0]);
  free(e->data[1]);
  memset(e, 0, sizeof *e);
}

int cmd_embeds_load(const char *path, cmd_embeds *e, char *err) {
  memset(e, 0, sizeof *e);
  st_file *f = NULL;
  int rc = st_open(path, &f, err);
  if (rc) return rc;
  /* each encoder's tensor: our own name, or what ComfyUI's embedding files use */
  static const char *const names[2][3] = {{"l", "clip_l", "emb_params"}, {"g", "clip_g", NULL}};
  const st_tensor *found[2] = {NULL, NULL};
  for (size_t i = 0; i < f->n_tensors; i++) {
    const st_tensor *t = &f->tensors[i];
    int k = -1;
    for (int a = 0; a < 2 && k < 0; a++)
      for (int b = 0; b < 3 && names[a][b]; b++)
        if (!strcmp(t->name, names[a][b])) k = a;
    if (k < 0) {
      rc = luna_fail(err, LUNA_EUNEXPECTED, "%s: tensor \"%.64s\" is not an encoder's vectors; an --embeds file holds "
                     "\"l\" (or \"clip_l\", \"emb_params\": CLIP-L) and/or \"g\" (or \"clip_g\": CLIP-G)", path,
                     t->name);
      goto out;
    }
    if (found[k]) {
      rc = luna_fail(err, LUNA_EUNEXPECTED, "%s: tensors \"%s\" and \"%s\" both hold CLIP-%c vectors; keep one", path,
                     found[k]->name, t->name, k ? 'G' : 'L');
      goto out;
    }
    found[k] = t;
  }
  for (int k = 0; k < 2; k++) {
    const st_tensor *t = found[k];
    if (!t) continue;
    const char *name = t->name;
    if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16) {
      rc = luna_fail(err, LUNA_EDTYPE, "%s: tensor \"%s\" is %s; the vectors are read from F32, F16 or BF16", path,
                     name, st_dtype_name(t->dtype));
      goto out;
    }
    if (t->n_dims != 2 || t->shape[0] < 1 || t->shape[0] > LUNA_MAX_EMBED_ROWS || t->shape[1] < 1 ||
        t->shape[1] > LUNA_MAX_EMBED_WIDTH) {
      char dims[96] = "";
      size_t at = 0;
      for (int d = 0; d < t->n_dims && at < sizeof dims; d++)
        at += (size_t)snprintf(dims + at, sizeof dims - at, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
      rc = luna_fail(err, LUNA_ESHAPE, "%s: tensor \"%s\" is [%s]; it must be [n, width] with 1 to %d rows of 1 to "
                     "%d values", path, name, dims, LUNA_MAX_EMBED_ROWS, LUNA_MAX_EMBED_WIDTH);
      goto out;
    }
    int64_t numel = t->shape[0] * t->shape[1];
    if (!(e->data[k] = malloc((size_t)numel * sizeof(float)))) {
      rc = luna_fail(err, LUNA_ENOMEM, "%s: out of memory for tensor \"%s\"", path, name);
      goto out;
    }
    char e2[LUNA_ERR_LEN];
    if ((rc = st_read_f32(f, t, e->data[k], numel, e2))) {
      luna_fail(err, rc, "%s: tensor \"%s\": %s", path, name, e2);
      goto out;
    }
    e->n[k] = (int)t->shape[0];
    e->width[k] = (int)t->shape[1];
    for (int64_t j = 0; j < numel; j++)
      if (!isfinite(e->data[k][j])) {
        rc = luna_fail(err, LUNA_EINVAL, "%s: tensor \"%s\" row %lld column %lld is not finite (%g)", path, name,
                       (long long)(j / t->shape[1]), (long long)(j % t->shape[1]), (double)e->data[k][j]);
        goto out;
      }
  }
  if (!e->data[0] && !e->data[1])
    rc = luna_fail(err, LUNA_EMISSING, "%s: no tensor \"l\" or \"g\" (nor \"clip_l\", \"emb_params\", \"clip_g\"); an "
                   "--embeds file holds the CLIP-L and/or CLIP-G vectors as [n, width]", path);
out:
  st_close(f);
  if (rc) cmd_embeds_free(e);
  return rc;
}

void cmd_tokens_error(int rc, const char *msg, const char *tokens_file, const char *embeds_file, int always,
                      char *out, size_t cap) {
  int about = strstr(msg, "embed") != NULL;
  int n = 0;
  if (always || about)
    n = embeds_file ? snprintf(out, cap, "%s with --embeds %s: %s", tokens_file, embeds_file, msg)
                    : snprintf(out, cap, "%s: %s", tokens_file, msg);
  else
    n = snprintf(out, cap, "%s", msg);
  if (n >= 0 && (size_t)n < cap && !embeds_file && rc == LUNA_ETOKENS && strstr(msg, "{\"embed\""))
    snprintf(out + n, cap - (size_t)n, " (give the vectors of such slots with --embeds FILE)");
}

void cmd_print_conditioning(const float *cond, int64_t n_tokens, int64_t dim, const float *pooled,
                            int64_t pooled_dim, const char *out_path) {
  printf("cond   [1, %lld, %lld]:", (long long)n_tokens, (long long)dim);
  for (int64_t i = 0; i < 6 && i < n_tokens * dim; i++) printf(" %+.6f", cond[i]);
  printf(" ...\npooled [1, %lld]:", (long long)pooled_dim);
  for (int64_t i = 0; i < 6 && i < pooled_dim; i++) printf(" %+.6f", pooled[i]);
  printf(" ...\nwritten to %s\n", out_path);
}

static int parse_int(const char *s, const char *opt, long lo, long hi, long *out) {
  errno = 0;
  char *end;
  long v = strtol(s, &end, 10);
  if (!*s || *end || errno || v < lo || v > hi) {
    fprintf(stderr, "luna encode: %s wants an integer in [%ld, %ld], got '%s'\n", opt, lo, hi, s);
    return -1;
  }
  *out = v;
  return 0;
}

/* Print a note when LoRA keys matched nothing in the model (never dropped silently). */
static void note_unmapped(const lora_report *rep) {
  if (rep->unmapped <= 0) return;
  fprintf(stderr, "luna encode: note: %d text-encoder key(s) of the LoRA stack match nothing in this model:",
          rep->unmapped);
  for (int i = 0; i < rep->n_keys && i < LORA_MAX_REPORT; i++) fprintf(stderr, "%s %s", i ? "," : "", rep->unmapped_keys[i]);
  fprintf(stderr, "%s\n", rep->unmapped > rep->n_keys ? ", ..." : "");
}

/*
** The tokens file 'path' and the --embeds vectors 'ev' (NULL: none; from the file
** 'emb_path') read exactly as lunad reads the same request: the vectors become its
** "embeds" description and binary part (l's rows, then g's, as the client library
** sends them), and te_request_tokens parses both. 'err' names the files.
*/
static int local_tokens(const te_set *set, const char *path, const cmd_embeds *ev, const char *emb_path,
                        tok_chunks *l, tok_chunks *g, tok_embeds emb[2], char *err) {
  char *text = NULL, msg[LUNA_ERR_LEN] = "";
  size_t len = 0;
  int rc = tok_read_file(path, &text, &len, err);
  if (rc) return rc;
  cJSON *root = cJSON_ParseWithLength(text, len), *desc = NULL;
  uint8_t *bin = NULL;
  uint64_t bin_len = 0;
  if (!cJSON_IsObject(root)) {
    /* tok_json_parse says where the JSON breaks, or that it is no object */
    tok_chunks none;
    rc = tok_json_parse(text, len, "l", &none, msg);
    tok_chunks_free(&none);
    if (rc >= 0) rc = luna_fail(msg, LUNA_ETOKENS, "expected an object with \"l\" and/or \"g\" token chunks");
    goto out;
  }
  if (ev) {
    desc = cJSON_CreateObject();
    bin_len = (uint64_t)ev->n[0] * (uint64_t)ev->width[0] * 4 + (uint64_t)ev->n[1] * (uint64_t)ev->width[1] * 4;
    bin = malloc(bin_len ? (size_t)bin_len : 1);
    if (!desc || !bin) {
      rc = luna_fail(msg, LUNA_ENOMEM, "out of memory");
      goto out;
    }
    uint64_t at = 0;
    for (int k = 0; k < 2; k++) {
      if (!ev->data[k]) continue;
      uint64_t bytes = (uint64_t)ev->n[k] * (uint64_t)ev->width[k] * 4;
      cJSON *e = cJSON_AddObjectToObject(desc, k ? "g" : "l");
      cJSON *shape = e && cJSON_AddStringToObject(e, "dtype", "F32") ? cJSON_AddArrayToObject(e, "shape") : NULL;
      cJSON *off = shape ? cJSON_AddArrayToObject(e, "data_offsets") : NULL;
      if (!off || !cJSON_AddItemToArray(shape, cJSON_CreateNumber(ev->n[k])) ||
          !cJSON_AddItemToArray(shape, cJSON_CreateNumber(ev->width[k])) ||
          !cJSON_AddItemToArray(off, cJSON_CreateNumber((double)at)) ||
          !cJSON_AddItemToArray(off, cJSON_CreateNumber((double)(at + bytes)))) {
        rc = luna_fail(msg, LUNA_ENOMEM, "out of memory");
        goto out;
      }
      memcpy(bin + at, ev->data[k], (size_t)bytes);
      at += bytes;
    }
  }
  rc = te_request_tokens(set, root, desc, bin, bin_len, l, g, emb, msg);
out:
  if (rc) cmd_tokens_error(rc, msg, path, emb_path, 1, err, LUNA_ERR_LEN);
  cJSON_Delete(root);
  cJSON_Delete(desc);
  free(bin);
  free(text);
  return rc;
}

/* cmd_encode's work; 'loras' receives the --lora stack (the caller frees the paths). */
static int encode_run(const cmd_target *target, int argc, char **argv, luna_lora *loras, int *n_loras) {
  enum { O_LOCAL = 256, O_MODEL, O_TEXT, O_TOKENIZER, O_TOKENS, O_LAYER, O_OUT, O_BENCH, O_WDTYPE, O_THREADS,
         O_SUMMARY, O_DEADLINE, O_NOCACHE, O_LORA, O_EMBEDS };
  static const struct option opts[] = {
      {"local", no_argument, 0, O_LOCAL},         {"model", required_argument, 0, O_MODEL},
      {"text", required_argument, 0, O_TEXT},      {"tokenizer", required_argument, 0, O_TOKENIZER},
      {"tokens", required_argument, 0, O_TOKENS},  {"clip-layer", required_argument, 0, O_LAYER},
      {"out", required_argument, 0, O_OUT},        {"bench", required_argument, 0, O_BENCH},
      {"weight-dtype", required_argument, 0, O_WDTYPE}, {"threads", required_argument, 0, O_THREADS},
      {"summary", no_argument, 0, O_SUMMARY},      {"deadline-ms", required_argument, 0, O_DEADLINE},
      {"no-cache", no_argument, 0, O_NOCACHE},     {"lora", required_argument, 0, O_LORA},
      {"embeds", required_argument, 0, O_EMBEDS},  {"help", no_argument, 0, 'h'},
      {0, 0, 0, 0}};
  const char *models[MAX_MODELS], *text = NULL, *tokdir = NULL, *tokfile = NULL, *out_path = NULL;
  const char *embfile = NULL;
  int n_models = 0, local = 0, summary = 0, no_cache = 0, wtype_set = 0;
  long clip_layer = 0, bench = 0, threads = 0, deadline_ms = 0;
  ops_wtype wtype = OPS_W_F16;
  optind = 1;
  opterr = 0; /* messages below name the command */
  int c;
  while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
    switch (c) {
    case O_LOCAL: local = 1; break;
    case O_MODEL:
      if (n_models == MAX_MODELS) {
        fprintf(stderr, "luna encode: at most %d --model files\n", MAX_MODELS);
        return 2;
      }
      models[n_models++] = optarg;
      break;
    case O_TEXT: text = optarg; break;
    case O_TOKENIZER: tokdir = optarg; break;
    case O_TOKENS: tokfile = optarg; break;
    case O_EMBEDS: embfile = optarg; break;
    case O_LAYER: if (parse_int(optarg, "--clip-layer", -1000, -1, &clip_layer)) return 2; break;
    case O_OUT: out_path = optarg; break;
    case O_BENCH: if (parse_int(optarg, "--bench", 0, 100000, &bench)) return 2; break;
    case O_THREADS: if (parse_int(optarg, "--threads", 1, 1024, &threads)) return 2; break;
    case O_DEADLINE: if (parse_int(optarg, "--deadline-ms", 1, 86400000, &deadline_ms)) return 2; break;
    case O_NOCACHE: no_cache = 1; break;
    case O_LORA:
      if (*n_loras == LUNA_MAX_LORAS) {
        fprintf(stderr, "luna encode: at most %d --lora files\n", LUNA_MAX_LORAS);
        return 2;
      }
      if (parse_lora(optarg, &loras[*n_loras])) return 2;
      ++*n_loras;
      break;
    case O_WDTYPE:
      wtype_set = 1;
      if (!strcmp(optarg, "f16")) wtype = OPS_W_F16;
      else if (!strcmp(optarg, "f32")) wtype = OPS_W_F32;
      else {
        fprintf(stderr, "luna encode: --weight-dtype is f16 or f32, not '%s'\n", optarg);
        return 2;
      }
      break;
    case O_SUMMARY: summary = 1; break;
    case 'h': usage(stdout); return 0;
    case ':':
      fprintf(stderr, "luna encode: option '%s' needs a value\n", argv[optind - 1]);
      return 2;
    default:
      fprintf(stderr, "luna encode: unknown option '%s'\n", argv[optind - 1]);
      usage(stderr);
      return 2;
    }
  }
  if (optind < argc) {
    fprintf(stderr, "luna encode: unexpected argument '%s'\n", argv[optind]);
    return 2;
  }
  if (embfile && !tokfile) {
    fprintf(stderr, "luna encode: --embeds needs --tokens (whose {\"embed\": i} slots take its vectors); "
                    "it does not go with --text\n");
    return 2;
  }
  if (!local) {
    if (tokdir || wtype_set || threads) {
      fprintf(stderr, "luna encode: --tokenizer, --weight-dtype and --threads apply to --local only "
                      "(lunad uses its own settings)\n");
      return 2;
    }
    if (!n_models || !out_path || !text == !tokfile) {
      fprintf(stderr, "luna encode: need --model, --out, and either --text or --tokens\n");
      usage(stderr);
      return 2;
    }
    cmd_encode_opts o = {models, n_models, text, tokfile, out_path, (int)clip_layer, bench,
                         summary, (int)deadline_ms, no_cache, loras, *n_loras, embfile};
    return cmd_encode_daemon(target, &o);
  }
  if (deadline_ms || no_cache) {
    fprintf(stderr, "luna encode: --deadline-ms and --no-cache apply to lunad, not to --local\n");
    return 2;
  }
  if (cmd_target_given(target)) {
    fprintf(stderr, "luna encode: --socket, --connect and --timeout apply to lunad, not to --local\n");
    return 2;
  }
  if (!n_models || !out_path || (!text == !tokfile) || (text && !tokdir) || (tokdir && !text)) {
    fprintf(stderr, "luna encode: need --model, --out, and either --text with --tokenizer or --tokens\n");
    usage(stderr);
    return 2;
  }

  char err[LUNA_ERR_LEN] = "";
  int rc = 1;
  te_set *set = NULL;
  ops_pool *pool = NULL;
  tok_chunks tl = {0}, tg = {0};
  cmd_embeds ev = {0};
  tok_embeds emb[2] = {{0}, {0}};
  te_embeds tev[2];
  tok_vocab *vocab = NULL;
  te_output o = {0};
  double *times = NULL;
  int n_files = 0;
  lora_file *files[LUNA_MAX_LORAS];
  lora_plan *plan = NULL;
  lora_report lrep;
  memset(&lrep, 0, sizeof lrep);
  char *lora_meta = NULL;

  if (embfile && cmd_embeds_load(embfile, &ev, err)) goto fail;
  double t0 = cmd_now_ms();
  if (te_set_load(models, n_models, wtype, &set, err)) goto fail;
  double load_ms = cmd_now_ms() - t0, rss_load = rss_mib();
  te_family fam = te_set_family(set);

  if (tokfile) {
    if (local_tokens(set, tokfile, embfile ? &ev : NULL, embfile, &tl, &tg, emb, err)) goto fail;
  } else {
    if (tok_vocab_load(tokdir, &vocab, err) || tok_tokenize(vocab, text, TOK_PAD_L, &tl, err)) goto fail;
    if (fam == TE_SDXL && tok_tokenize(vocab, text, TOK_PAD_G, &tg, err)) goto fail;
  }

  pool = ops_pool_create((int)threads, te_set_scratch(set));
  if (!pool) {
    snprintf(err, sizeof err, "cannot start %ld compute threads", threads);
    goto fail;
  }
  const tok_chunks *gp = fam == TE_SDXL ? &tg : NULL;

  if (*n_loras) {
    lora_ref refs[LUNA_MAX_LORAS];
    char ids[LUNA_MAX_LORAS][65];
    double strengths[LUNA_MAX_LORAS];
    for (; n_files < *n_loras; n_files++) {
      if (lora_file_load(loras[n_files].path, &files[n_files], err)) goto fail;
      refs[n_files] = (lora_ref){files[n_files], loras[n_files].strength};
      memcpy(ids[n_files], files[n_files]->id_hex, sizeof ids[n_files]);
      strengths[n_files] = loras[n_files].strength;
    }
    if (lora_plan_build(set, refs, n_files, LORA_PLAN_FUNCTIONAL, &plan, &lrep, err)) goto fail;
    note_unmapped(&lrep);
    if (!(lora_meta = cmd_lora_meta((const char (*)[65])ids, strengths, n_files))) {
      snprintf(err, sizeof err, "out of memory");
      goto fail;
    }
  }
  /* the request lunad builds for the same tokens and vectors (dispatch.c) */
  const te_request req = {.l = &tl, .g = gp, .clip_layer = (int)clip_layer, .plan = plan,
                          .emb_l = te_embeds_view(&emb[0], &tev[0]),
                          .emb_g = fam == TE_SDXL ? te_embeds_view(&emb[1], &tev[1]) : NULL};

  double t1 = cmd_now_ms();
  if (te_set_encode_batch(set, pool, &req, 1, &o, err)) goto fail;
  double first_ms = cmd_now_ms() - t1;

  if (cmd_write_conditioning(out_path, o.cond, o.n_tokens, o.dim, o.pooled, o.pooled_dim, te_family_name(fam),
                             lora_meta, err))
    goto fail;

  if (bench > 0) {
    times = malloc((size_t)bench * sizeof(double));
    if (!times) { snprintf(err, sizeof err, "out of memory"); goto fail; }
    for (long i = 0; i < bench; i++) {
      te_output r;
      double s = cmd_now_ms();
      if (te_set_encode_batch(set, pool, &req, 1, &r, err)) goto fail;
      times[i] = cmd_now_ms() - s;
      te_output_free(&r);
    }
    double med = cmd_median_ms(times, bench);
    fprintf(stderr,
            "{\"mode\": \"local\", \"median_ms\": %.3f, \"min_ms\": %.3f, \"runs\": %ld, \"first_ms\": %.3f, \"load_ms\": %.1f, "
            "\"rss_after_load_mib\": %.1f, \"rss_mib\": %.1f, \"weights_mib\": %.1f, \"weight_dtype\": \"%s\", "
            "\"threads\": %d, \"blas_core\": \"%s\", \"family\": \"%s\"}\n",
            med, times[0], bench, first_ms, load_ms, rss_load, rss_mib(),
            (double)te_set_weight_bytes(set) / (1024.0 * 1024.0), wtype == OPS_W_F16 ? "f16" : "f32",
            ops_pool_size(pool), ops_blas_core(), te_family_name(fam));
  }
  if (summary) {
    printf("family %s, %d chunk(s), weights %.1f MiB in %s, encoded in %.1f ms\n", te_family_name(fam),
           tl.n_chunks, (double)te_set_weight_bytes(set) / (1024.0 * 1024.0),
           wtype == OPS_W_F16 ? "f16" : "f32", first_ms);
    if (plan)
      printf("LoRA stack of %d: %d weight matrices patched (functional), %d key(s) unmapped\n", n_files,
             lrep.patched, lrep.unmapped);
    cmd_print_conditioning(o.cond, o.n_tokens, o.dim, o.pooled, o.pooled_dim, out_path);
  }
  rc = 0;
fail:
  if (rc) fprintf(stderr, "luna encode: %s\n", err[0] ? err : "failed");
  free(times);
  free(lora_meta);
  te_output_free(&o);
  tok_chunks_free(&tl);
  tok_chunks_free(&tg);
  tok_embeds_free(&emb[0]);
  tok_embeds_free(&emb[1]);
  cmd_embeds_free(&ev);
  tok_vocab_free(vocab);
  ops_pool_free(pool);
  if (plan) lora_plan_free(plan);
  for (int i = 0; i < n_files; i++) lora_file_free(files[i]);
  te_set_free(set);
  return rc;
}

int cmd_encode(const cmd_target *target, int argc, char **argv) {
  luna_lora loras[LUNA_MAX_LORAS];
  int n_loras = 0;
  int rc = encode_run(target, argc, argv, loras, &n_loras);
  for (int i = 0; i < n_loras; i++) free((char *)loras[i].path);
  return rc;
}
