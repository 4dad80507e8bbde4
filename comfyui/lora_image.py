"""lora_image.py -- ComfyUI's CLIP patches (LoRAAdapter, LoHa, LoKr, diff) as a safetensors image lunad parses.

A proxy CLIP's add_patches() receives what comfy.lora.load_lora made of a LoRA file:
{model key: patch}, a patch being a weight adapter object (comfy.weight_adapter:
LoRAAdapter, LoHaAdapter, LoKrAdapter, with .name and .weights) or an older tuple
("lora" | "loha" | "lokr" | "diff", weights). build_image() writes them back as one
safetensors file in the generic LoRA naming lunad reads (src/lora/lora_file.c), whose
prefix is "text_encoders." + the model key without ".weight":

  text_encoders.clip_l.transformer.text_model.encoder.layers.3.self_attn.q_proj.lora_up.weight
  text_encoders.clip_g.transformer.text_projection.hada_w1_a

Tensors keep their dtype and bytes (F16, BF16, F32; lunad widens to fp32 as ComfyUI
does); alpha is written as an F64 scalar (ComfyUI holds it as a Python float), so the
daemon computes exactly what ComfyUI would. The image is deterministic (names sorted,
compact JSON, 8-byte padding): the same patches always give the same bytes and so the
same identity.

What lunad does not apply is refused here with PatchError, naming the key: patches on
anything but the q/k/v/out/fc1/fc2 weights and the text projection (embeddings,
LayerNorms, biases), LoRA mid (Tucker) and reshape, LoHa/LoKr Tucker factors, GLoRA,
OFT, BOFT, "set" and any unknown kind, offsets and weight functions.
"""

import json
import re
import struct

import numpy as np

TARGET = re.compile(r"^clip_[lg]\.transformer\.(text_model\.encoder\.layers\.\d+\."
                    r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight|text_projection\.weight)$")


class PatchError(ValueError):
    """A patch lunad cannot apply (the message names the key and the reason)."""


def supported_target(key):
    """True when lunad can patch the text-encoder weight 'key'."""
    return bool(TARGET.match(key))


def _st_dtype_and_bytes(t, key):
    """(safetensors dtype, shape, raw little-endian bytes) of a torch tensor or array."""
    try:
        import torch
    except ImportError:  # pragma: no cover - ComfyUI always has torch
        torch = None
    if torch is not None and isinstance(t, torch.Tensor):
        t = t.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            return "BF16", list(t.shape), t.view(torch.int16).numpy().astype("<i2").tobytes()
        if t.dtype == torch.float16:
            return "F16", list(t.shape), t.numpy().astype("<f2").tobytes()
        if t.dtype == torch.float32:
            return "F32", list(t.shape), t.numpy().astype("<f4").tobytes()
        if t.dtype == torch.float64:
            return "F32", list(t.shape), t.float().numpy().astype("<f4").tobytes()
        raise PatchError("%s: a %s tensor in the patch (lunad takes F16, BF16 and F32 factors)" % (key, t.dtype))
    a = np.asarray(t)
    if a.dtype == np.float16:
        return "F16", list(a.shape), np.ascontiguousarray(a, "<f2").tobytes()
    if a.dtype in (np.float32, np.float64):
        return "F32", list(a.shape), np.ascontiguousarray(a, "<f4").tobytes()
    raise PatchError("%s: a %s array in the patch (lunad takes F16, BF16 and F32 factors)" % (key, a.dtype))


def _kind_and_weights(patch, key):
    """('lora' | 'loha' | 'lokr' | 'diff' | other, weights tuple) of a patch in any form."""
    if isinstance(patch, tuple):
        if len(patch) == 2 and isinstance(patch[0], str):
            return patch[0], tuple(patch[1])
        if len(patch) == 1:
            return "weight", patch  # a (weight,) merge entry of get_key_patches
        raise PatchError("%s: a patch tuple of %d elements is not a form this proxy knows" % (key, len(patch)))
    name = getattr(patch, "name", None)
    weights = getattr(patch, "weights", None)
    if isinstance(name, str) and weights is not None:
        return name, tuple(weights)
    raise PatchError("%s: a patch of type %s is not a form this proxy knows" % (key, type(patch).__name__))


