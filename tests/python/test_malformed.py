"""test_malformed.py -- broken and wrong model files must fail cleanly.

Every case runs `luna encode --local` on a deliberately broken file and expects:
a non-zero exit (not a signal), a message on stderr naming the file and, where the
fault belongs to a tensor, that tensor, and no sanitizer report. Messages are luna's
to word: only the names are checked.
"""

import struct

import numpy as np
import pytest

import make_models
import ref_clip
import st_io
from conftest import tokens_for

WIDTH, LAYERS = 64, 2
Q1 = "encoder.layers.1.self_attn.q_proj.weight"
FC1 = "encoder.layers.0.mlp.fc1.weight"
LNF_B = "final_layer_norm.bias"


@pytest.fixture(scope="module")
def weights():
    """A small valid standalone CLIP-L, HF names, float32 values."""
    return make_models.make_clip_weights("l", WIDTH, LAYERS, seed=11)


@pytest.fixture(scope="module")
def tok_path(write_tokens):
    return write_tokens(tokens_for([15], [1.5, 0.5]))


def parts(weights, dtype="F16"):
    entries, data = st_io.build_parts(weights, dtype)
    return [list(e) for e in entries], data


def entry(entries, suffix):
    for e in entries:
        if e[0].endswith(suffix):
            return e
    raise KeyError(suffix)


def encode(run_luna, tmp_path, path, tok_path):
    return run_luna("encode", "--local", "--model", path, "--tokens", tok_path,
                    "--out", tmp_path / "out.safetensors")


def expect_failure(r, path, names=(), any_of=()):
    err = r.stderr
    print("%s -> rc %d: %s" % (path.name, r.returncode, err.strip()[-300:]))
    assert r.returncode > 0, "expected a clean non-zero exit, got rc %d; stderr:\n%s" % (r.returncode, err[-3000:])
    assert "AddressSanitizer" not in err and "runtime error" not in err, err[-3000:]
    assert "Sanitizer" not in err, err[-3000:]
    assert path.name in err, "stderr does not name the file %s:\n%s" % (path.name, err[-3000:])
    for n in names:
        assert n in err, "stderr does not name the tensor %s:\n%s" % (n, err[-3000:])
    if any_of:
        assert any(n in err for n in any_of), "stderr names none of %s:\n%s" % (list(any_of), err[-3000:])


def write_case(tmp_path, case, header, data, **kw):
    path = tmp_path / ("broken-%s.safetensors" % case)
    st_io.write_raw(path, header, data, **kw)
    return path


def run_case(run_luna, tmp_path, tok_path, case, header, data, names=(), any_of=(), **kw):
    path = write_case(tmp_path, case, header, data, **kw)
    expect_failure(encode(run_luna, tmp_path, path, tok_path), path, names, any_of)


# ------------------------------------------------------------------ control

