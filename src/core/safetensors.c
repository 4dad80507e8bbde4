/* safetensors.c -- safetensors reader (mmap, zero copy) with full header validation, and writer */
/* SPDX-License-Identifier: MIT */
#include "core/safetensors.h"

#include "core/fp16.h"
#include "core/status.h"
#include "core/utf8.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static const struct {
  const char *name;
  size_t size;
} dtypes[ST_N_DTYPES] = {
    [ST_BOOL] = {"BOOL", 1},       [ST_U8] = {"U8", 1},     [ST_I8] = {"I8", 1},
    [ST_F8_E5M2] = {"F8_E5M2", 1}, [ST_F8_E4M3] = {"F8_E4M3", 1},
    [ST_I16] = {"I16", 2},         [ST_U16] = {"U16", 2},   [ST_F16] = {"F16", 2},
    [ST_BF16] = {"BF16", 2},       [ST_I32] = {"I32", 4},   [ST_U32] = {"U32", 4},
    [ST_F32] = {"F32", 4},         [ST_F64] = {"F64", 8},   [ST_I64] = {"I64", 8},
    [ST_U64] = {"U64", 8},
};

const char *st_dtype_name(st_dtype t) {
  return (unsigned)t < ST_N_DTYPES ? dtypes[t].name : "?";
}

size_t st_dtype_size(st_dtype t) { return (unsigned)t < ST_N_DTYPES ? dtypes[t].size : 0; }

int64_t st_numel(const st_tensor *t) {
  int64_t n = 1;
  for (int i = 0; i < t->n_dims; i++) n *= t->shape[i];
  return n;
}

