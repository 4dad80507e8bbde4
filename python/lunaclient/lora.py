"""lunaclient.lora -- a LoRA file's identity and the image a client uploads, as luna computes them.

lunad keeps parsed LoRAs in a cache keyed by their identity: the SHA-256 over the
file's text-encoder tensors only (src/lora/lora.h), so that the same tensors are one
entry whatever the file is called, whatever its metadata, tensor order or UNet tensors.
A text-encoder tensor is one whose name starts with one of TE_PREFIXES. The tensors,
sorted by name (bytewise, UTF-8), are each hashed as

    u64 name length, name bytes, u64 dtype-name length, dtype name ("F16", ...),
    u64 n_dims, n_dims x u64 shape, u64 byte length, the tensor's bytes

all integers little-endian. The identity is written as 64 lowercase hex digits.

    lora_identity(path)  -> "3f1c...": the identity of a safetensors file
    extract_te(path)     -> bytes: a safetensors image of its text-encoder tensors alone
                            (what Client.lora_upload sends); its identity is the file's
    identity_of_image(b) -> the identity of a safetensors image in memory
    extract_te_image(b)  -> extract_te for a safetensors image in memory
    Lora(path, strength, daemon_path=None): an entry of Client.encode's loras
    LoraImage(data, strength, identity=None): an entry of Client.encode's loras held
                            in memory ('data' the bytes of a safetensors image)

Only the standard library is used. The files are validated as luna's reader does
(header size, JSON object, dtype, shape, offsets contiguous and ending with the file);
a broken one raises LunaError EFORMAT or EDTYPE naming the file and the field.
"""

import hashlib
import json
import math
import mmap
import os
import struct
from collections import namedtuple

from . import proto
from .proto import LunaError

TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_prior_te_",
               "text_encoder.", "text_encoder_2.", "text_encoders.")

# One entry of a LoRA stack for Client.encode(loras=[...]): a local file, its strength,
# and optionally the same file's name relative to lunad's --loras-dir.
Lora = namedtuple("Lora", "path strength daemon_path", defaults=(None,))


class LoraImage:
    """A LoRA held in memory, as an entry of Client.encode's loras: 'data' the bytes of
    a safetensors image (only its text-encoder tensors matter), 'strength' ComfyUI's
    strength_clip. 'identity' (64 hex digits) may be given when known; otherwise it is
    computed from 'data' (identity_of_image) the first time it is needed, and kept."""

    __slots__ = ("data", "strength", "_identity")

    def __init__(self, data, strength, identity=None):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise LunaError(proto.EINVAL, message="LoraImage: data must be bytes (a safetensors image), not %s"
                            % type(data).__name__)
        if identity is not None:
            if not isinstance(identity, str) or len(identity) != 64 or \
                    any(ch not in "0123456789abcdef" for ch in identity.lower()):
                raise LunaError(proto.EINVAL, message="LoraImage: identity must be 64 hex digits, not %.80r"
                                % (identity,))
            identity = identity.lower()
        self.data = data
        self.strength = strength
        self._identity = identity

    @property
    def identity(self):
        if self._identity is None:
            self._identity = identity_of_image(self.data, "in-memory LoRA")
        return self._identity

    def __repr__(self):
        return "LoraImage(<%d bytes>, %r, identity=%r)" % (len(self.data), self.strength, self._identity)


# safetensors dtype names and their sizes in bytes
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}
MAX_HEADER = 100_000_000
MAX_DIMS = 8
_U64 = struct.Struct("<Q")


def is_te_key(name):
    """True when tensor 'name' belongs to a text encoder (one of TE_PREFIXES)."""
    return name.startswith(TE_PREFIXES)


def _fail(label, code, text):
    raise LunaError(code, message="%s: %s" % (label, text))


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError("key %r appears twice" % k)
        out[k] = v
    return out


def _reject_constant(name):
    raise ValueError("%s is not JSON" % name)


