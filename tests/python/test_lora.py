"""test_lora.py -- per-request LoRA stacks through a real lunad, in every --lora-mode.

1. every format (kohya, diffusers, PEFT, generic, DoRA on both axes, LoHa, LoKr) alone
   and in stacks of 2-3 with strengths 0, negative and above 1, on SD1 and SDXL: each
   mode's result equals an independent PyTorch reference that merges the weights as
   NUMERICS.md section 7 says (ref_lora.py), stays within 1e-3 of ComfyUI's normal
   (fp16-rounded) merge, and the modes and `luna encode --local` agree with each other;
   the shared weights are then bit-identical to the file;
2. isolation: 32 concurrent clients with different stacks (some none), hundreds of
   requests in random order, two workers: every reply equals that request's result when
   run alone; the base weights' CRC equals the file's;
3. failure: unknown LoRAs (ENOLORA with "missing"), truncated and lying uploads, an
   identity that does not match, a LoRA for another model, a client killed mid-request,
   a LoRA evicted while requests for it wait -- clear errors, and the others unharmed;
4. the cache: LRU within --lora-cache-mem, pins, list/evict, --loras-dir loading,
   counters in status; unmapped keys reported, UNet keys ignored.
"""

import json
import os
import random
import socket
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

import make_loras
import make_models
import ref_clip
import ref_lora
import st_io
from conftest import tokens_for
from conftest_daemon import daemon_models, start_lunad  # noqa: F401
from daemon import Lunad, LunaError, is_san, proto, read_frame
from lunaclient import Client

SAN = is_san()
MODES = ("lock", "functional", "auto")
REF_TOL = 1e-4     # against the PyTorch reference (NUMERICS 7.5)
MODE_TOL = 1e-5    # between modes

FAMILIES = {
    "sd1": ("sd1", dict(width=128, layers=4)),
    "sdxl": ("sdxl", dict(width=128, layers=4, l_width=64, l_layers=3)),
}

# name -> (make_loras format, options)
FORMATS = {
    "kohya": ("kohya", {}),
    "diffusers": ("diffusers", {}),
    "peft": ("peft", {}),
    "generic": ("generic", {}),
    "dora": ("dora", dict(dora_axis="out")),
    "dora_in": ("dora", dict(dora_axis="in")),
    "loha": ("loha", {}),
    "lokr": ("lokr", {}),
    "lokr_w1": ("lokr", dict(lokr_variant="w1")),
}

STACKS = [[(f, 1.0)] for f in FORMATS] + [
    [("kohya", 0.8), ("loha", -0.6)],
    [("peft", 1.7), ("dora", 0.0), ("lokr", 0.5)],
    [("dora_in", 1.0), ("generic", 1.2), ("kohya", -1.0)],
    [("kohya", 0.0)],
]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def family_sizes(family):
    layout, sizes = FAMILIES[family]
    return layout, sizes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Models and LoRA files for both families, in one folder."""
    d = tmp_path_factory.mktemp("lora-world")
    files = {}
    for family, (layout, sizes) in FAMILIES.items():
        make_models.write_model(str(d / ("%s.safetensors" % family)), layout, "F16", 0, **sizes)
        for i, (name, (fmt, opts)) in enumerate(FORMATS.items()):
            p = d / ("%s-%s.safetensors" % (family, name))
            make_loras.write_lora(str(p), fmt, family, rank=4, seed=10 + i, model_seed=0, **sizes, **opts)
            files[family, name] = p
        p = d / ("%s-proj.safetensors" % family)
        make_loras.write_lora(str(p), "kohya", family, rank=4, seed=40, projection=True, **sizes)
        files[family, "proj"] = p
    return d, files


def stacks_for(family):
    out = list(STACKS)
    if family == "sdxl":
        out.append([("proj", 1.0), ("kohya", 0.5)])
    return out


def file_stack(files, family, stack):
    return [(str(files[family, name]), s) for name, s in stack]


def reference(d, files, family, stack, tokens, comfy_rounded=False):
    """The PyTorch reference: luna's rule (unrounded fp32 merge), or with comfy_rounded
    ComfyUI's normal path, which rounds each merged weight back to fp16 once."""
    enc = ref_clip.load([str(d / ("%s.safetensors" % family))])
    merged = ref_lora.apply_stack(enc, file_stack(files, family, stack), family)
    if comfy_rounded:
        for e in merged.values():
            if e is not None:
                e.w = {k: (v.half().float() if v.dim() == 2 else v) for k, v in e.w.items()}
    return ref_clip.encode_loaded(merged, tokens)


