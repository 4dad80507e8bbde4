/* tokenizer.c -- CLIP's tokenizer as ComfyUI runs it: vocabulary, text cleanup, BPE, chunks */
/* SPDX-License-Identifier: MIT */
#include "text/tokenizer.h"

#include "core/status.h"

#include <cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

/*
** The pipeline, for one prompt (ComfyUI's SDTokenizer.tokenize_with_weights):
**
**   1. escapes and weight groups (prompt.c) give weighted segments;
**   2. each segment is cut before " embedding:" / "\nembedding:" into pieces;
**   3. each piece goes through Hugging Face's slow CLIPTokenizer without ftfy:
**      a. the exact strings <|startoftext|> and <|endoftext|> are cut out first (the
**         added-token split) and become their ids;
**      b. the rest is cleaned as BasicTokenizer(strip_accents=False,
**         do_split_on_punc=False) does: NUL, U+FFFD and every category C* code point
**         except \t \n \r dropped, \t \n \r and Zs turned into spaces, spaces put around
**         CJK ideographs, NFC, split on Python whitespace, each word lower-cased with
**         Python's str.lower();
**      c. each word is cut into pre-tokens by CLIP's regex (see pretokenize below);
**      d. each pre-token's UTF-8 bytes go through byte-level BPE (bpe.c);
**   4. the pieces' id lists are packed into 77-token chunks (chunk_add_group).
*/

#define TOK_MAX_MERGES (49152 - 256 - 2) /* lines CLIPTokenizer reads after the header */
#define TOK_MAX_FILE ((size_t)256 << 20)

static const char SOT[] = "<|startoftext|>";
static const char EOT[] = "<|endoftext|>";

struct tok_vocab {
  tok_merges merges;      /* (left, right) -> (rank, result) */
  int32_t byte_id[256];   /* the id of each byte's symbol */
  int32_t byte_end[256];  /* ... and of the symbol with "</w>", for a pre-token's last byte */
  int32_t n_tokens;       /* entries in vocab.json */
};

/* ---- files ---- */

int tok_read_file(const char *path, char **out, size_t *out_len, char *err) {
  FILE *f = fopen(path, "rb");
  if (!f) return luna_fail(err, LUNA_EIO, "%s: cannot open: %s", path, strerror(errno));
  char *buf = NULL;
  size_t len = 0, cap = 0;
  for (;;) {
    if (len == cap) {
      if (cap >= TOK_MAX_FILE) {
        free(buf);
        fclose(f);
        return luna_fail(err, LUNA_EFORMAT, "%s: larger than %zu MiB", path, TOK_MAX_FILE >> 20);
      }
      cap = cap ? cap * 2 : 1 << 20;
      char *nb = realloc(buf, cap + 1);
      if (!nb) {
        free(buf);
        fclose(f);
        return luna_fail(err, LUNA_ENOMEM, "%s: out of memory", path);
      }
      buf = nb;
    }
    size_t got = fread(buf + len, 1, cap - len, f);
    len += got;
    if (got == 0) break;
  }
  int bad = ferror(f);
  fclose(f);
  if (bad) {
    free(buf);
    return luna_fail(err, LUNA_EIO, "%s: read error", path);
  }
  buf[len] = '\0';
  *out = buf;
  *out_len = len;
  return 0;
}

static char *join_path(const char *dir, const char *name) {
  size_t a = strlen(dir), b = strlen(name);
  char *p = malloc(a + b + 2);
  if (!p) return NULL;
  memcpy(p, dir, a);
  size_t n = a;
  if (n && p[n - 1] != '/') p[n++] = '/';
  memcpy(p + n, name, b + 1);
  return p;
}

/* A token as it may appear in a message: printable ASCII and UTF-8 kept, other bytes as
** \xNN, cut after about 40 bytes. */
static const char *show(const char *s, size_t len, char *buf, size_t cap) {
  size_t n = 0;
  for (size_t i = 0; i < len && n + 8 < cap; i++) {
    unsigned char c = (unsigned char)s[i];
    if (n > 40) {
      memcpy(buf + n, "...", 3);
      n += 3;
      break;
    }
    if (c < 0x20 || c == 0x7F) n += (size_t)snprintf(buf + n, cap - n, "\\x%02x", c);
    else buf[n++] = (char)c;
  }
  buf[n] = '\0';
  return buf;
}

/* ---- string -> id table used while loading ---- */

typedef struct str_entry {
  const char *s; /* NULL: empty slot */
  size_t len;
  uint32_t hash;
  int32_t id;
} str_entry;

