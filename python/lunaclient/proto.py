"""lunaclient.proto -- the lunad wire format: frames, message types, flags, status codes.

Every message in either direction is one frame (docs/PROTOCOL.md, include/luna_proto.h):

    offset size field       (all little-endian)
    0      4    magic       b"LUNA"
    4      2    version     1
    6      2    type        MSG_*
    8      4    flags       FLAG_REPLY | FLAG_ERROR
    12     4    json_len
    16     8    request_id  chosen by the client, echoed by the reply
    24     8    bin_len
    32     json_len         one UTF-8 JSON object
    ...    bin_len          raw tensor bytes, described by the JSON's "tensors" object

This module only turns frames into bytes and back, validating what it reads; the
socket side is in client.py. Nothing here evaluates received data beyond JSON and
numpy buffers (no pickle).
"""

import json
import math
import struct
from collections import namedtuple

import numpy as np

MAGIC = b"LUNA"
VERSION = 1
HEADER_SIZE = 32
_HEADER = struct.Struct("<4sHHIIQQ")  # magic, version, type, flags, json_len, request_id, bin_len

# Message types (always added at the end).
MSG_HELLO = 1
MSG_PING = 2
MSG_HEALTH = 3
MSG_STATUS = 4
MSG_MODELS = 5
MSG_ENCODE = 6
MSG_LORA = 7
MSG_VAE_DECODE = 8
MSG_VAE_ENCODE = 9

FLAG_REPLY = 0x1
FLAG_ERROR = 0x2
FLAG_PROGRESS = 0x4

DEFAULT_MAX_FRAME = 64 << 20  # lunad's default --max-frame: what it accepts from us
MAX_JSON = 16 << 20           # the JSON part is never larger
# The largest reply we accept. lunad's --max-frame bounds what it reads, not what it
# writes: an SDXL encode reply has 630,784 bytes per 77-token chunk. 1 GiB is ~1,700
# chunks, far past any real prompt, and still stops a corrupt header from making us
# allocate without bound. The C library uses the same limit.
MAX_REPLY = 1 << 30

# The status codes, mirroring LUNA_STATUS_MAP in include/luna.h (the numbers travel on
# the wire and never change). tests/python/test_client_proto.py checks this table
# against the header.
STATUS = [
    (0, "OK", "success"),
    (-1, "EINVAL", "invalid argument"),
    (-2, "ENOMEM", "out of memory"),
    (-3, "EIO", "input/output error"),
    (-4, "EFORMAT", "malformed file"),
    (-5, "EDTYPE", "unsupported dtype"),
    (-6, "EMISSING", "missing tensor"),
    (-7, "EUNEXPECTED", "unexpected tensor"),
    (-8, "ESHAPE", "tensor shape mismatch"),
    (-9, "EMODEL", "unsupported or unrecognised model"),
    (-10, "ETOKENS", "invalid token input"),
    (-11, "EJSON", "invalid JSON"),
    (-12, "EUTF8", "invalid UTF-8"),
    (-13, "EINTERNAL", "internal error"),
    (-14, "EPROTO", "protocol error"),
    (-15, "EVERSION", "unsupported protocol version"),
    (-16, "EAUTH", "authentication required or failed"),
    (-17, "ETOOBIG", "frame too large"),
    (-18, "EBUSY", "server busy: queue full"),
    (-19, "ETIMEDOUT", "deadline expired"),
    (-20, "ENOTFOUND", "model not found"),
    (-21, "EACCES", "path outside the models folders"),
    (-22, "ESHUTDOWN", "server shutting down"),
    (-23, "ECONN", "connection failed or closed"),
    (-24, "EUNKNOWN", "unknown message type"),
    (-25, "ENOLORA", "LoRA not in the daemon's cache: upload it"),
]
STATUS_NAME = {code: name for code, name, _ in STATUS}
STATUS_TEXT = {code: text for code, _, text in STATUS}
STATUS_CODE = {name: code for code, name, _ in STATUS}
globals().update({name: code for code, name, _ in STATUS})  # EINVAL = -1, ...


def status_name(code):
    """The name of status 'code' ("ENOTFOUND"), or "UNKNOWN"."""
    return STATUS_NAME.get(code, "UNKNOWN")


class LunaError(Exception):
    """A failed request or connection.

    code     the luna status number (negative), as in include/luna.h
    name     its name, e.g. "ENOTFOUND" (lunad's spelling for its own errors)
    message  what failed: lunad's message for its errors, else this side's
    reply    lunad's whole error reply (a dict) for its errors, else None
    missing  for ENOLORA: the identities lunad asks the client to upload (a list of
             hex strings, its reply's "missing"); [] otherwise
    """

    def __init__(self, code, name=None, message=None, reply=None):
        self.code = int(code)
        self.name = name or status_name(self.code)
        self.message = message if message is not None else STATUS_TEXT.get(self.code, "unknown status")
        self.reply = reply
        missing = reply.get("missing") if isinstance(reply, dict) else None
        self.missing = [m for m in missing if isinstance(m, str)] if isinstance(missing, list) else []
        super().__init__(self.code, self.name, self.message)

    def __str__(self):
        return "%s: %s" % (self.name, self.message)


