"""comfy.sd1_clip (test stand-in): SDTokenizer / SD1Tokenizer with ComfyUI's interface, on ref_tokenizer.

Followed: Comfy-Org/ComfyUI comfy/sd1_clip.py at commit 443393b48e19da8601fb947eea05b5d57574cc7a.
Written for luna from what that file does; nothing is copied.

  SDTokenizer(tokenizer_path=None, max_length=77, pad_with_end=True, embedding_directory=None,
      embedding_size=768, embedding_key='clip_l', ..., tokenizer_data={}, tokenizer_args={})
  SDTokenizer.tokenize_with_weights(text, return_word_ids=False, tokenizer_options={}, **kwargs)
      -> chunks of 77 (token, weight) tuples; (token, weight, word_id) with
      return_word_ids (word ids 1, 2, ... per group, 0 for BOS/EOS/pad).
  SD1Tokenizer(embedding_directory=None, tokenizer_data={}, clip_name="l",
      tokenizer=SDTokenizer, name=None): the SDTokenizer lives in attribute "clip_l"
      (tokenizer_data["clip_l_tokenizer_class"] may replace its class) and
      tokenize_with_weights(text, return_word_ids=False, **kwargs) returns {"l": chunks}.
Prompt weights, BPE and chunking are tests/python/ref_tokenizer.py (NUMERICS.md 4). Each
weighted segment is cut before every "embedding:" that follows whitespace; a piece that
starts with "embedding:" (with an embedding directory) names an embedding by its first
whitespace-separated word (cut before any '<' or '['; retried without trailing commas):
found, its rows become slots of 1-D float tensors (a 1-D file tensor is one slot); not
found, a warning and the name is dropped. Whatever follows the name is tokenized as text.
Embedding files: NAME, NAME.safetensors (.pt/.bin are not modelled) in the directories
and their subdirectories; the tensor under the tokenizer's embedding key, else the first.
"""

import logging
import os
import re
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(os.path.dirname(HERE))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
import ref_tokenizer  # noqa: E402
import st_io  # noqa: E402

BOS, EOS = ref_tokenizer.BOS_ID, ref_tokenizer.EOS_ID
CHUNK = ref_tokenizer.CHUNK
_bpe = {}


def vocab_dir():
    """The real CLIP vocabulary: $LUNA_TOKENIZER_DIR, else ../shared/clip-tokenizer beside the checkout."""
    d = os.environ.get("LUNA_TOKENIZER_DIR")
    if d:
        return d
    return os.path.join(os.path.dirname(os.path.dirname(TESTS)), "..", "shared", "clip-tokenizer")


def bpe():
    d = os.path.normpath(vocab_dir())
    if d not in _bpe:
        _bpe[d] = ref_tokenizer.ClipBPE(d)
    return _bpe[d]


def _directories(directories):
    if isinstance(directories, str):
        directories = [directories]
    out = []
    for d in directories or []:
        out.append(d)
        for root, _, _ in os.walk(d, followlinks=True):
            if root not in out:
                out.append(root)
    return out


def load_embed(embedding_name, embedding_directory, embedding_size, embed_key=None):
    """The tensor of embedding 'embedding_name' (safetensors only), or None."""
    path = None
    for d in _directories(embedding_directory):
        p = os.path.abspath(os.path.join(d, embedding_name))
        base = os.path.abspath(d)
        try:
            if os.path.commonpath((base, p)) != base:
                continue
        except ValueError:
            continue
        if os.path.isfile(p):
            path = p
        elif os.path.isfile(p + ".safetensors"):
            path = p + ".safetensors"
        if path is not None:
            break
    if path is None or not path.lower().endswith(".safetensors"):
        return None
    t, _ = st_io.read(path)
    if embed_key is not None and embed_key in t:
        arr = t[embed_key]
    else:
        arr = next(iter(t.values()))
    return torch.from_numpy(arr.astype("float32"))