typedef struct str_table {
  str_entry *slots;
  size_t mask;
} str_table;

static uint32_t str_hash(const char *s, size_t len) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < len; i++) h = (h ^ (unsigned char)s[i]) * 0x100000001b3ull;
  return (uint32_t)(h ^ (h >> 32));
}

static int str_table_init(str_table *t, size_t n) {
  size_t slots = 1024;
  while (slots < n * 2 + 1) slots *= 2;
  t->slots = calloc(slots, sizeof *t->slots);
  t->mask = slots - 1;
  return t->slots ? 0 : LUNA_ENOMEM;
}

/* Returns the entry for 's', or the empty slot where it would go. */
static str_entry *str_table_slot(const str_table *t, const char *s, size_t len, uint32_t hash) {
  size_t h = hash & t->mask;
  for (;;) {
    const str_entry *e = &t->slots[h];
    if (!e->s || (e->hash == hash && e->len == len && !memcmp(e->s, s, len))) return &t->slots[h];
    h = (h + 1) & t->mask;
  }
}

static int32_t str_table_get(const str_table *t, const char *s, size_t len) {
  const str_entry *e = str_table_slot(t, s, len, str_hash(s, len));
  return e->s ? e->id : -1;
}

/* ---- vocab.json ---- */

/* The 1-based line and column of byte 'pos' of 'text'. */
static void line_col(const char *text, size_t pos, int *line, int *col) {
  int l = 1, c = 1;
  for (size_t i = 0; i < pos; i++) {
    if (text[i] == '\n') l++, c = 1;
    else c++;
  }
  *line = l;
  *col = c;
}

/* The line on which member 'index' (0-based) of the top-level object in 'text' starts,
** found by a light scan; used only to point error messages at the right line. */
static int member_line(const char *text, size_t len, size_t index) {
  int line = 1, depth = 0, in_str = 0, want_key = 0;
  size_t seen = 0;
  for (size_t i = 0; i < len; i++) {
    char c = text[i];
    if (c == '\n') line++;
    if (in_str) {
      if (c == '\\') i++;
      else if (c == '"') in_str = 0;
      continue;
    }
    if (c == '"') {
      in_str = 1;
      if (depth == 1 && want_key) {
        if (seen++ == index) return line;
        want_key = 0;
      }
    } else if (c == '{' || c == '[') {
      depth++;
      if (depth == 1) want_key = 1;
    } else if (c == '}' || c == ']') {
      depth--;
    } else if (c == ',' && depth == 1) {
      want_key = 1;
    }
  }
  return line;
}

/* GPT-2's byte -> code point table: printable Latin-1 bytes stand for themselves, the
** other 68 bytes take U+0100 onwards in byte order. */
static int32_t byte_code_point(int b) {
  if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) return b;
  int n = 0;
  for (int x = 0; x < b; x++)
    if (!((x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF))) n++;
  return 256 + n;
}

