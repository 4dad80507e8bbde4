#!/usr/bin/python3
"""make_vae.py -- random-weight AutoencoderKL (SD-style f8 VAE) files with real tensor names.

The architecture is NUMERICS.md section 6 (ComfyUI's ldm Encoder/Decoder): widths
ch*ch_mult[i], num_res_blocks ResBlocks per encoder level and num_res_blocks+1 per decoder
level, a mid block (ResBlock, single-head attention, ResBlock), GroupNorm(32) everywhere,
quant_conv/post_quant_conv 1x1 when 'quant' (SD1/SD2/SDXL), none without (SD3/Flux style).
The spatial factor is 2**(len(ch_mult)-1): 8 for the real (1,2,4,4).

Every tensor comes from its own generator seeded by (seed, its LDM name), so a tensor has
the same values whatever the layout or the other tensors of the file: the "ldm",
"checkpoint" and "diffusers" files written with the same seed and sizes hold the same
weights (attention weights only change shape, [C,C,1,1] <-> [C,C]).

Layouts:
  ldm         encoder.*, decoder.*, quant_conv.*, post_quant_conv.*   (standalone VAE file)
  checkpoint  the same under "first_stage_model." plus a few fake UNet / text-encoder /
              scheduler tensors that a VAE loader must ignore
  diffusers   encoder.down_blocks.{i}.resnets.{j}.{norm1,conv1,norm2,conv2,conv_shortcut},
              encoder.down_blocks.{i}.downsamplers.0.conv, {encoder,decoder}.mid_block.
              resnets.{0,1}, mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
              (Linear [C,C] weights), conv_norm_out, conv_out;
              decoder.up_blocks.{i} = LDM decoder.up.{n-1-i} (reversed level order),
              decoder.up_blocks.{i}.upsamplers.0.conv.
              old_attn=True writes the older diffusers attention names
              query/key/value/proj_attn instead of to_q/to_k/to_v/to_out.0.
  attn_conv   True writes the attention q/k/v/proj weights as [C,C,1,1] convs, False as
              [C,C] Linear weights; default: conv for ldm/checkpoint, Linear for diffusers.

The diffusers <-> LDM correspondence follows ComfyUI comfy/diffusers_convert.py
(convert_vae_state_dict): nin_shortcut<->conv_shortcut, norm_out<->conv_norm_out,
mid.attn_1<->mid_block.attentions.0, down.{i}.block.{j}<->down_blocks.{i}.resnets.{j},
down.{i}.downsample<->down_blocks.{i}.downsamplers.0, up.{3-i}.block.{j} and
up.{3-i}.upsample<->up_blocks.{i}.resnets.{j} / upsamplers.0, mid.block_{k+1}<->
mid_block.resnets.{k}, norm/q/k/v/proj_out <-> group_norm / (to_q|query) / (to_k|key) /
(to_v|value) / (to_out.0|proj_attn), Linear attention weights reshaped to [C,C,1,1].
ComfyUI hard-codes 4 levels (3-i); this generator writes n-1-i for n levels, which is the
same for the real 4-level VAE.

Weight magnitudes (chosen so that a random N(0,1) latent decodes to an image that spans
most of [0,1] without being mostly clamped):
  conv / attention weights   N(0, (g/sqrt(fan_in))^2), fan_in = C_in*k*k, with
                             g = 1            conv_in, conv1, nin_shortcut, up/downsample
                                              convs, q, k, v, quant convs, encoder conv_out
                             g = BRANCH_GAIN  conv2 of every ResBlock and attention proj_out
                                 (0.5)        (the last layer of each residual branch)
                             g = OUT_GAIN     decoder.conv_out, whose weights are then made
                                 (1.0)        zero-mean per output channel (silu's positive
                                              mean would otherwise shift each colour)
  biases                     N(0, 0.02^2)
  GroupNorm                  gamma = 1 + N(0, 0.1^2), beta = N(0, 0.02^2)
Why: each branch input is GroupNorm-ed, so a branch adds a roughly fixed variance to the
residual stream; with g = 1 on conv2 the stream std grows 1.0 -> 2.4 through the 14
decoder ResBlocks, with 0.5 only 0.9 -> 1.4 (encoder 0.6 -> 1.1), at ch 32 and ch 128
alike. The decoded spread is then set by norm_out/silu/conv_out alone. Measured (N(0,1)
latent, seeds 0-2 averaged, 16x16 latent):
  ch 32,  (1,2,4,4), z4:  pre-clamp std 0.56, mean +0.02; image std 0.25, 3.9% at 0,
                          4.1% at 1, p5 0.05, p50 0.51, p95 0.97
  ch 32,  (1,2),     z4:  pre-clamp std 0.55; image std 0.25, 3.2% at 0, 4.1% at 1
  ch 32,  (1,2,4,4), z16: pre-clamp std 0.56; image std 0.25, 3.6% at 0, 4.0% at 1
  ch 128 (full),     z4:  pre-clamp std 0.52, mean -0.07; image std 0.24, 4.1% at 0,
                          2.1% at 1, p5 0.04, p50 0.47, p95 0.88
  full, 64x64 latent (512x512 image), seed 0: image std 0.24, 5.3% at 0, 1.6% at 1,
                          p50 0.42, p95 0.85
(OUT_GAIN 0.7 would give 1% clamped at each end and p5..p95 = 0.18..0.83; 1.0 keeps some
clamping so that the clamp is exercised.)

CLI:
  make_vae.py --layout ldm|checkpoint|diffusers --out FILE [--ch 32] [--ch-mult 1,2,4,4]
              [--num-res-blocks 2] [--latent-channels 4] [--quant|--no-quant]
              [--dtype f32|f16|bf16] [--seed N] [--full] [--old-attn]
              [--attn-conv|--attn-linear]
"""

