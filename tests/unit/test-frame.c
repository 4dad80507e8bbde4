/* test-frame.c -- the frame codec: header checks, JSON part, tensors, built frames and error replies */
/* SPDX-License-Identifier: MIT */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/status.h"
#include "proto/frame.h"

#include <stdlib.h>
#include <string.h>

/* The worked example of docs/PROTOCOL.md: a ping with request id 7. */
static const uint8_t PING7[34] = {
    0x4c, 0x55, 0x4e, 0x41, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00,
    0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x7b, 0x7d};

static void header_bytes(uint8_t out[LUNA_FRAME_HEADER], uint32_t json_len, uint64_t bin_len) {
  frame_header h = {LUNA_PROTO_VERSION, LUNA_MSG_ENCODE, LUNA_FLAG_REPLY, json_len, 42, bin_len};
  frame_write_header(out, &h);
}

static void test_header_round_trip(void **state) {
  (void)state;
  frame_header h = {LUNA_PROTO_VERSION, 0xfffe, 0x80000003u, 123456, 0x0102030405060708ull, 99};
  uint8_t b[LUNA_FRAME_HEADER];
  frame_write_header(b, &h);
  assert_memory_equal(b, "LUNA", 4);
  frame_header g;
  char err[LUNA_ERR_LEN] = "";
  assert_int_equal(frame_parse_header(b, sizeof b, LUNA_DEFAULT_MAX_FRAME, &g, err), FRAME_OK);
  assert_int_equal(g.version, h.version);
  assert_int_equal(g.type, h.type);
  assert_int_equal(g.flags, h.flags);
  assert_int_equal(g.json_len, h.json_len);
  assert_true(g.request_id == h.request_id);
  assert_true(g.bin_len == h.bin_len);
  /* little-endian on the wire, byte by byte */
  assert_int_equal(b[16], 0x08);
  assert_int_equal(b[23], 0x01);

  /* the documented ping, built and parsed */
  uint8_t *f;
  size_t len;
  cJSON *empty = cJSON_CreateObject();
  assert_int_equal(frame_build(LUNA_MSG_PING, 0, 7, empty, NULL, 0, &f, &len, err), 0);
  cJSON_Delete(empty);
  assert_int_equal(len, sizeof PING7);
  assert_memory_equal(f, PING7, sizeof PING7);
  free(f);
  assert_int_equal(frame_build(LUNA_MSG_PING, 0, 7, NULL, NULL, 0, &f, &len, err), 0);
  assert_memory_equal(f, PING7, sizeof PING7);
  free(f);
}

static void test_header_errors(void **state) {
  (void)state;
  uint8_t b[LUNA_FRAME_HEADER];
  frame_header h;
  char err[LUNA_ERR_LEN] = "";

  header_bytes(b, 2, 0);
  b[3] = 'B';
  assert_int_equal(frame_parse_header(b, sizeof b, LUNA_DEFAULT_MAX_FRAME, &h, err), LUNA_EPROTO);
  assert_non_null(strstr(err, "magic"));

  header_bytes(b, 2, 0);
  b[4] = 2;
  assert_int_equal(frame_parse_header(b, sizeof b, LUNA_DEFAULT_MAX_FRAME, &h, err), LUNA_EVERSION);
  assert_non_null(strstr(err, "version 2"));
  header_bytes(b, 2, 0);
  b[5] = 1; /* version 257: the high byte counts too */
  assert_int_equal(frame_parse_header(b, sizeof b, LUNA_DEFAULT_MAX_FRAME, &h, err), LUNA_EVERSION);

  /* JSON part over its own limit, even when the frame limit is larger */
  header_bytes(b, LUNA_MAX_JSON + 1, 0);
  assert_int_equal(frame_parse_header(b, sizeof b, 1ull << 40, &h, err), LUNA_ETOOBIG);
  assert_non_null(strstr(err, "json_len"));
  header_bytes(b, LUNA_MAX_JSON, 0);
  assert_int_equal(frame_parse_header(b, sizeof b, 1ull << 40, &h, err), FRAME_OK);

  /* exactly the maximum is allowed, one more byte is not */
  header_bytes(b, 100, LUNA_DEFAULT_MAX_FRAME - LUNA_FRAME_HEADER - 100);
  assert_int_equal(frame_parse_header(b, sizeof b, LUNA_DEFAULT_MAX_FRAME, &h, err), FRAME_OK);
  header_bytes(b, 100, LUNA_DEFAULT_MAX_FRAME - LUNA_FRAME_HEADER - 99);
  assert_int_equal(frame_parse_header(b, sizeof b, LUNA_DEFAULT_MAX_FRAME, &h, err), LUNA_ETOOBIG);

  /* sizes that would wrap around a 64-bit sum */
  header_bytes(b, 100, UINT64_MAX);
  assert_int_equal(frame_parse_header(b, sizeof b, LUNA_DEFAULT_MAX_FRAME, &h, err), LUNA_ETOOBIG);
  header_bytes(b, 100, (1ull << 62) - 100);
  assert_int_equal(frame_parse_header(b, sizeof b, 1ull << 62, &h, err), LUNA_ETOOBIG);
  /* the fields are filled even when the header is refused */
  assert_int_equal(h.json_len, 100);
}