static int load_vocab_json(const char *path, tok_vocab *v, str_table *tab, cJSON **root_out, char *err) {
  char *text;
  size_t len;
  int rc = tok_read_file(path, &text, &len, err);
  if (rc) return rc;
  const char *end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
  if (!root) {
    int line, col;
    size_t pos = end && end >= text && end <= text + len ? (size_t)(end - text) : 0;
    line_col(text, pos, &line, &col);
    free(text);
    return luna_fail(err, LUNA_EFORMAT, "%s:%d:%d: invalid JSON", path, line, col);
  }
  char tmp[128], tmp2[128];
  if (!cJSON_IsObject(root)) {
    rc = luna_fail(err, LUNA_EFORMAT, "%s: expected an object of token -> id", path);
    goto out;
  }
  size_t n = 0;
  for (cJSON *it = root->child; it; it = it->next) n++;
  if (n == 0 || n > TOK_VOCAB) {
    rc = luna_fail(err, LUNA_EFORMAT, "%s: %zu tokens; expected 1 to %d", path, n, TOK_VOCAB);
    goto out;
  }
  const char **name_of = calloc(TOK_VOCAB, sizeof *name_of);
  if (!name_of || str_table_init(tab, n)) {
    free(name_of);
    rc = luna_fail(err, LUNA_ENOMEM, "%s: out of memory", path);
    goto out;
  }
  size_t idx = 0;
  for (cJSON *it = root->child; it; it = it->next, idx++) {
    const char *key = it->string ? it->string : "";
    size_t klen = strlen(key);
    double d = cJSON_IsNumber(it) ? it->valuedouble : -1.0;
    if (!cJSON_IsNumber(it) || !(d >= 0 && d < TOK_VOCAB) || d != floor(d)) {
      rc = luna_fail(err, LUNA_EFORMAT, "%s:%d: token '%s': the id must be an integer in [0, %d)", path,
                     member_line(text, len, idx), show(key, klen, tmp, sizeof tmp), TOK_VOCAB);
      break;
    }
    int32_t id = (int32_t)d;
    uint32_t hash = str_hash(key, klen);
    str_entry *e = str_table_slot(tab, key, klen, hash);
    if (e->s) {
      rc = luna_fail(err, LUNA_EFORMAT, "%s:%d: token '%s' appears twice", path, member_line(text, len, idx),
                     show(key, klen, tmp, sizeof tmp));
      break;
    }
    if (name_of[id]) {
      rc = luna_fail(err, LUNA_EFORMAT, "%s:%d: id %d is given to both '%s' and '%s'", path,
                     member_line(text, len, idx), id, show(name_of[id], strlen(name_of[id]), tmp, sizeof tmp),
                     show(key, klen, tmp2, sizeof tmp2));
      break;
    }
    *e = (str_entry){key, klen, hash, id};
    name_of[id] = key;
  }
  free(name_of);
  if (rc) goto out;
  v->n_tokens = (int32_t)n;

  /* The byte symbols, plain and with "</w>", and the two special tokens. */
  for (int b = 0; b < 256; b++) {
    char s[16];
    int k = (int)utf8proc_encode_char(byte_code_point(b), (utf8proc_uint8_t *)s);
    memcpy(s + k, "</w>", 5);
    v->byte_id[b] = str_table_get(tab, s, (size_t)k);
    v->byte_end[b] = str_table_get(tab, s, (size_t)k + 4);
    if (v->byte_id[b] < 0 || v->byte_end[b] < 0) {
      if (v->byte_id[b] < 0) s[k] = '\0';
      rc = luna_fail(err, LUNA_EFORMAT, "%s: no entry for the symbol '%s' of byte 0x%02x", path, s, b);
      goto out;
    }
  }
  int32_t sot = str_table_get(tab, SOT, sizeof SOT - 1), eot = str_table_get(tab, EOT, sizeof EOT - 1);
  if (sot != TOK_BOS || eot != TOK_EOS) {
    rc = luna_fail(err, LUNA_EFORMAT, "%s: '%s' must have id %d and '%s' id %d (found %d and %d)", path, SOT,
                   TOK_BOS, EOT, TOK_EOS, sot, eot);
    goto out;
  }
out:
  free(text);
  if (rc) cJSON_Delete(root);
  else *root_out = root; /* the table's keys point into it */
  return rc;
}

/* ---- merges.txt ---- */

