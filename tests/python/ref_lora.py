#!/usr/bin/python3
"""ref_lora.py -- an independent PyTorch reference for LoRA / LyCORIS on luna's text encoders.

Written from NUMERICS.md section 7 (ComfyUI's lora.py, weight_adapter/ and
model_patcher.py, as that file describes them) and the identity definition of the
LoRA spec; it shares no code with luna. It works on the Encoder objects of ref_clip.py
(HF-named fp32 weights, already rounded to fp16).

Key mapping (NUMERICS 7.1, ComfyUI's model_lora_keys_clip, for a model that has CLIP-L):
  lora_te_ / lora_te1_ text_model_encoder_layers_{b}_{m}        CLIP-L, family sd1 and sdxl
  text_encoder.text_model.encoder.layers.{b}.{mod}              CLIP-L (diffusers, PEFT)
  lora_te2_text_model_encoder_layers_{b}_{m}                    CLIP-G, family sdxl only
  text_encoder_2.text_model.encoder.layers.{b}.{mod}            CLIP-G, family sdxl only
  text_encoders.clip_l.transformer.<state name without .weight>  CLIP-L (generic)
  text_encoders.clip_g.transformer.<state name without .weight>  CLIP-G (generic, sdxl)
  lora_prior_te_text_projection, lora_te2_text_projection       G text_projection.weight
  lora_te1_text_projection                                      L text_projection.weight
                                      (a target of ComfyUI's model, unused by SD1/SDXL
                                      conditioning: mapped, but it changes no output)
Only layers the model has are mapped (b < n_layers, and b < 32 as in ComfyUI's loop).
When a file holds several names for the same target, ComfyUI's key-map order decides:
generic first, then lora_te_, lora_te1_, text_encoder. (L) / lora_te2_,
text_encoder_2. (G), lora_prior_te_ then lora_te2_ for the projection; the LAST one
present wins (it overwrites the patch of the earlier ones, whose tensors still count as
loaded).

Text-encoder keys are names starting with lora_te_, lora_te1_, lora_te2_, lora_te3_,
lora_prior_te_, text_encoder., text_encoder_2. or text_encoders.; other tensors (UNet,
...) are ignored. A text-encoder tensor that no mapped adapter consumed is "unmapped"
(ComfyUI's "lora key not loaded"); alpha and dora_scale of a mapped prefix always count
as consumed, as in ComfyUI.

Adapters (NUMERICS 7.2, tried as ComfyUI does): LoRA (up/down under the seven name
forms, + alpha, + dora_scale), LoHa (hada_w1_a/b, hada_w2_a/b), LoKr (lokr_w1 or
lokr_w1_a/b, lokr_w2 or lokr_w2_a/b), and a plain {x}.diff. Everything luna refuses
(lora_mid, reshape_weight, Tucker factors, GLoRA, OFT, BOFT, diff_b, set_weight,
w_norm/b_norm, a patch on an embedding or a LayerNorm, two adapter kinds on one prefix,
non-finite values, inconsistent shapes) raises ValueError here.

Math (NUMERICS 7.3), in torch float32:
  LoRA  dW = mm(up.flatten(1), down.flatten(1)), scale = alpha / down.shape[0] (1.0 without alpha)
  LoHa  dW = mm(w1a, w1b) * mm(w2a, w2b),        scale = alpha / w1b.shape[0]
  LoKr  dW = kron(w1, w2), scale = alpha / dim (dim = w2_b.shape[0] if w2 is factorised,
        else w1_b.shape[0]; 1.0 when both are full or without alpha)
  plain W += (strength * scale) * dW    -- the coefficient is a Python float (double),
                                           torch applies it to the fp32 tensor
  DoRA  weight_decompose: Wc = W + scale*dW; n = row norms of W (the weight before this
        patch) when dora_scale.shape[0] == out, else column norms of Wc; n += FLT_EPSILON;
        Wc *= dora_scale / n; W = Wc if strength == 1 else W + strength*(Wc - W)
  diff  W += strength * diff
A stack [(path, strength), ...] is applied file after file, sequentially in fp32, and the
result is NOT re-rounded to fp16 (luna's rule, NUMERICS 7.5).

API:
  apply_stack(encoders, stack, family) -> new encoders dict (the input is not modified)
  report(path, family, encoders=None)  -> (n_mapped_patches, unmapped_key_list)
  plan(path, family, encoders=None)    -> ({(enc, weight name): Patch}, unmapped_key_list)
  lora_identity(path)                  -> 64 lowercase hex digits
  is_te_key(name)                      -> bool
"""

