/* test-safetensors.c -- the safetensors reader's validation and the writer's round trip */
/* SPDX-License-Identifier: MIT */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/fp16.h"
#include "core/safetensors.h"
#include "core/status.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Build a file image: 8-byte length, 'header', then 'data_len' bytes of data. */
static uint8_t *image(const char *header, size_t data_len, size_t *len) {
  size_t h = strlen(header);
  *len = 8 + h + data_len;
  uint8_t *b = calloc(1, *len);
  for (int i = 0; i < 8; i++) b[i] = (uint8_t)((uint64_t)h >> (8 * i));
  memcpy(b + 8, header, h);
  for (size_t i = 0; i < data_len; i++) b[8 + h + i] = (uint8_t)i;
  return b;
}

/* Parse 'header' + data and expect status 'want' with 'needle' in the message. */
static void expect(const char *header, size_t data_len, int want, const char *needle) {
  size_t len;
  uint8_t *b = image(header, data_len, &len);
  st_file *f = NULL;
  char err[LUNA_ERR_LEN] = "";
  int rc = st_parse(b, len, "x.safetensors", &f, err);
  if (rc != want || (needle && !strstr(err, needle)))
    fail_msg("header %s: got %d '%s', want %d with '%s'", header, rc, err, want, needle ? needle : "");
  if (!rc) assert_non_null(f);
  else assert_null(f);
  if (rc) assert_non_null(strstr(err, "x.safetensors"));
  st_close(f);
  free(b);
}

static void test_valid_minimal(void **state) {
  (void)state;
  expect("{}", 0, 0, NULL);
  expect("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}  ", 8, 0, NULL);
  expect("{\"s\":{\"dtype\":\"F16\",\"shape\":[],\"data_offsets\":[0,2]},"
         "\"e\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[2,2]}}", 2, 0, NULL);
}

static void test_lengths(void **state) {
  (void)state;
  uint8_t short_file[5] = {0};
  st_file *f;
  char err[LUNA_ERR_LEN];
  assert_int_equal(st_parse(short_file, 5, "x.safetensors", &f, err), LUNA_EFORMAT);
  /* header length larger than the file */
  size_t len;
  uint8_t *b = image("{}", 0, &len);
  b[0] = 200;
  assert_int_equal(st_parse(b, len, "x.safetensors", &f, err), LUNA_EFORMAT);
  assert_non_null(strstr(err, "past the end"));
  /* header length over the 100 MB limit */
  memset(b, 0, 8);
  b[3] = 0x10; /* 268 MB */
  assert_int_equal(st_parse(b, len, "x.safetensors", &f, err), LUNA_EFORMAT);
  assert_non_null(strstr(err, "limit"));
  free(b);
}

