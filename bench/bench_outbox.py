"""Durable outbox designs side by side: SQLite (WAL) vs append-only segment files.

Each design runs the outbox's life cycle per message: put (durable write +
commit), take (from memory, as in the live path), ack (the message is
forgotten: SQLite deletes its row, batched as the outbox does; segments append
its id to an ack log and unlink a segment once every record in it is acked).

fsync policies, the same for both designs:

* ``full``: every commit is fsynced (SQLite ``synchronous=FULL``; segments
  ``os.fsync`` after each append): survives power loss;
* ``normal``: no fsync per commit (SQLite ``synchronous=NORMAL`` syncs at
  checkpoints; segments rely on the page cache): survives SIGKILL only.

``group`` is how many messages share one commit (1: each put alone, the worst
case; 16: what the outbox's group commit does when several devices flush at
once). The last table runs the real :class:`edge.durable.DurableOutbox` through
its async API (put -> take -> done) with 1 and 8 concurrent producers.

Run: ``.venv/bin/python bench/bench_outbox.py [--seconds 1.5] [--dir /var/tmp]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import tempfile
import time
import zlib
from pathlib import Path

from edge.durable import DurableOutbox, OutboxStore, Sync
from edge.outbox import OutboxItem

SIZES = (2_000, 10_000, 50_000)
TOPIC = "tpo/v1/tpo/hall-a/meter-1/data"
ACK_BATCH = 64
SEGMENT_BYTES = 16 * 2**20
_HEADER = struct.Struct("<IQIH")  # payload length, id, crc32, topic length


class SegmentLog:
    """A minimal append-only segment outbox: what the alternative design must at least do."""

    def __init__(self, directory: Path, sync: Sync) -> None:
        """Start an empty log in ``directory``."""
        self.dir = directory
        self.sync = sync
        self.next_id = 1
        self.segment_no = 0
        self.segment_ids: dict[int, set[int]] = {}
        self.acks_pending: list[int] = []
        self.ack_fd = os.open(directory / "acks.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self.fd = -1
        self.written = SEGMENT_BYTES
        self.where: dict[int, int] = {}

    def _roll(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.segment_no += 1
        path = self.dir / f"{self.segment_no:08d}.seg"
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self.segment_ids[self.segment_no] = set()
        self.written = 0

    def append(self, batch: list[tuple[str, bytes]]) -> list[int]:
        """Append records and commit (fsync under ``full``); their ids."""
        if self.written >= SEGMENT_BYTES:
            self._roll()
        ids = []
        chunks = []
        for topic, payload in batch:
            t = topic.encode()
            rid = self.next_id
            self.next_id += 1
            chunks += [_HEADER.pack(len(payload), rid, zlib.crc32(payload), len(t)), t, payload]
            self.segment_ids[self.segment_no].add(rid)
            self.where[rid] = self.segment_no
            ids.append(rid)
        data = b"".join(chunks)
        os.write(self.fd, data)
        self.written += len(data)
        if self.sync == "full":
            os.fsync(self.fd)
        return ids

    def ack(self, rid: int) -> None:
        """Forget a record; the ack log is written in batches, empty old segments unlinked."""
        self.acks_pending.append(rid)
        if len(self.acks_pending) >= ACK_BATCH:
            self._flush_acks()
        seg = self.where.pop(rid)
        ids = self.segment_ids[seg]
        ids.discard(rid)
        if not ids and seg != self.segment_no:
            del self.segment_ids[seg]
            (self.dir / f"{seg:08d}.seg").unlink()

    def _flush_acks(self) -> None:
        os.write(self.ack_fd, struct.pack(f"<{len(self.acks_pending)}Q", *self.acks_pending))
        if self.sync == "full":
            os.fsync(self.ack_fd)
        self.acks_pending.clear()

    def close(self) -> None:
        """Flush and close."""
        self._flush_acks()
        os.close(self.ack_fd)
        if self.fd >= 0:
            os.close(self.fd)


def run_sqlite(directory: Path, size: int, sync: Sync, group: int, seconds: float) -> float:
    """Messages/s through put + take + ack on OutboxStore (the outbox's SQLite layer)."""
    store = OutboxStore(directory / "bench.sqlite", sync)
    payload = os.urandom(size)
    row = (TOPIC, payload, 100, 0, 0, 0)
    done = 0
    deletes: list[int] = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        # put: one transaction per group, carrying the deletes acked since the last one
        carry = deletes if len(deletes) >= ACK_BATCH else []
        keys = store.write([row] * group, carry, done + group)
        if carry:
            deletes = []
        # take (memory) and ack
        deletes.extend(keys)
        done += group
    store.write([], deletes, done)
    elapsed = time.perf_counter() - t0
    store.close()
    return done / elapsed


def run_segments(directory: Path, size: int, sync: Sync, group: int, seconds: float) -> float:
    """Messages/s through put + take + ack on the segment log."""
    log = SegmentLog(directory, sync)
    payload = os.urandom(size)
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for rid in log.append([(TOPIC, payload)] * group):
            log.ack(rid)
        done += group
    elapsed = time.perf_counter() - t0
    log.close()
    return done / elapsed


async def run_outbox(
    directory: Path, size: int, sync: Sync, producers: int, seconds: float
) -> float:
    """Messages/s through DurableOutbox.put -> take -> done with concurrent producers."""
    box = DurableOutbox(directory / "outbox.sqlite", 256 * 2**20, sync=sync)
    payload = os.urandom(size)
    stop = time.perf_counter() + seconds
    acked = 0

    async def produce() -> None:
        while time.perf_counter() < stop:
            await box.put(OutboxItem(TOPIC, payload, 100))

    async def consume() -> None:
        nonlocal acked
        while True:
            await box.done(await box.take())
            acked += 1

    t0 = time.perf_counter()
    consumer = asyncio.create_task(consume())
    await asyncio.gather(*(produce() for _ in range(producers)))
    await box.drained()
    elapsed = time.perf_counter() - t0
    consumer.cancel()
    await box.close()
    return acked / elapsed


def main() -> None:
    """Run every cell and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="per cell")
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (a real disk)")
    args = parser.parse_args()
    print(f"files in {args.dir or tempfile.gettempdir()}, {args.seconds} s per cell")
    print(
        "| fsync | group | msg size | SQLite WAL msgs/s | MB/s "
        "| segments msgs/s | MB/s | sqlite/seg |"
    )
    print("|" + "---|" * 8)
    syncs: tuple[Sync, ...] = ("full", "normal")
    for sync in syncs:
        for group in (1, 16):
            for size in SIZES:
                rates = []
                for fn in (run_sqlite, run_segments):
                    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                        rates.append(fn(Path(tmp), size, sync, group, args.seconds))
                sq, seg = rates
                print(
                    f"| {sync} | {group} | {size // 1000} KB | {sq:,.0f} | {sq * size / 1e6:,.1f} "
                    f"| {seg:,.0f} | {seg * size / 1e6:,.1f} | {sq / seg:.2f}x |"
                )
    print()
    print("| fsync | producers | msg size | DurableOutbox put+take+done msgs/s | MB/s |")
    print("|" + "---|" * 5)
    for sync in syncs:
        for producers in (1, 8):
            for size in SIZES:
                with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                    rate = asyncio.run(run_outbox(Path(tmp), size, sync, producers, args.seconds))
                print(
                    f"| {sync} | {producers} | {size // 1000} KB | {rate:,.0f} "
                    f"| {rate * size / 1e6:,.1f} |"
                )


if __name__ == "__main__":
    main()