import copy
import hashlib
import math
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402

FAMILIES = ("sd1", "sdxl")

TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_prior_te_",
               "text_encoder.", "text_encoder_2.", "text_encoders.")

# ComfyUI's LORA_CLIP_MAP, in its order: HF module -> kohya module name
CLIP_MAP = (("mlp.fc1", "mlp_fc1"), ("mlp.fc2", "mlp_fc2"),
            ("self_attn.k_proj", "self_attn_k_proj"), ("self_attn.q_proj", "self_attn_q_proj"),
            ("self_attn.v_proj", "self_attn_v_proj"), ("self_attn.out_proj", "self_attn_out_proj"))

MAX_LAYERS = 32  # ComfyUI's key loop: for b in range(32)
PROJ = "text_projection.weight"

# the seven LoRA name forms, in ComfyUI's detection order: (up suffix, down suffix)
LORA_FORMS = ((".lora_up.weight", ".lora_down.weight"),
              ("_lora.up.weight", "_lora.down.weight"),
              (".lora_B.weight", ".lora_A.weight"),
              (".lora.up.weight", ".lora.down.weight"),
              (".lora_B", ".lora_A"),
              (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
              (".lora_B.default.weight", ".lora_A.default.weight"))

# suffixes of adapters and extras luna does not apply; the reference refuses them too
UNSUPPORTED = (".lora_mid.weight", ".reshape_weight", ".hada_t1", ".hada_t2", ".lokr_t2",
               ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight",
               ".oft_blocks", ".oft_diag", ".rescale",
               ".w_norm", ".b_norm", ".diff_b", ".set_weight")


def is_te_key(name):
    """True when 'name' has one of the text-encoder prefixes."""
    return name.startswith(TE_PREFIXES)


# ------------------------------------------------------------------ key mapping

def _state_weights(n_layers):
    """The '.weight' tensors of ComfyUI's CLIPTextModel, as (name under 'transformer.',
    key in ref_clip's Encoder.w)."""
    out = [("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"),
           ("text_model.embeddings.position_embedding.weight", "embeddings.position_embedding.weight")]
    for i in range(n_layers):
        p = "encoder.layers.%d." % i
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"):
            out.append(("text_model." + p + m + ".weight", p + m + ".weight"))
    out.append(("text_model.final_layer_norm.weight", "final_layer_norm.weight"))
    out.append(("text_projection.weight", PROJ))
    return out


def _is_linear_target(wkey):
    if wkey == PROJ:
        return True
    return wkey.startswith("encoder.layers.") and any(
        wkey.endswith("." + m + ".weight") for m, _ in CLIP_MAP)


def key_map(family, n_layers=None):
    """{LoRA key prefix: (encoder 'l'|'g', Encoder.w key)} in ComfyUI's insertion order.

    n_layers: {'l': n, 'g': n}; None (or a missing entry) means 32, the most ComfyUI maps."""
    if family not in FAMILIES:
        raise ValueError("family must be one of %s, not %r" % (FAMILIES, family))
    encs = ("l",) if family == "sd1" else ("l", "g")
    n = {e: MAX_LAYERS for e in encs}
    if n_layers:
        for e in encs:
            if n_layers.get(e) is not None:
                n[e] = int(n_layers[e])
    km = {}
    for e in encs:  # generic names first: every .weight of the model's state dict
        for sname, wkey in _state_weights(n[e]):
            km["text_encoders.clip_%s.transformer.%s" % (e, sname[:-len(".weight")])] = (e, wkey)
    for b in range(MAX_LAYERS):
        for mod, kname in CLIP_MAP:
            if b < n["l"]:
                t = ("l", "encoder.layers.%d.%s.weight" % (b, mod))
                km["lora_te_text_model_encoder_layers_%d_%s" % (b, kname)] = t
                km["lora_te1_text_model_encoder_layers_%d_%s" % (b, kname)] = t
                km["text_encoder.text_model.encoder.layers.%d.%s" % (b, mod)] = t
            if "g" in encs and b < n["g"]:
                t = ("g", "encoder.layers.%d.%s.weight" % (b, mod))
                km["lora_te2_text_model_encoder_layers_%d_%s" % (b, kname)] = t
                km["text_encoder_2.text_model.encoder.layers.%d.%s" % (b, mod)] = t
    if "g" in encs:
        km["lora_prior_te_text_projection"] = ("g", PROJ)
        km["lora_te2_text_projection"] = ("g", PROJ)
    km["lora_te1_text_projection"] = ("l", PROJ)
    return km


# ------------------------------------------------------------------ patches

class Patch:
    """One adapter on one target weight. Factors are torch float32 tensors."""

    def __init__(self, name, target, kind, f, alpha, dora_scale):
        self.name = name            # the key prefix in the file
        self.target = target        # (enc, Encoder.w key)
        self.kind = kind            # "lora" | "loha" | "lokr" | "diff"
        self.f = f                  # {role: tensor}
        self.alpha = alpha          # Python float or None
        self.dora_scale = dora_scale

    def __repr__(self):
        return "Patch(%s -> %s:%s, %s%s)" % (self.name, self.target[0], self.target[1], self.kind,
                                           "+dora" if self.dora_scale is not None else "")

    def scale(self):
        """alpha / dim as a Python float (double), 1.0 without alpha (NUMERICS 7.3)."""
        if self.kind == "lora":
            dim = self.f["down"].shape[0]
        elif self.kind == "loha":
            dim = self.f["w1b"].shape[0]
        elif self.kind == "lokr":
            dim = None
            if "w1" not in self.f:
                dim = self.f["w1b"].shape[0]
            if "w2" not in self.f:
                dim = self.f["w2b"].shape[0]
        else:
            return 1.0
        if self.alpha is None or dim is None:
            return 1.0
        return self.alpha / dim

    def delta(self):
        """The unscaled dW, float32, as ComfyUI forms it."""
        f = self.f
        if self.kind == "lora":
            return torch.mm(f["up"].flatten(1), f["down"].flatten(1))
        if self.kind == "loha":
            return torch.mm(f["w1a"], f["w1b"]) * torch.mm(f["w2a"], f["w2b"])
        if self.kind == "lokr":
            w1 = f["w1"] if "w1" in f else torch.mm(f["w1a"], f["w1b"])
            w2 = f["w2"] if "w2" in f else torch.mm(f["w2a"], f["w2b"])
            return torch.kron(w1, w2)
        return f["diff"]

    def shape(self):
        """The target shape [out, in] its factors imply."""
        f = self.f
        if self.kind == "lora":
            return (f["up"].shape[0], f["down"].flatten(1).shape[1])
        if self.kind == "loha":
            return (f["w1a"].shape[0], f["w1b"].shape[1])
        if self.kind == "lokr":
            r1, c1 = (f["w1"].shape if "w1" in f else (f["w1a"].shape[0], f["w1b"].shape[1]))
            r2, c2 = (f["w2"].shape if "w2" in f else (f["w2a"].shape[0], f["w2b"].shape[1]))
            return (r1 * r2, c1 * c2)
        return tuple(f["diff"].shape)


def _weight_decompose(dora_scale, weight, diff, scale, strength):
    """ComfyUI's DoRA (NUMERICS 7.3), in place on the fp32 'weight'."""
    diff = diff * scale
    calc = weight + diff
    if dora_scale.shape[0] == calc.shape[0]:
        # per output row, of the weight BEFORE this patch (ComfyUI's behaviour)
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
    else:
        # per input column, of the combined weight
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True).transpose(0, 1)
    norm = norm + torch.finfo(torch.float32).eps
    calc *= dora_scale / norm
    if strength != 1.0:
        calc -= weight
        weight += strength * calc
    else:
        weight[:] = calc
    return weight


