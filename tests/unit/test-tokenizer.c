/* test-tokenizer.c -- unit tests of the CLIP tokenizer, prompt weights, chunks and token JSON */
/* SPDX-License-Identifier: MIT */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/status.h"
#include "text/tokenizer.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* Tests run from the repository root; the real vocabulary sits beside the checkout. */
#define VOCAB_DIR "../shared/clip-tokenizer"

#if defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SANITIZED 1
#endif
#endif
#ifndef SANITIZED
#define SANITIZED 0
#endif

static tok_vocab *vocab;

static int setup_vocab(void **state) {
  (void)state;
  char err[LUNA_ERR_LEN] = "";
  if (tok_vocab_load(VOCAB_DIR, &vocab, err)) {
    fprintf(stderr, "cannot load %s: %s\n", VOCAB_DIR, err);
    vocab = NULL;
  }
  return 0;
}

static int teardown_vocab(void **state) {
  (void)state;
  tok_vocab_free(vocab);
  vocab = NULL;
  return 0;
}

#define NEED_VOCAB()                                                                                          \
  do {                                                                                                        \
    if (!vocab) skip();                                                                                       \
  } while (0)

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* Encodes 'text' and compares with the 'n' ids that follow. */
static void expect_ids(const char *text, size_t len, size_t n, ...) {
  int32_t *ids;
  size_t got;
  char err[LUNA_ERR_LEN] = "";
  int rc = tok_encode_text(vocab, text, len, &ids, &got, err);
  if (rc) fail_msg("'%s': %s", text, err);
  va_list ap;
  va_start(ap, n);
  if (got != n) {
    fprintf(stderr, "'%s' gave %zu ids:", text, got);
    for (size_t i = 0; i < got; i++) fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, "\n");
  }
  assert_int_equal(got, n);
  for (size_t i = 0; i < n; i++) assert_int_equal(ids[i], va_arg(ap, int));
  va_end(ap);
  free(ids);
}

/* Asserts that two texts encode to the same ids. */
static void expect_same(const char *a, const char *b) {
  int32_t *x, *y;
  size_t nx, ny;
  assert_int_equal(tok_encode_text(vocab, a, strlen(a), &x, &nx, NULL), 0);
  assert_int_equal(tok_encode_text(vocab, b, strlen(b), &y, &ny, NULL), 0);
  if (nx != ny || memcmp(x, y, nx * sizeof *x)) fail_msg("'%s' and '%s' encode differently", a, b);
  free(x);
  free(y);
}

static void expect_differ(const char *a, const char *b) {
  int32_t *x, *y;
  size_t nx, ny;
  assert_int_equal(tok_encode_text(vocab, a, strlen(a), &x, &nx, NULL), 0);
  assert_int_equal(tok_encode_text(vocab, b, strlen(b), &y, &ny, NULL), 0);
  if (nx == ny && !memcmp(x, y, nx * sizeof *x)) fail_msg("'%s' and '%s' encode alike", a, b);
  free(x);
  free(y);
}

/* Every chunk: 77 long, BOS first, ids in range, specials and pads at weight 1. */
static void check_chunks(const tok_chunks *c, int32_t pad) {
  assert_true(c->n_chunks >= 1);
  for (int i = 0; i < c->n_chunks; i++) {
    const int32_t *id = c->ids + (size_t)i * TOK_CHUNK;
    const double *w = c->weights + (size_t)i * TOK_CHUNK;
    assert_int_equal(id[0], TOK_BOS);
    assert_true(w[0] == 1.0);
    int seen_eos = 0;
    for (int j = 0; j < TOK_CHUNK; j++) {
      assert_true(id[j] >= 0 && id[j] < TOK_VOCAB);
      if (seen_eos) {
        assert_int_equal(id[j], pad);
        assert_true(w[j] == 1.0);
      }
      if (j > 0 && id[j] == TOK_EOS && w[j] == 1.0 && !seen_eos) seen_eos = 1;
    }
    assert_true(seen_eos);
  }
}

/* ---- BPE and text cleanup ---- */

static void test_known_ids(void **state) {
  (void)state;
  NEED_VOCAB();
  expect_ids("a photo of a cat", 16, 5, 320, 1125, 539, 320, 2368);
  expect_ids("", 0, 0);
  expect_ids("   \t\n ", 6, 0);
  expect_ids("<|endoftext|>", 13, 1, TOK_EOS);
  expect_ids("a<|startoftext|>a", 17, 3, 320, TOK_BOS, 320);
  /* Numbers split into single digits. */
  expect_same("2024", "2 0 2 4");
}

