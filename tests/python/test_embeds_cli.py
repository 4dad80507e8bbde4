"""test_embeds_cli.py -- textual-inversion embeddings in `luna encode --embeds` and the C client library.

`luna encode --tokens T.json --embeds E.safetensors`: slots {"embed": i} of T's "l" and
"g" chunks take row i of E's tensors "l" and "g" as their input embeddings, through
lunad (the C library sends "embeds" and the binary part) and with --local (which
builds the request lunad builds). Checked here, with the models, vectors and the
PyTorch reference of test_embeds.py:

1. SD1 and SDXL, a 3-vector embedding spanning several slots, a single one in the
   second chunk, a row used twice, weights != 1: lunad and --local agree bit for bit,
   equal the Python client's result for the same vectors bit for bit, and match the
   reference (test_embeds.TOL); F16 and BF16 files give exactly their F32 values;
2. bad input, through lunad and --local: a slot index past the rows, a wrong width, a
   missing tensor, another tensor, dtype or shape, NaN in the file, --embeds without
   --tokens, slots without --embeds: exit 1 (2 for usage) with a message naming the
   file, the tensor and the slot;
3. a C program that knows only include/luna.h: luna_client_encode with embeds_l and
   embeds_g against a real lunad equals the Python client's result, and bad embeds
   fail with LUNA_EINVAL naming the field before anything is sent.
"""

import json
import subprocess

import numpy as np
import pytest

import ref_clip
import st_io
from c_program import build_c_program
from conftest import tokens_for
from conftest_daemon import daemon_models, raw_tensors, start_lunad  # noqa: F401
from daemon import SLOW, proto
from test_embeds import MODELS, TOL, refs, rel, spec, vectors  # noqa: F401

# (chunk, first slot, rows, weight): an embedding of rows 0-2 over three slots of chunk 0,
# row 3 alone in chunk 1, and row 1 again (a row may serve several slots)
SLOTS = [(0, 5, [0, 1, 2], 1.2), (1, 10, [3], None), (1, 14, [1], 0.8)]
N_ROWS = 4


def case(encs, family, seed=0, slots=SLOTS):
    """(tokens with {"embed": i} slots, {key: [N_ROWS, W] float32 vectors}, tokens with
    the vectors themselves in those slots: for the reference and the Python client)."""
    tok = tokens_for([30, 20], [1.1, 0.8], seed=seed, sdxl=family == "sdxl")
    mats = {key: vectors(encs[key], N_ROWS, seed * 10 + (key == "g")) for key in tok}
    with_vecs = json.loads(json.dumps(tok))
    for key in tok:
        for chunk, first, rows, w in slots:
            for j, row in enumerate(rows):
                pair = tok[key][chunk][first + j]
                weight = pair[1] if w is None else w
                tok[key][chunk][first + j] = [{"embed": row}, weight]
                with_vecs[key][chunk][first + j] = [mats[key][row].copy(), weight]
    return tok, mats, with_vecs


def write_case(tmp_path, tok, mats, name="e", dtype="F32"):
    t, e = tmp_path / (name + "-tokens.json"), tmp_path / (name + ".safetensors")
    t.write_text(json.dumps(tok))
    st_io.write(str(e), mats, dtype=dtype)
    return t, e


def encode_args(daemon_models, family, local):
    args = ["encode"]
    if local:
        args.append("--local")
    for m in MODELS[family]:
        args += ["--model", str(daemon_models / m) if local else m]
    return args


def cli(run_luna, d, daemon_models, family, local, *rest):
    """`luna encode` through lunad 'd' (local False) or in-process (local True)."""
    pre = [] if local else ["--socket", str(d.socket)]
    return run_luna(*(pre + encode_args(daemon_models, family, local) + [str(a) for a in rest]),
                    timeout=300 * SLOW)


def both(run_luna, d, daemon_models, family, tmp_path, tokens_file, embeds_file, tag):
    """The outputs of lunad and of --local for the same files (raw_tensors form)."""
    out = {}
    for local in (False, True):
        o = tmp_path / ("%s-%s.safetensors" % (tag, "local" if local else "lunad"))
        r = cli(run_luna, d, daemon_models, family, local, "--tokens", tokens_file, "--embeds", embeds_file,
                "--out", o, *([] if local else ["--no-cache"]))
        assert r.returncode == 0, "%s (local=%s): rc %d\n%s" % (family, local, r.returncode, r.stderr[-3000:])
        out[local] = raw_tensors(o)
    return out[False], out[True]


def as_f32(b):
    return np.frombuffer(b, "<f4")


# ------------------------------------------------------------------ results

