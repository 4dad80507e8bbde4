/* dispatch.c -- what each lunad message does: cheap ones on the loop, the rest on workers */
/* SPDX-License-Identifier: MIT */
#include "server/server.h"

#include "core/log.h"
#include "ops/ops.h"
#include "models/vae.h"
#include "proto/frame.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void reply_json(job *j, cJSON *msg, const frame_out_tensor *t, size_t n) {
  char err[LUNA_ERR_LEN];
  if (frame_build(j->type, LUNA_FLAG_REPLY, j->request_id, msg, t, n, &j->reply, &j->reply_len, err)) {
    frame_build_error(j->type, j->request_id, LUNA_ENOMEM, err, &j->reply, &j->reply_len);
    j->failed = 1;
  }
  cJSON_Delete(msg);
}

static void reply_error(job *j, int status, const char *msg) {
  frame_build_error(j->type, j->request_id, status, msg, &j->reply, &j->reply_len);
  j->failed = 1;
}

static cJSON *health_json(void) {
  int ready;
  cJSON *models = registry_describe(&ready);
  cJSON *o = cJSON_CreateObject();
  cJSON_AddBoolToObject(o, "live", 1);
  cJSON_AddBoolToObject(o, "ready", ready && !atomic_load(&srv.stopping) && !atomic_load(&srv.preloads_pending));
  /* health lists only what a client needs: id and state */
  cJSON *slim = cJSON_AddArrayToObject(o, "models");
  for (cJSON *m = models ? models->child : NULL; m; m = m->next) {
    cJSON *s = cJSON_CreateObject();
    cJSON_AddStringToObject(s, "id", cJSON_GetObjectItem(m, "id")->valuestring);
    cJSON_AddStringToObject(s, "state", cJSON_GetObjectItem(m, "state")->valuestring);
    cJSON *e = cJSON_GetObjectItem(m, "error");
    if (e) cJSON_AddStringToObject(s, "error", e->valuestring);
    cJSON_AddItemToArray(slim, s);
  }
  cJSON_Delete(models);
  return o;
}

static cJSON *status_json(void) {
  int ready;
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "version", LUNAD_VERSION);
  cJSON_AddNumberToObject(o, "protocol", LUNA_PROTO_VERSION);
  cJSON_AddNumberToObject(o, "pid", (double)getpid());
  cJSON_AddNumberToObject(o, "uptime_s", (srv_now_ms() - srv.start_ms) / 1000.0);
  cJSON_AddNumberToObject(o, "rss_bytes", srv_rss_bytes());
  cJSON_AddNumberToObject(o, "weights_bytes", (double)registry_weight_bytes());
  cJSON_AddNumberToObject(o, "connections", atomic_load(&srv.n_conns));
  cJSON_AddNumberToObject(o, "workers", srv.cfg.workers);
  cJSON_AddNumberToObject(o, "threads_per_worker", srv.cfg.threads_per_worker);
  cJSON_AddBoolToObject(o, "stopping", atomic_load(&srv.stopping));
  cJSON *q = cJSON_AddObjectToObject(o, "queue");
  pthread_mutex_lock(&srv.queue_mu);
  cJSON_AddNumberToObject(q, "depth", srv.queue_depth);
  cJSON_AddNumberToObject(q, "running", srv.in_flight);
  pthread_mutex_unlock(&srv.queue_mu);
  cJSON_AddNumberToObject(q, "max", srv.cfg.max_queue);
  cJSON *r = cJSON_AddObjectToObject(o, "requests");
  cJSON_AddNumberToObject(r, "served", (double)atomic_load(&srv.stats.served));
  cJSON_AddNumberToObject(r, "failed", (double)atomic_load(&srv.stats.failed));
  cJSON_AddNumberToObject(r, "busy", (double)atomic_load(&srv.stats.busy));
  cJSON_AddNumberToObject(r, "expired", (double)atomic_load(&srv.stats.expired));
  cJSON_AddNumberToObject(r, "dropped", (double)atomic_load(&srv.stats.dropped));
  cJSON_AddItemToObject(o, "cache", rcache_describe());
  cJSON_AddItemToObject(o, "lora", lexec_describe());
  cJSON_AddItemToObject(o, "models", registry_describe(&ready));
  return o;
}

/* The "id" field of a LORA message, parsed. */
static int lora_id_field(job *j, uint8_t id[LORA_ID_LEN]) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(j->msg, "id");
  if (!cJSON_IsString(v) || lora_id_parse(v->valuestring, id)) {
    reply_error(j, LUNA_EINVAL, "\"id\" must be a LoRA identity: 64 hex digits (SHA-256, docs/PROTOCOL.md)");
    return -1;
  }
  return 0;
}