void st_close(st_file *f) {
  if (!f) return;
  for (size_t i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
  free(f->tensors);
  for (size_t i = 0; i < f->n_meta; i++) {
    free(f->meta_keys[i]);
    free(f->meta_vals[i]);
  }
  free(f->meta_keys);
  free(f->meta_vals);
  if (f->map) munmap(f->map, f->map_len);
  free(f->path);
  free(f);
}

/* A JSON number that is a non-negative integer exactly representable (< 2^53). */
static int json_uint(const cJSON *v, uint64_t *out) {
  if (!cJSON_IsNumber(v)) return 0;
  double d = v->valuedouble;
  if (!(d >= 0) || d > 9007199254740992.0 || floor(d) != d) return 0;
  *out = (uint64_t)d;
  return 1;
}

static int cmp_name(const void *a, const void *b) {
  return strcmp(((const st_tensor *)a)->name, ((const st_tensor *)b)->name);
}

static int cmp_begin(const void *a, const void *b) {
  const st_tensor *x = *(const st_tensor *const *)a, *y = *(const st_tensor *const *)b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  return x->end < y->end ? -1 : x->end > y->end;
}

static int parse_metadata(st_file *f, const cJSON *m, const char *label, char *err) {
  if (!cJSON_IsObject(m))
    return luna_fail(err, LUNA_EFORMAT, "%s: __metadata__ is not a JSON object", label);
  size_t n = (size_t)cJSON_GetArraySize(m);
  f->meta_keys = calloc(n ? n : 1, sizeof(char *));
  f->meta_vals = calloc(n ? n : 1, sizeof(char *));
  if (!f->meta_keys || !f->meta_vals) return luna_fail(err, LUNA_ENOMEM, "%s: out of memory", label);
  for (const cJSON *e = m->child; e; e = e->next) {
    if (!cJSON_IsString(e) || !e->string)
      return luna_fail(err, LUNA_EFORMAT, "%s: __metadata__ value of '%s' is not a string",
                       label, e->string ? e->string : "?");
    f->meta_keys[f->n_meta] = strdup(e->string);
    f->meta_vals[f->n_meta] = strdup(e->valuestring);
    if (!f->meta_keys[f->n_meta] || !f->meta_vals[f->n_meta])
      return luna_fail(err, LUNA_ENOMEM, "%s: out of memory", label);
    f->n_meta++;
  }
  return 0;
}

int st_parse_entry(const cJSON *e, st_tensor *t, const char *label, char *err) {
  const char *name = e->string;
  const cJSON *dt = NULL, *sh = NULL, *off = NULL;
  if (!cJSON_IsObject(e))
    return luna_fail(err, LUNA_EFORMAT, "%s: tensor '%s': entry is not a JSON object", label, name);
  for (const cJSON *k = e->child; k; k = k->next) {
    if (!strcmp(k->string, "dtype") && !dt) dt = k;
    else if (!strcmp(k->string, "shape") && !sh) sh = k;
    else if (!strcmp(k->string, "data_offsets") && !off) off = k;
    else
      return luna_fail(err, LUNA_EFORMAT, "%s: tensor '%s': unexpected or repeated field '%s'",
                       label, name, k->string);
  }
  if (!cJSON_IsString(dt))
    return luna_fail(err, LUNA_EFORMAT, "%s: tensor '%s': missing or non-string \"dtype\"", label, name);
  int found = -1;
  for (int i = 0; i < ST_N_DTYPES; i++)
    if (!strcmp(dt->valuestring, dtypes[i].name)) found = i;
  if (found < 0)
    return luna_fail(err, LUNA_EDTYPE, "%s: tensor '%s': unknown dtype '%.32s'", label, name,
                     dt->valuestring);
  t->dtype = (st_dtype)found;
  if (!cJSON_IsArray(sh))
    return luna_fail(err, LUNA_EFORMAT, "%s: tensor '%s': missing or non-array \"shape\"", label, name);
  int nd = cJSON_GetArraySize(sh);
  if (nd > ST_MAX_DIMS)
    return luna_fail(err, LUNA_EFORMAT, "%s: tensor '%s': %d dimensions (at most %d)", label,
                     name, nd, ST_MAX_DIMS);
  t->n_dims = nd;
  uint64_t bytes = dtypes[found].size;
  int i = 0;
  for (const cJSON *d = sh->child; d; d = d->next, i++) {
    uint64_t v;
    if (!json_uint(d, &v))
      return luna_fail(err, LUNA_EFORMAT, "%s: tensor '%s': shape[%d] is not a non-negative integer",
                       label, name, i);
    t->shape[i] = (int64_t)v;
    if (__builtin_mul_overflow(bytes, v, &bytes))
      return luna_fail(err, LUNA_EFORMAT, "%s: tensor '%s': shape overflows", label, name);
  }
  if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 || !json_uint(off->child, &t->begin) ||
      !json_uint(off->child->next, &t->end))
    return luna_fail(err, LUNA_EFORMAT, "%s: tensor '%s': \"data_offsets\" is not two non-negative integers",
                     label, name);
  if (t->end < t->begin)
    return luna_fail(err, LUNA_EFORMAT, "%s: tensor '%s': data_offsets end %llu before begin %llu",
                     label, name, (unsigned long long)t->end, (unsigned long long)t->begin);
  if (t->end - t->begin != bytes)
    return luna_fail(err, LUNA_EFORMAT,
                     "%s: tensor '%s': %llu data bytes but shape and dtype %s need %llu", label,
                     name, (unsigned long long)(t->end - t->begin), dtypes[found].name,
                     (unsigned long long)bytes);
  return 0;
}

