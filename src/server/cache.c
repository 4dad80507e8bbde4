/* cache.c -- lunad's result cache: identical encode requests answered from an LRU with a byte budget */
/* SPDX-License-Identifier: MIT */
/*
** A key is the exact byte string of everything that decides an encode's result: the
** model's identity (resolved paths, sizes, modification times), the clip layer and
** every token id and weight of both encoders, and for each input embedding (a vector
** given instead of an id) its slot and its exact bytes. Entries compare their whole key, so a
** hash collision can never return another request's result. One mutex, never held
** together with another lock.
*/
#include "server/server.h"

#include <stdlib.h>
#include <string.h>

typedef struct entry {
  uint8_t *key;
  size_t key_len;
  uint64_t hash;
  te_output out;
  char family[8];
  size_t bytes;
  struct entry *lru_prev, *lru_next; /* most recent first */
  struct entry *bucket_next;
} entry;

static struct {
  pthread_mutex_t mu;
  entry **buckets;
  size_t n_buckets;
  entry *lru_head, *lru_tail;
  size_t bytes, entries;
  uint64_t hits, misses, evictions;
} C = {.mu = PTHREAD_MUTEX_INITIALIZER};

static uint64_t hash_bytes(const uint8_t *p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
  for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
  return h ^ (h >> 29);
}

static int append(uint8_t **buf, size_t *len, size_t *cap, const void *p, size_t n) {
  if (*len + n > *cap) {
    size_t c = *cap ? *cap : 1024;
    while (c < *len + n) c *= 2;
    uint8_t *b = realloc(*buf, c);
    if (!b) return -1;
    *buf = b;
    *cap = c;
  }
  memcpy(*buf + *len, p, n);
  *len += n;
  return 0;
}

uint8_t *rcache_key(const char *model_key, int clip_layer, const tok_chunks *l, const tok_chunks *g,
                   const te_embeds *el, const te_embeds *eg, size_t *len) {
  uint8_t *buf = NULL;
  size_t n = 0, cap = 0;
  int bad = append(&buf, &n, &cap, model_key, strlen(model_key) + 1) ||
            append(&buf, &n, &cap, &clip_layer, sizeof clip_layer);
  const tok_chunks *parts[2] = {l, g};
  const te_embeds *embs[2] = {el, eg};
  for (int k = 0; k < 2 && !bad; k++) {
    int32_t nc = parts[k] ? parts[k]->n_chunks : -1;
    bad = append(&buf, &n, &cap, &nc, sizeof nc);
    if (nc > 0 && !bad)
      bad = append(&buf, &n, &cap, parts[k]->ids, (size_t)nc * TOK_CHUNK * sizeof(int32_t)) ||
            append(&buf, &n, &cap, parts[k]->weights, (size_t)nc * TOK_CHUNK * sizeof(double));
    /* the vectors that replace ids: count, then each slot with its bytes (which row of
    ** the request's matrix held it does not matter, nor do unused rows) */
    const te_embeds *e = parts[k] ? embs[k] : NULL;
    int32_t ne = e ? e->n : 0;
    int64_t dim = e ? e->dim : 0;
    if (!bad) bad = append(&buf, &n, &cap, &ne, sizeof ne) || append(&buf, &n, &cap, &dim, sizeof dim);
    for (int i = 0; i < ne && !bad; i++)
      bad = append(&buf, &n, &cap, &e->slot[i], sizeof e->slot[i]) ||
            append(&buf, &n, &cap, e->rows + (int64_t)e->row[i] * dim, (size_t)dim * sizeof(float));
  }
  if (bad) {
    free(buf);
    return NULL;
  }
  *len = n;
  return buf;
}

static void lru_unlink(entry *e) {
  if (e->lru_prev) e->lru_prev->lru_next = e->lru_next;
  else C.lru_head = e->lru_next;
  if (e->lru_next) e->lru_next->lru_prev = e->lru_prev;
  else C.lru_tail = e->lru_prev;
  e->lru_prev = e->lru_next = NULL;
}

static void lru_push_front(entry *e) {
  e->lru_next = C.lru_head;
  e->lru_prev = NULL;
  if (C.lru_head) C.lru_head->lru_prev = e;
  C.lru_head = e;
  if (!C.lru_tail) C.lru_tail = e;
}

