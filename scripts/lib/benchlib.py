#!/usr/bin/env python3
"""benchlib -- what the bench scripts' Python shares (issue 19). Stdlib only.

Imported by scripts/bench-ship.py and scripts/bench-lifecycle.py, and by
the inline blocks of the bench scripts, which run through bench_py
(scripts/lib/bench.sh: python3 with this directory on its path).

  parse_size(s)             "2g", "64m", "256MiB", "4096" -> bytes (binary)
  median(xs)                median of the values that are not None; None if none
  spread(xs, f, sep)        "min–max", each formatted by f; "–" if empty
  median_spread(xs, f, unit)  "median (min–max)", or the one value alone
  fnum(v, nd, unit)         v with thousands separators and nd decimals; "–" for None
  unique(xs)                xs without repeats, in order of first appearance
  read_tsv(path)            a TSV's rows as dicts by its header ([] if missing)
  read_env(path)            KEY=VALUE lines as a dict (meta.env)
  load_json(path)           a JSON file, notes before the object skipped (fio
                            prints some); raises if there is none
  maybe_json(path)          load_json, or None
  fio_job(path)             the first job of fio --output-format=json
  seconds(value, unit)      a duration ("13.2", "ms") in seconds
  applied_points(text)      the points a `tern apply` log says it took
  write_summary(md, data, dirs)  summary.md (and summary.json) in each dir

As a command (for the shell's bytes and json_get):
  benchlib.py size S        S in bytes
  benchlib.py get FILE KEY  one top-level value of a JSON file (status 1 if none)
"""
import csv
import json
import os
import re
import statistics
import sys


def parse_size(s):
    """A size in bytes: N, or N with k/m/g/t (binary: 1g = 2^30), also as
    KiB/MiB/GiB/TiB or kb/mb/gb/tb."""
    s = str(s).strip().lower().removesuffix("ib").removesuffix("b")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs, f=lambda v: f"{v:.0f}", sep="–"):
    """"min–max" of xs, each formatted by f; "–" if xs is empty."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{f(min(xs))}{sep}{f(max(xs))}"


def median_spread(xs, f=lambda v: f"{v:.0f}", unit=""):
    """"median{unit} (min–max)" of interleaved rounds; the value alone if
    there is one."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{f(xs[0])}{unit}"
    return f"{f(statistics.median(xs))}{unit} ({spread(xs, f)})"


def fnum(v, nd=1, unit=""):
    if v is None:
        return "–"
    return f"{v:,.{nd}f}{unit}"


def unique(xs):
    return list(dict.fromkeys(xs))


def read_tsv(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def read_env(path):
    env = {}
    with open(path) as f:
        for line in f:
            k, _, v = line.rstrip("\n").partition("=")
            env[k] = v
    return env


def load_json(path):
    with open(path) as f:
        text = f.read()
    start = text.find("{")  # fio may print notes before its JSON
    if start < 0:
        raise ValueError(f"no JSON object in {path}")
    return json.loads(text[start:])


def maybe_json(path):
    try:
        return load_json(path)
    except (OSError, ValueError):
        return None


def fio_job(path):
    """The first job of fio's JSON output (with --group_reporting, all of them)."""
    jobs = load_json(path).get("jobs") or []
    if not jobs:
        raise ValueError("no jobs in fio output")
    return jobs[0]


UNITS = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}


def seconds(value, unit):
    return float(value) * UNITS[unit]


# `tern apply`'s line for a point it took: "VM 'vm': crash-consistent point
# <id> at seq <n> (source time <t>), <clone method> in <duration>".
POINT_RE = re.compile(r"point \S+ at seq \d+ \(source time [^)]*\), (\S+) in ([0-9.]+)(ns|µs|us|ms|s)\b")


def applied_points(text):
    """[(clone method, seconds, the duration as logged)] of the points a
    `tern apply` log says it took, in order."""
    return [(clone, seconds(v, u), f"{v}{u}") for clone, v, u in POINT_RE.findall(text)]


def write_summary(md, data, dirs):
    """summary.md, and summary.json (data) unless data is None, in each of dirs."""
    for d in dirs:
        with open(os.path.join(d, "summary.md"), "w") as f:
            f.write(md)
        if data is not None:
            with open(os.path.join(d, "summary.json"), "w") as f:
                json.dump(data, f, indent=2)


def main(argv):
    if len(argv) == 2 and argv[0] == "size":
        try:
            print(parse_size(argv[1]))
        except ValueError:
            sys.exit(f"benchlib.py size: not a size: {argv[1]!r}")
        return 0
    if len(argv) == 3 and argv[0] == "get":
        v = maybe_json(argv[1])
        if not isinstance(v, dict) or v.get(argv[2]) is None:
            return 1
        print(v[argv[2]])
        return 0
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
