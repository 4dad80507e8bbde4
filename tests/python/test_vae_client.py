"""test_vae_client.py -- the client side of the VAE, with no VAE anywhere.

- `luna decode` / `luna encode-image` option errors (exit 2, the option named);
- FakeVae, a Python stand-in for lunad on a Unix socket whose "VAE" is a known
  function (decode: nearest 8x upsampling of the first channels; encode: one sample
  per 8x8 cell after the centered crop) and which sends progress frames before its
  replies, or breaks the rules on purpose when the model's name says so;
- PNG through the CLI: the values written (ComfyUI's SaveImage: clip(255 * x) truncated,
  NaN refused) read back with the small PNG reader here, and PNGs of every colour type
  and depth written here read by `luna encode-image` (LoadImage's conversion), checked
  on the image the fake received;
- `--local` on small random VAEs (make_vae.py): shapes, PNG equal to the safetensors
  values through SaveImage's conversion, PNG input equal to its float values, bench JSON;
- the C library (vae_smoke.c, built against libluna.a and libluna.so) and the Python
  client against the fake: progress callbacks in order, results, EPROTO for a progress
  frame with a wrong id, type or a binary part, pipelining with progress frames.
"""

import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

import st_io
from c_program import build_c_program, build_dir
from fake_server import FakeServer, recv_exact

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "python"))
from lunaclient import Client, LunaError  # noqa: E402
from lunaclient import proto  # noqa: E402

PROGRESS = [0.25, 0.5, 0.75, 1.0]


# ---- the fake "VAE" ------------------------------------------------------------------

def fake_decode(latent):
    """image [B, 8h, 8w, 3]: channel k of pixel (Y, X) is latent[b, k % C, Y // 8, X // 8]."""
    C = latent.shape[1]
    x = latent[:, [k % C for k in range(3)]]
    return np.ascontiguousarray(x.repeat(8, axis=2).repeat(8, axis=3).transpose(0, 2, 3, 1), dtype=np.float32)