static void test_need_more(void **state) {
  (void)state;
  frame_header h;
  char err[LUNA_ERR_LEN] = "";
  for (size_t n = 0; n < LUNA_FRAME_HEADER; n++)
    assert_int_equal(frame_parse_header(PING7, n, LUNA_DEFAULT_MAX_FRAME, &h, err), FRAME_NEED_MORE);
  /* garbage is only judged once 32 bytes are there */
  uint8_t junk[LUNA_FRAME_HEADER];
  memset(junk, 0xee, sizeof junk);
  assert_int_equal(frame_parse_header(junk, 4, LUNA_DEFAULT_MAX_FRAME, &h, err), FRAME_NEED_MORE);
  assert_int_equal(frame_parse_header(junk, sizeof junk, LUNA_DEFAULT_MAX_FRAME, &h, err), LUNA_EPROTO);
  assert_int_equal(frame_parse_header(PING7, sizeof PING7, LUNA_DEFAULT_MAX_FRAME, &h, err), FRAME_OK);
}

/* Parse 'text' (its strlen, or 'len' when nonzero) and expect 'want'. */
static void expect_json(const char *text, size_t len, int want, const char *needle) {
  cJSON *v = (cJSON *)1;
  char err[LUNA_ERR_LEN] = "";
  int rc = frame_parse_json((const uint8_t *)text, len ? len : strlen(text), &v, err);
  if (rc != want || (needle && !strstr(err, needle)))
    fail_msg("JSON '%s': got %d '%s', want %d with '%s'", text, rc, err, want, needle ? needle : "");
  if (rc) assert_null(v);
  else assert_true(cJSON_IsObject(v));
  cJSON_Delete(v);
}

static void test_json_part(void **state) {
  (void)state;
  expect_json("{}", 0, 0, NULL);
  expect_json(" {\"a\": [1, 2], \"b\": \"\xc3\xa9\"}\r\n\t ", 0, 0, NULL);
  expect_json("{}", 1, LUNA_EJSON, "parse");            /* cut short */
  expect_json("", 0, LUNA_EJSON, "empty");
  expect_json("[1, 2]", 0, LUNA_EJSON, "not an object");
  expect_json("\"s\"", 0, LUNA_EJSON, "not an object");
  expect_json("{\"a\": 1} {}", 0, LUNA_EJSON, "trailing");
  expect_json("{\"a\": 1,}", 0, LUNA_EJSON, "parse");
  expect_json("{\"a\": \"\xff\"}", 0, LUNA_EJSON, "UTF-8");
  expect_json("{\"a\": \"\xed\xa0\x80\"}", 0, LUNA_EJSON, "UTF-8"); /* a surrogate */
  expect_json("{\"a\": \"\xc0\xaf\"}", 0, LUNA_EJSON, "UTF-8");     /* overlong */
  expect_json("{\"a\": 1}\0", 9, LUNA_EJSON, "NUL");
  expect_json("{\"a\": NaN}", 0, LUNA_EJSON, NULL);
  /* repeated keys: readers would disagree on which one counts */
  expect_json("{\"a\": 1, \"b\": 2, \"a\": 3}", 0, LUNA_EJSON, "'a' appears more than once");
  expect_json("{\"tensors\": {\"x\": {}, \"x\": {}}}", 0, LUNA_EJSON, "\"tensors\" key 'x'");
  expect_json("{\"tensors\": {}, \"c\": 1, \"tensors\": {}}", 0, LUNA_EJSON, "'tensors' appears");
}

