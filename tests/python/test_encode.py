"""test_encode.py -- luna's encoder against the independent PyTorch reference.

Each test writes random-weight models with the real tensor names (make_models.py),
runs `luna encode --local` on a tokens JSON, and compares `cond` and `pooled` with
ref_clip.py: max|luna - ref| / max|ref| must be <= 1e-4.

The first tests check the reference itself (no luna needed).
"""

import numpy as np
import pytest

import ref_clip
import st_io
from conftest import EOS, tokens_for

TOL = 1e-4
WEIGHTS = [1.21, 0.5, 1.5, 0.0, 2.0]

# token inputs: prompt lengths per chunk and weights
TOKENS = {
    "plain": dict(lengths=[12]),
    "weighted": dict(lengths=[20], weights=WEIGHTS),
    "3chunks": dict(lengths=[75, 75, 31], weights=WEIGHTS),
}


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def luna_encode(run_luna, tmp_path, models, tok_path, clip_layer=None):
    out = tmp_path / "luna-out.safetensors"
    args = ["encode", "--local"]
    for m in models:
        args += ["--model", m]
    args += ["--tokens", tok_path]
    if clip_layer is not None:
        args += ["--clip-layer", str(clip_layer)]
    args += ["--out", out]
    r = run_luna(*args)
    assert r.returncode == 0, "luna encode failed (rc %d):\n%s" % (r.returncode, r.stderr[-4000:])
    hdr, _, _ = st_io.read_header(out)
    for name in ("cond", "pooled"):
        assert name in hdr, "luna's output lacks %r (has %s)" % (name, sorted(hdr))
        assert hdr[name]["dtype"] == "F32", "%s is %s, expected F32" % (name, hdr[name]["dtype"])
    t, _ = st_io.read(out)
    return t["cond"], t["pooled"]


def check_against_reference(run_luna, tmp_path, write_tokens, models, tok, clip_layer=None):
    cond_ref, pooled_ref = ref_clip.encode(models, tok, clip_layer)
    cond, pooled = luna_encode(run_luna, tmp_path, models, write_tokens(tok), clip_layer)
    assert cond.shape == cond_ref.shape, "cond shape %s, reference %s" % (cond.shape, cond_ref.shape)
    assert pooled.shape == pooled_ref.shape, "pooled shape %s, reference %s" % (pooled.shape, pooled_ref.shape)
    ec, ep = rel_err(cond, cond_ref), rel_err(pooled, pooled_ref)
    print("rel err cond %.3g pooled %.3g" % (ec, ep))
    if ec > TOL:
        row = int(np.abs(cond - cond_ref).max(axis=-1).argmax(axis=-1)[0])
        raise AssertionError("cond rel err %.3g > %g (worst position %d); pooled %.3g" % (ec, TOL, row, ep))
    assert ep <= TOL, "pooled rel err %.3g > %g; cond %.3g" % (ep, TOL, ec)


# ------------------------------------------------------------------ the reference

def test_reference_is_deterministic_and_depends_on_seed(model):
    tok = tokens_for([12], WEIGHTS)
    a = ref_clip.encode([model("clip_l")], tok)
    b = ref_clip.encode([model("clip_l")], tok)
    c = ref_clip.encode([model("clip_l", seed=5)], tok)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert rel_err(c[0], a[0]) > 0.1


@pytest.mark.parametrize("layout", ["sd1", "sd1_old"])
def test_reference_checkpoint_equals_standalone(model, layout):
    # same seed and sizes -> same weights under other names
    tok = tokens_for([30], WEIGHTS)
    a = ref_clip.encode([model(layout)], tok)
    b = ref_clip.encode([model("clip_l")], tok)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_reference_openclip_conversion(model):
    """The SGM checkpoint's OpenCLIP G (in_proj, transposed text_projection) converts
    to the HF tensors of the standalone file, q/k/v in that order, and encodes alike."""
    sdxl = model("sdxl", width=192, layers=32)
    pair = [model("clip_l"), model("clip_g")]
    conv = ref_clip.load_file(str(sdxl))[1].w
    hf = ref_clip.load_file(str(pair[1]))[0].w
    assert set(conv) == set(hf)
    for k in hf:
        assert np.array_equal(conv[k].numpy(), hf[k].numpy()), k
    raw, _ = st_io.read(sdxl, {"conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"})
    w = next(iter(raw.values()))
    d = w.shape[1]
    g, _ = st_io.read(pair[1], {"text_model.encoder.layers.3.self_attn.%s_proj.weight" % x for x in "qkv"})
    for i, x in enumerate("qkv"):
        assert np.array_equal(w[i * d:(i + 1) * d], g["text_model.encoder.layers.3.self_attn.%s_proj.weight" % x])
    tok = tokens_for([40], WEIGHTS, sdxl=True)
    a = ref_clip.encode([sdxl], tok)
    b = ref_clip.encode(pair, tok)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_reference_weighting_formula(model):
    """z_w[j] = (z[j] - z_empty[j]) * w + z_empty[j], z_empty from [BOS, EOS, pad...]."""
    m = [model("clip_l")]
    plain = tokens_for([20])
    weighted = tokens_for([20], [0.5])
    empty = {"l": [[[t, 1.0] for t in [49406, EOS] + [EOS] * 75]]}
    z1, _ = ref_clip.encode(m, plain)
    zw, _ = ref_clip.encode(m, weighted)
    ze, _ = ref_clip.encode(m, empty)
    for j, (_, w) in enumerate(weighted["l"][0]):
        want = z1[0, j] if w == 1.0 else (z1[0, j] - ze[0, j]) * np.float32(w) + ze[0, j]
        assert np.allclose(zw[0, j], want, rtol=1e-5, atol=1e-6), j


