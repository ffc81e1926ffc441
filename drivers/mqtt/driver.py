"""MQTT field-device driver: smart benches and EV chargers publishing JSON (paho-mqtt 2.x).

Threads and queues: paho's network thread runs ``on_message``, which only
appends (topic, payload, receive time) to a bounded inbox (``queue_size``
messages; when full the message is dropped and counted as ``mqtt_queue_full``)
and wakes the event loop with ``call_soon_threadsafe`` once per burst, not once
per message: a loop wake-up costs more than parsing a message, and at
tens of thousands of messages per second per-message wake-ups halved the rate.
Everything else (validation, sequence tracking, pseudonymisation, building
SampleBatch rows) happens in :meth:`stream`, which drains up to ``max_batch``
messages into one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import BaseModel, ValidationError

from drivers.base import (
    DriverBase,
    DriverContext,
    SampleBatch,
    SeriesTable,
    SourceConfig,
    now_ns,
    register,
)
from drivers.mqtt.config import (
    BENCH_CHANNELS,
    CHARGER_CHANNELS,
    CHARGER_STATUS_CODES,
    CHARGING_STATE_CODES,
    MqttFieldSource,
    connector_channel,
)
from drivers.mqtt.schemas import (
    MEASURANDS,
    BenchTelemetry,
    ChargerMeter,
    ChargerStatus,
    MeterValue,
    TransactionStartV16,
    TransactionStopV16,
    TransactionV201,
    fast_bench,
    parse_transaction,
)
from edge.errors import ConfigError, ConnectError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

PSEUDONYM_HEX = 16
"""Hex digits kept of HMAC-SHA256(site secret, idTag): 64 bits, collision-free at campus scale."""

_ID_KEYS = frozenset({"idtag", "idtoken", "parentidtag", "groupidtoken"})
_ID_RE = re.compile(
    rb'("(?:idTag|idToken|parentIdTag|groupIdToken)"\s*:\s*)"((?:[^"\\]|\\.)*)(?:"|\Z)',
    re.IGNORECASE,
)
_STATUS_CODE = {name: float(i) for i, name in enumerate(CHARGER_STATUS_CODES)}
_STATE_CODE = {name: float(i) for i, name in enumerate(CHARGING_STATE_CODES)}
_CHARGER_LEAVES = frozenset({"status", "meter", "transaction"})
_RECENT_SEQ = 1024
_M = TypeVar("_M", bound=BaseModel)


def pseudonymise(secret: bytes, id_tag: str) -> str:
    """Keyed hash of an idTag: HMAC-SHA256 truncated to :data:`PSEUDONYM_HEX` hex digits."""
    return hmac.new(secret, id_tag.encode(), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


def scrub_id_tags(payload: bytes, pseudo: Callable[[str], str]) -> bytes:
    """The payload with every idTag / idToken string replaced by its pseudonym.

    JSON payloads are walked (any depth, keys compared case-insensitively);
    anything else gets a regex pass, so even a broken payload leaves no raw idTag (a value
    cut off by truncation is pseudonymised up to the end of the payload).
    """
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return _ID_RE.sub(
            lambda m: (
                m.group(1) + b'"' + pseudo(m.group(2).decode("utf-8", "replace")).encode() + b'"'
            ),
            payload,
        )

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: pseudo(v) if k.lower() in _ID_KEYS and isinstance(v, str) else walk(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return json.dumps(walk(data), separators=(",", ":")).encode()


@dataclass(slots=True)
class SeqTracker:
    """Unwraps one device's sequence numbers and classifies each arrival."""

    modulus: int
    last_raw: int = -1
    last: int = -1
    gaps: int = 0
    duplicates: int = 0
    reordered: int = 0
    _recent: deque[int] = field(default_factory=lambda: deque(maxlen=_RECENT_SEQ))

    def update(self, raw: int) -> tuple[int, str]:
        """Unwrapped seq and one of ``first``, ``next``, ``gap``, ``duplicate``, ``reordered``."""
        if self.last_raw < 0:
            self._advance(raw, raw)
            return raw, "first"
        m = self.modulus
        delta = (raw - self.last_raw) % m
        if delta == 0:
            self.duplicates += 1
            return self.last, "duplicate"
        if delta < m // 2:
            unwrapped = self.last + delta
            self.gaps += delta - 1
            self._advance(raw, unwrapped)
            return unwrapped, "next" if delta == 1 else "gap"
        unwrapped = self.last - (m - delta)
        if unwrapped in self._recent:  # a linear scan, but only for late arrivals
            self.duplicates += 1
            return unwrapped, "duplicate"
        self.reordered += 1
        self._recent.append(unwrapped)
        return unwrapped, "reordered"

    def _advance(self, raw: int, unwrapped: int) -> None:
        self.last_raw, self.last = raw, unwrapped
        self._recent.append(unwrapped)


