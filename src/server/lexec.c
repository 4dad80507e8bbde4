/* lexec.c -- how lunad runs LoRA stacks: lock (merge in a locked slot), functional (unmerged terms), auto */
/* SPDX-License-Identifier: MIT */
/*
** The shared weights are never written. Each model has one merge slot holding at most
** one merged stack: fp32 copies of the matrices it touches, which replace the base for
** the requests that run with it; "restore" drops them (the base, mapped from the file or
** converted at load, was never changed, so it is bit for bit what it was).
**
**   lock        a request needs the slot to hold its stack (the empty stack included).
**               While other requests use the slot with another stack it waits; then it
**               restores, merges, runs. The merge stays for the next request with the
**               same stack (lazy restore). Requests with different stacks serialise.
**   functional  never merges: base GEMM over every request's rows, then each request's
**               low-rank terms (LoHa, LoKr, DoRA: the request's weight built in scratch).
**   auto        per batch: when one stack dominates (at least 2 requests and half the
**               LoRA requests of the batch, or 6 of the model's last 8 LoRA requests, or
**               already merged in the slot) it runs merged
**               and the merge is kept; every other request runs functionally, all in one
**               forward pass. A new merge replaces the slot's without waiting: the old
**               one is freed when its last user finishes.
** A batch always holds the oldest queued request (work.c), so no stack starves.
** Locks: slot->mu (per model), and X.mu (counters, a leaf) which is taken while
** slot->mu may be held: the order is slot->mu, then X.mu.
*/
#include "server/server.h"

#include "core/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct merged {
  char *key;                /* the stack; "" for the base */
  lora_plan *plan;          /* NULL for the base */
  lora_report rep;
  int users;
  int detached;             /* replaced in the slot; freed when users reach 0 */
} merged;

#define RECENT 8

struct lexec_slot {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  merged *cur;
  uint64_t next_ticket, serving; /* lock mode: requests take the slot in arrival order */
  uint64_t recent[RECENT];  /* hashes of the last LoRA stacks run (auto mode) */
  int n_recent, pos;
};

static uint64_t key_hash(const char *k) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (; *k; k++) h = (h ^ (uint8_t)*k) * 1099511628211ull;
  return h;
}

static struct {
  pthread_mutex_t mu;
  uint64_t req_lock, req_functional, req_merged, merges, restores, waits;
  double merge_ms, restore_ms, wait_ms;
  size_t merged_bytes;
} X = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};

const char *lexec_mode_name(int mode) {
  return mode == SRV_LORA_LOCK ? "lock" : mode == SRV_LORA_FUNCTIONAL ? "functional" : "auto";
}

static merged *merged_new(const char *key) {
  merged *g = calloc(1, sizeof *g);
  if (g && !(g->key = strdup(key))) {
    free(g);
    g = NULL;
  }
  return g;
}

/* Drop a merge: the restore. */
static void merged_free(merged *g, int count) {
  if (!g) return;
  double t0 = srv_now_ms();
  size_t bytes = lora_plan_bytes(g->plan);
  lora_plan_free(g->plan);
  double dt = srv_now_ms() - t0;
  if (count && g->plan) {
    pthread_mutex_lock(&X.mu);
    X.restores++;
    X.restore_ms += dt;
    X.merged_bytes -= bytes;
    pthread_mutex_unlock(&X.mu);
  } else if (g->plan) {
    pthread_mutex_lock(&X.mu);
    X.merged_bytes -= bytes;
    pthread_mutex_unlock(&X.mu);
  }
  free(g->key);
  free(g);
}

struct lexec_slot *lexec_slot_new(void) {
  struct lexec_slot *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  pthread_mutex_init(&s->mu, NULL);
  pthread_cond_init(&s->cv, NULL);
  if (!(s->cur = merged_new(""))) {
    free(s);
    return NULL;
  }
  return s;
}

void lexec_slot_free(struct lexec_slot *s) {
  if (!s) return;
  merged_free(s->cur, 0);
  pthread_mutex_destroy(&s->mu);
  pthread_cond_destroy(&s->cv);
  free(s);
}

/* Merge 'st' on 'set' into a new slot entry (the merge), taking buffers from 'old' (an
** entry about to be dropped, or NULL). */
static int merge(const te_set *set, const lexec_stack *st, merged *old, merged **out, char *err) {
  *out = merged_new(st->key);
  if (!*out) return luna_fail(err, LUNA_ENOMEM, "out of memory");
  if (!st->n) return 0;
  lora_ref refs[LEXEC_MAX_STACK];
  for (int i = 0; i < st->n; i++) refs[i] = (lora_ref){lcache_file(st->e[i]), st->strength[i]};
  double t0 = srv_now_ms();
  int rc = lora_plan_build_reusing(set, refs, st->n, old ? old->plan : NULL, &(*out)->plan, &(*out)->rep, err);
  double dt = srv_now_ms() - t0;
  if (rc) {
    merged_free(*out, 0);
    *out = NULL;
    return rc;
  }
  pthread_mutex_lock(&X.mu);
  X.merges++;
  X.merge_ms += dt;
  X.merged_bytes += lora_plan_bytes((*out)->plan);
  pthread_mutex_unlock(&X.mu);
  log_debug("merged a LoRA stack in %.1f ms (%zu bytes)", dt, lora_plan_bytes((*out)->plan));
  return 0;
}

