/* safetensors.h -- read (by mmap) and write safetensors files, validating every field */
/* SPDX-License-Identifier: MIT */
/*
** The format: bytes 0..7 hold N, the header length (u64 little-endian); bytes 8..8+N
** hold a UTF-8 JSON object mapping each tensor name to
**   {"dtype": "F16", "shape": [d0, d1, ...], "data_offsets": [begin, end]}
** and an optional "__metadata__" object of string values. Offsets are relative to
** byte 8+N, the end is exclusive, tensors are row-major and little-endian.
**
** st_parse validates what the format's reference reader validates: N <= 100,000,000
** and 8+N <= file length; the header is UTF-8 JSON; every entry has a known dtype, a
** shape of non-negative integers and two offsets; end-begin equals the product of the
** shape times the dtype size; sorted by offset the tensors are contiguous from 0 and
** the last one ends exactly at the end of the file; no name appears twice.
*/
#ifndef LUNA_CORE_SAFETENSORS_H
#define LUNA_CORE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_DIMS 8
#define ST_MAX_HEADER 100000000ull

/* Every dtype string of the format. Only F32, F16 and BF16 can be read as numbers. */
typedef enum st_dtype {
  ST_BOOL, ST_U8, ST_I8, ST_F8_E5M2, ST_F8_E4M3, ST_I16, ST_U16, ST_F16, ST_BF16,
  ST_I32, ST_U32, ST_F32, ST_F64, ST_I64, ST_U64, ST_N_DTYPES
} st_dtype;

typedef struct st_tensor {
  char *name;                    /* owned by the file */
  st_dtype dtype;
  int n_dims;
  int64_t shape[ST_MAX_DIMS];    /* outermost first, as torch reports it */
  uint64_t begin, end;           /* byte offsets relative to the data section */
  const uint8_t *data;           /* points into the mapping (or the parsed buffer) */
} st_tensor;

typedef struct st_file {
  char *path;                    /* as given, for messages */
  void *map;                     /* the whole file, mmap'd read-only (NULL if parsed from memory) */
  size_t map_len;
  st_tensor *tensors;            /* sorted by name */
  size_t n_tensors;
  char **meta_keys, **meta_vals; /* __metadata__ entries, n_meta of each */
  size_t n_meta;
} st_file;

/* st_open maps 'path' and parses its header. On success '*out' owns the mapping
** (free with st_close); on failure a negative status and a message naming the file
** and the field or tensor at fault. */
int st_open(const char *path, st_file **out, char *err);

/* st_parse validates a whole file image 'buf' of 'len' bytes without copying it (the
** tensors point into 'buf', which must outlive the result). 'label' names the file in
** messages. This is the entry point of the fuzz target. */
int st_parse(const uint8_t *buf, size_t len, const char *label, st_file **out, char *err);

void st_close(st_file *f);

/* st_parse_entry validates one header entry 'e' (a cJSON object named by e->string:
** dtype, shape, data_offsets; nothing else) into 't' (name not set, data not set).
** Wire frames describe their tensors the same way. 'label' names the source. */
struct cJSON;
int st_parse_entry(const struct cJSON *e, st_tensor *t, const char *label, char *err);

/* st_find returns the tensor called 'name', or NULL. */
const st_tensor *st_find(const st_file *f, const char *name);

/* st_meta returns the __metadata__ value of 'key', or NULL. */
const char *st_meta(const st_file *f, const char *key);

const char *st_dtype_name(st_dtype t);
size_t st_dtype_size(st_dtype t);
int64_t st_numel(const st_tensor *t);

/* st_read_f32 converts tensor 't' (F32, F16 or BF16) to 'n' floats at 'dst'; 'n' must
** equal its element count. Other dtypes fail with LUNA_EDTYPE naming the tensor. */
int st_read_f32(const st_file *f, const st_tensor *t, float *dst, int64_t n, char *err);

/* st_release tells the kernel that tensor 't' of the mapped file 'f' will not be read
** again soon: the whole pages inside its data leave the process's resident set (the
** page cache keeps them; a later read faults them back in). A loader that converts
** each tensor into memory of its own calls it after the copy, so that loading a file
** never holds the file's pages and their copies at once. No effect on parsed buffers. */
void st_release(const st_file *f, const st_tensor *t);

/* A tensor to write: 'data' holds numel*dtype-size bytes, little-endian, row-major. */
typedef struct st_wtensor {
  const char *name;
  st_dtype dtype;
  int n_dims;
  int64_t shape[ST_MAX_DIMS];
  const void *data;
} st_wtensor;

/* st_write writes the tensors (in the given order) and optional metadata pairs to
** 'path' through a temporary file renamed into place, so a failure never leaves a
** half-written file under that name. */
int st_write(const char *path, const st_wtensor *t, size_t n,
             const char *const *meta_kv, size_t n_meta, char *err);

#endif