def fake_encode(pixels, channels=4):
    """latent [B, 4, H/8, W/8]: channel k of cell (y, x) is the pixel at (oy + 8y, ox + 8x)
    of channel k % 3, (oy, ox) being ComfyUI's crop offsets."""
    B, H, W, _ = pixels.shape
    oy, ox = (H % 8) // 2, (W % 8) // 2
    cells = pixels[:, oy:oy + H // 8 * 8:8, ox:ox + W // 8 * 8:8, :]
    return np.ascontiguousarray(cells[..., [k % 3 for k in range(channels)]].transpose(0, 3, 1, 2), dtype=np.float32)




class FakeVae(FakeServer):
    """Answers VAE requests (and pings) like lunad. Once 'batch' requests of a connection
    are waiting it sends, last request first, the progress frames of each (those that
    asked for them), then the replies. The model name picks a misbehaviour:
      always-progress        progress frames even when not asked for
      fail-after-progress    progress frames, then ENOTFOUND
      progress-wrong-id      a progress frame for another request id
      progress-wrong-type    a progress frame with another message type
      progress-binary        a progress frame with a binary part
      progress-bad           {"progress": "half"}
      bad-shape              an image one row short
      missing                ENOTFOUND
    'requests' records (header, msg, tensors) of every request."""

    def __init__(self, path, batch=1):
        self.batch = batch
        self.requests = []
        super().__init__(path)

    def _serve(self, conn):
        pending = []
        with conn:
            while True:
                head = recv_exact(conn, proto.HEADER_SIZE)
                if head is None:
                    return
                h = proto.parse_header(head, 1 << 30)
                body = recv_exact(conn, h.json_len + h.bin_len)
                if body is None:
                    return
                msg = proto.parse_json(body[:h.json_len])
                tensors = {k: np.array(v) for k, v in proto.get_tensors(msg, body[h.json_len:]).items()}
                self.requests.append((h, msg, tensors))
                pending.append((h, msg, tensors))
                if len(pending) < self.batch:
                    continue
                try:
                    for p in reversed(pending):
                        for frame in self._progress(*p):
                            conn.sendall(frame)
                    for p in reversed(pending):
                        conn.sendall(self._reply(*p))
                except OSError:
                    return
                pending = []

    @staticmethod
    def _kind(msg):
        model = msg.get("model", "")
        return model.rsplit(".", 1)[0] if isinstance(model, str) else ""

    def _progress(self, h, msg, tensors):
        if h.type not in (proto.MSG_VAE_DECODE, proto.MSG_VAE_ENCODE):
            return []
        kind = self._kind(msg)
        flags = proto.FLAG_REPLY | proto.FLAG_PROGRESS
        if kind == "progress-wrong-id":
            return [proto.encode_frame(h.type, flags, h.request_id + 1000, {"progress": 0.5})]
        if kind == "progress-wrong-type":
            return [proto.encode_frame(proto.MSG_PING, flags, h.request_id, {"progress": 0.5})]
        if kind == "progress-binary":
            return [proto.encode_frame(h.type, flags, h.request_id, {"progress": 0.5},
                                       {"x": np.zeros(1, np.float32)})]
        if kind == "progress-bad":
            return [proto.encode_frame(h.type, flags, h.request_id, {"progress": "half"})]
        if msg.get("progress") is not True and kind != "always-progress":
            return []
        return [proto.encode_frame(h.type, flags, h.request_id, {"progress": v}) for v in PROGRESS]

    def _error(self, h, code, message):
        return proto.encode_frame(h.type, proto.FLAG_REPLY | proto.FLAG_ERROR, h.request_id,
                                  {"code": code, "name": proto.status_name(code), "message": message})

    def _reply(self, h, msg, tensors):
        if h.type == proto.MSG_PING:
            return proto.encode_frame(h.type, proto.FLAG_REPLY, h.request_id, {})
        if h.type not in (proto.MSG_VAE_DECODE, proto.MSG_VAE_ENCODE):
            return self._error(h, proto.EUNKNOWN, "message type %d" % h.type)
        kind = self._kind(msg)
        if kind in ("missing", "fail-after-progress"):
            return self._error(h, proto.ENOTFOUND, "model %s is in none of the models folders" % msg["model"])
        info = {"tiled": msg.get("tiled") is True, "tile": msg.get("tile", 512), "overlap": msg.get("overlap", 64),
                "ms": 1.5}
        if h.type == proto.MSG_VAE_DECODE:
            out = {"image": fake_decode(tensors["latent"])}
        else:
            out = {"latent": fake_encode(tensors["image"])}
        if kind == "bad-shape":
            out = {k: v[:, :-1] for k, v in out.items()}
        return proto.encode_frame(h.type, proto.FLAG_REPLY, h.request_id, info, out)


@pytest.fixture
def sockdir():
    d = Path("/tmp") / ("luna-vae-%d-%d" % (os.getpid(), threading.get_ident() % 100000))
    d.mkdir(exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake(sockdir):
    servers = []

    def make(**kw):
        s = FakeVae(str(sockdir / ("v%d.sock" % len(servers))), **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def err_of(fn, *args, **kw):
    with pytest.raises(LunaError) as e:
        fn(*args, **kw)
    return e.value


def latent_of(B, C, h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((B, C, h, w)).astype(np.float32)


# ---- PNG, written and read here (zlib and struct are all it takes) --------------------

def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)


def png_bytes(samples, color_type, depth, palette=None, trns=None):
    """A PNG of 'samples' ([H, W, channels] integers) with filter 0 on every row. Depths
    below 8 (gray or palette) are packed most significant bits first."""
    samples = np.asarray(samples)
    H, W = samples.shape[:2]
    rows = []
    for y in range(H):
        row = samples[y].reshape(-1)
        if depth == 16:
            data = row.astype(">u2").tobytes()
        elif depth == 8:
            data = row.astype(np.uint8).tobytes()
        else:
            per = 8 // depth
            padded = np.zeros((len(row) + per - 1) // per * per, np.uint32)
            padded[:len(row)] = row
            groups = padded.reshape(-1, per)
            packed = np.zeros(len(groups), np.uint32)
            for i in range(per):
                packed |= groups[:, i] << (8 - depth * (i + 1))
            data = packed.astype(np.uint8).tobytes()
        rows.append(b"\0" + data)
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, depth, color_type, 0, 0, 0))
    if palette is not None:
        out += _chunk(b"PLTE", bytes(np.asarray(palette, np.uint8).reshape(-1)))
    if trns is not None:
        out += _chunk(b"tRNS", trns)
    return out + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b"")


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def read_png(path):
    """An 8-bit RGB, non-interlaced PNG (what luna writes) as uint8 [H, W, 3]."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body) & 0xffffffff
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    W, H, depth, ctype, _, _, interlace = ihdr
    assert (depth, ctype, interlace) == (8, 2, 0), ihdr
    raw = zlib.decompress(idat)
    stride, bpp = W * 3, 3
    out = np.zeros((H, stride), np.uint8)
    prev = [0] * stride
    for y in range(H):
        f = raw[y * (stride + 1)]
        line = list(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            pred = [0, a, b, (a + b) // 2, _paeth(a, b, c)][f]
            line[i] = (line[i] + pred) & 0xff
        out[y] = line
        prev = line
    return out.reshape(H, W, 3)


def save_image_bytes(image):
    """What ComfyUI's SaveImage stores for image [H, W, 3] (float32)."""
    return np.clip(np.float32(255.0) * image.astype(np.float32), 0, 255).astype(np.uint8)


# ---- the CLI: options -------------------------------------------------------------------

@pytest.fixture
def latent_file(tmp_path):
    path = tmp_path / "lat.safetensors"
    st_io.write(str(path), {"latent": latent_of(1, 4, 2, 3)}, dtype="F32")
    return path


def test_cli_help(run_luna):
    for cmd, what in (("decode", "--latent"), ("encode-image", "--image")):
        r = run_luna(cmd, "--help")
        assert r.returncode == 0 and r.stdout.startswith("usage:") and what in r.stdout, r.stdout
        for opt in ("--local", "--tiled", "--tile-size", "--overlap", "--bench", "--no-progress"):
            assert opt in r.stdout, (cmd, opt)
    r = run_luna("--help")
    assert "decode" in r.stdout and "encode-image" in r.stdout


@pytest.mark.parametrize("args,named", [
    (["--tile-size", "12"], "--tile-size"),
    (["--tile-size", "0"], "--tile-size"),
    (["--tile-size", "-64"], "--tile-size"),
    (["--tile-size", "abc"], "--tile-size"),
    (["--overlap", "12"], "--overlap"),
    (["--overlap", "-8"], "--overlap"),
    (["--overlap", "512"], "--overlap"),                       # not below the default tile
    (["--tile-size", "64", "--overlap", "64"], "--overlap"),
    (["--overlap", "0"], "--overlap"),                          # through lunad 0 means the default
    (["--bench", "-1"], "--bench"),
    (["--threads", "4"], "--threads"),                          # --local only
    (["--tiled", "--untiled"], "--untiled"),
    (["--untiled", "--tile-size", "64"], "--untiled"),
    (["--local", "--deadline-ms", "5"], "--deadline-ms"),
    (["--local", "--untiled"], "--untiled"),
    (["--local", "--tile-size", "64"], "--tiled"),              # tiles need --tiled locally
    (["--local", "--threads", "0"], "--threads"),
    (["--deadline-ms", "0"], "--deadline-ms"),
    (["--bogus"], "--bogus"),
    (["--image", "x.png"], "--image"),                          # decode has --latent
    (["extra"], "extra"),
])
def test_cli_decode_option_errors(run_luna, latent_file, tmp_path, args, named):
    r = run_luna("--socket", tmp_path / "none.sock", "decode", "--model", "v.safetensors", "--latent", latent_file,
                 "--out", tmp_path / "o.png", *args)
    assert r.returncode == 2 and named in r.stderr, (args, r.stderr)
    assert not (tmp_path / "o.png").exists()


def test_cli_missing_options(run_luna, tmp_path, latent_file):
    r = run_luna("decode", "--model", "v.safetensors", "--latent", latent_file)
    assert r.returncode == 2 and "--out" in r.stderr
    r = run_luna("decode", "--latent", latent_file, "--out", tmp_path / "o.png")
    assert r.returncode == 2 and "--model" in r.stderr
    r = run_luna("encode-image", "--model", "v.safetensors", "--out", tmp_path / "o.safetensors")
    assert r.returncode == 2 and "--image" in r.stderr
    r = run_luna("encode-image", "--model", "v", "--image", "i.png", "--out", tmp_path / "o.png")
    assert r.returncode == 2 and "--out" in r.stderr and "safetensors" in r.stderr
    r = run_luna("encode-image", "--model", "v", "--latent", latent_file, "--out", tmp_path / "o.safetensors")
    assert r.returncode == 2 and "--latent" in r.stderr
    r = run_luna("decode", "--model", "v", "--latent", latent_file, "--out")
    assert r.returncode == 2 and "--out" in r.stderr


def test_cli_input_errors(run_luna, tmp_path):
    sock = ["--socket", tmp_path / "none.sock"]
    r = run_luna(*sock, "decode", "--model", "v", "--latent", tmp_path / "nope.safetensors", "--out", tmp_path / "o")
    assert r.returncode == 1 and "nope.safetensors" in r.stderr
    other = tmp_path / "other.safetensors"
    st_io.write(str(other), {"x": np.zeros((1, 4, 2, 2), np.float32)}, dtype="F32")
    r = run_luna(*sock, "decode", "--model", "v", "--latent", other, "--out", tmp_path / "o")
    assert r.returncode == 1 and "'latent'" in r.stderr
    flat = tmp_path / "flat.safetensors"
    st_io.write(str(flat), {"latent": np.zeros((4, 8), np.float32)}, dtype="F32")
    r = run_luna(*sock, "decode", "--model", "v", "--latent", flat, "--out", tmp_path / "o")
    assert r.returncode == 1 and "dimensions" in r.stderr
    rgba = tmp_path / "rgba.safetensors"
    st_io.write(str(rgba), {"image": np.zeros((8, 8, 4), np.float32)}, dtype="F32")
    r = run_luna(*sock, "encode-image", "--model", "v", "--image", rgba, "--out", tmp_path / "o.safetensors")
    assert r.returncode == 1 and "channels" in r.stderr
    broken = tmp_path / "broken.png"
    broken.write_bytes(png_bytes(np.random.default_rng(0).integers(0, 256, (16, 16, 3)), 2, 8)[:80])
    r = run_luna(*sock, "encode-image", "--model", "v", "--image", broken, "--out", tmp_path / "o.safetensors")
    assert r.returncode == 1 and "broken.png" in r.stderr and "PNG" in r.stderr
    # with good inputs the failure is the connection, after the files were read
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(np.zeros((8, 8, 3)), 2, 8))
    r = run_luna(*sock, "encode-image", "--model", "v", "--image", good, "--out", tmp_path / "o.safetensors")
    assert r.returncode == 1 and "ECONN" in r.stderr


