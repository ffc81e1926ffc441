"""Live KPIs: computed by the agent on its batches, merged and stored by ingest.

Agent side, :class:`KpiEngine`:

* **Link KPIs per device** (``pipelines.link.LinkWindower``, series = device index) for every
  device whose rows carry a sequence number or a source timestamp. One *message* is one
  reception: the rows of a device sharing ``(seq, ts_receive)`` (or, without a seq,
  ``(ts_source, ts_receive)``). Keying on the receive time too keeps a redelivered message
  (same seq, later reception) visible as a duplicate. A message's size is an estimate:
  :data:`VALUE_BYTES` per sample (the float64 value the message carried), so ``throughput_bps``
  is value bytes, not wire bytes. The first configured deadline drives ``deadline_reliability``,
  ``availability`` and MTBF; every deadline gets exact ``n_timely_<D>ms`` /
  ``deadline_reliability_<D>ms`` / ``availability_<D>ms`` fields and a counter in the histogram.
  Availability is computed against each device's transfer interval (``kpi.transfer_interval_ms``:
  fixed, per device, or ``auto``: estimated from the device's own traffic) and the survival
  time; both are in the payload (``transfer_interval_ms``, ``survival_time_ms``), and until a
  device's interval is estimated its ``availability`` is null.
* **Process KPIs per device**, recognised from the channel names in the series table
  (:data:`DEVICE_MODELS`, a table of frozen dataclasses): OPC 40001 machine tools and PackML
  lines (OEE), chargers (utilisation, energy, sessions, availability) and benches (solar yield,
  battery, protection mode, sessions, occupancy). Process time is the source timestamp, or the
  receive time when the source gives none. Bad or NaN samples are left out.

Windows are the configured ``windows_s``, tumbling and aligned to the epoch; a window closes
``allowed_lateness_s`` after its end. Once a device has been seen, every later window is
reported, also an empty one. Each closed window becomes one ``tpo.kpi/1`` message on
``tpo/v1/{site}/{area}/{device}/kpi``::

    {"schema": "tpo.kpi/1", "site", "area", "device", "agent", "window_start_ns", "window_s",
     "kind": "link" | "machine" | "charger" | "bench", "kpis": {name: number | null},
     "histogram": ExpHistogram.to_dict()}        # link only

A KPI without a basis in the window (a percentile over too few samples, a ratio over nothing)
is ``null``, never a number.

Ingest side, :class:`KpiIngest`: a ``tpo.kpi/1`` message becomes one point in ``link_kpi``,
``machine_kpi``, ``charger_kpi`` or ``bench_kpi`` (tags site, area, device, window such as
``10s``; every KPI a float field; timestamp = window start, so a replay overwrites itself), and
:class:`HistogramMerger` merges link histograms per area (``device="_area"``) and for the
whole campus (``area="_campus"``, ``device="_campus"``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections import Counter, deque
from dataclasses import dataclass, field, fields
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import numpy.typing as npt
import orjson

from drivers.base import BAD, NO_SEQ, NO_TIMESTAMP, SampleBatch, SeriesTable, now_ns
from edge import lineprotocol as lp
from edge import payload as wire
from edge.errors import ConfigError, DecodeError
from edge.outbox import OutboxItem
from pipelines.histogram import ExpHistogram
from pipelines.link import AUTO, PERCENTILES, Auto, LinkConfig, LinkWindow, LinkWindower
from pipelines.process import (
    OPC40001,
    PACKML,
    MachineModel,
    StepSeries,
    bench_kpis,
    charger_kpis,
    counter_increase,
    machine_oee,
    oee,
    run_time_ns,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from edge.config import SiteConfig
    from edge.outbox import MemoryOutbox

log = logging.getLogger(__name__)

KPI_SCHEMA: Final = "tpo.kpi/1"
Kind = Literal["link", "machine", "charger", "bench"]
MEASUREMENTS: Final[dict[str, str]] = {
    "link": "link_kpi",
    "machine": "machine_kpi",
    "charger": "charger_kpi",
    "bench": "bench_kpi",
}
"""InfluxDB measurement of each KPI kind."""
VALUE_BYTES: Final = 8
"""Size estimate of one sample in a message: its float64 value."""
DEFAULT_IDEAL_CYCLE_S: Final = 30.0
"""Ideal cycle time when the site gives none: the simulator's shortest machining cycle.

A site can set ``kpi.ideal_cycle_s`` (one number, or a mapping device -> seconds) once
:class:`edge.config.KpiConfig` has that field; performance and OEE scale with it.
"""
AREA_DEVICE: Final = "_area"
"""``device`` tag of the per-area merged link KPIs."""
CAMPUS: Final = "_campus"
"""``area`` and ``device`` tag of the campus-wide merged link KPIs."""
NS_PER_S: Final = 1_000_000_000

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
Window = tuple[int, int]
KpiValues = dict[str, float | None]


def window_label(window_s: float) -> str:
    """Tag value of a window length: ``10s``, ``0.5s``."""
    return f"{window_s:g}s"


def deadline_label(deadline_ms: float) -> str:
    """Field suffix of a deadline: ``10ms``, ``0_5ms``."""
    return f"{deadline_ms:g}ms".replace(".", "_")


def _clean(value: object) -> float | None:
    """A KPI value as a finite float, or None (absent)."""
    if value is None:
        return None
    number = float(value)  # type: ignore[arg-type]
    return number if math.isfinite(number) else None


def _as_kpis(obj: object, *, skip: frozenset[str] = frozenset()) -> KpiValues:
    """The numeric fields of a KPI dataclass as a dict of finite floats or None."""
    return {
        f.name: _clean(getattr(obj, f.name))
        for f in fields(obj)  # type: ignore[arg-type]
        if f.name not in skip
    }


# -- device models: which channels feed which process KPIs ---------------------------------

ChannelSeries = dict[str, StepSeries]
"""Channel name -> samples inside the window plus the value held before it."""


@dataclass(frozen=True, slots=True)
class DeviceKpiModel:
    """A device kind recognised by its channel names, and the function computing its KPIs."""

    kind: Kind
    name: str
    required: tuple[str, ...]
    """Every one of these channels must exist for a device to match."""
    optional: tuple[str, ...]
    """Used when present."""
    compute: Callable[[Window, ChannelSeries, float], KpiValues]
    """(window, series by channel, ideal cycle s) -> KPIs."""
    connectors: bool = False
    """Channels may repeat per connector with the suffix ``_c<n>`` (n >= 2)."""

    def channels_of(self, present: Iterable[str]) -> tuple[str, ...]:
        """The channels of a device (given all its channel names) this model reads."""
        wanted = {*self.required, *self.optional}
        if not self.connectors:
            return tuple(c for c in present if c in wanted)
        return tuple(c for c in present if _CONNECTOR.sub("", c) in wanted)

    def matches(self, present: Iterable[str]) -> bool:
        """Whether a device with these channels is of this model."""
        return set(self.required) <= set(present)


_CONNECTOR = re.compile(r"_c[2-9]\d*$")


def _step(series: ChannelSeries, channel: str | None) -> StepSeries | None:
    return None if channel is None else series.get(channel)


def _empty_step() -> StepSeries:
    return StepSeries(np.zeros(0, np.int64), np.zeros(0, np.float64))


def _increase(counter: StepSeries) -> float:
    return counter_increase(counter.values, counter.before)


@dataclass(frozen=True, slots=True)
class MachineChannels:
    """The channels of a machine's state model and part counters."""

    model: MachineModel
    state: str
    mode: str
    total: str
    good: str | None = None
    defective: str | None = None
    """Counter of bad parts; good = total - defective (PackML)."""


def _machine_kpis(
    channels: MachineChannels, window: Window, series: ChannelSeries, ideal_cycle_s: float
) -> KpiValues:
    state = series[channels.state]
    mode = series.get(channels.mode)
    total = series[channels.total]
    if channels.good is not None:
        result = machine_oee(
            window,
            state=state,
            mode=mode,
            total_counter=total,
            good_counter=series[channels.good],
            ideal_cycle_s=ideal_cycle_s,
            model=channels.model,
        )
    else:
        assert channels.defective is not None
        planned, run = run_time_ns(state, mode, channels.model, window)
        made = _increase(total)
        good = made - _increase(series[channels.defective])
        result = oee(planned / NS_PER_S, run / NS_PER_S, made, good, ideal_cycle_s)
    return _as_kpis(result)


def _charger_kpis(window: Window, series: ChannelSeries, _ideal: float) -> KpiValues:
    """Charger KPIs summed (energy, sessions) or averaged (ratios) over its connectors."""
    results = []
    for n in range(1, 9):
        suffix = "" if n == 1 else f"_c{n}"
        status = series.get(f"status{suffix}")
        if status is None:
            break
        active = series.get(f"transaction_active{suffix}") or _empty_step()
        stops = np.asarray(active.t_ns)[np.asarray(active.values) == 0.0]
        results.append(
            charger_kpis(
                window,
                status=status,
                energy_register_wh=series.get(f"energy_wh{suffix}") or _empty_step(),
                stop_t_ns=stops,
            )
        )
    count = len(results)
    return {
        "connectors": float(count),
        "utilisation": sum(r.utilisation for r in results) / count,
        "energy_wh": sum(r.energy_wh for r in results),
        "sessions": float(sum(r.sessions for r in results)),
        "availability": sum(r.availability for r in results) / count,
    }


def _bench_kpis(window: Window, series: ChannelSeries, _ideal: float) -> KpiValues:
    result = bench_kpis(
        window,
        pv_wh_total=series["pv_wh_total"],
        soc_pct=series["batt_soc_pct"],
        protect_mode=series["protect_mode"],
        sessions_counter=series["sessions_today"],
        occupancy=series["occupancy"],
    )
    return _as_kpis(result)


def _machine_model(name: str, channels: MachineChannels) -> DeviceKpiModel:
    counters = tuple(c for c in (channels.good, channels.defective) if c is not None)
    return DeviceKpiModel(
        kind="machine",
        name=name,
        required=(channels.state, channels.total, *counters),
        optional=(channels.mode,),
        compute=partial(_machine_kpis, channels),
    )


DEVICE_MODELS: Final = (
    _machine_model(
        "opc40001",
        MachineChannels(
            model=OPC40001,
            state="MachineryBuildingBlocks.MachineryItemState",
            mode="MachineryBuildingBlocks.MachineryOperationMode",
            total="Production.Job.PartsCompleted",
            good="Production.Job.PartsGood",
        ),
    ),
    _machine_model(
        "packml",
        MachineChannels(
            model=PACKML,
            state="Status.StateCurrent",
            mode="Status.UnitMode",
            total="Admin.ProdProcessedCount.AccCount",  # AccCount never resets
            defective="Admin.ProdDefectiveCount.AccCount",
        ),
    ),
    DeviceKpiModel(
        kind="charger",
        name="charger",
        required=("status", "energy_wh", "transaction_active"),
        optional=(),
        compute=_charger_kpis,
        connectors=True,
    ),
    DeviceKpiModel(
        kind="bench",
        name="bench",
        required=("pv_wh_total", "batt_soc_pct", "protect_mode", "sessions_today", "occupancy"),
        optional=(),
        compute=_bench_kpis,
    ),
)
"""Process-KPI device models, tried in order; a device takes the first that matches."""


# -- process windows -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ProcessDevice:
    """A device with process KPIs: its model, series and ideal cycle time."""

    area: str
    device: str
    model: DeviceKpiModel
    series: dict[int, str]
    """Series index -> channel name, of the channels the model reads."""
    ideal_cycle_s: float


@dataclass(slots=True)
class _ProcessState:
    """Rows waiting for their window, and what each series held before the next window."""

    pending: dict[int, list[tuple[IntArray, FloatArray]]] = field(default_factory=dict)
    before: dict[int, float] = field(default_factory=dict)
    next_window: int | None = None


@dataclass(frozen=True, slots=True)
class ProcessWindow:
    """Process KPIs of one device over one closed window."""

    device: int
    window_start_ns: int
    window_s: float
    kpis: KpiValues


class ProcessWindower:
    """Tumbling windows of process KPIs for many devices (step functions carried over)."""

    def __init__(self, devices: list[_ProcessDevice], window_s: float, lateness_s: float) -> None:
        """Windows of ``window_s``, closed ``lateness_s`` after their end."""
        self.devices = devices
        self.window_s = window_s
        self._window_ns = round(window_s * NS_PER_S)
        self._lateness_ns = round(lateness_s * NS_PER_S)
        self._device_of: dict[int, int] = {
            s: d for d, dev in enumerate(devices) for s in dev.series
        }
        self._states = [_ProcessState() for _ in devices]
        self._closed_upto: int | None = None
        self.late_samples = 0

    def add(self, series: npt.NDArray[np.int32], t_ns: IntArray, value: FloatArray) -> None:
        """Buffer rows of process series (any order, several series mixed)."""
        if series.size == 0:
            return
        keys, codes = np.unique(series, return_inverse=True)
        order = np.argsort(codes.ravel(), kind="stable")
        bounds = np.searchsorted(codes.ravel()[order], np.arange(keys.size + 1))
        for k, s in enumerate(keys.tolist()):  # one iteration per series, not per row
            rows = order[bounds[k] : bounds[k + 1]]
            t, v = t_ns[rows], value[rows]
            if self._closed_upto is not None:
                on_time = t // self._window_ns >= self._closed_upto
                self.late_samples += int(rows.size - np.count_nonzero(on_time))
                t, v = t[on_time], v[on_time]
            if t.size:
                state = self._states[self._device_of[s]]
                state.pending.setdefault(s, []).append((t, v))

    def advance(self, now_ns: int) -> list[ProcessWindow]:
        """Close every window that ended at or before ``now_ns - lateness``."""
        return self._close((now_ns - self._lateness_ns) // self._window_ns)

    def flush(self) -> list[ProcessWindow]:
        """Close every window holding buffered rows (end of input)."""
        last = [
            int(t.max()) // self._window_ns
            for state in self._states
            for chunks in state.pending.values()
            for t, _ in chunks
        ]
        return self._close(max(last) + 1) if last else []

    def _close(self, boundary: int) -> list[ProcessWindow]:
        if self._closed_upto is not None:
            boundary = max(boundary, self._closed_upto)
        self._closed_upto = boundary
        out: list[ProcessWindow] = []
        for d, (device, state) in enumerate(zip(self.devices, self._states, strict=True)):
            out.extend(self._close_device(d, device, state, boundary))
        return out

    def _close_device(
        self, d: int, device: _ProcessDevice, state: _ProcessState, boundary: int
    ) -> list[ProcessWindow]:
        sorted_rows: dict[int, tuple[IntArray, FloatArray]] = {}
        for s, chunks in state.pending.items():
            t = np.concatenate([c[0] for c in chunks])
            v = np.concatenate([c[1] for c in chunks])
            order = np.argsort(t, kind="stable")
            sorted_rows[s] = (t[order], v[order])
        first = state.next_window
        if first is None:
            if not sorted_rows:
                return []
            first = min(int(t[0]) for t, _ in sorted_rows.values()) // self._window_ns
        out: list[ProcessWindow] = []
        for w in range(first, boundary):
            window = (w * self._window_ns, (w + 1) * self._window_ns)
            channels: ChannelSeries = {}
            for s, channel in device.series.items():
                t, v = sorted_rows.get(s, (np.zeros(0, np.int64), np.zeros(0, np.float64)))
                lo, hi = np.searchsorted(t, window, side="left")
                channels[channel] = StepSeries(t[lo:hi], v[lo:hi], state.before.get(s))
                if hi > lo:
                    state.before[s] = float(v[hi - 1])
            kpis = device.model.compute(window, channels, device.ideal_cycle_s)
            out.append(ProcessWindow(d, window[0], self.window_s, kpis))
        end = boundary * self._window_ns
        state.pending = {}
        for s, (t, v) in sorted_rows.items():
            keep = t >= end
            if keep.any():
                state.pending[s] = [(t[keep], v[keep])]
        state.next_window = max(boundary, first)
        return out


# -- the agent's engine --------------------------------------------------------------------


def _ideal_cycle(site: SiteConfig, device: str) -> float:
    configured = getattr(site.kpi, "ideal_cycle_s", None)
    if isinstance(configured, int | float):
        return float(configured)
    if configured is not None and device in configured:
        return float(configured[device])
    return DEFAULT_IDEAL_CYCLE_S


def _transfer_intervals(
    site: SiteConfig, devices: list[tuple[str, str]]
) -> tuple[float | Auto, dict[object, float | Auto]]:
    """The site's transfer interval: the default and the per-device ones (by device index)."""
    configured = site.kpi.transfer_interval_ms
    if not isinstance(configured, dict):
        return configured, {}
    names = {device for _, device in devices}
    unknown = sorted(set(configured) - names)
    if unknown:
        problems: list[tuple[str, int | None, str]] = [
            (f"kpi.transfer_interval_ms.{name}", None, "no source reads a device of this name")
            for name in unknown
        ]
        raise ConfigError(f"site {site.site}", problems)
    per_device: dict[object, float | Auto] = {
        i: configured[device] for i, (_, device) in enumerate(devices) if device in configured
    }
    return AUTO, per_device


@dataclass(frozen=True, slots=True)
class _LinkWindowers:
    """The windowers of one window length: one per deadline (the first is the primary)."""

    window_s: float
    deadlines: tuple[float, ...]
    windowers: tuple[LinkWindower, ...]


class KpiEngine:
    """Computes link and process KPIs from the agent's batches and encodes closed windows."""

    def __init__(
        self, site: SiteConfig, table: SeriesTable, counters: Counter[str] | None = None
    ) -> None:
        """Plan devices and windows from the site's KPI config and the series table.

        ``counters`` (the agent's self-metrics) receives windows emitted and late samples.
        """
        self.site = site.site
        self.agent_id = site.agent.id
        cfg = site.kpi
        self.devices = table.devices()
        index = {dev: i for i, dev in enumerate(self.devices)}
        self._device_index = index
        self._device_of_series = np.array(
            [index[(k.area, k.device)] for k in table], dtype=np.int64
        )
        self._links: list[_LinkWindowers] = []
        interval, per_device = _transfer_intervals(site, self.devices)
        for window_s in cfg.windows_s:
            deadlines = cfg.deadlines_ms
            configs = [
                LinkConfig(
                    window_s=window_s,
                    lateness_s=cfg.allowed_lateness_s,
                    deadline_ms=d,
                    survival_time_ms=cfg.survival_time_ms,
                    transfer_interval_ms=interval,
                )
                for d in (deadlines or (None,))
            ]
            windowers = tuple(LinkWindower(c, per_device) for c in configs)
            self._links.append(_LinkWindowers(window_s, deadlines, windowers))
        process_devices: list[_ProcessDevice] = []
        self._is_process = np.zeros(len(table), dtype=np.bool_)
        for area, device in self.devices:
            members = table.of_device(area, device)
            names = [table[s].channel for s in members]
            model = next((m for m in DEVICE_MODELS if m.matches(names)), None)
            if model is None:
                continue
            used = set(model.channels_of(names))
            series = {s: table[s].channel for s in members if table[s].channel in used}
            self._is_process[list(series)] = True
            process_devices.append(
                _ProcessDevice(area, device, model, series, _ideal_cycle(site, device))
            )
        self.process_devices = process_devices
        self._process = [
            ProcessWindower(process_devices, w, cfg.allowed_lateness_s) for w in cfg.windows_s
        ]
        self.counters: Counter[str] = Counter() if counters is None else counters
        self._unsent: deque[tuple[str, bytes]] = deque()
        self.next_seq: Callable[[], int] | None = None
        """The agent's batch_seq allocator: KPI messages carry one, like samples messages."""

    # -- input -------------------------------------------------------------------------------

    def add(self, batch: SampleBatch) -> None:
        """Take one driver batch (vectorised; any devices, any order)."""
        if not len(batch):
            return
        self._add_link(batch)
        if self._process:
            self._add_process(batch)

    def _add_link(self, batch: SampleBatch) -> None:
        has_seq = batch.seq != NO_SEQ
        timed = has_seq | (batch.ts_source != NO_TIMESTAMP)
        if not timed.any():
            return
        rows = np.flatnonzero(timed)
        dev = self._device_of_series[batch.series[rows]]
        seq = batch.seq[rows]
        send = batch.ts_source[rows]
        recv = batch.ts_receive[rows]
        # One message = one reception: (device, seq, receive time), or without a seq
        # (device, source time, receive time). The source time breaks ties only without a seq.
        tie = np.where(seq != NO_SEQ, 0, send)
        order = np.lexsort((tie, recv, seq, dev))
        keys = np.stack((dev[order], seq[order], recv[order], tie[order]))
        starts = np.flatnonzero(np.concatenate(([True], (np.diff(keys, axis=1) != 0).any(axis=0))))
        sizes = np.diff(np.append(starts, order.size)) * VALUE_BYTES
        first = order[starts]
        for link in self._links:
            for windower in link.windowers:
                windower.add(dev[first], seq[first], send[first], recv[first], sizes)

    def _add_process(self, batch: SampleBatch) -> None:
        use = self._is_process[batch.series] & (batch.quality != BAD) & np.isfinite(batch.value)
        if not use.any():
            return
        rows = np.flatnonzero(use)
        t = np.where(
            batch.ts_source[rows] != NO_TIMESTAMP, batch.ts_source[rows], batch.ts_receive[rows]
        )
        for windower in self._process:
            windower.add(batch.series[rows], t, batch.value[rows])

    # -- output ------------------------------------------------------------------------------

    def advance(self, now: int) -> list[tuple[str, bytes]]:
        """(topic, payload) of every window closed by ``now`` (ns since the epoch)."""
        out: list[tuple[str, bytes]] = []
        for link in self._links:
            closed = [w.advance(now) for w in link.windowers]
            out += self._link_messages(link, closed)
        for proc in self._process:
            out += self._process_messages(proc.advance(now))
        return out

    def flush(self, now: int | None = None) -> list[tuple[str, bytes]]:
        """(topic, payload) of every window still holding data (at shutdown).

        ``now``: when the input stopped; link availability is not counted past it.
        """
        out: list[tuple[str, bytes]] = []
        for link in self._links:
            out += self._link_messages(link, [w.flush(now) for w in link.windowers])
        for proc in self._process:
            out += self._process_messages(proc.flush())
        return out

    def late_samples(self) -> int:
        """Rows that arrived after their window had closed (dropped from the KPIs)."""
        link = sum(link.windowers[0].late_samples for link in self._links)
        return link + sum(p.late_samples for p in self._process)

    def _link_messages(
        self, link: _LinkWindowers, closed: list[list[Any]]
    ) -> list[tuple[str, bytes]]:
        primary = closed[0]
        others = [{(c.series, c.window_start_ns): c.kpis for c in more} for more in closed[1:]]
        out = []
        for c in primary:
            kpis: LinkWindow = c.kpis
            values = _as_kpis(kpis, skip=frozenset({"latency_histogram"}))
            hist = kpis.latency_histogram.to_dict()
            per_deadline = [kpis, *(o[(c.series, c.window_start_ns)] for o in others)]
            if link.deadlines:
                hist["deadlines"] = list(link.deadlines)
                hist["deadline_counts"] = [
                    int(k.latency_histogram.deadline_counts[0]) for k in per_deadline
                ]
            for d, k in zip(link.deadlines, per_deadline, strict=True):
                label = deadline_label(d)
                values[f"n_timely_{label}"] = float(k.n_timely)
                values[f"deadline_reliability_{label}"] = _clean(k.deadline_reliability)
                values[f"availability_{label}"] = _clean(k.availability)
            out.append(
                self._message(
                    int(c.series),
                    window_start_ns=c.window_start_ns,
                    window_s=link.window_s,
                    kind="link",
                    kpis=values,
                    histogram=hist,
                )
            )
        self.counters["kpi_windows.link"] += len(out)
        return out

    def _process_messages(self, closed: list[ProcessWindow]) -> list[tuple[str, bytes]]:
        out = []
        for c in closed:
            device = self.process_devices[c.device]
            dev = self._device_index[(device.area, device.device)]
            out.append(
                self._message(
                    dev,
                    window_start_ns=c.window_start_ns,
                    window_s=c.window_s,
                    kind=device.model.kind,
                    kpis=c.kpis,
                )
            )
            self.counters[f"kpi_windows.{device.model.kind}"] += 1
        return out

    def _message(
        self,
        dev: int,
        *,
        window_start_ns: int,
        window_s: float,
        kind: Kind,
        kpis: KpiValues,
        histogram: dict[str, Any] | None = None,
    ) -> tuple[str, bytes]:
        area, device = self.devices[dev]
        doc: dict[str, Any] = {
            "schema": KPI_SCHEMA,
            "site": self.site,
            "area": area,
            "device": device,
            "agent": self.agent_id,
            "window_start_ns": window_start_ns,
            "window_s": window_s,
            "kind": kind,
            "kpis": kpis,
        }
        if histogram is not None:
            doc["histogram"] = histogram
        return wire.device_topic(self.site, area, device, "kpi"), orjson.dumps(doc)

    # -- agent task --------------------------------------------------------------------------

    async def run(self, outbox: MemoryOutbox, interval_s: float = 1.0) -> None:
        """Close windows every ``interval_s`` and put their messages into the outbox."""
        while True:
            await asyncio.sleep(interval_s)
            self._unsent.extend(self.advance(now_ns()))
            await self._put_unsent(outbox)

    async def drain(self, outbox: MemoryOutbox) -> None:
        """Flush every open window into the outbox (shutdown, before the outbox drains)."""
        self._unsent.extend(self.flush(now_ns()))
        await self._put_unsent(outbox)

    async def _put_unsent(self, outbox: MemoryOutbox) -> None:
        # Popped only once queued: a cancelled run() leaves the rest for drain().
        while self._unsent:
            topic, payload = self._unsent[0]
            seq = self.next_seq() if self.next_seq is not None else 0
            if seq:  # the agent's batch_seq first, so that ingest can confirm it
                payload = b'{"batch_seq":%d,' % seq + payload[1:]
            await outbox.put(OutboxItem(topic, payload, 0, batch_seq=seq))
            self._unsent.popleft()
        self.counters["kpi_late_samples"] = self.late_samples()


# -- ingest: decode, store, merge ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KpiMessage:
    """A decoded ``tpo.kpi/1`` message."""

    site: str
    area: str
    device: str
    agent: str
    window_start_ns: int
    window_s: float
    kind: Kind
    kpis: KpiValues
    histogram: ExpHistogram | None
    batch_seq: int = 0
    """The agent's batch sequence number (0: none; for the delivery confirmation)."""


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float):
        raise DecodeError(f"{what} is {type(value).__name__}, not a number")
    return _clean(value)


def decode_kpi(payload: bytes) -> KpiMessage:
    """Decode and check a ``tpo.kpi/1`` message; raises DecodeError with the reason."""
    if len(payload) > wire.MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(payload)} bytes exceeds {wire.MAX_MESSAGE_BYTES}")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != KPI_SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise DecodeError(f"schema is {got!r}, want {KPI_SCHEMA!r}")
    try:
        site, area, device = str(doc["site"]), str(doc["area"]), str(doc["device"])
        agent, kind = str(doc["agent"]), str(doc["kind"])
        start, window_s = int(doc["window_start_ns"]), float(doc["window_s"])
        raw = doc["kpis"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodeError(f"header field missing or wrong: {exc!r}") from exc
    if kind not in MEASUREMENTS:
        raise DecodeError(f"kind {kind!r} is not one of {sorted(MEASUREMENTS)}")
    if not (math.isfinite(window_s) and window_s > 0):
        raise DecodeError(f"window_s {window_s} must be a positive number")
    if not isinstance(raw, dict) or not all(isinstance(k, str) and k for k in raw):
        raise DecodeError("'kpis' must be an object of named numbers")
    kpis = {k: _number(v, f"kpis.{k}") for k, v in raw.items()}
    histogram = None
    if doc.get("histogram") is not None:
        try:
            histogram = ExpHistogram.from_dict(doc["histogram"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DecodeError(f"histogram: {exc!r}") from exc
    seq = _batch_seq(doc)
    return KpiMessage(site, area, device, agent, start, window_s, kind, kpis, histogram, seq)  # type: ignore[arg-type]


def _batch_seq(doc: dict[str, Any]) -> int:
    """The optional ``batch_seq`` of a KPI message (0 when absent)."""
    seq = doc.get("batch_seq", 0)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise DecodeError(f"batch_seq {seq!r} must be a non-negative integer")
    return seq


@dataclass(frozen=True, slots=True)
class KpiPoint:
    """One KPI point to store: identity, window, values."""

    kind: Kind
    area: str
    device: str
    window_start_ns: int
    window_s: float
    kpis: KpiValues


def kpi_lines(site: str, points: list[KpiPoint]) -> lp.Encoded:
    """Line protocol of KPI points: every KPI a float field, absent ones left out."""
    parts: list[bytes] = []
    lines = skipped = 0
    for kind, measurement in MEASUREMENTS.items():
        rows = [p for p in points if p.kind == kind]
        if not rows:
            continue
        tag_sets = [
            lp.tag_set(
                {
                    "site": site,
                    "area": p.area,
                    "device": p.device,
                    "window": window_label(p.window_s),
                }
            )
            for p in rows
        ]
        names = sorted({k for p in rows for k in p.kpis})
        columns = {
            name: np.array(
                [np.nan if (v := p.kpis.get(name)) is None else v for p in rows], np.float64
            )
            for name in names
        }
        encoded = lp.encode(
            measurement,
            tag_sets,
            np.arange(len(rows)),
            np.array([p.window_start_ns for p in rows], np.int64),
            float_fields=columns,
        )
        parts.append(encoded.data)
        lines += encoded.lines
        skipped += encoded.skipped
    return lp.Encoded(b"".join(parts), lines, skipped)


@dataclass(slots=True)
class _Contribution:
    """What one device's link window adds to a merge (replaced, never added, on replay)."""

    histogram: ExpHistogram
    counters: dict[str, float]


@dataclass(slots=True)
class _MergeWindow:
    contributions: dict[tuple[str, str, str], _Contribution] = field(default_factory=dict)
    """(agent, area, device) -> its contribution."""
    dirty: bool = False


_SUMMED: Final = ("n_received", "n_expected", "n_lost", "n_sent", "bytes_received", "duplicates")


class HistogramMerger:
    """Merges link windows per area and campus-wide; exact counters, mergeable histograms.

    A window's merged points are due ``lateness + grace`` after its end, and again whenever a
    late contribution changes it (the point overwrites itself). A replayed message replaces the
    contribution of the same (agent, area, device, window), so it is never counted twice.
    Windows are kept ``retain_s`` after their end; contributions to older windows are refused
    and counted (merging them alone would overwrite a complete point with a partial one).
    """

    def __init__(self, lateness_s: float, grace_s: float = 5.0, retain_s: float = 3600.0) -> None:
        """Merge with the site's allowed lateness plus ``grace_s`` of transport slack."""
        self._due_after_ns = round((lateness_s + grace_s) * NS_PER_S)
        self._retain_ns = round(retain_s * NS_PER_S)
        self._windows: dict[tuple[int, float], _MergeWindow] = {}
        self._forgotten_before = -(2**63)
        self.counters: Counter[str] = Counter()

    def add(self, msg: KpiMessage) -> None:
        """Take (or replace) the contribution of one device's link window."""
        if msg.kind != "link" or msg.histogram is None:
            return
        end = msg.window_start_ns + round(msg.window_s * NS_PER_S)
        if end <= self._forgotten_before:
            self.counters["kpi_merge_too_late"] += 1
            return
        window = self._windows.setdefault((msg.window_start_ns, msg.window_s), _MergeWindow())
        counters = {k: v for k, v in msg.kpis.items() if v is not None and _counter_key(k)}
        key = (msg.agent, msg.area, msg.device)
        if key in window.contributions:
            self.counters["kpi_merge_replaced"] += 1
        window.contributions[key] = _Contribution(msg.histogram, counters)
        window.dirty = True

    def due(self, now: int) -> list[KpiPoint]:
        """Merged points of windows complete by ``now`` that changed since they were written."""
        out: list[KpiPoint] = []
        for (start, length), window in list(self._windows.items()):
            end = start + round(length * NS_PER_S)
            if window.dirty and now >= end + self._due_after_ns:
                out += self._merge(start, length, window)
            if now >= end + self._retain_ns:
                del self._windows[(start, length)]
                self._forgotten_before = max(self._forgotten_before, end)
        return out

    def flush(self) -> list[KpiPoint]:
        """Merged points of every changed window, complete or not (shutdown)."""
        out: list[KpiPoint] = []
        for (start, length), window in self._windows.items():
            if window.dirty:
                out += self._merge(start, length, window)
        return out

    def _merge(self, start: int, length: float, window: _MergeWindow) -> list[KpiPoint]:
        window.dirty = False
        areas = sorted({area for _, area, _ in window.contributions})
        out = []
        for area in areas:
            parts = [c for (_, a, _), c in window.contributions.items() if a == area]
            merged = merge_link_kpis(parts, length, self.counters)
            if merged is not None:
                out.append(KpiPoint("link", area, AREA_DEVICE, start, length, merged))
        merged = merge_link_kpis(list(window.contributions.values()), length, self.counters)
        if merged is not None:
            out.append(KpiPoint("link", CAMPUS, CAMPUS, start, length, merged))
        return out


def _counter_key(name: str) -> bool:
    return name in _SUMMED or name.startswith("n_timely_")


def merge_link_kpis(
    parts: list[_Contribution], window_s: float, counters: Counter[str] | None = None
) -> KpiValues | None:
    """Link KPIs of several devices' windows: summed counters and the merged histogram."""
    if not parts:
        return None
    histogram = parts[0].histogram.copy()
    for part in parts[1:]:
        try:
            histogram.merge(part.histogram)
        except ValueError:  # deadlines differ between agents: leave that one out
            if counters is not None:
                counters["kpi_merge_deadline_mismatch"] += 1
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part.counters)
    n = histogram.n
    out: KpiValues = {name: float(total[name]) for name in _SUMMED}
    out["devices"] = float(len(parts))
    out["loss_ratio"] = total["n_lost"] / total["n_expected"] if total["n_expected"] else None
    out["throughput_bps"] = 8.0 * total["bytes_received"] / window_s
    out["message_rate"] = total["n_received"] / window_s
    out["n_latency"] = float(n)
    out["latency_min_ms"] = histogram.min if n else None
    out["latency_max_ms"] = histogram.max if n else None
    out["latency_mean_ms"] = _clean(histogram.mean()) if n else None
    for p in PERCENTILES:
        value = histogram.quantile(p.q) if n >= p.min_samples else None
        out[f"latency_{p.label}_ms"] = value
    for name in sorted(k for k in total if k.startswith("n_timely_")):
        label = name.removeprefix("n_timely_")
        out[name] = float(total[name])
        sent = total["n_sent"]
        out[f"deadline_reliability_{label}"] = total[name] / sent if sent else None
    return out


class KpiIngest:
    """Ingest's side of the KPIs: store each message, merge link histograms, emit merges."""

    def __init__(self, site: SiteConfig, *, grace_s: float = 5.0) -> None:
        """Merge with the site's allowed lateness plus ``grace_s``."""
        self.site = site.site
        self.merger = HistogramMerger(site.kpi.allowed_lateness_s, grace_s)

    def topic(self) -> str:
        """The KPI subscription: not shared, so that every worker merges every window."""
        return f"{wire.PREFIX}/{self.site}/+/+/kpi"

    def encode(self, topic: str, payload: bytes) -> lp.Encoded:
        """Line protocol of one KPI message (raises DecodeError); feeds the merger."""
        msg = decode_kpi(payload)
        parts = topic.split("/")
        if len(parts) != 6 or (parts[2], parts[3], parts[4]) != (msg.site, msg.area, msg.device):
            names = f"{msg.site}/{msg.area}/{msg.device}"
            raise DecodeError(f"topic does not match the payload's {names}")
        if msg.area == CAMPUS or msg.device in {AREA_DEVICE, CAMPUS}:
            raise DecodeError(f"area/device names {CAMPUS!r} and {AREA_DEVICE!r} are reserved")
        self.merger.add(msg)
        point = KpiPoint(
            msg.kind, msg.area, msg.device, msg.window_start_ns, msg.window_s, msg.kpis
        )
        return kpi_lines(self.site, [point])

    def due(self, now: int, *, final: bool = False) -> lp.Encoded:
        """Line protocol of the merged windows complete by ``now`` (all of them if final)."""
        points = self.merger.flush() if final else self.merger.due(now)
        return kpi_lines(self.site, points)
