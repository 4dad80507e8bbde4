/* lcache.c -- lunad's content-addressed LoRA cache: parsed files by identity, LRU with a byte budget, pins */
/* SPDX-License-Identifier: MIT */
/*
** An entry is a parsed LoRA (lora_file) keyed by its identity. Requests hold references
** while they run; the LRU frees only entries with no references and no pin, so an entry
** is never freed under a request. An evicted entry that is in use leaves the index at
** once (new requests miss) and is freed when its last reference goes. Lock: L.mu only,
** never held while parsing a file or while taking another lock.
*/
#include "server/server.h"

#include "core/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct lcache_entry {
  lora_file *f;
  int refs;
  int pinned;
  int evicted;                  /* out of the index; freed when refs reach 0 */
  uint64_t hits;
  double last_used_ms;
  lcache_entry *prev, *next;    /* index, most recently used first */
};

static struct {
  pthread_mutex_t mu;
  lcache_entry *head, *tail;
  size_t used;
  int n;
  char *dirs[SRV_MAX_DIRS];
  int n_dirs;
  uint64_t hits, misses, evictions, uploads, loads;
} L = {PTHREAD_MUTEX_INITIALIZER, NULL, NULL, 0, 0, {0}, 0, 0, 0, 0, 0, 0};

int lcache_init(char *err) {
  for (int i = 0; i < srv.cfg.n_loras_dirs; i++) {
    char *r = realpath(srv.cfg.loras_dirs[i], NULL);
    struct stat sb;
    if (!r || stat(r, &sb) || !S_ISDIR(sb.st_mode)) {
      free(r);
      return luna_fail(err, LUNA_EIO, "--loras-dir %s: not a folder", srv.cfg.loras_dirs[i]);
    }
    L.dirs[L.n_dirs++] = r;
  }
  return 0;
}

static void unlink_entry(lcache_entry *e) {
  if (e->prev) e->prev->next = e->next;
  else L.head = e->next;
  if (e->next) e->next->prev = e->prev;
  else L.tail = e->prev;
  e->prev = e->next = NULL;
  L.used -= e->f->bytes;
  L.n--;
}

static void push_front(lcache_entry *e) {
  e->prev = NULL;
  e->next = L.head;
  if (L.head) L.head->prev = e;
  else L.tail = e;
  L.head = e;
  L.used += e->f->bytes;
  L.n++;
}

static void entry_free(lcache_entry *e) {
  if (!e) return;
  lora_file_free(e->f);
  free(e);
}

void lcache_free(void) {
  pthread_mutex_lock(&L.mu);
  lcache_entry *e = L.head;
  L.head = L.tail = NULL;
  L.used = 0;
  L.n = 0;
  pthread_mutex_unlock(&L.mu);
  while (e) {
    lcache_entry *n = e->next;
    entry_free(e);
    e = n;
  }
  for (int i = 0; i < L.n_dirs; i++) free(L.dirs[i]);
  L.n_dirs = 0;
}

static lcache_entry *find(const uint8_t id[LORA_ID_LEN]) {
  for (lcache_entry *e = L.head; e; e = e->next)
    if (!memcmp(e->f->id, id, LORA_ID_LEN)) return e;
  return NULL;
}

/* Free idle, unpinned entries from the cold end until the budget holds. Called with
** L.mu held; the freed entries are returned through '*freed' to be freed unlocked. */
static void enforce_budget(lcache_entry **freed) {
  for (lcache_entry *e = L.tail; e && L.used > srv.cfg.lora_cache_mem;) {
    lcache_entry *p = e->prev;
    if (!e->refs && !e->pinned) {
      unlink_entry(e);
      e->next = *freed;
      *freed = e;
      L.evictions++;
    }
    e = p;
  }
}

static void free_chain(lcache_entry *e) {
  while (e) {
    lcache_entry *n = e->next;
    log_info("lora %s evicted (cache budget)", e->f->id_hex);
    entry_free(e);
    e = n;
  }
}

lcache_entry *lcache_get(const uint8_t id[LORA_ID_LEN]) {
  pthread_mutex_lock(&L.mu);
  lcache_entry *e = find(id);
  if (e) {
    e->refs++;
    e->hits++;
    e->last_used_ms = srv_now_ms();
    L.hits++;
    if (L.head != e) { /* most recently used first */
      unlink_entry(e);
      push_front(e);
    }
  } else {
    L.misses++;
  }
  pthread_mutex_unlock(&L.mu);
  return e;
}

/* Put a freshly parsed file in the index (or return the entry that won a race). */
static lcache_entry *insert(lora_file *f) {
  lcache_entry *n = calloc(1, sizeof *n), *freed = NULL;
  if (!n) return NULL;
  n->f = f;
  pthread_mutex_lock(&L.mu);
  lcache_entry *e = find(f->id);
  if (e) { /* another request loaded the same content meanwhile */
    e->refs++;
    pthread_mutex_unlock(&L.mu);
    free(n);
    lora_file_free(f);
    return e;
  }
  n->refs = 1;
  n->last_used_ms = srv_now_ms();
  push_front(n);
  enforce_budget(&freed);
  pthread_mutex_unlock(&L.mu);
  free_chain(freed);
  return n;
}

