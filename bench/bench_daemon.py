#!/usr/bin/python3
"""bench_daemon.py -- what lunad costs and what it saves, on full-size models.

Run by `make bench` from the repo root as
    LUNA_BUILD=build /usr/bin/python3 bench/bench_daemon.py [--rounds N] [--duration S]

It reuses bench.py's full-size random-weight models under $LUNA_BUILD/bench/ (CLIP-L
12x768 and CLIP-G 32x1280, F16; generated once) and its one-chunk prompt, starts real
lunad processes (tests/python/daemon.py) and prints markdown tables, medians and
ratios, no pass/fail:

1. latency: one CLIP-L encode through lunad (lunaclient, one connection, sequential
   requests, result cache off) against `luna encode --local --bench N` (in-process
   median) on the same model and tokens, interleaved in the same run;
2. throughput: requests/s with 1, 8 and 32 concurrent clients (threads, one connection
   each, distinct prompts, cache off) on CLIP-L, with --batch-max 8 and --batch-max 1;
3. memory: one lunad serving the CLIP-L + CLIP-G pair to 8 clients, against 8 separate
   `luna encode --local` processes and against PyTorch reference processes
   (tests/python/ref_clip.py), each loading its own copy.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "python"))
import bench  # noqa: E402  -- ensure_models, run_json, median
from daemon import Lunad  # noqa: E402
from lunaclient import LunaError  # noqa: E402

PYTHON = "/usr/bin/python3"
REF = ROOT / "tests" / "python" / "ref_clip.py"
MIB = 1 << 20


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def prompt_tokens(rng, sdxl=False, n=24):
    """One 77-token chunk of a random prompt of n tokens (as bench.py's), L and maybe G."""
    ids = [49406] + [int(x) for x in rng.integers(320, 20000, size=n)] + [49407]

    def chunk(pad):
        return [[i, 1.0] for i in ids + [pad] * (77 - len(ids))]

    out = {"l": [chunk(49407)]}
    if sdxl:
        out["g"] = [chunk(0)]
    return out


def fmt(v, spec="%.1f"):
    return "—" if v is None else spec % v


# ------------------------------------------------------------------ 1. latency

def bench_latency(luna, bdir, clip_l, tok_l, rounds, runs):
    tok = json.loads(Path(tok_l).read_text())
    local_meds, daemon_meds, errors = [], [], []
    d = Lunad(models_dirs=[bdir]).start()
    try:
        with d.client() as c:
            c.models("load", clip_l.name)
            for _ in range(3):  # page the weights in, warm the caches
                c.encode(clip_l.name, tokens=tok, cache=False)
            for rnd in range(rounds):
                log("[latency %d/%d] luna encode --local --bench %d ..." % (rnd + 1, rounds, runs))
                with tempfile.TemporaryDirectory() as t:
                    j, e = bench.run_json([luna, "encode", "--local", "--model", clip_l, "--tokens", tok_l,
                                           "--out", Path(t) / "o.safetensors", "--bench", runs])
                if e:
                    errors.append("local: " + e)
                else:
                    local_meds.append(j["median_ms"])
                log("[latency %d/%d] lunad, %d sequential requests ..." % (rnd + 1, rounds, runs))
                times = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    c.encode(clip_l.name, tokens=tok, cache=False)
                    times.append((time.perf_counter() - t0) * 1e3)
                daemon_meds.append(statistics.median(times))
    finally:
        rc = d.stop()
        d.close()
        if rc != 0:
            errors.append("lunad exited with %s" % rc)
    return bench.median(local_meds), bench.median(daemon_meds), errors


# ------------------------------------------------------------------ 2. throughput

def run_clients(d, model, n_clients, duration, sdxl=False, seed=0):
    """n_clients threads, one connection each, sequential requests with distinct prompts
    for 'duration' seconds from the moment all are connected. Returns (requests/s over
    that window, requests completed in it, errors)."""
    window = {}
    barrier = threading.Barrier(n_clients, action=lambda: window.update(end=time.monotonic() + duration))
    done = [0] * n_clients
    errors = []

    def client(cid):
        rng = np.random.default_rng([seed, cid])
        try:
            c = d.client(timeout=600)
        except LunaError as e:
            errors.append(str(e))
            barrier.abort()
            return
        with c:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return
            t_end = window["end"]
            while time.monotonic() < t_end:
                try:
                    c.encode(model, tokens=prompt_tokens(rng, sdxl), cache=False)
                except LunaError as e:
                    errors.append(str(e))
                    return
                if time.monotonic() <= t_end:
                    done[cid] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 600)
    total = sum(done)
    return total / duration, total, errors