static int load_merges(const char *path, tok_vocab *v, const str_table *tab, char *err) {
  char *text;
  size_t len;
  int rc = tok_read_file(path, &text, &len, err);
  if (rc) return rc;
  if (tok_merges_init(&v->merges, TOK_MAX_MERGES)) {
    free(text);
    return luna_fail(err, LUNA_ENOMEM, "%s: out of memory", path);
  }
  char tmp[128], both[512];
  int line = 0;
  int32_t rank = 0;
  for (size_t pos = 0; pos < len && rank < TOK_MAX_MERGES;) {
    const char *s = text + pos;
    const char *nl = memchr(s, '\n', len - pos);
    size_t n = nl ? (size_t)(nl - s) : len - pos;
    pos += n + 1;
    line++;
    if (n && s[n - 1] == '\r') n--;
    if (line == 1 && n && s[0] == '#') continue; /* "#version: 0.2" */
    /* Fields split on spaces and tabs, as str.split() does for these files. */
    const char *f[3];
    size_t fl[3];
    int nf = 0;
    for (size_t i = 0; i < n;) {
      while (i < n && (s[i] == ' ' || s[i] == '\t')) i++;
      if (i == n) break;
      size_t b = i;
      while (i < n && s[i] != ' ' && s[i] != '\t') i++;
      if (nf < 3) f[nf] = s + b, fl[nf] = i - b;
      nf++;
    }
    if (nf == 0) continue; /* blank lines hold no merge */
    if (nf != 2) {
      rc = luna_fail(err, LUNA_EFORMAT, "%s:%d: expected two symbols separated by a space, found %d field%s",
                     path, line, nf, nf == 1 ? "" : "s");
      break;
    }
    int32_t left = str_table_get(tab, f[0], fl[0]), right = str_table_get(tab, f[1], fl[1]);
    if (left < 0 || right < 0) {
      int k = left < 0 ? 0 : 1;
      rc = luna_fail(err, LUNA_EFORMAT, "%s:%d: symbol '%s' is not in vocab.json", path, line,
                     show(f[k], fl[k], tmp, sizeof tmp));
      break;
    }
    if (fl[0] + fl[1] > sizeof both) {
      rc = luna_fail(err, LUNA_EFORMAT, "%s:%d: symbols too long", path, line);
      break;
    }
    memcpy(both, f[0], fl[0]);
    memcpy(both + fl[0], f[1], fl[1]);
    int32_t result = str_table_get(tab, both, fl[0] + fl[1]);
    if (result < 0) {
      rc = luna_fail(err, LUNA_EFORMAT, "%s:%d: the merged symbol '%s' is not in vocab.json", path, line,
                     show(both, fl[0] + fl[1], tmp, sizeof tmp));
      break;
    }
    int added = tok_merges_add(&v->merges, left, right, rank, result);
    if (added == 1) {
      rc = luna_fail(err, LUNA_EFORMAT, "%s:%d: the merge '%s' appears twice", path, line,
                     show(s, n, tmp, sizeof tmp));
      break;
    }
    if (added) {
      rc = luna_fail(err, LUNA_ENOMEM, "%s: out of memory", path);
      break;
    }
    rank++;
  }
  if (!rc && rank == 0) rc = luna_fail(err, LUNA_EFORMAT, "%s: no merges", path);
  free(text);
  return rc;
}

int tok_vocab_load(const char *dir, tok_vocab **out, char *err) {
  *out = NULL;
  if (!dir) return luna_fail(err, LUNA_EINVAL, "no tokenizer folder given");
  tok_vocab *v = calloc(1, sizeof *v);
  char *vpath = join_path(dir, "vocab.json"), *mpath = join_path(dir, "merges.txt");
  str_table tab = {0};
  cJSON *root = NULL;
  int rc;
  if (!v || !vpath || !mpath) {
    rc = luna_fail(err, LUNA_ENOMEM, "out of memory");
    goto out;
  }
  rc = load_vocab_json(vpath, v, &tab, &root, err);
  if (!rc) rc = load_merges(mpath, v, &tab, err);
out:
  free(tab.slots);
  cJSON_Delete(root);
  free(vpath);
  free(mpath);
  if (rc) tok_vocab_free(v);
  else *out = v;
  return rc;
}

void tok_vocab_free(tok_vocab *v) {
  if (!v) return;
  tok_merges_free(&v->merges);
  free(v);
}

/* ---- Unicode helpers (Python's rules on utf8proc's tables) ---- */