Header = namedtuple("Header", "version type flags json_len request_id bin_len")

# safetensors dtype names and the numpy dtypes that hold them (F8 and BF16 have none).
_DTYPES = {
    "BOOL": np.dtype("bool"), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "F16": np.dtype("<f2"),
    "I32": np.dtype("<i4"), "U32": np.dtype("<u4"), "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "U64": np.dtype("<u8"),
}
_UNSUPPORTED = {"F8_E5M2": 1, "F8_E4M3": 1, "BF16": 2}  # known, with their sizes
_NAMES = {dt: name for name, dt in _DTYPES.items()}
_MAX_DIMS = 8
_MAX_EXACT = 2 ** 53


def pack_header(type, flags, request_id, json_len, bin_len):
    """The 32 header bytes of a frame."""
    return _HEADER.pack(MAGIC, VERSION, type, flags, json_len, request_id, bin_len)


def parse_header(buf, max_frame=MAX_REPLY):
    """Validate the first 32 bytes of 'buf' and return a Header.

    Raises LunaError EPROTO (short or bad magic), EVERSION, or ETOOBIG (JSON part over
    MAX_JSON, or the whole frame over 'max_frame'), in that order, as lunad checks.
    """
    if len(buf) < HEADER_SIZE:
        raise LunaError(EPROTO, message="frame header: %d bytes, need %d" % (len(buf), HEADER_SIZE))
    magic, version, type_, flags, json_len, request_id, bin_len = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise LunaError(EPROTO, message="frame header: bad magic %s (expected 'LUNA')" % magic.hex(" "))
    if version != VERSION:
        raise LunaError(EVERSION, message="frame header: protocol version %d, this side speaks %d" % (version, VERSION))
    if json_len > MAX_JSON:
        raise LunaError(ETOOBIG, message="frame header: json_len %d exceeds %d" % (json_len, MAX_JSON))
    if HEADER_SIZE + json_len + bin_len > max_frame:
        raise LunaError(ETOOBIG, message="frame header: %d bytes of payload exceed the maximum frame of %d"
                        % (json_len + bin_len, max_frame))
    return Header(version, type_, flags, json_len, request_id, bin_len)


def _json_default(o):
    # numpy scalars (a token id from an array, say) become plain numbers
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError("%s is not JSON serialisable" % type(o).__name__)


def dump_json(msg):
    """'msg' (a dict) as the bytes of a JSON part. NaN and infinities are refused: the
    protocol's JSON has no spelling for them."""
    if not isinstance(msg, dict):
        raise LunaError(EINVAL, message="a message is a dict (a JSON object), not %s" % type(msg).__name__)
    try:
        text = json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as e:
        raise LunaError(EINVAL, message="message cannot be sent as JSON: %s" % e) from None
    return text.encode("utf-8", "strict")


def encode_frame(type, flags, request_id, msg=None, tensors=None, raw=None):
    """A whole frame as bytes.

    msg      dict for the JSON part (None: {}); not modified
    tensors  None, or a dict name -> numpy array, written in order after the JSON part
             and described in the message's "tensors" object
    raw      None, or bytes-like sent as the binary part as they are, with no "tensors"
             description (a LORA upload's safetensors image); not with 'tensors'
    """
    if raw is not None:
        if tensors:
            raise LunaError(EINVAL, message="a frame carries tensors or a raw binary part, not both")
        return encode_frame_head(type, flags, request_id, msg, len(raw)) + bytes(raw)
    msg = dict(msg) if msg else {}
    parts = []
    if tensors:
        desc, off = {}, 0
        for name, arr in tensors.items():
            a = np.ascontiguousarray(arr)
            dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
            if dt not in _NAMES:
                raise LunaError(EDTYPE, message="tensor '%s': dtype %s has no wire name" % (name, a.dtype))
            a = a.astype(dt, copy=False)
            data = a.tobytes()
            desc[name] = {"dtype": _NAMES[dt], "shape": list(a.shape), "data_offsets": [off, off + len(data)]}
            parts.append(data)
            off += len(data)
        msg["tensors"] = desc
    js = dump_json(msg)
    if len(js) > MAX_JSON:
        raise LunaError(ETOOBIG, message="JSON part of %d bytes exceeds %d" % (len(js), MAX_JSON))
    binary = b"".join(parts)
    return pack_header(type, flags, request_id, len(js), len(binary)) + js + binary


