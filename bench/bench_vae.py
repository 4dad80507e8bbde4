#!/usr/bin/python3
"""bench_vae.py -- luna's VAE against the PyTorch reference on the full-size SD VAE.

Run by `make bench` from the repo root as
    LUNA_BUILD=build /usr/bin/python3 bench/bench_vae.py [--runs N] [--skip-large]

A random-weight AutoencoderKL with the real sizes (128 base channels, ch_mult 1,2,4,4,
2 ResBlocks, 4 latent channels, F32; tests/python/make_vae.py, generated once under
$LUNA_BUILD/bench/) and, in the same run, for each case: `luna decode|encode-image
--local --bench N` (one process, N timed runs after a first) and the PyTorch reference
(tests/python/ref_vae.py --bench N, torch 1.13 from Debian, torch.nn.functional; the
convolutions run on oneDNN) with 1 and 2 threads, and OPENBLAS_CORETYPE=SkylakeX where
the CPU has AVX-512. Prints markdown tables: median ms, peak RSS (getrusage ru_maxrss of
the process), ratios; no pass/fail.

Cases: decode of a 64 x 64 latent (512 x 512 image), encode of a 512 x 512 image, and
decode of a 128 x 128 latent (1024 x 1024) untiled and tiled (512 px tiles, 64 px
overlap, ComfyUI's VAEDecodeTiled defaults). `luna --local` loads only the half of
the VAE it runs; a last table measures lunad, which holds both halves, doing the two
512 x 512 cases (its peak resident memory, VmHWM, one fresh lunad per case).
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "python"))
import bench  # noqa: E402
import make_vae  # noqa: E402
import st_io  # noqa: E402
from daemon import Lunad  # noqa: E402

PYTHON = "/usr/bin/python3"
REF = ROOT / "tests" / "python" / "ref_vae.py"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd, env=None, timeout=3600):
    log("  $ " + " ".join(str(c) for c in cmd))
    r = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env=env, timeout=timeout)
    if r.returncode != 0:
        log(r.stderr[-2000:])
        return None
    return bench.last_json(r.stderr) or bench.last_json(r.stdout)


def ensure_inputs(bdir):
    model = bdir / "vae-full.safetensors"
    if not model.exists():
        log("writing %s (random weights, real sizes) ..." % model.name)
        make_vae.write_vae(str(model) + ".tmp", layout="ldm", full=True, seed=0)
        os.replace(str(model) + ".tmp", model)
    rng = np.random.default_rng(0)
    ins = {}
    for name, arr in (("lat64", rng.standard_normal((1, 4, 64, 64)).astype(np.float32)),
                      ("lat128", rng.standard_normal((1, 4, 128, 128)).astype(np.float32)),
                      ("img512", rng.random((1, 512, 512, 3)).astype(np.float32))):
        p = bdir / ("vae-%s.safetensors" % name)
        if not p.exists():
            st_io.write(str(p), {"latent" if name.startswith("lat") else "image": arr})
        ins[name] = p
    return model, ins


def vmhwm_mib(pid):
    """Peak resident memory (VmHWM) of a live process, in MiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def lunad_peaks(bdir, model, ins):
    """(case, MiB after loading the VAE, peak MiB, weights MiB) for a fresh lunad per case."""
    out = []
    name = os.path.basename(str(model))
    for case, op, key in (("decode 64x64 latent (512x512)", "decode", "lat64"),
                          ("encode 512x512 image", "encode", "img512")):
        log("[vae] lunad, whole VAE resident: %s" % case)
        arr = st_io.read(str(ins[key]))[0]["latent" if op == "decode" else "image"]
        with Lunad(models_dirs=[bdir]).start() as d:
            with d.client(timeout=3600) as c:
                info = c.models("load", name, kind="vae")["model"]
                loaded = vmhwm_mib(d.pid)
                if op == "decode":
                    c.vae_decode(name, arr, tiled=False)
                else:
                    c.vae_encode(name, arr, tiled=False)
                out.append((case, loaded, vmhwm_mib(d.pid), info.get("weights_bytes", 0) / 1048576))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="luna VAE vs PyTorch, full size")
    ap.add_argument("--runs", type=int, default=2, help="timed runs per process after the first (default 2)")
    ap.add_argument("--skip-large", action="store_true", help="skip the 128 x 128 latent")
    a = ap.parse_args(argv)
    build = bench.build_dir()
    luna = build / "luna"
    bdir = build / "bench"
    bdir.mkdir(parents=True, exist_ok=True)
    model, ins = ensure_inputs(bdir)
    out = bdir / "vae-out.safetensors"
    skx = bench.cpu_has_avx512f()
    # (title, command, input flag, input, extra flags, timed runs, reference thread counts)
    cases = [("decode 64x64 latent (512x512)", "decode", "--latent", ins["lat64"], [], a.runs, (1, 2)),
             ("encode 512x512 image", "encode-image", "--image", ins["img512"], [], a.runs, (1, 2))]
    if not a.skip_large:
        # four times the work: one timed run, the reference at 2 threads (its faster setting above)
        cases += [("decode 128x128 latent (1024x1024), untiled", "decode", "--latent", ins["lat128"], [], 1, (2,)),
                  ("decode 128x128 latent (1024x1024), tiled 512/64", "decode", "--latent", ins["lat128"],
                   ["--tiled", "--tile-size", "512", "--overlap", "64"], 1, (2,))]
    rows = []
    for title, cmd, flag, inp, extra, runs, ref_threads in cases:
        log("[vae] %s" % title)
        lu = run([luna, cmd, "--local", "--model", model, flag, inp, "--out", out, "--bench", runs] + extra)
        refs = {}
        for threads in ref_threads:
            env = dict(os.environ)
            if skx:
                env["OPENBLAS_CORETYPE"] = "SkylakeX"
            op = "decode" if cmd == "decode" else "encode"
            rextra = ["--tiled", "--tile-size", "512", "--overlap", "64"] if extra else []
            refs[threads] = run([PYTHON, REF, op, "--model", model, "--input", inp, "--out", out,
                                 "--threads", threads, "--bench", runs] + rextra, env=env)
        rows.append((title, lu, refs))
    print()
    print("# VAE: luna against PyTorch (full-size SD VAE, 128 base channels, F32 weights, random values; "
          "%d CPUs, load average %.2f at the start; medians of %d timed runs after a first, 1 for 1024x1024)"
          % (os.cpu_count(), os.getloadavg()[0], a.runs))
    print()
    print("| case | luna ms | ref 1T ms | ref 2T ms | best ref / luna | luna peak RSS MiB | ref peak RSS MiB "
          "(best setting) | RSS ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for title, lu, refs in rows:
        good = {t: r for t, r in refs.items() if r}
        best_t = min(good, key=lambda t: good[t]["median_ms"]) if good else None
        best = good[best_t] if best_t else None
        lm = lu["median_ms"] if lu else None
        lr = lu["peak_rss_mib"] if lu else None
        rr = best["peak_rss_kib"] / 1024 if best else None
        print("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
            title, "%.0f" % lm if lm else "—",
            "%.0f" % refs[1]["median_ms"] if refs.get(1) else "—",
            "%.0f" % refs[2]["median_ms"] if refs.get(2) else "—",
            "%.2fx" % (best["median_ms"] / lm) if best and lm else "—",
            "%.0f" % lr if lr else "—", "%.0f (%dT)" % (rr, best_t) if rr else "—",
            "%.2f" % (lr / rr) if lr and rr else "—"))
    print()
    print("Targets: decode 64x64 and encode 512x512 at least as fast as the best reference setting (goal 1.3x), "
          "with peak RSS at most half of the reference's.")
    print()
    refs_by_title = {title: refs for title, _, refs in rows}
    print("| lunad holding the whole VAE | weights MiB | RSS after load MiB | peak RSS MiB | ref peak RSS MiB | RSS ratio |")
    print("|---|---|---|---|---|---|")
    for case, loaded, peak, wmib in lunad_peaks(bdir, model, ins):
        good = [r for r in refs_by_title.get(case, {}).values() if r]
        rr = min(good, key=lambda r: r["median_ms"])["peak_rss_kib"] / 1024 if good else None
        print("| %s | %.0f | %.0f | %.0f | %s | %s |" % (case, wmib, loaded, peak, "%.0f" % rr if rr else "—",
                                                       "%.2f" % (peak / rr) if rr else "—"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
