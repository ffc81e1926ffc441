r"""OPC UA driver: subscriptions (and optional polling) against one server endpoint.

Lifecycle of a session (connect builds up in steps and unwinds on failure):

1. security: GetEndpoints, then the strongest endpoint offered (``security_mode: auto``,
   never None when a secure one is offered) or the configured one, with a persisted
   client certificate; the server certificate must be in the trust list (or trusted on
   first use);
2. connect, read the namespace array (aliases -> indexes; indexes change, URIs do not);
3. resolve browse paths once (TranslateBrowsePathsToNodeIds, batched);
4. read OperationLimits/MaxNodesPerRead (polled reads are split by it);
5. one subscription with a monitored item per subscribed node.

The subscription handler only ``put_nowait``\\ s the raw notification into a
bounded queue (full: dropped and counted as ``opcua_queue_full``); ``stream()``
turns queued notifications into :class:`SampleBatch` objects. A lost session
(server restart, status change, watchdog silence) is closed and rebuilt with
capped exponential backoff plus jitter, which recreates the subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import socket
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import numpy as np
from asyncua import ua as _ua
from asyncua.client.client import Client
from asyncua.crypto import cert_gen
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.crypto.truststore import TrustStore
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from drivers.base import (
    BAD,
    GOOD,
    NO_SEQ,
    NO_TIMESTAMP,
    DriverBase,
    DriverContext,
    SampleBatch,
    SeriesTable,
    SourceConfig,
    register,
)
from drivers.opcua.config import OpcUaNode, OpcUaSource, parse_browse_path
from edge.errors import ConfigError, ConnectError, ReadError, SourceError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from pathlib import Path

    from asyncua.common.subscription import DataChangeNotif, Subscription

_log = logging.getLogger(__name__)
ua: Any = _ua
"""asyncua's type module, untyped here: its NewTypes (Int16...) reject plain ints."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_BATCH = 50_000
"""Most notifications turned into one SampleBatch (keeps batches bounded under bursts)."""
_SECURE_RANK = {
    ua.MessageSecurityMode.SignAndEncrypt: 2,
    ua.MessageSecurityMode.Sign: 1,
}
"""Secure message modes, stronger ranked higher (security_mode auto takes the strongest)."""
_LOST = object()
"""Queue marker: the subscription reported a status change (session lost)."""


def datetime_to_ns(dt: datetime | None) -> int:
    """Ns since the epoch of an OPC UA DateTime (naive means UTC); NO_TIMESTAMP for None."""
    if dt is None:
        return int(NO_TIMESTAMP)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    d = dt - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000_000 + d.microseconds * 1_000


def quality_of(status: ua.StatusCode | None) -> int:
    """Quality code from the severity bits of a StatusCode: Good 0, Uncertain 1, Bad 2."""
    if status is None:
        return GOOD
    severity = (int(status.value) >> 30) & 0b11
    return min(severity, BAD)  # 0b11 is reserved: treat it as Bad


def numeric(value: Any) -> float | None:
    """A sample value as float (booleans 0/1, enums as their code); None when not numeric."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    return None


class _Handler:
    """asyncua subscription handler: only enqueues, never does I/O."""

    def __init__(self, queue: asyncio.Queue[Any], counters: Any) -> None:
        self.queue = queue
        self.counters = counters
        self.last_data = time.monotonic()
        self.status: Any = None

    def datachange_notification(self, _node: Any, _val: Any, data: DataChangeNotif) -> None:
        """Queue (notification, receive time); count a drop when the queue is full."""
        self.last_data = time.monotonic()
        try:
            self.queue.put_nowait((data.monitored_item, time.time_ns()))
        except asyncio.QueueFull:
            self.counters["opcua_queue_full"] += 1

    def status_change_notification(self, status: Any) -> None:
        """The server (or the client on transport loss) ended the subscription."""
        self.status = status
        with contextlib.suppress(asyncio.QueueFull):  # a full queue wakes the consumer anyway
            self.queue.put_nowait((_LOST, self))
        self.counters["opcua_status_change"] += 1

    def event_notification(self, _event: Any) -> None:
        """Events are not subscribed; present because asyncua looks the method up."""


class _Session:
    """What one connected session holds; dropped as a whole on reconnect."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.subscription: Subscription | None = None
        self.handler: _Handler | None = None
        self.poll_ids: list[tuple[int, ua.NodeId]] = []
        """(series index, node id) of polled nodes."""
        self.node_ids: list[ua.NodeId] = []
        """Resolved NodeId of every configured node, in config order."""
        self.handles: dict[int, int] = {}
        """Monitored item client handle -> series index."""
        self.max_nodes_per_read = 0
        self.lost: str | None = None