static void test_cleanup_rules(void **state) {
  (void)state;
  NEED_VOCAB();
  /* Lower-casing, NFC, whitespace. */
  expect_same("A PHOTO Of A CAT", "a photo of a cat");
  expect_same("cafe\xcc\x81", "caf\xc3\xa9");          /* e + combining acute == é */
  expect_same("a\tb\r\nc", "a b c");
  expect_same("a\xe3\x80\x80" "b", "a b");              /* U+3000 is Zs */
  expect_same("a\xe2\x80\xa8" "b", "a b");              /* U+2028 splits words */
  expect_same("a\x0b" "b", "ab");                       /* \v is a control: dropped */
  expect_same("a\xe2\x80\x8b" "b", "ab");               /* U+200B (Cf) dropped */
  expect_same("a\xef\xbf\xbd" "b", "ab");               /* U+FFFD dropped */
  expect_same("a\xee\x80\x80" "b", "ab");               /* private use dropped */
  expect_same("\xe7\x8c\xab\xe7\x8c\xab", "\xe7\x8c\xab \xe7\x8c\xab"); /* CJK spaced out */
  /* An embedded NUL is dropped like any control. */
  int32_t *ids;
  size_t n;
  assert_int_equal(tok_encode_text(vocab, "ab\0cd", 5, &ids, &n, NULL), 0);
  int32_t *ref;
  size_t nr;
  assert_int_equal(tok_encode_text(vocab, "abcd", 4, &ref, &nr, NULL), 0);
  assert_int_equal(n, nr);
  assert_memory_equal(ids, ref, n * sizeof *ids);
  free(ids);
  free(ref);
}

static void test_python_lower(void **state) {
  (void)state;
  NEED_VOCAB();
  /* Final sigma: capital sigma after a cased letter and not before one. */
  expect_same("\xce\xa3\xce\x91\xce\xa3", "\xcf\x83\xce\xb1\xcf\x82");               /* ΣΑΣ -> σας */
  expect_same("\xce\xa3", "\xcf\x83");                                             /* lone Σ -> σ */
  expect_same("\xce\x91\xce\xa3.", "\xce\xb1\xcf\x82.");                           /* '.' is ignorable */
  expect_same("\xce\x91\xce\xa3.\xce\x91", "\xce\xb1\xcf\x83.\xce\xb1");           /* ...both ways */
  expect_same("\xce\x91\xce\xa3 \xce\x91", "\xce\xb1\xcf\x82 \xce\xb1");           /* words are apart */
  expect_differ("\xce\x91\xce\xa3", "\xce\xb1\xcf\x83");
  /* U+0130 lowers to "i" + U+0307. */
  expect_same("\xc4\xb0", "i\xcc\x87");
  expect_differ("\xc4\xb0", "i");
}

static void test_pretoken_quirks(void **state) {
  (void)state;
  NEED_VOCAB();
  /* The regex sees lower-cased text; contractions match only at a token start. */
  expect_same("IT'S", "it's");
  expect_differ("it's", "it s");
  /* A literal special only after the added-token split: "'" + EOS. */
  expect_ids("'<|endoftext|>", 14, 2, 262, TOK_EOS);
  /* Upper case reaches the regex lowered: here '!<|' is one run, no special token. */
  expect_ids("!<|ENDOFTEXT|>", 14, 7, 0, 27, 347, 40786, 4160, 91, 285);
  /* U+0345 is matched by no alternative of the regex (case-insensitive) and vanishes. */
  expect_same("a\xcd\x85" "b", "a b");
}

static void test_invalid_utf8(void **state) {
  (void)state;
  NEED_VOCAB();
  static const char *const bad[] = {"ab\xff", "abc\xc3", "\xc0\x80", "\xed\xa0\x80", "\xf4\x90\x80\x80"};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    int32_t *ids = (int32_t *)1;
    size_t n = 7;
    char err[LUNA_ERR_LEN] = "";
    assert_int_equal(tok_encode_text(vocab, bad[i], strlen(bad[i]), &ids, &n, err), LUNA_EUTF8);
    assert_null(ids);
    assert_int_equal(n, 0);
    assert_non_null(strstr(err, "UTF-8"));
    tok_chunks c;
    assert_int_equal(tok_tokenize(vocab, bad[i], TOK_PAD_L, &c, err), LUNA_EUTF8);
    assert_null(c.ids);
  }
  char err[LUNA_ERR_LEN] = "";
  tok_chunks c;
  assert_int_equal(tok_tokenize(vocab, "(ok:1.2) \xe2\x82", TOK_PAD_L, &c, err), LUNA_EUTF8);
  assert_non_null(strstr(err, "byte 9"));
}

