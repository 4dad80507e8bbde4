"""test_lora_client.py -- the client side of LoRA stacks, without lunad's LoRA support.

- identity: lunaclient.lora_identity against `luna lora id` and against the definition
  in src/lora/lora.h computed here from the arrays themselves; what must not change it
  (file name, metadata, tensor order, UNet tensors) and what must (a value, a dtype, a
  shape, a name);
- extract_te: the upload image holds the text-encoder tensors alone, with the same
  identity, and is the image the C client uploads byte for byte;
- `luna encode --lora FILE:STRENGTH` parsing (strict strength, split at the last ':'),
  `luna lora` usage;
- the upload-on-ENOLORA protocol of both clients (C library through `luna`, Python)
  against LoraFake, a Python stand-in for lunad's LoRA cache on a Unix socket;
- `luna encode --local --lora` on a generated model: strength 0 is the base model bit
  for bit, the stack goes into the metadata, unmapped keys are reported;
- LoRAs held in memory (LoraImage, or any object with .data/.strength[/.identity]):
  identities, uploads of the text-encoder part from bytes, and through a real lunad
  the same result as the file.
"""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import st_io
from conftest_daemon import daemon_models, start_lunad  # noqa: F401
from c_program import build_c_program
from fake_server import FakeServer, recv_exact

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "python"))
from lunaclient import Client, Lora, LoraImage, LunaError, extract_te, extract_te_image, lora_identity  # noqa: E402
from lunaclient import lora as lcl  # noqa: E402
from lunaclient import proto  # noqa: E402

# ---- LoRA files ---------------------------------------------------------------------

KOHYA = "lora_te_text_model_encoder_layers_%d_%s"
MODULES = ("self_attn_q_proj", "self_attn_v_proj", "mlp_fc1")


def kohya_tensors(seed=0, width=128, rank=4, layers=(0, 1)):
    """Text-encoder tensors of a kohya-style SD1 LoRA: up, down (F16) and alpha (F32)."""
    rng = np.random.default_rng(seed)
    out = {}
    for b in layers:
        for m in MODULES:
            x = KOHYA % (b, m)
            n_out = 4 * width if m == "mlp_fc1" else width
            out[x + ".lora_down.weight"] = rng.standard_normal((rank, width)).astype(np.float32) * 0.1
            out[x + ".lora_up.weight"] = rng.standard_normal((n_out, rank)).astype(np.float32) * 0.01
            out[x + ".alpha"] = np.array(float(rank), dtype=np.float32)
    return out


def dtypes_of(tensors):
    return {k: ("F32" if k.endswith(".alpha") else "F16") for k in tensors}


def unet_tensors(seed=1):
    rng = np.random.default_rng(seed)
    return {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": rng.standard_normal((4, 32)),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": rng.standard_normal((32, 4)),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.array(4.0),
    }


def write_lora(path, te, extra=None, metadata=None, dtypes=None):
    tensors = dict(te)
    tensors.update(extra or {})
    dt = dtypes_of(tensors)
    dt.update(dtypes or {})
    st_io.write(str(path), tensors, dtype=dt, metadata=metadata)
    return path


def spec_identity(tensors, dtypes):
    """The identity exactly as src/lora/lora.h defines it, from the arrays."""
    h = hashlib.sha256()

    def field(b):
        h.update(struct.pack("<Q", len(b)))
        h.update(b)

    for name in sorted((k for k in tensors if lcl.is_te_key(k)), key=lambda k: k.encode()):
        a = np.asarray(tensors[name])
        field(name.encode())
        field(dtypes[name].encode())
        h.update(struct.pack("<Q", a.ndim))
        for d in a.shape:
            h.update(struct.pack("<Q", d))
        field(st_io.encode_array(a, dtypes[name]))
    return h.hexdigest()


def luna_id(run_luna, path):
    r = run_luna("lora", "id", path)
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    assert len(out) == 64 and all(c in "0123456789abcdef" for c in out), out
    return out


# ---- identity --------------------------------------------------------------------------