def _uint(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def parse_header(buf, label):
    """Validate the safetensors image 'buf' (bytes, mmap or memoryview) and return
    (tensors, metadata, data_start): tensors a dict name -> (dtype, shape, begin, end)
    with offsets relative to data_start."""
    size = len(buf)
    if size < 8:
        _fail(label, proto.EFORMAT, "%d bytes, shorter than the 8-byte header length" % size)
    (n,) = _U64.unpack_from(buf, 0)
    if n > MAX_HEADER:
        _fail(label, proto.EFORMAT, "header length %d exceeds %d" % (n, MAX_HEADER))
    if 8 + n > size:
        _fail(label, proto.EFORMAT, "header length %d runs past the end of the %d-byte file" % (n, size))
    try:
        text = bytes(buf[8:8 + n]).decode("utf-8", "strict")
        hdr = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        _fail(label, proto.EFORMAT, "header is not valid UTF-8 (byte %d)" % e.start)
    except ValueError as e:
        _fail(label, proto.EFORMAT, "header is not valid JSON: %s" % e)
    if not isinstance(hdr, dict):
        _fail(label, proto.EFORMAT, "header is not a JSON object")
    meta = hdr.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        _fail(label, proto.EFORMAT, "__metadata__ is not an object of strings")
    data_len = size - 8 - n
    tensors = {}
    for name, e in hdr.items():
        where = "tensor '%s'" % name
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            _fail(label, proto.EFORMAT, "%s: want exactly dtype, shape and data_offsets" % where)
        dt, shape, off = e["dtype"], e["shape"], e["data_offsets"]
        if dt not in DTYPE_SIZES:
            _fail(label, proto.EDTYPE, "%s: unknown dtype %r" % (where, dt))
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_uint(d) for d in shape):
            _fail(label, proto.EFORMAT, "%s: shape is not a list of at most %d non-negative integers"
                  % (where, MAX_DIMS))
        if not isinstance(off, list) or len(off) != 2 or not all(_uint(x) for x in off):
            _fail(label, proto.EFORMAT, "%s: data_offsets is not two non-negative integers" % where)
        begin, end = off
        nbytes = DTYPE_SIZES[dt] * math.prod(shape)
        if end < begin or end - begin != nbytes:
            _fail(label, proto.EFORMAT, "%s: data_offsets [%d, %d] do not hold %d bytes of %s %s"
                  % (where, begin, end, nbytes, dt, shape))
        tensors[name] = (dt, shape, begin, end)
    pos = 0
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            _fail(label, proto.EFORMAT, "tensor '%s' starts at %d, expected %d (tensors must be contiguous)"
                  % (name, begin, pos))
        pos = end
    if pos != data_len:
        _fail(label, proto.EFORMAT, "the tensors end at %d but the data section has %d bytes" % (pos, data_len))
    return tensors, meta, 8 + n


def _te_sorted(tensors):
    """The text-encoder tensors' names, in luna's order (bytewise on UTF-8)."""
    names = [k for k in tensors if is_te_key(k)]
    return sorted(names, key=lambda k: k.encode("utf-8", "surrogatepass"))


def _identity(buf, tensors, start):
    h = hashlib.sha256()

    def field(b):
        h.update(_U64.pack(len(b)))
        h.update(b)

    with memoryview(buf) as mv:  # released before the caller unmaps the file
        for name in _te_sorted(tensors):
            dt, shape, begin, end = tensors[name]
            field(name.encode("utf-8", "surrogatepass"))
            field(dt.encode("ascii"))
            h.update(_U64.pack(len(shape)))
            for d in shape:
                h.update(_U64.pack(d))
            with mv[start + begin:start + end] as part:
                field(part)
    return h.hexdigest()


class _Mapped:
    """A file mapped read-only (an empty file becomes b"")."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self._f = open(self.path, "rb")
        except OSError as e:
            raise LunaError(proto.EIO, message="cannot open %s: %s" % (self.path, e.strerror or e)) from None
        try:
            size = os.fstat(self._f.fileno()).st_size
            self.buf = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except (OSError, ValueError) as e:
            self._f.close()
            raise LunaError(proto.EIO, message="cannot read %s: %s" % (self.path, e)) from None

    def close(self):
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def lora_identity(path):
    """The identity of the LoRA file at 'path': 64 lowercase hex digits, as
    `luna lora id` and lunad compute it."""
    with _Mapped(path) as m:
        tensors, _, start = parse_header(m.buf, m.path)
        return _identity(m.buf, tensors, start)


def identity_of_image(buf, label="image"):
    """The identity of a whole safetensors image in memory (bytes-like)."""
    tensors, _, start = parse_header(buf, label)
    return _identity(buf, tensors, start)


def _extract(buf, tensors, start):
    names = _te_sorted(tensors)
    desc, off = {}, 0
    for name in names:
        dt, shape, begin, end = tensors[name]
        desc[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + end - begin]}
        off += end - begin
    text = json.dumps(desc, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    text += b" " * (-len(text) % 8)
    out = bytearray(_U64.pack(len(text)))
    out += text
    with memoryview(buf) as mv:
        for name in names:
            _, _, begin, end = tensors[name]
            with mv[start + begin:start + end] as part:
                out += part
    return bytes(out)


def extract_te(path):
    """A safetensors image (bytes) holding only the text-encoder tensors of the file at
    'path': same names, dtypes, shapes and bytes, in name order, no metadata. It is what
    a client uploads to lunad; its identity equals lora_identity(path)."""
    with _Mapped(path) as m:
        tensors, _, start = parse_header(m.buf, m.path)
        return _extract(m.buf, tensors, start)


def identity_and_image(path):
    """(lora_identity(path), extract_te(path)) from one reading of the file."""
    with _Mapped(path) as m:
        tensors, _, start = parse_header(m.buf, m.path)
        return _identity(m.buf, tensors, start), _extract(m.buf, tensors, start)


def extract_te_image(buf, label="image"):
    """extract_te for a safetensors image in memory (bytes-like): the image of its
    text-encoder tensors alone, whose identity equals identity_of_image(buf)."""
    tensors, _, start = parse_header(buf, label)
    return _extract(buf, tensors, start)


def identity_and_image_of_bytes(buf, label="in-memory LoRA"):
    """(identity_of_image(buf), extract_te_image(buf)) from one parse of the image."""
    tensors, _, start = parse_header(buf, label)
    return _identity(buf, tensors, start), _extract(buf, tensors, start)
