"""The ingest service: backbone messages in, line protocol out, acknowledged only once stored.

It subscribes with a persistent MQTT 5 session and manual acknowledgement, so
the broker keeps and redelivers anything the service had not stored when it
stopped or crashed. Messages are decoded, encoded as line protocol and
collected until about ``batch_points`` points or ``flush_interval_s``; the
batch is written to the sink (which retries with capped backoff), and only
then are its messages acknowledged. Replays are harmless: a point is
identified by measurement, tags and timestamp, so a replay overwrites itself.

Unusable messages are acknowledged (redelivering them would never help),
counted by reason and stored as a record in the ``deadletter`` measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edge import lineprotocol as lp
from edge import payload as wire
from edge.backbone import Backbone, Message
from edge.errors import DecodeError, SinkError, SinkRejectedError
from edge.kpi import KpiIngest

if TYPE_CHECKING:
    from edge.config import SiteConfig

log = logging.getLogger(__name__)

INT_ABSENT = np.iinfo(np.int64).min


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
    rejected: Counter[str] = field(default_factory=Counter)
    per_device: Counter[tuple[str, str]] = field(default_factory=Counter)
    last_lag_ms: dict[tuple[str, str], float] = field(default_factory=dict)


def samples_to_lines(msg: wire.DecodedSamples) -> lp.Encoded:
    """Line protocol for the ``signal`` measurement of one decoded samples message."""
    tag_sets = [
        lp.tag_set({"site": msg.site, "area": msg.area, "device": msg.device, "channel": name})
        for name in msg.channels
    ]
    ts = np.where(msg.ts_source == INT_ABSENT, msg.ts_receive, msg.ts_source)
    seq = np.where(msg.seq < 0, INT_ABSENT, msg.seq)
    return lp.encode(
        "signal",
        tag_sets,
        msg.ch,
        ts,
        float_fields={"value": msg.value},
        int_fields={
            "quality": msg.quality.astype(np.int64),
            "seq": seq,
            "received_ns": msg.ts_receive,
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

    def topics(self) -> list[str]:
        """Subscriptions, shared when a share group is configured."""
        base = [f"{wire.PREFIX}/{self.site.site}/+/+/data"]
        group = self.site.ingest.share_group
        shared = [f"$share/{group}/{t}" for t in base] if group else base
        return [*shared, self.kpi.topic()]  # not shared: every worker merges every window

    def stop(self) -> None:
        """Ask for an orderly shutdown: the current batch is written and acknowledged."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume until stopped."""
        backbone = Backbone(
            self.site.broker,
            client_id=self.client_id,
            persistent_session=True,
            manual_ack=True,
            password=self.site.broker.password(),
        )
        self._backbone = backbone
        for topic in self.topics():
            backbone.subscribe(topic, qos=1)
        await backbone.connect()
        self.ready.set()
        try:
            await self._consume(backbone)
        finally:
            await backbone.close()

    async def _consume(self, backbone: Backbone) -> None:
        cfg = self.site.database
        loop = asyncio.get_running_loop()
        chunks: list[bytes] = []
        held: list[Message] = []
        points = 0
        deadline = loop.time() + cfg.flush_interval_s
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                timeout = max(0.0, deadline - loop.time())
                getter = asyncio.ensure_future(backbone.messages.get())
                done, _ = await asyncio.wait(
                    {getter, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if getter in done:
                    message = getter.result()
                    encoded = self._encode(message)
                    if encoded is not None and encoded.lines:
                        chunks.append(encoded.data)
                        points += encoded.lines
                    held.append(message)
                else:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                    if getter.done() and not getter.cancelled():
                        backbone.messages.put_nowait(getter.result())
                if points >= cfg.batch_points or loop.time() >= deadline or stopping in done:
                    final = stopping in done and backbone.messages.empty()
                    merged = self.kpi.due(time.time_ns(), final=final)  # merged link KPIs
                    chunks.append(merged.data)
                    points += merged.lines
                    if held or merged.lines:
                        await self._write(b"".join(chunks), points)
                        for m in held:
                            backbone.ack(m)
                        chunks, held, points = [], [], 0
                    deadline = loop.time() + cfg.flush_interval_s
                if stopping in done and backbone.messages.empty():
                    return
        finally:
            stopping.cancel()

    def _encode(self, message: Message) -> lp.Encoded | None:
        self.stats.messages += 1
        if message.topic.endswith("/kpi"):
            try:
                return self.kpi.encode(message.topic, message.payload)
            except DecodeError as exc:
                return self._reject(message, f"{exc}")
        try:
            decoded = wire.decode_samples(message.payload)
        except DecodeError as exc:
            return self._reject(message, f"{exc}")
        parts = message.topic.split("/")
        if len(parts) != 6 or (parts[2], parts[3], parts[4]) != (
            decoded.site,
            decoded.area,
            decoded.device,
        ):
            names = f"{decoded.site}/{decoded.area}/{decoded.device}"
            return self._reject(message, f"topic does not match the payload's {names}")
        encoded = samples_to_lines(decoded)
        self.stats.samples += len(decoded)
        dev = (decoded.area, decoded.device)
        self.stats.per_device[dev] += len(decoded)
        if len(decoded):
            lag_ns = time.time_ns() - int(decoded.ts_receive[-1])
            self.stats.last_lag_ms[dev] = lag_ns / 1e6
        return encoded

    def _reject(self, message: Message, reason: str) -> lp.Encoded:
        first = not self.stats.rejected
        self.stats.rejected[reason.split(":", maxsplit=1)[0]] += 1
        (log.warning if first else log.debug)(
            "ingest: rejected message on %s: %s", message.topic, reason
        )
        return deadletter_line(self.site.site, message.topic, reason, len(message.payload))

    async def _write(self, data: bytes, points: int) -> None:
        attempt = 0
        while True:
            try:
                if data:
                    await self.sink.write(data)
            except SinkRejectedError as exc:
                # The database refused some lines for good (a field type conflict, say) and
                # stored the rest, as InfluxDB's partial write does: retrying cannot help.
                self.stats.rejected["database_rejected"] += 1
                log.error(  # noqa: TRY400 - the database's message says it all; no traceback
                    "ingest: database rejected part of a %d-point batch: %s", points, exc
                )
                await self._write(
                    deadletter_line(self.site.site, "_ingest", str(exc), len(data)).data, 1
                )
                return
            except SinkError as exc:
                # The sink already retried transient errors; keep the messages unacknowledged
                # and try again, so the broker holds them meanwhile.
                attempt += 1
                log.warning(
                    "ingest: write of %d points failed (attempt %d): %s", points, attempt, exc
                )
                await asyncio.sleep(min(30.0, 0.5 * 2**attempt))
                continue
            self.stats.points += points
            self.stats.writes += 1
            return