@pytest.mark.parametrize("family", sorted(MODELS))
def test_cli_embeds_match_local_python_and_reference(start_lunad, daemon_models, refs, run_luna, tmp_path, family):
    d = start_lunad()
    encs = refs[family]
    tok, mats, with_vecs = case(encs, family, seed=3)
    t, e = write_case(tmp_path, tok, mats)
    lunad_out, local_out = both(run_luna, d, daemon_models, family, tmp_path, t, e, "f32")
    assert lunad_out == local_out, "lunad and --local differ"
    cond_shape = lunad_out["cond"][1]
    cond, pooled = as_f32(lunad_out["cond"][2]).reshape(cond_shape), as_f32(lunad_out["pooled"][2])
    rc, rp = ref_clip.encode_loaded(encs, with_vecs)
    assert list(rc.shape) == cond_shape
    ec, ep = rel(cond, rc), rel(pooled, rp.reshape(-1))
    assert ec <= TOL and ep <= TOL, "%s: rel err cond %.3g pooled %.3g" % (family, ec, ep)
    # the comparison can fail: the same tokens without the vectors are far away
    plain = tokens_for([30, 20], [1.1, 0.8], seed=3, sdxl=family == "sdxl")
    pc, _ = ref_clip.encode_loaded(encs, plain)
    assert rel(pc, rc) > 10 * TOL
    # the Python client sends the same vectors its own way (equal rows shared): same bits
    with d.client(timeout=120) as c:
        pyc, pyp, _ = c.encode(spec(family), tokens=with_vecs, cache=False)
    assert pyc.tobytes() == lunad_out["cond"][2] and pyp.tobytes() == lunad_out["pooled"][2]


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_cli_embeds_half_files_read_exactly(start_lunad, daemon_models, refs, run_luna, tmp_path, dtype):
    """An F16 or BF16 file gives what an F32 file of the same (rounded) values gives."""
    d = start_lunad()
    tok, mats, _ = case(refs["sdxl"], "sdxl", seed=5)
    rounded = {k: st_io.decode_array(st_io.encode_array(v, dtype), dtype, v.shape) for k, v in mats.items()}
    assert any(not np.array_equal(rounded[k], mats[k]) for k in mats)  # the rounding does something
    t, e_half = write_case(tmp_path, tok, mats, "half", dtype)
    _, e_f32 = write_case(tmp_path, tok, rounded, "rounded", "F32")
    half = both(run_luna, d, daemon_models, "sdxl", tmp_path, t, e_half, "half")
    full = both(run_luna, d, daemon_models, "sdxl", tmp_path, t, e_f32, "full")
    assert half[0] == half[1] == full[0] == full[1]


def test_cli_embeds_unused_and_sd1_ignores_g(start_lunad, daemon_models, refs, run_luna, tmp_path):
    """Rows no slot uses and a "g" tensor on an SD1 model change nothing; an --embeds
    file with tokens that use none of it gives the plain result."""
    d = start_lunad()
    tok, mats, _ = case(refs["sd1"], "sd1", seed=6)
    t, e = write_case(tmp_path, tok, mats)
    base = both(run_luna, d, daemon_models, "sd1", tmp_path, t, e, "base")
    g = vectors(refs["sdxl"]["g"], 2, 1)
    extra = {"l": np.concatenate([mats["l"], np.ones((3, mats["l"].shape[1]), np.float32)]), "g": g}
    _, e2 = write_case(tmp_path, tok, extra, "extra")
    assert both(run_luna, d, daemon_models, "sd1", tmp_path, t, e2, "extra") == base
    plain = tokens_for([30, 20], [1.1, 0.8], seed=6)
    tp = tmp_path / "plain.json"
    tp.write_text(json.dumps(plain))
    with_file = both(run_luna, d, daemon_models, "sd1", tmp_path, tp, e, "plain")
    o = tmp_path / "plain-none.safetensors"
    r = cli(run_luna, d, daemon_models, "sd1", True, "--tokens", tp, "--out", o)
    assert r.returncode == 0, r.stderr
    assert with_file[0] == with_file[1] == raw_tensors(o)


