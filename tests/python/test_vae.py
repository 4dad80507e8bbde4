"""test_vae.py -- the VAE: luna against an independent PyTorch reference, and through lunad.

1. `luna decode --local` and `luna encode-image --local`, untiled and tiled, on random
   VAEs in every layout (LDM standalone, checkpoint, diffusers with new and old attention
   names, attention as 1x1 convs, F16 and BF16 files, 16 latent channels without quant
   convs) against ref_vae.py (torch.nn.functional, NUMERICS.md 6): image max |a - b| <=
   1e-4, latents max |a - b| / max |b| <= 1e-4; odd sizes, 1 x 1 latents, batches;
2. lunad: equal to --local bit for bit (Python client and CLI), tiled and untiled;
   concurrent decodes from several clients; progress frames; a client that disconnects
   mid-decode cancels it; auto tiling by --vae-max-mem; models of kind "vae";
3. bad input: wrong channel count, empty and huge sizes, NaN, wrong dtype, no VAE in
   the file -- clear errors, and the daemon keeps serving.
"""

import json
import socket
import struct
import threading
import time

import numpy as np
import pytest
import torch

import make_vae
import ref_vae
import st_io
from conftest_daemon import daemon_models, start_lunad  # noqa: F401
from daemon import LunaError, is_san, proto, read_frame
from lunaclient import Client

SAN = is_san()
IMG_TOL = 1e-4
LAT_TOL = 1e-4

# name -> write_vae options
VAES = {
    "ldm": dict(layout="ldm"),
    "checkpoint": dict(layout="checkpoint"),
    "diffusers": dict(layout="diffusers"),
    "diffusers_old": dict(layout="diffusers", old_attn=True),
    "attn_conv": dict(layout="diffusers", attn_conv=True),
    "f16": dict(layout="ldm", dtype="F16"),
    "bf16": dict(layout="checkpoint", dtype="BF16"),
    "flux16": dict(layout="ldm", latent_channels=16, quant=False),
}


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    d = tmp_path_factory.mktemp("vaes")
    out = {}
    for i, (name, opts) in enumerate(VAES.items()):
        p = d / ("vae-%s.safetensors" % name)
        make_vae.write_vae(str(p), seed=i, ch=32, **opts)
        out[name] = p
    return d, out


def run_ok(run_luna, *args):
    r = run_luna(*args)
    assert r.returncode == 0, r.stderr
    return r


def local_decode(run_luna, d, model, latent, tiled=None, name="x"):
    lat = d / ("in-%s.safetensors" % name)
    out = d / ("out-%s.safetensors" % name)
    st_io.write(str(lat), {"latent": latent})
    args = ["decode", "--local", "--model", model, "--latent", lat, "--out", out]
    if tiled:
        args += ["--tiled", "--tile-size", str(tiled[0]), "--overlap", str(tiled[1])]
    run_ok(run_luna, *args)
    return st_io.read(str(out))[0]["image"]


def local_encode(run_luna, d, model, pixels, tiled=None, name="x"):
    img = d / ("in-%s.safetensors" % name)
    out = d / ("out-%s.safetensors" % name)
    st_io.write(str(img), {"image": pixels})
    args = ["encode-image", "--local", "--model", model, "--image", img, "--out", out]
    if tiled:
        args += ["--tiled", "--tile-size", str(tiled[0]), "--overlap", str(tiled[1])]
    run_ok(run_luna, *args)
    return st_io.read(str(out))[0]["latent"]


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ---- 1. against the reference ----------------------------------------------------------