@dataclass(frozen=True, slots=True)
class Transaction:
    """An open charging transaction as the driver knows it (pseudonym only, never the idTag)."""

    transaction_id: str
    id_pseudonym: str | None
    meter_start_wh: float | None
    started_ns: int


class Invalid(Exception):  # noqa: N818 - a control-flow signal inside the parser, not an error
    """A payload that cannot be used: ``kind`` names the counter, ``reason`` the details."""

    def __init__(self, kind: str, reason: str) -> None:
        """Keep kind and reason."""
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class _Rows:
    """Column lists of the batch being built."""

    __slots__ = ("seq", "series", "ts_receive", "ts_source", "value")

    def __init__(self) -> None:
        self.series: list[int] = []
        self.value: list[float] = []
        self.ts_source: list[int] = []
        self.ts_receive: list[int] = []
        self.seq: list[int] = []

    def add(self, series: int, value: float, ts: int, t_rcv: int, seq: int) -> None:
        self.series.append(series)
        self.value.append(value)
        self.ts_source.append(ts)
        self.ts_receive.append(t_rcv)
        self.seq.append(seq)

    def extend(self, series: list[int], values: list[Any], ts: int, t_rcv: int, seq: int) -> None:
        n = len(series)
        self.series.extend(series)
        self.value.extend(values)
        self.ts_source.extend([ts] * n)
        self.ts_receive.extend([t_rcv] * n)
        self.seq.extend([seq] * n)

    def truncate(self, n: int) -> None:
        """Drop rows from n on (a message that failed half-way adds none)."""
        for col in (self.series, self.value, self.ts_source, self.ts_receive, self.seq):
            del col[n:]

    def batch(self) -> SampleBatch:
        return SampleBatch(
            series=np.array(self.series, np.int32),
            ts_source=np.array(self.ts_source, np.int64),
            ts_receive=np.array(self.ts_receive, np.int64),
            value=np.array(self.value, np.float64),
            quality=np.zeros(len(self.series), np.uint8),
            seq=np.array(self.seq, np.int64),
        )


class _Msg:
    """Where the rows of one message go: device, receive time, unwrapped seq, batch."""

    __slots__ = ("device", "rows", "seq", "t_rcv")

    def __init__(self, device: str, t_rcv: int, seq: int, rows: _Rows) -> None:
        self.device = device
        self.t_rcv = t_rcv
        self.seq = seq
        self.rows = rows


def _validate(model: type[_M], payload: bytes) -> _M:
    """Parse and validate in one pass (pydantic-core reads the JSON); precise reasons."""
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        if exc.errors(include_url=False)[0]["type"] == "json_invalid":
            _load_json(payload)  # raises Invalid("not_json") with the parser's position
        raise Invalid(*_validation_kind(exc)) from None


