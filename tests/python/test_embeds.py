"""test_embeds.py -- textual-inversion embeddings (vectors in token slots) through a real lunad.

ComfyUI's tokenizer turns "embedding:name" into vectors placed inside the token list:
a slot then holds a 1-D float tensor of the encoder's width instead of an id (one slot
per vector of a multi-vector embedding). The facts followed here were read from
Comfy-Org/ComfyUI commit 443393b48e19da8601fb947eea05b5d57574cc7a:
comfy/sd1_clip.py SDClipModel.process_tokens (ids looked up in the token embedding as
fp32, each vector cast to fp32 and put at its slot; num_tokens = the ids up to and
including the first end token plus every vector slot) and comfy/clip_model.py
CLIPTextModel_.forward (embeds + position embedding; pooled at num_tokens - 1). A vector
of another width is dropped there with a warning; lunad refuses the request (EINVAL).

1. the reference (ref_clip.py) itself: a slot holding its own id's token embedding
   encodes exactly as the id; changing a vector changes the result;
2. SD1 and SDXL, 1-, 2- and 3-vector embeddings at various slots of 2 chunks, weights
   != 1 on some, a vector after the end token: cond and pooled match the reference
   (1e-4, as test_encode.py), and a vector equal to an id's embedding gives the id's
   result bit for bit;
3. the result cache tells vectors apart; concurrent and batched requests with
   different vectors each get their own result, bit-identical to running alone;
4. every malformed "embeds" and slot: the error code and a message naming the field.
"""

import json
import threading

import numpy as np
import pytest
import torch

import ref_clip
from conftest import BOS, EOS, tokens_for
from conftest_daemon import daemon_models, start_lunad  # noqa: F401
from daemon import proto
from lunaclient import LunaError
from lunaclient.client import prepare_tokens

TOL = 1e-4

MODELS = {
    "sd1": ["sd1.safetensors"],
    "sdxl": ["clip_l.safetensors", "clip_g.safetensors"],
}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def spec(family):
    m = MODELS[family]
    return m[0] if len(m) == 1 else m


def encoders(daemon_models, family):
    return ref_clip.load([str(daemon_models / p) for p in MODELS[family]])


def vectors(enc, n, seed):
    """'n' random vectors at the scale of the encoder's token embeddings."""
    tok = enc.w["embeddings.token_embedding.weight"].numpy()
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, enc.width)) * float(tok.std()) * 1.5).astype(np.float32)


def put(tokens, key, chunk, slot, vecs, weight=None, form="numpy"):
    """Put the vectors 'vecs' in consecutive slots from 'slot' of chunk 'chunk' (a
    multi-vector embedding), with 'weight' (None: keep the slot's). 'form' is how the
    client gets them: numpy, torch or list."""
    for i, v in enumerate(vecs):
        pair = tokens[key][chunk][slot + i]
        w = pair[1] if weight is None else weight
        x = torch.from_numpy(v.copy()) if form == "torch" else v.tolist() if form == "list" else v.copy()
        tokens[key][chunk][slot + i] = [x, w]
    return tokens


# name -> [(chunk, slot, number of vectors, weight or None, form)], per encoder
PLACES = {
    "one": [(0, 1, 1, None, "numpy")],
    "mixed": [(0, 3, 1, 1.3, "numpy"), (0, 10, 3, None, "torch"), (1, 5, 2, 0.7, "list")],
    "three_weighted": [(0, 20, 3, 0.5, "numpy"), (1, 1, 1, 1.2, "torch")],
    "chunk1_only": [(1, 30, 2, None, "numpy")],
    "after_eos": [(0, 40, 2, None, "numpy")],   # in the padding: moves ComfyUI's pooled position
}


def prompt(encs, family, name, seed=0):
    """Two chunks (30 and 20 prompt tokens, some weighted) with PLACES[name]'s vectors
    in every encoder: (tokens for the client, tokens for the reference)."""
    base = tokens_for([30, 20], [1.1, 0.8], seed=seed, sdxl=family == "sdxl")
    client = json.loads(json.dumps(base))
    for key in client:
        for k, (chunk, slot, n, w, form) in enumerate(PLACES[name]):
            put(client, key, chunk, slot, vectors(encs[key], n, seed * 100 + k * 7 + (key == "g")), w, form)
    ref = {key: [[[np.asarray(p[0].numpy() if torch.is_tensor(p[0]) else p[0], np.float32)
                   if np.ndim(p[0]) else p[0], p[1]] for p in c] for c in chunks] for key, chunks in client.items()}
    return client, ref