def _none(v):
    return v is None


def adapter_tensors(key, patch):
    """{suffix: tensor-like or float} for one patch on 'key' (PatchError if lunad cannot
    apply it). Floats are alphas."""
    if not supported_target(key):
        raise PatchError("%s: lunad patches only the q/k/v/out/fc1/fc2 weights and the text projection, not "
                         "this tensor" % key)
    kind, w = _kind_and_weights(patch, key)
    out = {}
    if kind == "lora":
        if len(w) < 2:
            raise PatchError("%s: a LoRA patch without its up and down factors" % key)
        up, down = w[0], w[1]
        alpha = w[2] if len(w) > 2 else None
        mid = w[3] if len(w) > 3 else None
        dora = w[4] if len(w) > 4 else None
        reshape = w[5] if len(w) > 5 else None
        if not _none(mid):
            raise PatchError("%s: a LoRA with a mid (Tucker/LoCon) factor, which lunad does not apply" % key)
        if not _none(reshape):
            raise PatchError("%s: a LoRA with reshape_weight, which lunad does not apply" % key)
        out["lora_up.weight"], out["lora_down.weight"] = up, down
    elif kind == "loha":
        if len(w) < 5:
            raise PatchError("%s: a LoHa patch with %d weights" % (key, len(w)))
        w1a, w1b, alpha, w2a, w2b = w[:5]
        t1 = w[5] if len(w) > 5 else None
        t2 = w[6] if len(w) > 6 else None
        dora = w[7] if len(w) > 7 else None
        if not (_none(t1) and _none(t2)):
            raise PatchError("%s: a LoHa with Tucker factors (hada_t1/t2), which lunad does not apply" % key)
        out.update({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b})
    elif kind == "lokr":
        if len(w) < 7:
            raise PatchError("%s: a LoKr patch with %d weights" % (key, len(w)))
        w1, w2, alpha, w1a, w1b, w2a, w2b = w[:7]
        t2 = w[7] if len(w) > 7 else None
        dora = w[8] if len(w) > 8 else None
        if not _none(t2):
            raise PatchError("%s: a LoKr with a Tucker factor (lokr_t2), which lunad does not apply" % key)
        for sfx, full, a, b in (("lokr_w1", w1, w1a, w1b), ("lokr_w2", w2, w2a, w2b)):
            if not _none(full):
                out[sfx] = full
            elif not _none(a) and not _none(b):
                out[sfx + "_a"], out[sfx + "_b"] = a, b
            else:
                raise PatchError("%s: a LoKr patch without %s or its two factors" % (key, sfx))
    elif kind == "diff":
        if len(w) != 1 or _none(w[0]):
            raise PatchError("%s: a diff patch with %d weights" % (key, len(w)))
        return {"diff": w[0]}
    elif kind == "weight":
        raise PatchError("%s: a whole weight as a patch (model merging), which needs the weights a proxy does "
                         "not hold" % key)
    else:
        raise PatchError("%s: a '%s' patch, which lunad does not apply (it takes LoRA, LoHa, LoKr, DoRA and "
                         "diff)" % (key, kind))
    if alpha is not None:
        try:
            out["alpha"] = float(alpha)
        except (TypeError, ValueError):
            raise PatchError("%s: alpha %r is not a number" % (key, alpha)) from None
    if not _none(dora):
        out["dora_scale"] = dora
    return out


def check_patch(key, patch):
    """Raise PatchError when lunad cannot apply 'patch' on 'key' (nothing is built)."""
    adapter_tensors(key, patch)


def build_image(patches):
    """The safetensors image (bytes) of {model key: patch}."""
    entries = {}
    for key, patch in patches.items():
        prefix = "text_encoders." + key[:-len(".weight")] + "."
        for sfx, v in adapter_tensors(key, patch).items():
            name = prefix + sfx
            if isinstance(v, float):
                entries[name] = ("F64", [], struct.pack("<d", v))
            else:
                entries[name] = _st_dtype_and_bytes(v, name)
    desc, blobs, off = {}, [], 0
    for name in sorted(entries):
        dt, shape, data = entries[name]
        desc[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    text = json.dumps(desc, separators=(",", ":"), sort_keys=True).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)
