"""test_daemon.py -- lunad end to end, with real processes (daemon.py, conftest_daemon.py).

1. encode through lunad equals `luna encode --local` bit for bit: the Python client and
   the CLI client, SD1 and an SDXL clip_l/clip_g pair in either order, weighted and
   3-chunk tokens, clip layers;
2. 64 concurrent connections with mixed prompts, pipelining on one connection, and
   lunad's RSS with 64 clients against one;
3. robustness: broken frames, authentication, path rules, stalled and vanished
   clients, a full queue, expired deadlines -- each followed by a check that another
   client still gets correct answers;
4. lifecycle: sockets, --preload, models load/list/unload, model identity, the memory
   budget, SIGTERM with work in flight, --config, --help.

Every daemon runs in its own temporary folder and is stopped at the end of its test.
Sizes shrink under the sanitizer build (LUNA_BUILD with "san"), which is ~3x slower.
"""

import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time

import numpy as np
import pytest

from conftest import tokens_for
from conftest_daemon import (assert_serving, daemon_models, fresh_models,  # noqa: F401
                             local_encode, raw_tensors, st_bytes, start_lunad, tiny_expected)
from daemon import REPO, SLOW, Lunad, LunaError, closed_by_peer, is_san, luna_bin, lunad_bin, proto, read_frame
from lunaclient.client import split_encode_reply

SAN = is_san()
WEIGHTS = [1.21, 0.5, 1.5, 0.0, 2.0]
MIB = 1 << 20


def wait_for(pred, timeout, what, step=0.02):
    """Poll pred() until it returns something true (bounded by timeout * SLOW)."""
    end = time.monotonic() + timeout * SLOW
    last = None
    while time.monotonic() < end:
        last = pred()
        if last:
            return last
        time.sleep(step)
    raise AssertionError("timed out after %.0f s waiting for %s (last: %r)" % (timeout * SLOW, what, last))


def frame(type_, body=b"{}", rid=1, version=1, magic=b"LUNA", flags=0, json_len=None, bin_len=0, binary=b""):
    """Hand-made frame bytes; json_len/bin_len default to the real lengths."""
    jl = len(body) if json_len is None else json_len
    return struct.pack("<4sHHIIQQ", magic, version, type_, flags, jl, rid, bin_len) + body + binary


def expect_error(s, code, rid=None):
    """Read one frame from raw socket s: it must be an error reply with 'code'."""
    h, msg, _ = read_frame(s)
    assert h.flags & proto.FLAG_REPLY and h.flags & proto.FLAG_ERROR, "expected an error reply, got %r" % (msg,)
    assert msg.get("code") == code, "expected %s, got %r" % (proto.status_name(code), msg)
    assert msg.get("name") == proto.status_name(code)
    assert isinstance(msg.get("message"), str) and msg["message"]
    if rid is not None:
        assert h.request_id == rid
    return msg


def ping_ok(s, rid=77):
    s.sendall(frame(proto.MSG_PING, rid=rid))
    h, msg, _ = read_frame(s)
    assert h.request_id == rid and h.flags == proto.FLAG_REPLY and msg == {}, (h, msg)


def stop_clean(d):
    rc = d.stop()
    assert rc == 0, "lunad exited with status %s on SIGTERM; log tail:\n%s" % (rc, d.log()[-3000:])


def loads_in_log(d, model=""):
    """How many times lunad's log says it started loading 'model' (any model if empty)."""
    return len(re.findall(r"\binfo\s+loading model %s" % re.escape(model), d.log()))


def enc_bytes(cond, pooled):
    return st_bytes(cond), st_bytes(pooled)


# =====================================================================================
# 1. through the daemon == luna encode --local, bit for bit
# =====================================================================================

ENC_MODELS = {
    "sd1": ["sd1.safetensors"],
    "sdxl_lg": ["clip_l.safetensors", "clip_g.safetensors"],
    "sdxl_gl": ["clip_g.safetensors", "clip_l.safetensors"],
}
ENC_TOKENS = {
    "plain": dict(lengths=[12]),
    "weighted": dict(lengths=[20], weights=WEIGHTS),
    "3chunks": dict(lengths=[75, 75, 31], weights=WEIGHTS),
}
ENC_CASES = [(m, t, None) for m in ENC_MODELS for t in ENC_TOKENS] + \
            [(m, "weighted", layer) for m in ENC_MODELS for layer in (-1, -3)]


@pytest.fixture(scope="module")
def shared_lunad(daemon_models):
    d = Lunad(models_dirs=[daemon_models]).start()
    try:
        yield d
        rc = d.stop()
        assert rc == 0, "lunad exited with %s on SIGTERM; log tail:\n%s" % (rc, d.log()[-3000:])
    finally:
        d.close()


@pytest.mark.parametrize("mkey,tkey,layer", ENC_CASES,
                         ids=["%s-%s-%s" % (m, t, "default" if x is None else x) for m, t, x in ENC_CASES])
def test_encode_equals_local(shared_lunad, daemon_models, tmp_path, mkey, tkey, layer):
    rels = ENC_MODELS[mkey]
    sdxl = len(rels) == 2
    tok = tokens_for(seed=7, sdxl=sdxl, **ENC_TOKENS[tkey])
    want = local_encode([daemon_models / r for r in rels], tok, layer)
    n_tok = 77 * len(ENC_TOKENS[tkey]["lengths"])
    assert want["cond"][0] == "F32" and want["cond"][1][:2] == [1, n_tok]

    # the Python client: computed, then (probably) from the result cache, then computed again
    with shared_lunad.client() as c:
        spec = rels[0] if len(rels) == 1 else rels
        for cache in (False, True, True, False):
            cond, pooled, info = c.encode(spec, tokens=tok, clip_layer=layer, cache=cache)
            assert info["family"] == ("sdxl" if sdxl else "sd1")
            assert list(cond.shape) == want["cond"][1] and list(pooled.shape) == want["pooled"][1]
            assert st_bytes(cond) == want["cond"][2], "cond differs from --local (cache=%s, info %r)" % (cache, info)
            assert st_bytes(pooled) == want["pooled"][2], "pooled differs from --local (cache=%s)" % cache

    # the CLI client
    tokf = tmp_path / "tokens.json"
    tokf.write_text(json.dumps(tok))
    out = tmp_path / "daemon-out.safetensors"
    cmd = [str(luna_bin()), "--socket", str(shared_lunad.socket), "encode"]
    for r in rels:
        cmd += ["--model", r]
    cmd += ["--tokens", str(tokf), "--out", str(out)]
    if layer is not None:
        cmd += ["--clip-layer", str(layer)]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                       timeout=120 * SLOW)
    assert r.returncode == 0, "%s\n-> rc %d: %s" % (" ".join(cmd), r.returncode, r.stderr[-2000:])
    got = raw_tensors(out)
    for name in ("cond", "pooled"):
        assert got[name][:2] == want[name][:2], "%s: %s vs --local %s" % (name, got[name][:2], want[name][:2])
        assert got[name][2] == want[name][2], "%s from `luna --socket ... encode` differs from --local" % name


