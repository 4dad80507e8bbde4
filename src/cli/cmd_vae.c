/* cmd_vae.c -- 'luna decode' and 'luna encode-image': ComfyUI's VAEDecode / VAEEncode, here or on lunad */
/* SPDX-License-Identifier: MIT */
/*
** decode:        latent (safetensors) -> image (safetensors "image" [B, 8h, 8w, 3], or PNG)
** encode-image:  image (PNG or safetensors) -> latent (safetensors "latent" [B, C, H/8, W/8])
**
** With --local the VAE runs in this process (src/models/vae.h); otherwise lunad runs it
** (luna_client_vae_decode / _encode) and reports progress, which is shown on stderr when
** stderr is a terminal. The files in and out are the same either way.
**
** PNG follows ComfyUI's LoadImage and SaveImage: in, any colour type is converted to RGB
** (palette expanded, gray copied to the three channels, alpha dropped) and a sample v
** becomes v / 255 (8 bits and fewer, scaled to 8 bits first) or v / 65535 (16 bits);
** out, 8-bit RGB with each value (uint8)clip(255 * x, 0, 255), truncated. NaN has no
** such value and is refused.
*/
#include "cli/commands.h"
#include "core/safetensors.h"
#include "luna.h"
#include "models/vae.h"
#include "ops/ops.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <png.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <unistd.h>

/* Token files are a line; this only stops a wrong path from reading a large file. */
#define MAX_TOKEN_FILE 4096

/* What one invocation asks for, as the options gave it. */
typedef struct vae_cmd {
  const char *name;      /* "decode" or "encode-image" */
  int decode;
  int local;
  const char *model, *in_path, *out_path;
  int tiled;             /* LUNA_TILED_*; --local: LUNA_TILED_AUTO means untiled */
  long tile, overlap;    /* pixels; tile 0: not given (512) */
  int overlap_set;       /* --overlap given (else 64, see local_call; lunad: its default) */
  long bench, threads, deadline_ms;
  int show_progress;     /* stderr is a terminal and --no-progress was not given */
} vae_cmd;

static void usage(FILE *f, int decode) {
  if (decode)
    fprintf(f,
            "usage: luna [--socket PATH | --connect HOST:PORT --token-file F] decode --model REL\n"
            "                   --latent IN.safetensors --out OUT.safetensors|OUT.png [options]\n"
            "       luna decode --local --model FILE --latent IN.safetensors --out OUT [options]\n"
            "\n"
            "Decodes a latent as ComfyUI's VAEDecode (VAEDecodeTiled with --tiled) does.\n"
            "IN.safetensors holds the tensor 'latent' [B, C, h, w] or [C, h, w] (F32, F16 or\n"
            "BF16), unscaled as ComfyUI passes it (ComfyUI's SaveLatent files, with\n"
            "'latent_tensor', are read as its LoadLatent reads them). OUT.safetensors gets\n"
            "'image' F32 [B, 8h, 8w, 3] in [0, 1]; OUT.png gets 8-bit RGB as SaveImage writes\n"
            "it, one file per image: OUT.png when B is 1, else OUT-0.png, OUT-1.png, ...\n");
  else
    fprintf(f,
            "usage: luna [--socket PATH | --connect HOST:PORT --token-file F] encode-image --model REL\n"
            "                   --image IN.png|IN.safetensors --out OUT.safetensors [options]\n"
            "       luna encode-image --local --model FILE --image IN --out OUT.safetensors [options]\n"
            "\n"
            "Encodes an image as ComfyUI's VAEEncode (VAEEncodeTiled with --tiled) does: the\n"
            "posterior mean, after cropping H and W to multiples of 8 around the centre.\n"
            "IN.png: 8- or 16-bit gray, RGB, palette, with or without alpha, converted as\n"
            "LoadImage does (RGB, alpha dropped, v / 255; 16-bit: v / 65535). IN.safetensors:\n"
            "the tensor 'image' [B, H, W, 3] or [H, W, 3] (F32, F16 or BF16) in [0, 1].\n"
            "OUT.safetensors gets 'latent' F32 [B, C, H/8, W/8] (C: 4, or 16 for SD3/Flux).\n");
  fprintf(f,
          "\n"
          "Without --local, lunad does the work: REL is relative to its models folders. The\n"
          "results are the same either way.\n"
          "\n"
          "  --local             run the VAE in this process instead of asking lunad (only the\n"
          "                      half this command runs is loaded: decoder or encoder)\n"
          "  --model FILE        a checkpoint (its VAE) or a VAE file (LDM or diffusers names)\n"
          "  --%-17s %s\n"
          "  --out FILE          %s\n"
          "  --tiled             work in tiles (ComfyUI's tiled node); without it lunad tiles only\n"
          "                      when the whole image would need more than its --vae-max-mem,\n"
          "                      and --local never does\n"
          "  --untiled           (lunad) never tile\n"
          "  --tile-size N       tile size in pixels, a multiple of 8 (default 512)\n"
          "  --overlap N         overlap between tiles in pixels, a multiple of 8 smaller than\n"
          "                      the tile size (default 64, a quarter of tiles under 256)\n"
          "  --bench N           run N more times and print timing JSON on stderr (median and min\n"
          "                      ms, peak RSS; --local: the weights' bytes)\n"
          "  --threads N         (--local) compute threads (default: one per CPU)\n"
          "  --deadline-ms N     (lunad) give up if the work has not started within N ms\n"
          "  --no-progress       no progress percentage on stderr (shown only when stderr is a\n"
          "                      terminal)\n"
          "  -h, --help          this text\n"
          "\n"
          "Exit status: 0 success, 1 failure (the message names what failed, with lunad's\n"
          "error name when it was lunad's), 2 usage error.\n",
          decode ? "latent FILE" : "image FILE",
          decode ? "the latent to decode (safetensors)" : "the image to encode (PNG or safetensors)",
          decode ? "the image: OUT.png for PNG files, else safetensors" : "the latent (safetensors)");
}

