"""daemon.py -- run a real lunad for a test: private folder, socket, log; start, wait, stop.

    d = Lunad(models_dirs=[folder], tcp=True, extra=["--workers", "1"]).start()
    with d.client() as c:
        c.health()
    assert d.stop() == 0, d.log()

Each Lunad gets a private temporary folder (short, under the system temp dir, so the
socket path fits a sockaddr_un) holding its socket, its stderr log and, with tcp=True,
a token file; TCP listens on 127.0.0.1 on a port that was free a moment before.
start() waits (bounded) until `health` answers. stop() sends SIGTERM and returns the
exit status, killing the process if it outlives the timeout. close() stops it if
needed and removes the folder; the log stays readable through log() after that.

The binary is $LUNA_BUILD/lunad, LUNA_BUILD defaulting to "build" (relative to the
repository). Under a sanitizer build (a LUNA_BUILD with "san" in it) everything runs
about three times slower: SLOW scales the time limits and the test sizes.
"""

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "python"))
from lunaclient import Client, LunaError  # noqa: E402
from lunaclient import proto  # noqa: E402


def build_dir():
    b = Path(os.environ.get("LUNA_BUILD", "build"))
    return b if b.is_absolute() else REPO / b


def is_san():
    """True for the sanitizer build (make SAN=1 uses build/san)."""
    return "san" in os.environ.get("LUNA_BUILD", "build").lower()


SLOW = 3.0 if is_san() else 1.0


def lunad_bin():
    return build_dir() / "lunad"


def luna_bin():
    return build_dir() / "luna"