/* Build a frame with two tensors, then take it apart as the daemon does. */
static void test_build_and_get_tensors(void **state) {
  (void)state;
  float a[6] = {1.5f, -2.0f, 3.25f, 0.0f, -0.0f, 1e-30f};
  uint16_t b[3] = {0x3c00, 0xc000, 0x7bff};
  frame_out_tensor ts[2] = {
      {"cond", ST_F32, 3, {1, 2, 3}, a},
      {"pooled", ST_F16, 2, {1, 3}, b},
  };
  cJSON *msg = cJSON_CreateObject();
  cJSON_AddStringToObject(msg, "family", "sdxl");
  cJSON_AddStringToObject(msg, "tensors", "replaced by frame_build");
  uint8_t *f;
  size_t len;
  char err[LUNA_ERR_LEN] = "";
  assert_int_equal(frame_build(LUNA_MSG_ENCODE, LUNA_FLAG_REPLY, 77, msg, ts, 2, &f, &len, err), 0);
  assert_string_equal(cJSON_GetObjectItem(msg, "tensors")->valuestring, "replaced by frame_build"); /* untouched */
  cJSON_Delete(msg);

  frame_header h;
  assert_int_equal(frame_parse_header(f, len, LUNA_DEFAULT_MAX_FRAME, &h, err), FRAME_OK);
  assert_int_equal(h.type, LUNA_MSG_ENCODE);
  assert_int_equal(h.flags, LUNA_FLAG_REPLY);
  assert_true(h.request_id == 77);
  assert_true(h.bin_len == sizeof a + sizeof b);
  assert_int_equal(len, LUNA_FRAME_HEADER + h.json_len + h.bin_len);
  cJSON *m;
  assert_int_equal(frame_parse_json(f + LUNA_FRAME_HEADER, h.json_len, &m, err), 0);
  assert_string_equal(cJSON_GetObjectItem(m, "family")->valuestring, "sdxl");
  const uint8_t *bin = f + LUNA_FRAME_HEADER + h.json_len;

  frame_tensor t;
  assert_int_equal(frame_get_tensor(m, "cond", bin, h.bin_len, &t, err), 0);
  assert_int_equal(t.dtype, ST_F32);
  assert_int_equal(t.n_dims, 3);
  assert_true(t.shape[0] == 1 && t.shape[1] == 2 && t.shape[2] == 3);
  assert_true(t.nbytes == sizeof a);
  assert_ptr_equal(t.data, bin);
  assert_memory_equal(t.data, a, sizeof a);
  assert_int_equal(frame_get_tensor(m, "pooled", bin, h.bin_len, &t, err), 0);
  assert_int_equal(t.dtype, ST_F16);
  assert_ptr_equal(t.data, bin + sizeof a);
  assert_memory_equal(t.data, b, sizeof b);
  err[0] = 0;
  assert_int_equal(frame_get_tensor(m, "nope", bin, h.bin_len, &t, err), LUNA_EMISSING);
  assert_string_equal(err, ""); /* absent is not an error message: the caller decides */
  /* a binary part cut short puts the second tensor out of bounds */
  assert_int_equal(frame_get_tensor(m, "pooled", bin, h.bin_len - 1, &t, err), LUNA_EPROTO);
  assert_non_null(strstr(err, "'pooled'"));
  cJSON_Delete(m);
  free(f);
}

/* frame_get_tensor on a hand-written description against a 16-byte binary part. */
static void expect_tensor(const char *json, int want, const char *needle) {
  uint8_t bin[16] = {0};
  cJSON *m = cJSON_Parse(json);
  assert_non_null(m);
  frame_tensor t;
  char err[LUNA_ERR_LEN] = "";
  int rc = frame_get_tensor(m, "x", bin, sizeof bin, &t, err);
  if (rc != want || (needle && !strstr(err, needle)))
    fail_msg("%s: got %d '%s', want %d with '%s'", json, rc, err, want, needle ? needle : "");
  cJSON_Delete(m);
}

