"""daemon.py -- where lunad is, and one shared client connection per daemon in this process.

Where the daemon is (first match wins):
  a node's "daemon" input (when not empty): "unix:PATH", an absolute PATH (a Unix
      socket) or "HOST:PORT" (TCP, with the token of LUNA_TOKEN_FILE or the node's
      "token_file" input);
  LUNA_ADDRESS=HOST:PORT with LUNA_TOKEN_FILE=FILE (TCP);
  LUNA_SOCKET=PATH, else lunaclient.default_socket() ($XDG_RUNTIME_DIR/lunad.sock, ...).

The Python client (python/lunaclient in the luna repository) is found by a plain import
first, then in LUNA_PYTHON (a folder holding lunaclient/), then beside this package's
real location (../python: works when comfyui/ is linked into ComfyUI/custom_nodes), then
in ./vendor (where a copied install puts a copy of lunaclient/).

Every proxy built for one daemon shares one Connection: one lunaclient.Client guarded by
a lock, opened on first use and opened again when the previous one broke. A request that
finds the connection broken (a daemon restart) is sent once more on a new one; every
failure reaches ComfyUI as a LunaDaemonError that names the daemon and the reason.
"""

import importlib
import os
import sys
import threading

_PKG_DIR = os.path.dirname(os.path.realpath(__file__))


class LunaDaemonError(RuntimeError):
    """A failure talking to lunad, or something the daemon cannot do for a proxy."""


def lunaclient():
    """The lunaclient module, imported on first use (see the module docstring)."""
    try:
        return importlib.import_module("lunaclient")
    except ImportError:
        pass
    places = [os.environ.get("LUNA_PYTHON"), os.path.join(os.path.dirname(_PKG_DIR), "python"),
              os.path.join(_PKG_DIR, "vendor")]
    for p in places:
        if p and os.path.isfile(os.path.join(p, "lunaclient", "__init__.py")):
            if p not in sys.path:
                sys.path.append(p)
            return importlib.import_module("lunaclient")
    raise LunaDaemonError("the luna Python client (lunaclient) was not found: set LUNA_PYTHON to the luna "
                          "repository's python/ folder, link this package from the repository, or copy "
                          "python/lunaclient into this package's vendor/ folder")


class Endpoint:
    """Where one lunad listens: kind "unix" (path) or "tcp" (host, port, token file)."""

    def __init__(self, kind, path=None, host=None, port=None, token_file=None):
        self.kind, self.path, self.host, self.port, self.token_file = kind, path, host, port, token_file

    @property
    def key(self):
        return (self.kind, self.path, self.host, self.port, self.token_file)

    def __str__(self):
        if self.kind == "unix":
            return "unix:%s" % self.path
        return "tcp:%s:%s" % (self.host, self.port)

    def __repr__(self):
        return "Endpoint(%s)" % self

    def connect(self, timeout=None):
        lc = lunaclient()
        if self.kind == "unix":
            return lc.Client.unix(self.path, timeout=timeout)
        if not self.token_file:
            raise LunaDaemonError("lunad at %s: a TCP address needs a token file (LUNA_TOKEN_FILE or the node's "
                                  "token_file input)" % self)
        try:
            with open(self.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise LunaDaemonError("lunad at %s: cannot read the token file %s: %s"
                                  % (self, self.token_file, e.strerror or e)) from None
        return lc.Client.tcp(self.host, self.port, token, timeout=timeout)


def _split_hostport(text):
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def endpoint(daemon="", token_file=""):
    """The Endpoint for a node's 'daemon' and 'token_file' inputs ("" means: from the
    environment, see the module docstring)."""
    daemon = (daemon or "").strip()
    token_file = (token_file or "").strip() or os.environ.get("LUNA_TOKEN_FILE") or None
    if daemon:
        if daemon.startswith("unix:"):
            return Endpoint("unix", path=daemon[5:])
        if daemon.startswith("tcp:"):
            daemon = daemon[4:]
        elif daemon.startswith("/") or daemon.startswith("."):
            return Endpoint("unix", path=daemon)
        hp = _split_hostport(daemon)
        if hp is None:
            raise LunaDaemonError("daemon %r is neither unix:PATH, an absolute socket path nor HOST:PORT" % daemon)
        return Endpoint("tcp", host=hp[0], port=hp[1], token_file=token_file)
    addr = os.environ.get("LUNA_ADDRESS", "").strip()
    if addr:
        hp = _split_hostport(addr[4:] if addr.startswith("tcp:") else addr)
        if hp is None:
            raise LunaDaemonError("LUNA_ADDRESS=%r is not HOST:PORT" % addr)
        return Endpoint("tcp", host=hp[0], port=hp[1], token_file=token_file)
    path = os.environ.get("LUNA_SOCKET", "").strip()
    if not path:
        path = lunaclient().default_socket()
    return Endpoint("unix", path=path)


class Connection:
    """One shared lunaclient.Client for an Endpoint, used under a lock."""

    def __init__(self, ep):
        self.endpoint = ep
        self._lock = threading.Lock()
        self._client = None

    def _fresh(self):
        if self._client is not None and not self._client.closed:
            return self._client, False
        self._client = self.endpoint.connect()
        return self._client, True

    def close(self):
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def run(self, what, fn):
        """fn(client) under the lock; returns its result. A connection that turns out to
        be broken is replaced and fn runs once more; any failure raises LunaDaemonError
        "lunad at <where>: <what>: <reason>"."""
        lc = lunaclient()
        ECONN = lc.client.proto.ECONN
        with self._lock:
            for attempt in (0, 1):
                try:
                    client, new = self._fresh()
                except lc.LunaError as e:
                    raise LunaDaemonError("lunad at %s is not reachable (%s): %s" % (self.endpoint, what, e.message)) \
                        from None
                try:
                    return fn(client)
                except lc.LunaError as e:
                    if e.code == ECONN:
                        client.close()
                        self._client = None
                        if not new and attempt == 0:
                            continue  # a stale connection (lunad restarted): once more on a new one
                    raise LunaDaemonError("lunad at %s: %s failed: %s: %s" % (self.endpoint, what, e.name, e.message)) \
                        from None
                except BaseException:
                    # anything else (a callback, KeyboardInterrupt) may leave a reply unread
                    client.close()
                    self._client = None
                    raise


_connections = {}
_connections_lock = threading.Lock()


def connection(ep):
    """The process's Connection for Endpoint 'ep' (made on first use)."""
    with _connections_lock:
        c = _connections.get(ep.key)
        if c is None:
            c = _connections[ep.key] = Connection(ep)
        return c


def reset_connections():
    """Close every shared connection (tests; harmless otherwise)."""
    with _connections_lock:
        conns = list(_connections.values())
        _connections.clear()
    for c in conns:
        c.close()