@pytest.fixture(scope="module")
def refs(daemon_models):
    return {f: encoders(daemon_models, f) for f in MODELS}


# ------------------------------------------------------------------ the reference

def test_reference_vector_semantics(refs):
    enc = refs["sd1"]
    tok = tokens_for([12], [1.3])
    own = json.loads(json.dumps(tok))
    table = enc["l"].w["embeddings.token_embedding.weight"].numpy()
    for j in (1, 4, 5):  # a slot holding its own id's (fp16-rounded) embedding is the id
        own["l"][0][j][0] = table[own["l"][0][j][0]].copy()
    a, b = ref_clip.encode_loaded(enc, tok), ref_clip.encode_loaded(enc, own)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    v1 = json.loads(json.dumps(tok))
    v1["l"][0][4][0] = vectors(enc["l"], 1, 1)[0]
    v2 = json.loads(json.dumps(tok))
    v2["l"][0][4][0] = vectors(enc["l"], 1, 2)[0]
    c1, c2 = ref_clip.encode_loaded(enc, v1), ref_clip.encode_loaded(enc, v2)
    assert rel(c1[0], a[0]) > 1e-3 and rel(c2[0], c1[0]) > 1e-3 and rel(c2[1], c1[1]) > 1e-3
    # causal: positions before the vector do not change
    assert np.array_equal(c1[0][0, :4], a[0][0, :4])
    # a vector in the padding moves the pooled output to num_tokens - 1 (13 + 1 here)
    pad = json.loads(json.dumps(tok))
    pad["l"][0][50][0] = vectors(enc["l"], 1, 3)[0]
    cp = ref_clip.encode_loaded(enc, pad)
    assert not np.array_equal(cp[1], a[1])
    with pytest.raises(ValueError):
        bad = json.loads(json.dumps(tok))
        bad["l"][0][3][0] = np.zeros(7, np.float32)
        ref_clip.encode_loaded(enc, bad)


# ------------------------------------------------------------------ against the reference

@pytest.mark.parametrize("family", sorted(MODELS))
def test_embeds_match_reference(start_lunad, refs, family):
    d = start_lunad()
    encs = refs[family]
    with d.client(timeout=120) as c:
        for k, name in enumerate(sorted(PLACES)):
            client_tok, ref_tok = prompt(encs, family, name, seed=k)
            cond, pooled, info = c.encode(spec(family), tokens=client_tok, cache=False)
            rc, rp = ref_clip.encode_loaded(encs, ref_tok)
            assert cond.shape == rc.shape and pooled.shape == rp.shape, name
            ec, ep = rel(cond, rc), rel(pooled, rp)
            assert ec <= TOL and ep <= TOL, "%s %s: rel err cond %.3g pooled %.3g" % (family, name, ec, ep)
            # the comparison can fail: without the vectors the result is far away
            plain = tokens_for([30, 20], [1.1, 0.8], seed=k, sdxl=family == "sdxl")
            pc, pp = c.encode(spec(family), tokens=plain, cache=False)[:2]
            assert rel(pc, rc) > 10 * TOL
            if name == "after_eos":
                assert rel(pp, rp) > 10 * TOL   # the pooled position moved
        # a vector equal to an id's token embedding gives that id's result, bit for bit
        tok = tokens_for([25, 9], [1.2], seed=7, sdxl=family == "sdxl")
        own = json.loads(json.dumps(tok))
        for key in own:
            table = encs[key].w["embeddings.token_embedding.weight"].numpy()
            for chunk, slot in ((0, 2), (0, 3), (1, 5), (0, 25)):  # not the EOS at 26: a vector is no EOS
                own[key][chunk][slot][0] = table[own[key][chunk][slot][0]].copy()
        a = c.encode(spec(family), tokens=tok, cache=False)
        b = c.encode(spec(family), tokens=own, cache=False)
        assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()


# ------------------------------------------------------------------ cache, concurrency

