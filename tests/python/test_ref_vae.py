"""Tests of the VAE reference (ref_vae.py) and the random-VAE generator (make_vae.py).

These check the reference itself, against hand-computed values, naive re-implementations
and cross-layout identities, so that luna can later be checked against the reference.

Measured output statistics of the generated weights are in make_vae.py's docstring
(e.g. ch 32 (1,2,4,4): pre-clamp std 0.56, image std 0.25, ~4% of the values clamped at
each end, p5 0.05 / p95 0.97); test_decode_shape_and_spread checks them live and prints
them with -s.

Tiled vs untiled (random weights: per-tile GroupNorm statistics and the global mid
attention make tiling inexact by nature; printed by test_real_tiling_is_close):
  decode ch 32 (1,2),     latent 32x28, tile 12/3:  max |diff| 0.37, mean 0.053
                                        tile 20/5:  max 0.16, mean 0.026
  decode ch 32 (1,2,4,4), latent 24x20, tile 16/4:  max 0.31, mean 0.027
  decode full size, latent 64x64, node defaults (512/64 px -> 64/8): max 0.071
  encode ch 32 (1,2),     48x40 px,     tile 32/8:  max 0.70, mean 0.092 (latent std 0.64)
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_vae  # noqa: E402
import ref_vae  # noqa: E402
import st_io  # noqa: E402

PY = "/usr/bin/python3"


def _latent(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _pixels(shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    out = {}

    def mk(key, layout, **kw):
        p = str(d / ("%s.safetensors" % key))
        make_vae.write_vae(p, layout, **kw)
        out[key] = p

    small = dict(seed=5, ch=32, ch_mult=(1, 2), num_res_blocks=2, latent_channels=4)
    mk("ldm", "ldm", dtype="F16", **small)
    mk("ckpt", "checkpoint", dtype="F16", **small)
    mk("diff", "diffusers", dtype="F16", **small)
    mk("diff_old", "diffusers", dtype="F16", old_attn=True, **small)
    mk("diff_conv", "diffusers", dtype="F16", attn_conv=True, **small)
    mk("ldm_linear", "ldm", dtype="F16", attn_conv=False, **small)
    mk("ldm_f32", "ldm", dtype="F32", **small)
    mk("ldm_bf16", "ldm", dtype="BF16", **small)
    mk("f8", "ldm", dtype="F32", seed=1, ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4)
    mk("f8_diff", "diffusers", dtype="F32", seed=1, ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
       latent_channels=4)
    mk("z16", "ldm", dtype="F16", seed=2, ch=32, ch_mult=(1, 2), num_res_blocks=1, latent_channels=16)
    return out


@pytest.fixture(scope="module")
def f8(files):
    return ref_vae.load(files["f8"])


@pytest.fixture(scope="module")
def small(files):
    return ref_vae.load(files["ldm_f32"])


# ------------------------------------------------------------------ generator

def test_full_param_count():
    # the real SD1/SD2/SDXL VAE has 83,653,863 parameters
    assert make_vae.param_count() == 83653863
    cfg = make_vae.resolve_config(full=True, latent_channels=16)
    assert cfg["ch"] == 128 and cfg["ch_mult"] == (1, 2, 4, 4) and cfg["quant"] is False


def test_diffusers_names_by_hand():
    n = make_vae.ldm_to_diffusers_name
    # ComfyUI diffusers_convert table (4 levels: up.{3-i} <-> up_blocks.{i})
    assert n("decoder.up.3.upsample.conv.weight", 4) == "decoder.up_blocks.0.upsamplers.0.conv.weight"
    assert n("decoder.up.1.block.0.nin_shortcut.bias", 4) == "decoder.up_blocks.2.resnets.0.conv_shortcut.bias"
    assert n("decoder.up.0.block.2.conv2.weight", 4) == "decoder.up_blocks.3.resnets.2.conv2.weight"
    assert n("encoder.down.2.downsample.conv.weight", 4) == "encoder.down_blocks.2.downsamplers.0.conv.weight"
    assert n("encoder.down.1.block.0.nin_shortcut.weight", 4) == "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    assert n("encoder.mid.block_2.norm1.weight", 4) == "encoder.mid_block.resnets.1.norm1.weight"
    assert n("decoder.mid.attn_1.norm.bias", 4) == "decoder.mid_block.attentions.0.group_norm.bias"
    assert n("decoder.mid.attn_1.proj_out.weight", 4) == "decoder.mid_block.attentions.0.to_out.0.weight"
    assert n("decoder.mid.attn_1.proj_out.weight", 4, True) == "decoder.mid_block.attentions.0.proj_attn.weight"
    assert n("encoder.mid.attn_1.k.weight", 4, True) == "encoder.mid_block.attentions.0.key.weight"
    assert n("encoder.norm_out.weight", 4) == "encoder.conv_norm_out.weight"
    assert n("decoder.conv_out.bias", 4) == "decoder.conv_out.bias"
    assert n("post_quant_conv.weight", 4) == "post_quant_conv.weight"
    # and the reference's independent converter maps them back
    back = ref_vae.diffusers_to_ldm({
        "decoder.up_blocks.0.resnets.0.norm1.weight": 0, "decoder.up_blocks.3.resnets.0.norm1.weight": 0,
        "decoder.up_blocks.0.upsamplers.0.conv.weight": 1,
        "decoder.up_blocks.2.resnets.0.conv_shortcut.bias": 2,
        "encoder.down_blocks.2.downsamplers.0.conv.weight": 3,
        "encoder.mid_block.attentions.0.query.weight": 4,
        "decoder.mid_block.attentions.0.to_out.0.bias": 5,
        "encoder.conv_norm_out.bias": 6, "quant_conv.weight": 7, "decoder.something_else": 8})
    assert back == {"decoder.up.3.block.0.norm1.weight": 0, "decoder.up.0.block.0.norm1.weight": 0,
                    "decoder.up.3.upsample.conv.weight": 1,
                    "decoder.up.1.block.0.nin_shortcut.bias": 2,
                    "encoder.down.2.downsample.conv.weight": 3,
                    "encoder.mid.attn_1.q.weight": 4, "decoder.mid.attn_1.proj_out.bias": 5,
                    "encoder.norm_out.bias": 6, "quant_conv.weight": 7}


def test_files_hold_the_same_values(files):
    ldm, _ = st_io.read(files["ldm"])
    diff, _ = st_io.read(files["diff"])
    ckpt, _ = st_io.read(files["ckpt"])
    assert len(ldm) == len(diff)
    # 2 levels: LDM up.1 is diffusers up_blocks.0
    assert np.array_equal(ldm["decoder.up.1.block.0.norm1.weight"], diff["decoder.up_blocks.0.resnets.0.norm1.weight"])
    assert np.array_equal(ldm["decoder.up.1.upsample.conv.weight"],
                          diff["decoder.up_blocks.0.upsamplers.0.conv.weight"])
    assert np.array_equal(ldm["decoder.up.0.block.0.nin_shortcut.weight"],
                          diff["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"])
    q = diff["decoder.mid_block.attentions.0.to_q.weight"]
    assert q.shape == (64, 64)
    assert np.array_equal(ldm["decoder.mid.attn_1.q.weight"], q.reshape(64, 64, 1, 1))
    assert ldm["decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    for k, v in ldm.items():
        assert np.array_equal(ckpt["first_stage_model." + k], v)
    extra = [k for k in ckpt if not k.startswith("first_stage_model.")]
    assert "model.diffusion_model.input_blocks.0.0.weight" in extra and "alphas_cumprod" in extra


def test_layouts_decode_identically(files):
    z = _latent((1, 4, 6, 5), 0)
    base = ref_vae.load(files["ldm"])
    ref_img = base.decode(z)
    pix = _pixels((1, 12, 10, 3), 1)
    ref_lat = base.encode(pix)
    for key in ("ckpt", "diff", "diff_old", "diff_conv", "ldm_linear"):
        v = ref_vae.load(files[key])
        assert sorted(v.w) == sorted(base.w), key
        for k in base.w:
            assert torch.equal(v.w[k], base.w[k]), (key, k)
        assert torch.equal(v.decode(z), ref_img), key
        assert torch.equal(v.encode(pix), ref_lat), key
    # the 4-level (factor 8) diffusers file too
    a, b = ref_vae.load(files["f8"]), ref_vae.load(files["f8_diff"])
    z8 = _latent((1, 4, 3, 4), 2)
    assert torch.equal(a.decode(z8), b.decode(z8))


def test_half_files_upcast(files):
    f32 = ref_vae.load(files["ldm_f32"])
    f16 = ref_vae.load(files["ldm"])
    bf16 = ref_vae.load(files["ldm_bf16"])
    assert f16.w.keys() == f32.w.keys() == bf16.w.keys()
    for k, v in f32.w.items():
        assert f16.w[k].dtype == torch.float32
        assert torch.equal(f16.w[k], v.half().float()), k
        assert torch.equal(bf16.w[k], v.bfloat16().float()), k


def test_config_inference(files, f8):
    assert f8.config() == {"ch": 32, "levels": 4, "factor": 8, "num_res_blocks": 2, "latent_channels": 4,
                           "quant": True}
    v = ref_vae.load(files["z16"])
    assert v.config() == {"ch": 32, "levels": 2, "factor": 2, "num_res_blocks": 1, "latent_channels": 16,
                          "quant": False}
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in v.w)
    img = v.decode(_latent((2, 16, 3, 4), 3))
    assert img.shape == (2, 6, 8, 3)
    lat = v.encode(_pixels((1, 8, 6, 3), 4))
    assert lat.shape == (1, 16, 4, 3)


# ------------------------------------------------------------------ decode / encode

def test_decode_shape_and_spread(f8):
    z = _latent((2, 4, 10, 8), 7)
    img = f8.decode(z)
    assert img.shape == (2, 80, 64, 3) and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    raw = f8.decode_raw(z)
    assert torch.equal(img, torch.clamp((raw + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1))
    a = img.numpy()
    lo, hi = float((a == 0).mean()), float((a == 1).mean())
    p5, p50, p95 = np.percentile(a, [5, 50, 95])
    print("\ndecode of N(0,1) latent: pre-clamp std %.3f mean %+.3f; image std %.3f, at 0: %.3f, at 1: %.3f, "
          "p5 %.3f p50 %.3f p95 %.3f" % (raw.std(), raw.mean(), a.std(), lo, hi, p5, p50, p95))
    assert 0.15 < a.std() < 0.35
    assert lo < 0.12 and hi < 0.12      # not all clamped
    assert p5 < 0.25 and p95 > 0.75 and 0.3 < p50 < 0.7
    for c in range(3):                  # every colour channel varies
        assert a[..., c].std() > 0.1
    # batch items are independent
    one = f8.decode(z[1:2])
    assert torch.allclose(one, img[1:2], atol=1e-5)


def test_encode_shape_and_crop_offsets(f8):
    pix = _pixels((1, 70, 67, 4), 11)
    lat = f8.encode(pix)
    assert lat.shape == (1, 4, 8, 8)
    # 70 % 8 = 6 -> offset 3; 67 % 8 = 3 -> offset 1; the alpha channel is dropped
    crop = f8.crop_pixels(pix)
    assert crop.shape == (1, 64, 64, 3)
    assert torch.equal(crop, pix[:, 3:67, 1:65, :3])
    assert torch.equal(f8.encode(pix[:, 3:67, 1:65, :3]), lat)
    assert not torch.allclose(f8.encode(pix[:, :64, :64, :3]), lat, atol=1e-3)
    # multiples of 8 are not cropped
    assert torch.equal(f8.crop_pixels(pix[:, :64, :40]), pix[:, :64, :40, :3])
    # encode = mean after quant_conv of the encoder on x*2-1
    w = f8.w
    x = crop.movedim(-1, 1) * 2.0 - 1.0
    h = ref_vae.conv(F.silu(ref_vae.group_norm(_encoder_trunk(f8, x), w["encoder.norm_out.weight"],
                                                       w["encoder.norm_out.bias"])), w, "encoder.", "conv_out")
    h = F.conv2d(h, w["quant_conv.weight"], w["quant_conv.bias"])
    assert torch.equal(lat, h[:, :4])


def _encoder_trunk(vae, x):
    w = vae.w
    h = ref_vae.conv(x, w, "encoder.", "conv_in")
    for i in range(4):
        for j in range(2):
            h = ref_vae.resblock(h, w, "encoder.down.%d.block.%d." % (i, j))
        if i < 3:
            h = ref_vae.downsample(h, w, "encoder.down.%d.downsample." % i)
    h = ref_vae.resblock(h, w, "encoder.mid.block_1.")
    h = ref_vae.attention(h, w, "encoder.mid.attn_1.")
    return ref_vae.resblock(h, w, "encoder.mid.block_2.")


# ------------------------------------------------------------------ blocks by hand

def _gn_manual(x, gamma, beta, groups=32, eps=1e-6):
    x = np.asarray(x, dtype=np.float64)
    b, c, h, w = x.shape
    g = x.reshape(b, groups, -1)
    mu = g.mean(axis=2, keepdims=True)
    var = ((g - mu) ** 2).mean(axis=2, keepdims=True)   # biased
    y = ((g - mu) / np.sqrt(var + eps)).reshape(b, c, h, w)
    return y * np.asarray(gamma, np.float64)[None, :, None, None] + np.asarray(beta, np.float64)[None, :, None, None]


def test_group_norm_by_hand():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 64, 2, 3)) * 3 + 1).astype(np.float32)
    gamma = (1 + 0.1 * rng.standard_normal(64)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(64)).astype(np.float32)
    got = ref_vae.group_norm(torch.from_numpy(x), torch.from_numpy(gamma), torch.from_numpy(beta)).numpy()
    assert np.allclose(got, _gn_manual(x, gamma, beta), atol=2e-5)
    # one group = channels 0,1 of sample 0: 12 values
    v = x[0, 0:2].astype(np.float64).ravel()
    mu, var = v.mean(), ((v - v.mean()) ** 2).sum() / 12.0
    want = (x[0, 1, 1, 2] - mu) / np.sqrt(var + 1e-6) * gamma[1] + beta[1]
    assert abs(got[0, 1, 1, 2] - want) < 2e-5


def test_attention_by_hand():
    rng = np.random.default_rng(1)
    c, hh, ww = 32, 2, 3
    x = rng.standard_normal((1, c, hh, ww)).astype(np.float32)
    w = {}
    p = "mid.attn_1."
    w[p + "norm.weight"] = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    w[p + "norm.bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
    for n in ("q", "k", "v", "proj_out"):
        w[p + n + ".weight"] = (rng.standard_normal((c, c, 1, 1)) / np.sqrt(c)).astype(np.float32)
        w[p + n + ".bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
    got = ref_vae.attention(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in w.items()}, p).numpy()
    # manual: 32 channels, 32 groups -> per-channel normalisation over the 6 positions
    h = _gn_manual(x, w[p + "norm.weight"], w[p + "norm.bias"])[0].reshape(c, -1)   # [C, N]
    n_pos = hh * ww

    def lin(name, a):
        return w[p + name + ".weight"][:, :, 0, 0].astype(np.float64) @ a + w[p + name + ".bias"][:, None]
    q, k, v = lin("q", h), lin("k", h), lin("v", h)
    o = np.zeros((c, n_pos))
    for i in range(n_pos):
        s = np.array([sum(q[ch, i] * k[ch, j] for ch in range(c)) for j in range(n_pos)]) / np.sqrt(c)
        e = np.exp(s - s.max())
        pr = e / e.sum()
        o[:, i] = (v * pr[None, :]).sum(axis=1)
    want = x[0].reshape(c, -1) + lin("proj_out", o)
    assert np.allclose(got[0].reshape(c, -1), want, atol=2e-5)


def test_down_and_upsample_by_hand():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 5, 4)).astype(np.float32)
    wt = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    bs = rng.standard_normal(3).astype(np.float32)
    w = {"d.conv.weight": torch.from_numpy(wt), "d.conv.bias": torch.from_numpy(bs)}
    got = ref_vae.downsample(torch.from_numpy(x), w, "d.").numpy()
    # zero row appended at the bottom and a zero column at the right, no other padding
    xp = np.zeros((2, 6, 5))
    xp[:, :5, :4] = x[0]
    oh, ow = (6 - 3) // 2 + 1, (5 - 3) // 2 + 1
    assert got.shape == (1, 3, oh, ow) == (1, 3, 2, 2)
    for o in range(3):
        for i in range(oh):
            for j in range(ow):
                want = (xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3] * wt[o]).sum() + bs[o]
                assert abs(got[0, o, i, j] - want) < 1e-4
    # nearest x2: out[i, j] = in[i//2, j//2]
    ident = torch.zeros(2, 2, 3, 3)
    ident[0, 0, 1, 1] = ident[1, 1, 1, 1] = 1.0
    up = ref_vae.upsample(torch.from_numpy(x), {"u.conv.weight": ident, "u.conv.bias": torch.zeros(2)}, "u.").numpy()
    assert up.shape == (1, 2, 10, 8)
    for i in range(10):
        for j in range(8):
            assert np.array_equal(up[0, :, i, j], x[0, :, i // 2, j // 2])


# ------------------------------------------------------------------ tiling rules

def test_tile_starts_and_node_rules():
    assert ref_vae.tile_starts(24, 16, 4) == [0, 12]
    assert ref_vae.tile_starts(30, 8, 2) == [0, 6, 12, 18, 24]
    assert ref_vae.tile_starts(10, 4, 1) == [0, 3, 6]
    assert ref_vae.tile_starts(5, 4, 2) == [0, 2]
    assert ref_vae.tile_starts(16, 16, 4) == [0]
    assert ref_vae.tile_starts(7, 64, 16) == [0]
    # VAEDecodeTiled: pixels -> latent units, overlap = tile/4 when tile < 4*overlap
    assert ref_vae.node_decode_tiling() == (64, 64, 8)
    assert ref_vae.node_decode_tiling(512, 64, 8) == (64, 64, 8)
    assert ref_vae.node_decode_tiling(256, 64, 8) == (32, 32, 8)
    assert ref_vae.node_decode_tiling(192, 64, 8) == (24, 24, 6)
    assert ref_vae.node_decode_tiling(320, 96, 8) == (40, 40, 10)
    assert ref_vae.node_decode_tiling(128, 0, 8) == (16, 16, 0)


def test_feather_mask_by_hand():
    m = ref_vae.feather_mask([4], [2])[0, 0].tolist()
    assert m == [0.5, 1.0, 1.0, 0.5]
    third, two = np.float32(1 / 3), np.float32(2 / 3)
    assert np.array_equal(ref_vae.feather_mask([5], [3])[0, 0].numpy(),
                          np.array([third, two, 1.0, two, third], np.float32))
    # ramps from both ends meet: length 5, feather 4 -> the middle gets 0.75 twice
    assert ref_vae.feather_mask([5], [4])[0, 0].tolist() == [0.25, 0.5, 0.5625, 0.5, 0.25]
    assert np.array_equal(ref_vae.feather_mask([4], [3])[0, 0].numpy(),
                          np.array([third, two, two, third], np.float32))
    # feather >= length: that dim is left at 1; dims multiply
    assert ref_vae.feather_mask([3, 4], [3, 2])[0, 0].tolist() == [[0.5, 1, 1, 0.5]] * 3
    m = ref_vae.feather_mask([4, 4], [2, 2])[0, 0].numpy()
    assert np.array_equal(m, np.outer([0.5, 1, 1, 0.5], [0.5, 1, 1, 0.5]).astype(np.float32))


def test_tiled_scale_hand_example():
    # 1 x 6 input, tiles of 4 with overlap 2, scale 1, function = subtract the tile's mean
    x = torch.arange(6, dtype=torch.float32).reshape(1, 1, 1, 6)
    out = ref_vae.tiled_scale(x, lambda t: t - t.mean(), (1, 4), 2, 1, 1)
    # tiles [0..3] and [2..5] -> both give [-1.5,-0.5,0.5,1.5], masks [0.5,1,1,0.5]
    want = [-1.5, -0.5, (0.5 * 1 + -1.5 * 0.5) / 1.5, (1.5 * 0.5 + -0.5 * 1) / 1.5, 0.5, 1.5]
    assert np.allclose(out[0, 0, 0].numpy(), want, atol=1e-7)
    assert abs(out[0, 0, 0, 2].item() - (-1 / 6)) < 1e-7 and abs(out[0, 0, 0, 3].item() - 1 / 6) < 1e-7
    # scale 2 (each value repeated twice): output offset 2*pos, feather round(2*2) = 4
    up = ref_vae.tiled_scale(x, lambda t: (t - t.mean()).repeat_interleave(2, -1).repeat_interleave(2, -2),
                             (1, 4), 2, 2, 1)
    assert up.shape == (1, 1, 2, 12)
    # tile 1 covers out 0..7 mask [.25,.5,.75,1,1,.75,.5,.25], tile 2 covers out 4..11
    m = np.array([.25, .5, .75, 1, 1, .75, .5, .25])
    t1 = np.repeat([-1.5, -0.5, 0.5, 1.5], 2)
    acc, div = np.zeros(12), np.zeros(12)
    acc[0:8] += t1 * m
    div[0:8] += m
    acc[4:12] += t1 * m
    div[4:12] += m
    assert np.allclose(up[0, 0, 0].numpy(), acc / div, atol=1e-7)
    assert np.allclose(up[0, 0, 1].numpy(), acc / div, atol=1e-7)
    # a sample that fits one tile is passed through the function as it is (no mask)
    one = ref_vae.tiled_scale(x, lambda t: t * 3.0, (1, 6), 2, 1, 1)
    assert torch.equal(one, x * 3.0)


def _naive_tiled(x, fn, tile, overlap, scale, out_ch):
    """Straight per-pixel re-implementation of comfy tiled_scale_multidim (2-D) in numpy
    float32; fn maps a numpy [1,C,h,w] tile to a numpy output."""
    x = np.asarray(x, np.float32)
    hh, ww = x.shape[2:]
    if hh <= tile[0] and ww <= tile[1]:
        return fn(x)
    oh, ow = round(hh * scale), round(ww * scale)
    acc = np.zeros((1, out_ch, oh, ow), np.float32)
    wsum = np.zeros((oh, ow), np.float32)
    f = round(overlap * scale)

    def starts(n, t):
        if n <= t:
            return [0]
        assert t > overlap
        res, p = [], 0
        while p < n - overlap:
            res.append(max(0, min(p, n - overlap)))
            p += t - overlap
        return res

    def factors(n):
        fac = [[] for _ in range(n)]
        if f < n:
            for t in range(f):
                a = np.float32((t + 1) / f)
                fac[t].append(a)
                fac[n - 1 - t].append(a)
        return fac

    for py in starts(hh, tile[0]):
        for px in starts(ww, tile[1]):
            y = fn(x[:, :, py:py + tile[0], px:px + tile[1]])
            h, w = y.shape[2:]
            fy, fx = factors(h), factors(w)
            m = np.ones((h, w), np.float32)
            for i in range(h):
                for j in range(w):
                    v = np.float32(1.0)
                    for a in fy[i] + fx[j]:
                        v = np.float32(v * a)
                    m[i, j] = v
            oy, ox = round(py * scale), round(px * scale)
            h2, w2 = min(h, oh - oy), min(w, ow - ox)
            acc[:, :, oy:oy + h2, ox:ox + w2] += y[:, :, :h2, :w2] * m[:h2, :w2]
            wsum[oy:oy + h2, ox:ox + w2] += m[:h2, :w2]
    return acc / wsum


# Tile-dependent stand-ins for the decoder (x2) and encoder (/2). Contiguous copies and a
# float64 mean make them independent of the memory layout of the slice they are given.
def _fake_up(t):
    t = torch.as_tensor(t).contiguous()
    y = (t[:, :3] - t.double().mean().float()).repeat_interleave(2, -1).repeat_interleave(2, -2)
    return y * torch.linspace(0.5, 1.5, y.shape[-1])


def _fake_down(t):
    t = torch.as_tensor(t).contiguous()
    y = F.avg_pool2d(t - t.double().mean().float(), 2)
    return torch.cat([y, y[:, :1] * 2.0], dim=1)


def test_tiled_scale_matches_naive():
    x = _latent((1, 4, 13, 11), 21)
    for tile, ov in (((4, 6), 2), ((5, 5), 1), ((13, 4), 1), ((8, 3), 0)):
        got = ref_vae.tiled_scale(x, _fake_up, tile, ov, 2, 3).numpy()
        want = _naive_tiled(x.numpy(), lambda a: _fake_up(torch.from_numpy(a)).numpy(), tile, ov, 2, 3)
        assert got.shape == want.shape == (1, 3, 26, 22)
        assert np.array_equal(got, want), (tile, ov)
    p = _pixels((1, 3, 20, 18), 22)
    for tile, ov in (((8, 6), 2), ((6, 10), 4)):
        got = ref_vae.tiled_scale(p, _fake_down, tile, ov, 0.5, 4).numpy()
        want = _naive_tiled(p.numpy(), lambda a: _fake_down(torch.from_numpy(a)).numpy(), tile, ov, 0.5, 4)
        assert got.shape == want.shape == (1, 4, 10, 9)
        assert np.array_equal(got, want), (tile, ov)


def test_decode_and_encode_tiled_pass_structure(small):
    """decode_tiled = clamp(((A + B + C)/3 + 1)/2) with tiles A=(h 2y, w x//2),
    B=(h y//2, w 2x), C=(h y, w x); encode_tiled = ((C + B) + A)/3."""
    vae = ref_vae.VAE(small.w, "fake")
    vae.decode_raw = _fake_up          # factor 2 like the small model
    vae.encode_raw = _fake_down
    z = _latent((1, 4, 14, 11), 23)
    tx, ty, ov = 8, 6, 2
    def up_np(a):
        return _fake_up(torch.from_numpy(a)).numpy()

    def down_np(a):
        return _fake_down(torch.from_numpy(a)).numpy()

    def naive(tile):
        return _naive_tiled(z.numpy(), up_np, tile, ov, 2, 3)
    a, b, c = naive((2 * ty, tx // 2)), naive((ty // 2, 2 * tx)), naive((ty, tx))
    want = np.clip(((a + b + c) / np.float32(3.0) + np.float32(1.0)) / np.float32(2.0), 0, 1)
    got = vae.decode_tiled(z, tx, ty, ov).numpy()
    assert np.array_equal(got, np.moveaxis(want, 1, -1))
    pix = _pixels((1, 21, 17, 3), 24)                      # cropped to 20 x 16 at offsets 0, 0
    x = (pix[:, :20, :16].movedim(-1, 1) * 2.0 - 1.0).numpy()
    tx, ty, ov = 8, 8, 2
    want = _naive_tiled(x, down_np, (ty, tx), ov, 0.5, 4)
    want += _naive_tiled(x, down_np, (ty // 2, tx * 2), ov, 0.5, 4)
    want += _naive_tiled(x, down_np, (ty * 2, tx // 2), ov, 0.5, 4)
    want /= np.float32(3.0)
    assert np.array_equal(vae.encode_tiled(pix, tx, ty, ov).numpy(), want)


def test_tiled_with_big_tiles_equals_untiled(small, f8):
    z = _latent((2, 4, 8, 7), 31)
    for vae, args in ((small, (16, 16, 4)), (f8, (64, 64, 16))):
        # tiling maps one batch item at a time
        full = torch.cat([vae.decode(z[i:i + 1]) for i in range(z.shape[0])])
        tiled = vae.decode_tiled(z, *args)
        # all three passes are single tiles; (a+a+a)/3 may differ from a by an ulp
        assert (tiled - full).abs().max() <= 1e-6
    pix = _pixels((1, 45, 38, 3), 32)
    full = f8.encode(pix)
    assert (f8.encode_tiled(pix, 512, 512, 64) - full).abs().max() <= 1e-6
    # the node defaults (512 px, 64 px) on a 64 x 56 latent are single tiles too
    tx, ty, ov = ref_vae.node_decode_tiling(512, 64, f8.factor)
    z2 = _latent((1, 4, 8, 7), 33)
    assert (f8.decode_tiled(z2, tx, ty, ov) - f8.decode(z2)).abs().max() <= 1e-6


def test_real_tiling_is_close(small, f8):
    z = _latent((1, 4, 32, 28), 41)
    full = small.decode(z)
    diffs = []
    for tile, ov in ((12, 3), (20, 5)):
        d = (small.decode_tiled(z, tile, tile, ov) - full).abs()
        diffs.append((float(d.max()), float(d.mean())))
    print("\ntiled vs untiled decode (ch 32, (1,2), latent 32x28): tile 12/3 max %.4f mean %.4f; "
          "tile 20/5 max %.4f mean %.4f" % (*diffs[0], *diffs[1]))
    for mx, mean in diffs:
        assert 1e-4 < mx < 0.6 and mean < 0.06
    assert diffs[1][1] < diffs[0][1]   # bigger tiles -> closer
    z8 = _latent((1, 4, 24, 20), 42)
    d = (f8.decode_tiled(z8, 16, 16, 4) - f8.decode(z8)).abs()
    print("tiled vs untiled decode (ch 32, (1,2,4,4), latent 24x20, tile 16/4): max %.4f mean %.4f"
          % (d.max(), d.mean()))
    assert 1e-4 < float(d.max()) < 0.6 and float(d.mean()) < 0.06
    pix = small.decode(_latent((1, 4, 24, 20), 43))
    e = small.encode(pix)
    d = (small.encode_tiled(pix, 32, 32, 8) - e).abs()
    print("tiled vs untiled encode (ch 32, (1,2), 48x40 px, tile 32/8): max %.4f mean %.4f (latent std %.3f)"
          % (d.max(), d.mean(), e.std()))
    assert 1e-4 < float(d.max()) and float(d.mean()) < 0.25 * float(e.std())


# ------------------------------------------------------------------ CLI

def test_cli_decode_encode(files, tmp_path, small):
    z = _latent((1, 4, 10, 9), 51).numpy()
    lat_in = str(tmp_path / "lat.safetensors")
    st_io.write(lat_in, {"latent": z}, "F32")
    img_out = str(tmp_path / "img.safetensors")
    r = subprocess.run([PY, os.path.join(HERE, "ref_vae.py"), "decode", "--model", files["ldm_f32"],
                        "--input", lat_in, "--out", img_out, "--bench", "2", "--threads", "1",
                        "--tiled", "--tile-size", "16", "--overlap", "8"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stderr.strip().splitlines()[-1])
    assert j["threads"] == 1 and j["median_ms"] > 0 and j["peak_rss_kib"] > 0
    img, _ = st_io.read(img_out)
    # node rule: tile 16 < 4*8 -> overlap 4 px; factor 2 -> tile 8, overlap 2 latent
    assert np.array_equal(img["image"], small.decode_tiled(torch.from_numpy(z), 8, 8, 2).numpy())
    lat_out = str(tmp_path / "lat_out.safetensors")
    r = subprocess.run([PY, os.path.join(HERE, "ref_vae.py"), "encode", "--model", files["ldm_f32"],
                        "--input", img_out, "--out", lat_out],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lat, _ = st_io.read(lat_out)
    assert lat["latent"].shape == (1, 4, 10, 9)
    assert np.array_equal(lat["latent"], small.encode(torch.from_numpy(img["image"])).numpy())


def test_make_vae_cli(tmp_path):
    p = str(tmp_path / "d.safetensors")
    r = subprocess.run([PY, os.path.join(HERE, "make_vae.py"), "--layout", "diffusers", "--ch-mult", "1,2",
                        "--latent-channels", "16", "--dtype", "bf16", "--old-attn", "--out", p],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    hdr, meta, _ = st_io.read_header(p)
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in hdr
    assert hdr["decoder.mid_block.attentions.0.query.weight"]["shape"] == [64, 64]
    assert hdr["decoder.conv_in.weight"]["shape"] == [64, 16, 3, 3]
    assert all(v["dtype"] == "BF16" for v in hdr.values())
    assert "quant_conv.weight" not in hdr and "post_quant_conv.weight" not in hdr
    assert json.loads(meta["luna_vae_config"])["latent_channels"] == 16