def _validation_kind(exc: ValidationError) -> tuple[str, str]:
    """(counter kind, reason) of a schema error; the reason never quotes input values."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]["type"]
    if first in {"model_type", "model_attributes_type"}:
        kind = "schema"
    elif first == "missing":
        kind = "missing_field"
    elif first == "finite_number":
        kind = "non_finite"
    elif first.endswith(("_type", "_parsing")):
        kind = "wrong_type"
    else:
        kind = "schema"
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors[:3]]
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return kind, "; ".join(parts) + more


def _load_json(payload: bytes) -> dict[str, Any]:
    """Parse a payload; NaN/Infinity literals are parsed so that the schema names the field."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        # orjson refuses NaN/Infinity; the stdlib reads them, and the strict schemas then
        # reject the non-finite value naming its field. Only bad payloads take this path.
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            raise Invalid("not_json", f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Invalid("schema", f"payload is a JSON {type(data).__name__}, not an object")
    return data


@register("mqtt")
class MqttFieldDriver(DriverBase):
    """Subscribes to field-device topics and turns their JSON into samples."""

    polled: ClassVar[bool] = False
    config: MqttFieldSource

    def __init__(self, config: SourceConfig, series: SeriesTable, ctx: DriverContext) -> None:
        """Plan the series of every device once; nothing connects yet."""
        if not isinstance(config, MqttFieldSource):
            raise ConfigError(
                f"mqtt:{config.device}", [("type", None, "needs an MqttFieldSource config")]
            )
        super().__init__(config, series, ctx)
        self._kind = {d.id: d.kind for d in config.devices}
        area = config.area
        self._bench_plan: dict[str, tuple[list[int], tuple[str, ...]]] = {}
        self._charger_series: dict[str, dict[str, int]] = {}
        missing = 0
        for dev in config.devices:
            if dev.kind == "bench":
                idxs, names = [], []
                for ch in BENCH_CHANNELS:
                    idx = series.get(area, dev.id, ch.name)
                    if idx is None:
                        missing += 1
                    else:
                        idxs.append(idx)
                        names.append(ch.name)
                self._bench_plan[dev.id] = (idxs, tuple(names))
            else:
                table: dict[str, int] = {}
                for n in range(1, dev.connectors + 1):
                    for ch in CHARGER_CHANNELS:
                        name = connector_channel(ch.name, n)
                        idx = series.get(area, dev.id, name)
                        if idx is None:
                            missing += 1
                        else:
                            table[name] = idx
                self._charger_series[dev.id] = table
        if missing:
            log.warning("%s: %d channels have no series and will be skipped", self.name, missing)
        self.seq: dict[str, SeqTracker] = {}
        self.transactions: dict[tuple[str, int], Transaction] = {}
        """Open transactions by (device, connector); carries the idTag pseudonym for logs."""
        self.last_transaction: dict[str, Transaction] = {}
        """The latest transaction seen per device (started or ended)."""
        self._warned: set[tuple[str, str]] = set()
        self._inbox: deque[tuple[str, bytes, int]] = deque()
        self._inbox_dropped = 0  # written by paho's thread only; folded into ctx.counters
        self._inbox_folded = 0
        self._wake_pending = False
        self._ready: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._subscribed: asyncio.Event | None = None
        self._connect_failure: str | None = None
        self._was_connected = False
        self._disconnected = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, subscribe and wait for the SUBACK; ConnectError names the broker."""
        cfg = self.config
        broker = cfg.broker
        where = f"{self.name}: broker {broker.host}:{broker.port}"
        if self._charger_series and not self.ctx.secret:
            raise ConfigError(
                self.name,
                [("secret", None, "a site secret is required to pseudonymise charger idTags")],
            )
        password = None
        if broker.password_env is not None:
            password = os.environ.get(broker.password_env)
            if password is None:
                raise ConnectError(f"{where}: environment variable {broker.password_env} unset")
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._subscribed = asyncio.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=broker.client_id or "",
            clean_session=broker.clean_session,
            protocol=mqtt.MQTTv311,
        )
        self._client = client
        if broker.username is not None:
            client.username_pw_set(broker.username, password)
        if broker.tls is not None:
            tls = broker.tls
            try:
                client.tls_set(
                    ca_certs=str(tls.ca) if tls.ca else None,
                    certfile=str(tls.cert) if tls.cert else None,
                    keyfile=str(tls.key) if tls.key else None,
                )
            except (OSError, ValueError) as exc:
                raise ConnectError(f"{where}: TLS setup failed: {exc}") from exc
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(1000)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        try:
            client.connect_async(broker.host, broker.port, keepalive=broker.keepalive_s)
            client.loop_start()
            async with asyncio.timeout(broker.connect_timeout_s):
                await self._subscribed.wait()
        except TimeoutError:
            reason = self._connect_failure or "no connection"
            msg = f"{where}: not subscribed within {broker.connect_timeout_s} s ({reason})"
            raise ConnectError(msg) from None
        except OSError as exc:
            raise ConnectError(f"{where}: {exc}") from exc
        if self._connect_failure is not None:
            raise ConnectError(f"{where}: {self._connect_failure}")
        log.info("%s: subscribed to %s on %s", self.name, ", ".join(cfg.topics), where)

    async def close(self) -> None:
        """Disconnect and stop paho's thread; carries on past failures."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.disconnect()
        except Exception as exc:  # closing must go on
            log.debug("%s: disconnect failed: %s", self.name, exc)
        try:
            await asyncio.to_thread(client.loop_stop)
        except Exception as exc:
            log.debug("%s: loop_stop failed: %s", self.name, exc)

    # -- paho thread callbacks: hand over only -----------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._connect_failure = f"connection refused: {reason}"
            self._call(self._set_subscribed)  # wake connect() so it fails fast
            return
        self._connect_failure = None
        # Resubscribe on every (re)connect: a broker restart without persistence forgets us.
        topics: list[tuple[str, int]] = [(t, self.config.qos) for t in self.config.topics]
        client.subscribe(topics)
        if self._disconnected:
            self._call(self._log_recovered)

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _mid: int,
        reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        refused = [t for t, r in zip(self.config.topics, reasons, strict=False) if r.is_failure]
        if refused:
            self._connect_failure = f"subscription refused for {', '.join(refused)}"
        self._call(self._set_subscribed)

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._call(self._note_disconnect, str(reason))

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        inbox = self._inbox
        if len(inbox) >= self.config.queue_size:
            self._inbox_dropped += 1
        else:
            inbox.append((msg.topic, bytes(msg.payload), now_ns()))
        # Append first, then look at the flag; stream() clears the flag before draining,
        # so a message is either drained by the current pass or triggers a new wake-up.
        if not self._wake_pending:
            self._wake_pending = True
            self._call(self._wake)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed while paho still ran
            loop.call_soon_threadsafe(fn, *args)

    # -- event-loop side of the hand-over -----------------------------------------------------

    def _wake(self) -> None:
        if self._ready is not None:
            self._ready.set()

    def _fold_drops(self) -> None:
        dropped = self._inbox_dropped
        if dropped != self._inbox_folded:
            self.ctx.counters["mqtt_queue_full"] += dropped - self._inbox_folded
            self._inbox_folded = dropped
            text = f"inbox of {self.config.queue_size} messages full; dropping"
            self._warn_once("*", "queue_full", text)

    def _set_subscribed(self) -> None:
        if self._subscribed is not None:
            self._subscribed.set()

    def _note_disconnect(self, reason: str) -> None:
        if self._client is None:
            return  # our own close()
        self.ctx.counters["mqtt_disconnects"] += 1
        self._disconnected = True
        self._warn_once("*", "disconnect", f"broker connection lost ({reason}); reconnecting")

    def _log_recovered(self) -> None:
        self._disconnected = False
        self.ctx.counters["mqtt_reconnects"] += 1
        log.info("%s: reconnected and resubscribed", self.name)

    # -- parsing -----------------------------------------------------------------------------

    async def stream(self) -> AsyncIterator[SampleBatch]:
        """Yield one batch per drained run of messages (up to ``max_batch``)."""
        ready = self._ready
        if ready is None:
            msg = f"{self.name}: stream() before connect()"
            raise RuntimeError(msg)
        inbox = self._inbox
        limit = self.config.max_batch
        linger = self.config.linger_s
        while True:
            if not inbox:
                await ready.wait()
                ready.clear()
                if linger > 0 and len(inbox) < limit:
                    # Let a burst gather: one batch of many messages costs far less than
                    # many batches of one or two (loop wake-ups, numpy arrays per batch).
                    await asyncio.sleep(linger)
            self._wake_pending = False
            self._fold_drops()
            items: list[tuple[str, bytes, int]] = []
            while inbox and len(items) < limit:
                items.append(inbox.popleft())
            if not items:
                continue
            batch = self.parse(items)
            if len(batch):
                yield batch
            else:
                await asyncio.sleep(0)  # a run of rejects must not starve the loop

    def parse(self, items: list[tuple[str, bytes, int]]) -> SampleBatch:
        """Turn (topic, payload, receive ns) messages into one batch; bad ones dead-lettered."""
        rows = _Rows()
        for topic, payload, t_rcv in items:
            mark = len(rows.series)
            try:
                self._handle(topic, payload, t_rcv, rows)
            except Invalid as bad:
                rows.truncate(mark)
                self._reject(topic, payload, bad)
            except Exception as exc:
                # A parser bug must not stop the source: dead-letter the message, go on.
                log.exception("%s: failed on a message from %s", self.name, topic)
                rows.truncate(mark)
                self._reject(topic, payload, Invalid("internal", f"{type(exc).__name__}"))
        return rows.batch()

    def _handle(self, topic: str, payload: bytes, t_rcv: int, rows: _Rows) -> None:
        if len(payload) > self.config.max_payload_bytes:
            msg = f"payload of {len(payload)} bytes exceeds {self.config.max_payload_bytes}"
            raise Invalid("oversized", msg)
        parts = topic.split("/")
        if len(parts) < 3:
            raise Invalid("bad_topic", "topic is not <kind>/<device id>/<message>")
        kind, device, leaf = parts[-3], parts[-2], parts[-1]
        dev_kind = self._kind.get(device)
        if dev_kind is None:
            raise Invalid("unknown_device", f"device id {device!r} is not configured")
        if kind != dev_kind:
            msg = f"device {device!r} is a {dev_kind} but published on a {kind!r} topic"
            raise Invalid("wrong_topic", msg)
        if dev_kind == "bench":
            self._bench(device, leaf, payload, t_rcv, rows)
        else:
            self._charger(device, leaf, payload, _Msg(device, t_rcv, -1, rows))

    def _bench(self, device: str, leaf: str, payload: bytes, t_rcv: int, rows: _Rows) -> None:
        if leaf != "telemetry":
            raise Invalid("bad_topic", f"bench message type {leaf!r} is not 'telemetry'")
        series, names = self._bench_plan[device]
        fast = fast_bench(payload, names)
        if fast is None:
            msg = _validate(BenchTelemetry, payload)  # the precise reason, or an unusual form
            ts, raw_seq, vals = msg.ts, msg.seq, [msg.__dict__[name] for name in names]
        else:
            ts, raw_seq, vals = fast
        seq = self._track(device, raw_seq)
        if None in vals:  # optional sensors this bench does not have
            keep = [i for i, v in enumerate(vals) if v is not None]
            series, vals = [series[i] for i in keep], [vals[i] for i in keep]
        rows.extend(series, vals, ts, t_rcv, seq)

    def _charger(self, device: str, leaf: str, payload: bytes, m: _Msg) -> None:
        if leaf not in _CHARGER_LEAVES:
            msg = f"charger message type {leaf!r} is not status, meter or transaction"
            raise Invalid("bad_topic", msg)
        if leaf == "status":
            st = _validate(ChargerStatus, payload)
            m.seq = self._track(device, st.seq)
            self._status_rows(m, st)
        elif leaf == "meter":
            mt = _validate(ChargerMeter, payload)
            m.seq = self._track(device, mt.seq)
            for mv in mt.meterValue:
                self._meter_rows(m, mt.connector, mv)
        else:
            try:
                tx = parse_transaction(_load_json(payload))
            except ValidationError as exc:
                raise Invalid(*_validation_kind(exc)) from None
            m.seq = self._track(device, tx.seq)
            self._transaction_rows(m, tx)

    def _track(self, device: str, raw: int) -> int:
        modulus = self.config.seq_modulus
        if raw >= modulus:
            raise Invalid("seq_range", f"seq {raw} is not below seq_modulus {modulus}")
        tracker = self.seq.get(device)
        if tracker is None:
            tracker = self.seq[device] = SeqTracker(modulus)
        before = tracker.gaps
        unwrapped, event = tracker.update(raw)
        if event == "gap":
            self.ctx.counters["mqtt_seq_gap"] += tracker.gaps - before
        elif event == "duplicate":
            self.ctx.counters["mqtt_seq_duplicate"] += 1
        elif event == "reordered":
            self.ctx.counters["mqtt_seq_reordered"] += 1
        return unwrapped

    def _row(self, m: _Msg, connector: int, channel: str, value: float, ts: int) -> None:
        idx = self._charger_series[m.device].get(connector_channel(channel, connector))
        if idx is None:
            self.ctx.counters["mqtt_unknown_series"] += 1
            text = f"no series for connector {connector} channel {channel}; skipped"
            self._warn_once(m.device, f"series:{connector}:{channel}", text)
            return
        m.rows.add(idx, value, ts, m.t_rcv, m.seq)

    def _status_rows(self, m: _Msg, st: ChargerStatus) -> None:
        if st.connector == 0:
            # OCPP 1.6 connector 0 is the charge point as a whole: no connector series.
            self.ctx.counters["mqtt_status_connector0"] += 1
            return
        name = st.status if st.status is not None else st.connectorStatus
        assert name is not None
        self._row(m, st.connector, "status", _STATUS_CODE[name], st.ts)
        if st.chargingState is not None:
            self._row(m, st.connector, "charging_state", _STATE_CODE[st.chargingState], st.ts)

    def _meter_rows(self, m: _Msg, connector: int, mv: MeterValue) -> float | None:
        """Rows of one MeterValue; returns its energy register (Wh) if it has one."""
        energy = None
        for sv in mv.sampledValue:
            channel = MEASURANDS.get((sv.measurand, sv.phase))
            if channel is None:
                self.ctx.counters["mqtt_unmapped_measurand"] += 1
                continue
            value = sv.scaled()
            if channel == "energy_wh":
                energy = value
            self._row(m, connector, channel, value, mv.timestamp)
        return energy

    def _transaction_rows(
        self, m: _Msg, tx: TransactionStartV16 | TransactionStopV16 | TransactionV201
    ) -> None:
        id_tag: str | None
        meter: float | None
        if isinstance(tx, TransactionStartV16):
            tx_id, starting, connector = str(tx.transactionId), True, tx.connectorId
            meter, id_tag = tx.meterStart, tx.idTag
            self._row(m, connector, "energy_wh", meter, tx.ts)
        elif isinstance(tx, TransactionStopV16):
            tx_id, starting = str(tx.transactionId), False
            connector = self._connector_of(m.device, tx_id, tx.connectorId or 1)
            meter, id_tag = tx.meterStop, tx.idTag
            self._row(m, connector, "energy_wh", meter, tx.ts)
        else:
            tx_id = tx.transactionInfo.transactionId
            connector = tx.connector
            meter = None
            for mv in tx.meterValue or ():
                found = self._meter_rows(m, connector, mv)
                meter = found if found is not None else meter
            state = tx.transactionInfo.chargingState
            if state is not None:
                self._row(m, connector, "charging_state", _STATE_CODE[state], tx.ts)
            if tx.eventType == "Updated":
                return
            starting = tx.eventType == "Started"
            id_tag = tx.idToken.idToken if tx.idToken is not None else None
        pseudonym = pseudonymise(self.ctx.secret, id_tag) if id_tag is not None else None
        del id_tag  # the raw idTag goes no further than this line
        self._row(m, connector, "transaction_active", 1.0 if starting else 0.0, tx.ts)
        if starting:
            self._started(m, connector, Transaction(tx_id, pseudonym, meter, tx.ts))
        else:
            self._ended(m, connector, Transaction(tx_id, pseudonym, meter, tx.ts))

    def _started(self, m: _Msg, connector: int, record: Transaction) -> None:
        self.transactions[(m.device, connector)] = record
        self.last_transaction[m.device] = record
        log.debug(
            "%s: %s transaction %s started on connector %d by %s",
            self.name, m.device, record.transaction_id, connector, record.id_pseudonym,
        )  # fmt: skip

    def _ended(self, m: _Msg, connector: int, stop: Transaction) -> None:
        """``stop`` carries meterStop in ``meter_start_wh``; emits the session energy."""
        started = self.transactions.pop((m.device, connector), None)
        if started is None or started.transaction_id != stop.transaction_id:
            # The start was lost (link, broker) or predates us: no session energy.
            self.ctx.counters["mqtt_transaction_start_unknown"] += 1
            self.last_transaction[m.device] = stop
            return
        if started.meter_start_wh is not None and stop.meter_start_wh is not None:
            session = stop.meter_start_wh - started.meter_start_wh
            self._row(m, connector, "session_energy_wh", session, stop.started_ns)
        self.last_transaction[m.device] = started
        log.debug(
            "%s: %s transaction %s ended on connector %d",
            self.name, m.device, stop.transaction_id, connector,
        )  # fmt: skip

    def _connector_of(self, device: str, tx_id: str, default: int) -> int:
        """The connector of an open transaction (an OCPP 1.6 stop carries no connector)."""
        for (dev, connector), record in self.transactions.items():
            if dev == device and record.transaction_id == tx_id:
                return connector
        return default

    # -- rejects -------------------------------------------------------------------------------

    def _pseudo(self, id_tag: str) -> str:
        return pseudonymise(self.ctx.secret, id_tag)

    def _reject(self, topic: str, payload: bytes, bad: Invalid) -> None:
        scrubbed = scrub_id_tags(payload, self._pseudo)
        if bad.kind == "oversized":
            scrubbed = scrubbed[: self.config.max_payload_bytes]  # bounded dead letters
        self.ctx.dead_letter(topic, scrubbed, f"{bad.kind}: {bad.reason}")
        self.ctx.counters[f"mqtt_invalid_{bad.kind}"] += 1
        parts = topic.split("/")
        device = parts[-2] if len(parts) >= 3 else topic
        self._warn_once(device, bad.kind, f"rejected {topic}: {bad.kind}: {bad.reason}")

    def _warn_once(self, device: str, kind: str, text: str) -> None:
        """WARNING the first time per (device, kind), DEBUG after that."""
        key = (device, kind)
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        log.log(level, "%s: %s", self.name, text)
