"""st_io.py -- a small safetensors reader and writer in numpy, for luna's tests.

The format (NUMERICS.md section 1): a u64 little-endian header length N, N bytes of
UTF-8 JSON mapping each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
plus an optional "__metadata__" {str: str}, then the tensor bytes. Offsets count from
the first byte after the header.

Writing:
    write(path, {name: array}, dtype="F16", metadata={...})
    write_specs(path, [TensorSpec(...)], metadata)   # streams one tensor at a time
Reading:
    tensors, metadata = read(path)                    # every tensor as float32
Broken files for the malformed-input tests:
    header, data = build_parts({name: array}, dtype)  # a valid file, in pieces
    write_raw(path, header, data, ...)                 # header as dict/list/bytes
"""

import json
import math
import os
import struct

import numpy as np

# name -> (numpy dtype used to hold the raw little-endian values, byte size)
_DTYPES = {
    "BOOL": (np.dtype("u1"), 1),
    "U8": (np.dtype("u1"), 1),
    "I8": (np.dtype("i1"), 1),
    "I16": (np.dtype("<i2"), 2),
    "U16": (np.dtype("<u2"), 2),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),  # raw bits; converted by hand
    "I32": (np.dtype("<i4"), 4),
    "U32": (np.dtype("<u4"), 4),
    "F32": (np.dtype("<f4"), 4),
    "F64": (np.dtype("<f8"), 8),
    "I64": (np.dtype("<i8"), 8),
    "U64": (np.dtype("<u8"), 8),
}

MAX_HEADER = 100_000_000


def dtype_size(dtype):
    """Bytes per element of a safetensors dtype string."""
    return _DTYPES[dtype][1]


def f32_to_bf16_bits(a):
    """Round float32 values to bfloat16 (nearest, ties to even); returns uint16 bits.

    NaN stays NaN (quiet); infinities and overflow to infinity behave like torch's
    conversion.
    """
    a = np.ascontiguousarray(a, dtype=np.float32)
    bits = a.view(np.uint32)
    # add 0x7FFF plus the lowest kept bit, then cut: round to nearest, ties to even
    lsb = (bits >> 16) & 1
    rounded = ((bits.astype(np.uint64) + 0x7FFF + lsb) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def bf16_bits_to_f32(b):
    """uint16 bfloat16 bits -> float32 (exact)."""
    b = np.asarray(b, dtype=np.uint16)
    return (b.astype(np.uint32) << 16).view(np.float32)


def encode_array(arr, dtype):
    """Convert an array to the little-endian bytes of 'dtype' (a safetensors string)."""
    if dtype == "BF16":
        return f32_to_bf16_bits(np.asarray(arr, dtype=np.float32)).tobytes()
    if dtype not in _DTYPES:
        raise ValueError("unknown dtype %r" % dtype)
    npd = _DTYPES[dtype][0]
    return np.ascontiguousarray(np.asarray(arr).astype(npd, copy=False)).tobytes()


def decode_array(buf, dtype, shape):
    """Bytes of one tensor -> float32 array of 'shape'."""
    npd, _ = _DTYPES[dtype]
    raw = np.frombuffer(buf, dtype=npd)
    if dtype == "BF16":
        out = bf16_bits_to_f32(raw)
    else:
        out = raw.astype(np.float32)
    return out.reshape(shape)


class TensorSpec:
    """One tensor to write: its name, safetensors dtype, shape and a producer.

    'produce' is a callable that returns the values (any float array of 'shape'); it is
    called once, when the tensor's bytes are written, so large files never hold more
    than one tensor in memory.
    """

    def __init__(self, name, dtype, shape, produce):
        self.name = name
        self.dtype = dtype
        self.shape = [int(s) for s in shape]
        self.produce = produce

    @property
    def nbytes(self):
        return int(np.prod(self.shape, dtype=np.int64)) * dtype_size(self.dtype)


def _order(specs):
    # the reference writer's order: larger dtype alignment first, then by name
    return sorted(specs, key=lambda s: (-dtype_size(s.dtype), s.name))


def header_bytes(entries, metadata=None, pad_to=8):
    """Serialize a header. 'entries' is a list of (name, info) pairs so that duplicate
    names can be written on purpose; the result is space-padded so that 8+len is a
    multiple of 'pad_to'."""
    parts = []
    if metadata is not None:
        parts.append(json.dumps("__metadata__") + ":" + json.dumps(metadata, separators=(",", ":")))
    for name, info in entries:
        parts.append(json.dumps(name) + ":" + json.dumps(info, separators=(",", ":")))
    text = ("{" + ",".join(parts) + "}").encode("utf-8")
    if pad_to:
        text += b" " * ((-len(text)) % pad_to)
    return text


def write_specs(path, specs, metadata=None):
    """Write a safetensors file from TensorSpecs, streaming tensor by tensor."""
    specs = _order(specs)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    entries = []
    off = 0
    for s in specs:
        entries.append((s.name, {"dtype": s.dtype, "shape": s.shape, "data_offsets": [off, off + s.nbytes]}))
        off += s.nbytes
    if metadata is not None:
        metadata = {str(k): str(v) for k, v in metadata.items()}
    hdr = header_bytes(entries, metadata)
    tmp = str(path) + ".part"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)))
        f.write(hdr)
        for s in specs:
            data = encode_array(np.asarray(s.produce()).reshape(s.shape), s.dtype)
            if len(data) != s.nbytes:
                raise ValueError("tensor %s: produced %d bytes, expected %d" % (s.name, len(data), s.nbytes))
            f.write(data)
            del data
    os.replace(tmp, path)


