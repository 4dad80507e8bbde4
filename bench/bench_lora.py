#!/usr/bin/python3
"""bench_lora.py -- per-request LoRA stacks through lunad on full-size CLIP-L, every mode.

Run by `make bench` from the repo root as
    LUNA_BUILD=build /usr/bin/python3 bench/bench_lora.py [--rounds N] [--duration S]

Uses bench.py's full-size random CLIP-L (12x768, F16) under $LUNA_BUILD/bench/ and eight
random rank-16 kohya LoRAs on every q, k, v, out, fc1 and fc2 (tests/python/make_loras.py,
generated once). Starts one lunad per mode and prints markdown tables (medians, ratios;
no pass/fail):

1. throughput, requests/s, 8 concurrent clients (threads, one connection each, distinct
   prompts, result cache off): no LoRA; each client its own LoRA in --lora-mode lock,
   functional and auto; all 8 clients on one LoRA in auto. Cells interleaved round by
   round so that a noisy neighbour hurts every configuration alike;
2. the cost of a LoRA cache hit: lunad's own "resolve_ms" per request (looking the stack
   up), and the round trip of a strength-0 LoRA (cache hit, no arithmetic) against no
   LoRA on the same daemon;
3. the cost of a miss: loading one LoRA from --loras-dir and parsing an upload, against
   reading the file.
"""

import argparse
import mmap
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "python"))
import bench  # noqa: E402
import make_loras  # noqa: E402
import make_models  # noqa: E402
from bench_daemon import prompt_tokens  # noqa: E402
from daemon import Lunad  # noqa: E402
from lunaclient import LunaError, proto  # noqa: E402
from lunaclient.lora import lora_identity  # noqa: E402

N_CLIENTS = 8
RANK = 16


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def fmt(v, spec="%.2f"):
    return spec % v if v is not None else "—"


def ensure_loras(bdir):
    out = []
    for i in range(N_CLIENTS):
        p = bdir / ("lora-l-r%d-%d.safetensors" % (RANK, i))
        if not p.exists():
            log("writing %s ..." % p.name)
            make_loras.write_lora(str(p) + ".tmp", "kohya", "sd1", width=768, layers=12, rank=RANK, seed=500 + i)
            os.replace(str(p) + ".tmp", p)
        out.append(p)
    return out


def run_clients(d, model, stacks, duration, seed):
    """len(stacks) threads, client i encoding with stacks[i] (a list of (path, strength))
    for 'duration' s from the moment all are connected. Returns (requests/s, modes seen, errors)."""
    n = len(stacks)
    window = {}
    barrier = threading.Barrier(n, action=lambda: window.update(end=time.monotonic() + duration))
    done = [0] * n
    modes, errors = {}, []

    def client(cid):
        rng = np.random.default_rng([seed, cid])
        with d.client(timeout=600) as c:
            try:  # the first request uploads (outside the window)
                c.encode(model, tokens=prompt_tokens(rng), cache=False, loras=stacks[cid])
                barrier.wait()
            except (LunaError, threading.BrokenBarrierError) as e:
                errors.append(str(e))
                barrier.abort()
                return
            t_end = window["end"]
            while time.monotonic() < t_end:
                try:
                    _, _, info = c.encode(model, tokens=prompt_tokens(rng), cache=False, loras=stacks[cid])
                except LunaError as e:
                    errors.append(str(e))
                    return
                m = info.get("lora", {}).get("mode", "none")
                modes[m] = modes.get(m, 0) + 1
                if time.monotonic() <= t_end:
                    done[cid] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 900)
    return sum(done) / duration, modes, errors


def bench_throughput(bdir, clip_l, loras, duration, rounds):
    own = [[(str(p), 1.0)] for p in loras]
    one = [[(str(loras[0]), 1.0)]] * N_CLIENTS
    none = [[]] * N_CLIENTS
    cells = [("no LoRA", "auto", none), ("own LoRA each, lock", "lock", own),
             ("own LoRA each, functional", "functional", own), ("own LoRA each, auto", "auto", own),
             ("one LoRA for all, auto", "auto", one)]
    daemons, rates, modes, errors, status = {}, {}, {}, [], {}
    try:
        for mode in ("lock", "functional", "auto"):
            d = daemons[mode] = Lunad(models_dirs=[bdir], extra=["--lora-mode", mode, "--cache-mem", "0",
                                                                 "--max-queue", "1024"]).start()
            with d.client() as c:
                c.models("load", clip_l.name)
        for rnd in range(rounds):
            for name, mode, stacks in cells:
                log("[lora throughput %d/%d] %s, %d clients, %.0f s ..." % (rnd + 1, rounds, name, N_CLIENTS, duration))
                r, m, errs = run_clients(daemons[mode], clip_l.name, stacks, duration, seed=rnd * 100 + len(name))
                rates.setdefault(name, []).append(r)
                for k, v in m.items():
                    modes.setdefault(name, {}).setdefault(k, 0)
                    modes[name][k] += v
                errors += ["%s: %s" % (name, e) for e in errs[:3]]
        for mode, d in daemons.items():
            status[mode] = d.status()
    finally:
        for mode, d in daemons.items():
            rc = d.stop()
            d.close()
            if rc != 0:
                errors.append("lunad --lora-mode %s exited with %s" % (mode, rc))
    return {k: bench.median(v) for k, v in rates.items()}, modes, status, errors


