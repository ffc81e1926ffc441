"""Delivery confirmation pieces without servers: wire format, replay record, ingest's replay skip."""

from __future__ import annotations

import itertools

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.base import SampleBatch, SeriesKey, SeriesTable
from edge import confirm
from edge import payload as wire
from edge.backbone import Message
from edge.config import SiteConfig
from edge.errors import DecodeError
from edge.ingest import Ingest, _Batch
from edge.kpi import KpiEngine, decode_kpi
from edge.outbox import MemoryOutbox


@given(st.lists(st.integers(min_value=1, max_value=200), max_size=60))
def test_coalesce_covers_exactly_the_numbers(seqs: list[int]) -> None:
    ranges = confirm.coalesce(seqs)
    covered = [s for lo, hi in ranges for s in range(lo, hi + 1)]
    assert covered == sorted(set(seqs))
    # Maximal ranges: consecutive ranges never touch.
    assert all(b[0] > a[1] + 1 for a, b in itertools.pairwise(ranges))


def test_stored_round_trip() -> None:
    payload = confirm.encode_stored("w1", [5, 3, 4, 9, 9])
    assert orjson.loads(payload) == {"v": "tpo.stored/1", "worker": "w1", "seqs": [[3, 5], [9, 9]]}
    assert confirm.decode_stored(payload) == [(3, 5), (9, 9)]


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"v": "tpo.stored/2", "seqs": []}, "schema"),
        ({"v": "tpo.stored/1"}, "seqs"),
        ({"v": "tpo.stored/1", "seqs": [[3, 2]]}, "range"),
        ({"v": "tpo.stored/1", "seqs": [[0, 2]]}, "range"),
        ({"v": "tpo.stored/1", "seqs": [[1, 2, 3]]}, "range"),
        ({"v": "tpo.stored/1", "seqs": [[True, 2]]}, "range"),
        ({"v": "tpo.stored/1", "seqs": [["1", 2]]}, "range"),
        ([1], "schema"),
    ],
)
def test_bad_confirmations_are_refused(doc: object, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        confirm.decode_stored(orjson.dumps(doc))
    with pytest.raises(DecodeError, match="JSON"):
        confirm.decode_stored(b"{nope")


def test_topics_and_names() -> None:
    assert confirm.stored_topic("tpo", "edge-1") == "tpo/v1/tpo/_agent/edge-1/stored"
    assert confirm.ingest_status_topic("tpo", "w1") == "tpo/v1/tpo/_ingest/w1/status"
    assert confirm.topic_name_ok("edge-1.a_b")
    for bad in ("", "a/b", "a+", "#", "a b"):
        assert not confirm.topic_name_ok(bad)


def test_ingest_status() -> None:
    assert confirm.ingest_came_online(confirm.encode_ingest_status("w", "online", 1))
    assert not confirm.ingest_came_online(confirm.encode_ingest_status("w", "offline", 1))
    assert not confirm.ingest_came_online(b"online")


def test_agent_and_seq_of_an_unusable_message() -> None:
    assert confirm.agent_and_seq(b'{"agent": "a", "batch_seq": 7, "x": 1}') == ("a", 7)
    for bad in (b"nope", b"[]", b'{"agent": "a"}', b'{"agent": 1, "batch_seq": 2}'):
        assert confirm.agent_and_seq(bad) is None
    assert confirm.agent_and_seq(b'{"agent": "a", "batch_seq": 0}') is None


def test_seq_window_remembers_recent_segments_across_jumps() -> None:
    w = confirm.SeqWindow()
    assert not w.seen(1)
    for s in (1, 2, 5):
        w.add(s)
    assert [w.seen(s) for s in range(1, 7)] == [True, True, False, False, True, False]
    # A restarted agent jumps far ahead (clock-based start); its earlier run's replays,
    # arriving after its first new messages, are still recognised.
    w.add(10**15)
    assert w.seen(10**15)
    assert not w.seen(10**15 - 1)
    assert w.seen(5)
    assert not w.seen(5 + confirm.SEQ_WINDOW)  # another segment: never seen
    # Old segments are forgotten once SEGMENTS newer ones were added to: unknown, i.e. new.
    for n in range(1, confirm.SEGMENTS):
        w.add(10**15 + n * confirm.SEQ_WINDOW)
    assert not w.seen(5)
    assert w.seen(10**15)


@given(
    st.lists(
        st.integers(min_value=1, max_value=confirm.SEGMENTS * confirm.SEQ_WINDOW - 1),
        max_size=200,
    )
)
def test_seq_window_matches_a_set_while_nothing_is_forgotten(seqs: list[int]) -> None:
    w = confirm.SeqWindow()
    added: set[int] = set()
    for s in seqs:
        assert w.seen(s) == (s in added)
        w.add(s)
        added.add(s)


def test_replay_record_is_per_agent_and_bounded() -> None:
    r = confirm.ReplayRecord(max_agents=2)
    r.add("a", 1)
    r.add("b", 1)
    assert r.seen("a", 1)
    assert not r.seen("c", 1)
    r.add("b", 2)
    r.add("c", 1)  # a third agent: the one added to least recently ("a") is forgotten
    assert (r.seen("a", 1), r.seen("b", 1), r.seen("c", 1)) == (False, True, True)
    assert not r.seen("a", 0)
    r.add("a", 0)  # no number: nothing to remember


# -- ingest: a replay is acknowledged and confirmed, not stored or counted again --------------


def site() -> SiteConfig:
    return SiteConfig.model_validate(
        {
            "site": "tpo",
            "agent": {"id": "edge-1"},
            "kpi": {"enabled": False},
            "sources": [
                {
                    "type": "modbus",
                    "area": "hall",
                    "device": "m1",
                    "host": "127.0.0.1",
                    "port": 1502,
                    "unit_id": 1,
                    "registers": [
                        {"channel": "p", "table": "holding", "address": 0, "type": "float32"}
                    ],
                }
            ],
        }
    )


def samples_message(seq: int, mid: int, agent: str = "edge-1") -> Message:
    table = SeriesTable()
    table.add(SeriesKey(site="tpo", area="hall", device="m1", channel="p", unit="", kind="modbus"))
    batch = SampleBatch(
        series=np.zeros(3, np.int32),
        ts_source=np.full(3, np.iinfo(np.int64).min, np.int64),
        ts_receive=np.arange(1, 4, dtype=np.int64) * 10**9,
        value=np.arange(3, dtype=np.float64),
        quality=np.zeros(3, np.uint8),
        seq=np.full(3, -1, np.int64),
    )
    payload = wire.encode_samples(batch, table, agent_id=agent, batch_seq=seq)
    return Message(wire.device_topic("tpo", "hall", "m1", "data"), payload, mid, 1, False)


async def test_ingest_skips_a_replayed_message_but_confirms_it() -> None:
    ingest = Ingest(site(), sink=None)  # type: ignore[arg-type] - nothing is written here
    batch = _Batch()
    ingest._take(samples_message(7, 1), batch)
    ingest._take(samples_message(7, 2), batch)  # the agent republished it
    ingest._take(samples_message(8, 3), batch)
    ingest._take(samples_message(7, 4, agent="edge-2"), batch)  # another agent's 7: new
    assert [m.batch_seq for m in batch.samples] == [7, 8, 7]
    assert ingest.stats.samples == 9
    assert ingest.stats.duplicates_skipped == 1
    assert [m.mid for m in batch.ack] == [1, 2, 3, 4]  # all acknowledged
    assert batch.confirm == [("edge-1", 7), ("edge-1", 7), ("edge-1", 8), ("edge-2", 7)]
    assert ingest.metrics()["duplicates_skipped"] == 1


async def test_ingest_confirms_a_dead_letter_whose_sender_it_can_read() -> None:
    ingest = Ingest(site(), sink=None)  # type: ignore[arg-type]
    batch = _Batch()
    good = samples_message(9, 1)
    wrong_topic = Message("tpo/v1/tpo/hall/other/data", good.payload, 2, 1, False)
    broken = Message(good.topic, b'{"agent": "edge-1", "batch_seq": 10}', 3, 1, False)
    garbage = Message(good.topic, b"\xff", 4, 1, False)
    for m in (wrong_topic, broken, garbage):
        ingest._take(m, batch)
    assert batch.samples == []
    assert batch.confirm == [("edge-1", 9), ("edge-1", 10), ("", 0)]
    # A rejected message does not enter the replay record: the real one is still stored.
    ingest._take(good, batch)
    assert [m.batch_seq for m in batch.samples] == [9]


async def test_kpi_messages_carry_the_agents_batch_seq() -> None:
    """KPI messages go through the outbox too: they carry a batch_seq ingest can confirm."""
    s = site()
    engine = KpiEngine(s, s.series_table())
    seqs = iter(range(100, 200))
    engine.next_seq = lambda: next(seqs)
    doc = {
        "schema": "tpo.kpi/1",
        "site": "tpo",
        "area": "hall",
        "device": "m1",
        "agent": "edge-1",
        "window_start_ns": 10**18,
        "window_s": 10.0,
        "kind": "machine",
        "kpis": {"oee": 0.5},
    }
    engine._unsent.append(("tpo/v1/tpo/hall/m1/kpi", orjson.dumps(doc)))
    box = MemoryOutbox(10**6, confirm=True)
    await engine.drain(box)
    item = await box.take()
    assert item.batch_seq == 100
    msg = decode_kpi(item.payload)
    assert (msg.agent, msg.batch_seq, msg.kpis) == ("edge-1", 100, {"oee": 0.5})
    assert decode_kpi(orjson.dumps(doc)).batch_seq == 0  # older agents: none
    with pytest.raises(DecodeError, match="batch_seq"):
        decode_kpi(orjson.dumps({**doc, "batch_seq": "7"}))