def bench_throughput(bdir, clip_l, duration, rounds, client_counts=(1, 8, 32), batch_maxes=(8, 1)):
    """Both daemons run side by side; the cells are interleaved round by round so that
    a noisy neighbour hurts every configuration alike. Returns {(batch_max, clients):
    median requests/s} and errors."""
    rates, errors, daemons = {}, [], {}
    try:
        for bm in batch_maxes:
            d = daemons[bm] = Lunad(models_dirs=[bdir], extra=["--batch-max", str(bm), "--max-queue", "1024"]).start()
            with d.client() as c:
                c.models("load", clip_l.name)
                c.encode(clip_l.name, tokens=prompt_tokens(np.random.default_rng(1)), cache=False)
        for rnd in range(rounds):
            for n in client_counts:
                for bm in batch_maxes:
                    log("[throughput %d/%d] --batch-max %d, %d client(s), %.0f s ..." % (rnd + 1, rounds, bm, n,
                                                                                       duration))
                    rate, _, errs = run_clients(daemons[bm], clip_l.name, n, duration, seed=rnd * 10000 + bm * 100 + n)
                    rates.setdefault((bm, n), []).append(rate)
                    errors += ["batch-max %d, %d clients: %s" % (bm, n, e) for e in errs[:3]]
        for bm, d in daemons.items():
            st = d.status()
            if st["requests"]["failed"] or st["requests"]["busy"]:
                errors.append("batch-max %d: status counts %r" % (bm, st["requests"]))
    finally:
        for bm, d in daemons.items():
            rc = d.stop()
            d.close()
            if rc != 0:
                errors.append("lunad --batch-max %d exited with %s" % (bm, rc))
    return {k: bench.median(v) for k, v in rates.items()}, errors


# ------------------------------------------------------------------ 3. memory