def test_identity_matches_luna_and_the_definition(run_luna, tmp_path):
    te = kohya_tensors()
    a = write_lora(tmp_path / "a.safetensors", te, unet_tensors(), {"ss_network_dim": "4", "name": "a"})
    want = spec_identity(te, dtypes_of(te))
    assert lora_identity(a) == want
    assert luna_id(run_luna, a) == want

    # a different file name, no metadata, no UNet tensors, another tensor order in the file
    b = tmp_path / "renamed-b.safetensors"
    order = sorted(te, key=lambda k: (k.endswith(".alpha"), k[::-1]))
    st_io.write_specs(str(b), [st_io.TensorSpec(k, dtypes_of(te)[k], np.shape(te[k]), (lambda v=te[k]: v))
                               for k in order])
    c = write_lora(tmp_path / "c.safetensors", te, unet_tensors(seed=7), {"other": "metadata"})
    for p in (b, c):
        assert lora_identity(p) == want and luna_id(run_luna, p) == want

    # what must change it
    changed = []
    t2 = dict(te)
    k0 = next(iter(te))
    t2[k0] = te[k0].copy()
    t2[k0].flat[0] += 0.5
    changed.append(write_lora(tmp_path / "value.safetensors", t2))
    changed.append(write_lora(tmp_path / "dtype.safetensors", te, dtypes={k0: "F32"}))
    t3 = dict(te)
    t3[k0.replace("layers_0", "layers_5")] = t3.pop(k0)
    changed.append(write_lora(tmp_path / "name.safetensors", t3))
    t4 = dict(te)
    t4[k0] = te[k0].reshape(1, *te[k0].shape)
    changed.append(write_lora(tmp_path / "shape.safetensors", t4))
    ids = {want}
    for p in changed:
        i = lora_identity(p)
        assert i == luna_id(run_luna, p)
        ids.add(i)
    assert len(ids) == 1 + len(changed)


def test_identity_of_every_prefix(run_luna, tmp_path):
    """All text-encoder prefixes count, in bytewise name order; other tensors do not."""
    rng = np.random.default_rng(3)
    names = ["lora_te_x.alpha", "lora_te1_x.alpha", "lora_te2_x.alpha", "lora_te3_x.alpha",
             "lora_prior_te_x.alpha", "text_encoder.x.lora_A.weight", "text_encoder_2.x.lora_B.weight",
             "text_encoders.clip_l.x.lora_up.weight", "Text_encoder.upper.weight", "lora_tex.not_te",
             "unet.x.lora_A.weight", "lora_unet_x.alpha"]
    tensors = {n: rng.standard_normal((2, 3)).astype(np.float32) for n in names}
    dt = {n: "F32" for n in names}
    p = write_lora(tmp_path / "prefixes.safetensors", {}, tensors, dtypes=dt)
    te_names = [n for n in names if lcl.is_te_key(n)]
    assert len(te_names) == 8
    want = spec_identity(tensors, dt)
    assert lora_identity(p) == want == luna_id(run_luna, p)
    # no text-encoder tensor at all: the hash of nothing, on both sides
    q = write_lora(tmp_path / "unet-only.safetensors", {}, unet_tensors())
    assert lora_identity(q) == hashlib.sha256(b"").hexdigest() == luna_id(run_luna, q)


def test_identity_of_broken_files(run_luna, tmp_path):
    bad = tmp_path / "bad.safetensors"
    header, data = st_io.build_parts({KOHYA % (0, "mlp_fc1") + ".alpha": np.ones(4)}, "F32")
    n = st_io.write_raw(bad, header, data)
    st_io.write_raw(bad, header, data, truncate_to=n - 1)
    with pytest.raises(LunaError) as e:
        lora_identity(bad)
    assert e.value.name == "EFORMAT" and str(bad) in e.value.message
    r = run_luna("lora", "id", bad)
    assert r.returncode == 1 and str(bad) in r.stderr
    with pytest.raises(LunaError) as e:
        lora_identity(tmp_path / "none.safetensors")
    assert e.value.name == "EIO"
    assert run_luna("lora", "id", tmp_path / "none.safetensors").returncode == 1


def test_extract_te_round_trip(run_luna, tmp_path):
    te = kohya_tensors(seed=5)
    src = write_lora(tmp_path / "full.safetensors", te, unet_tensors(), {"ss_network_dim": "4"})
    image = extract_te(src)
    out = tmp_path / "te-only.safetensors"
    out.write_bytes(image)
    tensors, meta = st_io.read(str(out))
    assert meta is None and set(tensors) == set(te)
    for k, v in te.items():
        want = v.astype(np.float16).astype(np.float32) if dtypes_of(te)[k] == "F16" else v
        np.testing.assert_array_equal(tensors[k], want)
    assert lora_identity(out) == lora_identity(src) == luna_id(run_luna, out) == luna_id(run_luna, src)
    assert lcl.identity_of_image(image) == lora_identity(src)
    (n,) = struct.unpack("<Q", image[:8])
    assert n % 8 == 0
    # extracting again changes nothing
    assert extract_te(out) == image


# ---- CLI parsing ------------------------------------------------------------------------

