"""lunaclient.client -- one connection to lunad: requests, replies, pipelining.

    with Client.unix("/run/user/1000/lunad.sock") as c:
        c.ping()
        cond, pooled, info = c.encode("sd15.safetensors", tokens={"l": [...]})

The simple calls (ping, health, status, models, encode, lora_*) send one request and
wait for its reply, raising LunaError when lunad reports an error. For many requests in flight
on one connection, use send() and recv(): lunad answers each request exactly once, in
any order, and recv() returns replies as they come, errors included (the ERROR flag
is set in 'flags' and 'msg' holds {"code", "name", "message"}).

A Client is not thread-safe: use it from one thread at a time. After a failure of the
connection itself (LunaError ECONN, ETIMEDOUT or a broken frame) the client is closed.

VAE: vae_decode(model, latent) and vae_encode(model, pixels) take and return numpy
arrays; their 'progress' callback gets lunad's progress frames (flags REPLY|PROGRESS),
which recv() never returns as replies (send(..., progress=fn) routes them per request).

LoRA stacks: encode(..., loras=[("style.safetensors", 0.8), ...]) names each LoRA by its
identity (lora.lora_identity, remembered per file while its size and mtime stay), and
when lunad answers ENOLORA uploads the files it lacks and asks again (at most
LORA_ROUNDS times), as the C library does. An entry may also be a LoRA held in memory,
LoraImage(data, strength[, identity]): 'data' the bytes of a safetensors image.

Textual-inversion embeddings: a token slot of encode()'s 'tokens' may hold a 1-D float
vector instead of an id (what ComfyUI's tokenizer puts there for "embedding:name"):
the client sends the vectors in the binary part ("embeds", docs/PROTOCOL.md) and lunad
uses each as that slot's input embedding.
"""

import collections
import json
import math
import numbers
import os
import socket
import time

import numpy as np

from . import lora as _lora
from . import proto
from .proto import LunaError

CLIENT_NAME = "lunaclient"
LORA_ROUNDS = 3     # upload-and-retry rounds of an encode whose LoRAs lunad lacks
MAX_LORAS = 16      # entries of a LoRA stack (LUNA_MAX_LORAS)


def default_socket():
    """The socket lunad listens on when given none: $LUNA_SOCKET, else
    $XDG_RUNTIME_DIR/lunad.sock, else /tmp/lunad-<uid>.sock (as luna_default_socket)."""
    path = os.environ.get("LUNA_SOCKET")
    if path:
        return path
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run:
        return os.path.join(run, "lunad.sock")
    return "/tmp/lunad-%d.sock" % os.getuid()


def _model_spec(model):
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    models = [os.fspath(m) for m in model]
    if not 1 <= len(models) <= 4:
        raise LunaError(proto.EINVAL, message="a model is 1 to 4 paths, not %d" % len(models))
    return models[0] if len(models) == 1 else models


def _check_strength(i, what, strength):
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise LunaError(proto.EINVAL, message="loras[%d] (%s): strength %r is not a finite number" % (i, what, strength))
    return float(strength)