/* LORA list, evict, pin and unpin touch only the cache index: the loop answers them.
** Uploads parse a file: a worker does them. */
static int lora_inline(job *j) {
  const cJSON *a = cJSON_GetObjectItemCaseSensitive(j->msg, "action");
  static const char *const bad = "\"action\" must be \"upload\", \"list\", \"evict\", \"pin\" or \"unpin\"";
  if (!cJSON_IsString(a)) {
    reply_error(j, LUNA_EINVAL, bad);
    return 1;
  }
  const char *act = a->valuestring;
  uint8_t id[LORA_ID_LEN];
  if (!strcmp(act, "list")) {
    reply_json(j, lcache_list(), NULL, 0);
    return 1;
  }
  if (!strcmp(act, "upload")) {
    if (!j->bin_len) {
      reply_error(j, LUNA_EINVAL, "an upload carries the LoRA's safetensors image as the frame's binary part");
      return 1;
    }
    if (lora_id_field(j, id)) return 1;
    return 0;
  }
  if (strcmp(act, "evict") && strcmp(act, "pin") && strcmp(act, "unpin")) {
    reply_error(j, LUNA_EINVAL, bad);
    return 1;
  }
  if (lora_id_field(j, id)) return 1;
  char hex[LORA_ID_HEX], msg[160];
  lora_id_hex(id, hex);
  cJSON *o = cJSON_CreateObject();
  int rc;
  if (!strcmp(act, "evict")) {
    int deferred = 0;
    rc = lcache_evict(id, &deferred);
    cJSON_AddBoolToObject(o, "evicted", rc == 0);
    cJSON_AddBoolToObject(o, "deferred", deferred);
  } else {
    rc = lcache_pin(id, !strcmp(act, "pin"));
    cJSON_AddBoolToObject(o, "pinned", !strcmp(act, "pin"));
  }
  if (rc) {
    cJSON_Delete(o);
    snprintf(msg, sizeof msg, "LoRA %s is not in the cache", hex);
    reply_error(j, rc, msg);
    return 1;
  }
  reply_json(j, o, NULL, 0);
  return 1;
}

static void run_lora_upload(job *j) {
  uint8_t id[LORA_ID_LEN];
  char err[LUNA_ERR_LEN] = "";
  if (lora_id_parse(cJSON_GetObjectItemCaseSensitive(j->msg, "id")->valuestring, id))
    return reply_error(j, LUNA_EINVAL, "bad \"id\"");
  lcache_entry *e;
  double t0 = srv_now_ms();
  int rc = lcache_put(j->bin, j->bin_len, id, &e, err);
  double parse_ms = srv_now_ms() - t0;
  if (rc) return reply_error(j, rc, err);
  const lora_file *f = lcache_file(e);
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "id", f->id_hex);
  cJSON_AddNumberToObject(o, "patches", f->n_patches);
  cJSON_AddNumberToObject(o, "te_tensors", f->n_te_tensors);
  cJSON_AddNumberToObject(o, "unmapped", f->n_unmapped);
  cJSON *u = cJSON_AddArrayToObject(o, "unmapped_keys");
  for (int i = 0; i < f->n_unmapped && i < LORA_MAX_REPORT; i++)
    if (f->unmapped[i]) cJSON_AddItemToArray(u, cJSON_CreateString(f->unmapped[i]));
  cJSON_AddNumberToObject(o, "bytes", (double)f->bytes);
  cJSON_AddBoolToObject(o, "cached", 1);
  cJSON_AddNumberToObject(o, "parse_ms", parse_ms);
  lcache_release(e);
  reply_json(j, o, NULL, 0);
}