def test_sdxl_model_spellings_agree(shared_lunad, daemon_models):
    """An SDXL pair named as a list, either order, or one '+'-joined string: one result."""
    tok = tokens_for([30], WEIGHTS, seed=3, sdxl=True)
    want = local_encode([daemon_models / "clip_l.safetensors", daemon_models / "clip_g.safetensors"], tok)
    with shared_lunad.client() as c:
        for spec in (["clip_l.safetensors", "clip_g.safetensors"], ["clip_g.safetensors", "clip_l.safetensors"],
                     "clip_l.safetensors+clip_g.safetensors", "clip_g.safetensors+clip_l.safetensors"):
            cond, pooled, _ = c.encode(spec, tokens=tok, cache=False)
            assert enc_bytes(cond, pooled) == (want["cond"][2], want["pooled"][2]), "spec %r" % (spec,)


# =====================================================================================
# 2. concurrency, pipelining, memory per connection
# =====================================================================================

def prompt_pool(n, seed=0):
    """n distinct tiny-model requests: (tokens, clip_layer), 1 or 2 chunks, some weighted."""
    rng = np.random.default_rng(seed)
    pool = []
    for i in range(n):
        chunks = 2 if i % 5 == 4 else 1
        lengths = [int(x) for x in rng.integers(1, 76, size=chunks)]
        weights = WEIGHTS if i % 3 == 0 else None
        layer = -2 if i % 4 == 1 else None
        pool.append((tokens_for(lengths, weights, seed=1000 + i), layer))
    return pool


