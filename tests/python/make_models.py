#!/usr/bin/python3
"""make_models.py -- random-weight CLIP text encoders with the real tensor names.

Every tensor comes from its own generator, seeded by (seed, kind, tensor name), so a
tensor has the same values whatever the layout, the file order or the other tensors
of the file: an SDXL checkpoint and a standalone clip_l/clip_g pair written with the
same seed and sizes hold the same weights.

Kinds: "l" is the OpenAI CLIP-L family (quick_gelu), "g" the OpenCLIP bigG family
(exact gelu, with text projection). Both: vocab 49408, 77 positions, MLP 4*width,
heads width/64.

Layouts (NUMERICS.md section 2):
  sd1      cond_stage_model.transformer.text_model.*  + fake UNet/VAE tensors
  sd1_old  cond_stage_model.transformer.*  (no text_model. segment)
  sdxl     conditioner.embedders.0.transformer.text_model.* (L, HF names) and
           conditioner.embedders.1.model.* (G, OpenCLIP names)
  clip_l   text_model.* [+ text_projection.weight, logit_scale]
  clip_g   text_model.* + text_projection.weight (Linear [out, in] form)

CLI:
  make_models.py --layout sdxl --width 128 --layers 32 --dtype f16 --out FILE
                 [--seed N] [--full] [--l-width W --l-layers N] [--l-projection]
"""

import argparse
import math
import os
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402

VOCAB = 49408
POSITIONS = 77
FULL = {"l": (768, 12), "g": (1280, 32)}

PREFIX = {
    "sd1": "cond_stage_model.transformer.",
    "sd1_old": "cond_stage_model.transformer.",
    "sdxl_l": "conditioner.embedders.0.transformer.",
    "sdxl_g": "conditioner.embedders.1.model.",
}


def _rng(seed, kind, name):
    return np.random.default_rng([int(seed), zlib.crc32(("%s:%s" % (kind, name)).encode())])


def _normal(seed, kind, name, shape, std, mean=0.0):
    def produce():
        a = _rng(seed, kind, name).standard_normal(size=shape, dtype=np.float32)
        a *= np.float32(std)
        if mean:
            a += np.float32(mean)
        return a
    return produce


def linear_std(n_in):
    """Std of a random Linear weight: 0.02 at CLIP-L's width, scaled by 1/sqrt(fan-in),
    so that every Linear maps unit-variance inputs to a ~0.55 std output whatever the
    width (small test models behave like full-size ones)."""
    return 0.02 * math.sqrt(768.0 / n_in)


def clip_weight_specs(kind, width, layers, seed=0, projection=None):
    """Ordered {hf_name: (shape, produce)} for one text encoder in HF layout.

    Names are relative to the standalone file ("text_model....", "text_projection.weight",
    "logit_scale"). 'projection' defaults to True for G and False for L.
    """
    if kind not in ("l", "g"):
        raise ValueError("kind must be 'l' or 'g'")
    if width % 64:
        raise ValueError("width must be a multiple of 64")
    if projection is None:
        projection = kind == "g"
    d, m = width, 4 * width
    specs = {}

    def add(name, shape, std, mean=0.0):
        specs[name] = (tuple(shape), _normal(seed, kind, name, tuple(shape), std, mean))

    t = "text_model."
    add(t + "embeddings.token_embedding.weight", (VOCAB, d), 0.02)
    add(t + "embeddings.position_embedding.weight", (POSITIONS, d), 0.02)
    for i in range(layers):
        p = t + "encoder.layers.%d." % i
        for ln in ("layer_norm1", "layer_norm2"):
            add(p + ln + ".weight", (d,), 0.1, 1.0)
            add(p + ln + ".bias", (d,), 0.02)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            add(p + "self_attn." + proj + ".weight", (d, d), linear_std(d))
            add(p + "self_attn." + proj + ".bias", (d,), 0.02)
        add(p + "mlp.fc1.weight", (m, d), linear_std(d))
        add(p + "mlp.fc1.bias", (m,), 0.02)
        add(p + "mlp.fc2.weight", (d, m), linear_std(m))
        add(p + "mlp.fc2.bias", (d,), 0.02)
    add(t + "final_layer_norm.weight", (d,), 0.1, 1.0)
    add(t + "final_layer_norm.bias", (d,), 0.02)
    if projection:
        add("text_projection.weight", (d, d), linear_std(d))
        specs["logit_scale"] = ((), lambda: np.array(math.log(100.0), dtype=np.float32))
    return specs