/* ---- small helpers ----------------------------------------------------------------- */

static int parse_long(const char *cmd, const char *s, const char *opt, long lo, long hi, long *out) {
  errno = 0;
  char *end;
  long v = strtol(s, &end, 10);
  if (!*s || *end || errno || v < lo || v > hi) {
    fprintf(stderr, "luna %s: %s wants an integer in [%ld, %ld], got '%s'\n", cmd, opt, lo, hi, s);
    return -1;
  }
  *out = v;
  return 0;
}

/* Format a message into 'err' (LUNA_ERR_LEN bytes), cut when it does not fit. */
static void errf(char *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void errf(char *err, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, LUNA_ERR_LEN, fmt, ap);
  va_end(ap);
}

/* Whether 'path' ends in 'ext' (".png"), ignoring case. */
static int has_ext(const char *path, const char *ext) {
  size_t n = strlen(path), e = strlen(ext);
  return n > e && !strcasecmp(path + n - e, ext);
}

static double peak_rss_mib(void) {
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru)) return 0;
  return (double)ru.ru_maxrss / 1024.0; /* KiB on Linux */
}

/* Progress on stderr: "\rluna decode: 42%" when the percentage changes, a newline at the end. */
typedef struct progress_line {
  const char *cmd;
  int shown;   /* the last percentage printed, -1 before the first */
} progress_line;

static void progress_show(progress_line *p, double fraction) {
  int pct = (int)(fraction * 100.0);
  if (pct < 0) pct = 0;
  if (pct > 100) pct = 100;
  if (pct == p->shown) return;
  p->shown = pct;
  fprintf(stderr, "\rluna %s: %3d%%", p->cmd, pct);
  fflush(stderr);
}

static void progress_end(progress_line *p) {
  if (p->shown >= 0) fputc('\n', stderr);
  p->shown = -1;
}

static void progress_client(void *ud, double fraction) { progress_show(ud, fraction); }

static int progress_local(void *ud, double done, double total) {
  if (total > 0) progress_show(ud, done / total);
  return 0;
}

/* ---- reading the inputs ------------------------------------------------------------ */

/* Read tensor 't' of 'f' into a new float buffer with its shape widened to 4
** dimensions ([B, ...]); 'n3' is the rank that gets a leading 1. */
static int read_tensor4(const st_file *f, const st_tensor *t, int64_t shape[4], float **out, char *err) {
  if (t->n_dims != 4 && t->n_dims != 3) {
    errf(err, "%s: tensor '%s' has %d dimensions; expected 3 or 4", f->path, t->name, t->n_dims);
    return -1;
  }
  int lead = 4 - t->n_dims;
  for (int d = 0; d < 4; d++) shape[d] = d < lead ? 1 : t->shape[d - lead];
  int64_t n = st_numel(t);
  if (n <= 0) {
    errf(err, "%s: tensor '%s' is empty", f->path, t->name);
    return -1;
  }
  float *buf = malloc((size_t)n * sizeof *buf);
  if (!buf) {
    errf(err, "%s: out of memory for tensor '%s' (%lld values)", f->path, t->name, (long long)n);
    return -1;
  }
  if (st_read_f32(f, t, buf, n, err)) {
    free(buf);
    return -1;
  }
  *out = buf;
  return 0;
}

