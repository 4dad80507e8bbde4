/* cmd_tokenize.c -- 'luna tokenize': a prompt's token/weight chunks, as ComfyUI makes them, as JSON */
/* SPDX-License-Identifier: MIT */
#include "cli/commands.h"
#include "core/status.h"
#include "text/tokenizer.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
  fprintf(f,
          "usage: luna tokenize --tokenizer DIR --text TEXT [--family sd1|sdxl]\n"
          "\n"
          "Tokenizes a prompt exactly as ComfyUI's CLIP.tokenize() does (Hugging Face's\n"
          "CLIPTokenizer without ftfy, ComfyUI's (text:weight) syntax and 77-token chunks)\n"
          "and prints the result as one line of JSON on stdout:\n"
          "  sd1:  {\"l\": [[[id, weight], ... 77 pairs], ... chunks]}\n"
          "  sdxl: {\"g\": [...], \"l\": [...]}   (G pads with 0, L with 49407)\n"
          "The output can be given to 'luna encode --tokens'. Weights that are not finite\n"
          "(from (x:inf) or (x:nan)) print as Infinity / NaN, as Python's json does.\n"
          "\n"
          "  --tokenizer DIR   folder with vocab.json and merges.txt (ComfyUI's comfy/sd1_tokenizer)\n"
          "  --text TEXT       the prompt (UTF-8); \\( and \\) are literal parentheses\n"
          "  --family F        sd1 (default) or sdxl\n"
          "  -h, --help        this text\n"
          "\n"
          "Exit status: 0 success, 1 failure (unreadable vocabulary, invalid UTF-8, ...),\n"
          "2 usage error.\n");
}

int cmd_tokenize(int argc, char **argv) {
  enum { O_TOKENIZER = 256, O_TEXT, O_FAMILY };
  static const struct option opts[] = {
      {"tokenizer", required_argument, 0, O_TOKENIZER},
      {"text", required_argument, 0, O_TEXT},
      {"family", required_argument, 0, O_FAMILY},
      {"help", no_argument, 0, 'h'},
      {0, 0, 0, 0}};
  const char *dir = NULL, *text = NULL;
  int sdxl = 0;
  optind = 1;
  opterr = 0; /* messages below name the command */
  int c;
  while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
    switch (c) {
    case O_TOKENIZER: dir = optarg; break;
    case O_TEXT: text = optarg; break;
    case O_FAMILY:
      if (!strcmp(optarg, "sd1")) sdxl = 0;
      else if (!strcmp(optarg, "sdxl")) sdxl = 1;
      else {
        fprintf(stderr, "luna tokenize: --family is sd1 or sdxl, not '%s'\n", optarg);
        return 2;
      }
      break;
    case 'h': usage(stdout); return 0;
    case ':':
      fprintf(stderr, "luna tokenize: option '%s' needs a value\n", argv[optind - 1]);
      return 2;
    default:
      fprintf(stderr, "luna tokenize: unknown option '%s'\n", argv[optind - 1]);
      usage(stderr);
      return 2;
    }
  }
  if (optind < argc) {
    fprintf(stderr, "luna tokenize: unexpected argument '%s'\n", argv[optind]);
    return 2;
  }
  if (!dir || !text) {
    fprintf(stderr, "luna tokenize: need --tokenizer DIR and --text TEXT\n");
    usage(stderr);
    return 2;
  }

  char err[LUNA_ERR_LEN] = "";
  tok_vocab *v = NULL;
  tok_chunks l = {0}, g = {0};
  char *json = NULL;
  int rc = 1;
  if (tok_vocab_load(dir, &v, err)) goto out;
  if (tok_tokenize(v, text, TOK_PAD_L, &l, err)) goto out;
  if (sdxl && tok_tokenize(v, text, TOK_PAD_G, &g, err)) goto out;
  if (tok_json_write(&l, sdxl ? &g : NULL, &json, err)) goto out;
  if (fputs(json, stdout) == EOF || fputc('\n', stdout) == EOF || fflush(stdout) == EOF) {
    snprintf(err, sizeof err, "cannot write the output");
    goto out;
  }
  rc = 0;
out:
  if (rc) fprintf(stderr, "luna tokenize: %s\n", err[0] ? err : "failed");
  free(json);
  tok_chunks_free(&l);
  tok_chunks_free(&g);
  tok_vocab_free(v);
  return rc;
}
