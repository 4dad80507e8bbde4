"""test_ref_lora.py -- the LoRA reference (ref_lora.py), the generator (make_loras.py) and
ref_clip.py's --lora option, checked on their own (no luna needed).

Hand formulas (NUMERICS 7.3) are written here in float64 numpy or step by step in
torch, independently of ref_lora's code paths; tiny models keep the file fast.
"""

import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import make_loras
import ref_clip
import ref_lora
import st_io
from conftest import tokens_for

HERE = Path(__file__).resolve().parent
SD1 = dict(width=128, layers=4)
SDXL = dict(width=192, layers=6, l_width=128, l_layers=4)
EPS32 = float(np.finfo(np.float32).eps)


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def q_key(b, m="self_attn.q_proj"):
    return "encoder.layers.%d.%s.weight" % (b, m)


@pytest.fixture(scope="module")
def sd1_enc(model):
    return ref_clip.load([model("sd1", **SD1)])


@pytest.fixture(scope="module")
def sdxl_enc(model):
    return ref_clip.load([model("sdxl", **SDXL)])


def tiny_encoder(width=4, layers=1, seed=0, projection=False):
    """A ref_clip.Encoder holding only what the LoRA code touches (never run forward)."""
    rng = np.random.default_rng(seed)

    def t(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).half().float()

    w = {"embeddings.token_embedding.weight": t(8, width)}
    for b in range(layers):
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w[q_key(b, "self_attn." + m)] = t(width, width)
        w[q_key(b, "mlp.fc1")] = t(4 * width, width)
        w[q_key(b, "mlp.fc2")] = t(width, 4 * width)
    if projection:
        w["text_projection.weight"] = t(width, width)
    return ref_clip.Encoder("l", w, "tiny")


# ------------------------------------------------------------------ (a) plain LoRA math

def test_kohya_merge_equals_hand_formula(tmp_path, sd1_enc):
    # strength 0.3 and scale 1/3: fp32(0.3 * (1/3)) != fp32(0.3) * fp32(1/3), so the exact
    # check below tells a coefficient formed in double from one formed in fp32
    path = make_loras.write_lora(tmp_path / "a.safetensors", "kohya", "sd1", rank=3, alpha=1.0, seed=3, **SD1)
    t, _ = st_io.read(path)
    s = 0.3
    new = ref_lora.apply_stack(sd1_enc, [(path, s)], "sd1")
    x = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    up, down = t[x + ".lora_up.weight"].astype(np.float64), t[x + ".lora_down.weight"].astype(np.float64)
    alpha, rank = float(t[x + ".alpha"]), down.shape[0]
    assert (alpha, rank) == (1.0, 3)
    assert np.float32(s * (alpha / rank)) != np.float32(s) * np.float32(np.float32(alpha) / np.float32(rank))
    w0 = sd1_enc["l"].w[q_key(1)]
    want = w0.double().numpy() + s * alpha / rank * (up @ down)
    got = new["l"].w[q_key(1)]
    assert got.dtype == torch.float32
    assert rel_err(got.numpy(), want) < 1e-6
    # bit-exact ComfyUI form: (strength * scale) in double, applied to the fp32 tensor
    fp32 = w0.clone()
    fp32 += (s * (alpha / rank)) * torch.mm(torch.from_numpy(t[x + ".lora_up.weight"]),
                                          torch.from_numpy(t[x + ".lora_down.weight"]))
    assert torch.equal(got, fp32)
    # not re-rounded to fp16 (NUMERICS 7.5)
    assert not torch.equal(got, got.half().float())
    # every targeted Linear changed, nothing else did; the input encoders are untouched
    for k, v in sd1_enc["l"].w.items():
        changed = not torch.equal(v, new["l"].w[k])
        linear = k.startswith("encoder.layers.") and k.endswith("proj.weight") or ".mlp.fc" in k and k.endswith(".weight")
        assert changed == linear, k
    assert torch.equal(sd1_enc["l"].w[q_key(1)], w0) and not torch.equal(w0, got)