def test_cli_embeds_comfyui_tensor_names(start_lunad, daemon_models, refs, run_luna, tmp_path):
    """ComfyUI's embedding files name the vectors "clip_l" / "clip_g" (SDXL) or
    "emb_params" (SD1): --embeds reads them as "l" / "g", with the same result."""
    d = start_lunad()
    tok, mats, _ = case(refs["sdxl"], "sdxl", seed=9)
    t, e = write_case(tmp_path, tok, mats, "ours")
    ours = both(run_luna, d, daemon_models, "sdxl", tmp_path, t, e, "ours")
    _, e2 = write_case(tmp_path, tok, {"clip_l": mats["l"], "clip_g": mats["g"]}, "comfy")
    assert both(run_luna, d, daemon_models, "sdxl", tmp_path, t, e2, "comfy") == ours
    tok1, mats1, _ = case(refs["sd1"], "sd1", seed=9)
    t1, e1 = write_case(tmp_path, tok1, mats1, "ours1")
    _, e3 = write_case(tmp_path, tok1, {"emb_params": mats1["l"]}, "comfy1")
    assert both(run_luna, d, daemon_models, "sd1", tmp_path, t1, e3, "comfy1") == \
        both(run_luna, d, daemon_models, "sd1", tmp_path, t1, e1, "ours1")


# ------------------------------------------------------------------ errors

def expect_fail(r, rc, *words):
    print("rc %d: %s" % (r.returncode, r.stderr.strip()[-400:]))
    assert r.returncode == rc, "rc %d, expected %d; stderr:\n%s" % (r.returncode, rc, r.stderr[-3000:])
    for w in words:
        assert w in r.stderr, "%r not in stderr:\n%s" % (w, r.stderr[-3000:])
    assert "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("local", [False, True], ids=["lunad", "local"])
def test_cli_embeds_errors(start_lunad, daemon_models, refs, run_luna, tmp_path, local):
    d = start_lunad()
    W = refs["sd1"]["l"].width
    tok, mats, _ = case(refs["sd1"], "sd1", seed=7)
    out = tmp_path / "out.safetensors"

    def lunad_name(name):  # lunad's errors carry its status name; --local prints the message alone
        return [] if local else [name]

    def run(family, tokens_file, embeds_file, *more):
        args = ["--tokens", tokens_file] if tokens_file else []
        args += ["--embeds", embeds_file] if embeds_file else []
        return cli(run_luna, d, daemon_models, family, local, *(args + ["--out", out] + list(more)))

    # a slot index past the rows: the tokens file, the encoder, chunk, position and the row count
    bad = json.loads(json.dumps(tok))
    bad["l"][1][10][0] = {"embed": N_ROWS}
    t, e = write_case(tmp_path, bad, mats, "index")
    expect_fail(run("sd1", t, e), 1, *lunad_name("ETOKENS"), t.name, '"l" chunk 1 position 10', "{\"embed\": %d}" % N_ROWS,
                "%d rows" % N_ROWS)
    # the wrong width: the tensor, the encoder, both widths and the first slot using it
    t, e = write_case(tmp_path, tok, {"l": vectors(refs["sd1"]["l"], N_ROWS, 1)[:, :W - 8].copy()}, "width")
    expect_fail(run("sd1", t, e), 1, *lunad_name("EINVAL"), e.name, '"embeds"."l"', "CLIP-L",
                "%d wide" % (W - 8), "%d wide" % W, "chunk 0 slot 5")
    # a tensor the tokens need is not in the file (SDXL: "g" slots, only "l" given)
    tx, mx, _ = case(refs["sdxl"], "sdxl", seed=8)
    t, e = write_case(tmp_path, tx, {"l": mx["l"]}, "missing")
    expect_fail(run("sdxl", t, e), 1, *lunad_name("ETOKENS"), t.name, e.name, '"g" chunk 0 position 5',
                '"embeds"."g"')
    # NaN (and infinity) in the file: the file, tensor, row and column
    for v, word in ((np.nan, "nan"), (-np.inf, "inf")):
        m = {"l": mats["l"].copy()}
        m["l"][2, 5] = v
        t, e = write_case(tmp_path, tok, m, "nan")
        expect_fail(run("sd1", t, e), 1, e.name, 'tensor "l" row 2 column 5', "not finite", word)
    # the file's own form: another tensor, dtype, shape; no tensor at all
    t, e = write_case(tmp_path, tok, {"l": mats["l"], "string_to_param": mats["l"]}, "other")
    expect_fail(run("sd1", t, e), 1, e.name, '"string_to_param"', '"l"', '"g"')
    t, e = write_case(tmp_path, tok, {"l": mats["l"], "emb_params": mats["l"]}, "twice")
    expect_fail(run("sd1", t, e), 1, e.name, '"l"', '"emb_params"', "CLIP-L", "keep one")
    t, e = write_case(tmp_path, tok, {"l": mats["l"]}, "i32", "I32")
    expect_fail(run("sd1", t, e), 1, e.name, 'tensor "l"', "I32", "F32")
    t, e = write_case(tmp_path, tok, {"l": mats["l"].reshape(-1)}, "flat")
    expect_fail(run("sd1", t, e), 1, e.name, 'tensor "l"', "[%d]" % (N_ROWS * W), "[n, width]")
    t, e = write_case(tmp_path, tok, {"l": mats["l"][:, :, None]}, "3d")
    expect_fail(run("sd1", t, e), 1, e.name, 'tensor "l"', "[n, width]")
    t, e = write_case(tmp_path, tok, {"x": np.zeros((0,), np.float32)}, "empty")
    e.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    expect_fail(run("sd1", t, e), 1, e.name, 'no tensor "l" or "g"')
    missing = tmp_path / "does-not-exist.safetensors"
    expect_fail(run("sd1", t, missing), 1, missing.name)
    # slots but no --embeds: the slot is named, with what to do
    t, _ = write_case(tmp_path, tok, mats, "noemb")
    expect_fail(run("sd1", t, None), 1, t.name, '"l" chunk 0 position 5', "{\"embed\": 0}", "--embeds FILE")
    # --embeds without --tokens, or with --text: a usage error
    _, e = write_case(tmp_path, tok, mats, "usage")
    text = ["--text", "a cat"] + (["--tokenizer", str(tmp_path)] if local else [])
    expect_fail(run("sd1", None, e, *text), 2, "--embeds", "--tokens")
    expect_fail(run("sd1", None, e), 2, "--embeds", "--tokens")
    assert not out.exists()
    # lunad kept serving
    if not local:
        with d.client(timeout=60) as c:
            c.ping()