static void entry_remove(entry *e) {
  entry **pp = &C.buckets[e->hash % C.n_buckets];
  while (*pp != e) pp = &(*pp)->bucket_next;
  *pp = e->bucket_next;
  lru_unlink(e);
  C.bytes -= e->bytes;
  C.entries--;
  free(e->key);
  te_output_free(&e->out);
  free(e);
}

static entry *find(const uint8_t *key, size_t len, uint64_t h) {
  if (!C.buckets) return NULL;
  for (entry *e = C.buckets[h % C.n_buckets]; e; e = e->bucket_next)
    if (e->hash == h && e->key_len == len && !memcmp(e->key, key, len)) return e;
  return NULL;
}

static int copy_output(te_output *dst, const te_output *src) {
  *dst = *src;
  dst->cond = malloc((size_t)(src->n_tokens * src->dim) * sizeof(float));
  dst->pooled = malloc((size_t)src->pooled_dim * sizeof(float));
  if (!dst->cond || !dst->pooled) {
    te_output_free(dst);
    return -1;
  }
  memcpy(dst->cond, src->cond, (size_t)(src->n_tokens * src->dim) * sizeof(float));
  memcpy(dst->pooled, src->pooled, (size_t)src->pooled_dim * sizeof(float));
  return 0;
}

int rcache_get(const uint8_t *key, size_t len, te_output *out) {
  if (!srv.cfg.cache_mem) return 0;
  uint64_t h = hash_bytes(key, len);
  pthread_mutex_lock(&C.mu);
  entry *e = find(key, len, h);
  int hit = e && copy_output(out, &e->out) == 0;
  if (e && hit) {
    lru_unlink(e);
    lru_push_front(e);
  }
  if (hit) C.hits++;
  else C.misses++;
  pthread_mutex_unlock(&C.mu);
  return hit;
}

void rcache_put(const uint8_t *key, size_t len, const te_output *out) {
  uint64_t budget = srv.cfg.cache_mem;
  size_t bytes = len + sizeof(entry) + (size_t)(out->n_tokens * out->dim + out->pooled_dim) * sizeof(float);
  if (!budget || bytes > budget) return;
  entry *e = calloc(1, sizeof *e);
  if (!e) return;
  e->key = malloc(len);
  if (!e->key || copy_output(&e->out, out)) {
    free(e->key);
    free(e);
    return;
  }
  memcpy(e->key, key, len);
  e->key_len = len;
  e->hash = hash_bytes(key, len);
  e->bytes = bytes;
  pthread_mutex_lock(&C.mu);
  if (!C.buckets) {
    C.n_buckets = 4096;
    C.buckets = calloc(C.n_buckets, sizeof *C.buckets);
  }
  if (!C.buckets || find(key, len, e->hash)) { /* no table, or another worker was first */
    pthread_mutex_unlock(&C.mu);
    free(e->key);
    te_output_free(&e->out);
    free(e);
    return;
  }
  while (C.lru_tail && C.bytes + bytes > budget) {
    entry_remove(C.lru_tail);
    C.evictions++;
  }
  e->bucket_next = C.buckets[e->hash % C.n_buckets];
  C.buckets[e->hash % C.n_buckets] = e;
  lru_push_front(e);
  C.bytes += bytes;
  C.entries++;
  pthread_mutex_unlock(&C.mu);
}

cJSON *rcache_describe(void) {
  cJSON *o = cJSON_CreateObject();
  pthread_mutex_lock(&C.mu);
  cJSON_AddNumberToObject(o, "entries", (double)C.entries);
  cJSON_AddNumberToObject(o, "bytes", (double)C.bytes);
  cJSON_AddNumberToObject(o, "budget", (double)srv.cfg.cache_mem);
  cJSON_AddNumberToObject(o, "hits", (double)C.hits);
  cJSON_AddNumberToObject(o, "misses", (double)C.misses);
  cJSON_AddNumberToObject(o, "evictions", (double)C.evictions);
  pthread_mutex_unlock(&C.mu);
  return o;
}

void rcache_free(void) {
  pthread_mutex_lock(&C.mu);
  while (C.lru_tail) entry_remove(C.lru_tail);
  free(C.buckets);
  C.buckets = NULL;
  C.n_buckets = 0;
  pthread_mutex_unlock(&C.mu);
}
