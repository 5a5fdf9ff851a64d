#!/usr/bin/python3
"""Helper of scripts/bench-ship.sh (stdlib only; not meant to be run alone).

  bench-ship.py run --out R.json [--count-stdout] -- CMD...
      Runs CMD, samples the CPU time of each of its threads from /proc every
      0.2 s, and writes wall time, exact user/sys time (wait4 rusage), peak
      RSS, per-thread CPU and (with --count-stdout) the bytes CMD wrote to
      stdout, which are read and thrown away. Exits with CMD's status.

  bench-ship.py sample --out S.jsonl --stop FILE --ship-json P --tern T
                       --state DIR --vm VM [--pid NAME=PID ...]
      Once a second until FILE exists: ship.json, the journal header (mode,
      fill) from `tern journal dump --header`, CPU ticks of each named pid
      and of the whole machine, as one JSON line.

  bench-ship.py make-zeroes --size BYTES --random-pct P --out FILE
      A fully written file of 4 KiB blocks, P% of them random (seeded, so
      every run builds the same file), the rest real zero bytes.

  bench-ship.py prefault BYTES
      Allocates and touches BYTES of memory, then frees it: memory this VM
      handed back to its host (free page reporting) is backed again before
      a timed run, instead of being faulted back inside it.

  bench-ship.py summary RESULTS_DIR WORK_DIR
      Reads what bench-ship.sh left in RESULTS_DIR and writes summary.md and
      summary.json there (and a copy in WORK_DIR); prints the Markdown.

What the bench scripts share (medians, JSON and meta.env reading) is in
lib/benchlib.py.
"""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from benchlib import fnum, maybe_json, median as med, read_env, write_summary  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# /proc helpers
# ---------------------------------------------------------------------------
def stat_fields(path):
    """comm and the fields after it of a /proc stat file, or None."""
    try:
        with open(path) as f:
            s = f.read()
    except OSError:
        return None
    lp, rp = s.find("("), s.rfind(")")
    return s[lp + 1:rp], s[rp + 2:].split()


def threads_of(pid):
    """{tid: (comm, utime_ticks, stime_ticks)} for every thread of pid."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        r = stat_fields(f"/proc/{pid}/task/{tid}/stat")
        if r:
            comm, rest = r
            # rest[0] is field 3 (state): utime is field 14, stime 15.
            out[tid] = (comm, int(rest[11]), int(rest[12]))
    return out


def proc_ticks(pid):
    """utime+stime of a whole process (its threads included), in ticks."""
    r = stat_fields(f"/proc/{pid}/stat")
    if not r:
        return None
    return int(r[1][11]) + int(r[1][12])


def disk_written(dev):
    """Bytes written to block device `dev` (a /proc/diskstats name), or None."""
    if not dev:
        return None
    with open("/proc/diskstats") as f:
        for line in f:
            v = line.split()
            if len(v) > 9 and v[2] == dev:
                return int(v[9]) * 512
    return None


def machine_ticks():
    """(busy, total, steal) ticks of all CPUs from /proc/stat. Busy is what
    this machine ran (user, nice, system, irq, softirq); steal, the time the
    host gave the vCPUs to someone else, is apart."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]] + [0] * 8
    busy = v[0] + v[1] + v[2] + v[5] + v[6]  # guest time is already in user
    return busy, sum(v[:8]), v[7]