def test_control_valid_file_encodes(run_luna, tmp_path, weights, tok_path):
    """The unbroken base file must encode, or every case below would pass for nothing."""
    entries, data = parts(weights)
    path = write_case(tmp_path, "none", entries, data)
    r = encode(run_luna, tmp_path, path, tok_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got, _ = st_io.read(tmp_path / "out.safetensors")
    want = ref_clip.encode([path], tok_path)
    assert float(np.abs(got["cond"] - want[0]).max() / np.abs(want[0]).max()) <= 1e-4


# ------------------------------------------------------------------ container

def test_empty_file(run_luna, tmp_path, tok_path):
    path = tmp_path / "broken-empty.safetensors"
    path.write_bytes(b"")
    expect_failure(encode(run_luna, tmp_path, path, tok_path), path)


def test_shorter_than_length_field(run_luna, tmp_path, tok_path):
    path = tmp_path / "broken-short.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    expect_failure(encode(run_luna, tmp_path, path, tok_path), path)


def test_truncated_in_header(run_luna, tmp_path, weights, tok_path):
    entries, data = parts(weights)
    n = len(st_io.header_bytes([tuple(e) for e in entries]))
    run_case(run_luna, tmp_path, tok_path, "cut-header", entries, data, truncate_to=8 + n // 2)


def test_truncated_in_data(run_luna, tmp_path, weights, tok_path):
    entries, data = parts(weights)
    total = 8 + len(st_io.header_bytes([tuple(e) for e in entries])) + len(data)
    run_case(run_luna, tmp_path, tok_path, "cut-data", entries, data, truncate_to=total - 1000)


def test_header_length_beyond_file(run_luna, tmp_path, weights, tok_path):
    entries, data = parts(weights)
    n = len(st_io.header_bytes([tuple(e) for e in entries]))
    run_case(run_luna, tmp_path, tok_path, "hdr-past-end", entries, data, header_len=n + len(data) + 4096)


@pytest.mark.parametrize("n", [100_000_001, 2**63, 2**64 - 8], ids=["100M+1", "2^63", "2^64-8"])
def test_header_length_too_large(run_luna, tmp_path, weights, tok_path, n):
    entries, data = parts(weights)
    run_case(run_luna, tmp_path, tok_path, "hdr-huge-%d" % (n % 1000), entries, data, header_len=n)


@pytest.mark.parametrize("raw", [
    b"this is not json at all!",
    b'{"text_model.final_layer_norm.bias": {"dtype": "F16", ',
    b"[1, 2, 3, 4, 5, 6, 7, 8]",
    b'"a string"      ',
    b'{"a": 1}\x00\x00\x00\x00\x00\x00\x00\x00',
    b'{"\xff\xfe": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}}',
], ids=["garbage", "cut-json", "array", "string", "nul-after", "bad-utf8"])
def test_header_not_json_object(run_luna, tmp_path, tok_path, raw):
    raw += b" " * ((-len(raw)) % 8)
    path = tmp_path / "broken-json.safetensors"
    st_io.write_raw(path, raw, b"\x00" * 64)
    expect_failure(encode(run_luna, tmp_path, path, tok_path), path)


@pytest.mark.parametrize("field,value", [
    ("dtype", None), ("shape", None), ("data_offsets", None),
    ("shape", [-64]), ("shape", "64"), ("data_offsets", [0]), ("data_offsets", [-2, 126]),
    ("dtype", 16),
], ids=["no-dtype", "no-shape", "no-offsets", "neg-dim", "shape-str", "one-offset", "neg-offset", "dtype-int"])
def test_entry_fields_malformed(run_luna, tmp_path, weights, tok_path, field, value):
    entries, data = parts(weights)
    e = entry(entries, LNF_B)
    if value is None:
        del e[1][field]
    else:
        e[1][field] = value
    run_case(run_luna, tmp_path, tok_path, "field-%s" % field, entries, data, names=[LNF_B])


def _sorted(entries):
    return sorted(entries, key=lambda e: e[1]["data_offsets"][0])


def test_offsets_overlapping(run_luna, tmp_path, weights, tok_path):
    entries, data = parts(weights)
    es = _sorted(entries)
    a, b = es[3], es[4]
    b[1]["data_offsets"] = [x - 2 for x in b[1]["data_offsets"]]
    run_case(run_luna, tmp_path, tok_path, "overlap", entries, data, any_of=[a[0], b[0]])


def test_offsets_with_gap(run_luna, tmp_path, weights, tok_path):
    entries, data = parts(weights)
    es = _sorted(entries)
    cut = es[5][1]["data_offsets"][0]
    for e in es[5:]:
        e[1]["data_offsets"] = [x + 8 for x in e[1]["data_offsets"]]
    data = data[:cut] + b"\x00" * 8 + data[cut:]
    run_case(run_luna, tmp_path, tok_path, "gap", entries, data, any_of=[es[4][0], es[5][0]])


def test_offsets_out_of_bounds(run_luna, tmp_path, weights, tok_path):
    entries, data = parts(weights)
    last = _sorted(entries)[-1]
    # one more row than the data holds; size and shape stay consistent
    shape = last[1]["shape"]
    row = int(np.prod(shape[1:], dtype=np.int64)) * 2 if len(shape) > 1 else 2
    shape[0] += 1
    last[1]["data_offsets"][1] += row
    run_case(run_luna, tmp_path, tok_path, "oob", entries, data, names=[last[0]])


def test_offsets_reversed(run_luna, tmp_path, weights, tok_path):
    entries, data = parts(weights)
    e = entry(entries, LNF_B)
    e[1]["data_offsets"] = e[1]["data_offsets"][::-1]
    run_case(run_luna, tmp_path, tok_path, "reversed", entries, data, names=[LNF_B])


def test_size_differs_from_shape(run_luna, tmp_path, weights, tok_path):
    entries, data = parts(weights)
    entry(entries, LNF_B)[1]["shape"] = [WIDTH - 1]
    run_case(run_luna, tmp_path, tok_path, "size", entries, data, names=[LNF_B])


def test_shape_product_overflows(run_luna, tmp_path, weights, tok_path):
    """shape [2^32, 2^32, 2] in F16 is 2^66 bytes, which wraps a 64-bit size to 0: the
    entry claims 0 bytes and the offsets stay contiguous, so only the overflow is wrong."""
    entries, data = parts(weights)
    e = entry(entries, LNF_B)
    b, end = e[1]["data_offsets"]
    size = end - b
    for other in entries:
        if other[1]["data_offsets"][0] >= end:
            other[1]["data_offsets"] = [x - size for x in other[1]["data_offsets"]]
    e[1]["shape"] = [2**32, 2**32, 2]
    e[1]["data_offsets"] = [b, b]
    data = data[:b] + data[end:]
    run_case(run_luna, tmp_path, tok_path, "overflow", entries, data, names=[LNF_B])


def test_duplicate_names(run_luna, tmp_path, weights, tok_path):
    entries, data = parts(weights)
    e = entry(entries, LNF_B)
    size = e[1]["data_offsets"][1] - e[1]["data_offsets"][0]
    end = len(data)
    dup = [e[0], {"dtype": e[1]["dtype"], "shape": list(e[1]["shape"]), "data_offsets": [end, end + size]}]
    entries.append(dup)
    data += b"\x00" * size
    run_case(run_luna, tmp_path, tok_path, "dup", entries, data, names=[LNF_B])


@pytest.mark.parametrize("dtype", ["I64", "I32", "Q4_0", ""])
def test_unsupported_dtype_in_encoder(run_luna, tmp_path, weights, tok_path, dtype):
    """A tensor the encoder needs, stored in a dtype luna cannot read (or an unknown one)."""
    w = dict(weights)
    dtypes = {k: "F16" for k in w}
    if dtype in ("I64", "I32"):
        dtypes["text_model." + LNF_B] = dtype
        w["text_model." + LNF_B] = np.zeros(WIDTH, dtype=np.int64)
        entries, data = parts(w, dtypes)
    else:
        entries, data = parts(w, dtypes)
        entry(entries, LNF_B)[1]["dtype"] = dtype
    run_case(run_luna, tmp_path, tok_path, "dtype-%s" % (dtype or "empty"), entries, data, names=[LNF_B])


# ------------------------------------------------------------------ model content

def test_missing_tensor(run_luna, tmp_path, weights, tok_path):
    w = dict(weights)
    del w["text_model." + Q1]
    entries, data = parts(w)
    run_case(run_luna, tmp_path, tok_path, "missing", entries, data, names=[Q1])


def test_missing_tensor_in_checkpoint(run_luna, tmp_path, model, tok_path):
    t, _ = st_io.read(model("sd1"))
    name = "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc2.bias"
    del t[name]
    entries, data = parts(t)
    run_case(run_luna, tmp_path, tok_path, "missing-sd1", entries, data, names=["layers.2.mlp.fc2.bias"])


def test_wrong_shape(run_luna, tmp_path, weights, tok_path):
    w = dict(weights)
    w["text_model." + FC1] = np.ascontiguousarray(w["text_model." + FC1].T)
    entries, data = parts(w)
    run_case(run_luna, tmp_path, tok_path, "shape", entries, data, names=[FC1])


def test_wrong_shape_in_sdxl_g(run_luna, tmp_path, model, write_tokens):
    t, _ = st_io.read(model("sdxl"))
    name = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    t[name] = t[name][:-64]
    entries, data = parts(t)
    path = write_case(tmp_path, "shape-g", entries, data)
    r = encode(run_luna, tmp_path, path, write_tokens(tokens_for([10], sdxl=True)))
    expect_failure(r, path, any_of=["resblocks.1.attn.in_proj_weight", "layers.1.self_attn"])


def test_unexpected_tensor_in_encoder(run_luna, tmp_path, weights, tok_path):
    w = dict(weights)
    extra = "text_model.encoder.layers.1.self_attn.extra_proj.weight"
    w[extra] = np.zeros((WIDTH, WIDTH), dtype=np.float32)
    entries, data = parts(w)
    run_case(run_luna, tmp_path, tok_path, "extra", entries, data, names=["layers.1.self_attn.extra_proj.weight"])


def test_not_a_clip_model(run_luna, tmp_path, tok_path):
    rng = np.random.default_rng(0)
    t = {"model.diffusion_model.input_blocks.0.0.weight": rng.standard_normal((32, 4, 3, 3)),
         "model.diffusion_model.input_blocks.0.0.bias": rng.standard_normal(32),
         "model.diffusion_model.out.2.weight": rng.standard_normal((4, 32, 3, 3))}
    entries, data = parts(t)
    run_case(run_luna, tmp_path, tok_path, "unet-only", entries, data)


def test_missing_model_file(run_luna, tmp_path, tok_path):
    path = tmp_path / "no-such-model.safetensors"
    expect_failure(encode(run_luna, tmp_path, path, tok_path), path)


# ------------------------------------------------------------------ what must still load

def test_int64_position_ids_are_ignored(run_luna, tmp_path, model, tok_path):
    """Real SD1 checkpoints store embeddings.position_ids as I64 [1,77]; ComfyUI ignores
    it, and so must luna. Other parts' unreadable dtypes (an I32 UNet tensor) too."""
    t, _ = st_io.read(model("sd1"))
    pid = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    t[pid] = np.arange(77, dtype=np.int64)[None]
    t["model.diffusion_model.some_counter"] = np.arange(6, dtype=np.int32)
    dtypes = {k: "F16" for k in t}
    dtypes[pid] = "I64"
    dtypes["model.diffusion_model.some_counter"] = "I32"
    path = tmp_path / "sd1-int-ids.safetensors"
    st_io.write(path, t, dtypes)
    r = encode(run_luna, tmp_path, path, tok_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got, _ = st_io.read(tmp_path / "out.safetensors")
    want = ref_clip.encode([path], tok_path)
    assert float(np.abs(got["cond"] - want[0]).max() / np.abs(want[0]).max()) <= 1e-4
    assert float(np.abs(got["pooled"] - want[1]).max() / np.abs(want[1]).max()) <= 1e-4


def test_header_length_field_is_little_endian(tmp_path, weights):
    # a check of st_io itself: the length field and the 8-byte padding
    path = tmp_path / "ok.safetensors"
    st_io.write(path, {"text_model." + LNF_B: weights["text_model." + LNF_B]}, "F16")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and len(raw) == 8 + n + 2 * WIDTH
    assert raw[8:8 + n].rstrip(b" ").endswith(b"}")