def write(path, tensors, dtype="F32", metadata=None):
    """Write {name: array} to 'path'. 'dtype' is one safetensors dtype string for all
    tensors or a {name: dtype} dict (names missing from it default to F32)."""
    specs = []
    for name, arr in tensors.items():
        d = dtype.get(name, "F32") if isinstance(dtype, dict) else dtype
        arr = np.asarray(arr)
        specs.append(TensorSpec(name, d, arr.shape, (lambda a=arr: a)))
    write_specs(path, specs, metadata)


def read_header(path):
    """Return (header dict without __metadata__, metadata or None, data start offset)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("%s: file shorter than 8 bytes" % path)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise ValueError("%s: header too large" % path)
        text = f.read(n)
        if len(text) != n:
            raise ValueError("%s: truncated header" % path)
    hdr = json.loads(text.decode("utf-8"))
    meta = hdr.pop("__metadata__", None)
    return hdr, meta, 8 + n


def read(path, names=None):
    """Read a safetensors file; returns ({name: float32 array}, metadata or None).

    Validates as the reference reader does: contiguous offsets from 0, sizes matching
    the shapes, data ending at the end of the file. 'names' (optional) restricts which
    tensors are converted; the file is memory-mapped, so that costs no copies.
    """
    hdr, meta, start = read_header(path)
    size = os.path.getsize(path)
    items = sorted(hdr.items(), key=lambda kv: kv[1]["data_offsets"][0])
    pos = 0
    for name, info in items:
        b, e = info["data_offsets"]
        count = math.prod(info["shape"]) if info["shape"] else 1
        if b != pos or e < b or e - b != count * dtype_size(info["dtype"]):
            raise ValueError("%s: bad offsets for tensor %s" % (path, name))
        pos = e
    if start + pos != size:
        raise ValueError("%s: data does not end at the end of the file" % path)
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else None
    out = {}
    for name, info in items:
        if names is not None and name not in names:
            continue
        b, e = info["data_offsets"]
        out[name] = decode_array(mm[start + b:start + e].tobytes(), info["dtype"], info["shape"])
    del mm
    return out, meta


# ---------------------------------------------------------------- broken files

def build_parts(tensors, dtype="F32"):
    """A valid file in pieces: (header as a list of [name, info] pairs, data bytes).
    Tests change the pieces and pass them to write_raw."""
    entries = []
    chunks = []
    off = 0
    for name, arr in tensors.items():
        d = dtype.get(name, "F32") if isinstance(dtype, dict) else dtype
        arr = np.asarray(arr)
        data = encode_array(arr, d)
        entries.append([name, {"dtype": d, "shape": list(arr.shape), "data_offsets": [off, off + len(data)]}])
        chunks.append(data)
        off += len(data)
    return entries, b"".join(chunks)


def write_raw(path, header, data=b"", header_len=None, truncate_to=None, metadata=None):
    """Write a file exactly as told, valid or not.

    'header' is a list of (name, info) pairs (duplicates allowed), a dict, or raw bytes
    written as they are. 'header_len' overrides the u64 length field. 'truncate_to'
    cuts the finished file to that many bytes.
    """
    if isinstance(header, (bytes, bytearray)):
        hdr = bytes(header)
    else:
        entries = list(header.items()) if isinstance(header, dict) else [tuple(e) for e in header]
        hdr = header_bytes(entries, metadata)
    n = len(hdr) if header_len is None else header_len
    blob = struct.pack("<Q", n) + hdr + bytes(data)
    if truncate_to is not None:
        blob = blob[:truncate_to]
    with open(path, "wb") as f:
        f.write(blob)
    return len(blob)


def header_size_of(path):
    """The header length field of an existing file."""
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]