static void test_long_word_is_fast(void **state) {
  (void)state;
  NEED_VOCAB();
  /* One pre-token of 200000 letters: the heap BPE keeps this near-linear. */
  size_t n = 200000;
  char *s = malloc(n + 1);
  for (size_t i = 0; i < n; i++) s[i] = "abcdefghij"[(i * 7 + i / 3) % 10];
  s[n] = '\0';
  int32_t *ids;
  size_t got;
  double t0 = now_ms();
  assert_int_equal(tok_encode_text(vocab, s, n, &ids, &got, NULL), 0);
  double ms = now_ms() - t0;
  assert_true(got > 0 && got < n);
  assert_true(ms < (SANITIZED ? 20000 : 2000));
  free(ids);
  free(s);
}

/* ---- prompt weights ---- */

static void test_pyfloat(void **state) {
  (void)state;
  static const struct {
    const char *s;
    int ok;
    double v;
  } cases[] = {
      {"1.3", 1, 1.3},       {" 1.5 ", 1, 1.5},     {"\t2\n", 1, 2},        {"1_0", 1, 10},
      {"1_000.000_1", 1, 1000.0001}, {"1e1_0", 1, 1e10}, {"+.5e-3", 1, 0.0005}, {"5.", 1, 5},
      {".25", 1, 0.25},      {"-0", 1, -0.0},       {"1e400", 1, INFINITY}, {"-1e-400", 1, -0.0},
      {"inf", 1, INFINITY},  {"-Infinity", 1, -INFINITY}, {"iNf", 1, INFINITY},
      {"\xef\xbc\x91.\xef\xbc\x95", 1, 1.5},  /* fullwidth digits */
      {"\xd9\xa1.\xd9\xa5", 1, 1.5},          /* Arabic-Indic digits */
      {"\xd9\xa1_\xd9\xa5", 1, 15},
      {"\xe3\x80\x80" "2\xc2\x85", 1, 2},     /* U+3000 and U+0085 are Python whitespace */
      {"", 0, 0},    {" ", 0, 0},    {"b", 0, 0},     {"1__0", 0, 0},  {"_1", 0, 0},   {"1_", 0, 0},
      {"1_.5", 0, 0}, {"1._5", 0, 0}, {"1e_10", 0, 0}, {"1e", 0, 0},    {"1e+", 0, 0},  {".", 0, 0},
      {"0x10", 0, 0}, {"1 .5", 0, 0}, {"++1", 0, 0},   {"infinit", 0, 0}, {"nan(1)", 0, 0},
      {"infinity_", 0, 0}, {"\x1c" "1", 0, 0}, {"\xc2\xbd", 0, 0}, {"\xc2\xb2", 0, 0}, {"1\x7f", 0, 0},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    double v = 12345;
    int rc = tok_parse_pyfloat(cases[i].s, strlen(cases[i].s), &v);
    if ((rc == 0) != cases[i].ok) fail_msg("'%s': parsed %s", cases[i].s, rc ? "as invalid" : "as valid");
    if (cases[i].ok && memcmp(&v, &cases[i].v, sizeof v)) fail_msg("'%s': %.17g, want %.17g", cases[i].s, v, cases[i].v);
  }
  double v;
  assert_int_equal(tok_parse_pyfloat("nan", 3, &v), 0);
  assert_true(isnan(v));
  assert_int_equal(tok_parse_pyfloat("-NaN", 4, &v), 0);
  assert_true(isnan(v));
  assert_int_equal(tok_parse_pyfloat("1\0", 2, &v), -1);
}

/* Segments of 'text' as "text@weight|..." for compact comparison. */
static void expect_segments(const char *text, const char *want) {
  char *esc;
  size_t n;
  assert_int_equal(tok_escape(text, strlen(text), &esc, &n), 0);
  tok_segment *segs;
  size_t ns;
  char err[LUNA_ERR_LEN] = "";
  assert_int_equal(tok_weight_segments(esc, n, &segs, &ns, err), 0);
  char got[1024] = "";
  size_t at = 0;
  for (size_t i = 0; i < ns; i++) {
    char piece[256];
    memcpy(piece, esc + segs[i].off, segs[i].len);
    size_t k = tok_unescape(piece, segs[i].len);
    piece[k] = '\0';
    at += (size_t)snprintf(got + at, sizeof got - at, "%s%s@%.17g", i ? "|" : "", piece, segs[i].weight);
  }
  if (strcmp(got, want)) fail_msg("'%s': got '%s', want '%s'", text, got, want);
  free(segs);
  free(esc);
}

