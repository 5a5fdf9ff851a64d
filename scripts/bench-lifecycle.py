#!/usr/bin/env python3
"""Helpers of scripts/bench-lifecycle.sh (issue 5).

  fill IMAGE --size S --data D [--chunk C]
      Make IMAGE a sparse file of S bytes holding D bytes of random
      (incompressible, never-zero-block) data: D/C chunks of C bytes spread
      evenly over the image (chunk i at i * floor(S/C / (D/C)) * C). With
      D == S the image is fully dense. fsynced at the end.
  failover-json FILE
      "READY_SECONDS POINT CLONE" from `tern failover --json` output.
  summary RESULTS_DIR
      Markdown tables from RESULTS_DIR/rto.tsv and initial-sync.tsv (medians
      with min-max over runs), on stdout.

Sizes take k/m/g/t suffixes (binary: 1g = 2^30). What the bench scripts
share (sizes, medians, TSV and JSON reading) is in lib/benchlib.py.
"""
import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from benchlib import applied_points, load_json, median as med, parse_size, read_tsv, spread  # noqa: E402


def fill(argv):
    import argparse

    p = argparse.ArgumentParser(prog="bench-lifecycle.py fill")
    p.add_argument("image")
    p.add_argument("--size", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--chunk", default="1m")
    a = p.parse_args(argv)
    size, data, chunk = parse_size(a.size), parse_size(a.data), parse_size(a.chunk)
    if size % chunk or data % chunk or data > size:
        sys.exit(f"fill: size {size} and data {data} must be multiples of the chunk {chunk}, data <= size")
    chunks, slots = data // chunk, size // chunk
    stride = slots // chunks
    fd = os.open(a.image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        # Write contiguous runs of chunks in one call where the layout is dense.
        run = 64 if stride == 1 else 1
        i = 0
        while i < chunks:
            n = min(run, chunks - i)
            os.pwrite(fd, os.urandom(n * chunk), i * stride * chunk)
            i += n
        os.fsync(fd)
    finally:
        os.close(fd)


def failover_json(argv):
    j = load_json(argv[0])
    ready = f"{j['ready_seconds']:.4f}" if "ready_seconds" in j else "-"
    print(ready, j["point"], j.get("clone", "-"))


def fmt_s(x):
    if x is None:
        return "–"
    if 0 < x < 0.01:
        return f"{x:.3f}"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def rng(xs):
    return spread(xs, fmt_s)


def human_bytes(n):
    n = float(n)
    for unit, m in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m:
            return f"{n / m:,.2f} {unit}"
    return f"{n:,.0f} B"


def logged_point_s(path):
    """Seconds `tern apply` logged for the point a --latest failover took
    ("… point … reflink in 13ms"), or None."""
    try:
        text = open(path).read()
    except OSError:
        return None
    points = applied_points(text)
    return points[-1][1] if points else None


def summary(argv):
    d = argv[0]
    rto = read_tsv(f"{d}/rto.tsv")
    if rto:
        # Group by (fs, image, kind); keep the order of first appearance.
        groups = {}
        for r in rto:
            groups.setdefault((r["fs"], r["image"], r["kind"]), []).append(r)
        print("### RTO: `tern failover` to a disk ready to boot\n")
        print("Wall time of the whole command (process start to exit, page cache dropped before each run), "
              "median of the runs with min–max; `ready in` is the command's own figure (after argument parsing "
              "and loading the VM). Extents: extent records (`filefrag -v`) of the point's disk that was cloned, and of the failover's disk.\n")
        print("| fs | image | failover | runs | wall s (median) | min–max | `ready in` s (median) | of which the new point (--latest) | clone | point disk extents | failover disk extents | applied first (--latest) |")
        print("|---|---|---|---:|---:|---|---:|---:|---|---:|---:|---|")
        for (fs, image, kind), rs in groups.items():
            ok = [r for r in rs if r["status"] == "ok"]
            wall = [float(r["wall_s"]) for r in ok]
            ready = [float(r["ready_s"]) for r in ok if r["ready_s"] not in ("", "-")]
            methods = sorted({r["method"] for r in ok})
            pext = sorted({int(r["point_extents"]) for r in ok if r["point_extents"].isdigit()})
            fext = sorted({int(r["failover_extents"]) for r in ok if r["failover_extents"].isdigit()})
            span = lambda v: "–" if not v else (f"{v[0]:,}" if v[0] == v[-1] else f"{v[0]:,}–{v[-1]:,}")
            pending = sorted({r["pending"] for r in ok})
            pts = [logged_point_s(f"{d}/rto-{fs}-{image}/{kind}-{r['run']}.err") for r in ok]
            pts = [p for p in pts if p is not None]
            pt = fmt_s(med(pts)) if pts else "–"
            failed = len(rs) - len(ok)
            print(f"| {fs} | {image} | {kind} | {len(ok)}{f' ({failed} failed)' if failed else ''} | "
                  f"**{fmt_s(med(wall))}** | {rng(wall)} | {fmt_s(med(ready))} | {pt} | {'/'.join(methods) or '–'} | "
                  f"{span(pext)} | {span(fext)} | {', '.join(pending)} |")
        print()
    setup = read_tsv(f"{d}/rto-setup.tsv")
    if setup:
        print("### RTO set-up (initial sync of each image, once per filesystem)\n")
        print("| fs | image | data | enable s | ship --once s | apply --once s | replica extents |")
        print("|---|---|---|---:|---:|---:|---:|")
        for r in setup:
            print(f"| {r['fs']} | {r['image']} | {human_bytes(r['data_bytes'])} of {human_bytes(r['disk_bytes'])} | "
                  f"{fmt_s(float(r['enable_s']))} | {fmt_s(float(r['ship_s']))} | "
                  f"{fmt_s(float(r['apply_s']))} | {int(r['replica_extents']):,} |")
        print()
    isync = read_tsv(f"{d}/initial-sync.tsv")
    if isync:
        print("### Initial sync: a sparse image holding scattered data\n")
        print("Medians over the rounds, min–max in brackets. `bytes moved` for tern is what the cache received "
              "(segments, apparent size); for the copies, what they wrote.\n")
        print("| what | rounds | wall s | bytes read (ship.json bytes_in) | bytes moved | vs data held |")
        print("|---|---:|---:|---:|---:|---:|")
        groups = {}
        for r in isync:
            groups.setdefault(r["what"], []).append(r)
        for what, rs in groups.items():
            wall = [float(r["wall_s"]) for r in rs]
            moved = [int(r["bytes_moved"]) for r in rs]
            data = int(rs[0]["data_bytes"])
            bin_ = [int(r["bytes_in"]) for r in rs if r["bytes_in"].isdigit()]
            print(f"| {what} | {len(rs)} | **{fmt_s(med(wall))}** ({rng(wall)}) | "
                  f"{f'{int(med(bin_)):,}' if bin_ else '–'} | {int(med(moved)):,} ({human_bytes(med(moved))}) | "
                  f"{med(moved) / data:.3f}× |")
        extra = [r for r in isync if r.get("note")]
        for r in extra:
            if r["note"]:
                print(f"\n- {r['what']}, round {r['round']}: {r['note']}")
        print()


def main():
    cmds = {"fill": fill, "summary": summary, "failover-json": failover_json}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        sys.exit(__doc__)
    cmds[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