def test_cli_help_mentions_embeds(run_luna):
    r = run_luna("encode", "--help")
    assert r.returncode == 0 and "--embeds E.safetensors" in r.stdout and '{"embed": i}' in r.stdout


# ------------------------------------------------------------------ the C library

C_PROGRAM = r"""
/* embeds_prog.c -- luna_client_encode with textual-inversion vectors (test_embeds_cli.py) */
#include "luna.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* usage: prog SOCKET TOKENS.json L.bin NL WL G.bin NG WG OUT.bin MODEL [MODEL2]
** (G.bin "-" and NG 0 for none). Writes cond then pooled to OUT.bin, then tries bad
** embeds, one line each: "name status message". */
static char *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *b = malloc((size_t)n + 1);
  if (b && fread(b, 1, (size_t)n, f) != (size_t)n) {
    free(b);
    b = NULL;
  }
  if (b) b[n] = 0;
  if (len) *len = (size_t)n;
  fclose(f);
  return b;
}

static void bad(luna_client *c, const char *name, const luna_encode_args *a) {
  luna_encode_result r;
  int rc = luna_client_encode(c, a, &r);
  printf("%s %d %s\n", name, rc, luna_client_errmsg(c));
  luna_encode_result_free(&r);
}

int main(int argc, char **argv) {
  if (argc < 11 || argc > 12) return 2;
  char *tokens = slurp(argv[2], NULL);
  float *l = (float *)slurp(argv[3], NULL), *g = strcmp(argv[6], "-") ? (float *)slurp(argv[6], NULL) : NULL;
  if (!tokens || !l) return 3;
  luna_client *c = NULL;
  if (luna_client_connect_unix(argv[1], &c)) {
    printf("connect %s\n", luna_client_errmsg(c));
    return 1;
  }
  const char *models[2] = {argv[10], argc == 12 ? argv[11] : NULL};
  luna_encode_args a = {0};
  a.models = models;
  a.n_models = argc - 10;
  a.tokens_json = tokens;
  a.no_cache = 1;
  a.embeds_l = (luna_embeds){l, atoi(argv[4]), atoi(argv[5])};
  a.embeds_g = (luna_embeds){g, atoi(argv[7]), atoi(argv[8])};
  luna_encode_result r;
  int rc = luna_client_encode(c, &a, &r);
  printf("encode %d %s\n", rc, luna_client_errmsg(c));
  if (!rc) {
    FILE *o = fopen(argv[9], "wb");
    size_t nc = (size_t)(r.cond_shape[0] * r.cond_shape[1] * r.cond_shape[2]), np = (size_t)r.pooled_shape[1];
    if (!o || fwrite(r.cond, sizeof(float), nc, o) != nc || fwrite(r.pooled, sizeof(float), np, o) != np) return 4;
    fclose(o);
    printf("shape %lld %lld %lld\n", (long long)r.cond_shape[1], (long long)r.cond_shape[2],
           (long long)r.pooled_shape[1]);
  }
  luna_encode_result_free(&r);

  luna_encode_args b = a;
  b.embeds_l.data = NULL;
  bad(c, "null-data", &b);
  b = a;
  b.embeds_l.n = -1;
  bad(c, "negative-n", &b);
  b = a;
  b.embeds_l.n = LUNA_MAX_EMBED_ROWS + 1;
  bad(c, "huge-n", &b);
  b = a;
  b.embeds_g.width = 0;
  b.embeds_g.n = 1;
  b.embeds_g.data = l;
  bad(c, "zero-width", &b);
  b = a;
  b.embeds_l.width = LUNA_MAX_EMBED_WIDTH + 1;
  bad(c, "huge-width", &b);
  size_t nl = (size_t)a.embeds_l.n * (size_t)a.embeds_l.width;
  float *nanv = malloc(nl * sizeof(float));
  memcpy(nanv, l, nl * sizeof(float));
  nanv[(size_t)a.embeds_l.width + 5] = NAN;
  b = a;
  b.embeds_l.data = nanv;
  bad(c, "nan", &b);
  b = a;
  b.tokens_json = NULL;
  b.text = "a cat";
  bad(c, "with-text", &b);
  b = a;
  memset(&b.embeds_l, 0, sizeof b.embeds_l);
  memset(&b.embeds_g, 0, sizeof b.embeds_g);
  bad(c, "no-embeds", &b);
  free(nanv);
  luna_client_close(c);
  free(tokens);
  free(l);
  free(g);
  return 0;
}
"""