# ---------------------------------------------------------------------------
# run: measure one command
# ---------------------------------------------------------------------------
def cmd_run(a):
    counted = [0]
    busy0 = machine_ticks()[0]
    t0 = time.monotonic()
    p = subprocess.Popen(a.cmd, stdout=subprocess.PIPE if a.count_stdout else None)

    def forward(sig, _frame):
        # Stopped by the benchmark's cleanup: take the command along.
        p.send_signal(sig)
        p.wait()
        sys.exit(128 + sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    def drain():
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while True:
            n = p.stdout.readinto(view)
            if not n:
                break
            counted[0] += n

    reader = None
    if a.count_stdout:
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
    last = {}  # tid -> (comm, u, s), the newest reading
    done = threading.Event()

    def sample():
        while not done.is_set():
            for tid, v in threads_of(p.pid).items():
                last[tid] = v
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # Blocking wait, so the wall time is exact (not rounded to the sampling).
    _, st, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    busy1 = machine_ticks()[0]
    done.set()
    sampler.join()
    p.returncode = os.waitstatus_to_exitcode(st)  # reaped by wait4
    if reader:
        reader.join()
    groups = {}
    for comm, u, s in last.values():
        g = groups.setdefault(comm, {"threads": 0, "user_s": 0.0, "sys_s": 0.0})
        g["threads"] += 1
        g["user_s"] += u / TICK
        g["sys_s"] += s / TICK
    res = {
        "cmd": a.cmd,
        "rc": p.returncode,
        "wall_s": wall,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "maxrss_kb": ru.ru_maxrss,
        # Every CPU's busy time meanwhile: this process, the kernel's
        # writeback threads, and whatever else ran.
        "machine_busy_s": (busy1 - busy0) / TICK,
        "threads": groups,
    }
    if a.count_stdout:
        res["stdout_bytes"] = counted[0]
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    return p.returncode


# ---------------------------------------------------------------------------
# sample: the lag runs' one-second time series
# ---------------------------------------------------------------------------
HEADER_RE = re.compile(r"fill ([0-9.]+)%.*?mode (\w+) \(overflow at seq (\d+)\)", re.S)


def cmd_sample(a):
    pids = dict(x.split("=", 1) for x in a.pid)
    with open(a.out, "a") as out:
        while not os.path.exists(a.stop):
            t = time.time()
            rec = {"t": t}
            try:
                with open(a.ship_json) as f:
                    rec["ship"] = json.load(f)
            except (OSError, ValueError):
                pass
            try:
                h = subprocess.run([a.tern, "--state", a.state, "-q", "journal", "dump", a.vm, "--header"],
                                   capture_output=True, text=True, timeout=5)
                m = HEADER_RE.search(h.stdout)
                if m:
                    rec["journal"] = {"fill_pct": float(m.group(1)), "mode": m.group(2),
                                      "overflow_seq": int(m.group(3))}
            except (OSError, subprocess.SubprocessError):
                pass
            rec["cpu_ticks"] = {k: proc_ticks(v) for k, v in pids.items()}
            rec["machine_ticks"] = machine_ticks()
            rec["disk_written"] = disk_written(a.disk)
            out.write(json.dumps(rec) + "\n")
            out.flush()
            time.sleep(max(0.0, a.interval - (time.time() - t)))
    return 0


# ---------------------------------------------------------------------------
# make-zeroes
# ---------------------------------------------------------------------------
def cmd_make_zeroes(a):
    rng = random.Random(20261128)
    block = 4096
    nblocks = a.size // block
    zero = bytes(block)
    chunk_blocks = 256  # 1 MiB writes
    with open(a.out, "wb") as f:
        for start in range(0, nblocks, chunk_blocks):
            parts = []
            for _ in range(min(chunk_blocks, nblocks - start)):
                parts.append(rng.randbytes(block) if rng.random() * 100 < a.random_pct else zero)
            f.write(b"".join(parts))
        f.flush()
        os.fsync(f.fileno())
    return 0


# ---------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------
def thread_class(comm):
    if comm.startswith("ship-zstd"):
        return "zstd workers"
    if comm == "ship-resync":
        return "resync (read image → ring)"
    if comm == "ship-writer":
        return "writer (file, fsync)"
    if comm == "ship-status":
        return "status"
    if comm == "tern":
        return "reader (ring → batches)"
    return "other"


def tput_run(kind, dataset, level, threads, rnd, status, d, results, meta):
    """One throughput run's figures."""
    row = {"kind": kind, "dataset": dataset, "level": level, "threads": threads, "round": rnd,
           "status": status, "dir": os.path.relpath(d, results)}
    run = maybe_json(os.path.join(d, "run.json"))
    size = int(meta.get(f"size_{dataset}", "0") or 0)
    if not run or status != "ok":
        return row
    cpu = run["user_s"] + run["sys_s"]
    row.update(wall_s=run["wall_s"], user_s=run["user_s"], sys_s=run["sys_s"],
               maxrss_mb=run["maxrss_kb"] / 1024)
    if run.get("machine_busy_s") is not None:
        row["machine_other_s"] = max(0.0, run["machine_busy_s"] - cpu)
    if kind == "tern":
        ship = maybe_json(os.path.join(d, "ship.json"))
        if not ship:
            return row
        bi, bo = ship["bytes_in"], ship["bytes_out"]
        row.update(bytes_in=bi, bytes_out=bo, ratio=(bi / bo if bo else None),
                   segments=ship["segments_shipped"], records=ship["records_shipped"],
                   mb_s=bi / run["wall_s"] / 1e6, cpu_s_per_gb=cpu / (bi / 1e9) if bi else None)
        classes = {}
        for comm, g in run["threads"].items():
            c = thread_class(comm)
            classes[c] = classes.get(c, 0.0) + g["user_s"] + g["sys_s"]
        classes["unattributed (exited between samples)"] = max(0.0, cpu - sum(classes.values()))
        row["cpu_by_thread"] = classes
        try:
            with open(os.path.join(d, "du.txt")) as f:
                row["cache_bytes"] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
        if size and bi != size:
            row["note"] = f"shipped {bi} bytes of a {size}-byte image"
    else:
        out = run.get("stdout_bytes")
        row.update(bytes_in=size, bytes_out=out, ratio=(size / out if out else None),
                   mb_s=size / run["wall_s"] / 1e6, cpu_s_per_gb=cpu / (size / 1e9) if size else None)
    return row


# The lag runs' "rest" CPU above which something else probably ran (the
# sampler and kernel threads stay well below it on a quiet machine).
DISTURBED_PCT = 25

MEDIAN_KEYS = ["wall_s", "user_s", "sys_s", "maxrss_mb", "machine_other_s", "bytes_in", "bytes_out",
               "ratio", "segments", "records", "mb_s", "cpu_s_per_gb", "cache_bytes"]


def tput_rows(results, meta):
    """Per (tool, data set, level, threads): medians over rounds, and the runs."""
    runs = []
    path = os.path.join(results, "manifest.tsv")
    if not os.path.exists(path):
        return [], []
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if parts[0] not in ("tern", "zstd"):
                continue
            kind, dataset, level, threads, rnd, status, d = parts
            runs.append(tput_run(kind, dataset, int(level), int(threads), int(rnd), status, d, results, meta))
    rows = []
    for r in runs:
        key = (r["kind"], r["dataset"], r["level"], r["threads"])
        if any((x["kind"], x["dataset"], x["level"], x["threads"]) == key for x in rows):
            continue
        same = [x for x in runs if (x["kind"], x["dataset"], x["level"], x["threads"]) == key]
        ok = [x for x in same if x["status"] == "ok" and x.get("mb_s") is not None]
        row = {"kind": key[0], "dataset": key[1], "level": key[2], "threads": key[3],
               "runs": len(same), "ok_runs": len(ok),
               "status": "ok" if len(ok) == len(same) else f"{len(ok)}/{len(same)} ok"}
        for k in MEDIAN_KEYS:
            row[k] = med([x.get(k) for x in ok])
        if ok:
            row["mb_s_min"] = min(x["mb_s"] for x in ok)
            row["mb_s_max"] = max(x["mb_s"] for x in ok)
            row["cpu_s_per_gb_min"] = min(x["cpu_s_per_gb"] for x in ok if x.get("cpu_s_per_gb") is not None)
            row["cpu_s_per_gb_max"] = max(x["cpu_s_per_gb"] for x in ok if x.get("cpu_s_per_gb") is not None)
        if key[0] == "tern" and ok:
            classes = []
            for x in ok:
                for c in x.get("cpu_by_thread") or {}:
                    if c not in classes:
                        classes.append(c)
            row["cpu_by_thread"] = {c: med([(x.get("cpu_by_thread") or {}).get(c) for x in ok]) for c in classes}
            notes = sorted({x["note"] for x in ok if x.get("note")})
            if notes:
                row["note"] = "; ".join(notes)
        rows.append(row)
    return rows, runs


def lag_rows(results):
    rows = []
    path = os.path.join(results, "manifest.tsv")
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if parts[0] != "lag":
                continue
            _, rate, status, d = parts
            row = {"rate": rate, "status": status, "dir": os.path.relpath(d, results)}
            fio = maybe_json(os.path.join(d, "fio.json"))
            if fio and fio.get("jobs"):
                job = fio["jobs"][0]
                w = job["write"]
                row["fio_mb_s"] = w["bw_bytes"] / 1e6
                row["fio_written"] = w["io_bytes"]
                row["fio_runtime_s"] = w["runtime"] / 1000
                perc = w.get("clat_ns", {}).get("percentile") or {}
                if perc.get("99.000000") is not None:
                    row["fio_clat_p99_ms"] = perc["99.000000"] / 1e6
                row["fio_cpu_pct"] = job.get("usr_cpu", 0) + job.get("sys_cpu", 0)
            ship = maybe_json(os.path.join(d, "ship.json"))
            if ship:
                row.update(lag_p50_ms=ship["lag_p50_ms"], lag_p99_ms=ship["lag_p99_ms"],
                           lag_max_ms=ship["lag_max_ms"], ratio=ship["compression_ratio"],
                           shipped=ship["bytes_in"], segments=ship["segments_shipped"],
                           cache_errors=ship["cache_errors"])
            try:
                with open(os.path.join(d, "times.env")) as f:
                    times = dict(l.strip().split("=", 1) for l in f if "=" in l)
                t0, t1 = float(times["fio_start"]), float(times["fio_end"])
                row["drain_s"] = float(times["drain_s"]) if times.get("drain_s") else None
                row["drained"] = times.get("drained") == "1"
            except (OSError, KeyError, ValueError):
                t0 = t1 = None
            samples = []
            try:
                with open(os.path.join(d, "samples.jsonl")) as f:
                    samples = [json.loads(l) for l in f if l.strip()]
            except (OSError, ValueError):
                pass
            fills = [s["ship"]["journal_fill"] for s in samples if "ship" in s]
            fills += [s["journal"]["fill_pct"] / 100 for s in samples if "journal" in s]
            row["fill_max_pct"] = max(fills) * 100 if fills else None
            modes = {s["journal"]["mode"] for s in samples if "journal" in s}
            ovf_seq = max((s["journal"]["overflow_seq"] for s in samples if "journal" in s), default=0)
            rates = [s["ship"]["ship_rate_mb_s"] for s in samples if "ship" in s]
            row["ship_rate_max"] = max(rates) if rates else None
            try:
                with open(os.path.join(d, "overflow.txt")) as f:
                    final_mode = f.read().strip()
            except OSError:
                final_mode = ""
            row["overflow"] = "Overflow" in modes or final_mode == "yes"
            row["modes_seen"] = sorted(modes)
            row["overflow_seq_max"] = ovf_seq
            if t0 is not None and samples:
                inside = [s for s in samples if t0 <= s["t"] <= t1 and "ship" in s]
                if len(inside) >= 2:
                    a, b = inside[0], inside[-1]
                    dt = b["t"] - a["t"]
                    row["ship_mb_s_during"] = (b["ship"]["bytes_in"] - a["ship"]["bytes_in"]) / dt / 1e6
                    cpu = {}
                    for k in a["cpu_ticks"]:
                        if a["cpu_ticks"].get(k) is not None and b["cpu_ticks"].get(k) is not None:
                            cpu[k] = (b["cpu_ticks"][k] - a["cpu_ticks"][k]) / TICK / dt * 100
                    # Percent of one core, like the processes' figures.
                    mb = (b["machine_ticks"][0] - a["machine_ticks"][0]) / TICK / dt * 100
                    row["cpu_pct"] = cpu
                    row["machine_busy_pct"] = mb
                    if len(a["machine_ticks"]) > 2:
                        row["steal_pct"] = (b["machine_ticks"][2] - a["machine_ticks"][2]) / TICK / dt * 100
                    if a.get("disk_written") is not None and b.get("disk_written") is not None:
                        row["disk_write_mb_s"] = (b["disk_written"] - a["disk_written"]) / dt / 1e6
                    pend = [s["ship"]["pending_bytes"] for s in inside]
                    row["pending_max_mb"] = max(pend) / 1e6
            rows.append(row)
    return rows


def cmd_summary(a):
    results, work = a.results, a.work
    meta = read_env(os.path.join(results, "meta.env"))
    tput, tput_runs = tput_rows(results, meta)
    lag = lag_rows(results)
    L = []
    L.append("# tern ship benchmark")
    L.append("")
    L.append(f"- date: {meta.get('date')} · nproc: {meta.get('nproc')} · kernel: {meta.get('kernel')} · "
             f"CPU: {meta.get('cpu')} · RAM: {meta.get('mem')}")
    L.append(f"- tern: {meta.get('tern')} · {meta.get('zstd')} · {meta.get('fio')}")
    L.append(f"- command: `{meta.get('command')}` · load average at start {meta.get('loadavg_start')}, "
             f"at end {meta.get('loadavg_end')} (other work on the machine disturbs every figure)")
    L.append(f"- image size {meta.get('size')} ({meta.get('size_bytes')} bytes); `tern ship --workers "
             f"{meta.get('workers')}`; journal {meta.get('journal_size')}; page cache: data sets and "
             f"disk copies are read from memory (DROP_CACHES={meta.get('drop_caches')}); "
             f"segments written to {meta.get('work')} (fsync per segment); "
             f"{int(meta.get('prefault_bytes', '0') or 0) / 2**30:.1f} GiB of memory touched and freed before "
             "each timed run (PREFAULT: this VM hands free memory back to its host, and re-faulting it "
             "inside a run is an artifact of the VM)")
    L.append("- MB = 10^6 bytes. tern rows: `tern ship --once` right after `tern enable` (the initial "
             "sync: image → resync records in the ring → zstd segments in the cache), wall and CPU of "
             "the whole process; ratio = bytes_in / segment file bytes. zstd rows: `zstd -L -T<n> -c "
             "<image>` on the same file, output counted and discarded.")
    for ds in meta.get("datasets", "").split():
        desc = meta.get(f"desc_{ds}", "")
        if desc:
            L.append(f"- **{ds}**: {desc}")
    if tput:
        L.append("")
        L.append("## Ship throughput, CPU and ratio vs zstd on the same bytes")
        L.append("")
        rounds = int(meta.get("rounds", "1") or 1)
        spread = rounds > 1
        L.append(f"Medians of {rounds} round(s)" + (" (min–max in brackets)" if spread else "")
                 + "; tern and zstd interleaved within each round. tern's peak RSS counts the pages of "
                 "its memory-mapped journal ring it touched.")
        L.append("")
        L.append("| data set | tool | MB/s | CPU s/GB | ratio | ratio vs zstd same level -T1 | wall s | user s | sys s | bytes in | cache on disk / zstd output | peak RSS MiB |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        ds_order = meta.get("datasets", "").split()
        lv_order = [int(x) for x in meta.get("levels", "").split()]
        tput.sort(key=lambda r: (ds_order.index(r["dataset"]) if r["dataset"] in ds_order else 99,
                                 lv_order.index(r["level"]) if r["level"] in lv_order else 99,
                                 r["kind"] != "tern", r["threads"]))

        def rng(r, k, nd):
            v = fnum(r.get(k), nd)
            if spread and r.get(k + "_min") is not None:
                v += f" ({r[k + '_min']:,.{nd}f}–{r[k + '_max']:,.{nd}f})"
            return v

        for r in tput:
            if r["kind"] == "tern":
                tool = f"**tern ship**, level {r['level']}, {r['threads']} workers"
                peer = next((p for p in tput if p["kind"] == "zstd" and p["dataset"] == r["dataset"]
                             and p["level"] == r["level"] and p["threads"] == 1 and p.get("ratio")), None)
                vs = (f"{(r['ratio'] / peer['ratio'] - 1) * 100:+.1f}%"
                      if peer and r.get("ratio") else "–")
            else:
                lv = f"--fast={-r['level']}" if r["level"] < 0 else f"-{r['level']}"
                tool = f"zstd {lv} -T{r['threads']}"
                vs = ""
            if r["status"] != "ok":
                tool += f" **{r['status']}**"
            L.append(f"| {r['dataset']} | {tool} | {rng(r, 'mb_s', 1)} | {rng(r, 'cpu_s_per_gb', 2)} | "
                     f"{fnum(r.get('ratio'), 3)} | {vs} | {fnum(r.get('wall_s'), 2)} | {fnum(r.get('user_s'), 2)} | "
                     f"{fnum(r.get('sys_s'), 2)} | {fnum(r.get('bytes_in'), 0)} | "
                     f"{fnum(r.get('cache_bytes'), 0) if r['kind'] == 'tern' else fnum(r.get('bytes_out'), 0)} | "
                     f"{fnum(r.get('maxrss_mb'), 0)} |")
        classes = []
        for r in tput:
            for c in (r.get("cpu_by_thread") or {}):
                if c not in classes:
                    classes.append(c)
        if classes:
            L.append("")
            L.append("CPU seconds of `tern ship --once` by thread (from /proc every 0.2 s; user+sys; medians), "
                     "and the CPU the rest of the machine used meanwhile:")
            L.append("")
            L.append("| data set | level | " + " | ".join(classes) + " | total | meanwhile outside tern (kernel writeback, other) |")
            L.append("|---|---:|" + "---:|" * (len(classes) + 2))
            for r in tput:
                if r["kind"] == "tern" and r.get("cpu_by_thread"):
                    c = r["cpu_by_thread"]
                    L.append(f"| {r['dataset']} | {r['level']} | "
                             + " | ".join(fnum(c.get(k), 2) for k in classes)
                             + f" | {fnum((r['user_s'] or 0) + (r['sys_s'] or 0), 2)} | {fnum(r.get('machine_other_s'), 2)} |")
        notes = [f"{r['dataset']} L{r['level']}: {r['note']}" for r in tput if r.get("note")]
        if notes:
            L.append("")
            L.append("Notes: " + "; ".join(notes))
    if lag:
        L.append("")
        L.append("## Replication lag under sustained fio writes through `tern serve`")
        L.append("")
        L.append(f"fio: `{meta.get('fio_opts')}` for {meta.get('runtime')} s per rate, on a VM enabled on a "
                 f"copy of the usr image after its initial sync (`tern ship --once`); `tern serve` + "
                 f"`tern ship` (daemon) beside it. fio's `--rate` suffixes are binary (200m = 209.7 MB/s). "
                 "Lag = a segment's oldest record journaled → segment durable in the cache, over all "
                 "segments of the run (incl. the drain after fio stops). CPU: percent of one core over the "
                 f"fio run (the whole machine has {meta.get('nproc')} cores); the rest = the machine's busy time "
                 f"less the three (kernel threads, the sampler, any other process), steal = time the host ran "
                 f"something else on our vCPUs; above {DISTURBED_PCT}% in either the row is marked: something "
                 "else was running. Disk writes: what the block "
                 f"device under the work dir ({meta.get('disk') or 'unknown'}) wrote meanwhile — the "
                 "journal ring's and the image's writeback and the segments.")
        L.append("")
        L.append("| fio --rate | fio wrote MB/s | shipped MB/s (during fio) | ratio | lag p50 ms | lag p99 ms | lag max ms | journal fill max | pending max MB | overflow | drain after fio s | CPU % of one core: serve / ship / fio / the rest | disk writes MB/s | fio p99 write ms |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|")
        for r in lag:
            cpu = r.get("cpu_pct") or {}
            rest = None
            if None not in (cpu.get("serve"), cpu.get("ship"), r.get("fio_cpu_pct"), r.get("machine_busy_pct")):
                rest = r["machine_busy_pct"] - cpu["serve"] - cpu["ship"] - r["fio_cpu_pct"]
                r["rest_cpu_pct"] = rest
            cpu_s = (f"{fnum(cpu.get('serve'), 0)} / {fnum(cpu.get('ship'), 0)} / "
                     f"{fnum(r.get('fio_cpu_pct'), 0)} / {fnum(rest, 0)}")
            if r.get("steal_pct") is not None:
                cpu_s += f" (steal {r['steal_pct']:.0f})"
            if (rest is not None and rest > DISTURBED_PCT) or (r.get("steal_pct") or 0) > DISTURBED_PCT:
                cpu_s += " **disturbed?**"
            ovf = "**yes**" if r["overflow"] else "no"
            drain = fnum(r.get("drain_s"), 1)
            if r.get("drain_s") is not None and not r.get("drained"):
                drain = f">{drain} (not drained)"
            st = "" if r["status"] == "ok" else f" **{r['status']}**"
            L.append(f"| {r['rate']}{st} | {fnum(r.get('fio_mb_s'))} | {fnum(r.get('ship_mb_s_during'))} | "
                     f"{fnum(r.get('ratio'), 2)} | {fnum(r.get('lag_p50_ms'), 0)} | {fnum(r.get('lag_p99_ms'), 0)} | "
                     f"{fnum(r.get('lag_max_ms'), 0)} | {fnum(r.get('fill_max_pct'), 1, '%')} | "
                     f"{fnum(r.get('pending_max_mb'), 0)} | {ovf} | {drain} | {cpu_s} | "
                     f"{fnum(r.get('disk_write_mb_s'), 0)} | "
                     f"{fnum(r.get('fio_clat_p99_ms'), 1)} |")
    # Verdicts against the targets.
    L.append("")
    L.append("## Against the targets")
    L.append("")
    L.append("| target | measured | verdict |")
    L.append("|---|---|---|")
    for r in tput:
        if r["kind"] != "tern" or not r.get("ratio"):
            continue
        peer = next((p for p in tput if p["kind"] == "zstd" and p["dataset"] == r["dataset"]
                     and p["level"] == r["level"] and p["threads"] == 1 and p.get("ratio")), None)
        if not peer:
            continue
        d = (r["ratio"] / peer["ratio"] - 1) * 100
        L.append(f"| ratio within 5% of zstd -{r['level']} ({r['dataset']}) | tern {r['ratio']:.3f} vs zstd "
                 f"{peer['ratio']:.3f} ({d:+.1f}%) | {'met' if d >= -5 else '**not met**'} |")
    for r in lag:
        if r.get("fio_mb_s") is None or r.get("lag_p99_ms") is None:
            continue
        ok = (not r["overflow"]) and r["lag_p99_ms"] < 2000 and r.get("drained", False)
        need = r["fio_mb_s"] >= 200
        what = "keeps up with ≥ 200 MB/s, lag p99 < 2 s" if need else "keeps up, lag p99 < 2 s (below the 200 MB/s target rate)"
        L.append(f"| {what} (fio --rate {r['rate']}) | fio {r['fio_mb_s']:.0f} MB/s, shipped "
                 f"{fnum(r.get('ship_mb_s_during'), 0)} MB/s, p99 {r['lag_p99_ms']:.0f} ms, "
                 f"overflow {'yes' if r['overflow'] else 'no'} | {'met' if ok else '**not met**'} |")
    # Warnings and errors from tern's logs.
    problems = []
    logs = os.path.join(results, "logs")
    if os.path.isdir(logs):
        for name in sorted(os.listdir(logs)):
            if not name.startswith("tern-") and "tern" not in name:
                continue
            with open(os.path.join(logs, name), errors="replace") as f:
                for line in f:
                    if " WARN " in line or " ERROR" in line or "panicked" in line:
                        problems.append(f"{name}: {line.strip()}")
    if problems:
        L.append("")
        L.append(f"## Warnings and errors in tern's logs ({len(problems)} lines, first 20)")
        L.append("")
        L.append("```")
        L.extend(problems[:20])
        L.append("```")
    failed = [r for r in tput + lag if r["status"] != "ok"]
    if failed:
        L.append("")
        L.append("Failed runs: " + ", ".join(f"{r.get('kind', 'lag')} {r.get('dataset', r.get('rate'))} ({r['status']})"
                                          for r in failed))
    md = "\n".join(L) + "\n"
    data = {"meta": meta, "throughput": tput, "throughput_runs": tput_runs, "lag": lag,
            "log_problems": problems}
    write_summary(md, data, (results, work))
    sys.stdout.write(md)
    return 0


def cmd_prefault(a):
    if a.bytes > 0:
        b = bytearray(a.bytes)  # calloc: mapped lazily, nothing touched yet
        b[::4096] = b"\x01" * len(range(0, a.bytes, 4096))
        del b
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--count-stdout", action="store_true")
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    s = sub.add_parser("sample")
    s.add_argument("--out", required=True)
    s.add_argument("--stop", required=True)
    s.add_argument("--ship-json", required=True)
    s.add_argument("--tern", required=True)
    s.add_argument("--state", required=True)
    s.add_argument("--vm", required=True)
    s.add_argument("--pid", action="append", default=[])
    s.add_argument("--interval", type=float, default=1.0)
    s.add_argument("--disk", default="", help="block device of the work dir, as in /proc/diskstats")
    z = sub.add_parser("make-zeroes")
    z.add_argument("--size", type=int, required=True)
    z.add_argument("--random-pct", type=float, required=True)
    z.add_argument("--out", required=True)
    pf = sub.add_parser("prefault")
    pf.add_argument("bytes", type=int)
    m = sub.add_parser("summary")
    m.add_argument("results")
    m.add_argument("work")
    a = ap.parse_args()
    if a.what == "run":
        if a.cmd and a.cmd[0] == "--":
            a.cmd = a.cmd[1:]
        if not a.cmd:
            ap.error("run: no command")
        return cmd_run(a)
    return {"prefault": cmd_prefault, "sample": cmd_sample, "make-zeroes": cmd_make_zeroes, "summary": cmd_summary}[a.what](a)


if __name__ == "__main__":
    sys.exit(main())