int dispatch_inline(struct conn *c, job *j) {
  (void)c;
  switch (j->type) {
  case LUNA_MSG_PING: reply_json(j, cJSON_CreateObject(), NULL, 0); return 1;
  case LUNA_MSG_HEALTH: reply_json(j, health_json(), NULL, 0); return 1;
  case LUNA_MSG_STATUS: reply_json(j, status_json(), NULL, 0); return 1;
  case LUNA_MSG_MODELS: {
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(j->msg, "action");
    if (a && !cJSON_IsString(a)) {
      reply_error(j, LUNA_EINVAL, "\"action\" must be \"list\", \"load\" or \"unload\"");
      return 1;
    }
    if (!a || !strcmp(a->valuestring, "list")) {
      int ready;
      cJSON *o = cJSON_CreateObject();
      cJSON_AddItemToObject(o, "models", registry_describe(&ready));
      reply_json(j, o, NULL, 0);
      return 1;
    }
    if (strcmp(a->valuestring, "load") && strcmp(a->valuestring, "unload") && strcmp(a->valuestring, "verify")) {
      reply_error(j, LUNA_EINVAL, "\"action\" must be \"list\", \"load\", \"unload\" or \"verify\"");
      return 1;
    }
    return 0; /* load, unload and verify touch files or whole models: a worker does them */
  }
  case LUNA_MSG_ENCODE: return 0;
  case LUNA_MSG_LORA: return lora_inline(j);
  case LUNA_MSG_VAE_DECODE:
  case LUNA_MSG_VAE_ENCODE: return 0;
  default: {
    char msg[96];
    snprintf(msg, sizeof msg, "unknown message type %u", j->type);
    reply_error(j, LUNA_EUNKNOWN, msg);
    return 1;
  }
  }
}

static void run_models(job *j) {
  const char *action = cJSON_GetObjectItemCaseSensitive(j->msg, "action")->valuestring;
  const cJSON *spec = cJSON_GetObjectItemCaseSensitive(j->msg, "model");
  const cJSON *kind_j = cJSON_GetObjectItemCaseSensitive(j->msg, "kind");
  char err[LUNA_ERR_LEN] = "";
  if (!spec) return reply_error(j, LUNA_EINVAL, "\"model\" is required for load, unload and verify");
  if (kind_j && (!cJSON_IsString(kind_j) || (strcmp(kind_j->valuestring, "text") && strcmp(kind_j->valuestring, "vae"))))
    return reply_error(j, LUNA_EINVAL, "\"kind\" must be \"text\" (the text encoders, default) or \"vae\"");
  model_kind kind = kind_j && !strcmp(kind_j->valuestring, "vae") ? MODEL_VAE : MODEL_TEXT;
  if (!strcmp(action, "unload")) {
    int rc = registry_unload(spec, kind, err);
    if (rc) return reply_error(j, rc, err);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddBoolToObject(o, "unloaded", 1);
    return reply_json(j, o, NULL, 0);
  }
  model *m;
  int rc = registry_acquire_kind(spec, kind, &m, err);
  if (rc) return reply_error(j, rc, err);
  if (!strcmp(action, "verify")) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", model_id(m));
    cJSON_AddItemToObject(o, "weights_crc32", registry_checksums(m));
    registry_release(m);
    return reply_json(j, o, NULL, 0);
  }
  /* described while held: once released, an unload or the memory budget may free it */
  cJSON *o = cJSON_CreateObject();
  cJSON_AddItemToObject(o, "model", registry_describe_model(m));
  registry_release(m);
  reply_json(j, o, NULL, 0);
}

/* A parsed encode request. */
typedef struct enc_req {
  job *j;
  tok_chunks l, g;
  tok_embeds emb[2]; /* its input embeddings for CLIP-L and CLIP-G */
  te_embeds te[2];   /* the encoders' views of them */
  int clip_layer;
  int ok;
  int use_cache;
  uint8_t *key;     /* result cache key */
  size_t key_len;
  lexec_stack st;   /* its LoRA stack */
  double resolve_ms; /* looking its LoRAs up (and loading misses) */
} enc_req;

static void reply_output(job *j, te_family fam, const te_output *o, int cached, int batch, const lexec_result *lr,
                         double resolve_ms) {
  frame_out_tensor t[2] = {
      {"cond", ST_F32, 3, {1, o->n_tokens, o->dim}, o->cond},
      {"pooled", ST_F32, 2, {1, o->pooled_dim}, o->pooled},
  };
  cJSON *r = cJSON_CreateObject();
  cJSON_AddStringToObject(r, "family", te_family_name(fam));
  cJSON_AddBoolToObject(r, "cached", cached);
  cJSON_AddNumberToObject(r, "batch", batch);
  if (lr && lr->mode) {
    cJSON *l = cJSON_AddObjectToObject(r, "lora");
    cJSON_AddStringToObject(l, "mode", lr->mode);
    cJSON_AddNumberToObject(l, "patched", lr->rep.patched);
    cJSON_AddNumberToObject(l, "unmapped", lr->rep.unmapped);
    cJSON *k = cJSON_AddArrayToObject(l, "unmapped_keys");
    for (int i = 0; i < lr->rep.n_keys; i++) cJSON_AddItemToArray(k, cJSON_CreateString(lr->rep.unmapped_keys[i]));
    cJSON_AddNumberToObject(l, "resolve_ms", resolve_ms);
  }
  reply_json(j, r, t, 2);
}