def test_lora_argument_parsing(run_luna, tmp_path):
    base = ["encode", "--model", "m.safetensors", "--tokens", tmp_path / "t.json", "--out", tmp_path / "o.st"]
    for local in ([], ["--local"]):
        for arg, words in (("f.safetensors", ["FILE:STRENGTH", "no ':'"]),
                           ("f.safetensors:", ["strength", "not a finite number"]),
                           ("f.safetensors:abc", ["'abc'", "not a finite number"]),
                           ("f.safetensors:0.5x", ["'0.5x'"]),
                           ("f.safetensors:nan", ["'nan'"]),
                           ("f.safetensors:inf", ["'inf'"]),
                           ("f.safetensors:-1e999", ["'-1e999'"]),
                           ("f.safetensors: 1", ["' 1'"]),
                           (":0.5", ["no file"])):
            r = run_luna(*base, *local, "--lora", arg)
            assert r.returncode == 2, (arg, r.stderr)
            assert "--lora" in r.stderr and arg in r.stderr, (arg, r.stderr)
            for w in words:
                assert w in r.stderr, (arg, w, r.stderr)
    many = []
    for i in range(17):
        many += ["--lora", "f%d.safetensors:1" % i]
    r = run_luna(*base, *many)
    assert r.returncode == 2 and "16" in r.stderr
    r = run_luna(*base, "--lora")
    assert r.returncode == 2 and "--lora" in r.stderr
    r = run_luna("encode", "--help")
    assert r.returncode == 0 and "--lora FILE:STRENGTH" in r.stdout and "luna.lora" in r.stdout