def test_64_concurrent_clients_bit_exact_and_rss(start_lunad, daemon_models):
    n_clients = 64
    per_client = 60 if SAN else 200
    window = 8
    pool = prompt_pool(24)
    env = dict(os.environ)
    if SAN:  # ASan keeps freed memory in quarantine (256 MiB): RSS would measure that
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "detect_leaks=1") + ":quarantine_size_mb=0"
    d = start_lunad("--max-queue", "2048", env=env)

    one = d.client()
    # each prompt's single-client result (no batching: one request at a time)
    expect = []
    for tok, layer in pool:
        cond, pooled, _ = one.encode("tiny.safetensors", tokens=tok, clip_layer=layer, cache=False)
        expect.append(enc_bytes(cond, pooled))
    for i in (0, 1, 4):  # and that is what --local gives
        tok, layer = pool[i]
        loc = local_encode([daemon_models / "tiny.safetensors"], tok, layer)
        assert expect[i] == (loc["cond"][2], loc["pooled"][2]), "single-client result %d differs from --local" % i

    # warm up the batched path from this one connection, then measure its RSS
    for _ in range(2):
        rids = [one.send(proto.MSG_ENCODE, one.encode_request("tiny.safetensors", tokens=pool[k % 24][0],
                                                              clip_layer=pool[k % 24][1], cache=False))
                for k in range(64)]
        for _ in rids:
            one.recv()
    st1 = one.status()
    assert st1["connections"] == 1, st1["connections"]
    rss1 = st1["rss_bytes"]

    barrier = threading.Barrier(n_clients + 1, timeout=120 * SLOW)
    problems = []
    counts = [0] * n_clients
    batches = [0] * n_clients
    lock = threading.Lock()

    def note(msg):
        with lock:
            if len(problems) < 20:
                problems.append(msg)

    def check(cid, k, idx, flags, msg, tensors):
        if flags & proto.FLAG_ERROR:
            note("client %d request %d: error %r" % (cid, k, msg))
            return
        cond, pooled, _ = split_encode_reply(msg, tensors)
        if msg.get("batch", 1) > batches[cid]:
            batches[cid] = msg["batch"]
        if enc_bytes(cond, pooled) != expect[idx]:
            note("client %d request %d (prompt %d, cached=%s, batch=%s): result differs from the single-client one"
                 % (cid, k, idx, msg.get("cached"), msg.get("batch")))

    def run_client(cid):
        rng = np.random.default_rng(cid)
        c = None
        try:
            c = d.client(timeout=60)
            barrier.wait()
            plan = [(int(rng.integers(0, len(pool))), k % 4 == 0) for k in range(per_client)]
            if cid % 2 == 0:  # one request at a time
                for k, (idx, cache) in enumerate(plan):
                    tok, layer = pool[idx]
                    rid = c.send(proto.MSG_ENCODE, c.encode_request("tiny.safetensors", tokens=tok, clip_layer=layer,
                                                                    cache=cache))
                    r = c.recv()
                    if r[0] != rid:
                        note("client %d: reply for %d, expected %d" % (cid, r[0], rid))
                    check(cid, k, idx, *r[1:])
                    counts[cid] += 1
            else:  # pipelined, 'window' requests in flight
                pending = {}
                k = 0
                while k < len(plan) or pending:
                    while k < len(plan) and len(pending) < window:
                        idx, cache = plan[k]
                        tok, layer = pool[idx]
                        rid = c.send(proto.MSG_ENCODE, c.encode_request("tiny.safetensors", tokens=tok,
                                                                        clip_layer=layer, cache=cache))
                        pending[rid] = (k, idx)
                        k += 1
                    r = c.recv()
                    if r[0] not in pending:
                        note("client %d: unexpected reply id %d" % (cid, r[0]))
                        continue
                    kk, idx = pending.pop(r[0])
                    check(cid, kk, idx, *r[1:])
                    counts[cid] += 1
            barrier.wait()   # everyone done, all still connected: the main thread measures
            barrier.wait()   # measured
        except threading.BrokenBarrierError:
            note("client %d: barrier broken" % cid)
        except Exception as e:  # noqa: BLE001 -- reported below
            note("client %d: %s: %s" % (cid, type(e).__name__, e))
            barrier.abort()
        finally:
            if c:
                c.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=run_client, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    st64 = None
    try:
        barrier.wait()          # all connected
        barrier.wait()          # all finished their requests
        st64 = one.status()
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join(60 * SLOW)
    elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "client threads hung; problems: %s" % problems
    assert not problems, "\n".join(problems)
    total = n_clients * per_client
    assert sum(counts) == total, "%d replies for %d requests" % (sum(counts), total)
    st = one.status()
    served = st["requests"]["served"] - st1["requests"]["served"]
    print("%d requests from %d clients in %.1f s (%.0f/s); largest batch %d; rss one %.1f MiB, 64 %.1f MiB; cache %s"
          % (total, n_clients, elapsed, total / elapsed, max(batches), rss1 / MIB, st64["rss_bytes"] / MIB,
             st.get("cache")))
    assert max(batches) > 1, "no reply came from a batched forward pass: the batched path went untested"
    assert st["requests"]["failed"] == 0 and st["requests"]["busy"] == 0, st["requests"]
    assert served >= total + 1, "status counts %d served, %d were answered" % (served, total)
    assert st64["connections"] == n_clients + 1, st64["connections"]
    growth = st64["rss_bytes"] - rss1
    # ASan's redzones and allocator caches make every allocation larger: a looser bound there
    limit = (32 if SAN else 16) * MIB
    assert growth <= limit, "RSS with 64 clients %.1f MiB vs one client %.1f MiB: +%.1f MiB > %d MiB" % (
        st64["rss_bytes"] / MIB, rss1 / MIB, growth / MIB, limit // MIB)
    one.close()


def test_pipelining_one_connection(start_lunad):
    """Many requests in flight on one connection, pings among them and a slow encode
    first: every request gets exactly one reply, matched by request_id whatever the
    order (lunad may answer out of order; nothing here requires it)."""
    d = start_lunad()
    n = 60 if SAN else 240
    pool = prompt_pool(16, seed=5)
    with d.client() as c:
        expect = []
        for tok, layer in pool:
            cond, pooled, _ = c.encode("tiny.safetensors", tokens=tok, clip_layer=layer, cache=False)
            expect.append(enc_bytes(cond, pooled))
        c.models("load", "slow.safetensors")
        slow_tok = tokens_for([40, 40], seed=11)
        want_slow = c.encode("slow.safetensors", tokens=slow_tok, cache=False)
        sent = {}
        rid = c.send(proto.MSG_ENCODE, c.encode_request("slow.safetensors", tokens=slow_tok, cache=False))
        sent[rid] = ("slow", None)
        for k in range(n):
            if k % 10 == 5:
                sent[c.send(proto.MSG_PING)] = ("ping", None)
            idx = k % len(pool)
            tok, layer = pool[idx]
            rid = c.send(proto.MSG_ENCODE, c.encode_request("tiny.safetensors", tokens=tok, clip_layer=layer,
                                                            cache=k % 3 == 0))
            sent[rid] = ("tiny", idx)
        got, order = {}, []
        for _ in range(len(sent)):
            rid, flags, msg, tensors = c.recv()
            assert rid in sent, "reply to unknown request id %d" % rid
            assert rid not in got, "two replies to request %d" % rid
            assert not flags & proto.FLAG_ERROR, "request %d (%s) failed: %r" % (rid, sent[rid], msg)
            got[rid] = (msg, tensors)
            order.append(rid)
        assert set(got) == set(sent)
        for rid, (kind, idx) in sent.items():
            msg, tensors = got[rid]
            if kind == "ping":
                assert msg == {}
                continue
            cond, pooled, _ = split_encode_reply(msg, tensors)
            want = expect[idx] if kind == "tiny" else enc_bytes(want_slow[0], want_slow[1])
            assert enc_bytes(cond, pooled) == want, "request %d (%s %s): wrong result" % (rid, kind, idx)
        print("replies out of request order: %s" % (order != sorted(order)))
        # the connection is still in a sane state
        assert c.ping() >= 0


def test_sdxl_batches_mixing_weighted_and_plain_are_bit_exact(start_lunad, daemon_models):
    """Pipelined SDXL encodes, every third weighted (so the batch holds empty sequences
    and rows of several requests): each result equals the local encode bit for bit,
    pooled included (a GEMM over the whole batch once changed pooled's last bits)."""
    d = start_lunad("--workers", "1", "--batch-max", "8")
    pair = ["clip_l.safetensors", "clip_g.safetensors"]
    toks = [tokens_for([12 + 3 * k], WEIGHTS if k % 3 == 0 else None, seed=300 + k, sdxl=True) for k in range(6)]
    want = [local_encode([daemon_models / p for p in pair], t) for t in toks]
    with d.client() as c:
        c.models("load", pair)
        sent = {}
        for rep in range(2):
            for k, t in enumerate(toks):
                sent[c.send(proto.MSG_ENCODE, c.encode_request(pair, tokens=t, cache=False))] = k
        batches = []
        for _ in range(len(sent)):
            rid, flags, msg, tensors = c.recv()
            assert not flags & proto.FLAG_ERROR, msg
            batches.append(msg.get("batch", 1))
            cond, pooled, _ = split_encode_reply(msg, tensors)
            w = want[sent[rid]]
            assert enc_bytes(cond, pooled) == (w["cond"][2], w["pooled"][2]), "request %d differs" % rid
        assert max(batches) > 1, "no request was batched: the test did not test batching"


# =====================================================================================
# 3. robustness
# =====================================================================================

def test_garbage_bytes_get_eproto_and_close(start_lunad, tiny_expected):
    d = start_lunad()
    s = d.raw()
    s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n")
    expect_error(s, proto.EPROTO)
    assert closed_by_peer(s), "connection not closed after bad magic"
    s.close()
    # a header-sized lump of random bytes (magic cannot be LUNA)
    s = d.raw()
    junk = bytearray(os.urandom(100))
    junk[0:4] = b"XUNA"
    s.sendall(bytes(junk))
    expect_error(s, proto.EPROTO)
    assert closed_by_peer(s)
    s.close()
    assert_serving(d, tiny_expected)


def test_truncated_frame_then_close(start_lunad, tiny_expected):
    d = start_lunad()
    with d.client() as watcher:
        before = watcher.status()["connections"]
        for cut in (5, 32, 40):
            s = d.raw()
            full = frame(proto.MSG_ENCODE, json.dumps({"model": "tiny.safetensors",
                                                       "tokens": tokens_for([5])}).encode(), rid=3)
            s.sendall(full[:cut])
            s.close()
        wait_for(lambda: watcher.status()["connections"] == before, 10, "closed connections to be dropped")
        assert_serving(d, tiny_expected, watcher)


def test_oversized_length_refused_before_reading(start_lunad, tiny_expected):
    d = start_lunad()
    with d.client() as watcher:
        rss0 = watcher.status()["rss_bytes"]
        # only the header, claiming a 10 GB binary part
        s = d.raw(timeout=10)
        s.sendall(frame(proto.MSG_ENCODE, b"", rid=9, json_len=2, bin_len=10 * 10 ** 9))
        expect_error(s, proto.ETOOBIG, rid=9)
        assert closed_by_peer(s)
        s.close()
        # a JSON part over 16 MiB, the whole frame under --max-frame
        s = d.raw(timeout=10)
        s.sendall(frame(proto.MSG_PING, b"", rid=10, json_len=(16 << 20) + 1))
        expect_error(s, proto.ETOOBIG, rid=10)
        assert closed_by_peer(s)
        s.close()
        # just over --max-frame (64 MiB by default)
        s = d.raw(timeout=10)
        s.sendall(frame(proto.MSG_PING, b"", rid=11, json_len=2, bin_len=(64 << 20) - 33))
        expect_error(s, proto.ETOOBIG, rid=11)
        assert closed_by_peer(s)
        s.close()
        rss1 = watcher.status()["rss_bytes"]
        assert rss1 - rss0 < 32 * MIB, "RSS grew %.1f MiB on refused frames" % ((rss1 - rss0) / MIB)
        assert_serving(d, tiny_expected, watcher)


def test_wrong_version_gets_eversion_and_close(start_lunad, tiny_expected):
    d = start_lunad()
    for v in (0, 2, 0xFFFF):
        s = d.raw()
        s.sendall(frame(proto.MSG_PING, rid=4, version=v))
        expect_error(s, proto.EVERSION)
        assert closed_by_peer(s)
        s.close()
    assert_serving(d, tiny_expected)


def test_unknown_type_keeps_connection(start_lunad, tiny_expected):
    d = start_lunad()
    s = d.raw()
    for t in (0, 10, 99, 0xFFFF):
        s.sendall(frame(t, rid=100 + t))
        expect_error(s, proto.EUNKNOWN, rid=100 + t)
    ping_ok(s)
    s.close()
    assert_serving(d, tiny_expected)


def test_bad_json_keeps_connection(start_lunad, tiny_expected):
    d = start_lunad()
    s = d.raw()
    for k, body in enumerate((b"{nope", b"[1, 2]", b"\"text\"", b"", b"{\"a\": \"\xff\xfe\"}", b"{} {}",
                              b"{\"a\": NaN}")):
        s.sendall(frame(proto.MSG_ENCODE, body, rid=200 + k))
        expect_error(s, proto.EJSON, rid=200 + k)
    ping_ok(s)
    s.close()
    assert_serving(d, tiny_expected)


def test_tcp_authentication(start_lunad, tiny_expected):
    d = start_lunad(tcp=True)
    # a request before hello
    s = d.raw_tcp()
    s.sendall(frame(proto.MSG_PING, rid=1))
    expect_error(s, proto.EAUTH, rid=1)
    assert closed_by_peer(s), "not closed after a request before hello"
    s.close()
    # an encode before hello: never run
    s = d.raw_tcp()
    s.sendall(frame(proto.MSG_ENCODE, json.dumps({"model": "tiny.safetensors", "tokens": tokens_for([3])}).encode(),
                    rid=2))
    expect_error(s, proto.EAUTH, rid=2)
    assert closed_by_peer(s)
    s.close()
    # wrong and missing tokens
    for body in ({"protocol": 1, "token": d.token[:-1] + ("0" if d.token[-1] != "0" else "1")},
                 {"protocol": 1, "token": d.token + "x"}, {"protocol": 1, "token": ""}, {"protocol": 1}):
        s = d.raw_tcp()
        s.sendall(frame(proto.MSG_HELLO, json.dumps(body).encode(), rid=5))
        expect_error(s, proto.EAUTH, rid=5)
        assert closed_by_peer(s), "not closed after hello %r" % body
        s.close()
    with pytest.raises(LunaError) as e:
        d.tcp_client(token="not-the-token")
    assert e.value.name == "EAUTH"
    # the right token works
    tok, cond, pooled = tiny_expected
    with d.tcp_client() as c:
        got = c.encode("tiny.safetensors", tokens=tok, cache=False)
        assert enc_bytes(got[0], got[1]) == (cond, pooled)
    assert_serving(d, tiny_expected)


def test_model_paths_outside_the_folder(start_lunad, fresh_models, daemon_models, tmp_path, tiny_expected):
    folder = fresh_models("tiny.safetensors")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((daemon_models / "tiny.safetensors").read_bytes())
    os.symlink(outside, folder / "escape.safetensors")
    os.symlink(tmp_path, folder / "up")
    (folder / "sub").mkdir()
    d = start_lunad(models=[folder])
    tok = tokens_for([4])
    cases = [
        ("../outside.safetensors", "EACCES"),
        ("sub/../tiny.safetensors", "EACCES"),
        (str(folder / "tiny.safetensors"), "EACCES"),
        (str(outside), "EACCES"),
        ("escape.safetensors", "EACCES"),
        ("up/outside.safetensors", "EACCES"),
        ("missing.safetensors", "ENOTFOUND"),
        ("sub/missing.safetensors", "ENOTFOUND"),
        ("sub", "ENOTFOUND"),
    ]
    with d.client() as c:
        for path, name in cases:
            for what in ("encode", "load"):
                with pytest.raises(LunaError) as e:
                    if what == "encode":
                        c.encode(path, tokens=tok)
                    else:
                        c.models("load", path)
                assert e.value.name == name, "%s %r: expected %s, got %s: %s" % (what, path, name, e.value.name,
                                                                                 e.value.message)
            # one file of a pair outside: the pair is refused
            with pytest.raises(LunaError) as e:
                c.encode(["tiny.safetensors", path], tokens=tok)
            assert e.value.name == name
        assert [m["id"] for m in c.models()["models"]] == []
        assert_serving(d, tiny_expected, c)   # on the same connection: errors leave it open


def test_stalled_half_frame_does_not_block_others(start_lunad, tiny_expected):
    d = start_lunad()
    s = d.raw()
    full = frame(proto.MSG_PING, rid=8)
    s.sendall(full[:20])           # half a header, then nothing
    t0 = time.monotonic()
    for _ in range(3):
        assert_serving(d, tiny_expected)
    assert time.monotonic() - t0 < 30 * SLOW
    assert not closed_by_peer(s, timeout=0.3), "the staller was dropped before --io-timeout (default 60 s)"
    s.sendall(full[20:])           # finishing the frame late is fine
    h, msg, _ = read_frame(s)
    assert h.request_id == 8 and msg == {}
    s.close()


def test_io_timeout_disconnects_staller(start_lunad, tiny_expected):
    d = start_lunad("--io-timeout", "1")
    idle = d.raw()                 # no partial frame: must stay
    ping_ok(idle)
    stallers = []
    for cut in (10, 40):           # in the header; in the JSON part
        s = d.raw()
        s.sendall(frame(proto.MSG_ENCODE, json.dumps({"model": "tiny.safetensors"}).encode(), rid=1)[:cut])
        stallers.append(s)
    t0 = time.monotonic()
    assert_serving(d, tiny_expected)
    for s in stallers:
        assert closed_by_peer(s, timeout=8), "a stalled frame was not cut after --io-timeout 1"
        s.close()
    waited = time.monotonic() - t0
    assert waited >= 0.5, "closed after %.2f s, before --io-timeout 1" % waited
    ping_ok(idle)                  # idle connections are not stalled ones
    idle.close()
    assert_serving(d, tiny_expected)


def test_client_disconnects_mid_request(start_lunad, tiny_expected):
    d = start_lunad("--workers", "1", "--batch-max", "1")
    with d.client() as watcher:
        watcher.models("load", "slow.safetensors")
        before = watcher.status()["requests"]
        n = 5
        for rep in range(2):
            c = d.client()
            for k in range(n):
                c.send(proto.MSG_ENCODE, c.encode_request("slow.safetensors", tokens=tokens_for([30], seed=50 + k),
                                                          cache=False))
            if rep == 1:  # the second time: gone half-way through a reply it was reading
                c._sock.recv(100)
            c.close()
        assert_serving(d, tiny_expected, watcher)
        wait_for(lambda: (lambda q: q["depth"] == 0 and q["running"] == 0)(watcher.status()["queue"]), 60,
                 "the queue to drain")
        after = watcher.status()["requests"]
        dropped = after["dropped"] - before["dropped"]
        print("dropped %d of %d" % (dropped, 2 * n))
        assert 0 <= dropped <= 2 * n
        assert_serving(d, tiny_expected, watcher)


def test_full_queue_replies_busy_never_loses(start_lunad, daemon_models, tiny_expected):
    d = start_lunad("--max-queue", "1", "--workers", "1")
    burst = 16
    toks = [tokens_for([20], seed=60), tokens_for([33], WEIGHTS, seed=61)]
    with d.client() as c:
        c.models("load", "slow.safetensors")
        before = c.status()["requests"]
        sent = {}
        for k in range(burst):
            rid = c.send(proto.MSG_ENCODE, c.encode_request("slow.safetensors", tokens=toks[k % 2], cache=False))
            sent[rid] = k % 2
        got = {}
        for _ in range(burst):
            rid, flags, msg, tensors = c.recv()
            assert rid in sent and rid not in got, "reply id %d unexpected or repeated" % rid
            got[rid] = (flags, msg, tensors)
        assert set(got) == set(sent)
        want = [local_encode([daemon_models / "slow.safetensors"], t) for t in toks]
        busy = ok = 0
        for rid, (flags, msg, tensors) in got.items():
            if flags & proto.FLAG_ERROR:
                assert msg["name"] == "EBUSY", "request %d: %r" % (rid, msg)
                busy += 1
            else:
                cond, pooled, _ = split_encode_reply(msg, tensors)
                w = want[sent[rid]]
                assert enc_bytes(cond, pooled) == (w["cond"][2], w["pooled"][2])
                ok += 1
        print("%d ok, %d busy" % (ok, busy))
        assert busy >= 1, "a burst of %d on --max-queue 1 got no EBUSY" % burst
        assert ok >= 1
        after = c.status()["requests"]
        assert after["busy"] - before["busy"] == busy
        assert_serving(d, tiny_expected, c)


def test_expired_deadline(start_lunad, tiny_expected):
    d = start_lunad("--workers", "1", "--batch-max", "1")
    with d.client() as c, d.client() as late:
        c.models("load", "slow.safetensors")
        ahead = [c.send(proto.MSG_ENCODE, c.encode_request("slow.safetensors", tokens=tokens_for([30], seed=70 + k),
                                                           cache=False)) for k in range(4)]
        wait_for(lambda: late.status()["queue"]["depth"] >= 2, 10, "requests queued")
        tok = tiny_expected[0]
        with pytest.raises(LunaError) as e:
            late.encode("tiny.safetensors", tokens=tok, deadline_ms=1, cache=False)
        assert e.value.name == "ETIMEDOUT", e.value
        assert late.status()["requests"]["expired"] >= 1
        for _ in ahead:
            rid, flags, msg, _ = c.recv()
            assert not flags & proto.FLAG_ERROR, msg
        # with no queue ahead, a generous deadline is met
        got = late.encode("tiny.safetensors", tokens=tok, deadline_ms=60000, cache=False)
        assert enc_bytes(got[0], got[1]) == tiny_expected[1:]
        with pytest.raises(LunaError) as e:
            late.encode("tiny.safetensors", tokens=tok, deadline_ms=-5)
        assert e.value.name == "EINVAL"
    assert_serving(d, tiny_expected)


# =====================================================================================
# 4. lifecycle
# =====================================================================================

def test_stale_socket_replaced(start_lunad, tmp_path, tiny_expected):
    d0 = start_lunad(start=False)
    path = d0.root / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()                       # the file stays, nobody listens
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    d = start_lunad(socket_path=path)
    assert_serving(d, tiny_expected)
    assert "stale" in d.log(), d.log()


def test_live_socket_is_an_error(start_lunad, tiny_expected):
    d = start_lunad()
    d2 = start_lunad(socket_path=d.socket, start=False)
    d2.launch()
    rc = d2.wait(20)
    assert rc is not None, "a second lunad on a live socket kept running"
    assert rc != 0
    assert "another daemon" in d2.log() and str(d.socket) in d2.log(), d2.log()
    assert d.socket.exists()
    assert_serving(d, tiny_expected)
    # not a socket at all
    d3 = start_lunad(start=False)
    d3.socket.write_text("not a socket")
    d3.launch()
    rc = d3.wait(20)
    assert rc not in (None, 0) and "not a socket" in d3.log(), d3.log()
    assert d3.socket.read_text() == "not a socket"


def test_socket_mode(start_lunad):
    d = start_lunad()
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
    d2 = start_lunad("--socket-mode", "0660")
    assert stat.S_IMODE(os.stat(d2.socket).st_mode) == 0o660
    assert d.stop() == 0 and d2.stop() == 0
    assert not d.socket.exists() and not d2.socket.exists(), "socket file left behind after exit"


def test_preload_ready_before_any_request(start_lunad, tiny_expected):
    """With --preload, no health reply may say ready before the preloaded models are
    ready: health is polled back to back from the moment the socket answers, over
    several starts (a race would show in a short window)."""
    pair = "clip_l.safetensors+clip_g.safetensors"
    want = {"tiny.safetensors": "ready", pair: "ready"}
    for attempt in range(5):
        d = start_lunad("--preload", "tiny.safetensors", "--preload", pair, start=False)
        d.launch()
        seen = [d.wait_health()]
        with d.client() as c:
            end = time.monotonic() + 30 * SLOW
            while time.monotonic() < end:
                h = c.health()
                seen.append(h)
                if h["ready"]:
                    break
            assert h["ready"], "not ready within %.0f s: %r" % (30 * SLOW, h)
        for k, h in enumerate(seen):
            if h["ready"]:
                states = {m["id"]: m["state"] for m in h["models"]}
                assert states == want, "start %d, health reply %d of %d says ready before the --preload models " \
                    "are: %r" % (attempt, k + 1, len(seen), h)
        if attempt < 4:
            stop_clean(d)
    st = d.status()
    # a preload is not a request: the count is of encodes served
    assert {m["id"]: m["requests"] for m in st["models"]}["tiny.safetensors"] == 0, st["models"]
    assert_serving(d, tiny_expected)
    assert loads_in_log(d, "tiny.safetensors") == 1, d.log()
    assert d.status()["requests"]["failed"] == 0


def test_models_load_list_unload(start_lunad, tiny_expected):
    d = start_lunad()
    with d.client() as c:
        assert c.models()["models"] == []
        r = c.models("load", "tiny.safetensors")["model"]
        assert r["id"] == "tiny.safetensors" and r["state"] == "ready" and r["family"] == "sd1"
        assert r["weights_bytes"] > 0
        r = c.models("load", ["clip_g.safetensors", "clip_l.safetensors"])["model"]
        assert r["family"] == "sdxl" and r["state"] == "ready"
        pair_id = r["id"]
        listed = {m["id"]: m for m in c.models("list")["models"]}
        assert set(listed) == {"tiny.safetensors", pair_id}
        assert all(m["state"] == "ready" for m in listed.values())
        assert {m["id"] for m in c.status()["models"]} == set(listed)
        assert c.models("unload", "tiny.safetensors") == {"unloaded": True}
        assert [m["id"] for m in c.models()["models"]] == [pair_id]
        with pytest.raises(LunaError) as e:
            c.models("unload", "tiny.safetensors")
        assert e.value.name == "ENOTFOUND"
        assert c.models("unload", ["clip_l.safetensors", "clip_g.safetensors"]) == {"unloaded": True}
        assert c.models()["models"] == []
        for bad in ({"action": "explode"}, {"action": 3}, {"action": "load"}):
            with pytest.raises(LunaError) as e:
                c.call(proto.MSG_MODELS, bad)
            assert e.value.name == "EINVAL", bad
        assert_serving(d, tiny_expected, c)   # loads it again on use
        assert [m["id"] for m in c.models()["models"]] == ["tiny.safetensors"]


def test_one_model_under_several_spellings(start_lunad, fresh_models, tiny_expected):
    folder = fresh_models("tiny.safetensors")
    os.symlink("tiny.safetensors", folder / "alias.safetensors")
    (folder / "sub").mkdir()
    os.symlink("../tiny.safetensors", folder / "sub" / "deep.safetensors")
    d = start_lunad(models=[folder])
    tok, cond, pooled = tiny_expected
    spellings = ["tiny.safetensors", "./tiny.safetensors", ".//tiny.safetensors", "./././tiny.safetensors",
                 "alias.safetensors", "sub/deep.safetensors"]
    with d.client() as c:
        for sp in spellings:
            got = c.encode(sp, tokens=tok, cache=False)
            assert enc_bytes(got[0], got[1]) == (cond, pooled), sp
        models = c.status()["models"]
        assert len(models) == 1, "one file under %d spellings became %d models: %r" % (
            len(spellings), len(models), [m["id"] for m in models])
        assert models[0]["requests"] == len(spellings)
    assert loads_in_log(d) == 1, d.log()


def test_concurrent_first_use_loads_once(start_lunad, fresh_models, tiny_expected):
    """Eight clients name one unloaded model at once (under several spellings) with four
    workers: one load, every answer right."""
    folder = fresh_models("tiny.safetensors")
    os.symlink("tiny.safetensors", folder / "alias.safetensors")
    d = start_lunad("--workers", "4", models=[folder])
    tok, cond, pooled = tiny_expected
    spellings = ["tiny.safetensors", "./tiny.safetensors", "alias.safetensors", ".//alias.safetensors"]
    barrier = threading.Barrier(8, timeout=60 * SLOW)
    results, errors = [None] * 8, []

    def run(i):
        try:
            with d.client() as c:
                barrier.wait()
                got = c.encode(spellings[i % 4], tokens=tok, cache=False)
                results[i] = enc_bytes(got[0], got[1])
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append("client %d: %s" % (i, e))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120 * SLOW)
    assert not errors, errors
    assert all(r == (cond, pooled) for r in results)
    st = d.status()
    assert len(st["models"]) == 1, st["models"]
    assert loads_in_log(d) == 1, d.log()