def test_lora_without_alpha_has_scale_one(tmp_path):
    enc = {"l": tiny_encoder(), "g": None}
    rng = np.random.default_rng(1)
    x = "text_encoder.text_model.encoder.layers.0.mlp.fc2"
    path = tmp_path / "na.safetensors"
    up2, down2 = rng.standard_normal((4, 2)).astype(np.float32), rng.standard_normal((2, 16)).astype(np.float32)
    st_io.write(path, {x + ".lora_linear_layer.up.weight": up2, x + ".lora_linear_layer.down.weight": down2}, "F32")
    new = ref_lora.apply_stack(enc, [(path, -1.5)], "sd1")
    want = enc["l"].w[q_key(0, "mlp.fc2")].double().numpy() - 1.5 * (up2.astype(np.float64) @ down2)
    assert rel_err(new["l"].w[q_key(0, "mlp.fc2")].numpy(), want) < 1e-6


# ------------------------------------------------------------------ (b) strength 0

@pytest.mark.parametrize("fmt", ["kohya", "dora", "loha", "lokr"])
def test_strength_zero_changes_nothing(tmp_path, sdxl_enc, fmt):
    path = make_loras.write_lora(tmp_path / "z.safetensors", fmt, "sdxl", rank=4, alpha=4.0,
                                 projection="g", **SDXL)
    tok = tokens_for([20], [1.2, 0.8], sdxl=True)
    base = ref_clip.encode_loaded(sdxl_enc, tok)
    zero = ref_clip.encode_loaded(ref_lora.apply_stack(sdxl_enc, [(path, 0.0)], "sdxl"), tok)
    one = ref_clip.encode_loaded(ref_lora.apply_stack(sdxl_enc, [(path, 1.0)], "sdxl"), tok)
    assert np.array_equal(zero[0], base[0]) and np.array_equal(zero[1], base[1])
    assert rel_err(one[0], base[0]) > 1e-3 and rel_err(one[1], base[1]) > 1e-3


# ------------------------------------------------------------------ (c) stacks

def test_stack_accumulates_in_order(tmp_path, sdxl_enc):
    a = make_loras.write_lora(tmp_path / "A.safetensors", "kohya", "sdxl", rank=4, alpha=1.0, seed=1,
                              projection="g", **SDXL)
    b = make_loras.write_lora(tmp_path / "B.safetensors", "peft", "sdxl", rank=8, alpha=16.0, seed=2,
                              modules=["q", "fc2"], only_layers=[0, 3], dtype="BF16", **SDXL)
    sa, sb = 0.8, -0.55
    new = ref_lora.apply_stack(sdxl_enc, [(a, sa), (b, sb)], "sdxl")
    ta, _ = st_io.read(a)
    tb, _ = st_io.read(b)
    want = {e: {k: v.clone() for k, v in sdxl_enc[e].w.items()} for e in ("l", "g")}

    def add(e, key, up, down, alpha, s):
        up, down = torch.from_numpy(up), torch.from_numpy(down)
        want[e][key] += (s * (alpha / down.shape[0])) * torch.mm(up, down)

    mods = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "out": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    kmod = {"q": "self_attn_q_proj", "k": "self_attn_k_proj", "v": "self_attn_v_proj",
            "out": "self_attn_out_proj", "fc1": "mlp_fc1", "fc2": "mlp_fc2"}
    n = 0
    for e, pre, layers in (("l", "lora_te1_", 4), ("g", "lora_te2_", 6)):
        for i in range(layers):
            for m in mods:
                x = "%stext_model_encoder_layers_%d_%s" % (pre, i, kmod[m])
                add(e, q_key(i, mods[m]), ta[x + ".lora_up.weight"], ta[x + ".lora_down.weight"],
                    float(ta[x + ".alpha"]), sa)
                n += 1
    x = "lora_te2_text_projection"
    add("g", "text_projection.weight", ta[x + ".lora_up.weight"], ta[x + ".lora_down.weight"], float(ta[x + ".alpha"]), sa)
    for e, pre in (("l", "text_encoder."), ("g", "text_encoder_2.")):
        for i in (0, 3):
            for m in ("q", "fc2"):
                x = "%stext_model.encoder.layers.%d.%s" % (pre, i, mods[m])
                add(e, q_key(i, mods[m]), tb[x + ".lora_B.weight"], tb[x + ".lora_A.weight"], float(tb[x + ".alpha"]), sb)
    for e in ("l", "g"):
        assert set(new[e].w) == set(want[e])
        for k in want[e]:
            assert torch.equal(new[e].w[k], want[e][k]), (e, k)
    assert ref_lora.report(a, "sdxl", sdxl_enc) == (n + 1, [])
    assert ref_lora.report(b, "sdxl", sdxl_enc) == (8, [])