class Backoff:
    """Capped exponential backoff with jitter and a non-zero minimum."""

    def __init__(self, minimum: float, maximum: float) -> None:
        """Delays start at ``minimum`` and double up to ``maximum``."""
        self.minimum = minimum
        self.maximum = maximum
        self.attempt = 0

    def next(self) -> float:
        """The next delay: uniform in [d/2, d], d capped exponential, never below minimum."""
        cap = min(self.maximum, self.minimum * 2.0**self.attempt)
        self.attempt = min(self.attempt + 1, 32)
        return max(self.minimum, random.uniform(cap / 2.0, cap))

    def reset(self) -> None:
        """Start over after a success."""
        self.attempt = 0


@register("opcua")
class OpcUaDriver(DriverBase):
    """Reads one OPC UA server: monitored items pushed by a subscription, others polled."""

    polled: ClassVar[bool] = False
    config: OpcUaSource

    def __init__(self, config: SourceConfig, series: SeriesTable, ctx: DriverContext) -> None:
        """Keep config and look up the series index of every node."""
        if not isinstance(config, OpcUaSource):
            raise TypeError(f"OpcUaDriver needs an OpcUaSource, got {type(config).__name__}")
        super().__init__(config, series, ctx)
        problems: list[tuple[str, int | None, str]] = []
        self._series: list[int] = []
        for i, node in enumerate(config.nodes):
            index = series.get(config.area, config.device, node.channel)
            if index is None:
                problems.append(
                    (f"nodes[{i}].channel", None, f"{node.channel!r} not in series table")
                )
                index = -1
            self._series.append(index)
        if problems:
            raise ConfigError(f"opcua source {config.device}", problems)
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=config.queue_batches)
        self._session: _Session | None = None
        self._backoff = Backoff(config.reconnect_min_s, config.reconnect_max_s)
        self._next_poll = 0.0
        self._failures = 0
        self.security_in_use: str | None = None
        """``policy/mode`` of the last session (``None/None`` unsecured), once connected."""

    # --- public lifecycle ---------------------------------------------------

    async def connect(self) -> None:
        """Open a session and start the subscription; ConnectError naming device and endpoint."""
        if self._session is None:
            self._session = await self._open()

    async def close(self) -> None:
        """Close the session, carrying on past failing steps."""
        session, self._session = self._session, None
        if session is not None:
            await self._close_session(session)

    async def stream(self) -> AsyncIterator[SampleBatch]:
        """Yield batches as the server pushes them and polls come due; reconnect on loss."""
        while True:
            if self._session is None:
                await self._reconnect()
            session = self._session
            assert session is not None
            batch = await self._collect(session)
            if len(batch):
                yield batch
            if session.lost is not None:
                self.ctx.counters["opcua_reconnects"] += 1
                _log.warning("%s: session lost (%s); reconnecting", self.name, session.lost)
                self._session = None
                await self._close_session(session)

    async def read_once(self) -> SampleBatch:
        """Read every configured node once (polled and subscribed alike); for tools and tests."""
        session = self._session
        if session is None:
            raise ReadError(f"{self._where()}: not connected")
        ids = [(self._series[i], nid) for i, nid in enumerate(session.node_ids)]
        return await self._read(session, ids)

    # --- session building -----------------------------------------------------

    def _where(self) -> str:
        return f"opcua device {self.config.device!r} at {self.config.endpoint}"

    def _fail(
        self, what: str, exc: BaseException, kind: type[SourceError] = ConnectError
    ) -> NoReturn:
        """Map an asyncua/OS exception to edge.errors, naming device, endpoint and step."""
        if isinstance(exc, SourceError):
            raise exc
        if isinstance(exc, TimeoutError):
            detail = f"timed out after {self.config.timeout_s} s"
        elif isinstance(exc, ua.UaStatusCodeError):
            detail = ua.StatusCode(exc.code).name
        elif isinstance(exc, OSError | ConnectionError):
            detail = f"{type(exc).__name__}: {exc}"
        else:
            detail = f"{type(exc).__name__}: {exc}"
        raise kind(f"{self._where()}: {what}: {detail}") from exc

    async def _open(self) -> _Session:
        cfg = self.config
        client = Client(cfg.endpoint, timeout=cfg.timeout_s)
        client.name = client.description = f"tpo-edge {cfg.area}/{cfg.device}"
        client.application_uri = f"urn:tpo-edge:opcua-client:{socket.gethostname()}"
        # A short session timeout lets the server drop our old session soon after a reconnect.
        client.session_timeout = max(30_000, int(cfg.watchdog_s * 3_000))
        session = _Session(client)
        try:
            if not cfg.security_off:
                await self._setup_security(client)
            self._set_credentials(client)
            try:
                async with asyncio.timeout(cfg.timeout_s * 2):
                    await client.connect()
            except Exception as exc:
                self._fail("connect", exc)
            session.node_ids = await self._resolve(client)
            session.max_nodes_per_read = await self._read_limit(client)
            await self._subscribe(session)
        except BaseException:
            await self._close_session(session)
            raise
        self._next_poll = 0.0
        _log.info(
            "%s: connected to %s (%d subscribed, %d polled, MaxNodesPerRead %d)",
            self.name,
            cfg.endpoint,
            len(session.handles),
            len(session.poll_ids),
            session.max_nodes_per_read,
        )
        return session

    def _set_credentials(self, client: Client) -> None:
        """Username and the password from the environment variable the config names."""
        cfg = self.config
        if cfg.username is None or cfg.password_env is None:
            return
        password = os.environ.get(cfg.password_env)
        if password is None:
            msg = f"{self._where()}: environment variable {cfg.password_env} is not set"
            raise ConnectError(msg)
        client.set_user(cfg.username)
        client.set_password(password)

    async def _close_session(self, session: _Session) -> None:
        client = session.client
        try:
            async with asyncio.timeout(self.config.timeout_s):
                await client.disconnect()
        except asyncio.CancelledError:
            client.disconnect_socket()
            raise
        except Exception as exc:
            _log.debug("%s: disconnect failed (%r); closing the socket", self.name, exc)
            with contextlib.suppress(Exception):
                client.disconnect_socket()

    async def _reconnect(self) -> None:
        """Open a session, retrying with backoff; log the first failure loudly, repeats at DEBUG."""
        while True:
            try:
                self._session = await self._open()
            except SourceError as exc:
                self.ctx.counters["opcua_connect_failed"] += 1
                self._failures += 1
                level = logging.WARNING if self._failures == 1 else logging.DEBUG
                delay = self._backoff.next()
                _log.log(level, "%s: %s; retrying in %.1f s", self.name, exc, delay)
                await asyncio.sleep(delay)
            else:
                if self._failures:
                    _log.info("%s: recovered after %d failed attempts", self.name, self._failures)
                self._failures = 0
                self._backoff.reset()
                return

    async def _setup_security(self, client: Client) -> None:
        """Read the server's endpoints, choose one, and secure the client for it (trust applies)."""
        cfg = self.config
        try:
            async with asyncio.timeout(cfg.timeout_s * 2):
                endpoints = await client.connect_and_get_server_endpoints()
        except Exception as exc:
            self._fail("connect (GetEndpoints)", exc)
        endpoint = self._choose_endpoint(endpoints)
        choice = (
            "None/None"
            if endpoint is None
            else f"Basic256Sha256/{_mode_name(endpoint.SecurityMode)}"
        )
        (_log.info if choice != self.security_in_use else _log.debug)(
            "%s: security %s (%s; server offers %s)",
            self.name,
            choice,
            "auto" if cfg.security_auto else "configured",
            _offered(endpoints),
        )
        self.security_in_use = choice
        if endpoint is None:
            return
        if cfg.client_cert_dir is None or cfg.trust_dir is None:
            raise ConnectError(
                f"{self._where()}: the server offers {choice} and security_mode auto never falls "
                "back to None: set client_cert_dir and trust_dir (or security_mode: None to "
                "connect unsecured on purpose)"
            )
        cert_path, key_path = await asyncio.to_thread(self._client_certificate, client)
        # The endpoint may carry a chain; the first certificate is the server's own.
        first = x509.load_der_x509_certificate(_first_der(endpoint.ServerCertificate))
        der = first.public_bytes(serialization.Encoding.DER)
        await self._check_trust(der)
        try:
            await client.set_security(
                SecurityPolicyBasic256Sha256,
                str(cert_path),
                str(key_path),
                server_certificate=der,
                mode=endpoint.SecurityMode,
            )
        except Exception as exc:
            self._fail("set security", exc)

    def _choose_endpoint(self, endpoints: Sequence[Any]) -> Any:
        """The Basic256Sha256 endpoint to use, or None for an unsecured session.

        ``auto`` takes the strongest offered (SignAndEncrypt > Sign) and returns None only
        when the server offers no secure endpoint at all: a secure endpoint we cannot use
        (another policy) is a ConnectError, never a silent downgrade.
        """
        cfg = self.config
        tcp = [ep for ep in endpoints if str(ep.EndpointUrl).startswith(ua.OPC_TCP_SCHEME)]
        secure = [ep for ep in tcp if ep.SecurityMode in _SECURE_RANK]
        ours = [ep for ep in secure if ep.SecurityPolicyUri == SecurityPolicyBasic256Sha256.URI]
        if not cfg.security_auto:
            mode = getattr(ua.MessageSecurityMode, cfg.security_mode)
            ours = [ep for ep in ours if ep.SecurityMode == mode]
        if ours:
            return max(ours, key=lambda ep: _SECURE_RANK[ep.SecurityMode])
        if secure or not cfg.security_auto or cfg.security_policy != "auto":
            wanted = "Sign or SignAndEncrypt" if cfg.security_auto else cfg.security_mode
            raise ConnectError(
                f"{self._where()}: server offers no endpoint Basic256Sha256/{wanted} "
                f"(it offers {_offered(endpoints)}); not falling back to None"
            )
        return None

    def _client_certificate(self, client: Client) -> tuple[Path, Path]:
        """The persisted client certificate and key; generated once (keys never leave the dir)."""
        directory = self.config.client_cert_dir
        assert directory is not None
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / "client_cert.der"
        key_path = directory / "client_key.pem"
        if cert_path.exists() and key_path.exists():
            return cert_path, key_path
        key = cert_gen.generate_private_key()
        cert = cert_gen.generate_self_signed_app_certificate(
            key,
            f"tpo-edge {socket.gethostname()}",
            {"organizationName": "tpo-edge"},
            [
                x509.UniformResourceIdentifier(client.application_uri),
                x509.DNSName(socket.gethostname()),
            ],
            extended=[ExtendedKeyUsageOID.CLIENT_AUTH],
            days=3650,
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(cert_gen.dump_private_key_as_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        _log.info("%s: generated client certificate %s", self.name, cert_path)
        return cert_path, key_path

    async def _check_trust(self, der: bytes) -> None:
        """Accept the server certificate only if it (or its CA) is in trust_dir."""
        cfg = self.config
        assert cfg.trust_dir is not None
        trust_dir = cfg.trust_dir
        fingerprint = hashlib.sha256(der).hexdigest()
        known = await asyncio.to_thread(_trusted_fingerprints, trust_dir)
        if fingerprint in known:
            return
        cert = x509.load_der_x509_certificate(der)
        if known:
            store = TrustStore([trust_dir], [])
            await store.load_trust()
            if store.is_trusted(cert):
                return
        if cfg.trust_on_first_use and not known:
            trust_dir.mkdir(parents=True, exist_ok=True)
            (trust_dir / f"{fingerprint[:16]}.der").write_bytes(der)
            _log.warning(
                "%s: trusting server certificate %s on first use", self.name, fingerprint[:16]
            )
            return
        rejected = None
        if cfg.client_cert_dir is not None:
            rejected = cfg.client_cert_dir / "rejected" / f"{fingerprint[:16]}.der"
            rejected.parent.mkdir(parents=True, exist_ok=True)
            rejected.write_bytes(der)
        hint = (
            f"; it was saved to {rejected}, move it into {trust_dir} to trust it"
            if rejected
            else ""
        )
        raise ConnectError(
            f"{self._where()}: server certificate sha256:{fingerprint[:16]} "
            f"({cert.subject.rfc4514_string()}) is not trusted{hint}"
        )

    async def _namespace_indexes(self, client: Client) -> dict[str, int]:
        cfg = self.config
        if not cfg.namespaces and not any((n.node_id or "").startswith("nsu=") for n in cfg.nodes):
            return {}
        try:
            async with asyncio.timeout(cfg.timeout_s):
                array: list[str] = await client.get_namespace_array()
        except Exception as exc:
            self._fail("read NamespaceArray", exc)
        index = {uri: i for i, uri in enumerate(array)}
        out: dict[str, int] = {}
        for alias, uri in cfg.namespaces.items():
            if uri not in index:
                raise ConnectError(f"{self._where()}: namespace {alias}={uri} not on the server")
            out[alias] = index[uri]
        out.update({f"uri:{uri}": i for uri, i in index.items()})
        return out

    def _node_id(self, node: OpcUaNode, ns: dict[str, int]) -> ua.NodeId:
        text = node.node_id
        assert text is not None
        if text.startswith("nsu="):
            uri, _, rest = text[4:].partition(";")
            if f"uri:{uri}" not in ns:
                raise ConnectError(
                    f"{self._where()}: node {node.channel!r}: namespace {uri} unknown"
                )
            text = f"ns={ns[f'uri:{uri}']};{rest}"
        try:
            return ua.NodeId.from_string(text)
        except Exception as exc:
            raise ConnectError(
                f"{self._where()}: node {node.channel!r}: bad node_id {text!r}"
            ) from exc

    def _relative_path(self, path: str, ns: dict[str, int]) -> ua.RelativePath:
        rel = ua.RelativePath()
        current = 0
        for prefix, name in parse_browse_path(path):
            if prefix is not None:
                current = int(prefix) if prefix.isdigit() else ns[prefix]
            element = ua.RelativePathElement()
            element.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
            element.IsInverse = False
            element.IncludeSubtypes = True
            element.TargetName = ua.QualifiedName(name, current)
            rel.Elements.append(element)
        return rel

    async def _resolve(self, client: Client) -> list[ua.NodeId]:
        """NodeIds of every configured node; browse paths translated in batches per session."""
        cfg = self.config
        ns = await self._namespace_indexes(client)
        ids: list[ua.NodeId | None] = [None] * len(cfg.nodes)
        paths: list[tuple[int, ua.BrowsePath]] = []
        for i, node in enumerate(cfg.nodes):
            if node.node_id is not None:
                ids[i] = self._node_id(node, ns)
            else:
                assert node.browse_path is not None
                bp = ua.BrowsePath()
                bp.StartingNode = ua.NodeId(ua.ObjectIds.ObjectsFolder)
                bp.RelativePath = self._relative_path(node.browse_path, ns)
                paths.append((i, bp))
        missing: list[str] = []
        chunk = cfg.max_nodes_per_read
        for start in range(0, len(paths), chunk):
            part = paths[start : start + chunk]
            try:
                async with asyncio.timeout(cfg.timeout_s):
                    results = await client.uaclient.translate_browsepaths_to_nodeids(
                        [bp for _, bp in part]
                    )
            except Exception as exc:
                self._fail("TranslateBrowsePathsToNodeIds", exc)
            for (i, _), result in zip(part, results, strict=True):
                if result.StatusCode.is_good() and result.Targets:
                    ids[i] = ua.NodeId(
                        result.Targets[0].TargetId.Identifier,
                        result.Targets[0].TargetId.NamespaceIndex,
                    )
                else:
                    node = cfg.nodes[i]
                    missing.append(f"{node.channel} ({node.browse_path}: {result.StatusCode.name})")
        if missing:
            raise ConnectError(f"{self._where()}: browse paths not found: {'; '.join(missing)}")
        return [nid for nid in ids if nid is not None]

    async def _read_limit(self, client: Client) -> int:
        """The server's MaxNodesPerRead (0 means no limit), else the configured fallback."""
        fallback = self.config.max_nodes_per_read
        node = client.get_node(
            ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead
        )
        try:
            async with asyncio.timeout(self.config.timeout_s):
                value = await node.read_value()
        except (TimeoutError, ua.UaError, OSError, ConnectionError) as exc:
            _log.debug("%s: MaxNodesPerRead unreadable (%r); using %d", self.name, exc, fallback)
            return fallback
        return int(value) if isinstance(value, int) and value > 0 else fallback

    async def _subscribe(self, session: _Session) -> None:
        cfg = self.config
        client = session.client
        wanted = [i for i, n in enumerate(cfg.nodes) if n.mode == "subscribe"]
        session.poll_ids = [
            (self._series[i], session.node_ids[i])
            for i, n in enumerate(cfg.nodes)
            if n.mode == "poll"
        ]
        if not wanted:
            return
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = cfg.publishing_interval_ms
        # Keepalives about three times per watchdog window, so silence means trouble.
        keepalive = max(1, int(cfg.watchdog_s * 1000.0 / 3.0 / cfg.publishing_interval_ms))
        params.RequestedMaxKeepAliveCount = keepalive
        params.RequestedLifetimeCount = keepalive * 10
        params.MaxNotificationsPerPublish = 0
        params.PublishingEnabled = True
        params.Priority = 0
        handler = _Handler(self._queue, self.ctx.counters)
        session.handler = handler
        requests = []
        for i in wanted:
            node = cfg.nodes[i]
            item = ua.ReadValueId()
            item.NodeId = session.node_ids[i]
            item.AttributeId = ua.AttributeIds.Value
            mp = ua.MonitoringParameters()
            mp.ClientHandle = i + 1
            mp.SamplingInterval = node.sampling_interval_ms
            mp.QueueSize = node.queue_size
            mp.DiscardOldest = True
            if node.deadband_abs is not None:
                dc = ua.DataChangeFilter()
                dc.Trigger = ua.DataChangeTrigger.StatusValue
                dc.DeadbandType = ua.DeadbandType.Absolute
                dc.DeadbandValue = node.deadband_abs
                mp.Filter = dc
            req = ua.MonitoredItemCreateRequest()
            req.ItemToMonitor = item
            req.MonitoringMode = ua.MonitoringMode.Reporting
            req.RequestedParameters = mp
            requests.append(req)
            session.handles[i + 1] = self._series[i]
        try:
            async with asyncio.timeout(cfg.timeout_s):
                session.subscription = await client.create_subscription(params, handler)
                results = await session.subscription.create_monitored_items(requests)
        except Exception as exc:
            self._fail("create subscription", exc)
        failed = [
            f"{cfg.nodes[i].channel} ({r.name})"
            for i, r in zip(wanted, results, strict=True)
            if isinstance(r, ua.StatusCode)
        ]
        if failed:
            raise ConnectError(f"{self._where()}: monitored items refused: {'; '.join(failed)}")

    # --- data path ------------------------------------------------------------

    async def _collect(self, session: _Session) -> SampleBatch:
        """Wait for notifications, a due poll or a watchdog tick; return what arrived."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        batches: list[SampleBatch] = []
        if session.poll_ids and loop.time() >= self._next_poll:
            self._next_poll = max(self._next_poll + cfg.poll_interval_s, loop.time())
            try:
                batches.append(await self._read(session, session.poll_ids))
            except ReadError as exc:
                self.ctx.counters["opcua_read_error"] += 1
                _log.warning("%s", exc)
                session.lost = "poll read failed"
                return SampleBatch.concat(batches)
        wait = min(cfg.watchdog_s / 4.0, 1.0)
        if session.poll_ids:
            wait = min(wait, max(self._next_poll - loop.time(), 0.0))
        items: list[Any] = []
        if self._queue.empty() and wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    items.append(await self._queue.get())
        while len(items) < _MAX_BATCH:
            try:
                items.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        if items:
            batches.append(self._decode(session, items))
        self._check_watchdog(session)
        return SampleBatch.concat(batches)

    def _check_watchdog(self, session: _Session) -> None:
        if session.subscription is None or session.handler is None or session.lost:
            return
        last_publish = getattr(session.subscription, "last_publish_at", None) or 0.0
        silent = time.monotonic() - max(session.handler.last_data, last_publish)
        if silent > self.config.watchdog_s:
            self.ctx.counters["opcua_watchdog"] += 1
            session.lost = f"no data and no keepalive for {silent:.1f} s"

    def _decode(self, session: _Session, items: Sequence[Any]) -> SampleBatch:
        """Notifications -> columns; a Bad value is stored as NaN with quality Bad."""
        n = len(items)
        series = np.empty(n, np.int32)
        ts_source = np.empty(n, np.int64)
        ts_receive = np.empty(n, np.int64)
        value = np.empty(n, np.float64)
        quality = np.empty(n, np.uint8)
        use_source = self.config.timestamp == "source"
        handles = session.handles
        k = 0
        for item, extra in items:
            if item is _LOST:
                if extra is session.handler:  # markers of earlier sessions are stale
                    session.lost = f"subscription status {extra.status}"  # type: ignore[union-attr]
                continue
            index = handles.get(item.ClientHandle)
            if index is None:  # a notification from a previous session's handles
                continue
            dv = item.Value
            series[k] = index
            ts_receive[k] = extra
            ts_source[k], value[k], quality[k] = self._sample(dv, use_source)
            k += 1
        seq = np.full(k, NO_SEQ, np.int64)
        return SampleBatch(series[:k], ts_source[:k], ts_receive[:k], value[:k], quality[:k], seq)

    def _sample(self, dv: ua.DataValue, use_source: bool) -> tuple[int, float, int]:
        q = quality_of(dv.StatusCode)
        ts = datetime_to_ns(dv.SourceTimestamp if use_source else dv.ServerTimestamp)
        if q == BAD:
            return ts, np.nan, q
        v = numeric(dv.Value.Value if dv.Value is not None else None)
        if v is None:
            self.ctx.counters["opcua_non_numeric"] += 1
            return ts, np.nan, BAD
        return ts, v, q

    async def _read(self, session: _Session, ids: list[tuple[int, ua.NodeId]]) -> SampleBatch:
        """Read nodes in chunks of MaxNodesPerRead; halve the chunk if the server still refuses."""
        chunk = max(session.max_nodes_per_read, 1)
        use_source = self.config.timestamp == "source"
        rows: list[tuple[int, int, int, float, int]] = []
        start = 0
        while start < len(ids):
            part = ids[start : start + chunk]
            params = ua.ReadParameters()
            params.TimestampsToReturn = ua.TimestampsToReturn.Both
            for _, nid in part:
                rv = ua.ReadValueId()
                rv.NodeId = nid
                rv.AttributeId = ua.AttributeIds.Value
                params.NodesToRead.append(rv)
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    results = await session.client.uaclient.read(params)
            except ua.uaerrors.BadTooManyOperations as exc:
                if chunk == 1:
                    self._fail("read", exc, ReadError)
                chunk = max(chunk // 2, 1)
                session.max_nodes_per_read = chunk
                self.ctx.counters["opcua_read_split"] += 1
                continue
            except Exception as exc:
                self._fail(f"read of {len(part)} nodes", exc, ReadError)
            received = time.time_ns()
            for (index, _), dv in zip(part, results, strict=True):
                ts, v, q = self._sample(dv, use_source)
                rows.append((index, ts, received, v, q))
            start += len(part)
        if not rows:
            return SampleBatch.empty()
        cols = list(zip(*rows, strict=True))
        return SampleBatch.build(
            cols[0], cols[3], ts_receive=cols[2], ts_source=cols[1], quality=cols[4]
        )


def _offered(endpoints: Sequence[Any]) -> str:
    """``policy/mode`` of every endpoint, for logs and errors."""
    names = {
        f"{str(ep.SecurityPolicyUri).rsplit('#', 1)[-1]}/{_mode_name(ep.SecurityMode)}"
        for ep in endpoints
    }
    return ", ".join(sorted(names)) or "nothing"


def _mode_name(mode: Any) -> str:
    """``None``, ``Sign`` or ``SignAndEncrypt`` (asyncua spells the first ``None_``)."""
    return str(ua.MessageSecurityMode(mode).name).rstrip("_")


def _first_der(data: bytes) -> bytes:
    """The first certificate of a DER chain (outer SEQUENCE with a two-byte length)."""
    if len(data) > 4 and data[1] == 0x82:
        return data[: int.from_bytes(data[2:4], "big") + 4]
    return data


def _trusted_fingerprints(trust_dir: Path) -> set[str]:
    """sha256 of every DER/PEM certificate in the trust directory."""
    out: set[str] = set()
    if not trust_dir.is_dir():
        return out
    for path in trust_dir.iterdir():
        suffix = path.suffix.lower()
        if suffix in {".der", ".cer", ".crt"}:
            data = path.read_bytes()
            with contextlib.suppress(ValueError):
                data = x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
            out.add(hashlib.sha256(data).hexdigest())
        elif suffix == ".pem":
            with contextlib.suppress(ValueError):
                cert = x509.load_pem_x509_certificate(path.read_bytes())
                out.add(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest())
    return out