def test_lora_command_usage(run_luna, tmp_path):
    r = run_luna("lora", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage:")
    for action in ("id", "upload", "list", "evict", "pin", "unpin"):
        assert ("\n  %s " % action) in r.stdout, action
        h = run_luna("lora", action, "--help")
        assert h.returncode == 0 and h.stdout.startswith("usage:") and (" lora %s" % action) in h.stdout, action
        b = run_luna("lora", action, "--bogus")
        assert b.returncode == 2 and "--bogus" in b.stderr, action
    assert "lora" in run_luna("--help").stdout
    for args in (["lora"], ["lora", "frobnicate"], ["lora", "id"], ["lora", "id", "a", "b"], ["lora", "list", "x"],
                 ["lora", "evict"], ["lora", "evict", "xyz"], ["lora", "pin", "g" * 64], ["lora", "unpin", "0" * 63],
                 ["--socket", tmp_path / "x.sock", "lora", "id", "f.safetensors"]):
        r = run_luna(*args)
        assert r.returncode == 2 and r.stderr, args
    r = run_luna("lora", "evict", "ab" * 33)
    assert r.returncode == 2 and "64 hex digits" in r.stderr
    # a well-formed request with no lunad to answer it is a failure, not a usage error
    r = run_luna("--socket", tmp_path / "none.sock", "lora", "pin", "AB" * 32)
    assert r.returncode == 1 and "ECONN" in r.stderr


# ---- a stand-in for lunad's LoRA cache ---------------------------------------------------

def fake_outputs(n_chunks=1, width=8):
    cond = (np.cos(np.arange(77 * n_chunks * width) * 0.21) * 2.5).astype(np.float32).reshape(1, 77 * n_chunks, width)
    pooled = np.linspace(-2.0, 1.5, 4, dtype=np.float32).reshape(1, 4)
    return cond, pooled




class LoraFake(FakeServer):
    """Answers ping, encode and LORA requests in order, keeping uploaded LoRAs by their
    identity (recomputed from the image, as lunad does). 'forget': never keep an
    upload (every encode with LoRAs gets ENOLORA). 'daemon_files': identities lunad
    finds under its --loras-dir when the request's "path" names them."""

    def __init__(self, path, forget=False, daemon_files=None):
        self.forget = forget
        self.daemon_files = daemon_files or {}
        self.store = {}
        self.pinned = set()
        self.log = []  # (type, msg, binary)
        super().__init__(str(path))

    def _serve(self, conn):
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
                binary = body[h.json_len:]
                self.log.append((h.type, msg, binary))
                conn.sendall(self._answer(h, msg, binary))

    def _frame(self, h, out, tensors=None):
        return proto.encode_frame(h.type, proto.FLAG_REPLY, h.request_id, out, tensors)

    def _error(self, h, code, message, **extra):
        out = {"code": code, "name": proto.status_name(code), "message": message}
        out.update(extra)
        return proto.encode_frame(h.type, proto.FLAG_REPLY | proto.FLAG_ERROR, h.request_id, out)

    def _answer(self, h, msg, binary):
        if h.type == proto.MSG_PING:
            return self._frame(h, {})
        if h.type == proto.MSG_LORA:
            action = msg.get("action")
            if action == "upload":
                if "tensors" in msg:
                    return self._error(h, proto.EINVAL, "an upload has no \"tensors\"")
                try:
                    got = lcl.identity_of_image(binary, "upload")
                except LunaError as e:
                    return self._error(h, e.code, e.message)
                if got != msg.get("id"):
                    return self._error(h, proto.EINVAL, "upload: the image is LoRA %s, not %s" % (got, msg.get("id")))
                if not self.forget:
                    self.store[got] = binary
                n = len(lcl.parse_header(binary, "upload")[0])
                return self._frame(h, {"id": got, "patches": n // 3, "te_tensors": n, "unmapped": 0,
                                       "unmapped_keys": [], "bytes": len(binary), "cached": True})
            if action == "list":
                return self._frame(h, {"loras": [{"id": i, "source": "upload", "bytes": len(b), "patches": 1, "refs": 0,
                                                  "pinned": i in self.pinned, "hits": 0, "idle_s": 0.0}
                                                 for i, b in self.store.items()],
                                       "used_bytes": sum(len(b) for b in self.store.values()), "budget_bytes": 1 << 30})
            if action in ("evict", "pin", "unpin"):
                i = msg.get("id")
                if i not in self.store:
                    return self._error(h, proto.ENOTFOUND, "no LoRA %s in the cache" % i)
                if action == "evict":
                    del self.store[i]
                    self.pinned.discard(i)
                    return self._frame(h, {"evicted": True, "deferred": False})
                (self.pinned.add if action == "pin" else self.pinned.discard)(i)
                return self._frame(h, {"pinned": action == "pin"})
            return self._error(h, proto.EINVAL, "unknown action %r" % action)
        if h.type == proto.MSG_ENCODE:
            loras = msg.get("loras", [])
            missing = []
            for e in loras:
                i = e["id"]
                if i in self.store or i in missing:
                    continue
                if e.get("path") is not None and self.daemon_files.get(e["path"]) == i:
                    self.store[i] = b"from --loras-dir"
                    continue
                missing.append(i)
            if missing:
                return self._error(h, proto.ENOLORA, "%d LoRA(s) not in the cache: upload them" % len(missing),
                                   missing=missing)
            cond, pooled = fake_outputs()
            out = {"family": "sd1", "cached": False}
            if loras:
                out["lora"] = {"mode": "functional", "patched": 6 * len(loras), "unmapped": 1,
                               "unmapped_keys": ["lora_te_text_model_encoder_layers_9_mlp_fc2.lora_up.weight"]}
            return self._frame(h, out, {"cond": cond, "pooled": pooled})
        return self._error(h, proto.EUNKNOWN, "message type %d" % h.type)

    def of_type(self, t):
        return [(m, b) for (tt, m, b) in self.log if tt == t]


@pytest.fixture
def lora_fake():
    d = Path("/tmp") / ("luna-lora-%d-%d" % (os.getpid(), threading.get_ident() % 100000))
    d.mkdir(exist_ok=True)
    servers = []

    def make(**kw):
        s = LoraFake(d / ("l%d.sock" % len(servers)), **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()
    shutil.rmtree(d, ignore_errors=True)


TOKENS = {"l": [[[49406, 1.0], [320, 1.0], [49407, 1.0]] + [[49407, 1.0]] * 74]}


@pytest.fixture
def two_loras(tmp_path):
    a = write_lora(tmp_path / "style.safetensors", kohya_tensors(seed=11), unet_tensors(), {"k": "v"})
    # a colon in the file name: --lora splits at the last ':'
    b = write_lora(tmp_path / "dir:x-detail.safetensors", kohya_tensors(seed=12, layers=(1,)))
    return a, b


# ---- the C client through luna -------------------------------------------------------

def test_cli_encode_uploads_missing_loras(lora_fake, run_luna, tmp_path, two_loras):
    f = lora_fake()
    a, b = two_loras
    ida, idb = lora_identity(a), lora_identity(b)
    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps(TOKENS))
    out = tmp_path / "o.safetensors"
    r = run_luna("--socket", f.path, "encode", "--model", "demo.safetensors", "--tokens", tok, "--out", out,
                 "--lora", "%s:0.8" % a, "--lora", "%s:-1.25" % b, "--lora", "%s:0" % a, "--summary")
    assert r.returncode == 0, r.stderr
    encodes = f.of_type(proto.MSG_ENCODE)
    uploads = f.of_type(proto.MSG_LORA)
    assert len(encodes) == 2 and len(uploads) == 2              # one ENOLORA, one upload per file, one retry
    for m, _ in encodes:
        assert m["loras"] == [{"id": ida, "strength": 0.8}, {"id": idb, "strength": -1.25}, {"id": ida, "strength": 0}]
        assert m["model"] == "demo.safetensors" and m["tokens"] == TOKENS
    assert sorted(m["id"] for m, _ in uploads) == sorted([ida, idb])
    for m, image in uploads:
        assert m == {"action": "upload", "id": m["id"]}          # no "tensors": the binary part is raw
        src = a if m["id"] == ida else b
        assert image == extract_te(src)                          # the C and Python images agree byte for byte
    tensors, meta = st_io.read(str(out))
    cond, pooled = fake_outputs()
    assert tensors["cond"].tobytes() == cond.tobytes() and tensors["pooled"].tobytes() == pooled.tobytes()
    assert meta == {"luna.family": "sd1", "luna.lora": "%s:0.8,%s:-1.25,%s:0" % (ida, idb, ida)}
    assert "patched (functional)" in r.stdout and "18 weight matrices" in r.stdout
    assert "1 text-encoder key(s)" in r.stderr

    # lunad has them now: one request, nothing uploaded; --bench reuses the handle's identities
    r = run_luna("--socket", f.path, "encode", "--model", "demo.safetensors", "--tokens", tok, "--out", out,
                 "--lora", "%s:1" % a, "--bench", "2")
    assert r.returncode == 0, r.stderr
    assert len(f.of_type(proto.MSG_ENCODE)) == 5 and len(f.of_type(proto.MSG_LORA)) == 2
    # a LoRA file that cannot be read fails before anything is sent
    r = run_luna("--socket", f.path, "encode", "--model", "demo.safetensors", "--tokens", tok, "--out", out,
                 "--lora", "%s:1" % (tmp_path / "none.safetensors"))
    assert r.returncode == 1 and "none.safetensors" in r.stderr
    assert len(f.of_type(proto.MSG_ENCODE)) == 5


def test_cli_gives_up_after_three_rounds(lora_fake, run_luna, tmp_path, two_loras):
    f = lora_fake(forget=True)
    a, _ = two_loras
    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps(TOKENS))
    r = run_luna("--socket", f.path, "encode", "--model", "demo.safetensors", "--tokens", tok,
                 "--out", tmp_path / "o.safetensors", "--lora", "%s:1" % a)
    assert r.returncode == 1 and "ENOLORA" in r.stderr and "3 rounds" in r.stderr, r.stderr
    assert len(f.of_type(proto.MSG_ENCODE)) == 4 and len(f.of_type(proto.MSG_LORA)) == 3
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_lora_commands(lora_fake, run_luna, two_loras):
    f = lora_fake()
    a, b = two_loras
    ida = lora_identity(a)
    sock = ["--socket", f.path]
    r = run_luna(*sock, "lora", "upload", a)
    assert r.returncode == 0 and r.stdout.strip() == ida, r.stderr
    assert f.of_type(proto.MSG_LORA)[-1][1] == extract_te(a)
    r = run_luna(*sock, "lora", "list")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert [e["id"] for e in listed["loras"]] == [ida] and listed["used_bytes"] > 0
    r = run_luna(*sock, "lora", "pin", ida.upper())
    assert r.returncode == 0 and json.loads(r.stdout) == {"pinned": True}
    assert f.of_type(proto.MSG_LORA)[-1][0] == {"action": "pin", "id": ida}
    r = run_luna(*sock, "lora", "unpin", ida)
    assert r.returncode == 0 and json.loads(r.stdout) == {"pinned": False}
    r = run_luna(*sock, "lora", "evict", ida)
    assert r.returncode == 0 and json.loads(r.stdout)["evicted"] is True
    r = run_luna(*sock, "lora", "evict", ida)
    assert r.returncode == 1 and "ENOTFOUND" in r.stderr
    r = run_luna(*sock, "lora", "upload", str(a) + ".missing")
    assert r.returncode == 1 and ".missing" in r.stderr