static int is_cjk(int32_t cp) {
  return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) || (cp >= 0x20000 && cp <= 0x2A6DF) ||
         (cp >= 0x2A700 && cp <= 0x2B73F) || (cp >= 0x2B740 && cp <= 0x2B81F) ||
         (cp >= 0x2B820 && cp <= 0x2CEAF) || (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

static int is_letter(int32_t cp) {
  switch (utf8proc_category(cp)) {
  case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
  case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO:
    return 1;
  default:
    return 0;
  }
}

static int is_number(int32_t cp) {
  utf8proc_category_t c = utf8proc_category(cp);
  return c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_NO;
}

/* Unicode's Case_Ignorable: Mn Me Cf Lm Sk plus the Word_Break MidLetter, MidNumLet
** and Single_Quote characters. */
static int case_ignorable(int32_t cp) {
  switch (utf8proc_category(cp)) {
  case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_ME: case UTF8PROC_CATEGORY_CF:
  case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_SK:
    return 1;
  default:
    break;
  }
  switch (cp) {
  case 0x27: case 0x2E: case 0x3A: case 0xB7: case 0x387: case 0x55F: case 0x5F4: case 0x2018: case 0x2019:
  case 0x2024: case 0x2027: case 0xFE13: case 0xFE52: case 0xFE55: case 0xFF07: case 0xFF0E: case 0xFF1A:
    return 1;
  default:
    return 0;
  }
}

/* Unicode's Cased for characters that are not case-ignorable: Lu Ll Lt plus the
** Other_Lowercase / Other_Uppercase ones of other categories. */
static int cased(int32_t cp) {
  utf8proc_category_t c = utf8proc_category(cp);
  if (c == UTF8PROC_CATEGORY_LU || c == UTF8PROC_CATEGORY_LL || c == UTF8PROC_CATEGORY_LT) return 1;
  return cp == 0xAA || cp == 0xBA || (cp >= 0x2160 && cp <= 0x217F) || (cp >= 0x24B6 && cp <= 0x24E9) ||
         (cp >= 0x1F130 && cp <= 0x1F149) || (cp >= 0x1F150 && cp <= 0x1F169) ||
         (cp >= 0x1F170 && cp <= 0x1F189);
}

/* Python's Final_Sigma test for the capital sigma at 'i' of 'w' (n code points): a
** cased letter before it and none after it, skipping case-ignorable ones both ways. */
static int final_sigma(const int32_t *w, size_t n, size_t i) {
  size_t j = i;
  while (j > 0 && case_ignorable(w[j - 1])) j--;
  if (j == 0 || !cased(w[j - 1])) return 0;
  j = i + 1;
  while (j < n && case_ignorable(w[j])) j++;
  return j == n || !cased(w[j]);
}

/* ---- the encoder ---- */

/* Growable buffers of one encode call; nothing in here outlives it. */
typedef struct enc {
  const tok_vocab *v;
  int32_t *ids; /* output */
  size_t n_ids, cap_ids;
  char *buf;    /* cleaned UTF-8 */
  size_t cap_buf;
  int32_t *cps; /* NFC code points */
  size_t cap_cps;
  int32_t *low; /* one lower-cased word */
  size_t cap_low;
  unsigned char *bytes; /* one pre-token's UTF-8 */
  size_t cap_bytes;
  tok_bpe_work bpe;
} enc;

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
  if (need <= *cap) return 0;
  size_t c = *cap ? *cap : 64;
  while (c < need) {
    if (c > SIZE_MAX / 4 / elem) return LUNA_ENOMEM;
    c *= 2;
  }
  void *np = realloc(*p, c * elem);
  if (!np) return LUNA_ENOMEM;
  *p = np;
  *cap = c;
  return 0;
}

static void enc_free(enc *e) {
  free(e->ids);
  free(e->buf);
  free(e->cps);
  free(e->low);
  free(e->bytes);
  tok_bpe_work_free(&e->bpe);
}

static int push_id(enc *e, int32_t id) {
  if (grow((void **)&e->ids, &e->cap_ids, e->n_ids + 1, sizeof *e->ids)) return LUNA_ENOMEM;
  e->ids[e->n_ids++] = id;
  return 0;
}

/* BPE of one pre-token, code points 'cp'[0, 'n'). */
static int encode_pretoken(enc *e, const int32_t *cp, size_t n) {
  if (grow((void **)&e->bytes, &e->cap_bytes, n * 4, 1)) return LUNA_ENOMEM;
  size_t nb = 0;
  for (size_t i = 0; i < n; i++) nb += (size_t)utf8proc_encode_char(cp[i], e->bytes + nb);
  /* CLIPTokenizer's cache maps the two specials to themselves, never splitting them. */
  if (nb == sizeof SOT - 1 && !memcmp(e->bytes, SOT, nb)) return push_id(e, TOK_BOS);
  if (nb == sizeof EOT - 1 && !memcmp(e->bytes, EOT, nb)) return push_id(e, TOK_EOS);
  if (tok_bpe_reserve(&e->bpe, nb)) return LUNA_ENOMEM;
  if (grow((void **)&e->ids, &e->cap_ids, e->n_ids + nb, sizeof *e->ids)) return LUNA_ENOMEM;
  for (size_t i = 0; i < nb; i++) e->bpe.sym[i] = e->v->byte_id[e->bytes[i]];
  e->bpe.sym[nb - 1] = e->v->byte_end[e->bytes[nb - 1]];
  e->n_ids += tok_bpe(&e->v->merges, &e->bpe, nb, e->ids + e->n_ids);
  return 0;
}

/* Does 'pat' (ASCII) match at 'w'? Case-insensitive as the regex module's IGNORECASE is
** on lower-cased text: the only non-ASCII code point that folds onto one of these
** letters is U+017F (long s), matching 's'. */
static size_t match_literal(const int32_t *w, size_t n, const char *pat) {
  size_t k = strlen(pat);
  if (k > n) return 0;
  for (size_t i = 0; i < k; i++)
    if (w[i] != pat[i] && !(pat[i] == 's' && w[i] == 0x17F)) return 0;
  return k;
}