import argparse
import json
import math
import os
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402

# the real SD1/SD2/SDXL VAE (about 83.65M parameters)
FULL = {"ch": 128, "ch_mult": (1, 2, 4, 4), "num_res_blocks": 2, "latent_channels": 4}

GROUPS = 32
BIAS_STD = 0.02
NORM_GAMMA_STD = 0.1
NORM_BETA_STD = 0.02
BRANCH_GAIN = 0.5   # conv2 of each ResBlock, attention proj_out
OUT_GAIN = 1.0      # decoder.conv_out

LAYOUTS = ("ldm", "checkpoint", "diffusers")
CKPT_PREFIX = "first_stage_model."


def _rng(seed, name):
    return np.random.default_rng([int(seed), zlib.crc32(("vae:%s" % name).encode())])


def _producer(seed, name, shape, std, mean=0.0):
    """A callable returning N(mean, std^2) float32 values of 'shape' for tensor 'name'."""
    def produce():
        a = _rng(seed, name).standard_normal(size=shape, dtype=np.float32)
        a *= np.float32(std)
        if mean:
            a += np.float32(mean)
        return a
    return produce


def _centered(produce):
    """Subtract each output channel's mean weight: silu's positive mean then adds no
    per-channel colour offset to the decoded image."""
    def centered():
        a = produce()
        a -= a.mean(axis=tuple(range(1, a.ndim)), keepdims=True, dtype=np.float64).astype(np.float32)
        return a
    return centered


def check_config(ch, ch_mult, num_res_blocks, latent_channels):
    if ch <= 0 or ch % GROUPS:
        raise ValueError("ch must be a positive multiple of 32 (GroupNorm(32))")
    if not ch_mult or any(int(m) <= 0 for m in ch_mult):
        raise ValueError("ch_mult must be a non-empty list of positive integers")
    if num_res_blocks < 1:
        raise ValueError("num_res_blocks must be >= 1")
    if latent_channels < 1:
        raise ValueError("latent_channels must be >= 1")