def test_cli_local_missing_model(run_luna, tmp_path, latent_file):
    r = run_luna("decode", "--local", "--model", tmp_path / "no-vae.safetensors", "--latent", latent_file,
                 "--out", tmp_path / "o.safetensors")
    assert r.returncode == 1 and "no-vae.safetensors" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


# ---- the CLI through the fake ------------------------------------------------------------

def test_cli_decode_safetensors(fake, run_luna, tmp_path):
    f = fake()
    lat = latent_of(2, 4, 3, 2)
    for dtype in ("F32", "F16", "BF16"):
        src = tmp_path / ("lat-%s.safetensors" % dtype)
        st_io.write(str(src), {"latent": lat}, dtype=dtype)
        want_in = st_io.read(str(src))[0]["latent"]
        out = tmp_path / "img.safetensors"
        r = run_luna("--socket", f.path, "decode", "--model", "vae.safetensors", "--latent", src, "--out", out,
                     "--tiled", "--tile-size", "256", "--overlap", "32", "--deadline-ms", "900")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        h, msg, tensors = f.requests[-1]
        assert h.type == proto.MSG_VAE_DECODE
        assert {k: v for k, v in msg.items() if k != "tensors"} == \
            {"model": "vae.safetensors", "tiled": True, "tile": 256, "overlap": 32, "deadline_ms": 900}
        assert tensors["latent"].dtype == np.float32 and tensors["latent"].tobytes() == want_in.tobytes()
        got = st_io.read(str(out))[0]
        assert list(got) == ["image"] and got["image"].tobytes() == fake_decode(want_in).tobytes()
    # [C, h, w] gets a batch of 1; defaults: "auto", no tile or overlap sent
    src = tmp_path / "lat3.safetensors"
    st_io.write(str(src), {"latent": lat[0]}, dtype="F32")
    r = run_luna("--socket", f.path, "decode", "--model", "vae.safetensors", "--latent", src, "--out", out)
    assert r.returncode == 0, r.stderr
    h, msg, tensors = f.requests[-1]
    assert msg["tiled"] == "auto" and "tile" not in msg and "overlap" not in msg and "progress" not in msg
    assert tensors["latent"].shape == (1, 4, 3, 2)
    r = run_luna("--socket", f.path, "decode", "--model", "vae.safetensors", "--latent", src, "--out", out,
                 "--untiled")
    assert r.returncode == 0 and f.requests[-1][1]["tiled"] is False
    r = run_luna("--socket", f.path, "decode", "--model", "missing.safetensors", "--latent", src, "--out", out)
    assert r.returncode == 1 and "ENOTFOUND" in r.stderr and "missing.safetensors" in r.stderr


