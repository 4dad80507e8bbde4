/* utf8.c -- strict UTF-8 validation of bytes that come from outside */
/* SPDX-License-Identifier: MIT */
#include "core/utf8.h"

#include <string.h>

/* Strict UTF-8 check (no overlongs, no surrogates, nothing above U+10FFFF). */
int utf8_valid(const uint8_t *s, size_t n, size_t *bad) {
  size_t i = 0;
  while (i < n) {
    uint8_t c = s[i];
    size_t k;
    uint32_t cp;
    if (c < 0x80) { i++; continue; }
    if (c >= 0xc2 && c <= 0xdf) { k = 1; cp = c & 0x1f; }
    else if (c >= 0xe0 && c <= 0xef) { k = 2; cp = c & 0x0f; }
    else if (c >= 0xf0 && c <= 0xf4) { k = 3; cp = c & 0x07; }
    else { *bad = i; return 0; }
    for (size_t j = 1; j <= k; j++) {
      if (i + j >= n || (s[i + j] & 0xc0) != 0x80) { *bad = i; return 0; }
      cp = (cp << 6) | (s[i + j] & 0x3f);
    }
    if ((k == 2 && cp < 0x800) || (k == 3 && (cp < 0x10000 || cp > 0x10ffff)) ||
        (cp >= 0xd800 && cp <= 0xdfff)) { *bad = i; return 0; }
    i += k + 1;
  }
  return 1;
}


void utf8_sanitize(char *s) {
  size_t n = strlen(s), off = 0, bad;
  while (off < n && !utf8_valid((const uint8_t *)s + off, n - off, &bad)) {
    s[off + bad] = '?';
    off += bad + 1;
  }
}