/* The regex module never matches U+0345 with IGNORECASE: it is no letter, and the
** negated class [^\s\p{L}\p{N}] rejects it because it case-folds to a letter (iota). */
static int is_other(int32_t cp) {
  return cp != 0x345 && !is_letter(cp) && !is_number(cp) && !tok_py_isspace(cp);
}

/*
** CLIP's pre-token regex, case-insensitive, on one lower-cased word (no whitespace):
**   <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
** The alternatives are tried in order at each position; unmatched code points are
** skipped, as findall does.
*/
static int pretokenize(enc *e, const int32_t *w, size_t n) {
  static const char *const contractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
  for (size_t i = 0; i < n;) {
    size_t k = 0;
    if (w[i] == '<') {
      k = match_literal(w + i, n - i, SOT);
      if (!k) k = match_literal(w + i, n - i, EOT);
    } else if (w[i] == '\'') {
      for (size_t c = 0; c < sizeof contractions / sizeof *contractions && !k; c++)
        k = match_literal(w + i, n - i, contractions[c]);
    }
    if (!k) {
      if (is_letter(w[i])) {
        k = 1;
        while (i + k < n && is_letter(w[i + k])) k++;
      } else if (is_number(w[i])) {
        k = 1;
      } else if (is_other(w[i])) {
        k = 1;
        while (i + k < n && is_other(w[i + k])) k++;
      } else {
        i++;
        continue;
      }
    }
    int rc = encode_pretoken(e, w + i, k);
    if (rc) return rc;
    i += k;
  }
  return 0;
}

/* Python's str.lower() on one word: simple lower-case mappings, plus U+0130 ->
** "i\u0307" and the Final_Sigma rule for U+03A3. */
static int lower_word(enc *e, const int32_t *w, size_t n, size_t *n_out) {
  if (grow((void **)&e->low, &e->cap_low, n * 2, sizeof *e->low)) return LUNA_ENOMEM;
  size_t m = 0;
  for (size_t i = 0; i < n; i++) {
    if (w[i] == 0x130) {
      e->low[m++] = 'i';
      e->low[m++] = 0x307;
    } else if (w[i] == 0x3A3) {
      e->low[m++] = final_sigma(w, n, i) ? 0x3C2 : 0x3C3;
    } else {
      e->low[m++] = utf8proc_tolower(w[i]);
    }
  }
  *n_out = m;
  return 0;
}

/* One piece of text without special-token strings: BasicTokenizer's cleanup, then the
** pre-token regex and BPE word by word. 's' is valid UTF-8. */
static int encode_plain(enc *e, const char *s, size_t len) {
  /* Cleanup and CJK spacing; a code point grows by at most two spaces. */
  if (grow((void **)&e->buf, &e->cap_buf, len * 3 + 1, 1)) return LUNA_ENOMEM;
  size_t nb = 0;
  for (size_t i = 0; i < len;) {
    utf8proc_int32_t cp;
    utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(len - i), &cp);
    LUNA_ASSERT(k > 0); /* validated by the caller */
    i += (size_t)k;
    utf8proc_category_t cat = utf8proc_category(cp);
    if (cp == ' ' || cp == '\t' || cp == '\n' || cp == '\r' || cat == UTF8PROC_CATEGORY_ZS) {
      e->buf[nb++] = ' ';
      continue;
    }
    if (cp == 0 || cp == 0xFFFD) continue;
    if (cat == UTF8PROC_CATEGORY_CN || cat == UTF8PROC_CATEGORY_CC || cat == UTF8PROC_CATEGORY_CF ||
        cat == UTF8PROC_CATEGORY_CS || cat == UTF8PROC_CATEGORY_CO)
      continue;
    int cjk = is_cjk(cp);
    if (cjk) e->buf[nb++] = ' ';
    nb += (size_t)utf8proc_encode_char(cp, (utf8proc_uint8_t *)e->buf + nb);
    if (cjk) e->buf[nb++] = ' ';
  }
  if (nb == 0) return 0;

  utf8proc_uint8_t *nfc = NULL;
  utf8proc_ssize_t nn = utf8proc_map((const utf8proc_uint8_t *)e->buf, (utf8proc_ssize_t)nb, &nfc,
                                     UTF8PROC_STABLE | UTF8PROC_COMPOSE);
  if (nn < 0) return LUNA_ENOMEM; /* the input is valid, so only memory can fail */
  int rc = grow((void **)&e->cps, &e->cap_cps, (size_t)nn + 1, sizeof *e->cps);
  size_t n = 0;
  for (utf8proc_ssize_t i = 0; !rc && i < nn;) {
    utf8proc_int32_t cp;
    utf8proc_ssize_t k = utf8proc_iterate(nfc + i, nn - i, &cp);
    if (k <= 0) rc = LUNA_EINTERNAL;
    else i += k, e->cps[n++] = cp;
  }
  free(nfc);
  if (rc) return rc;

  /* Words: runs between Python whitespace (after the cleanup only ' ', U+2028 and
  ** U+2029 can be left, and str.split() splits on all three). */
  for (size_t i = 0; i < n;) {
    if (tok_py_isspace(e->cps[i])) {
      i++;
      continue;
    }
    size_t j = i;
    while (j < n && !tok_py_isspace(e->cps[j])) j++;
    size_t m;
    if ((rc = lower_word(e, e->cps + i, j - i, &m))) return rc;
    if ((rc = pretokenize(e, e->low, m))) return rc;
    i = j;
  }
  return 0;
}