def test_cli_comfy_latent_files(fake, run_luna, tmp_path):
    """ComfyUI's SaveLatent files: 'latent_tensor', scaled by 1/0.18215 unless the file
    has 'latent_format_version_0' (LoadLatent)."""
    f = fake()
    lat = latent_of(1, 4, 2, 2)
    old, new = tmp_path / "old.latent", tmp_path / "new.latent"
    st_io.write(str(old), {"latent_tensor": lat}, dtype="F32")
    st_io.write(str(new), {"latent_tensor": lat, "latent_format_version_0": np.zeros(0, np.float32)}, dtype="F32")
    for path, want in ((old, lat * np.float32(1.0 / 0.18215)), (new, lat)):
        r = run_luna("--socket", f.path, "decode", "--model", "vae.safetensors", "--latent", path,
                     "--out", tmp_path / "o.safetensors")
        assert r.returncode == 0, r.stderr
        assert f.requests[-1][2]["latent"].tobytes() == want.astype(np.float32).tobytes()


def test_cli_png_values(fake, run_luna, tmp_path):
    """SaveImage's conversion: clip(255 * x, 0, 255) truncated to uint8."""
    f = fake()
    values = np.array([0.999, 1.0, -0.1, 0.0, 0.5, 2.0, 1 / 255, 0.99999, 254.5 / 255, -0.0, 1e-9, 0.1234,
                       np.inf, -np.inf, 0.75, 0.003921568],
                      np.float32)
    lat = values.reshape(1, 1, 4, 4)                      # one channel: the same value in R, G and B
    src = tmp_path / "lat.safetensors"
    st_io.write(str(src), {"latent": lat}, dtype="F32")
    out = tmp_path / "img.png"
    r = run_luna("--socket", f.path, "decode", "--model", "vae.safetensors", "--latent", src, "--out", out)
    assert r.returncode == 0, r.stderr
    got = read_png(out)
    assert got.shape == (32, 32, 3)
    want = save_image_bytes(fake_decode(lat)[0])
    np.testing.assert_array_equal(got, want)
    assert got[0, 0, 0] == 254 and got[0, 8, 0] == 255 and got[0, 16, 0] == 0     # 0.999, 1.0, -0.1
    assert got[8, 24, 0] == 254                                                   # 254.5 / 255 truncates
    assert not list(tmp_path.glob("*.tmp-*"))


def test_cli_png_batch_and_nan(fake, run_luna, tmp_path):
    f = fake()
    lat = np.clip(latent_of(3, 4, 2, 3) * 0.3 + 0.5, 0, 1).astype(np.float32)
    src = tmp_path / "lat.safetensors"
    st_io.write(str(src), {"latent": lat}, dtype="F32")
    out = tmp_path / "many.PNG"
    r = run_luna("--socket", f.path, "decode", "--model", "vae.safetensors", "--latent", src, "--out", out)
    assert r.returncode == 0, r.stderr
    assert not out.exists()
    imgs = fake_decode(lat)
    for i in range(3):
        np.testing.assert_array_equal(read_png(tmp_path / ("many-%d.PNG" % i)), save_image_bytes(imgs[i]))
    # NaN has no PNG value: refused, nothing written
    lat[2, 1, 1, 2] = np.nan
    st_io.write(str(src), {"latent": lat}, dtype="F32")
    nan_out = tmp_path / "nan.png"
    r = run_luna("--socket", f.path, "decode", "--model", "vae.safetensors", "--latent", src, "--out", nan_out)
    assert r.returncode == 1 and "NaN" in r.stderr and "image 2" in r.stderr, r.stderr
    assert not list(tmp_path.glob("nan*"))
    # ... while a safetensors output keeps it
    r = run_luna("--socket", f.path, "decode", "--model", "vae.safetensors", "--latent", src,
                 "--out", tmp_path / "nan.safetensors")
    assert r.returncode == 0 and np.isnan(st_io.read(str(tmp_path / "nan.safetensors"))[0]["image"]).sum() == 64


