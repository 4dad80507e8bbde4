#!/usr/bin/python3
"""ref_vae.py -- an independent PyTorch reference for luna's VAE (decode / encode, tiled).

Written from NUMERICS.md section 6 with torch.nn.functional only (conv2d, group_norm,
silu, interpolate "nearest", pad, softmax); it shares no code with luna or make_vae.py.

Loading: a standalone LDM file (encoder.*, decoder.*, quant_conv, post_quant_conv), a
checkpoint (only "first_stage_model.*" is read; everything else is ignored), or a
diffusers file (detected by decoder.up_blocks.0.resnets.0.norm1.weight, as ComfyUI does;
renamed to LDM names, up_blocks.{i} -> up.{n-1-i}; old query/key/value/proj_attn and new
to_q/to_k/to_v/to_out.0 attention names). Attention weights may be [C,C] or [C,C,1,1].
"decoder.post_quant_conv"/"encoder.quant_conv" are moved to the top level as ComfyUI does.
Every weight is upcast to fp32 (ComfyUI's CPU VAE dtype); all maths is fp32.
The configuration (ch, ch_mult, res blocks, latent channels, quant convs) is read from the
tensor shapes; the spatial factor is 2**(levels-1) (8 for the real VAE).

Maths (ComfyUI comfy/ldm/modules/diffusionmodules/model.py, NUMERICS 6.2):
  GroupNorm(32, eps 1e-6), silu, ResBlock h = conv2(silu(norm2(conv1(silu(norm1(x)))))),
  out = (nin_shortcut(x) if in != out else x) + h; attention single head over HW,
  softmax(q k^T * C^-0.5) v, out = x + proj_out(.); downsample = pad (0,1,0,1) then 3x3
  stride 2; upsample = nearest x2 then 3x3. Encode returns the mean (first half of the
  channels after quant_conv); decode applies post_quant_conv first.

Pixel pipeline (comfy.sd.VAE):
  decode(latent [B,C,h,w]) -> image [B,f*h,f*w,3] = clamp((x+1)/2, 0, 1), channels last.
  encode(pixels [B,H,W,C>=3]) crops each spatial dim to a multiple of f at offset
  (dim % f)//2, keeps 3 channels, maps x*2-1 -> mean [B,C,H/f,W/f].
  decode_tiled / encode_tiled reproduce VAE.decode_tiled_ / encode_tiled_ and
  comfy.utils.tiled_scale_multidim (see tiled_scale below for every rule):
  decode_tiled(latent, tile_x=64, tile_y=64, overlap=16)   latent units
      A = pass(tile h 2*tile_y, w tile_x//2), B = pass(h tile_y//2, w 2*tile_x),
      C = pass(h tile_y, w tile_x), scale f; image = clamp(((A + B + C)/3 + 1)/2, 0, 1)
      (the clamp comes after the averaging).
  encode_tiled(pixels, tile_x=512, tile_y=512, overlap=64) pixel units, after the crop
      out = pass(h tile_y, w tile_x); out += pass(h tile_y//2, w 2*tile_x);
      out += pass(h 2*tile_y, w tile_x//2); out /= 3; scale 1/f, x*2-1 inside each tile.
  Quirks kept as ComfyUI has them: tiles are mapped one batch item at a time; an item
  that fits one tile in both dims is mapped whole with no blending (so a tile larger
  than the image gives the untiled result, up to the rounding of (a+a+a)/3); output
  positions not covered by any tile (possible in encode with tile sizes that are not
  multiples of f) come out as 0/0 = NaN. Refused here: tile <= overlap in a dim that
  needs tiling (ComfyUI raises for tile == overlap and yields no tiles, i.e. NaN, for
  tile < overlap).

CLI:
  ref_vae.py decode|encode --model FILE --input IN.safetensors --out OUT.safetensors
             [--tiled [--tile-size 512] [--overlap 64]] [--threads N] [--bench N]
  decode reads "latent" [B,C,h,w] and writes "image" [B,H,W,3]; encode the reverse (F32).
  --tiled uses the node semantics (VAEDecodeTiled / VAEEncodeTiled; pixel units):
  decode: if tile_size < 4*overlap then overlap = tile_size//4; then tile = tile_size//f,
  overlap = overlap//f latent units. encode: tile_size and overlap in pixels as given.
  --bench N reruns the operation N times and prints one JSON line on stderr:
  {"median_ms", "min_ms", "threads", "peak_rss_kib"} (peak RSS from getrusage).
"""

