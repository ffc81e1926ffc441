# Copyright 2026 tpo-edge contributors
# SPDX-License-Identifier: Apache-2.0
"""Slow, obviously correct twins of the vectorised KPI functions (for the property tests).

Plain loops over Python numbers, exact rationals for bucket boundaries, sorting for quantiles.
Nothing here is fast and nothing in production imports it.
"""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import pairwise
from typing import TYPE_CHECKING

from pipelines.link import (
    AUTO_TI_BURST_DIVISOR,
    AUTO_TI_HISTORY_WINDOWS,
    AUTO_TI_MAX_RECEPTIONS,
    AUTO_TI_MIN_CYCLES,
    NO_TIME,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

# -- histogram -----------------------------------------------------------------------------


def _ceil_log2(x: Fraction) -> int:
    """Return the smallest integer e with x <= 2**e (x > 0), exactly."""
    e = x.numerator.bit_length() - x.denominator.bit_length()
    while x > Fraction(2) ** e:
        e += 1
    while x <= Fraction(2) ** (e - 1):
        e -= 1
    return e


def bucket_index(x: float, scale: int) -> int:
    """Return i with b**i < x <= b**(i+1), b = 2**(2**-scale), decided on exact rationals."""
    if scale > 0:
        # b**i < x <= b**(i+1)  <=>  2**i < x**(2**scale) <= 2**(i+1)
        return _ceil_log2(Fraction(x) ** (1 << scale)) - 1
    return (_ceil_log2(Fraction(x)) - 1) >> -scale


class RefHistogram:
    """Dictionary-of-buckets histogram with the same layout, counters and size cap."""

    def __init__(self, scale: int, deadlines: Sequence[float] = (), max_size: int = 512) -> None:
        """Create an empty histogram."""
        self.scale = scale
        self.max_size = max_size
        self.deadlines = tuple(deadlines)
        self.deadline_counts = [0] * len(self.deadlines)
        self.buckets: dict[int, int] = {}
        self.zero_count = 0
        self.nan_count = 0
        self.values: list[float] = []

    def record(self, values: Iterable[float]) -> None:
        """Add values one at a time."""
        for raw in values:
            x = float(raw)
            if not math.isfinite(x):
                self.nan_count += 1
                continue
            self.values.append(x)
            for k, deadline in enumerate(self.deadlines):
                if x <= deadline:
                    self.deadline_counts[k] += 1
            if x <= 0:
                self.zero_count += 1
            else:
                i = bucket_index(x, self.scale)
                self.buckets[i] = self.buckets.get(i, 0) + 1
        self._fit()

    def _fit(self) -> None:
        if not self.buckets:
            return
        low, high = min(self.buckets), max(self.buckets)
        by = 0
        while (high >> by) - (low >> by) + 1 > self.max_size:
            by += 1
        self.downscale(by)

    def downscale(self, by: int) -> None:
        """Re-key every bucket i to i >> by."""
        merged: dict[int, int] = {}
        for i, c in self.buckets.items():
            merged[i >> by] = merged.get(i >> by, 0) + c
        self.buckets = merged
        self.scale -= by

    @property
    def n(self) -> int:
        """Finite values recorded."""
        return len(self.values)

    def quantile(self, q: float) -> float:
        """Walk the sorted buckets to rank max(1, ceil(q n)); same estimator as ExpHistogram."""
        if not self.values:
            return math.nan
        rank = max(1, math.ceil(q * self.n))
        low, high = min(self.values), max(self.values)
        base = 2.0 ** (2.0**-self.scale) if self.scale > -10 else math.inf
        seen = self.zero_count
        estimate = 0.0
        if rank > seen:
            for i in sorted(self.buckets):
                seen += self.buckets[i]
                if seen >= rank:
                    # 2 b**(i+1) / (b+1), written as 2**(i/2**s + 1 - log2(1 + 1/b)) so that
                    # neither b**(i+1) nor b overflows at coarse scales.
                    power = i * 2.0**-self.scale + 1.0 - math.log2(1.0 + 1.0 / base)
                    estimate = 2.0**power if power < 1024 else math.inf
                    break
        return min(max(estimate, low), high)


def exact_quantile(values: Sequence[float], q: float) -> float:
    """Return inf{x: F(x) >= q} = sorted[ceil(q n) - 1] (rank at least 1)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


# -- link ----------------------------------------------------------------------------------


def unwrap_seq(seq: Sequence[int], modulus: int, previous: int | None = None) -> list[int]:
    """Unwrap one number at a time: step to the nearest representative of the residue."""
    out: list[int] = []
    last = previous
    for s in seq:
        if last is None:
            value = s
        else:
            step = (s - last) % modulus
            if step >= modulus - modulus // 2:  # upper half: a step backwards
                step -= modulus
            value = last + step
        out.append(value)
        last = value
    return out


def loss_duplicates_reordering(
    seq: Sequence[int], highest_before: int | None = None
) -> tuple[int, int, int, int, int, int, int | None]:
    """Return (expected, received, lost, duplicates, reordered, distinct, highest) by looping."""
    seen: set[int] = set()
    duplicates = reordered = 0
    highest = highest_before
    for q in seq:
        if q in seen:
            duplicates += 1
            continue
        seen.add(q)
        if highest is not None and q < highest + 1:  # RFC 4737: q < NextExp
            reordered += 1
        highest = q if highest is None else max(highest, q)
    if not seq:
        return 0, 0, 0, 0, 0, 0, highest_before
    assert highest is not None
    if highest_before is None:
        expected = highest - min(seq) + 1
        received = len(seen)
    else:
        expected = highest - highest_before
        received = sum(1 for q in seen if q > highest_before)
    return expected, received, expected - received, duplicates, reordered, len(seen), highest


def rfc3550_jitter(
    t_send: Sequence[int],
    t_recv: Sequence[int],
    jitter_before: float = 0.0,
    transit_before: int | None = None,
) -> list[float]:
    """Apply J += (|D| - J) / 16 arrival by arrival (RFC 3550 A.8)."""
    out: list[float] = []
    jitter = jitter_before
    last = transit_before
    for s, r in zip(t_send, t_recv, strict=True):
        transit = r - s
        if last is not None:
            jitter += (abs(transit - last) - jitter) / 16.0
        out.append(jitter)
        last = transit
    return out


def availability_in_window(
    good_recv: Sequence[int],
    expire_at: Sequence[int],
    window: tuple[int, int],
    expire_before: int,
    observed_from: int,
) -> tuple[int, int, int, int]:
    """Return (up, down, failures, expire_after) by walking from one good arrival to the next."""
    start = max(window[0], observed_from)
    expire = expire_before
    up = down = failures = 0
    now = start
    events = [*zip(good_recv, expire_at, strict=True), (window[1], None)]
    for arrival, arrival_expire in events if start < window[1] else []:
        # Segment [now, arrival): UP until `expire`, DOWN after it.
        if expire >= arrival:
            up += arrival - now
        elif expire >= now:
            up += expire - now
            down += arrival - expire
            failures += 1
        else:
            down += arrival - now
        now = arrival
        if arrival_expire is not None:
            expire = max(expire, arrival_expire)
    if start >= window[1]:
        for e in expire_at:
            expire = max(expire, e)
    return up, down, failures, expire


def estimate_transfer_interval(receptions: Iterable[int]) -> int | None:
    """Walk the distinct receive times: time-weighted quartile, cycle starts, lower median."""
    received = sorted(set(receptions))
    updates = [later - earlier for earlier, later in pairwise(received)]
    if len(updates) < AUTO_TI_MIN_CYCLES:
        return None
    total = sum(updates)
    covered = 0
    typical = 0
    for update in sorted(updates):
        covered += update
        if covered * 4 >= total:  # a quarter of the time lies in intervals up to this one
            typical = update
            break
    starts = [received[0]]
    for earlier, later in pairwise(received):
        if later - earlier > typical // AUTO_TI_BURST_DIVISOR:
            starts.append(later)
    cycles = [later - earlier for earlier, later in pairwise(starts)]
    if len(cycles) < AUTO_TI_MIN_CYCLES:
        return None
    return sorted(cycles)[math.ceil(len(cycles) / 2) - 1]  # lower median


def series_availability(
    arrivals: Sequence[tuple[int, int]],
    windows: Sequence[tuple[int, int]],
    deadline: int,
    transfer_interval: int | None,
    survival: int | None,
) -> list[tuple[int | None, tuple[int, int, int] | None]]:
    """Return (TI, (up, down, failures) or None) per window of one series, message by message.

    ``arrivals`` are (send time or NO_TIME, receive time) in receive order; ``windows`` follow
    each other. ``transfer_interval`` None: estimated (auto); ``survival`` None: one TI.
    """
    out: list[tuple[int | None, tuple[int, int, int] | None]] = []
    history: list[int] = []
    estimate: int | None = None
    expire: int | None = None
    observed = 0
    for start, end in windows:
        inside = [(s, r) for s, r in arrivals if start <= r < end]
        interval = transfer_interval
        if interval is None:
            horizon = start - (AUTO_TI_HISTORY_WINDOWS - 1) * (end - start)
            kept = {r for r in history if r >= horizon} | {r for _, r in inside}
            history = sorted(kept)[-AUTO_TI_MAX_RECEPTIONS:]
            fresh = estimate_transfer_interval(history) if inside else None
            if fresh is not None:  # otherwise the last estimate holds
                estimate = fresh
            interval = estimate
        tolerated = interval if survival is None else survival
        if interval is None or tolerated is None:
            out.append((interval, None))
            continue
        good_recv: list[int] = []
        good_expire: list[int] = []
        for send, recv in inside:
            reference = recv if send == NO_TIME else send
            if expire is None:
                expire, observed = reference + deadline + tolerated, reference
            if send == NO_TIME or recv - send <= deadline:
                good_recv.append(recv)
                good_expire.append(reference + interval + deadline + tolerated)
        if expire is None:
            out.append((interval, None))
            continue
        up, down, failures, expire = availability_in_window(
            good_recv, good_expire, (start, end), expire, observed
        )
        out.append((interval, (up, down, failures)))
    return out


def group_windows(
    series: Sequence[object], t_recv: Sequence[int], window_ns: int
) -> dict[tuple[object, int], list[int]]:
    """Return row indices per (series, window index), each list in receive-time order."""
    groups: dict[tuple[object, int], list[int]] = {}
    for row, (key, t) in enumerate(zip(series, t_recv, strict=True)):
        groups.setdefault((key, t // window_ns), []).append(row)
    for rows in groups.values():
        rows.sort(key=lambda r: t_recv[r])  # sort is stable: ties keep input order
    return groups


# -- process -------------------------------------------------------------------------------


def time_in_states(
    t: Sequence[int],
    codes: Sequence[int],
    states: Sequence[int],
    window: tuple[int, int],
    before: int | None = None,
) -> int:
    """Step through every ns boundary: the state holds from one sample to the next."""
    samples = sorted(zip(t, codes, strict=True), key=lambda s: s[0])
    current = before
    for time, code in samples:
        if time <= window[0]:
            current = code
    total = 0
    now = window[0]
    for time, code in samples:
        if window[0] < time < window[1]:
            if current in states:
                total += time - now
            now, current = time, code
    if current in states:
        total += window[1] - now
    return total


def counter_increase(values: Sequence[float], before: float | None = None) -> float:
    """Add up the rises; after a drop (reset) the new reading is the rise."""
    readings = [v for v in values if not math.isnan(v)]
    last = before
    total = 0.0
    for v in readings:
        if last is not None:
            total += v - last if v >= last else v
        last = v
    return total
