#!/usr/bin/python3
"""ref_clip.py -- an independent PyTorch reference for luna's text encoders.

Written from NUMERICS.md (sections 2-4) with torch.nn.functional only: it shares no
code with luna. It reads the same safetensors files (every layout that
make_models.py writes, detected by key prefix), rounds every weight to fp16 and back
to fp32 as ComfyUI's text-encoder dtype policy does, and computes ComfyUI's
encode_from_tokens on a tokens JSON:

    {"l": [[[id, weight], ... 77], ...chunks], "g": [...]}

A slot's id may instead be a 1-D float vector (a textual-inversion embedding, as
ComfyUI's tokenizer puts it in the token list): that slot's input embedding is then
the vector in fp32 in place of the token embedding, plus the position embedding, and
the pooled output sits at ComfyUI's num_tokens - 1 (ids count up to the first EOS,
vectors always) -- written from comfy/sd1_clip.py SDClipModel.process_tokens and
comfy/clip_model.py CLIPTextModel_.forward of Comfy-Org/ComfyUI commit 443393b4.

SD1 (one CLIP-L): default = last layer + final LN; clip_layer -k = hidden state after
layer index n-k, with final LN; pooled = unprojected final-LN state at the first EOS.
SDXL (CLIP-L + CLIP-G): both at -2 (or -1 with clip_layer -1) without final LN,
cond = cat([L, G], -1); pooled = G's projected pooled output.

CLI:
  ref_clip.py --model F [--model F2] --tokens T.json [--clip-layer -N]
              [--lora FILE:STRENGTH ...] --out OUT.safetensors [--threads N] [--bench N]

--lora (repeatable, split at the last colon) applies a LoRA stack in the given order
through ref_lora.apply_stack after loading (family sdxl when a CLIP-G is loaded, else
sd1): merged in fp32, never re-rounded to fp16 (NUMERICS 7.5).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

if __name__ == "__main__" and "--threads" in sys.argv[:-1]:
    # OpenBLAS and OpenMP read their thread counts when they load, so a CLI run sets
    # them before torch is imported: --threads N then means N threads in all.
    _n = sys.argv[sys.argv.index("--threads") + 1]
    if _n.isdigit() and int(_n) > 0:
        for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ[_v] = _n

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402

BOS, EOS = 49406, 49407
SEQ = 77
HEAD_DIM = 64
LN_EPS = 1e-5
PAD = {"l": EOS, "g": 0}


class Encoder:
    """One CLIP text transformer with HF-named fp32 weights (already fp16-rounded)."""

    def __init__(self, kind, w, source):
        self.kind = kind
        self.w = w
        self.source = source
        self.width = w["embeddings.token_embedding.weight"].shape[1]
        self.n_layers = 0
        while "encoder.layers.%d.mlp.fc1.weight" % self.n_layers in w:
            self.n_layers += 1
        self.heads = self.width // HEAD_DIM

    def act(self, a):
        if self.kind == "l":
            return a * torch.sigmoid(1.702 * a)
        return F.gelu(a)  # exact erf form

    def forward(self, ids, capture, vectors=()):
        """ids: int64 [B, 77]; vectors: (sequence, position, fp32 tensor [D]) whose
        vector replaces the token embedding there. Returns (final-LN output, output
        after layer index 'capture' without LN, or None)."""
        w = self.w
        b, s, d, h = ids.shape[0], ids.shape[1], self.width, self.heads
        x = F.embedding(ids, w["embeddings.token_embedding.weight"])
        for sb, st, vec in vectors:
            x[sb, st] = vec
        x = x + w["embeddings.position_embedding.weight"][:s]
        mask = torch.full((s, s), -torch.finfo(torch.float32).max, dtype=torch.float32).triu_(1)
        inter = None
        for i in range(self.n_layers):
            p = "encoder.layers.%d." % i
            y = F.layer_norm(x, (d,), w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], LN_EPS)
            q = F.linear(y, w[p + "self_attn.q_proj.weight"], w[p + "self_attn.q_proj.bias"])
            k = F.linear(y, w[p + "self_attn.k_proj.weight"], w[p + "self_attn.k_proj.bias"])
            v = F.linear(y, w[p + "self_attn.v_proj.weight"], w[p + "self_attn.v_proj.bias"])
            q, k, v = (t.reshape(b, s, h, HEAD_DIM).transpose(1, 2) for t in (q, k, v))
            scores = q @ k.transpose(-1, -2) / 8.0 + mask
            att = torch.softmax(scores, dim=-1) @ v
            att = att.transpose(1, 2).reshape(b, s, d)
            x = x + F.linear(att, w[p + "self_attn.out_proj.weight"], w[p + "self_attn.out_proj.bias"])
            y = F.layer_norm(x, (d,), w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], LN_EPS)
            y = self.act(F.linear(y, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]))
            x = x + F.linear(y, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
            if i == capture:
                inter = x.clone()
        return self.final_ln(x), inter

    def final_ln(self, x):
        return F.layer_norm(x, (self.width,), self.w["final_layer_norm.weight"],
                            self.w["final_layer_norm.bias"], LN_EPS)


# ------------------------------------------------------------------ loading

def _openclip_to_hf(t):
    """OpenCLIP text-tower names (prefix already stripped) -> HF names, as ComfyUI's
    transformers_convert does: in_proj split in q, k, v order; text_projection
    transposed into Linear form."""
    out = {}
    out["embeddings.token_embedding.weight"] = t["token_embedding.weight"]
    out["embeddings.position_embedding.weight"] = t["positional_embedding"]
    out["final_layer_norm.weight"] = t["ln_final.weight"]
    out["final_layer_norm.bias"] = t["ln_final.bias"]
    i = 0
    while "transformer.resblocks.%d.ln_1.weight" % i in t:
        o, h = "transformer.resblocks.%d." % i, "encoder.layers.%d." % i
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[h + b + ".weight"] = t[o + a + ".weight"]
            out[h + b + ".bias"] = t[o + a + ".bias"]
        wq, wk, wv = np.split(t[o + "attn.in_proj_weight"], 3, axis=0)
        bq, bk, bv = np.split(t[o + "attn.in_proj_bias"], 3, axis=0)
        for n, wt, bs in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            out[h + "self_attn.%s_proj.weight" % n] = wt
            out[h + "self_attn.%s_proj.bias" % n] = bs
        i += 1
    if "text_projection" in t:
        out["text_projection.weight"] = np.ascontiguousarray(t["text_projection"].T)
    return out


def _sub(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _finish(kind, hf, source):
    w = {}
    for k, v in hf.items():
        if k.startswith("embeddings.position_ids") or k == "logit_scale":
            continue
        # ComfyUI's text-encoder dtype policy: fp16 weights, fp32 maths
        w[k] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).half().float()
    return Encoder(kind, w, source)


def load_file(path):
    """Return the encoders found in one file: a list of Encoder."""
    hdr, _, _ = st_io.read_header(path)
    keys = set(hdr)
    found = []

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    def pick(prefix):
        names = {k for k in keys if k.startswith(prefix)}
        t, _ = st_io.read(path, names)
        return _sub(t, prefix)

    if has("conditioner.embedders.0.transformer.text_model."):
        t = pick("conditioner.embedders.0.transformer.text_model.")
        found.append(_finish("l", t, path))
    if has("conditioner.embedders.1.model."):
        t = pick("conditioner.embedders.1.model.")
        found.append(_finish("g", _openclip_to_hf(t), path))
    if found:
        return found
    if has("cond_stage_model.transformer.text_model."):
        return [_finish("l", pick("cond_stage_model.transformer.text_model."), path)]
    if has("cond_stage_model.transformer.encoder."):
        return [_finish("l", pick("cond_stage_model.transformer."), path)]
    if has("text_model."):
        t = pick("text_model.")
        for extra in ("text_projection.weight", "text_projection", "logit_scale"):
            if extra in keys:
                t.update(st_io.read(path, {extra})[0])
        if "text_projection" in t:  # bare matrix: x @ P form
            t["text_projection.weight"] = np.ascontiguousarray(t.pop("text_projection").T)
        kind = "g" if "encoder.layers.30.mlp.fc1.weight" in t else "l"
        if kind == "l" and "encoder.layers.22.mlp.fc1.weight" in t:
            raise ValueError("%s: looks like CLIP-H (SD2), not supported" % path)
        return [_finish(kind, t, path)]
    if "transformer.resblocks.0.ln_1.weight" in keys:
        t, _ = st_io.read(path)
        return [_finish("g", _openclip_to_hf(t), path)]
    raise ValueError("%s: no CLIP text encoder found" % path)


def load(paths):
    """{'l': Encoder, 'g': Encoder or None} from one or more files."""
    enc = {"l": None, "g": None}
    for p in paths:
        for e in load_file(p):
            if enc[e.kind] is not None:
                raise ValueError("two CLIP-%s encoders (%s, %s)" % (e.kind.upper(), enc[e.kind].source, p))
            enc[e.kind] = e
    if enc["l"] is None:
        raise ValueError("no CLIP-L found (a lone CLIP-G is not a model luna serves)")
    return enc


# ------------------------------------------------------------------ encoding

def _layer_mode(enc, clip_layer, sdxl):
    """(capture index or None, apply final LN to the captured state) as ComfyUI's
    SDClipModel after reset_clip_options + clip_layer(clip_layer)."""
    n = enc.n_layers
    if clip_layer is None:
        if sdxl:
            return n - 2, False  # layer="hidden", layer_idx=-2, no final LN
        return None, True  # layer="last"
    if abs(clip_layer) > n:
        return None, True  # clip_layer() falls back to "last"
    idx = clip_layer if clip_layer >= 0 else n + clip_layer
    return idx, not sdxl  # SD1: layer_norm_hidden_state=True; SDXL: False


def encode_chunks(enc, chunks, clip_layer, sdxl):
    """ComfyUI's encode_token_weights for one encoder.

    chunks: list of 77-long lists of (id, weight), an id being an int or a 1-D float
    vector of the encoder's width. Returns (z [1, 77n, D] float32, pooled unprojected
    [1, D], pooled projected [1, Dp] or None)."""
    ids, vectors = [], []
    for k, c in enumerate(chunks):
        row = []
        for j, t in enumerate(c):
            if np.ndim(t[0]) == 0:  # an id (a vector is 1-D)
                row.append(int(t[0]))
                continue
            vec = torch.tensor(np.asarray(t[0], dtype=np.float32))
            if vec.ndim != 1 or vec.shape[0] != enc.width:
                raise ValueError("chunk %d slot %d: a vector of shape %s, the encoder is %d wide"
                                 % (k, j, list(vec.shape), enc.width))
            row.append(None)
            vectors.append((k, j, vec))
        ids.append(row)
    for c in ids:
        if len(c) != SEQ:
            raise ValueError("each chunk must hold 77 tokens")
    has_weights = any(float(t[1]) != 1.0 for c in chunks for t in c)
    batch = [[0 if t is None else t for t in c] for c in ids]
    if has_weights:
        batch.append([BOS, EOS] + [PAD[enc.kind]] * (SEQ - 2))
    ids_t = torch.tensor(batch, dtype=torch.int64)
    capture, ln_hidden = _layer_mode(enc, clip_layer, sdxl)
    xf, inter = enc.forward(ids_t, capture, vectors)
    if capture is None:
        out = xf
    else:
        out = enc.final_ln(inter) if ln_hidden else inter
    # pooled: the final-LN state of chunk 0 at ComfyUI's num_tokens - 1, num_tokens
    # counting ids up to and including the first EOS (all of them when there is none)
    # and every vector: with ids alone, the first EOS (the last position if none)
    n_tok, eos = 0, False
    for t in ids[0]:
        if t is None:
            n_tok += 1
        elif not eos:
            n_tok += 1
            eos = t == EOS
    pooled = xf[0:1, n_tok - 1]
    proj = None
    if "text_projection.weight" in enc.w:
        proj = F.linear(pooled, enc.w["text_projection.weight"])
    zs = []
    for k, chunk in enumerate(chunks):
        z = out[k:k + 1].clone()
        if has_weights:
            z_empty = out[-1]
            for j, t in enumerate(chunk):
                wt = float(t[1])
                if wt != 1.0:
                    z[0, j] = (z[0, j] - z_empty[j]) * wt + z_empty[j]
        zs.append(z)
    return torch.cat(zs, dim=-2), pooled, proj


def encode_loaded(enc, tokens, clip_layer=None):
    """Encode with loaded encoders; returns (cond, pooled) as float32 numpy arrays."""
    with torch.no_grad():
        if enc["g"] is None:
            z, pooled, _ = encode_chunks(enc["l"], tokens["l"], clip_layer, sdxl=False)
            return z.numpy().copy(), pooled.numpy().copy()
        zl, _, _ = encode_chunks(enc["l"], tokens["l"], clip_layer, sdxl=True)
        zg, _, pg = encode_chunks(enc["g"], tokens["g"], clip_layer, sdxl=True)
        if pg is None:
            raise ValueError("CLIP-G without text projection")
        cut = min(zl.shape[1], zg.shape[1])
        cond = torch.cat([zl[:, :cut], zg[:, :cut]], dim=-1)
        return cond.numpy().copy(), pg.numpy().copy()


def load_tokens(tokens_json):
    if isinstance(tokens_json, dict):
        return tokens_json
    with open(tokens_json) as f:
        return json.load(f)


def apply_loras(enc, loras):
    """Encoders with the LoRA stack [(path, strength), ...] applied (ref_lora.py)."""
    if not loras:
        return enc
    import ref_lora  # only needed with LoRAs
    return ref_lora.apply_stack(enc, [(str(p), float(s)) for p, s in loras],
                                "sdxl" if enc["g"] is not None else "sd1")


def parse_lora_arg(arg):
    """'FILE:STRENGTH' -> (FILE, float), split at the last colon."""
    path, sep, strength = arg.rpartition(":")
    if not sep or not path:
        raise ValueError("--lora wants FILE:STRENGTH, not %r" % arg)
    return path, float(strength)


def encode(model_paths, tokens_json, clip_layer=None, loras=None):
    """encode(paths, tokens (JSON path or dict), clip_layer=None, loras=None) -> (cond, pooled).
    loras: optional [(path, strength), ...] applied in order."""
    if isinstance(model_paths, (str, os.PathLike)):
        model_paths = [model_paths]
    enc = apply_loras(load([str(p) for p in model_paths]), loras)
    return encode_loaded(enc, load_tokens(tokens_json), clip_layer)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--clip-layer", type=int, default=None)
    ap.add_argument("--lora", action="append", default=[], metavar="FILE:STRENGTH",
                    help="apply a LoRA (repeatable, in stack order)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bench", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        loras = [parse_lora_arg(x) for x in a.lora]
    except ValueError as e:
        ap.error(str(e))
    if a.threads:
        torch.set_num_threads(a.threads)
    enc = apply_loras(load(a.model), loras)
    tokens = load_tokens(a.tokens)
    cond, pooled = encode_loaded(enc, tokens, a.clip_layer)
    if a.bench > 0:
        times = []
        for _ in range(a.bench):
            t0 = time.perf_counter()
            encode_loaded(enc, tokens, a.clip_layer)
            times.append((time.perf_counter() - t0) * 1000.0)
        print(json.dumps({"median_ms": round(float(np.median(times)), 3),
                          "min_ms": round(float(np.min(times)), 3),
                          "threads": torch.get_num_threads()}), file=sys.stderr)
    st_io.write(a.out, {"cond": cond, "pooled": pooled}, "F32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
