"""The simulator's ground-truth log: every value served or sent, one JSON line each.

Tests and ``tpo-edge demo`` compare what reached storage against this log, so
it records facts only: which device/channel, the exact value, the source time
(or the time the value was served), the sequence number, and whether the
emulated 5G link dropped the message.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from pathlib import Path


@dataclass(frozen=True, slots=True)
class TruthRecord:
    """One value the simulator served (Modbus read, OPC UA change) or sent (MQTT)."""

    device: str
    channel: str
    value: float | None
    ts_ns: int
    seq: int = -1
    dropped: bool = False
    quality: int = 0


class GroundTruth:
    """Append-only, thread-safe log of :class:`TruthRecord`; optionally mirrored to a file."""

    def __init__(self, path: Path | None = None, *, keep: bool = True) -> None:
        """Log to ``path`` (JSON lines) and/or keep records in memory."""
        self.path = path
        self._keep = keep
        self._lock = threading.Lock()
        self._records: list[TruthRecord] = []
        self._counts: Counter[tuple[str, str]] = Counter()
        self._fh: IO[bytes] | None = path.open("ab") if path else None

    def record(
        self,
        device: str,
        channel: str,
        value: float | None,
        ts_ns: int,
        *,
        seq: int = -1,
        dropped: bool = False,
        quality: int = 0,
    ) -> None:
        """Append one record."""
        rec = TruthRecord(device, channel, value, ts_ns, seq, dropped, quality)
        with self._lock:
            if self._keep:
                self._records.append(rec)
            if not dropped:
                self._counts[(device, channel)] += 1
            if self._fh is not None:
                self._fh.write(orjson.dumps(_as_dict(rec)) + b"\n")

    def records(self, device: str | None = None) -> list[TruthRecord]:
        """A copy of the kept records, optionally of one device."""
        with self._lock:
            return [r for r in self._records if device is None or r.device == device]

    def delivered_count(self) -> int:
        """Number of records that were not dropped by the emulated link."""
        with self._lock:
            return sum(self._counts.values())

    def counts(self) -> Counter[tuple[str, str]]:
        """Delivered records per (device, channel)."""
        with self._lock:
            return Counter(self._counts)

    def close(self) -> None:
        """Flush and close the file."""
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    @staticmethod
    def load(path: Path) -> list[TruthRecord]:
        """Read a ground-truth file written by :class:`GroundTruth`."""
        with path.open("rb") as fh:
            return [TruthRecord(**orjson.loads(line)) for line in fh if line.strip()]


def _as_dict(rec: TruthRecord) -> dict[str, Any]:
    return {
        "device": rec.device,
        "channel": rec.channel,
        "value": rec.value,
        "ts_ns": rec.ts_ns,
        "seq": rec.seq,
        "dropped": rec.dropped,
        "quality": rec.quality,
    }
