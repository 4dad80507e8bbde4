#!/usr/bin/python3
"""bench.py -- luna's text encoders against the PyTorch reference, at full size.

Run by `make bench` from the repo root as
    LUNA_BUILD=build /usr/bin/python3 bench/bench.py [--runs N]

It generates (once, cached under $LUNA_BUILD/bench/) random-weight full-size models
(CLIP-L 12x768 and a standalone CLIP-G 32x1280 with projection, both F16) and a
one-chunk prompt, then times:
  - $LUNA_BUILD/bench/sgemm-rate          the machine's SGEMM rate, for scale
  - luna encode --local ... --bench N      CLIP-L alone and the SDXL pair (L+G)
  - tests/python/ref_clip.py ... --bench N at 1 and 2 threads, with the environment as
    is and, where the CPU has AVX-512, with OPENBLAS_CORETYPE=SkylakeX
and prints markdown tables: medians and ratios, no pass/fail. CLIP-G alone is not a
model luna serves, so its time is derived on both sides as (L+G) - L.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "python"))
import make_models  # noqa: E402

PYTHON = "/usr/bin/python3"
REF = ROOT / "tests" / "python" / "ref_clip.py"
SEQ = 77


def build_dir():
    b = Path(os.environ.get("LUNA_BUILD", "build"))
    return b if b.is_absolute() else ROOT / b


def encoder_flops(width, layers, seq=SEQ, proj=False):
    """FLOPs of one 77-token chunk: 2*seq*(linear weights) for the q,k,v,out,fc1,fc2
    layers, plus q k^T and p v over the full 77x77 square per layer (causal masking
    does not shorten it), plus the pooled projection for G."""
    d = width
    linear = layers * (4 * d * d + 2 * d * 4 * d)
    attn = layers * 2 * (2 * seq * seq * d)
    f = 2 * seq * linear + attn
    if proj:
        f += 2 * d * d
    return f


def cpu_has_avx512f():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


# ------------------------------------------------------------------ inputs

def ensure_models(bdir, log):
    """Generate the full-size models and token files once; a stamp guards the cache."""
    bdir.mkdir(parents=True, exist_ok=True)
    files = {
        "clip_l": (bdir / "clip_l.safetensors", "clip_l", make_models.FULL["l"]),
        "clip_g": (bdir / "clip_g.safetensors", "clip_g", make_models.FULL["g"]),
    }
    for key, (path, layout, (width, layers)) in files.items():
        stamp = path.with_suffix(".stamp")
        want = json.dumps({"layout": layout, "width": width, "layers": layers, "dtype": "F16", "seed": 0,
                           "version": 1})
        if path.exists() and stamp.exists() and stamp.read_text() == want:
            continue
        log("generating %s (%s %dx%d, F16) ..." % (path.name, layout, width, layers))
        t0 = time.time()
        make_models.write_model(str(path), layout, "F16", 0, width, layers)
        stamp.write_text(want)
        log("  %.0f MB in %.1f s" % (path.stat().st_size / 1e6, time.time() - t0))
    rng = np.random.default_rng(2024)
    # a realistic prompt: 24 tokens from the common part of the vocabulary
    prompt = [int(x) for x in rng.integers(320, 20000, size=24)]

    def chunk(pad):
        ids = [49406] + prompt + [49407]
        ids += [pad] * (SEQ - len(ids))
        return [[i, 1.0] for i in ids]

    tl = bdir / "tokens-l.json"
    tl.write_text(json.dumps({"l": [chunk(49407)]}))
    tx = bdir / "tokens-sdxl.json"
    tx.write_text(json.dumps({"l": [chunk(49407)], "g": [chunk(0)]}))
    return files["clip_l"][0], files["clip_g"][0], tl, tx


# ------------------------------------------------------------------ runs

def last_json(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def run_json(cmd, env=None, timeout=3600):
    """Run a command; return (dict from the last '{' line of stderr, or None; error text)."""
    try:
        r = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, errors="replace", env=env, timeout=timeout, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
        return None, "rc %d: %s" % (r.returncode, tail[:200])
    j = last_json(r.stderr)
    if j is None:
        return None, "no JSON line on stderr"
    return j, None


def sgemm_rate(bdir):
    exe = bdir / "sgemm-rate"
    if not os.access(exe, os.X_OK):
        return None, "%s not built" % exe.relative_to(ROOT) if exe.is_relative_to(ROOT) else "sgemm-rate not built"
    try:
        r = subprocess.run([str(exe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    j = last_json(r.stdout)
    if r.returncode != 0 or j is None or "gflops" not in j:
        return None, "sgemm-rate failed (rc %d)" % r.returncode
    return j, None


def out_err(a, b):
    """max|a-b|/max|b| of cond and pooled between two output files (information only)."""
    import st_io
    try:
        x, _ = st_io.read(a)
        y, _ = st_io.read(b)
        return {k: float(np.abs(x[k] - y[k]).max() / np.abs(y[k]).max()) for k in ("cond", "pooled")}
    except Exception as e:  # noqa: BLE001 -- report, never fail the benchmark
        return {"error": str(e)}


def fmt_ms(v):
    return "—" if v is None else ("%.1f" % v)


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def main(argv=None):
    ap = argparse.ArgumentParser(description="luna vs the PyTorch reference, full size")
    ap.add_argument("--runs", type=int, default=10, help="timed encodes per process (default 10)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="every configuration runs this many times, interleaved; the table shows "
                         "the median of the per-process medians (default 3)")
    a = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    build = build_dir()
    luna = build / "luna"
    bdir = build / "bench"
    clip_l, clip_g, tok_l, tok_x = ensure_models(bdir, log)

    rate, rate_err = sgemm_rate(bdir)
    rate_default, _ = None, None
    configs = [("as is", {})]
    if cpu_has_avx512f():
        configs.append(("SkylakeX", {"OPENBLAS_CORETYPE": "SkylakeX"}))
    ref_cols = [(t, name, env) for name, env in configs for t in (1, 2)]
    luna_cols = [("f16", []), ("f32", ["--weight-dtype", "f32"])]

    cases = [("CLIP-L", [clip_l], tok_l), ("SDXL L+G", [clip_l, clip_g], tok_x)]
    runs = {}   # key -> list of result dicts
    errors = {}
    outs = {}
    for rnd in range(a.rounds):
        for label, models, tok in cases:
            margs = []
            for m in models:
                margs += ["--model", m]
            for wname, extra in luna_cols:
                out = bdir / ("out-luna-%s-%s.safetensors" % (label[:4].lower(), wname))
                log("[round %d/%d] luna %s: %s ..." % (rnd + 1, a.rounds, wname, label))
                j, e = run_json([luna, "encode", "--local"] + margs + extra +
                                ["--tokens", tok, "--out", out, "--bench", a.runs])
                runs.setdefault(("luna", label, wname), []).append(j)
                if e:
                    errors[("luna", label, wname)] = e
                outs[("luna", label, wname)] = out
            for threads, cname, extra in ref_cols:
                env = dict(os.environ)
                env.update(extra)
                # both pools: torch's OpenMP threads and OpenBLAS's own
                env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
                out = bdir / ("out-ref-%s-%d-%s.safetensors" % (label[:4].lower(), threads, cname.replace(" ", "")))
                log("[round %d/%d] reference: %s, %d thread(s), OpenBLAS %s ..." % (rnd + 1, a.rounds, label, threads, cname))
                j, e = run_json([PYTHON, REF] + margs + ["--tokens", tok, "--out", out, "--threads", threads,
                                                         "--bench", a.runs], env=env)
                runs.setdefault(("ref", label, threads, cname), []).append(j)
                if e:
                    errors[("ref", label, threads, cname)] = e
                outs[("ref", label, threads, cname)] = out

    def med(key, field="median_ms"):
        return median([j.get(field) for j in runs.get(key, []) if j])

    fl = encoder_flops(*make_models.FULL["l"])
    fg = encoder_flops(*make_models.FULL["g"], proj=True)
    flops = {"CLIP-L": fl, "CLIP-G (derived)": fg, "SDXL L+G": fl + fg}

    def ms(kind, row, *rest):
        if row == "CLIP-G (derived)":
            x, y = med((kind, "SDXL L+G") + rest), med((kind, "CLIP-L") + rest)
            return None if x is None or y is None else x - y
        return med((kind, row) + rest)

    rows = ["CLIP-L", "CLIP-G (derived)", "SDXL L+G"]
    print()
    print("## luna vs PyTorch reference: one 77-token chunk, ms (median over %d processes x %d encodes)"
          % (a.rounds, a.runs))
    print()
    if rate:
        print("SGEMM rate (build/bench/sgemm-rate, %sx%s fp32, %s threads): **%.1f GFLOP/s** (OpenBLAS core %s)"
              % (rate.get("n"), rate.get("n"), rate.get("threads"), rate["gflops"], rate.get("core", "?")))
    else:
        print("SGEMM rate: unavailable (%s)" % rate_err)
    print()
    head = ["encode", "luna f16", "luna f32"] + ["ref %dT %s" % (t, c) for t, c, _ in ref_cols] + \
           ["best ref", "best ref / luna f16", "best ref / luna f32", "luna f16 GFLOP/s (of SGEMM)",
            "luna f32 GFLOP/s (of SGEMM)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        l16, l32 = ms("luna", row, "f16"), ms("luna", row, "f32")
        refs = [ms("ref", row, t, c) for t, c, _ in ref_cols]
        valid = [(v, "%dT %s" % (t, c)) for v, (t, c, _) in zip(refs, ref_cols) if v is not None]
        best = min(valid) if valid else None
        cells = [row + " (%.1f GFLOP)" % (flops[row] / 1e9), fmt_ms(l16), fmt_ms(l32)]
        cells += [fmt_ms(v) for v in refs]
        cells.append("%s (%s)" % (fmt_ms(best[0]), best[1]) if best else "—")
        for lm in (l16, l32):
            cells.append("%.2fx" % (best[0] / lm) if best and lm else "—")
        for lm in (l16, l32):
            gf = flops[row] / (lm * 1e6) if lm else None
            cells.append("%.1f (%.0f%%)" % (gf, 100 * gf / rate["gflops"]) if gf and rate else
                         ("%.1f" % gf if gf else "—"))
        print("| " + " | ".join(cells) + " |")
    print()
    print("CLIP-G (derived) = (SDXL L+G) - (CLIP-L), on each side: luna serves no G-only model. "
          "GFLOP counts 2*77*(linear weights) plus the full 77x77 q k^T and p v products per layer. "
          "luna runs one worker per CPU; 'ref NT' is torch with N threads (torch.set_num_threads and "
          "OPENBLAS_NUM_THREADS), 'as is' with Debian's OpenBLAS choosing its kernels, 'SkylakeX' with "
          "OPENBLAS_CORETYPE=SkylakeX.")

    print()
    print("## luna resident memory (RSS after the timed encodes; every weight page touched)")
    print()
    print("| model | in-memory dtype | weights MiB | RSS after load MiB | RSS after encodes MiB | "
          "RSS - weights MiB |")
    print("|---|---|---|---|---|---|")
    for label in ("CLIP-L", "SDXL L+G"):
        for wname, _ in luna_cols:
            key = ("luna", label, wname)
            w, r0, r1 = med(key, "weights_mib"), med(key, "rss_after_load_mib"), med(key, "rss_mib")
            if w is None:
                print("| %s | %s | — | — | — | %s |" % (label, wname, errors.get(key, "no result")))
                continue
            print("| %s | %s | %.1f | %.1f | %.1f | %+.1f |" % (label, wname, w, r0, r1, r1 - w))
    print()
    print("F16 weights are used in place from the read-only file mapping, so the RSS right after "
          "loading is small; pages come in on the first encode and are shared with any other process "
          "mapping the same file.")
    print()
    for label, _, _ in cases:
        ref_key = next((k for k in outs if k[0] == "ref" and k[1] == label and k not in errors), None)
        for wname, _ in luna_cols:
            lk = ("luna", label, wname)
            if lk in outs and lk not in errors and ref_key:
                e = out_err(outs[lk], outs[ref_key])
                if "error" in e:
                    print("luna %s vs reference (%s): could not compare: %s" % (wname, label, e["error"]))
                else:
                    print("luna %s vs reference output (%s): max rel err cond %.2g, pooled %.2g"
                          % (wname, label, e["cond"], e["pooled"]))
    for k, e in errors.items():
        print("note: %s: %s" % (" ".join(str(x) for x in k), e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