import argparse
import itertools
import json
import os
import re
import resource
import sys
import time

import numpy as np

if __name__ == "__main__" and "--threads" in sys.argv[:-1]:
    # OpenBLAS / OpenMP read their thread counts when they load: set them before torch.
    _n = sys.argv[sys.argv.index("--threads") + 1]
    if _n.isdigit() and int(_n) > 0:
        for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[_v] = _n

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402

GN_GROUPS = 32
GN_EPS = 1e-6
ATTN_CHUNK = 4096  # query rows per softmax block (bounds memory; rows are independent)

# node-level defaults (nodes.py VAEDecodeTiled / VAEEncodeTiled), pixels
NODE_TILE_SIZE = 512
NODE_OVERLAP = 64
# VAE.decode_tiled_ / encode_tiled_ defaults when called without arguments
DECODE_TILED_DEFAULTS = (64, 64, 16)     # latent units
ENCODE_TILED_DEFAULTS = (512, 512, 64)   # pixels


# ------------------------------------------------------------------ building blocks

def group_norm(x, gamma, beta):
    """GroupNorm(32 groups, eps 1e-6, affine): biased variance over (C/32)*H*W."""
    return F.group_norm(x, GN_GROUPS, gamma, beta, GN_EPS)


def conv(x, w, p, name, stride=1, padding=None):
    wt = w[p + name + ".weight"]
    if padding is None:
        padding = wt.shape[-1] // 2
    return F.conv2d(x, wt, w[p + name + ".bias"], stride=stride, padding=padding)


def resblock(x, w, p):
    """ResnetBlock (temb none, dropout 0)."""
    h = F.silu(group_norm(x, w[p + "norm1.weight"], w[p + "norm1.bias"]))
    h = conv(h, w, p, "conv1")
    h = F.silu(group_norm(h, w[p + "norm2.weight"], w[p + "norm2.bias"]))
    h = conv(h, w, p, "conv2")
    if p + "nin_shortcut.weight" in w:
        x = conv(x, w, p, "nin_shortcut", padding=0)
    return x + h


def attention(x, w, p):
    """AttnBlock: single head over the H*W positions, scale C^-0.5."""
    b, c, hh, ww = x.shape
    h = group_norm(x, w[p + "norm.weight"], w[p + "norm.bias"])
    q = conv(h, w, p, "q", padding=0).reshape(b, c, hh * ww).transpose(1, 2)   # [B, HW, C]
    k = conv(h, w, p, "k", padding=0).reshape(b, c, hh * ww)                   # [B, C, HW]
    v = conv(h, w, p, "v", padding=0).reshape(b, c, hh * ww).transpose(1, 2)   # [B, HW, C]
    scale = c ** -0.5
    rows = []
    for s in range(0, hh * ww, ATTN_CHUNK):
        att = torch.softmax(torch.bmm(q[:, s:s + ATTN_CHUNK], k) * scale, dim=-1)
        rows.append(torch.bmm(att, v))
    o = torch.cat(rows, dim=1).transpose(1, 2).reshape(b, c, hh, ww)
    return x + conv(o, w, p, "proj_out", padding=0)


def downsample(x, w, p):
    """Zero pad right and bottom by one, then 3x3 stride 2 without padding."""
    x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)
    return conv(x, w, p, "conv", stride=2, padding=0)


def upsample(x, w, p):
    """Nearest x2 (out[i] = in[i//2]) then 3x3 pad 1."""
    x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return conv(x, w, p, "conv")


# ------------------------------------------------------------------ model

