/* prompt.c -- ComfyUI's prompt weight syntax: escapes, (text:w) groups, Python float() */
/* SPDX-License-Identifier: MIT */
#include "text/tokenizer.h"

#include "core/status.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <utf8proc.h>

/*
** ComfyUI parses weights with three small Python functions (sd1_clip.py). Their
** behaviour, including the odd corners, is the specification here:
**
**   escape_important    "\)" -> NUL 1, "\(" -> NUL 2 (so escaped parens are not syntax)
**   parse_parentheses   cuts the text into top-level "( ... )" groups and the text
**                       between them. The depth counter goes negative on a stray ')'
**                       and is never clamped, so "a) (b" stays one literal piece.
**   token_weights       a piece that starts with '(' and ends with ')' is a group: its
**                       weight is outer*1.1, unless the inner text has a ':' after its
**                       first character (the LAST one, rfind) and the tail parses with
**                       float(): then the weight is that value (absolute, not scaled)
**                       and the tail is cut off. The inner text is parsed again.
**
** Every piece the recursion produces is a contiguous substring of the escaped text,
** so segments are (offset, length) pairs into it.
*/

int tok_py_isspace(int32_t cp) {
  if ((cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20)) return 1;
  if (cp >= 0x2000 && cp <= 0x200A) return 1;
  switch (cp) {
  case 0x85: case 0xA0: case 0x1680: case 0x2028: case 0x2029: case 0x202F: case 0x205F: case 0x3000:
    return 1;
  }
  return 0;
}

int tok_escape(const char *text, size_t len, char **out, size_t *out_len) {
  /* The two replacements of escape_important cannot interact (neither creates a new
  ** backslash pair), so one pass does both. */
  char *o = malloc(len + 1);
  if (!o) return LUNA_ENOMEM;
  size_t n = 0;
  for (size_t i = 0; i < len; i++) {
    if (text[i] == '\\' && i + 1 < len && (text[i + 1] == ')' || text[i + 1] == '(')) {
      o[n++] = '\0';
      o[n++] = text[i + 1] == ')' ? '\1' : '\2';
      i++;
    } else {
      o[n++] = text[i];
    }
  }
  o[n] = '\0';
  *out = o;
  *out_len = n;
  return 0;
}

size_t tok_unescape(char *s, size_t len) {
  size_t n = 0;
  for (size_t i = 0; i < len; i++) {
    if (s[i] == '\0' && i + 1 < len && (s[i + 1] == '\1' || s[i + 1] == '\2')) {
      s[n++] = s[i + 1] == '\1' ? ')' : '(';
      i++;
    } else {
      s[n++] = s[i];
    }
  }
  return n;
}

/* ---- Python's float() ---- */

/* The value of a decimal digit (category Nd). Unicode encodes every decimal digit set
** as a contiguous run 0..9, and adjacent sets start with their zero, so the digit's
** value is the count of Nd code points just before it, modulo 10. */
static int nd_value(int32_t cp) {
  int n = 0;
  while (n < 64 && cp - n - 1 >= 0 && utf8proc_category(cp - n - 1) == UTF8PROC_CATEGORY_ND) n++;
  return n % 10;
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }

/* Parses the whole of 'a' (ASCII, no whitespace, no underscores) with the grammar of
** Python's _Py_dg_strtod and _Py_parse_inf_or_nan. */
static int parse_ascii_float(const char *a, size_t n, double *out) {
  size_t i = 0;
  int neg = 0;
  if (i < n && (a[i] == '+' || a[i] == '-')) neg = a[i++] == '-';
  const char *word = a + i;
  size_t rest = n - i;
  if ((rest == 3 || rest == 8) && !strncasecmp(word, "infinity", rest)) {
    *out = neg ? -INFINITY : INFINITY;
    return 0;
  }
  if (rest == 3 && !strncasecmp(word, "nan", 3)) {
    *out = neg ? -NAN : NAN;
    return 0;
  }
  size_t digits = 0;
  while (i < n && is_digit(a[i])) i++, digits++;
  if (i < n && a[i] == '.') {
    i++;
    while (i < n && is_digit(a[i])) i++, digits++;
  }
  if (!digits) return -1;
  if (i < n && (a[i] == 'e' || a[i] == 'E')) {
    i++;
    if (i < n && (a[i] == '+' || a[i] == '-')) i++;
    size_t exp_digits = 0;
    while (i < n && is_digit(a[i])) i++, exp_digits++;
    if (!exp_digits) return -1;
  }
  if (i != n) return -1;
  /* The text is now plain decimal; strtod rounds it correctly, as Python does
  ** (overflow gives +-inf, underflow 0 or a subnormal, both without an error). luna
  ** never calls setlocale, so the decimal point is '.'. */
  *out = strtod(a, NULL);
  return 0;
}