def file_checksums(path):
    """What lunad's models verify must report for an F16 file: the CRC-32 of each
    encoder's q, k, v, out, fc1, fc2 per layer (fp16 bytes, Linear layout), then the
    projection in Linear form (the OpenCLIP x @ P matrix transposed)."""
    hdr, _, start = st_io.read_header(path)
    data = Path(path).read_bytes()

    def raw(name):
        o = hdr[name]["data_offsets"]
        return data[start + o[0]:start + o[1]]

    out = {}
    hf = [("l", p) for p in ("cond_stage_model.transformer.text_model.",
                             "conditioner.embedders.0.transformer.text_model.", "text_model.")]
    for kind, prefix in hf:
        if prefix + "encoder.layers.0.mlp.fc1.weight" not in hdr:
            continue
        crc, b = 0, 0
        while prefix + "encoder.layers.%d.mlp.fc1.weight" % b in hdr:
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                      "mlp.fc1", "mlp.fc2"):
                crc = zlib.crc32(raw(prefix + "encoder.layers.%d.%s.weight" % (b, m)), crc)
            b += 1
        out[kind] = crc
        break
    g = "conditioner.embedders.1.model."
    if g + "token_embedding.weight" in hdr:
        crc, b = 0, 0
        while g + "transformer.resblocks.%d.ln_1.weight" % b in hdr:
            r = g + "transformer.resblocks.%d." % b
            for n in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
                crc = zlib.crc32(raw(r + n), crc)
            b += 1
        p = st_io.read(path, {g + "text_projection"})[0][g + "text_projection"]
        crc = zlib.crc32(np.ascontiguousarray(p.T.astype(np.float16)).tobytes(), crc)
        out["g"] = crc
    return out


def assert_base_intact(client, d, family, model):
    got = client.models("verify", model)["weights_crc32"]
    want = file_checksums(str(d / ("%s.safetensors" % family)))
    assert got == want, "the shared weights changed: lunad %r, file %r" % (got, want)


# ---- 1. every mode equals the reference ------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_mode_equals_reference_and_each_other(family, world, start_lunad, run_luna):
    d, files = world
    sdxl = family == "sdxl"
    tokens = tokens_for([17, 75], weights=[1.2, 0.6], seed=5, sdxl=sdxl)
    model = "%s.safetensors" % family
    base_cond, _ = ref_clip.encode_loaded(ref_clip.load([str(d / model)]), tokens)
    results = {}
    for mode in MODES:
        lunad = start_lunad("--lora-mode", mode, "--cache-mem", "0", models=[d])
        with Client.unix(str(lunad.socket)) as c:
            base_luna, _, _ = c.encode(model, tokens=tokens)
            for si, stack in enumerate(stacks_for(family)):
                cond, pooled, info = c.encode(model, tokens=tokens, loras=file_stack(files, family, stack))
                rc, rp = reference(d, files, family, stack, tokens)
                what = "%s %s stack %s" % (family, mode, stack)
                assert rel(cond, rc) <= REF_TOL, "%s: cond off by %.3g" % (what, rel(cond, rc))
                assert rel(pooled, rp) <= REF_TOL, "%s: pooled off by %.3g" % (what, rel(pooled, rp))
                if mode == "lock":
                    # ComfyUI's normal path rounds the merged weights to fp16: within 1e-3 (7.5)
                    cc, cp = reference(d, files, family, stack, tokens, comfy_rounded=True)
                    assert rel(cond, cc) <= 1e-3 and rel(pooled, cp) <= 1e-3, what
                lora = info["lora"]
                assert lora["unmapped"] == 0 and lora["unmapped_keys"] == []
                assert lora["mode"] == {"lock": "lock", "functional": "functional"}.get(mode, lora["mode"])
                assert lora["mode"] in ("lock", "functional", "merged")
                if any(s != 0 for _, s in stack):
                    assert lora["patched"] > 0
                    # the LoRA must matter: otherwise the comparison proves nothing
                    assert rel(cond, base_cond) > 1e-3, "%s changed nothing" % what
                else:
                    assert lora["patched"] == 0 and np.array_equal(cond, base_luna)
                results[mode, si] = (cond, pooled)
            st = c.status()["lora"]
            if mode == "lock":
                assert st["merges"] >= 1 and st["restores"] >= 1 and st["requests"]["lock"] >= len(STACKS)
            if mode == "functional":
                assert st["merges"] == 0 and st["requests"]["functional"] >= len(STACKS)
            assert_base_intact(c, d, family, model)
    for si in range(len(stacks_for(family))):
        for mode in MODES[1:]:
            for k in (0, 1):
                assert rel(results[mode, si][k], results["lock", si][k]) <= MODE_TOL, (mode, si, k)
    # the CLI's --local path (functional) on two stacks
    tok_file = d / ("tokens-%s.json" % family)
    tok_file.write_text(json.dumps(tokens))
    for si in (len(FORMATS), len(FORMATS) + 1):
        out = d / ("local-%s-%d.safetensors" % (family, si))
        args = ["encode", "--local", "--model", d / model, "--tokens", tok_file, "--out", out]
        for name, s in stacks_for(family)[si]:
            args += ["--lora", "%s:%r" % (files[family, name], s)]
        r = run_luna(*args)
        assert r.returncode == 0, r.stderr
        t, _ = st_io.read(str(out))
        assert rel(t["cond"], results["lock", si][0]) <= MODE_TOL
        assert rel(t["pooled"], results["lock", si][1]) <= MODE_TOL


