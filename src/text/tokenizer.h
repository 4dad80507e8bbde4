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
** '*out' (free with tok_chunks_free; zeroed on failure). Errors: LUNA_EUTF8 with the
** byte offset, LUNA_EINVAL for groups nested deeper than TOK_MAX_NESTING. Weights are
** whatever ComfyUI computes, so (x:inf) and (x:nan) give non-finite ones. */
int tok_tokenize(const tok_vocab *v, const char *text, int32_t pad_token,
                 tok_chunks *out, char *err);

void tok_chunks_free(tok_chunks *c);

/* JSON in the shape of ComfyUI's tokenize() output:
**   {"l": [[[id, weight], ... 77 pairs], ... chunks], "g": [...]}
** tok_json_parse reads the key 'key' ("l" or "g") from 'json'; returns LUNA_EMISSING
** (no message) when the key is absent, and a negative status naming the chunk and
** position at fault for anything malformed (wrong length, id out of range, non-finite
** weight). tok_json_write prints the given encoders (NULL ones are skipped) into a
** malloc'd string '*out', "g" first, weights in the shortest form that reads back
** exactly (non-finite ones as Python's json writes them: NaN, Infinity, -Infinity). */
int tok_json_parse(const char *json, size_t len, const char *key, tok_chunks *out, char *err);
int tok_json_parse_file(const char *path, const char *key, tok_chunks *out, char *err);
int tok_json_write(const tok_chunks *l, const tok_chunks *g, char **out, char *err);

/* Textual-inversion slots of an encode request (docs/PROTOCOL.md, 6 encode): one
** encoder's "embeds" matrix (an aligned copy of its rows) and the token slots that use
** them. tok_embeds_parse reads the request's "embeds" object ({"l": tensor, "g": tensor},
** described like a frame's tensors, in the binary part 'bin') into emb[0] (l) and
** emb[1] (g), checking keys, dtype, shape, range, overlap and finiteness; a NULL or
** null 'embeds' is none. tok_json_parse_slots is tok_json_parse of tokens[key] where a
** pair's id may be {"embed": i}: such slots are recorded in 'e' (whose matrix must be
** parsed first) and read as id 0. Errors name the field, chunk and position. */
struct cJSON;
typedef struct tok_embeds {
  float *rows;         /* [n_rows, dim], owned; NULL when the request sent none */
  int n_rows;
  int64_t dim;
  uint64_t begin, end; /* its bytes in the binary part */
  int32_t *slot, *row; /* per {"embed": i} slot: chunk * 77 + position, and i */
  int n, cap;
} tok_embeds;
int tok_embeds_parse(const struct cJSON *embeds, const uint8_t *bin, uint64_t bin_len, tok_embeds emb[2],
                     char *err);
int tok_json_parse_slots(const struct cJSON *tokens, const char *key, tok_chunks *out, tok_embeds *e, char *err);
void tok_embeds_free(tok_embeds *e);

/* ---- Internal to src/text: shared between tokenizer.c, bpe.c, prompt.c and
** tokens_json.c. Nothing outside src/text should call these. ---- */

/* Nesting depth of weighted groups beyond which tok_tokenize gives up (LUNA_EINVAL).
** ComfyUI recurses once per level and dies with Python's RecursionError near 1000. */
#define TOK_MAX_NESTING 1000

/* Merges of the BPE in id space: the pair ('left', 'right') of vocabulary ids merges
** into 'result' with priority 'rank' (lower merges first). */
typedef struct tok_merge {
  uint32_t left, right; /* UINT32_MAX in 'left' marks an empty slot */
  int32_t rank;
  int32_t result;
} tok_merge;

/* An open-addressing hash table of merges; immutable once built. */
typedef struct tok_merges {
  tok_merge *slots;
  uint32_t mask; /* slot count - 1 (a power of two minus one) */
  int32_t n;     /* merges stored */
} tok_merges;

/* Per-call working memory of tok_bpe (never shared between threads). */
typedef struct tok_bpe_work {
  int32_t *sym;   /* symbol id per position */
  int32_t *prev;  /* linked list over the live positions */
  int32_t *next;
  uint64_t *heap; /* (rank << 32 | position) candidates, min-heap */
  size_t cap;     /* positions the arrays hold */
  size_t heap_cap;
} tok_bpe_work;

int tok_merges_init(tok_merges *m, size_t n_expected);
/* tok_merges_add returns 0, 1 when the pair is already present, or LUNA_ENOMEM. */
int tok_merges_add(tok_merges *m, int32_t left, int32_t right, int32_t rank, int32_t result);
const tok_merge *tok_merges_find(const tok_merges *m, int32_t left, int32_t right);
void tok_merges_free(tok_merges *m);

/* tok_bpe merges the 'n' symbol ids in 'w'->sym (the caller filled them after
** tok_bpe_reserve) exactly as CLIP's bpe() does on strings: repeatedly the pair of lowest
** rank, all its occurrences left to right. Appends the resulting ids to 'out' (room for
** 'n' entries) and returns how many. */
int tok_bpe_reserve(tok_bpe_work *w, size_t n);
size_t tok_bpe(const tok_merges *m, tok_bpe_work *w, size_t n, int32_t *out);
void tok_bpe_work_free(tok_bpe_work *w);

/* A weighted piece of a prompt: 'len' bytes at 'off' of the escaped text. */
typedef struct tok_segment {
  size_t off, len;
  double weight;
} tok_segment;

/* tok_escape replaces "\)" and "\(" in 'text' by two-byte markers (NUL then 1 or 2),
** as ComfyUI's escape_important; returns a malloc'd copy in '*out' of '*out_len' bytes
** or LUNA_ENOMEM. tok_unescape turns the markers back into ')' and '(' in place and
** returns the new length. */
int tok_escape(const char *text, size_t len, char **out, size_t *out_len);
size_t tok_unescape(char *s, size_t len);

/* tok_weight_segments is ComfyUI's token_weights(escaped, 1.0): the weighted segments of
** 'len' bytes of escaped text 's', in order, in a malloc'd array. */
int tok_weight_segments(const char *s, size_t len, tok_segment **segs, size_t *n_segs, char *err);

/* tok_parse_pyfloat parses 'len' bytes of UTF-8 'str' as Python's float() does and
** returns 0 with the value in '*out', or -1 when Python would raise ValueError. */
int tok_parse_pyfloat(const char *s, size_t len, double *out);

/* tok_read_file reads all of 'path' (at most 256 MiB) into a malloc'd, NUL-terminated
** buffer '*out' of '*out_len' bytes; errors name the file. */
int tok_read_file(const char *path, char **out, size_t *out_len, char *err);

/* Python's str.isspace() for one code point. */
int tok_py_isspace(int32_t cp);

#endif
