"""test_client_proto.py -- the clients before the daemon: codec, status table, fake lunad.

- lunaclient.proto against the worked example bytes in docs/PROTOCOL.md, and its
  status table against LUNA_STATUS_MAP in include/luna.h;
- header and tensor validation;
- lunaclient.Client against FakeLunad, a Python thread on a Unix socket (or TCP) in a
  temporary folder that answers a batch of requests in reverse order, so pipelining
  and out-of-order replies are exercised;
- the C side against the same fake: `luna ping/health/models/encode` and a small program
  (client_smoke.c) built against libluna.a and libluna.so from include/luna.h alone.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import st_io
from c_program import build_c_program, build_dir
from fake_server import FakeServer, recv_exact

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "python"))
from lunaclient import Client, LunaError, default_socket  # noqa: E402
from lunaclient import proto  # noqa: E402


# ---- the documentation and the header ----------------------------------------------

def doc_example_frames():
    """The request and reply bytes of the worked example in docs/PROTOCOL.md: the hex
    pairs at the start of each line of its two code blocks."""
    text = (REPO / "docs" / "PROTOCOL.md").read_text()
    section = text.split("## A worked example", 1)[1]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    frames = []
    for block in blocks[:2]:
        out = bytearray()
        for line in block.splitlines():
            for tok in line.split():
                if not re.fullmatch(r"[0-9a-f]{2}", tok):
                    break
                out.append(int(tok, 16))
        frames.append(bytes(out))
    return frames


def test_worked_example_bytes():
    req, rep = doc_example_frames()
    assert len(req) == 34 and len(rep) == 34
    assert proto.encode_frame(proto.MSG_PING, 0, 7, {}) == req
    assert proto.encode_frame(proto.MSG_PING, proto.FLAG_REPLY, 7) == rep
    h, msg, tensors = proto.decode_frame(rep)
    assert h == proto.Header(1, proto.MSG_PING, proto.FLAG_REPLY, 2, 7, 0)
    assert msg == {} and tensors == {}


def test_status_table_matches_luna_h():
    text = (REPO / "include" / "luna.h").read_text()
    body = text.split("#define LUNA_STATUS_MAP(XX)", 1)[1].split("enum luna_status", 1)[0]
    rows = [(int(code), name, desc) for name, code, desc in
            re.findall(r'XX\(\s*(\w+)\s*,\s*(-?\d+)\s*,\s*"([^"]*)"\s*\)', body)]
    assert len(rows) >= 25
    assert rows == proto.STATUS
    for code, name, _ in rows:
        assert getattr(proto, name) == code


def test_protocol_constants_match_luna_proto_h():
    text = (REPO / "include" / "luna_proto.h").read_text()
    defs = dict(re.findall(r"#define (LUNA_\w+) (\S+)", text))
    for name in ("HELLO", "PING", "HEALTH", "STATUS", "MODELS", "ENCODE"):
        assert int(defs["LUNA_MSG_" + name]) == getattr(proto, "MSG_" + name)
    assert int(defs["LUNA_PROTO_VERSION"]) == proto.VERSION
    assert int(defs["LUNA_FRAME_HEADER"]) == proto.HEADER_SIZE
    assert int(defs["LUNA_FLAG_REPLY"].rstrip("u"), 16) == proto.FLAG_REPLY
    assert int(defs["LUNA_FLAG_ERROR"].rstrip("u"), 16) == proto.FLAG_ERROR


# ---- codec -------------------------------------------------------------------------

def err_of(fn, *args):
    with pytest.raises(LunaError) as e:
        fn(*args)
    return e.value


def test_header_validation():
    good = proto.pack_header(proto.MSG_PING, 0, 1, 2, 0)
    assert proto.parse_header(good).request_id == 1
    assert err_of(proto.parse_header, good[:31]).name == "EPROTO"
    assert err_of(proto.parse_header, b"LUNB" + good[4:]).name == "EPROTO"
    assert err_of(proto.parse_header, good[:4] + b"\x02\x00" + good[6:]).name == "EVERSION"
    big_json = proto.pack_header(proto.MSG_PING, 0, 1, proto.MAX_JSON + 1, 0)
    assert err_of(proto.parse_header, big_json).name == "ETOOBIG"
    big = proto.pack_header(proto.MSG_PING, 0, 1, 2, proto.DEFAULT_MAX_FRAME)
    assert err_of(proto.parse_header, big, proto.DEFAULT_MAX_FRAME).name == "ETOOBIG"
    huge = proto.pack_header(proto.MSG_PING, 0, 1, 2, 2 ** 64 - 1)
    assert err_of(proto.parse_header, huge).code == proto.ETOOBIG


def test_json_validation():
    assert proto.parse_json(b' {"a": 1} ') == {"a": 1}
    for bad in (b"", b"[1]", b"{", b"{} x", b'{"a": "\xff"}', b'{"a": NaN}', b'{"a":"\x00"}'):
        assert err_of(proto.parse_json, bad).code == proto.EJSON, bad
    assert err_of(proto.dump_json, {"w": float("inf")}).name == "EINVAL"
    assert err_of(proto.dump_json, [1]).name == "EINVAL"


def test_tensor_round_trip():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = np.array([[1, -2]], dtype=np.int64)
    e = np.zeros((0, 5), dtype=np.float16)
    frame = proto.encode_frame(proto.MSG_ENCODE, proto.FLAG_REPLY, 9, {"family": "sd1"}, {"a": a, "b": b, "e": e})
    h, msg, t = proto.decode_frame(frame)
    assert h.bin_len == a.nbytes + b.nbytes
    assert msg["family"] == "sd1"
    assert msg["tensors"]["b"] == {"dtype": "I64", "shape": [1, 2], "data_offsets": [96, 112]}
    np.testing.assert_array_equal(t["a"], a)
    np.testing.assert_array_equal(t["b"], b)
    assert t["e"].shape == (0, 5) and t["e"].dtype == np.float16


def test_tensor_validation():
    binary = bytes(16)

    def bad(entry, code="EPROTO"):
        e = err_of(proto.get_tensors, {"tensors": {"x": entry}}, binary)
        assert e.name == code, (entry, e)

    bad({"dtype": "F32", "shape": [4], "data_offsets": [0, 20]})            # past the end
    bad({"dtype": "F32", "shape": [5], "data_offsets": [0, 16]})            # size mismatch
    bad({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]})             # reversed
    bad({"dtype": "F33", "shape": [4], "data_offsets": [0, 16]})            # unknown dtype
    bad({"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}, "EDTYPE")
    bad({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]})
    bad({"dtype": "F32", "shape": [4.5], "data_offsets": [0, 16]})
    bad({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]})
    bad({"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]})
    bad({"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "extra": 1})
    bad({"dtype": "F32", "shape": [4]})
    bad([1, 2])
    assert err_of(proto.get_tensors, {"tensors": [1]}, binary).name == "EPROTO"
    ok = proto.get_tensors({"tensors": {"x": {"dtype": "U8", "shape": [2, 3], "data_offsets": [10, 16]}}}, binary)
    assert ok["x"].shape == (2, 3)


def test_error_reply():
    e = proto.error_from_reply({"code": -20, "name": "ENOTFOUND", "message": "model 'x' is nowhere"})
    assert (e.code, e.name, e.message) == (-20, "ENOTFOUND", "model 'x' is nowhere")
    assert str(e) == "ENOTFOUND: model 'x' is nowhere"
    assert proto.error_from_reply({"code": "x"}).name == "EPROTO"
    assert proto.error_from_reply({"code": -99}).name == "UNKNOWN"


def test_default_socket(monkeypatch):
    monkeypatch.setenv("LUNA_SOCKET", "/x/y.sock")
    assert default_socket() == "/x/y.sock"
    monkeypatch.delenv("LUNA_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/5")
    assert default_socket() == "/run/user/5/lunad.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "")
    assert default_socket() == "/tmp/lunad-%d.sock" % os.getuid()


# ---- a fake lunad -------------------------------------------------------------------

TOKEN = "s3cret token"


def fake_encode_outputs(n_chunks, width=8, pooled_dim=4):
    """What the fake lunad answers for an encode: values with every bit pattern busy."""
    n = 77 * n_chunks
    cond = (np.sin(np.arange(n * width, dtype=np.float64) * 0.37) * 3.3).astype(np.float32).reshape(1, n, width)
    pooled = np.linspace(-1.1, 2.3, pooled_dim, dtype=np.float32).reshape(1, pooled_dim)
    return cond, pooled




class FakeLunad(FakeServer):
    """Answers requests like lunad, from made-up state. Replies go out once 'batch'
    requests of a connection are waiting, last first. 'mode' breaks things on purpose:
    "badmagic" (a reply with a wrong magic), "close" (close without replying) or
    "silent" (read every request, answer none, keep the connection open).
    Frames over 'max_frame' get ETOOBIG and the connection is closed unread, as lunad does."""

    def __init__(self, address, family=socket.AF_UNIX, batch=1, mode=None, require_hello=False,
                 max_frame=proto.DEFAULT_MAX_FRAME):
        self.batch, self.mode, self.require_hello, self.max_frame = batch, mode, require_hello, max_frame
        self.requests = []
        super().__init__(address, family)

    def _serve(self, conn):
        pending, authed = [], not self.require_hello
        with conn:
            while True:
                head = recv_exact(conn, proto.HEADER_SIZE)
                if head is None:
                    return
                try:
                    h = proto.parse_header(head, self.max_frame)
                except LunaError as e:
                    # answered with the header's own type and id, unread body and all
                    bad = proto.Header(1, int.from_bytes(head[6:8], "little"), 0, 0,
                                       int.from_bytes(head[16:24], "little"), 0)
                    conn.sendall(self._error(bad, e.code, e.message))
                    return
                body = recv_exact(conn, h.json_len + h.bin_len)
                msg = proto.parse_json(body[:h.json_len])
                self.requests.append((h, msg))
                if self.mode == "close":
                    return
                if self.mode == "silent":
                    continue
                if not authed:
                    ok = h.type == proto.MSG_HELLO and msg.get("token") == TOKEN
                    if not ok:
                        conn.sendall(self._error(h, proto.EAUTH, "the hello's token does not match"))
                        return
                    authed = True
                pending.append((h, msg))
                if len(pending) >= self.batch:
                    for ph, pmsg in reversed(pending):
                        conn.sendall(self._reply(ph, pmsg))
                    pending = []

    def _error(self, h, code, message):
        return proto.encode_frame(h.type, proto.FLAG_REPLY | proto.FLAG_ERROR, h.request_id,
                                  {"code": code, "name": proto.status_name(code), "message": message})

    def _reply(self, h, msg):
        if self.mode == "badmagic":
            return b"LUNX" + proto.encode_frame(h.type, proto.FLAG_REPLY, h.request_id)[4:]
        out, tensors = {}, None
        if h.type == proto.MSG_HELLO:
            out = {"server": "fake-lunad", "version": "0", "protocol": 1, "authenticated": True}
        elif h.type == proto.MSG_PING:
            out = {}
        elif h.type == proto.MSG_HEALTH:
            out = {"live": True, "ready": True, "models": [{"id": "demo.safetensors", "state": "ready"}]}
        elif h.type == proto.MSG_STATUS:
            out = {"version": "0", "protocol": 1, "requests": {"served": len(self.requests)}}
        elif h.type == proto.MSG_MODELS:
            out = {"echo": msg}
        elif h.type == proto.MSG_ENCODE:
            model = msg.get("model")
            if model not in ("demo.safetensors", ["clip_l.safetensors", "clip_g.safetensors"]):
                return self._error(h, proto.ENOTFOUND, "model %s is in none of the models folders" % json.dumps(model))
            if ("tokens" in msg) == ("text" in msg):
                return self._error(h, proto.EINVAL, "give exactly one of \"tokens\" and \"text\"")
            n = len(msg["tokens"]["l"]) if "tokens" in msg else 1
            cond, pooled = fake_encode_outputs(n)
            out = {"family": "sd1", "cached": msg.get("cache", True) is not False and len(self.requests) > 100}
            tensors = {"cond": cond, "pooled": pooled}
        else:
            return self._error(h, proto.EUNKNOWN, "message type %d" % h.type)
        return proto.encode_frame(h.type, proto.FLAG_REPLY, h.request_id, out, tensors)


@pytest.fixture
def sockdir(tmp_path_factory):
    # Unix socket paths are limited to 107 bytes: use a short folder of our own.
    d = Path("/tmp") / ("luna-test-%d-%d" % (os.getpid(), threading.get_ident() % 100000))
    d.mkdir(exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake(sockdir):
    servers = []

    def make(**kw):
        path = str(sockdir / ("f%d.sock" % len(servers)))
        s = FakeLunad(path, **kw)
        s.path = path
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


TOKENS = {"l": [[[49406, 1.0], [320, 1.25], [49407, 1.0]] + [[49407, 1.0]] * 74] * 2}


def test_client_simple_calls(fake):
    f = fake()
    with Client.unix(f.path, timeout=10) as c:
        assert c.ping() >= 0
        assert c.health()["ready"] is True
        assert c.status()["protocol"] == 1
        assert c.models()["echo"] == {"action": "list"}
        assert c.models("load", ["clip_l.safetensors", "clip_g.safetensors"])["echo"]["model"] == \
            ["clip_l.safetensors", "clip_g.safetensors"]
        cond, pooled, info = c.encode("demo.safetensors", tokens=TOKENS, clip_layer=-2, deadline_ms=100, cache=False)
        want_c, want_p = fake_encode_outputs(2)
        assert cond.dtype == np.float32 and cond.shape == (1, 154, 8)
        np.testing.assert_array_equal(cond, want_c)
        np.testing.assert_array_equal(pooled, want_p)
        assert info == {"family": "sd1", "cached": False}
        cond[0, 0, 0] = 1  # writable: torch.from_numpy takes it without a warning
        sent = f.requests[-1][1]
        assert sent == {"model": "demo.safetensors", "tokens": TOKENS, "clip_layer": -2, "deadline_ms": 100,
                        "cache": False}
        # errors raise, and the connection stays usable
        e = err_of(c.encode, "nope.safetensors", None, "a cat")
        assert (e.code, e.name) == (proto.ENOTFOUND, "ENOTFOUND") and "nope.safetensors" in e.message
        assert err_of(c.call, 99).name == "EUNKNOWN"
        assert err_of(c.encode, "demo.safetensors").name == "EINVAL"       # neither tokens nor text
        assert err_of(c.models, "load", []).name == "EINVAL"
        assert err_of(c.encode, "demo.safetensors", {"l": [[[1, float("nan")]]]}).name == "EINVAL"
        c.ping()
    assert c.closed


def test_pipelined_out_of_order(fake):
    f = fake(batch=5)
    with Client.unix(f.path, timeout=10) as c:
        ids = [c.send(proto.MSG_PING, {}) for _ in range(2)]
        ids.append(c.send(proto.MSG_ENCODE, c.encode_request("demo.safetensors", tokens={"l": TOKENS["l"][:1]})))
        ids.append(c.send(proto.MSG_ENCODE, c.encode_request("missing.safetensors", text="x")))
        ids.append(c.send(proto.MSG_HEALTH))
        assert ids == sorted(ids) and len(set(ids)) == 5
        got = [c.recv() for _ in ids]
        assert [g[0] for g in got] == ids[::-1]            # the fake answers last first
        by_id = {g[0]: g for g in got}
        assert by_id[ids[4]][2]["live"] is True
        rid, flags, msg, tensors = by_id[ids[3]]
        assert flags == proto.FLAG_REPLY | proto.FLAG_ERROR
        assert proto.error_from_reply(msg).name == "ENOTFOUND" and tensors == {}
        rid, flags, msg, tensors = by_id[ids[2]]
        assert flags == proto.FLAG_REPLY and tensors["cond"].shape == (1, 77, 8)


def test_call_keeps_other_replies(fake):
    f = fake(batch=3)
    with Client.unix(f.path, timeout=10) as c:
        a = c.send(proto.MSG_PING)
        b = c.send(proto.MSG_HEALTH)
        assert c.status()["protocol"] == 1                # answered first, the others kept
        assert c.recv()[0] == b
        assert c.recv()[0] == a


def test_broken_replies(fake):
    f = fake(mode="badmagic")
    c = Client.unix(f.path, timeout=10)
    e = err_of(c.ping)
    assert e.name == "EPROTO" and "magic" in e.message and c.closed
    assert err_of(c.ping).name == "ECONN"
    g = fake(mode="close")
    with Client.unix(g.path, timeout=10) as c:
        e = err_of(c.ping)
        assert e.name == "ECONN" and "closed" in e.message
    e = err_of(Client.unix, f.path + ".missing")
    assert e.name == "ECONN"


def big_tokens(n_chunks):
    return {"l": [[[49406, 1.0]] + [[320 + i, 1.0] for i in range(75)] + [[49407, 1.0]]] * n_chunks}


def test_too_big_request(fake, run_luna, tmp_path):
    f = fake(max_frame=4096)
    for n in (8, 3000):            # fits in the socket buffers / does not: the write fails first
        with Client.unix(f.path, timeout=10) as c:
            e = err_of(c.encode, "demo.safetensors", big_tokens(n))
            assert e.name == "ETOOBIG" and "4096" in e.message, e
        tok = tmp_path / "big.json"
        tok.write_text(json.dumps(big_tokens(n)))
        r = run_luna("--socket", f.path, "encode", "--model", "demo.safetensors", "--tokens", tok,
                     "--out", tmp_path / "o.st")
        assert r.returncode == 1 and "ETOOBIG" in r.stderr, (n, r.stderr)


def test_tcp_hello(fake):
    f = FakeLunad(("127.0.0.1", 0), family=socket.AF_INET, require_hello=True)
    try:
        host, port = f.address
        with Client.tcp(host, port, TOKEN, timeout=10) as c:
            assert c.ping() >= 0
            assert f.requests[0][1] == {"protocol": 1, "client": "lunaclient", "token": TOKEN}
        e = err_of(Client.tcp, host, port, "wrong")
        assert e.name == "EAUTH"
        assert err_of(Client.tcp, host, port, "").name == "EINVAL"
    finally:
        f.close()


# ---- the C side: luna and libluna against the fake ----------------------------------------

def test_cli_against_fake(fake, run_luna, tmp_path):
    f = fake()
    sock = ["--socket", f.path]
    r = run_luna(*sock, "ping")
    assert r.returncode == 0 and "pong" in r.stdout and " ms" in r.stdout, r.stderr
    r = run_luna(*sock, "health")
    assert r.returncode == 0 and json.loads(r.stdout)["ready"] is True and "\n\t" in r.stdout
    r = run_luna(*sock, "health", "--ready")
    assert r.returncode == 0
    r = run_luna(*sock, "status")
    assert r.returncode == 0 and json.loads(r.stdout)["protocol"] == 1
    r = run_luna(*sock, "models", "load", "clip_l.safetensors", "clip_g.safetensors")
    assert json.loads(r.stdout)["echo"] == {"action": "load", "model": ["clip_l.safetensors", "clip_g.safetensors"]}
    r = run_luna(*sock, "models", "unload", "a.safetensors")
    assert json.loads(r.stdout)["echo"] == {"action": "unload", "model": "a.safetensors"}
    r = run_luna(*sock, "models")
    assert json.loads(r.stdout)["echo"] == {"action": "list"}

    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps(TOKENS))
    out = tmp_path / "o.safetensors"
    r = run_luna(*sock, "encode", "--model", "demo.safetensors", "--tokens", tok, "--out", out,
                 "--clip-layer", "-2", "--deadline-ms", "250", "--no-cache", "--summary", "--bench", "3")
    assert r.returncode == 0, r.stderr
    assert f.requests[-1][1] == {"model": "demo.safetensors", "tokens": TOKENS, "clip_layer": -2,
                                 "deadline_ms": 250, "cache": False}
    assert "family sd1, 2 chunk(s)" in r.stdout
    bench = json.loads(r.stderr.strip().splitlines()[-1])
    assert bench["mode"] == "daemon" and bench["runs"] == 3 and bench["min_ms"] <= bench["median_ms"]
    tensors, meta = st_io.read(str(out))
    want_c, want_p = fake_encode_outputs(2)
    assert tensors["cond"].tobytes() == want_c.tobytes()
    assert tensors["pooled"].tobytes() == want_p.tobytes()
    assert meta == {"luna.family": "sd1"}

    r = run_luna(*sock, "encode", "--model", "clip_l.safetensors", "--model", "clip_g.safetensors",
                 "--text", "a cat", "--out", out)
    assert r.returncode == 0, r.stderr
    assert f.requests[-1][1] == {"model": ["clip_l.safetensors", "clip_g.safetensors"], "text": "a cat"}

    r = run_luna(*sock, "encode", "--model", "other.safetensors", "--text", "a cat", "--out", out)
    assert r.returncode == 1 and "ENOTFOUND" in r.stderr and "other.safetensors" in r.stderr


def test_cli_usage(run_luna, tmp_path):
    for cmd in ("ping", "health", "status", "models", "encode"):
        r = run_luna(cmd, "--help")
        assert r.returncode == 0 and r.stdout.startswith("usage:"), cmd
        r = run_luna(cmd, "--bogus")
        assert r.returncode == 2 and "--bogus" in r.stderr, cmd
    r = run_luna("--help")
    assert r.returncode == 0 and "--connect" in r.stdout
    assert run_luna("--socket").returncode == 2
    assert run_luna("--socket", "x", "--connect", "h:1", "ping").returncode == 2
    assert run_luna("--connect", "h:1", "ping").returncode == 2          # no --token-file
    assert run_luna("--connect", "nohost", "--token-file", "f", "ping").returncode == 2
    assert run_luna("--socket", "x", "tokenize", "--help").returncode == 2
    assert run_luna("models", "frobnicate").returncode == 2
    assert run_luna("ping", "extra").returncode == 2
    r = run_luna("encode", "--model", "m", "--text", "t", "--tokenizer", "d", "--out", "o")
    assert r.returncode == 2 and "--local" in r.stderr
    r = run_luna("encode", "--local", "--model", "m", "--tokens", "t", "--out", "o", "--no-cache")
    assert r.returncode == 2
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    r = run_luna("--connect", "127.0.0.1:9", "--token-file", empty, "ping")
    assert r.returncode == 1 and "empty" in r.stderr
    r = run_luna("--connect", "127.0.0.1:9", "--token-file", tmp_path / "none", "ping")
    assert r.returncode == 1 and "token file" in r.stderr
    r = run_luna("--socket", tmp_path / "no.sock", "ping")
    assert r.returncode == 1 and "ECONN" in r.stderr


def test_cli_timeout(fake, run_luna, tmp_path):
    """--timeout: a lunad that says nothing fails the command with ETIMEDOUT, soon; an
    answering one is unaffected; bad values and local commands are refused."""
    silent, ok = fake(mode="silent"), fake()
    t0 = time.monotonic()
    r = run_luna("--socket", silent.path, "--timeout", "0.3", "ping")
    took = time.monotonic() - t0
    assert r.returncode == 1 and "ETIMEDOUT" in r.stderr and "300 ms" in r.stderr, r.stderr
    assert took < 20, took
    assert len(silent.requests) == 1
    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps(TOKENS))
    r = run_luna("--socket", silent.path, "--timeout=0.2", "encode", "--model", "demo.safetensors", "--tokens", tok,
                 "--out", tmp_path / "o.safetensors")
    assert r.returncode == 1 and "ETIMEDOUT" in r.stderr and not (tmp_path / "o.safetensors").exists(), r.stderr
    r = run_luna("--socket", ok.path, "--timeout", "5", "health")
    assert r.returncode == 0 and json.loads(r.stdout)["ready"] is True, r.stderr
    for bad in ("0", "-1", "abc", "nan", "inf", "1e9", ""):
        r = run_luna("--socket", ok.path, "--timeout", bad, "ping")
        assert r.returncode == 2 and "--timeout" in r.stderr, (bad, r.stderr)
    r = run_luna("--timeout", "1", "tokenize", "--help")
    assert r.returncode == 2 and "--timeout" in r.stderr
    for cmd in (["encode", "--local", "--model", "m", "--tokens", tok, "--out", "o"],
                ["decode", "--local", "--model", "m", "--latent", "l", "--out", "o.safetensors"]):
        r = run_luna("--socket", ok.path, *cmd)
        assert r.returncode == 2 and "--local" in r.stderr and "--socket" in r.stderr, (cmd, r.stderr)


@pytest.mark.parametrize("kind", ["static", "shared"])
def test_c_library_timeout(fake, tmp_path, kind):
    """luna_client_set_timeout: ETIMEDOUT from a silent lunad, soon, and the handle
    closed after it (the stream lost its place)."""
    exe = build_c_program(Path(__file__).with_name("client_timeout.c"), tmp_path / ("timeout-" + kind), kind)
    silent = fake(mode="silent")
    r = subprocess.run([str(exe), silent.path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["connect"] == "0 "
    assert lines["negative"].startswith("-1 EINVAL: ") and "-1 ms" in lines["negative"]
    assert lines["set"] == "0 "
    assert lines["ping"].startswith("-19 ETIMEDOUT: unix:") and "250 ms" in lines["ping"] and "header" in lines["ping"]
    assert 0.2 <= float(lines["seconds"]) < 20, lines["seconds"]
    assert lines["again"].startswith("-23 ECONN"), lines["again"]
    assert lines["closed"].startswith("-23 ECONN"), lines["closed"]
    assert lines["null"] == "-1"
    assert len(silent.requests) == 1


def test_python_timeout(fake):
    """Client(timeout=): ETIMEDOUT from a silent lunad, and the client closed."""
    silent = fake(mode="silent")
    c = Client.unix(silent.path, timeout=0.25)
    with pytest.raises(LunaError) as ei:
        c.ping()
    assert ei.value.name == "ETIMEDOUT" and "0.25 s" in ei.value.message and "header" in ei.value.message
    assert c.closed


def test_cli_tcp_token_file(run_luna, tmp_path):
    f = FakeLunad(("127.0.0.1", 0), family=socket.AF_INET, require_hello=True)
    try:
        host, port = f.address
        tf = tmp_path / "token"
        tf.write_text(TOKEN + "\n")
        r = run_luna("--connect", "%s:%d" % (host, port), "--token-file", tf, "health")
        assert r.returncode == 0, r.stderr
        assert f.requests[0][1]["token"] == TOKEN
        tf.write_text("wrong\n")
        r = run_luna("--connect", "%s:%d" % (host, port), "--token-file", tf, "ping")
        assert r.returncode == 1 and "EAUTH" in r.stderr
    finally:
        f.close()



def test_library_exports_only_luna_symbols():
    so = build_dir() / "libluna.so"
    if not so.exists() or not shutil.which("nm"):
        pytest.skip("no libluna.so or nm")
    for lib, opts in ((so, ["-D", "--defined-only"]), (build_dir() / "libluna.a", ["-g", "--defined-only"])):
        out = subprocess.run(["nm"] + opts + [str(lib)], stdout=subprocess.PIPE, text=True, check=True).stdout
        syms = [line.split()[-1] for line in out.splitlines() if re.match(r"^[0-9a-f]+ [A-Z] ", line)]
        assert "luna_client_encode" in syms and "luna_default_socket" in syms, lib
        assert all(s.startswith("luna_") for s in syms), (lib, syms)


@pytest.mark.parametrize("kind", ["static", "shared"])
def test_c_library_against_fake(fake, tmp_path, kind):
    exe = build_c_program(Path(__file__).with_name("client_smoke.c"), tmp_path / ("smoke-" + kind), kind)
    f = fake()
    r = subprocess.run([str(exe), f.path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    want_c, want_p = fake_encode_outputs(1)
    assert lines["connect"] == "0 ''"
    assert lines["ping"] == "0"
    assert json.loads(lines["health"].split(" ", 1)[1])["ready"] is True
    assert json.loads(lines["models"].split(" ", 1)[1]) == {"echo": {"action": "list"}}
    assert lines["bad-json"] == "-1 EINVAL null=1"
    assert lines["encode"] == ("0 family=sd1 cached=0 cond=[1,77,8] pooled=[1,4] first=%.9g last=%.9g p0=%.9g"
                               % (want_c.flat[0], want_c.flat[-1], want_p.flat[0]))
    assert f.requests[3][1] == {"model": "demo.safetensors", "tokens": {"l": [[[49406, 1.0], [320, 1.5], [49407, 1.0]]]},
                                "clip_layer": -2, "deadline_ms": 500, "cache": False}
    assert lines["missing"].startswith("-20 -20 'ENOTFOUND: model \"missing.safetensors\" is in none")
    assert lines["missing"].endswith("cond_null=1")
    assert lines["both"] == "-1"
    assert lines["ping-after-error"] == "0 ''"
    assert lines["connect-missing"] == "-23 ECONN-message"
    assert lines["ping-unconnected"] == "-23"
    assert lines["null-errmsg"] == "'out of memory' -2"