def vae_weight_specs(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4,
                     quant=True, seed=0):
    """Ordered {ldm_name: (shape, produce)} of one AutoencoderKL in LDM names.

    Names are those of a standalone LDM VAE file: encoder.*, decoder.*, and (quant=True)
    quant_conv.* and post_quant_conv.*. 'produce' returns float32 values."""
    ch_mult = tuple(int(m) for m in ch_mult)
    check_config(ch, ch_mult, num_res_blocks, latent_channels)
    z = int(latent_channels)
    specs = {}

    def conv(name, c_out, c_in, k, gain=1.0, centered=False):
        std = gain / math.sqrt(c_in * k * k)
        produce = _producer(seed, name + ".weight", (c_out, c_in, k, k), std)
        if centered:
            produce = _centered(produce)
        specs[name + ".weight"] = ((c_out, c_in, k, k), produce)
        specs[name + ".bias"] = ((c_out,), _producer(seed, name + ".bias", (c_out,), BIAS_STD))

    def norm(name, c):
        specs[name + ".weight"] = ((c,), _producer(seed, name + ".weight", (c,), NORM_GAMMA_STD, 1.0))
        specs[name + ".bias"] = ((c,), _producer(seed, name + ".bias", (c,), NORM_BETA_STD))

    def resblock(p, c_in, c_out):
        norm(p + "norm1", c_in)
        conv(p + "conv1", c_out, c_in, 3)
        norm(p + "norm2", c_out)
        conv(p + "conv2", c_out, c_out, 3, BRANCH_GAIN)
        if c_in != c_out:
            conv(p + "nin_shortcut", c_out, c_in, 1)

    def mid(p, c):
        resblock(p + "mid.block_1.", c, c)
        norm(p + "mid.attn_1.norm", c)
        for n in ("q", "k", "v"):
            conv(p + "mid.attn_1." + n, c, c, 1)
        conv(p + "mid.attn_1.proj_out", c, c, 1, BRANCH_GAIN)
        resblock(p + "mid.block_2.", c, c)

    n = len(ch_mult)
    # encoder
    e = "encoder."
    conv(e + "conv_in", ch, 3, 3)
    block_in = ch
    for i in range(n):
        block_out = ch * ch_mult[i]
        for j in range(num_res_blocks):
            resblock(e + "down.%d.block.%d." % (i, j), block_in, block_out)
            block_in = block_out
        if i != n - 1:
            conv(e + "down.%d.downsample.conv" % i, block_in, block_in, 3)
    mid(e, block_in)
    norm(e + "norm_out", block_in)
    conv(e + "conv_out", 2 * z, block_in, 3)
    if quant:
        conv("quant_conv", 2 * z, 2 * z, 1)
        conv("post_quant_conv", z, z, 1)
    # decoder
    d = "decoder."
    block_in = ch * ch_mult[-1]
    conv(d + "conv_in", block_in, z, 3)
    mid(d, block_in)
    for i in reversed(range(n)):
        block_out = ch * ch_mult[i]
        for j in range(num_res_blocks + 1):
            resblock(d + "up.%d.block.%d." % (i, j), block_in, block_out)
            block_in = block_out
        if i != 0:
            conv(d + "up.%d.upsample.conv" % i, block_in, block_in, 3)
    norm(d + "norm_out", block_in)
    conv(d + "conv_out", 3, block_in, 3, OUT_GAIN, centered=True)
    return specs


def make_vae_weights(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4,
                     quant=True, seed=0):
    """{ldm_name: float32 array} (see vae_weight_specs)."""
    specs = vae_weight_specs(ch, ch_mult, num_res_blocks, latent_channels, quant, seed)
    return {k: p() for k, (_, p) in specs.items()}


def param_count(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4, quant=True):
    """Number of parameters (no values are generated)."""
    specs = vae_weight_specs(ch, ch_mult, num_res_blocks, latent_channels, quant, 0)
    return sum(int(np.prod(s)) for s, _ in specs.values())


# ------------------------------------------------------------------ names

_ATTN_NEW = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_OLD = {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}
_ATTN_WEIGHTS = ("q", "k", "v", "proj_out")


