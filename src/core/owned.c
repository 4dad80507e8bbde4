/* owned.c -- a list of heap buffers that one object owns and frees together */
/* SPDX-License-Identifier: MIT */
#include "core/owned.h"

#include <stdlib.h>

int owned_add(owned_list *l, void *p) {
  if (l->n == l->cap) {
    size_t cap = l->cap ? 2 * l->cap : 64;
    void **n = realloc(l->p, cap * sizeof *n);
    if (!n) return -1;
    l->p = n;
    l->cap = cap;
  }
  l->p[l->n++] = p;
  return 0;
}

void owned_free(owned_list *l) {
  for (size_t i = 0; i < l->n; i++) free(l->p[i]);
  free(l->p);
  l->p = NULL;
  l->n = l->cap = 0;
}
