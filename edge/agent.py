"""The edge agent: reads every source, batches per device, publishes over the backbone.

One supervisor (``asyncio.TaskGroup``) runs named tasks:

* ``edge[modbus:meter-1].poll`` / ``edge[mqtt:street].stream``: one per source;
  a failing source is retried with capped backoff and never stalls the others;
* ``edge.batcher``: publishes a device's batch when it is full or old enough (it sleeps
  until the oldest open batch falls due, not on a fixed tick, so no batch waits longer);
* ``edge.publisher``: moves outbox messages to the broker;
* ``edge.confirm`` (``delivery: stored``): takes ingest's ``tpo.stored/1`` confirmations off
  the agent's own ``.../_agent/{id}/stored`` topic, which free outbox messages, and publishes
  again what stayed unconfirmed too long (see :mod:`edge.outbox`, :mod:`edge.confirm`);
  every reconnect, and every ingest worker coming online, republishes what is unconfirmed;
* ``edge.metrics``: publishes self-metrics.

Reading never waits for the network: batches go into the bounded outbox.
:meth:`Agent.stop` shuts down in order: sources finish the read in progress,
batches are flushed, the outbox drains (bounded wait; with ``delivery: stored`` also for
confirmations, while they keep coming), clients close.

``batch_seq`` (in every samples and KPI message) starts above the outbox's last one and
above the wall clock in microseconds, so a restarted agent never reuses a number, also
without a durable outbox: ingest skips a number it has seen as a replay.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from drivers.base import Driver, DriverContext, SampleBatch, driver_class, now_ns
from edge import confirm as stored
from edge import memory
from edge import payload as wire
from edge.backbone import Backbone, Message
from edge.errors import DecodeError, SourceError
from edge.kpi import KpiEngine
from edge.outbox import OutboxItem, open_outbox
from pipelines.histogram import ExpHistogram

if TYPE_CHECKING:
    from collections.abc import Callable

    from edge.config import SiteConfig

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
LATENCY_STAGES = ("batch", "outbox", "ack", "total", "confirm")
"""Publish latency per stage, in ms: sample receipt -> outbox (batching), outbox -> handed to
the client, handed -> PUBACK, receipt -> PUBACK, and PUBACK -> ingest's stored confirmation
(``delivery: stored``); percentiles per metrics interval."""
SHUTDOWN_S = 15.0
"""How long :meth:`Agent.stop` waits for the outbox to drain (and confirmations)."""
SHUTDOWN_CONFIRM_IDLE_S = 2.0
"""At shutdown, give up waiting for confirmations after this long without one."""


def backoff(attempt: int, lo: float = BACKOFF_MIN_S, hi: float = BACKOFF_MAX_S) -> float:
    """Capped exponential backoff with full jitter above a non-zero minimum."""
    ceiling = min(hi, lo * 2.0 ** min(attempt, 16))
    return lo + random.random() * (ceiling - lo)


@dataclass
class DeviceBatch:
    """Samples of one device waiting to be published."""

    parts: list[SampleBatch] = field(default_factory=list)
    samples: int = 0
    first_ns: int = 0


@dataclass
class DeviceStats:
    """What the demo's live table shows per device."""

    samples: int = 0
    last_value: float = float("nan")
    last_channel: str = ""


