#!/usr/bin/python3
"""make_loras.py -- random LoRA / LyCORIS files for luna's text encoders, with real key names.

Sizes use make_models.py's parameter names, so the same size dict makes a model and a
LoRA that fit it: family "sd1" -> width/layers size CLIP-L; family "sdxl" ->
width/layers size CLIP-G and l_width/l_layers size CLIP-L (defaulting to width/layers).
MLP = 4*width. Targets: q, k, v, out (self_attn.*_proj) and fc1, fc2 (mlp.*) of every
layer (or a subset), and optionally the text projection(s).

Formats (x is the adapter's key prefix):
  kohya      x = lora_te_ (SD1) | lora_te1_ (SDXL L) | lora_te2_ (SDXL G)
             + text_model_encoder_layers_{b}_{self_attn_q_proj|...|mlp_fc2};
             x.lora_up.weight [out,r], x.lora_down.weight [r,in], x.alpha []
  diffusers  x = text_encoder. (L) | text_encoder_2. (G) + text_model.encoder.layers.{b}.{self_attn.q_proj|...};
             x.lora_linear_layer.up.weight / .down.weight, x.alpha
  peft       the diffusers prefixes; x.lora_B.weight (up) / x.lora_A.weight (down), x.alpha
  generic    x = text_encoders.clip_l|clip_g.transformer.text_model.encoder.layers.{b}.{mod};
             kohya suffixes
  dora       kohya names + x.dora_scale [out,1] (dora_axis "out") or [1,in] ("in")
  loha       kohya prefixes; x.hada_w1_a [out,r], hada_w1_b [r,in], hada_w2_a [out,r], hada_w2_b [r,in]
  lokr       kohya prefixes; lokr_variant: "w2" (default): x.lokr_w1 [f,f] full and
             x.lokr_w2_a [out/f,r], x.lokr_w2_b [r,in/f]; "w1": x.lokr_w1_a [f,r1],
             x.lokr_w1_b [r1,f] and x.lokr_w2 [out/f,in/f] full (r1 = min(rank, f));
             "both": both factorised; "full": both full (scale 1). f = lokr_factor.
Projection (projection="g" | "l" | "both"): lora_te2_text_projection (G, [width, width]
Linear form) / lora_te1_text_projection (L) for the kohya-style formats;
text_encoders.clip_g|clip_l.transformer.text_projection for diffusers/peft/generic.
unet=True adds a few lora_unet_* (kohya-style) or unet.* (others) tensors; bogus=N adds N
text-encoder adapters (2 tensors each) on a module that does not exist, e.g.
lora_te_text_model_encoder_layers_0_self_attn_bogus.lora_up.weight: they map to nothing.

Values: every tensor comes from its own generator seeded by (seed, encoder, layer,
module, role), NOT by its name, so kohya, diffusers, peft and generic files with the
same arguments hold the same factors and give the same result.

Magnitudes ('magnitude', default 0.01): the factors are drawn so that the effective
update scale*dW of every targeted Linear has an entry std of magnitude * the std of
the base weight (make_models.linear_std(in)), i.e. each patched Linear's output moves by
about 'magnitude' relative. down-type factors have std 1/sqrt(in) and the up-type
factors take the rest; alpha is compensated (scale = alpha/rank is divided out), so any
alpha gives the same effect, unless alpha_compensation=False. Measured with ref_clip on
make_models' random encoders, all six modules in every layer, strength 1: max|dcond| /
max|cond| ~ 2e-2 (4 layers) to ~5e-2 (32 layers) for widths 128..1280, SD1 and SDXL, every
format, pooled alike; the change grows roughly like sqrt(layers), is ~linear in strength
(x2 at strength 2), and stays finite. Rank 1..64 gives the same range.
DoRA: dora_scale = base norm * (1 + magnitude * U(-1, 1)), the base
norm being the actual fp16 row/column norms of the make_models weights of model_seed
(default 0, make_models' default seed; give the seed of the model the LoRA is meant for),
or with model_seed=None the typical norm sqrt(n) * linear_std(in) (rows: n = in;
columns: n = out). On the model of model_seed a DoRA file moves the output about as much
as a LoRA (2e-2..5e-2); on another model (or with None) the ~1/sqrt(2n) spread of the
real norms around the typical one adds to it (about 0.07..0.15 at strength 1).
LoHa: each Hadamard factor product has std sqrt(target / scale).
LoKr: w1 entries have std 1 (as a product when factorised), w2 carries target / scale.

API:
  lora_specs(fmt, family, **opts) -> [st_io.TensorSpec]
  lora_tensors(fmt, family, **opts) -> {name: float32 array, values as stored}
  write_lora(path, fmt, family, metadata=None, **opts) -> path

CLI:
  make_loras.py --format kohya --family sdxl --width 192 --layers 6 --l-width 128 --l-layers 4
                --rank 4 [--modules q,k,v,out,fc1,fc2] [--only-layers 0,2] [--encoders l,g]
                [--seed N] [--dtype f16|f32|bf16] [--alpha A] [--no-alpha-compensation]
                [--magnitude M] [--unet] [--bogus N] [--projection g|l|both]
                [--dora-axis out|in] [--model-seed N|none] [--lokr-factor F]
                [--lokr-variant w2|w1|both|full] [--full] --out FILE
"""