def _rand(shape, hi, seed):
    return np.random.default_rng(seed).integers(0, hi + 1, size=shape)


PNG_CASES = {
    # name: (samples, color type, depth, extra chunks, expected RGB float32 [H, W, 3])
    "rgb8": lambda: (_rand((9, 11, 3), 255, 1), 2, 8, {}),
    "rgb16": lambda: (_rand((9, 11, 3), 65535, 2), 2, 16, {}),
    "rgba8": lambda: (_rand((8, 10, 4), 255, 3), 6, 8, {}),
    "rgba16": lambda: (_rand((8, 10, 4), 65535, 4), 6, 16, {}),
    "gray8": lambda: (_rand((10, 9, 1), 255, 5), 0, 8, {}),
    "gray16": lambda: (_rand((10, 9, 1), 65535, 6), 0, 16, {}),
    "graya8": lambda: (_rand((8, 8, 2), 255, 7), 4, 8, {}),
    "graya16": lambda: (_rand((8, 8, 2), 65535, 8), 4, 16, {}),
    "gray1": lambda: (_rand((9, 13, 1), 1, 9), 0, 1, {}),
    "gray4": lambda: (_rand((9, 13, 1), 15, 10), 0, 4, {}),
    "palette8": lambda: (_rand((8, 12, 1), 5, 11), 3, 8, {"palette": _rand((6, 3), 255, 12)}),
    "palette4-trns": lambda: (_rand((8, 12, 1), 5, 13), 3, 4,
                              {"palette": _rand((6, 3), 255, 14), "trns": bytes([0, 128, 255])}),
    "rgb8-trns": lambda: (_rand((8, 8, 3), 255, 15), 2, 8, {"trns": struct.pack(">HHH", 1, 2, 3)}),
}


def png_expected(samples, ctype, depth, extra):
    """LoadImage's float32 RGB for these samples: palette looked up, gray copied, alpha
    dropped; 1 to 4-bit gray scaled to 8 bits; v / 255, or v / 65535 at 16 bits."""
    s = np.asarray(samples)
    if ctype == 3:
        rgb, scale = np.asarray(extra["palette"])[s[..., 0]], 255
    else:
        rgb = s[..., :3] if ctype in (2, 6) else np.repeat(s[..., :1], 3, axis=2)
        scale = 65535 if depth == 16 else 255
        if depth < 8:
            rgb = rgb * (255 // (2 ** depth - 1))
    return rgb.astype(np.float32) / np.float32(scale)


@pytest.mark.parametrize("name", sorted(PNG_CASES))
def test_cli_png_input(fake, run_luna, tmp_path, name):
    samples, ctype, depth, extra = PNG_CASES[name]()
    path = tmp_path / (name + ".png")
    path.write_bytes(png_bytes(samples, ctype, depth, extra.get("palette"), extra.get("trns")))
    f = fake()
    out = tmp_path / "lat.safetensors"
    r = run_luna("--socket", f.path, "encode-image", "--model", "vae.safetensors", "--image", path, "--out", out)
    assert r.returncode == 0, r.stderr
    h, msg, tensors = f.requests[-1]
    assert h.type == proto.MSG_VAE_ENCODE
    want = png_expected(samples, ctype, depth, extra)[None]
    got = tensors["image"]
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    lat = st_io.read(str(out))[0]
    assert list(lat) == ["latent"] and lat["latent"].tobytes() == fake_encode(want).tobytes()


def test_cli_png_round_trip(fake, run_luna, tmp_path):
    """decode to PNG, then encode-image of that PNG: the fake sees k / 255 for byte k."""
    f = fake()
    lat = np.clip(latent_of(1, 3, 2, 2) * 0.3 + 0.5, 0, 1).astype(np.float32)
    src = tmp_path / "lat.safetensors"
    st_io.write(str(src), {"latent": lat}, dtype="F32")
    png = tmp_path / "img.png"
    assert run_luna("--socket", f.path, "decode", "--model", "vae.safetensors", "--latent", src,
                    "--out", png).returncode == 0
    r = run_luna("--socket", f.path, "encode-image", "--model", "vae.safetensors", "--image", png,
                 "--out", tmp_path / "back.safetensors")
    assert r.returncode == 0, r.stderr
    want = save_image_bytes(fake_decode(lat)[0]).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(f.requests[-1][2]["image"][0], want)


def test_cli_image_safetensors(fake, run_luna, tmp_path):
    f = fake()
    img = np.random.default_rng(3).random((2, 19, 21, 3)).astype(np.float32)
    for dtype, arr in (("F32", img), ("F16", img), ("BF16", img[0])):
        src = tmp_path / ("img-%s.safetensors" % dtype)
        st_io.write(str(src), {"image": arr}, dtype=dtype)
        want = st_io.read(str(src))[0]["image"]
        want = want if want.ndim == 4 else want[None]
        out = tmp_path / "lat.safetensors"
        r = run_luna("--socket", f.path, "encode-image", "--model", "vae.safetensors", "--image", src, "--out", out,
                     "--tiled")
        assert r.returncode == 0, r.stderr
        h, msg, tensors = f.requests[-1]
        assert msg["tiled"] is True and tensors["image"].tobytes() == want.tobytes()
        lat = st_io.read(str(out))[0]["latent"]
        assert lat.shape == (want.shape[0], 4, 2, 2) and lat.tobytes() == fake_encode(want).tobytes()


def test_cli_bench(fake, run_luna, tmp_path, latent_file):
    f = fake()
    r = run_luna("--socket", f.path, "decode", "--model", "vae.safetensors", "--latent", latent_file,
                 "--out", tmp_path / "o.safetensors", "--bench", "3")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stderr.strip().splitlines()[-1])
    assert b["mode"] == "daemon" and b["runs"] == 3 and b["min_ms"] <= b["median_ms"]
    assert b["peak_rss_mib"] > 0 and b["out"] == [1, 16, 24, 3]
    assert len(f.requests) == 4 and all("progress" not in m for _, m, _ in f.requests)


