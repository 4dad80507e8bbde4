"""ref_tokenizer.py -- an independent Python model of ComfyUI's CLIP tokenization.

Two layers, written from the published rules (NUMERICS.md section 4), not from luna's C:

  ClipBPE          Hugging Face's slow CLIPTokenizer as ComfyUI runs it without ftfy:
                   special-token split, BasicTokenizer cleanup (strip_accents=False,
                   do_split_on_punc=False), the CLIP pre-token regex, byte-level BPE.
  tokenize_prompt  ComfyUI's SDTokenizer.tokenize_with_weights: escapes, the (text:w)
                   weight syntax, segment-aware chunking to 77 tokens, padding.

Run as a script it prints the same JSON as 'luna tokenize':
  ref_tokenizer.py --tokenizer DIR --text TEXT [--family sd1|sdxl]
"""

import argparse
import json
import os
import sys
import unicodedata

import regex

BOS_ID, EOS_ID = 49406, 49407
CHUNK = 77
MAX_WORD_LENGTH = 8
SPECIALS = ("<|startoftext|>", "<|endoftext|>")

PRETOKEN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE)


def byte_symbols():
    """GPT-2's reversible byte -> printable character table."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def cjk_ideograph(cp):
    """The code point ranges BERT's tokenizer surrounds with spaces."""
    spans = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
             (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
    return any(lo <= cp <= hi for lo, hi in spans)


def basic_clean(text):
    """BasicTokenizer.tokenize with lower-casing, no accent stripping, no punctuation
    split; returns the words, already lower-cased."""
    kept = []
    for ch in text:
        cp = ord(ch)
        if ch in "\t\n\r" or ch == " " or unicodedata.category(ch) == "Zs":
            kept.append(" ")
            continue
        if cp == 0 or cp == 0xFFFD or unicodedata.category(ch).startswith("C"):
            continue
        kept.append(ch)
    spaced = []
    for ch in kept:
        if cjk_ideograph(ord(ch)):
            spaced += [" ", ch, " "]
        else:
            spaced.append(ch)
    text = unicodedata.normalize("NFC", "".join(spaced))
    words = [w.lower() for w in text.split()]
    return " ".join(words).split()


class ClipBPE:
    """The vocabulary and merge ranks of one tokenizer folder."""

    def __init__(self, folder):
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            self.vocab = json.load(f)
        with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
            lines = f.read().strip().split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        lines = lines[:49152 - 256 - 2]
        self.ranks = {}
        for rank, line in enumerate(lines):
            pair = tuple(line.split())
            if len(pair) == 2:
                self.ranks[pair] = rank
        self.byte_sym = byte_symbols()
        self.unk = self.vocab["<|endoftext|>"]
        self.memo = {}

    def bpe(self, token):
        """Byte-level BPE on one pre-token; returns the symbol strings."""
        if token in SPECIALS:
            return [token]
        if token in self.memo:
            return self.memo[token]
        syms = [self.byte_sym[b] for b in token.encode("utf-8")]
        syms[-1] += "</w>"
        while len(syms) > 1:
            best, best_rank = None, None
            for pair in zip(syms, syms[1:]):
                r = self.ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            merged, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == best[0] and syms[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(syms[i])
                    i += 1
            syms = merged
        self.memo[token] = syms
        return syms

    def encode_piece(self, text):
        ids = []
        for tok in PRETOKEN.findall(" ".join(basic_clean(text)).lower()):
            ids += [self.vocab.get(s, self.unk) for s in self.bpe(tok)]
        return ids

    def encode(self, text):
        """Ids of 'text' without BOS/EOS: exact special-token strings are cut out first
        (the tokenizer's added-token split), the rest is cleaned and BPE'd."""
        ids = []
        i = 0
        start = 0
        while i < len(text):
            hit = next((s for s in SPECIALS if text.startswith(s, i)), None)
            if hit is None:
                i += 1
                continue
            if i > start:
                ids += self.encode_piece(text[start:i])
            ids.append(self.vocab[hit])
            i += len(hit)
            start = i
        if start < len(text):
            ids += self.encode_piece(text[start:])
        return ids


# ---- ComfyUI's prompt weighting ----

ESC_CLOSE, ESC_OPEN = "\0\1", "\0\2"


def escape(text):
    return text.replace("\\)", ESC_CLOSE).replace("\\(", ESC_OPEN)


def unescape(text):
    return text.replace(ESC_CLOSE, ")").replace(ESC_OPEN, "(")


def split_groups(text):
    """Top-level '( ... )' groups and the text between them. The depth counter may go
    negative on a stray ')' and is never clamped, as in ComfyUI."""
    parts, cur, depth = [], "", 0
    for ch in text:
        if ch == "(":
            if depth == 0:
                if cur:
                    parts.append(cur)
                cur = "("
            else:
                cur += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                parts.append(cur + ")")
                cur = ""
            else:
                cur += ch
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts


def weighted_segments(text, weight):
    out = []
    for part in split_groups(text):
        if len(part) < 2 or part[0] != "(" or part[-1] != ")":
            out.append((part, weight))
            continue
        inner = part[1:-1]
        w = weight * 1.1
        colon = inner.rfind(":")
        if colon > 0:
            try:
                w = float(inner[colon + 1:])
                inner = inner[:colon]
            except ValueError:
                pass
        out += weighted_segments(inner, w)
    return out


def embedding_pieces(segment):
    """A segment cut before each ' embedding:' / '\\nembedding:' (the separator's first
    character dropped), empty pieces removed."""
    pieces = regex.split(" embedding:|\nembedding:", segment)
    pieces = pieces[:1] + ["embedding:" + p for p in pieces[1:]]
    return [p for p in pieces if p != ""]


def tokenize_prompt(bpe, text, pad):
    """Chunks of CHUNK [id, weight] pairs for one encoder padding with 'pad'."""
    groups = []
    for segment, weight in weighted_segments(escape(text), 1.0):
        for piece in embedding_pieces(unescape(segment)):
            groups.append([(t, weight) for t in bpe.encode(piece)])
    chunks = []
    cur = [(BOS_ID, 1.0)]
    for group in groups:
        large = len(group) >= MAX_WORD_LENGTH
        while group:
            if len(group) + len(cur) <= CHUNK - 1:
                cur += group
                group = []
                continue
            room = CHUNK - 1 - len(cur)
            if large:
                cur += group[:room]
                group = group[room:]
                cur.append((EOS_ID, 1.0))
            else:
                cur.append((EOS_ID, 1.0))
                cur += [(pad, 1.0)] * room
            chunks.append(cur)
            cur = [(BOS_ID, 1.0)]
    cur.append((EOS_ID, 1.0))
    cur += [(pad, 1.0)] * (CHUNK - len(cur))
    chunks.append(cur)
    return [[[t, w] for t, w in c] for c in chunks]


def tokenize_family(bpe, text, family):
    """What ComfyUI's CLIP.tokenize() returns for SD1 ({"l"}) or SDXL ({"g", "l"})."""
    out = {"l": tokenize_prompt(bpe, text, EOS_ID)}
    if family == "sdxl":
        out["g"] = tokenize_prompt(bpe, text, 0)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--family", choices=("sd1", "sdxl"), default="sd1")
    args = ap.parse_args(argv)
    print(json.dumps(tokenize_family(ClipBPE(args.tokenizer), args.text, args.family)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