static void test_weight_segments(void **state) {
  (void)state;
  expect_segments("a photo", "a photo@1");
  expect_segments("(a:1.3)", "a@1.3");
  expect_segments("((a))", "a@1.2100000000000002");
  expect_segments("(b (a:0.5) c)", "b @1.1000000000000001|a@0.5| c@1.1000000000000001");
  expect_segments("((a:1.5))", "a@1.5");
  expect_segments("(a:b)", "a:b@1.1000000000000001");
  expect_segments("(:1.5)", ":1.5@1.1000000000000001");
  expect_segments("(a:1:2)", "a:1@2");
  expect_segments("(a:1.5:b)", "a:1.5:b@1.1000000000000001");
  expect_segments("(a: 1.5 )", "a@1.5");
  expect_segments("a) (b", "a) (b@1");
  expect_segments("a)(b))(c)", "a)(b))(c)@1");
  expect_segments("(a(b:2)", "a@2|(b@2");
  expect_segments("(a", "(a@1");
  expect_segments("\\(x\\)", "(x)@1");
  expect_segments("(\\(x\\):1.2)", "(x)@1.2");
  expect_segments("(a\\):1.3)", "a)@1.3");
  expect_segments("()", "");
  expect_segments("", "");
  expect_segments("x (a:inf)", "x @1|a@inf");
}

static void test_deep_nesting(void **state) {
  (void)state;
  NEED_VOCAB();
  for (int depth = 900; depth <= 1100; depth += 200) {
    size_t n = (size_t)depth * 2 + 1;
    char *s = malloc(n + 1);
    memset(s, '(', (size_t)depth);
    s[depth] = 'a';
    memset(s + depth + 1, ')', (size_t)depth);
    s[n] = '\0';
    tok_chunks c;
    char err[LUNA_ERR_LEN] = "";
    int rc = tok_tokenize(vocab, s, TOK_PAD_L, &c, err);
    if (depth <= TOK_MAX_NESTING) {
      assert_int_equal(rc, 0);
      assert_int_equal(c.ids[1], 320);
      assert_true(c.weights[1] > 1e30); /* 1.1^900 */
    } else {
      assert_int_equal(rc, LUNA_EINVAL);
      assert_non_null(strstr(err, "deep"));
      assert_null(c.ids);
    }
    tok_chunks_free(&c);
    free(s);
  }
}

/* ---- chunks ---- */

/* "a a a ..." with 'n' words; each "a" is one token (320). */
static char *repeat_word(const char *w, int n, const char *tail) {
  size_t wl = strlen(w), tl = strlen(tail);
  char *s = malloc((size_t)n * (wl + 1) + tl + 1);
  size_t at = 0;
  for (int i = 0; i < n; i++) {
    memcpy(s + at, w, wl);
    at += wl;
    s[at++] = ' ';
  }
  memcpy(s + at, tail, tl + 1);
  return s;
}

