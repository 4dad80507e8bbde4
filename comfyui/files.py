"""files.py -- model files as lunad names them, their text encoders' shapes, and weight CRCs.

Nothing here loads weights: shapes come from a safetensors header (the JSON at the start
of the file), so a proxy knows the real key names and shapes of ComfyUI's text-encoder
state dict without holding a byte of it.

Names. lunad resolves a model name relative to its --models-dir folders. daemon_name()
turns a file ComfyUI chose into that name: relative to the first folder of LUNA_MODEL_ROOTS
(os.pathsep-separated; the folders lunad was given, as this process sees them) that holds
the file; without LUNA_MODEL_ROOTS, relative to ComfyUI's models folder
(folder_paths.models_dir: lunad started with --models-dir ComfyUI/models) and, for a file
outside it (extra_model_paths.yaml), relative to the ComfyUI folder it was listed from.

CRC (lunad's `models verify`, clip_text_checksum): zlib.crc32 over each layer's q, k, v,
out, fc1, fc2 weight matrices ([out, in], fp16 bytes; fp32 bytes of the same fp16-rounded
values with lunad's --weight-dtype f32), layer after layer, then the text projection in
Linear form when lunad's encoder has one.
"""

import json
import os
import re
import struct
import zlib

HEADER_MAX = 100_000_000


