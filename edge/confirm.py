"""End-to-end delivery confirmation: ingest tells an agent which of its messages are stored.

A broker's PUBACK only says the broker holds a message in memory; a broker that
is killed before its next autosave loses every message it acknowledged and had
not delivered yet. So with ``agent.delivery: stored`` (the default) the agent
keeps a message after PUBACK until ingest confirms it (:mod:`edge.outbox`).

Wire format, on ``tpo/v1/{site}/_agent/{agent_id}/stored`` (QoS 1, not retained),
one message per agent per ingest write batch::

    {"v": "tpo.stored/1", "worker": "<ingest client id>", "seqs": [[lo, hi], ...]}

``seqs`` are the agent's ``batch_seq`` numbers, coalesced into inclusive ranges.
Ingest workers also announce themselves, retained, on
``tpo/v1/{site}/_ingest/{client_id}/status`` (``online`` on every connect; the
last will says ``offline``): a worker coming online makes the agents republish
what is still unconfirmed, instead of waiting for the timeout.

:class:`ReplayRecord` is ingest's bounded memory of the batch_seqs it stored per
agent, so that a republished message is acknowledged and confirmed again but
neither written nor counted twice.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Final

import orjson

from edge import payload as wire
from edge.errors import DecodeError

if TYPE_CHECKING:
    from collections.abc import Iterable

STORED_SCHEMA: Final = "tpo.stored/1"
INGEST_STATUS_SCHEMA: Final = "tpo.ingest-status/1"
SEGMENT_SHIFT: Final = 16
SEQ_WINDOW: Final = 1 << SEGMENT_SHIFT
"""Batch sequence numbers per segment of ingest's replay record (8 KiB of bits)."""
SEGMENTS: Final = 4
"""Segments remembered per agent (least recently added to forgotten first): 32 KiB."""
MAX_AGENTS: Final = 1024
"""Agents ingest keeps a replay record for (least recently seen forgotten first)."""
MAX_RANGES: Final = 100_000
"""Ranges accepted in one confirmation (a bigger one is refused as malformed)."""
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def topic_name_ok(name: str) -> bool:
    """True when ``name`` can stand as one topic level (no '/', '+', '#', spaces)."""
    return _NAME.fullmatch(name) is not None


def stored_topic(site: str, agent_id: str) -> str:
    """``tpo/v1/{site}/_agent/{agent_id}/stored``."""
    return wire.agent_topic(site, agent_id, "stored")


def ingest_status_topic(site: str, worker: str) -> str:
    """``tpo/v1/{site}/_ingest/{worker}/status`` (retained)."""
    return f"{wire.PREFIX}/{site}/_ingest/{worker}/status"


def coalesce(seqs: Iterable[int]) -> list[list[int]]:
    """Sorted, de-duplicated inclusive ranges ``[[lo, hi], ...]`` of the given numbers."""
    out: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return out


def encode_stored(worker: str, seqs: Iterable[int]) -> bytes:
    """A ``tpo.stored/1`` confirmation of the given batch_seqs."""
    return orjson.dumps({"v": STORED_SCHEMA, "worker": worker, "seqs": coalesce(seqs)})


def decode_stored(payload: bytes) -> list[tuple[int, int]]:
    """The ``(lo, hi)`` ranges of a ``tpo.stored/1`` confirmation; raises DecodeError."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"confirmation is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("v") != STORED_SCHEMA:
        got = doc.get("v") if isinstance(doc, dict) else type(doc).__name__
        raise DecodeError(f"confirmation schema is {got!r}, want {STORED_SCHEMA!r}")
    seqs = doc.get("seqs")
    if not isinstance(seqs, list) or len(seqs) > MAX_RANGES:
        raise DecodeError("confirmation field 'seqs' must be a list of [lo, hi] ranges")
    out: list[tuple[int, int]] = []
    for r in seqs:
        if (
            not isinstance(r, list)
            or len(r) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
            or not 0 < r[0] <= r[1]
        ):
            raise DecodeError(f"confirmation range {r!r} is not [lo, hi] with 0 < lo <= hi")
        out.append((r[0], r[1]))
    return out


def encode_ingest_status(worker: str, state: str, ts_ns: int) -> bytes:
    """A worker's retained status: ``online`` or ``offline``."""
    return orjson.dumps({"v": INGEST_STATUS_SCHEMA, "worker": worker, "state": state, "ts": ts_ns})


def ingest_came_online(payload: bytes) -> bool:
    """True for a well-formed ``online`` status of an ingest worker."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(doc, dict)
        and doc.get("v") == INGEST_STATUS_SCHEMA
        and doc.get("state") == "online"
    )


def agent_and_seq(payload: bytes) -> tuple[str, int] | None:
    """``(agent, batch_seq)`` of a message ingest could not use, if it can still be read."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    agent, seq = doc.get("agent"), doc.get("batch_seq")
    if isinstance(agent, str) and isinstance(seq, int) and not isinstance(seq, bool) and seq > 0:
        return agent, seq
    return None


class SeqWindow:
    """The batch_seqs of one agent seen recently: bitmaps of the last few 65 536-number segments.

    Segments rather than one window below the highest number: a restarted agent jumps far
    ahead (its numbers start above the clock in microseconds), and the replays of its earlier
    run, which arrive after its first new messages, must still be recognised.
    """

    __slots__ = ("_segments",)

    def __init__(self) -> None:
        """Nothing seen yet."""
        self._segments: OrderedDict[int, bytearray] = OrderedDict()
        """seq // SEQ_WINDOW -> bitmap of its numbers, least recently added to first."""

    def seen(self, seq: int) -> bool:
        """True when ``seq`` is known to have been seen (a forgotten segment: unknown)."""
        bits = self._segments.get(seq >> SEGMENT_SHIFT)
        if bits is None:
            return False
        slot = seq & (SEQ_WINDOW - 1)
        return bool(bits[slot >> 3] & (1 << (slot & 7)))

    def add(self, seq: int) -> None:
        """Remember ``seq``."""
        key = seq >> SEGMENT_SHIFT
        bits = self._segments.get(key)
        if bits is None:
            bits = self._segments[key] = bytearray(SEQ_WINDOW // 8)
            if len(self._segments) > SEGMENTS:
                self._segments.popitem(last=False)
        else:
            self._segments.move_to_end(key)
        slot = seq & (SEQ_WINDOW - 1)
        bits[slot >> 3] |= 1 << (slot & 7)


class ReplayRecord:
    """Per agent, the batch_seqs ingest took recently (bounded: :data:`MAX_AGENTS` windows).

    Safe by construction: a number the record does not know (forgotten agent, older than
    the window) counts as new, so the worst case is a harmless second write, never a skip.
    """

    def __init__(self, max_agents: int = MAX_AGENTS) -> None:
        """Empty."""
        self.max_agents = max_agents
        self._agents: OrderedDict[str, SeqWindow] = OrderedDict()

    def seen(self, agent: str, seq: int) -> bool:
        """True when this agent's ``seq`` was taken before (``seq`` 0 means: no number)."""
        window = self._agents.get(agent)
        return seq > 0 and window is not None and window.seen(seq)

    def add(self, agent: str, seq: int) -> None:
        """Remember that this agent's ``seq`` was taken."""
        if seq <= 0:
            return
        window = self._agents.get(agent)
        if window is None:
            window = self._agents[agent] = SeqWindow()
            if len(self._agents) > self.max_agents:
                self._agents.popitem(last=False)
        else:
            self._agents.move_to_end(agent)
        window.add(seq)