/* Validate the request's fields; tokens are parsed once the family is known. */
static int encode_fields(job *j, const cJSON **tokens, const cJSON **text, int *clip_layer, char *err) {
  const cJSON *spec = cJSON_GetObjectItemCaseSensitive(j->msg, "model");
  const cJSON *layer = cJSON_GetObjectItemCaseSensitive(j->msg, "clip_layer");
  const cJSON *cache = cJSON_GetObjectItemCaseSensitive(j->msg, "cache");
  *tokens = cJSON_GetObjectItemCaseSensitive(j->msg, "tokens");
  *text = cJSON_GetObjectItemCaseSensitive(j->msg, "text");
  if (!spec) return luna_fail(err, LUNA_EINVAL, "\"model\" is required");
  if (!*tokens == !*text) return luna_fail(err, LUNA_EINVAL, "give exactly one of \"tokens\" and \"text\"");
  if (*tokens && !cJSON_IsObject(*tokens))
    return luna_fail(err, LUNA_EINVAL, "\"tokens\" must be an object {\"l\": ..., \"g\": ...}");
  if (*text && !cJSON_IsString(*text)) return luna_fail(err, LUNA_EINVAL, "\"text\" must be a string");
  if (*text && cJSON_GetObjectItemCaseSensitive(j->msg, "embeds"))
    return luna_fail(err, LUNA_EINVAL, "\"embeds\" go with \"tokens\" (slots {\"embed\": i}), not with \"text\"");
  if (*text && !srv.vocab) return luna_fail(err, LUNA_EINVAL, "this daemon was started without --tokenizer: send \"tokens\"");
  if (cache && !cJSON_IsBool(cache)) return luna_fail(err, LUNA_EINVAL, "\"cache\" must be true or false");
  *clip_layer = 0;
  if (layer && !cJSON_IsNull(layer)) {
    double v = cJSON_IsNumber(layer) ? layer->valuedouble : 1;
    if (v > 0 || v < -1000 || floor(v) != v) return luna_fail(err, LUNA_EINVAL, "\"clip_layer\" must be an integer in [-1000, 0]");
    *clip_layer = (int)v;
  }
  return 0;
}

/* Resolve the request's "loras" into held cache entries, in stack order. A miss is
** loaded from --loras-dir when its "path" names the same content there; otherwise its
** identity goes to 'missing' and the request fails with ENOLORA (the client uploads). */
static int loras_for(job *j, lexec_stack *st, cJSON *missing, char *err) {
  const cJSON *a = cJSON_GetObjectItemCaseSensitive(j->msg, "loras");
  int rc = 0, n_missing = 0;
  char first[LORA_ID_HEX] = "";
  if (a && !cJSON_IsNull(a)) {
    if (!cJSON_IsArray(a)) return luna_fail(err, LUNA_EINVAL, "\"loras\" must be an array of {\"id\", \"strength\"}");
    int n = cJSON_GetArraySize(a);
    if (n > LEXEC_MAX_STACK) return luna_fail(err, LUNA_EINVAL, "\"loras\" has %d entries; at most %d", n, LEXEC_MAX_STACK);
    int i = 0;
    for (const cJSON *e = a->child; e && !rc; e = e->next, i++) {
      const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
      const cJSON *s = cJSON_GetObjectItemCaseSensitive(e, "strength");
      const cJSON *path = cJSON_GetObjectItemCaseSensitive(e, "path");
      uint8_t bin[LORA_ID_LEN];
      if (!cJSON_IsObject(e) || !cJSON_IsString(id) || lora_id_parse(id->valuestring, bin)) {
        rc = luna_fail(err, LUNA_EINVAL, "\"loras\"[%d]: \"id\" must be a LoRA identity (64 hex digits)", i);
        break;
      }
      if (!cJSON_IsNumber(s) || !isfinite(s->valuedouble)) {
        rc = luna_fail(err, LUNA_EINVAL, "\"loras\"[%d]: \"strength\" must be a finite number", i);
        break;
      }
      if (path && !cJSON_IsString(path)) {
        rc = luna_fail(err, LUNA_EINVAL, "\"loras\"[%d]: \"path\" must be a string", i);
        break;
      }
      lcache_entry *ce = lcache_get(bin);
      if (!ce && path) {
        char e2[LUNA_ERR_LEN];
        int r = lcache_load(path->valuestring, bin, &ce, e2);
        if (r && r != LUNA_ENOTFOUND) {
          rc = luna_fail(err, r, "\"loras\"[%d]: %s", i, e2);
          break;
        }
      }
      if (!ce) {
        int dup = 0;
        for (const cJSON *m = missing->child; m; m = m->next) dup |= !strcmp(m->valuestring, id->valuestring);
        if (!dup) {
          char hex[LORA_ID_HEX];
          lora_id_hex(bin, hex);
          cJSON_AddItemToArray(missing, cJSON_CreateString(hex));
          if (!n_missing++) memcpy(first, hex, sizeof first);
        }
        continue;
      }
      st->e[st->n] = ce;
      st->strength[st->n++] = s->valuedouble;
    }
  }
  if (!rc && n_missing)
    rc = luna_fail(err, LUNA_ENOLORA, "%d LoRA%s of the stack %s not in the daemon's cache: upload %s (first: %s)",
                   n_missing, n_missing > 1 ? "s" : "", n_missing > 1 ? "are" : "is", n_missing > 1 ? "them" : "it",
                   first);
  if (!rc && lexec_stack_key(st)) rc = luna_fail(err, LUNA_ENOMEM, "out of memory");
  if (rc) lexec_stack_clear(st);
  return rc;
}

