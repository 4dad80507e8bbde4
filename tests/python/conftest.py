"""conftest.py -- shared fixtures for luna's Python tests.

  repo_root     the checkout (found from this file's location)
  luna_bin      $LUNA_BUILD/luna, LUNA_BUILD defaulting to "build" (relative to the repo)
  model_dir     a session-wide temporary folder
  model         model(layout, dtype="F16", **sizes) -> path of a generated model (cached)
  tokens        tokens(spec, seed) -> a tokens dict (see make_token_chunks)
  write_tokens  write_tokens(dict) -> path of a JSON file
  run_luna      run_luna(args...) -> CompletedProcess, never raising on failure
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_models  # noqa: E402

BOS, EOS = 49406, 49407

# Small sizes that keep the whole suite fast. G files need 32 layers so that luna can
# tell a standalone G from an L (the layers.30 key); the SDXL checkpoint's G is named
# by its prefix, so a shorter stack is enough there.
SIZES = {
    "sd1": dict(width=128, layers=4),
    "sd1_old": dict(width=128, layers=4),
    "clip_l": dict(width=128, layers=4),
    "clip_g": dict(width=192, layers=32),
    "sdxl": dict(width=192, layers=6, l_width=128, l_layers=4),
}


def make_token_chunks(rng, lengths, pad, weights=None):
    """Chunks as ComfyUI's tokenizer lays them out: [BOS, prompt..., EOS, pad...], 77 each.

    lengths: prompt tokens per chunk (<= 75; a length of 76 leaves no room for EOS and
    gives a chunk without one). weights: None, or a list of weights cycled over every
    third prompt token (BOS/EOS/pads always keep 1.0).
    """
    chunks = []
    cyc = itertools.cycle(weights or [1.0])
    for n in lengths:
        ids = [BOS] + [int(x) for x in rng.integers(1, 49406, size=n)]
        if len(ids) < 77:
            ids.append(EOS)
        ids += [pad] * (77 - len(ids))
        w = [1.0] * 77
        if weights:
            for j in range(1, n + 1, 3):
                w[j] = float(next(cyc))
        chunks.append([[i, x] for i, x in zip(ids, w)])
    return chunks


def tokens_for(lengths, weights=None, seed=0, sdxl=False):
    """{"l": chunks} or, for SDXL, {"l": ..., "g": ...} with the same prompt ids
    (G pads with 0, L with EOS), as ComfyUI's SDXL tokenizer gives."""
    out = {"l": make_token_chunks(np.random.default_rng(seed), lengths, EOS, weights)}
    if sdxl:
        out["g"] = make_token_chunks(np.random.default_rng(seed), lengths, 0, weights)
    return out


@pytest.fixture(scope="session")
def repo_root():
    return HERE.parent.parent


@pytest.fixture(scope="session")
def luna_bin(repo_root):
    build = Path(os.environ.get("LUNA_BUILD", "build"))
    if not build.is_absolute():
        build = repo_root / build
    exe = build / "luna"
    if not os.access(exe, os.X_OK):
        pytest.fail("luna binary not found at %s (run make, or set LUNA_BUILD)" % exe)
    return exe


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("luna-models")


@pytest.fixture(scope="session")
def model(model_dir):
    cache = {}

    def get(layout, dtype="F16", seed=0, **sizes):
        kw = dict(SIZES[layout])
        kw.update(sizes)
        key = (layout, dtype, seed, tuple(sorted(kw.items())))
        if key not in cache:
            name = "%s-%s-s%d-%d.safetensors" % (layout, dtype.lower(), seed, len(cache))
            path = model_dir / name
            make_models.write_model(str(path), layout, dtype, seed, **kw)
            cache[key] = path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def write_tokens(model_dir):
    counter = itertools.count()

    def write(tok):
        path = model_dir / ("tokens-%d.json" % next(counter))
        path.write_text(json.dumps(tok))
        return path

    return write


@pytest.fixture(scope="session")
def run_luna(luna_bin):
    def run(*args, timeout=300):
        return subprocess.run([str(luna_bin)] + [str(a) for a in args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout, text=True, errors="replace")

    return run
