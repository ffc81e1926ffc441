"""The durable outbox: every message is in an SQLite file (WAL mode) before it is published.

Why SQLite and not append-only segment files: bench/bench_outbox.py measures
both with the same fsync policy; SQLite is within reach of the segment files
for 2-50 KB messages (see bench/RESULTS.md, "Durable outbox") and gives for free
what segments must build: deleting acknowledged messages in any order, crash
recovery of a torn write, and reuse of freed space within the bound.

Life of a message:

1. :meth:`put` reserves its bytes under the bound (the policy applies), then
   the writer task inserts it in a transaction shared with every other put
   waiting at that moment (group commit); ``put`` returns once that
   transaction committed, and only then can :meth:`take` hand it out;
2. when it leaves (ingest's confirmation with ``confirm=True``, else the PUBACK; see
   :mod:`edge.outbox`) its bytes are freed at once and the row is deleted in the next
   transaction (lazily: a lost delete only means a harmless replay). While it waits for
   the confirmation after PUBACK its payload is not kept in RAM: a republish reads it back;
3. on start, every row left is replayed in put order, so per device too: also the ones
   the broker had acknowledged and ingest had not confirmed yet.

Durability (``sync``):

* ``"full"`` (default): SQLite ``synchronous=FULL`` in WAL mode fsyncs the WAL
  at every commit, so a message whose ``put`` returned survives SIGKILL *and*
  power loss (as far as the disk honours fsync).
* ``"normal"``: ``synchronous=NORMAL`` fsyncs only at checkpoints; a message
  whose ``put`` returned survives SIGKILL (committed data is in the OS page
  cache), but a power loss may roll back the transactions committed since the
  last checkpoint (at most ``wal_autocheckpoint`` pages, ~4 MB). The file stays
  consistent either way.

Disk use: the bound counts payload and topic bytes; the file adds SQLite's
page overhead (a few percent for 2-50 KB messages, freed pages are reused) and
the WAL, checkpointed every ~``max_bytes / 4`` (at most 1000 pages, 4 MB) and
truncated to ``JOURNAL_LIMIT_BYTES`` after each checkpoint.

Memory: payloads of the newest ``memory_bytes`` of queued messages stay in RAM
so the normal path never reads the file; older ones (an outage's backlog, or a
replay) are read back on :meth:`take`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import IO, TYPE_CHECKING, Literal

from edge.errors import EdgeError
from edge.outbox import MemoryOutbox, OutboxItem, Policy

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)

Sync = Literal["full", "normal"]

JOURNAL_LIMIT_BYTES = 8 * 2**20
"""The WAL file is truncated to this size after a checkpoint."""
DELETE_BATCH = 256
"""Acknowledged rows deleted in one transaction when no put comes to carry them."""
DELETE_DELAY_S = 0.2
"""How long acknowledged rows may wait for a transaction to carry their delete."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    samples INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    batch_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_INSERT = (
    "INSERT INTO outbox (topic, payload, samples, retain, received_ns, batch_seq)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)

Row = tuple[str, bytes, int, int, int, int]


