/* status.h -- internal error helpers on top of the public status codes */
/* SPDX-License-Identifier: MIT */
#ifndef LUNA_CORE_STATUS_H
#define LUNA_CORE_STATUS_H

#include "luna.h"

#include <stdio.h>
#include <stdlib.h>

/*
** luna_fail formats a message into 'err' (which may be NULL; at most LUNA_ERR_LEN
** bytes are written) and returns 'status', so that callers can write
**   return luna_fail(err, LUNA_EFORMAT, "%s: tensor '%s' ...", path, name);
*/
int luna_fail(char *err, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Programmer errors abort with the location (ggml's GGML_ASSERT). */
#define LUNA_ASSERT(x)                                                        \
  do {                                                                        \
    if (!(x)) {                                                               \
      fprintf(stderr, "%s:%d: assertion failed: %s\n", __FILE__, __LINE__, #x); \
      abort();                                                                \
    }                                                                         \
  } while (0)

#endif
