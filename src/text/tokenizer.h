/* tokenizer.h -- CLIP byte-level BPE and ComfyUI's prompt weighting and 77-token chunking */
/* SPDX-License-Identifier: MIT */
#ifndef LUNA_TEXT_TOKENIZER_H
#define LUNA_TEXT_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#define TOK_CHUNK 77          /* tokens per chunk, BOS and EOS included */
#define TOK_BOS 49406         /* <|startoftext|> */
#define TOK_EOS 49407         /* <|endoftext|> */
#define TOK_VOCAB 49408       /* ids are in [0, TOK_VOCAB) */
#define TOK_PAD_L TOK_EOS     /* CLIP-L pads with the end token */
#define TOK_PAD_G 0           /* SDXL's CLIP-G pads with token 0 ("!") */

/* A loaded vocabulary (vocab.json + merges.txt). Immutable after load: safe to share
** between threads. */
typedef struct tok_vocab tok_vocab;

/*
** Token chunks as ComfyUI's CLIP.tokenize() returns them for one encoder: 'n_chunks'
** chunks of TOK_CHUNK (id, weight) pairs. 'ids' and 'weights' hold n_chunks*TOK_CHUNK
** entries each and are owned by the struct (free with tok_chunks_free).
*/
typedef struct tok_chunks {
  int32_t *ids;
  double *weights;
  int n_chunks;
} tok_chunks;

/* tok_vocab_load reads 'dir'/vocab.json and 'dir'/merges.txt. On success stores the
** vocabulary in '*out' and returns 0; otherwise a negative status with a message in
** 'err' naming the file and what is wrong. */
int tok_vocab_load(const char *dir, tok_vocab **out, char *err);
void tok_vocab_free(tok_vocab *v);

/* tok_encode_text tokenizes plain text (no weight syntax) exactly as Hugging Face's
** slow CLIPTokenizer without ftfy, returning the ids WITHOUT BOS/EOS in a malloc'd
** array '*ids' of '*n' entries (caller frees). Invalid UTF-8 is an error (LUNA_EUTF8). */
int tok_encode_text(const tok_vocab *v, const char *text, size_t len,
                    int32_t **ids, size_t *n, char *err);

/* tok_tokenize is ComfyUI's SDTokenizer.tokenize_with_weights: escapes, weight syntax,
** per-segment tokenization, segment-aware chunking, padding with 'pad_token'. Fills
** '*out' (free with tok_chunks_free). */
int tok_tokenize(const tok_vocab *v, const char *text, int32_t pad_token,
                 tok_chunks *out, char *err);

void tok_chunks_free(tok_chunks *c);

/* JSON in the shape of ComfyUI's tokenize() output:
**   {"l": [[[id, weight], ... 77 pairs], ... chunks], "g": [...]}
** tok_json_parse reads the key 'key' ("l" or "g") from 'json'; returns LUNA_EMISSING
** (no message) when the key is absent, and a negative status naming the chunk and
** position at fault for anything malformed (wrong length, id out of range, non-finite
** weight). tok_json_write prints the given encoders (NULL ones are skipped) to 'out'. */
int tok_json_parse(const char *json, size_t len, const char *key, tok_chunks *out, char *err);
int tok_json_parse_file(const char *path, const char *key, tok_chunks *out, char *err);
int tok_json_write(const tok_chunks *l, const tok_chunks *g, char **out, char *err);

#endif
