/* luna.c -- the luna command-line tool: dispatches to its subcommands */
/* SPDX-License-Identifier: MIT */
#include "cli/commands.h"
#include "ops/ops.h"

#include <stdio.h>
#include <string.h>

static void usage(FILE *f) {
  fprintf(f,
          "usage: luna <command> [options]\n"
          "\n"
          "commands:\n"
          "  encode      encode a prompt with a model's text encoders (--local: in this process)\n"
          "  tokenize    print ComfyUI's token/weight chunks for a prompt as JSON\n"
          "  demo-model  write the built-in demo model (small CLIP-L, random weights)\n"
          "\n"
          "Run 'luna <command> --help' for a command's options.\n");
}

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  const char *cmd = argv[1];
  if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
    usage(stdout);
    return 0;
  }
  if (!strcmp(cmd, "encode")) {
    ops_blas_setup(argv); /* may re-execute once with better OpenBLAS kernels */
    return cmd_encode(argc - 1, argv + 1);
  }
  if (!strcmp(cmd, "tokenize")) return cmd_tokenize(argc - 1, argv + 1);
  if (!strcmp(cmd, "demo-model")) return cmd_demo_model(argc - 1, argv + 1);
  fprintf(stderr, "luna: unknown command '%s'\n", cmd);
  usage(stderr);
  return 2;
}
