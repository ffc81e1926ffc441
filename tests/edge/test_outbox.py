from __future__ import annotations

import asyncio

from edge.outbox import MemoryOutbox, OutboxItem


def item(n: int, size: int = 100) -> OutboxItem:
    return OutboxItem("t", b"x" * (size - 1), samples=n)


async def test_bound_drop_oldest_counts_every_dropped_sample() -> None:
    box = MemoryOutbox(max_bytes=1000, policy="drop_oldest")
    for i in range(15):
        await box.put(item(i + 1))
    assert box.nbytes <= 1000
    assert box.depth == 10
    assert box.drops["outbox_full"] == 5
    assert box.dropped_samples == 1 + 2 + 3 + 4 + 5
    assert box.full
    first = await box.take()
    assert first.samples == 6  # the oldest survivors go first


async def test_stop_reading_waits_for_acknowledgements() -> None:
    box = MemoryOutbox(max_bytes=300, policy="stop_reading")
    for i in range(3):
        await box.put(item(i))
    blocked = asyncio.create_task(box.put(item(99)))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    taken = await box.take()
    await box.done(taken)
    await asyncio.wait_for(blocked, 1)
    assert box.depth == 3
    assert not box.drops


async def test_requeue_puts_a_failed_message_first_and_drained_waits() -> None:
    box = MemoryOutbox(max_bytes=10_000)
    await box.put(item(1))
    await box.put(item(2))
    a = await box.take()
    await box.requeue(a)
    again = await box.take()
    assert again.samples == 1
    drained = asyncio.create_task(box.drained())
    await box.done(again)
    b = await box.take()
    await asyncio.sleep(0.01)
    assert not drained.done()
    await box.done(b)
    await asyncio.wait_for(drained, 1)
    assert box.nbytes == 0