class OutboxStore:
    """The SQLite file: synchronous calls, run on one dedicated thread by the outbox."""

    def __init__(self, path: Path, sync: Sync = "full", max_bytes: int = 64 * 2**20) -> None:
        """Open (or create) the file in WAL mode; the WAL is checkpointed at ~max_bytes/4."""
        self.path = path
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (one transaction per group).
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise EdgeError(f"outbox {path}: cannot use WAL mode (got {mode!r})")
        self.conn.execute(f"PRAGMA synchronous={sync.upper()}")
        self.conn.execute(f"PRAGMA journal_size_limit={JOURNAL_LIMIT_BYTES}")
        # Checkpoint often enough that the WAL stays small against a small bound.
        pages = min(1000, max(16, max_bytes // 4 // 4096))
        self.conn.execute(f"PRAGMA wal_autocheckpoint={pages}")
        self.conn.executescript(_SCHEMA)

    def load(self) -> list[tuple[int, str, int, int, bool, int, int]]:
        """(id, topic, nbytes, samples, retain, received_ns, batch_seq) of every row, in order."""
        rows = self.conn.execute(
            "SELECT id, topic, length(payload) + length(CAST(topic AS BLOB)), samples, retain,"
            " received_ns, batch_seq FROM outbox ORDER BY id"
        ).fetchall()
        return [(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6]) for r in rows]

    def meta(self, key: str) -> int:
        """A stored counter (0 when absent)."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def write(self, rows: list[Row], deletes: list[int], batch_seq: int) -> list[int]:
        """Insert ``rows`` and delete ``deletes`` in one transaction; the new rows' ids."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            keys = []
            for row in rows:
                cur = conn.execute(_INSERT, row)
                keys.append(int(cur.lastrowid or 0))
            if deletes:
                conn.executemany("DELETE FROM outbox WHERE id = ?", [(k,) for k in deletes])
            if rows:
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('batch_seq', ?)",
                    (batch_seq,),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return keys

    def payload(self, key: int) -> bytes | None:
        """The payload of one row (None when it is gone)."""
        row = self.conn.execute("SELECT payload FROM outbox WHERE id = ?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    def close(self) -> None:
        """Checkpoint the WAL into the file and close."""
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()


class DurableOutbox(MemoryOutbox):
    """Outbox backed by an SQLite file; survives SIGKILL and (with ``sync="full"``) power loss."""

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        policy: Policy = "drop_oldest",
        *,
        sync: Sync = "full",
        memory_bytes: int = 8 * 2**20,
        confirm: bool = False,
    ) -> None:
        """Open ``path`` (created if missing) and queue what it holds for replay, in order."""
        super().__init__(max_bytes, policy, confirm=confirm)
        self.path = path
        self.sync: Sync = sync
        self.memory_bytes = memory_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock(path)
        try:
            self._store = OutboxStore(path, sync, max_bytes)
            loaded = self._store.load()
            self.last_batch_seq = self._store.meta("batch_seq")
        except (sqlite3.Error, EdgeError) as exc:
            self._lock_file.close()
            raise EdgeError(f"outbox {path}: {exc}") from exc
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="edge.outbox")
        self._to_insert: list[tuple[OutboxItem, asyncio.Future[None]]] = []
        self._to_delete: list[int] = []
        self._writer: asyncio.Task[None] | None = None
        self._delete_timer: asyncio.TimerHandle | None = None
        self._on_disk_only: set[int] = set()
        self._in_ram: dict[int, int] = {}
        self._mem_bytes = 0
        now = time.time_ns()
        for key, topic, nbytes, samples, retain, received_ns, batch_seq in loaded:
            item = OutboxItem(
                topic, b"", samples, retain, received_ns, batch_seq, key, now, nbytes=nbytes
            )
            self._queue.append(item)
            self._on_disk_only.add(key)
            self._bytes += nbytes
            if confirm and batch_seq:
                # Its earlier copy may be confirmed while this one waits: it then leaves.
                self._tracked[batch_seq] = item
        self.replayed = len(loaded)
        """Messages found in the file at start (published again, in order)."""
        self._full = self._bytes > max_bytes
        if loaded:
            log.info("outbox %s: replaying %d messages (%d bytes)", path, len(loaded), self._bytes)

    # -- the outbox interface ------------------------------------------------------------------

    async def put(self, item: OutboxItem) -> None:
        """Add a message; returns once it is committed to the file (or counted as dropped)."""
        async with self._changed:
            if not await self._make_room(item):
                return
            self.last_batch_seq = max(self.last_batch_seq, item.batch_seq)
        # Appended right after the reservation (no await in between), so the file's order is
        # the order in which puts got their space.
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._to_insert.append((item, fut))
        self._start_writer()
        # Shielded: a cancelled put still ends up committed and queued exactly once.
        await asyncio.shield(fut)

    async def take(self) -> OutboxItem:
        """The next message to publish, its payload read back from the file when not in RAM."""
        item = await super().take()
        if item.key not in self._on_disk_only:
            self._mem_bytes -= self._in_ram.pop(item.key, 0)
            return item
        try:
            payload = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._store.payload, item.key
            )
        except asyncio.CancelledError:
            # Not handed out: back in order, without waiting for the lock (we are cancelled).
            self._inflight -= 1
            self._insert_in_order(item)
            raise
        except sqlite3.Error:
            payload = None
            log.exception("outbox %s: cannot read message %d", self.path, item.key)
        self._on_disk_only.discard(item.key)
        if payload is None:
            async with self._changed:
                self._inflight -= 1
                self._bytes -= item.nbytes
                self._drop(item, "disk_error")
                self._forget(item)
                self._changed.notify_all()
            return await self.take()
        item.payload = payload
        return item

    def _keep_unconfirmed(self, item: OutboxItem) -> None:
        # Waiting for ingest, maybe long: the row has it, a republish reads it back.
        item.payload = b""
        self._on_disk_only.add(item.key)

    def _forget(self, item: OutboxItem) -> None:
        super()._forget(item)
        self._on_disk_only.discard(item.key)
        self._mem_bytes -= self._in_ram.pop(item.key, 0)
        self._to_delete.append(item.key)
        if len(self._to_delete) >= DELETE_BATCH:
            self._start_writer()
        elif self._delete_timer is None:
            loop = asyncio.get_running_loop()
            self._delete_timer = loop.call_later(DELETE_DELAY_S, self._start_writer)

    async def close(self) -> None:
        """Commit what is pending (puts and deletes), checkpoint and close the file."""
        if self._delete_timer is not None:
            self._delete_timer.cancel()
        self._start_writer()
        if self._writer is not None:
            await self._writer
        await asyncio.get_running_loop().run_in_executor(self._executor, self._store.close)
        self._executor.shutdown(wait=True)
        self._lock_file.close()

    # -- the writer ------------------------------------------------------------------------------

    def _start_writer(self) -> None:
        self._delete_timer = None
        if (self._writer is None or self._writer.done()) and (self._to_insert or self._to_delete):
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name="edge.outbox.writer"
            )

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._to_insert or self._to_delete:
            inserts, self._to_insert = self._to_insert, []
            deletes, self._to_delete = self._to_delete, []
            rows: list[Row] = [
                (i.topic, i.payload, i.samples, int(i.retain), i.received_ns, i.batch_seq)
                for i, _ in inserts
            ]
            try:
                keys = await loop.run_in_executor(
                    self._executor, self._store.write, rows, deletes, self.last_batch_seq
                )
            except sqlite3.Error:
                # Disk full or broken: these messages cannot be made durable; count them lost
                # rather than publishing something a crash could silently take back.
                log.exception("outbox %s: write failed", self.path)
                async with self._changed:
                    for item, _ in inserts:
                        self._bytes -= item.nbytes
                        self._drop(item, "disk_error")
                    self._changed.notify_all()
                self._to_delete[:0] = deletes
                _resolve_all(inserts)
                await asyncio.sleep(0.5)  # a non-zero pause before the next attempt
                continue
            now = time.time_ns()
            async with self._changed:
                for (item, _), key in zip(inserts, keys, strict=True):
                    item.key = key
                    item.queued_ns = now
                    if self._mem_bytes + len(item.payload) > self.memory_bytes:
                        item.payload = b""  # the backlog lives on disk; read back on take()
                        self._on_disk_only.add(key)
                    else:
                        self._in_ram[key] = len(item.payload)
                        self._mem_bytes += len(item.payload)
                    self._queue.append(item)
                self._changed.notify_all()
            _resolve_all(inserts)


def _resolve_all(inserts: list[tuple[OutboxItem, asyncio.Future[None]]]) -> None:
    for _, fut in inserts:
        if not fut.done():
            fut.set_result(None)


def _lock(path: Path) -> IO[bytes]:
    """Hold an exclusive lock beside the file: two agents replaying one outbox would duplicate."""
    fh = path.with_name(path.name + ".lock").open("ab")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        fh.close()
        raise EdgeError(f"outbox {path} is in use by another process") from exc
    return fh
