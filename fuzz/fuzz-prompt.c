/* fuzz-prompt.c -- libFuzzer target for prompt parsing, BPE and chunking on the real vocabulary */
/* SPDX-License-Identifier: MIT */
/*
** The vocabulary folder comes from LUNA_FUZZ_TOKENIZER, else ../shared/clip-tokenizer
** (the project's test vocabulary, relative to the repository root).
*/
#include "core/status.h"
#include "text/tokenizer.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static tok_vocab *vocab;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  const char *dir = getenv("LUNA_FUZZ_TOKENIZER");
  char err[LUNA_ERR_LEN];
  if (tok_vocab_load(dir ? dir : "../shared/clip-tokenizer", &vocab, err)) {
    fprintf(stderr, "fuzz-prompt: %s\n", err);
    exit(1);
  }
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *text = malloc(size + 1);
  if (!text) return 0;
  for (size_t i = 0; i < size; i++) text[i] = data[i] ? (char)data[i] : ' ';
  text[size] = 0;
  char err[LUNA_ERR_LEN];
  tok_chunks c = {0};
  if (tok_tokenize(vocab, text, TOK_PAD_G, &c, err) == 0) {
    if (c.n_chunks < 1) abort();
    for (int k = 0; k < c.n_chunks; k++)
      if (c.ids[k * TOK_CHUNK] != TOK_BOS) abort(); /* every chunk starts with BOS */
    for (int64_t i = 0; i < (int64_t)c.n_chunks * TOK_CHUNK; i++)
      if (c.ids[i] < 0 || c.ids[i] >= TOK_VOCAB) abort();
  }
  tok_chunks_free(&c);
  free(text);
  return 0;
}