@pytest.mark.parametrize("family,kind", [("sd1", "static"), ("sdxl", "shared")])
def test_c_library_embeds(start_lunad, daemon_models, refs, tmp_path, family, kind):
    src = tmp_path / "embeds_prog.c"
    src.write_text(C_PROGRAM)
    exe = build_c_program(src, tmp_path / "embeds_prog", kind)
    d = start_lunad()
    encs = refs[family]
    tok, mats, with_vecs = case(encs, family, seed=11)
    (tmp_path / "t.json").write_text(json.dumps(tok))
    (tmp_path / "l.bin").write_bytes(mats["l"].astype("<f4").tobytes())
    g_args = ["-", "0", "0"]
    if "g" in mats:
        (tmp_path / "g.bin").write_bytes(mats["g"].astype("<f4").tobytes())
        g_args = [str(tmp_path / "g.bin"), str(N_ROWS), str(mats["g"].shape[1])]
    argv = [str(exe), str(d.socket), str(tmp_path / "t.json"), str(tmp_path / "l.bin"), str(N_ROWS),
            str(mats["l"].shape[1])] + g_args + [str(tmp_path / "out.bin")] + MODELS[family]
    with d.client(timeout=120) as c:
        failed0 = c.status()["requests"]["failed"]
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120 * SLOW)
        assert r.returncode == 0, r.stdout + r.stderr
        lines = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in r.stdout.splitlines()}
        assert lines["encode"].strip() == "0", lines["encode"]
        n_tok, width, pdim = (int(x) for x in lines["shape"].split())
        got = np.fromfile(tmp_path / "out.bin", "<f4")
        pyc, pyp, _ = c.encode(spec(family), tokens=with_vecs, cache=False)
        assert pyc.shape == (1, n_tok, width) and pyp.shape == (1, pdim)
        assert got.tobytes() == pyc.tobytes() + pyp.tobytes(), "the C and Python clients differ"
        rc_, rp_ = ref_clip.encode_loaded(encs, with_vecs)
        assert rel(pyc, rc_) <= TOL and rel(pyp, rp_) <= TOL
        einval = str(proto.EINVAL)
        for name, words in [("null-data", ["embeds_l.data", "NULL"]), ("negative-n", ["embeds_l.n", "-1"]),
                            ("huge-n", ["embeds_l.n", "1000001"]), ("zero-width", ["embeds_g.width", "0"]),
                            ("huge-width", ["embeds_l.width", "65537"]),
                            ("nan", ["embeds_l", "row 1 column 5", "not finite"]),
                            ("with-text", ["embeds_l", "tokens_json", "text"])]:
            code, msg = lines[name].split(" ", 1)
            assert code == einval, lines[name]
            assert msg.startswith("EINVAL: "), msg
            for w in words:
                assert w in msg, "%s: %r not in %r" % (name, w, msg)
        # without the vectors lunad names the slot; the bad ones above never left the client
        code, msg = lines["no-embeds"].split(" ", 1)
        assert code == str(proto.ETOKENS) and '"l" chunk 0 position 5' in msg, lines["no-embeds"]
        assert c.status()["requests"]["failed"] == failed0 + 1
