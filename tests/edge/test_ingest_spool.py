"""Ingest's disk queue and the self-metrics encoding, without servers."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from edge.errors import DecodeError
from edge.ingest import decode_metrics, metrics_line
from edge.spool import Spool


def lines(n: int, tag: str = "a") -> bytes:
    return b"".join(f"signal,device={tag} value={i}.5 {i}\n".encode() for i in range(n))


async def test_spool_is_fifo_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "w1.spool"
    spool = Spool(path, 2**20)
    for i in range(5):
        assert await spool.put(lines(10, f"d{i}"), 10)
    assert (spool.batches, spool.points) == (5, 50)
    first = await spool.peek(25)
    assert [b.points for b in first] == [10, 10]  # about max_points, whole batches
    assert first[0].data == lines(10, "d0")
    await spool.remove(first)
    await spool.close()

    again = Spool(path, 2**20)  # a crash or restart keeps what was not drained
    assert (again.batches, again.points) == (3, 30)
    assert again.nbytes > 0
    rest = await again.peek(10**6)
    assert [b.data for b in rest] == [lines(10, f"d{i}") for i in (2, 3, 4)]
    await again.remove(rest)
    assert (again.batches, again.points, again.nbytes) == (0, 0, 0)
    assert await again.peek(10) == []
    await again.close()


async def test_peek_returns_one_batch_larger_than_the_limit(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", 2**20)
    await spool.put(lines(100), 100)
    assert [b.points for b in await spool.peek(10)] == [100]
    await spool.close()


async def test_backpressure_refuses_when_full_and_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", 2**16, "backpressure")
    blob = os.urandom(20_000)  # incompressible, so the byte bound is hit quickly
    accepted = 0
    for _ in range(10):
        accepted += await spool.put(blob, 1)
    assert accepted == 3  # 3 x ~20 kB fit into 64 KiB, the 4th does not
    assert spool.refused == 7
    assert spool.nbytes <= spool.max_bytes
    assert spool.dropped_points == 0
    await spool.close()


async def test_drop_oldest_keeps_the_newest_and_counts_every_dropped_point(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "s", 2**16, "drop_oldest")
    for i in range(10):
        assert await spool.put(os.urandom(20_000) + str(i).encode(), 7)
    assert spool.batches == 3
    assert spool.dropped_batches == 7
    assert spool.dropped_points == 49
    assert spool.nbytes <= spool.max_bytes
    kept = await spool.peek(10**6)
    assert [b.data[-1:] for b in kept] == [b"7", b"8", b"9"]
    await spool.close()


async def test_spool_refuses_a_batch_larger_than_its_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", 2**16, "drop_oldest")
    assert not await spool.put(os.urandom(2**17), 1)
    assert spool.refused == 1
    await spool.close()
    with pytest.raises(ValueError, match="max_bytes"):
        Spool(tmp_path / "t", 0)


def test_metrics_round_trip() -> None:
    doc = {
        "schema": "tpo.metrics/1",
        "agent": "edge-1",
        "ts": 1_700_000_000_000_000_000,
        "metrics": {"outbox_depth": 3, "drops.outbox full": 2.5, "bad": float("nan")},
    }
    agent, ts, metrics = decode_metrics(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))
    assert (agent, ts) == ("edge-1", doc["ts"])
    enc = metrics_line("tpo", agent, metrics, ts)
    assert enc.lines == 1
    assert enc.data == (
        b"agent,agent=edge-1,site=tpo drops.outbox\\ full=2.5,outbox_depth=3.0"
        b" 1700000000000000000\n"
    )


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"schema": "tpo.samples/1"}, "schema"),
        ({"schema": "tpo.metrics/1", "ts": 1, "metrics": {}}, "agent"),
        ({"schema": "tpo.metrics/1", "agent": "a", "ts": -1, "metrics": {}}, "ts"),
        ({"schema": "tpo.metrics/1", "agent": "a", "ts": 1, "metrics": []}, "metrics"),
        ({"schema": "tpo.metrics/1", "agent": "a", "ts": 1, "metrics": {"x": "1"}}, "'x'"),
        ({"schema": "tpo.metrics/1", "agent": "a", "ts": 1, "metrics": {"x": True}}, "'x'"),
    ],
)
def test_bad_metrics_messages_are_refused(doc: dict[str, object], match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_metrics(orjson.dumps(doc))


def test_not_json_is_refused() -> None:
    with pytest.raises(DecodeError, match="not JSON"):
        decode_metrics(b"{")