def make_clip_weights(kind, width, layers, seed=0, projection=None):
    """{hf_name: float32 array} for one text encoder (see clip_weight_specs)."""
    return {k: p() for k, (_, p) in clip_weight_specs(kind, width, layers, seed, projection).items()}


def n_layers_of(specs):
    n = 0
    while "text_model.encoder.layers.%d.mlp.fc1.weight" % n in specs:
        n += 1
    return n


# ------------------------------------------------------------------ layouts

def _hf_specs(specs, prefix, dtype, strip_text_model=False, keep_projection=True):
    out = []
    for name, (shape, produce) in specs.items():
        if not keep_projection and name in ("text_projection.weight", "logit_scale"):
            continue
        n = name
        if strip_text_model and n.startswith("text_model."):
            n = n[len("text_model."):]
        out.append(st_io.TensorSpec(prefix + n, dtype, shape, produce))
    return out


def _openclip_specs(specs, prefix, dtype):
    """HF-named G weights written under OpenCLIP names (the SGM checkpoint form)."""
    def src(name):
        return specs[name][1]

    def cat(names):
        return lambda: np.concatenate([src(n)() for n in names], axis=0)

    d = specs["text_model.embeddings.token_embedding.weight"][0][1]
    out = []

    def add(name, shape, produce):
        out.append(st_io.TensorSpec(prefix + name, dtype, shape, produce))

    t = "text_model."
    add("token_embedding.weight", (VOCAB, d), src(t + "embeddings.token_embedding.weight"))
    add("positional_embedding", (POSITIONS, d), src(t + "embeddings.position_embedding.weight"))
    for i in range(n_layers_of(specs)):
        h = t + "encoder.layers.%d." % i
        o = "transformer.resblocks.%d." % i
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            for s in ("weight", "bias"):
                add(o + a + "." + s, (d,), src(h + b + "." + s))
        add(o + "attn.in_proj_weight", (3 * d, d),
            cat([h + "self_attn.%s_proj.weight" % x for x in "qkv"]))
        add(o + "attn.in_proj_bias", (3 * d,),
            cat([h + "self_attn.%s_proj.bias" % x for x in "qkv"]))
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for s in ("weight", "bias"):
                shape = specs[h + b + "." + s][0]
                add(o + a + "." + s, shape, src(h + b + "." + s))
    add("ln_final.weight", (d,), src(t + "final_layer_norm.weight"))
    add("ln_final.bias", (d,), src(t + "final_layer_norm.bias"))
    if "text_projection.weight" in specs:
        w = src("text_projection.weight")
        add("text_projection", (d, d), lambda: np.ascontiguousarray(w().T))  # x @ P form
        add("logit_scale", (), src("logit_scale"))
    return out


def _position_ids(prefix):
    return st_io.TensorSpec(prefix + "embeddings.position_ids", "F32", (1, POSITIONS),
                            lambda: np.arange(POSITIONS, dtype=np.float32)[None])