def test_status_counts_batched_requests(start_lunad, tiny_expected):
    """status models[].requests counts requests, batched or not: six encodes queued
    behind a slow one run as one batch and count six."""
    d = start_lunad("--workers", "1")
    with d.client() as c, d.client() as admin:
        admin.models("load", "slow.safetensors")
        admin.models("load", "tiny.safetensors")
        before = {m["id"]: m["requests"] for m in admin.status()["models"]}["tiny.safetensors"]
        c.send(proto.MSG_ENCODE, c.encode_request("slow.safetensors", tokens=tokens_for([60, 60], seed=3), cache=False))
        rids = [c.send(proto.MSG_ENCODE, c.encode_request("tiny.safetensors", tokens=tokens_for([10 + k], seed=k),
                                                          cache=False)) for k in range(6)]
        batches = []
        for _ in range(7):
            rid, flags, msg, _ = c.recv()
            assert not flags & proto.FLAG_ERROR, msg
            if rid in rids:
                batches.append(msg.get("batch"))
        after = {m["id"]: m["requests"] for m in admin.status()["models"]}["tiny.safetensors"]
        assert after - before == 6, "6 encode requests (batches %r) moved the model's request count by %d" % (
            batches, after - before)


def test_model_that_fails_to_load(start_lunad, fresh_models, daemon_models, tiny_expected):
    """A broken file fails every request naming it (none waits forever), leaves no entry
    behind, and the fixed file loads on the next request."""
    folder = fresh_models("tiny.safetensors")
    bad = folder / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1, \"b\"" + bytes(64))
    d = start_lunad("--workers", "3", models=[folder])
    barrier = threading.Barrier(6, timeout=60 * SLOW)
    names = [None] * 6

    def run(i):
        with d.client() as c:
            barrier.wait()
            try:
                if i % 2:
                    c.models("load", "bad.safetensors")
                else:
                    c.encode("bad.safetensors", tokens=tokens_for([5]))
            except LunaError as e:
                names[i] = (e.name, e.message)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120 * SLOW)
    assert not any(t.is_alive() for t in threads), "requests for a broken model hang"
    assert all(n is not None for n in names), "a request for a broken model succeeded: %r" % names
    for name, message in names:
        assert name in ("EFORMAT", "EMODEL", "EMISSING", "EIO"), (name, message)
        assert message
    with d.client() as c:
        h = c.health()
    assert h["ready"] is True and all(m["id"] != "bad.safetensors" or m["state"] != "loading" for m in h["models"]), h
    # fixed in place: the next request loads it
    tmp = folder / "bad.tmp"
    shutil.copyfile(daemon_models / "tiny.safetensors", tmp)
    os.replace(tmp, bad)
    tok, cond, pooled = tiny_expected
    with d.client() as c:
        got = c.encode("bad.safetensors", tokens=tok, cache=False)
        assert enc_bytes(got[0], got[1]) == (cond, pooled)
        states = {m["id"]: m["state"] for m in c.models()["models"]}
        assert states == {"bad.safetensors": "ready"}, states
    assert_serving(d, tiny_expected)