/* Run encode jobs that share a model and a clip layer as one batch (work.c groups them). */
static void run_encode_batch(job **jobs, int n, ops_pool *pool) {
  char err[LUNA_ERR_LEN] = "";
  enc_req *rq = calloc((size_t)n, sizeof *rq);
  if (!rq) {
    for (int i = 0; i < n; i++) reply_error(jobs[i], LUNA_ENOMEM, "out of memory");
    return;
  }
  model *m = NULL;
  int rc = registry_acquire(cJSON_GetObjectItemCaseSensitive(jobs[0]->msg, "model"), &m, err);
  te_family fam = rc ? TE_SD1 : te_set_family(model_set(m));
  if (!rc) registry_count_requests(m, n);
  int n_ok = 0;
  for (int i = 0; i < n; i++) {
    job *j = rq[i].j = jobs[i];
    if (rc) { reply_error(j, rc, err); continue; }
    const cJSON *tokens, *text;
    char e2[LUNA_ERR_LEN] = "";
    int r = encode_fields(j, &tokens, &text, &rq[i].clip_layer, e2);
    if (!r && tokens) {
      r = te_request_tokens(model_set(m), tokens, cJSON_GetObjectItemCaseSensitive(j->msg, "embeds"), j->bin,
                            j->bin_len, &rq[i].l, &rq[i].g, rq[i].emb, e2);
    } else if (!r) {
      r = tok_tokenize(srv.vocab, text->valuestring, TOK_PAD_L, &rq[i].l, e2);
      if (!r && fam == TE_SDXL) r = tok_tokenize(srv.vocab, text->valuestring, TOK_PAD_G, &rq[i].g, e2);
    }
    if (!r) {
      cJSON *extra = cJSON_CreateObject(), *missing = cJSON_AddArrayToObject(extra, "missing");
      double t0 = srv_now_ms();
      r = missing ? loras_for(j, &rq[i].st, missing, e2) : luna_fail(e2, LUNA_ENOMEM, "out of memory");
      rq[i].resolve_ms = srv_now_ms() - t0;
      if (r == LUNA_ENOLORA) {
        frame_build_error_with(j->type, j->request_id, r, e2, extra, &j->reply, &j->reply_len);
        j->failed = 1;
        cJSON_Delete(extra);
        continue;
      }
      cJSON_Delete(extra);
    }
    if (r) {
      reply_error(j, r, e2);
      continue;
    }
    const cJSON *cache = cJSON_GetObjectItemCaseSensitive(j->msg, "cache");
    rq[i].use_cache = srv.cfg.cache_mem && !cJSON_IsFalse(cache);
    if (rq[i].use_cache) {
      /* the stack is part of the key: a result never reaches a request with another stack */
      char *mk = NULL;
      if (asprintf(&mk, "%s|lora:%s", model_key(m), rq[i].st.key) >= 0) {
        rq[i].key = rcache_key(mk, rq[i].clip_layer, &rq[i].l, fam == TE_SDXL ? &rq[i].g : NULL,
                               te_embeds_view(&rq[i].emb[0], &rq[i].te[0]),
                               te_embeds_view(&rq[i].emb[1], &rq[i].te[1]), &rq[i].key_len);
        free(mk);
      }
    }
    te_output hit;
    if (rq[i].key && rcache_get(rq[i].key, rq[i].key_len, &hit)) {
      reply_output(j, fam, &hit, 1, 1, NULL, 0);
      te_output_free(&hit);
      continue;
    }
    rq[i].ok = 1, n_ok++;
  }
  if (n_ok) {
    te_request *tr = calloc((size_t)n_ok, sizeof *tr);
    te_output *out = calloc((size_t)n_ok, sizeof *out);
    lexec_stack *st = calloc((size_t)n_ok, sizeof *st);
    lexec_result *res = calloc((size_t)n_ok, sizeof *res);
    enc_req **who = calloc((size_t)n_ok, sizeof *who);
    int k = 0;
    for (int i = 0; tr && out && st && res && who && i < n; i++)
      if (rq[i].ok) {
        tr[k] = (te_request){.l = &rq[i].l,
                             .g = fam == TE_SDXL ? &rq[i].g : NULL,
                             .clip_layer = rq[i].clip_layer,
                             .emb_l = te_embeds_view(&rq[i].emb[0], &rq[i].te[0]),
                             .emb_g = fam == TE_SDXL ? te_embeds_view(&rq[i].emb[1], &rq[i].te[1]) : NULL};
        st[k] = rq[i].st; /* a view: rq keeps ownership */
        who[k++] = &rq[i];
      }
    if (!tr || !out || !st || !res || !who) {
      for (int i = 0; i < n; i++)
        if (rq[i].ok) reply_error(rq[i].j, LUNA_ENOMEM, "out of memory");
    } else {
      lexec_encode(m, pool, tr, st, n_ok, out, res);
      for (int i = 0; i < n_ok; i++) {
        job *j = who[i]->j;
        if (res[i].rc) {
          reply_error(j, res[i].rc, res[i].err);
          continue;
        }
        if (who[i]->key) rcache_put(who[i]->key, who[i]->key_len, &out[i]);
        reply_output(j, fam, &out[i], 0, n_ok, &res[i], who[i]->resolve_ms);
        te_output_free(&out[i]);
      }
    }
    free(tr);
    free(out);
    free(st);
    free(res);
    free(who);
  }
  for (int i = 0; i < n; i++) {
    tok_chunks_free(&rq[i].l);
    tok_chunks_free(&rq[i].g);
    tok_embeds_free(&rq[i].emb[0]);
    tok_embeds_free(&rq[i].emb[1]);
    free(rq[i].key);
    lexec_stack_clear(&rq[i].st);
  }
  if (m) registry_release(m);
  free(rq);
}