static void test_offsets(void **state) {
  (void)state;
  /* data past the end (truncated) */
  expect("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8, LUNA_EFORMAT, "'a'");
  /* gap at the start */
  expect("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, LUNA_EFORMAT, "'a'");
  /* overlap */
  expect("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, LUNA_EFORMAT, "'b'");
  /* unused trailing bytes */
  expect("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8, LUNA_EFORMAT, "cover 4");
  /* size does not match shape x dtype */
  expect("{\"a\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, LUNA_EFORMAT, "need 6");
  /* end before begin */
  expect("{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,0]}}", 4, LUNA_EFORMAT, "before begin");
  /* shape product overflows */
  expect("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,8]}}", 8,
         LUNA_EFORMAT, "overflow");
}

static void test_fields(void **state) {
  (void)state;
  expect("{\"a\":{\"dtype\":\"Q4\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, LUNA_EDTYPE, "Q4");
  expect("{\"a\":{\"shape\":[1],\"data_offsets\":[0,1]}}", 1, LUNA_EFORMAT, "dtype");
  expect("{\"a\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,1]}}", 1, LUNA_EFORMAT, "shape[0]");
  expect("{\"a\":{\"dtype\":\"U8\",\"shape\":[1.5],\"data_offsets\":[0,1]}}", 1, LUNA_EFORMAT, "shape[0]");
  expect("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0]}}", 1, LUNA_EFORMAT, "data_offsets");
  expect("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":1}}", 1, LUNA_EFORMAT, "'x'");
  expect("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
         "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}", 2, LUNA_EFORMAT, "duplicated");
  expect("{\"__metadata__\":{\"k\":1}}", 0, LUNA_EFORMAT, "__metadata__");
  expect("[1,2]", 0, LUNA_EFORMAT, "not a JSON object");
  expect("{\"a\":", 0, LUNA_EFORMAT, "not valid JSON");
  expect("{} x", 0, LUNA_EFORMAT, "trailing");
  expect("{\"\xff\":1}", 0, LUNA_EFORMAT, "UTF-8");
  expect("{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1,
         LUNA_EFORMAT, "dimensions");
}

static void test_round_trip(void **state) {
  (void)state;
  char path[] = "/tmp/luna-test-st-XXXXXX";
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  close(fd);
  float a[6] = {1, -2, 3.5f, 0, 1e-3f, 65504};
  uint16_t h[3] = {f32_to_fp16(0.5f), f32_to_fp16(-1.0f), f32_to_fp16(3.0f)};
  uint16_t bf[2] = {0x3f80, 0xc000}; /* 1.0, -2.0 */
  st_wtensor t[3] = {{"w.f32", ST_F32, 2, {2, 3}, a}, {"w.f16", ST_F16, 1, {3}, h},
                     {"w.bf16", ST_BF16, 1, {2}, bf}};
  const char *meta[] = {"format", "pt", "note", "round trip"};
  char err[LUNA_ERR_LEN];
  assert_int_equal(st_write(path, t, 3, meta, 2, err), 0);
  st_file *f;
  assert_int_equal(st_open(path, &f, err), 0);
  assert_int_equal(f->n_tensors, 3);
  assert_string_equal(st_meta(f, "note"), "round trip");
  assert_null(st_meta(f, "absent"));
  const st_tensor *x = st_find(f, "w.f32");
  assert_non_null(x);
  assert_int_equal(x->n_dims, 2);
  assert_int_equal(x->shape[1], 3);
  float got[6];
  assert_int_equal(st_read_f32(f, x, got, 6, err), 0);
  assert_memory_equal(got, a, sizeof a);
  assert_int_equal(st_read_f32(f, st_find(f, "w.f16"), got, 3, err), 0);
  assert_true(got[0] == 0.5f && got[1] == -1.0f && got[2] == 3.0f);
  assert_int_equal(st_read_f32(f, st_find(f, "w.bf16"), got, 2, err), 0);
  assert_true(got[0] == 1.0f && got[1] == -2.0f);
  assert_int_equal(st_read_f32(f, st_find(f, "w.bf16"), got, 3, err), LUNA_ESHAPE);
  assert_null(st_find(f, "nope"));
  st_close(f);
  unlink(path);
  /* a file that does not exist names itself */
  assert_int_equal(st_open("/nonexistent/luna.safetensors", &f, err), LUNA_EIO);
  assert_non_null(strstr(err, "/nonexistent/luna.safetensors"));
}

static void test_unreadable_dtype(void **state) {
  (void)state;
  size_t len;
  uint8_t *b = image("{\"i\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8, &len);
  st_file *f;
  char err[LUNA_ERR_LEN];
  assert_int_equal(st_parse(b, len, "x.safetensors", &f, err), 0);
  float v;
  assert_int_equal(st_read_f32(f, st_find(f, "i"), &v, 1, err), LUNA_EDTYPE);
  assert_non_null(strstr(err, "'i'"));
  assert_non_null(strstr(err, "I64"));
  st_close(f);
  free(b);
}

static void test_fp16_rounding(void **state) {
  (void)state;
  /* round to nearest even at the half-way point between two halves */
  assert_int_equal(f32_to_fp16(1.0f + 1.0f / 2048), 0x3c00);        /* tie -> even (1.0) */
  assert_int_equal(f32_to_fp16(1.0f + 3.0f / 2048), 0x3c02);        /* tie -> even (up) */
  assert_int_equal(f32_to_fp16(70000.0f), 0x7c00);                  /* overflow -> inf */
  assert_true(fp16_to_f32(0x0001) == 5.9604644775390625e-08f);      /* smallest subnormal */
  float src[11], back[11];
  uint16_t h[11];
  for (int i = 0; i < 11; i++) src[i] = (float)i * 0.1f - 0.5f;
  f32_to_fp16_row(src, h, 11);
  fp16_to_f32_row(h, back, 11);
  for (int i = 0; i < 11; i++) assert_true(back[i] == fp16_to_f32(f32_to_fp16(src[i])));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_valid_minimal), cmocka_unit_test(test_lengths),
      cmocka_unit_test(test_offsets),       cmocka_unit_test(test_fields),
      cmocka_unit_test(test_round_trip),    cmocka_unit_test(test_unreadable_dtype),
      cmocka_unit_test(test_fp16_rounding),
  };
  return cmocka_run_group_tests_name("safetensors", tests, NULL, NULL);
}