def test_reference_is_causal(model):
    files = [model("clip_l"), model("clip_g")]
    a = tokens_for([30], sdxl=True)
    b = tokens_for([30], sdxl=True)
    for k in ("l", "g"):
        b[k][0][20][0] = 123
    za, _ = ref_clip.encode(files, a)
    zb, _ = ref_clip.encode(files, b)
    assert np.array_equal(za[0, :20], zb[0, :20])
    assert not np.allclose(za[0, 20:], zb[0, 20:])


@pytest.mark.parametrize("layout", ["clip_l", "clip_g"])
def test_reference_activations_are_sane(model, layout):
    """Random weights must neither blow up nor vanish over the stack."""
    g = layout == "clip_g"
    files = [model("clip_l")] + ([model("clip_g")] if g else [])
    tok = tokens_for([40], sdxl=g)
    for clip_layer in (None, -1):
        cond, pooled = ref_clip.encode(files, tok, clip_layer)
        for x in (cond, pooled):
            assert np.isfinite(x).all()
            assert 0.1 < float(x.std()) < 10.0, float(x.std())


# ------------------------------------------------------------------ SD1

@pytest.mark.parametrize("tokens", sorted(TOKENS))
@pytest.mark.parametrize("layout", ["sd1", "sd1_old", "clip_l"])
def test_sd1(run_luna, model, write_tokens, tmp_path, layout, tokens):
    check_against_reference(run_luna, tmp_path, write_tokens, [model(layout)], tokens_for(**TOKENS[tokens]))


@pytest.mark.parametrize("clip_layer", [-2, -3])
@pytest.mark.parametrize("layout", ["sd1", "sd1_old", "clip_l"])
def test_sd1_clip_skip(run_luna, model, write_tokens, tmp_path, layout, clip_layer):
    check_against_reference(run_luna, tmp_path, write_tokens, [model(layout)],
                            tokens_for([25], WEIGHTS, seed=1), clip_layer)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("layout", ["sd1", "clip_l"])
def test_sd1_storage_dtype(run_luna, model, write_tokens, tmp_path, layout, dtype):
    check_against_reference(run_luna, tmp_path, write_tokens, [model(layout, dtype)],
                            tokens_for([50, 10], WEIGHTS, seed=2))


def test_sd1_clip_l_with_projection(run_luna, model, write_tokens, tmp_path):
    # a standalone CLIP-L with text_projection.weight and logit_scale; SD1 pools unprojected
    m = model("clip_l", l_projection=True)
    check_against_reference(run_luna, tmp_path, write_tokens, [m], tokens_for([33], WEIGHTS, seed=3))


def test_sd1_chunk_without_eos_pools_last(run_luna, model, write_tokens, tmp_path):
    # 76 prompt tokens leave no room for EOS: pooled comes from position 76
    tok = tokens_for([76, 10], seed=4)
    assert EOS not in [t[0] for t in tok["l"][0]]
    check_against_reference(run_luna, tmp_path, write_tokens, [model("sd1")], tok)


# ------------------------------------------------------------------ SDXL

def sdxl_files(model, which, dtype="F16"):
    if which == "checkpoint":
        return [model("sdxl", dtype)]
    return [model("clip_l", dtype), model("clip_g", dtype)]


@pytest.mark.parametrize("tokens", sorted(TOKENS))
@pytest.mark.parametrize("which", ["checkpoint", "pair"])
def test_sdxl(run_luna, model, write_tokens, tmp_path, which, tokens):
    check_against_reference(run_luna, tmp_path, write_tokens, sdxl_files(model, which),
                            tokens_for(sdxl=True, **TOKENS[tokens]))


@pytest.mark.parametrize("which", ["checkpoint", "pair"])
def test_sdxl_clip_layer_last(run_luna, model, write_tokens, tmp_path, which):
    check_against_reference(run_luna, tmp_path, write_tokens, sdxl_files(model, which),
                            tokens_for([25], WEIGHTS, seed=1, sdxl=True), -1)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("which", ["checkpoint", "pair"])
def test_sdxl_storage_dtype(run_luna, model, write_tokens, tmp_path, which, dtype):
    check_against_reference(run_luna, tmp_path, write_tokens, sdxl_files(model, which, dtype),
                            tokens_for([50, 10], WEIGHTS, seed=2, sdxl=True))


def test_sdxl_pair_in_either_order(run_luna, model, write_tokens, tmp_path):
    # ComfyUI tells the two files apart by their keys, not by their order
    files = sdxl_files(model, "pair")[::-1]
    check_against_reference(run_luna, tmp_path, write_tokens, files, tokens_for([18], WEIGHTS, seed=6, sdxl=True))


def test_sdxl_mixed_dtypes(run_luna, model, write_tokens, tmp_path):
    files = [model("clip_l", "BF16"), model("clip_g", "F32")]
    check_against_reference(run_luna, tmp_path, write_tokens, files, tokens_for([40], WEIGHTS, seed=7, sdxl=True))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_clip_layer_beyond_depth(run_luna, model, write_tokens, tmp_path, family):
    """ComfyUI's clip_layer(k) with |k| > n_layers falls back to layer="last" (final-LN
    output) per encoder: with -5, the 4-layer L goes to "last" while the 32-layer G
    stays at hidden index 27 without LN."""
    sdxl = family == "sdxl"
    files = sdxl_files(model, "pair") if sdxl else [model("clip_l")]
    check_against_reference(run_luna, tmp_path, write_tokens, files,
                            tokens_for([22], WEIGHTS, seed=8, sdxl=sdxl), -5)