static void test_chunk_layout(void **state) {
  (void)state;
  NEED_VOCAB();
  tok_chunks c;
  char err[LUNA_ERR_LEN] = "";

  /* Weighted and padded, for L and G. */
  assert_int_equal(tok_tokenize(vocab, "(a:1.3) b", TOK_PAD_G, &c, err), 0);
  assert_int_equal(c.n_chunks, 1);
  assert_int_equal(c.ids[1], 320);
  assert_true(c.weights[1] == 1.3);
  assert_int_equal(c.ids[2], 321);
  assert_true(c.weights[2] == 1.0);
  assert_int_equal(c.ids[3], TOK_EOS);
  assert_int_equal(c.ids[4], 0);
  assert_int_equal(c.ids[76], 0);
  check_chunks(&c, TOK_PAD_G);
  tok_chunks_free(&c);

  /* 75 tokens fit one chunk exactly. */
  char *s = repeat_word("a", 75, "");
  assert_int_equal(tok_tokenize(vocab, s, TOK_PAD_L, &c, err), 0);
  assert_int_equal(c.n_chunks, 1);
  assert_int_equal(c.ids[75], 320);
  assert_int_equal(c.ids[76], TOK_EOS);
  tok_chunks_free(&c);
  free(s);

  /* 76 tokens in one segment (large): 75 + EOS, then BOS + 1 + EOS + pads. */
  s = repeat_word("a", 76, "");
  assert_int_equal(tok_tokenize(vocab, s, TOK_PAD_L, &c, err), 0);
  assert_int_equal(c.n_chunks, 2);
  assert_int_equal(c.ids[76], TOK_EOS);
  assert_int_equal(c.ids[77], TOK_BOS);
  assert_int_equal(c.ids[78], 320);
  assert_int_equal(c.ids[79], TOK_EOS);
  check_chunks(&c, TOK_PAD_L);
  tok_chunks_free(&c);
  free(s);

  /* A short segment (3 tokens) that does not fit moves whole to the next chunk. */
  s = repeat_word("a", 74, "(b b b:1.2)");
  assert_int_equal(tok_tokenize(vocab, s, TOK_PAD_G, &c, err), 0);
  assert_int_equal(c.n_chunks, 2);
  assert_int_equal(c.ids[74], 320);
  assert_int_equal(c.ids[75], TOK_EOS);
  assert_int_equal(c.ids[76], 0);
  assert_int_equal(c.ids[77], TOK_BOS);
  for (int j = 78; j < 81; j++) {
    assert_int_equal(c.ids[j], 321);
    assert_true(c.weights[j] == 1.2);
  }
  assert_int_equal(c.ids[81], TOK_EOS);
  check_chunks(&c, TOK_PAD_G);
  tok_chunks_free(&c);
  free(s);

  /* A large segment (8 tokens) is cut at the boundary instead. */
  s = repeat_word("a", 74, "(b b b b b b b b:1.2)");
  assert_int_equal(tok_tokenize(vocab, s, TOK_PAD_L, &c, err), 0);
  assert_int_equal(c.n_chunks, 2);
  assert_int_equal(c.ids[75], 321);
  assert_int_equal(c.ids[76], TOK_EOS);
  for (int j = 78; j < 85; j++) assert_int_equal(c.ids[j], 321);
  assert_int_equal(c.ids[85], TOK_EOS);
  tok_chunks_free(&c);
  free(s);

  /* Empty prompt: BOS, EOS, pads. */
  assert_int_equal(tok_tokenize(vocab, "", TOK_PAD_L, &c, err), 0);
  assert_int_equal(c.n_chunks, 1);
  assert_int_equal(c.ids[0], TOK_BOS);
  assert_int_equal(c.ids[1], TOK_EOS);
  assert_int_equal(c.ids[2], TOK_EOS);
  tok_chunks_free(&c);

  /* " embedding:" starts a group of its own. */
  s = repeat_word("a", 70, "embedding:b b b b");
  assert_int_equal(tok_tokenize(vocab, s, TOK_PAD_L, &c, err), 0);
  assert_int_equal(c.n_chunks, 2);
  assert_int_equal(c.ids[71], TOK_EOS);
  tok_chunks_free(&c);
  free(s);

  tok_chunks_free(&c); /* freeing twice is harmless */
  tok_vocab_free(NULL);
}

static void test_speed_300_words(void **state) {
  (void)state;
  NEED_VOCAB();
  static const char *const words[] = {"masterpiece,", "best", "quality", "(detailed:1.2)", "portrait",
                                      "of", "a", "woman", "in", "a", "forest", "at", "sunset,",
                                      "cinematic", "lighting", "photorealistic", "bokeh", "8k"};
  char buf[8192];
  size_t at = 0;
  for (int i = 0; i < 300; i++) at += (size_t)snprintf(buf + at, sizeof buf - at, "%s ", words[i % 18]);
  tok_chunks c;
  double best = 1e9;
  for (int r = 0; r < 5; r++) {
    double t0 = now_ms();
    assert_int_equal(tok_tokenize(vocab, buf, TOK_PAD_L, &c, NULL), 0);
    double ms = now_ms() - t0;
    if (ms < best) best = ms;
    assert_true(c.n_chunks >= 3);
    tok_chunks_free(&c);
  }
  print_message("300-word prompt: %.3f ms\n", best);
  if (!SANITIZED) assert_true(best < 10.0);
}

/* Deterministic junk prompts made of the syntax's characters and a few multi-byte ones:
** no crash, and the chunk invariants hold. */
static void test_random_prompts(void **state) {
  (void)state;
  NEED_VOCAB();
  static const char *const atoms[] = {"(", ")", ":", "\\", "a", "b ", " ", "1.5", "1_0", "e", "inf", "nan",
                                      "<|endoftext|>", "\xce\xa3", "\xe7\x8c\xab", "'s", "\n", "embedding:",
                                      "\t", "\xc4\xb0", "\x01", "-", ".", "\xf0\x9f\x90\xb1"};
  uint64_t x = 88172645463325252ull;
  char buf[512];
  for (int it = 0; it < 3000; it++) {
    size_t at = 0;
    int n = (int)(x % 60);
    for (int k = 0; k < n; k++) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      const char *a = atoms[x % (sizeof atoms / sizeof *atoms)];
      size_t l = strlen(a);
      if (at + l >= sizeof buf) break;
      memcpy(buf + at, a, l);
      at += l;
    }
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    buf[at] = '\0';
    tok_chunks c;
    char err[LUNA_ERR_LEN] = "";
    int rc = tok_tokenize(vocab, buf, it % 2 ? TOK_PAD_G : TOK_PAD_L, &c, err);
    if (rc) fail_msg("'%s': %s", buf, err);
    for (int i = 0; i < c.n_chunks * TOK_CHUNK; i++) assert_true(c.ids[i] >= 0 && c.ids[i] < TOK_VOCAB);
    tok_chunks_free(&c);
  }
}

