/* owned.h -- a list of heap buffers that one object owns and frees together */
/* SPDX-License-Identifier: MIT */
#ifndef LUNA_CORE_OWNED_H
#define LUNA_CORE_OWNED_H

#include <stddef.h>

/* Zero-initialise it; owned_free frees every buffer and the list. */
typedef struct owned_list {
  void **p;
  size_t n, cap;
} owned_list;

/* owned_add records 'p' (freed by owned_free). Returns 0, or -1 when out of memory
** (then 'p' is not recorded: the caller still owns it). */
int owned_add(owned_list *l, void *p);

/* owned_free frees every recorded buffer and empties the list. */
void owned_free(owned_list *l);

#endif
