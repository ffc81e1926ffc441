"""The agent's outbox: messages waiting for the broker's acknowledgement, bounded in bytes.

A message enters when a device batch is encoded and leaves only when the
broker acknowledged it (PUBACK). When the bound is reached the configured
policy applies: ``drop_oldest`` discards the oldest message not yet handed to
the client (counted per reason), ``stop_reading`` makes :meth:`put` wait, which
pauses the sources. Either way ``full`` is raised as a status alarm.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from dataclasses import dataclass
from typing import Literal


@dataclass(slots=True)
class OutboxItem:
    """One backbone message and what it carries."""

    topic: str
    payload: bytes
    samples: int
    retain: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes accounted against the bound."""
        return len(self.payload) + len(self.topic)


class MemoryOutbox:
    """In-memory outbox; the bound covers queued and in-flight messages."""

    def __init__(
        self, max_bytes: int, policy: Literal["drop_oldest", "stop_reading"] = "drop_oldest"
    ) -> None:
        """Create an empty outbox."""
        self.max_bytes = max_bytes
        self.policy = policy
        self.drops: Counter[str] = Counter()
        self.dropped_samples = 0
        self._queue: deque[OutboxItem] = deque()
        self._bytes = 0
        self._inflight = 0
        self._changed = asyncio.Condition()
        self.full = False

    @property
    def depth(self) -> int:
        """Messages queued or in flight."""
        return len(self._queue) + self._inflight

    @property
    def nbytes(self) -> int:
        """Bytes queued or in flight."""
        return self._bytes

    async def put(self, item: OutboxItem) -> None:
        """Add a message, applying the policy when the bound is reached."""
        async with self._changed:
            if item.nbytes > self.max_bytes:
                self._drop(item, "oversized")
                return
            while self._bytes + item.nbytes > self.max_bytes:
                self.full = True
                if self.policy == "stop_reading":
                    await self._changed.wait()
                    continue
                if not self._queue:
                    # Everything left is in flight; wait for acknowledgements to free space.
                    await self._changed.wait()
                    continue
                oldest = self._queue.popleft()
                self._bytes -= oldest.nbytes
                self._drop(oldest, "outbox_full")
            self._queue.append(item)
            self._bytes += item.nbytes
            self._changed.notify_all()

    def _drop(self, item: OutboxItem, reason: str) -> None:
        self.drops[reason] += 1
        self.dropped_samples += item.samples

    async def take(self) -> OutboxItem:
        """Wait for the next message to publish; it stays accounted until :meth:`done`."""
        async with self._changed:
            while not self._queue:
                await self._changed.wait()
            item = self._queue.popleft()
            self._inflight += 1
            return item

    async def done(self, item: OutboxItem) -> None:
        """The broker acknowledged ``item``: free its space."""
        async with self._changed:
            self._inflight -= 1
            self._bytes -= item.nbytes
            if self._bytes < self.max_bytes // 2:
                self.full = False
            self._changed.notify_all()

    async def requeue(self, item: OutboxItem) -> None:
        """Publishing ``item`` failed: put it back at the front."""
        async with self._changed:
            self._inflight -= 1
            self._queue.appendleft(item)
            self._changed.notify_all()

    async def drained(self) -> None:
        """Wait until nothing is queued or in flight."""
        async with self._changed:
            while self._queue or self._inflight:
                await self._changed.wait()
