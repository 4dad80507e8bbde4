"""test_tokenizer.py -- 'luna tokenize' against the independent Python model (ref_tokenizer).

Every prompt of prompts.txt (one per line, taken literally) and prompts.jsonl (one JSON
string per line, for prompts with newlines, control or format characters) is tokenized
by luna for SD1 and SDXL and must give exactly the ids and weights ref_tokenizer gives
(weights compared bit for bit; NaN equals NaN).

Run from anywhere; the repository root is found from this file, the luna binary is
$LUNA_BUILD/luna (LUNA_BUILD defaults to "build", relative to the root). The vocabulary
is ../shared/clip-tokenizer beside the checkout. LUNA_TOKENIZER_EXHAUSTIVE=1 adds a
check of every assigned code point (about a minute).
"""

import ctypes
import ctypes.util
import json
import math
import os
import struct
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import ref_tokenizer  # noqa: E402

VOCAB_DIR = ROOT.parent / "shared" / "clip-tokenizer"


def luna_path():
    build = Path(os.environ.get("LUNA_BUILD", "build"))
    if not build.is_absolute():
        build = ROOT / build
    return build / "luna"


def load_prompts():
    out = []
    with open(HERE / "prompts.txt", encoding="utf-8", newline="\n") as f:
        for i, line in enumerate(f.read().split("\n")[:-1]):
            out.append(pytest.param(line, id="txt%03d" % (i + 1)))
    with open(HERE / "prompts.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            out.append(pytest.param(json.loads(line), id="jsonl%02d" % (i + 1)))
    return out


PROMPTS = load_prompts()


@pytest.fixture(scope="module")
def bpe():
    if not (VOCAB_DIR / "vocab.json").exists():
        pytest.skip("no CLIP vocabulary at %s" % VOCAB_DIR)
    return ref_tokenizer.ClipBPE(str(VOCAB_DIR))


@pytest.fixture(scope="module")
def luna():
    exe = luna_path()
    if not os.access(exe, os.X_OK):
        pytest.fail("luna binary not found at %s (run make, or set LUNA_BUILD)" % exe)
    return exe


def run_tokenize(exe, text, family="sd1", tokenizer=None):
    args = [str(exe), "tokenize", "--tokenizer", str(tokenizer or VOCAB_DIR), "--text", text,
            "--family", family]
    return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, timeout=120)


def same_weight(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return struct.pack("<d", float(a)) == struct.pack("<d", float(b))


def compare(got, want, text):
    assert sorted(got) == sorted(want), "keys differ for %r" % text
    for key in want:
        g, w = got[key], want[key]
        assert len(g) == len(w), "%r: %s has %d chunks, want %d" % (text, key, len(g), len(w))
        for ci, (gc, wc) in enumerate(zip(g, w)):
            assert len(gc) == 77, "%r: %s chunk %d has %d pairs" % (text, key, ci, len(gc))
            gid = [p[0] for p in gc]
            wid = [p[0] for p in wc]
            assert gid == wid, "%r: %s chunk %d ids\n got %s\nwant %s" % (text, key, ci, gid, wid)
            for pi, (gp, wp) in enumerate(zip(gc, wc)):
                assert len(gp) == 2
                assert same_weight(gp[1], wp[1]), "%r: %s chunk %d position %d weight %r, want %r" % (
                    text, key, ci, pi, gp[1], wp[1])


def check_prompt(luna, bpe, text, family):
    r = run_tokenize(luna, text, family)
    assert r.returncode == 0, "luna failed on %r: %s" % (text, r.stderr.decode(errors="replace"))
    assert r.stdout.endswith(b"\n")
    got = json.loads(r.stdout)
    want = ref_tokenizer.tokenize_family(bpe, text, family)
    compare(got, want, text)


def test_corpus_size():
    assert len(PROMPTS) >= 250


@pytest.mark.parametrize("text", PROMPTS)
def test_prompt_sd1(luna, bpe, text):
    check_prompt(luna, bpe, text, "sd1")


@pytest.mark.parametrize("text", PROMPTS)
def test_prompt_sdxl(luna, bpe, text):
    check_prompt(luna, bpe, text, "sdxl")


def test_known_ids(luna):
    """A fixed point that does not depend on ref_tokenizer."""
    r = run_tokenize(luna, "a photo of a cat")
    assert r.returncode == 0
    l0 = json.loads(r.stdout)["l"][0]
    assert [p[0] for p in l0[:7]] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert all(p == [49407, 1.0] for p in l0[7:])


def test_sdxl_pads_g_with_zero(luna):
    r = run_tokenize(luna, "(cat:1.2)", "sdxl")
    out = json.loads(r.stdout)
    assert [p[0] for p in out["g"][0][:4]] == [49406, 2368, 49407, 0]
    assert out["g"][0][1][1] == 1.2 and out["l"][0][1][1] == 1.2
    assert [p[0] for p in out["l"][0][:4]] == [49406, 2368, 49407, 49407]


@pytest.mark.parametrize("raw", [b"\xff", b"abc\xc3", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                 b"ok (fine:1.2) \xe2\x82"])
def test_invalid_utf8(luna, raw):
    args = [bytes(str(luna), "utf-8"), b"tokenize", b"--tokenizer", bytes(str(VOCAB_DIR), "utf-8"),
            b"--text", raw]
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, timeout=60)
    err = r.stderr.decode(errors="replace")
    assert r.returncode > 0, "exit %d (a signal if negative)" % r.returncode
    assert "AddressSanitizer" not in err and "runtime error" not in err
    assert "UTF-8" in err and "byte" in err
    assert r.stdout == b""