class SDTokenizer:
    def __init__(self, tokenizer_path=None, max_length=77, pad_with_end=True, embedding_directory=None,
                 embedding_size=768, embedding_key="clip_l", tokenizer_data={}, tokenizer_args={}, **kwargs):
        self.max_length = tokenizer_data.get("%s_max_length" % embedding_key, max_length)
        self.start_token, self.end_token = BOS, EOS
        self.pad_token = EOS if pad_with_end else 0
        self.pad_with_end = pad_with_end
        self.embedding_directory = embedding_directory
        self.embedding_size = embedding_size
        self.embedding_key = embedding_key
        self.embedding_identifier = "embedding:"
        self.max_word_length = ref_tokenizer.MAX_WORD_LENGTH

    def _try_get_embedding(self, name):
        words = name.split()
        name, leftover = (words[0] if words else ""), " ".join(words[1:])
        m = re.search(r"[<\[]", name)
        if m is not None:
            leftover = name[m.start():] + (" " + leftover if leftover else "")
            name = name[:m.start()]
        embed = load_embed(name, self.embedding_directory, self.embedding_size, self.embedding_key)
        if embed is None:
            stripped = name.strip(",")
            if len(stripped) < len(name):
                embed = load_embed(stripped, self.embedding_directory, self.embedding_size, self.embedding_key)
                return embed, name, "%s %s" % (name[len(stripped):], leftover)
        return embed, name, leftover

    def _groups(self, text):
        groups = []
        for segment, weight in ref_tokenizer.weighted_segments(ref_tokenizer.escape(text), 1.0):
            split = re.split(r"(?<=\s)" + re.escape(self.embedding_identifier), ref_tokenizer.unescape(segment))
            words = [split[0]] + [self.embedding_identifier + s for s in split[1:]]
            for word in (w for w in words if w != ""):
                if word.startswith(self.embedding_identifier) and self.embedding_directory is not None:
                    embed, name, leftover = self._try_get_embedding(word[len(self.embedding_identifier):].strip("\n"))
                    if embed is None:
                        logging.warning("warning, embedding:%s does not exist, ignoring", name)
                    elif embed.dim() == 1:
                        groups.append([(embed, weight)])
                    else:
                        groups.append([(embed[i], weight) for i in range(embed.shape[0])])
                    if leftover == "":
                        continue
                    word = leftover
                groups.append([(t, weight) for t in bpe().encode(word)])
        return groups

    def tokenize_with_weights(self, text, return_word_ids=False, tokenizer_options={}, **kwargs):
        last = self.max_length - 1
        chunks, cur = [], [(self.start_token, 1.0, 0)]
        for i, group in enumerate(self._groups(text)):
            large = len(group) >= self.max_word_length
            while group:
                if len(group) + len(cur) > last:
                    room = self.max_length - len(cur) - 1
                    if large:
                        cur += [(t, w, i + 1) for t, w in group[:room]]
                        cur.append((self.end_token, 1.0, 0))
                        group = group[room:]
                    else:
                        cur.append((self.end_token, 1.0, 0))
                        cur += [(self.pad_token, 1.0, 0)] * room
                    chunks.append(cur)
                    cur = [(self.start_token, 1.0, 0)]
                else:
                    cur += [(t, w, i + 1) for t, w in group]
                    group = []
        cur.append((self.end_token, 1.0, 0))
        if len(cur) < self.max_length:
            cur += [(self.pad_token, 1.0, 0)] * (self.max_length - len(cur))
        chunks.append(cur)
        if not return_word_ids:
            return [[(t, w) for t, w, _ in c] for c in chunks]
        return chunks

    def state_dict(self):
        return {}


class SD1Tokenizer:
    def __init__(self, embedding_directory=None, tokenizer_data={}, clip_name="l", tokenizer=SDTokenizer, name=None):
        if name is not None:
            self.clip_name = name
            self.clip = name
        else:
            self.clip_name = clip_name
            self.clip = "clip_%s" % clip_name
        tokenizer = tokenizer_data.get("%s_tokenizer_class" % self.clip, tokenizer)
        setattr(self, self.clip, tokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data))

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {self.clip_name: getattr(self, self.clip).tokenize_with_weights(text, return_word_ids, **kwargs)}

    def state_dict(self):
        return getattr(self, self.clip).state_dict()