int lcache_load(const char *rel, const uint8_t id[LORA_ID_LEN], lcache_entry **out, char *err) {
  *out = NULL;
  char *path;
  struct stat sb;
  int rc = srv_resolve_path("LoRA", L.dirs, L.n_dirs, "--loras-dir", rel, &path, &sb, err);
  if (rc) return rc;
  lora_file *f;
  rc = lora_file_load(path, &f, err);
  free(path);
  if (rc) return rc;
  if (memcmp(f->id, id, LORA_ID_LEN)) {
    char want[LORA_ID_HEX];
    lora_id_hex(id, want);
    rc = luna_fail(err, LUNA_ENOTFOUND, "LoRA '%s' in --loras-dir has identity %s, not %s: another file", rel,
                   f->id_hex, want);
    lora_file_free(f);
    return rc;
  }
  lcache_entry *e = insert(f);
  if (!e) {
    lora_file_free(f);
    return luna_fail(err, LUNA_ENOMEM, "out of memory");
  }
  pthread_mutex_lock(&L.mu);
  L.loads++;
  pthread_mutex_unlock(&L.mu);
  log_info("lora %s loaded from '%s' (%zu bytes, %d patches)", e->f->id_hex, rel, e->f->bytes, e->f->n_patches);
  *out = e;
  return 0;
}

int lcache_put(const uint8_t *buf, size_t len, const uint8_t claimed[LORA_ID_LEN], lcache_entry **out, char *err) {
  *out = NULL;
  lcache_entry *e = lcache_get(claimed);
  if (e) { /* already here: nothing to parse */
    *out = e;
    return 0;
  }
  lora_file *f;
  int rc = lora_file_parse(buf, len, "upload", &f, err);
  if (rc) return rc;
  if (memcmp(f->id, claimed, LORA_ID_LEN)) {
    char want[LORA_ID_HEX];
    lora_id_hex(claimed, want);
    rc = luna_fail(err, LUNA_EINVAL, "the uploaded LoRA has identity %s, but the request claims %s", f->id_hex, want);
    lora_file_free(f);
    return rc;
  }
  e = insert(f);
  if (!e) {
    lora_file_free(f);
    return luna_fail(err, LUNA_ENOMEM, "out of memory");
  }
  pthread_mutex_lock(&L.mu);
  L.uploads++;
  pthread_mutex_unlock(&L.mu);
  log_info("lora %s uploaded (%zu bytes, %d patches)", e->f->id_hex, e->f->bytes, e->f->n_patches);
  *out = e;
  return 0;
}

void lcache_release(lcache_entry *e) {
  if (!e) return;
  lcache_entry *freed = NULL;
  pthread_mutex_lock(&L.mu);
  e->refs--;
  int gone = e->evicted && e->refs == 0;
  if (!gone && e->refs == 0) enforce_budget(&freed);
  pthread_mutex_unlock(&L.mu);
  if (gone) entry_free(e);
  free_chain(freed);
}

const lora_file *lcache_file(const lcache_entry *e) { return e->f; }

int lcache_evict(const uint8_t id[LORA_ID_LEN], int *deferred) {
  pthread_mutex_lock(&L.mu);
  lcache_entry *e = find(id);
  if (!e) {
    pthread_mutex_unlock(&L.mu);
    return LUNA_ENOTFOUND;
  }
  unlink_entry(e);
  L.evictions++;
  *deferred = e->refs > 0;
  if (*deferred) e->evicted = 1;
  pthread_mutex_unlock(&L.mu);
  if (!*deferred) entry_free(e);
  return 0;
}

int lcache_pin(const uint8_t id[LORA_ID_LEN], int pin) {
  lcache_entry *freed = NULL;
  pthread_mutex_lock(&L.mu);
  lcache_entry *e = find(id);
  if (e) {
    e->pinned = pin;
    if (!pin) enforce_budget(&freed);
  }
  pthread_mutex_unlock(&L.mu);
  free_chain(freed);
  return e ? 0 : LUNA_ENOTFOUND;
}

cJSON *lcache_list(void) {
  cJSON *o = cJSON_CreateObject(), *a = cJSON_AddArrayToObject(o, "loras");
  double now = srv_now_ms();
  pthread_mutex_lock(&L.mu);
  for (lcache_entry *e = L.head; e && a; e = e->next) {
    cJSON *x = cJSON_CreateObject();
    if (!x) break;
    cJSON_AddStringToObject(x, "id", e->f->id_hex);
    cJSON_AddStringToObject(x, "source", e->f->source ? e->f->source : "");
    cJSON_AddNumberToObject(x, "bytes", (double)e->f->bytes);
    cJSON_AddNumberToObject(x, "patches", e->f->n_patches);
    cJSON_AddNumberToObject(x, "refs", e->refs);
    cJSON_AddBoolToObject(x, "pinned", e->pinned);
    cJSON_AddNumberToObject(x, "hits", (double)e->hits);
    cJSON_AddNumberToObject(x, "idle_s", (now - e->last_used_ms) / 1000.0);
    cJSON_AddItemToArray(a, x);
  }
  cJSON_AddNumberToObject(o, "used_bytes", (double)L.used);
  pthread_mutex_unlock(&L.mu);
  cJSON_AddNumberToObject(o, "budget_bytes", (double)srv.cfg.lora_cache_mem);
  return o;
}

cJSON *lcache_describe(void) {
  cJSON *o = cJSON_CreateObject();
  pthread_mutex_lock(&L.mu);
  cJSON_AddNumberToObject(o, "entries", L.n);
  cJSON_AddNumberToObject(o, "bytes", (double)L.used);
  cJSON_AddNumberToObject(o, "hits", (double)L.hits);
  cJSON_AddNumberToObject(o, "misses", (double)L.misses);
  cJSON_AddNumberToObject(o, "evictions", (double)L.evictions);
  cJSON_AddNumberToObject(o, "uploads", (double)L.uploads);
  cJSON_AddNumberToObject(o, "loads", (double)L.loads);
  pthread_mutex_unlock(&L.mu);
  cJSON_AddNumberToObject(o, "budget_bytes", (double)srv.cfg.lora_cache_mem);
  return o;
}