int st_parse(const uint8_t *buf, size_t len, const char *label, st_file **out, char *err) {
  *out = NULL;
  if (len < 8)
    return luna_fail(err, LUNA_EFORMAT, "%s: %zu bytes, too short for the 8-byte header length", label, len);
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | buf[i];
  if (n > ST_MAX_HEADER)
    return luna_fail(err, LUNA_EFORMAT, "%s: header length %llu exceeds the limit of %llu", label,
                     (unsigned long long)n, ST_MAX_HEADER);
  if (n > len - 8)
    return luna_fail(err, LUNA_EFORMAT, "%s: header length %llu runs past the end of the file (%zu bytes)",
                     label, (unsigned long long)n, len);
  if (n < 2)
    return luna_fail(err, LUNA_EFORMAT, "%s: header of %llu bytes cannot hold a JSON object", label,
                     (unsigned long long)n);
  const uint8_t *h = buf + 8;
  size_t bad = 0;
  if (!utf8_valid(h, (size_t)n, &bad))
    return luna_fail(err, LUNA_EFORMAT, "%s: header is not valid UTF-8 (byte %zu)", label, bad);
  if (memchr(h, 0, (size_t)n))
    return luna_fail(err, LUNA_EFORMAT, "%s: header contains a NUL byte", label);

  const char *end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts((const char *)h, (size_t)n, &end, 0);
  if (!root) {
    size_t at = end ? (size_t)(end - (const char *)h) : 0;
    const char *e = cJSON_GetErrorPtr();
    if (e && e >= (const char *)h && e <= (const char *)h + n) at = (size_t)(e - (const char *)h);
    return luna_fail(err, LUNA_EFORMAT, "%s: header is not valid JSON (near byte %zu)", label, at);
  }
  for (const char *p = end; p < (const char *)h + n; p++)
    if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
      cJSON_Delete(root);
      return luna_fail(err, LUNA_EFORMAT, "%s: trailing bytes after the header's JSON", label);
    }
  int rc = 0;
  st_file *f = calloc(1, sizeof *f);
  st_tensor **byoff = NULL;
  if (!f || !(f->path = strdup(label))) { rc = luna_fail(err, LUNA_ENOMEM, "%s: out of memory", label); goto done; }
  if (!cJSON_IsObject(root)) { rc = luna_fail(err, LUNA_EFORMAT, "%s: header is not a JSON object", label); goto done; }

  size_t count = 0, n_meta_keys = 0;
  for (const cJSON *e = root->child; e; e = e->next) {
    if (!strcmp(e->string, "__metadata__")) n_meta_keys++;
    else count++;
  }
  if (n_meta_keys > 1) { rc = luna_fail(err, LUNA_EFORMAT, "%s: duplicate name '__metadata__'", label); goto done; }
  f->tensors = calloc(count ? count : 1, sizeof(st_tensor));
  byoff = calloc(count ? count : 1, sizeof(st_tensor *));
  if (!f->tensors || !byoff) { rc = luna_fail(err, LUNA_ENOMEM, "%s: out of memory for %zu tensors", label, count); goto done; }
  for (const cJSON *e = root->child; e; e = e->next) {
    if (!strcmp(e->string, "__metadata__")) {
      if ((rc = parse_metadata(f, e, label, err))) goto done;
      continue;
    }
    st_tensor *t = &f->tensors[f->n_tensors];
    if (!(t->name = strdup(e->string))) { rc = luna_fail(err, LUNA_ENOMEM, "%s: out of memory", label); goto done; }
    f->n_tensors++;
    if ((rc = st_parse_entry(e, t, label, err))) goto done;
  }
  qsort(f->tensors, f->n_tensors, sizeof(st_tensor), cmp_name);
  for (size_t i = 1; i < f->n_tensors; i++)
    if (!strcmp(f->tensors[i].name, f->tensors[i - 1].name)) {
      rc = luna_fail(err, LUNA_EFORMAT, "%s: tensor '%s' is duplicated", label, f->tensors[i].name);
      goto done;
    }
  for (size_t i = 0; i < f->n_tensors; i++) byoff[i] = &f->tensors[i];
  qsort(byoff, f->n_tensors, sizeof *byoff, cmp_begin);
  uint64_t data_len = len - 8 - n, pos = 0;
  for (size_t i = 0; i < f->n_tensors; i++) {
    st_tensor *t = byoff[i];
    if (t->begin != pos) {
      rc = luna_fail(err, LUNA_EFORMAT, "%s: tensor '%s' starts at data offset %llu, expected %llu "
                     "(tensors must be contiguous and not overlap)", label, t->name,
                     (unsigned long long)t->begin, (unsigned long long)pos);
      goto done;
    }
    if (t->end > data_len) {
      rc = luna_fail(err, LUNA_EFORMAT, "%s: tensor '%s' ends at data offset %llu, past the end of "
                     "the file's %llu data bytes (truncated file?)", label, t->name,
                     (unsigned long long)t->end, (unsigned long long)data_len);
      goto done;
    }
    t->data = h + n + t->begin;
    pos = t->end;
  }
  if (pos != data_len) {
    rc = luna_fail(err, LUNA_EFORMAT, "%s: tensors cover %llu data bytes but the file has %llu",
                   label, (unsigned long long)pos, (unsigned long long)data_len);
    goto done;
  }