def run_with_tty_stderr(args, timeout=60):
    """Run 'args' with stderr on a pseudo-terminal; returns (exit status, what it printed there)."""
    master, slave = pty.openpty()
    p = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            p.kill()
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:        # EIO: the child closed its side
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return p.wait(timeout=timeout), out.decode(errors="replace")


def test_cli_progress_on_a_terminal(fake, luna_bin, run_luna, tmp_path, latent_file):
    f = fake()
    args = [luna_bin, "--socket", f.path, "decode", "--model", "vae.safetensors", "--latent", latent_file,
            "--out", tmp_path / "o.safetensors"]
    rc, err = run_with_tty_stderr(args)
    assert rc == 0, err
    assert f.requests[-1][1]["progress"] is True
    assert " 25%" in err and " 50%" in err and "100%" in err and "\r" in err, repr(err)
    assert err.index(" 25%") < err.index(" 50%") < err.index("100%")
    rc, err = run_with_tty_stderr(args + ["--no-progress"])
    assert rc == 0 and "%" not in err
    assert "progress" not in f.requests[-1][1]
    # not a terminal: nothing asked, nothing printed
    r = run_luna(*args[1:])
    assert r.returncode == 0 and r.stderr == "" and "progress" not in f.requests[-1][1]


# ---- --local on a small random VAE (make_vae.py) ---------------------------------------

@pytest.fixture(scope="module")
def tiny_vaes(tmp_path_factory):
    make_vae = pytest.importorskip("make_vae")
    d = tmp_path_factory.mktemp("vae")
    return {"f8": make_vae.write_vae(str(d / "tiny-f8.safetensors"), "ldm", ch=32),
            "f2": make_vae.write_vae(str(d / "tiny-f2.safetensors"), "diffusers", ch=32, ch_mult=(1, 2))}


def test_local_decode_png_and_safetensors(run_luna, tmp_path, tiny_vaes):
    lat = latent_of(2, 4, 4, 6, seed=5)
    src = tmp_path / "lat.safetensors"
    st_io.write(str(src), {"latent": lat}, dtype="F32")
    base = ["decode", "--local", "--model", tiny_vaes["f8"], "--latent", src, "--threads", "2"]
    r = run_luna(*base, "--out", tmp_path / "img.safetensors", "--bench", "2")
    assert r.returncode == 0, r.stderr
    img = st_io.read(str(tmp_path / "img.safetensors"))[0]["image"]
    assert img.shape == (2, 32, 48, 3) and img.min() >= 0 and img.max() <= 1
    b = json.loads(r.stderr.strip().splitlines()[-1])
    assert b["mode"] == "local" and b["runs"] == 2 and b["weights_bytes"] > 0 and b["threads"] == 2
    assert b["out"] == [2, 32, 48, 3] and b["tiled"] is False
    r = run_luna(*base, "--out", tmp_path / "img.png")
    assert r.returncode == 0, r.stderr
    for i in range(2):
        np.testing.assert_array_equal(read_png(tmp_path / ("img-%d.png" % i)), save_image_bytes(img[i]))
    # tiled: the same shape (the values are the tiled algorithm's, not compared here)
    r = run_luna(*base, "--out", tmp_path / "tiled.safetensors", "--tiled", "--tile-size", "16", "--overlap", "8")
    assert r.returncode == 0, r.stderr
    assert st_io.read(str(tmp_path / "tiled.safetensors"))[0]["image"].shape == img.shape
    # a toy VAE with 2 levels: 2 pixels per latent cell
    r = run_luna("decode", "--local", "--model", tiny_vaes["f2"], "--latent", src, "--out", tmp_path / "f2.safetensors")
    assert r.returncode == 0, r.stderr
    assert st_io.read(str(tmp_path / "f2.safetensors"))[0]["image"].shape == (2, 8, 12, 3)


def test_local_encode_png_equals_floats(run_luna, tmp_path, tiny_vaes):
    """encode-image of a PNG is encode-image of its samples / 255 (or / 65535)."""
    for name, depth, hi in (("rgb8", 8, 255), ("rgba16", 16, 65535)):
        ch = 3 if depth == 8 else 4
        samples = _rand((21, 18, ch), hi, 20)
        png = tmp_path / (name + ".png")
        png.write_bytes(png_bytes(samples, 2 if ch == 3 else 6, depth))
        floats = tmp_path / (name + ".safetensors")
        st_io.write(str(floats), {"image": samples[..., :3].astype(np.float32) / np.float32(hi)}, dtype="F32")
        outs = []
        for src in (png, floats):
            out = tmp_path / (src.name + ".lat.safetensors")
            r = run_luna("encode-image", "--local", "--model", tiny_vaes["f8"], "--image", src, "--out", out)
            assert r.returncode == 0, r.stderr
            outs.append(st_io.read(str(out))[0]["latent"])
        assert outs[0].shape == (1, 4, 2, 2)
        assert outs[0].tobytes() == outs[1].tobytes(), name