def ldm_to_diffusers_name(name, n_levels, old_attn=False):
    """The diffusers name of one LDM VAE tensor name (no checkpoint prefix)."""
    parts = name.split(".")
    side = parts[0]
    if side not in ("encoder", "decoder"):
        return name  # quant_conv.*, post_quant_conv.*
    rest = parts[1:]
    if rest[0] == "down":
        i = rest[1]
        if rest[2] == "block":
            tail = ["conv_shortcut" if rest[4] == "nin_shortcut" else rest[4]] + rest[5:]
            return ".".join([side, "down_blocks", i, "resnets", rest[3]] + tail)
        if rest[2] == "downsample":
            return ".".join([side, "down_blocks", i, "downsamplers", "0"] + rest[3:])
    if rest[0] == "up":
        i = str(n_levels - 1 - int(rest[1]))
        if rest[2] == "block":
            tail = ["conv_shortcut" if rest[4] == "nin_shortcut" else rest[4]] + rest[5:]
            return ".".join([side, "up_blocks", i, "resnets", rest[3]] + tail)
        if rest[2] == "upsample":
            return ".".join([side, "up_blocks", i, "upsamplers", "0"] + rest[3:])
    if rest[0] == "mid":
        if rest[1] in ("block_1", "block_2"):
            k = str(int(rest[1][-1]) - 1)
            tail = ["conv_shortcut" if rest[2] == "nin_shortcut" else rest[2]] + rest[3:]
            return ".".join([side, "mid_block", "resnets", k] + tail)
        if rest[1] == "attn_1":
            table = _ATTN_OLD if old_attn else _ATTN_NEW
            return ".".join([side, "mid_block", "attentions", "0", table[rest[2]]] + rest[3:])
    if rest[0] == "norm_out":
        return ".".join([side, "conv_norm_out"] + rest[1:])
    if rest[0] in ("conv_in", "conv_out"):
        return name
    raise ValueError("no diffusers name for %r" % name)


def is_attn_weight(ldm_name):
    parts = ldm_name.split(".")
    return (len(parts) == 5 and parts[1] == "mid" and parts[2] == "attn_1"
            and parts[3] in _ATTN_WEIGHTS and parts[4] == "weight")


def n_levels_of(specs):
    n = 0
    while "encoder.down.%d.block.0.conv1.weight" % n in specs:
        n += 1
    return n


def _fake_other_parts(seed, dtype):
    """A few UNet / text-encoder / scheduler tensors that a VAE loader must skip."""
    def n(name, shape):
        return st_io.TensorSpec(name, dtype, shape, _producer(seed, "x:" + name, shape, 0.05))
    return [
        n("model.diffusion_model.input_blocks.0.0.weight", (32, 4, 3, 3)),
        n("model.diffusion_model.input_blocks.0.0.bias", (32,)),
        n("model.diffusion_model.out.2.weight", (4, 32, 3, 3)),
        n("model.diffusion_model.middle_block.1.norm.weight", (64,)),
        n("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", (77, 64)),
        n("cond_stage_model.transformer.text_model.final_layer_norm.weight", (64,)),
        st_io.TensorSpec("alphas_cumprod", "F32", (1000,),
                         lambda: np.cumprod(np.linspace(0.99915, 0.988, 1000, dtype=np.float32))),
    ]


def layout_specs(layout, specs, dtype="F32", old_attn=False, attn_conv=None, seed=0):
    """TensorSpecs of one file of 'layout' from LDM-named weight specs."""
    dtype = dtype.upper()
    if layout not in LAYOUTS:
        raise ValueError("unknown layout %r" % layout)
    if attn_conv is None:
        attn_conv = layout != "diffusers"
    n_levels = n_levels_of(specs)
    out = []
    for name, (shape, produce) in specs.items():
        if is_attn_weight(name) and not attn_conv:
            shape = shape[:2]
            produce = (lambda p=produce, s=shape: p().reshape(s))
        if layout == "ldm":
            out_name = name
        elif layout == "checkpoint":
            out_name = CKPT_PREFIX + name
        else:
            out_name = ldm_to_diffusers_name(name, n_levels, old_attn)
        out.append(st_io.TensorSpec(out_name, dtype, shape, produce))
    if layout == "checkpoint":
        out += _fake_other_parts(seed, dtype)
    return out


