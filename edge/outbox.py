"""The agent's outbox: messages waiting for the broker's acknowledgement, bounded in bytes.

A message enters when a device batch is encoded and leaves only when the
broker acknowledged it (PUBACK). When the bound is reached the configured
policy applies: ``drop_oldest`` discards the oldest message not yet handed to
the client (counted per reason), ``stop_reading`` makes :meth:`put` wait, which
pauses the sources. Either way ``full`` is raised as a status alarm
(:attr:`MemoryOutbox.on_full_change` is called whenever it flips).

:class:`MemoryOutbox` keeps everything in memory (tests, the demo);
:class:`edge.durable.DurableOutbox` adds an SQLite file so that nothing put is
lost when the agent is killed or the power fails. :func:`open_outbox` picks one
from the agent's config.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Callable

    from edge.config import AgentConfig

Policy = Literal["drop_oldest", "stop_reading"]


@dataclass(slots=True)
class OutboxItem:
    """One backbone message and what it carries."""

    topic: str
    payload: bytes
    samples: int
    retain: bool = False
    received_ns: int = 0
    """Receive time of the oldest sample in the message (0: none); for latency metrics."""
    batch_seq: int = 0
    """The agent's batch sequence number carried in the payload (0: none)."""
    key: int = 0
    """Position in the outbox: increasing in put order (the durable outbox's row id)."""
    queued_ns: int = 0
    """When the message entered the outbox (this process); for latency metrics."""
    nbytes: int = field(default=0, compare=False)
    """Bytes accounted against the bound (payload and topic)."""

    def __post_init__(self) -> None:
        """Account the payload and topic."""
        if not self.nbytes:
            self.nbytes = len(self.payload) + len(self.topic)


class MemoryOutbox:
    """In-memory outbox; the bound covers queued and in-flight messages."""

    def __init__(self, max_bytes: int, policy: Policy = "drop_oldest") -> None:
        """Create an empty outbox."""
        self.max_bytes = max_bytes
        self.policy = policy
        self.drops: Counter[str] = Counter()
        self.dropped_samples = 0
        self.on_full_change: Callable[[bool], None] | None = None
        """Called with the new value whenever :attr:`full` flips (the status alarm)."""
        self.last_batch_seq = 0
        """Highest batch sequence number ever put (the durable outbox remembers it)."""
        self._queue: deque[OutboxItem] = deque()
        self._bytes = 0
        self._inflight = 0
        self._next_key = 1
        self._changed = asyncio.Condition()
        self._full = False

    @property
    def full(self) -> bool:
        """The alarm: raised when the bound was reached, cleared below half of it."""
        return self._full

    @full.setter
    def full(self, value: bool) -> None:
        if value != self._full:
            self._full = value
            if self.on_full_change is not None:
                self.on_full_change(value)

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
            if not await self._make_room(item):
                return
            self._stamp(item)
            self._queue.append(item)
            self._changed.notify_all()

    def _stamp(self, item: OutboxItem) -> None:
        item.key = self._next_key
        item.queued_ns = time.time_ns()
        self._next_key += 1
        self.last_batch_seq = max(self.last_batch_seq, item.batch_seq)

    async def _make_room(self, item: OutboxItem) -> bool:
        """Reserve ``item.nbytes`` (holding the lock); False when the item was dropped."""
        if item.nbytes > self.max_bytes:
            self._drop(item, "oversized")
            return False
        while self._bytes + item.nbytes > self.max_bytes:
            self.full = True
            if self.policy == "stop_reading" or not self._queue:
                # stop_reading pauses the caller (the sources); with drop_oldest and everything
                # left in flight, acknowledgements will free space.
                await self._changed.wait()
                continue
            oldest = self._queue.popleft()
            self._bytes -= oldest.nbytes
            self._drop(oldest, "outbox_full")
            self._forget(oldest)
        self._bytes += item.nbytes
        return True

    def _drop(self, item: OutboxItem, reason: str) -> None:
        self.drops[reason] += 1
        self.dropped_samples += item.samples

    def _forget(self, item: OutboxItem) -> None:
        """Hook: ``item`` left the outbox for good (acknowledged or dropped)."""

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
            self._forget(item)
            if self._bytes < self.max_bytes // 2:
                self.full = False
            self._changed.notify_all()

    async def requeue(self, item: OutboxItem) -> None:
        """Publishing ``item`` failed: put it back in put order (ahead of everything newer)."""
        async with self._changed:
            self._inflight -= 1
            keys = [q.key for q in self._queue]
            self._queue.insert(bisect.bisect_left(keys, item.key), item)
            self._changed.notify_all()

    async def drained(self) -> None:
        """Wait until nothing is queued or in flight."""
        async with self._changed:
            while self._queue or self._inflight:
                await self._changed.wait()

    async def close(self) -> None:
        """Release resources (nothing to do in memory)."""


def open_outbox(config: AgentConfig) -> MemoryOutbox:
    """The outbox the config asks for: durable in ``outbox_dir``, else in memory."""
    if config.outbox_dir is None:
        return MemoryOutbox(config.outbox_max_bytes, config.outbox_full)
    from edge.durable import DurableOutbox  # noqa: PLC0415 - sqlite only when configured

    return DurableOutbox(
        config.outbox_dir / f"outbox-{config.id}.sqlite",
        config.outbox_max_bytes,
        config.outbox_full,
        sync=config.outbox_sync,
    )
