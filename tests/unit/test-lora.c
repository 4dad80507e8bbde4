/* test-lora.c -- LoRA files: key mapping, identity, upload image, validation and weight math */
/* SPDX-License-Identifier: MIT */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/fp16.h"
#include "core/safetensors.h"
#include "core/status.h"
#include "lora/lora.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N(a) (sizeof(a) / sizeof((a)[0]))
#define LABEL "test-lora.safetensors"

/* Common target prefixes. */
#define KQ "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
#define KK "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
#define KV "lora_te_text_model_encoder_layers_0_self_attn_v_proj"

/* Write the tensors with st_write to a fresh temporary file; its name goes to 'path'. */
static void write_tmp(const st_wtensor *t, size_t n, const char *const *meta, size_t n_meta,
                      char path[64]) {
  strcpy(path, "/tmp/luna-test-lora-XXXXXX");
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  close(fd);
  char err[LUNA_ERR_LEN];
  if (st_write(path, t, n, meta, n_meta, err)) fail_msg("st_write: %s", err);
}

/* The file image st_write makes of the tensors. */
static uint8_t *make_image(const st_wtensor *t, size_t n, const char *const *meta, size_t n_meta,
                           size_t *len) {
  char path[64];
  write_tmp(t, n, meta, n_meta, path);
  FILE *fp = fopen(path, "rb");
  assert_non_null(fp);
  fseek(fp, 0, SEEK_END);
  *len = (size_t)ftell(fp);
  fseek(fp, 0, SEEK_SET);
  uint8_t *b = malloc(*len);
  assert_non_null(b);
  assert_int_equal(fread(b, 1, *len, fp), *len);
  fclose(fp);
  unlink(path);
  return b;
}

static int parse(const st_wtensor *t, size_t n, lora_file **f, char *err) {
  size_t len;
  uint8_t *b = make_image(t, n, NULL, 0, &len);
  int rc = lora_file_parse(b, len, LABEL, f, err);
  free(b);
  return rc;
}

static lora_file *parse_ok(const st_wtensor *t, size_t n) {
  lora_file *f = NULL;
  char err[LUNA_ERR_LEN] = "";
  int rc = parse(t, n, &f, err);
  if (rc) fail_msg("lora_file_parse: %d %s", rc, err);
  return f;
}

static const lora_patch *find_patch(const lora_file *f, const char *name) {
  for (int i = 0; i < f->n_patches; i++)
    if (!strcmp(f->patches[i].name, name)) return &f->patches[i];
  fail_msg("no patch '%s'", name);
  return NULL;
}

static void assert_close(const float *got, const float *want, size_t n, double tol) {
  for (size_t i = 0; i < n; i++)
    if (!(fabs((double)got[i] - (double)want[i]) <= tol * (1 + fabs((double)want[i]))))
      fail_msg("element %zu: got %.9g, want %.9g", i, (double)got[i], (double)want[i]);
}