/* Hugging Face's tokenize(): exact special-token strings first, the rest as plain text. */
static int encode_text(enc *e, const char *s, size_t len) {
  size_t start = 0;
  for (size_t i = 0; i < len;) {
    int32_t id = -1;
    size_t k = 0;
    if (s[i] == '<') {
      if (len - i >= sizeof SOT - 1 && !memcmp(s + i, SOT, sizeof SOT - 1)) id = TOK_BOS, k = sizeof SOT - 1;
      else if (len - i >= sizeof EOT - 1 && !memcmp(s + i, EOT, sizeof EOT - 1)) id = TOK_EOS, k = sizeof EOT - 1;
    }
    if (id < 0) {
      i++;
      continue;
    }
    int rc = encode_plain(e, s + start, i - start);
    if (!rc) rc = push_id(e, id);
    if (rc) return rc;
    i += k;
    start = i;
  }
  return encode_plain(e, s + start, len - start);
}

static int check_utf8(const char *s, size_t len, char *err) {
  for (size_t i = 0; i < len;) {
    utf8proc_int32_t cp;
    utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(len - i), &cp);
    if (k <= 0) return luna_fail(err, LUNA_EUTF8, "invalid UTF-8 in the prompt at byte %zu", i);
    i += (size_t)k;
  }
  return 0;
}

int tok_encode_text(const tok_vocab *v, const char *text, size_t len, int32_t **ids, size_t *n, char *err) {
  *ids = NULL;
  *n = 0;
  if (!v || (!text && len)) return luna_fail(err, LUNA_EINVAL, "tok_encode_text: no vocabulary or text");
  int rc = check_utf8(text, len, err);
  if (rc) return rc;
  enc e = {.v = v};
  rc = len ? encode_text(&e, text, len) : 0;
  if (rc) {
    enc_free(&e);
    return luna_fail(err, rc, "tokenizing the prompt: %s", luna_strerror(rc));
  }
  *ids = e.ids;
  *n = e.n_ids;
  e.ids = NULL;
  enc_free(&e);
  return 0;
}

/* ---- chunks ---- */

typedef struct chunker {
  tok_chunks *c;
  size_t cap;   /* chunks allocated */
  int len;      /* tokens in the current (last) chunk */
  int32_t pad;
} chunker;

static int chunk_start(chunker *k) {
  tok_chunks *c = k->c;
  if ((size_t)c->n_chunks == k->cap) {
    if (k->cap >= (size_t)INT_MAX / TOK_CHUNK / 2) return LUNA_ENOMEM;
    size_t cap = k->cap ? k->cap * 2 : 4;
    int32_t *ids = realloc(c->ids, cap * TOK_CHUNK * sizeof *ids);
    if (!ids) return LUNA_ENOMEM;
    c->ids = ids;
    double *w = realloc(c->weights, cap * TOK_CHUNK * sizeof *w);
    if (!w) return LUNA_ENOMEM;
    c->weights = w;
    k->cap = cap;
  }
  c->n_chunks++;
  size_t at = (size_t)(c->n_chunks - 1) * TOK_CHUNK;
  c->ids[at] = TOK_BOS;
  c->weights[at] = 1.0;
  k->len = 1;
  return 0;
}