def proc_kib(pid, field, path="status"):
    """A 'Field:   N kB' value of /proc/PID/status or smaps_rollup, in KiB (None if gone)."""
    try:
        with open("/proc/%d/%s" % (pid, path)) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def run_measured(cmds, env=None, sample=0.1):
    """Start every command at once; while all of them run, sample the Pss (smaps_rollup)
    of each; reap each with wait4 for its peak RSS (ru_maxrss). Returns a list of
    {rc, peak_rss_kib, err} and the largest sum of Pss over samples taken while all
    were alive."""
    procs = [subprocess.Popen([str(x) for x in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                              cwd=ROOT) for cmd in cmds]
    # stderr goes to pipes read only at the end: the tools write a few lines at most
    res = [None] * len(procs)
    pss_sum = 0
    while any(r is None for r in res):
        for i, p in enumerate(procs):
            if res[i] is None:
                pid, status, ru = os.wait4(p.pid, os.WNOHANG)  # not Popen.poll: it would reap without rusage
                if pid:
                    p.returncode = os.waitstatus_to_exitcode(status)
                    res[i] = {"rc": p.returncode, "peak_rss_kib": ru.ru_maxrss}
        if all(r is None for r in res):
            vals = [proc_kib(p.pid, "Pss", "smaps_rollup") for p in procs]
            if all(v is not None for v in vals):
                pss_sum = max(pss_sum, sum(vals))
        time.sleep(sample)
    for r, p in zip(res, procs):
        err = p.stderr.read().decode(errors="replace")
        p.stderr.close()
        r["err"] = (err.strip().splitlines() or [""])[-1][:200]
    return res, pss_sum


def bench_memory(luna, bdir, clip_l, clip_g, tok_x, n_clients, ref_procs):
    errors = []
    pair = [clip_l.name, clip_g.name]
    result = {}

    # one lunad, 8 clients
    log("[memory] one lunad serving CLIP-L + CLIP-G to %d clients ..." % n_clients)
    d = Lunad(models_dirs=[bdir]).start()
    try:
        with d.client() as c:
            model = c.models("load", pair)["model"]
            result["weights_bytes"] = model["weights_bytes"]
        conns, total, errs = connect_and_encode_once(d, pair, n_clients)
        errors += errs
        if total != n_clients:
            errors.append("memory: %d of %d clients encoded" % (total, n_clients))
        with d.client() as c:
            st = c.status()
        result["lunad_rss"] = st["rss_bytes"]
        result["lunad_pss_kib"] = proc_kib(d.pid, "Pss", "smaps_rollup")
        result["lunad_private_kib"] = sum(proc_kib(d.pid, k, "smaps_rollup") or 0
                                          for k in ("Private_Clean", "Private_Dirty"))
        result["lunad_conns"] = st["connections"]
        result["lunad_encoded"] = total
        for c in conns:
            c.close()
    finally:
        rc = d.stop()
        d.close()
        if rc != 0:
            errors.append("lunad exited with %s" % rc)

    # 8 luna --local processes at once (they share the page cache of the F16 files)
    log("[memory] %d concurrent `luna encode --local` processes (1 thread each) ..." % n_clients)
    with tempfile.TemporaryDirectory() as t:
        cmds = [[luna, "encode", "--local", "--model", clip_l, "--model", clip_g, "--tokens", tok_x,
                 "--out", Path(t) / ("o%d.safetensors" % i), "--threads", 1] for i in range(n_clients)]
        procs, pss_sum = run_measured(cmds)
    bad = [p for p in procs if p["rc"] != 0]
    procs = [p for p in procs if p["rc"] == 0]
    errors += ["luna --local: rc %s: %s" % (p["rc"], p["err"]) for p in bad[:2]]
    result["luna_peak_sum_kib"] = sum(p["peak_rss_kib"] or 0 for p in procs)
    result["luna_peak_each_kib"] = bench.median([p["peak_rss_kib"] for p in procs])
    result["luna_pss_sum_kib"] = pss_sum
    result["luna_n"] = len(procs)

    # PyTorch reference processes: too large to run 8 at once here; one at a time
    refs = []
    for i in range(ref_procs):
        log("[memory] PyTorch reference process %d/%d (fp32 weights) ..." % (i + 1, ref_procs))
        with tempfile.TemporaryDirectory() as t:
            env = dict(os.environ)
            procs, _ = run_measured([[PYTHON, REF, "--model", clip_l, "--model", clip_g, "--tokens", tok_x,
                                      "--out", Path(t) / "r.safetensors", "--threads", 2]], env=env)
        p = procs[0]
        if p["rc"] != 0:
            errors.append("ref_clip.py: rc %s: %s" % (p["rc"], p["err"]))
        else:
            refs.append(p["peak_rss_kib"])
    result["ref_peak_each_kib"] = bench.median(refs) if refs else None
    result["ref_measured"] = len(refs)
    return result, errors


def connect_and_encode_once(d, model, n_clients):
    """n_clients threads, one connection each, all connected before any sends, one SDXL
    encode each (distinct prompts). Returns (open clients, completed, errors): the
    caller reads status with every client still connected, then closes them."""
    barrier = threading.Barrier(n_clients)
    errors, done, conns = [], [], []

    def client(cid):
        try:
            c = d.client(timeout=900)
        except LunaError as e:
            errors.append(str(e))
            barrier.abort()
            return
        conns.append(c)
        try:
            barrier.wait()
            c.encode(model, tokens=prompt_tokens(np.random.default_rng([7, cid]), sdxl=True), cache=False)
            done.append(cid)
        except (LunaError, threading.BrokenBarrierError) as e:
            errors.append(str(e))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    return conns, len(done), errors


# ------------------------------------------------------------------ main

def main(argv=None):
    ap = argparse.ArgumentParser(description="lunad latency, throughput and memory, full size")
    ap.add_argument("--rounds", type=int, default=3, help="latency and throughput: interleaved rounds (default 3)")
    ap.add_argument("--runs", type=int, default=20, help="latency: encodes per round and side (default 20)")
    ap.add_argument("--duration", type=float, default=5.0,
                    help="throughput: seconds per cell and round (default 5)")
    ap.add_argument("--ref-procs", type=int, default=2,
                    help="memory: PyTorch reference processes to measure, one at a time (default 2); "
                         "the 8-process sum is 8 x their median peak")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: latency,throughput,memory")
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))

    build = bench.build_dir()
    luna = build / "luna"
    bdir = build / "bench"
    clip_l, clip_g, tok_l, tok_x = bench.ensure_models(bdir, log)
    errors = []

    print()
    print("# lunad: latency, throughput, memory (full-size CLIP-L 12x768 and CLIP-G 32x1280, F16, "
          "one 77-token chunk; %d CPUs, load average %.2f at the start)" % (os.cpu_count(), os.getloadavg()[0]))

    if "latency" not in skip:
        lm, dm, errs = bench_latency(luna, bdir, clip_l, tok_l, a.rounds, a.runs)
        errors += errs
        print()
        print("## Latency of one CLIP-L encode, ms (median of %d rounds x %d sequential encodes)" % (a.rounds, a.runs))
        print()
        print("| path | median ms | vs --local |")
        print("|---|---|---|")
        print("| `luna encode --local --bench %d` (in-process, no I/O) | %s | 1.00x |" % (a.runs, fmt(lm)))
        print("| lunad, lunaclient round trip (one connection, cache off) | %s | %s |"
              % (fmt(dm), "%.3fx" % (dm / lm) if lm and dm else "—"))
        print()
        if lm and dm:
            print("lunad adds %.1f ms (%+.1f%%) per request: framing, JSON, the socket, the queue and the "
                  "Python client; target: at most +5%%." % (dm - lm, 100 * (dm / lm - 1)))
        print("Both run the same model, tokens and thread count (one compute thread per CPU).")

    if "throughput" not in skip:
        res, errs = bench_throughput(bdir, clip_l, a.duration, a.rounds)
        errors += errs
        print()
        print("## Throughput on CLIP-L, requests/s (median of %d interleaved rounds of %.0f s per cell; distinct "
              "prompts, cache off; clients are threads with one connection each, on the same machine)"
              % (a.rounds, a.duration))
        print()
        print("| clients | --batch-max 8 (default) | vs 1 client | --batch-max 1 (no batching) | vs 1 client | "
              "batching gain |")
        print("|---|---|---|---|---|---|")
        for n in (1, 8, 32):
            r8, r1, b8, b1 = res.get((8, n)), res.get((1, n)), res.get((8, 1)), res.get((1, 1))
            print("| %d | %s | %s | %s | %s | %s |" % (
                n, fmt(r8, "%.2f"), "%.2fx" % (r8 / b8) if r8 and b8 else "—",
                fmt(r1, "%.2f"), "%.2fx" % (r1 / b1) if r1 and b1 else "—",
                "%.2fx" % (r8 / r1) if r8 and r1 else "—"))
        print()
        print("Targets: no fall as clients are added; with batching, 8 clients >= 1.2x the 1-client rate "
              "(here %s)." % ("%.2fx" % (res[(8, 8)] / res[(8, 1)]) if res.get((8, 8)) and res.get((8, 1)) else "—"))

    if "memory" not in skip:
        m, errs = bench_memory(luna, bdir, clip_l, clip_g, tok_x, 8, a.ref_procs)
        errors += errs
        n = 8
        print()
        print("## Memory: CLIP-L + CLIP-G (SDXL pair) for %d clients, MiB" % n)
        print()
        print("| setup | what was measured | MiB |")
        print("|---|---|---|")
        wb = m.get("weights_bytes")
        print("| weights (fp16, as loaded by lunad) | `weights_bytes` of the model | %s |" % fmt(wb / MIB if wb else None))
        print("| **one lunad, %d clients** | `status` rss_bytes after %d encoded, with %d connections open | **%s** |"
              % (n, m.get("lunad_encoded", 0), m.get("lunad_conns", 0),
                 fmt(m["lunad_rss"] / MIB if m.get("lunad_rss") else None)))
        print("| one lunad, %d clients | its Pss / private pages (smaps_rollup), just after | %s / %s |"
              % (n, fmt(m["lunad_pss_kib"] / 1024 if m.get("lunad_pss_kib") else None),
                 fmt(m["lunad_private_kib"] / 1024 if m.get("lunad_private_kib") is not None else None)))
        print("| %d `luna encode --local` processes at once | sum of peak RSS (wait4 ru_maxrss; shared file "
              "pages counted in every process) | %s |" % (m["luna_n"], fmt(m["luna_peak_sum_kib"] / 1024)))
        print("| %d `luna encode --local` processes at once | largest sum of Pss while all ran (shared pages "
              "split between them) | %s |" % (m["luna_n"], fmt(m["luna_pss_sum_kib"] / 1024 if m["luna_pss_sum_kib"]
                                                                  else None)))
        rp = m.get("ref_peak_each_kib")
        print("| 1 PyTorch reference process (ref_clip.py, fp32 weights) | peak RSS, median of %d run one at a time "
              "| %s |" % (m["ref_measured"], fmt(rp / 1024 if rp else None)))
        print("| **%d PyTorch reference processes** | %d x that peak (each holds private copies) | **%s** |"
              % (n, n, fmt(n * rp / 1024 if rp else None)))
        print("| %d ComfyUI-like processes (derived) | %d x the fp16 weights: private copies, a lower bound | %s |"
              % (n, n, fmt(n * wb / MIB if wb else None)))
        print()
        print("luna maps F16 files read-only and uses the weights in place, so %d `luna --local` processes share "
              "one copy in the page cache: their RSS sum counts it %d times, their Pss sum once. That is not "
              "what ComfyUI does: each ComfyUI process copies the weights into its own anonymous memory "
              "(fp16), which the PyTorch reference processes model (private copies; they hold fp32, about "
              "twice ComfyUI's fp16 weights, and their peak includes load-time conversions). The lunad row is "
              "what replacing %d ComfyUI text encoders with one daemon costs." % (n, n, n))
    if errors:
        print()
        for e in errors:
            print("note: %s" % e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