import argparse
import math
import os
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_models  # noqa: E402
import st_io  # noqa: E402

FORMATS = ("kohya", "diffusers", "peft", "generic", "dora", "loha", "lokr")
FAMILIES = ("sd1", "sdxl")
DEFAULT_MAGNITUDE = 0.01

# short name -> (HF module, kohya module)
MODULES = {
    "q": ("self_attn.q_proj", "self_attn_q_proj"),
    "k": ("self_attn.k_proj", "self_attn_k_proj"),
    "v": ("self_attn.v_proj", "self_attn_v_proj"),
    "out": ("self_attn.out_proj", "self_attn_out_proj"),
    "fc1": ("mlp.fc1", "mlp_fc1"),
    "fc2": ("mlp.fc2", "mlp_fc2"),
}
ALL_MODULES = ("q", "k", "v", "out", "fc1", "fc2")

KOHYA_LIKE = ("kohya", "dora", "loha", "lokr")
SUFFIX = {  # (up, down)
    "kohya": (".lora_up.weight", ".lora_down.weight"),
    "generic": (".lora_up.weight", ".lora_down.weight"),
    "dora": (".lora_up.weight", ".lora_down.weight"),
    "diffusers": (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    "peft": (".lora_B.weight", ".lora_A.weight"),
}


def module_shape(module, width):
    """[out, in] of a targeted Linear."""
    if module == "fc1":
        return (4 * width, width)
    if module == "fc2":
        return (width, 4 * width)
    return (width, width)


def _rng(seed, *parts):
    tag = ":".join(str(p) for p in parts)
    return np.random.default_rng([int(seed), zlib.crc32(tag.encode())])


def _normal(seed, shape, std, *parts):
    def produce():
        a = _rng(seed, *parts).standard_normal(size=shape, dtype=np.float32)
        a *= np.float32(std)
        return a
    return produce


def _uniform(seed, shape, lo, hi, *parts):
    def produce():
        return _rng(seed, *parts).uniform(lo, hi, size=shape).astype(np.float32)
    return produce


def _prefix(fmt, family, enc, l_prefix=None, g_prefix=None):
    """The key prefix of layer adapters: x = prefix + module path."""
    if enc == "l" and l_prefix is not None:
        return l_prefix
    if enc == "g" and g_prefix is not None:
        return g_prefix
    if fmt in KOHYA_LIKE:
        if family == "sd1":
            return "lora_te_" if enc == "l" else "lora_te2_"
        return "lora_te1_" if enc == "l" else "lora_te2_"
    if fmt in ("diffusers", "peft"):
        return "text_encoder." if enc == "l" else "text_encoder_2."
    return "text_encoders.clip_%s.transformer." % enc


def _layer_key(fmt, prefix, b, module):
    hf, kohya = MODULES[module]
    if prefix.endswith("_"):  # kohya style
        return "%stext_model_encoder_layers_%d_%s" % (prefix, b, kohya)
    return "%stext_model.encoder.layers.%d.%s" % (prefix, b, hf)


def _proj_key(fmt, enc):
    if fmt in KOHYA_LIKE:
        return "lora_te1_text_projection" if enc == "l" else "lora_te2_text_projection"
    return "text_encoders.clip_%s.transformer.text_projection" % enc


def _base_norms(model_seed, enc, width, layers, b, module, axis):
    """The fp16 row ('out') or column ('in') norms of the make_models weight, [out,1]/[1,in]."""
    specs = make_models.clip_weight_specs(enc, width, layers, model_seed, projection=(enc == "g") or module == "proj")
    if module == "proj":
        name = "text_projection.weight"
    else:
        name = "text_model.encoder.layers.%d.%s.weight" % (b, MODULES[module][0])
    w = specs[name][1]().astype(np.float16).astype(np.float64)
    if axis == "out":
        return np.sqrt((w * w).sum(axis=1, keepdims=True))
    return np.sqrt((w * w).sum(axis=0, keepdims=True))


def _adapter(specs, fmt, x, shape, seed, tag, dtype, rank, alpha, compensate, magnitude,
             dora_axis, lokr_factor, lokr_variant, base_norm):
    """Append the TensorSpecs of one adapter named x for a weight of 'shape'."""
    out, n_in = shape
    target = magnitude * make_models.linear_std(n_in)  # entry std of scale * dW

    def add(suffix, shp, produce):
        specs.append(st_io.TensorSpec(x + suffix, dtype, shp, produce))

    def scale_for(dim):
        if alpha is None or not compensate or dim is None:
            return 1.0
        return float(alpha) / dim

    if fmt in ("kohya", "diffusers", "peft", "generic", "dora"):
        r = min(rank, out, n_in)
        sd = 1.0 / math.sqrt(n_in)
        su = target / (scale_for(r) * math.sqrt(r) * sd)
        up_s, down_s = SUFFIX[fmt]
        add(up_s, (out, r), _normal(seed, (out, r), su, *tag, "up"))
        add(down_s, (r, n_in), _normal(seed, (r, n_in), sd, *tag, "down"))
        if fmt == "dora":
            if dora_axis == "out":
                dshape = (out, 1)
                typical = math.sqrt(n_in) * make_models.linear_std(n_in)
            elif dora_axis == "in":
                dshape = (1, n_in)
                typical = math.sqrt(out) * make_models.linear_std(n_in)
            else:
                raise ValueError("dora_axis must be 'out' or 'in'")
            jitter = _uniform(seed, dshape, -1.0, 1.0, *tag, "dora")

            def dora(jitter=jitter, typical=typical, base_norm=base_norm):
                base = base_norm() if base_norm is not None else typical
                return (base * (1.0 + magnitude * jitter())).astype(np.float32)
            add(".dora_scale", dshape, dora)
    elif fmt == "loha":
        r = min(rank, out, n_in)
        p = math.sqrt(target / scale_for(r))  # std of each Hadamard factor product
        sb = 1.0 / math.sqrt(n_in)
        sa = p / (math.sqrt(r) * sb)
        for i in ("1", "2"):
            add(".hada_w%s_a" % i, (out, r), _normal(seed, (out, r), sa, *tag, "w%sa" % i))
            add(".hada_w%s_b" % i, (r, n_in), _normal(seed, (r, n_in), sb, *tag, "w%sb" % i))
    elif fmt == "lokr":
        f = lokr_factor
        if out % f or n_in % f:
            raise ValueError("lokr_factor %d does not divide the %dx%d weight" % (f, out, n_in))
        a, b, c, d = f, f, out // f, n_in // f
        if lokr_variant not in ("w2", "w1", "both", "full"):
            raise ValueError("lokr_variant must be w2, w1, both or full")
        w1_fact = lokr_variant in ("w1", "both")
        w2_fact = lokr_variant in ("w2", "both")
        r1 = min(rank, a, b)
        r2 = min(rank, c, d)
        dim = r2 if w2_fact else (r1 if w1_fact else None)
        s2 = target / scale_for(dim)  # entry std of w2; w1 entries have std 1
        if w1_fact:
            sb1 = 1.0 / math.sqrt(b)
            add(".lokr_w1_a", (a, r1), _normal(seed, (a, r1), 1.0 / (math.sqrt(r1) * sb1), *tag, "k1a"))
            add(".lokr_w1_b", (r1, b), _normal(seed, (r1, b), sb1, *tag, "k1b"))
        else:
            add(".lokr_w1", (a, b), _normal(seed, (a, b), 1.0, *tag, "k1"))
        if w2_fact:
            sb2 = 1.0 / math.sqrt(d)
            add(".lokr_w2_a", (c, r2), _normal(seed, (c, r2), s2 / (math.sqrt(r2) * sb2), *tag, "k2a"))
            add(".lokr_w2_b", (r2, d), _normal(seed, (r2, d), sb2, *tag, "k2b"))
        else:
            add(".lokr_w2", (c, d), _normal(seed, (c, d), s2, *tag, "k2"))
    else:
        raise ValueError("unknown format %r (one of %s)" % (fmt, ", ".join(FORMATS)))
    if alpha is not None:
        add(".alpha", (), lambda: np.array(alpha, dtype=np.float32))


def _fake_unet(specs, fmt, seed, dtype, rank, family):
    ctx = 2048 if family == "sdxl" else 768
    mods = (("down_blocks_0_attentions_0_proj_in", "down_blocks.0.attentions.0.proj_in", 320, 320),
            ("mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
             "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 320, ctx))
    for kname, dname, out, n_in in mods:
        if fmt in KOHYA_LIKE or fmt == "generic":
            x, (up_s, down_s) = "lora_unet_" + kname, SUFFIX["kohya"]
        else:
            x, (up_s, down_s) = "unet." + dname, SUFFIX[fmt]
        specs.append(st_io.TensorSpec(x + up_s, dtype, (out, rank), _normal(seed, (out, rank), 0.01, "unet", kname, "up")))
        specs.append(st_io.TensorSpec(x + down_s, dtype, (rank, n_in), _normal(seed, (rank, n_in), 0.05, "unet", kname, "down")))
        specs.append(st_io.TensorSpec(x + ".alpha", dtype, (), lambda: np.array(rank, dtype=np.float32)))


def lora_specs(fmt="kohya", family="sd1", width=128, layers=4, l_width=None, l_layers=None,
               rank=4, modules=ALL_MODULES, only_layers=None, encoders=None, seed=0, dtype="F16",
               alpha=None, alpha_compensation=True, magnitude=DEFAULT_MAGNITUDE, unet=False,
               bogus=0, projection=None, dora_axis="out", model_seed=0, lokr_factor=4,
               lokr_variant="w2", l_prefix=None, g_prefix=None):
    """TensorSpecs of one LoRA file (see the module docstring for every option).

    family "sd1": width/layers size CLIP-L; "sdxl": width/layers size G, l_width/l_layers
    size L. only_layers: None (every layer) or layer indices (each encoder takes those it
    has). encoders: which encoders get layer adapters (default all of the family).
    projection: None/False, "g", "l", "both" (True means "g" for sdxl, "l" for sd1).
    l_prefix/g_prefix override the layer key prefix (e.g. "lora_te1_" on an SD1 file)."""
    if family not in FAMILIES:
        raise ValueError("family must be 'sd1' or 'sdxl'")
    if fmt not in FORMATS:
        raise ValueError("unknown format %r (one of %s)" % (fmt, ", ".join(FORMATS)))
    dtype = dtype.upper()
    if dtype not in ("F16", "F32", "BF16"):
        raise ValueError("dtype must be F16, F32 or BF16")
    sizes = {"l": (width, layers)} if family == "sd1" else {"g": (width, layers), "l": (l_width or width, l_layers or layers)}
    if encoders is None:
        encoders = ("l",) if family == "sd1" else ("l", "g")
    for e in encoders:
        if e not in sizes:
            raise ValueError("family %s has no encoder %r" % (family, e))
    for m in modules:
        if m not in MODULES:
            raise ValueError("unknown module %r (one of %s)" % (m, ", ".join(ALL_MODULES)))
    if projection is True:
        projection = "g" if family == "sdxl" else "l"
    proj_encs = {None: (), False: (), "g": ("g",), "l": ("l",), "both": ("l", "g")}[projection]
    specs = []
    opts = dict(dtype=dtype, rank=rank, alpha=alpha, compensate=alpha_compensation, magnitude=magnitude,
                dora_axis=dora_axis, lokr_factor=lokr_factor, lokr_variant=lokr_variant)

    def norms(e, b, module, w, n):
        if fmt != "dora" or model_seed is None:
            return None
        return lambda: _base_norms(model_seed, e, w, n, b, module, dora_axis)

    for e in encoders:
        w, n = sizes[e]
        prefix = _prefix(fmt, family, e, l_prefix, g_prefix)
        for b in range(n):
            if only_layers is not None and b not in only_layers:
                continue
            for m in modules:
                _adapter(specs, fmt, _layer_key(fmt, prefix, b, m), module_shape(m, w), seed,
                         (e, b, m), base_norm=norms(e, b, m, w, n), **opts)
    for e in proj_encs:
        if e not in sizes:
            raise ValueError("family %s has no %s projection" % (family, e.upper()))
        w, n = sizes[e]
        _adapter(specs, fmt, _proj_key(fmt, e), (w, w), seed, (e, "proj"),
                 base_norm=norms(e, -1, "proj", w, n), **opts)
    lw = sizes["l"][0]
    for i in range(int(bogus)):
        prefix = _prefix(fmt, family, "l", l_prefix, g_prefix)
        name = "bogus" if i == 0 else "bogus%d" % i
        if prefix.endswith("_"):
            x, (up_s, down_s) = "%stext_model_encoder_layers_0_self_attn_%s" % (prefix, name), SUFFIX["kohya"]
        else:
            x, (up_s, down_s) = "%stext_model.encoder.layers.0.self_attn.%s" % (prefix, name), SUFFIX.get(fmt, SUFFIX["kohya"])
        specs.append(st_io.TensorSpec(x + up_s, dtype, (lw, rank), _normal(seed, (lw, rank), 0.01, "bogus", i, "up")))
        specs.append(st_io.TensorSpec(x + down_s, dtype, (rank, lw), _normal(seed, (rank, lw), 0.05, "bogus", i, "down")))
    if unet:
        _fake_unet(specs, fmt, seed, dtype, rank, family)
    return specs


def lora_tensors(fmt="kohya", family="sd1", **opts):
    """{name: float32 array} of a LoRA, the values rounded to its dtype as stored."""
    out = {}
    for s in lora_specs(fmt, family, **opts):
        a = np.asarray(s.produce(), dtype=np.float32).reshape(s.shape)
        out[s.name] = st_io.decode_array(st_io.encode_array(a, s.dtype), s.dtype, s.shape)
    return out


def write_lora(path, fmt="kohya", family="sd1", metadata=None, **opts):
    """Write one LoRA file; returns 'path'."""
    if metadata is None:
        metadata = {"format": "pt", "generator": "luna tests/python/make_loras.py",
                    "ss_network_module": {"loha": "lycoris.kohya", "lokr": "lycoris.kohya"}.get(fmt, "networks.lora"),
                    "lora_format": fmt, "seed": str(opts.get("seed", 0))}
    st_io.write_specs(str(path), lora_specs(fmt, family, **opts), metadata)
    return path


def _int_list(s):
    return [int(v) for v in s.split(",") if v.strip() != ""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--family", required=True, choices=FAMILIES)
    ap.add_argument("--width", type=int, default=128, help="sd1: CLIP-L width; sdxl: CLIP-G width")
    ap.add_argument("--layers", type=int, default=4, help="sd1: CLIP-L layers; sdxl: CLIP-G layers")
    ap.add_argument("--l-width", type=int, default=None, help="sdxl: CLIP-L width (default --width)")
    ap.add_argument("--l-layers", type=int, default=None, help="sdxl: CLIP-L layers (default --layers)")
    ap.add_argument("--full", action="store_true", help="real sizes: L 768x12, G 1280x32")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--modules", default=",".join(ALL_MODULES), help="comma list of q,k,v,out,fc1,fc2")
    ap.add_argument("--only-layers", default=None, help="comma list of layer indices (default all)")
    ap.add_argument("--encoders", default=None, help="comma list of l,g (default all of the family)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16", "F32", "F16", "BF16"])
    ap.add_argument("--alpha", type=float, default=None, help="write an alpha tensor (default none)")
    ap.add_argument("--no-alpha-compensation", action="store_true",
                    help="do not divide the factors by alpha/rank")
    ap.add_argument("--magnitude", type=float, default=DEFAULT_MAGNITUDE)
    ap.add_argument("--unet", action="store_true", help="add fake UNet LoRA tensors")
    ap.add_argument("--bogus", type=int, default=0, help="add N text-encoder adapters that map to nothing")
    ap.add_argument("--projection", default=None, choices=["g", "l", "both"])
    ap.add_argument("--dora-axis", default="out", choices=["out", "in"])
    ap.add_argument("--model-seed", default="0",
                    help="dora: scales around the norms of the make_models model of this seed "
                         "(default 0); 'none': around the typical norm")
    ap.add_argument("--lokr-factor", type=int, default=4)
    ap.add_argument("--lokr-variant", default="w2", choices=["w2", "w1", "both", "full"])
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    width, layers, lw, ll = a.width, a.layers, a.l_width, a.l_layers
    if a.full:
        width, layers = make_models.FULL["g" if a.family == "sdxl" else "l"]
        lw, ll = make_models.FULL["l"]
    write_lora(a.out, a.format, a.family, width=width, layers=layers, l_width=lw, l_layers=ll,
               rank=a.rank, modules=[m.strip() for m in a.modules.split(",") if m.strip()],
               only_layers=None if a.only_layers is None else _int_list(a.only_layers),
               encoders=None if a.encoders is None else [e.strip() for e in a.encoders.split(",") if e.strip()],
               seed=a.seed, dtype=a.dtype, alpha=a.alpha, alpha_compensation=not a.no_alpha_compensation,
               magnitude=a.magnitude, unet=a.unet, bogus=a.bogus, projection=a.projection,
               dora_axis=a.dora_axis,
               model_seed=None if a.model_seed.lower() == "none" else int(a.model_seed), lokr_factor=a.lokr_factor,
               lokr_variant=a.lokr_variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