/*
** The latent of 'path': tensor "latent" [B, C, h, w] or [C, h, w], or the
** "latent_tensor" of ComfyUI's SaveLatent, read as its LoadLatent reads it (times
** 1 / 0.18215 when the file lacks "latent_format_version_0", an old file).
*/
static int read_latent(const char *path, float **out, int64_t shape[4], char *err) {
  st_file *f = NULL;
  if (st_open(path, &f, err)) return -1;
  const st_tensor *t = st_find(f, "latent");
  int comfy = !t;
  if (comfy) t = st_find(f, "latent_tensor");
  if (!t) {
    errf(err, "%s: no tensor 'latent' (nor ComfyUI's 'latent_tensor')", path);
    st_close(f);
    return -1;
  }
  int rc = read_tensor4(f, t, shape, out, err);
  if (!rc && comfy && !st_find(f, "latent_format_version_0")) {
    int64_t n = shape[0] * shape[1] * shape[2] * shape[3];
    for (int64_t i = 0; i < n; i++) (*out)[i] *= (float)(1.0 / 0.18215);
  }
  st_close(f);
  return rc;
}

/* libpng reports errors through these: the message goes into the error pointer's buffer. */
static void png_fail(png_structp png, png_const_charp msg) {
  char *err = png_get_error_ptr(png);
  errf(err, "%s", msg);
  png_longjmp(png, 1);
}

static void png_warn(png_structp png, png_const_charp msg) {
  (void)png; /* warnings (an odd iCCP profile, say) do not change the pixels read */
  (void)msg;
}