def test_local_progress_on_a_terminal(luna_bin, tmp_path, tiny_vaes):
    src = tmp_path / "lat.safetensors"
    st_io.write(str(src), {"latent": latent_of(1, 4, 4, 4)}, dtype="F32")
    args = [luna_bin, "decode", "--local", "--model", tiny_vaes["f8"], "--latent", src,
            "--out", tmp_path / "o.safetensors"]
    rc, err = run_with_tty_stderr(args)
    assert rc == 0 and "100%" in err and err.endswith("\n"), repr(err)
    rc, err = run_with_tty_stderr(args + ["--no-progress"])
    assert rc == 0 and "%" not in err, repr(err)


# ---- the C library -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["static", "shared"])
def test_c_library_against_fake(fake, tmp_path, kind):
    exe = build_c_program(Path(__file__).with_name("vae_smoke.c"), tmp_path / ("vae-smoke-" + kind), kind)
    f = fake()
    r = subprocess.run([str(exe), f.path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    progress = ",".join("%g" % v for v in PROGRESS)

    assert lines["decode"] == "0 dims=4 shape=[2,24,40,3] bad=0 progress=%s null=0 msg=''" % progress
    h, msg, tensors = f.requests[0]
    assert h.type == proto.MSG_VAE_DECODE
    assert {k: v for k, v in msg.items() if k != "tensors"} == \
        {"model": "vae.safetensors", "tiled": True, "tile": 256, "overlap": 32, "progress": True, "deadline_ms": 500}
    assert tensors["latent"].shape == (2, 4, 3, 5)
    assert lines["encode"] == "0 shape=[1,4,2,2] bad=0 progress=%s msg=''" % progress
    h, msg, tensors = f.requests[1]
    assert h.type == proto.MSG_VAE_ENCODE and msg["tiled"] == "auto" and "tile" not in msg
    assert tensors["image"].shape == (1, 20, 18, 3)
    # progress frames that were not asked for are read and ignored
    assert lines["decode-quiet"].startswith("0 dims=4 shape=[1,16,16,3] bad=0 progress=- ")
    assert "progress" not in f.requests[2][1]
    # an error after progress: the callback saw the frames, the status is lunad's, the connection lives
    assert lines["fail-after-progress"].startswith("-20 dims=0 shape=[0,0,0,0] bad=0 progress=%s null=1 "
                                                   "msg='ENOTFOUND: " % progress)
    assert lines["ping-after-error"] == "0"
    # broken progress frames: EPROTO, and the connection is dropped
    assert lines["wrong-id"].startswith("-14 dims=0 shape=[0,0,0,0] bad=0 progress=- null=1 msg='EPROTO: ")
    assert "progress for request" in lines["wrong-id"]
    assert lines["ping-after-eproto"] == "-23"
    assert lines["binary"].startswith("-14 ") and "binary part" in lines["binary"]
    assert lines["bad-progress"].startswith("-14 ") and "\"progress\"" in lines["bad-progress"]
    assert lines["wrong-type"].startswith("-14 ") and "of type" in lines["wrong-type"]
    assert lines["bad-shape"].startswith("-14 ") and "tensor 'image' is [1, 15, 16, 3], expected [1, 16, 16, 3]" \
        in lines["bad-shape"]
    for name in ("bad-tiled", "bad-overlap", "null-latent", "zero-dim", "no-model", "null-client"):
        assert lines[name] == "-1", (name, lines[name])
    assert lines["tiny-image"] == "-1 null=1"
    assert lines["ping-at-end"] == "0"


def test_library_exports(tmp_path):
    so = build_dir() / "libluna.so"
    if not so.exists() or not shutil.which("nm"):
        pytest.skip("no libluna.so or nm")
    out = subprocess.run(["nm", "-D", "--defined-only", str(so)], stdout=subprocess.PIPE, text=True).stdout
    for sym in ("luna_client_vae_decode", "luna_client_vae_encode", "luna_tensor_free"):
        assert sym in out
    needed = subprocess.run(["objdump", "-p", str(so)], stdout=subprocess.PIPE, text=True).stdout
    assert "libpng" not in needed            # PNG is the CLI's business


# ---- the Python client ---------------------------------------------------------------------

def test_python_decode_and_encode(fake):
    f = fake()
    lat = latent_of(2, 4, 3, 5)
    seen = []
    with Client.unix(f.path, timeout=10) as c:
        img, info = c.vae_decode("vae.safetensors", lat, progress=seen.append)
        assert seen == PROGRESS
        assert img.dtype == np.float32 and img.shape == (2, 24, 40, 3)
        np.testing.assert_array_equal(img, fake_decode(lat))
        img[0, 0, 0, 0] = 1                          # writable
        assert info == {"tiled": False, "tile": 512, "overlap": 64, "ms": 1.5}
        h, msg, tensors = f.requests[-1]
        assert h.type == proto.MSG_VAE_DECODE
        assert {k: v for k, v in msg.items() if k != "tensors"} == \
            {"model": "vae.safetensors", "tiled": "auto", "tile": 512, "overlap": 64, "progress": True}
        np.testing.assert_array_equal(tensors["latent"], lat)

        # no callback: no progress asked; frames sent anyway are skipped
        img, info = c.vae_decode("always-progress.safetensors", lat[:1].astype(np.float64), tiled=True, tile=256,
                                 overlap=0, deadline_ms=100)
        np.testing.assert_array_equal(img, fake_decode(lat[:1]))
        msg = f.requests[-1][1]
        assert "progress" not in msg and msg["tiled"] is True and msg["tile"] == 256 and msg["overlap"] == 0
        assert msg["deadline_ms"] == 100 and info["tiled"] is True

        pix = np.random.default_rng(1).random((1, 21, 17, 3)).astype(np.float32)
        seen = []
        latent, info = c.vae_encode("vae.safetensors", pix, tiled=False, progress=seen.append)
        assert seen == PROGRESS and latent.shape == (1, 4, 2, 2)
        np.testing.assert_array_equal(latent, fake_encode(pix))
        assert f.requests[-1][0].type == proto.MSG_VAE_ENCODE and f.requests[-1][1]["tiled"] is False

        # an error after progress frames: raised, the connection stays usable
        seen = []
        e = err_of(c.vae_decode, "fail-after-progress.safetensors", lat, progress=seen.append)
        assert e.name == "ENOTFOUND" and seen == PROGRESS and not c.closed
        assert c.ping() >= 0
        e = err_of(c.vae_decode, "bad-shape.safetensors", lat)
        assert e.name == "EPROTO" and "image" in e.message


def test_python_argument_errors(fake):
    f = fake()
    lat = latent_of(1, 4, 2, 2)
    with Client.unix(f.path, timeout=10) as c:
        for kw in (dict(tiled="yes"), dict(tiled=1), dict(tile=0), dict(overlap=-8), dict(tile=64, overlap=64),
                   dict(tile=64.0), dict(progress="not callable")):
            assert err_of(c.vae_decode, "vae.safetensors", lat, **kw).name == "EINVAL", kw
        assert err_of(c.vae_decode, "vae.safetensors", lat[0]).name == "EINVAL"
        assert err_of(c.vae_decode, "", lat).name == "EINVAL"
        assert err_of(c.vae_decode, "vae.safetensors", np.zeros((1, 4, 0, 2), np.float32)).name == "EINVAL"
        assert err_of(c.vae_encode, "vae.safetensors", np.zeros((1, 8, 8, 4), np.float32)).name == "EINVAL"
        assert err_of(c.vae_encode, "vae.safetensors", np.zeros((1, 7, 8, 3), np.float32)).name == "EINVAL"
        assert err_of(c.vae_encode, "vae.safetensors", "pixels").name == "EINVAL"
        assert f.requests == []
        assert c.ping() >= 0


@pytest.mark.parametrize("model,words", [
    ("progress-wrong-id", "not in flight"),
    ("progress-binary", "binary part"),
    ("progress-bad", "\"progress\""),
])
def test_python_broken_progress(fake, model, words):
    f = fake()
    c = Client.unix(f.path, timeout=10)
    seen = []
    e = err_of(c.vae_decode, model + ".safetensors", latent_of(1, 4, 2, 2), progress=seen.append)
    assert e.name == "EPROTO" and words in e.message and c.closed and seen == []
    assert err_of(c.ping).name == "ECONN"


def test_python_callback_raising_cancels(fake):
    f = fake()
    c = Client.unix(f.path, timeout=10)

    def stop(fraction):
        if fraction >= 0.5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        c.vae_decode("vae.safetensors", latent_of(1, 4, 2, 2), progress=stop)
    assert c.closed


def test_python_pipelined_progress(fake):
    """Three requests in flight; the fake sends every progress frame (last request
    first) before any reply. recv() returns the three replies only, each request's
    frames went to its own callback."""
    f = fake(batch=3)
    lat = latent_of(1, 4, 2, 3)
    pix = np.random.default_rng(2).random((1, 16, 16, 3)).astype(np.float32)
    seen_a, seen_b = [], []
    with Client.unix(f.path, timeout=10) as c:
        a = c.send(proto.MSG_VAE_DECODE, c.vae_request("vae.safetensors", progress=True), {"latent": lat},
                   progress=seen_a.append)
        b = c.send(proto.MSG_VAE_ENCODE, c.vae_request("vae.safetensors", progress=True), {"image": pix},
                   progress=seen_b.append)
        p = c.send(proto.MSG_PING)
        got = [c.recv() for _ in range(3)]
        assert [g[0] for g in got] == [p, b, a]
        assert all(g[1] == proto.FLAG_REPLY for g in got)
        assert seen_a == PROGRESS and seen_b == PROGRESS
        np.testing.assert_array_equal(got[2][3]["image"], fake_decode(lat))
        np.testing.assert_array_equal(got[1][3]["latent"], fake_encode(pix))
        # call() with others in flight: their progress goes to their callbacks too
        seen_c = []
        d = c.send(proto.MSG_VAE_DECODE, c.vae_request("vae.safetensors", progress=True), {"latent": lat},
                   progress=seen_c.append)
        c.send(proto.MSG_PING)
        seen_e = []
        img, _ = c.vae_decode("vae.safetensors", lat, progress=seen_e.append)
        assert seen_c == PROGRESS and seen_e == PROGRESS
        np.testing.assert_array_equal(img, fake_decode(lat))
        left = sorted(c.recv()[0] for _ in range(2))
        assert left[0] == d