done:
  free(byoff);
  cJSON_Delete(root);
  if (rc) st_close(f);
  else *out = f;
  return rc;
}

int st_open(const char *path, st_file **out, char *err) {
  *out = NULL;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return luna_fail(err, LUNA_EIO, "%s: cannot open: %s", path, strerror(errno));
  struct stat sb;
  if (fstat(fd, &sb) < 0) {
    int e = errno;
    close(fd);
    return luna_fail(err, LUNA_EIO, "%s: cannot stat: %s", path, strerror(e));
  }
  if (!S_ISREG(sb.st_mode)) {
    close(fd);
    return luna_fail(err, LUNA_EIO, "%s: not a regular file", path);
  }
  size_t len = (size_t)sb.st_size;
  if (len < 8) {
    close(fd);
    return luna_fail(err, LUNA_EFORMAT, "%s: %zu bytes, too short for the 8-byte header length", path, len);
  }
  void *map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
  int e = errno;
  close(fd);
  if (map == MAP_FAILED) return luna_fail(err, LUNA_EIO, "%s: mmap failed: %s", path, strerror(e));
  st_file *f;
  int rc = st_parse(map, len, path, &f, err);
  if (rc) {
    munmap(map, len);
    return rc;
  }
  f->map = map;
  f->map_len = len;
  *out = f;
  return 0;
}

const st_tensor *st_find(const st_file *f, const char *name) {
  st_tensor key = {.name = (char *)name};
  return bsearch(&key, f->tensors, f->n_tensors, sizeof(st_tensor), cmp_name);
}

const char *st_meta(const st_file *f, const char *key) {
  for (size_t i = 0; i < f->n_meta; i++)
    if (!strcmp(f->meta_keys[i], key)) return f->meta_vals[i];
  return NULL;
}

int st_read_f32(const st_file *f, const st_tensor *t, float *dst, int64_t n, char *err) {
  if (n != st_numel(t))
    return luna_fail(err, LUNA_ESHAPE, "%s: tensor '%s': %lld elements, expected %lld", f->path,
                     t->name, (long long)st_numel(t), (long long)n);
  switch (t->dtype) {
  case ST_F32: memcpy(dst, t->data, (size_t)n * 4); return 0;
  case ST_F16: fp16_to_f32_row(t->data, dst, (size_t)n); return 0;
  case ST_BF16: bf16_to_f32_row(t->data, dst, (size_t)n); return 0;
  default:
    return luna_fail(err, LUNA_EDTYPE, "%s: tensor '%s' has dtype %s; only F32, F16 and BF16 are supported",
                     f->path, t->name, st_dtype_name(t->dtype));
  }
}

void st_release(const st_file *f, const st_tensor *t) {
  if (!f->map || !t->data || t->end <= t->begin) return;
  long pg = sysconf(_SC_PAGESIZE);
  if (pg <= 0) return;
  uintptr_t a = (uintptr_t)t->data, b = a + (uintptr_t)(t->end - t->begin), p = (uintptr_t)pg;
  a = (a + p - 1) / p * p;
  b = b / p * p;
  if (b > a) (void)madvise((void *)a, b - a, MADV_DONTNEED);
}