/* lock mode: wait for our turn (arrival order, so no stack starves) and until the slot
** holds 'st' or nobody uses it; switch; hold it. Consecutive requests with the slot's
** stack pass together. */
static int acquire_lock(struct lexec_slot *s, const te_set *set, const lexec_stack *st, merged **out, char *err) {
  int rc = 0;
  pthread_mutex_lock(&s->mu);
  double t0 = srv_now_ms();
  int waited = 0;
  uint64_t ticket = s->next_ticket++;
  /* s->cur is NULL only after a merge and its fallback both ran out of memory */
  while (s->serving != ticket || (s->cur && s->cur->users > 0 && strcmp(s->cur->key, st->key))) {
    waited = 1;
    pthread_cond_wait(&s->cv, &s->mu);
  }
  s->serving++;
  if (waited) {
    pthread_mutex_lock(&X.mu);
    X.waits++;
    X.wait_ms += srv_now_ms() - t0;
    pthread_mutex_unlock(&X.mu);
  }
  if (!s->cur || strcmp(s->cur->key, st->key)) {
    /* restore and merge with the model locked (nobody else may use the slot); the new
    ** merge reuses the old one's buffers, then the old one is dropped */
    merged *old = s->cur, *g;
    s->cur = NULL;
    rc = merge(set, st, old, &g, err);
    merged_free(old, 1);
    if (rc) {
      lexec_stack base = {.key = ""};
      merge(set, &base, NULL, &g, NULL); /* back to the base: cannot fail but for memory */
    }
    s->cur = g;
  }
  if (!rc && s->cur) {
    s->cur->users++;
    *out = s->cur;
  } else if (!s->cur) {
    rc = rc ? rc : luna_fail(err, LUNA_ENOMEM, "out of memory");
  }
  pthread_mutex_unlock(&s->mu);
  pthread_cond_broadcast(&s->cv); /* the next ticket may pass now */
  return rc;
}

/* auto mode: hold the slot's merge of 'st', merging (without waiting) when it holds another. */
static int acquire_auto(struct lexec_slot *s, const te_set *set, const lexec_stack *st, merged **out, char *err) {
  pthread_mutex_lock(&s->mu);
  if (s->cur && !strcmp(s->cur->key, st->key)) {
    s->cur->users++;
    *out = s->cur;
    pthread_mutex_unlock(&s->mu);
    return 0;
  }
  pthread_mutex_unlock(&s->mu);
  merged *g;
  int rc = merge(set, st, NULL, &g, err);
  if (rc) return rc;
  merged *old = NULL;
  pthread_mutex_lock(&s->mu);
  if (s->cur && !strcmp(s->cur->key, st->key)) { /* another worker merged it meanwhile */
    s->cur->users++;
    *out = s->cur;
    pthread_mutex_unlock(&s->mu);
    merged_free(g, 0);
    return 0;
  }
  old = s->cur;
  s->cur = g;
  g->users = 1;
  *out = g;
  int free_old = 0;
  if (old) {
    old->detached = 1;
    free_old = old->users == 0;
  }
  pthread_mutex_unlock(&s->mu);
  if (free_old) merged_free(old, 1);
  return 0;
}

static void release(struct lexec_slot *s, merged *g) {
  pthread_mutex_lock(&s->mu);
  int free_it = --g->users == 0 && g->detached;
  pthread_mutex_unlock(&s->mu);
  pthread_cond_broadcast(&s->cv);
  if (free_it) merged_free(g, 1);
}

int lexec_stack_key(lexec_stack *s) {
  size_t cap = (size_t)s->n * (LORA_ID_HEX + 32) + 1;
  char *k = malloc(cap);
  if (!k) return LUNA_ENOMEM;
  size_t o = 0;
  k[0] = '\0';
  for (int i = 0; i < s->n; i++)
    o += (size_t)snprintf(k + o, cap - o, "%s:%.17g;", lcache_file(s->e[i])->id_hex, s->strength[i]);
  free(s->key);
  s->key = k;
  return 0;
}