/* Read the PNG at 'path' into F32 [1, H, W, 3] as ComfyUI's LoadImage does. */
static int read_png(const char *path, float **out, int64_t shape[4], char *err) {
  char msg[LUNA_ERR_LEN] = "";
  FILE *f = fopen(path, "rb");
  if (!f) {
    errf(err, "cannot open %s: %s", path, strerror(errno));
    return -1;
  }
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, msg, png_fail, png_warn);
  png_infop info = png ? png_create_info_struct(png) : NULL;
  uint8_t *volatile bytes = NULL;
  png_bytep *volatile rows = NULL;
  float *volatile pix = NULL;
  if (!info) {
    snprintf(msg, sizeof msg, "out of memory");
    goto fail;
  }
  if (setjmp(png_jmpbuf(png))) goto fail;
  png_init_io(png, f);
  png_read_info(png, info);
  png_uint_32 w = 0, h = 0;
  int depth = 0, ctype = 0;
  png_get_IHDR(png, info, &w, &h, &depth, &ctype, NULL, NULL, NULL);
  if (ctype == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (ctype == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  /* gray or RGB, each perhaps with alpha (tRNS expansion may add one): take 3 or 1 */
  int ch = png_get_channels(png, info), bits = png_get_bit_depth(png, info);
  size_t rowbytes = png_get_rowbytes(png, info);
  if (ch < 1 || ch > 4 || (bits != 8 && bits != 16) || rowbytes < (size_t)w * (size_t)ch * (size_t)(bits / 8)) {
    snprintf(msg, sizeof msg, "unsupported layout after conversion (%d channels of %d bits)", ch, bits);
    goto fail;
  }
  uint64_t n_bytes = (uint64_t)rowbytes * h, n_pix = (uint64_t)w * h * 3;
  if (n_bytes > SIZE_MAX / 2 || n_pix > SIZE_MAX / sizeof(float) / 2 ||
      !(bytes = malloc((size_t)n_bytes)) || !(rows = malloc((size_t)h * sizeof *rows)) ||
      !(pix = malloc((size_t)n_pix * sizeof(float)))) {
    snprintf(msg, sizeof msg, "out of memory for a %ux%u image", (unsigned)w, (unsigned)h);
    goto fail;
  }
  for (png_uint_32 y = 0; y < h; y++) rows[y] = bytes + (size_t)y * rowbytes;
  png_read_image(png, rows);

  const int gray = ch < 3, step = ch * (bits / 8);
  const float scale = bits == 16 ? 65535.0f : 255.0f;
  float *o = pix;
  for (png_uint_32 y = 0; y < h; y++) {
    const uint8_t *p = rows[y];
    for (png_uint_32 x = 0; x < w; x++, p += step)
      for (int c = 0; c < 3; c++) {
        int s = gray ? 0 : c;
        unsigned v = bits == 16 ? (unsigned)p[2 * s] << 8 | p[2 * s + 1] : p[s];
        *o++ = (float)v / scale;
      }
  }
  png_destroy_read_struct(&png, &info, NULL);
  fclose(f);
  free(rows);
  free(bytes);
  shape[0] = 1;
  shape[1] = h;
  shape[2] = w;
  shape[3] = 3;
  *out = pix;
  return 0;
fail:
  errf(err, "%s: cannot read the PNG: %s", path, msg[0] ? msg : "libpng failed");
  png_destroy_read_struct(&png, info ? &info : NULL, NULL);
  fclose(f);
  free(rows);
  free(bytes);
  free(pix);
  return -1;
}

/* The image of 'path': a PNG (by its signature), else safetensors "image" [B, H, W, 3]
** or [H, W, 3]. */
static int read_image(const char *path, float **out, int64_t shape[4], char *err) {
  uint8_t sig[8] = {0};
  FILE *f = fopen(path, "rb");
  if (!f) {
    errf(err, "cannot open %s: %s", path, strerror(errno));
    return -1;
  }
  size_t got = fread(sig, 1, sizeof sig, f);
  fclose(f);
  if (got == sizeof sig && !png_sig_cmp(sig, 0, sizeof sig)) return read_png(path, out, shape, err);

  st_file *sf = NULL;
  if (st_open(path, &sf, err)) return -1;
  const st_tensor *t = st_find(sf, "image");
  int rc = -1;
  if (!t) errf(err, "%s: neither a PNG nor a safetensors file with a tensor 'image'", path);
  else if ((t->n_dims == 3 || t->n_dims == 4) && t->shape[t->n_dims - 1] != 3)
    errf(err, "%s: tensor 'image' has %lld channels; expected 3 (RGB, ComfyUI's IMAGE)", path,
             (long long)t->shape[t->n_dims - 1]);
  else rc = read_tensor4(sf, t, shape, out, err);
  st_close(sf);
  return rc;
}

/* ---- writing the outputs ----------------------------------------------------------- */

/* Write one H x W RGB image (floats, [H, W, 3]) to 'path' as an 8-bit PNG, through a
** temporary file renamed into place. */
static int write_png1(const char *path, const float *img, int64_t H, int64_t W, char *err) {
  char tmp[4096], msg[LUNA_ERR_LEN] = "";
  if (snprintf(tmp, sizeof tmp, "%s.tmp-%ld", path, (long)getpid()) >= (int)sizeof tmp) {
    errf(err, "%s: path too long", path);
    return -1;
  }
  FILE *f = fopen(tmp, "wb");
  if (!f) {
    errf(err, "cannot create %s: %s", tmp, strerror(errno));
    return -1;
  }
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, msg, png_fail, png_warn);
  png_infop info = png ? png_create_info_struct(png) : NULL;
  uint8_t *volatile row = NULL;
  if (!info || !(row = malloc((size_t)W * 3))) {
    snprintf(msg, sizeof msg, "out of memory");
    goto fail;
  }
  if (setjmp(png_jmpbuf(png))) goto fail;
  png_init_io(png, f);
  png_set_IHDR(png, info, (png_uint_32)W, (png_uint_32)H, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_set_compression_level(png, 4); /* SaveImage's compress_level */
  png_write_info(png, info);
  for (int64_t y = 0; y < H; y++) {
    const float *p = img + y * W * 3;
    for (int64_t i = 0; i < W * 3; i++) {
      float v = 255.0f * p[i]; /* float32, as numpy computes 255. * image */
      row[i] = (uint8_t)(v < 0.0f ? 0.0f : v > 255.0f ? 255.0f : v);
    }
    png_write_row(png, row);
  }
  png_write_end(png, NULL);
  png_destroy_write_struct(&png, &info);
  free(row);
  if (fclose(f)) {
    errf(err, "cannot write %s: %s", tmp, strerror(errno));
    unlink(tmp);
    return -1;
  }
  if (rename(tmp, path)) {
    errf(err, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
    unlink(tmp);
    return -1;
  }
  return 0;
fail:
  errf(err, "%s: cannot write the PNG: %s", path, msg[0] ? msg : "libpng failed");
  png_destroy_write_struct(&png, info ? &info : NULL);
  free(row);
  fclose(f);
  unlink(tmp);
  return -1;
}

/* Write image [B, H, W, 3] as PNG: 'path' itself when B is 1, else PATH-i.png (the
** extension kept) for each image. NaN anywhere fails before any file is written. */
static int write_pngs(const char *path, const float *img, const int64_t shape[4], char *err) {
  int64_t B = shape[0], H = shape[1], W = shape[2], n = B * H * W * 3;
  if (H > 0x7fffffff || W > 0x7fffffff) {
    errf(err, "%s: a %lldx%lld image is too large for PNG", path, (long long)H, (long long)W);
    return -1;
  }
  for (int64_t i = 0; i < n; i++)
    if (isnan(img[i])) {
      int64_t per = H * W * 3, r = i % per;
      errf(err, "%s: image %lld has NaN at y=%lld x=%lld (channel %lld): no PNG value stands for it; "
               "write a .safetensors file to see the raw values", path, (long long)(i / per),
               (long long)(r / (W * 3)), (long long)(r / 3 % W), (long long)(r % 3));
      return -1;
    }
  if (B == 1) return write_png1(path, img, H, W, err);
  size_t n_path = strlen(path), stem = has_ext(path, ".png") ? n_path - 4 : n_path;
  const char *ext = stem < n_path ? path + stem : ".png";
  for (int64_t b = 0; b < B; b++) {
    char one[4096];
    if (snprintf(one, sizeof one, "%.*s-%lld%s", (int)stem, path, (long long)b, ext) >= (int)sizeof one) {
      errf(err, "%s: path too long", path);
      return -1;
    }
    if (write_png1(one, img + b * H * W * 3, H, W, err)) return -1;
  }
  return 0;
}

static int write_output(const vae_cmd *o, const float *data, const int64_t shape[4], char *err) {
  if (o->decode && has_ext(o->out_path, ".png")) return write_pngs(o->out_path, data, shape, err);
  st_wtensor t = {o->decode ? "image" : "latent", ST_F32, 4, {shape[0], shape[1], shape[2], shape[3]}, data};
  return st_write(o->out_path, &t, 1, NULL, 0, err) ? -1 : 0;
}

/* ---- lunad ------------------------------------------------------------------------- */

/* One call to lunad; 'progress' NULL for none. */
static int daemon_call(luna_client *c, const vae_cmd *o, const float *in, const int64_t in_shape[4],
                       progress_line *progress, luna_tensor *out) {
  luna_vae_args a = {o->model, o->tiled, (int)o->tile, (int)o->overlap, progress ? progress_client : NULL, progress,
                     (int)o->deadline_ms};
  int rc = o->decode ? luna_client_vae_decode(c, &a, in, in_shape[0], in_shape[1], in_shape[2], in_shape[3], out)
                     : luna_client_vae_encode(c, &a, in, in_shape[0], in_shape[1], in_shape[2], out);
  if (progress) progress_end(progress);
  return rc;
}

static int run_daemon(const cmd_target *t, const vae_cmd *o, const float *in, const int64_t in_shape[4]) {
  luna_client *c = NULL;
  int rc = cmd_connect(t, o->name, &c);
  if (rc) return rc;
  luna_tensor out = {0};
  double *times = NULL;
  char err[LUNA_ERR_LEN] = "";
  int status = 1;
  progress_line pl = {o->name, -1};

  double t0 = cmd_now_ms();
  if (daemon_call(c, o, in, in_shape, o->show_progress ? &pl : NULL, &out)) goto fail_client;
  double first_ms = cmd_now_ms() - t0;
  if (write_output(o, out.data, out.shape, err)) {
    fprintf(stderr, "luna %s: %s\n", o->name, err);
    goto done;
  }
  if (o->bench > 0) {
    if (!(times = malloc((size_t)o->bench * sizeof *times))) {
      fprintf(stderr, "luna %s: out of memory\n", o->name);
      goto done;
    }
    for (long i = 0; i < o->bench; i++) {
      luna_tensor b = {0};
      double s = cmd_now_ms();
      if (daemon_call(c, o, in, in_shape, NULL, &b)) goto fail_client;
      times[i] = cmd_now_ms() - s;
      luna_tensor_free(&b);
    }
    double med = cmd_median_ms(times, o->bench);
    fprintf(stderr,
            "{\"mode\": \"daemon\", \"command\": \"%s\", \"median_ms\": %.3f, \"min_ms\": %.3f, \"runs\": %ld, "
            "\"first_ms\": %.3f, \"peak_rss_mib\": %.1f, \"tiled\": \"%s\", \"in\": [%lld, %lld, %lld, %lld], "
            "\"out\": [%lld, %lld, %lld, %lld]}\n",
            o->name, med, times[0], o->bench, first_ms, peak_rss_mib(),
            o->tiled == LUNA_TILED_ON ? "on" : o->tiled == LUNA_TILED_OFF ? "off" : "auto", (long long)in_shape[0],
            (long long)in_shape[1], (long long)in_shape[2], (long long)in_shape[3], (long long)out.shape[0],
            (long long)out.shape[1], (long long)out.shape[2], (long long)out.shape[3]);
  }
  status = 0;
  goto done;
fail_client:
  fprintf(stderr, "luna %s: %s\n", o->name, luna_client_errmsg(c));
done:
  free(times);
  luna_tensor_free(&out);
  luna_client_close(c);
  return status;
}

/* ---- in this process --------------------------------------------------------------- */

/* The overlap --local uses: --overlap, else 64, or a quarter of a tile smaller than 256
** (ComfyUI's VAEDecodeTiled). */
static int local_overlap(const vae_cmd *o) {
  int tile = o->tile ? (int)o->tile : 512;
  return o->overlap_set ? (int)o->overlap : tile < 4 * 64 ? tile / 4 : 64;
}

static int local_call(const vae *m, ops_pool *pool, const vae_cmd *o, const float *in, const int64_t in_shape[4],
                      float *out, progress_line *progress, char *err) {
  vae_tiling tl = {o->tile ? (int)o->tile : 512, local_overlap(o)};
  const vae_tiling *tp = o->tiled == LUNA_TILED_ON ? &tl : NULL;
  vae_progress_fn fn = progress ? progress_local : NULL;
  int rc = o->decode
               ? vae_decode(m, pool, in, (int)in_shape[0], in_shape[2], in_shape[3], tp, out, fn, progress, err)
               : vae_encode(m, pool, in, (int)in_shape[0], in_shape[1], in_shape[2], tp, out, fn, progress, err);
  if (progress) progress_end(progress);
  return rc;
}

static int run_local(const vae_cmd *o, const float *in, const int64_t in_shape[4]) {
  char err[LUNA_ERR_LEN] = "";
  vae *m = NULL;
  ops_pool *pool = NULL;
  float *out = NULL;
  double *times = NULL;
  int rc = 1;
  progress_line pl = {o->name, -1};

  double t0 = cmd_now_ms();
  /* only the half this command runs: the other would be memory never read */
  if (vae_load_parts(o->model, o->decode ? VAE_PART_DECODER : VAE_PART_ENCODER, &m, err)) goto fail;
  double load_ms = cmd_now_ms() - t0;
  const vae_hparams *hp = vae_get_hparams(m);
  if (o->decode ? !hp->has_decoder : !hp->has_encoder) {
    snprintf(err, sizeof err, "%s: the VAE has no %s", o->model, o->decode ? "decoder" : "encoder");
    goto fail;
  }
  if (in_shape[0] > 0x7fffffff) {
    snprintf(err, sizeof err, "%s: a batch of %lld is too large", o->in_path, (long long)in_shape[0]);
    goto fail;
  }
  /* pixels per latent cell: 8 for every real VAE, fewer for toy models with fewer levels */
  int64_t sc = vae_scale(m), out_shape[4];
  if (o->decode) {
    int64_t h = in_shape[2], w = in_shape[3];
    if (h > (1 << 24) || w > (1 << 24)) {
      snprintf(err, sizeof err, "%s: a %lldx%lld latent is too large", o->in_path, (long long)h, (long long)w);
      goto fail;
    }
    out_shape[0] = in_shape[0], out_shape[1] = h * sc, out_shape[2] = w * sc, out_shape[3] = 3;
  } else {
    if (in_shape[1] < sc || in_shape[2] < sc) {
      snprintf(err, sizeof err, "%s: a %lldx%lld image is smaller than one %lldx%lld latent cell", o->in_path,
               (long long)in_shape[1], (long long)in_shape[2], (long long)sc, (long long)sc);
      goto fail;
    }
    out_shape[0] = in_shape[0], out_shape[1] = hp->latent_channels, out_shape[2] = in_shape[1] / sc,
    out_shape[3] = in_shape[2] / sc;
  }
  uint64_t n_out = 1;
  for (int d = 0; d < 4; d++) n_out *= (uint64_t)out_shape[d];
  if (n_out > SIZE_MAX / sizeof(float) / 2 || !(out = malloc((size_t)n_out * sizeof *out))) {
    snprintf(err, sizeof err, "out of memory for the output (%llu values)", (unsigned long long)n_out);
    goto fail;
  }
  int64_t H = o->decode ? out_shape[1] : in_shape[1], W = o->decode ? out_shape[2] : in_shape[2];
  if (!(pool = ops_pool_create((int)o->threads, vae_scratch(m, H, W)))) {
    snprintf(err, sizeof err, "cannot start %ld compute threads", o->threads);
    goto fail;
  }
  double t1 = cmd_now_ms();
  if (local_call(m, pool, o, in, in_shape, out, o->show_progress ? &pl : NULL, err)) goto fail;
  double first_ms = cmd_now_ms() - t1;
  if (write_output(o, out, out_shape, err)) goto fail;
  if (o->bench > 0) {
    if (!(times = malloc((size_t)o->bench * sizeof *times))) {
      snprintf(err, sizeof err, "out of memory");
      goto fail;
    }
    for (long i = 0; i < o->bench; i++) {
      double s = cmd_now_ms();
      if (local_call(m, pool, o, in, in_shape, out, NULL, err)) goto fail;
      times[i] = cmd_now_ms() - s;
    }
    double med = cmd_median_ms(times, o->bench);
    fprintf(stderr,
            "{\"mode\": \"local\", \"command\": \"%s\", \"median_ms\": %.3f, \"min_ms\": %.3f, \"runs\": %ld, "
            "\"first_ms\": %.3f, \"load_ms\": %.1f, \"peak_rss_mib\": %.1f, \"weights_bytes\": %zu, "
            "\"threads\": %d, \"blas_core\": \"%s\", \"tiled\": %s, \"tile\": %ld, \"overlap\": %ld, "
            "\"in\": [%lld, %lld, %lld, %lld], \"out\": [%lld, %lld, %lld, %lld]}\n",
            o->name, med, times[0], o->bench, first_ms, load_ms, peak_rss_mib(), vae_weight_bytes(m),
            ops_pool_size(pool), ops_blas_core(), o->tiled == LUNA_TILED_ON ? "true" : "false",
            o->tile ? o->tile : 512, (long)local_overlap(o), (long long)in_shape[0], (long long)in_shape[1],
            (long long)in_shape[2], (long long)in_shape[3], (long long)out_shape[0], (long long)out_shape[1],
            (long long)out_shape[2], (long long)out_shape[3]);
  }
  rc = 0;
fail:
  if (rc) fprintf(stderr, "luna %s: %s\n", o->name, err[0] ? err : "failed");
  free(times);
  free(out);
  ops_pool_free(pool);
  if (m) vae_free(m);
  return rc;
}

/* ---- options ----------------------------------------------------------------------- */

static int vae_main(const cmd_target *target, int argc, char **argv, int decode) {
  enum { O_LOCAL = 256, O_MODEL, O_IN, O_OUT, O_TILED, O_UNTILED, O_TILE, O_OVERLAP, O_BENCH, O_THREADS,
         O_DEADLINE, O_NOPROGRESS };
  const struct option opts[] = {
      {"local", no_argument, 0, O_LOCAL},
      {"model", required_argument, 0, O_MODEL},
      {decode ? "latent" : "image", required_argument, 0, O_IN},
      {"out", required_argument, 0, O_OUT},
      {"tiled", no_argument, 0, O_TILED},
      {"untiled", no_argument, 0, O_UNTILED},
      {"tile-size", required_argument, 0, O_TILE},
      {"overlap", required_argument, 0, O_OVERLAP},
      {"bench", required_argument, 0, O_BENCH},
      {"threads", required_argument, 0, O_THREADS},
      {"deadline-ms", required_argument, 0, O_DEADLINE},
      {"no-progress", no_argument, 0, O_NOPROGRESS},
      {"help", no_argument, 0, 'h'},
      {0, 0, 0, 0}};
  vae_cmd o = {decode ? "decode" : "encode-image", decode, 0, NULL, NULL, NULL, LUNA_TILED_AUTO, 0, 0, 0, 0, 0, 0, 1};
  const char *cmd = o.name, *in_opt = decode ? "--latent" : "--image";
  int tiled_set = 0, tile_set = 0, overlap_set = 0, progress_flag = 1;
  optind = 1;
  opterr = 0; /* messages below name the command */
  int c;
  while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
    switch (c) {
    case O_LOCAL: o.local = 1; break;
    case O_MODEL: o.model = optarg; break;
    case O_IN: o.in_path = optarg; break;
    case O_OUT: o.out_path = optarg; break;
    case O_TILED:
    case O_UNTILED:
      if (tiled_set && o.tiled != (c == O_TILED ? LUNA_TILED_ON : LUNA_TILED_OFF)) {
        fprintf(stderr, "luna %s: give --tiled or --untiled, not both\n", cmd);
        return 2;
      }
      tiled_set = 1;
      o.tiled = c == O_TILED ? LUNA_TILED_ON : LUNA_TILED_OFF;
      break;
    case O_TILE:
      if (parse_long(cmd, optarg, "--tile-size", 8, 1 << 20, &o.tile)) return 2;
      if (o.tile % VAE_SCALE) {
        fprintf(stderr, "luna %s: --tile-size %ld is not a multiple of %d (pixels per latent cell)\n", cmd, o.tile,
                VAE_SCALE);
        return 2;
      }
      tile_set = 1;
      break;
    case O_OVERLAP:
      if (parse_long(cmd, optarg, "--overlap", 0, 1 << 20, &o.overlap)) return 2;
      if (o.overlap % VAE_SCALE) {
        fprintf(stderr, "luna %s: --overlap %ld is not a multiple of %d (pixels per latent cell)\n", cmd, o.overlap,
                VAE_SCALE);
        return 2;
      }
      overlap_set = o.overlap_set = 1;
      break;
    case O_BENCH: if (parse_long(cmd, optarg, "--bench", 0, 100000, &o.bench)) return 2; break;
    case O_THREADS: if (parse_long(cmd, optarg, "--threads", 1, 1024, &o.threads)) return 2; break;
    case O_DEADLINE: if (parse_long(cmd, optarg, "--deadline-ms", 1, 86400000, &o.deadline_ms)) return 2; break;
    case O_NOPROGRESS: progress_flag = 0; break;
    case 'h': usage(stdout, decode); return 0;
    case ':':
      fprintf(stderr, "luna %s: option '%s' needs a value\n", cmd, argv[optind - 1]);
      return 2;
    default:
      fprintf(stderr, "luna %s: unknown option '%s'\n", cmd, argv[optind - 1]);
      usage(stderr, decode);
      return 2;
    }
  }
  if (optind < argc) {
    fprintf(stderr, "luna %s: unexpected argument '%s'\n", cmd, argv[optind]);
    return 2;
  }
  if (!o.model || !o.in_path || !o.out_path) {
    fprintf(stderr, "luna %s: need --model, %s and --out\n", cmd, in_opt);
    usage(stderr, decode);
    return 2;
  }
  /* A given overlap is checked against the tile actually used (512 unless given). */
  long tile = tile_set ? o.tile : 512;
  if (overlap_set && o.overlap >= tile) {
    fprintf(stderr, "luna %s: --overlap %ld must be smaller than --tile-size %ld%s\n", cmd, o.overlap, tile,
            tile_set ? "" : " (the default)");
    return 2;
  }
  if (overlap_set && o.overlap == 0 && !o.local) {
    /* the protocol's "overlap": 0 would be read as "the default" by the C API */
    fprintf(stderr, "luna %s: --overlap 0 is not supported through lunad (0 means the default, 64)\n", cmd);
    return 2;
  }
  if (!decode && has_ext(o.out_path, ".png")) {
    fprintf(stderr, "luna %s: --out %s: a latent is written as .safetensors, not PNG\n", cmd, o.out_path);
    return 2;
  }
  if (o.local) {
    if (o.deadline_ms || o.tiled == LUNA_TILED_OFF) {
      fprintf(stderr, "luna %s: --deadline-ms and --untiled apply to lunad, not to --local (which tiles only "
                      "with --tiled)\n", cmd);
      return 2;
    }
    if ((tile_set || overlap_set) && o.tiled != LUNA_TILED_ON) {
      fprintf(stderr, "luna %s: --tile-size and --overlap need --tiled with --local\n", cmd);
      return 2;
    }
    if (cmd_target_given(target)) {
      fprintf(stderr, "luna %s: --socket, --connect and --timeout apply to lunad, not to --local\n", cmd);
      return 2;
    }
  } else {
    if (o.threads) {
      fprintf(stderr, "luna %s: --threads applies to --local only (lunad uses its own threads)\n", cmd);
      return 2;
    }
    if ((tile_set || overlap_set) && o.tiled == LUNA_TILED_OFF) {
      fprintf(stderr, "luna %s: --tile-size and --overlap do not go with --untiled\n", cmd);
      return 2;
    }
  }
  o.show_progress = progress_flag && isatty(STDERR_FILENO);

  float *in = NULL;
  int64_t in_shape[4];
  char err[LUNA_ERR_LEN] = "";
  if ((decode ? read_latent(o.in_path, &in, in_shape, err) : read_image(o.in_path, &in, in_shape, err))) {
    fprintf(stderr, "luna %s: %s\n", cmd, err);
    return 1;
  }
  int rc = o.local ? run_local(&o, in, in_shape) : run_daemon(target, &o, in, in_shape);
  free(in);
  return rc;
}

int cmd_decode(const cmd_target *t, int argc, char **argv) { return vae_main(t, argc, argv, 1); }

int cmd_encode_image(const cmd_target *t, int argc, char **argv) { return vae_main(t, argc, argv, 0); }