@pytest.mark.parametrize("name", list(VAES))
def test_local_matches_reference(name, vaes, run_luna, tmp_path):
    d, files = vaes
    model = files[name]
    ref = ref_vae.load(str(model))
    rng = np.random.default_rng(3)
    c = 16 if name == "flux16" else 4
    cases = [((1, c, 13, 9), None), ((2, c, 1, 1), None), ((1, c, 11, 20), (64, 16))]
    if name == "ldm":
        cases += [((1, c, 24, 7), (96, 32)), ((1, c, 5, 40), (128, 64))]
    for i, (shape, tiled) in enumerate(cases):
        lat = rng.standard_normal(shape).astype(np.float32)
        got = local_decode(run_luna, tmp_path, model, lat, tiled, "d%d" % i)
        want = ref_vae.run(ref, "decode", lat, tiled=bool(tiled), tile_size=tiled[0] if tiled else 512,
                           overlap=tiled[1] if tiled else 64)
        assert got.shape == want.shape == (shape[0], 8 * shape[2], 8 * shape[3], 3)
        err = float(np.abs(got - want).max())
        assert err <= IMG_TOL, "%s decode %s tiled=%s: max |a-b| %.3g" % (name, shape, tiled, err)
        # the image is not degenerate: the comparison can fail
        assert 0.05 < float(want.std()) and 0.0 < float(want.mean()) < 1.0
    pix_cases = [((1, 37, 29, 3), None), ((2, 8, 8, 3), None), ((1, 83, 61, 3), (64, 16))]
    for i, (shape, tiled) in enumerate(pix_cases):
        pix = rng.random(shape).astype(np.float32)
        got = local_encode(run_luna, tmp_path, model, pix, tiled, "e%d" % i)
        want = ref_vae.run(ref, "encode", pix, tiled=bool(tiled), tile_size=tiled[0] if tiled else 512,
                           overlap=tiled[1] if tiled else 64)
        assert got.shape == want.shape == (shape[0], c, shape[1] // 8, shape[2] // 8)
        assert rel(got, want) <= LAT_TOL, "%s encode %s tiled=%s: %.3g" % (name, shape, tiled, rel(got, want))


def test_broken_reference_is_caught(vaes, run_luna, tmp_path):
    """The comparison can fail: a reference with another GroupNorm epsilon differs from
    luna by more than the tolerance."""
    d, files = vaes
    ref = ref_vae.load(str(files["ldm"]))
    lat = np.random.default_rng(4).standard_normal((1, 4, 9, 9)).astype(np.float32)
    got = local_decode(run_luna, tmp_path, files["ldm"], lat)
    saved = ref_vae.GN_EPS
    try:
        ref_vae.GN_EPS = 1e-2
        bad = ref_vae.run(ref, "decode", lat)
    finally:
        ref_vae.GN_EPS = saved
    assert float(np.abs(got - bad).max()) > IMG_TOL


# ---- 2. through lunad ---------------------------------------------------------------------

def test_daemon_equals_local(vaes, run_luna, start_lunad, tmp_path):
    d, files = vaes
    lunad = start_lunad(models=[d])
    rng = np.random.default_rng(5)
    with Client.unix(str(lunad.socket)) as c:
        for name in ("ldm", "diffusers", "flux16"):
            ch = 16 if name == "flux16" else 4
            lat = rng.standard_normal((2, ch, 10, 7)).astype(np.float32)
            want = local_decode(run_luna, tmp_path, files[name], lat, None, "dd" + name)
            got, info = c.vae_decode(files[name].name, lat, tiled=False)
            assert np.array_equal(got, want) and info["tiled"] is False
            want_t = local_decode(run_luna, tmp_path, files[name], lat, (64, 16), "dt" + name)
            got_t, info = c.vae_decode(files[name].name, lat, tiled=True, tile=64, overlap=16)
            assert np.array_equal(got_t, want_t) and info["tiled"] is True
            pix = rng.random((1, 45, 33, 3)).astype(np.float32)
            want_e = local_encode(run_luna, tmp_path, files[name], pix, None, "de" + name)
            got_e, _ = c.vae_encode(files[name].name, pix, tiled=False)
            assert np.array_equal(got_e, want_e)
        listed = {(m["id"], m["kind"]) for m in c.models()["models"]}
        assert ("vae-ldm.safetensors", "vae") in listed
        c.call(proto.MSG_MODELS, {"action": "unload", "model": "vae-diffusers.safetensors", "kind": "vae"})
        listed = {(m["id"], m["kind"]) for m in c.models()["models"]}
        assert ("vae-diffusers.safetensors", "vae") not in listed
    # the CLI through lunad writes the same file as --local
    lat = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    st_io.write(str(tmp_path / "l.safetensors"), {"latent": lat})
    for extra in ([], ["--tiled", "--tile-size", "64", "--overlap", "16"]):
        a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
        run_ok(run_luna, "--socket", lunad.socket, "decode", "--model", "vae-ldm.safetensors",
               "--latent", tmp_path / "l.safetensors", "--out", a, *extra)
        run_ok(run_luna, "decode", "--local", "--model", files["ldm"], "--latent", tmp_path / "l.safetensors",
               "--out", b, *extra)
        assert st_io.read(str(a))[0]["image"].tobytes() == st_io.read(str(b))[0]["image"].tobytes()


def test_concurrent_decodes_and_progress(vaes, run_luna, start_lunad, tmp_path):
    d, files = vaes
    lunad = start_lunad("--workers", "2", "--threads", "1", models=[d])
    rng = np.random.default_rng(6)
    lats = [rng.standard_normal((1, 4, 12, 10)).astype(np.float32) for _ in range(4)]
    want = [local_decode(run_luna, tmp_path, files["ldm"], x, None, "c%d" % i) for i, x in enumerate(lats)]
    errors, seen = [], {}

    def client(i):
        try:
            with Client.unix(str(lunad.socket)) as c:
                fr = []
                got, _ = c.vae_decode("vae-ldm.safetensors", lats[i], tiled=False, progress=fr.append)
                seen[i] = fr
                if not np.array_equal(got, want[i]):
                    errors.append((i, float(np.abs(got - want[i]).max())))
        except Exception as e:  # noqa: BLE001
            errors.append((i, repr(e)))

    ts = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    assert not errors, errors
    for i, fr in seen.items():
        assert fr == sorted(fr) and all(0.0 <= f <= 1.0 for f in fr), fr


def test_disconnect_cancels_a_decode(vaes, start_lunad, tmp_path):
    d, files = vaes
    lunad = start_lunad("--threads", "1", models=[d])
    big = np.random.default_rng(7).standard_normal((1, 4, 96, 96)).astype(np.float32)
    with Client.unix(str(lunad.socket)) as c:
        c.call(proto.MSG_MODELS, {"action": "load", "model": "vae-ldm.safetensors", "kind": "vae"})
        t = time.monotonic()
        c.vae_decode("vae-ldm.safetensors", big[:, :, :24, :24], tiled=False)
        small_s = time.monotonic() - t
    # start a decode 16x bigger, wait for its first progress frame, vanish
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(lunad.socket))
    body = json.dumps({"model": "vae-ldm.safetensors", "tiled": False, "progress": True,
                       "tensors": {"latent": {"dtype": "F32", "shape": list(big.shape),
                                              "data_offsets": [0, big.nbytes]}}}).encode()
    s.sendall(struct.pack("<4sHHIIQQ", b"LUNA", 1, proto.MSG_VAE_DECODE, 0, len(body), 9, big.nbytes) + body +
              big.tobytes())
    h, msg, _ = read_frame(s)
    assert h.flags & proto.FLAG_PROGRESS and 0 <= msg["progress"] < 1, (h, msg)
    s.close()
    # the worker is free again long before the whole decode would have finished
    t = time.monotonic()
    with Client.unix(str(lunad.socket)) as c:
        c.vae_decode("vae-ldm.safetensors", big[:, :, :24, :24], tiled=False)
        st = c.status()
    assert time.monotonic() - t < max(8 * small_s, 5.0)
    assert st["requests"]["dropped"] >= 1