def test_usage_errors(luna):
    def run(*a):
        return subprocess.run([str(luna), "tokenize"] + list(a), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=ROOT, timeout=60)
    assert run().returncode == 2
    assert run("--text", "x").returncode == 2
    assert run("--tokenizer", str(VOCAB_DIR)).returncode == 2
    assert run("--tokenizer", str(VOCAB_DIR), "--text", "x", "--family", "sd3").returncode == 2
    assert run("--tokenizer", str(VOCAB_DIR), "--text", "x", "--bogus").returncode == 2
    assert run("--tokenizer", str(VOCAB_DIR), "--text").returncode == 2
    h = run("--help")
    assert h.returncode == 0 and b"--tokenizer" in h.stdout and b"--family" in h.stdout


def test_bad_tokenizer_folder(luna, tmp_path):
    r = run_tokenize(luna, "x", tokenizer=tmp_path)
    assert r.returncode == 1
    assert b"vocab.json" in r.stderr
    (tmp_path / "vocab.json").write_text('{"a": 1,\n "b": }\n')
    r = run_tokenize(luna, "x", tokenizer=tmp_path)
    assert r.returncode == 1 and b"vocab.json:2:" in r.stderr


# ---- every code point, in a few contexts ----

def utf8proc_category():
    """utf8proc's category number for a code point (0 = unassigned), or None."""
    name = ctypes.util.find_library("utf8proc")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.utf8proc_category.restype = ctypes.c_int
    lib.utf8proc_category.argtypes = [ctypes.c_int32]
    return lib.utf8proc_category


def comparable_code_points(step):
    """Assigned code points on which Python's unicodedata and utf8proc agree about being
    assigned (their Unicode versions may differ), without NUL and the weight syntax."""
    cat = utf8proc_category()
    out = []
    for cp in range(1, 0x110000, step):
        if 0xD800 <= cp <= 0xDFFF or cp in (0x28, 0x29, 0x5C):
            continue
        py_unassigned = unicodedata.category(chr(cp)) == "Cn"
        if py_unassigned:
            continue
        if cat is not None and cat(cp) == 0:
            continue
        out.append(cp)
    return out


CONTEXTS = [lambda c: c, lambda c: "a" + c + "b", lambda c: "A\u03a3" + c, lambda c: "A" + c + "\u03a3",
            lambda c: "1" + c + "'s!"]


def luna_ids(exe, text):
    r = run_tokenize(exe, text)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return [p[0] for ch in json.loads(r.stdout)["l"] for p in ch]


def ref_ids(bpe, text):
    return [p[0] for ch in ref_tokenizer.tokenize_prompt(bpe, text, ref_tokenizer.EOS_ID) for p in ch]


def code_point_sweep(luna, bpe, step, contexts):
    """Words of one code point in a context, a few thousand to a prompt; on a mismatch
    the batch is retried code point by code point to name the culprits."""
    cps = comparable_code_points(step)
    batch = 3000
    for ctx in contexts:
        for i in range(0, len(cps), batch):
            part = cps[i:i + batch]
            text = " ".join(ctx(chr(c)) for c in part)
            if luna_ids(luna, text) == ref_ids(bpe, text):
                continue
            bad = [c for c in part if luna_ids(luna, ctx(chr(c))) != ref_ids(bpe, ctx(chr(c)))]
            pytest.fail("code points tokenized differently in context %r: %s" % (
                ctx("X"), ", ".join("U+%04X" % c for c in bad[:20])))


def test_code_point_sample(luna, bpe):
    code_point_sweep(luna, bpe, 13, CONTEXTS[:3])


@pytest.mark.skipif(os.environ.get("LUNA_TOKENIZER_EXHAUSTIVE") != "1",
                    reason="set LUNA_TOKENIZER_EXHAUSTIVE=1 for every code point")
def test_every_code_point(luna, bpe):
    code_point_sweep(luna, bpe, 1, CONTEXTS)