def _fake_other_parts(seed, dtype, sdxl=False):
    """A few UNet/VAE/scheduler tensors that a text-encoder loader must skip."""
    def n(name, shape):
        return st_io.TensorSpec(name, dtype, shape, _normal(seed, "x", name, shape, 0.05))
    ctx = 2048 if sdxl else 768
    out = [
        n("model.diffusion_model.input_blocks.0.0.weight", (32, 4, 3, 3)),
        n("model.diffusion_model.input_blocks.0.0.bias", (32,)),
        n("model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight", (64, ctx)),
        n("first_stage_model.decoder.conv_in.weight", (64, 4, 3, 3)),
        n("first_stage_model.encoder.conv_out.bias", (8,)),
    ]
    if sdxl:
        out.append(n("model.diffusion_model.label_emb.0.0.weight", (64, 2816)))
    else:
        out.append(st_io.TensorSpec("alphas_cumprod", "F32", (1000,),
                                    lambda: np.cumprod(np.linspace(0.99915, 0.988, 1000, dtype=np.float32))))
    return out


def layout_specs(layout, dtype="F16", l_specs=None, g_specs=None, seed=0):
    """TensorSpecs of one file of 'layout' from HF-named weight specs."""
    dtype = dtype.upper()
    if layout in ("sd1", "sd1_old"):
        old = layout == "sd1_old"
        base = PREFIX[layout] + ("" if old else "text_model.")
        out = _hf_specs(l_specs, PREFIX[layout], dtype, strip_text_model=old, keep_projection=False)
        out.append(_position_ids(base))
        out += _fake_other_parts(seed, dtype)
        return out
    if layout == "sdxl":
        out = _hf_specs(l_specs, PREFIX["sdxl_l"], dtype, keep_projection=False)
        out.append(_position_ids(PREFIX["sdxl_l"] + "text_model."))
        out += _openclip_specs(g_specs, PREFIX["sdxl_g"], dtype)
        out += _fake_other_parts(seed, dtype, sdxl=True)
        return out
    if layout == "clip_l":
        return _hf_specs(l_specs, "", dtype)
    if layout == "clip_g":
        if "text_projection.weight" not in g_specs:
            raise ValueError("clip_g needs a text projection")
        return [s for s in _hf_specs(g_specs, "", dtype) if s.name != "logit_scale"]
    raise ValueError("unknown layout %r" % layout)


def write_model(path, layout, dtype="F16", seed=0, width=None, layers=None,
                l_width=None, l_layers=None, l_projection=False, metadata=None):
    """Write one model file. For 'sdxl', width/layers size G and l_width/l_layers size L
    (defaulting to width/layers); for sd1/sd1_old/clip_l, width/layers size L."""
    l_specs = g_specs = None
    if layout == "sdxl":
        g_specs = clip_weight_specs("g", width, layers, seed)
        l_specs = clip_weight_specs("l", l_width or width, l_layers or layers, seed)
    elif layout == "clip_g":
        g_specs = clip_weight_specs("g", width, layers, seed)
    else:
        l_specs = clip_weight_specs("l", width, layers, seed, projection=l_projection)
    if metadata is None:
        metadata = {"format": "pt", "generator": "luna tests/python/make_models.py",
                    "seed": str(seed)}
    st_io.write_specs(path, layout_specs(layout, dtype, l_specs, g_specs, seed), metadata)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layout", required=True, choices=["sd1", "sd1_old", "sdxl", "clip_l", "clip_g"])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--l-width", type=int, default=None, help="sdxl: CLIP-L width (default --width)")
    ap.add_argument("--l-layers", type=int, default=None, help="sdxl: CLIP-L layers (default --layers)")
    ap.add_argument("--l-projection", action="store_true", help="clip_l: add text_projection.weight")
    ap.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16", "F32", "F16", "BF16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="real sizes: L 768x12, G 1280x32")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    width, layers, lw, ll = a.width, a.layers, a.l_width, a.l_layers
    if a.full:
        kind = "g" if a.layout in ("sdxl", "clip_g") else "l"
        width, layers = FULL[kind]
        lw, ll = FULL["l"]
    write_model(a.out, a.layout, a.dtype, a.seed, width, layers, lw, ll, a.l_projection)
    return 0


if __name__ == "__main__":
    sys.exit(main())