typedef struct thread_arg {
  const char *text;
  tok_chunks want;
  int ok;
} thread_arg;

static void *tokenize_thread(void *p) {
  thread_arg *a = p;
  a->ok = 1;
  for (int r = 0; r < 50; r++) {
    tok_chunks c;
    if (tok_tokenize(vocab, a->text, TOK_PAD_L, &c, NULL) || c.n_chunks != a->want.n_chunks ||
        memcmp(c.ids, a->want.ids, (size_t)c.n_chunks * TOK_CHUNK * sizeof *c.ids))
      a->ok = 0;
    tok_chunks_free(&c);
  }
  return NULL;
}

static void test_threads_share_vocab(void **state) {
  (void)state;
  NEED_VOCAB();
  static const char *const texts[] = {"a (red:1.2) car on a street", "\xce\xa3\xce\x91\xce\xa3 cafe\xcc\x81",
                                      "((very)) long prompt with many words to keep it busy",
                                      "\xe4\xb8\x80\xe5\x8f\xaa\xe7\x8c\xab <|endoftext|>"};
  pthread_t th[4];
  thread_arg args[4];
  for (int i = 0; i < 4; i++) {
    args[i].text = texts[i];
    assert_int_equal(tok_tokenize(vocab, texts[i], TOK_PAD_L, &args[i].want, NULL), 0);
    assert_int_equal(pthread_create(&th[i], NULL, tokenize_thread, &args[i]), 0);
  }
  for (int i = 0; i < 4; i++) {
    pthread_join(th[i], NULL);
    assert_true(args[i].ok);
    tok_chunks_free(&args[i].want);
  }
}

/* ---- token JSON ---- */

static char *chunk_json(int n_pairs, const char *pair) {
  size_t pl = strlen(pair);
  char *s = malloc((size_t)n_pairs * (pl + 2) + 32);
  size_t at = (size_t)sprintf(s, "{\"l\": [[");
  for (int i = 0; i < n_pairs; i++) at += (size_t)sprintf(s + at, "%s%s", i ? ", " : "", pair);
  sprintf(s + at, "]]}");
  return s;
}

static void expect_json_error(const char *json, int status, const char *needle) {
  tok_chunks c;
  char err[LUNA_ERR_LEN] = "";
  int rc = tok_json_parse(json, strlen(json), "l", &c, err);
  if (rc != status) fail_msg("status %d, want %d (%s)", rc, status, err);
  if (needle && !strstr(err, needle)) fail_msg("message '%s' lacks '%s'", err, needle);
  assert_null(c.ids);
  assert_int_equal(c.n_chunks, 0);
}

static void test_json_roundtrip(void **state) {
  (void)state;
  NEED_VOCAB();
  tok_chunks l, g;
  assert_int_equal(tok_tokenize(vocab, "(a:1.3) ((b)) c", TOK_PAD_L, &l, NULL), 0);
  assert_int_equal(tok_tokenize(vocab, "(a:1.3) ((b)) c", TOK_PAD_G, &g, NULL), 0);
  char *json;
  assert_int_equal(tok_json_write(&l, &g, &json, NULL), 0);
  assert_non_null(strstr(json, "[320, 1.3]"));
  assert_non_null(strstr(json, "[321, 1.2100000000000002]"));
  assert_non_null(strstr(json, "[49406, 1.0]"));
  tok_chunks l2, g2;
  assert_int_equal(tok_json_parse(json, strlen(json), "l", &l2, NULL), 0);
  assert_int_equal(tok_json_parse(json, strlen(json), "g", &g2, NULL), 0);
  assert_int_equal(l2.n_chunks, l.n_chunks);
  assert_memory_equal(l2.ids, l.ids, TOK_CHUNK * sizeof *l.ids);
  assert_memory_equal(l2.weights, l.weights, TOK_CHUNK * sizeof *l.weights);
  assert_memory_equal(g2.ids, g.ids, TOK_CHUNK * sizeof *g.ids);
  free(json);
  assert_int_equal(tok_json_write(&l, NULL, &json, NULL), 0);
  assert_null(strstr(json, "\"g\""));
  char err[LUNA_ERR_LEN] = "stale";
  tok_chunks none;
  assert_int_equal(tok_json_parse(json, strlen(json), "g", &none, err), LUNA_EMISSING);
  assert_string_equal(err, "");
  free(json);
  tok_chunks_free(&l);
  tok_chunks_free(&g);
  tok_chunks_free(&l2);
  tok_chunks_free(&g2);
}

