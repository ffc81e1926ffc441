"""Line protocol: our vectorised encoder vs influxdb-client's Point on the same points.

Usage: .venv/bin/python bench/bench_lineprotocol.py [--points N]

Two data sets, both shaped like the ``signal`` measurement (4 tags, a float value,
an int quality and seq, ns timestamps): "sensor" values rounded to 3 decimals (what
registers and most devices give) and "computed" full-precision doubles (KPIs).
The client side builds a Point per row and calls ``to_line_protocol()``, then joins
the lines, which is what its write path does per record. Outputs are compared
byte for byte before any figure is printed.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from influxdb_client import Point

from edge import lineprotocol as lp


def make(n: int, kind: str, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    value = rng.standard_normal(n) * 100
    if kind == "sensor":
        value = np.round(value, 3)
    devices = [
        {"site": "tpo", "area": "hall-1", "device": f"press-{i}", "channel": "temperature"}
        for i in range(50)
    ]
    return {
        "tags": devices,
        "group": rng.integers(0, len(devices), n),
        "ts": 1_764_000_000_000_000_000 + np.arange(n, dtype=np.int64) * 1_000_000,
        "value": value,
        "quality": rng.integers(0, 3, n, dtype=np.int64),
        "seq": np.arange(n, dtype=np.int64),
    }


def ours(d: dict) -> bytes:
    tag_sets = [lp.tag_set(t) for t in d["tags"]]
    return lp.encode(
        "signal",
        tag_sets,
        d["group"],
        d["ts"],
        float_fields={"value": d["value"]},
        int_fields={"quality": d["quality"], "seq": d["seq"]},
    ).data


def client(d: dict) -> bytes:
    tags = d["tags"]
    lines = []
    for g, ts, v, q, s in zip(
        d["group"].tolist(),
        d["ts"].tolist(),
        d["value"].tolist(),
        d["quality"].tolist(),
        d["seq"].tolist(),
        strict=True,
    ):
        p = Point("signal")
        for k, tv in tags[g].items():
            p.tag(k, tv)
        p.field("value", v).field("quality", q).field("seq", s).time(ts)
        lines.append(p.to_line_protocol())
    return ("\n".join(lines) + "\n").encode()


def best_of(fn, d: dict, repeat: int) -> tuple[float, bytes]:
    best, out = float("inf"), b""
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(d)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = args.points
    versions = f"python {platform.python_version()}, numpy {np.__version__}"
    print(f"{versions}, {n} points, ours best of {args.repeat}")
    print(f"{'data':<10}{'ours pts/s':>14}{'client pts/s':>15}{'ratio':>8}  identical")
    for kind in ("sensor", "computed"):
        d = make(n, kind)
        t_ours, a = best_of(ours, d, args.repeat)
        t_client, b = best_of(client, d, 1 if n > 100_000 else args.repeat)
        rates = f"{n / t_ours:>14,.0f}{n / t_client:>15,.0f}"
        print(f"{kind:<10}{rates}{t_client / t_ours:>7.1f}x  {a == b}")
        if a != b:
            raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
