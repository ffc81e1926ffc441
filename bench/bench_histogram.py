"""Latency samples per second into ExpHistogram, beside HdrHistogram, DDSketch and np.percentile.

Run: .venv/bin/python bench/bench_histogram.py [--n 5000000] [--slice 200000]

ExpHistogram.record() is timed with all its exact counters (n, sum, sum of squares, min, max, two
deadline counters). The per-value libraries get a slice of the same data (they take one value
per Python call); every rate is scaled to samples/s on one core. Relative errors are against
the exact q-quantile sorted[ceil(q n) - 1] of the data each method saw.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from typing import TYPE_CHECKING

import numpy as np
from ddsketch import DDSketch
from hdrh.histogram import HdrHistogram

from pipelines.histogram import ExpHistogram, relative_error

if TYPE_CHECKING:
    from collections.abc import Callable

QS = (0.5, 0.99, 0.999)


def exact(values: np.ndarray, q: float) -> float:
    ordered = np.sort(values)
    return float(ordered[max(math.ceil(q * values.size), 1) - 1])


def best_of(repeats: int, run: Callable[[], object]) -> tuple[float, object]:
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5_000_000)
    parser.add_argument("--slice", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(42)
    latencies = rng.lognormal(mean=np.log(5.0), sigma=0.5, size=args.n)  # ms, median 5 ms
    part = latencies[: args.slice]
    rows: list[tuple[str, int, float, list[float]]] = []

    def ours() -> ExpHistogram:
        hist = ExpHistogram(scale=5, deadlines=(10.0, 20.0))
        hist.record(latencies)
        return hist

    seconds, hist = best_of(args.repeats, ours)
    assert isinstance(hist, ExpHistogram)
    rows.append(("ExpHistogram.record (ours)", args.n, seconds, [hist.quantile(q) for q in QS]))
    scale = hist.scale

    seconds, percentiles = best_of(args.repeats, lambda: np.percentile(latencies, [50, 99, 99.9]))
    rows.append(("np.percentile (sorts; not mergeable)", args.n, seconds, list(percentiles)))  # type: ignore[arg-type]

    def hdr() -> HdrHistogram:
        h = HdrHistogram(1, 60_000_000, 2)  # microseconds, 2 significant digits
        for value in part.tolist():
            h.record_value(round(value * 1000.0))
        return h

    seconds, h = best_of(1, hdr)
    assert isinstance(h, HdrHistogram)
    rows.append(
        (
            "HdrHistogram.record_value",
            args.slice,
            seconds,
            [h.get_value_at_percentile(q * 100) / 1000.0 for q in QS],
        )
    )

    def dd() -> DDSketch:
        sketch = DDSketch(relative_accuracy=0.01)
        for value in part.tolist():
            sketch.add(value)
        return sketch

    seconds, sketch = best_of(1, dd)
    assert isinstance(sketch, DDSketch)
    rows.append(
        ("DDSketch.add", args.slice, seconds, [float(sketch.get_quantile_value(q)) for q in QS])
    )

    truth_full = [exact(latencies, q) for q in QS]
    truth_part = [exact(part, q) for q in QS]
    ours_rate = args.n / rows[0][2]
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    print(f"{args.n:,} lognormal latencies (ms); per-value libraries on the first {args.slice:,}")
    print(f"ExpHistogram ended at scale {scale}: max relative error {relative_error(scale):.2%}")
    header = (
        f"| {'method':38} | {'samples/s':>14} | {'ours/it':>8} | "
        + " | ".join(f"{'err p' + format(q * 100, 'g'):>9}" for q in QS)
        + " |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, count, secs, estimates in rows:
        truth = truth_part if count == args.slice else truth_full
        rate = count / secs
        errors = " | ".join(f"{abs(e - t) / t:9.3%}" for e, t in zip(estimates, truth, strict=True))
        print(f"| {name:38} | {rate:14,.0f} | {ours_rate / rate:7.1f}x | {errors} |")


if __name__ == "__main__":
    main()
