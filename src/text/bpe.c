/* bpe.c -- CLIP's byte-pair merging, done on vocabulary ids with a heap */
/* SPDX-License-Identifier: MIT */
#include "text/tokenizer.h"

#include "core/status.h"

#include <stdlib.h>
#include <string.h>

/*
** CLIP's bpe() works on strings: it finds the adjacent pair of lowest merge rank,
** merges every occurrence of that pair in one left-to-right pass, and repeats until no
** pair has a rank. Every symbol it can produce is a vocabulary entry (a byte, a byte
** with "</w>", or the result of a merge), so the same walk runs here on ids: the merge
** table maps (left id, right id) to (rank, result id).
**
** The naive walk is quadratic in the word length. Here a min-heap holds one candidate
** per adjacent pair, keyed by (rank, position). Each round takes ALL candidates of the
** smallest rank off the heap first and only then merges them, left to right, skipping
** candidates that went stale; pairs created by a merge are pushed afterwards. That is
** exactly one pass of the original loop, so the result matches it for any merges file,
** even one where a merge's product ranks below the merge that made it.
*/

static uint32_t pair_hash(uint32_t left, uint32_t right) {
  uint64_t h = ((uint64_t)left << 32 | right) * 0x9E3779B97F4A7C15ull;
  return (uint32_t)(h >> 32) ^ (uint32_t)h;
}

int tok_merges_init(tok_merges *m, size_t n_expected) {
  size_t slots = 1024;
  while (slots < n_expected * 2 + 1) slots *= 2;
  memset(m, 0, sizeof *m);
  if (slots > ((size_t)1 << 30)) return LUNA_ENOMEM;
  m->slots = malloc(slots * sizeof *m->slots);
  if (!m->slots) return LUNA_ENOMEM;
  for (size_t i = 0; i < slots; i++) m->slots[i].left = UINT32_MAX;
  m->mask = (uint32_t)(slots - 1);
  return 0;
}

void tok_merges_free(tok_merges *m) {
  if (!m) return;
  free(m->slots);
  memset(m, 0, sizeof *m);
}

static int merges_grow(tok_merges *m) {
  size_t old_n = (size_t)m->mask + 1, new_n = old_n * 2;
  if (new_n > ((size_t)1 << 30)) return LUNA_ENOMEM;
  tok_merge *s = malloc(new_n * sizeof *s);
  if (!s) return LUNA_ENOMEM;
  for (size_t i = 0; i < new_n; i++) s[i].left = UINT32_MAX;
  uint32_t mask = (uint32_t)(new_n - 1);
  for (size_t i = 0; i < old_n; i++) {
    tok_merge e = m->slots[i];
    if (e.left == UINT32_MAX) continue;
    uint32_t h = pair_hash(e.left, e.right) & mask;
    while (s[h].left != UINT32_MAX) h = (h + 1) & mask;
    s[h] = e;
  }
  free(m->slots);
  m->slots = s;
  m->mask = mask;
  return 0;
}

int tok_merges_add(tok_merges *m, int32_t left, int32_t right, int32_t rank, int32_t result) {
  LUNA_ASSERT(left >= 0 && right >= 0);
  if ((size_t)(m->n + 1) * 2 > (size_t)m->mask + 1) {
    int rc = merges_grow(m);
    if (rc) return rc;
  }
  uint32_t l = (uint32_t)left, r = (uint32_t)right;
  uint32_t h = pair_hash(l, r) & m->mask;
  while (m->slots[h].left != UINT32_MAX) {
    if (m->slots[h].left == l && m->slots[h].right == r) return 1;
    h = (h + 1) & m->mask;
  }
  m->slots[h] = (tok_merge){l, r, rank, result};
  m->n++;
  return 0;
}

const tok_merge *tok_merges_find(const tok_merges *m, int32_t left, int32_t right) {
  if (!m->slots || left < 0 || right < 0) return NULL;
  uint32_t l = (uint32_t)left, r = (uint32_t)right;
  uint32_t h = pair_hash(l, r) & m->mask;
  while (m->slots[h].left != UINT32_MAX) {
    if (m->slots[h].left == l && m->slots[h].right == r) return &m->slots[h];
    h = (h + 1) & m->mask;
  }
  return NULL;
}