class VAE:
    """AutoencoderKL with LDM-named fp32 weights (no prefix)."""

    def __init__(self, w, source="<memory>"):
        self.w = w
        self.source = source
        self.has_decoder = "decoder.conv_in.weight" in w
        self.has_encoder = "encoder.conv_in.weight" in w
        if not self.has_decoder and not self.has_encoder:
            raise ValueError("%s: no VAE encoder or decoder found" % source)
        side = "encoder" if self.has_encoder else "decoder"
        self.levels = 0
        key = "down" if side == "encoder" else "up"
        while any(k.startswith("%s.%s.%d." % (side, key, self.levels)) for k in w):
            self.levels += 1
        if self.levels == 0:
            raise ValueError("%s: no VAE levels found" % source)
        self.factor = 2 ** (self.levels - 1)
        if self.has_decoder:
            self.latent_channels = int(w["decoder.conv_in.weight"].shape[1])
        else:
            self.latent_channels = int(w["encoder.conv_out.weight"].shape[0]) // 2
        if side == "encoder":
            self.ch = int(w["encoder.conv_in.weight"].shape[0])
        else:
            self.ch = int(w["decoder.conv_out.weight"].shape[1])
        self.quant = "post_quant_conv.weight" in w or "quant_conv.weight" in w
        self.num_res_blocks = 0
        while "%s.%s.0.block.%d.conv1.weight" % (side, key, self.num_res_blocks) in w:
            self.num_res_blocks += 1
        if side == "decoder":
            self.num_res_blocks -= 1

    def config(self):
        return {"ch": self.ch, "levels": self.levels, "factor": self.factor,
                "num_res_blocks": self.num_res_blocks, "latent_channels": self.latent_channels,
                "quant": self.quant}

    # ---- raw model (NCHW, the [-1,1] space)

    def _mid(self, x, p):
        x = resblock(x, self.w, p + "mid.block_1.")
        x = attention(x, self.w, p + "mid.attn_1.")
        return resblock(x, self.w, p + "mid.block_2.")

    def decode_raw(self, z):
        """Latent [B,C,h,w] -> decoder output [B,3,f*h,f*w] (before (x+1)/2 and clamp)."""
        if not self.has_decoder:
            raise ValueError("%s has no decoder" % self.source)
        w = self.w
        z = torch.as_tensor(z, dtype=torch.float32)
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError("latent must be [B,%d,h,w], got %s" % (self.latent_channels, list(z.shape)))
        if "post_quant_conv.weight" in w:
            z = conv(z, w, "", "post_quant_conv", padding=0)
        p = "decoder."
        h = conv(z, w, p, "conv_in")
        h = self._mid(h, p)
        for i in reversed(range(self.levels)):
            j = 0
            while "%sup.%d.block.%d.conv1.weight" % (p, i, j) in w:
                h = resblock(h, w, "%sup.%d.block.%d." % (p, i, j))
                j += 1
            if i != 0:
                h = upsample(h, w, "%sup.%d.upsample." % (p, i))
        h = F.silu(group_norm(h, w[p + "norm_out.weight"], w[p + "norm_out.bias"]))
        return conv(h, w, p, "conv_out")

    def encode_raw(self, x):
        """Image in [-1,1], NCHW -> latent mean [B,C,H/f,W/f]."""
        if not self.has_encoder:
            raise ValueError("%s has no encoder" % self.source)
        w = self.w
        p = "encoder."
        h = conv(x, w, p, "conv_in")
        for i in range(self.levels):
            j = 0
            while "%sdown.%d.block.%d.conv1.weight" % (p, i, j) in w:
                h = resblock(h, w, "%sdown.%d.block.%d." % (p, i, j))
                j += 1
            if i != self.levels - 1:
                h = downsample(h, w, "%sdown.%d.downsample." % (p, i))
        h = self._mid(h, p)
        h = F.silu(group_norm(h, w[p + "norm_out.weight"], w[p + "norm_out.bias"]))
        h = conv(h, w, p, "conv_out")
        if "quant_conv.weight" in w:
            h = conv(h, w, "", "quant_conv", padding=0)
        return h[:, :h.shape[1] // 2]  # DiagonalGaussian mode(): the mean

    # ---- ComfyUI pipeline

    @staticmethod
    def process_output(x):
        return torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)

    @staticmethod
    def process_input(x):
        return x * 2.0 - 1.0

    def crop_pixels(self, pixels):
        """vae_encode_crop_pixels: each spatial dim to a multiple of f, centered at offset
        (dim % f)//2; only the first 3 channels are kept."""
        pixels = torch.as_tensor(pixels, dtype=torch.float32)
        if pixels.ndim != 4 or pixels.shape[-1] < 3:
            raise ValueError("pixels must be [B,H,W,C>=3], got %s" % list(pixels.shape))
        f = self.factor
        for d in (1, 2):
            n = pixels.shape[d]
            keep = (n // f) * f
            if keep == 0:
                raise ValueError("image smaller than %d pixels" % f)
            if keep != n:
                pixels = pixels.narrow(d, (n % f) // 2, keep)
        return pixels[..., :3]

    def decode(self, latent):
        """latent [B,C,h,w] -> image [B,f*h,f*w,3] in [0,1] (VAE.decode)."""
        with torch.no_grad():
            out = self.process_output(self.decode_raw(latent))
            return out.movedim(1, -1).contiguous()

    def encode(self, pixels):
        """pixels [B,H,W,C] in [0,1] -> latent mean [B,C,H//f,W//f] (VAE.encode)."""
        with torch.no_grad():
            x = self.crop_pixels(pixels).movedim(-1, 1)
            return self.encode_raw(self.process_input(x))

    def decode_tiled(self, latent, tile_x=64, tile_y=64, overlap=16):
        """VAE.decode_tiled_ (latent units): three tiled_scale passes with tiles
        (x//2, 2y), (2x, y//2), (x, y), summed in that order, /3, then clamp((x+1)/2)."""
        with torch.no_grad():
            s = torch.as_tensor(latent, dtype=torch.float32)
            f = self.factor
            fn = self.decode_raw
            a = tiled_scale(s, fn, (tile_y * 2, tile_x // 2), overlap, f, 3)
            b = tiled_scale(s, fn, (tile_y // 2, tile_x * 2), overlap, f, 3)
            c = tiled_scale(s, fn, (tile_y, tile_x), overlap, f, 3)
            out = self.process_output((a + b + c) / 3.0)
            return out.movedim(1, -1).contiguous()

    def encode_tiled(self, pixels, tile_x=512, tile_y=512, overlap=64):
        """VAE.encode_tiled (pixel units): crop, then three passes with scale 1/f summed
        as (x, y) + (2x, y//2) + (x//2, 2y), then /3. x*2-1 is applied per tile."""
        with torch.no_grad():
            s = self.crop_pixels(pixels).movedim(-1, 1)
            z = self.latent_channels

            def fn(t):
                return self.encode_raw(self.process_input(t))
            up = 1.0 / self.factor
            out = tiled_scale(s, fn, (tile_y, tile_x), overlap, up, z)
            out += tiled_scale(s, fn, (tile_y // 2, tile_x * 2), overlap, up, z)
            out += tiled_scale(s, fn, (tile_y * 2, tile_x // 2), overlap, up, z)
            out /= 3.0
            return out


# ------------------------------------------------------------------ tiling

def feather_mask(shape, feather):
    """The blend weights of one tile, [1,1,*shape] float32, as tiled_scale_multidim
    builds them: per dim d (in order), if feather[d] < length, for t in 0..f-1 the
    slices t and length-1-t are multiplied by (t+1)/f."""
    mask = torch.ones([1, 1] + list(shape), dtype=torch.float32)
    for d, f in enumerate(feather):
        n = shape[d]
        if f >= n:
            continue
        for t in range(f):
            a = (t + 1) / f
            mask.narrow(d + 2, t, 1).mul_(a)
            mask.narrow(d + 2, n - 1 - t, 1).mul_(a)
    return mask


def tile_starts(size, tile, overlap):
    """Tile origins along one dim: range(0, size-overlap, tile-overlap) when size > tile
    (else [0]), each clamped to [0, size-overlap]."""
    if size <= tile:
        return [0]
    if tile - overlap <= 0:
        raise ValueError("tile (%d) must be larger than overlap (%d)" % (tile, overlap))
    return [max(0, min(size - overlap, p)) for p in range(0, size - overlap, tile - overlap)]


def tiled_scale(samples, function, tile, overlap, scale, out_channels):
    """comfy.utils.tiled_scale_multidim for NCHW input, tile = (tile_h, tile_w) in input
    units, 'scale' = output units per input unit (f for decode, 1/f for encode).

    Per batch item: if the item fits one tile in every dim, the output is function(item)
    as it is. Otherwise, for every origin combination (H outer, W inner) of tile_starts,
    the input slice of length min(tile, size-pos) is mapped, weighted by feather_mask
    with feather round(overlap*scale) per dim, and added at output offset
    round(pos*scale) (clipped to the output size); weights are summed alongside; the
    result is the weighted sum / summed weights. Output size round(size*scale)."""
    samples = torch.as_tensor(samples, dtype=torch.float32)
    size = list(samples.shape[2:])
    out_size = [round(n * scale) for n in size]
    output = torch.empty([samples.shape[0], out_channels] + out_size, dtype=torch.float32)
    feather = [round(overlap * scale)] * 2
    for b in range(samples.shape[0]):
        s = samples[b:b + 1]
        if all(size[d] <= tile[d] for d in range(2)):
            output[b:b + 1] = function(s).float()
            continue
        out = output[b:b + 1].zero_()
        div = torch.zeros([1, 1] + out_size, dtype=torch.float32)
        starts = [tile_starts(size[d], tile[d], overlap) for d in range(2)]
        for pos in itertools.product(*starts):
            piece = s
            opos = []
            for d in range(2):
                n = min(tile[d], size[d] - pos[d])
                piece = piece.narrow(d + 2, pos[d], n)
                opos.append(round(pos[d] * scale))
            ps = function(piece).float()
            mask = feather_mask(list(ps.shape[2:]), feather)
            o, od = out, div
            for d in range(2):
                n = min(ps.shape[d + 2], out_size[d] - opos[d])
                o = o.narrow(d + 2, opos[d], n)
                od = od.narrow(d + 2, opos[d], n)
                if n < ps.shape[d + 2]:
                    ps = ps.narrow(d + 2, 0, n)
                    mask = mask.narrow(d + 2, 0, n)
            o.add_(ps * mask)
            od.add_(mask)
        out.div_(div)
    return output


def node_decode_tiling(tile_size=NODE_TILE_SIZE, overlap=NODE_OVERLAP, factor=8):
    """VAEDecodeTiled's arguments to decode_tiled (latent units): overlap becomes
    tile_size//4 when tile_size < 4*overlap, then both are divided by the factor."""
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    return tile_size // factor, tile_size // factor, overlap // factor


# ------------------------------------------------------------------ loading

_DIFFUSERS_ATTN = {"group_norm": "norm", "query": "q", "key": "k", "value": "v",
                   "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}
_DIFFUSERS_RE = [
    (re.compile(r"^(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$"),
     lambda m, n: "%s.down.%s.block.%s.%s" % (m[1], m[2], m[3], _res_part(m[4]))),
    (re.compile(r"^(encoder)\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)$"),
     lambda m, n: "%s.down.%s.downsample.%s" % (m[1], m[2], m[3])),
    (re.compile(r"^(decoder)\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$"),
     lambda m, n: "%s.up.%d.block.%s.%s" % (m[1], n - 1 - int(m[2]), m[3], _res_part(m[4]))),
    (re.compile(r"^(decoder)\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$"),
     lambda m, n: "%s.up.%d.upsample.%s" % (m[1], n - 1 - int(m[2]), m[3])),
    (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)$"),
     lambda m, n: "%s.mid.block_%d.%s" % (m[1], int(m[2]) + 1, _res_part(m[3]))),
    (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|query|key|value|to_q|to_k|to_v|"
                r"to_out\.0|proj_attn)\.(weight|bias)$"),
     lambda m, n: "%s.mid.attn_1.%s.%s" % (m[1], _DIFFUSERS_ATTN[m[2]], m[3])),
    (re.compile(r"^(encoder|decoder)\.conv_norm_out\.(.+)$"),
     lambda m, n: "%s.norm_out.%s" % (m[1], m[2])),
]


def _res_part(tail):
    return "nin_shortcut" + tail[len("conv_shortcut"):] if tail.startswith("conv_shortcut") else tail


def diffusers_to_ldm(t):
    """Diffusers AutoencoderKL names -> LDM names. The number of levels n is the number
    of decoder up_blocks (or encoder down_blocks); up_blocks.{i} is LDM up.{n-1-i}.
    Names with no LDM counterpart are dropped (ComfyUI loads with strict=False)."""
    idx = set()
    for k in t:
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.", k) or re.match(r"^encoder\.down_blocks\.(\d+)\.", k)
        if m:
            idx.add(int(m.group(1)))
    n = max(idx) + 1 if idx else 0
    out = {}
    for k, v in t.items():
        new = None
        for rx, fn in _DIFFUSERS_RE:
            m = rx.match(k)
            if m:
                new = fn(m, n)
                break
        if new is None and re.match(r"^(encoder|decoder)\.(conv_in|conv_out)\.|^(quant_conv|post_quant_conv)\.", k):
            new = k
        if new is not None:
            out[new] = v
    return out


def to_ldm(t, source="<memory>"):
    """Any supported layout (already read, {name: array}) -> LDM-named arrays."""
    if any(k.startswith("first_stage_model.") for k in t):
        t = {k[len("first_stage_model."):]: v for k, v in t.items() if k.startswith("first_stage_model.")}
    if "decoder.up_blocks.0.resnets.0.norm1.weight" in t or "encoder.down_blocks.0.resnets.0.norm1.weight" in t:
        t = diffusers_to_ldm(t)
    out = {}
    for k, v in t.items():
        if k.startswith("decoder.post_quant_conv."):
            k = k[len("decoder."):]
        elif k.startswith("encoder.quant_conv."):
            k = k[len("encoder."):]
        if not (k.startswith("encoder.") or k.startswith("decoder.") or k.startswith("quant_conv.")
                or k.startswith("post_quant_conv.")):
            continue
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", k) and np.ndim(v) == 2:
            v = np.reshape(v, tuple(np.shape(v)) + (1, 1))
        out[k] = v
    if not out:
        raise ValueError("%s: no VAE tensors found" % source)
    return out


def load(path):
    """A VAE from any supported file layout, weights upcast to fp32."""
    hdr, _, _ = st_io.read_header(path)
    keys = set(hdr)
    if any(k.startswith("first_stage_model.") for k in keys):
        names = {k for k in keys if k.startswith("first_stage_model.")}
    else:
        names = keys
    t, _ = st_io.read(path, names)
    ldm = to_ldm(t, path)
    w = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in ldm.items()}
    return VAE(w, path)


def _model(model):
    return model if isinstance(model, VAE) else load(str(model))


def decode(model, latent):
    return _model(model).decode(latent)


def encode(model, pixels):
    return _model(model).encode(pixels)


def decode_tiled(model, latent, tile_x=64, tile_y=64, overlap=16):
    return _model(model).decode_tiled(latent, tile_x, tile_y, overlap)


def encode_tiled(model, pixels, tile_x=512, tile_y=512, overlap=64):
    return _model(model).encode_tiled(pixels, tile_x, tile_y, overlap)


# ------------------------------------------------------------------ CLI

def run(vae, op, x, tiled=False, tile_size=NODE_TILE_SIZE, overlap=NODE_OVERLAP):
    """One CLI operation on a loaded VAE; returns a float32 numpy array."""
    if op == "decode":
        if tiled:
            tx, ty, ov = node_decode_tiling(tile_size, overlap, vae.factor)
            y = vae.decode_tiled(x, tx, ty, ov)
        else:
            y = vae.decode(x)
    else:
        y = vae.encode_tiled(x, tile_size, tile_size, overlap) if tiled else vae.encode(x)
    return y.numpy().astype(np.float32, copy=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("op", choices=["decode", "encode"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiled", action="store_true")
    ap.add_argument("--tile-size", type=int, default=NODE_TILE_SIZE, help="pixels (default 512)")
    ap.add_argument("--overlap", type=int, default=NODE_OVERLAP, help="pixels (default 64)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bench", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    vae = load(a.model)
    name_in, name_out = ("latent", "image") if a.op == "decode" else ("image", "latent")
    t, _ = st_io.read(a.input)
    if name_in not in t:
        ap.error("%s: no tensor %r" % (a.input, name_in))
    x = torch.from_numpy(np.ascontiguousarray(t[name_in], dtype=np.float32))
    y = run(vae, a.op, x, a.tiled, a.tile_size, a.overlap)
    if a.bench > 0:
        times = []
        for _ in range(a.bench):
            t0 = time.perf_counter()
            run(vae, a.op, x, a.tiled, a.tile_size, a.overlap)
            times.append((time.perf_counter() - t0) * 1000.0)
        print(json.dumps({"median_ms": round(float(np.median(times)), 3),
                          "min_ms": round(float(np.min(times)), 3),
                          "threads": torch.get_num_threads(),
                          "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}),
              file=sys.stderr)
    st_io.write(a.out, {name_out: y}, "F32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