def resolve_config(ch=None, ch_mult=None, num_res_blocks=None, latent_channels=None, quant=None,
                   full=False):
    """Fill defaults: full=True gives the real SD VAE sizes; quant=None means quant convs
    exactly when latent_channels == 4."""
    base = dict(FULL) if full else {"ch": 32, "ch_mult": (1, 2, 4, 4), "num_res_blocks": 2,
                                    "latent_channels": 4}
    cfg = {
        "ch": int(ch if ch is not None and not full else base["ch"]),
        "ch_mult": tuple(int(m) for m in (ch_mult if ch_mult is not None and not full else base["ch_mult"])),
        "num_res_blocks": int(num_res_blocks if num_res_blocks is not None and not full
                              else base["num_res_blocks"]),
        "latent_channels": int(latent_channels if latent_channels is not None else base["latent_channels"]),
    }
    cfg["quant"] = (cfg["latent_channels"] == 4) if quant is None else bool(quant)
    return cfg


def write_vae(path, layout="ldm", dtype="F32", seed=0, ch=32, ch_mult=(1, 2, 4, 4),
              num_res_blocks=2, latent_channels=4, quant=None, old_attn=False, attn_conv=None,
              full=False, metadata=None):
    """Write one VAE file; returns 'path'. full=True overrides ch/ch_mult/num_res_blocks
    with the real SD VAE sizes (latent_channels and quant still apply)."""
    cfg = resolve_config(ch, ch_mult, num_res_blocks, latent_channels, quant, full)
    specs = vae_weight_specs(cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"], cfg["latent_channels"],
                             cfg["quant"], seed)
    if metadata is None:
        metadata = {"format": "pt", "generator": "luna tests/python/make_vae.py", "seed": str(seed),
                    "luna_vae_config": json.dumps({"layout": layout, **{k: (list(v) if isinstance(v, tuple) else v)
                                                                       for k, v in cfg.items()}})}
    st_io.write_specs(path, layout_specs(layout, specs, dtype, old_attn, attn_conv, seed), metadata)
    return path


def _parse_mult(text):
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("--ch-mult wants integers like 1,2,4,4")
    if not vals:
        raise argparse.ArgumentTypeError("--ch-mult is empty")
    return vals


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layout", required=True, choices=LAYOUTS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ch", type=int, default=32)
    ap.add_argument("--ch-mult", type=_parse_mult, default=(1, 2, 4, 4))
    ap.add_argument("--num-res-blocks", type=int, default=2)
    ap.add_argument("--latent-channels", type=int, default=4)
    q = ap.add_mutually_exclusive_group()
    q.add_argument("--quant", dest="quant", action="store_true", default=None,
                   help="write quant_conv/post_quant_conv (default: when latent channels == 4)")
    q.add_argument("--no-quant", dest="quant", action="store_false")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16", "F32", "F16", "BF16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="real SD VAE sizes: ch 128, ch_mult 1,2,4,4, 2 res blocks")
    ap.add_argument("--old-attn", action="store_true", help="diffusers: query/key/value/proj_attn names")
    a_ = ap.add_mutually_exclusive_group()
    a_.add_argument("--attn-conv", dest="attn_conv", action="store_true", default=None,
                    help="attention weights as [C,C,1,1] (default for ldm/checkpoint)")
    a_.add_argument("--attn-linear", dest="attn_conv", action="store_false",
                    help="attention weights as [C,C] (default for diffusers)")
    a = ap.parse_args(argv)
    try:
        write_vae(a.out, a.layout, a.dtype, a.seed, a.ch, a.ch_mult, a.num_res_blocks, a.latent_channels,
                  a.quant, a.old_attn, a.attn_conv, a.full)
    except ValueError as e:
        ap.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