def test_load_reply_when_the_budget_drops_it(start_lunad, tiny_expected):
    """models load of a model over --max-model-mem while another one is in use: the
    loaded model is dropped as soon as the load's reference goes, and the reply still
    describes it (it is described while held, never after: that read freed memory)."""
    d = start_lunad("--max-model-mem", "1", "--workers", "2", "--batch-max", "1")
    toks = [tokens_for([30], seed=70 + k) for k in range(3)]
    with d.client() as c, d.client() as admin:
        rids = [c.send(proto.MSG_ENCODE, c.encode_request("slow.safetensors", tokens=t, cache=False)) for t in toks]
        wait_for(lambda: admin.status()["queue"]["running"] >= 1, 10 * SLOW, "work running")
        for _ in range(3):
            got = admin.models("load", "tiny.safetensors")["model"]
            assert got["id"] == "tiny.safetensors" and got["state"] == "ready" and got["kind"] == "text", got
            assert got["in_use"] == 0, got
        for _ in rids:
            _, flags, msg, _ = c.recv()
            assert not flags & proto.FLAG_ERROR, msg
    assert_serving(d, tiny_expected)


def test_pipelined_replies_past_the_high_water_mark(start_lunad):
    """A client that pipelines more requests than 16 MiB of replies and only then reads:
    lunad stops parsing at the mark and must go on once the replies drain, with nothing
    more arriving on the socket. Every request gets its reply, in order."""
    d = start_lunad()
    s = d.raw(timeout=30)
    s.sendall(proto.encode_frame(proto.MSG_STATUS, 0, 1, {}))
    h, msg, _ = read_frame(s)
    size = proto.HEADER_SIZE + len(json.dumps(msg))
    n = (20 << 20) // size + 100
    frames = b"".join(proto.encode_frame(proto.MSG_STATUS, 0, i + 2, {}) for i in range(n))
    sender = threading.Thread(target=s.sendall, args=(frames,), daemon=True)
    sender.start()
    sender.join(60 * SLOW)
    assert not sender.is_alive(), "lunad stopped reading pipelined requests"
    for i in range(n):
        h, msg, _ = read_frame(s)
        assert h.request_id == i + 2 and not h.flags & proto.FLAG_ERROR, (i, h, msg)
    s.close()