void lexec_stack_clear(lexec_stack *s) {
  for (int i = 0; i < s->n; i++) lcache_release(s->e[i]);
  s->n = 0;
  free(s->key);
  s->key = NULL;
}

/* Run the requests 'idx[0..k)' as one batch with the plans already set in 'tr'. */
static void run_batch(const te_set *set, ops_pool *pool, const te_request *tr, const int *idx, int k,
                      te_output *out, lexec_result *res) {
  if (!k) return;
  te_request *sub = malloc((size_t)k * sizeof *sub);
  te_output *o = calloc((size_t)k, sizeof *o);
  char err[LUNA_ERR_LEN] = "";
  int rc;
  if (!sub || !o) rc = luna_fail(err, LUNA_ENOMEM, "out of memory");
  else {
    for (int j = 0; j < k; j++) sub[j] = tr[idx[j]];
    rc = te_set_encode_batch(set, pool, sub, k, o, err);
  }
  for (int j = 0; j < k; j++) {
    if (rc) {
      res[idx[j]].rc = rc;
      snprintf(res[idx[j]].err, sizeof res[idx[j]].err, "%s", err);
    } else {
      out[idx[j]] = o[j];
    }
  }
  free(sub);
  free(o);
}

static void count(uint64_t *c, int n) {
  pthread_mutex_lock(&X.mu);
  *c += (uint64_t)n;
  pthread_mutex_unlock(&X.mu);
}

static void encode_lock(const te_set *set, struct lexec_slot *slot, ops_pool *pool, te_request *tr,
                        const lexec_stack *st, int n, te_output *out, lexec_result *res) {
  char *done = calloc((size_t)n, 1);
  int *idx = malloc((size_t)n * sizeof *idx);
  if (!done || !idx) {
    for (int i = 0; i < n; i++) res[i].rc = luna_fail(res[i].err, LUNA_ENOMEM, "out of memory");
    free(done);
    free(idx);
    return;
  }
  for (;;) {
    /* the slot's stack first (no switch), then in arrival order */
    int pick = -1;
    pthread_mutex_lock(&slot->mu);
    for (int i = 0; i < n && pick < 0; i++)
      if (!done[i] && !strcmp(st[i].key, slot->cur ? slot->cur->key : "")) pick = i;
    pthread_mutex_unlock(&slot->mu);
    for (int i = 0; i < n && pick < 0; i++)
      if (!done[i]) pick = i;
    if (pick < 0) break;
    int k = 0;
    for (int i = 0; i < n; i++)
      if (!done[i] && !strcmp(st[i].key, st[pick].key)) {
        idx[k++] = i;
        done[i] = 1;
      }
    merged *g = NULL;
    char err[LUNA_ERR_LEN] = "";
    int rc = acquire_lock(slot, set, &st[pick], &g, err);
    for (int j = 0; j < k; j++) {
      int i = idx[j];
      if (rc) {
        res[i].rc = rc;
        snprintf(res[i].err, sizeof res[i].err, "%s", err);
        continue;
      }
      tr[i].plan = g->plan;
      if (st[i].n) {
        res[i].mode = "lock";
        res[i].rep = g->rep;
      }
    }
    if (rc) continue;
    run_batch(set, pool, tr, idx, k, out, res);
    if (st[pick].n) count(&X.req_lock, k);
    release(slot, g);
  }
  free(done);
  free(idx);
}

