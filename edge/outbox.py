"""The agent's outbox: messages on their way to the database, bounded in bytes.

Life of a message (``confirm=True``, i.e. ``agent.delivery: stored``, the default):

1. :meth:`MemoryOutbox.put` queues it (when the bound is reached the policy applies);
2. :meth:`~MemoryOutbox.take` hands it to the publisher (*in flight*);
3. :meth:`~MemoryOutbox.done` on the broker's PUBACK: it becomes *unconfirmed*. The broker
   holds it now, but only in memory until its next autosave, so the outbox keeps it (still
   counted against the bound) until ingest confirms it is in the database or ingest's spool;
4. :meth:`~MemoryOutbox.confirm` (ingest's ``tpo.stored/1`` message, :mod:`edge.confirm`):
   it leaves for good.

Unconfirmed messages are published again, in put order (so per device in order), after
every reconnect to the broker (:meth:`~MemoryOutbox.republish_all`; the agent's session is
not persistent, so confirmations sent meanwhile are lost), when an ingest worker comes online,
and as a last resort when one stays unconfirmed longer than the timeout, doubling per message
up to a cap (:meth:`~MemoryOutbox.republish_due`). Ingest recognises a replay by the agent's
``batch_seq`` and confirms it again without storing it twice. A confirmation that arrives
while the message is queued again or in flight marks it: it then leaves at its next PUBACK
(or when taken) instead of waiting again.

Messages without a ``batch_seq`` (dead letters) and everything with ``confirm=False``
(``agent.delivery: broker``) leave at PUBACK, as before.

When the bound is reached, the oldest *unconfirmed* messages are evicted first (the broker has
them; counted in :attr:`~MemoryOutbox.evicted`, not a data drop); only then the configured
policy applies to unsent ones: ``drop_oldest`` discards the oldest message not yet handed
to the client (counted per reason), ``stop_reading`` makes :meth:`put` wait, which pauses
the sources. Either way ``full`` is raised as a status alarm
(:attr:`MemoryOutbox.on_full_change` is called whenever it flips).

:class:`MemoryOutbox` keeps everything in memory (tests, the demo);
:class:`edge.durable.DurableOutbox` adds an SQLite file so that nothing put is
lost when the agent is killed or the power fails: a row is deleted only once its message is
confirmed (or, without confirmation, acknowledged), and a restart publishes every row again.
:func:`open_outbox` picks one from the agent's config.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from edge.config import AgentConfig

Policy = Literal["drop_oldest", "stop_reading"]
MAX_BACKOFF_DOUBLINGS = 20
"""The republish timeout doubles at most this often (the cap applies long before)."""


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
    """The agent's batch sequence number carried in the payload (0: none, not confirmable)."""
    key: int = 0
    """Position in the outbox: increasing in put order (the durable outbox's row id)."""
    queued_ns: int = 0
    """When the message entered the outbox (this process); for latency metrics."""
    nbytes: int = field(default=0, compare=False)
    """Bytes accounted against the bound (payload and topic)."""
    acked_ns: int = field(default=0, compare=False)
    """When the broker last acknowledged it (0: not yet); it then waits for confirmation."""
    attempts: int = field(default=0, compare=False)
    """Times it was republished because its confirmation did not come in time."""
    confirmed: bool = field(default=False, compare=False)
    """Confirmed while queued again or in flight: it leaves at the next occasion."""
    epoch: int = field(default=0, compare=False)
    """The outbox's republish epoch when it was last taken (see :meth:`MemoryOutbox.done`)."""

    def __post_init__(self) -> None:
        """Account the payload and topic."""
        if not self.nbytes:
            self.nbytes = len(self.payload) + len(self.topic)


def _key(item: OutboxItem) -> int:
    return item.key


