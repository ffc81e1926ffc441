"""The ingest service: backbone messages in, line protocol out, acknowledged only once stored.

It subscribes with a persistent MQTT 5 session and manual acknowledgement, so
the broker keeps and redelivers anything the service had not stored when it
stopped or crashed. Messages are decoded, encoded as line protocol and
collected until about ``batch_points`` points (written at once) or
``flush_interval_s``; the batch is written to the sink (which retries with
capped backoff), and only then are its messages acknowledged. Writes are
pipelined: the next batch is collected while up to ``writes_in_flight`` earlier
ones are being written, and acknowledgements go out in batch order, each only
after its own write and every earlier one. Replays are harmless: a point is
identified by measurement, tags and timestamp, so a replay overwrites itself.

With ``ingest.spool_dir`` set, a batch the database does not take within
``spool_after_s`` is committed to ingest's own disk queue (:mod:`edge.spool`)
instead, and acknowledged; a drainer writes the queue back in large writes
once the database answers again, while live batches go straight to it.

Subscriptions: data topics and agents' self-metrics are shared between workers
(``$share/<group>/``) when a share group is set. KPI topics are NOT shared: every
worker merges every window, so a merge never sees only the half of the devices
that one worker happened to get. A link KPI message is acknowledged only after
the merged window it contributes to is written, so a worker that crashes gets
every contribution of its unfinished windows back and never writes a partial
merge over a complete one.

Unusable messages are acknowledged (redelivering them would never help),
counted by reason and stored as a record in the ``deadletter`` measurement.
Ingest's own metrics go to the ``agent`` measurement as ``agent=_ingest-<client_id>``.

Delivery confirmation (:mod:`edge.confirm`): once a batch is durable (database or spool)
and its messages are acknowledged, the agents' ``batch_seq`` numbers of its messages go
back to each agent on ``tpo/v1/{site}/_agent/{agent}/stored`` (coalesced ranges; one
message per agent for the batches stored within ``ingest.confirm_interval_s``, or per batch
when it is 0), so that the agent frees them from its outbox. A link KPI message is
confirmed with its acknowledgement, after the merged window it contributes to is written.
Dead-lettered messages are confirmed too when their agent and ``batch_seq`` can still be read
(redelivering them would not help either); those that cannot be read are never confirmed and
leave the agent's outbox by its timeout path (republished with backoff until evicted).
A per-agent :class:`~edge.confirm.ReplayRecord` recognises a republished message: it is
acknowledged and confirmed again but neither written nor counted again
(``duplicates_skipped``; a replayed link KPI is not merged again). Each worker announces
itself, retained, on ``tpo/v1/{site}/_ingest/{client_id}/status`` (``online`` on every
connect, ``offline`` as last will and at an orderly stop), so that agents republish what is
unconfirmed as soon as a worker is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import orjson

from edge import confirm as stored
from edge import lineprotocol as lp
from edge import memory
from edge import payload as wire
from edge.backbone import Backbone, Message
from edge.errors import DecodeError, SinkError, SinkRejectedError
from edge.kpi import KpiIngest, decode_kpi, kpi_lines
from edge.spool import Spool
from pipelines.histogram import ExpHistogram

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy.typing as npt

    from edge.config import SiteConfig

log = logging.getLogger(__name__)

INT_ABSENT = np.iinfo(np.int64).min
NS_PER_S = 1_000_000_000
KPI_HOLD_SLACK_S = 30.0
"""A held link KPI message is acknowledged anyway this long after its merge was due
(its window was refused as too late, say): holding it longer would only block the session."""


class Sink(Protocol):
    """Where line protocol goes: InfluxDB (v1/v2) or the local SQLite store."""

    async def write(self, lines: bytes) -> None:
        """Store the lines or raise SinkError."""

    async def close(self) -> None:
        """Release connections."""


@dataclass
class IngestStats:
    """Counts the demo and self-metrics show."""

    messages: int = 0
    samples: int = 0
    points: int = 0
    writes: int = 0
    write_failures: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    per_device: Counter[tuple[str, str]] = field(default_factory=Counter)
    last_lag_ms: dict[tuple[str, str], float] = field(default_factory=dict)
    """Per device: now - ts_receive of its newest sample when ingest decoded it."""
    agent_metrics: int = 0
    """Agent self-metrics messages stored."""
    write_ms_last: float = 0.0
    write_ms_max: float = 0.0
    """Slowest database write since the last self-metrics point."""
    lag_ms_max: float = 0.0
    """Largest ingest lag (decode time - ts_receive) since the last self-metrics point."""
    stored_latency_ms: ExpHistogram = field(default_factory=ExpHistogram)
    """ts_receive at the agent -> written to the database, per sample (platform latency)."""
    arrival_latency_ms: ExpHistogram = field(default_factory=ExpHistogram)
    """ts_receive at the agent -> decoded here, per sample: the agent's and the broker's
    share of the platform latency (the rest is ingest's batching and the write)."""
    spooled_points: int = 0
    drained_points: int = 0
    drain_s: float = 0.0
    """Time spent in successful drain writes (drain rate = drained_points / drain_s)."""
    kpi_held: int = 0
    """Link KPI messages waiting for their window's merge before they are acknowledged."""
    duplicates_skipped: int = 0
    """Republished messages recognised by their agent's batch_seq: not stored again."""
    confirmations: int = 0
    """``tpo.stored/1`` messages published to agents."""


@functools.lru_cache(maxsize=4096)
def _signal_tag_sets(
    site: str, area: str, device: str, channels: tuple[str, ...]
) -> tuple[str, ...]:
    """The escaped tag set of each channel of a device (a device sends the same ones again)."""
    return tuple(
        lp.tag_set({"site": site, "area": area, "device": device, "channel": name})
        for name in channels
    )


def samples_to_lines(msg: wire.DecodedSamples) -> lp.Encoded:
    """Line protocol for the ``signal`` measurement of one decoded samples message."""
    return signal_lines([msg])


def signal_lines(msgs: Sequence[wire.DecodedSamples]) -> lp.Encoded:
    """Line protocol for the ``signal`` measurement of several decoded samples messages.

    One encode for all of them: the vectorised encoder's fixed cost per call is paid once
    per batch instead of once per message.
    """
    tag_sets: list[str] = []
    offset: dict[tuple[str, ...], int] = {}
    groups = []
    for msg in msgs:
        tags = _signal_tag_sets(msg.site, msg.area, msg.device, msg.channels)
        at = offset.get(tags)
        if at is None:
            at = offset[tags] = len(tag_sets)
            tag_sets.extend(tags)
        groups.append(msg.ch.astype(np.intp) + at)
    if not msgs:
        return lp.Encoded(b"", 0, 0)

    def cat(name: str) -> npt.NDArray[Any]:
        return np.concatenate([getattr(m, name) for m in msgs])

    ts_source, ts_receive, seq = cat("ts_source"), cat("ts_receive"), cat("seq")
    return lp.encode(
        "signal",
        tag_sets,
        np.concatenate(groups),
        np.where(ts_source == INT_ABSENT, ts_receive, ts_source),
        float_fields={"value": cat("value")},
        int_fields={
            "quality": cat("quality").astype(np.int64),
            "seq": np.where(seq < 0, INT_ABSENT, seq),
            "received_ns": ts_receive,
        },
        int_absent=INT_ABSENT,
    )


def deadletter_line(site: str, topic: str, reason: str, size: int) -> lp.Encoded:
    """One ``deadletter`` point recording a message ingest could not use."""
    quoted = reason.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
    try:
        tags = lp.tag_set({"site": site, "topic": topic})
    except ValueError:
        # A hostile topic (newline, trailing backslash) must not stop the record itself.
        clean = "".join(c if c.isprintable() and c != "\\" else "_" for c in topic)
        tags = lp.tag_set({"site": site, "topic": clean})
    line = f'deadletter,{tags} reason="{quoted}",bytes={size}i {time.time_ns()}\n'
    return lp.Encoded(line.encode(), 1, 0)


def metrics_line(site: str, agent: str, metrics: dict[str, float], ts_ns: int) -> lp.Encoded:
    """One ``agent`` point: every finite metric a float field (ValueError on bad names)."""
    fields = ",".join(
        f"{lp.escape_tag(name)}={float(v)!r}"
        for name, v in sorted(metrics.items())
        if name and math.isfinite(v)
    )
    if not fields:
        return lp.Encoded(b"", 0, 1)
    tags = lp.tag_set({"site": site, "agent": agent})
    return lp.Encoded(f"agent,{tags} {fields} {ts_ns}\n".encode(), 1, 0)


def decode_metrics(payload: bytes) -> tuple[str, int, dict[str, float]]:
    """(agent, ts, metrics) of a ``tpo.metrics/1`` message; raises DecodeError."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != wire.METRICS_SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise DecodeError(f"schema is {got!r}, want {wire.METRICS_SCHEMA!r}")
    agent, ts, metrics = doc.get("agent"), doc.get("ts"), doc.get("metrics")
    if not isinstance(agent, str) or not agent:
        raise DecodeError("header field 'agent' missing or not a string")
    if not isinstance(ts, int) or isinstance(ts, bool) or ts <= 0:
        raise DecodeError("header field 'ts' missing or not a positive integer")
    if not isinstance(metrics, dict):
        raise DecodeError("field 'metrics' must be an object")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if value is None:  # NaN travels as null: a metric without a value now
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DecodeError(f"metric {name!r} is not a number")
        out[str(name)] = float(value)
    return agent, ts, out


Ident = tuple[str, int]
"""(agent, batch_seq) of a message, for the confirmation (batch_seq 0: none)."""
NO_IDENT: Ident = ("", 0)


@dataclass
class _Batch:
    """What the consume loop collected since the last flush."""

    chunks: list[bytes] = field(default_factory=list)
    points: int = 0
    ack: list[Message] = field(default_factory=list)
    """Acknowledged once the batch is stored."""
    confirm: list[Ident] = field(default_factory=list)
    """Confirmed to their agents once the batch is stored and ``ack`` acknowledged."""
    hold: list[tuple[tuple[int, float], Message, Ident]] = field(default_factory=list)
    """Link KPI messages: acknowledged (and confirmed) once their window's merge is stored."""
    ts_receive: list[npt.NDArray[np.int64]] = field(default_factory=list)
    samples: list[wire.DecodedSamples] = field(default_factory=list)
    """Samples messages, encoded together when the batch is written (counted in points)."""
    arrival_ms: list[npt.NDArray[np.float64]] = field(default_factory=list)
    """Per message: ts_receive -> decoded here; recorded once per batch."""

    def add(self, encoded: lp.Encoded) -> None:
        if encoded.lines:
            self.chunks.append(encoded.data)
            self.points += encoded.lines

    def encode(self) -> tuple[bytes, int]:
        """The whole batch as line protocol, and its number of lines."""
        points = self.points - sum(len(m) for m in self.samples)
        encoded = signal_lines(self.samples)
        return b"".join([encoded.data, *self.chunks]), points + encoded.lines

    def empty(self) -> bool:
        return not (self.ack or self.hold or self.points)


@dataclass
class _Write:
    """A flushed batch on its way to the database.

    Its messages are acknowledged once it and every earlier batch are stored.
    """

    task: asyncio.Task[None]
    ack: list[Message]
    confirm: list[Ident] = field(default_factory=list)


class Ingest:
    """One ingest worker."""

    def __init__(self, site: SiteConfig, sink: Sink, *, client_id: str | None = None) -> None:
        """Prepare; nothing connects until :meth:`run`."""
        self.site = site
        self.sink = sink
        self.client_id = client_id or f"{site.ingest.client_id}-{site.site}"
        self.stats = IngestStats()
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._backbone: Backbone | None = None
        self.kpi = KpiIngest(site)  # KPI messages: stored, link histograms merged
        cfg = site.ingest
        self.spool: Spool | None = None
        if cfg.spool_dir is not None:
            self.spool = Spool(
                cfg.spool_dir / f"{self.client_id}.spool", cfg.spool_max_bytes, cfg.spool_full
            )
        self._db_up = asyncio.Event()
        self._db_up.set()
        self._spool_filled = asyncio.Event()
        self._held: dict[tuple[int, float], list[tuple[Message, Ident]]] = {}
        self._seen = stored.ReplayRecord()
        self._confirms: dict[str, list[int]] = {}
        """Per agent, batch_seqs stored and acknowledged, not yet confirmed (see
        ``ingest.confirm_interval_s``)."""
        self._confirm_timer: asyncio.TimerHandle | None = None
        """Per agent, the batch_seqs taken recently: a republished message is not stored twice."""
        self._writes: deque[_Write] = deque()
        """Writes in flight, oldest first; acknowledged in this order."""
        self._hold_due_ns = round((site.kpi.allowed_lateness_s + 5.0 + KPI_HOLD_SLACK_S) * NS_PER_S)
        self._next_metrics = 0.0

    @property
    def agent_name(self) -> str:
        """The ``agent`` tag of ingest's own self-metrics."""
        return f"_ingest-{self.client_id}"

    def topics(self) -> list[str]:
        """Subscriptions, shared when a share group is configured."""
        base = [
            f"{wire.PREFIX}/{self.site.site}/+/+/data",
            f"{wire.PREFIX}/{self.site.site}/_agent/+/metrics",
        ]
        group = self.site.ingest.share_group
        shared = [f"$share/{group}/{t}" for t in base] if group else base
        return [*shared, self.kpi.topic()]  # not shared: every worker merges every window

    def stop(self) -> None:
        """Ask for an orderly shutdown: the current batch is written and acknowledged."""
        self._stopping.set()

    @property
    def writes_in_flight(self) -> int:
        """Batches handed to the database (or spool) whose write has not finished yet."""
        return len(self._writes)

    def metrics(self) -> dict[str, float]:
        """Ingest's self-metrics (also written to the ``agent`` measurement)."""
        s = self.stats
        out: dict[str, float] = {
            "messages": s.messages,
            "samples": s.samples,
            "points": s.points,
            "writes": s.writes,
            "write_failures": s.write_failures,
            "write_ms_last": s.write_ms_last,
            "write_ms_max": s.write_ms_max,
            "ingest_lag_ms_max": s.lag_ms_max,
            "agent_metrics": s.agent_metrics,
            "kpi_held": s.kpi_held,
            "duplicates_skipped": s.duplicates_skipped,
            "confirmations": s.confirmations,
            "rss_bytes": memory.rss_bytes(),
        }
        for name, hist in (("stored", s.stored_latency_ms), ("arrival", s.arrival_latency_ms)):
            if hist.n:
                p50, p99 = hist.quantiles([0.5, 0.99])
                out[f"{name}_latency_p50_ms"] = float(p50)
                out[f"{name}_latency_p99_ms"] = float(p99)
        for reason, n in s.rejected.items():
            out[f"rejected.{_metric_name(reason)}"] = n
        if self.spool is not None:
            out["spool_points"] = self.spool.points
            out["spool_bytes"] = self.spool.nbytes
            out["spool_dropped_points"] = self.spool.dropped_points
            out["spool_refused"] = self.spool.refused
            out["spooled_points"] = s.spooled_points
            out["drained_points"] = s.drained_points
        if self._backbone is not None:
            out["backbone_reconnects"] = self._backbone.reconnects
        return out

    async def run(self) -> None:
        """Consume until stopped."""
        broker = self.site.ingest.broker(self.site.broker)
        status = (
            stored.ingest_status_topic(self.site.site, self.client_id)
            if stored.topic_name_ok(self.client_id)
            else None
        )
        backbone = Backbone(
            broker,
            client_id=self.client_id,
            will=None if status is None else (status, self._status("offline")),
            persistent_session=True,
            manual_ack=True,
            password=broker.password(),
        )
        self._backbone = backbone
        if status is not None:
            # After every CONNACK (the subscriptions are re-sent first, so they are in place
            # when an agent reacts): agents republish what is unconfirmed.
            backbone.on_connect = functools.partial(self._announce, backbone, status, "online")
        for topic in self.topics():
            backbone.subscribe(topic, qos=1)
        drainer: asyncio.Task[None] | None = None
        try:
            await backbone.connect()
            if self.spool is not None:
                drainer = asyncio.create_task(self._drain(self.spool), name="ingest.drain")
            self.ready.set()
            log.info("ingest %s ready: %s", self.client_id, " ".join(self.topics()))
            await self._consume(backbone)
            self._flush_confirmations()
            if status is not None and backbone.connected.is_set():
                fut = self._announce(backbone, status, "offline")
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2.0):
                        await fut
        finally:
            if self._confirm_timer is not None:
                self._confirm_timer.cancel()
            if drainer is not None:
                drainer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drainer
            await backbone.close()
            if self.spool is not None:
                await self.spool.close()

    def _status(self, state: str) -> bytes:
        return stored.encode_ingest_status(self.client_id, state, time.time_ns())

    def _announce(self, backbone: Backbone, topic: str, state: str) -> asyncio.Future[None]:
        fut = backbone.publish(topic, self._status(state), retain=True)
        fut.add_done_callback(_retrieve)
        return fut

    def _queue_confirmations(self, idents: list[Ident]) -> None:
        """Queue confirmations of stored and acknowledged messages; sent within the interval."""
        for agent, seq in idents:
            if seq > 0:
                self._confirms.setdefault(agent, []).append(seq)
        if not self._confirms:
            return
        interval = self.site.ingest.confirm_interval_s
        if interval <= 0:
            self._flush_confirmations()
        elif self._confirm_timer is None:
            loop = asyncio.get_running_loop()
            self._confirm_timer = loop.call_later(interval, self._flush_confirmations)

    def _flush_confirmations(self) -> None:
        """Tell each agent which of its messages are stored (fire and forget, QoS 1)."""
        if self._confirm_timer is not None:
            self._confirm_timer.cancel()
            self._confirm_timer = None
        backbone = self._backbone
        confirms, self._confirms = self._confirms, {}
        if backbone is None:
            return
        for agent, seqs in confirms.items():
            if not stored.topic_name_ok(agent):
                self.stats.rejected["unconfirmable agent id"] += 1
                continue
            payload = stored.encode_stored(self.client_id, seqs)
            fut = backbone.publish(stored.stored_topic(self.site.site, agent), payload, qos=1)
            fut.add_done_callback(_retrieve)
            self.stats.confirmations += 1

    # -- the consume loop ------------------------------------------------------------------

    async def _consume(self, backbone: Backbone) -> None:
        cfg = self.site.database
        loop = asyncio.get_running_loop()
        queue = backbone.messages
        batch = _Batch()
        deadline = loop.time() + cfg.flush_interval_s
        self._next_metrics = loop.time() + self.site.agent.metrics_interval_s
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                # Everything already received joins the batch without a wait per message.
                while batch.points < cfg.batch_points and not queue.empty():
                    self._take(queue.get_nowait(), batch)
                if batch.points >= cfg.batch_points or loop.time() >= deadline or stopping.done():
                    final = stopping.done() and queue.empty()
                    await self._flush(backbone, batch, final=final)
                    batch = _Batch()
                    deadline = loop.time() + cfg.flush_interval_s
                    if final:
                        await self._settle(backbone, 0)
                        return
                    continue
                await self._wait(queue, batch, stopping, deadline - loop.time())
                self._ack_written(backbone)
        finally:
            stopping.cancel()
            # Leaving early (cancelled, or a write failed for good): what is still in flight
            # stays unacknowledged, so the broker delivers it again.
            for write in self._writes:
                write.task.cancel()
            for write in self._writes:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await write.task
            self._writes.clear()

    async def _wait(
        self,
        queue: asyncio.Queue[Message],
        batch: _Batch,
        stopping: asyncio.Future[Any],
        wait_s: float,
    ) -> None:
        """Wait for a message, the flush deadline, the stop or the oldest write to finish."""
        getter = asyncio.ensure_future(queue.get())
        waits: set[asyncio.Future[Any]] = {getter, stopping}
        if self._writes:
            waits.add(self._writes[0].task)
        done, _ = await asyncio.wait(
            waits, timeout=max(0.0, wait_s), return_when=asyncio.FIRST_COMPLETED
        )
        if getter in done:
            self._take(getter.result(), batch)
            return
        getter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await getter
        if getter.done() and not getter.cancelled():
            self._take(getter.result(), batch)

    def _ack_written(self, backbone: Backbone) -> None:
        """Acknowledge finished writes, oldest first, stopping at the first still in flight."""
        while self._writes and self._writes[0].task.done():
            write = self._writes.popleft()
            write.task.result()  # a failed write raises: its messages stay unacknowledged
            for message in write.ack:
                backbone.ack(message)
            if write.confirm:
                self._queue_confirmations(write.confirm)

    async def _settle(self, backbone: Backbone, keep: int) -> None:
        """Wait until at most ``keep`` writes are in flight, acknowledging as they finish."""
        while len(self._writes) > keep:
            await asyncio.wait({self._writes[0].task})
            self._ack_written(backbone)

    def _take(self, message: Message, batch: _Batch) -> None:
        self.stats.messages += 1
        topic = message.topic
        if topic.endswith("/kpi"):
            self._take_kpi(message, batch)
            return
        batch.ack.append(message)
        if topic.endswith("/metrics"):
            batch.add(self._agent_metrics(message))
            return
        try:
            decoded = wire.decode_samples(message.payload)
        except DecodeError as exc:
            batch.add(self._reject(message, f"{exc}"))
            batch.confirm.append(stored.agent_and_seq(message.payload) or NO_IDENT)
            return
        ident = (decoded.agent, decoded.batch_seq)
        batch.confirm.append(ident)  # stored, rejected or a replay: confirmed either way
        parts = topic.split("/")
        if len(parts) != 6 or (parts[2], parts[3], parts[4]) != (
            decoded.site,
            decoded.area,
            decoded.device,
        ):
            names = f"{decoded.site}/{decoded.area}/{decoded.device}"
            batch.add(self._reject(message, f"topic does not match the payload's {names}"))
            return
        try:
            _signal_tag_sets(decoded.site, decoded.area, decoded.device, decoded.channels)
        except ValueError as exc:
            batch.add(self._reject(message, f"{exc}"))
            return
        if self._seen.seen(*ident):
            self.stats.duplicates_skipped += 1
            return
        self._seen.add(*ident)
        batch.samples.append(decoded)
        batch.points += len(decoded)
        self.stats.samples += len(decoded)
        dev = (decoded.area, decoded.device)
        self.stats.per_device[dev] += len(decoded)
        if len(decoded):
            batch.ts_receive.append(decoded.ts_receive)
            now = time.time_ns()
            batch.arrival_ms.append((now - decoded.ts_receive) / 1e6)
            lag_ms = (now - int(decoded.ts_receive.max())) / 1e6
            self.stats.last_lag_ms[dev] = lag_ms
            self.stats.lag_ms_max = max(self.stats.lag_ms_max, lag_ms)

    def _take_kpi(self, message: Message, batch: _Batch) -> None:
        try:
            msg = decode_kpi(message.payload)
        except DecodeError as exc:
            batch.add(self._reject(message, f"{exc}"))
            batch.ack.append(message)
            batch.confirm.append(stored.agent_and_seq(message.payload) or NO_IDENT)
            return
        ident = (msg.agent, msg.batch_seq)
        key = (msg.window_start_ns, msg.window_s)
        link = msg.kind == "link" and msg.histogram is not None
        if self._seen.seen(*ident):
            # A replay: not merged again. While the first copy waits for its merge, so does
            # this one (confirming it earlier would confirm a merge not yet written).
            self.stats.duplicates_skipped += 1
            if link and (key in self._held or any(k == key for k, _, _ in batch.hold)):
                batch.hold.append((key, message, ident))
            else:
                batch.ack.append(message)
                batch.confirm.append(ident)
            return
        try:
            encoded = self.kpi.encode(message.topic, message.payload)
        except DecodeError as exc:
            batch.add(self._reject(message, f"{exc}"))
            batch.ack.append(message)
            batch.confirm.append(ident)
            return
        self._seen.add(*ident)
        batch.add(encoded)
        if link:
            batch.hold.append((key, message, ident))
        else:
            batch.ack.append(message)
            batch.confirm.append(ident)

    def _agent_metrics(self, message: Message) -> lp.Encoded:
        try:
            agent, ts, metrics = decode_metrics(message.payload)
            encoded = metrics_line(self.site.site, agent, metrics, ts)
        except (DecodeError, ValueError) as exc:
            return self._reject(message, f"{exc}")
        parts = message.topic.split("/")
        if len(parts) != 6 or parts[4] != agent or parts[2] != self.site.site:
            return self._reject(message, f"topic does not match the payload's agent {agent!r}")
        self.stats.agent_metrics += 1
        return encoded

    def _reject(self, message: Message, reason: str) -> lp.Encoded:
        first = not self.stats.rejected
        self.stats.rejected[reason.split(":", maxsplit=1)[0]] += 1
        (log.warning if first else log.debug)(
            "ingest: rejected message on %s: %s", message.topic, reason
        )
        return deadletter_line(self.site.site, message.topic, reason, len(message.payload))

    async def _flush(self, backbone: Backbone, batch: _Batch, *, final: bool) -> None:
        """Merge due KPI windows and start storing the batch, waiting for a free write slot.

        Its messages are acknowledged once it and every earlier batch are stored.
        """
        if batch.arrival_ms:
            self.stats.arrival_latency_ms.record(np.concatenate(batch.arrival_ms))
        now = time.time_ns()
        merger = self.kpi.merger
        merged_points = merger.flush() if final else merger.due(now)
        batch.add(kpi_lines(self.site.site, merged_points))
        merged = {(p.window_start_ns, p.window_s) for p in merged_points}
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_metrics or final:
            self._next_metrics = loop.time() + self.site.agent.metrics_interval_s
            batch.add(metrics_line(self.site.site, self.agent_name, self.metrics(), now))
            self.stats.write_ms_max = self.stats.lag_ms_max = 0.0
        ack, confirm = batch.ack, batch.confirm
        self._release_held(batch, merged, now, final=final)
        if not batch.points:
            if not self._writes:
                for message in ack:
                    backbone.ack(message)
                self._queue_confirmations(confirm)
                return
            if not ack:
                return
        else:
            # A free slot first: at most writes_in_flight batches are written at once.
            await self._settle(backbone, self.site.database.writes_in_flight - 1)
        task = asyncio.create_task(self._store(batch), name="ingest.write")
        self._writes.append(_Write(task, ack, confirm))

    def _release_held(
        self, batch: _Batch, merged: set[tuple[int, float]], now: int, *, final: bool
    ) -> None:
        """Hold the batch's link KPI messages; release those whose merge this batch writes."""
        for key, message, ident in batch.hold:
            self._held.setdefault(key, []).append((message, ident))
        for key in list(self._held):
            end = key[0] + round(key[1] * NS_PER_S)
            if final or key in merged or now >= end + self._hold_due_ns:
                for message, ident in self._held.pop(key):  # after this batch (the merge)
                    batch.ack.append(message)
                    batch.confirm.append(ident)
        self.stats.kpi_held = sum(len(v) for v in self._held.values())

    async def _store(self, batch: _Batch) -> None:
        """Write one batch (database or spool); record the platform latency of its samples."""
        if not batch.points:
            return
        data, points = batch.encode()
        direct = await self._commit(data, points)
        if direct and batch.ts_receive:
            stored_ns = time.time_ns()
            ts = np.concatenate(batch.ts_receive)
            self.stats.stored_latency_ms.record((stored_ns - ts) / 1e6)

    # -- storing ---------------------------------------------------------------------------

    async def _commit(self, data: bytes, points: int) -> bool:
        """Make a batch durable in the database or the spool; True if in the database."""
        spool = self.spool
        if spool is None:
            await self._write_until_stored(data, points)
            return True
        if self._db_up.is_set():
            try:
                async with asyncio.timeout(self.site.ingest.spool_after_s):
                    await self._write_once(data, points)
            except (SinkError, TimeoutError) as exc:
                self.stats.write_failures += 1
                log.warning("ingest: database unavailable (%s); spooling to %s", exc, spool.path)
                self._db_up.clear()
            else:
                return True
        if await spool.put(data, points):
            self.stats.spooled_points += points
            self._spool_filled.set()
            return False
        # Full under backpressure: hold these messages unacknowledged until the database
        # takes them; the broker queues the rest.
        log.warning("ingest: spool %s full (%d bytes); holding messages", spool.path, spool.nbytes)
        await self._write_until_stored(data, points)
        return True

    async def _write_once(self, data: bytes, points: int) -> None:
        """One write through the sink (which retries transient errors itself)."""
        started = time.monotonic()
        try:
            await self.sink.write(data)
        except SinkRejectedError as exc:
            # The database refused some lines for good (a field type conflict, say) and
            # stored the rest, as InfluxDB's partial write does: retrying cannot help.
            self.stats.rejected["database_rejected"] += 1
            log.error(  # noqa: TRY400 - the database's message says it all; no traceback
                "ingest: database rejected part of a %d-point batch: %s", points, exc
            )
            note = deadletter_line(self.site.site, "_ingest", str(exc), len(data))
            await self.sink.write(note.data)
        took_ms = (time.monotonic() - started) * 1e3
        self.stats.write_ms_last = took_ms
        self.stats.write_ms_max = max(self.stats.write_ms_max, took_ms)
        self.stats.points += points
        self.stats.writes += 1

    async def _write_until_stored(self, data: bytes, points: int) -> None:
        attempt = 0
        while True:
            try:
                await self._write_once(data, points)
            except SinkError as exc:
                # The sink already retried transient errors; keep the messages unacknowledged
                # and try again, so the broker holds them meanwhile.
                attempt += 1
                self.stats.write_failures += 1
                log.warning(
                    "ingest: write of %d points failed (attempt %d): %s", points, attempt, exc
                )
                await asyncio.sleep(_backoff_s(attempt))
                continue
            return

    async def _drain(self, spool: Spool) -> None:
        """Write spooled batches back, oldest first, in large writes; live data goes direct."""
        cfg = self.site.ingest
        attempt = 0
        while True:
            if not spool.batches:
                self._db_up.set()
                self._spool_filled.clear()
                await self._spool_filled.wait()
                continue
            if attempt:
                await asyncio.sleep(_backoff_s(attempt, cap_s=10.0))
            batches = await spool.peek(cfg.drain_batch_points)
            points = sum(b.points for b in batches)
            started = time.monotonic()
            try:
                # While the database is down this is a probe: give up early and retry.
                limit = 60.0 if self._db_up.is_set() else cfg.spool_after_s
                async with asyncio.timeout(limit):
                    await self._write_once(b"".join(b.data for b in batches), points)
            except (SinkError, TimeoutError) as exc:
                attempt += 1
                self.stats.write_failures += 1
                self._db_up.clear()
                (log.info if attempt == 1 else log.debug)("ingest: drain waits: %s", exc)
                continue
            if attempt:
                log.info("ingest: database back; draining %d spooled points", spool.points)
            attempt = 0
            self._db_up.set()
            await spool.remove(batches)
            self.stats.drained_points += points
            self.stats.drain_s += time.monotonic() - started


def _retrieve(fut: asyncio.Future[None]) -> None:
    """Fire-and-forget publish: a failure (closed before PUBACK) is expected, not an error."""
    if not fut.cancelled():
        fut.exception()


def _backoff_s(attempt: int, cap_s: float = 30.0) -> float:
    """Capped exponential backoff with jitter and a non-zero minimum."""
    base = min(cap_s, 0.5 * 2**attempt)
    return float(max(0.5, base * random.uniform(0.5, 1.0)))


def _metric_name(reason: str) -> str:
    """A rejection reason as a field-key-safe metric name."""
    return "".join(c if c.isalnum() else "_" for c in reason.lower()).strip("_")[:60] or "other"