def test_stop_skips_queued_preloads(start_lunad, fresh_models):
    """SIGTERM does not wait for --preload loads still queued: they are skipped (a model
    nobody will use), so lunad stops within --grace plus at most the load under way."""
    names = ["p%02d.safetensors" % i for i in range(16)]
    folder = fresh_models("slow.safetensors")
    for n in names:
        os.link(folder / "slow.safetensors", folder / n)
    flags = ["--workers", "1", "--grace", "0.2", "--weight-dtype-f32", "--max-model-mem", "1"]
    for n in names:
        flags += ["--preload", n]
    d = start_lunad(*flags, models=[folder])
    d.signal(signal.SIGTERM)
    t0 = time.monotonic()
    rc = d.wait(60)
    took = time.monotonic() - t0
    log = d.log()
    loaded = len(re.findall(r"model p\d+\.safetensors ready", log))
    skipped = len(re.findall(r"--preload p\d+\.safetensors skipped: lunad is stopping", log))
    assert rc == 0, log[-3000:]
    assert loaded + skipped == len(names) and skipped >= 1, (loaded, skipped, log[-3000:])
    print("SIGTERM to exit: %.2f s, %d preloads loaded, %d skipped" % (took, loaded, skipped))


def test_unload_while_in_use(start_lunad, daemon_models, tiny_expected):
    """unload of a model with requests running takes effect when they finish: they all
    get right answers, and the model is gone afterwards."""
    d = start_lunad("--workers", "2", "--batch-max", "1")
    toks = [tokens_for([30], seed=90 + k) for k in range(4)]
    want = [local_encode([daemon_models / "slow.safetensors"], t) for t in toks]
    with d.client() as c, d.client() as admin:
        admin.models("load", "slow.safetensors")
        rids = {c.send(proto.MSG_ENCODE, c.encode_request("slow.safetensors", tokens=t, cache=False)): k
                for k, t in enumerate(toks)}
        wait_for(lambda: admin.status()["queue"]["running"] >= 1, 10, "work running")
        assert admin.models("unload", "slow.safetensors") == {"unloaded": True}
        pending = [m for m in admin.models()["models"] if m.get("unload_pending")]
        print("unload pending while in use: %s" % bool(pending))
        for _ in rids:
            rid, flags, msg, tensors = c.recv()
            assert not flags & proto.FLAG_ERROR, "request %d failed after unload: %r" % (rid, msg)
            cond, pooled, _ = split_encode_reply(msg, tensors)
            w = want[rids[rid]]
            assert enc_bytes(cond, pooled) == (w["cond"][2], w["pooled"][2])
        wait_for(lambda: [m["id"] for m in admin.models()["models"]] == [], 20, "the unloaded model to go")
        # named again, it loads again
        got = admin.encode("slow.safetensors", tokens=toks[0], cache=False)
        assert enc_bytes(got[0], got[1]) == (want[0]["cond"][2], want[0]["pooled"][2])
    assert loads_in_log(d, "slow.safetensors") == 2, d.log()
    assert_serving(d, tiny_expected)


