"""Ingest's own disk queue: line protocol batches in SQLite (WAL), bounded in bytes.

When the database is away, ingest commits each batch here and acknowledges its
MQTT messages, so the broker's queue stays short and agents keep publishing; a
drainer writes the spooled batches to the database once it is back, oldest first,
in large writes. A batch is stored zlib-compressed (line protocol compresses
about 8x), and ``synchronous=FULL`` makes a commit durable against power loss
before the messages it holds are acknowledged.

The bound counts compressed bytes. When a batch does not fit, ``full_policy``
decides: ``backpressure`` refuses it (ingest then keeps the messages
unacknowledged, and the broker holds them), ``drop_oldest`` deletes the oldest
batches until it fits and counts their points in :attr:`Spool.dropped_points`.
Every SQLite call runs on one worker thread, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import sqlite3
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

T = TypeVar("T")

FullPolicy = Literal["backpressure", "drop_oldest"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    points INTEGER NOT NULL,
    data BLOB NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    """One spooled batch, decompressed."""

    id: int
    points: int
    data: bytes


class Spool:
    """A bounded, durable FIFO of line protocol batches."""

    def __init__(
        self, path: Path, max_bytes: int, full_policy: FullPolicy = "backpressure"
    ) -> None:
        """Open (or create) the spool file; what an earlier run left is kept and drained."""
        if max_bytes <= 0:
            raise ValueError(f"spool {path}: max_bytes must be positive, got {max_bytes}")
        self.path = path
        self.max_bytes = max_bytes
        self.full_policy: FullPolicy = full_policy
        self.dropped_points = 0
        self.dropped_batches = 0
        self.refused = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpo-spool")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(points), 0), COALESCE(SUM(LENGTH(data)), 0) FROM batches"
        ).fetchone()
        self.batches, self.points, self.nbytes = int(row[0]), int(row[1]), int(row[2])

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def put(self, data: bytes, points: int) -> bool:
        """Append a batch durably; False when it does not fit under ``backpressure``."""
        blob = zlib.compress(data, 1)
        if len(blob) > self.max_bytes:
            self.refused += 1
            return False
        if self.nbytes + len(blob) > self.max_bytes and self.full_policy == "backpressure":
            self.refused += 1
            return False
        return await self._run(lambda: self._put(blob, points))

    def _put(self, blob: bytes, points: int) -> bool:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            while self.nbytes + len(blob) > self.max_bytes:
                # drop_oldest: the oldest data is the least useful to a live dashboard.
                row = db.execute(
                    "SELECT id, points, LENGTH(data) FROM batches ORDER BY id LIMIT 1"
                ).fetchone()
                if row is None:  # pragma: no cover - guarded by the size check in put()
                    break
                db.execute("DELETE FROM batches WHERE id = ?", (row[0],))
                self._account(-1, -int(row[1]), -int(row[2]))
                self.dropped_batches += 1
                self.dropped_points += int(row[1])
            db.execute("INSERT INTO batches (points, data) VALUES (?, ?)", (points, blob))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._account(1, points, len(blob))
        return True

    def _account(self, batches: int, points: int, nbytes: int) -> None:
        self.batches += batches
        self.points += points
        self.nbytes += nbytes

    async def peek(self, max_points: int) -> list[SpooledBatch]:
        """The oldest batches, at least one, together about ``max_points`` points."""
        return await self._run(lambda: self._peek(max_points))

    def _peek(self, max_points: int) -> list[SpooledBatch]:
        out: list[SpooledBatch] = []
        total = 0
        for ident, points, blob in self._db.execute(
            "SELECT id, points, data FROM batches ORDER BY id"
        ):
            if out and total + points > max_points:
                break
            out.append(SpooledBatch(int(ident), int(points), zlib.decompress(blob)))
            total += points
        return out

    async def remove(self, batches: list[SpooledBatch]) -> None:
        """Forget batches that are now in the database."""
        ids = [(b.id,) for b in batches]
        if ids:
            await self._run(lambda: self._remove(ids))

    def _remove(self, ids: list[tuple[int]]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for (ident,) in ids:
                row = db.execute(
                    "SELECT points, LENGTH(data) FROM batches WHERE id = ?", (ident,)
                ).fetchone()
                if row is None:  # dropped meanwhile under drop_oldest
                    continue
                db.execute("DELETE FROM batches WHERE id = ?", (ident,))
                self._account(-1, -int(row[0]), -int(row[1]))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Close the file (its content stays for the next run)."""
        await self._run(self._db.close)
        self._pool.shutdown(wait=True)