static void test_json_errors(void **state) {
  (void)state;
  char *s = chunk_json(77, "[1, 1.0, 5]"); /* a word id is allowed */
  tok_chunks c;
  assert_int_equal(tok_json_parse(s, strlen(s), "l", &c, NULL), 0);
  assert_int_equal(c.n_chunks, 1);
  tok_chunks_free(&c);
  free(s);

  s = chunk_json(76, "[1, 1.0]");
  expect_json_error(s, LUNA_ETOKENS, "\"l\" chunk 0: 76 pairs");
  free(s);
  s = chunk_json(77, "[49408, 1.0]");
  expect_json_error(s, LUNA_ETOKENS, "\"l\" chunk 0 position 0");
  free(s);
  s = chunk_json(77, "[-1, 1.0]");
  expect_json_error(s, LUNA_ETOKENS, "token id");
  free(s);
  s = chunk_json(77, "[1.5, 1.0]");
  expect_json_error(s, LUNA_ETOKENS, "token id");
  free(s);
  s = chunk_json(77, "[1, 1e400]");
  expect_json_error(s, LUNA_ETOKENS, "finite");
  free(s);
  s = chunk_json(77, "[1, \"1.0\"]");
  expect_json_error(s, LUNA_ETOKENS, "weight");
  free(s);
  s = chunk_json(77, "[1]");
  expect_json_error(s, LUNA_ETOKENS, "[id, weight]");
  free(s);
  s = chunk_json(77, "[1, 1.0, 2, 3]");
  expect_json_error(s, LUNA_ETOKENS, "[id, weight]");
  free(s);
  expect_json_error("{\"l\": []}", LUNA_ETOKENS, "\"l\"");
  expect_json_error("{\"l\": {}}", LUNA_ETOKENS, "\"l\"");
  expect_json_error("{\"l\": [5]}", LUNA_ETOKENS, "chunk 0");
  expect_json_error("[1, 2]", LUNA_ETOKENS, "object");
  expect_json_error("{\"l\": [[", LUNA_EJSON, "line 1");
  expect_json_error("{\n\"l\": NaN}", LUNA_EJSON, "line 2");
  expect_json_error("", LUNA_EJSON, NULL);
  expect_json_error("{}", LUNA_EMISSING, NULL);

  char err[LUNA_ERR_LEN] = "";
  assert_int_equal(tok_json_parse_file("build/no/such/tokens.json", "l", &c, err), LUNA_EIO);
  assert_non_null(strstr(err, "tokens.json"));
}

/* ---- vocabulary files ---- */

static int32_t byte_cp(int b) {
  if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) return b;
  int n = 0;
  for (int x = 0; x < b; x++)
    if (!((x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF))) n++;
  return 256 + n;
}

/* Writes the JSON string of code point 'cp' (plus 'suffix') to 'f'. */
static void put_symbol(FILE *f, int32_t cp, const char *suffix) {
  if (cp == '"' || cp == '\\') fprintf(f, "\"\\%c%s\"", (char)cp, suffix);
  else if (cp < 0x80) fprintf(f, "\"%c%s\"", (char)cp, suffix);
  else fprintf(f, "\"\\u%04x%s\"", (unsigned)cp, suffix);
}

/* A small tokenizer folder: the 512 byte symbols, "ab", "ab</w>" and the specials;
** 'extra' is spliced into vocab.json (after line 2), 'merges' is merges.txt. */
static void write_folder(const char *dir, const char *extra, const char *merges) {
  char path[512];
  snprintf(path, sizeof path, "%s/vocab.json", dir);
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  fprintf(f, "{\n\"ab\": 600,\n%s\"ab</w>\": 601,\n", extra);
  for (int b = 0; b < 256; b++) {
    put_symbol(f, byte_cp(b), "");
    fprintf(f, ": %d,\n", b);
    put_symbol(f, byte_cp(b), "</w>");
    fprintf(f, ": %d,\n", 256 + b);
  }
  fprintf(f, "\"<|startoftext|>\": 49406,\n\"<|endoftext|>\": 49407\n}\n");
  fclose(f);
  snprintf(path, sizeof path, "%s/merges.txt", dir);
  f = fopen(path, "w");
  assert_non_null(f);
  fputs(merges, f);
  fclose(f);
}

