/* commands.h -- the subcommands of the luna CLI, each taking (argc, argv) with argv[0] its name */
/* SPDX-License-Identifier: MIT */
#ifndef LUNA_CLI_COMMANDS_H
#define LUNA_CLI_COMMANDS_H

#include "luna.h"

#include <stdint.h>

/* Where the daemon commands connect: the global options given before the command. */
typedef struct cmd_target {
  const char *socket;     /* --socket PATH; NULL: luna_default_socket() */
  const char *connect;    /* --connect HOST:PORT, or NULL for the Unix socket */
  const char *token_file; /* --token-file FILE, required with 'connect' */
  int timeout_ms;         /* --timeout SECONDS as ms; 0: none */
} cmd_target;

/* Whether any global option that concerns lunad was given (for commands that run
** locally, which refuse them). */
static inline int cmd_target_given(const cmd_target *t) {
  return t->socket || t->connect || t->token_file || t->timeout_ms;
}

/* cmd_connect connects to lunad as 't' says (cmd_client.c). Returns 0 with '*out' set,
** 1 after printing why it failed, or 2 for bad global options. */
struct luna_client;
int cmd_connect(const cmd_target *t, const char *cmd, struct luna_client **out);

/* Each returns the process exit status: 0 success, 1 failure, 2 usage error. */
int cmd_encode(const cmd_target *t, int argc, char **argv);
/* cmd_vae.c -- the VAE, through lunad or (--local) in this process */
int cmd_decode(const cmd_target *t, int argc, char **argv);
int cmd_encode_image(const cmd_target *t, int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_demo_model(int argc, char **argv);

/* cmd_client.c -- commands that talk to lunad */
int cmd_ping(const cmd_target *t, int argc, char **argv);
int cmd_health(const cmd_target *t, int argc, char **argv);
int cmd_status(const cmd_target *t, int argc, char **argv);
int cmd_models(const cmd_target *t, int argc, char **argv);
/* luna lora id|upload|list|evict|pin|unpin */
int cmd_lora(const cmd_target *t, int argc, char **argv);

/*
** The vectors of an --embeds file (cmd_encode.c): its tensors "l" and "g" (textual
** inversion rows for the CLIP-L and CLIP-G slots {"embed": i} of a tokens file), each
** [n, width] in F32, F16 or BF16, read as F32 (exactly). 'data[k]' is NULL when the
** file has no such tensor. cmd_embeds_load fails naming the file and the tensor: no
** "l" nor "g", another tensor, another dtype, not [n, width] with 1 to
** LUNA_MAX_EMBED_ROWS rows and 1 to LUNA_MAX_EMBED_WIDTH columns, a value not finite.
*/
typedef struct cmd_embeds {
  float *data[2]; /* [0] "l", [1] "g" */
  int n[2], width[2];
} cmd_embeds;
int cmd_embeds_load(const char *path, cmd_embeds *e, char *err);
void cmd_embeds_free(cmd_embeds *e);

/* cmd_tokens_error writes into 'out' the message 'msg' (status 'rc', from reading the
** tokens or from lunad) about the tokens file 'tokens_file' and the --embeds file
** 'embeds_file' (NULL: none): prefixed with the files' names when 'always' is set or
** 'msg' is about embeddings, followed by what to do when the tokens have {"embed": i}
** slots but no --embeds file was given. */
void cmd_tokens_error(int rc, const char *msg, const char *tokens_file, const char *embeds_file, int always,
                      char *out, size_t cap);

/* An encode as 'luna encode' parsed it, for the daemon path (cmd_client.c). */
typedef struct cmd_encode_opts {
  const char *const *models;
  int n_models;
  const char *text;       /* exactly one of 'text' and 'tokens_file' */
  const char *tokens_file;
  const char *out_path;
  int clip_layer;         /* 0: the family's default */
  long bench;             /* extra timed runs */
  int summary;
  int deadline_ms;        /* 0: none */
  int no_cache;
  const luna_lora *loras; /* the --lora stack, in order; daemon_path NULL */
  int n_loras;
  const char *embeds_file; /* --embeds FILE (with tokens_file only), or NULL */
} cmd_encode_opts;

/* cmd_encode_daemon runs 'o' through lunad and writes the same file as --local. */
int cmd_encode_daemon(const cmd_target *t, const cmd_encode_opts *o);

/* Shared by the local and the daemon encode (cmd_encode.c). */

/* cmd_write_conditioning writes 'cond' (F32 [1, n_tokens, dim]) and 'pooled' (F32
** [1, pooled_dim]) to 'path' with the metadata luna.family = 'family' and, when
** 'lora' is not NULL, luna.lora = 'lora' (the stack, cmd_lora_meta). */
int cmd_write_conditioning(const char *path, const float *cond, int64_t n_tokens, int64_t dim,
                           const float *pooled, int64_t pooled_dim, const char *family, const char *lora,
                           char *err);

/* cmd_lora_meta writes the stack as "ID:STRENGTH,ID:STRENGTH,..." (each strength the
** shortest decimal that reads back as the same double) into a malloc'd string, or
** returns NULL when out of memory. */
char *cmd_lora_meta(const char (*ids)[65], const double *strengths, int n);

/* cmd_print_conditioning prints the shapes and first values (--summary). */
void cmd_print_conditioning(const float *cond, int64_t n_tokens, int64_t dim, const float *pooled,
                            int64_t pooled_dim, const char *out_path);

/* cmd_median_ms sorts the 'n' times in 'ms' and returns their median. */
double cmd_median_ms(double *ms, long n);

/* cmd_now_ms is a monotonic clock in milliseconds. */
double cmd_now_ms(void);

#endif