def _image_entry(i, data, strength, ident):
    """(LoraImage, strength, None) for an in-memory LoRA entry."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
        raise LunaError(proto.EINVAL, message="loras[%d]: .data is not the bytes of a safetensors image" % i)
    strength = _check_strength(i, "in-memory LoRA", strength)
    try:
        return _lora.LoraImage(data, strength, ident), strength, None
    except LunaError as e:
        raise LunaError(e.code, message="loras[%d]: %s" % (i, e.message)) from None


def _lora_entry(i, e):
    """(source, strength, daemon_path) from a (path, strength[, daemon_path]) tuple, a dict,
    an object with .path, .strength and optionally .daemon_path, or an in-memory LoRA
    (LoraImage, or any object or dict with .data, .strength and optionally .identity).
    'source' is a path (str) or a LoraImage."""
    if isinstance(e, _lora.LoraImage):
        return e, _check_strength(i, "in-memory LoRA", e.strength), None
    if isinstance(e, tuple) and len(e) == 3 and isinstance(e[0], _lora.LoraImage) and e[2] is None:
        return e[0], _check_strength(i, "in-memory LoRA", e[1]), None   # an entry lora_stack made
    if isinstance(e, dict) and "data" in e:
        return _image_entry(i, e.get("data"), e.get("strength"), e.get("identity"))
    if not isinstance(e, (dict, tuple, list)) and hasattr(e, "data"):
        return _image_entry(i, e.data, getattr(e, "strength", None), getattr(e, "identity", None))
    if isinstance(e, dict):
        path, strength, dpath = e.get("path"), e.get("strength"), e.get("daemon_path")
    elif isinstance(e, (tuple, list)):
        if len(e) not in (2, 3):
            raise LunaError(proto.EINVAL, message="loras[%d]: want (path, strength[, daemon_path])" % i)
        path, strength, dpath = e[0], e[1], (e[2] if len(e) == 3 else None)
    else:
        path, strength, dpath = getattr(e, "path", None), getattr(e, "strength", None), getattr(e, "daemon_path", None)
    if not isinstance(path, (str, bytes, os.PathLike)) or not os.fspath(path):
        raise LunaError(proto.EINVAL, message="loras[%d]: no file path" % i)
    path = os.fsdecode(path)
    strength = _check_strength(i, path, strength)
    if dpath is not None and (not isinstance(dpath, (str, os.PathLike)) or not os.fspath(dpath)):
        raise LunaError(proto.EINVAL, message="loras[%d] (%s): daemon_path is empty (None for none)" % (i, path))
    return path, strength, (os.fspath(dpath) if dpath is not None else None)


def lora_stack(loras):
    """The LoRA stack 'loras' (see Client.encode) as a list of (source, strength,
    daemon_path), 'source' a path or a LoraImage."""
    if loras is None:
        return []
    stack = [_lora_entry(i, e) for i, e in enumerate(loras)]
    if len(stack) > MAX_LORAS:
        raise LunaError(proto.EINVAL, message="a LoRA stack has at most %d entries, not %d" % (MAX_LORAS, len(stack)))
    return stack


def _stat_key(st):
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class EncodeRequest(dict):
    """The JSON of an encode request (a dict) and, in '.raw', the bytes of its binary
    part (the "embeds" vectors) or None. send() sends '.raw' when given no binary part."""

    raw = None


def _slot_error(key, ci, pj, text):
    return LunaError(proto.EINVAL, message="tokens \"%s\" chunk %d slot %d: %s" % (key, ci, pj, text))


def _as_vector(x, key, ci, pj):
    """A token slot that is not an id as a float32 1-D numpy vector (numpy arrays,
    torch tensors of any float dtype, lists of floats)."""
    try:
        a = np.asarray(x)
        if a.dtype.kind not in "fiu":
            raise TypeError("not numeric")
        a = a.astype(np.float32)
    except (TypeError, ValueError, RuntimeError):
        # torch bfloat16 (numpy has no such dtype) and tensors on a device
        try:
            a = np.asarray(x.detach().to("cpu").float().numpy(), dtype=np.float32)
        except Exception:
            raise _slot_error(key, ci, pj, "%s is neither a token id (an int) nor a 1-D float vector"
                              % type_name(x)) from None
    if a.ndim != 1 or a.shape[0] < 1:
        raise _slot_error(key, ci, pj, "an embedding vector must be 1-D and not empty, not of shape %s"
                          % list(a.shape))
    if not np.all(np.isfinite(a)):
        bad = int(np.flatnonzero(~np.isfinite(a))[0])
        raise _slot_error(key, ci, pj, "the embedding vector's value %d is %s" % (bad, a[bad]))
    return np.ascontiguousarray(a, dtype="<f4")


def prepare_tokens(tokens):
    """Split ComfyUI's token dict into (JSON tokens, "embeds" description or None,
    binary part bytes): ids (ints, numpy ints) stay ids, slots holding a vector become
    {"embed": row} with the vector a row of that encoder's F32 matrix (equal vectors
    share a row). Pairs (id, weight) and triples (id, weight, word id) are accepted;
    structure and weights are checked by lunad, vectors here (EINVAL naming the
    encoder, chunk and slot)."""
    if not isinstance(tokens, dict):
        return tokens, None, b""
    out, mats = {}, {}
    for key, chunks in tokens.items():
        if not isinstance(chunks, (list, tuple)):
            out[key] = chunks
            continue
        rows, index, width, first = [], {}, None, None
        new_chunks = []
        for ci, chunk in enumerate(chunks):
            if not isinstance(chunk, (list, tuple)):
                new_chunks.append(chunk)
                continue
            new_chunk = []
            for pj, pair in enumerate(chunk):
                if not isinstance(pair, (list, tuple)) or not pair:
                    new_chunk.append(pair)
                    continue
                t = pair[0]
                if isinstance(t, numbers.Integral) and not isinstance(t, bool):
                    new_chunk.append([int(t)] + list(pair[1:]))
                    continue
                if isinstance(t, (numbers.Real, bool, str, bytes, dict)) or t is None:
                    new_chunk.append(list(pair))  # lunad says what is wrong with it
                    continue
                v = _as_vector(t, key, ci, pj)
                if width is None:
                    width, first = v.shape[0], (ci, pj)
                elif v.shape[0] != width:
                    raise _slot_error(key, ci, pj, "an embedding vector of width %d, but the one at chunk %d slot %d "
                                      "is %d wide (one encoder takes one width)" % (v.shape[0], first[0], first[1],
                                                                                    width))
                b = v.tobytes()
                row = index.get(b)
                if row is None:
                    row = index[b] = len(rows)
                    rows.append(b)
                new_chunk.append([{"embed": row}] + list(pair[1:]))
            new_chunks.append(new_chunk)
        out[key] = new_chunks
        if rows:
            mats[key] = (b"".join(rows), len(rows), width)
    if not mats:
        return out, None, b""
    desc, parts, off = {}, [], 0
    for key, (data, n, width) in mats.items():
        desc[key] = {"dtype": "F32", "shape": [n, width], "data_offsets": [off, off + len(data)]}
        parts.append(data)
        off += len(data)
    return out, desc, b"".join(parts)


class Client:
    """A connection to lunad. Make one with Client.unix() or Client.tcp()."""

    def __init__(self, sock, peer, max_reply=proto.MAX_REPLY):
        self._sock = sock
        self.peer = peer
        self.max_reply = max_reply
        self._next_id = 1
        self._stash = collections.OrderedDict()  # replies that call() read for others
        self._pending = set()     # ids sent whose final reply has not been read
        self._progress = {}       # request id -> callable(fraction), for progress frames
        self._lora_ids = {}  # path -> (stat key, identity)

    # ---- connecting -------------------------------------------------------------

    @classmethod
    def unix(cls, path=None, timeout=None):
        """Connect to lunad's Unix socket ('path', default default_socket()).
        'timeout' (seconds) bounds each socket operation; None waits forever. A
        timeout raises LunaError ETIMEDOUT and closes the client (a reply may be half
        read); a long decode's progress frames keep it from expiring."""
        path = os.fspath(path) if path is not None else default_socket()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            raise LunaError(proto.ECONN, message="cannot connect to lunad at %s: %s" % (path, e.strerror or e)) \
                from None
        return cls(s, "unix:" + path)

    @classmethod
    def tcp(cls, host, port, token, timeout=None):
        """Connect to lunad's TCP listener and authenticate with 'token' (the content of
        its --token-file). A wrong token raises LunaError EAUTH."""
        if not token:
            raise LunaError(proto.EINVAL, message="a TCP connection needs lunad's token")
        try:
            s = socket.create_connection((host, int(port)), timeout=timeout)
        except OSError as e:
            raise LunaError(proto.ECONN, message="cannot connect to lunad at %s:%s: %s"
                            % (host, port, e.strerror or e)) from None
        s.settimeout(timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = cls(s, "tcp:%s:%s" % (host, port))
        try:
            reply = c.hello(token)
            if reply.get("authenticated") is not True:
                raise LunaError(proto.EAUTH, message="lunad answered the hello without \"authenticated\": true")
        except BaseException:
            c.close()
            raise
        return c

    def close(self):
        """Close the connection (again is harmless)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self):
        return self._sock is None

    # ---- frames -----------------------------------------------------------------

    def _broken(self, code, message):
        self.close()
        return LunaError(code, message="%s: %s" % (self.peer, message))

    def send(self, type, msg=None, tensors=None, raw=None, progress=None):
        """Send one request of message 'type' (proto.MSG_*) with the JSON object 'msg'
        and optional tensors (dict name -> numpy array), or 'raw' bytes sent as the
        binary part as they are (no "tensors" description); return its request id.
        An EncodeRequest 'msg' (encode_request) brings its own binary part, '.raw'.
        'progress': a callable(fraction) that receives this request's progress frames
        (VAE work whose 'msg' has "progress": true) until its reply is read."""
        if self._sock is None:
            raise LunaError(proto.ECONN, message="%s: not connected" % self.peer)
        if raw is not None and tensors:
            raise LunaError(proto.EINVAL, message="send tensors or a raw binary part, not both")
        if progress is not None and not callable(progress):
            raise LunaError(proto.EINVAL, message="progress is a callable(fraction), not %s" % type_name(progress))
        if raw is None and not tensors and getattr(msg, "raw", None) is not None:
            raw = msg.raw  # an EncodeRequest's embedding vectors
        rid = self._next_id
        self._next_id += 1
        if raw is None:
            frame, rest = proto.encode_frame(type, 0, rid, msg, tensors), None
        else:
            frame, rest = proto.encode_frame_head(type, 0, rid, msg, len(raw)), raw
        self._pending.add(rid)
        if progress is not None:
            self._progress[rid] = progress
        try:
            self._sock.sendall(frame)
            if rest:
                self._sock.sendall(rest)
        except TimeoutError:
            raise self._broken(proto.ETIMEDOUT, "lunad took none of the request for %g s (the client's timeout)"
                               % self._sock.gettimeout()) from None
        except OSError as e:
            # lunad may have refused the frame (ETOOBIG) and closed: its error reply,
            # if it got that far, is still waiting to be read and says more than EPIPE.
            if isinstance(e, (BrokenPipeError, ConnectionResetError)):
                try:
                    reply = self._recv_wire()
                except LunaError:
                    reply = None
                if reply is not None and reply[1] & proto.FLAG_ERROR:
                    self._stash[reply[0]] = reply
                    self.close()
                    return rid
            raise self._broken(proto.ECONN, "sending a request: %s" % (e.strerror or e)) from None
        return rid

    def _read_exact(self, n, what):
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self._sock.recv_into(view[got:], n - got)
            except InterruptedError:
                continue
            except TimeoutError:  # socket.timeout: the reply's place in the stream is lost
                raise self._broken(proto.ETIMEDOUT, "nothing from lunad for %g s while waiting for the reply's %s "
                                   "(the client's timeout)" % (self._sock.gettimeout(), what)) from None
            except OSError as e:
                raise self._broken(proto.ECONN, "reading the reply's %s: %s" % (what, e.strerror or e)) from None
            if k == 0:
                if got == 0 and what == "header":
                    raise self._broken(proto.ECONN, "lunad closed the connection")
                raise self._broken(proto.ECONN, "lunad closed the connection in the middle of the reply's %s "
                                   "(%d of %d bytes)" % (what, got, n))
            got += k
        return buf

    def recv(self):
        """Read the next reply: (request_id, flags, msg, tensors). An error reply is
        returned, not raised (flags & proto.FLAG_ERROR); use proto.error_from_reply(msg).
        Progress frames are never returned: they go to the callback given to send()
        for their request (or are dropped). Raises LunaError when the connection fails
        or the frame is malformed."""
        if self._stash:
            return self._stash.popitem(last=False)[1]
        return self._recv_wire()

    def _recv_wire(self):
        while True:
            r = self._recv_frame()
            if r is not None:
                return r

    def _recv_frame(self):
        """Read one frame: a reply as recv() returns it, or None after a progress frame
        (handed to its request's callback)."""
        if self._sock is None:
            raise LunaError(proto.ECONN, message="%s: not connected" % self.peer)
        head = self._read_exact(proto.HEADER_SIZE, "header")
        try:
            h = proto.parse_header(head, self.max_reply)
        except LunaError as e:
            raise self._broken(proto.EPROTO, "reply %s" % e.message) from None
        if not h.flags & proto.FLAG_REPLY:
            raise self._broken(proto.EPROTO, "a frame without the REPLY flag came back (flags 0x%x)" % h.flags)
        if h.flags & proto.FLAG_PROGRESS:
            self._take_progress(h)
            return None
        body = self._read_exact(h.json_len + h.bin_len, "JSON and binary parts")
        self._pending.discard(h.request_id)
        self._progress.pop(h.request_id, None)
        mv = memoryview(body)
        try:
            msg = proto.parse_json(mv[:h.json_len])
            tensors = proto.get_tensors(msg, mv[h.json_len:]) if not h.flags & proto.FLAG_ERROR else {}
        except LunaError as e:
            raise LunaError(proto.EPROTO, message="%s: reply to request %d: %s" % (self.peer, h.request_id, e)) \
                from None
        return h.request_id, h.flags, msg, tensors

    def _take_progress(self, h):
        """A progress frame (header 'h'): {"progress": fraction} for a request in flight,
        with no binary part. Anything else breaks the connection (EPROTO): that
        request's reply is still to come and could not be told apart."""
        if h.flags & proto.FLAG_ERROR:
            raise self._broken(proto.EPROTO, "a progress frame with the ERROR flag came back (flags 0x%x)" % h.flags)
        if h.request_id not in self._pending:
            raise self._broken(proto.EPROTO, "progress for request %d, which is not in flight" % h.request_id)
        if h.bin_len:
            raise self._broken(proto.EPROTO, "a progress frame for request %d has a %d-byte binary part"
                               % (h.request_id, h.bin_len))
        body = self._read_exact(h.json_len, "progress JSON part")
        try:
            msg = proto.parse_json(body)
        except LunaError as e:
            raise self._broken(proto.EPROTO, "progress of request %d: %s" % (h.request_id, e.message)) from None
        v = msg.get("progress")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._broken(proto.EPROTO, "progress of request %d without a numeric \"progress\"" % h.request_id)
        fn = self._progress.get(h.request_id)
        if fn is not None:
            try:
                fn(min(max(float(v), 0.0), 1.0))
            except BaseException:
                # the request cannot be abandoned on an open connection (its reply would
                # come later): closing it is what cancels the work on lunad's side
                self.close()
                raise

    def call(self, type, msg=None, tensors=None, raw=None, progress=None):
        """Send one request and wait for its reply: (msg, tensors). Raises LunaError
        for an error reply. Replies to other requests in flight are kept for recv().
        'raw': bytes sent as the binary part as they are; 'progress': the request's
        progress callback (see send)."""
        rid = self.send(type, msg, tensors, raw, progress)
        while True:
            if rid in self._stash:
                r = self._stash.pop(rid)
            else:
                r = self._recv_wire()
                if r[0] != rid:
                    self._stash[r[0]] = r
                    continue
            _, flags, reply, rtensors = r
            if flags & proto.FLAG_ERROR:
                raise proto.error_from_reply(reply)
            return reply, rtensors

    # ---- messages ---------------------------------------------------------------

    def hello(self, token=None):
        """Send hello (required first on TCP, optional on the Unix socket)."""
        msg = {"protocol": proto.VERSION, "client": CLIENT_NAME}
        if token is not None:
            msg["token"] = token
        return self.call(proto.MSG_HELLO, msg)[0]

    def ping(self):
        """One empty round trip; returns its time in seconds."""
        t = time.perf_counter()
        self.call(proto.MSG_PING)
        return time.perf_counter() - t

    def health(self):
        """{"live", "ready", "models": [...]}"""
        return self.call(proto.MSG_HEALTH)[0]

    def status(self):
        """lunad's counters, memory, queue, cache and models (docs/PROTOCOL.md)."""
        return self.call(proto.MSG_STATUS)[0]

    def models(self, action="list", model=None, kind=None):
        """List ("list"), load ("load", waits until ready or failed), unload ("unload") or
        verify ("verify") a model: one path or a list of up to 4, relative to lunad's
        models folders; kind "vae" names the VAE of the files (default: text encoders)."""
        msg = {"action": action}
        if model is not None:
            msg["model"] = _model_spec(model)
        if kind is not None:
            if kind not in ("text", "vae"):
                raise LunaError(proto.EINVAL, message="kind is \"text\" or \"vae\", not %r" % (kind,))
            msg["kind"] = kind
        return self.call(proto.MSG_MODELS, msg)[0]

    def encode_request(self, model, tokens=None, text=None, clip_layer=None, deadline_ms=None, cache=True,
                       loras=None):
        """The JSON of an encode request (for send()); the arguments are encode()'s.
        With 'loras', each identity is computed here (a LoRA lunad lacks then comes back
        as ENOLORA; lora_upload() it and send again). Returns an EncodeRequest: a dict
        whose '.raw' holds the binary part when token slots carry embedding vectors
        (send() sends it)."""
        if (tokens is None) == (text is None):
            raise LunaError(proto.EINVAL, message="give exactly one of tokens and text")
        msg = EncodeRequest(model=_model_spec(model))
        if tokens is not None:
            if isinstance(tokens, (str, bytes)):
                tokens = json.loads(tokens)
            tokens, embeds, raw = prepare_tokens(tokens)
            msg["tokens"] = tokens
            if embeds:
                msg["embeds"] = embeds
                msg.raw = raw
        else:
            msg["text"] = text
        if clip_layer:
            msg["clip_layer"] = int(clip_layer)
        if deadline_ms:
            msg["deadline_ms"] = int(deadline_ms)
        if not cache:
            msg["cache"] = False
        stack = lora_stack(loras)
        if stack:
            entries = []
            for src, strength, dpath in stack:
                e = {"id": self._source_id(src), "strength": strength}
                if dpath is not None:
                    e["path"] = dpath
                entries.append(e)
            msg["loras"] = entries
        return msg

    def encode(self, model, tokens=None, text=None, clip_layer=None, deadline_ms=None, cache=True, loras=None):
        """Run a model's text encoders on lunad.

        model        a path relative to lunad's models folders, or a list of them (a
                     clip_l and a clip_g file)
        tokens       what ComfyUI's CLIP.tokenize() returns: {"l": chunks, "g": chunks},
                     each chunk 77 (id, weight) pairs (a dict, or its JSON text). An id
                     may instead be a 1-D float vector of the encoder's width (numpy
                     array, torch tensor, list of floats): a textual-inversion
                     embedding's vector, used as that slot's input embedding
        text         or the prompt itself, tokenized by lunad (needs its --tokenizer)
        clip_layer   -N as CLIPSetLastLayer(-N); None: the family's default
        deadline_ms  give up if the work has not started within this many ms
        cache        False bypasses lunad's result cache
        loras        a LoRA stack, in the order the LoRAs apply (at most 16): each entry
                     a (path, strength) or (path, strength, daemon_path) tuple, or an
                     object with .path, .strength and optionally .daemon_path (Lora).
                     'path' is a local file, read for its identity and uploaded when
                     lunad lacks it; 'daemon_path' the same file relative to lunad's
                     --loras-dir, which lunad tries first; strength any finite number.
                     Or a LoRA in memory: LoraImage(data, strength[, identity]) (or an
                     object with .data, .strength, optionally .identity), 'data' the
                     bytes of a safetensors image, uploaded from memory when missing

        Returns (cond float32 [1, 77*chunks, D], pooled float32 [1, Dp], info), info
        being the reply without "tensors": {"family": "sdxl", "cached": False, ...},
        with a LoRA stack also "lora": {"mode", "patched", "unmapped", "unmapped_keys"}.
        """
        stack = lora_stack(loras)
        msg = self.encode_request(model, tokens, text, clip_layer, deadline_ms, cache, stack)
        rounds = 0
        while True:
            try:
                reply, tensors = self.call(proto.MSG_ENCODE, msg)
                break
            except LunaError as e:
                if e.code != proto.ENOLORA or not stack or not e.missing:
                    raise
                if rounds == LORA_ROUNDS:
                    raise LunaError(e.code, e.name, "%s (still missing after %d rounds of uploads)"
                                    % (e.message, LORA_ROUNDS), reply=e.reply) from None
                rounds += 1
                self._upload_missing(stack, [x["id"] for x in msg["loras"]], e.missing)
        return split_encode_reply(reply, tensors, self.peer)

    # ---- VAE ----------------------------------------------------------------------

    def vae_request(self, model, tiled="auto", tile=512, overlap=64, progress=False, deadline_ms=None):
        """The JSON of a VAE request (for send(); the input tensor goes in its 'tensors'):
        the arguments are vae_decode()'s, 'progress' a bool (ask for progress frames)."""
        if not isinstance(model, (str, os.PathLike)) or not os.fspath(model):
            raise LunaError(proto.EINVAL, message="a VAE model is one path relative to lunad's models folders")
        if tiled not in ("auto", True, False) or (isinstance(tiled, int) and not isinstance(tiled, bool)):
            raise LunaError(proto.EINVAL, message="tiled is \"auto\", True or False, not %r" % (tiled,))
        for name, v, lo in (("tile", tile, 1), ("overlap", overlap, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise LunaError(proto.EINVAL, message="%s is an integer >= %d (pixels), not %r" % (name, lo, v))
        if overlap >= tile:
            raise LunaError(proto.EINVAL, message="overlap %d is not smaller than the tile size %d" % (overlap, tile))
        msg = {"model": os.fspath(model), "tiled": tiled, "tile": int(tile), "overlap": int(overlap)}
        if progress:
            msg["progress"] = True
        if deadline_ms:
            msg["deadline_ms"] = int(deadline_ms)
        return msg

    def _vae(self, type, what, model, name, arr, rank_shape, tiled, tile, overlap, progress, deadline_ms):
        if progress is not None and not callable(progress):
            raise LunaError(proto.EINVAL, message="progress is a callable(fraction), not %s" % type_name(progress))
        msg = self.vae_request(model, tiled, tile, overlap, progress is not None, deadline_ms)
        try:
            a = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
        except (TypeError, ValueError) as e:
            raise LunaError(proto.EINVAL, message="%s: '%s' is not a float array: %s" % (what, name, e)) from None
        if a.ndim != 4 or min(a.shape) < 1 or (rank_shape and a.shape[3] != 3):
            raise LunaError(proto.EINVAL, message="%s: '%s' is %s; expected a float32 array %s" % (
                what, name, list(a.shape), rank_shape or "[B, C, h, w]"))
        if rank_shape and (a.shape[1] < 8 or a.shape[2] < 8):
            raise LunaError(proto.EINVAL, message="%s: a %dx%d image is smaller than one 8x8 latent cell"
                            % (what, a.shape[1], a.shape[2]))
        reply, tensors = self.call(type, msg, {name: a}, progress=progress)
        return reply, tensors, a.shape

    def vae_decode(self, model, latent, tiled="auto", tile=512, overlap=64, progress=None, deadline_ms=None):
        """Decode a latent on lunad as ComfyUI's VAEDecode (VAEDecodeTiled when tiled).

        model        a checkpoint (its VAE) or a VAE file, relative to lunad's models folders
        latent       float32 [B, C, h, w] (anything numpy turns into one), unscaled as
                     ComfyUI passes it to the VAE
        tiled        "auto" (lunad tiles when untiled work would exceed its --vae-max-mem),
                     True or False
        tile         tile size in pixels; overlap: between tiles, smaller than the tile
        progress     None, or a callable(fraction) called with lunad's progress reports
                     (0 to 1) while it works. If it raises, the connection is closed, which
                     cancels the work, and the exception propagates
        deadline_ms  give up if the work has not started within this many ms

        Returns (image float32 [B, 8h, 8w, 3] in [0, 1], info): info is the reply without
        "tensors": {"tiled": bool, "tile": n, "overlap": n, "ms": compute time}.
        """
        reply, tensors, shape = self._vae(proto.MSG_VAE_DECODE, "vae_decode", model, "latent", latent, None, tiled,
                                          tile, overlap, progress, deadline_ms)
        B, _, h, w = shape
        return _vae_result(reply, tensors, "image", (B, 8 * h, 8 * w, 3), "vae_decode", self.peer)

    def vae_encode(self, model, pixels, tiled="auto", tile=512, overlap=64, progress=None, deadline_ms=None):
        """Encode images on lunad as ComfyUI's VAEEncode (VAEEncodeTiled when tiled):
        'pixels' float32 [B, H, W, 3] in [0, 1] (ComfyUI's IMAGE); the other arguments
        are vae_decode()'s. Returns (latent float32 [B, C, H/8, W/8], the posterior mean
        after ComfyUI's centered crop to multiples of 8, and info)."""
        reply, tensors, shape = self._vae(proto.MSG_VAE_ENCODE, "vae_encode", model, "image", pixels,
                                          "[B, H, W, 3]", tiled, tile, overlap, progress, deadline_ms)
        B, H, W, _ = shape
        return _vae_result(reply, tensors, "latent", (B, None, H // 8, W // 8), "vae_encode", self.peer)

    # ---- LoRAs --------------------------------------------------------------------

    def lora_id(self, path):
        """The identity of the LoRA file at 'path' (lora.lora_identity), remembered
        while the file keeps its inode, size and modification time."""
        path = os.fsdecode(path)
        try:
            key = _stat_key(os.stat(path))
        except OSError as e:
            raise LunaError(proto.EIO, message="LoRA %s: %s" % (path, e.strerror or e)) from None
        hit = self._lora_ids.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        ident = _lora.lora_identity(path)
        try:
            if _stat_key(os.stat(path)) == key:  # unchanged while it was read
                self._lora_ids[path] = (key, ident)
        except OSError:
            pass
        return ident

    def _source_id(self, src):
        """The identity of a stack entry's source: a file (lora_id) or a LoraImage."""
        if isinstance(src, _lora.LoraImage):
            return src.identity
        return self.lora_id(src)

    def _upload_missing(self, stack, ids, missing):
        todo = {}
        for m in missing:
            hits = [i for i, x in enumerate(ids) if x == m.lower()]
            if not hits:
                raise LunaError(proto.EPROTO, message="%s: lunad asks for LoRA %.80s, which is not in this "
                                "request's stack" % (self.peer, m))
            todo.setdefault(ids[hits[0]], stack[hits[0]][0])
        for ident, src in todo.items():
            what = "in-memory LoRA %s" % ident[:16] if isinstance(src, _lora.LoraImage) else src
            try:
                if isinstance(src, _lora.LoraImage):
                    self.lora_upload_image(src.data, expect=ident)
                else:
                    self.lora_upload(src, expect=ident)
            except LunaError as e:
                raise LunaError(e.code, e.name, "uploading LoRA %s: %s" % (what, e.message), reply=e.reply) \
                    from None

    def lora_upload_image(self, data, expect=None):
        """lora_upload() for a LoRA held in memory: 'data' the bytes of a safetensors
        image (its text-encoder tensors are sent, as for a file). 'expect': the identity
        the image should have (EINVAL when it differs)."""
        ident, image = _lora.identity_and_image_of_bytes(data)
        if expect is not None and ident != expect:
            raise LunaError(proto.EINVAL, message="the in-memory LoRA's identity is %s, not the %s it was given"
                            % (ident, expect))
        reply = self.call(proto.MSG_LORA, {"action": "upload", "id": ident}, raw=image)[0]
        got = reply.get("id")
        if isinstance(got, str) and got.lower() != ident:
            raise LunaError(proto.EPROTO, message="%s: lunad stored an in-memory LoRA %s as %s" % (self.peer, ident, got))
        return reply

    def lora_upload(self, path, expect=None):
        """Upload the text-encoder tensors of the LoRA file at 'path' to lunad's LoRA
        cache (harmless when it has them). Returns lunad's reply: {"id", "patches",
        "te_tensors", "unmapped", "unmapped_keys", "bytes", "cached"}. 'expect': the
        identity the file should have (EINVAL when it changed)."""
        path = os.fsdecode(path)
        ident, image = _lora.identity_and_image(path)
        if expect is not None and ident != expect:
            raise LunaError(proto.EINVAL, message="LoRA %s changed while in use: its identity is now %s, it was %s"
                            % (path, ident, expect))
        reply = self.call(proto.MSG_LORA, {"action": "upload", "id": ident}, raw=image)[0]
        got = reply.get("id")
        if isinstance(got, str) and got.lower() != ident:
            raise LunaError(proto.EPROTO, message="%s: lunad stored LoRA %s as %s" % (self.peer, path, got))
        return reply

    def lora_list(self):
        """lunad's LoRA cache: {"loras": [{"id", "source", "bytes", "patches", "refs",
        "pinned", "hits", "idle_s"}], "used_bytes", "budget_bytes"}."""
        return self.call(proto.MSG_LORA, {"action": "list"})[0]

    def _lora_action(self, action, ident):
        if not isinstance(ident, str):
            raise LunaError(proto.EINVAL, message="a LoRA identity is a string of 64 hex digits")
        return self.call(proto.MSG_LORA, {"action": action, "id": ident.lower()})[0]

    def lora_evict(self, ident):
        """Drop LoRA 'ident' from lunad's cache: {"evicted": bool, "deferred": bool}
        (deferred: in use, freed once its requests end). ENOTFOUND when unknown."""
        return self._lora_action("evict", ident)

    def lora_pin(self, ident):
        """Keep LoRA 'ident' in lunad's cache whatever the LRU says: {"pinned": true}."""
        return self._lora_action("pin", ident)

    def lora_unpin(self, ident):
        """Let the LRU evict LoRA 'ident' again: {"pinned": false}."""
        return self._lora_action("unpin", ident)


def type_name(v):
    return type(v).__name__


def _vae_result(reply, tensors, name, want, what, peer="lunad"):
    """(tensor, info) from a VAE reply, checking the tensor is float32 of shape 'want'
    (None: any positive size)."""
    t = tensors.get(name)
    if t is None:
        raise LunaError(proto.EPROTO, message="%s: the %s reply has no tensor '%s'" % (peer, what, name))
    good = t.dtype == "<f4" and t.ndim == len(want) and \
        all(d > 0 if w is None else d == w for d, w in zip(t.shape, want))
    if not good:
        raise LunaError(proto.EPROTO, message="%s: %s reply: tensor '%s' is %s %s, expected float32 %s"
                        % (peer, what, name, t.dtype, list(t.shape), ["C" if w is None else w for w in want]))
    info = {k: v for k, v in reply.items() if k != "tensors"}
    return t, info


def split_encode_reply(reply, tensors, peer="lunad"):
    """(cond, pooled, info) from an encode reply, checking dtypes and ranks."""
    out = []
    for name, rank in (("cond", 3), ("pooled", 2)):
        t = tensors.get(name)
        if t is None:
            raise LunaError(proto.EPROTO, message="%s: the encode reply has no tensor '%s'" % (peer, name))
        if t.dtype != "<f4" or t.ndim != rank or t.shape[0] != 1:
            raise LunaError(proto.EPROTO, message="%s: encode reply: tensor '%s' is %s %s, expected F32 of rank %d"
                            % (peer, name, t.dtype, list(t.shape), rank))
        out.append(t)
    info = {k: v for k, v in reply.items() if k != "tensors"}
    return out[0], out[1], info