def test_stack_order_matters_with_dora(tmp_path, sd1_enc):
    a = make_loras.write_lora(tmp_path / "d.safetensors", "dora", "sd1", rank=4, seed=1, **SD1)
    b = make_loras.write_lora(tmp_path / "k.safetensors", "kohya", "sd1", rank=4, seed=2, magnitude=0.1, **SD1)
    ab = ref_lora.apply_stack(sd1_enc, [(a, 1.0), (b, 1.0)], "sd1")["l"].w[q_key(2)]
    ba = ref_lora.apply_stack(sd1_enc, [(b, 1.0), (a, 1.0)], "sd1")["l"].w[q_key(2)]
    assert rel_err(ab.numpy(), ba.numpy()) > 1e-3


# ------------------------------------------------------------------ (d) DoRA

def _dora_file(path, x, up, down, alpha, ds):
    st_io.write(path, {x + ".lora_up.weight": up, x + ".lora_down.weight": down,
                       x + ".alpha": np.array(alpha, dtype=np.float32), x + ".dora_scale": ds}, "F32")
    return path


def _hand_dora(w, up, down, scale, ds, strength, on_out):
    w = w.astype(np.float64)
    wc = w + scale * (up.astype(np.float64) @ down.astype(np.float64))
    if on_out:
        n = np.sqrt((w * w).sum(axis=1, keepdims=True))  # the weight before the patch
    else:
        n = np.sqrt((wc * wc).sum(axis=0, keepdims=True))
    wc = wc * (ds.astype(np.float64) / (n + EPS32))
    return wc if strength == 1.0 else w + strength * (wc - w)


@pytest.mark.parametrize("on_out", [True, False])
def test_dora_strength_one_and_half(tmp_path, on_out):
    enc = {"l": tiny_encoder(), "g": None}
    w = enc["l"].w[q_key(0)].numpy()
    up = np.array([[0.9], [-0.4], [0.3], [1.2]], dtype=np.float32)
    down = np.array([[0.5, -1.0, 0.25, 0.8]], dtype=np.float32)
    ds = (np.array([[1.3], [0.6], [2.0], [0.9]]) if on_out else np.array([[0.7, 1.9, 1.1, 0.4]])).astype(np.float32)
    x = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    path = _dora_file(tmp_path / "dora.safetensors", x, up, down, 0.5, ds)  # scale 0.5 / 1
    got = {}
    for s in (1.0, 0.5, -0.3):
        got[s] = ref_lora.apply_stack(enc, [(path, s)], "sd1")["l"].w[q_key(0)].numpy()
        assert rel_err(got[s], _hand_dora(w, up, down, 0.5, ds, s, on_out)) < 1e-6, s
    # strength 1 gives the DoRA weight itself: its row (or column) norms are the scales
    norms = np.sqrt((got[1.0].astype(np.float64) ** 2).sum(axis=0 if not on_out else 1))
    if not on_out:
        assert np.allclose(norms, ds.reshape(-1), rtol=1e-5)
    else:
        # ComfyUI's quirk: normalised by the norm of W, not of W + dW
        wc = w.astype(np.float64) + 0.5 * (up.astype(np.float64) @ down)
        quirk = np.sqrt((wc ** 2).sum(axis=1)) / np.sqrt((w.astype(np.float64) ** 2).sum(axis=1)) * ds.reshape(-1)
        assert np.allclose(norms, quirk, rtol=1e-5) and not np.allclose(norms, ds.reshape(-1), rtol=1e-3)
    # strength 0.5 is halfway between W and the strength-1 weight
    assert rel_err(got[0.5], 0.5 * (w.astype(np.float64) + got[1.0])) < 1e-6
    # strength 1 is ComfyUI's special case W = Wc, bit for bit (fp32, step by step)
    wt = torch.from_numpy(w.copy())
    wc = wt + torch.mm(torch.from_numpy(up), torch.from_numpy(down)) * 0.5
    n = wt.norm(dim=1, keepdim=True) if on_out else wc.norm(dim=0, keepdim=True)
    assert torch.equal(torch.from_numpy(got[1.0]), wc * (torch.from_numpy(ds) / (n + EPS32)))