static void expect_load_error(const char *dir, const char *needle) {
  tok_vocab *v = (tok_vocab *)1;
  char err[LUNA_ERR_LEN] = "";
  int rc = tok_vocab_load(dir, &v, err);
  if (rc == 0) fail_msg("loaded; expected an error with '%s'", needle);
  assert_null(v);
  if (!strstr(err, needle)) fail_msg("message '%s' lacks '%s'", err, needle);
}

static void test_vocab_files(void **state) {
  (void)state;
  const char *tmp = getenv("TMPDIR");
  char dir[512];
  snprintf(dir, sizeof dir, "%s/luna-tok-XXXXXX", tmp && *tmp ? tmp : "/tmp");
  assert_non_null(mkdtemp(dir));

  /* A good small folder loads and merges "a" "b</w>" into "ab</w>". */
  write_folder(dir, "", "#version: 0.2\na b</w>\na b\n");
  tok_vocab *v;
  char err[LUNA_ERR_LEN] = "";
  if (tok_vocab_load(dir, &v, err)) fail_msg("%s", err);
  int32_t *ids;
  size_t n;
  assert_int_equal(tok_encode_text(v, "ab abc", 6, &ids, &n, NULL), 0);
  assert_int_equal(n, 3);
  assert_int_equal(ids[0], 601);
  assert_int_equal(ids[1], 600);
  assert_int_equal(ids[2], 256 + 'c');
  free(ids);
  tok_vocab_free(v);

  write_folder(dir, "", "#version: 0.2\na b</w>\na b c\n");
  expect_load_error(dir, "merges.txt:3: expected two symbols");
  write_folder(dir, "", "#version: 0.2\n\na x</w>\n");
  expect_load_error(dir, "merges.txt:3: the merged symbol 'ax</w>'");
  write_folder(dir, "", "#version: 0.2\na zz\n");
  expect_load_error(dir, "merges.txt:2: symbol 'zz'");
  write_folder(dir, "", "#version: 0.2\na b\na b\n");
  expect_load_error(dir, "merges.txt:3: the merge 'a b' appears twice");
  write_folder(dir, "", "#version: 0.2\n");
  expect_load_error(dir, "no merges");
  write_folder(dir, "\"bad\": 1.5,\n", "a b\n");
  expect_load_error(dir, "vocab.json:3: token 'bad'");
  write_folder(dir, "\"big\": 49408,\n", "a b\n");
  expect_load_error(dir, "vocab.json:3: token 'big'");
  write_folder(dir, "\"dup\": 600,\n", "a b\n");
  expect_load_error(dir, "vocab.json:3: id 600 is given to both 'ab' and 'dup'");
  write_folder(dir, "\"ab\": 700,\n", "a b\n");
  expect_load_error(dir, "vocab.json:3: token 'ab' appears twice");
  write_folder(dir, "\"x\": ,\n", "a b\n");
  expect_load_error(dir, "vocab.json:3:6: invalid JSON");

  char path[600];
  snprintf(path, sizeof path, "%s/vocab.json", dir);
  FILE *f = fopen(path, "w");
  fputs("{\"a\": 1}", f);
  fclose(f);
  expect_load_error(dir, "no entry for the symbol");
  f = fopen(path, "w");
  fputs("[1, 2]", f);
  fclose(f);
  expect_load_error(dir, "expected an object");

  remove(path);
  expect_load_error(dir, "vocab.json: cannot open");
  snprintf(path, sizeof path, "%s/merges.txt", dir);
  remove(path);
  rmdir(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_known_ids),
      cmocka_unit_test(test_cleanup_rules),
      cmocka_unit_test(test_python_lower),
      cmocka_unit_test(test_pretoken_quirks),
      cmocka_unit_test(test_invalid_utf8),
      cmocka_unit_test(test_long_word_is_fast),
      cmocka_unit_test(test_pyfloat),
      cmocka_unit_test(test_weight_segments),
      cmocka_unit_test(test_deep_nesting),
      cmocka_unit_test(test_chunk_layout),
      cmocka_unit_test(test_speed_300_words),
      cmocka_unit_test(test_random_prompts),
      cmocka_unit_test(test_threads_share_vocab),
      cmocka_unit_test(test_json_roundtrip),
      cmocka_unit_test(test_json_errors),
      cmocka_unit_test(test_vocab_files),
  };
  return cmocka_run_group_tests(tests, setup_vocab, teardown_vocab);
}
