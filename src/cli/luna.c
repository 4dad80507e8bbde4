/* luna.c -- the luna command-line tool: global options, then dispatch to a subcommand */
/* SPDX-License-Identifier: MIT */
#include "cli/commands.h"
#include "luna.h"
#include "ops/ops.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
  fprintf(f,
          "usage: luna [--socket PATH | --connect HOST:PORT --token-file FILE] [--timeout S] <command> [options]\n"
          "\n"
          "commands that talk to lunad:\n"
          "  ping        round-trip time to lunad\n"
          "  health      is lunad live and ready, and the state of each model (JSON)\n"
          "  status      lunad's counters, memory, queue, cache and models (JSON)\n"
          "  models      list, load, unload or verify models\n"
          "  lora        LoRA identities and lunad's LoRA cache: id, upload, list, evict, pin, unpin\n"
          "  encode      encode a prompt with a model's text encoders (--local: in this process)\n"
          "  decode      decode a latent with a VAE into an image (safetensors or PNG; --local)\n"
          "  encode-image  encode an image (PNG or safetensors) with a VAE into a latent (--local)\n"
          "local commands:\n"
          "  tokenize    print ComfyUI's token/weight chunks for a prompt as JSON\n"
          "  demo-model  write the built-in demo model (small CLIP-L and VAE, random weights)\n"
          "\n"
          "global options (before the command):\n"
          "  --socket PATH         lunad's Unix socket (default: $LUNA_SOCKET, else\n"
          "                        $XDG_RUNTIME_DIR/lunad.sock, else /tmp/lunad-UID.sock;\n"
          "                        here: %s)\n"
          "  --connect HOST:PORT   use lunad's TCP listener instead ([IPv6]:PORT for IPv6)\n"
          "  --token-file FILE     the token for --connect: the file's content, one trailing\n"
          "                        newline removed\n"
          "  --timeout SECONDS     give up (exit 1, ETIMEDOUT) when lunad sends nothing for\n"
          "                        this long once connected; a decode's progress counts\n"
          "                        (default: wait as long as it takes)\n"
          "\n"
          "Run 'luna <command> --help' for a command's options.\n",
          luna_default_socket());
}

/* Take a global option 'name' with a value ("--name VALUE" or "--name=VALUE") at
** argv[*i]. Returns 1 and sets '*val' (advancing *i past a separate value), 0 when
** argv[*i] is another option, -1 when the value is missing. */
static int take_opt(int argc, char **argv, int *i, const char *name, const char **val) {
  size_t n = strlen(name);
  const char *a = argv[*i];
  if (strncmp(a, name, n)) return 0;
  if (a[n] == '=') {
    *val = a + n + 1;
    return 1;
  }
  if (a[n]) return 0;
  if (*i + 1 >= argc) return -1;
  *val = argv[++*i];
  return 1;
}

/* --timeout SECONDS: a decimal number of seconds in (0, 2e6], as whole milliseconds (at least 1). */
static int parse_timeout(const char *s, int *ms) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (end == s || *end || errno || !(v > 0 && v <= 2e6)) return -1;
  *ms = v * 1000.0 < 1.0 ? 1 : (int)(v * 1000.0 + 0.5);
  return 0;
}

/* Whether the encode (decode, encode-image) arguments ask for --local (getopt_long also takes a unique prefix
** of it, "--l" at the shortest; a prompt that looks like one only costs a BLAS check). */
static int wants_local(int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--")) break;
    size_t n = strlen(argv[i]);
    if (n >= 3 && n <= 7 && !strncmp(argv[i], "--local", n)) return 1;
  }
  return 0;
}

int main(int argc, char **argv) {
  cmd_target t = {NULL, NULL, NULL, 0};
  const char *timeout = NULL;
  int i = 1;
  for (; i < argc && argv[i][0] == '-'; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      usage(stdout);
      return 0;
    }
    int r;
    if ((r = take_opt(argc, argv, &i, "--socket", &t.socket)) ||
        (r = take_opt(argc, argv, &i, "--connect", &t.connect)) ||
        (r = take_opt(argc, argv, &i, "--token-file", &t.token_file)) ||
        (r = take_opt(argc, argv, &i, "--timeout", &timeout))) {
      if (r < 0) {
        fprintf(stderr, "luna: option '%s' needs a value\n", a);
        return 2;
      }
      continue;
    }
    fprintf(stderr, "luna: unknown option '%s' (global options come before the command)\n", a);
    usage(stderr);
    return 2;
  }
  if (i >= argc) {
    usage(stderr);
    return 2;
  }
  if (t.socket && t.connect) {
    fprintf(stderr, "luna: give --socket or --connect, not both\n");
    return 2;
  }
  if (timeout && parse_timeout(timeout, &t.timeout_ms)) {
    fprintf(stderr, "luna: --timeout wants seconds, more than 0 and at most 2000000 (0.5, 30, ...), got '%s'\n",
            timeout);
    return 2;
  }
  if (t.token_file && !t.connect) {
    fprintf(stderr, "luna: --token-file goes with --connect (the Unix socket needs no token)\n");
    return 2;
  }
  int n = argc - i;
  char **v = argv + i;
  const char *cmd = v[0];
  if (!strcmp(cmd, "help")) {
    usage(stdout);
    return 0;
  }
  if (!strcmp(cmd, "encode")) {
    if (wants_local(n, v)) ops_blas_setup(argv); /* may re-execute once with better OpenBLAS kernels */
    ops_memory_setup();
    return cmd_encode(&t, n, v);
  }
  if (!strcmp(cmd, "decode") || !strcmp(cmd, "encode-image")) {
    if (wants_local(n, v)) ops_blas_setup(argv);
    ops_memory_setup();
    return !strcmp(cmd, "decode") ? cmd_decode(&t, n, v) : cmd_encode_image(&t, n, v);
  }
  if (!strcmp(cmd, "ping")) return cmd_ping(&t, n, v);
  if (!strcmp(cmd, "health")) return cmd_health(&t, n, v);
  if (!strcmp(cmd, "status")) return cmd_status(&t, n, v);
  if (!strcmp(cmd, "models")) return cmd_models(&t, n, v);
  if (!strcmp(cmd, "lora")) return cmd_lora(&t, n, v);
  if (!strcmp(cmd, "tokenize") || !strcmp(cmd, "demo-model")) {
    if (cmd_target_given(&t)) {
      fprintf(stderr, "luna: '%s' runs locally; --socket, --connect and --timeout do not apply\n", cmd);
      return 2;
    }
    return !strcmp(cmd, "tokenize") ? cmd_tokenize(n, v) : cmd_demo_model(n, v);
  }
  fprintf(stderr, "luna: unknown command '%s'\n", cmd);
  usage(stderr);
  return 2;
}