def test_embeds_cache(start_lunad, refs):
    d = start_lunad()
    encs = refs["sd1"]
    tok = tokens_for([20], [1.2], seed=3)
    v1, v2 = vectors(encs["l"], 2, 11), vectors(encs["l"], 2, 12)
    t1 = put(json.loads(json.dumps(tok)), "l", 0, 5, v1)
    t2 = put(json.loads(json.dumps(tok)), "l", 0, 5, v2)
    t3 = put(json.loads(json.dumps(tok)), "l", 0, 6, v1)  # same vectors, other slots
    with d.client(timeout=60) as c:
        a = c.encode("sd1.safetensors", tokens=t1)
        assert a[2]["cached"] is False
        b = c.encode("sd1.safetensors", tokens=t2)
        assert b[2]["cached"] is False and rel(a[0], b[0]) > 1e-3
        e = c.encode("sd1.safetensors", tokens=t3)
        assert e[2]["cached"] is False and rel(a[0], e[0]) > 1e-3
        plain = c.encode("sd1.safetensors", tokens=tok)   # the ids under the vectors
        assert plain[2]["cached"] is False
        again = c.encode("sd1.safetensors", tokens=put(json.loads(json.dumps(tok)), "l", 0, 5, v1.copy(), form="torch"))
        assert again[2]["cached"] is True
        assert again[0].tobytes() == a[0].tobytes() and again[1].tobytes() == a[1].tobytes()
        # an unused row and another row order do not change the key
        msg = c.encode_request("sd1.safetensors", tokens=t1)
        raw = np.concatenate([np.ones((1, encs["l"].width), np.float32), v1[::-1]]).tobytes()
        msg["embeds"]["l"] = {"dtype": "F32", "shape": [3, encs["l"].width], "data_offsets": [0, len(raw)]}
        msg["tokens"]["l"][0][5][0] = {"embed": 2}
        msg["tokens"]["l"][0][6][0] = {"embed": 1}
        r, ten = c.call(proto.MSG_ENCODE, dict(msg), raw=raw)
        assert r["cached"] is True and ten["cond"].tobytes() == a[0].tobytes()
        st = c.status()["cache"]
        assert st["hits"] >= 2


