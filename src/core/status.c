/* status.c -- names and descriptions of luna's status codes, and error-message helpers */
/* SPDX-License-Identifier: MIT */
#include "core/status.h"

#include <stdarg.h>
#include <stdio.h>

const char *luna_strerror(int status) {
  switch (status) {
#define LUNA_XX_(name, code, text) case code: return text;
    LUNA_STATUS_MAP(LUNA_XX_)
#undef LUNA_XX_
  }
  return "unknown status";
}

const char *luna_status_name(int status) {
  switch (status) {
#define LUNA_XX_(name, code, text) case code: return #name;
    LUNA_STATUS_MAP(LUNA_XX_)
#undef LUNA_XX_
  }
  return "UNKNOWN";
}

int luna_fail(char *err, int status, const char *fmt, ...) {
  if (err) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, LUNA_ERR_LEN, fmt, ap);
    va_end(ap);
  }
  return status;
}