def test_max_model_mem_unloads_idle_lru(start_lunad, daemon_models, tiny_expected):
    size = (daemon_models / "tiny.safetensors").stat().st_size
    d = start_lunad("--max-model-mem", str(int(size * 1.5)))
    with d.client() as c:
        a = c.models("load", "tiny2.safetensors")["model"]
        assert a["weights_bytes"] <= size * 1.5 < 2 * a["weights_bytes"], "sizes do not make the test: %r" % a
        assert [m["id"] for m in c.status()["models"]] == ["tiny2.safetensors"]
        b = c.models("load", "tiny.safetensors")["model"]
        assert b["state"] == "ready"
        assert [m["id"] for m in c.status()["models"]] == ["tiny.safetensors"], "the idle first model stayed"
        assert "over --max-model-mem" in d.log()
        assert c.status()["weights_bytes"] <= size * 1.5
        assert_serving(d, tiny_expected, c)
        # and back: using the first one again unloads the second
        got = c.encode("tiny2.safetensors", tokens=tiny_expected[0], cache=False)
        assert got[0].shape == (1, 77, 64)
        assert [m["id"] for m in c.status()["models"]] == ["tiny2.safetensors"]


def test_sigterm_finishes_in_flight_work(start_lunad, daemon_models):
    d = start_lunad("--workers", "1", "--batch-max", "1")
    toks = [tokens_for([25], seed=80), tokens_for([40], WEIGHTS, seed=81)]
    want = [local_encode([daemon_models / "slow.safetensors"], t) for t in toks]
    clients = [d.client() for _ in range(3)]
    watcher = d.client()
    watcher.models("load", "slow.safetensors")
    sent = []
    for k in range(6):
        c = clients[k % 3]
        rid = c.send(proto.MSG_ENCODE, c.encode_request("slow.safetensors", tokens=toks[k % 2], cache=False))
        sent.append((c, rid, k % 2))
    wait_for(lambda: watcher.status()["queue"]["depth"] >= 3, 10, "work queued")
    d.signal(signal.SIGTERM)
    wait_for(lambda: watcher.status().get("stopping"), 10, "status to say stopping")
    assert watcher.health()["ready"] is False
    # new work on an open connection is refused; cheap messages still answer
    with pytest.raises(LunaError) as e:
        watcher.encode("tiny.safetensors", tokens=tokens_for([3]))
    assert e.value.name == "ESHUTDOWN"
    assert watcher.ping() >= 0
    assert not d.socket.exists(), "the socket still accepts connections while stopping"
    for c in clients:
        mine = {rid: which for cc, rid, which in sent if cc is c}
        for _ in range(len(mine)):
            rid, flags, msg, tensors = c.recv()
            assert rid in mine, rid
            assert not flags & proto.FLAG_ERROR, "in-flight request %d failed on SIGTERM: %r" % (rid, msg)
            cond, pooled, _ = split_encode_reply(msg, tensors)
            w = want[mine.pop(rid)]
            assert enc_bytes(cond, pooled) == (w["cond"][2], w["pooled"][2])
    rc = d.wait(60)
    assert rc == 0, "lunad exited with %s after SIGTERM; log tail:\n%s" % (rc, d.log()[-3000:])
    for c in clients + [watcher]:
        c.close()