/* ---- VAE ------------------------------------------------------------------------ */

typedef struct vae_progress {
  job *j;
  double last_ms, last_frac;
  int send;
} vae_progress;

/* Between blocks: stop when the client left; send progress when asked, at most every
** 100 ms and 1%. */
static int vae_tick(void *ud, double done, double total) {
  vae_progress *p = ud;
  if (atomic_load(p->j->cancelled)) return LUNA_ECONN;
  if (!p->send || total <= 0) return 0;
  double f = done / total, now = srv_now_ms();
  if (f < 1.0 && (now - p->last_ms < 100 || f - p->last_frac < 0.01)) return 0;
  p->last_ms = now;
  p->last_frac = f;
  cJSON *m = cJSON_CreateObject();
  cJSON_AddNumberToObject(m, "progress", f > 1 ? 1 : f);
  uint8_t *frame;
  size_t len;
  if (!frame_build(p->j->type, LUNA_FLAG_REPLY | LUNA_FLAG_PROGRESS, p->j->request_id, m, NULL, 0, &frame, &len, NULL))
    work_note(p->j, frame, len);
  cJSON_Delete(m);
  return 0;
}

/* "tiled", "tile", "overlap" of a VAE request; '*auto_' when lunad decides. */
static int vae_tiling_fields(job *j, int *tiled, int *auto_, vae_tiling *t, char *err) {
  const cJSON *tj = cJSON_GetObjectItemCaseSensitive(j->msg, "tiled");
  const cJSON *ts = cJSON_GetObjectItemCaseSensitive(j->msg, "tile");
  const cJSON *ov = cJSON_GetObjectItemCaseSensitive(j->msg, "overlap");
  *auto_ = !tj || (cJSON_IsString(tj) && !strcmp(tj->valuestring, "auto"));
  if (!*auto_ && !cJSON_IsBool(tj)) return luna_fail(err, LUNA_EINVAL, "\"tiled\" must be true, false or \"auto\"");
  *tiled = !*auto_ && cJSON_IsTrue(tj);
  t->tile = 512;
  t->overlap = 64;
  if (ts) {
    if (!cJSON_IsNumber(ts) || ts->valuedouble != floor(ts->valuedouble) || ts->valuedouble < 64 || ts->valuedouble > 16384)
      return luna_fail(err, LUNA_EINVAL, "\"tile\" must be an integer number of pixels in [64, 16384]");
    t->tile = (int)ts->valuedouble;
  }
  if (ov) {
    if (!cJSON_IsNumber(ov) || ov->valuedouble != floor(ov->valuedouble) || ov->valuedouble < 0 ||
        ov->valuedouble >= t->tile)
      return luna_fail(err, LUNA_EINVAL, "\"overlap\" must be an integer number of pixels in [0, tile)");
    t->overlap = (int)ov->valuedouble;
  }
  return 0;
}