LIB_PROGRAM = r"""
#include "luna.h"
#include <stdio.h>

int main(int argc, char **argv) {
  if (argc != 3) return 2;
  char id[65] = "x";
  int rc = luna_lora_identity(argv[2], id);
  printf("identity %d %s\n", rc, id);
  rc = luna_lora_identity("/nonexistent.safetensors", id);
  printf("identity-missing %d '%s'\n", rc, id);
  luna_client *c = NULL;
  if (luna_client_connect_unix(argv[1], &c)) return 1;
  const char *models[] = {"demo.safetensors"};
  luna_lora stack[] = {{argv[2], 0.75, NULL}, {argv[2], -0.5, "a/b.safetensors"}};
  luna_encode_args a = {0};
  a.models = models;
  a.n_models = 1;
  a.tokens_json = "{\"l\": [[[49406, 1.0], [49407, 1.0]]]}";
  a.loras = stack;
  a.n_loras = 2;
  luna_encode_result r;
  rc = luna_client_encode(c, &a, &r);
  printf("encode %d '%s' %s %d %d %lld\n", rc, luna_client_errmsg(c), r.lora_mode, r.lora_patched, r.lora_unmapped,
         (long long)r.cond_shape[1]);
  luna_encode_result_free(&r);
  a.n_loras = 17;
  printf("too-many %d\n", luna_client_encode(c, &a, &r));
  stack[0].strength = 1.0 / 0.0;
  a.n_loras = 1;
  printf("inf %d\n", luna_client_encode(c, &a, &r));
  char up[65] = "";
  rc = luna_client_lora_upload(c, argv[2], up);
  printf("upload %d %s\n", rc, up);
  rc = luna_client_lora_upload(c, "/nonexistent.safetensors", up);
  printf("upload-missing %d %s\n", rc, luna_client_errmsg(c));
  luna_client_close(c);
  return 0;
}
"""