# ---- 2. isolation under concurrency ----------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_isolation_under_stress(mode, tmp_path, start_lunad):
    d = tmp_path
    sizes = dict(width=64, layers=2)
    make_models.write_model(str(d / "m.safetensors"), "sd1", "F16", 0, **sizes)
    pool = []
    for i, fmt in enumerate(["kohya", "loha", "dora", "lokr", "peft", "kohya", "kohya", "diffusers"]):
        p = d / ("l%d.safetensors" % i)
        make_loras.write_lora(str(p), fmt, "sd1", rank=4, seed=100 + i, model_seed=0, magnitude=0.1, **sizes)
        pool.append(str(p))
    rng = random.Random(7)
    n_clients = 32 if not SAN else 16
    per_client = 8 if not SAN else 4
    shared = [(pool[0], 1.0), (pool[2], 0.5)]  # several clients on one stack: auto merges it
    stacks = []
    for i in range(n_clients):
        if i % 8 == 0:
            stacks.append([])
        elif i % 4 == 1:
            stacks.append(list(shared))
        else:
            k = rng.randint(1, 3)
            stacks.append([(p, round(rng.uniform(-1.5, 2.0), 2)) for p in rng.sample(pool, k)])
    prompts = [tokens_for([rng.randint(3, 60)], weights=[1.1, 0.9] if j % 2 else None, seed=50 + j)
               for j in range(4)]
    lunad = start_lunad("--lora-mode", mode, "--cache-mem", "0", "--workers", "2", "--threads", "1",
                        models=[d])
    # each (stack, prompt) alone, one at a time
    expected = {}
    with Client.unix(str(lunad.socket)) as c:
        for i, st in enumerate(stacks):
            for j, tok in enumerate(prompts):
                key = (tuple(st), j)
                if key not in expected:
                    cond, pooled, _ = c.encode("m.safetensors", tokens=tok, loras=st)
                    expected[key] = (cond, pooled)
    work = [(i, j) for i in range(n_clients) for j in [rng.randrange(len(prompts)) for _ in range(per_client)]]
    rng.shuffle(work)
    by_client = {i: [j for (ci, j) in work if ci == i] for i in range(n_clients)}
    failures = []
    barrier = threading.Barrier(n_clients)

    def client(i):
        try:
            with Client.unix(str(lunad.socket)) as c:
                barrier.wait(timeout=60)
                # pipeline: everything sent before the first reply is read
                rids = {}
                for j in by_client[i]:
                    msg = c.encode_request("m.safetensors", tokens=prompts[j], loras=stacks[i])
                    rids[c.send(proto.MSG_ENCODE, msg)] = j
                for _ in range(len(rids)):
                    rid, flags, reply, tensors = c.recv()
                    if flags & proto.FLAG_ERROR:
                        failures.append((i, reply))
                        continue
                    j = rids[rid]
                    want = expected[tuple(stacks[i]), j]
                    got = (tensors["cond"], tensors["pooled"])
                    tol = MODE_TOL if mode == "auto" else 0.0
                    for k in (0, 1):
                        if rel(got[k], want[k]) > tol:
                            failures.append((i, j, k, rel(got[k], want[k])))
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append((i, repr(e)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not failures, failures[:5]
    with Client.unix(str(lunad.socket)) as c:
        st = c.status()
        used = {p for stck in stacks for p, _ in stck}
        # the only failures: the first sight of each LoRA (ENOLORA, then the upload)
        assert st["requests"]["failed"] <= len(used) and st["lora"]["cache"]["uploads"] == len(used)
        lora = st["lora"]
        n_lora = sum(len(by_client[i]) for i in range(n_clients) if stacks[i]) + \
            sum(1 for (st_, j) in expected if st_)
        assert sum(lora["requests"].values()) == n_lora, lora
        if mode == "lock":
            assert lora["requests"]["lock"] == n_lora and lora["merges"] >= 2
        elif mode == "functional":
            assert lora["requests"]["functional"] == n_lora and lora["merges"] == 0
        else:
            assert lora["requests"]["merged"] > 0, "auto never merged the shared stack"
            assert lora["requests"]["functional"] > 0
        assert_base_intact(c, d, "m", "m.safetensors")


# ---- 3. failures ------------------------------------------------------------------------

def raw_call(sock_path, type_, msg, binary=b"", rid=1):
    body = json.dumps(msg).encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.sendall(struct.pack("<4sHHIIQQ", b"LUNA", 1, type_, 0, len(body), rid, len(binary)) + body + binary)
    h, reply, _ = read_frame(s)
    s.close()
    return h, reply


def test_unknown_lora_bad_uploads_and_wrong_model(world, start_lunad):
    d, files = world
    lunad = start_lunad(models=[d])
    sock = str(lunad.socket)
    tokens = tokens_for([9], seed=1)
    good = files["sd1", "kohya"]
    ident = ref_lora.lora_identity(str(good))
    # an unknown identity: ENOLORA naming it
    h, r = raw_call(sock, proto.MSG_ENCODE, {"model": "sd1.safetensors", "tokens": tokens,
                                              "loras": [{"id": ident, "strength": 1.0}]})
    assert h.flags & proto.FLAG_ERROR and r["name"] == "ENOLORA" and r["missing"] == [ident], r
    # malformed stack entries
    for bad, field in (([{"id": "zz", "strength": 1}], "id"), ([{"id": ident, "strength": "x"}], "strength"),
                       ({"id": ident}, "loras"), ([{"id": ident, "strength": 1}] * 17, "at most")):
        h, r = raw_call(sock, proto.MSG_ENCODE, {"model": "sd1.safetensors", "tokens": tokens, "loras": bad})
        assert r["name"] == "EINVAL" and field in r["message"], r
    image = Path(good).read_bytes()
    # truncated upload
    h, r = raw_call(sock, proto.MSG_LORA, {"action": "upload", "id": ident}, image[:len(image) // 2])
    assert h.flags & proto.FLAG_ERROR and r["name"] == "EFORMAT", r
    # a header that lies about a shape: the byte range no longer matches
    hdr, _, start = st_io.read_header(str(good))
    name = sorted(k for k in hdr if k.endswith("lora_down.weight"))[0]
    hdr[name]["shape"] = [hdr[name]["shape"][0], hdr[name]["shape"][1] * 2]
    body = json.dumps(hdr).encode()
    body += b" " * (-len(body) % 8)
    liar = struct.pack("<Q", len(body)) + body + image[start:]
    h, r = raw_call(sock, proto.MSG_LORA, {"action": "upload", "id": ident}, liar)
    assert h.flags & proto.FLAG_ERROR and r["name"] == "EFORMAT" and name in r["message"], r
    # an identity that is not the content's
    h, r = raw_call(sock, proto.MSG_LORA, {"action": "upload", "id": "0" * 64}, image)
    assert r["name"] == "EINVAL" and ident in r["message"], r
    # a LoRA made for another width: ESHAPE naming the tensor
    other = d / "other-width.safetensors"
    make_loras.write_lora(str(other), "kohya", "sd1", width=64, layers=2, rank=4, seed=3)
    with Client.unix(sock) as c:
        with pytest.raises(LunaError) as e:
            c.encode("sd1.safetensors", tokens=tokens, loras=[(str(other), 1.0)])
        assert e.value.name == "ESHAPE" and "lora_te_text_model_encoder_layers_0" in e.value.message
        # the daemon still answers correctly, LoRA or not
        cond, _, info = c.encode("sd1.safetensors", tokens=tokens, loras=[(str(good), 1.0)])
        rc, _ = reference(d, files, "sd1", [("kohya", 1.0)], tokens)
        assert rel(cond, rc) <= REF_TOL
        up = c.lora_upload(str(good))
        assert up["id"] == ident and up["cached"] and up["patches"] == 24
        assert c.status()["requests"]["failed"] >= 5


def test_killed_client_and_eviction_while_queued(world, start_lunad, daemon_models):
    d, files = world
    lunad = start_lunad("--cache-mem", "0", models=[d, daemon_models])
    sock = str(lunad.socket)
    good = str(files["sd1", "kohya"])
    ident = ref_lora.lora_identity(good)
    tokens = tokens_for([30], seed=2)
    with Client.unix(sock) as c:
        c.lora_upload(good)
        # a client that sends work on the slow model and vanishes
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock)
        slow = {"model": "slow.safetensors", "tokens": tokens_for([60, 60, 60], seed=3)}
        for rid in range(4):
            body = json.dumps(dict(slow, loras=[{"id": ident, "strength": 1.0}]) if rid % 2 else slow).encode()
            s.sendall(struct.pack("<4sHHIIQQ", b"LUNA", 1, proto.MSG_ENCODE, 0, len(body), rid, 0) + body)
        s.close()
        # requests for the LoRA queue behind the slow work; the LoRA is evicted meanwhile
        q = Client.unix(sock)
        msg = q.encode_request("sd1.safetensors", tokens=tokens, loras=[(good, 1.0)], cache=False)
        rids = [q.send(proto.MSG_ENCODE, msg) for _ in range(3)]
        ev = c.lora_evict(ident)
        assert ev["evicted"] is True and isinstance(ev["deferred"], bool)
        outcomes = []
        for _ in rids:
            rid, flags, reply, tensors = q.recv()
            outcomes.append(reply.get("name") if flags & proto.FLAG_ERROR else "ok")
            if flags & proto.FLAG_ERROR:
                assert reply["name"] == "ENOLORA" and reply["missing"] == [ident], reply
        q.close()
        assert "ENOLORA" in outcomes, outcomes
        # the client library uploads again and gets the right answer
        cond, _, _ = c.encode("sd1.safetensors", tokens=tokens, loras=[(good, 1.0)])
        rc, _ = reference(d, files, "sd1", [("kohya", 1.0)], tokens)
        assert rel(cond, rc) <= REF_TOL
        assert lunad.alive()
        assert_base_intact(c, d, "sd1", "sd1.safetensors")


# ---- 4. cache and reports ---------------------------------------------------------------

def test_cache_budget_pins_list_and_loras_dir(world, start_lunad, tmp_path):
    d, files = world
    names = ["kohya", "loha", "peft"]
    probe = start_lunad(models=[d])
    with Client.unix(str(probe.socket)) as c:
        sizes = [c.lora_upload(str(files["sd1", n]))["bytes"] for n in names]
    probe.stop()
    budget = sizes[0] + sizes[1] + sizes[2] // 2  # room for two of the three
    loras_dir = tmp_path / "loras"
    loras_dir.mkdir()
    (loras_dir / "style.safetensors").write_bytes(Path(files["sd1", "dora"]).read_bytes())
    lunad = start_lunad("--lora-cache-mem", str(budget), "--loras-dir", loras_dir, models=[d])
    tokens = tokens_for([12], seed=4)
    with Client.unix(str(lunad.socket)) as c:
        ids = [c.lora_upload(str(files["sd1", n]))["id"] for n in names[:2]]
        assert c.lora_pin(ids[0])["pinned"] is True
        ids.append(c.lora_upload(str(files["sd1", names[2]]))["id"])
        listed = {e["id"]: e for e in c.lora_list()["loras"]}
        assert ids[0] in listed and listed[ids[0]]["pinned"] is True, "a pinned entry was evicted"
        assert ids[1] not in listed, "the least recently used idle entry stays above the budget"
        assert ids[2] in listed
        assert c.lora_list()["used_bytes"] <= budget
        st = c.status()["lora"]["cache"]
        assert st["uploads"] == 3 and st["evictions"] >= 1 and st["entries"] == 2
        # unpin, evict, unknown ids
        assert c.lora_unpin(ids[0])["pinned"] is False
        assert c.lora_evict(ids[0]) == {"evicted": True, "deferred": False}
        with pytest.raises(LunaError) as e:
            c.lora_evict(ids[0])
        assert e.value.name == "ENOTFOUND"
        # a stack entry with a path under --loras-dir loads without an upload
        dora_id = ref_lora.lora_identity(str(files["sd1", "dora"]))
        msg = {"model": "sd1.safetensors", "tokens": tokens,
               "loras": [{"id": dora_id, "strength": 0.9, "path": "style.safetensors"}]}
        reply, tensors = c.call(proto.MSG_ENCODE, msg)
        rc, _ = reference(d, files, "sd1", [("dora", 0.9)], tokens)
        assert rel(tensors["cond"], rc) <= REF_TOL
        assert c.status()["lora"]["cache"]["loads"] == 1
        # a path whose content is another LoRA is not used: the client must upload
        msg["loras"][0]["id"] = ids[1]
        with pytest.raises(LunaError) as e:
            c.call(proto.MSG_ENCODE, msg)
        assert e.value.name == "ENOLORA"
        # paths outside --loras-dir are refused
        msg["loras"][0]["path"] = "../x.safetensors"
        with pytest.raises(LunaError) as e:
            c.call(proto.MSG_ENCODE, msg)
        assert e.value.name == "EACCES"
        # a hit adds nothing: the stack is part of the result-cache key
        cond1, _, i1 = c.encode("sd1.safetensors", tokens=tokens, loras=[(str(files["sd1", "kohya"]), 1.0)])
        cond2, _, i2 = c.encode("sd1.safetensors", tokens=tokens, loras=[(str(files["sd1", "kohya"]), 0.5)])
        cond3, _, i3 = c.encode("sd1.safetensors", tokens=tokens)
        assert rel(cond1, cond2) > 1e-4 and rel(cond1, cond3) > 1e-4 and not i3["cached"]


def test_unmapped_keys_are_reported(world, start_lunad, tmp_path):
    d, files = world
    bogus = tmp_path / "bogus.safetensors"
    make_loras.write_lora(str(bogus), "kohya", "sd1", rank=4, seed=8, bogus=2, unet=True, width=128, layers=4)
    _, unmapped = ref_lora.report(str(bogus), "sd1")
    lunad = start_lunad(models=[d])
    tokens = tokens_for([12], seed=4)
    with Client.unix(str(lunad.socket)) as c:
        _, _, info = c.encode("sd1.safetensors", tokens=tokens, loras=[(str(bogus), 1.0)])
        assert info["lora"]["unmapped"] == len(unmapped) == 4
        assert info["lora"]["unmapped_keys"] == sorted(unmapped)[:3]
        assert not any("unet" in k for k in info["lora"]["unmapped_keys"])
        # an SDXL LoRA for CLIP-G only on an SD1 model: its lora_te2_ keys have no target
        g_only = tmp_path / "g-only.safetensors"
        make_loras.write_lora(str(g_only), "kohya", "sdxl", rank=4, seed=9, encoders=("g",), width=128, layers=4)
        _, _, info = c.encode("sd1.safetensors", tokens=tokens, loras=[(str(g_only), 1.0)])
        assert info["lora"]["unmapped"] == 4 * 6 * 2 and info["lora"]["patched"] == 0
        assert all(k.startswith("lora_te2_") for k in info["lora"]["unmapped_keys"])