def free_port():
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """In the child before exec: SIGTERM it when the test process dies, so that a
    killed pytest run leaves no lunad behind (Linux; best effort)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 -- nothing to do about it in a forked child
        pass


class LunadError(Exception):
    """lunad did not start, or misbehaved while starting or stopping."""


class Lunad:
    """One lunad process with its own folder, socket and log (see the module docstring).

    models_dirs  folders passed as --models-dir (in order)
    tcp          also listen on 127.0.0.1:<free port> with a fresh token file
    extra        more command-line arguments, appended as given
    socket_path  the socket to use (default: <folder>/lunad.sock)
    config       text of a --config file written into the folder (its path goes first
                 on the command line); None: no config file
    bare         pass no --socket/--models-dir/tcp flags at all (for --config tests)
    """

    def __init__(self, models_dirs=(), tcp=False, extra=(), socket_path=None, config=None, bare=False,
                 exe=None, env=None):
        self.exe = Path(exe) if exe else lunad_bin()
        if not os.access(self.exe, os.X_OK):
            raise LunadError("lunad not found at %s (run make, or set LUNA_BUILD)" % self.exe)
        self.root = Path(tempfile.mkdtemp(prefix="lunad-"))
        self.socket = Path(socket_path) if socket_path else self.root / "lunad.sock"
        self.log_path = self.root / "lunad.log"
        self.models_dirs = [Path(m) for m in models_dirs]
        self.tcp = tcp
        self.port = None
        self.token = None
        self.token_file = None
        if tcp:
            self.token = secrets.token_hex(16)
            self.token_file = self.root / "token"
            self.token_file.write_text(self.token + "\n")
            os.chmod(self.token_file, 0o600)
        self.config_path = None
        if config is not None:
            self.config_path = self.root / "lunad.conf"
            self.config_path.write_text(config)
        self.extra = [str(a) for a in extra]
        self.bare = bare
        self.env = dict(os.environ if env is None else env)
        # leaks and errors must show in the exit status, with a report in the log
        self.env.setdefault("ASAN_OPTIONS", "abort_on_error=0:detect_leaks=1")
        self.proc = None
        self.returncode = None
        self._log_text = None
        self._logf = None

    # ---- the command line ------------------------------------------------------------

    def argv(self):
        a = [str(self.exe)]
        if self.config_path:
            a += ["--config", str(self.config_path)]
        if not self.bare:
            a += ["--socket", str(self.socket)]
            for m in self.models_dirs:
                a += ["--models-dir", str(m)]
            if self.tcp:
                if self.port is None:
                    self.port = free_port()
                a += ["--listen", "127.0.0.1:%d" % self.port, "--token-file", str(self.token_file)]
        return a + self.extra

    # ---- life ------------------------------------------------------------------------

    def launch(self):
        """Start the process without waiting for it to answer."""
        if self.proc is not None:
            raise LunadError("this lunad was started already")
        self._logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self._logf,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                     preexec_fn=_die_with_parent)
        return self

    def start(self, timeout=None, ready=False):
        """Start lunad and wait until `health` answers (and, with ready=True, says
        ready). A TCP port taken meanwhile by someone else gets a second try."""
        for attempt in range(3):
            self.launch()
            try:
                self.wait_health(timeout, ready)
                return self
            except LunadError:
                if self.tcp and self.proc.poll() is not None and "Address already in use" in self.log() \
                        and attempt < 2:
                    self._reap()
                    self.proc = None
                    self.port = None
                    self.log_path.write_bytes(b"")
                    continue
                raise
        raise LunadError("unreachable")

    def wait_health(self, timeout=None, ready=False):
        """Poll `health` until it answers (bounded); returns its reply."""
        timeout = (20.0 if timeout is None else timeout) * SLOW
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            rc = self.proc.poll()
            if rc is not None:
                raise LunadError("lunad exited with status %d while starting; its log:\n%s" % (rc, self.log()[-4000:]))
            try:
                with Client.unix(self.socket, timeout=5 * SLOW) as c:
                    h = c.health()
                if not ready or h.get("ready"):
                    return h
                last = h
            except (LunaError, OSError) as e:
                last = e
            time.sleep(0.01)
        raise LunadError("lunad did not answer health%s within %.0f s (last: %r); its log:\n%s"
                         % (" with ready" if ready else "", timeout, last, self.log()[-4000:]))

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout=None):
        """Wait for the process to exit (bounded); returns its status or None."""
        timeout = (30.0 if timeout is None else timeout) * SLOW
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reap()
        return rc

    def _reap(self):
        if self.proc is not None and self.proc.returncode is not None:
            self.returncode = self.proc.returncode
        if self._logf:
            self._logf.close()
            self._logf = None

    def stop(self, timeout=None):
        """SIGTERM, wait (bounded: 30 s, scaled for sanitizers), SIGKILL if still
        there. Returns the exit status (negative: killed by that signal)."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.signal(signal.SIGTERM)
            rc = self.wait(timeout)
            if rc is None:
                self.kill()
                self.returncode = self.proc.returncode
                self._append_log("\n[daemon.py: lunad did not exit within the stop timeout; killed]\n")
        self._reap()
        return self.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._reap()

    def close(self):
        """Stop lunad if it runs, keep its log text, remove its folder."""
        try:
            if self.alive():
                self.stop()
        finally:
            self.kill()
            self._log_text = self.log()
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the log ---------------------------------------------------------------------

    def log(self):
        """Everything lunad wrote on stdout and stderr so far."""
        if self._log_text is not None and not self.log_path.exists():
            return self._log_text
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return self._log_text or ""

    def _append_log(self, text):
        try:
            with open(self.log_path, "a") as f:
                f.write(text)
        except OSError:
            pass

    # ---- talking to it ---------------------------------------------------------------

    def client(self, timeout=None):
        """A lunaclient.Client on the Unix socket; socket operations time out after
        60 s (scaled) so that a hung daemon fails the test instead of blocking it."""
        return Client.unix(self.socket, timeout=(60.0 if timeout is None else timeout) * SLOW)

    def tcp_client(self, token=None, timeout=None):
        return Client.tcp("127.0.0.1", self.port, self.token if token is None else token,
                          timeout=(60.0 if timeout is None else timeout) * SLOW)

    def raw(self, timeout=None):
        """A plain connected Unix socket, for hand-made bytes."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout((30.0 if timeout is None else timeout) * SLOW)
        s.connect(str(self.socket))
        return s

    def raw_tcp(self, timeout=None):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=(30.0 if timeout is None else timeout) * SLOW)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def status(self):
        with self.client() as c:
            return c.status()


# ---- raw frames --------------------------------------------------------------------

def recv_exact(s, n):
    """n bytes from socket s, or fewer if the peer closed first."""
    buf = bytearray()
    while len(buf) < n:
        k = s.recv(n - len(buf))
        if not k:
            break
        buf += k
    return bytes(buf)


def read_frame(s):
    """One whole frame from raw socket s: (Header, msg dict, tensors); raises
    LunaError ECONN when the peer closes first."""
    head = recv_exact(s, proto.HEADER_SIZE)
    if len(head) < proto.HEADER_SIZE:
        raise LunaError(proto.ECONN, message="closed after %d header bytes" % len(head))
    h = proto.parse_header(head)
    body = recv_exact(s, h.json_len + h.bin_len)
    if len(body) < h.json_len + h.bin_len:
        raise LunaError(proto.ECONN, message="closed inside a frame")
    return proto.decode_frame(head + body)


def closed_by_peer(s, timeout=10.0):
    """True when the peer closes s within 'timeout' seconds (bytes before the close
    are read and ignored); False when it stays open."""
    old = s.gettimeout()
    s.settimeout(0.1)
    end = time.monotonic() + timeout * SLOW
    try:
        while time.monotonic() < end:
            try:
                if not s.recv(65536):
                    return True
            except socket.timeout:
                continue
            except ConnectionResetError:
                return True
        return False
    finally:
        s.settimeout(old)