def read_header(path):
    """{name: {"dtype", "shape", "data_offsets"}} of a safetensors file (no metadata)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > HEADER_MAX:
                raise ValueError("header length %d is not plausible" % n)
            text = f.read(n)
            if len(text) != n:
                raise ValueError("truncated header")
        hdr = json.loads(text.decode("utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError("%s: not a readable safetensors file (%s)" % (path, e)) from None
    if not isinstance(hdr, dict):
        raise ValueError("%s: the safetensors header is not a JSON object" % path)
    hdr.pop("__metadata__", None)
    return hdr


# ---------------------------------------------------------------- text encoders

class EncoderShape:
    """The sizes of one CLIP text encoder: vocab, positions, width, layers, MLP width,
    projection output width (None when the file has no projection)."""

    def __init__(self, vocab, positions, width, layers, mlp, proj):
        self.vocab, self.positions, self.width, self.layers, self.mlp, self.proj = \
            vocab, positions, width, layers, mlp, proj

    def __repr__(self):
        return "EncoderShape(%d x %d, %d layers, mlp %d, proj %s)" % (self.width, self.vocab, self.layers,
                                                                     self.mlp, self.proj)


def _count_layers(hdr, fmt):
    n = 0
    while fmt % n in hdr:
        n += 1
    return n


def _hf_shape(hdr, p, proj_key=None, proj_xp_key=None):
    tok = hdr[p + "embeddings.token_embedding.weight"]["shape"]
    pos = hdr[p + "embeddings.position_embedding.weight"]["shape"]
    n = _count_layers(hdr, p + "encoder.layers.%d.mlp.fc1.weight")
    mlp = hdr[p + "encoder.layers.0.mlp.fc1.weight"]["shape"][0] if n else 4 * tok[1]
    proj = None
    if proj_key and proj_key in hdr:
        proj = hdr[proj_key]["shape"][0]
    elif proj_xp_key and proj_xp_key in hdr:
        proj = hdr[proj_xp_key]["shape"][1]
    return EncoderShape(tok[0], pos[0], tok[1], n, mlp, proj)


def _openclip_shape(hdr, p):
    tok = hdr[p + "token_embedding.weight"]["shape"]
    pos = hdr[p + "positional_embedding"]["shape"]
    n = _count_layers(hdr, p + "transformer.resblocks.%d.ln_1.weight")
    mlp = hdr[p + "transformer.resblocks.0.mlp.c_fc.weight"]["shape"][0] if n else 4 * tok[1]
    proj = hdr[p + "text_projection"]["shape"][1] if p + "text_projection" in hdr else None
    return EncoderShape(tok[0], pos[0], tok[1], n, mlp, proj)


def encoder_shapes(path):
    """{"l": EncoderShape[, "g": EncoderShape]} of the CLIP text encoders in one file
    (an SD1 or SDXL checkpoint, or a standalone clip_l / clip_g file in the Hugging Face
    or OpenCLIP layout). Raises ValueError when there is none."""
    hdr = read_header(path)
    try:
        if "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in hdr:
            out = {"l": _hf_shape(hdr, "conditioner.embedders.0.transformer.text_model.")}
            if "conditioner.embedders.1.model.token_embedding.weight" in hdr:
                out["g"] = _openclip_shape(hdr, "conditioner.embedders.1.model.")
            return out
        if "conditioner.embedders.0.model.token_embedding.weight" in hdr:  # refiner: G only
            return {"g": _openclip_shape(hdr, "conditioner.embedders.0.model.")}
        for p in ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."):
            if p + "embeddings.token_embedding.weight" in hdr:
                return {"l": _hf_shape(hdr, p)}
        if "text_model.embeddings.token_embedding.weight" in hdr:
            s = _hf_shape(hdr, "text_model.", "text_projection.weight", "text_projection")
            if s.layers > 30:
                return {"g": s}
            if s.layers > 22:
                raise ValueError("%s: a 24-layer text encoder (CLIP-H, SD2) is not one lunad serves" % path)
            return {"l": s}
        if "token_embedding.weight" in hdr and "transformer.resblocks.0.ln_1.weight" in hdr:
            return {"g": _openclip_shape(hdr, "")}
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError("%s: an incomplete text encoder (missing or malformed %s)" % (path, e)) from None
    raise ValueError("%s: no CLIP text encoder found in this file" % path)


def family_of(shapes):
    """'sd1' for a CLIP-L alone, 'sdxl' for CLIP-L + CLIP-G; ValueError otherwise."""
    if set(shapes) == {"l"}:
        return "sd1"
    if set(shapes) == {"l", "g"}:
        return "sdxl"
    raise ValueError("text encoders %s: lunad serves CLIP-L (SD1) or CLIP-L + CLIP-G (SDXL)"
                     % "+".join(sorted("CLIP-" + k.upper() for k in shapes)))


def merge_shapes(paths):
    """encoder_shapes() of one or more files merged (a clip_l and a clip_g file)."""
    out = {}
    for p in paths:
        for k, s in encoder_shapes(p).items():
            if k in out:
                raise ValueError("two CLIP-%s text encoders among %s" % (k.upper(), ", ".join(map(str, paths))))
            out[k] = s
    return out


def clip_state_shapes(shapes):
    """The (key, shape) list of ComfyUI's text-encoder state dict (comfy.sd.CLIP's
    cond_stage_model.state_dict(): clip_l.transformer.text_model...., clip_g....) for
    these encoders. ComfyUI always builds a square text_projection; a file's own
    projection width wins."""
    out = []
    for k in ("l", "g"):
        s = shapes.get(k)
        if s is None:
            continue
        t = "clip_%s.transformer." % k
        m = t + "text_model."
        D, F = s.width, s.mlp
        out.append((m + "embeddings.token_embedding.weight", (s.vocab, D)))
        out.append((m + "embeddings.position_embedding.weight", (s.positions, D)))
        for i in range(s.layers):
            p = m + "encoder.layers.%d." % i
            for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
                out.append((p + "self_attn.%s.weight" % proj, (D, D)))
                out.append((p + "self_attn.%s.bias" % proj, (D,)))
            for ln in ("layer_norm1", "layer_norm2"):
                out.append((p + ln + ".weight", (D,)))
                out.append((p + ln + ".bias", (D,)))
            out.append((p + "mlp.fc1.weight", (F, D)))
            out.append((p + "mlp.fc1.bias", (F,)))
            out.append((p + "mlp.fc2.weight", (D, F)))
            out.append((p + "mlp.fc2.bias", (D,)))
        out.append((m + "final_layer_norm.weight", (D,)))
        out.append((m + "final_layer_norm.bias", (D,)))
        out.append((t + "text_projection.weight", (s.proj or D, D)))
        out.append(("clip_%s.logit_scale" % k, ()))
    return out


_LAYER_KEY = re.compile(r"^clip_([lg])\.transformer\.text_model\.encoder\.layers\.(\d+)\.")


def clip_family_of_keys(keys):
    """'sd1' / 'sdxl' from the keys of a ComfyUI text-encoder state dict, or None when it
    holds anything but CLIP-L (+ CLIP-G) (SD2's clip_h, SD3's t5xxl, ...)."""
    encs = set()
    for k in keys:
        head = k.split(".", 1)[0]
        if head not in ("clip_l", "clip_g"):
            return None
        encs.add(head[-1])
    if encs == {"l"}:
        return "sd1"
    if encs == {"l", "g"}:
        return "sdxl"
    return None


# ---------------------------------------------------------------- CRC of the weights

_MATS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def clip_crcs(state_dict):
    """{"l": {...}, "g": {...}}: for each encoder of a ComfyUI text-encoder state dict
    (torch tensors, any device and float dtype), the CRC-32 lunad's `models verify`
    would report for the same weights, in every form lunad may hold them:
    {(dtype, with_projection): crc} for dtype "f16" / "f32" and with_projection
    False / True."""
    import torch
    out = {}
    for k in ("l", "g"):
        p = "clip_%s.transformer." % k
        first = p + "text_model.encoder.layers.0.mlp.fc1.weight"
        if first not in state_dict:
            continue
        crc = {"f16": 0, "f32": 0}
        i = 0
        while p + "text_model.encoder.layers.%d.mlp.fc1.weight" % i in state_dict:
            for m in _MATS:
                w = state_dict[p + "text_model.encoder.layers.%d.%s.weight" % (i, m)]
                h = w.detach().to("cpu", torch.float16).contiguous()
                crc["f16"] = zlib.crc32(h.numpy().tobytes(), crc["f16"])
                crc["f32"] = zlib.crc32(h.float().numpy().tobytes(), crc["f32"])
            i += 1
        forms = {("f16", False): crc["f16"], ("f32", False): crc["f32"]}
        proj = state_dict.get(p + "text_projection.weight")
        if proj is not None and proj.dim() == 2:
            h = proj.detach().to("cpu", torch.float16).contiguous()
            forms[("f16", True)] = zlib.crc32(h.numpy().tobytes(), crc["f16"])
            forms[("f32", True)] = zlib.crc32(h.float().numpy().tobytes(), crc["f32"])
        out[k] = forms
    return out


def crcs_match(local, remote):
    """Whether lunad's verify reply 'remote' ({"l": crc, "g": crc}) matches clip_crcs()
    'local'. CLIP-G always carries its projection; CLIP-L's is in lunad only when its file
    had one (SD1 and SDXL never use it), so either form is accepted for L. Returns
    (ok, reason)."""
    if set(local) != set(remote):
        return False, "lunad holds encoders %s, the local CLIP %s" % (sorted(remote), sorted(local))
    for k, forms in local.items():
        r = remote[k]
        ok = [v for (dt, with_proj), v in forms.items() if with_proj or k == "l"]
        if k == "g" and not any(with_proj for _, with_proj in forms):
            return False, "the local CLIP-G has no text projection"
        if not isinstance(r, (int, float)) or int(r) not in ok:
            return False, "CLIP-%s weights differ (lunad's CRC-32 %s)" % (k.upper(), r)
    return True, ""


# ---------------------------------------------------------------- VAEs

def vae_info(path):
    """(latent channels, spatial factor) of the VAE in a file (standalone LDM or
    diffusers layout, or a checkpoint's first_stage_model.*)."""
    hdr = read_header(path)
    for p in ("", "first_stage_model.", "vae."):
        w = hdr.get(p + "decoder.conv_in.weight")
        if w is None:
            continue
        z = int(w["shape"][1])
        levels = _count_layers(hdr, p + "encoder.down.%d.block.0.conv1.weight") or \
            _count_layers(hdr, p + "encoder.down_blocks.%d.resnets.0.conv1.weight")
        return z, 2 ** max(levels - 1, 0) if levels else 8
    raise ValueError("%s: no VAE (decoder.conv_in.weight) found in this file" % path)


# ---------------------------------------------------------------- names

def _inside(path, root):
    try:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    except ValueError:
        return None
    if rel == os.curdir or rel.startswith(os.pardir + os.sep) or rel == os.pardir or os.path.isabs(rel):
        return None
    return rel.replace(os.sep, "/")


def daemon_name(full_path, category_folders=(), models_dir=None, roots=None):
    """The name lunad knows 'full_path' by (see the module docstring). 'roots': lunad's
    models folders as seen here (default: LUNA_MODEL_ROOTS, else 'models_dir'), tried in
    order; then 'category_folders' (ComfyUI's folders for the file's kind)."""
    if roots is None:
        env = os.environ.get("LUNA_MODEL_ROOTS", "")
        roots = [r for r in env.split(os.pathsep) if r] or ([models_dir] if models_dir else [])
    for r in list(roots) + list(category_folders):
        rel = _inside(full_path, r)
        if rel is not None:
            return rel
    raise ValueError("%s is in none of lunad's models folders (%s): start lunad with --models-dir on a "
                     "folder that holds it, and list that folder in LUNA_MODEL_ROOTS"
                     % (full_path, os.pathsep.join(map(str, list(roots) + list(category_folders))) or "none known"))