/* One LoRA pair, up [2, 1] and down [1, 3], under every key family. */
static void test_key_mapping(void **state) {
  (void)state;
  static const float up[2] = {1, 2}, down[3] = {1, 0, -1};
  uint16_t up16[2] = {f32_to_fp16(1), f32_to_fp16(2)}, alpha16 = f32_to_fp16(0.5f);
  uint16_t upbf[2] = {0x3f80, 0x4000}, downbf[3] = {0x3f80, 0x0000, 0xbf80}; /* 1, 2 / 1, 0, -1 */
  const st_wtensor t[] = {
      {KQ ".lora_up.weight", ST_F16, 2, {2, 1}, up16},
      {KQ ".lora_down.weight", ST_F32, 2, {1, 3}, down},
      {KQ ".alpha", ST_F16, 0, {0}, &alpha16},
      {"lora_te1_text_model_encoder_layers_3_mlp_fc2_lora.up.weight", ST_F32, 2, {2, 1}, up},
      {"lora_te1_text_model_encoder_layers_3_mlp_fc2_lora.down.weight", ST_F32, 2, {1, 3}, down},
      {"lora_te2_text_model_encoder_layers_31_self_attn_out_proj.lora_up.weight", ST_BF16, 2, {2, 1}, upbf},
      {"lora_te2_text_model_encoder_layers_31_self_attn_out_proj.lora_down.weight", ST_BF16, 2, {1, 3}, downbf},
      {"text_encoder.text_model.encoder.layers.5.self_attn.k_proj.lora_B.weight", ST_F32, 2, {2, 1}, up},
      {"text_encoder.text_model.encoder.layers.5.self_attn.k_proj.lora_A.weight", ST_F32, 2, {1, 3}, down},
      {"text_encoder_2.text_model.encoder.layers.7.mlp.fc1.lora_linear_layer.up.weight", ST_F32, 2, {2, 1}, up},
      {"text_encoder_2.text_model.encoder.layers.7.mlp.fc1.lora_linear_layer.down.weight", ST_F32, 2, {1, 3}, down},
      {"text_encoders.clip_g.transformer.text_model.encoder.layers.2.self_attn.v_proj.lora_B.default.weight",
       ST_F32, 2, {2, 1}, up},
      {"text_encoders.clip_g.transformer.text_model.encoder.layers.2.self_attn.v_proj.lora_A.default.weight",
       ST_F32, 2, {1, 3}, down},
      {"lora_te2_text_projection.lora.up.weight", ST_F32, 2, {2, 1}, up},
      {"lora_te2_text_projection.lora.down.weight", ST_F32, 2, {1, 3}, down},
      {"text_encoders.clip_l.transformer.text_projection.lora_B", ST_F32, 4, {2, 1, 1, 1}, up},
      {"text_encoders.clip_l.transformer.text_projection.lora_A", ST_F32, 4, {1, 3, 1, 1}, down},
      /* UNet tensors: ignored silently */
      {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", ST_F32, 2, {2, 1}, up},
      {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", ST_F32, 2, {1, 3}, down},
      {"lora_unet_down_blocks_0_attentions_0_proj_in.alpha", ST_I64, 1, {1}, "\1\0\0\0\0\0\0\0"},
      {"unet.x.lora_A.weight", ST_F32, 2, {1, 3}, down},
  };
  lora_file *f = parse_ok(t, N(t));
  static const struct {
    const char *name;
    int enc, layer;
    lora_module mod;
  } want[] = {
      {"text_encoders.clip_l.transformer.text_projection", 0, -1, LORA_M_PROJ},
      {KQ, 0, 0, LORA_M_Q},
      {"lora_te1_text_model_encoder_layers_3_mlp_fc2", 0, 3, LORA_M_FC2},
      {"text_encoder.text_model.encoder.layers.5.self_attn.k_proj", 0, 5, LORA_M_K},
      {"lora_te2_text_projection", 1, -1, LORA_M_PROJ},
      {"text_encoders.clip_g.transformer.text_model.encoder.layers.2.self_attn.v_proj", 1, 2, LORA_M_V},
      {"text_encoder_2.text_model.encoder.layers.7.mlp.fc1", 1, 7, LORA_M_FC1},
      {"lora_te2_text_model_encoder_layers_31_self_attn_out_proj", 1, 31, LORA_M_O},
  };
  assert_int_equal(f->n_patches, N(want));
  assert_int_equal(f->n_te_tensors, 17);
  assert_int_equal(f->n_unmapped, 0);
  assert_int_equal(f->bytes, N(want) * 5 * sizeof(float));
  assert_string_equal(f->source, LABEL);
  for (size_t i = 0; i < N(want); i++) {
    const lora_patch *p = &f->patches[i];
    assert_string_equal(p->name, want[i].name);
    assert_int_equal(p->enc, want[i].enc);
    assert_int_equal(p->layer, want[i].layer);
    assert_int_equal(p->module, want[i].mod);
    assert_int_equal(p->kind, LORA_K_LORA);
    assert_int_equal(p->out, 2);
    assert_int_equal(p->in, 3);
    assert_int_equal(p->rank, 1);
    assert_memory_equal(p->up, up, sizeof up);
    assert_memory_equal(p->down, down, sizeof down);
    assert_null(p->dora_scale);
    assert_true(lora_patch_is_lowrank(p));
    assert_true(p->scale == (i == 1 ? 0.5 : 1.0));
  }
  lora_file_free(f);
  lora_file_free(NULL);
}

/* Text-encoder keys that map to nothing are counted and the first names kept. */
static void test_unmapped(void **state) {
  (void)state;
  static const float up[2] = {1, 2}, down[3] = {1, 0, -1}, one = 1;
  const st_wtensor t[] = {
      {KQ ".lora_up.weight", ST_F32, 2, {2, 1}, up},
      {KQ ".lora_down.weight", ST_F32, 2, {1, 3}, down},
      {KQ ".lora_A.weight", ST_F32, 2, {1, 3}, down},       /* a second form: not read */
      {"lora_te_text_model_encoder_layers_0_layer_norm1.lora_up.weight", ST_F32, 2, {2, 1}, up},
      {"lora_te_text_model_encoder_layers_64_mlp_fc1.lora_up.weight", ST_F32, 2, {2, 1}, up},
      {"lora_te_text_model_encoder_layers_07_mlp_fc1.lora_up.weight", ST_F32, 2, {2, 1}, up},
      {"lora_prior_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", ST_F32, 2, {1, 3}, down},
      {"text_encoder.text_model.encoder.layers.1.self_attn.q_proj.alpha", ST_F32, 0, {0}, &one},
      {"text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_magnitude_vector", ST_F32, 1, {2}, up},
      {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight", ST_F32, 1, {2}, up},
      {"lora_unet_mid_block_attentions_0_proj_in.lora_up.weight", ST_F32, 2, {2, 1}, up},
  };
  lora_file *f = parse_ok(t, N(t));
  assert_int_equal(f->n_patches, 1);
  assert_int_equal(f->n_te_tensors, 10);
  assert_int_equal(f->n_unmapped, 8);
  assert_string_equal(f->unmapped[0], "lora_prior_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight");
  assert_string_equal(f->unmapped[1], "lora_te_text_model_encoder_layers_07_mlp_fc1.lora_up.weight");
  assert_string_equal(f->unmapped[2], "lora_te_text_model_encoder_layers_0_layer_norm1.lora_up.weight");
  lora_file_free(f);

  /* a file of UNet tensors only: nothing to do, nothing to report */
  f = parse_ok(t + N(t) - 1, 1);
  assert_int_equal(f->n_patches, 0);
  assert_int_equal(f->n_te_tensors, 0);
  assert_int_equal(f->n_unmapped, 0);
  assert_string_equal(f->id_hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  lora_file_free(f);
}

/* The identity depends on the text-encoder tensors only. */
static void test_identity(void **state) {
  (void)state;
  float up[2] = {1, 2}, down[3] = {1, 0, -1}, alpha = 4, unet[2] = {7, 8};
  const st_wtensor a[] = {
      {KQ ".lora_up.weight", ST_F32, 2, {2, 1}, up},
      {KQ ".lora_down.weight", ST_F32, 2, {1, 3}, down},
      {KQ ".alpha", ST_F32, 0, {0}, &alpha},
  };
  const st_wtensor b[] = {
      {KQ ".alpha", ST_F32, 0, {0}, &alpha},
      {"lora_unet_x.lora_up.weight", ST_F32, 1, {2}, unet},
      {KQ ".lora_down.weight", ST_F32, 2, {1, 3}, down},
      {KQ ".lora_up.weight", ST_F32, 2, {2, 1}, up},
  };
  const char *meta[] = {"ss_network_dim", "1", "ss_output_name", "other"};
  char pa[64], pb[64], err[LUNA_ERR_LEN];
  write_tmp(a, N(a), NULL, 0, pa);
  write_tmp(b, N(b), meta, 2, pb);
  lora_file *fa, *fb;
  assert_int_equal(lora_file_load(pa, &fa, err), 0);
  assert_int_equal(lora_file_load(pb, &fb, err), 0);
  assert_string_equal(fa->source, pa);
  assert_memory_equal(fa->id, fb->id, LORA_ID_LEN);
  assert_string_equal(fa->id_hex, fb->id_hex);
  assert_int_equal(strlen(fa->id_hex), 64);
  st_file *st;
  assert_int_equal(st_open(pb, &st, err), 0);
  uint8_t id[LORA_ID_LEN];
  lora_identity(st, id);
  assert_memory_equal(id, fa->id, LORA_ID_LEN);
  st_close(st);
  unlink(pa);
  unlink(pb);

  /* one value changed, or the same values in another dtype: another identity */
  down[2] = -2;
  lora_file *fc = parse_ok(a, N(a));
  down[2] = -1;
  assert_memory_not_equal(fc->id, fa->id, LORA_ID_LEN);
  lora_file_free(fc);
  uint16_t down16[3] = {f32_to_fp16(1), f32_to_fp16(0), f32_to_fp16(-1)};
  const st_wtensor a16[] = {a[0], {KQ ".lora_down.weight", ST_F16, 2, {1, 3}, down16}, a[2]};
  fc = parse_ok(a16, N(a16));
  assert_memory_not_equal(fc->id, fa->id, LORA_ID_LEN);
  lora_file_free(fc);
  lora_file_free(fa);
  lora_file_free(fb);

  /* the encoding itself: name, dtype, dims, shape, bytes, little-endian u64 lengths */
  float v = 1;
  const st_wtensor k[] = {{"lora_te_x", ST_F32, 1, {1}, &v}, {"unet_y", ST_F32, 1, {1}, &v}};
  lora_file *fk = parse_ok(k, N(k));
  assert_string_equal(fk->id_hex, "06fbab03d34cbae938f67c712fb15cb7bb2a20f27e55389cba8dfa79f3e83bbb");
  assert_int_equal(fk->n_unmapped, 1);
  lora_file_free(fk);

  /* hex round trip */
  uint8_t back[LORA_ID_LEN];
  const char *hex = "06fbab03d34cbae938f67c712fb15cb7bb2a20f27e55389cba8dfa79f3e83bbb";
  assert_int_equal(lora_id_parse(hex, back), 0);
  char again[LORA_ID_HEX];
  lora_id_hex(back, again);
  assert_string_equal(again, hex);
  assert_int_equal(lora_id_parse("06FBAB03D34CBAE938F67C712FB15CB7BB2A20F27E55389CBA8DFA79F3E83BBB", id), 0);
  assert_memory_equal(id, back, LORA_ID_LEN);
  assert_int_equal(lora_id_parse("06fbab", id), LUNA_EINVAL);
  assert_int_equal(lora_id_parse("06fbab03d34cbae938f67c712fb15cb7bb2a20f27e55389cba8dfa79f3e83bbb0", id),
                   LUNA_EINVAL);
  assert_int_equal(lora_id_parse("g6fbab03d34cbae938f67c712fb15cb7bb2a20f27e55389cba8dfa79f3e83bbb", id),
                   LUNA_EINVAL);
  assert_int_equal(lora_id_parse(NULL, id), LUNA_EINVAL);
  assert_memory_equal(id, back, LORA_ID_LEN); /* untouched by a failure */

  assert_true(lora_is_te_key("lora_te3_x"));
  assert_true(lora_is_te_key("text_encoders.t5xxl.x"));
  assert_false(lora_is_te_key("lora_unet_x"));
  assert_false(lora_is_te_key("text_encoder"));
}

/* The upload image holds exactly the text-encoder tensors and keeps the identity. */
static void test_extract(void **state) {
  (void)state;
  float up[2] = {1, 2}, down[3] = {1, 0, -1}, unet[4] = {1, 2, 3, 4};
  uint16_t alpha16 = f32_to_fp16(3);
  int64_t ids[2] = {5, 6};
  const st_wtensor t[] = {
      {"lora_unet_a.lora_up.weight", ST_F32, 2, {2, 2}, unet},
      {KQ ".lora_up.weight", ST_F32, 2, {2, 1}, up},
      {"lora_unet_b.alpha", ST_F16, 0, {0}, &alpha16},
      {KQ ".lora_down.weight", ST_F32, 2, {1, 3}, down},
      {KQ ".alpha", ST_F16, 0, {0}, &alpha16},
      {"text_encoders.t5xxl.whatever", ST_I64, 1, {2}, ids},
  };
  const char *meta[] = {"ss_base_model_version", "sdxl_base_v1-0"};
  char path[64], err[LUNA_ERR_LEN];
  write_tmp(t, N(t), meta, 1, path);
  st_file *st;
  assert_int_equal(st_open(path, &st, err), 0);
  uint8_t *img;
  size_t len;
  assert_int_equal(lora_extract_te(st, &img, &len, err), 0);
  uint64_t hl = 0;
  for (int i = 7; i >= 0; i--) hl = hl << 8 | img[i];
  assert_int_equal(hl % 8, 0);
  st_file *x;
  assert_int_equal(st_parse(img, len, "upload", &x, err), 0);
  assert_int_equal(x->n_tensors, 4);
  assert_int_equal(x->n_meta, 0);
  for (size_t i = 0; i < x->n_tensors; i++) {
    const st_tensor *a = &x->tensors[i], *b = st_find(st, a->name);
    assert_non_null(b);
    assert_true(lora_is_te_key(a->name));
    assert_int_equal(a->dtype, b->dtype);
    assert_int_equal(a->n_dims, b->n_dims);
    assert_memory_equal(a->shape, b->shape, sizeof(int64_t) * (size_t)a->n_dims);
    assert_int_equal(a->end - a->begin, b->end - b->begin);
    assert_memory_equal(a->data, b->data, a->end - a->begin);
  }
  uint8_t ia[LORA_ID_LEN], ib[LORA_ID_LEN];
  lora_identity(st, ia);
  lora_identity(x, ib);
  assert_memory_equal(ia, ib, LORA_ID_LEN);
  st_close(x);

  lora_file *fa, *fb;
  assert_int_equal(lora_file_load(path, &fa, err), 0);
  assert_int_equal(lora_file_parse(img, len, "upload", &fb, err), 0);
  assert_string_equal(fa->id_hex, fb->id_hex);
  assert_int_equal(fa->n_patches, 1);
  assert_int_equal(fb->n_patches, 1);
  assert_true(fb->patches[0].scale == 3.0);
  assert_int_equal(fb->n_unmapped, 1);
  assert_string_equal(fb->unmapped[0], "text_encoders.t5xxl.whatever");
  lora_file_free(fa);
  lora_file_free(fb);
  free(img);

  /* no text-encoder tensors: an empty but valid image */
  st_close(st);
  write_tmp(t, 1, NULL, 0, path);
  assert_int_equal(st_open(path, &st, err), 0);
  assert_int_equal(lora_extract_te(st, &img, &len, err), 0);
  assert_int_equal(len % 8, 0);
  assert_int_equal(st_parse(img, len, "upload", &x, err), 0);
  assert_int_equal(x->n_tensors, 0);
  st_close(x);
  st_close(st);
  free(img);
  unlink(path);
}

/* Parse 't' and expect status 'want' with the file label and every needle in the message. */
static void expect_error(const st_wtensor *t, size_t n, int want, const char *needle, const char *needle2) {
  lora_file *f = (lora_file *)1;
  char err[LUNA_ERR_LEN] = "";
  int rc = parse(t, n, &f, err);
  if (rc != want || !strstr(err, LABEL) || (needle && !strstr(err, needle)) ||
      (needle2 && !strstr(err, needle2)))
    fail_msg("got %d '%s', want %d naming '%s' and '%s'", rc, err, want, needle ? needle : "",
             needle2 ? needle2 : "");
  assert_null(f);
}

static void test_errors(void **state) {
  (void)state;
  static const float up[2] = {1, 2}, down[3] = {1, 0, -1}, down2[6] = {1, 2, 3, 4, 5, 6};
  static const float nan_down[3] = {1, NAN, 0}, inf_alpha = INFINITY, two[2] = {1, 1};
  static const float dora_bad[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
  static const int64_t i64[2] = {1, 2};
  const st_wtensor ok_up = {KQ ".lora_up.weight", ST_F32, 2, {2, 1}, up};
  const st_wtensor ok_down = {KQ ".lora_down.weight", ST_F32, 2, {1, 3}, down};

  const st_wtensor bad_dtype[] = {{KQ ".lora_up.weight", ST_I64, 2, {2, 1}, i64}, ok_down};
  expect_error(bad_dtype, 2, LUNA_EDTYPE, KQ ".lora_up.weight", "I64");

  const st_wtensor rank[] = {ok_up, {KQ ".lora_down.weight", ST_F32, 2, {2, 3}, down2}};
  expect_error(rank, 2, LUNA_ESHAPE, KQ ".lora_down.weight", "rank");

  expect_error(&ok_up, 1, LUNA_EMISSING, KQ ".lora_down.weight", NULL);
  expect_error(&ok_down, 1, LUNA_EMISSING, KQ ".lora_up.weight", NULL);

  const st_wtensor alpha[] = {ok_up, ok_down, {KQ ".alpha", ST_F32, 1, {2}, two}};
  expect_error(alpha, 3, LUNA_ESHAPE, KQ ".alpha", "scalar");
  const st_wtensor alpha_inf[] = {ok_up, ok_down, {KQ ".alpha", ST_F32, 0, {0}, &inf_alpha}};
  expect_error(alpha_inf, 3, LUNA_EFORMAT, KQ ".alpha", NULL);
  const st_wtensor alpha_int[] = {ok_up, ok_down, {KQ ".alpha", ST_I64, 0, {0}, i64}};
  expect_error(alpha_int, 3, LUNA_EDTYPE, KQ ".alpha", "I64");

  const st_wtensor dora[] = {ok_up, ok_down, {KQ ".dora_scale", ST_F32, 2, {3, 3}, dora_bad}};
  expect_error(dora, 3, LUNA_ESHAPE, KQ ".dora_scale", NULL);
  const st_wtensor dora1d[] = {ok_up, ok_down, {KQ ".dora_scale", ST_F32, 1, {2}, two}};
  expect_error(dora1d, 3, LUNA_ESHAPE, KQ ".dora_scale", NULL);

  const st_wtensor nan[] = {ok_up, {KQ ".lora_down.weight", ST_F32, 2, {1, 3}, nan_down}};
  expect_error(nan, 2, LUNA_EFORMAT, KQ ".lora_down.weight", "non-finite");

  const st_wtensor shape3[] = {{KQ ".lora_up.weight", ST_F32, 3, {2, 1, 1}, up}, ok_down};
  expect_error(shape3, 2, LUNA_ESHAPE, KQ ".lora_up.weight", NULL);

  const st_wtensor mid[] = {ok_up, ok_down, {KQ ".lora_mid.weight", ST_F32, 2, {1, 1}, up}};
  expect_error(mid, 3, LUNA_EFORMAT, KQ ".lora_mid.weight", "lora_mid");
  const st_wtensor oft[] = {{KQ ".oft_blocks", ST_F32, 2, {1, 2}, up}};
  expect_error(oft, 1, LUNA_EFORMAT, KQ ".oft_blocks", "OFT");
  const st_wtensor glora[] = {{KQ ".a1.weight", ST_F32, 2, {1, 2}, up}};
  expect_error(glora, 1, LUNA_EFORMAT, KQ ".a1.weight", "GLoRA");
  const st_wtensor tucker[] = {{KQ ".hada_t1", ST_F32, 2, {1, 2}, up}};
  expect_error(tucker, 1, LUNA_EFORMAT, KQ ".hada_t1", NULL);
  const st_wtensor diffb[] = {{"text_encoder.text_model.encoder.layers.0.mlp.fc1.diff_b", ST_F32, 1, {2}, up}};
  expect_error(diffb, 1, LUNA_EFORMAT, "mlp.fc1.diff_b", NULL);
  const st_wtensor ln[] = {
      {"text_encoders.clip_l.transformer.text_model.final_layer_norm.lora_up.weight", ST_F32, 2, {2, 1}, up}};
  expect_error(ln, 1, LUNA_EFORMAT, "final_layer_norm.lora_up.weight", "LayerNorm");
  const st_wtensor emb[] = {
      {"text_encoders.clip_g.transformer.text_model.embeddings.token_embedding.diff", ST_F32, 2, {1, 2}, up}};
  expect_error(emb, 1, LUNA_EFORMAT, "token_embedding.diff", "embedding");
  const st_wtensor ln1[] = {
      {"text_encoders.clip_l.transformer.text_model.encoder.layers.3.layer_norm1.w_norm", ST_F32, 1, {2}, up}};
  expect_error(ln1, 1, LUNA_EFORMAT, "layer_norm1.w_norm", NULL);

  const st_wtensor loha[] = {
      {KQ ".hada_w1_a", ST_F32, 2, {2, 1}, up}, {KQ ".hada_w1_b", ST_F32, 2, {1, 3}, down},
      {KQ ".hada_w2_a", ST_F32, 2, {2, 1}, up}};
  expect_error(loha, 3, LUNA_EMISSING, KQ ".hada_w2_b", NULL);
  const st_wtensor loha_shape[] = {
      {KQ ".hada_w1_a", ST_F32, 2, {2, 1}, up}, {KQ ".hada_w1_b", ST_F32, 2, {1, 3}, down},
      {KQ ".hada_w2_a", ST_F32, 2, {1, 2}, up}, {KQ ".hada_w2_b", ST_F32, 2, {2, 3}, down2}};
  expect_error(loha_shape, 4, LUNA_ESHAPE, KQ ".hada_w2_a", NULL);
  const st_wtensor lokr[] = {
      {KQ ".lokr_w1_a", ST_F32, 2, {2, 1}, up}, {KQ ".lokr_w2", ST_F32, 2, {1, 3}, down}};
  expect_error(lokr, 2, LUNA_EMISSING, KQ ".lokr_w1_b", NULL);
  const st_wtensor lokr2[] = {{KQ ".lokr_w1", ST_F32, 2, {2, 1}, up}};
  expect_error(lokr2, 1, LUNA_EMISSING, KQ ".lokr_w2", NULL);

  /* a file that is not there */
  lora_file *f;
  char err[LUNA_ERR_LEN];
  assert_int_equal(lora_file_load("/nonexistent/lora.safetensors", &f, err), LUNA_EIO);
  assert_null(f);
  assert_non_null(strstr(err, "/nonexistent/lora.safetensors"));
}

/* W [2, 3] += strength * alpha / rank * up @ down */
static void test_apply_lora(void **state) {
  (void)state;
  static const float up[2] = {1, 2}, down[3] = {1, 0, -1}, alpha = 2;
  const st_wtensor t[] = {
      {KQ ".lora_up.weight", ST_F32, 2, {2, 1}, up},
      {KQ ".lora_down.weight", ST_F32, 2, {1, 3}, down},
      {KQ ".alpha", ST_F32, 1, {1}, &alpha},
      /* rank 2, no alpha: scale 1 */
      {KK ".lora_up.weight", ST_F32, 2, {1, 2}, up},
      {KK ".lora_down.weight", ST_F32, 2, {2, 1}, up},
      /* a diff beside a LoRA on one target: the LoRA wins, the diff is reported */
      {KK ".diff", ST_F32, 2, {1, 1}, up},
  };
  lora_file *f = parse_ok(t, N(t));
  const lora_patch *p = find_patch(f, KQ);
  assert_true(p->scale == 2.0);
  assert_true(lora_patch_is_lowrank(p));
  assert_true(lora_patch_coef(p, 0.5) == 1.0f);
  assert_true(lora_patch_coef(p, 0.3) == (float)(0.3 * 2.0));
  float W[6] = {1, 2, 3, 4, 5, 6};
  char err[LUNA_ERR_LEN];
  assert_int_equal(lora_patch_apply(p, 0.5, W, err), 0);
  const float want[6] = {2, 2, 2, 6, 5, 4};
  assert_memory_equal(W, want, sizeof W);
  assert_int_equal(lora_patch_apply(p, -0.5, W, err), 0); /* and back */
  const float orig[6] = {1, 2, 3, 4, 5, 6};
  assert_memory_equal(W, orig, sizeof W);

  p = find_patch(f, KK);
  assert_int_equal(p->rank, 2);
  assert_int_equal(p->out, 1);
  assert_int_equal(p->in, 1);
  assert_true(p->scale == 1.0);
  float w1 = 1;
  assert_int_equal(lora_patch_apply(p, 2, &w1, err), 0);
  assert_true(w1 == 1 + 2 * (1 * 1 + 2 * 2));
  assert_int_equal(f->n_unmapped, 1);
  assert_string_equal(f->unmapped[0], KK ".diff");
  lora_file_free(f);
}

/* LoHa: dW = (w1a @ w1b) * (w2a @ w2b), scale = alpha / r1; diff: W += strength * diff. */
static void test_apply_loha_diff(void **state) {
  (void)state;
  static const float w1a[4] = {1, 0, 0, 1}, w1b[4] = {1, 2, 3, 4}, w2a[2] = {1, 2}, w2b[2] = {1, -1};
  static const float alpha = 4, diff[4] = {1, 2, 3, 4};
  const st_wtensor t[] = {
      {KQ ".hada_w1_a", ST_F32, 2, {2, 2}, w1a}, {KQ ".hada_w1_b", ST_F32, 2, {2, 2}, w1b},
      {KQ ".hada_w2_a", ST_F32, 2, {2, 1}, w2a}, {KQ ".hada_w2_b", ST_F32, 2, {1, 2}, w2b},
      {KQ ".alpha", ST_F32, 0, {0}, &alpha},
      {"text_encoder.text_model.encoder.layers.1.mlp.fc2.diff", ST_F32, 2, {2, 2}, diff},
      {"text_encoder.text_model.encoder.layers.1.mlp.fc2.alpha", ST_F32, 0, {0}, &alpha},
  };
  lora_file *f = parse_ok(t, N(t));
  assert_int_equal(f->n_patches, 2);
  const lora_patch *p = &f->patches[0];
  assert_int_equal(p->kind, LORA_K_LOHA);
  assert_int_equal(p->layer, 0);
  assert_true(p->scale == 2.0);
  assert_false(lora_patch_is_lowrank(p));
  float W[4] = {0, 0, 0, 0};
  char err[LUNA_ERR_LEN];
  assert_int_equal(lora_patch_apply(p, 1.0, W, err), 0);
  const float want[4] = {2, -4, 12, -16};
  assert_memory_equal(W, want, sizeof W);

  p = &f->patches[1];
  assert_int_equal(p->kind, LORA_K_DIFF);
  assert_int_equal(p->layer, 1);
  assert_int_equal(p->module, LORA_M_FC2);
  assert_true(p->scale == 1.0);
  assert_int_equal(lora_patch_apply(p, 2.0, W, err), 0);
  const float want2[4] = {4, 0, 18, -8};
  assert_memory_equal(W, want2, sizeof W);
  /* alpha means nothing to a diff: reported, not applied */
  assert_int_equal(f->n_unmapped, 1);
  lora_file_free(f);
}

/* LoKr: dW = kron(w1, w2), scale = alpha / dim (w2's rank, else w1's, else 1). */
static void test_apply_lokr(void **state) {
  (void)state;
  static const float w1[4] = {1, 2, 3, 4}, w2a[2] = {1, -1}, w2b[1] = {2}, alpha = 3;
  static const float v1a[2] = {1, 1}, v1b[2] = {2, 3}, v2[2] = {1, 2}, alpha4 = 4;
  const st_wtensor t[] = {
      /* w1 whole [2, 2], w2 = [2, 1] @ [1, 1] = [2, 1]: out 4, in 2, dim 1 */
      {KQ ".lokr_w1", ST_F32, 2, {2, 2}, w1}, {KQ ".lokr_w2_a", ST_F32, 2, {2, 1}, w2a},
      {KQ ".lokr_w2_b", ST_F32, 2, {1, 1}, w2b}, {KQ ".alpha", ST_F32, 0, {0}, &alpha},
      /* both whole: scale 1 whatever alpha says */
      {KK ".lokr_w1", ST_F32, 2, {2, 2}, w1}, {KK ".lokr_w2", ST_F32, 2, {1, 2}, v2},
      {KK ".alpha", ST_F32, 0, {0}, &alpha},
      /* w1 = [1, 2] @ [2, 1] = [[5]], w2 whole [1, 2]: dim = w1_b rows = 2 */
      {KV ".lokr_w1_a", ST_F32, 2, {1, 2}, v1a}, {KV ".lokr_w1_b", ST_F32, 2, {2, 1}, v1b},
      {KV ".lokr_w2", ST_F32, 2, {1, 2}, v2}, {KV ".alpha", ST_F32, 0, {0}, &alpha4},
  };
  lora_file *f = parse_ok(t, N(t));
  assert_int_equal(f->n_patches, 3);
  assert_int_equal(f->n_unmapped, 0);
  char err[LUNA_ERR_LEN];

  const lora_patch *p = find_patch(f, KQ);
  assert_int_equal(p->kind, LORA_K_LOKR);
  assert_int_equal(p->out, 4);
  assert_int_equal(p->in, 2);
  assert_true(p->scale == 3.0);
  float W[8] = {0};
  assert_int_equal(lora_patch_apply(p, 1.0, W, err), 0);
  const float want[8] = {6, 12, -6, -12, 18, 24, -18, -24};
  assert_memory_equal(W, want, sizeof W);

  p = find_patch(f, KK);
  assert_int_equal(p->out, 2);
  assert_int_equal(p->in, 4);
  assert_true(p->scale == 1.0);
  float W2[8] = {0};
  assert_int_equal(lora_patch_apply(p, 0.5, W2, err), 0);
  /* kron([[1,2],[3,4]], [[1,2]]) = [[1,2,2,4],[3,6,4,8]] */
  const float want2[8] = {0.5f, 1, 1, 2, 1.5f, 3, 2, 4};
  assert_memory_equal(W2, want2, sizeof W2);

  p = find_patch(f, KV);
  assert_int_equal(p->out, 1);
  assert_int_equal(p->in, 2);
  assert_true(p->scale == 2.0);
  assert_int_equal(p->k1_rows * p->k1_cols, 1);
  assert_true(p->k1[0] == 5);
  float W3[2] = {1, 1};
  assert_int_equal(lora_patch_apply(p, 1.0, W3, err), 0);
  assert_true(W3[0] == 11 && W3[1] == 21);
  lora_file_free(f);
}

/* DoRA (ComfyUI's weight_decompose) on both axes; W = I, dW = [[0,1],[0,0]]. */
static void test_apply_dora(void **state) {
  (void)state;
  static const float up[2] = {1, 0}, down[2] = {0, 1}, alpha = 2, mag[2] = {2, 3};
  const st_wtensor t[] = {
      {KQ ".lora_up.weight", ST_F32, 2, {2, 1}, up}, {KQ ".lora_down.weight", ST_F32, 2, {1, 2}, down},
      {KQ ".alpha", ST_F32, 0, {0}, &alpha}, {KQ ".dora_scale", ST_F32, 2, {2, 1}, mag},
      {KK ".lora_up.weight", ST_F32, 2, {2, 1}, up}, {KK ".lora_down.weight", ST_F32, 2, {1, 2}, down},
      {KK ".dora_scale", ST_F32, 2, {1, 2}, mag},
  };
  lora_file *f = parse_ok(t, N(t));
  assert_int_equal(f->bytes, 2 * (4 + 2) * sizeof(float));
  char err[LUNA_ERR_LEN];
  const float eps = FLT_EPSILON;

  /* per output row: Wc = W + 2 dW = [[1,2],[0,1]]; the norms are those of W (1, 1) */
  const lora_patch *p = find_patch(f, KQ);
  assert_true(p->dora_on_out);
  assert_false(lora_patch_is_lowrank(p));
  float W[4] = {1, 0, 0, 1};
  assert_int_equal(lora_patch_apply(p, 1.0, W, err), 0);
  const float r0 = 2 / (1 + eps), r1 = 3 / (1 + eps);
  const float want[4] = {r0, 2 * r0, 0, r1};
  assert_close(W, want, 4, 1e-6);
  /* at strength 0.5: W + 0.5 (Wc - W) */
  float Wh[4] = {1, 0, 0, 1};
  assert_int_equal(lora_patch_apply(p, 0.5, Wh, err), 0);
  const float wanth[4] = {1 + 0.5f * (r0 - 1), r0, 0, 1 + 0.5f * (r1 - 1)};
  assert_close(Wh, wanth, 4, 1e-6);

  /* per input column: Wc = [[1,1],[0,1]], column norms of Wc: 1 and sqrt(2) */
  p = find_patch(f, KK);
  assert_false(p->dora_on_out);
  float W2[4] = {1, 0, 0, 1};
  assert_int_equal(lora_patch_apply(p, 0.5, W2, err), 0);
  const float c1 = 3 / sqrtf(2);
  const float want2[4] = {1.5f, 0.5f * c1, 0, 1 + 0.5f * (c1 - 1)};
  assert_close(W2, want2, 4, 1e-6);
  lora_file_free(f);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_key_mapping),     cmocka_unit_test(test_unmapped),
      cmocka_unit_test(test_identity),        cmocka_unit_test(test_extract),
      cmocka_unit_test(test_errors),          cmocka_unit_test(test_apply_lora),
      cmocka_unit_test(test_apply_loha_diff), cmocka_unit_test(test_apply_lokr),
      cmocka_unit_test(test_apply_dora),
  };
  return cmocka_run_group_tests_name("lora", tests, NULL, NULL);
}
