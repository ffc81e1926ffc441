"""InfluxDB writers: v1 ``/write`` over aiohttp, v2 ``/api/v2/write`` over influxdb-client.

Both take ready line protocol (see :mod:`edge.lineprotocol`) and retry what can
succeed later: connection errors, timeouts and 5xx with capped exponential backoff
and jitter, 429/503 after the server's ``Retry-After``. A refusal that repeating
cannot fix (400 "unable to parse", "field type conflict", 401, 404, 413) raises
:class:`SinkRejectedError` at once with InfluxDB's own error text, which names the
measurement and field. Writes are idempotent (measurement + tags + timestamp), so
a retry after a lost reply cannot duplicate data.
"""

from __future__ import annotations

import asyncio
import gzip as gzip_lib
import logging
import random
import time
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

import aiohttp
import orjson

from edge.errors import SinkError, SinkRejectedError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping
    from types import TracebackType

log = logging.getLogger(__name__)

T = TypeVar("T")


class Sink(Protocol):
    """Where line protocol goes: InfluxDB v1/v2 or the local SQLite store."""

    async def write(self, lines: bytes) -> None:
        """Store the lines or raise SinkError."""

    async def close(self) -> None:
        """Release connections."""

    async def count(self, measurement: str, where: Mapping[str, str] | None = None) -> int:
        """Number of points of ``measurement`` whose tags include ``where``."""