static void test_tensor_errors(void **state) {
  (void)state;
  expect_tensor("{\"tensors\": {\"x\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}}", 0, NULL);
  expect_tensor("{\"tensors\": {\"x\": {\"dtype\": \"U8\", \"shape\": [0], \"data_offsets\": [16, 16]}}}", 0, NULL);
  /* out of bounds */
  expect_tensor("{\"tensors\": {\"x\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [4, 20]}}}",
                LUNA_EPROTO, "past the 16-byte binary part");
  expect_tensor("{\"tensors\": {\"x\": {\"dtype\": \"U8\", \"shape\": [0], \"data_offsets\": [17, 17]}}}",
                LUNA_EPROTO, NULL);
  /* bad dtype */
  expect_tensor("{\"tensors\": {\"x\": {\"dtype\": \"F24\", \"shape\": [4], \"data_offsets\": [0, 12]}}}",
                LUNA_EDTYPE, "F24");
  expect_tensor("{\"tensors\": {\"x\": {\"dtype\": 5, \"shape\": [4], \"data_offsets\": [0, 16]}}}",
                LUNA_EFORMAT, "dtype");
  /* size mismatch, reversed range, overflowing shape, bad fields */
  expect_tensor("{\"tensors\": {\"x\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 16]}}}",
                LUNA_EFORMAT, "need 12");
  expect_tensor("{\"tensors\": {\"x\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 4]}}}",
                LUNA_EFORMAT, "before begin");
  expect_tensor("{\"tensors\": {\"x\": {\"dtype\": \"F64\", \"shape\": [4294967296, 4294967296],"
                " \"data_offsets\": [0, 16]}}}", LUNA_EFORMAT, "overflow");
  expect_tensor("{\"tensors\": {\"x\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 16]}}}",
                LUNA_EFORMAT, "shape[0]");
  expect_tensor("{\"tensors\": {\"x\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0]}}}",
                LUNA_EFORMAT, "data_offsets");
  expect_tensor("{\"tensors\": {\"x\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16], \"y\": 1}}}",
                LUNA_EFORMAT, "'y'");
  expect_tensor("{\"tensors\": {\"x\": [1]}}", LUNA_EFORMAT, "not a JSON object");
  /* nothing to find */
  expect_tensor("{\"tensors\": {}}", LUNA_EMISSING, NULL);
  expect_tensor("{\"tensors\": [1]}", LUNA_EMISSING, NULL);
  expect_tensor("{}", LUNA_EMISSING, NULL);
}

static void test_error_frame(void **state) {
  (void)state;
  uint8_t *f;
  size_t len;
  assert_int_equal(frame_build_error(LUNA_MSG_ENCODE, 9, LUNA_ENOTFOUND, "model 'a.safetensors' not found", &f, &len), 0);
  frame_header h;
  char err[LUNA_ERR_LEN] = "";
  assert_int_equal(frame_parse_header(f, len, LUNA_DEFAULT_MAX_FRAME, &h, err), FRAME_OK);
  assert_int_equal(h.flags, LUNA_FLAG_REPLY | LUNA_FLAG_ERROR);
  assert_int_equal(h.type, LUNA_MSG_ENCODE);
  assert_true(h.request_id == 9 && h.bin_len == 0);
  cJSON *m;
  assert_int_equal(frame_parse_json(f + LUNA_FRAME_HEADER, h.json_len, &m, err), 0);
  assert_int_equal(cJSON_GetObjectItem(m, "code")->valueint, LUNA_ENOTFOUND);
  assert_string_equal(cJSON_GetObjectItem(m, "name")->valuestring, "ENOTFOUND");
  assert_string_equal(cJSON_GetObjectItem(m, "message")->valuestring, "model 'a.safetensors' not found");
  cJSON_Delete(m);
  free(f);

  /* without a message: the status's description */
  assert_int_equal(frame_build_error(LUNA_MSG_PING, 1, LUNA_EBUSY, NULL, &f, &len), 0);
  assert_int_equal(frame_parse_header(f, len, LUNA_DEFAULT_MAX_FRAME, &h, err), FRAME_OK);
  assert_int_equal(frame_parse_json(f + LUNA_FRAME_HEADER, h.json_len, &m, err), 0);
  assert_string_equal(cJSON_GetObjectItem(m, "message")->valuestring, luna_strerror(LUNA_EBUSY));
  assert_string_equal(cJSON_GetObjectItem(m, "name")->valuestring, "EBUSY");
  cJSON_Delete(m);
  free(f);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_header_round_trip),
      cmocka_unit_test(test_header_errors),
      cmocka_unit_test(test_need_more),
      cmocka_unit_test(test_json_part),
      cmocka_unit_test(test_build_and_get_tensors),
      cmocka_unit_test(test_tensor_errors),
      cmocka_unit_test(test_error_frame),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