static void chunk_put(chunker *k, int32_t id, double w) {
  LUNA_ASSERT(k->len < TOK_CHUNK);
  size_t at = (size_t)(k->c->n_chunks - 1) * TOK_CHUNK + (size_t)k->len++;
  k->c->ids[at] = id;
  k->c->weights[at] = w;
}

/* One piece's tokens. A piece of 8 tokens or more may be cut at a chunk boundary; a
** shorter one that does not fit moves whole to the next chunk, the rest of the current
** one being padded. */
static int chunk_add_group(chunker *k, const int32_t *ids, size_t n, double w) {
  int large = n >= 8;
  while (n > 0) {
    if (n + (size_t)k->len > TOK_CHUNK - 1) {
      size_t room = (size_t)(TOK_CHUNK - 1 - k->len);
      if (large) {
        for (size_t i = 0; i < room; i++) chunk_put(k, ids[i], w);
        ids += room;
        n -= room;
        chunk_put(k, TOK_EOS, 1.0);
      } else {
        chunk_put(k, TOK_EOS, 1.0);
        for (size_t i = 0; i < room; i++) chunk_put(k, k->pad, 1.0);
      }
      int rc = chunk_start(k);
      if (rc) return rc;
    } else {
      for (size_t i = 0; i < n; i++) chunk_put(k, ids[i], w);
      n = 0;
    }
  }
  return 0;
}

static void chunk_finish(chunker *k) {
  chunk_put(k, TOK_EOS, 1.0);
  while (k->len < TOK_CHUNK) chunk_put(k, k->pad, 1.0);
}

/* Encodes 'len' bytes of segment text 's' cut before each " embedding:" and
** "\nembedding:" (the separator's first character dropped; empty pieces skipped), each
** piece a group of its own. */
static int add_segment(enc *e, chunker *k, const char *s, size_t len, double w) {
  static const char mark[] = "embedding:";
  const size_t mk = sizeof mark - 1;
  size_t start = 0;
  for (size_t i = 0; i <= len;) {
    int cut = i == len;
    if (!cut && (s[i] == ' ' || s[i] == '\n') && len - i - 1 >= mk && !memcmp(s + i + 1, mark, mk)) cut = 1;
    if (!cut) {
      i++;
      continue;
    }
    if (i > start) {
      e->n_ids = 0;
      int rc = encode_text(e, s + start, i - start);
      if (!rc) rc = chunk_add_group(k, e->ids, e->n_ids, w);
      if (rc) return rc;
    }
    if (i == len) break;
    start = i + 1;
    i += 1 + mk;
  }
  return 0;
}

int tok_tokenize(const tok_vocab *v, const char *text, int32_t pad_token, tok_chunks *out, char *err) {
  memset(out, 0, sizeof *out);
  if (!v || !text) return luna_fail(err, LUNA_EINVAL, "tok_tokenize: no vocabulary or text");
  if (pad_token < 0 || pad_token >= TOK_VOCAB)
    return luna_fail(err, LUNA_EINVAL, "tok_tokenize: pad token %d out of range", pad_token);
  size_t len = strlen(text);
  int rc = check_utf8(text, len, err);
  if (rc) return rc;

  char *esc = NULL, *piece = NULL;
  size_t esc_len = 0, n_segs = 0;
  tok_segment *segs = NULL;
  enc e = {.v = v};
  chunker k = {.c = out, .pad = pad_token};
  if ((rc = tok_escape(text, len, &esc, &esc_len))) goto fail;
  if ((rc = tok_weight_segments(esc, esc_len, &segs, &n_segs, err))) goto fail_quiet;
  if (!(piece = malloc(esc_len + 1))) {
    rc = LUNA_ENOMEM;
    goto fail;
  }
  if ((rc = chunk_start(&k))) goto fail;
  for (size_t i = 0; i < n_segs; i++) {
    memcpy(piece, esc + segs[i].off, segs[i].len);
    size_t n = tok_unescape(piece, segs[i].len);
    if ((rc = add_segment(&e, &k, piece, n, segs[i].weight))) goto fail;
  }
  chunk_finish(&k);
  free(esc);
  free(piece);
  free(segs);
  enc_free(&e);
  return 0;
fail:
  luna_fail(err, rc, "tokenizing the prompt: %s", luna_strerror(rc));
fail_quiet:
  free(esc);
  free(piece);
  free(segs);
  enc_free(&e);
  tok_chunks_free(out);
  return rc;
}

void tok_chunks_free(tok_chunks *c) {
  if (!c) return;
  free(c->ids);
  free(c->weights);
  memset(c, 0, sizeof *c);
}