static void run_vae(job *j, ops_pool *pool) {
  int decode = j->type == LUNA_MSG_VAE_DECODE;
  const char *in_name = decode ? "latent" : "image";
  char err[LUNA_ERR_LEN] = "";
  const cJSON *spec = cJSON_GetObjectItemCaseSensitive(j->msg, "model");
  const cJSON *prog = cJSON_GetObjectItemCaseSensitive(j->msg, "progress");
  if (!spec) return reply_error(j, LUNA_EINVAL, "\"model\" is required");
  if (prog && !cJSON_IsBool(prog)) return reply_error(j, LUNA_EINVAL, "\"progress\" must be true or false");
  int tiled, auto_;
  vae_tiling t;
  int rc = vae_tiling_fields(j, &tiled, &auto_, &t, err);
  if (rc) return reply_error(j, rc, err);
  frame_tensor in;
  rc = frame_get_tensor(j->msg, in_name, j->bin, j->bin_len, &in, err);
  if (rc) return reply_error(j, rc, err);
  if (in.dtype != ST_F32) {
    snprintf(err, sizeof err, "tensor \"%s\" must be F32, not %s", in_name, st_dtype_name(in.dtype));
    return reply_error(j, LUNA_EDTYPE, err);
  }
  if (in.n_dims != 4 || in.shape[0] < 1 || in.shape[1] < 1 || in.shape[2] < 1 || in.shape[3] < 1) {
    snprintf(err, sizeof err, "tensor \"%s\" must be 4-D %s with no empty dimension", in_name,
             decode ? "[B, C, h, w]" : "[B, H, W, 3]");
    return reply_error(j, LUNA_ESHAPE, err);
  }
  if (!decode && in.shape[3] != 3) {
    snprintf(err, sizeof err, "tensor \"image\" has %lld channels; it must be [B, H, W, 3]", (long long)in.shape[3]);
    return reply_error(j, LUNA_ESHAPE, err);
  }
  if (in.shape[0] > 64) return reply_error(j, LUNA_EINVAL, "batches of more than 64 images: send them in parts");
  model *m;
  rc = registry_acquire_kind(spec, MODEL_VAE, &m, err);
  if (rc) return reply_error(j, rc, err);
  registry_count_requests(m, 1);
  const vae *v = model_vae(m);
  const vae_hparams *hp = vae_get_hparams(v);
  int64_t B = in.shape[0], f = vae_scale(v); /* 8 for every real VAE */
  float *out = NULL;
  int64_t oshape[4];
  if (decode) {
    int64_t h = in.shape[2], w = in.shape[3];
    if (in.shape[1] != hp->latent_channels) {
      snprintf(err, sizeof err, "tensor \"latent\" has %lld channels; this VAE takes %d", (long long)in.shape[1],
               hp->latent_channels);
      rc = LUNA_ESHAPE;
    }
    if (!rc && auto_) tiled = vae_decode_bytes(v, h, w) > srv.cfg.vae_max_mem;
    int64_t n = B * 3 * (f * h) * (f * w);
    oshape[0] = B, oshape[1] = f * h, oshape[2] = f * w, oshape[3] = 3;
    if (!rc && (h > 4096 || w > 4096 || !(out = malloc((size_t)n * sizeof(float)))))
      rc = luna_fail(err, LUNA_ENOMEM, "no memory for a %lld x %lld image batch of %lld", (long long)(f * h),
                     (long long)(f * w), (long long)B);
  } else {
    int64_t H = in.shape[1], W = in.shape[2];
    if (H < f || W < f) {
      snprintf(err, sizeof err, "the image is %lld x %lld; the VAE needs at least %lld x %lld pixels", (long long)H,
               (long long)W, (long long)f, (long long)f);
      rc = LUNA_ESHAPE;
    }
    if (!rc && auto_) tiled = vae_encode_bytes(v, H, W) > srv.cfg.vae_max_mem;
    oshape[0] = B, oshape[1] = hp->latent_channels, oshape[2] = H / f, oshape[3] = W / f;
    int64_t n = oshape[0] * oshape[1] * oshape[2] * oshape[3];
    if (!rc && (H > 32768 || W > 32768 || !(out = malloc((size_t)n * sizeof(float)))))
      rc = luna_fail(err, LUNA_ENOMEM, "no memory for the latent of a %lld x %lld image", (long long)H, (long long)W);
  }
  vae_progress p = {j, srv_now_ms(), 0, prog && cJSON_IsTrue(prog)};
  double t0 = srv_now_ms();
  if (!rc) {
    /* a tensor may sit at any byte offset of the binary part: copy it when misaligned */
    const float *x = (const float *)in.data;
    float *copy = NULL;
    if ((uintptr_t)in.data % sizeof(float)) {
      copy = malloc((size_t)in.nbytes);
      if (copy) memcpy(copy, in.data, (size_t)in.nbytes);
      x = copy;
    }
    if (!x) rc = luna_fail(err, LUNA_ENOMEM, "out of memory");
    else if (decode)
      rc = vae_decode(v, pool, x, (int)B, in.shape[2], in.shape[3], tiled ? &t : NULL, out, vae_tick, &p, err);
    else
      rc = vae_encode(v, pool, x, (int)B, in.shape[1], in.shape[2], tiled ? &t : NULL, out, vae_tick, &p, err);
    free(copy);
  }
  double ms = srv_now_ms() - t0;
  registry_release(m);
  if (rc == LUNA_ECONN) { /* the client left: nobody to answer */
    free(out);
    atomic_fetch_add(&srv.stats.dropped, 1);
    return;
  }
  if (rc) {
    free(out);
    return reply_error(j, rc, err);
  }
  frame_out_tensor ot = {decode ? "image" : "latent", ST_F32, 4, {oshape[0], oshape[1], oshape[2], oshape[3]}, out};
  cJSON *r = cJSON_CreateObject();
  cJSON_AddBoolToObject(r, "tiled", tiled);
  if (tiled) {
    cJSON_AddNumberToObject(r, "tile", t.tile);
    cJSON_AddNumberToObject(r, "overlap", t.overlap);
  }
  cJSON_AddNumberToObject(r, "ms", ms);
  reply_json(j, r, &ot, 1);
  free(out);
}