class _Retry(Exception):  # noqa: N818 - a control-flow signal, not an error
    """A transient failure; ``after_s`` is the server's Retry-After, if any."""

    def __init__(self, reason: str, after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after_s = after_s


def retry_after_s(value: str | None, cap_s: float) -> float | None:
    """Seconds from a Retry-After header (delta seconds or HTTP date), capped; None if absent."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), cap_s)


class _Backoff:
    """Retry policy shared by both writers."""

    def __init__(self, what: str, max_retries: int, min_s: float, max_s: float) -> None:
        if min_s <= 0 or max_s < min_s:
            raise ValueError(f"{what}: backoff needs 0 < min_s <= max_s, got {min_s}, {max_s}")
        self.what = what
        self.max_retries = max_retries
        self.min_s = min_s
        self.max_s = max_s

    def delay(self, attempt: int, after_s: float | None) -> float:
        """Retry-After if the server gave one, else capped exponential with jitter."""
        if after_s is not None:
            return max(after_s, 0.0)
        base = min(self.max_s, self.min_s * 2**attempt)
        # Jitter in [base/2, base] keeps a non-zero minimum and spreads workers apart.
        return float(max(self.min_s, base * random.uniform(0.5, 1.0)))

    async def run(self, attempt_once: Callable[[], Awaitable[T]]) -> T:
        """Call ``attempt_once`` until it returns, raises a non-retry error, or retries run out."""
        attempt = 0
        while True:
            try:
                return await attempt_once()
            except _Retry as exc:
                if attempt >= self.max_retries:
                    raise SinkError(
                        f"{self.what}: gave up after {attempt + 1} attempts: {exc.reason}"
                    ) from exc
                wait = self.delay(attempt, exc.after_s)
                level = logging.WARNING if attempt == 0 else logging.DEBUG
                log.log(level, f"{self.what}: {exc.reason}; retry {attempt + 1} in {wait:.2f} s")
                attempt += 1
                await asyncio.sleep(wait)


def _influx_error(body: bytes) -> str:
    """InfluxDB's error text from a JSON reply (``error`` in 1.x, ``message`` in 2.x)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", errors="replace").strip()[:2000]
    if isinstance(doc, dict):
        return str(doc.get("error") or doc.get("message") or doc)[:2000]
    return str(doc)[:2000]


def _quote_ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def count_query(measurement: str, where: Mapping[str, str] | str | None = None) -> str:
    """InfluxQL counting points of ``measurement`` (tag equality mapping or raw condition)."""
    # Identifiers and literals are quoted; a raw ``where`` string is the caller's own InfluxQL.
    q = f"SELECT COUNT(*) FROM {_quote_ident(measurement)}"  # noqa: S608
    if isinstance(where, str):
        cond = where
    else:
        cond = " AND ".join(
            f"{_quote_ident(k)} = {_quote_literal(v)}" for k, v in (where or {}).items()
        )
    return f"{q} WHERE {cond}" if cond else q


def count_from_series(series: list[dict[str, Any]]) -> int:
    """Points counted by ``SELECT COUNT(*)``: the largest per-field count.

    InfluxQL counts values per field; a point has at least one field, so the largest
    count is the number of points whenever one field is in every point (true for each
    measurement of our schema), and a lower bound otherwise.
    """
    best = 0
    for s in series:
        for row in s.get("values", []):
            best = max([best, *(int(v) for v in row[1:] if v is not None)])
    return best


class InfluxV1Writer:
    """Line protocol to InfluxDB's v1 API (``/write``, ``/query``): 1.x, and 2.x/3.x compat."""

    def __init__(
        self,
        url: str,
        database: str,
        *,
        username: str | None = None,
        password: str | None = None,
        gzip: bool = True,
        timeout_s: float = 10.0,
        max_retries: int = 5,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        """Settings only; the HTTP session opens in ``__aenter__``."""
        self.url = url.rstrip("/")
        self.database = database
        self.gzip = gzip
        self.timeout_s = timeout_s
        self._auth = aiohttp.BasicAuth(username, password or "") if username else None
        self._backoff = _Backoff(
            f"InfluxDB {self.url} db={database}", max_retries, backoff_min_s, backoff_max_s
        )
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        """Open the HTTP session (it also opens on first use; ``close()`` releases it)."""
        self._http()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the HTTP session."""
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(auth=self._auth)
        return self._session

    async def _post(
        self,
        path: str,
        params: Mapping[str, str],
        data: bytes | Mapping[str, str],
        headers: Mapping[str, str],
    ) -> tuple[int, bytes, str | None]:
        """One POST; transient failures raise _Retry."""
        try:
            async with (
                asyncio.timeout(self.timeout_s),
                self._http().post(
                    f"{self.url}{path}", params=params, data=data, headers=headers
                ) as r,
            ):
                body = await r.read()
                status, after = r.status, r.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _Retry(f"POST {path} failed: {type(exc).__name__}: {exc}") from exc
        if status in (429, 503):
            raise _Retry(
                f"POST {path} answered {status}: {_influx_error(body)}",
                retry_after_s(after, self._backoff.max_s),
            )
        if status >= 500:
            raise _Retry(f"POST {path} answered {status}: {_influx_error(body)}")
        return status, body, after

    async def write(self, lines: bytes) -> None:
        """POST the lines to ``/write`` (precision ns); retry transient failures."""
        if not lines:
            return
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        body = lines
        if self.gzip:
            body = gzip_lib.compress(lines, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        params = {"db": self.database, "precision": "ns"}
        status, reply, _ = await self._backoff.run(
            lambda: self._post("/write", params, body, headers)
        )
        if status != 204:
            raise SinkRejectedError(
                f"InfluxDB {self.url} db={self.database} refused the write ({status}):"
                f" {_influx_error(reply)}"
            )

    async def query(self, q: str) -> list[dict[str, Any]]:
        """Run InfluxQL (POST ``/query``, epoch ns); the ``series`` of the first result."""
        params = {"db": self.database, "epoch": "ns"}
        status, reply, _ = await self._backoff.run(
            lambda: self._post("/query", params, {"q": q}, {})
        )
        if status != 200:
            raise SinkRejectedError(
                f"InfluxDB {self.url} db={self.database} refused {q!r} ({status}):"
                f" {_influx_error(reply)}"
            )
        doc = orjson.loads(reply)
        if "error" in doc:
            raise SinkError(f"InfluxDB {self.url}: {q!r}: {doc['error']}")
        result = doc["results"][0]
        if "error" in result:
            raise SinkError(f"InfluxDB {self.url} db={self.database}: {q!r}: {result['error']}")
        series: list[dict[str, Any]] = result.get("series", [])
        return series

    async def ensure_database(self) -> None:
        """CREATE DATABASE (a no-op when it exists)."""
        await self.query(f"CREATE DATABASE {_quote_ident(self.database)}")

    async def count(self, measurement: str, where: Mapping[str, str] | str | None = None) -> int:
        """Points of ``measurement``; ``where`` is tag equality or a raw InfluxQL condition."""
        return count_from_series(await self.query(count_query(measurement, where)))


class InfluxV2Writer:
    """Line protocol to InfluxDB 2.x/3.x ``/api/v2/write`` through influxdb-client's async API.

    ``count`` uses the v1-compatible ``/query`` endpoint of 2.x (token auth, a DBRP
    mapping for the bucket must exist), since our dashboards speak InfluxQL anyway.
    """

    def __init__(
        self,
        url: str,
        org: str,
        bucket: str,
        token: str,
        *,
        gzip: bool = True,
        timeout_s: float = 10.0,
        max_retries: int = 5,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        """Settings only; the client opens in ``__aenter__``."""
        self.url = url.rstrip("/")
        self.org = org
        self.bucket = bucket
        self.gzip = gzip
        self.timeout_s = timeout_s
        self._token = token
        self._backoff = _Backoff(
            f"InfluxDB {self.url} org={org} bucket={bucket}",
            max_retries,
            backoff_min_s,
            backoff_max_s,
        )
        self._client: Any = None
        self._write_api: Any = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        """Open the clients (they also open on first use; ``close()`` releases them)."""
        self._open()
        return self

    def _open(self) -> tuple[Any, aiohttp.ClientSession]:
        """influxdb-client's write API and our InfluxQL session, opened once."""
        if self._client is None:
            from influxdb_client.client.influxdb_client_async import (  # noqa: PLC0415 - heavy
                InfluxDBClientAsync,
            )

            self._client = InfluxDBClientAsync(
                url=self.url,
                token=self._token,
                org=self.org,
                enable_gzip=self.gzip,
                timeout=int(self.timeout_s * 1000),
            )
            self._write_api = self._client.write_api()
        if self._session is None:
            auth = {"Authorization": f"Token {self._token}"}
            self._session = aiohttp.ClientSession(headers=auth)
        return self._write_api, self._session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the client."""
        await self.close()

    async def close(self) -> None:
        """Close the client and the query session."""
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._write_api = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _write_once(self, lines: bytes) -> None:
        from influxdb_client.domain.write_precision import (  # noqa: PLC0415 - with the client
            WritePrecision,
        )
        from influxdb_client.rest import ApiException  # noqa: PLC0415

        write_api, _ = self._open()
        try:
            async with asyncio.timeout(self.timeout_s):
                await write_api.write(
                    bucket=self.bucket,
                    org=self.org,
                    record=lines,
                    write_precision=WritePrecision.NS,
                )
        except ApiException as exc:
            status = int(exc.status or 0)
            text = f"{getattr(exc, 'message', None) or exc.reason}"
            if status in (429, 503):
                after = retry_after_s(getattr(exc, "retry_after", None), self._backoff.max_s)
                raise _Retry(f"write answered {status}: {text}", after) from exc
            if status >= 500 or status == 0:
                raise _Retry(f"write answered {status}: {text}") from exc
            raise SinkRejectedError(
                f"InfluxDB {self.url} org={self.org} bucket={self.bucket} refused the write"
                f" ({status}): {text}"
            ) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _Retry(f"write failed: {type(exc).__name__}: {exc}") from exc

    async def write(self, lines: bytes) -> None:
        """Write the lines to the bucket (precision ns); retry transient failures."""
        if lines:
            await self._backoff.run(lambda: self._write_once(lines))

    async def _query_once(self, q: str) -> list[dict[str, Any]]:
        _, session = self._open()
        params = {"db": self.bucket, "epoch": "ns", "q": q}
        try:
            async with (
                asyncio.timeout(self.timeout_s),
                session.post(f"{self.url}/query", data=params) as r,
            ):
                body = await r.read()
                status = r.status
                after = r.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _Retry(f"query failed: {type(exc).__name__}: {exc}") from exc
        if status in (429, 503):
            raise _Retry(f"query answered {status}", retry_after_s(after, self._backoff.max_s))
        if status >= 500:
            raise _Retry(f"query answered {status}: {_influx_error(body)}")
        if status != 200:
            raise SinkError(f"InfluxDB {self.url}: {q!r} ({status}): {_influx_error(body)}")
        result = orjson.loads(body)["results"][0]
        if "error" in result:
            raise SinkError(f"InfluxDB {self.url} bucket={self.bucket}: {q!r}: {result['error']}")
        series: list[dict[str, Any]] = result.get("series", [])
        return series

    async def query(self, q: str) -> list[dict[str, Any]]:
        """Run InfluxQL through the v1-compatible ``/query``; the first result's ``series``."""
        return await self._backoff.run(lambda: self._query_once(q))

    async def count(self, measurement: str, where: Mapping[str, str] | str | None = None) -> int:
        """Points of ``measurement``; ``where`` is tag equality or a raw InfluxQL condition."""
        return count_from_series(await self.query(count_query(measurement, where)))
