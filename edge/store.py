"""A local SQLite store that takes line protocol, for the demo when no influxd exists.

It behaves like InfluxDB where the platform relies on it: a point is identified by
measurement + tag set + timestamp, and writing the same point again merges its
fields into the stored ones (a replay overwrites itself). Lines it cannot parse are
reported after the good lines of the batch are stored, like InfluxDB's "partial
write". Every sqlite3 call runs in a worker thread so the event loop never blocks.

Not emulated: field type conflicts (InfluxDB refuses a float into an int field), and
retention or shards.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import orjson

from edge.errors import SinkError, SinkRejectedError
from edge.lineprotocol import tag_set

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

FieldValue = float | int | str | bool

# Token grammar of InfluxDB 1.x/2.x: a backslash escapes only the characters that
# would end the token, otherwise it is literal. Possessive quantifiers (no
# backtracking) make a malformed line fail instead of parsing some other way.
_MEAS = r"(?:\\[, ]|[^, ])++"
_KEY = r"(?:\\[,= ]|[^,= ])++"
_STR = r'"(?:\\.|[^"\\])*+"'
_VALUE = rf"{_STR}|[^, \"]++"
_LINE = re.compile(
    rf"({_MEAS})((?:,{_KEY}={_KEY})*+) ({_KEY}=(?:{_VALUE})(?:,{_KEY}=(?:{_VALUE}))*+)"
    r"(?: (-?\d+))?"
)
_PAIR = re.compile(rf"({_KEY})=({_KEY})")
_FIELD = re.compile(rf"({_KEY})=({_VALUE})")
_UNESCAPE_MEAS = re.compile(r"\\([, ])")
_UNESCAPE_KEY = re.compile(r"\\([,= ])")
_UNESCAPE_STR = re.compile(r'\\(["\\])')
_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_INT = re.compile(r"([-+]?\d+)([iu])")
_BOOLS = {"t": True, "T": True, "true": True, "True": True, "TRUE": True}
_BOOLS |= {"f": False, "F": False, "false": False, "False": False, "FALSE": False}


@dataclass(frozen=True, slots=True)
class ParsedPoint:
    """One line of line protocol, unescaped."""

    measurement: str
    tags: dict[str, str]
    fields: dict[str, FieldValue]
    ts: int | None


def _field_value(text: str) -> FieldValue:
    if text.startswith('"'):
        return _UNESCAPE_STR.sub(r"\1", text[1:-1])
    if (m := _INT.fullmatch(text)) is not None:
        value = int(m.group(1))
        if m.group(2) == "u" and not 0 <= value < 2**64:
            raise ValueError(f"unsigned value {text!r} out of range")
        if m.group(2) == "i" and not -(2**63) <= value < 2**63:
            raise ValueError(f"integer value {text!r} out of range")
        return value
    if text in _BOOLS:
        return _BOOLS[text]
    if _FLOAT.fullmatch(text) is None:
        raise ValueError(f"invalid field value {text!r}")
    return float(text)


def parse_tags(text: str) -> dict[str, str]:
    """Unescaped tags of an escaped tag set ``k1=v1,k2=v2`` (as :func:`tag_set` makes)."""
    return {
        _UNESCAPE_KEY.sub(r"\1", m.group(1)): _UNESCAPE_KEY.sub(r"\1", m.group(2))
        for m in _PAIR.finditer(text)
    }


def parse_line(line: str) -> ParsedPoint:
    """Parse one line of line protocol, or raise ValueError saying why."""
    m = _LINE.fullmatch(line)
    if m is None:
        raise ValueError(f"unable to parse {line!r}")
    meas, tags, fields, ts = m.groups()
    parsed_fields = {
        _UNESCAPE_KEY.sub(r"\1", f.group(1)): _field_value(f.group(2))
        for f in _FIELD.finditer(fields)
    }
    return ParsedPoint(
        measurement=_UNESCAPE_MEAS.sub(r"\1", meas),
        tags=parse_tags(tags[1:]),
        fields=parsed_fields,
        ts=int(ts) if ts is not None else None,
    )


def parse_lines(data: bytes) -> tuple[list[ParsedPoint], list[str]]:
    """Points of all good lines and one error message per bad line (blank and # lines skipped)."""
    points: list[ParsedPoint] = []
    errors: list[str] = []
    for number, raw in enumerate(data.decode("utf-8", errors="replace").split("\n"), 1):
        line = raw.removesuffix("\r")
        if not line.strip() or line.startswith("#"):
            continue
        try:
            points.append(parse_line(line))
        except ValueError as exc:
            errors.append(f"line {number}: {exc}")
    return points, errors


_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    measurement TEXT NOT NULL,
    tags TEXT NOT NULL,
    ts INTEGER NOT NULL,
    fields TEXT NOT NULL,
    PRIMARY KEY (measurement, tags, ts)
) WITHOUT ROWID
"""
_UPSERT = """
INSERT INTO points (measurement, tags, ts, fields) VALUES (?, ?, ?, ?)
ON CONFLICT (measurement, tags, ts) DO UPDATE SET fields = json_patch(fields, excluded.fields)
"""


class SqliteStore:
    """Line protocol into one SQLite table ``points``; a :class:`edge.influx.Sink`."""

    def __init__(self, path: str | Path) -> None:
        """Remember the file; it is opened (and created) on first use."""
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        # asyncio.to_thread may use any pool thread: one lock keeps sqlite calls serial.
        self._lock = threading.Lock()

    async def __aenter__(self) -> Self:
        """Open the database."""
        await asyncio.to_thread(self._connection)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the database."""
        await self.close()

    def _connection(self) -> sqlite3.Connection:
        with self._lock:
            if self._conn is None:
                try:
                    conn = sqlite3.connect(self.path, check_same_thread=False)
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute("PRAGMA synchronous=NORMAL")
                    conn.execute(_SCHEMA)
                except sqlite3.Error as exc:
                    raise SinkError(f"SQLite store {self.path}: cannot open: {exc}") from exc
                self._conn = conn
            return self._conn

    async def write(self, lines: bytes) -> None:
        """Store the points; bad lines raise SinkRejectedError after the good ones are stored."""
        await asyncio.to_thread(self._write, lines)

    def _write(self, lines: bytes) -> None:
        points, errors = parse_lines(lines)
        rows: list[tuple[str, str, int, bytes]] = []
        now = time.time_ns()
        for p in points:
            try:
                tags = tag_set(p.tags)
            except ValueError as exc:
                errors.append(f"{p.measurement}: {exc}")
                continue
            rows.append(
                (p.measurement, tags, now if p.ts is None else p.ts, orjson.dumps(p.fields))
            )
        conn = self._connection()
        with self._lock:
            try:
                with conn:
                    conn.executemany(_UPSERT, [(m, t, ts, f.decode()) for m, t, ts, f in rows])
            except sqlite3.Error as exc:
                raise SinkError(f"SQLite store {self.path}: write failed: {exc}") from exc
        if errors:
            shown = "; ".join(errors[:5])
            raise SinkRejectedError(
                f"SQLite store {self.path}: partial write, {len(errors)} line(s) dropped: {shown}"
            )

    def _matching_tag_sets(self, measurement: str, where: Mapping[str, str] | None) -> list[str]:
        conn = self._connection()
        with self._lock:
            stored = [
                t
                for (t,) in conn.execute(
                    "SELECT DISTINCT tags FROM points WHERE measurement = ?", (measurement,)
                )
            ]
        wanted = dict(where or {})
        return [t for t in stored if wanted.items() <= parse_tags(t).items()]

    def _count(self, measurement: str, where: Mapping[str, str] | None) -> int:
        total = 0
        for tags in self._matching_tag_sets(measurement, where):
            with self._lock:
                assert self._conn is not None
                (n,) = self._conn.execute(
                    "SELECT COUNT(*) FROM points WHERE measurement = ? AND tags = ?",
                    (measurement, tags),
                ).fetchone()
            total += n
        return total

    async def count(self, measurement: str, where: Mapping[str, str] | None = None) -> int:
        """Number of points of ``measurement`` whose tags include all of ``where``."""
        return await asyncio.to_thread(self._count, measurement, where)

    def _query_series(
        self, measurement: str, where: Mapping[str, str] | None
    ) -> list[tuple[int, dict[str, Any]]]:
        out: list[tuple[int, dict[str, Any]]] = []
        for tags in self._matching_tag_sets(measurement, where):
            with self._lock:
                assert self._conn is not None
                rows = self._conn.execute(
                    "SELECT ts, fields FROM points WHERE measurement = ? AND tags = ?",
                    (measurement, tags),
                ).fetchall()
            out.extend((ts, orjson.loads(fields)) for ts, fields in rows)
        out.sort(key=lambda row: row[0])
        return out

    async def query_series(
        self, measurement: str, where: Mapping[str, str] | None = None
    ) -> list[tuple[int, dict[str, Any]]]:
        """``(ts, fields)`` of every matching point (all matching series), sorted by time."""
        return await asyncio.to_thread(self._query_series, measurement, where)

    async def series(self, measurement: str) -> list[dict[str, str]]:
        """The tag sets stored for ``measurement``."""
        tag_sets = await asyncio.to_thread(self._matching_tag_sets, measurement, None)
        return [parse_tags(t) for t in tag_sets]

    def _close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def close(self) -> None:
        """Close the database (a later call opens it again)."""
        await asyncio.to_thread(self._close)