void dispatch_run_batch(job **jobs, int n, ops_pool *pool) {
  if (jobs[0]->type == LUNA_MSG_ENCODE) run_encode_batch(jobs, n, pool);
  else
    for (int i = 0; i < n; i++) dispatch_run(jobs[i], pool);
}

char *dispatch_batch_key(const job *j) {
  if (j->type != LUNA_MSG_ENCODE) return NULL;
  const cJSON *spec = cJSON_GetObjectItemCaseSensitive(j->msg, "model");
  const cJSON *layer = cJSON_GetObjectItemCaseSensitive(j->msg, "clip_layer");
  if (!spec) return NULL;
  char *a = cJSON_PrintUnformatted(spec), *key = NULL;
  if (a && asprintf(&key, "%s|%g", a, layer && cJSON_IsNumber(layer) ? layer->valuedouble : 0.0) < 0) key = NULL;
  free(a);
  return key;
}

void dispatch_run(job *j, ops_pool *pool) {
  if (j->type == LUNA_MSG_MODELS) run_models(j);
  else if (j->type == LUNA_MSG_LORA) run_lora_upload(j);
  else if (j->type == LUNA_MSG_VAE_DECODE || j->type == LUNA_MSG_VAE_ENCODE) run_vae(j, pool);
  else if (j->type == LUNA_MSG_ENCODE) run_encode_batch(&j, 1, pool);
  else reply_error(j, LUNA_EINTERNAL, "message type not handled by workers");
}