def apply_patch(weight, patch, strength):
    """Apply one patch at 'strength' to the fp32 tensor 'weight', in place; returns it."""
    strength = float(strength)
    if tuple(weight.shape) != tuple(patch.shape()):
        raise ValueError("%s: factors give a %s weight, the target %s:%s is %s"
                         % (patch.name, list(patch.shape()), patch.target[0], patch.target[1],
                            list(weight.shape)))
    if weight.dtype != torch.float32:
        raise ValueError("apply_patch needs a float32 weight")
    if patch.kind == "diff":
        weight += strength * patch.f["diff"]
        return weight
    diff = patch.delta().reshape(weight.shape)
    scale = patch.scale()
    if patch.dora_scale is not None:
        ds = patch.dora_scale
        if not ((ds.shape[0] == weight.shape[0] and ds.shape[1] == 1)
                or (ds.shape[0] == 1 and ds.shape[1] == weight.shape[1])):
            raise ValueError("%s: dora_scale %s fits neither [out, 1] nor [1, in] of %s"
                             % (patch.name, list(ds.shape), list(weight.shape)))
        return _weight_decompose(ds, weight, diff, scale, strength)
    weight += (strength * scale) * diff
    return weight


# ------------------------------------------------------------------ parsing

def _read_te(path):
    """{name: float32 numpy array} of the text-encoder tensors of a LoRA file, and the
    header (to check dtypes)."""
    hdr, _, _ = st_io.read_header(path)
    names = {k for k in hdr if is_te_key(k)}
    tensors, _ = st_io.read(path, names)
    return tensors, hdr


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _parse(tensors, km, source):
    """ComfyUI's load_lora over one file's text-encoder tensors with the key map 'km'.
    Returns ({target: Patch}, sorted unmapped names)."""
    consumed = set()
    patches = {}

    def has(n):
        return n in tensors

    def take(n):
        consumed.add(n)
        a = tensors[n]
        if not np.all(np.isfinite(a)):
            raise ValueError("%s: tensor %s holds non-finite values" % (source, n))
        return a

    def two_d(x, n, a):
        if a.ndim != 2:
            raise ValueError("%s: %s%s must be 2-D, is %s" % (source, x, n, list(a.shape)))
        return _t(a)

    for x, target in km.items():
        bad = [s for s in UNSUPPORTED if has(x + s)]
        if bad:
            raise ValueError("%s: %s%s: adapter or extra not supported by luna" % (source, x, bad[0]))
        alpha = None
        if has(x + ".alpha"):
            a = take(x + ".alpha")
            if a.size != 1:
                raise ValueError("%s: %s.alpha is not a scalar (shape %s)" % (source, x, list(a.shape)))
            alpha = float(a.reshape(-1)[0])
        dora = None
        if has(x + ".dora_scale"):
            dora = two_d(x, ".dora_scale", take(x + ".dora_scale"))
        found = []
        # LoRA: the first name form present
        for up_s, down_s in LORA_FORMS:
            if has(x + up_s):
                if not has(x + down_s):
                    raise ValueError("%s: %s%s without %s%s" % (source, x, up_s, x, down_s))
                up, down = take(x + up_s), take(x + down_s)
                if up.ndim < 2 or down.ndim < 2:
                    raise ValueError("%s: %s: LoRA factors must be at least 2-D" % (source, x))
                if up.shape[1] != down.shape[0] or any(s != 1 for s in up.shape[2:]):
                    raise ValueError("%s: %s: up %s and down %s do not chain"
                                     % (source, x, list(up.shape), list(down.shape)))
                found.append(Patch(x, target, "lora", {"up": _t(up), "down": _t(down)}, alpha, dora))
                break
        else:
            for up_s, down_s in LORA_FORMS:
                if has(x + down_s):
                    raise ValueError("%s: %s%s without %s%s" % (source, x, down_s, x, up_s))
        # LoHa
        hnames = [x + s for s in (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")]
        if any(has(n) for n in hnames):
            missing = [n for n in hnames if not has(n)]
            if missing:
                raise ValueError("%s: LoHa %s lacks %s" % (source, x, missing[0]))
            w1a, w1b, w2a, w2b = (two_d(x, "", take(n)) for n in hnames)
            if (w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0]
                    or w1a.shape[0] != w2a.shape[0] or w1b.shape[1] != w2b.shape[1]):
                raise ValueError("%s: LoHa %s: inconsistent factor shapes" % (source, x))
            found.append(Patch(x, target, "loha", {"w1a": w1a, "w1b": w1b, "w2a": w2a, "w2b": w2b},
                               alpha, dora))
        # LoKr
        knames = {r: x + ".lokr_" + r for r in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")}
        if any(has(n) for n in knames.values()):
            f = {}
            for side in ("w1", "w2"):
                full, fa, fb = knames[side], knames[side + "_a"], knames[side + "_b"]
                if has(full):
                    if has(fa) or has(fb):
                        raise ValueError("%s: LoKr %s: both %s and its factors" % (source, x, full))
                    f[side] = two_d(x, "", take(full))
                elif has(fa) and has(fb):
                    a, b = two_d(x, "", take(fa)), two_d(x, "", take(fb))
                    if a.shape[1] != b.shape[0]:
                        raise ValueError("%s: LoKr %s: %s and %s do not chain" % (source, x, fa, fb))
                    f[side + "a"], f[side + "b"] = a, b
                else:
                    raise ValueError("%s: LoKr %s: no complete %s" % (source, x, side))
            found.append(Patch(x, target, "lokr", f, alpha, dora))
        # plain diff
        if has(x + ".diff"):
            d = take(x + ".diff")
            if d.ndim != 2:
                raise ValueError("%s: %s.diff must be 2-D" % (source, x))
            found.append(Patch(x, target, "diff", {"diff": _t(d)}, None, None))
        if len(found) > 1:
            raise ValueError("%s: %s holds several adapters (%s)" % (source, x, ", ".join(p.kind for p in found)))
        if found:
            if not _is_linear_target(target[1]):
                raise ValueError("%s: %s patches %s:%s, not a Linear weight (luna refuses it)"
                                 % (source, x, target[0], target[1]))
            patches[target] = found[0]  # a later name for the same target wins, as in ComfyUI
    unmapped = sorted((n for n in tensors if n not in consumed), key=lambda s: s.encode("utf-8"))
    return patches, unmapped


def _n_layers(encoders, family):
    if encoders is None:
        return None
    out = {"l": encoders["l"].n_layers}
    if family == "sdxl":
        out["g"] = encoders["g"].n_layers
    return out


def _check_family(encoders, family):
    if family not in FAMILIES:
        raise ValueError("family must be one of %s, not %r" % (FAMILIES, family))
    if encoders is None:
        return
    if encoders.get("l") is None:
        raise ValueError("no CLIP-L encoder")
    if family == "sdxl" and encoders.get("g") is None:
        raise ValueError("family sdxl needs a CLIP-G encoder")
    if family == "sd1" and encoders.get("g") is not None:
        raise ValueError("family sd1 has no CLIP-G encoder")


def plan(path, family, encoders=None):
    """Parse the LoRA at 'path' for a model of 'family'. Returns ({(enc, Encoder.w key):
    Patch}, unmapped text-encoder tensor names sorted bytewise). 'encoders' (ref_clip's
    dict) limits the mapped layers to those the model has; without it, 32 per encoder."""
    _check_family(encoders, family)
    tensors, _ = _read_te(str(path))
    return _parse(tensors, key_map(family, _n_layers(encoders, family)), str(path))


def report(path, family, encoders=None):
    """(number of mapped patches, list of unmapped text-encoder tensor names).

    The count is the number of distinct target weights the file patches in this family's
    model, the CLIP-L projection (lora_te1_text_projection) included although it changes
    no output; non-text-encoder tensors are not counted anywhere."""
    patches, unmapped = plan(path, family, encoders)
    return len(patches), unmapped


def apply_stack(encoders, stack, family):
    """Apply [(path, strength), ...] in order to copies of ref_clip's encoders.

    encoders: {'l': Encoder, 'g': Encoder or None}. Each target weight is patched in fp32
    by every file of the stack in turn and never re-rounded (NUMERICS 7.5). Returns a new
    dict of new Encoder objects; the input encoders and their tensors are unchanged."""
    _check_family(encoders, family)
    weights = {e: dict(enc.w) for e, enc in encoders.items() if enc is not None}
    fresh = set()
    for path, strength in stack:
        strength = float(strength)
        if not math.isfinite(strength):
            raise ValueError("strength must be finite, not %r" % strength)
        patches, _ = plan(path, family, encoders)
        for (e, key), p in patches.items():
            w = weights[e]
            if key not in w:
                if key == PROJ and e == "l":
                    continue  # an L projection the file lacks: unused by SD1/SDXL conditioning
                raise ValueError("%s: target %s:%s is not in the model" % (path, e, key))
            if (e, key) not in fresh:
                w[key] = w[key].clone()
                fresh.add((e, key))
            w[key] = apply_patch(w[key], p, strength)
    out = {}
    for e, enc in encoders.items():
        if enc is None:
            out[e] = None
            continue
        c = copy.copy(enc)
        c.w = weights[e]
        out[e] = c
    return out


# ------------------------------------------------------------------ identity

def lora_identity(path):
    """SHA-256 over the file's text-encoder tensors, sorted by name bytewise; each as
    u64 name length, name, u64 dtype-name length, dtype name, u64 n_dims, n_dims x u64
    shape, u64 byte length, the raw bytes (integers little-endian). 64 lowercase hex."""
    hdr, _, start = st_io.read_header(str(path))
    size = os.path.getsize(str(path))
    names = sorted((n for n in hdr if is_te_key(n)), key=lambda s: s.encode("utf-8"))
    h = hashlib.sha256()
    with open(str(path), "rb") as f:
        for n in names:
            info = hdr[n]
            begin, end = info["data_offsets"]
            shape = [int(s) for s in info["shape"]]
            count = math.prod(shape) if shape else 1
            if end - begin != count * st_io.dtype_size(info["dtype"]) or start + end > size:
                raise ValueError("%s: bad offsets for tensor %s" % (path, n))
            f.seek(start + begin)
            data = f.read(end - begin)
            nb = n.encode("utf-8")
            db = info["dtype"].encode("ascii")
            h.update(struct.pack("<Q", len(nb)) + nb)
            h.update(struct.pack("<Q", len(db)) + db)
            h.update(struct.pack("<Q", len(shape)) + b"".join(struct.pack("<Q", s) for s in shape))
            h.update(struct.pack("<Q", len(data)) + data)
    return h.hexdigest()


if __name__ == "__main__":
    # ref_lora.py FILE [sd1|sdxl]: identity, mapped patches and unmapped keys
    import json
    fam = sys.argv[2] if len(sys.argv) > 2 else "sdxl"
    n, um = report(sys.argv[1], fam)
    print(json.dumps({"id": lora_identity(sys.argv[1]), "patches": n, "unmapped": len(um),
                      "unmapped_keys": um[:3]}))