def read_direct_ms(path):
    """Milliseconds to read 'path' from the device, bypassing the page cache (O_DIRECT)."""
    size = os.path.getsize(path)
    buf = mmap.mmap(-1, (size + 4095) // 4096 * 4096)  # page-aligned, as O_DIRECT needs
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        t = time.perf_counter()
        got = os.readv(fd, [buf])
        ms = (time.perf_counter() - t) * 1e3
    finally:
        os.close(fd)
        buf.close()
    return ms if got >= size else None


def bench_tiny_hit(bdir, runs):
    """The whole cost of a cached LoRA seen from a client, on a model so small that the
    encode takes about a millisecond: round trips with a strength-0 LoRA (cache hit, no
    arithmetic) against none, interleaved."""
    tiny = bdir / "tiny-l.safetensors"
    lora = bdir / "tiny-lora.safetensors"
    if not tiny.exists():
        make_models.write_model(str(tiny), "clip_l", "F16", 0, width=64, layers=2)
    if not lora.exists():
        make_loras.write_lora(str(lora), "kohya", "sd1", width=64, layers=2, rank=4, seed=1)
    d = Lunad(models_dirs=[bdir], extra=["--cache-mem", "0"]).start()
    try:
        with d.client() as c:
            tok = prompt_tokens(np.random.default_rng(4))
            c.encode(tiny.name, tokens=tok, cache=False, loras=[(str(lora), 0.0)])
            t_none, t_zero = [], []
            for _ in range(runs):
                t = time.perf_counter()
                c.encode(tiny.name, tokens=tok, cache=False)
                t_none.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                c.encode(tiny.name, tokens=tok, cache=False, loras=[(str(lora), 0.0)])
                t_zero.append((time.perf_counter() - t) * 1e3)
        return statistics.median(t_none), statistics.median(t_zero)
    finally:
        d.stop()
        d.close()


def bench_hit_and_miss(bdir, clip_l, loras, runs):
    """Hit: resolve_ms and the strength-0 round trip against no LoRA. Miss: a load from
    --loras-dir and an upload, against reading the file."""
    res, errors = {}, []
    d = Lunad(models_dirs=[bdir], extra=["--cache-mem", "0", "--loras-dir", str(bdir)]).start()
    try:
        with d.client() as c:
            c.models("load", clip_l.name)
            rng = np.random.default_rng(3)
            tok = prompt_tokens(rng)
            zero = [(str(loras[0]), 0.0)]
            c.encode(clip_l.name, tokens=tok, cache=False, loras=zero)  # upload once
            t_none, t_zero, resolve = [], [], []
            for _ in range(runs):  # interleaved
                t = time.perf_counter()
                c.encode(clip_l.name, tokens=tok, cache=False)
                t_none.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                _, _, info = c.encode(clip_l.name, tokens=tok, cache=False, loras=zero)
                t_zero.append((time.perf_counter() - t) * 1e3)
                resolve.append(info["lora"]["resolve_ms"])
            res["none_ms"], res["zero_ms"] = statistics.median(t_none), statistics.median(t_zero)
            res["resolve_hit_ms"] = statistics.median(resolve)
            # misses: each LoRA loaded from --loras-dir (evicted between runs), then uploaded
            load, upload, read, direct = [], [], [], []
            for p in loras[1:]:
                ident = lora_identity(str(p))
                direct.append(read_direct_ms(p))
                t = time.perf_counter()
                data = Path(p).read_bytes()
                read.append((time.perf_counter() - t) * 1e3)
                del data
                msg = {"model": clip_l.name, "tokens": tok, "cache": False,
                       "loras": [{"id": ident, "strength": 1.0, "path": p.name}]}
                reply, _ = c.call(proto.MSG_ENCODE, msg)  # the daemon loads the file
                load.append(reply["lora"]["resolve_ms"])
                c.lora_evict(ident)
                upload.append(c.lora_upload(str(p))["parse_ms"])
                c.lora_evict(ident)
            res["load_ms"], res["upload_parse_ms"] = statistics.median(load), statistics.median(upload)
            res["read_ms"] = statistics.median(read)
            direct = [x for x in direct if x is not None]
            res["direct_ms"] = statistics.median(direct) if direct else None
            res["file_mib"] = Path(loras[1]).stat().st_size / 2**20
            res["cache_entry_mib"] = c.lora_upload(str(loras[1]))["bytes"] / 2**20
    except LunaError as e:
        errors.append(str(e))
    finally:
        rc = d.stop()
        d.close()
        if rc != 0:
            errors.append("lunad exited with %s" % rc)
    return res, errors


def main(argv=None):
    ap = argparse.ArgumentParser(description="lunad LoRA modes on full-size CLIP-L")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per cell and round (default 8)")
    ap.add_argument("--runs", type=int, default=20, help="hit latency: requests per side (default 20)")
    a = ap.parse_args(argv)
    build = bench.build_dir()
    bdir = build / "bench"
    clip_l, _, _, _ = bench.ensure_models(bdir, log)
    loras = ensure_loras(bdir)
    errors = []
    print()
    print("# lunad LoRA modes (full-size CLIP-L 12x768 F16; %d clients, each LoRA rank %d on every q, k, v, out, "
          "fc1, fc2; one 77-token chunk; %d CPUs, load average %.2f at the start)"
          % (N_CLIENTS, RANK, os.cpu_count(), os.getloadavg()[0]))
    rates, modes, status, errs = bench_throughput(bdir, clip_l, loras, a.duration, a.rounds)
    errors += errs
    print()
    print("## Throughput, requests/s (median of %d interleaved rounds of %.0f s per cell, %d clients, distinct "
          "prompts, cache off)" % (a.rounds, a.duration, N_CLIENTS))
    print()
    print("| clients' LoRAs, --lora-mode | req/s | vs lock | vs no LoRA | how requests ran |")
    print("|---|---|---|---|---|")
    lock = rates.get("own LoRA each, lock")
    base = rates.get("no LoRA")
    for name in ("no LoRA", "own LoRA each, lock", "own LoRA each, functional", "own LoRA each, auto",
                 "one LoRA for all, auto"):
        r = rates.get(name)
        m = ", ".join("%s %d" % kv for kv in sorted(modes.get(name, {}).items()))
        print("| %s | %s | %s | %s | %s |" % (name, fmt(r), "%.2fx" % (r / lock) if r and lock else "—",
                                              "%.2fx" % (r / base) if r and base else "—", m))
    print()
    for mode, st in status.items():
        lo = st["lora"]
        print("- lunad --lora-mode %s: %d merges (%.0f ms total), %d restores (%.0f ms), %d lock waits (%.0f ms), "
              "rss %.0f MiB" % (mode, lo["merges"], lo["merge_ms"], lo["restores"], lo["restore_ms"],
                                lo["lock_waits"], lo["lock_wait_ms"], st["rss_bytes"] / 2**20))
    print()
    f, au, one = rates.get("own LoRA each, functional"), rates.get("own LoRA each, auto"), \
        rates.get("one LoRA for all, auto")
    print("Targets: functional and auto >= 1.5x lock (here %s and %s); auto with one LoRA for all >= 0.95x "
          "no LoRA (here %s)." % ("%.2fx" % (f / lock) if f and lock else "—",
                                  "%.2fx" % (au / lock) if au and lock else "—",
                                  "%.2fx" % (one / base) if one and base else "—"))
    hm, errs = bench_hit_and_miss(bdir, clip_l, loras, a.runs)
    errors += errs
    print()
    print("## Cache hit and miss (one client, sequential; medians)")
    print()
    print("| what | ms |")
    print("|---|---|")
    print("| lunad's lookup of a cached one-LoRA stack (`resolve_ms` in the reply) | %s |"
          % fmt(hm.get("resolve_hit_ms"), "%.3f"))
    print("| round trip, no LoRA | %s |" % fmt(hm.get("none_ms"), "%.1f"))
    print("| round trip, a cached LoRA at strength 0 (hit, no arithmetic) | %s |" % fmt(hm.get("zero_ms"), "%.1f"))
    print("| miss: lunad loads the LoRA from --loras-dir (read, SHA-256, fp32 factors) | %s |"
          % fmt(hm.get("load_ms"), "%.1f"))
    print("| miss: lunad parses an upload (SHA-256, fp32 factors; the transfer not counted) | %s |"
          % fmt(hm.get("upload_parse_ms"), "%.1f"))
    print("| reading the %s MiB file from the disk (O_DIRECT, no page cache) | %s |"
          % (fmt(hm.get("file_mib"), "%.1f"), fmt(hm.get("direct_ms"), "%.1f")))
    print("| reading the %s MiB file from the page cache (Python read_bytes) | %s |"
          % (fmt(hm.get("file_mib"), "%.1f"), fmt(hm.get("read_ms"), "%.1f")))
    tn, tz = bench_tiny_hit(bench.build_dir() / "bench", 10 * a.runs)
    print("| tiny model (64 wide, 2 layers), round trip, no LoRA | %s |" % fmt(tn, "%.3f"))
    print("| tiny model, round trip, a cached LoRA at strength 0: the whole cost of a hit | %s (+%s) |"
          % (fmt(tz, "%.3f"), fmt(tz - tn, "%.3f")))
    print()
    print("A cached entry holds %s MiB (fp32 factors)." % fmt(hm.get("cache_entry_mib"), "%.1f"))
    if errors:
        print()
        print("Errors:")
        for e in errors:
            print("- %s" % e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