int tok_parse_pyfloat(const char *s, size_t len, double *out) {
  char small[128];
  char *a = len < sizeof small ? small : malloc(len + 1);
  if (!a) return -1;
  int rc = -1;
  size_t n = 0;
  /* Python first maps non-ASCII whitespace to ' ' and decimal digits of any script
  ** to ASCII; any other non-ASCII character (or DEL) makes the string invalid. */
  for (size_t i = 0; i < len;) {
    utf8proc_int32_t cp;
    utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(len - i), &cp);
    if (k <= 0) goto done;
    i += (size_t)k;
    if (cp == 0) goto done; /* an embedded NUL is an error in Python too */
    if (cp < 127) a[n++] = (char)cp;
    else if (tok_py_isspace(cp)) a[n++] = ' ';
    else if (utf8proc_category(cp) == UTF8PROC_CATEGORY_ND) a[n++] = (char)('0' + nd_value(cp));
    else goto done;
  }
  /* Strip ASCII whitespace (Python's Py_ISSPACE: \t \n \v \f \r and space only). */
  size_t b = 0, e = n;
  while (b < e && (a[b] == ' ' || (a[b] >= '\t' && a[b] <= '\r'))) b++;
  while (e > b && (a[e - 1] == ' ' || (a[e - 1] >= '\t' && a[e - 1] <= '\r'))) e--;
  /* Underscores: only single ones between two digits; they are then dropped. */
  size_t m = 0;
  for (size_t i = b; i < e; i++) {
    if (a[i] == '_') {
      if (i == b || !is_digit(a[i - 1]) || i + 1 >= e || !is_digit(a[i + 1])) goto done;
      continue;
    }
    a[m++] = a[i];
  }
  a[m] = '\0';
  rc = parse_ascii_float(a, m, out);
done:
  if (a != small) free(a);
  return rc;
}

/* ---- parse_parentheses and token_weights ---- */

typedef struct span {
  size_t off, len;
} span;

typedef struct seg_list {
  tok_segment *v;
  size_t n, cap;
} seg_list;

static int seg_push(seg_list *l, size_t off, size_t len, double w) {
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 16;
    tok_segment *v = realloc(l->v, cap * sizeof *v);
    if (!v) return LUNA_ENOMEM;
    l->v = v;
    l->cap = cap;
  }
  l->v[l->n++] = (tok_segment){off, len, w};
  return 0;
}

/* parse_parentheses over s['off', 'off'+'len'): the pieces as spans in a malloc'd
** array. The current piece is always the text since its start, so a start index is
** all the state it needs besides the depth. */
static int split_groups(const char *s, size_t off, size_t len, span **out, size_t *n_out) {
  span *v = NULL;
  size_t n = 0, cap = 0;
  ptrdiff_t depth = 0;
  size_t cur = off, end = off + len;
  for (size_t i = off; i <= end; i++) {
    size_t push_off = 0, push_len = 0;
    int push = 0;
    if (i == end) {
      if (i > cur) push = 1, push_off = cur, push_len = i - cur;
    } else if (s[i] == '(') {
      if (depth == 0) {
        if (i > cur) push = 1, push_off = cur, push_len = i - cur;
        cur = i;
      }
      depth++;
    } else if (s[i] == ')') {
      depth--;
      if (depth == 0) {
        push = 1, push_off = cur, push_len = i + 1 - cur;
        cur = i + 1;
      }
    }
    if (!push) continue;
    if (n == cap) {
      cap = cap ? cap * 2 : 8;
      span *nv = realloc(v, cap * sizeof *nv);
      if (!nv) {
        free(v);
        return LUNA_ENOMEM;
      }
      v = nv;
    }
    v[n++] = (span){push_off, push_len};
  }
  *out = v;
  *n_out = n;
  return 0;
}

static int weights_rec(const char *s, size_t off, size_t len, double weight, int level,
                       seg_list *out, char *err) {
  span *parts;
  size_t n_parts;
  if (split_groups(s, off, len, &parts, &n_parts)) return luna_fail(err, LUNA_ENOMEM, "out of memory");
  int rc = 0;
  for (size_t k = 0; k < n_parts && !rc; k++) {
    span p = parts[k];
    if (p.len < 2 || s[p.off] != '(' || s[p.off + p.len - 1] != ')') {
      rc = seg_push(out, p.off, p.len, weight);
      if (rc) rc = luna_fail(err, rc, "out of memory");
      continue;
    }
    size_t in_off = p.off + 1, in_len = p.len - 2;
    double w = weight * 1.1;
    size_t colon = in_len;
    for (size_t i = in_len; i-- > 0;) {
      if (s[in_off + i] == ':') {
        colon = i;
        break;
      }
    }
    if (colon != in_len && colon > 0) {
      double v;
      if (tok_parse_pyfloat(s + in_off + colon + 1, in_len - colon - 1, &v) == 0) {
        w = v;
        in_len = colon;
      }
    }
    if (level + 1 > TOK_MAX_NESTING) {
      rc = luna_fail(err, LUNA_EINVAL, "prompt nests weighted groups more than %d deep (at byte %zu)",
                     TOK_MAX_NESTING, p.off);
      break;
    }
    rc = weights_rec(s, in_off, in_len, w, level + 1, out, err);
  }
  free(parts);
  return rc;
}

int tok_weight_segments(const char *s, size_t len, tok_segment **segs, size_t *n_segs, char *err) {
  seg_list l = {0};
  int rc = weights_rec(s, 0, len, 1.0, 0, &l, err);
  if (rc) {
    free(l.v);
    return rc;
  }
  *segs = l.v;
  *n_segs = l.n;
  return 0;
}