def test_embeds_concurrent_and_batched(start_lunad, refs):
    d = start_lunad("--workers", "1", "--batch-max", "8", "--cache-mem", "0")
    encs = refs["sdxl"]
    jobs = []
    for k in range(8):
        client_tok, _ = prompt(encs, "sdxl", sorted(PLACES)[k % len(PLACES)], seed=20 + k)
        jobs.append(client_tok)
    with d.client(timeout=120) as c:
        alone = [c.encode(spec("sdxl"), tokens=t) for t in jobs]
        # a slow request occupies the worker while the others queue: they run as one batch
        slow = c.send(proto.MSG_ENCODE, c.encode_request("slow.safetensors", tokens=tokens_for([60, 60], seed=1)))
        rids = {c.send(proto.MSG_ENCODE, c.encode_request(spec("sdxl"), tokens=t)): k for k, t in enumerate(jobs)}
        batches = []
        for _ in range(len(rids) + 1):
            rid, flags, msg, tensors = c.recv()
            assert not flags & proto.FLAG_ERROR, msg
            if rid == slow:
                continue
            k = rids[rid]
            batches.append(msg["batch"])
            assert tensors["cond"].tobytes() == alone[k][0].tobytes(), k
            assert tensors["pooled"].tobytes() == alone[k][1].tobytes(), k
        assert max(batches) > 1, batches
    # many connections at once, each its own vectors
    errors = []

    def worker(k):
        try:
            with d.client(timeout=120) as cc:
                for r in range(3):
                    got = cc.encode(spec("sdxl"), tokens=jobs[(k + r) % len(jobs)])
                    want = alone[(k + r) % len(jobs)]
                    if got[0].tobytes() != want[0].tobytes() or got[1].tobytes() != want[1].tobytes():
                        errors.append("client %d round %d differs" % (k, r))
        except Exception as e:  # reported below
            errors.append("client %d: %r" % (k, e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# ------------------------------------------------------------------ validation

def base_request(width, n_rows=2, slots=((0, 3, 0), (0, 4, 1)), key="l", sdxl=False):
    """(msg, raw) of a valid encode request with hand-written "embeds"."""
    tok = tokens_for([12], sdxl=sdxl)
    for chunk, slot, row in slots:
        tok[key][chunk][slot][0] = {"embed": row}
    raw = (np.arange(n_rows * width, dtype=np.float32).reshape(n_rows, width) * 1e-3).tobytes()
    msg = {"model": "sdxl" if sdxl else "sd1.safetensors", "tokens": tok, "cache": False,
           "embeds": {key: {"dtype": "F32", "shape": [n_rows, width], "data_offsets": [0, len(raw)]}}}
    return msg, raw


def expect(c, msg, raw, name, *words):
    with pytest.raises(LunaError) as e:
        c.call(proto.MSG_ENCODE, msg, raw=raw)
    assert e.value.name == name, "%s: %s" % (e.value.name, e.value.message)
    for w in words:
        assert w in e.value.message, "%r not in %r" % (w, e.value.message)
    return e.value


def test_embeds_validation(start_lunad, refs):
    d = start_lunad()
    W = refs["sd1"]["l"].width
    with d.client(timeout=60) as c:
        msg, raw = base_request(W)
        ok = c.call(proto.MSG_ENCODE, msg, raw=raw)   # the valid form works
        assert ok[1]["cond"].shape == (1, 77, W)

        def variant(f, n_rows=2, slots=((0, 3, 0), (0, 4, 1)), width=W):
            m, r = base_request(width, n_rows, slots)
            out = f(m, r)
            return (m, r) if out is None else out

        # dtype, shape, offsets
        expect(c, *variant(lambda m, r: m["embeds"]["l"].update(dtype="F16", shape=[4, W])), "EDTYPE", '"l"', "F32")
        expect(c, *variant(lambda m, r: m["embeds"]["l"].update(shape=[2 * W])), "ESHAPE", '"embeds"."l"', "2-D")
        expect(c, *variant(lambda m, r: m["embeds"]["l"].update(dtype="Q9")), "EDTYPE", '"embeds"."l"')
        expect(c, *variant(lambda m, r: m["embeds"]["l"].update(shape=[3, W])), "EFORMAT", '"embeds"."l"')
        expect(c, *variant(lambda m, r: (m, r[:-4])), "EPROTO", '"embeds"."l"', "past")
        expect(c, *variant(lambda m, r: m["embeds"]["l"].update(data_offsets=[4, 4 + 2 * W * 4])), "EPROTO",
               '"embeds"."l"')
        expect(c, *variant(lambda m, r: m["embeds"]["l"].update(extra=1)), "EFORMAT", '"embeds"."l"')
        # the width names the encoder and the first slot that uses it
        e = expect(c, *variant(lambda m, r: None, width=W + 64), "EINVAL", '"embeds"."l"', "CLIP-L",
                   "chunk 0 slot 3", str(W + 64), str(W))
        assert "%d wide" % W in e.message
        # indices and slot forms
        expect(c, *variant(lambda m, r: None, slots=((0, 3, 0), (0, 5, 2))), "ETOKENS", '"l" chunk 0 position 5',
               "2 rows")
        for bad in ({"embed": -1}, {"embed": 1.5}, {"embed": "0"}, {"x": 0}, {"embed": 0, "y": 1}, {}):
            m, r = base_request(W)
            m["tokens"]["l"][0][7][0] = bad
            expect(c, m, r, "ETOKENS", '"l" chunk 0 position 7', "embed")
        m, r = base_request(W)
        del m["embeds"]
        expect(c, m, b"", "ETOKENS", '"l" chunk 0 position 3', 'no "embeds"."l"')
        # non-finite values, named by row and column
        for v in (np.nan, np.inf, -np.inf):
            m, r = base_request(W)
            a = np.frombuffer(r, np.float32).copy()
            a[W + 5] = v
            expect(c, m, a.tobytes(), "EINVAL", '"embeds"."l" row 1 column 5', "not finite")
        # the field itself
        m, r = base_request(W)
        m["embeds"] = [1]
        expect(c, m, r, "EINVAL", '"embeds" must be an object')
        m, r = base_request(W)
        m["embeds"]["x"] = m["embeds"]["l"]
        expect(c, m, r, "EINVAL", '"x"', '"l" and "g"')
        m, r = base_request(W)
        del m["tokens"]
        m["text"] = "a cat"
        expect(c, m, r, "EINVAL", '"embeds"', '"text"')
        # unused rows are fine; a chunk of 78 slots still fails as before
        m, r = base_request(W, n_rows=5, slots=((0, 3, 4),))
        assert c.call(proto.MSG_ENCODE, m, raw=r)[1]["cond"].shape == (1, 77, W)
        m, r = base_request(W)
        m["tokens"]["l"][0].append([{"embed": 0}, 1.0])
        expect(c, m, r, "ETOKENS", '"l" chunk 0', "78 pairs")
        # a weight of an embed slot is checked as any weight
        m, r = base_request(W)
        m["tokens"]["l"][0][3][1] = "x"
        expect(c, m, r, "ETOKENS", '"l" chunk 0 position 3', "weight")
        c.ping()
        assert c.encode("sd1.safetensors", tokens=tokens_for([5]))[0].shape == (1, 77, W)


def test_embeds_validation_sdxl(start_lunad, refs):
    d = start_lunad()
    WL, WG = refs["sdxl"]["l"].width, refs["sdxl"]["g"].width
    with d.client(timeout=60) as c:
        tok = tokens_for([12], sdxl=True)
        tok["l"][0][3][0] = {"embed": 0}
        tok["g"][0][3][0] = {"embed": 0}
        ln, gn = WL * 4, WG * 4
        raw = (np.linspace(-0.1, 0.1, WL + WG).astype(np.float32)).tobytes()
        msg = {"model": spec("sdxl"), "tokens": tok, "cache": False,
               "embeds": {"l": {"dtype": "F32", "shape": [1, WL], "data_offsets": [0, ln]},
                          "g": {"dtype": "F32", "shape": [1, WG], "data_offsets": [ln, ln + gn]}}}
        assert c.call(proto.MSG_ENCODE, msg, raw=raw)[1]["cond"].shape == (1, 77, WL + WG)
        # overlapping matrices
        m = json.loads(json.dumps(msg))
        m["embeds"]["g"]["data_offsets"] = [ln - 4, ln - 4 + gn]
        expect(c, m, raw + b"\0" * 4, "EINVAL", '"l"', '"g"', "overlap")
        # G's width is checked against CLIP-G
        m = json.loads(json.dumps(msg))
        m["embeds"]["g"] = {"dtype": "F32", "shape": [1, WL], "data_offsets": [ln, 2 * ln]}
        expect(c, m, raw[:2 * ln], "EINVAL", '"embeds"."g"', "CLIP-G", "chunk 0 slot 3", "%d wide" % WG)
        # each encoder's slots index its own matrix
        m = json.loads(json.dumps(msg))
        m["tokens"]["g"][0][4][0] = {"embed": 1}
        expect(c, m, raw, "ETOKENS", '"g" chunk 0 position 4', '"embeds"."g"')
        c.ping()


def test_client_slot_errors(start_lunad, refs):
    W = refs["sd1"]["l"].width
    tok = tokens_for([12])
    cases = [
        (np.zeros((2, W), np.float32), "1-D"),
        (np.zeros(0, np.float32), "1-D"),
        (np.array([np.nan] * W, np.float32), "value 0"),
        (torch.full((W,), float("inf")), "value 0"),
        (object(), "neither a token id"),
        (["a"] * W, "neither a token id"),
    ]
    for bad, words in cases:
        t = json.loads(json.dumps(tok))
        t["l"][0][6][0] = bad
        with pytest.raises(LunaError) as e:
            prepare_tokens(t)
        assert e.value.name == "EINVAL" and 'tokens "l" chunk 0 slot 6' in e.value.message, e.value.message
        assert words in e.value.message, e.value.message
    # two widths in one encoder: named by both slots
    t = json.loads(json.dumps(tok))
    t["l"][0][2][0] = np.zeros(W, np.float32)
    t["l"][0][9][0] = np.zeros(W + 1, np.float32)
    with pytest.raises(LunaError) as e:
        prepare_tokens(t)
    assert e.value.name == "EINVAL" and "chunk 0 slot 9" in e.value.message and "chunk 0 slot 2" in e.value.message
    # ids of every integer kind stay ids; equal vectors share a row; triples keep the word id
    t = json.loads(json.dumps(tok))
    t["l"][0][1] = (np.int64(320), 1.0)
    v = np.linspace(0, 1, W, dtype=np.float16)
    t["l"][0][2] = (v, 1.5, 3)
    t["l"][0][3] = [torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16), 1.0]
    t["l"][0][4] = [v.astype(np.float64).tolist(), 1.0]
    out, desc, raw = prepare_tokens(t)
    assert out["l"][0][1] == [320, 1.0] and out["l"][0][2] == [{"embed": 0}, 1.5, 3]
    assert desc == {"l": {"dtype": "F32", "shape": [2, W], "data_offsets": [0, 2 * 4 * W]}}
    assert out["l"][0][3][0] == {"embed": 1} and out["l"][0][4][0] == {"embed": 0}
    assert np.array_equal(np.frombuffer(raw, np.float32)[:W], v.astype(np.float32))
    # through a daemon: the client's error comes before anything is sent
    d = start_lunad()
    with d.client(timeout=60) as c:
        t = json.loads(json.dumps(tok))
        t["l"][1 - 1][6][0] = np.zeros((2, W), np.float32)
        with pytest.raises(LunaError) as e:
            c.encode("sd1.safetensors", tokens=t)
        assert e.value.name == "EINVAL"
        # a vector of the wrong width reaches lunad, which names the encoder
        t = json.loads(json.dumps(tok))
        t["l"][0][6][0] = np.zeros(W - 8, np.float32)
        with pytest.raises(LunaError) as e:
            c.encode("sd1.safetensors", tokens=t)
        assert e.value.name == "EINVAL" and "CLIP-L" in e.value.message and "chunk 0 slot 6" in e.value.message
        assert c.status()["requests"]["failed"] == 1
        c.ping()
    assert BOS and EOS
