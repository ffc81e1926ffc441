"""MQTT field-device driver: smart benches and EV chargers publishing JSON (paho-mqtt 2.x).

No network thread: paho runs on the event loop, which calls ``loop_read`` when
the socket is readable, ``loop_write`` when paho has output queued and
``loop_misc`` once a second (keepalive); only the blocking TCP/TLS connect runs
in a worker thread. A network thread of its own would share the GIL with the
parser and the two would hand it over at every socket call, which cost more
CPU than the parsing (bench/RESULTS.md). ``on_message`` only appends (topic,
payload, receive time) to a bounded inbox (``queue_size`` messages; when full
the message is dropped and counted as ``mqtt_queue_full``); validation,
sequence tracking, pseudonymisation and building SampleBatch rows happen in
:meth:`stream`, which drains up to ``max_batch`` messages into one batch.
Reconnects use capped exponential backoff with jitter (1 s to 30 s) and
resubscribe.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, TypeVar

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
    fast_meter,
    fast_status,
    parse_transaction,
)
from edge.errors import ConfigError, ConnectError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    from drivers.mqtt.schemas import MeterFields

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
_MAX_ROUTES = 4096
_READ_BURST = 1024
"""PUBLISH packets read per readable event before other tasks get a turn."""
_MISC_INTERVAL_S = 1.0
_RECONNECT_MIN_S, _RECONNECT_MAX_S = 1.0, 30.0


def _backoff(attempt: int) -> float:
    """Capped exponential backoff with jitter above a non-zero minimum."""
    high = min(_RECONNECT_MAX_S, _RECONNECT_MIN_S * 2.0**attempt)
    return random.uniform(_RECONNECT_MIN_S, max(high, _RECONNECT_MIN_S))


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
    """Columns of the batch being built: per sample (series, value), per group the rest.

    A group is a run of samples sharing source time, receive time and seq (one bench
    message, one MeterValue); its columns are repeated out with numpy at the end
    instead of being appended once per sample.
    """

    __slots__ = ("g_n", "g_rcv", "g_seq", "g_ts", "series", "value")

    def __init__(self) -> None:
        self.series: list[int] = []
        self.value: list[float] = []
        self.g_ts: list[int] = []
        self.g_rcv: list[int] = []
        self.g_seq: list[int] = []
        self.g_n: list[int] = []

    def add(self, series: int, value: float, ts: int, t_rcv: int, seq: int) -> None:
        """One sample as a group of its own."""
        self.series.append(series)
        self.value.append(value)
        self.g_ts.append(ts)
        self.g_rcv.append(t_rcv)
        self.g_seq.append(seq)
        self.g_n.append(1)

    def group(self, n: int, ts: int, t_rcv: int, seq: int) -> None:
        """Close a group of the last ``n`` samples appended to ``series`` and ``value``."""
        self.g_ts.append(ts)
        self.g_rcv.append(t_rcv)
        self.g_seq.append(seq)
        self.g_n.append(n)

    def mark(self) -> tuple[int, int]:
        """Where the next message starts, for :meth:`truncate`."""
        return len(self.series), len(self.g_n)

    def truncate(self, mark: tuple[int, int]) -> None:
        """Drop everything from a mark on (a message that failed half-way adds nothing)."""
        n, g = mark
        del self.series[n:], self.value[n:]
        del self.g_ts[g:], self.g_rcv[g:], self.g_seq[g:], self.g_n[g:]

    def batch(self) -> SampleBatch:
        n = len(self.series)
        counts = np.array(self.g_n, np.intp)
        return SampleBatch(
            series=np.array(self.series, np.int32),
            ts_source=np.repeat(np.array(self.g_ts, np.int64), counts),
            ts_receive=np.repeat(np.array(self.g_rcv, np.int64), counts),
            value=np.array(self.value, np.float64),
            quality=np.zeros(n, np.uint8),
            seq=np.repeat(np.array(self.g_seq, np.int64), counts),
        )


class _Msg:
    """Where the rows of one message go: device, receive time, unwrapped seq, batch."""

    __slots__ = ("device", "rows", "seq", "t_rcv")

    def __init__(self, device: str, t_rcv: int, seq: int, rows: _Rows) -> None:
        self.device = device
        self.t_rcv = t_rcv
        self.seq = seq
        self.rows = rows


class _Device:
    """What the hot path needs of one configured device, found with one topic lookup."""

    __slots__ = ("bench_names", "bench_series", "id", "kind", "meter_index", "series", "tracker")

    def __init__(self, device_id: str, kind: str) -> None:
        self.id = device_id
        self.kind = kind
        self.tracker: SeqTracker | None = None
        self.bench_series: list[int] = []
        self.bench_names: tuple[str, ...] = ()
        self.series: dict[str, int] = {}
        """Charger: series index by channel name (connector suffix included)."""
        self.meter_index: dict[tuple[int, str, str | None], int] = {}
        """Charger: (connector, measurand, phase) -> series, filled as samples arrive; only
        mapped measurands with a series get in, so its size is bounded by the series table."""


if TYPE_CHECKING:
    _Handler = Callable[[_Device, bytes, int, _Rows], None]
    """Turns one message of a known device and message type into rows."""


def _oversized(payload: bytes, max_bytes: int) -> NoReturn:
    msg = f"payload of {len(payload)} bytes exceeds {max_bytes}"
    raise Invalid("oversized", msg)


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
        area = config.area
        self._devices: dict[str, _Device] = {}
        self._charger_series: dict[str, dict[str, int]] = {}
        missing = 0
        for dev in config.devices:
            state = self._devices[dev.id] = _Device(dev.id, dev.kind)
            if dev.kind == "bench":
                names = []
                for ch in BENCH_CHANNELS:
                    idx = series.get(area, dev.id, ch.name)
                    if idx is None:
                        missing += 1
                    else:
                        state.bench_series.append(idx)
                        names.append(ch.name)
                state.bench_names = tuple(names)
            else:
                for n in range(1, dev.connectors + 1):
                    for ch in CHARGER_CHANNELS:
                        name = connector_channel(ch.name, n)
                        idx = series.get(area, dev.id, name)
                        if idx is None:
                            missing += 1
                        else:
                            state.series[name] = idx
                self._charger_series[dev.id] = state.series
        self._handlers: dict[str, _Handler] = {
            "telemetry": self._bench,
            "status": self._status,
            "meter": self._meter,
            "transaction": self._transaction,
        }
        self._routes: dict[str, tuple[_Handler, _Device]] = {}
        """Topic -> (handler, device) of topics that passed the topic checks once."""
        if missing:
            log.warning("%s: %d channels have no series and will be skipped", self.name, missing)
        self.seq: dict[str, SeqTracker] = {}
        self.transactions: dict[tuple[str, int], Transaction] = {}
        """Open transactions by (device, connector); carries the idTag pseudonym for logs."""
        self.last_transaction: dict[str, Transaction] = {}
        """The latest transaction seen per device (started or ended)."""
        self._warned: set[tuple[str, str]] = set()
        self._inbox: deque[tuple[str, bytes, int]] = deque()
        self._inbox_dropped = 0
        self._inbox_folded = 0
        self._received = 0  # PUBLISH packets seen by on_message, kept or dropped
        self._ready: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._client: mqtt.Client | None = None
        self._sock: Any = None  # the socket the loop watches for paho, while one is open
        self._keeper: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Event | None = None
        self._connect_failure: str | None = None
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
        self._loop_thread = threading.get_ident()
        self._ready = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._connect_failure = None
        client = self._make_client(where, password)
        self._client = client
        try:
            async with asyncio.timeout(broker.connect_timeout_s):
                client.connect_async(broker.host, broker.port, keepalive=broker.keepalive_s)
                # The TCP (and TLS) connect blocks: a worker thread does it, never the loop.
                await asyncio.to_thread(client.reconnect)
                await self._subscribed.wait()
        except TimeoutError:
            await self.close()
            reason = self._connect_failure or "no connection"
            msg = f"{where}: not subscribed within {broker.connect_timeout_s} s ({reason})"
            raise ConnectError(msg) from None
        except OSError as exc:
            await self.close()
            raise ConnectError(f"{where}: {exc}") from exc
        except BaseException:
            await self.close()  # a failed connect releases everything it took
            raise
        if self._connect_failure is not None:
            await self.close()
            raise ConnectError(f"{where}: {self._connect_failure}")
        self._keeper = asyncio.create_task(self._keep(), name=f"edge[{self.name}].keepalive")
        log.info("%s: subscribed to %s on %s", self.name, ", ".join(cfg.topics), where)

    def _make_client(self, where: str, password: str | None) -> mqtt.Client:
        """A paho client with our callbacks; it does not connect yet."""
        broker = self.config.broker
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=broker.client_id or "",
            clean_session=broker.clean_session,
            protocol=mqtt.MQTTv311,
        )
        if broker.username is not None:
            client.username_pw_set(broker.username, password)
        if broker.tls is not None:
            tls = broker.tls
            try:
                client.tls_set(
                    ca_certs=str(tls.ca_file) if tls.ca_file else None,
                    certfile=str(tls.cert_file) if tls.cert_file else None,
                    keyfile=str(tls.key_file) if tls.key_file else None,
                )
            except (OSError, ValueError) as exc:
                raise ConnectError(f"{where}: TLS setup failed: {exc}") from exc
        client.connect_timeout = broker.connect_timeout_s
        client.max_inflight_messages_set(1000)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    async def close(self) -> None:
        """Disconnect and stop the keepalive task; carries on past failures."""
        client, self._client = self._client, None
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        if client is None:
            return
        sock = self._sock
        try:
            client.disconnect()
            client.loop_write()  # send DISCONNECT now; paho then closes the socket
        except Exception as exc:  # closing must go on
            log.debug("%s: disconnect failed: %s", self.name, exc)
        if sock is not None and sock is self._sock:  # paho did not close it
            self._unwatch(sock)
            with contextlib.suppress(OSError):
                sock.close()

    async def _keep(self) -> None:
        """Keepalive pings while connected; reconnect with capped, jittered backoff when not."""
        attempt = 0
        while True:
            client = self._client
            if client is None:
                return
            if self._sock is not None:
                attempt = 0
                await asyncio.sleep(_MISC_INTERVAL_S)
                if client is self._client and self._sock is not None:
                    client.loop_misc()  # PINGREQ when due; a missed PINGRESP drops the link
                continue
            await asyncio.sleep(_backoff(attempt))
            attempt += 1
            if client is not self._client:
                return
            try:
                async with asyncio.timeout(self.config.broker.connect_timeout_s + 1.0):
                    await asyncio.to_thread(client.reconnect)
            except Exception as exc:  # whatever the cause, keep trying
                log.debug("%s: reconnect attempt %d failed: %s", self.name, attempt, exc)

    # -- paho's socket, watched by the event loop -----------------------------------------
    #
    # paho runs on the event loop (no network thread): the loop calls loop_read when the
    # socket is readable and loop_write when paho has queued output. A network thread
    # would share the GIL with the parser: the two then hand the GIL over at every
    # socket call, which cost more CPU than the parsing itself (bench/RESULTS.md).

    def _in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn now on the loop thread; from a connect worker thread, schedule it there."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._call(fn, *args)

    def _on_socket_open(self, client: mqtt.Client, _userdata: object, sock: Any) -> None:
        self._in_loop(self._watch, client, sock)

    def _on_socket_close(self, _client: mqtt.Client, _userdata: object, sock: Any) -> None:
        self._in_loop(self._unwatch, sock)

    def _on_socket_register_write(self, client: mqtt.Client, _u: object, sock: Any) -> None:
        self._in_loop(self._watch_write, client, sock)

    def _on_socket_unregister_write(self, _client: mqtt.Client, _u: object, sock: Any) -> None:
        self._in_loop(self._unwatch_write, sock)

    def _watch(self, client: mqtt.Client, sock: Any) -> None:
        loop = self._loop
        if loop is None or client is not self._client:
            with contextlib.suppress(OSError):
                sock.close()  # a connect that finished after we gave up on it
            return
        self._sock = sock
        loop.add_reader(sock, self._readable)

    def _unwatch(self, sock: Any) -> None:
        if self._loop is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if sock is self._sock:
            self._sock = None

    def _watch_write(self, client: mqtt.Client, sock: Any) -> None:
        if self._loop is not None and client is self._client:
            self._loop.add_writer(sock, client.loop_write)

    def _unwatch_write(self, sock: Any) -> None:
        if self._loop is not None:
            self._loop.remove_writer(sock)

    def _readable(self) -> None:
        """Read what the socket has, up to a burst, then wake :meth:`stream` once."""
        client = self._client
        if client is None:
            return
        for _ in range(_READ_BURST):  # then other tasks get a turn; select() calls us again
            before = self._received
            if client.loop_read() != mqtt.MQTT_ERR_SUCCESS or self._received == before:
                break  # connection lost (paho told on_disconnect), or no whole PUBLISH left
        sock = self._sock
        pending = getattr(sock, "pending", None)  # TLS: decrypted bytes select() cannot see
        if pending is not None and pending() and self._loop is not None:
            self._loop.call_soon(self._readable)
        if self._inbox and self._ready is not None:
            self._ready.set()

    # -- paho callbacks: hand over only ------------------------------------------------------

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
        self._received += 1
        inbox = self._inbox
        if len(inbox) >= self.config.queue_size:
            self._inbox_dropped += 1
        else:
            inbox.append((msg.topic, bytes(msg.payload), now_ns()))

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed while a worker still ran
            loop.call_soon_threadsafe(fn, *args)

    # -- event-loop side of the hand-over -----------------------------------------------------

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
                ready.clear()
                await ready.wait()
                if linger > 0 and len(inbox) < limit:
                    # Let a burst gather: one batch of many messages costs far less than
                    # many batches of one or two (numpy arrays per batch, consumer wake-ups).
                    await asyncio.sleep(linger)
            self._fold_drops()
            if len(inbox) <= limit:
                items = list(inbox)
                inbox.clear()
            else:
                items = [inbox.popleft() for _ in range(limit)]
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
        routes = self._routes
        max_bytes = self.config.max_payload_bytes
        for topic, payload, t_rcv in items:
            mark = rows.mark()
            try:
                if len(payload) > max_bytes:
                    _oversized(payload, max_bytes)
                route = routes.get(topic)
                if route is None:
                    route = self._route(topic)
                handler, device = route
                handler(device, payload, t_rcv, rows)
            except Invalid as bad:
                rows.truncate(mark)
                self._reject(topic, payload, bad)
            except Exception as exc:
                # A parser bug must not stop the source: dead-letter the message, go on.
                log.exception("%s: failed on a message from %s", self.name, topic)
                rows.truncate(mark)
                self._reject(topic, payload, Invalid("internal", f"{type(exc).__name__}"))
        return rows.batch()

    def _route(self, topic: str) -> tuple[_Handler, _Device]:
        """Check a topic (kind, device, message type) and remember the good ones."""
        parts = topic.split("/")
        if len(parts) < 3:
            raise Invalid("bad_topic", "topic is not <kind>/<device id>/<message>")
        kind, device_id, leaf = parts[-3], parts[-2], parts[-1]
        device = self._devices.get(device_id)
        if device is None:
            raise Invalid("unknown_device", f"device id {device_id!r} is not configured")
        if kind != device.kind:
            msg = f"device {device_id!r} is a {device.kind} but published on a {kind!r} topic"
            raise Invalid("wrong_topic", msg)
        if device.kind == "bench":
            if leaf != "telemetry":
                raise Invalid("bad_topic", f"bench message type {leaf!r} is not 'telemetry'")
        elif leaf not in _CHARGER_LEAVES:
            msg = f"charger message type {leaf!r} is not status, meter or transaction"
            raise Invalid("bad_topic", msg)
        route = (self._handlers[leaf], device)
        if len(self._routes) < _MAX_ROUTES:  # prefixes before <kind> are free-form: bound it
            self._routes[topic] = route
        return route

    def _bench(self, device: _Device, payload: bytes, t_rcv: int, rows: _Rows) -> None:
        names = device.bench_names
        fast = fast_bench(payload, names)
        if fast is None:
            msg = _validate(BenchTelemetry, payload)  # the precise reason, or an unusual form
            ts, raw_seq, vals = msg.ts, msg.seq, [msg.__dict__[name] for name in names]
        else:
            ts, raw_seq, vals = fast
        seq = self._track(device, raw_seq)
        series = device.bench_series
        if None in vals:  # optional sensors this bench does not have
            keep = [i for i, v in enumerate(vals) if v is not None]
            series, vals = [series[i] for i in keep], [vals[i] for i in keep]
        rows.series += series
        rows.value += vals
        rows.group(len(vals), ts, t_rcv, seq)

    def _status(self, device: _Device, payload: bytes, t_rcv: int, rows: _Rows) -> None:
        fast = fast_status(payload)
        if fast is None:
            st = _validate(ChargerStatus, payload)
            status = st.status if st.status is not None else st.connectorStatus
            assert status is not None  # the model requires exactly one of them
            fast = (st.ts, st.seq, st.connector, status, st.chargingState)
        ts, raw_seq, connector, name, state = fast
        m = _Msg(device.id, t_rcv, self._track(device, raw_seq), rows)
        if connector == 0:
            # OCPP 1.6 connector 0 is the charge point as a whole: no connector series.
            self.ctx.counters["mqtt_status_connector0"] += 1
            return
        self._row(m, connector, "status", _STATUS_CODE[name], ts)
        if state is not None:
            self._row(m, connector, "charging_state", _STATE_CODE[state], ts)

    def _meter(self, device: _Device, payload: bytes, t_rcv: int, rows: _Rows) -> None:
        fast: MeterFields | None = fast_meter(payload)
        if fast is None:
            mt = _validate(ChargerMeter, payload)
            groups = [
                (mv.timestamp, [(sv.measurand, sv.phase, sv.scaled()) for sv in mv.sampledValue])
                for mv in mt.meterValue
            ]
            fast = (mt.ts, mt.seq, mt.connector, groups)
        _, raw_seq, connector, groups = fast
        seq = self._track(device, raw_seq)
        index = device.meter_index
        series, values = rows.series, rows.value
        for stamp, samples in groups:
            n = 0
            for measurand, phase, value in samples:
                idx = index.get((connector, measurand, phase))
                if idx is None:
                    idx = self._meter_series(device, connector, measurand, phase)
                    if idx is None:
                        continue
                series.append(idx)
                values.append(value)
                n += 1
            if n:
                rows.group(n, stamp, t_rcv, seq)

    def _meter_series(
        self, device: _Device, connector: int, measurand: str, phase: str | None
    ) -> int | None:
        """Series of a sample (remembered), or None, counted, when it has none."""
        channel = MEASURANDS.get((measurand, phase))
        if channel is None:
            self.ctx.counters["mqtt_unmapped_measurand"] += 1
            return None
        idx = device.series.get(connector_channel(channel, connector))
        if idx is None:
            self._no_series(device.id, connector, channel)
            return None
        device.meter_index[(connector, measurand, phase)] = idx
        return idx

    def _transaction(self, device: _Device, payload: bytes, t_rcv: int, rows: _Rows) -> None:
        try:
            tx = parse_transaction(_load_json(payload))
        except ValidationError as exc:
            raise Invalid(*_validation_kind(exc)) from None
        m = _Msg(device.id, t_rcv, self._track(device, tx.seq), rows)
        self._transaction_rows(m, tx)

    def _track(self, device: _Device, raw: int) -> int:
        modulus = self.config.seq_modulus
        if raw >= modulus:
            raise Invalid("seq_range", f"seq {raw} is not below seq_modulus {modulus}")
        tracker = device.tracker
        if tracker is None:
            tracker = device.tracker = self.seq[device.id] = SeqTracker(modulus)
        before = tracker.gaps
        unwrapped, event = tracker.update(raw)
        if event == "next":
            return unwrapped
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
            self._no_series(m.device, connector, channel)
            return
        m.rows.add(idx, value, ts, m.t_rcv, m.seq)

    def _no_series(self, device: str, connector: int, channel: str) -> None:
        self.ctx.counters["mqtt_unknown_series"] += 1
        text = f"no series for connector {connector} channel {channel}; skipped"
        self._warn_once(device, f"series:{connector}:{channel}", text)

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