static void encode_mixed(const te_set *set, struct lexec_slot *slot, ops_pool *pool, te_request *tr,
                         const lexec_stack *st, int n, te_output *out, lexec_result *res, int mode) {
  /* auto: the dominant stack, if any, runs merged */
  int dom = -1;
  if (mode == SRV_LORA_AUTO) {
    int n_lora = 0, best = 0;
    uint64_t recent[RECENT];
    int n_recent;
    pthread_mutex_lock(&slot->mu);
    char *held = strdup(slot->cur ? slot->cur->key : ""); /* a hint only: acquire_auto checks again */
    memcpy(recent, slot->recent, sizeof recent);
    n_recent = slot->n_recent;
    for (int i = 0; i < n; i++)
      if (st[i].n) {
        slot->recent[slot->pos] = key_hash(st[i].key);
        slot->pos = (slot->pos + 1) % RECENT;
        if (slot->n_recent < RECENT) slot->n_recent++;
      }
    pthread_mutex_unlock(&slot->mu);
    for (int i = 0; i < n; i++)
      if (st[i].n) n_lora++;
    for (int i = 0; i < n; i++) {
      if (!st[i].n) continue;
      int c = 0, r = 0;
      for (int j = 0; j < n; j++) c += st[j].n && !strcmp(st[j].key, st[i].key);
      uint64_t h = key_hash(st[i].key);
      for (int j = 0; j < n_recent; j++) r += recent[j] == h;
      int in_slot = held && !strcmp(st[i].key, held);
      int hot = (c >= 2 && 2 * c >= n_lora) || r + c >= 6;
      if ((in_slot || hot) && (c > best || (in_slot && c == best))) {
        best = c;
        dom = i;
      }
    }
    free(held);
  }
  merged *g = NULL;
  if (dom >= 0) {
    char err[LUNA_ERR_LEN] = "";
    int rc = acquire_auto(slot, set, &st[dom], &g, err);
    if (rc) {
      for (int i = 0; i < n; i++)
        if (st[i].n && !strcmp(st[i].key, st[dom].key)) {
          res[i].rc = rc;
          snprintf(res[i].err, sizeof res[i].err, "%s", err);
        }
      g = NULL;
    }
  }
  lora_plan **own = calloc((size_t)n, sizeof *own);
  int *idx = malloc((size_t)n * sizeof *idx);
  if (!own || !idx) {
    for (int i = 0; i < n; i++) res[i].rc = luna_fail(res[i].err, LUNA_ENOMEM, "out of memory");
    goto done;
  }
  int k = 0, n_merged = 0, n_func = 0;
  /* merged requests first, side by side: they share one GEMM per matrix */
  for (int pass = 0; pass < 2; pass++)
    for (int i = 0; i < n; i++) {
      if (res[i].rc) continue;
      int is_dom = g && st[i].n && !strcmp(st[i].key, g->key);
      if (is_dom != (pass == 0)) continue;
      if (is_dom) {
        tr[i].plan = g->plan;
        res[i].mode = "merged";
        res[i].rep = g->rep;
        n_merged++;
      } else if (st[i].n) {
        lora_ref refs[LEXEC_MAX_STACK];
        for (int e = 0; e < st[i].n; e++) refs[e] = (lora_ref){lcache_file(st[i].e[e]), st[i].strength[e]};
        int rc = lora_plan_build(set, refs, st[i].n, LORA_PLAN_FUNCTIONAL, &own[i], &res[i].rep, res[i].err);
        if (rc) {
          res[i].rc = rc;
          continue;
        }
        tr[i].plan = own[i];
        res[i].mode = "functional";
        n_func++;
      }
      idx[k++] = i;
    }
  run_batch(set, pool, tr, idx, k, out, res);
  count(&X.req_merged, n_merged);
  count(&X.req_functional, n_func);
done:
  if (g) release(slot, g);
  for (int i = 0; own && i < n; i++) lora_plan_free(own[i]);
  free(own);
  free(idx);
}

void lexec_encode(model *m, ops_pool *pool, const te_request *tr_in, const lexec_stack *st, int n, te_output *out,
                  lexec_result *res) {
  const te_set *set = model_set(m);
  struct lexec_slot *slot = model_lora_slot(m);
  te_request *tr = malloc((size_t)n * sizeof *tr);
  for (int i = 0; i < n; i++) {
    memset(&res[i], 0, sizeof res[i]);
    memset(&out[i], 0, sizeof out[i]);
  }
  if (!tr || !slot) {
    for (int i = 0; i < n; i++) res[i].rc = luna_fail(res[i].err, LUNA_ENOMEM, "out of memory");
    free(tr);
    return;
  }
  memcpy(tr, tr_in, (size_t)n * sizeof *tr);
  if (srv.cfg.lora_mode == SRV_LORA_LOCK) encode_lock(set, slot, pool, tr, st, n, out, res);
  else encode_mixed(set, slot, pool, tr, st, n, out, res, srv.cfg.lora_mode);
  free(tr);
}

cJSON *lexec_describe(void) {
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "mode", lexec_mode_name(srv.cfg.lora_mode));
  pthread_mutex_lock(&X.mu);
  cJSON *r = cJSON_AddObjectToObject(o, "requests");
  cJSON_AddNumberToObject(r, "lock", (double)X.req_lock);
  cJSON_AddNumberToObject(r, "functional", (double)X.req_functional);
  cJSON_AddNumberToObject(r, "merged", (double)X.req_merged);
  cJSON_AddNumberToObject(o, "merges", (double)X.merges);
  cJSON_AddNumberToObject(o, "merge_ms", X.merge_ms);
  cJSON_AddNumberToObject(o, "restores", (double)X.restores);
  cJSON_AddNumberToObject(o, "restore_ms", X.restore_ms);
  cJSON_AddNumberToObject(o, "lock_waits", (double)X.waits);
  cJSON_AddNumberToObject(o, "lock_wait_ms", X.wait_ms);
  cJSON_AddNumberToObject(o, "merged_bytes", (double)X.merged_bytes);
  pthread_mutex_unlock(&X.mu);
  cJSON_AddItemToObject(o, "cache", lcache_describe());
  return o;
}