def test_config_file(start_lunad, daemon_models, tiny_expected):
    probe = start_lunad(start=False)
    sock = probe.root / "conf.sock"
    conf = ("# lunad settings for a test\n"
            "\n"
            "socket %s\n"
            "models-dir   %s   \n"
            "socket-mode 0660\n"
            "max-queue 7\n"
            "workers 1\n"
            "batch-max 2\n"
            "io-timeout 5\n"
            "grace 10\n"
            "log-level debug\n"
            "preload tiny.safetensors\n"
            "weight-dtype-f32\n" % (sock, daemon_models))
    d = start_lunad(config=conf, bare=True, socket_path=sock)
    st = wait_for(lambda: (lambda s: s if s["models"] and s["models"][0]["state"] == "ready" else None)(d.status()),
                  30, "the preloaded model")
    assert st["queue"]["max"] == 7 and st["workers"] == 1
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    assert [m["id"] for m in st["models"]] == ["tiny.safetensors"]
    assert "debug" in d.log()
    assert "fp32" in d.log()
    assert_serving(d, tiny_expected)
    stop_clean(d)
    # a flag after --config overrides the file
    d = start_lunad("--max-queue", "9", config=conf, bare=True, socket_path=sock)
    assert d.status()["queue"]["max"] == 9
    stop_clean(d)


@pytest.mark.parametrize("body,line,word", [
    ("# c\nworkers 1\nno-such-key 3\n", 3, "no-such-key"),
    ("max-queue lots\n", 1, "max-queue"),
    ("\n\n\n\nsocket-mode 999\n", 5, "socket-mode"),
    ("workers\n", 1, "workers"),
    ("config other.conf\n", 1, "config"),
], ids=["unknown-key", "bad-int", "bad-mode", "no-value", "nested-config"])
def test_config_errors_name_file_and_line(start_lunad, body, line, word):
    bad = start_lunad(config=body, start=False)
    bad.launch()
    rc = bad.wait(20)
    assert rc not in (None, 0), "lunad accepted the config %r" % body
    log = bad.log()
    assert "%s:%d" % (bad.config_path, line) in log and word in log, "config %r -> %s" % (body, log)
    assert not bad.socket.exists()


def test_help_lists_every_flag():
    r = subprocess.run([str(lunad_bin()), "--help"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=30 * SLOW)
    assert r.returncode == 0, r.stderr
    src = (REPO / "src" / "server" / "config.c").read_text()
    flags = re.findall(r'^\s*\{"([a-z0-9-]+)",\s*OPT_', src, re.M)
    assert len(flags) >= 15, "could not read the option table of src/server/config.c"
    for f in flags + ["config", "help"]:
        assert re.search(r"--%s\b" % re.escape(f), r.stdout), "--help does not list --%s" % f
    r = subprocess.run([str(lunad_bin()), "--no-such-flag"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=30 * SLOW)
    assert r.returncode == 2 and "no-such-flag" in r.stderr
