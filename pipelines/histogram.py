# Copyright 2026 tpo-edge contributors
# SPDX-License-Identifier: Apache-2.0
"""Base-2 exponential histogram (OpenTelemetry / Prometheus-native layout) with exact counters.

Layout: for scale ``s`` the base is ``b = 2 ** (2 ** -s)`` and a value ``x > 0`` falls into bucket
``i = ceil(log2(x) * 2**s) - 1``, i.e. ``b**i < x <= b**(i + 1)`` (upper-inclusive). Values
``x <= 0`` go into one zero bucket; NaN and infinities are ignored and counted in ``nan_count``.

Bucket indices are computed exactly, without ``log2``: the float64 bit pattern gives the power of
two, and the mantissa is looked up in a small table of sub-bucket boundaries (each boundary stored
as the largest float64 below the irrational ``2 ** (j / 2**s)``), followed by one comparison.
So ``b**i < x <= b**(i + 1)`` holds for every float, also at exact powers of two.

Alongside the buckets the histogram keeps n, sum, sum of squares, min, max and one counter per
configured deadline (``count(x <= deadline)``), so reliability never carries bucket error.
``n``, min, max and all counts are exact; sum and sum of squares are float64 sums.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache
from typing import Any, Final

import numpy as np
import numpy.typing as npt

MIN_SCALE: Final = -10
"""Coarsest scale: base 2**1024 covers all of float64 in three buckets."""
MAX_SCALE: Final = 10
"""Finest scale supported (relative error 0.034 %); the boundary tables grow as 2**scale."""
DEFAULT_SCALE: Final = 5
"""Default scale: base 2**(1/32), relative error (b-1)/(b+1) = 1.08 %."""
DEFAULT_MAX_SIZE: Final = 512
"""Default cap on dense buckets: 16 octaves at scale 5 (e.g. 0.1 ms to 6.5 s) before downscaling.