static int write_all(int fd, const void *p, size_t n) {
  const uint8_t *b = p;
  while (n) {
    ssize_t w = write(fd, b, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    b += w;
    n -= (size_t)w;
  }
  return 0;
}

int st_write(const char *path, const st_wtensor *t, size_t n, const char *const *meta_kv,
             size_t n_meta, char *err) {
  cJSON *root = cJSON_CreateObject();
  char *json = NULL, *tmp = NULL;
  int fd = -1, rc = 0;
  if (!root) return luna_fail(err, LUNA_ENOMEM, "%s: out of memory", path);
  if (n_meta) {
    cJSON *m = cJSON_AddObjectToObject(root, "__metadata__");
    for (size_t i = 0; m && i < n_meta; i++) cJSON_AddStringToObject(m, meta_kv[2 * i], meta_kv[2 * i + 1]);
  }
  uint64_t off = 0;
  for (size_t i = 0; i < n; i++) {
    uint64_t bytes = st_dtype_size(t[i].dtype);
    for (int d = 0; d < t[i].n_dims; d++) bytes *= (uint64_t)t[i].shape[d];
    cJSON *e = cJSON_AddObjectToObject(root, t[i].name);
    if (!e) { rc = luna_fail(err, LUNA_ENOMEM, "%s: out of memory", path); goto done; }
    cJSON_AddStringToObject(e, "dtype", st_dtype_name(t[i].dtype));
    cJSON *sh = cJSON_AddArrayToObject(e, "shape");
    for (int d = 0; d < t[i].n_dims; d++) cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)t[i].shape[d]));
    cJSON *o = cJSON_AddArrayToObject(e, "data_offsets");
    cJSON_AddItemToArray(o, cJSON_CreateNumber((double)off));
    cJSON_AddItemToArray(o, cJSON_CreateNumber((double)(off + bytes)));
    off += bytes;
  }
  json = cJSON_PrintUnformatted(root);
  if (!json) { rc = luna_fail(err, LUNA_ENOMEM, "%s: out of memory", path); goto done; }
  size_t hl = strlen(json), padded = (hl + 7) & ~(size_t)7;
  if (asprintf(&tmp, "%s.tmp.%d", path, (int)getpid()) < 0) { tmp = NULL; rc = luna_fail(err, LUNA_ENOMEM, "%s: out of memory", path); goto done; }
  fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) { rc = luna_fail(err, LUNA_EIO, "%s: cannot create: %s", tmp, strerror(errno)); goto done; }
  uint8_t len8[8];
  for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)padded >> (8 * i));
  int bad = write_all(fd, len8, 8) || write_all(fd, json, hl);
  for (size_t i = hl; !bad && i < padded; i++) bad = write_all(fd, " ", 1);
  for (size_t i = 0; !bad && i < n; i++) {
    size_t bytes = st_dtype_size(t[i].dtype);
    for (int d = 0; d < t[i].n_dims; d++) bytes *= (size_t)t[i].shape[d];
    bad = write_all(fd, t[i].data, bytes);
  }
  if (bad || close(fd) < 0) {
    rc = luna_fail(err, LUNA_EIO, "%s: write failed: %s", tmp, strerror(errno));
    fd = -1;
    unlink(tmp);
    goto done;
  }
  fd = -1;
  if (rename(tmp, path) < 0) {
    rc = luna_fail(err, LUNA_EIO, "%s: cannot rename into place: %s", path, strerror(errno));
    unlink(tmp);
  }
done:
  if (fd >= 0) { close(fd); unlink(tmp); }
  free(tmp);
  free(json);
  cJSON_Delete(root);
  return rc;
}
