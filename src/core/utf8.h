/* utf8.h -- strict UTF-8 validation of bytes that come from outside */
/* SPDX-License-Identifier: MIT */
#ifndef LUNA_CORE_UTF8_H
#define LUNA_CORE_UTF8_H

#include <stddef.h>
#include <stdint.h>

/* utf8_valid returns 1 when the 'n' bytes at 's' are well-formed UTF-8 (no overlong
** forms, no surrogates, nothing above U+10FFFF); otherwise 0 with the offset of the
** first bad sequence in '*bad'. */
int utf8_valid(const uint8_t *s, size_t n, size_t *bad);

/* utf8_sanitize replaces, in place, each byte that starts an invalid sequence in the
** NUL-terminated 's' with '?', so the result is valid UTF-8. */
void utf8_sanitize(char *s);

#endif
