"""The MQTT backbone client: paho-mqtt 2.x (MQTT 5) bridged to asyncio.

paho runs its network loop in its own thread; its callbacks only hand events to
the asyncio loop with ``call_soon_threadsafe``. Publishing returns a future that
resolves on the broker's PUBACK (QoS 1), after which the outbox waits for ingest's
confirmation (or, with ``delivery: broker``, forgets the message). Subscribers may use
manual acknowledgement: the broker redelivers anything not acknowledged when the session
resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.errors import SinkError

if TYPE_CHECKING:
    from collections.abc import Callable

    from edge.config import BrokerConfig

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600
"""How long the broker keeps a persistent session (and its queued QoS 1 messages)."""


@dataclass(frozen=True, slots=True)
class Message:
    """A message received from the broker; ack it with :meth:`Backbone.ack` when stored."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool


class Backbone:
    """An asyncio-friendly MQTT 5 client for the backbone."""

    def __init__(
        self,
        config: BrokerConfig,
        client_id: str,
        *,
        will: tuple[str, bytes] | None = None,
        persistent_session: bool = False,
        manual_ack: bool = False,
        max_inflight: int = 100,
        password: str | None = None,
    ) -> None:
        """Prepare a client; nothing connects until :meth:`connect`."""
        self.config = config
        self.client_id = client_id
        self.persistent_session = persistent_session
        self.manual_ack = manual_ack
        self.connected = asyncio.Event()
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        # Bounded by the broker: it sends at most its receive-maximum of
        # unacknowledged QoS 1 messages, and we acknowledge only after storing.
        self.reconnects = 0
        self.on_connect: Callable[[], object] | None = None
        """Called on the event loop after every CONNACK (the first one too), once the
        subscriptions are re-sent: what was unconfirmed may be published again."""
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._early_acks: set[int] = set()
        self._subscriptions: list[tuple[str, int]] = []
        self._ever_connected = False
        self._first_connect: asyncio.Future[None] = self._loop.create_future()
        self._closing = False

        self._v5 = config.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._v5 else not persistent_session,
            manual_ack=manual_ack,
        )
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        if config.username:
            client.username_pw_set(config.username, password)
        if config.tls is not None:
            client.tls_set(
                ca_certs=str(config.tls.ca_file),
                certfile=str(config.tls.cert_file) if config.tls.cert_file else None,
                keyfile=str(config.tls.key_file) if config.tls.key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_socket_open = _no_delay
        self._client = client

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self, timeout_s: float = 10.0) -> None:
        """Connect (and keep reconnecting in the background); wait for the first CONNACK."""
        self._closing = False
        if self._first_connect.done():
            self._first_connect = self._loop.create_future()
        where = f"{self.config.host}:{self.config.port}"
        try:
            if self._v5:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = SESSION_EXPIRY_S if self.persistent_session else 0
                self._client.connect_async(
                    self.config.host,
                    self.config.port,
                    keepalive=self.config.keepalive_s,
                    clean_start=not self.persistent_session,
                    properties=props,
                )
            else:
                self._client.connect_async(
                    self.config.host, self.config.port, keepalive=self.config.keepalive_s
                )
            self._client.loop_start()
            async with asyncio.timeout(timeout_s):
                await self._first_connect
        except TimeoutError as exc:
            await self.close()
            raise SinkError(f"broker {where}: no CONNACK within {timeout_s} s") from exc
        except (OSError, ValueError, SinkError) as exc:
            await self.close()
            raise SinkError(f"broker {where}: {exc}") from exc

    async def close(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        self._closing = True
        try:
            self._client.disconnect()
        except Exception as exc:
            log.debug("disconnect from %s failed: %s", self.client_id, exc)
        await asyncio.to_thread(self._client.loop_stop)
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(SinkError(f"{self.client_id}: closed before PUBACK"))

    async def __aenter__(self) -> Backbone:
        """Connect."""
        await self.connect()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        """Close."""
        await self.close()

    # -- publish / subscribe ---------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Hand a message to paho; the future resolves on PUBACK (QoS 1) or once sent (QoS 0)."""
        fut: asyncio.Future[None] = self._loop.create_future()
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            fut.set_exception(SinkError(f"publish to {topic}: {mqtt.error_string(info.rc)}"))
            return fut
        # paho calls on_publish for QoS 0 (when sent) as for QoS 1 (on PUBACK), possibly
        # before publish() returns: an early callback leaves the mid in _early_acks.
        with self._lock:
            if info.mid in self._early_acks:
                self._early_acks.discard(info.mid)
                fut.set_result(None)
            else:
                self._pending[info.mid] = fut
        return fut

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now and again after every reconnect."""
        self._subscriptions.append((topic, qos))
        if self.connected.is_set():
            self._client.subscribe(topic, qos)

    def ack(self, message: Message) -> None:
        """Acknowledge a message received with manual acknowledgement."""
        if self.manual_ack and message.qos > 0:
            self._client.ack(message.mid, message.qos)

    @property
    def inflight(self) -> int:
        """Messages published and not yet acknowledged by the broker."""
        with self._lock:
            return len(self._pending)

    # -- paho callbacks (paho's thread) ------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("broker refused %s: %s", self.client_id, reason)
            if not self._ever_connected:
                self._loop.call_soon_threadsafe(self._fail_first, str(reason))
            return
        for topic, qos in self._subscriptions:
            client.subscribe(topic, qos)
        if self._ever_connected:
            log.info("%s reconnected (session present: %s)", self.client_id, flags.session_present)
        self._ever_connected = True
        self._loop.call_soon_threadsafe(self._set_connected, True)  # noqa: FBT003

    def _fail_first(self, reason: str) -> None:
        if not self._first_connect.done():
            self._first_connect.set_exception(SinkError(f"connect refused: {reason}"))

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if not self._closing:
            log.warning("%s lost the broker: %s; reconnecting", self.client_id, reason)
            self.reconnects += 1
        self._loop.call_soon_threadsafe(self._set_connected, False)  # noqa: FBT003

    def _set_connected(self, up: bool) -> None:
        if up:
            self.connected.set()
            if not self._first_connect.done():
                self._first_connect.set_result(None)
            if self.on_connect is not None:
                try:
                    self.on_connect()
                except Exception:
                    log.exception("%s: on_connect hook failed", self.client_id)
        else:
            self.connected.clear()

    def _on_publish(
        self, _client: mqtt.Client, _userdata: Any, mid: int, _reason: Any, _props: Any
    ) -> None:
        with self._lock:
            fut = self._pending.pop(mid, None)
            if fut is None:
                self._early_acks.add(mid)
                return
        self._loop.call_soon_threadsafe(_resolve, fut)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        message = Message(msg.topic, bytes(msg.payload), msg.mid, msg.qos, bool(msg.retain))
        self._loop.call_soon_threadsafe(self.messages.put_nowait, message)


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Send each packet at once (TCP_NODELAY).

    With Nagle's algorithm a small packet waits for the ACK of the previous one, and the
    peer delays that ACK up to 40 ms when it has nothing to send back (an ingest worker
    acknowledges only after its write): every hop then adds up to 40 ms.
    """
    with contextlib.suppress(AttributeError, OSError):  # not TCP (websockets): nothing to do
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
