"""lunaclient.client -- one connection to lunad: requests, replies, pipelining.

    with Client.unix("/run/user/1000/lunad.sock") as c:
        c.ping()
        cond, pooled, info = c.encode("sd15.safetensors", tokens={"l": [...]})

The simple calls (ping, health, status, models, encode) send one request and wait for
its reply, raising LunaError when lunad reports an error. For many requests in flight
on one connection, use send() and recv(): lunad answers each request exactly once, in
any order, and recv() returns replies as they come, errors included (the ERROR flag
is set in 'flags' and 'msg' holds {"code", "name", "message"}).

A Client is not thread-safe: use it from one thread at a time. After a failure of the
connection itself (LunaError ECONN or a broken frame) the client is closed.
"""

import collections
import json
import os
import socket
import time

from . import proto
from .proto import LunaError

CLIENT_NAME = "lunaclient"


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


class Client:
    """A connection to lunad. Make one with Client.unix() or Client.tcp()."""

    def __init__(self, sock, peer, max_reply=proto.MAX_REPLY):
        self._sock = sock
        self.peer = peer
        self.max_reply = max_reply
        self._next_id = 1
        self._stash = collections.OrderedDict()  # replies that call() read for others

    # ---- connecting -------------------------------------------------------------

    @classmethod
    def unix(cls, path=None, timeout=None):
        """Connect to lunad's Unix socket ('path', default default_socket()).
        'timeout' (seconds) bounds each socket operation; None waits forever. A
        timeout raises LunaError ECONN and closes the client (a reply may be half read)."""
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

    def send(self, type, msg=None, tensors=None):
        """Send one request of message 'type' (proto.MSG_*) with the JSON object 'msg'
        and optional tensors (dict name -> numpy array); return its request id."""
        if self._sock is None:
            raise LunaError(proto.ECONN, message="%s: not connected" % self.peer)
        rid = self._next_id
        self._next_id += 1
        frame = proto.encode_frame(type, 0, rid, msg, tensors)
        try:
            self._sock.sendall(frame)
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
        Raises LunaError when the connection fails or the frame is malformed."""
        if self._stash:
            return self._stash.popitem(last=False)[1]
        return self._recv_wire()

    def _recv_wire(self):
        if self._sock is None:
            raise LunaError(proto.ECONN, message="%s: not connected" % self.peer)
        head = self._read_exact(proto.HEADER_SIZE, "header")
        try:
            h = proto.parse_header(head, self.max_reply)
        except LunaError as e:
            raise self._broken(proto.EPROTO, "reply %s" % e.message) from None
        if not h.flags & proto.FLAG_REPLY:
            raise self._broken(proto.EPROTO, "a frame without the REPLY flag came back (flags 0x%x)" % h.flags)
        body = self._read_exact(h.json_len + h.bin_len, "JSON and binary parts")
        mv = memoryview(body)
        try:
            msg = proto.parse_json(mv[:h.json_len])
            tensors = proto.get_tensors(msg, mv[h.json_len:]) if not h.flags & proto.FLAG_ERROR else {}
        except LunaError as e:
            raise LunaError(proto.EPROTO, message="%s: reply to request %d: %s" % (self.peer, h.request_id, e)) \
                from None
        return h.request_id, h.flags, msg, tensors

    def call(self, type, msg=None, tensors=None):
        """Send one request and wait for its reply: (msg, tensors). Raises LunaError
        for an error reply. Replies to other requests in flight are kept for recv()."""
        rid = self.send(type, msg, tensors)
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

    def models(self, action="list", model=None):
        """List ("list"), load ("load", waits until ready or failed) or unload ("unload")
        a model: one path or a list of up to 4, relative to lunad's models folders."""
        msg = {"action": action}
        if model is not None:
            msg["model"] = _model_spec(model)
        return self.call(proto.MSG_MODELS, msg)[0]

    def encode_request(self, model, tokens=None, text=None, clip_layer=None, deadline_ms=None, cache=True):
        """The JSON of an encode request (for send()); the arguments are encode()'s."""
        if (tokens is None) == (text is None):
            raise LunaError(proto.EINVAL, message="give exactly one of tokens and text")
        msg = {"model": _model_spec(model)}
        if tokens is not None:
            if isinstance(tokens, (str, bytes)):
                tokens = json.loads(tokens)
            msg["tokens"] = tokens
        else:
            msg["text"] = text
        if clip_layer:
            msg["clip_layer"] = int(clip_layer)
        if deadline_ms:
            msg["deadline_ms"] = int(deadline_ms)
        if not cache:
            msg["cache"] = False
        return msg

    def encode(self, model, tokens=None, text=None, clip_layer=None, deadline_ms=None, cache=True):
        """Run a model's text encoders on lunad.

        model        a path relative to lunad's models folders, or a list of them (a
                     clip_l and a clip_g file)
        tokens       what ComfyUI's CLIP.tokenize() returns: {"l": chunks, "g": chunks},
                     each chunk 77 (id, weight) pairs (a dict, or its JSON text)
        text         or the prompt itself, tokenized by lunad (needs its --tokenizer)
        clip_layer   -N as CLIPSetLastLayer(-N); None: the family's default
        deadline_ms  give up if the work has not started within this many ms
        cache        False bypasses lunad's result cache

        Returns (cond float32 [1, 77*chunks, D], pooled float32 [1, Dp], info), info
        being the reply without "tensors": {"family": "sdxl", "cached": False, ...}.
        """
        msg = self.encode_request(model, tokens, text, clip_layer, deadline_ms, cache)
        reply, tensors = self.call(proto.MSG_ENCODE, msg)
        return split_encode_reply(reply, tensors, self.peer)


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