OpenTelemetry uses 160; latency spans outliers of several decades, and 512 keeps scale 5 there.
"""

_CHUNK: Final = (
    1 << 13
)  # values per pass: keeps the temporaries of record() in L1/L2 cache (measured)
_MANTISSA_BITS: Final = 52
_MANTISSA_MASK: Final = (1 << _MANTISSA_BITS) - 1
_EXPONENT_BIAS: Final = 1023
_SUBNORMAL_LIFT: Final = 64  # 2**64 lifts every positive subnormal into the normal range

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def relative_error(scale: int) -> float:
    """Return the largest relative error (b-1)/(b+1) of a quantile estimate at ``scale``."""
    base = _base(scale)
    return 1.0 if math.isinf(base) else (base - 1.0) / (base + 1.0)


def _largest_float_below_root(j: int, scale: int) -> float:
    """Return the largest float64 ``f`` with ``f <= 2 ** (j / 2**scale)`` (exact, big integers)."""
    power = 1 << scale

    def at_or_below(f: float) -> bool:
        # f <= 2**(j/power)  <=>  f**power <= 2**j, decided on exact rationals.
        return Fraction(f) ** power <= Fraction(2) ** j

    f = math.pow(2.0, j / power)
    while not at_or_below(f):
        f = math.nextafter(f, 0.0)
    while at_or_below(math.nextafter(f, math.inf)):
        f = math.nextafter(f, math.inf)
    return f


@cache
def _mantissa_tables(scale: int) -> tuple[IntArray, IntArray]:
    """Return (first sub-bucket, upper boundary mantissa) per mantissa cell, for ``scale > 0``.

    The mantissa range [1, 2) is cut into ``2**(scale+1)`` equal cells; each cell is narrower
    than the narrowest sub-bucket (ln 2 / 2**scale), so it meets at most two sub-buckets. For a
    value ``y = 1 + m / 2**52`` in cell ``c`` the sub-bucket is
    ``first[c] + (m > upper[c])``.
    """
    power = 1 << scale
    # Boundary j as a 52-bit mantissa offset: y <= F_j  <=>  m <= bound[j] (y in [1, 2]).
    bound = [
        round((_largest_float_below_root(j, scale) - 1.0) * 2.0**_MANTISSA_BITS)
        for j in range(power + 1)
    ]
    cells = 1 << (scale + 1)
    cell_shift = _MANTISSA_BITS - (scale + 1)
    first = np.empty(cells, dtype=np.int64)
    upper = np.empty(cells, dtype=np.int64)
    j = -1  # sub-bucket of the cell's lowest mantissa: count of boundaries strictly below it, - 1
    for c in range(cells):
        low = c << cell_shift
        while j + 1 <= power and bound[j + 1] < low:
            j += 1
        first[c] = j
        upper[c] = bound[j + 1]
    return first, upper


def bucket_indices(values: FloatArray, scale: int) -> IntArray:
    """Return the exact bucket index of every value (all values must be positive and finite)."""
    x = np.ascontiguousarray(values, dtype=np.float64)
    bits = x.view(np.int64)
    exponent = bits >> _MANTISSA_BITS
    lift = None
    if x.size and not exponent.all():  # subnormals: exponent field 0
        lift = exponent == 0
        x = x.copy()
        x[lift] *= 2.0**_SUBNORMAL_LIFT
        bits = x.view(np.int64)
        exponent = (bits >> _MANTISSA_BITS) - np.where(lift, _SUBNORMAL_LIFT, 0)
    exponent -= _EXPONENT_BIAS  # x = y * 2**exponent with y in [1, 2)
    mantissa = bits & _MANTISSA_MASK
    if scale <= 0:
        # Scale 0: bucket exponent-1 for exact powers of two (upper-inclusive), else exponent.
        index0: IntArray = exponent - (mantissa == 0)
        return index0 >> -scale
    first, upper = _mantissa_tables(scale)
    cell = mantissa >> (_MANTISSA_BITS - (scale + 1))
    index = exponent << scale
    index += first[cell]
    index += mantissa > upper[cell]
    return index


def _base(scale: int) -> float:
    """Return 2**(2**-scale), inf when it exceeds float64 (scales below -9)."""
    try:
        return math.pow(2.0, math.ldexp(1.0, -scale))
    except OverflowError:
        return math.inf


def _json_float(value: float) -> float | str:
    """Return value, or its text ("inf", "-inf", "nan") where JSON has no number for it."""
    return value if math.isfinite(value) else str(value)


def bucket_lower_bound(index: int, scale: int) -> float:
    """Return the (exclusive) lower boundary b**index of bucket ``index``."""
    return float(2.0 ** math.ldexp(index, -scale))


class ExpHistogram:
    """Mergeable latency histogram: exponential buckets plus exact n/sum/min/max/deadline counts."""

    __slots__ = (
        "_counts",
        "_offset",
        "deadline_counts",
        "deadlines",
        "max",
        "max_size",
        "min",
        "n",
        "nan_count",
        "scale",
        "sum",
        "sumsq",
        "zero_count",
    )

    def __init__(
        self,
        scale: int = DEFAULT_SCALE,
        deadlines: tuple[float, ...] = (),
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        """Create an empty histogram at ``scale`` with one exact counter per deadline."""
        if not MIN_SCALE <= scale <= MAX_SCALE:
            raise ValueError(f"scale {scale} outside [{MIN_SCALE}, {MAX_SCALE}]")
        if max_size < 4:
            raise ValueError(f"max_size {max_size} must be at least 4")
        self.scale = scale
        self.max_size = max_size
        self.deadlines = tuple(float(d) for d in deadlines)
        self.deadline_counts = np.zeros(len(self.deadlines), dtype=np.int64)
        self._counts = np.zeros(0, dtype=np.int64)
        self._offset = 0
        self.zero_count = 0
        self.nan_count = 0
        self.n = 0
        self.sum = 0.0
        self.sumsq = 0.0
        self.min = math.inf
        self.max = -math.inf

    # -- inspection ------------------------------------------------------------------------

    @property
    def base(self) -> float:
        """Growth factor between bucket boundaries, 2**(2**-scale)."""
        return _base(self.scale)

    @property
    def offset(self) -> int:
        """Index of the first dense bucket."""
        return self._offset

    @property
    def counts(self) -> IntArray:
        """Dense bucket counts starting at ``offset`` (a read-only view)."""
        view = self._counts.view()
        view.flags.writeable = False
        return view

    def bucket_counts(self) -> dict[int, int]:
        """Return the non-zero buckets as {index: count}."""
        nonzero = np.flatnonzero(self._counts)
        return {int(i) + self._offset: int(self._counts[i]) for i in nonzero}

    def mean(self) -> float:
        """Return the exact-counter mean, NaN when empty."""
        return self.sum / self.n if self.n else math.nan

    def __repr__(self) -> str:
        """Return a short summary."""
        return (
            f"ExpHistogram(scale={self.scale}, n={self.n}, zero={self.zero_count}, "
            f"buckets={len(self._counts)}, min={self.min}, max={self.max})"
        )

    # -- recording -------------------------------------------------------------------------

    def record(self, values: npt.ArrayLike) -> None:
        """Add every value of ``values`` (any shape, converted to float64)."""
        flat = np.asarray(values, dtype=np.float64).ravel()
        # NaN/inf inputs are filtered below, and sums of huge values may overflow: no warnings.
        with np.errstate(over="ignore", invalid="ignore"):
            for start in range(0, flat.size, _CHUNK):
                self._record_chunk(flat[start : start + _CHUNK])

    def _record_chunk(self, x: FloatArray) -> None:
        total = float(x.sum())
        if not math.isfinite(total):  # NaN/inf present (or an overflowing sum: re-check)
            finite = np.isfinite(x)
            self.nan_count += int(x.size - np.count_nonzero(finite))
            x = x[finite]
            total = float(x.sum())
        if x.size == 0:
            return
        low = float(x.min())
        high = float(x.max())
        self.n += int(x.size)
        self.sum += total
        self.sumsq += float(np.dot(x, x))
        self.min = min(self.min, low)
        self.max = max(self.max, high)
        for k, deadline in enumerate(self.deadlines):
            self.deadline_counts[k] += np.count_nonzero(x <= deadline)
        if high <= 0.0:
            self.zero_count += int(x.size)
            return
        positive = x
        if low <= 0.0:
            keep = x > 0.0
            positive = x[keep]
            self.zero_count += int(x.size - positive.size)
            low = float(positive.min())
        # Bucket index is monotone in x, so the batch spans [index(low), index(high)].
        ends = bucket_indices(np.array([low, high]), self.scale)
        by = self._shift_to_fit(int(ends[0]), int(ends[1]))
        self.downscale(by)
        index = bucket_indices(positive, self.scale)
        first = int(ends[0]) >> by
        index -= first
        self._add_dense(first, np.bincount(index, minlength=(int(ends[1]) >> by) - first + 1))

    def _shift_to_fit(self, first: int, last: int) -> int:
        """Return how far to downscale so buckets [first, last] and ours fit in ``max_size``."""
        if self._counts.size:
            first = min(first, self._offset)
            last = max(last, self._offset + self._counts.size - 1)
        by = 0
        while (last >> by) - (first >> by) + 1 > self.max_size:
            by += 1
        return by

    def _add_dense(self, first: int, counts: IntArray) -> None:
        """Add dense ``counts`` starting at bucket ``first``, growing the array as needed."""
        if counts.size == 0:
            return
        if self._counts.size == 0:
            self._counts = counts.astype(np.int64, copy=True)
            self._offset = first
            return
        new_first = min(first, self._offset)
        new_end = max(first + counts.size, self._offset + self._counts.size)
        if new_first != self._offset or new_end != self._offset + self._counts.size:
            grown = np.zeros(new_end - new_first, dtype=np.int64)
            start = self._offset - new_first
            grown[start : start + self._counts.size] = self._counts
            self._counts = grown
            self._offset = new_first
        start = first - self._offset
        self._counts[start : start + counts.size] += counts

    def downscale(self, by: int) -> None:
        """Merge buckets to scale ``scale - by`` (bucket i becomes i >> by); exact."""
        if by < 0:
            raise ValueError(f"downscale by {by} must be >= 0")
        if by == 0:
            return
        if self.scale - by < MIN_SCALE:
            raise ValueError(f"cannot downscale {self.scale} by {by} below {MIN_SCALE}")
        self.scale -= by
        if self._counts.size == 0:
            return
        index = np.arange(self._offset, self._offset + self._counts.size, dtype=np.int64) >> by
        new_offset = int(index[0])
        merged = np.zeros(int(index[-1]) - new_offset + 1, dtype=np.int64)
        np.add.at(merged, index - new_offset, self._counts)
        self._counts = merged
        self._offset = new_offset

    def merge(self, other: ExpHistogram) -> None:
        """Add ``other`` into this histogram exactly (at the coarser of the two scales)."""
        if other.deadlines != self.deadlines:
            raise ValueError(f"deadlines differ: {self.deadlines} vs {other.deadlines}")
        if other.scale < self.scale:
            self.downscale(self.scale - other.scale)
        if other.counts.size:
            theirs = other
            if other.scale > self.scale:
                theirs = other.copy()
                theirs.downscale(other.scale - self.scale)
            by = self._shift_to_fit(theirs.offset, theirs.offset + theirs.counts.size - 1)
            if by:
                self.downscale(by)
                theirs = theirs.copy() if theirs is other else theirs
                theirs.downscale(by)
            self._add_dense(theirs.offset, theirs.counts)
        self.zero_count += other.zero_count
        self.nan_count += other.nan_count
        self.n += other.n
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.deadline_counts += other.deadline_counts

    def copy(self) -> ExpHistogram:
        """Return an independent copy."""
        twin = ExpHistogram(self.scale, self.deadlines, self.max_size)
        twin._counts = self._counts.copy()
        twin._offset = self._offset
        twin.deadline_counts = self.deadline_counts.copy()
        twin.zero_count = self.zero_count
        twin.nan_count = self.nan_count
        twin.n = self.n
        twin.sum = self.sum
        twin.sumsq = self.sumsq
        twin.min = self.min
        twin.max = self.max
        return twin

    # -- quantiles -------------------------------------------------------------------------

    def quantile(self, q: float) -> float:
        """Return the estimated q-quantile (within relative error (b-1)/(b+1)); NaN when empty."""
        return float(self.quantiles(np.array([q], dtype=np.float64))[0])

    def quantiles(self, qs: npt.ArrayLike) -> FloatArray:
        """Return estimates of the q-quantiles ``x_q = inf{x: F(x) >= q}`` for every q in qs.

        The rank is ``max(1, ceil(q * n))``; a positive bucket (L, bL] is estimated as
        ``2bL / (b + 1)`` (largest relative error (b-1)/(b+1) anywhere in the bucket), the zero
        bucket as 0; estimates are clamped to [min, max].
        """
        q = np.asarray(qs, dtype=np.float64)
        if np.any(~((q >= 0.0) & (q <= 1.0))):
            raise ValueError(f"quantiles must lie in [0, 1]: {qs!r}")
        if self.n == 0:
            return np.full(q.shape, math.nan)
        rank = np.maximum(np.ceil(q * self.n), 1.0)
        cumulative = self.zero_count + np.cumsum(self._counts)
        bucket = np.searchsorted(cumulative, rank, side="left")  # first with cum >= rank
        bucket = np.minimum(bucket, max(self._counts.size - 1, 0))
        # 2 b**(i+1) / (b+1) = 2**(i / 2**s + c) with c = 1 - log2(1 + 1/b): finite at every
        # scale, so coarse scales (b up to 2**1024) do not overflow on the way.
        c = 1.0 - math.log2(1.0 + 1.0 / self.base)
        lower_log2 = np.ldexp((bucket + self._offset).astype(np.float64), -self.scale)
        with np.errstate(over="ignore"):
            estimate = np.exp2(lower_log2 + c)
        estimate = np.where(rank <= self.zero_count, 0.0, estimate)
        return np.asarray(np.clip(estimate, self.min, self.max), dtype=np.float64)

    # -- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return a compact JSON-ready form: only non-zero buckets, as index and count lists."""
        nonzero = np.flatnonzero(self._counts)
        first = int(nonzero[0]) if nonzero.size else 0
        empty = self.n == 0
        return {
            "scale": self.scale,
            "max_size": self.max_size,
            "n": self.n,
            "sum": _json_float(self.sum),
            "sumsq": _json_float(self.sumsq),
            "min": None if empty else self.min,
            "max": None if empty else self.max,
            "zero_count": self.zero_count,
            "nan_count": self.nan_count,
            "offset": first + self._offset,
            "index": (nonzero - first).tolist(),
            "count": self._counts[nonzero].tolist(),
            "deadlines": list(self.deadlines),
            "deadline_counts": self.deadline_counts.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpHistogram:
        """Rebuild a histogram written by ``to_dict``."""
        hist = cls(int(data["scale"]), tuple(data["deadlines"]), int(data["max_size"]))
        index = np.asarray(data["index"], dtype=np.int64)
        count = np.asarray(data["count"], dtype=np.int64)
        if index.shape != count.shape or np.any(count < 0) or np.any(np.diff(index) <= 0):
            raise ValueError("histogram buckets: index/count lists malformed")
        if index.size:
            if index[0] < 0:
                raise ValueError("histogram buckets: negative relative index")
            dense = np.zeros(int(index[-1]) + 1, dtype=np.int64)
            dense[index] = count
            hist._add_dense(int(data["offset"]), dense)
        hist.deadline_counts = np.asarray(data["deadline_counts"], dtype=np.int64).copy()
        if hist.deadline_counts.shape != (len(hist.deadlines),):
            raise ValueError("histogram deadlines and deadline_counts differ in length")
        hist.n = int(data["n"])
        hist.sum = float(data["sum"])
        hist.sumsq = float(data["sumsq"])
        hist.min = math.inf if data["min"] is None else float(data["min"])
        hist.max = -math.inf if data["max"] is None else float(data["max"])
        hist.zero_count = int(data["zero_count"])
        hist.nan_count = int(data["nan_count"])
        return hist

    def __eq__(self, other: object) -> bool:
        """Return True when both hold the same buckets and counters (sums compared exactly)."""
        if not isinstance(other, ExpHistogram):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable
