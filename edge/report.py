"""``tpo-edge report``: one self-contained HTML file showing the KPIs of a site or a demo run.

Reads InfluxDB (InfluxQL through :class:`edge.influx.InfluxV1Writer` or ``InfluxV2Writer``)
or the local SQLite store (:class:`edge.store.SqliteStore`) and draws:

* the latency CDF per device with the deadlines marked, from the raw ``signal`` points of
  sources that stamp their samples (OPC UA machines, MQTT field devices):
  lag = ``received_ns`` - point time, one value per message (rows sharing both stamps are one
  message). Sources without a source timestamp store lag 0 and are left out;
* link KPIs per window over time (``link_kpi``: latency p50/p99, loss, deadline reliability,
  availability) and a per-device summary from the exact counters;
* OEE per machine (``machine_kpi``), charger and bench summaries (``charger_kpi``,
  ``bench_kpi``), and a stage-count table when given a demo summary.

Plots are small hand-made inline SVG (polylines on nice-tick axes), not matplotlib: a CDF and
line charts need ~200 lines, add no dependency (matplotlib brings ~40 MB with numpy-built
wheels, fonts and Pillow) and keep the file small and crisp at any zoom. The page references
nothing outside itself: no scripts, no stylesheets, no fonts, no URLs.
"""

from __future__ import annotations

import asyncio
import html
import logging
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path  # noqa: TC003 - typer and callers pass Path at run time
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from edge.config import env_secret
from edge.errors import ConfigError, EdgeError
from edge.kpi import AREA_DEVICE, CAMPUS, MEASUREMENTS

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from edge.config import DatabaseConfig, SiteConfig
    from edge.store import SqliteStore

log = logging.getLogger(__name__)

NS_PER_S: Final = 1_000_000_000
LAG_ROWS_PER_SERIES: Final = 20_000
"""Newest ``signal`` rows read per series for the latency CDF (bounds a long ``--since``)."""
CDF_POINTS: Final = 400
"""Vertices of one CDF polyline (quantiles of the sorted lags)."""
DEFAULT_REPORT: Final = "tpo-demo-report.html"
"""File the demo writes its report to, in the current directory."""
PALETTE: Final = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
NONE: Final = "\u2013"
"""Shown for a KPI without a value (an en dash)."""
CAMPUS_COLOUR: Final = "#111111"
DEADLINE_COLOUR: Final = "#c0392b"

FloatArray = npt.NDArray[np.float64]


# -- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Point:
    """One stored point: time (ns), tags, fields (absent fields left out)."""

    ts: int
    tags: dict[str, str]
    fields: dict[str, Any]


class ReportSource(Protocol):
    """Where the report reads points from."""

    label: str

    async def points(
        self,
        measurement: str,
        since_ns: int | None,
        fields: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[Point]:
        """Points of ``measurement`` at or after ``since_ns``; ``limit`` newest per series."""

    async def close(self) -> None:
        """Release connections."""


class _Queryable(Protocol):
    async def query(self, q: str) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


def _ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class InfluxSource:
    """Points through InfluxQL (``GROUP BY *`` keeps the tags)."""

    def __init__(self, client: _Queryable, label: str) -> None:
        """Read through ``client`` (an InfluxDB writer with ``query``)."""
        self.client = client
        self.label = label

    async def points(
        self,
        measurement: str,
        since_ns: int | None,
        fields: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[Point]:
        """Points of ``measurement`` at or after ``since_ns``; ``limit`` newest per series."""
        columns = ", ".join(_ident(f) for f in fields) if fields else "*"
        q = f"SELECT {columns} FROM {_ident(measurement)}"  # noqa: S608 - identifiers quoted
        if since_ns is not None:
            q += f" WHERE time >= {int(since_ns)}"
        q += " GROUP BY *"
        if limit is not None:
            q += f" ORDER BY time DESC LIMIT {int(limit)}"
        out: list[Point] = []
        for series in await self.client.query(q):
            tags = {str(k): str(v) for k, v in (series.get("tags") or {}).items()}
            names: list[str] = series["columns"]
            for row in series.get("values", []):
                values = {n: v for n, v in zip(names[1:], row[1:], strict=True) if v is not None}
                out.append(Point(int(row[0]), tags, values))
        out.sort(key=lambda p: p.ts)
        return out

    async def close(self) -> None:
        """Close the HTTP session."""
        await self.client.close()


class SqliteSource:
    """Points of the local SQLite store, one query per stored series."""

    def __init__(self, store: SqliteStore) -> None:
        """Read ``store`` (closed by :meth:`close`)."""
        self.store = store
        self.label = f"SQLite store {store.path}"

    async def points(
        self,
        measurement: str,
        since_ns: int | None,
        fields: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[Point]:
        """Points of ``measurement`` at or after ``since_ns``; ``limit`` newest per series."""
        out: list[Point] = []
        for tags in await self.store.series(measurement):
            rows = await self.store.query_series(measurement, tags)
            if since_ns is not None:
                rows = [r for r in rows if r[0] >= since_ns]
            if limit is not None:
                rows = rows[-limit:]
            for ts, values in rows:
                kept = values if fields is None else {k: values[k] for k in fields if k in values}
                out.append(Point(ts, tags, kept))
        out.sort(key=lambda p: p.ts)
        return out

    async def close(self) -> None:
        """Close the database."""
        await self.store.close()


def influx_source(
    url: str,
    database: str,
    *,
    username: str | None = None,
    password: str | None = None,
) -> InfluxSource:
    """A source reading InfluxDB's v1 ``/query`` (few retries: a report should fail fast)."""
    from edge.influx import InfluxV1Writer  # noqa: PLC0415

    writer = InfluxV1Writer(
        url,
        database,
        username=username,
        password=password,
        max_retries=1,
        backoff_max_s=1.0,
    )
    return InfluxSource(writer, f"InfluxDB {url.rstrip('/')} db={database}")


def sqlite_source(path: Path) -> SqliteSource:
    """A source reading the SQLite store at ``path`` (ConfigError when it does not exist)."""
    from edge.store import SqliteStore  # noqa: PLC0415

    if not path.is_file():
        raise ConfigError(str(path), [("--sqlite", None, "no such file")])
    return SqliteSource(SqliteStore(path))


def site_source(db: DatabaseConfig) -> ReportSource:
    """A source reading the database a site file configures."""
    if db.kind == "sqlite":
        return sqlite_source(db.path)
    if db.kind == "influxdb_v2":
        from edge.influx import InfluxV2Writer  # noqa: PLC0415

        writer = InfluxV2Writer(
            url=db.url,
            org=db.org or "",
            bucket=db.bucket or "",
            token=env_secret(db.token_env, "database.token_env") or "",
        )
        return InfluxSource(writer, f"InfluxDB {db.url} bucket={db.bucket}")
    return influx_source(
        db.url,
        db.database,
        username=db.username,
        password=env_secret(db.password_env, "database.password_env"),
    )


_SINCE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str) -> float | None:
    """Seconds of a look-back such as ``90s``, ``30m``, ``1h``, ``7d``; ``all`` or ``0``: None."""
    text = text.strip().lower()
    if text in {"all", "0", ""}:
        return None
    m = _SINCE.fullmatch(text)
    if m is None:
        raise ConfigError("--since", [("--since", None, f"{text!r}: use e.g. 90s, 30m, 1h, 7d")])
    return float(m.group(1)) * _UNIT_S[m.group(2)]


# -- the data behind the report --------------------------------------------------------------


DeviceKey = tuple[str, str]
"""(area, device)."""


@dataclass(slots=True)
class ReportData:
    """Everything the report shows, read once."""

    source: str
    since_ns: int | None
    generated_ns: int
    deadlines_ms: tuple[float, ...]
    kpi: dict[str, list[Point]]
    """Kind (link, machine, charger, bench) -> points of the report's window length."""
    window: str | None
    """Window tag shown (the shortest stored), e.g. ``10s``."""
    lags_ms: dict[DeviceKey, FloatArray]
    """One-way latency per message, ms, sorted, of every device with source timestamps."""
    summary: Mapping[str, Any] | None = None
    site: str | None = None
    title: str | None = None
    notes: list[str] = field(default_factory=list)


_DEADLINE_FIELD = re.compile(r"deadline_reliability_(\d+(?:_\d+)?)ms")


def infer_deadlines(points: Iterable[Point]) -> tuple[float, ...]:
    """Deadlines (ms) named by ``deadline_reliability_<D>ms`` fields, ascending."""
    found: set[float] = set()
    for p in points:
        for name in p.fields:
            if (m := _DEADLINE_FIELD.fullmatch(name)) is not None:
                found.add(float(m.group(1).replace("_", ".")))
    return tuple(sorted(found))


def _window_seconds(label: str) -> float:
    try:
        return float(label.removesuffix("s"))
    except ValueError:
        return math.inf


def message_lags_ms(points: Iterable[Point]) -> dict[DeviceKey, FloatArray]:
    """Sorted latency per message (ms) of each device whose samples carry a source time."""
    stamps: dict[DeviceKey, list[tuple[int, int]]] = defaultdict(list)
    for p in points:
        received = p.fields.get("received_ns")
        if received is None:
            continue
        stamps[(p.tags.get("area", ""), p.tags.get("device", ""))].append((p.ts, int(received)))
    out: dict[DeviceKey, FloatArray] = {}
    for key, pairs in stamps.items():
        unique = np.unique(np.array(pairs, dtype=np.int64), axis=0)  # one row per message
        lag = unique[:, 1] - unique[:, 0]
        # Without a source timestamp ingest stores the receive time as the point time: lag 0.
        lag = lag[lag != 0]
        if lag.size:
            out[key] = np.sort(lag.astype(np.float64) / 1e6)
    return out


async def collect(
    source: ReportSource,
    *,
    since_s: float | None = 3600.0,
    deadlines_ms: Sequence[float] | None = None,
    summary: Mapping[str, Any] | None = None,
    site: str | None = None,
    title: str | None = None,
) -> ReportData:
    """Read what the report shows from ``source``."""
    now = time.time_ns()
    since_ns = None if since_s is None else now - round(since_s * NS_PER_S)
    raw = {kind: await source.points(m, since_ns) for kind, m in MEASUREMENTS.items()}
    windows = {p.tags.get("window", "") for pts in raw.values() for p in pts}
    window = min(windows, key=_window_seconds) if windows else None
    kpi = {
        kind: [p for p in pts if p.tags.get("window", "") == window] for kind, pts in raw.items()
    }
    signal = await source.points("signal", since_ns, ["received_ns"], LAG_ROWS_PER_SERIES)
    lags = message_lags_ms(signal)
    deadlines = tuple(deadlines_ms) if deadlines_ms else infer_deadlines(kpi["link"])
    sites = {p.tags["site"] for pts in raw.values() for p in pts if "site" in p.tags}
    data = ReportData(
        source=source.label,
        since_ns=since_ns,
        generated_ns=now,
        deadlines_ms=deadlines,
        kpi=kpi,
        window=window,
        lags_ms=lags,
        summary=summary,
        site=site or (", ".join(sorted(sites)) if sites else None),
        title=title,
    )
    if len(windows) > 1:
        data.notes.append(
            f"KPI windows stored: {', '.join(sorted(windows, key=_window_seconds))};"
            f" showing {window}."
        )
    return data


# -- SVG charts ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a chart; NaN in ``y`` breaks it."""

    label: str
    x: FloatArray
    y: FloatArray
    colour: str
    dashed: bool = False
    width: float = 1.8


@dataclass(frozen=True, slots=True)
class Axis:
    """One axis: ``linear``, ``log`` or ``time`` (x in ns since the epoch, shown UTC)."""

    label: str
    kind: str = "linear"
    lo: float | None = None
    hi: float | None = None
    percent: bool = False


@dataclass(frozen=True, slots=True)
class Marker:
    """A vertical line at ``x`` with a label (a deadline)."""

    x: float
    label: str
    colour: str = DEADLINE_COLOUR


WIDTH: Final = 600
HEIGHT: Final = 270
_LEFT, _RIGHT, _TOP, _BOTTOM = 62, 30, 30, 46


def _nice_step(span: float, count: int) -> float:
    raw = span / max(count, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw)


def linear_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    step = _nice_step(hi - lo, count)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks per decade inside [lo, hi] (every integer mantissa when that is too few)."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1.0,), (1.0, 2.0, 5.0), tuple(float(m) for m in range(1, 10))):
        ticks = [m * 10.0**d for d in decades for m in mantissas]
        ticks = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
        if len(ticks) >= 4:
            return ticks
    return ticks


_TIME_STEPS_S: Final = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800)
_TIME_STEPS_S2: Final = (21600, 43200, 86400, 172800, 604800)


def time_ticks(lo_ns: float, hi_ns: float, count: int = 6) -> list[float]:
    """Tick times (ns) on round wall-clock seconds, minutes or hours."""
    span_s = (hi_ns - lo_ns) / NS_PER_S
    step = next((s for s in (*_TIME_STEPS_S, *_TIME_STEPS_S2) if span_s / s <= count), 604800)
    step_ns = step * NS_PER_S
    first = math.ceil(lo_ns / step_ns)
    return [float(k * step_ns) for k in range(first, math.floor(hi_ns / step_ns) + 1)]


def format_number(value: float) -> str:
    """Short label of a tick value."""
    if value == 0:
        return "0"
    if abs(value) >= 10_000:
        return f"{value:,.0f}"
    return f"{value:.6g}"


def _time_label(ns: float, span_ns: float) -> str:
    dt = datetime.fromtimestamp(ns / NS_PER_S, UTC)
    if span_ns > 2 * 86400 * NS_PER_S:
        return dt.strftime("%m-%d %H:%M")
    return dt.strftime("%H:%M:%S" if span_ns < 600 * NS_PER_S else "%H:%M")


@dataclass(frozen=True, slots=True)
class _Scale:
    kind: str
    lo: float
    hi: float
    a: float
    b: float  # pixel = a + (value - lo) / (hi - lo) * (b - a), in log space for log

    def __call__(self, value: FloatArray) -> FloatArray:
        lo, hi = self.lo, self.hi
        v = value
        if self.kind == "log":
            lo, hi, v = math.log10(lo), math.log10(hi), np.log10(np.maximum(value, 1e-300))
        return np.asarray(self.a + (v - lo) / (hi - lo) * (self.b - self.a), np.float64)


def _range(axis: Axis, values: FloatArray, extra: Sequence[float] = ()) -> tuple[float, float]:
    data = np.concatenate([values[np.isfinite(values)], np.asarray(extra, np.float64)])
    if axis.kind == "log":
        data = data[data > 0]
    lo = axis.lo if axis.lo is not None else (float(data.min()) if data.size else 0.0)
    hi = axis.hi if axis.hi is not None else (float(data.max()) if data.size else 1.0)
    if axis.kind == "log":
        lo = lo if lo > 0 else 1e-3
        hi = max(hi, lo * 1.01)
        return 10 ** (math.floor(math.log10(lo) * 10) / 10), 10 ** (
            math.ceil(math.log10(hi) * 10) / 10
        )
    if axis.kind == "linear" and axis.lo is None and lo > 0:
        lo = 0.0  # magnitudes read best from zero
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = (lo - pad, hi + pad) if axis.kind == "time" or lo != 0 else (0.0, pad)
    if axis.kind == "linear" and axis.hi is None:
        hi = max(linear_ticks(lo, hi)[-1], hi)
    return lo, hi


def _ticks(axis: Axis, lo: float, hi: float) -> list[tuple[float, str]]:
    if axis.kind == "log":
        return [(t, format_number(t)) for t in log_ticks(lo, hi)]
    if axis.kind == "time":
        return [(t, _time_label(t, hi - lo)) for t in time_ticks(lo, hi)]
    if axis.percent:
        return [(t, f"{format_number(t * 100)} %") for t in linear_ticks(lo, hi)]
    return [(t, format_number(t)) for t in linear_ticks(lo, hi)]


def _segments(x: FloatArray, y: FloatArray) -> list[tuple[FloatArray, FloatArray]]:
    ok = np.isfinite(x) & np.isfinite(y)
    out: list[tuple[FloatArray, FloatArray]] = []
    edges = np.flatnonzero(np.diff(np.concatenate(([0], ok.astype(np.int8), [0]))))
    for start, stop in zip(edges[::2], edges[1::2], strict=True):
        out.append((x[start:stop], y[start:stop]))
    return out


def svg_chart(
    lines: Sequence[Line],
    *,
    title: str,
    x: Axis,
    y: Axis,
    markers: Sequence[Marker] = (),
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """An inline ``<svg>`` line chart: axes with ticks and grid, polylines, marker lines."""
    xs = np.concatenate([ln.x for ln in lines]) if lines else np.zeros(0)
    ys = np.concatenate([ln.y for ln in lines]) if lines else np.zeros(0)
    if x.kind == "log":
        ys = ys[np.isfinite(xs) & (xs > 0)] if ys.size else ys
    x_lo, x_hi = _range(x, xs, [m.x for m in markers])
    y_lo, y_hi = _range(y, ys)
    px = _Scale(x.kind, x_lo, x_hi, _LEFT, width - _RIGHT)
    py = _Scale(y.kind, y_lo, y_hi, height - _BOTTOM, _TOP)
    e = html.escape
    parts = [
        (
            f'<svg class="chart" width="{width}" height="{height}"'
            f' viewBox="0 0 {width} {height}" role="img" aria-label="{e(title)}">'
        ),
        f'<text class="title" x="{_LEFT}" y="18">{e(title)}</text>',
    ]
    grid: list[str] = []
    for value, label in _ticks(x, x_lo, x_hi):
        gx = float(px(np.array([value]))[0])
        grid.append(
            f'<line class="grid" x1="{gx:.1f}" y1="{_TOP}" x2="{gx:.1f}" y2="{height - _BOTTOM}"/>'
        )
        grid.append(
            f'<text class="tick" x="{gx:.1f}" y="{height - _BOTTOM + 15}"'
            f' text-anchor="middle">{e(label)}</text>'
        )
    for value, label in _ticks(y, y_lo, y_hi):
        gy = float(py(np.array([value]))[0])
        grid.append(
            f'<line class="grid" x1="{_LEFT}" y1="{gy:.1f}" x2="{width - _RIGHT}" y2="{gy:.1f}"/>'
        )
        grid.append(
            f'<text class="tick" x="{_LEFT - 6}" y="{gy + 4:.1f}"'
            f' text-anchor="end">{e(label)}</text>'
        )
    parts += grid
    parts.append(
        f'<rect class="frame" x="{_LEFT}" y="{_TOP}" width="{width - _LEFT - _RIGHT}"'
        f' height="{height - _TOP - _BOTTOM}"/>'
    )
    x_unit = " (UTC)" if x.kind == "time" else ""
    parts.append(
        f'<text class="axis" x="{(width + _LEFT) / 2:.0f}" y="{height - 8}"'
        f' text-anchor="middle">{e(x.label + x_unit)}</text>'
    )
    parts.append(
        f'<text class="axis" transform="translate(14 {(height - _BOTTOM + _TOP) / 2:.0f})'
        f' rotate(-90)" text-anchor="middle">{e(y.label)}</text>'
    )
    for m in markers:
        mx = float(px(np.array([m.x]))[0])
        parts.append(
            f'<line class="marker" x1="{mx:.1f}" y1="{_TOP}" x2="{mx:.1f}"'
            f' y2="{height - _BOTTOM}" stroke="{m.colour}"/>'
            f'<text class="marker-label" x="{mx + 4:.1f}" y="{_TOP + 12}"'
            f' fill="{m.colour}">{e(m.label)}</text>'
        )
    parts.append(
        f'<clipPath id="c{id(lines)}"><rect x="{_LEFT}" y="{_TOP}"'
        f' width="{width - _LEFT - _RIGHT}" height="{height - _TOP - _BOTTOM}"/></clipPath>'
        f'<g clip-path="url(#c{id(lines)})">'
    )
    for ln in lines:
        for sx, sy in _segments(ln.x, ln.y):
            vx, vy = px(sx), py(sy)
            dash = ' stroke-dasharray="6 3"' if ln.dashed else ""
            if sx.size == 1:
                parts.append(
                    f'<circle cx="{vx[0]:.1f}" cy="{vy[0]:.1f}" r="3" fill="{ln.colour}">'
                    f"<title>{e(ln.label)}</title></circle>"
                )
                continue
            pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(vx, vy, strict=True))
            parts.append(
                f'<polyline points="{pts}" fill="none" stroke="{ln.colour}"'
                f' stroke-width="{ln.width}"{dash} data-series="{e(ln.label)}">'
                f"<title>{e(ln.label)}</title></polyline>"
            )
    parts.append("</g></svg>")
    return "".join(parts)


def legend(items: Sequence[tuple[str, str]]) -> str:
    """HTML legend of (label, colour)."""
    spans = "".join(
        f'<span><i style="background:{c}"></i>{html.escape(label)}</span>' for label, c in items
    )
    return f'<div class="legend">{spans}</div>'


# -- the HTML --------------------------------------------------------------------------------


_CSS: Final = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;
margin:0;background:#f5f6f8}
header{background:#0f3b5f;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;opacity:.85}
main{padding:8px 28px 28px;max-width:1260px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;margin:16px 0;padding:12px 18px}
h2{font-size:17px;margin:4px 0 10px;color:#0f3b5f}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:10px 18px}
svg.chart{max-width:100%;height:auto;background:#fff;font:11px system-ui,sans-serif}
svg .title{font-weight:600;font-size:13px;fill:#1d2330}
svg .grid{stroke:#e3e6eb;stroke-width:1}
svg .frame{fill:none;stroke:#9aa3ae;stroke-width:1}
svg .tick{fill:#5b6573}
svg .axis{fill:#333;font-size:12px}
svg .marker{stroke-width:1.5;stroke-dasharray:5 4}
svg .marker-label{font-size:11px;font-weight:600}
.legend{margin:2px 0 8px 62px;font-size:12px;color:#333}
.legend span{display:inline-block;margin-right:14px;white-space:nowrap}
.legend i{display:inline-block;width:14px;height:4px;margin-right:5px;vertical-align:middle}
table{border-collapse:collapse;margin:6px 0 4px;font-size:13px}
th,td{padding:3px 10px;border-bottom:1px solid #e6e9ee;text-align:right}
th{background:#f0f3f7;font-weight:600}
td.l,th.l{text-align:left}
.empty,.note{color:#6b7482;font-style:italic}
.bad{color:#b3261e;font-weight:600}
footer{color:#6b7482;font-size:12px;padding:0 28px 20px}
"""


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return NONE
    if abs(value) >= 1e5 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _pct(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return NONE
    return f"{value * 100:.2f} %"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> str:
    e = html.escape
    cells = "".join(
        f'<th class="l">{e(h)}</th>' if i < left else f"<th>{e(h)}</th>" for i, h in enumerate(head)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="l">{e(c)}</td>' if i < left else f"<td>{e(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _empty(what: str) -> str:
    return f'<p class="empty">No {html.escape(what)} in the range.</p>'


def _label(key: DeviceKey, keys: Iterable[DeviceKey]) -> str:
    area, device = key
    clash = sum(1 for _, d in keys if d == device) > 1
    return f"{area}/{device}" if clash else device


def device_colours(data: ReportData) -> dict[DeviceKey, str]:
    """One colour per device, the same in every chart of the report."""
    keys = {*data.lags_ms, *(k for pts in data.kpi.values() for k in _by_device(pts))}
    keys -= {(CAMPUS, CAMPUS)}
    keys = {k for k in keys if k[1] != AREA_DEVICE}
    return {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(sorted(keys))}


def _by_device(points: Iterable[Point]) -> dict[DeviceKey, list[Point]]:
    out: dict[DeviceKey, list[Point]] = defaultdict(list)
    for p in points:
        out[(p.tags.get("area", ""), p.tags.get("device", ""))].append(p)
    return dict(sorted(out.items()))


def _series(points: Sequence[Point], name: str) -> tuple[FloatArray, FloatArray]:
    t = np.array([p.ts for p in points], np.float64)
    v = np.array([_num(p.fields.get(name)) for p in points], np.float64)
    return t, v


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _sum(points: Iterable[Point], name: str) -> float | None:
    values = [float(p.fields[name]) for p in points if isinstance(p.fields.get(name), int | float)]
    return sum(values) if values else None


def _mean(points: Iterable[Point], name: str) -> float | None:
    total = _sum(points, name)
    n = sum(1 for p in points if isinstance(p.fields.get(name), int | float))
    return None if total is None or n == 0 else total / n


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def _quantile(values: FloatArray, q: float) -> float:
    return float(np.quantile(values, q, method="inverted_cdf"))


def _write_file(out: Path, document: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")


def _deadline_label(d: float) -> str:
    return f"{d:g}ms".replace(".", "_")


def _stages(summary: Mapping[str, Any]) -> str:
    stages: tuple[str, ...] = (
        "simulated",
        "read",
        "published",
        "stored",
        "lost",
        "dropped_by_link",
    )
    stages += ("dead_letters", "ingest_rejected")
    rows = [(s.replace("_", " "), f"{int(summary[s]):,}") for s in stages if s in summary]
    body = _table(("stage", "samples"), rows)
    lost = summary.get("lost")
    if isinstance(lost, int | float) and lost:
        body += f'<p class="bad">{int(lost):,} simulated samples did not reach storage.</p>'
    extra = [f"{k}: {summary[k]}" for k in ("duration_s", "broker", "database") if k in summary]
    if extra:
        body += f'<p class="note">{html.escape(", ".join(extra))}</p>'
    per_device = summary.get("per_device")
    if isinstance(per_device, dict) and per_device:
        body += _table(("device", "samples stored"), [(k, f"{v:,}") for k, v in per_device.items()])
    return _section("stages", "Stage counts of the run", body)


def _latency(data: ReportData, colours: Mapping[DeviceKey, str]) -> str:
    if not data.lags_ms:
        return _section(
            "latency",
            "Latency distribution",
            _empty("samples with a source timestamp (OPC UA, MQTT field devices)"),
        )
    keys = sorted(data.lags_ms)
    lines = []
    for key in keys:
        lags = data.lags_ms[key]
        lines.append(_cdf_line(_label(key, keys), lags, colours[key]))
    everything = np.sort(np.concatenate(list(data.lags_ms.values())))
    if len(keys) > 1:
        lines.append(_cdf_line("all devices", everything, CAMPUS_COLOUR, dashed=True))
    positive = everything[everything > 0]
    log_x = positive.size > 0 and positive.size == everything.size
    log_x = log_x and float(positive[-1]) / float(positive[0]) > 8
    markers = [Marker(d, f"D = {d:g} ms") for d in data.deadlines_ms]
    chart = svg_chart(
        lines,
        title="Latency CDF per device (source timestamp to ingest)",
        x=Axis("one-way latency, ms", "log" if log_x else "linear"),
        y=Axis("fraction of messages ≤ x", lo=0.0, hi=1.0, percent=True),
        markers=markers,
        width=1180,
        height=340,
    )
    items = [(ln.label, ln.colour) for ln in lines]
    if data.deadlines_ms:
        items.append(("deadlines", DEADLINE_COLOUR))
    head = ["device", "area", "messages", "min", "p50", "p90", "p99", "p99.9", "max"]
    head += [f"≤ {d:g} ms" for d in data.deadlines_ms]
    named = [(_label(key, keys), key[0], data.lags_ms[key]) for key in keys]
    if len(keys) > 1:
        named.append(("all devices", "", everything))
    rows = []
    for label, area, lags in named:
        row = [label, area, f"{lags.size:,}", _fmt(float(lags[0]))]
        row += [_fmt(_quantile(lags, q)) for q in (0.5, 0.9, 0.99, 0.999)]
        row += [_fmt(float(lags[-1]))]
        row += [_pct(float(np.count_nonzero(lags <= d)) / lags.size) for d in data.deadlines_ms]
        rows.append(row)
    note = (
        '<p class="note">One value per message: receive time at the agent minus the'
        " source timestamp, from the stored samples (latencies in ms; percentiles are order"
        f" statistics; at most the newest {LAG_ROWS_PER_SERIES:,} samples per channel).</p>"
    )
    body = chart + legend(items) + _table(head, rows, left=2) + note
    return _section("latency", "Latency distribution", body)


def _cdf_line(label: str, lags: FloatArray, colour: str, *, dashed: bool = False) -> Line:
    n = lags.size
    if n > CDF_POINTS:
        idx = np.unique(np.linspace(0, n - 1, CDF_POINTS).round().astype(np.int64))
    else:
        idx = np.arange(n)
    # a step CDF drawn through its upper corners: F(x_(i)) = (i + 1) / n
    x = np.repeat(lags[idx], 2)
    frac = (idx + 1) / n
    y = np.column_stack((np.concatenate(([0.0], frac[:-1])), frac)).ravel()
    return Line(label, x, y, colour, dashed=dashed, width=2.2 if dashed else 1.8)


_LINK_CHARTS: Final = (
    ("latency_p50_ms", "Latency p50 per window", Axis("latency, ms")),
    ("latency_p99_ms", "Latency p99 per window", Axis("latency, ms")),
    ("loss_ratio", "Loss ratio per window", Axis("lost / expected", percent=True)),
    (
        "deadline_reliability",
        "Deadline reliability per window",
        Axis("", lo=0.0, hi=1.0, percent=True),
    ),
    ("availability", "Availability per window (TS 22.104)", Axis("", lo=0.0, hi=1.0, percent=True)),
    ("message_rate", "Messages per second", Axis("messages/s")),
)


def _link_value(p: Point, name: str, primary: str | None) -> float:
    if name == "loss_ratio" and "loss_ratio" not in p.fields:
        lost, expected = _num(p.fields.get("n_lost")), _num(p.fields.get("n_expected"))
        return lost / expected if expected > 0 else math.nan
    if name in {"deadline_reliability", "availability"} and primary is not None:
        return _num(p.fields.get(f"{name}_{primary}", p.fields.get(name)))
    return _num(p.fields.get(name))


def _link(data: ReportData, colours: Mapping[DeviceKey, str]) -> str:
    points = data.kpi["link"]
    if not points:
        return _section("link", "Link KPIs over time", _empty("link_kpi points"))
    groups = _by_device(points)
    devices = [k for k in groups if k[1] not in {AREA_DEVICE, CAMPUS}]
    primary = _deadline_label(data.deadlines_ms[0]) if data.deadlines_ms else None
    charts = []
    for name, base_title, y_axis in _LINK_CHARTS:
        title = base_title
        lines = []
        for key in [*devices, (CAMPUS, CAMPUS)]:
            pts = groups.get(key)
            if not pts:
                continue
            t = np.array([p.ts for p in pts], np.float64)
            v = np.array([_link_value(p, name, primary) for p in pts], np.float64)
            if not np.isfinite(v).any():
                continue
            campus = key == (CAMPUS, CAMPUS)
            lines.append(
                Line(
                    "campus" if campus else _label(key, devices),
                    t,
                    v,
                    CAMPUS_COLOUR if campus else colours[key],
                    dashed=campus,
                )
            )
        if name in {"deadline_reliability", "availability"} and data.deadlines_ms:
            title += f" (D = {data.deadlines_ms[0]:g} ms)"
        if lines:
            charts.append(svg_chart(lines, title=title, x=Axis("window start", "time"), y=y_axis))
    items = [(_label(k, devices), colours[k]) for k in devices]
    if (CAMPUS, CAMPUS) in groups:
        items.append(("campus (merged histograms)", CAMPUS_COLOUR))
    note = (
        f'<p class="note">Windows of {html.escape(data.window or "?")}; reliability from the'
        " exact counters (timely / sent), availability the mean over windows.</p>"
    )
    body = f'<div class="grid2">{"".join(charts)}</div>' + legend(items)
    body += _link_table(data, groups, devices, primary)
    return _section("link", "Link KPIs over time", body + note)


def _link_table(
    data: ReportData,
    groups: Mapping[DeviceKey, list[Point]],
    devices: Sequence[DeviceKey],
    primary: str | None,
) -> str:
    head = ["device", "area", "windows", "messages", "lost", "loss"]
    head += [f"reliability {d:g} ms" for d in data.deadlines_ms]
    head += ["availability", "failures", "jitter ms"]
    rows = []
    for key in [*devices, (CAMPUS, CAMPUS)]:
        pts = groups.get(key)
        if not pts:
            continue
        sent = _sum(pts, "n_sent")
        row = [
            "campus" if key == (CAMPUS, CAMPUS) else _label(key, devices),
            "" if key == (CAMPUS, CAMPUS) else key[0],
            f"{len(pts):,}",
            _fmt(_sum(pts, "n_received")),
            _fmt(_sum(pts, "n_lost")),
            _pct(_ratio(_sum(pts, "n_lost"), _sum(pts, "n_expected"))),
        ]
        row += [
            _pct(_ratio(_sum(pts, f"n_timely_{_deadline_label(d)}"), sent))
            for d in data.deadlines_ms
        ]
        availability = f"availability_{primary}" if primary else "availability"
        row += [
            _pct(_mean(pts, availability)),
            _fmt(_sum(pts, "failures")),
            _fmt(_mean(pts, "interarrival_jitter_ms")),
        ]
        rows.append(row)
    return _table(head, rows, left=2)


def _machines(data: ReportData, colours: Mapping[DeviceKey, str]) -> str:
    points = data.kpi["machine"]
    if not points:
        return _section("machines", "Machines: OEE", _empty("machine_kpi points"))
    groups = _by_device(points)
    keys = list(groups)
    charts = []
    for name, title in (("oee", "OEE per window"), ("availability", "Availability per window")):
        lines = [
            Line(_label(k, keys), *_series(groups[k], name), colours[k])
            for k in keys
            if np.isfinite(_series(groups[k], name)[1]).any()
        ]
        if lines:
            y = Axis(name, percent=True)
            charts.append(svg_chart(lines, title=title, x=Axis("window start", "time"), y=y))
    rows = []
    for key in keys:
        pts = groups[key]
        planned, run = _sum(pts, "planned_s"), _sum(pts, "run_s")
        total, good = _sum(pts, "total_count"), _sum(pts, "good_count")
        ideal = sum(
            _num(p.fields.get("ideal_cycle_s")) * _num(p.fields.get("total_count"))
            for p in pts
            if "ideal_cycle_s" in p.fields and "total_count" in p.fields
        )
        a, perf, q = _ratio(run, planned), _ratio(ideal, run), _ratio(good, total)
        oee = a * perf * q if a is not None and perf is not None and q is not None else None
        rows.append(
            [
                _label(key, keys),
                key[0],
                f"{len(pts):,}",
                _fmt(planned),
                _fmt(run),
                _fmt(total),
                _fmt(good),
                _pct(a),
                _pct(perf),
                _pct(q),
                _pct(oee),
            ]
        )
    head: tuple[str, ...] = ("machine", "area", "windows", "planned s", "run s", "parts", "good")
    head += ("availability", "performance", "quality", "OEE")
    note = (
        '<p class="note">Whole-range OEE from summed times and counts (not a mean of window'
        " ratios): availability = run / planned, performance = ideal cycle x parts / run,"
        " quality = good / parts.</p>"
    )
    if any(_num(p.fields.get("performance")) > 1.0 for p in points):
        note += (
            '<p class="bad">Performance above 100 %: the ideal cycle time'
            " (<code>kpi.ideal_cycle_s</code>) is longer than the machines' real cycles.</p>"
        )
    body = f'<div class="grid2">{"".join(charts)}</div>'
    body += legend([(_label(k, keys), colours[k]) for k in keys])
    return _section("machines", "Machines: OEE", body + _table(head, rows, left=2) + note)


def _chargers(data: ReportData, colours: Mapping[DeviceKey, str]) -> str:
    points = data.kpi["charger"]
    if not points:
        return _section("chargers", "EV chargers", _empty("charger_kpi points"))
    groups = _by_device(points)
    keys = list(groups)
    lines = [Line(_label(k, keys), *_series(groups[k], "utilisation"), colours[k]) for k in keys]
    chart = svg_chart(
        lines,
        title="Utilisation per window",
        x=Axis("window start", "time"),
        y=Axis("time charging / window", lo=0.0, hi=1.0, percent=True),
    )
    rows = []
    for key in keys:
        pts = groups[key]
        energy = _sum(pts, "energy_wh")
        rows.append(
            [
                _label(key, keys),
                key[0],
                f"{len(pts):,}",
                _fmt(_mean(pts, "connectors")),
                _pct(_mean(pts, "utilisation")),
                _fmt(None if energy is None else energy / 1000),
                _fmt(_sum(pts, "sessions")),
                _pct(_mean(pts, "availability")),
            ]
        )
    head: tuple[str, ...] = (
        "charger",
        "area",
        "windows",
        "connectors",
        "utilisation",
        "energy kWh",
    )
    head += ("sessions", "availability")
    body = f'<div class="grid2">{chart}</div>'
    body += legend([(_label(k, keys), colours[k]) for k in keys])
    return _section("chargers", "EV chargers", body + _table(head, rows, left=2))


def _benches(data: ReportData, colours: Mapping[DeviceKey, str]) -> str:
    points = data.kpi["bench"]
    if not points:
        return _section("benches", "Smart benches", _empty("bench_kpi points"))
    groups = _by_device(points)
    keys = list(groups)
    lines = [Line(_label(k, keys), *_series(groups[k], "soc_mean_pct"), colours[k]) for k in keys]
    chart = svg_chart(
        lines,
        title="Battery state of charge (window mean)",
        x=Axis("window start", "time"),
        y=Axis("SoC, %", lo=0.0, hi=100.0),
    )
    rows = []
    for key in keys:
        pts = groups[key]
        soc_min = [float(p.fields["soc_min_pct"]) for p in pts if "soc_min_pct" in p.fields]
        occ_max = [float(p.fields["occupancy_max"]) for p in pts if "occupancy_max" in p.fields]
        rows.append(
            [
                _label(key, keys),
                key[0],
                f"{len(pts):,}",
                _fmt(_sum(pts, "solar_yield_wh")),
                _fmt(min(soc_min) if soc_min else None),
                _fmt(_mean(pts, "soc_mean_pct")),
                _fmt(_sum(pts, "protection_s")),
                _fmt(_sum(pts, "charging_sessions")),
                _fmt(_mean(pts, "occupancy_mean")),
                _fmt(max(occ_max) if occ_max else None),
            ]
        )
    head: tuple[str, ...] = ("bench", "area", "windows", "solar Wh", "SoC min %", "SoC mean %")
    head += ("protection s", "sessions", "occupancy mean", "occupancy max")
    body = f'<div class="grid2">{chart}</div>'
    body += legend([(_label(k, keys), colours[k]) for k in keys])
    return _section("benches", "Smart benches", body + _table(head, rows, left=2))


def _stamp(ns: int) -> str:
    return datetime.fromtimestamp(ns / NS_PER_S, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render(data: ReportData) -> str:
    """The report as one HTML document (inline CSS and SVG, no references outside it)."""
    e = html.escape
    title = data.title or f"tpo-edge report{f': site {data.site}' if data.site else ''}"
    times = [p.ts for pts in data.kpi.values() for p in pts]
    span = (
        f"data {_stamp(min(times))} to {_stamp(max(times))}"
        if times
        else "no KPI points in the range"
    )
    since = "all stored data" if data.since_ns is None else f"since {_stamp(data.since_ns)}"
    meta = f"{data.source} · {since} · {span} · generated {_stamp(data.generated_ns)}"
    sections = []
    if data.summary:
        sections.append(_stages(data.summary))
    colours = device_colours(data)
    sections += [
        section(data, colours) for section in (_latency, _link, _machines, _chargers, _benches)
    ]
    notes = "".join(f'<p class="note">{e(n)}</p>' for n in data.notes)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{e(title)}</h1><p>{e(meta)}</p></header><main>{notes}"
        + "".join(sections)
        + "</main><footer>tpo-edge · self-contained report: no scripts, no external"
        " resources.</footer></body></html>\n"
    )


async def write_report(
    source: ReportSource,
    out: Path,
    *,
    since_s: float | None = 3600.0,
    deadlines_ms: Sequence[float] | None = None,
    summary: Mapping[str, Any] | None = None,
    site: str | None = None,
    title: str | None = None,
) -> Path:
    """Read ``source``, render and write the report to ``out``; returns ``out``."""
    data = await collect(
        source,
        since_s=since_s,
        deadlines_ms=deadlines_ms,
        summary=summary,
        site=site,
        title=title,
    )
    document = render(data)
    try:
        await asyncio.to_thread(_write_file, out, document)
    except OSError as exc:
        raise EdgeError(f"report {out}: cannot write: {exc}") from exc
    log.info("report written to %s (%d bytes)", out, len(document))
    return out


async def report_command(
    *,
    site: SiteConfig | None,
    sqlite: Path | None,
    influx_url: str | None,
    database: str,
    since: str,
    out: Path,
    summary_file: Path | None = None,
) -> Path:
    """What ``tpo-edge report`` does: pick the source from the options and write the report."""
    chosen = [
        n
        for n, v in (("-c", site), ("--sqlite", sqlite), ("--influx-url", influx_url))
        if v is not None
    ]
    if len(chosen) != 1:
        raise ConfigError(
            "tpo-edge report",
            [
                (
                    "options",
                    None,
                    "give exactly one of -c SITE.yaml, --sqlite PATH, --influx-url URL",
                )
            ],
        )
    since_s = parse_since(since)
    summary = None
    if summary_file is not None:
        import orjson  # noqa: PLC0415

        try:
            summary = orjson.loads(await asyncio.to_thread(summary_file.read_bytes))
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ConfigError(str(summary_file), [("--summary", None, str(exc))]) from exc
    source: ReportSource
    if site is not None:
        source = site_source(site.database)
    elif sqlite is not None:
        source = sqlite_source(sqlite)
    else:
        assert influx_url is not None
        source = influx_source(influx_url, database)
    try:
        return await write_report(
            source,
            out,
            since_s=since_s,
            deadlines_ms=site.kpi.deadlines_ms if site is not None else None,
            summary=summary,
            site=site.site if site is not None else None,
        )
    finally:
        await source.close()


__all__ = [
    "DEFAULT_REPORT",
    "Axis",
    "InfluxSource",
    "Line",
    "Marker",
    "Point",
    "ReportData",
    "ReportSource",
    "SqliteSource",
    "collect",
    "infer_deadlines",
    "influx_source",
    "message_lags_ms",
    "parse_since",
    "render",
    "report_command",
    "site_source",
    "sqlite_source",
    "svg_chart",
    "write_report",
]