def test_dora_norm_epsilon(tmp_path):
    # a row of W with a tiny norm: FLT_EPSILON added to the norm changes the result a lot
    enc = {"l": tiny_encoder(), "g": None}
    w = enc["l"].w[q_key(0)]
    w[2] = torch.tensor([1e-7, -2e-7, 5e-8, 1e-7])
    up = np.array([[0.9], [-0.4], [0.0], [1.2]], dtype=np.float32)
    down = np.array([[0.5, -1.0, 0.25, 0.8]], dtype=np.float32)
    ds = np.array([[1.3], [0.6], [2.0], [0.9]], dtype=np.float32)
    path = _dora_file(tmp_path / "eps.safetensors", "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                      up, down, 1.0, ds)
    got = ref_lora.apply_stack(enc, [(path, 1.0)], "sd1")["l"].w[q_key(0)].numpy()
    want = _hand_dora(w.numpy(), up, down, 1.0, ds, 1.0, True)
    assert rel_err(got[2], want[2]) < 1e-5
    no_eps = w.numpy()[2].astype(np.float64) * 2.0 / np.sqrt((w.numpy()[2].astype(np.float64) ** 2).sum())
    assert rel_err(got[2], no_eps) > 0.1


def test_dora_twice_uses_the_weight_before_each_patch(tmp_path):
    enc = {"l": tiny_encoder(seed=4), "g": None}
    w = enc["l"].w[q_key(0)].numpy()
    up = np.array([[0.5], [0.1], [-0.7], [0.2]], dtype=np.float32)
    down = np.array([[1.0, 0.3, -0.2, 0.6]], dtype=np.float32)
    ds = np.array([[2.0], [1.5], [0.5], [1.0]], dtype=np.float32)
    x = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    path = _dora_file(tmp_path / "d2.safetensors", x, up, down, 2.0, ds)
    got = ref_lora.apply_stack(enc, [(path, 0.8), (path, 1.0)], "sd1")["l"].w[q_key(0)].numpy()
    w1 = _hand_dora(w, up, down, 2.0, ds, 0.8, True)
    want = _hand_dora(w1, up, down, 2.0, ds, 1.0, True)
    assert rel_err(got, want) < 1e-6


# ------------------------------------------------------------------ LoHa / LoKr scales

def test_loha_and_lokr_scales(tmp_path):
    enc = {"l": tiny_encoder(width=8), "g": None}
    rng = np.random.default_rng(7)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    x = "lora_te_text_model_encoder_layers_0_"
    t = {}
    w1a, w1b, w2a, w2b = r(8, 3), r(3, 8), r(8, 3), r(3, 8)
    t.update({x + "self_attn_q_proj.hada_w1_a": w1a, x + "self_attn_q_proj.hada_w1_b": w1b,
              x + "self_attn_q_proj.hada_w2_a": w2a, x + "self_attn_q_proj.hada_w2_b": w2b,
              x + "self_attn_q_proj.alpha": np.array(1.5, dtype=np.float32)})
    k1, k2a, k2b = r(2, 4), r(4, 2), r(2, 2)  # w2 factorised: dim = 2
    t.update({x + "self_attn_k_proj.lokr_w1": k1, x + "self_attn_k_proj.lokr_w2_a": k2a,
              x + "self_attn_k_proj.lokr_w2_b": k2b, x + "self_attn_k_proj.alpha": np.array(3.0, dtype=np.float32)})
    k1a, k1b, k2 = r(4, 1), r(1, 2), r(2, 4)  # w1 factorised: dim = 1
    t.update({x + "self_attn_v_proj.lokr_w1_a": k1a, x + "self_attn_v_proj.lokr_w1_b": k1b,
              x + "self_attn_v_proj.lokr_w2": k2, x + "self_attn_v_proj.alpha": np.array(0.25, dtype=np.float32)})
    f1, f2 = r(2, 2), r(4, 4)  # both full: scale 1 whatever alpha
    t.update({x + "self_attn_out_proj.lokr_w1": f1, x + "self_attn_out_proj.lokr_w2": f2,
              x + "self_attn_out_proj.alpha": np.array(100.0, dtype=np.float32)})
    path = tmp_path / "ly.safetensors"
    st_io.write(path, t, "F32")
    s = 0.6
    new = ref_lora.apply_stack(enc, [(path, s)], "sd1")["l"].w
    d = lambda a: a.astype(np.float64)  # noqa: E731
    want = {
        "self_attn.q_proj": 1.5 / 3 * (d(w1a) @ d(w1b)) * (d(w2a) @ d(w2b)),
        "self_attn.k_proj": 3.0 / 2 * np.kron(d(k1), d(k2a) @ d(k2b)),
        "self_attn.v_proj": 0.25 / 1 * np.kron(d(k1a) @ d(k1b), d(k2)),
        "self_attn.out_proj": np.kron(d(f1), d(f2)),
    }
    for m, dw in want.items():
        ref = enc["l"].w[q_key(0, m)].double().numpy() + s * dw
        assert rel_err(new[q_key(0, m)].numpy(), ref) < 1e-6, m
    assert ref_lora.report(path, "sd1") == (4, [])


# ------------------------------------------------------------------ formats and mapping

def test_name_forms_give_identical_merges(tmp_path, sdxl_enc):
    merged = {}
    for fmt in ("kohya", "diffusers", "peft", "generic"):
        p = make_loras.write_lora(tmp_path / (fmt + ".safetensors"), fmt, "sdxl", rank=4, alpha=2.0, seed=9,
                                  projection="g", **SDXL)
        assert ref_lora.report(p, "sdxl", sdxl_enc) == (6 * 4 + 6 * 6 + 1, [])
        merged[fmt] = ref_lora.apply_stack(sdxl_enc, [(p, 1.3)], "sdxl")
    for fmt in ("diffusers", "peft", "generic"):
        for e in ("l", "g"):
            for k, v in merged["kohya"][e].w.items():
                assert torch.equal(v, merged[fmt][e].w[k]), (fmt, e, k)


def test_report_unmapped_and_ignored(tmp_path, sdxl_enc, sd1_enc):
    p = make_loras.write_lora(tmp_path / "r.safetensors", "kohya", "sdxl", rank=4, alpha=4.0, unet=True,
                              bogus=2, projection="both", **SDXL)
    n, um = ref_lora.report(p, "sdxl", sdxl_enc)
    assert n == 6 * 4 + 6 * 6 + 2
    assert um == sorted(["lora_te1_text_model_encoder_layers_0_self_attn_bogus.lora_up.weight",
                         "lora_te1_text_model_encoder_layers_0_self_attn_bogus.lora_down.weight",
                         "lora_te1_text_model_encoder_layers_0_self_attn_bogus1.lora_up.weight",
                         "lora_te1_text_model_encoder_layers_0_self_attn_bogus1.lora_down.weight"])
    # the same file on an SD1 model: every G tensor (up, down, alpha) is unmapped
    n1, um1 = ref_lora.report(p, "sd1", sd1_enc)
    assert n1 == 6 * 4 + 1  # L layers and lora_te1_text_projection (an unused target)
    assert len(um1) == 4 + 3 * (6 * 6 + 1) and all(k.startswith(("lora_te2_", "lora_te1_text_model_encoder_layers_0_self_attn_bogus")) for k in um1)
    # the L projection changes no output; an SD1 LoRA with 6 layers on a 4-layer model
    q = make_loras.write_lora(tmp_path / "p.safetensors", "diffusers", "sd1", rank=2, projection="l",
                              width=128, layers=6, modules=["v"])
    n2, um2 = ref_lora.report(q, "sd1", sd1_enc)
    assert n2 == 4 + 1 and um2 == ["text_encoder.text_model.encoder.layers.%d.self_attn.v_proj.lora_linear_layer.%s.weight"
                                   % (b, s) for b in (4, 5) for s in ("down", "up")]
    assert ref_lora.report(q, "sd1") == (6 + 1, [])  # without a model: layers up to 32 map


def test_last_name_for_a_target_wins(tmp_path, sd1_enc):
    a = make_loras.lora_tensors("kohya", "sd1", rank=2, seed=1, modules=["fc1"], only_layers=[2], **SD1)
    b = make_loras.lora_tensors("kohya", "sd1", rank=2, seed=2, modules=["fc1"], only_layers=[2],
                                l_prefix="lora_te1_", **SD1)
    both = tmp_path / "both.safetensors"
    st_io.write(both, dict(a, **b), "F16")
    only_b = tmp_path / "b.safetensors"
    st_io.write(only_b, b, "F16")
    assert ref_lora.report(both, "sd1", sd1_enc) == (1, [])
    x = ref_lora.apply_stack(sd1_enc, [(both, 1.0)], "sd1")["l"].w[q_key(2, "mlp.fc1")]
    y = ref_lora.apply_stack(sd1_enc, [(only_b, 1.0)], "sd1")["l"].w[q_key(2, "mlp.fc1")]
    assert torch.equal(x, y) and not torch.equal(x, sd1_enc["l"].w[q_key(2, "mlp.fc1")])


def test_refused_inputs(tmp_path):
    x = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    up, down = np.ones((4, 1), np.float32), np.ones((1, 4), np.float32)
    cases = {
        "no_down": {x + ".lora_up.weight": up},
        "mid": {x + ".lora_up.weight": up, x + ".lora_down.weight": down, x + ".lora_mid.weight": np.ones((1, 1), np.float32)},
        "nan": {x + ".lora_up.weight": up * np.nan, x + ".lora_down.weight": down},
        "chain": {x + ".lora_up.weight": up, x + ".lora_down.weight": np.ones((2, 4), np.float32)},
        "ln": {"text_encoders.clip_l.transformer.text_model.final_layer_norm.diff": np.ones((4,), np.float32)},
    }
    for name, t in cases.items():
        p = tmp_path / (name + ".safetensors")
        st_io.write(p, t, "F32")
        with pytest.raises(ValueError):
            ref_lora.report(p, "sd1")
    p = tmp_path / "shape.safetensors"
    st_io.write(p, {x + ".lora_up.weight": np.ones((5, 1), np.float32), x + ".lora_down.weight": down}, "F32")
    with pytest.raises(ValueError):
        ref_lora.apply_stack({"l": tiny_encoder(), "g": None}, [(p, 1.0)], "sd1")


@pytest.mark.parametrize("fmt", ["kohya", "dora", "loha", "lokr"])
def test_generated_magnitudes(tmp_path, sd1_enc, fmt):
    # make_loras' documented range: ~1e-2..1e-1 relative at strength 1, ~linear in strength
    path = make_loras.write_lora(tmp_path / "m.safetensors", fmt, "sd1", rank=4, alpha=8.0, **SD1)
    tok = tokens_for([30])
    base = ref_clip.encode_loaded(sd1_enc, tok)[0]
    e1 = rel_err(ref_clip.encode_loaded(ref_lora.apply_stack(sd1_enc, [(path, 1.0)], "sd1"), tok)[0], base)
    e2 = rel_err(ref_clip.encode_loaded(ref_lora.apply_stack(sd1_enc, [(path, 2.0)], "sd1"), tok)[0], base)
    assert 1e-2 <= e1 <= 1e-1, e1
    assert 1.6 <= e2 / e1 <= 2.4, (e1, e2)


# ------------------------------------------------------------------ (e) identity

def test_identity_ignores_order_metadata_and_unet(tmp_path):
    te = make_loras.lora_tensors("kohya", "sdxl", rank=2, alpha=1.0, modules=["q", "fc1"], only_layers=[0], **SDXL)
    unet = {k: v for k, v in make_loras.lora_tensors("kohya", "sdxl", rank=2, unet=True, only_layers=[],
                                                       **SDXL).items() if k.startswith("lora_unet_")}
    assert unet and all(not ref_lora.is_te_key(k) for k in unet)
    a = tmp_path / "a.safetensors"
    st_io.write(a, te, "F16", metadata={"ss_output_name": "a"})
    ident = ref_lora.lora_identity(a)
    assert len(ident) == 64 and ident == ident.lower() and int(ident, 16) >= 0
    # reversed tensor order in the file, other metadata, UNet tensors in between
    names = sorted(te, reverse=True)
    mixed = {}
    for i, k in enumerate(names):
        mixed[k] = te[k]
        if i == 1:
            mixed.update(unet)
    hdr, data = st_io.build_parts(mixed, "F16")
    assert [h[0] for h in hdr][:2] == names[:2]
    b = tmp_path / "b.safetensors"
    st_io.write_raw(b, hdr, data, metadata={"other": "x", "ss_network_dim": "2"})
    assert ref_lora.lora_identity(b) == ident
    c = tmp_path / "c.safetensors"
    st_io.write(c, dict(te, **unet), "F16")
    assert ref_lora.lora_identity(c) == ident
    # one value changed, one dtype changed, one tensor dropped: new identities
    k = names[3]
    changed = dict(te)
    changed[k] = te[k].copy()
    changed[k].reshape(-1)[5] += np.float32(0.125)
    st_io.write(tmp_path / "d.safetensors", changed, "F16")
    st_io.write(tmp_path / "e.safetensors", te, {n: ("F32" if n == k else "F16") for n in te})
    st_io.write(tmp_path / "f.safetensors", {n: v for n, v in te.items() if n != k}, "F16")
    ids = {ident} | {ref_lora.lora_identity(tmp_path / n) for n in ("d.safetensors", "e.safetensors", "f.safetensors")}
    assert len(ids) == 4


def test_identity_byte_layout(tmp_path):
    # one F16 tensor "lora_te_k.alpha" [1, 2] = [1.0, -2.0], written out by hand
    p = tmp_path / "one.safetensors"
    st_io.write(p, {"lora_te_k.alpha": np.array([[1.0, -2.0]], np.float32), "lora_unet_x.alpha": np.ones(3)}, "F16")
    blob = (b"\x0f\x00\x00\x00\x00\x00\x00\x00" + b"lora_te_k.alpha"
            + b"\x03\x00\x00\x00\x00\x00\x00\x00" + b"F16"
            + b"\x02\x00\x00\x00\x00\x00\x00\x00" + b"\x01" + b"\x00" * 7 + b"\x02" + b"\x00" * 7
            + b"\x04\x00\x00\x00\x00\x00\x00\x00" + b"\x00\x3c\x00\xc0")
    assert ref_lora.lora_identity(p) == hashlib.sha256(blob).hexdigest()
    q = tmp_path / "none.safetensors"
    st_io.write(q, {"lora_unet_x.alpha": np.ones(3)}, "F32")
    assert ref_lora.lora_identity(q) == hashlib.sha256(b"").hexdigest()
    assert struct.calcsize("<Q") == 8


# ------------------------------------------------------------------ (f) ref_clip --lora

def test_ref_clip_cli_with_lora(tmp_path, model, write_tokens):
    m = model("sd1", width=64, layers=2)
    tok = tokens_for([15], [1.3])
    tpath = write_tokens(tok)
    odd = tmp_path / "x:y"
    odd.mkdir()
    la = make_loras.write_lora(odd / "a.safetensors", "kohya", "sd1", width=64, layers=2, rank=2, alpha=1.0)
    lb = make_loras.write_lora(tmp_path / "b.safetensors", "loha", "sd1", width=64, layers=2, rank=2, seed=5)

    def run(*extra):
        out = tmp_path / ("out%d.safetensors" % len(extra))
        r = subprocess.run([sys.executable, str(HERE / "ref_clip.py"), "--model", str(m), "--tokens", str(tpath),
                            "--out", str(out)] + [str(e) for e in extra],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        t, _ = st_io.read(out)
        return t["cond"], t["pooled"]

    plain = run()
    with_lora = run("--lora", "%s:0.9" % la, "--lora", "%s:-0.5" % lb)
    assert np.array_equal(plain[0], ref_clip.encode([m], tok)[0])
    assert rel_err(with_lora[0], plain[0]) > 1e-3 and rel_err(with_lora[1], plain[1]) > 1e-3
    api = ref_clip.encode([m], tok, loras=[(la, 0.9), (lb, -0.5)])
    assert np.array_equal(with_lora[0], api[0]) and np.array_equal(with_lora[1], api[1])
    r = subprocess.run([sys.executable, str(HERE / "ref_clip.py"), "--model", str(m), "--tokens", str(tpath),
                        "--out", str(tmp_path / "bad.safetensors"), "--lora", str(lb)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode != 0


def test_make_loras_cli(tmp_path):
    out = tmp_path / "cli.safetensors"
    r = subprocess.run([sys.executable, str(HERE / "make_loras.py"), "--format", "lokr", "--family", "sdxl",
                        "--width", "64", "--layers", "2", "--l-width", "64", "--l-layers", "3", "--rank", "2",
                        "--lokr-variant", "both", "--alpha", "2", "--dtype", "bf16", "--modules", "q,fc2",
                        "--only-layers", "1", "--unet", "--bogus", "1", "--out", str(out)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    hdr, _, _ = st_io.read_header(out)
    assert hdr["lora_te2_text_model_encoder_layers_1_mlp_fc2.lokr_w2_b"]["dtype"] == "BF16"
    assert hdr["lora_te1_text_model_encoder_layers_1_self_attn_q_proj.lokr_w1_a"]["shape"] == [4, 2]
    assert ref_lora.report(out, "sdxl") == (4, ["lora_te1_text_model_encoder_layers_0_self_attn_bogus.lora_down.weight",
                                                "lora_te1_text_model_encoder_layers_0_self_attn_bogus.lora_up.weight"])
