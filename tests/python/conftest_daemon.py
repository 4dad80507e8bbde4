"""conftest_daemon.py -- pytest fixtures and helpers for tests that run a real lunad.

Import what a test module needs from here (pytest finds fixtures in the module's
namespace):

    from conftest_daemon import daemon_models, start_lunad, tiny_expected  # noqa: F401

  daemon_models   session folder of generated models, by file name (DAEMON_MODELS)
  start_lunad     start_lunad(*flags, models=True, tcp=False, ...) -> a started Lunad;
                  every daemon a test starts is stopped at its end (SIGTERM, then
                  SIGKILL), and one that exits non-zero there fails the test
  tiny_expected   (tokens, cond bytes, pooled bytes) of tiny.safetensors from
                  `luna encode --local`: what any healthy daemon must answer
  fresh_models    fresh_models(*names) -> a new folder holding hard links to those models
Helpers: local_encode(), raw_tensors(), st_bytes(), assert_serving().
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

import make_models
import st_io
from conftest import tokens_for
from daemon import SLOW, Lunad, luna_bin

# name -> (layout, seed, sizes). Small: the whole daemon suite must stay quick, also
# under sanitizers. "slow" takes tens of milliseconds per chunk: it keeps a queue full.
DAEMON_MODELS = {
    "tiny.safetensors": ("clip_l", 0, dict(width=64, layers=2)),
    "tiny2.safetensors": ("clip_l", 1, dict(width=64, layers=2)),
    "sd1.safetensors": ("sd1", 0, dict(width=128, layers=4)),
    "clip_l.safetensors": ("clip_l", 0, dict(width=128, layers=4)),
    "clip_g.safetensors": ("clip_g", 0, dict(width=192, layers=32)),
    "slow.safetensors": ("clip_l", 2, dict(width=512, layers=12)),
}

PROBE = dict(lengths=[17], weights=[1.3, 0.7], seed=99)


@pytest.fixture(scope="session")
def daemon_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("lunad-models")
    for name, (layout, seed, sizes) in DAEMON_MODELS.items():
        make_models.write_model(str(d / name), layout, "F16", seed, **sizes)
    return d


@pytest.fixture
def fresh_models(daemon_models):
    """fresh_models(*names) -> a new folder with hard links (or copies) of those models;
    removed at the end of the test."""
    made = []

    def make(*names):
        d = Path(tempfile.mkdtemp(prefix="lunad-m-"))
        made.append(d)
        for n in names:
            try:
                os.link(daemon_models / n, d / n)
            except OSError:
                shutil.copy2(daemon_models / n, d / n)
        return d

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_lunad(daemon_models):
    """start_lunad(*flags, models=True, tcp=False, start=True, **Lunad kwargs) -> Lunad.

    models=True serves the session's model folder; a list names other folders. With
    start=False the Lunad is made but not launched. At the end of the test every
    daemon still running is stopped; a non-zero exit status there (an ASan leak
    report, a crash on SIGTERM) fails the test with the log's tail."""
    started = []

    def start(*flags, models=True, tcp=False, start=True, ready=False, **kw):
        dirs = [daemon_models] if models is True else list(models or [])
        d = Lunad(models_dirs=dirs, tcp=tcp, extra=flags, **kw)
        started.append(d)
        if start:
            d.start(ready=ready)
        return d

    yield start
    problems = []
    crashes = {-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS, -signal.SIGFPE, -signal.SIGILL}
    for d in started:
        try:
            if d.alive():
                rc = d.stop()
                if rc != 0:
                    problems.append("lunad (%s) exited with status %s on SIGTERM at teardown; log tail:\n%s"
                                    % (" ".join(d.argv()[1:]), rc, d.log()[-3000:]))
            elif d.proc is not None and d.proc.poll() in crashes:
                # no test kills lunad with these: it crashed during the test
                problems.append("lunad (%s) crashed during the test (signal %d); log tail:\n%s"
                                % (" ".join(d.argv()[1:]), -d.proc.returncode, d.log()[-3000:]))
        finally:
            d.close()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


# ---- outputs -----------------------------------------------------------------------

def raw_tensors(path):
    """{name: (dtype, shape, raw bytes)} of a safetensors file, bytes as stored."""
    hdr, _, start = st_io.read_header(path)
    data = Path(path).read_bytes()
    return {k: (v["dtype"], list(v["shape"]), data[start + v["data_offsets"][0]:start + v["data_offsets"][1]])
            for k, v in hdr.items()}


def st_bytes(arr):
    """The bytes of an array as the daemon sent them (little-endian float32)."""
    a = np.ascontiguousarray(arr)
    assert a.dtype == np.dtype("<f4"), "expected F32, got %s" % a.dtype
    return a.tobytes()


def local_encode(model_paths, tokens, clip_layer=None, tmpdir=None, timeout=120):
    """`luna encode --local` on absolute model paths: {"cond": (dtype, shape, bytes),
    "pooled": ...} as raw_tensors() gives them."""
    tmp = Path(tempfile.mkdtemp(prefix="luna-local-", dir=tmpdir))
    try:
        tok = tmp / "tokens.json"
        tok.write_text(json.dumps(tokens))
        out = tmp / "out.safetensors"
        cmd = [str(luna_bin()), "encode", "--local"]
        for m in model_paths:
            cmd += ["--model", str(m)]
        cmd += ["--tokens", str(tok), "--out", str(out)]
        if clip_layer is not None:
            cmd += ["--clip-layer", str(clip_layer)]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                           timeout=timeout * SLOW)
        assert r.returncode == 0, "luna encode --local failed (rc %d): %s\n%s" % (r.returncode, " ".join(cmd),
                                                                                  r.stderr[-3000:])
        return raw_tensors(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_expected(daemon_models):
    tok = tokens_for(**PROBE)
    out = local_encode([daemon_models / "tiny.safetensors"], tok)
    return tok, out["cond"][2], out["pooled"][2]


def assert_serving(d, expected, client=None):
    """The daemon is alive and answers a tiny encode bit for bit as expected (a new
    connection unless 'client' is given; the result cache is bypassed)."""
    tok, cond, pooled = expected
    assert d.alive(), "lunad died; log tail:\n%s" % d.log()[-3000:]
    c = client or d.client()
    try:
        got_c, got_p, info = c.encode("tiny.safetensors", tokens=tok, cache=False)
        assert st_bytes(got_c) == cond, "cond differs from luna encode --local"
        assert st_bytes(got_p) == pooled, "pooled differs from luna encode --local"
        h = c.health()
        assert h["live"] is True
    finally:
        if client is None:
            c.close()