class MemoryOutbox:
    """In-memory outbox; the bound covers queued, in-flight and unconfirmed messages."""

    def __init__(
        self, max_bytes: int, policy: Policy = "drop_oldest", *, confirm: bool = False
    ) -> None:
        """Create an empty outbox; ``confirm``: keep messages after PUBACK until confirmed."""
        self.max_bytes = max_bytes
        self.policy = policy
        self.confirm = confirm
        self.drops: Counter[str] = Counter()
        self.dropped_samples = 0
        self.on_full_change: Callable[[bool], None] | None = None
        """Called with the new value whenever :attr:`full` flips (the status alarm)."""
        self.last_batch_seq = 0
        """Highest batch sequence number ever put (the durable outbox remembers it)."""
        self.republished = 0
        """Messages published again because they were not confirmed (reconnect, timeout)."""
        self.evicted = 0
        """Unconfirmed messages given up to make room (the broker had them; not a drop)."""
        self.confirmed = 0
        """Messages that left because ingest confirmed them."""
        self._queue: deque[OutboxItem] = deque()
        self._bytes = 0
        self._inflight = 0
        self._unconfirmed: OrderedDict[int, OutboxItem] = OrderedDict()
        """batch_seq -> message acknowledged by the broker, oldest PUBACK first."""
        self._tracked: dict[int, OutboxItem] = {}
        """batch_seq -> message queued again or in flight, that a confirmation may reach."""
        self._epoch = 0
        """Counts :meth:`republish_all` calls: a message taken before the last one is sent
        again at its PUBACK (it may have reached the broker before the subscriber did)."""
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
        """Messages queued, in flight or waiting for confirmation."""
        return len(self._queue) + self._inflight + len(self._unconfirmed)

    @property
    def unconfirmed(self) -> int:
        """Messages acknowledged by the broker and not yet confirmed by ingest."""
        return len(self._unconfirmed)

    @property
    def nbytes(self) -> int:
        """Bytes queued, in flight or waiting for confirmation."""
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
            if self._unconfirmed:
                # The broker has these: giving one up costs only the end-to-end check.
                _, old = self._unconfirmed.popitem(last=False)
                self.evicted += 1
                self._bytes -= old.nbytes
                self._forget(old)
                continue
            self.full = True
            if self.policy == "stop_reading" or not self._queue:
                # stop_reading pauses the caller (the sources); with drop_oldest and everything
                # left in flight, acknowledgements will free space.
                await self._changed.wait()
                continue
            oldest = self._queue.popleft()
            if oldest.acked_ns:  # queued again for a republish: the broker had it
                self.evicted += 1
            else:
                self._drop(oldest, "outbox_full")
            self._bytes -= oldest.nbytes
            self._forget(oldest)
        self._bytes += item.nbytes
        return True

    def _drop(self, item: OutboxItem, reason: str) -> None:
        self.drops[reason] += 1
        self.dropped_samples += item.samples

    def _release(self, item: OutboxItem) -> None:
        """``item`` leaves the outbox for good: free its bytes (the lock is held)."""
        self._bytes -= item.nbytes
        self._forget(item)
        if self._bytes < self.max_bytes // 2:
            self.full = False

    def _forget(self, item: OutboxItem) -> None:
        """Hook: ``item`` left the outbox for good (confirmed, acknowledged or dropped)."""
        if item.batch_seq:
            self._tracked.pop(item.batch_seq, None)

    def _keep_unconfirmed(self, item: OutboxItem) -> None:
        """Hook: the broker acknowledged ``item``; it now waits for confirmation."""

    async def take(self) -> OutboxItem:
        """Wait for the next message to publish; it stays accounted until it leaves."""
        async with self._changed:
            while True:
                while not self._queue:
                    await self._changed.wait()
                item = self._queue.popleft()
                if item.confirmed:  # republished, then confirmed meanwhile: nothing to send
                    self._release(item)
                    self._changed.notify_all()
                    continue
                self._inflight += 1
                if self.confirm and item.batch_seq:
                    self._tracked[item.batch_seq] = item
                    item.epoch = self._epoch
                return item

    async def done(self, item: OutboxItem) -> None:
        """The broker acknowledged ``item``: keep it until confirmed, or free its space."""
        async with self._changed:
            self._inflight -= 1
            seq = item.batch_seq
            if self.confirm and seq and not item.confirmed:
                item.acked_ns = time.time_ns()
                if item.epoch != self._epoch:
                    # Sent before the last republish_all (a reconnect, an ingest worker back):
                    # it may have reached a broker with no subscriber yet. Once more.
                    self._insert_in_order(item)
                    self.republished += 1
                else:
                    self._tracked.pop(seq, None)
                    self._unconfirmed[seq] = item
                    self._keep_unconfirmed(item)
            else:
                self._release(item)
            self._changed.notify_all()

    async def requeue(self, item: OutboxItem) -> None:
        """Publishing ``item`` failed: put it back in put order (ahead of everything newer)."""
        async with self._changed:
            self._inflight -= 1
            if item.confirmed:
                self._release(item)
            else:
                self._insert_in_order(item)
            self._changed.notify_all()

    def _insert_in_order(self, item: OutboxItem) -> None:
        """Queue ``item`` again in put order, ahead of everything newer (the lock is held)."""
        self._queue.insert(bisect.bisect_left(self._queue, item.key, key=_key), item)

    async def confirm_ranges(self, ranges: Iterable[tuple[int, int]]) -> list[OutboxItem]:
        """Ingest stored the messages with these batch_seqs: they leave; returns those that did.

        A message queued again or in flight is marked and leaves at its next PUBACK (not
        returned here); numbers the outbox does not hold are ignored.
        """
        out: list[OutboxItem] = []
        async with self._changed:
            unconfirmed, tracked = self._unconfirmed, self._tracked
            for lo, hi in ranges:
                if hi - lo >= len(unconfirmed) + len(tracked):
                    # A wide range: walk what is held rather than every number in it.
                    seqs: Iterable[int] = [s for s in (*unconfirmed, *tracked) if lo <= s <= hi]
                else:
                    seqs = range(lo, hi + 1)
                for seq in seqs:
                    item = unconfirmed.pop(seq, None)
                    if item is not None:
                        out.append(item)
                        self._release(item)
                        continue
                    item = tracked.get(seq)
                    if item is not None:
                        item.confirmed = True
            if out:
                self.confirmed += len(out)
                self._changed.notify_all()
        return out

    async def republish_all(self) -> int:
        """Queue every unconfirmed message again, in put order (after a reconnect).

        Messages in flight now are sent again at their PUBACK (they are counted then).
        """
        async with self._changed:
            self._epoch += 1
            return self._back_in_queue(list(self._unconfirmed.values()))

    async def republish_due(self, now_ns: int, timeout_ns: int, cap_ns: int) -> int:
        """Queue again what waited longer than its timeout (doubling per republish, capped)."""
        due: list[OutboxItem] = []
        async with self._changed:
            for item in self._unconfirmed.values():
                if item.acked_ns + timeout_ns > now_ns:
                    break  # oldest PUBACK first: nothing later can be due
                wait_ns = min(timeout_ns << min(item.attempts, MAX_BACKOFF_DOUBLINGS), cap_ns)
                if item.acked_ns + wait_ns <= now_ns:
                    due.append(item)
            for item in due:
                item.attempts += 1
            return self._back_in_queue(due)

    def _back_in_queue(self, items: list[OutboxItem]) -> int:
        if not items:
            return 0
        for item in items:
            del self._unconfirmed[item.batch_seq]
            self._tracked[item.batch_seq] = item
        items.sort(key=_key)
        self._queue = deque(heapq.merge(items, self._queue, key=_key))
        self.republished += len(items)
        self._changed.notify_all()
        return len(items)

    async def drained(self) -> None:
        """Wait until nothing is queued or in flight (unconfirmed messages may remain)."""
        async with self._changed:
            while self._queue or self._inflight:
                await self._changed.wait()

    async def settled(self) -> None:
        """Wait until nothing is queued, in flight or unconfirmed."""
        async with self._changed:
            while self._queue or self._inflight or self._unconfirmed:
                await self._changed.wait()

    async def close(self) -> None:
        """Release resources (nothing to do in memory)."""


def open_outbox(config: AgentConfig) -> MemoryOutbox:
    """The outbox the config asks for: durable in ``outbox_dir``, else in memory."""
    confirm = config.delivery == "stored"
    if config.outbox_dir is None:
        return MemoryOutbox(config.outbox_max_bytes, config.outbox_full, confirm=confirm)
    from edge.durable import DurableOutbox  # noqa: PLC0415 - sqlite only when configured

    return DurableOutbox(
        config.outbox_dir / f"outbox-{config.id}.sqlite",
        config.outbox_max_bytes,
        config.outbox_full,
        sync=config.outbox_sync,
        confirm=confirm,
    )