@pytest.mark.parametrize("kind", ["static", "shared"])
def test_c_library_lora_api(lora_fake, tmp_path, two_loras, kind):
    """luna_lora_identity, luna_client_encode with a stack and luna_client_lora_upload
    from a program that knows only include/luna.h (the static library carries SHA-256)."""
    src = tmp_path / "prog.c"
    src.write_text(LIB_PROGRAM)
    exe = build_c_program(src, tmp_path / "prog", kind, ["-Wno-div-by-zero"])
    f = lora_fake()
    a, _ = two_loras
    ida = lora_identity(a)
    r = subprocess.run([str(exe), f.path, str(a)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["identity"] == "0 " + ida
    assert lines["identity-missing"].split()[0] == str(proto.EIO) and lines["identity-missing"].endswith("''")
    assert lines["encode"] == "0 '' functional 12 1 77"
    enc = f.of_type(proto.MSG_ENCODE)
    # one upload after ENOLORA (the same file twice in the stack), one by luna_client_lora_upload;
    # the bad stacks never left the client
    assert len(enc) == 2 and [m["id"] for m, _ in f.of_type(proto.MSG_LORA)] == [ida, ida]
    assert enc[0][0]["loras"] == [{"id": ida, "strength": 0.75}, {"id": ida, "strength": -0.5, "path": "a/b.safetensors"}]
    assert lines["too-many"] == str(proto.EINVAL) and lines["inf"] == str(proto.EINVAL)
    assert lines["upload"] == "0 " + ida
    assert lines["upload-missing"].startswith(str(proto.EIO)) and "/nonexistent.safetensors" in lines["upload-missing"]


# ---- the Python client ------------------------------------------------------------------

def test_python_encode_uploads_missing_loras(lora_fake, two_loras):
    f = lora_fake(daemon_files={"sub/detail.safetensors": None})
    a, b = two_loras
    ida, idb = lora_identity(a), lora_identity(b)
    f.daemon_files["sub/detail.safetensors"] = idb
    with Client.unix(f.path, timeout=10) as c:
        cond, pooled, info = c.encode("demo.safetensors", tokens=TOKENS,
                                      loras=[(a, 0.5), Lora(str(b), 2, "sub/detail.safetensors")])
        want_c, want_p = fake_outputs()
        np.testing.assert_array_equal(cond, want_c)
        np.testing.assert_array_equal(pooled, want_p)
        assert info["lora"]["mode"] == "functional" and info["lora"]["patched"] == 12
        enc = f.of_type(proto.MSG_ENCODE)
        assert len(enc) == 2
        assert enc[0][0]["loras"] == [{"id": ida, "strength": 0.5},
                                      {"id": idb, "strength": 2.0, "path": "sub/detail.safetensors"}]
        up = f.of_type(proto.MSG_LORA)
        assert [m for m, _ in up] == [{"action": "upload", "id": ida}]   # b came from the daemon's folder
        assert up[0][1] == extract_te(a)

        # encode_request for send(): the same JSON, identities from the cache
        assert c.encode_request("demo.safetensors", tokens=TOKENS, loras=[(a, 1)])["loras"] == [{"id": ida, "strength": 1.0}]

        # lora_* calls
        rep = c.lora_upload(b)
        assert rep["id"] == idb and rep["cached"] is True
        assert sorted(e["id"] for e in c.lora_list()["loras"]) == sorted([ida, idb])
        assert c.lora_pin(ida) == {"pinned": True}
        assert c.lora_unpin(ida.upper()) == {"pinned": False}
        assert c.lora_evict(ida)["evicted"] is True
        with pytest.raises(LunaError) as e:
            c.lora_evict(ida)
        assert e.value.name == "ENOTFOUND"

        # bad stacks never reach lunad
        n = len(f.log)
        for bad in ([(a, float("nan"))], [(a, True)], [(a,)], [("", 1)], [(a, "1")], [(a, 1)] * 17,
                    [Lora(a, 1, "")]):
            with pytest.raises(LunaError) as e:
                c.encode("demo.safetensors", tokens=TOKENS, loras=bad)
            assert e.value.name == "EINVAL", bad
        with pytest.raises(LunaError) as e:
            c.encode("demo.safetensors", tokens=TOKENS, loras=[(str(a) + ".missing", 1)])
        assert e.value.name == "EIO" and ".missing" in e.value.message
        assert len(f.log) == n
        c.ping()


def test_python_enolora_error_and_retry_limit(lora_fake, two_loras):
    f = lora_fake(forget=True)
    a, _ = two_loras
    ida = lora_identity(a)
    with Client.unix(f.path, timeout=10) as c:
        # without the automatic retry: the error names what to upload
        with pytest.raises(LunaError) as e:
            c.call(proto.MSG_ENCODE, c.encode_request("demo.safetensors", tokens=TOKENS, loras=[(a, 1)]))
        assert e.value.name == "ENOLORA" and e.value.missing == [ida] and e.value.reply["missing"] == [ida]
        with pytest.raises(LunaError) as e:
            c.encode("demo.safetensors", tokens=TOKENS, loras=[(a, 1)])
        assert e.value.name == "ENOLORA" and "3 rounds" in e.value.message and e.value.missing == [ida]
        assert len(f.of_type(proto.MSG_ENCODE)) == 1 + 4 and len(f.of_type(proto.MSG_LORA)) == 3
        c.ping()
    # other errors carry no "missing"
    assert proto.error_from_reply({"code": -20, "message": "x"}).missing == []


def test_python_identity_cache(lora_fake, tmp_path):
    p = write_lora(tmp_path / "c.safetensors", kohya_tensors(seed=1))
    with Client.unix(lora_fake().path, timeout=10) as c:
        first = c.lora_id(p)
        assert c.lora_id(p) == first == lora_identity(p)
        write_lora(p, kohya_tensors(seed=2))
        os.utime(p, ns=(1, 1))   # a different mtime whatever the clock's resolution
        assert c.lora_id(p) == lora_identity(p) != first


def test_send_raw_binary_part(lora_fake):
    f = lora_fake()
    with Client.unix(f.path, timeout=10) as c:
        with pytest.raises(LunaError) as e:
            c.call(proto.MSG_LORA, {"action": "upload", "id": "0" * 64}, raw=b"\x00" * 5)
        assert e.value.name == "EFORMAT"
        assert f.log[-1][2] == b"\x00" * 5 and "tensors" not in f.log[-1][1]
        with pytest.raises(LunaError):
            c.send(proto.MSG_LORA, {}, tensors={"x": np.zeros(2)}, raw=b"x")
    frame = proto.encode_frame(proto.MSG_LORA, 0, 3, {"a": 1}, raw=b"abc")
    h, msg, tensors = proto.decode_frame(frame)
    assert h.bin_len == 3 and frame.endswith(b"abc") and msg == {"a": 1} and tensors == {}


# ---- --local ------------------------------------------------------------------------------

def test_local_encode_with_lora(model, run_luna, tmp_path):
    m = model("sd1")
    width = 128
    te = kohya_tensors(seed=21, width=width)
    rng = np.random.default_rng(4)
    bogus = {"lora_te_text_model_encoder_layers_0_self_attn_bogus.lora_up.weight": rng.standard_normal((width, 4)),
             "lora_te_text_model_encoder_layers_0_self_attn_bogus.lora_down.weight": rng.standard_normal((4, width))}
    lp = write_lora(tmp_path / "l.safetensors", te, dict(unet_tensors(), **bogus))
    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps(TOKENS))
    outs = {}
    for name, extra in (("base", []), ("zero", ["--lora", "%s:0" % lp]), ("one", ["--lora", "%s:1" % lp])):
        out = tmp_path / (name + ".safetensors")
        r = run_luna("encode", "--local", "--model", m, "--tokens", tok, "--out", out, *extra)
        assert r.returncode == 0, r.stderr
        outs[name] = st_io.read(str(out))
        if extra:
            assert "match nothing" in r.stderr and "bogus" in r.stderr, r.stderr
    lid = lora_identity(lp)
    assert outs["base"][1] == {"luna.family": "sd1"}
    assert outs["zero"][1] == {"luna.family": "sd1", "luna.lora": "%s:0" % lid}
    assert outs["one"][1]["luna.lora"] == "%s:1" % lid
    for k in ("cond", "pooled"):
        assert outs["zero"][0][k].tobytes() == outs["base"][0][k].tobytes()
    assert outs["one"][0]["cond"].tobytes() != outs["base"][0]["cond"].tobytes()
    assert np.isfinite(outs["one"][0]["cond"]).all()


# ---- LoRAs held in memory -------------------------------------------------------------------

def test_lora_image_object(two_loras):
    a, _ = two_loras
    data = Path(a).read_bytes()
    ida = lora_identity(a)
    img = LoraImage(data, 0.5)
    assert img.identity == ida == lcl.identity_of_image(data)
    assert LoraImage(data, 1, identity=ida.upper()).identity == ida
    assert extract_te_image(data) == extract_te(a)
    assert lcl.identity_and_image_of_bytes(data) == (ida, extract_te(a))
    for bad in (dict(data="text"), dict(data=data, identity="12"), dict(data=data, identity="g" * 64)):
        with pytest.raises(LunaError) as e:
            LoraImage(bad.pop("data"), 1, **bad)
        assert e.value.name == "EINVAL"
    with pytest.raises(LunaError) as e:
        _ = LoraImage(b"\x00" * 9, 1).identity
    assert e.value.name == "EFORMAT"


def test_python_encode_uploads_in_memory_loras(lora_fake, two_loras):
    from types import SimpleNamespace
    f = lora_fake()
    a, b = two_loras
    ida, idb = lora_identity(a), lora_identity(b)
    da, db = Path(a).read_bytes(), Path(b).read_bytes()
    with Client.unix(f.path, timeout=10) as c:
        # a LoraImage, an object with .data and .strength, a file: one stack
        c.encode("demo.safetensors", tokens=TOKENS,
                 loras=[LoraImage(da, 0.5), SimpleNamespace(data=db, strength=-1.0), (a, 2)])
        enc = f.of_type(proto.MSG_ENCODE)
        assert enc[0][0]["loras"] == [{"id": ida, "strength": 0.5}, {"id": idb, "strength": -1.0},
                                      {"id": ida, "strength": 2.0}]
        up = f.of_type(proto.MSG_LORA)
        assert sorted(m["id"] for m, _ in up) == sorted([ida, idb])
        got = {m["id"]: binary for m, binary in up}
        assert got[ida] == extract_te(a) and got[idb] == extract_te(b)   # the text-encoder part only
        # known now: no upload; a dict with a given identity is trusted for the request
        n = len(f.log)
        c.encode("demo.safetensors", tokens=TOKENS, loras=[{"data": db, "strength": 1, "identity": idb}])
        assert len(f.log) == n + 1
        # a given identity that is not the image's: the upload refuses it
        wrong = "ab" * 32
        with pytest.raises(LunaError) as e:
            c.encode("demo.safetensors", tokens=TOKENS, loras=[LoraImage(da, 1, identity=wrong)])
        assert e.value.name == "EINVAL" and wrong in e.value.message and ida in e.value.message
        # bad entries never reach lunad
        n = len(f.log)
        for bad in ([LoraImage(da, float("inf"))], [SimpleNamespace(data="x", strength=1)],
                    [{"data": b"", "strength": 1}], [SimpleNamespace(data=da, strength=1, identity=5)]):
            with pytest.raises(LunaError) as e:
                c.encode("demo.safetensors", tokens=TOKENS, loras=bad)
            assert e.value.name == "EINVAL", bad
        assert len(f.log) == n
        c.ping()


def test_in_memory_lora_through_lunad(start_lunad, tmp_path):
    """A LoraImage gives lunad's result for the same file, bit for bit; lunad parsed
    what the client uploaded from memory."""
    from conftest import tokens_for
    lp = write_lora(tmp_path / "mem.safetensors", kohya_tensors(seed=31, width=64), unet_tensors())
    d = start_lunad("--cache-mem", "0")
    tok = tokens_for([14], [1.2])
    with d.client(timeout=60) as c:
        base = c.encode("tiny.safetensors", tokens=tok)
        mem = c.encode("tiny.safetensors", tokens=tok, loras=[LoraImage(Path(lp).read_bytes(), 0.9)])
        assert mem[2]["lora"]["patched"] == 6
        assert c.lora_evict(lora_identity(lp))["evicted"] is True
        fil = c.encode("tiny.safetensors", tokens=tok, loras=[(lp, 0.9)])
        assert mem[0].tobytes() == fil[0].tobytes() and mem[1].tobytes() == fil[1].tobytes()
        assert mem[0].tobytes() != base[0].tobytes()
        assert c.status()["lora"]["cache"]["uploads"] == 2