def encode_frame_head(type, flags, request_id, msg, bin_len):
    """The header and JSON part of a frame whose binary part of 'bin_len' bytes the
    caller sends after them, as they are."""
    js = dump_json(dict(msg) if msg else {})
    if len(js) > MAX_JSON:
        raise LunaError(ETOOBIG, message="JSON part of %d bytes exceeds %d" % (len(js), MAX_JSON))
    return pack_header(type, flags, request_id, len(js), bin_len) + js


def _reject_constant(name):
    raise ValueError("%s is not JSON" % name)


def parse_json(data):
    """Parse a JSON part: one UTF-8 JSON object. Raises LunaError(EJSON) otherwise."""
    if not data:
        raise LunaError(EJSON, message="JSON part is empty")
    try:
        text = bytes(data).decode("utf-8", "strict")
    except UnicodeDecodeError as e:
        raise LunaError(EJSON, message="JSON part is not valid UTF-8 (byte %d)" % e.start) from None
    if "\0" in text:
        raise LunaError(EJSON, message="JSON part contains a NUL byte")
    try:
        v = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise LunaError(EJSON, message="JSON part does not parse: %s" % e) from None
    if not isinstance(v, dict):
        raise LunaError(EJSON, message="JSON part is not an object")
    return v


def _uint(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= _MAX_EXACT and \
        math.floor(v) == v


def get_tensors(msg, binary):
    """The tensors that msg["tensors"] describes in the binary part 'binary', as a dict
    name -> numpy array. Arrays are views into 'binary' (writable when it is a
    bytearray). Raises LunaError EPROTO for a description that does not hold
    (unknown fields, offsets past the part, size not matching the shape) and EDTYPE
    for dtypes numpy cannot hold (BF16, F8)."""
    desc = msg.get("tensors")
    if desc is None:
        return {}
    if not isinstance(desc, dict):
        raise LunaError(EPROTO, message="\"tensors\" is not an object")
    out = {}
    for name, e in desc.items():
        where = "tensor '%s'" % name
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise LunaError(EPROTO, message="%s: want exactly dtype, shape and data_offsets" % where)
        dt, shape, off = e["dtype"], e["shape"], e["data_offsets"]
        if dt in _UNSUPPORTED:
            raise LunaError(EDTYPE, message="%s: dtype %s has no numpy equivalent" % (where, dt))
        if dt not in _DTYPES:
            raise LunaError(EPROTO, message="%s: unknown dtype %r" % (where, dt))
        if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_uint(d) for d in shape):
            raise LunaError(EPROTO, message="%s: shape is not a list of at most %d non-negative integers"
                            % (where, _MAX_DIMS))
        if not isinstance(off, list) or len(off) != 2 or not all(_uint(x) for x in off):
            raise LunaError(EPROTO, message="%s: data_offsets is not two non-negative integers" % where)
        shape = [int(d) for d in shape]
        begin, end = int(off[0]), int(off[1])
        nbytes = _DTYPES[dt].itemsize * math.prod(shape)
        if end < begin or end - begin != nbytes:
            raise LunaError(EPROTO, message="%s: data_offsets [%d, %d] do not hold %d bytes of %s %s"
                            % (where, begin, end, nbytes, dt, shape))
        if end > len(binary):
            raise LunaError(EPROTO, message="%s ends at %d, past the %d-byte binary part" % (where, end, len(binary)))
        out[name] = np.frombuffer(binary, dtype=_DTYPES[dt], count=math.prod(shape), offset=begin).reshape(shape)
    return out


def decode_frame(buf, max_frame=MAX_REPLY):
    """Split one complete frame 'buf' into (Header, msg dict, tensors dict). Extra bytes
    after the frame are an error (EPROTO)."""
    h = parse_header(buf, max_frame)
    total = HEADER_SIZE + h.json_len + h.bin_len
    if len(buf) != total:
        raise LunaError(EPROTO, message="frame of %d bytes, header says %d" % (len(buf), total))
    mv = memoryview(buf)
    msg = parse_json(mv[HEADER_SIZE:HEADER_SIZE + h.json_len])
    return h, msg, get_tensors(msg, mv[HEADER_SIZE + h.json_len:])


def error_from_reply(msg):
    """The LunaError that an error reply's JSON {"code", "name", "message"} describes."""
    code = msg.get("code")
    if not isinstance(code, int) or isinstance(code, bool) or code >= 0:
        return LunaError(EPROTO, message="error reply without a valid negative \"code\": %.200r" % (msg,))
    name = msg.get("name") if isinstance(msg.get("name"), str) else None
    text = msg.get("message") if isinstance(msg.get("message"), str) else None
    return LunaError(code, name, text, reply=msg)