class Agent:
    """One edge agent running the sources of a site file."""

    def __init__(
        self,
        site: SiteConfig,
        *,
        on_batch: Callable[[SampleBatch], None] | None = None,
    ) -> None:
        """Build the series table and the drivers; nothing connects yet."""
        self.site = site
        self.table = site.series_table()
        self.counters: Counter[str] = Counter()
        self.ctx = DriverContext(
            site=site.site,
            dead_letter=self._dead_letter,
            counters=self.counters,
            secret=site.secret(),
        )
        self.drivers: list[Driver] = [
            driver_class(source.type)(source, self.table, self.ctx) for source in site.sources
        ]
        self.outbox = open_outbox(site.agent)
        self.outbox.on_full_change = self._outbox_alarm
        self.latency = {stage: ExpHistogram() for stage in LATENCY_STAGES}
        self._latency_buf: dict[str, list[float]] = {stage: [] for stage in LATENCY_STAGES}
        """Latencies waiting to go into :attr:`latency`: one record call per many messages
        (a record costs tens of microseconds whatever the number of values)."""
        self.stats: dict[tuple[str, str], DeviceStats] = {}
        self._on_batch = on_batch
        self.kpi = KpiEngine(site, self.table, self.counters) if site.kpi.enabled else None
        devices = self.table.devices()
        dev_index = {d: i for i, d in enumerate(devices)}
        self._devices = devices
        self._device_of_series = np.array(
            [dev_index[(k.area, k.device)] for k in self.table], dtype=np.int32
        )
        self._pending: dict[int, DeviceBatch] = {}
        self._batch_opened = asyncio.Event()
        """Set when a device batch opens: the batcher then has a due time to wait for."""
        # Continues after a restart (the durable outbox remembers it), and starts above the
        # clock in microseconds, so that a restart without the file never reuses a number.
        self._batch_seq = max(self.outbox.last_batch_seq, time.time_ns() // 1000)
        if self.kpi is not None:
            self.kpi.next_seq = self._next_seq
        self._confirms_seen = 0
        self._stopping = asyncio.Event()
        self._sources_done = asyncio.Event()
        self._backbone: Backbone | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._status_topic: str | None = None
        self.started = asyncio.Event()
        self.sources_ready = asyncio.Event()
        """Set once every source has connected (subscribed, for pushed sources) at least once."""
        self._connected_once: set[str] = set()

    # -- topics --------------------------------------------------------------------------

    @property
    def agent_id(self) -> str:
        """This agent's id from the site file."""
        return self.site.agent.id

    def _status_payload(self, state: str) -> bytes:
        return wire.encode_json(
            {
                "schema": wire.STATUS_SCHEMA,
                "agent": self.agent_id,
                "state": state,
                "ts": now_ns(),
                "outbox_full": self.outbox.full,
            }
        )

    # -- run -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until :meth:`stop` is called; returns after an orderly shutdown."""
        status_topic = wire.agent_topic(self.site.site, self.agent_id, "status")
        backbone = Backbone(
            self.site.broker,
            client_id=f"tpo-agent-{self.site.site}-{self.agent_id}",
            will=(status_topic, self._status_payload("offline")),
            password=self.site.broker.password(),
        )
        self._backbone = backbone
        confirming = self.outbox.confirm
        if confirming:
            backbone.subscribe(stored.stored_topic(self.site.site, self.agent_id), qos=1)
            backbone.subscribe(stored.ingest_status_topic(self.site.site, "+"), qos=1)
            backbone.on_connect = self._republish_after_connect
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._connect_backbone(backbone, status_topic), name="edge.connect")
                sources = [
                    tg.create_task(self._run_source(d), name=f"edge[{_name(d)}].source")
                    for d in self.drivers
                ]
                batcher = tg.create_task(self._batcher(), name="edge.batcher")
                publisher = tg.create_task(self._publisher(backbone), name="edge.publisher")
                metrics = tg.create_task(self._metrics(backbone), name="edge.metrics")
                confirms = confirming and tg.create_task(
                    self._confirmations(backbone), name="edge.confirm"
                )
                kpi = self.kpi and tg.create_task(self.kpi.run(self.outbox), name="edge.kpi")
                self.started.set()
                await self._stopping.wait()
                # 1. sources: polled ones finish the read in progress; pushed ones are cancelled.
                await asyncio.gather(*sources, return_exceptions=True)
                self._sources_done.set()
                # 2. pipeline drain: every pending device batch into the outbox.
                batcher.cancel()
                await self._flush(force=True)
                if self.kpi is not None and kpi:  # open KPI windows, before the outbox drains
                    kpi.cancel()
                    await self.kpi.drain(self.outbox)
                # 3. outbox flush, bounded: what is not acknowledged by then is counted lost.
                deadline = asyncio.get_running_loop().time() + SHUTDOWN_S
                try:
                    async with asyncio.timeout_at(deadline):
                        await self.outbox.drained()
                except TimeoutError:
                    unacked = self.outbox.depth - self.outbox.unconfirmed
                    self.counters["shutdown_unacked_messages"] += unacked
                    log.warning("stopping with %d messages unacknowledged", unacked)
                else:
                    await self._await_confirmations(deadline)
                if self.outbox.unconfirmed:
                    # The broker has them; the durable outbox publishes them again next start.
                    self.counters["shutdown_unconfirmed_messages"] += self.outbox.unconfirmed
                publisher.cancel()
                metrics.cancel()
                if confirms:
                    confirms.cancel()
                if backbone.connected.is_set():
                    await _quietly(
                        backbone.publish(status_topic, self._status_payload("offline"), retain=True)
                    )
        finally:
            # 4. clients closed; the durable outbox keeps what was not acknowledged for next time.
            await backbone.close()
            await self.outbox.close()

    def stop(self) -> None:
        """Ask for an orderly shutdown (safe from signal handlers)."""
        self._stopping.set()

    async def _connect_backbone(self, backbone: Backbone, status_topic: str) -> None:
        attempt = 0
        while not self._stopping.is_set():
            try:
                await backbone.connect()
            except Exception as exc:
                log.warning("agent %s: backbone not reachable: %s", self.agent_id, exc)
                self.counters["backbone_connect_failures"] += 1
                await self._sleep(backoff(attempt))
                attempt += 1
                continue
            await backbone.publish(status_topic, self._status_payload("online"), retain=True)
            self._status_topic = status_topic
            log.info(
                "agent %s online at %s:%s",
                self.agent_id,
                backbone.config.host,
                backbone.config.port,
            )
            return

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    # -- sources ---------------------------------------------------------------------------

    async def _run_source(self, driver: Driver) -> None:
        name = _name(driver)
        attempt = 0
        while not self._stopping.is_set():
            try:
                await driver.connect()
            except SourceError as exc:
                (log.warning if attempt == 0 else log.debug)("%s: %s", name, exc)
                self.counters[f"connect_failures.{name}"] += 1
                await self._sleep(backoff(attempt))
                attempt += 1
                continue
            if attempt:
                log.info("%s: connected after %d attempts", name, attempt)
            attempt = 0
            self._connected_once.add(name)
            if len(self._connected_once) == len(self.drivers):
                self.sources_ready.set()
            try:
                if driver.polled:
                    await self._poll(driver)
                else:
                    await self._stream(driver)
            except SourceError as exc:
                log.warning("%s: %s; reconnecting", name, exc)
                self.counters[f"source_errors.{name}"] += 1
            finally:
                await driver.close()

    async def _poll(self, driver: Driver) -> None:
        interval = float(getattr(driver.config, "poll_interval_s", 1.0))
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self._stopping.is_set():
            await self._accept(await driver.read_batch())
            due += interval
            late = loop.time() - due
            if late > 0:
                self.counters[f"poll_overruns.{_name(driver)}"] += 1
                due = loop.time()
            await self._sleep(max(0.0, due - loop.time()))

    async def _stream(self, driver: Driver) -> None:
        stream = driver.stream()
        next_batch = asyncio.ensure_future(anext(stream))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {next_batch, stopping}, return_when=asyncio.FIRST_COMPLETED
                )
                if next_batch in done:
                    try:
                        batch = next_batch.result()
                    except StopAsyncIteration:
                        return
                    await self._accept(batch)
                    next_batch = asyncio.ensure_future(anext(stream))
                if stopping in done:
                    return
        finally:
            next_batch.cancel()
            stopping.cancel()
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    async def _accept(self, batch: SampleBatch) -> None:
        """Take a driver batch: split by device into the pending device batches."""
        if not len(batch):
            return
        self.counters["samples_read"] += len(batch)
        if self._on_batch is not None:
            self._on_batch(batch)
        if self.kpi is not None:
            self.kpi.add(batch)
        device = self._device_of_series[batch.series]
        order = np.argsort(device, kind="stable")
        bounds = np.flatnonzero(np.diff(device[order])) + 1
        now = now_ns()
        full: list[int] = []
        for rows in np.split(order, bounds):
            dev = int(device[rows[0]])
            part = batch.take(rows)
            pending = self._pending.setdefault(dev, DeviceBatch())
            if not pending.parts:
                pending.first_ns = now
                self._batch_opened.set()
            pending.parts.append(part)
            pending.samples += len(part)
            stats = self.stats.setdefault(self._devices[dev], DeviceStats())
            stats.samples += len(part)
            stats.last_value = float(part.value[-1])
            stats.last_channel = self.table[int(part.series[-1])].channel
            if pending.samples >= self.site.agent.batch_max_samples:
                full.append(dev)
        for dev in full:
            await self._publish_device(dev)

    # -- batching and publishing -------------------------------------------------------------

    async def _batcher(self) -> None:
        max_age = round(self.site.agent.batch_max_age_s * 1e9)
        while True:
            if not self._pending:
                self._batch_opened.clear()
                await self._batch_opened.wait()
            # New batches fall due after every open one: the oldest open batch is the next due.
            due = min(p.first_ns for p in self._pending.values()) + max_age
            wait_ns = due - now_ns()
            if wait_ns > 0:
                await asyncio.sleep(wait_ns / 1e9)
            await self._flush(force=False)

    async def _flush(self, *, force: bool) -> None:
        max_age = round(self.site.agent.batch_max_age_s * 1e9)
        # Batches due within the next eighth of the age go now as well: one wakeup serves
        # batches that fall due together, and none is published later than its age.
        due = now_ns() - max_age + max_age // 8
        for dev, pending in list(self._pending.items()):
            if pending.parts and (force or pending.first_ns <= due):
                await self._publish_device(dev)

    def _next_seq(self) -> int:
        self._batch_seq += 1
        return self._batch_seq

    async def _publish_device(self, dev: int) -> None:
        pending = self._pending.pop(dev)
        batch = SampleBatch.concat(pending.parts)
        area, device = self._devices[dev]
        limit = self.site.agent.batch_max_samples
        for start in range(0, len(batch), limit):
            part = batch.take(slice(start, start + limit))
            seq = self._next_seq()
            # Payload (batch_seq, timestamps) fixed here and stored: a replay is identical.
            data = wire.encode_samples(part, self.table, agent_id=self.agent_id, batch_seq=seq)
            topic = wire.device_topic(self.site.site, area, device, "data")
            item = OutboxItem(
                topic,
                data,
                len(part),
                received_ns=int(part.ts_receive.min()),
                batch_seq=seq,
            )
            await self.outbox.put(item)
            if item.received_ns and item.queued_ns:
                self._latency("batch", (item.queued_ns - item.received_ns) / 1e6)

    async def _publisher(self, backbone: Backbone) -> None:
        window = asyncio.Semaphore(100)
        while True:
            item = await self.outbox.take()
            await backbone.connected.wait()
            await window.acquire()
            sent_ns = time.time_ns()
            fut = backbone.publish(
                item.topic, item.payload, qos=self.site.broker.qos, retain=item.retain
            )
            fut.add_done_callback(
                functools.partial(self._acked, item=item, window=window, sent_ns=sent_ns)
            )

    def _acked(
        self,
        fut: asyncio.Future[None],
        *,
        item: OutboxItem,
        window: asyncio.Semaphore,
        sent_ns: int,
    ) -> None:
        window.release()
        if fut.cancelled() or fut.exception() is not None:
            self.counters["publish_failures"] += 1
            asyncio.ensure_future(self.outbox.requeue(item))  # noqa: RUF006 - awaited via drained()
            return
        if not item.acked_ns:  # a republished message was counted at its first PUBACK
            self.counters["messages_published"] += 1
            self.counters["samples_published"] += item.samples
        acked_ns = time.time_ns()
        if item.queued_ns:
            self._latency("outbox", (sent_ns - item.queued_ns) / 1e6)
        self._latency("ack", (acked_ns - sent_ns) / 1e6)
        if item.received_ns:
            self._latency("total", (acked_ns - item.received_ns) / 1e6)
        asyncio.ensure_future(self.outbox.done(item))  # noqa: RUF006 - awaited via drained()

    # -- delivery confirmation (delivery: stored) ---------------------------------------------

    async def _confirmations(self, backbone: Backbone) -> None:
        """Apply ingest's confirmations; republish what stayed unconfirmed too long."""
        cfg = self.site.agent
        own = stored.stored_topic(self.site.site, self.agent_id)
        timeout_ns = round(cfg.confirm_timeout_s * 1e9)
        cap_ns = round(cfg.confirm_timeout_max_s * 1e9)
        tick_s = min(5.0, max(0.05, cfg.confirm_timeout_s / 4))
        loop = asyncio.get_running_loop()
        next_check = loop.time() + tick_s
        while True:
            try:
                async with asyncio.timeout_at(next_check):
                    message = await backbone.messages.get()
            except TimeoutError:
                n = await self.outbox.republish_due(time.time_ns(), timeout_ns, cap_ns)
                if n:
                    self.counters["republished_timeout"] += n
                    log.info(
                        "agent %s: %d messages unconfirmed too long; republished", self.agent_id, n
                    )
                next_check = loop.time() + tick_s
                continue
            if message.topic == own:
                await self._confirmed(message)
            elif (
                message.topic.endswith("/status")
                and not message.retain  # a retained one is old news, sent on subscribe
                and stored.ingest_came_online(message.payload)
            ):
                await self._republish_all("ingest_online")

    async def _confirmed(self, message: Message) -> None:
        try:
            ranges = stored.decode_stored(message.payload)
        except DecodeError as exc:
            self.counters["confirmations_invalid"] += 1
            log.warning("agent %s: bad confirmation on %s: %s", self.agent_id, message.topic, exc)
            return
        self._confirms_seen += 1
        items = await self.outbox.confirm_ranges(ranges)
        now = time.time_ns()
        buf = self._latency_buf["confirm"]
        buf.extend((now - item.acked_ns) / 1e6 for item in items if item.acked_ns)
        if len(buf) >= 4096:
            self.flush_latency()

    def _republish_after_connect(self) -> None:
        """Backbone (re)connected: confirmations sent meanwhile are lost, so republish."""
        task = asyncio.get_running_loop().create_task(self._republish_all("reconnect"))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _republish_all(self, why: str) -> None:
        n = await self.outbox.republish_all()
        if n:
            self.counters[f"republished_{why}"] += n
            log.info("agent %s: %d unconfirmed messages republished (%s)", self.agent_id, n, why)

    async def _await_confirmations(self, deadline: float) -> None:
        """At shutdown: wait for confirmations while they keep coming (bounded)."""
        if not self._confirms_seen:
            return  # no ingest has confirmed anything: nobody to wait for
        loop = asyncio.get_running_loop()
        last, since = self.outbox.confirmed, loop.time()
        while self.outbox.depth and loop.time() < deadline:  # republished ones count too
            if self.outbox.confirmed != last:
                last, since = self.outbox.confirmed, loop.time()
            elif loop.time() - since > SHUTDOWN_CONFIRM_IDLE_S:
                return
            await asyncio.sleep(0.02)

    def _latency(self, stage: str, ms: float) -> None:
        buf = self._latency_buf[stage]
        buf.append(ms)
        if len(buf) >= 4096:  # bounded while no metrics go out (broker away)
            self.flush_latency()

    def flush_latency(self) -> None:
        """Move the buffered latencies into the :attr:`latency` histograms."""
        for stage, buf in self._latency_buf.items():
            if buf:
                self.latency[stage].record(buf)
                buf.clear()

    # -- dead letters and self-metrics -------------------------------------------------------

    def _dead_letter(self, source: str, raw: bytes, reason: str) -> None:
        """Publish unusable input with its reason on the dead-letter topic (never blocks)."""
        self.counters["dead_letters"] += 1
        doc = {
            "schema": wire.DEADLETTER_SCHEMA,
            "agent": self.agent_id,
            "source": source,
            "reason": reason,
            "ts": now_ns(),
            "payload_b64": base64.b64encode(raw[:65536]).decode(),
            "payload_bytes": len(raw),
        }
        safe = source.replace("+", "_").replace("#", "_").strip("/")
        topic = wire.deadletter_topic(self.site.site, self.agent_id, safe)
        task = asyncio.get_running_loop().create_task(
            self.outbox.put(OutboxItem(topic, wire.encode_json(doc), 0))
        )
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    def metrics(self) -> dict[str, float]:
        """Self-metrics: counters, outbox depth and bytes, drops by reason, reconnects, latency.

        Latency: ``latency_ms.<stage>.{n,p50,p99,max}`` over the current metrics interval,
        stages as in :data:`LATENCY_STAGES` (absent while a stage saw nothing).
        """
        out: dict[str, float] = {k: float(v) for k, v in self.counters.items()}
        out["outbox_depth"] = self.outbox.depth
        out["outbox_bytes"] = self.outbox.nbytes
        out["outbox_max_bytes"] = self.outbox.max_bytes
        out["outbox_full"] = float(self.outbox.full)
        out["outbox_durable"] = float(self.site.agent.outbox_dir is not None)
        out["outbox_replayed"] = getattr(self.outbox, "replayed", 0)
        out["outbox_dropped_samples"] = self.outbox.dropped_samples
        out["outbox_unconfirmed"] = self.outbox.unconfirmed
        out["republished_messages"] = self.outbox.republished
        out["unconfirmed_evicted"] = self.outbox.evicted
        out["confirmed_messages"] = self.outbox.confirmed
        out["rss_bytes"] = memory.rss_bytes()
        for reason, n in self.outbox.drops.items():
            out[f"drops.{reason}"] = n
        if self._backbone is not None:
            out["backbone_reconnects"] = self._backbone.reconnects
        self.flush_latency()
        for stage, hist in self.latency.items():
            if hist.n:
                p50, p99 = hist.quantiles([0.5, 0.99])
                out[f"latency_ms.{stage}.n"] = hist.n
                out[f"latency_ms.{stage}.p50"] = float(p50)
                out[f"latency_ms.{stage}.p99"] = float(p99)
                out[f"latency_ms.{stage}.max"] = hist.max
        return out

    def _outbox_alarm(self, full: bool) -> None:
        """The outbox's full flag flipped: count it and republish the retained status at once."""
        (log.warning if full else log.info)(
            "agent %s: outbox %s (%d bytes of %d)",
            self.agent_id,
            "full" if full else "below half again",
            self.outbox.nbytes,
            self.outbox.max_bytes,
        )
        if full:
            self.counters["outbox_full_alarms"] += 1
        backbone = self._backbone
        if backbone is not None and self._status_topic and backbone.connected.is_set():
            backbone.publish(self._status_topic, self._status_payload("online"), retain=True)

    async def _metrics(self, backbone: Backbone) -> None:
        topic = wire.agent_topic(self.site.site, self.agent_id, "metrics")
        while True:
            await asyncio.sleep(self.site.agent.metrics_interval_s)
            if backbone.connected.is_set():
                doc = {
                    "schema": wire.METRICS_SCHEMA,
                    "agent": self.agent_id,
                    "ts": now_ns(),
                    "metrics": self.metrics(),
                }
                backbone.publish(topic, wire.encode_json(doc), qos=0)
                # Percentiles per interval: start the next one empty.
                self.latency = {stage: ExpHistogram() for stage in LATENCY_STAGES}


def _name(driver: Driver) -> str:
    return f"{driver.config.type}:{driver.config.device}"


async def _quietly(fut: asyncio.Future[None], timeout_s: float = 2.0) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout_s):
            await fut