def test_auto_tiling_by_vae_max_mem(vaes, start_lunad):
    d, files = vaes
    lat = np.random.default_rng(8).standard_normal((1, 4, 16, 16)).astype(np.float32)
    for mem, tiled in (("1K", True), ("8G", False)):
        lunad = start_lunad("--vae-max-mem", mem, models=[d])
        with Client.unix(str(lunad.socket)) as c:
            _, info = c.vae_decode("vae-ldm.safetensors", lat, tile=64, overlap=16)
            assert info["tiled"] is tiled, (mem, info)
            _, info = c.vae_encode("vae-ldm.safetensors", np.full((1, 64, 64, 3), 0.5, np.float32),
                                   tile=64, overlap=16)
            assert info["tiled"] is tiled, (mem, info)
        lunad.stop()


# ---- 3. bad input -------------------------------------------------------------------------

def test_bad_input_is_refused_clearly(vaes, start_lunad, daemon_models):
    d, files = vaes
    lunad = start_lunad(models=[d, daemon_models])
    with Client.unix(str(lunad.socket)) as c:
        def refused(name, fn, *a, **kw):
            with pytest.raises(LunaError) as e:
                fn(*a, **kw)
            assert e.value.name == name, (name, e.value)
            return e.value.message

        m = "vae-ldm.safetensors"

        # straight to lunad, past the client library's own checks
        def dec(x, **kw):
            return c.call(proto.MSG_VAE_DECODE, dict({"model": m}, **kw), tensors={"latent": x})

        def enc(x, **kw):
            return c.call(proto.MSG_VAE_ENCODE, dict({"model": m}, **kw), tensors={"image": x})

        msg = refused("ESHAPE", dec, np.zeros((1, 3, 4, 4), np.float32))
        assert "channels" in msg and "4" in msg
        refused("ESHAPE", dec, np.zeros((1, 4, 0, 4), np.float32))
        refused("ESHAPE", dec, np.zeros((4, 4, 4), np.float32))
        bad = np.zeros((1, 4, 4, 4), np.float32)
        bad[0, 2, 1, 3] = np.nan
        msg = refused("EINVAL", dec, bad)
        assert "latent" in msg
        refused("ESHAPE", enc, np.zeros((1, 16, 16, 4), np.float32))
        refused("ESHAPE", enc, np.zeros((1, 4, 16, 3), np.float32))
        bad = np.zeros((1, 16, 16, 3), np.float32)
        bad[0, 5, 5, 1] = np.inf
        assert "image" in refused("EINVAL", enc, bad)
        # the client library checks shapes before sending
        refused("EINVAL", c.vae_decode, m, np.zeros((1, 4, 0, 4), np.float32))
        with pytest.raises(LunaError) as e:  # a huge latent: refused before any work
            c.call(proto.MSG_VAE_DECODE, {"model": m, "tiled": False},
                   tensors={"latent": np.zeros((1, 4, 5000, 1), np.float32)})
        assert e.value.name in ("ENOMEM", "EINVAL", "ESHAPE")
        with pytest.raises(LunaError) as e:  # F16 input
            c.call(proto.MSG_VAE_DECODE, {"model": m}, tensors={"latent": np.zeros((1, 4, 2, 2), np.float16)})
        assert e.value.name == "EDTYPE"
        with pytest.raises(LunaError) as e:  # a text-encoder file has no VAE
            c.vae_decode("tiny.safetensors", np.zeros((1, 4, 2, 2), np.float32))
        assert e.value.name in ("EMODEL", "EMISSING") and "tiny.safetensors" in e.value.message
        refused("EINVAL", dec, np.zeros((1, 4, 2, 2), np.float32), tiled="sometimes")
        # still serving
        got, _ = c.vae_decode(m, np.zeros((1, 4, 2, 2), np.float32))
        assert got.shape == (1, 16, 16, 3)
