"""The outbox's confirmation state machine (delivery: stored), in memory and on disk.

queued -> in flight (take) -> unconfirmed (done = PUBACK) -> gone (confirm_ranges);
unconfirmed -> queued again (republish_all after a reconnect, republish_due after the
timeout, doubling per message); the bound evicts unconfirmed messages before it drops
unsent ones; the durable outbox deletes a row only once its message is confirmed.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from edge.config import AgentConfig
from edge.durable import DurableOutbox
from edge.outbox import MemoryOutbox, OutboxItem, open_outbox

MakeBox = Callable[..., Awaitable[MemoryOutbox]]


def item(seq: int, size: int = 100, samples: int = 1) -> OutboxItem:
    return OutboxItem("t", b"p" * (size - 1), samples, batch_seq=seq)


@pytest.fixture(params=["memory", "durable"])
async def make_box(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeBox]:
    """Build outboxes of one kind; closed at the end."""
    made: list[MemoryOutbox] = []

    async def make(max_bytes: int = 100_000, policy: str = "drop_oldest") -> MemoryOutbox:
        if request.param == "memory":
            box = MemoryOutbox(max_bytes, policy, confirm=True)  # type: ignore[arg-type]
        else:
            path = tmp_path / f"outbox-{len(made)}.sqlite"
            box = DurableOutbox(path, max_bytes, policy, confirm=True)  # type: ignore[arg-type]
        made.append(box)
        return box

    yield make
    for box in made:
        await box.close()


async def publish(box: MemoryOutbox, n: int) -> list[OutboxItem]:
    """Take ``n`` messages and acknowledge them (PUBACK)."""
    out = []
    for _ in range(n):
        it = await box.take()
        out.append(it)
        await box.done(it)
    return out


async def test_puback_keeps_a_message_until_it_is_confirmed(make_box: MakeBox) -> None:
    box = await make_box()
    for seq in (1, 2, 3):
        await box.put(item(seq))
    await publish(box, 3)
    assert (box.depth, box.unconfirmed, box.nbytes) == (3, 3, 300)
    await asyncio.wait_for(box.drained(), 1)  # nothing queued or in flight any more
    settled = asyncio.create_task(box.settled())
    gone = await box.confirm_ranges([(1, 2)])
    assert [i.batch_seq for i in gone] == [1, 2]
    assert all(i.acked_ns > 0 for i in gone)
    assert (box.depth, box.unconfirmed, box.nbytes, box.confirmed) == (1, 1, 100, 2)
    await asyncio.sleep(0.01)
    assert not settled.done()
    gone = await box.confirm_ranges([(3, 3), (3, 3), (7, 9)])  # unknown numbers ignored
    assert [i.batch_seq for i in gone] == [3]
    await asyncio.wait_for(settled, 1)
    assert (box.depth, box.nbytes) == (0, 0)


async def test_without_confirm_or_batch_seq_puback_ends_it(tmp_path: Path) -> None:
    old = MemoryOutbox(10_000)  # delivery: broker
    await old.put(item(1))
    await publish(old, 1)
    assert (old.depth, old.nbytes) == (0, 0)
    box = MemoryOutbox(10_000, confirm=True)
    await box.put(item(0))  # a dead letter: no batch_seq, nothing could confirm it
    await publish(box, 1)
    assert (box.depth, box.unconfirmed) == (0, 0)


async def test_open_outbox_follows_the_delivery_setting(tmp_path: Path) -> None:
    assert open_outbox(AgentConfig(id="a")).confirm
    assert not open_outbox(AgentConfig(id="a", delivery="broker")).confirm
    durable = open_outbox(AgentConfig(id="a", outbox_dir=tmp_path))
    assert durable.confirm
    await durable.close()


async def test_republish_all_requeues_unconfirmed_in_put_order(make_box: MakeBox) -> None:
    box = await make_box()
    for seq in range(1, 6):
        await box.put(item(seq))
    first = await box.take()
    second = await box.take()
    third = await box.take()
    # PUBACKs out of order; 4 and 5 stay queued.
    await box.done(third)
    await box.done(first)
    await box.done(second)
    await box.confirm_ranges([(2, 2)])
    assert await box.republish_all() == 2
    assert box.republished == 2
    taken = [await box.take() for _ in range(4)]
    assert [t.batch_seq for t in taken] == [1, 3, 4, 5]  # key order: per device order kept
    # The republished copies carry their payload (read back from disk when durable).
    assert all(t.payload == item(1).payload for t in taken)
    assert (box.depth, box.unconfirmed) == (4, 0)


async def test_a_message_in_flight_at_a_republish_is_sent_again(make_box: MakeBox) -> None:
    box = await make_box()
    await box.put(item(1))
    sent = await box.take()
    await box.republish_all()  # reconnect: it may have reached a broker without subscribers
    await box.done(sent)
    assert box.unconfirmed == 0
    again = await box.take()
    assert again.batch_seq == 1
    assert again.payload == sent.payload
    await box.done(again)
    assert box.unconfirmed == 1
    assert box.republished == 1


async def test_confirmation_of_a_requeued_message_ends_it(make_box: MakeBox) -> None:
    box = await make_box()
    for seq in (1, 2):
        await box.put(item(seq))
    await publish(box, 2)
    await box.republish_all()
    taken = await box.take()  # 1 in flight again, 2 queued again
    assert await box.confirm_ranges([(1, 2)]) == []  # neither is waiting: both marked
    await box.done(taken)  # its PUBACK ends it instead of waiting again
    assert (box.unconfirmed, box.depth) == (0, 1)
    nothing = asyncio.create_task(box.take())
    await asyncio.sleep(0.02)
    assert not nothing.done()  # 2 was skipped, not handed out again
    nothing.cancel()
    assert (box.depth, box.nbytes) == (0, 0)
    await asyncio.wait_for(box.settled(), 1)


async def test_timeout_republishes_with_doubling_backoff(make_box: MakeBox) -> None:
    box = await make_box()
    await box.put(item(1))
    await box.put(item(2))
    [a, b] = await publish(box, 2)
    t0 = max(a.acked_ns, b.acked_ns)
    s, eps = 10**9, 10**7  # 1 s; both PUBACKs fall within eps of each other
    timeout, cap = s, 3 * s
    assert await box.republish_due(t0 + s - eps, timeout, cap) == 0
    assert await box.republish_due(t0 + s, timeout, cap) == 2
    [a, b] = await publish(box, 2)
    assert (a.attempts, b.attempts) == (1, 1)
    t1 = max(a.acked_ns, b.acked_ns)
    assert await box.republish_due(t1 + 2 * s - eps, timeout, cap) == 0  # doubled
    assert await box.republish_due(t1 + 2 * s, timeout, cap) == 2
    [a, b] = await publish(box, 2)
    t2 = max(a.acked_ns, b.acked_ns)
    assert await box.republish_due(t2 + 3 * s - eps, timeout, cap) == 0
    assert await box.republish_due(t2 + 3 * s, timeout, cap) == 2  # capped: not 4 x timeout
    [a, _] = await publish(box, 2)
    assert a.attempts == 3
    assert box.republished == 6
    await box.confirm_ranges([(1, 2)])
    assert await box.republish_due(t2 + 100 * s, timeout, cap) == 0


async def test_bound_evicts_oldest_unconfirmed_before_dropping_unsent(make_box: MakeBox) -> None:
    box = await make_box(max_bytes=1_000)
    for seq in range(1, 6):
        await box.put(item(seq, samples=10))
    await publish(box, 5)  # 5 unconfirmed (500 bytes)
    for seq in range(6, 11):
        await box.put(item(seq, samples=10))  # 1000 bytes: at the bound
    await box.put(item(11, samples=10))
    await box.put(item(12, samples=10))
    assert box.evicted == 2
    assert not box.drops  # the broker had the evicted ones: no data dropped
    assert not box.full
    assert sorted(box._unconfirmed) == [3, 4, 5]  # the oldest went first
    for seq in range(13, 18):
        await box.put(item(seq, samples=10))
    assert box.evicted == 5
    assert box.drops["outbox_full"] == 2  # then the drop policy on unsent messages
    assert box.dropped_samples == 20
    assert box.full
    assert box.nbytes == 1_000
    assert [(await box.take()).batch_seq for _ in range(10)] == list(range(8, 18))


async def test_stop_reading_evicts_unconfirmed_instead_of_waiting(make_box: MakeBox) -> None:
    box = await make_box(max_bytes=300, policy="stop_reading")
    for seq in (1, 2, 3):
        await box.put(item(seq))
    await publish(box, 3)
    await asyncio.wait_for(box.put(item(4)), 1)  # no wait: unconfirmed 1 gives way
    assert box.evicted == 1
    assert not box.full


async def test_durable_deletes_a_row_only_once_confirmed(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    box = DurableOutbox(path, 100_000, confirm=True)
    for seq in (1, 2, 3):
        await box.put(item(seq))
    await publish(box, 3)
    await box.confirm_ranges([(2, 2)])
    await box.close()
    with sqlite3.connect(path) as conn:
        left = [r[0] for r in conn.execute("SELECT batch_seq FROM outbox ORDER BY id")]
    assert left == [1, 3]
    # A restart replays the unconfirmed rows, in order, with their payloads.
    again = DurableOutbox(path, 100_000, confirm=True)
    try:
        assert again.replayed == 2
        assert again.last_batch_seq == 3
        taken = [await again.take() for _ in range(2)]
        assert [t.batch_seq for t in taken] == [1, 3]
        assert all(t.payload == item(1).payload for t in taken)
        for t in taken:
            await again.done(t)
        assert again.unconfirmed == 2
        # A replayed row whose earlier copy ingest confirms meanwhile: gone at once.
        await again.confirm_ranges([(1, 3)])
        assert again.depth == 0
    finally:
        await again.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0


async def test_durable_replayed_row_confirmed_before_it_is_sent(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    box = DurableOutbox(path, 100_000, confirm=True)
    await box.put(item(1))
    await publish(box, 1)
    await box.close()  # unconfirmed at shutdown: the row stays
    again = DurableOutbox(path, 100_000, confirm=True)
    try:
        await again.confirm_ranges([(1, 1)])  # ingest confirms the earlier copy
        nothing = asyncio.create_task(again.take())
        await asyncio.sleep(0.05)
        assert not nothing.done()  # not published again
        nothing.cancel()
        assert again.depth == 0
    finally:
        await again.close()


async def test_durable_unconfirmed_payload_leaves_ram_and_is_read_back(tmp_path: Path) -> None:
    box = DurableOutbox(tmp_path / "o.sqlite", 100_000, confirm=True)
    try:
        await box.put(item(1))
        [sent] = await publish(box, 1)
        assert sent.payload == b""  # waiting for ingest: the row has it
        await box.republish_all()
        again = await box.take()
        assert again.payload == item(1).payload
    finally:
        await box.close()


def test_delivery_config_defaults_and_checks() -> None:
    cfg = AgentConfig(id="a")
    assert (cfg.delivery, cfg.confirm_timeout_s, cfg.confirm_timeout_max_s) == (
        "stored",
        30.0,
        300.0,
    )
    with pytest.raises(ValueError, match="confirm_timeout_max_s"):
        AgentConfig(id="a", confirm_timeout_s=60, confirm_timeout_max_s=30)
    with pytest.raises(ValueError, match="delivery"):
        AgentConfig(id="a", delivery="pubrec")  # type: ignore[arg-type]
