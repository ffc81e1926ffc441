# Copyright 2026 tpo-edge contributors
# SPDX-License-Identifier: Apache-2.0
"""Link KPIs per series and tumbling window (definitions: shared/domain/KPIS.md, link table).

Inputs are columnar int64 arrays, one row per received message, in any order:

- ``seq``: sequence number, ``-1`` when the protocol carries none;
- ``t_send_ns``: source timestamp, ``NO_TIME`` (INT64_MIN) when unknown or clocks are not synced;
- ``t_recv_ns``: edge receive timestamp (``NO_TIME``: never received, only in traces);
- ``size``: user payload bytes.

Arrival order is receive time (ties keep input order). Times are integer nanoseconds until a KPI
is reported, so differences are exact; KPIs are reported in ms, s, bit/s and ratios.

Availability needs each series' transfer interval TI: fixed in :class:`LinkConfig` (or per series
in :class:`LinkWindower`), or ``"auto"``: estimated from the traffic itself by
:func:`estimate_transfer_interval` over a sliding history carried in :class:`SeriesState`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Final, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from pipelines.histogram import ExpHistogram

if TYPE_CHECKING:
    from collections.abc import Mapping

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

NO_TIME: Final = int(np.iinfo(np.int64).min)
"""Timestamp sentinel: not known (send) or never received (receive)."""
NO_SEQ: Final = -1
"""Sequence number sentinel: the message carries none."""
NS_PER_MS: Final = 1_000_000
NS_PER_S: Final = 1_000_000_000

AUTO: Final = "auto"
"""Transfer interval estimated from the traffic; as survival time: one transfer interval."""
Auto = Literal["auto"]
AUTO_TI_MIN_CYCLES: Final = 5
"""Cycles an estimate needs: the median of 5 still ignores 2 gaps among them."""
AUTO_TI_HISTORY_WINDOWS: Final = 3
"""The estimate looks at the receptions of the current window and the two before it..."""
AUTO_TI_MAX_RECEPTIONS: Final = 4096
"""...at most this many (the newest), so that a fast series carries a bounded history."""
AUTO_TI_BURST_DIVISOR: Final = 8
"""Receptions closer than 1/8 of the typical interval belong to one burst (one cycle)."""

JITTER_GAIN: Final = 1.0 / 16.0
"""RFC 3550 section 6.4.1: J <- J + (|D| - J) / 16."""
_JITTER_BLOCK: Final = 512  # (16/15)**512 ~ 2e14: scaled partial sums stay well inside float64


@dataclass(frozen=True, slots=True)
class Percentile:
    """A reported latency percentile: quantile, field suffix, and the samples it needs."""

    q: float
    label: str

    @property
    def min_samples(self) -> int:
        """Smallest window size for which the percentile is reported: n >= 10 / (1 - q)."""
        return math.ceil(10.0 / (1.0 - self.q) - 1e-6)


PERCENTILES: Final = (
    Percentile(0.5, "p50"),
    Percentile(0.9, "p90"),
    Percentile(0.99, "p99"),
    Percentile(0.999, "p99_9"),
    Percentile(0.9999, "p99_99"),
)
"""Latency percentiles of a window, each absent when the window has too few samples."""
P99: Final = PERCENTILES[2]


# -- vectorised building blocks ------------------------------------------------------------


def unwrap_seq(seq: npt.ArrayLike, modulus: int, previous: int | None = None) -> IntArray:
    """Unwrap sequence numbers in [0, modulus) to an unbounded line, in arrival order.

    Each step is taken as the signed difference closest to zero, in [-modulus/2, modulus/2),
    so packets slightly out of order across the wrap land just below their neighbours.
    ``previous`` is the last unwrapped number of the series (carried from an earlier batch).
    """
    q = np.asarray(seq, dtype=np.int64)
    if modulus < 2:
        raise ValueError(f"sequence modulus {modulus} must be >= 2")
    if q.size == 0:
        return np.zeros(0, dtype=np.int64)
    if q.min() < 0 or q.max() >= modulus:
        raise ValueError(f"sequence numbers outside [0, {modulus})")
    half = modulus // 2
    anchor = q[0] if previous is None else previous % modulus
    steps = np.diff(q, prepend=anchor)
    steps = (steps + half) % modulus - half
    start = int(q[0]) - int(steps[0]) if previous is None else previous
    return start + np.cumsum(steps)


class SeqStats(NamedTuple):
    """Sequence-number KPIs of one batch of arrivals (RFC 7680 loss, RFC 4737 reordering)."""

    expected: int
    """Sequence numbers newly covered: highest after minus highest before (or the span)."""
    received: int
    """Distinct sequence numbers received among the expected ones."""
    lost: int
    """expected - received."""
    duplicates: int
    """Arrivals repeating a sequence number seen earlier in the batch."""
    reordered: int
    """Distinct arrivals with q < NextExp (highest seen so far + 1)."""
    distinct: int
    """Distinct sequence numbers in the batch (the basis of the reordering ratio)."""
    highest: int | None
    """Highest sequence number seen, including the batch (carry into the next batch)."""


def first_occurrence(q: IntArray) -> BoolArray:
    """Return a mask of the rows whose value has not appeared earlier in the array."""
    order = np.argsort(q, kind="stable")
    ordered = q[order]
    first_sorted = np.ones(q.size, dtype=np.bool_)
    first_sorted[1:] = ordered[1:] != ordered[:-1]
    first = np.empty(q.size, dtype=np.bool_)
    first[order] = first_sorted
    return first


def loss_duplicates_reordering(
    seq_unwrapped: npt.ArrayLike, highest_before: int | None = None
) -> SeqStats:
    """Count expected, received, lost, duplicate and reordered messages (arrival order).

    Arrivals at or below ``highest_before`` belong to spans closed earlier (they counted as
    lost there, RFC 7680: later than T_max); they count as reordered here, not as received.
    """
    q = np.asarray(seq_unwrapped, dtype=np.int64)
    if q.size == 0:
        return SeqStats(0, 0, 0, 0, 0, 0, highest_before)
    first = first_occurrence(q)
    running = np.maximum.accumulate(q)
    next_expected = np.empty(q.size, dtype=np.int64)
    next_expected[1:] = running[:-1] + 1
    next_expected[0] = np.iinfo(np.int64).min if highest_before is None else highest_before + 1
    if highest_before is not None:
        np.maximum(next_expected, highest_before + 1, out=next_expected)
    reordered = int(np.count_nonzero(first & (q < next_expected)))
    distinct = int(np.count_nonzero(first))
    highest = int(running[-1]) if highest_before is None else max(int(running[-1]), highest_before)
    if highest_before is None:
        expected = highest - int(q.min()) + 1
        received = distinct
    else:
        expected = highest - highest_before
        received = int(np.count_nonzero(first & (q > highest_before)))
    return SeqStats(
        expected=expected,
        received=received,
        lost=expected - received,
        duplicates=q.size - distinct,
        reordered=reordered,
        distinct=distinct,
        highest=highest,
    )


def transit_differences(transit_ns: IntArray, transit_before: int | None = None) -> IntArray:
    """Return D_i = d_i - d_(i-1) for consecutive arrivals (RFC 3550 D, RFC 3393 IPDV), in ns."""
    transit = np.asarray(transit_ns, dtype=np.int64)
    if transit_before is None:
        return np.diff(transit)
    return np.diff(transit, prepend=transit_before)


def rfc3550_jitter(
    t_send_ns: npt.ArrayLike,
    t_recv_ns: npt.ArrayLike,
    jitter_before: float = 0.0,
    transit_before: int | None = None,
) -> FloatArray:
    """Return the RFC 3550 interarrival jitter J (ns) after each arrival.

    J_k = J_(k-1) + (|D_k| - J_(k-1)) / 16 is a first-order linear filter. Within a block of B
    values it has the closed form J_m = a**m * (J_0 + g * sum_(k<=m) a**-k |D_k|) with
    a = 15/16, g = 1/16: one cumulative sum per block, exact up to float rounding (B = 512 keeps
    a**-B ~ 2e14, so no overflow and ~1e-13 relative error). The carry between blocks is one
    scalar step per 512 arrivals. The first arrival without ``transit_before`` has no D and
    leaves J at ``jitter_before``.
    """
    transit = np.asarray(t_recv_ns, dtype=np.int64) - np.asarray(t_send_ns, dtype=np.int64)
    if transit.size == 0:
        return np.zeros(0, dtype=np.float64)
    magnitude = np.abs(transit_differences(transit, transit_before)).astype(np.float64)
    out = np.empty(transit.size, dtype=np.float64)
    lead = transit.size - magnitude.size  # 1 when the first arrival has no D
    out[:lead] = jitter_before
    a = 1.0 - JITTER_GAIN
    exponent = np.arange(1, _JITTER_BLOCK + 1, dtype=np.float64)
    decay = a**exponent  # a**m, m = 1..B
    growth = a**-exponent  # a**-k
    carry = float(jitter_before)
    for start in range(0, magnitude.size, _JITTER_BLOCK):
        block = magnitude[start : start + _JITTER_BLOCK]
        m = block.size
        scaled = np.cumsum(block * growth[:m]) * JITTER_GAIN
        values = decay[:m] * (carry + scaled)
        out[lead + start : lead + start + m] = values
        carry = float(values[-1])
    return out


def order_statistic(sorted_values: FloatArray, q: float) -> float:
    """Return the exact q-quantile inf{x: F(x) >= q} = sorted[max(ceil(q n), 1) - 1]."""
    rank = max(math.ceil(q * sorted_values.size), 1)
    return float(sorted_values[rank - 1])


def percentile_or_none(sorted_values: FloatArray, percentile: Percentile) -> float | None:
    """Return the exact percentile, or None when the sample is too small to report it."""
    if sorted_values.size < percentile.min_samples:
        return None
    return order_statistic(sorted_values, percentile.q)


class Availability(NamedTuple):
    """UP/DOWN accounting of one window (3GPP TS 22.104 availability from survival time)."""

    up_ns: int
    down_ns: int
    failures: int
    """UP-to-DOWN transitions inside the window."""
    expire_after_ns: int
    """Time at which the service goes DOWN unless a good message arrives (carry forward)."""


def availability_in_window(
    good_recv_ns: npt.ArrayLike,
    expire_at_ns: npt.ArrayLike,
    window: tuple[int, int],
    expire_before_ns: int,
    observed_from_ns: int,
) -> Availability:
    """Split [window) into UP and DOWN time from the good (correct and timely) arrivals.

    ``good_recv_ns`` are the receive times of good messages in arrival order and
    ``expire_at_ns`` the moment each one stops covering the service (its send time plus
    transfer interval, deadline and survival time). The service is DOWN from the running
    maximum of the expiry times until the next good arrival. ``expire_before_ns`` is the expiry
    carried in from before the window; time before ``observed_from_ns`` is not counted.
    Good arrivals lie inside the window, not before ``observed_from_ns``.
    """
    good = np.asarray(good_recv_ns, dtype=np.int64)
    expire = np.asarray(expire_at_ns, dtype=np.int64)
    window_start, window_end = window
    start = max(window_start, observed_from_ns)
    expire_all = np.maximum.accumulate(np.concatenate(([expire_before_ns], expire)))
    if start >= window_end:
        return Availability(0, 0, 0, int(expire_all[-1]))
    segment_start = np.concatenate(([start], good))
    segment_end = np.concatenate((good, [window_end]))
    down_from = np.maximum(segment_start, expire_all)
    down = np.clip(segment_end - down_from, 0, None)
    failures = np.count_nonzero((expire_all >= segment_start) & (expire_all < segment_end))
    down_ns = int(down.sum())
    return Availability(window_end - start - down_ns, down_ns, int(failures), int(expire_all[-1]))


def _distinct_sorted(values: IntArray) -> IntArray:
    """Sorted distinct values; sorts only when needed (receive times mostly come sorted)."""
    if values.size > 1 and bool((values[1:] < values[:-1]).any()):
        values = np.sort(values)
    keep = np.ones(values.size, dtype=np.bool_)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]


def estimate_transfer_interval(receptions_ns: npt.ArrayLike) -> int | None:
    """Estimate the transfer interval TI (ns) of a series from its receive times, or None.

    TI is the median update interval R_i - R_(i-1), taken over cycles rather than single
    receptions: a cyclic device often delivers one cycle as a burst (an OPC UA notification
    whose items are stamped one by one, a charger sending one MeterValues per connector), and
    the update intervals inside a burst are not the cycle. So, on the distinct receive times:

    1. the typical interval is the time-weighted lower quartile of the update intervals (the
       interval length at which a quarter of the time is covered): bursts add many intervals
       but almost no time, so they cannot drag it down, and gaps must cover three quarters of
       the history before they can drag it up;
    2. a reception starts a new cycle when more than 1/8 of that typical interval
       (:data:`AUTO_TI_BURST_DIVISOR`) passed since the previous one;
    3. TI is the lower median of the intervals between cycle starts, given at least
       :data:`AUTO_TI_MIN_CYCLES` of them.

    Why the median: the gaps availability is meant to detect (losses, stalls, outages) are a
    few long intervals among many regular ones; the median ignores them as long as they are
    fewer than half the cycles, where a mean would stretch TI and hide the very gaps it is
    used to find. A history dominated by gaps yields None (no estimate) rather than a
    stretched one.
    """
    received = _distinct_sorted(np.asarray(receptions_ns, dtype=np.int64))
    updates = np.diff(received)
    if updates.size < AUTO_TI_MIN_CYCLES:
        return None
    ordered = np.sort(updates)
    covered = np.cumsum(ordered)
    quartile = int(np.searchsorted(4 * covered, covered[-1], side="left"))  # 4 * cum >= total
    burst_gap = int(ordered[quartile]) // AUTO_TI_BURST_DIVISOR
    starts = received[np.concatenate(([True], updates > burst_gap))]
    cycles = np.sort(np.diff(starts))
    if cycles.size < AUTO_TI_MIN_CYCLES:
        return None
    return int(cycles[(cycles.size + 1) // 2 - 1])


# -- one window of one series --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """Windowing and service parameters of the link KPIs."""

    window_s: float = 10.0
    """Tumbling window length, aligned to multiples of it since the epoch."""
    lateness_s: float = 2.0
    """How long after its end a window waits for late arrivals before it closes."""
    seq_modulus: int | None = None
    """Sequence number wrap (e.g. 65536, Sparkplug 256); None: numbers never wrap."""
    deadline_ms: float | None = None
    """Latency deadline D for reliability and availability; None: not evaluated."""
    survival_time_ms: float | Auto = 0.0
    """Time the application tolerates without an expected message (3GPP survival time);
    ``"auto"``: one transfer interval, i.e. one missed message tolerated (k = floor(ST/TI) = 1)."""
    transfer_interval_ms: float | Auto = 0.0
    """Cyclic transfer interval TI; 0 for event-driven traffic; ``"auto"``: estimated per
    series from its traffic (:func:`estimate_transfer_interval`)."""
    histogram_scale: int = 5
    """Scale of the latency histogram attached to every window."""

    def __post_init__(self) -> None:
        """Validate the parameters."""
        if self.window_s <= 0 or self.lateness_s < 0:
            raise ValueError(f"window_s {self.window_s} must be > 0, lateness_s >= 0")
        for name in ("survival_time_ms", "transfer_interval_ms"):
            value = getattr(self, name)
            if value != AUTO and not (isinstance(value, int | float) and value >= 0):
                raise ValueError(f"{name} {value!r} must be a number >= 0 or {AUTO!r}")

    @property
    def window_ns(self) -> int:
        """Window length in ns."""
        return round(self.window_s * NS_PER_S)

    def deadlines_ms(self) -> tuple[float, ...]:
        """Deadlines counted exactly in the latency histogram."""
        return () if self.deadline_ms is None else (self.deadline_ms,)


@dataclass(frozen=True, slots=True)
class SeriesState:
    """What one series carries from one window into the next."""

    last_seq: int | None = None
    """Last unwrapped sequence number in arrival order (anchor for unwrapping)."""
    highest_seq: int | None = None
    """Highest unwrapped sequence number seen (RFC 4737 NextExp - 1)."""
    last_recv_ns: int | None = None
    last_transit_ns: int | None = None
    jitter_ns: float = 0.0
    expire_ns: int | None = None
    """When the service goes DOWN unless a good message arrives; None before the first one."""
    observed_from_ns: int | None = None
    transfer_interval_ns: int | None = None
    """Last transfer interval estimate (``"auto"``); None until there is one."""
    recent_recv_ns: IntArray = field(
        default_factory=lambda: np.zeros(0, dtype=np.int64), compare=False, repr=False
    )
    """Distinct receive times the estimate looks at (``"auto"``), oldest first."""


@dataclass(frozen=True, slots=True)
class LinkWindow:
    """Link KPIs of one series over one window; None where a KPI has no basis in the window."""

    n_received: int
    bytes_received: int
    throughput_bps: float
    message_rate: float
    n_expected: int
    n_lost: int
    loss_ratio: float | None
    duplicates: int
    reordered: int
    reordering_ratio: float | None
    n_latency: int
    latency_min_ms: float | None
    latency_mean_ms: float | None
    latency_max_ms: float | None
    latency_p50_ms: float | None
    latency_p90_ms: float | None
    latency_p99_ms: float | None
    latency_p99_9_ms: float | None
    latency_p99_99_ms: float | None
    pdv_p99_ms: float | None
    pdv_max_ms: float | None
    ipdv_abs_mean_ms: float | None
    ipdv_abs_p99_ms: float | None
    interarrival_jitter_ms: float | None
    update_time_mean_ms: float | None
    update_time_max_ms: float | None
    update_time_p99_ms: float | None
    n_sent: int
    n_timely: int
    deadline_reliability: float | None
    transfer_interval_ms: float | None
    """Transfer interval availability was computed against (estimated for ``"auto"``)."""
    survival_time_ms: float | None
    """Survival time availability was computed against (one TI for ``"auto"``)."""
    availability: float | None
    up_s: float
    down_s: float
    failures: int
    mtbf_s: float | None
    latency_histogram: ExpHistogram = field(compare=False, repr=False)


def _ms(value_ns: float) -> float:
    return value_ns / NS_PER_MS


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


class _Delays(NamedTuple):
    """Latency-derived KPIs of one window (all None without send timestamps)."""

    histogram: ExpHistogram
    timely: BoolArray  # per row: latency <= deadline, or no latency to judge it by
    minimum: float | None
    mean: float | None
    maximum: float | None
    percentiles: tuple[float | None, ...]  # in the order of PERCENTILES
    pdv_p99: float | None
    pdv_max: float | None
    ipdv_abs_mean: float | None
    ipdv_abs_p99: float | None
    jitter: float | None


def _delay_kpis(
    t_send: IntArray, t_recv: IntArray, config: LinkConfig, state: SeriesState
) -> tuple[_Delays, SeriesState]:
    has_send = t_send != NO_TIME
    transit = t_recv[has_send] - t_send[has_send]
    delay_ms = transit / NS_PER_MS
    histogram = ExpHistogram(config.histogram_scale, config.deadlines_ms())
    histogram.record(delay_ms)
    ordered = np.sort(delay_ms)
    pdv = ordered - ordered[0] if ordered.size else ordered  # RFC 5481: above the window minimum
    ipdv = np.sort(np.abs(transit_differences(transit, state.last_transit_ns)) / NS_PER_MS)
    jitter = rfc3550_jitter(
        t_send[has_send], t_recv[has_send], state.jitter_ns, state.last_transit_ns
    )
    jitter_ns = float(jitter[-1]) if jitter.size else state.jitter_ns
    has_jitter = jitter.size > 1 or (jitter.size > 0 and state.last_transit_ns is not None)
    timely = np.ones(t_send.size, dtype=np.bool_)
    if config.deadline_ms is not None:
        timely[has_send] = transit <= round(config.deadline_ms * NS_PER_MS)
    delays = _Delays(
        histogram=histogram,
        timely=timely,
        minimum=float(ordered[0]) if ordered.size else None,
        mean=float(delay_ms.mean()) if ordered.size else None,
        maximum=float(ordered[-1]) if ordered.size else None,
        percentiles=tuple(percentile_or_none(ordered, p) for p in PERCENTILES),
        pdv_p99=percentile_or_none(pdv, P99),
        pdv_max=float(pdv[-1]) if pdv.size else None,
        ipdv_abs_mean=float(ipdv.mean()) if ipdv.size else None,
        ipdv_abs_p99=percentile_or_none(ipdv, P99),
        jitter=_ms(jitter_ns) if has_jitter else None,
    )
    state = replace(
        state,
        jitter_ns=jitter_ns,
        last_transit_ns=int(transit[-1]) if transit.size else state.last_transit_ns,
    )
    return delays, state


def _transfer_interval(
    t_recv: IntArray, window: tuple[int, int], config: LinkConfig, state: SeriesState
) -> tuple[int | None, SeriesState]:
    """The TI (ns) of this window: configured, or estimated (``"auto"``); None: not known yet."""
    if config.transfer_interval_ms != AUTO:
        return round(config.transfer_interval_ms * NS_PER_MS), state
    horizon = window[0] - (AUTO_TI_HISTORY_WINDOWS - 1) * (window[1] - window[0])
    history = state.recent_recv_ns
    history = _distinct_sorted(np.concatenate((history[history >= horizon], t_recv)))
    history = history[-AUTO_TI_MAX_RECEPTIONS:]
    estimate = state.transfer_interval_ns
    if t_recv.size:  # a silent window learns nothing: it keeps the last estimate
        estimate = estimate_transfer_interval(history)
        # A history without an estimate (too short, or mostly gaps) keeps the last one too.
        estimate = state.transfer_interval_ns if estimate is None else estimate
    return estimate, replace(state, recent_recv_ns=history, transfer_interval_ns=estimate)


def _survival_ns(config: LinkConfig, interval_ns: int | None) -> int | None:
    if config.survival_time_ms == AUTO:
        return interval_ns
    return round(config.survival_time_ms * NS_PER_MS)


def _availability(
    t_send: IntArray,
    t_recv: IntArray,
    timely: BoolArray,
    window: tuple[int, int],
    *,
    interval_ns: int | None,
    config: LinkConfig,
    state: SeriesState,
) -> tuple[Availability | None, SeriesState]:
    survival_ns = _survival_ns(config, interval_ns)
    if config.deadline_ms is None or interval_ns is None or survival_ns is None:
        return None, state  # without a TI (not estimated yet) availability has no basis
    deadline_ns = round(config.deadline_ms * NS_PER_MS)
    # The reference time of a message is its send time; without one, its receive time.
    reference = np.where(t_send != NO_TIME, t_send, t_recv)
    if state.expire_ns is None:
        if reference.size == 0:
            return None, state
        first = int(reference[0])
        state = replace(state, expire_ns=first + deadline_ns + survival_ns, observed_from_ns=first)
    assert state.expire_ns is not None
    assert state.observed_from_ns is not None
    # After a good message the next one is due TI later, may take D, and ST is tolerated.
    expire_at = reference[timely] + (interval_ns + deadline_ns + survival_ns)
    result = availability_in_window(
        t_recv[timely], expire_at, window, state.expire_ns, state.observed_from_ns
    )
    return result, replace(state, expire_ns=result.expire_after_ns)


def link_window(
    rows: tuple[IntArray, IntArray, IntArray, IntArray],
    window: tuple[int, int],
    config: LinkConfig,
    state: SeriesState,
    *,
    observed_until_ns: int | None = None,
) -> tuple[LinkWindow, SeriesState]:
    """Compute the KPIs of one series over ``window`` = [start_ns, end_ns) and the next state.

    ``rows`` = (seq, t_send_ns, t_recv_ns, size) of the received messages of the window, sorted
    by receive time. ``observed_until_ns`` ends the availability accounting early (the input
    stopped there, e.g. at shutdown): time nobody observed is neither UP nor DOWN.
    """
    seq, t_send, t_recv, size = rows
    window_s = (window[1] - window[0]) / NS_PER_S
    n = int(t_recv.size)

    has_seq = seq != NO_SEQ
    numbers = seq[has_seq]
    if config.seq_modulus is not None:
        numbers = unwrap_seq(numbers, config.seq_modulus, state.last_seq)
    stats = loss_duplicates_reordering(numbers, state.highest_seq)

    delays, state = _delay_kpis(t_send, t_recv, config, state)
    # Messages sent = expected sequence numbers plus messages without one; timely messages are
    # counted once per sequence number (first arrival), only inside the expected span.
    first = first_occurrence(numbers)
    if state.highest_seq is not None:
        first &= numbers > state.highest_seq
    n_sent = stats.expected + int(np.count_nonzero(~has_seq))
    n_timely = int(np.count_nonzero(delays.timely[has_seq] & first)) + int(
        np.count_nonzero(delays.timely[~has_seq])
    )

    if state.last_recv_ns is None:
        updates = np.sort(np.diff(t_recv)).astype(np.float64)
    else:
        updates = np.sort(np.diff(t_recv, prepend=state.last_recv_ns)).astype(np.float64)
    interval_ns, state = _transfer_interval(t_recv, window, config, state)
    observed = window
    if observed_until_ns is not None:
        until = max(observed_until_ns, int(t_recv[-1]) + 1) if n else observed_until_ns
        observed = (window[0], max(window[0], min(window[1], until)))
    avail, state = _availability(
        t_send, t_recv, delays.timely, observed, interval_ns=interval_ns, config=config, state=state
    )
    survival_ns = _survival_ns(config, interval_ns)
    state = replace(
        state,
        last_seq=int(numbers[-1]) if numbers.size else state.last_seq,
        highest_seq=stats.highest,
        last_recv_ns=int(t_recv[-1]) if n else state.last_recv_ns,
    )
    up_s = avail.up_ns / NS_PER_S if avail else 0.0
    result = LinkWindow(
        n_received=n,
        bytes_received=int(size.sum()),
        throughput_bps=8.0 * float(size.sum()) / window_s,
        message_rate=n / window_s,
        n_expected=stats.expected,
        n_lost=stats.lost,
        loss_ratio=_ratio(stats.lost, stats.expected),
        duplicates=stats.duplicates,
        reordered=stats.reordered,
        reordering_ratio=_ratio(stats.reordered, stats.distinct),
        n_latency=delays.histogram.n,
        latency_min_ms=delays.minimum,
        latency_mean_ms=delays.mean,
        latency_max_ms=delays.maximum,
        latency_p50_ms=delays.percentiles[0],
        latency_p90_ms=delays.percentiles[1],
        latency_p99_ms=delays.percentiles[2],
        latency_p99_9_ms=delays.percentiles[3],
        latency_p99_99_ms=delays.percentiles[4],
        pdv_p99_ms=delays.pdv_p99,
        pdv_max_ms=delays.pdv_max,
        ipdv_abs_mean_ms=delays.ipdv_abs_mean,
        ipdv_abs_p99_ms=delays.ipdv_abs_p99,
        interarrival_jitter_ms=delays.jitter,
        update_time_mean_ms=_ms(float(updates.mean())) if updates.size else None,
        update_time_max_ms=_ms(float(updates[-1])) if updates.size else None,
        update_time_p99_ms=_none_or_ms(percentile_or_none(updates, P99)),
        n_sent=n_sent,
        n_timely=n_timely,
        deadline_reliability=(_ratio(n_timely, n_sent) if config.deadline_ms is not None else None),
        transfer_interval_ms=_none_or_ms(interval_ns),
        survival_time_ms=_none_or_ms(survival_ns),
        availability=_ratio(avail.up_ns, avail.up_ns + avail.down_ns) if avail else None,
        up_s=up_s,
        down_s=avail.down_ns / NS_PER_S if avail else 0.0,
        failures=avail.failures if avail else 0,
        mtbf_s=up_s / avail.failures if avail and avail.failures else None,
        latency_histogram=delays.histogram,
    )
    return result, state


def _none_or_ms(value_ns: float | None) -> float | None:
    return None if value_ns is None else _ms(value_ns)


def sort_arrivals(
    rows: tuple[IntArray, IntArray, IntArray, IntArray],
) -> tuple[IntArray, IntArray, IntArray, IntArray]:
    """Return the received rows sorted by receive time (stable), dropping never-received ones."""
    seq, t_send, t_recv, size = rows
    received = t_recv != NO_TIME
    order = np.argsort(t_recv[received], kind="stable")
    return (
        seq[received][order],
        t_send[received][order],
        t_recv[received][order],
        size[received][order],
    )


# -- streaming windows over many series ----------------------------------------------------


class ClosedWindow(NamedTuple):
    """A closed tumbling window of one series."""

    series: object
    window_start_ns: int
    window_len_s: float
    kpis: LinkWindow


@dataclass(slots=True)
class _Series:
    """Per-series buffers: rows waiting for their window to close, and the carried state."""

    config: LinkConfig
    pending: list[tuple[IntArray, IntArray, IntArray, IntArray, IntArray]] = field(
        default_factory=list
    )  # (window index, seq, t_send, t_recv, size) chunks
    next_window: int | None = None  # first window index not yet emitted
    state: SeriesState = field(default_factory=SeriesState)
    late: int = 0


class LinkWindower:
    """Tumbling-window link KPIs for many series, fed with whole arrays.

    ``add`` groups rows by series with one sort; ``advance(now_ns)`` closes every window whose
    end is at or before ``now_ns - lateness`` and returns its KPIs, in series then time order.
    Once a series has been seen, every later window is emitted for it, also an empty one: a
    silent link shows up as DOWN, not as missing data. Rows for an already closed window are
    counted in ``late_samples`` (per series in ``late_by_series``); rows never received are
    counted in ``unreceived`` (loss is derived from sequence numbers).

    ``transfer_intervals_ms`` gives series their own transfer interval (ms, or ``"auto"``);
    the others take ``config.transfer_interval_ms``.
    """

    def __init__(
        self,
        config: LinkConfig,
        transfer_intervals_ms: Mapping[object, float | Auto] | None = None,
    ) -> None:
        """Create a windower; nothing is closed until the first ``advance``."""
        self.config = config
        self._configs = {
            key: replace(config, transfer_interval_ms=ti)
            for key, ti in (transfer_intervals_ms or {}).items()
        }
        self._window_ns = config.window_ns
        self._lateness_ns = round(config.lateness_s * NS_PER_S)
        self._series: dict[object, _Series] = {}
        self._closed_upto: int | None = None  # windows with index < this are closed
        self.late_samples = 0
        self.unreceived = 0

    @property
    def late_by_series(self) -> dict[object, int]:
        """Late rows per series (arrived after their window had closed)."""
        return {key: s.late for key, s in self._series.items() if s.late}

    def add(
        self,
        series_ids: npt.ArrayLike,
        seq: npt.ArrayLike,
        t_send_ns: npt.ArrayLike,
        t_recv_ns: npt.ArrayLike,
        size: npt.ArrayLike,
    ) -> None:
        """Buffer one batch of rows (several series mixed, any order)."""
        ids = np.asarray(series_ids)
        columns = [np.asarray(c, dtype=np.int64) for c in (seq, t_send_ns, t_recv_ns, size)]
        if any(c.shape != ids.shape for c in columns) or ids.ndim != 1:
            raise ValueError("series_ids, seq, t_send_ns, t_recv_ns and size differ in shape")
        received = columns[2] != NO_TIME
        self.unreceived += int(ids.size - np.count_nonzero(received))
        ids = ids[received]
        seq_r, send_r, recv_r, size_r = (c[received] for c in columns)
        if ids.size == 0:
            return
        window = recv_r // self._window_ns
        keys, codes = np.unique(ids, return_inverse=True)
        codes = codes.ravel()
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(keys.size + 1))
        for k, key in enumerate(keys.tolist()):  # one iteration per series, not per row
            rows = order[bounds[k] : bounds[k + 1]]
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(self._configs.get(key, self.config))
            win = window[rows]
            if self._closed_upto is not None:
                on_time = win >= self._closed_upto
                late = int(rows.size - np.count_nonzero(on_time))
                series.late += late
                self.late_samples += late
                rows, win = rows[on_time], win[on_time]
            if rows.size:
                series.pending.append((win, seq_r[rows], send_r[rows], recv_r[rows], size_r[rows]))

    def advance(self, now_ns: int) -> list[ClosedWindow]:
        """Close and return every window that ended at or before ``now_ns - lateness``."""
        boundary = (now_ns - self._lateness_ns) // self._window_ns
        return self._close(boundary)

    def flush(self, until_ns: int | None = None) -> list[ClosedWindow]:
        """Close every window that holds buffered rows (end of input).

        ``until_ns``: when the input ended (shutdown); the last window's availability counts
        only the time up to it, not the rest of the window that nobody observed.
        """
        last = [int(chunk[0].max()) for s in self._series.values() for chunk in s.pending]
        if not last:
            return []
        return self._close(max(last) + 1, until_ns)

    def _close(self, boundary: int, until_ns: int | None = None) -> list[ClosedWindow]:
        if self._closed_upto is not None:
            boundary = max(boundary, self._closed_upto)
        self._closed_upto = boundary
        closed: list[ClosedWindow] = []
        for key, series in self._series.items():
            closed.extend(self._close_series(key, series, boundary, until_ns))
        return closed

    def _close_series(
        self, key: object, series: _Series, boundary: int, until_ns: int | None
    ) -> list[ClosedWindow]:
        # Rows arrive nearly in window order, so a chunk is usually all due or all pending:
        # those move as they are, and only a chunk that straddles the boundary is split.
        # Copying every pending row again on every advance churned the heap (a steady RSS
        # creep of the agent) for nothing.
        due_parts: list[tuple[IntArray, IntArray, IntArray, IntArray, IntArray]] = []
        keep_parts: list[tuple[IntArray, IntArray, IntArray, IntArray, IntArray]] = []
        for chunk in series.pending:
            if int(chunk[0].max()) < boundary:
                due_parts.append(chunk)
            elif int(chunk[0].min()) >= boundary:
                keep_parts.append(chunk)
            else:
                mask = chunk[0] < boundary
                due_parts.append(_take(chunk, mask))
                keep_parts.append(_take(chunk, ~mask))
        series.pending = keep_parts
        if due_parts:
            win, seq, t_send, t_recv, size = (
                np.concatenate(parts) for parts in zip(*due_parts, strict=True)
            )
        else:
            win = seq = t_send = t_recv = size = np.zeros(0, dtype=np.int64)
        first = series.next_window
        if first is None:
            if win.size == 0:
                return []
            first = int(win.min())
        order = np.lexsort((t_recv, win))  # by window, then receive time (stable)
        win, seq, t_send, t_recv, size = (
            win[order],
            seq[order],
            t_send[order],
            t_recv[order],
            size[order],
        )
        indices = np.arange(first, boundary, dtype=np.int64)
        starts = np.searchsorted(win, indices, side="left")
        ends = np.searchsorted(win, indices, side="right")
        out: list[ClosedWindow] = []
        for w, lo, hi in zip(indices.tolist(), starts.tolist(), ends.tolist(), strict=True):
            span = (w * self._window_ns, (w + 1) * self._window_ns)
            rows = (seq[lo:hi], t_send[lo:hi], t_recv[lo:hi], size[lo:hi])
            kpis, series.state = link_window(
                rows, span, series.config, series.state, observed_until_ns=until_ns
            )
            out.append(ClosedWindow(key, span[0], self.config.window_s, kpis))
        series.next_window = max(boundary, first)
        return out


def _take(
    chunk: tuple[IntArray, IntArray, IntArray, IntArray, IntArray], mask: npt.NDArray[np.bool_]
) -> tuple[IntArray, IntArray, IntArray, IntArray, IntArray]:
    """The rows of a pending chunk where ``mask`` holds."""
    win, seq, t_send, t_recv, size = chunk
    return win[mask], seq[mask], t_send[mask], t_recv[mask], size[mask]