int tok_bpe_reserve(tok_bpe_work *w, size_t n) {
  if (n <= w->cap) return 0;
  size_t cap = w->cap ? w->cap : 64;
  while (cap < n) {
    if (cap > ((size_t)1 << 28)) return LUNA_ENOMEM; /* positions must fit an int32 */
    cap *= 2;
  }
  int32_t *sym = realloc(w->sym, cap * sizeof *sym);
  if (!sym) return LUNA_ENOMEM;
  w->sym = sym;
  int32_t *prev = realloc(w->prev, cap * sizeof *prev);
  if (!prev) return LUNA_ENOMEM;
  w->prev = prev;
  int32_t *next = realloc(w->next, cap * sizeof *next);
  if (!next) return LUNA_ENOMEM;
  w->next = next;
  /* Candidates: n-1 pairs to start, at most two new ones per merge (n-1 merges), plus
  ** a batch area of n positions at the end. */
  uint64_t *heap = realloc(w->heap, cap * 4 * sizeof *heap);
  if (!heap) return LUNA_ENOMEM;
  w->heap = heap;
  w->heap_cap = cap * 3;
  w->cap = cap;
  return 0;
}

void tok_bpe_work_free(tok_bpe_work *w) {
  if (!w) return;
  free(w->sym);
  free(w->prev);
  free(w->next);
  free(w->heap);
  memset(w, 0, sizeof *w);
}

static void heap_push(uint64_t *heap, size_t *n, uint64_t key) {
  size_t i = (*n)++;
  while (i > 0) {
    size_t parent = (i - 1) / 2;
    if (heap[parent] <= key) break;
    heap[i] = heap[parent];
    i = parent;
  }
  heap[i] = key;
}

static uint64_t heap_pop(uint64_t *heap, size_t *n) {
  uint64_t top = heap[0], last = heap[--*n];
  size_t i = 0, len = *n;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= len) break;
    if (c + 1 < len && heap[c + 1] < heap[c]) c++;
    if (heap[c] >= last) break;
    heap[i] = heap[c];
    i = c;
  }
  if (len) heap[i] = last;
  return top;
}

/* Pushes the pair that starts at live position 'p', if it has a merge. */
static void push_pair(const tok_merges *m, tok_bpe_work *w, size_t *n_heap, int32_t p) {
  if (p < 0 || w->next[p] < 0) return;
  const tok_merge *mg = tok_merges_find(m, w->sym[p], w->sym[w->next[p]]);
  if (!mg) return;
  LUNA_ASSERT(*n_heap < w->heap_cap);
  heap_push(w->heap, n_heap, (uint64_t)(uint32_t)mg->rank << 32 | (uint32_t)p);
}

size_t tok_bpe(const tok_merges *m, tok_bpe_work *w, size_t n, int32_t *out) {
  if (n == 0) return 0;
  LUNA_ASSERT(n <= w->cap);
  for (size_t i = 0; i < n; i++) {
    w->prev[i] = (int32_t)i - 1;
    w->next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
  }
  size_t n_heap = 0;
  uint64_t *batch = w->heap + w->heap_cap;
  for (size_t i = 0; i + 1 < n; i++) push_pair(m, w, &n_heap, (int32_t)i);

  while (n_heap > 0) {
    /* One round: every candidate of the lowest rank, in position order. */
    uint32_t rank = (uint32_t)(w->heap[0] >> 32);
    size_t n_batch = 0;
    while (n_heap > 0 && (uint32_t)(w->heap[0] >> 32) == rank) {
      uint64_t e = heap_pop(w->heap, &n_heap);
      /* A position never holds the same pair twice (its symbols only grow), so one
      ** rank has at most one candidate per position and the batch area (n) is enough. */
      if (n_batch < n) batch[n_batch++] = e;
    }
    for (size_t k = 0; k < n_batch; k++) {
      int32_t p = (int32_t)(uint32_t)batch[k];
      if (w->sym[p] < 0) continue; /* absorbed by an earlier merge */
      int32_t q = w->next[p];
      if (q < 0) continue;
      const tok_merge *mg = tok_merges_find(m, w->sym[p], w->sym[q]);
      if (!mg || (uint32_t)mg->rank != rank) continue; /* stale candidate */
      w->sym[p] = mg->result;
      w->sym[q] = -1;
      w->next[p] = w->next[q];
      if (w->next[q] >= 0) w->prev[w->next[q]] = p;
      push_pair(m, w, &n_heap, w->prev[p]);
      push_pair(m, w, &n_heap, p);
    }
  }

  size_t n_out = 0;
  for (int32_t p = 0; p >= 0; p = w->next[p]) out[n_out++] = w->sym[p];
  return n_out;
}
