"""The Modbus TCP driver: executes the request plan of one device per poll.

The only module of ``drivers`` that imports pymodbus (3.16). One instance owns
one TCP connection to one unit id, so a dead unit never stalls another; the
agent polls each driver in its own task.

Failure policy (see README "Errors and quality"):

* a Modbus exception reply (02, 04, 0B, ...) fails that request only: its
  channels are BAD/NaN, the other requests of the poll go ahead;
* a timeout, a lost connection or a short reply is a connection-level failure:
  the connection is dropped, the rest of the poll is BAD, and reconnects are
  spaced by capped exponential backoff with jitter; meanwhile ``read_batch``
  returns BAD samples at once, without touching the network.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusException

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
from drivers.modbus.codec import BlockDecoder
from drivers.modbus.config import ModbusSource
from drivers.modbus.planner import ModbusRequest, plan
from edge.errors import ConnectError

if TYPE_CHECKING:
    import numpy.typing as npt

log = logging.getLogger(__name__)

_READ_METHOD = {
    1: "read_coils",
    2: "read_discrete_inputs",
    3: "read_holding_registers",
    4: "read_input_registers",
}


def exception_name(code: int) -> str:
    """``02 ILLEGAL_ADDRESS`` style name of a Modbus exception code."""
    try:
        name = ExcCodes(code).name
    except ValueError:
        name = "UNKNOWN"
    return f"{code:02X} {name}"


class _RequestFailedError(Exception):
    """Internal: one request failed; ``reason`` names the counter, ``fatal`` drops the link."""

    def __init__(self, reason: str, detail: str, *, fatal: bool) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.fatal = fatal


@register("modbus")
class ModbusDriver(DriverBase):
    """Polls one Modbus TCP unit: one request per planned block, one sample per channel."""

    polled = True

    def __init__(self, config: SourceConfig, series: SeriesTable, ctx: DriverContext) -> None:
        """Plan the requests and resolve every channel's series index once."""
        if not isinstance(config, ModbusSource):
            raise TypeError(f"ModbusDriver needs a ModbusSource, got {type(config).__name__}")
        super().__init__(config, series, ctx)
        self.source: ModbusSource = config
        self.plan: tuple[ModbusRequest, ...] = plan(config)
        self._decoders = [BlockDecoder(req.fields, bit_table=req.is_bits) for req in self.plan]
        bounds = np.cumsum([0] + [len(req.fields) for req in self.plan])
        self._slices = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        self._series = np.array(
            [
                series.index(config.area, config.device, reg.channel)
                for req in self.plan
                for _, reg in req.fields
            ],
            dtype=np.int32,
        )
        self._client: AsyncModbusTcpClient | None = None
        self._reads: list[Any] = []
        n = len(self._series)
        self._no_ts = np.full(n, NO_TIMESTAMP, dtype=np.int64)
        self._no_seq = np.full(n, NO_SEQ, dtype=np.int64)
        self._all_good = np.full(n, GOOD, dtype=np.uint8)
        self._counts = np.array([len(req.fields) for req in self.plan], dtype=np.intp)
        self._nans = [np.full(len(req.fields), math.nan) for req in self.plan]
        self._next_attempt = 0.0
        self._attempts = 0
        self._link_failures = 0
        self._request_failures = [0] * len(self.plan)
        self._rng = random.Random()

    @property
    def where(self) -> str:
        """``modbus meter-1 (127.0.0.1:502 unit 1)``: the prefix of every message."""
        s = self.source
        return f"modbus {s.device} ({s.host}:{s.port} unit {s.unit_id})"

    @property
    def connected(self) -> bool:
        """True while a connection is open."""
        return self._client is not None and self._client.connected

    # -- lifecycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the TCP connection; ConnectError naming device, host:port and unit on failure."""
        detail = await self._open()
        if detail is not None:
            self._link_down("connect_failed", detail)
            raise ConnectError(f"{self.where}: cannot connect: {detail}")
        self._link_up()

    async def close(self) -> None:
        """Drop the connection (never raises)."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:
                log.debug("%s: close failed: %r", self.where, exc)

    async def _open(self) -> str | None:
        """Try one connect; None on success, else what went wrong."""
        await self.close()
        s = self.source
        # retries=0 and reconnect_delay=0: this driver owns retrying and backoff, so pymodbus
        # neither re-sends (double counting) nor reconnects in the background. pymodbus' own
        # response timeout is a backstop behind our asyncio.timeout.
        client = AsyncModbusTcpClient(
            s.host,
            port=s.port,
            name=f"modbus:{s.device}",
            timeout=2 * s.timeout_s + 1.0,
            retries=0,
            reconnect_delay=0,
        )
        try:
            async with asyncio.timeout(s.timeout_s):
                ok = await client.connect()
        except TimeoutError:
            client.close()
            return f"no answer within {s.timeout_s} s"
        except (OSError, ModbusException) as exc:
            client.close()
            return repr(exc)
        if not ok or not client.connected:
            client.close()
            return "connection refused or failed"
        self._client = client
        # bound once per connection: the hot loop does no attribute lookups by name
        self._reads = [getattr(client, _READ_METHOD[req.function_code]) for req in self.plan]
        return None

    def _schedule_reconnect(self) -> None:
        """Space the next attempt: capped exponential backoff, equal jitter, non-zero minimum."""
        s = self.source
        base = min(s.reconnect_max_s, s.reconnect_min_s * 2.0 ** min(self._attempts, 30))
        delay = max(s.reconnect_min_s, base * (0.5 + 0.5 * self._rng.random()))
        self._attempts += 1
        self._next_attempt = time.monotonic() + delay

    def _link_down(self, reason: str, detail: str) -> None:
        self.ctx.counters[f"modbus_{reason}"] += 1
        self._schedule_reconnect()
        self._link_failures += 1
        if self._link_failures == 1:
            log.warning("%s: %s; reconnecting with backoff", self.where, detail)
        else:
            log.debug("%s: %s (failure %d)", self.where, detail, self._link_failures)

    def _link_up(self) -> None:
        if self._link_failures:
            log.info("%s: connected again after %d failure(s)", self.where, self._link_failures)
            self.ctx.counters["modbus_reconnects"] += 1
        self._link_failures = 0

    # -- polling -----------------------------------------------------------------------------

    async def read_batch(self) -> SampleBatch:
        """Execute the plan once; failed requests give BAD samples with NaN values."""
        if not self.connected and time.monotonic() >= self._next_attempt:
            detail = await self._open()
            if detail is None:
                self._link_up()
            else:
                self._link_down("connect_failed", detail)
        quality = self._all_good.copy()
        values: list[npt.NDArray[np.float64]] = []
        stamps: list[int] = []
        for i, req in enumerate(self.plan):
            if not self.connected:
                # Down (or dropped earlier in this poll): answer at once, spend no time.
                self._bad(i, values, stamps, quality)
                self.ctx.counters["modbus_not_connected"] += 1
                continue
            try:
                block = await self._execute(i, req)
            except _RequestFailedError as failure:
                self._bad(i, values, stamps, quality)
                self._request_failed(i, req, failure)
                if failure.fatal:
                    await self.close()
                    self._schedule_reconnect()
                continue
            stamps.append(time.time_ns())
            decoded, undecodable = self._decoders[i].decode(block)
            values.append(decoded)
            if undecodable is not None:
                quality[self._slices[i]][undecodable] = BAD
                self.ctx.counters["modbus_unknown_code"] += int(undecodable.sum())
            if self._request_failures[i]:
                self._request_recovered(i, req)
            self._attempts = 0
        if len(values) == 1:
            value, ts_receive = values[0], np.full(len(quality), stamps[0], dtype=np.int64)
        else:
            value = np.concatenate(values)
            ts_receive = np.repeat(np.array(stamps, dtype=np.int64), self._counts)
        return SampleBatch(
            series=self._series.copy(),
            ts_source=self._no_ts.copy(),
            ts_receive=ts_receive,
            value=value,
            quality=quality,
            seq=self._no_seq.copy(),
        )

    def _bad(
        self,
        i: int,
        values: list[npt.NDArray[np.float64]],
        stamps: list[int],
        quality: npt.NDArray[np.uint8],
    ) -> None:
        # NaN, never the last good value: a stale number that looks fresh is the worst output.
        values.append(self._nans[i])
        stamps.append(time.time_ns())
        quality[self._slices[i]] = BAD

    async def _execute(self, i: int, req: ModbusRequest) -> list[int] | list[bool]:
        """Send one read and return its registers or bits; _RequestFailedError on any failure."""
        client = self._client
        if client is None:
            raise _RequestFailedError("not_connected", "not connected", fatal=True)
        s = self.source
        read = self._reads[i]
        try:
            async with asyncio.timeout(s.timeout_s):
                reply: Any = await read(req.address, count=req.count, device_id=s.unit_id)
        except TimeoutError:
            if not client.connected:
                raise _RequestFailedError(
                    "connection_lost", "connection lost", fatal=True
                ) from None
            raise _RequestFailedError(
                "timeout", f"no reply within {s.timeout_s} s", fatal=True
            ) from None
        except (ModbusException, OSError) as exc:
            reason = "connection_lost" if not client.connected else "io_error"
            raise _RequestFailedError(reason, repr(exc), fatal=True) from exc
        if reply.isError():
            code = int(getattr(reply, "exception_code", 0))
            raise _RequestFailedError(
                f"exception_{code:02x}", f"exception {exception_name(code)}", fatal=False
            )
        block: list[int] | list[bool] = reply.bits if req.is_bits else reply.registers
        if len(block) < req.count:
            raise _RequestFailedError(
                "short_reply", f"reply holds {len(block)} of {req.count} values", fatal=True
            )
        return block

    def _request_failed(self, i: int, req: ModbusRequest, failure: _RequestFailedError) -> None:
        self.ctx.counters[f"modbus_{failure.reason}"] += 1
        self._request_failures[i] += 1
        what = (
            f"{self.where}: read {req.table} address {req.address} count {req.count} "
            f"(FC{req.function_code:02d}) failed: {failure.detail}"
        )
        if self._request_failures[i] == 1:
            log.warning("%s; channels %s are BAD", what, [r.channel for _, r in req.fields])
        else:
            log.debug("%s (failure %d)", what, self._request_failures[i])

    def _request_recovered(self, i: int, req: ModbusRequest) -> None:
        log.info(
            "%s: read %s address %d count %d recovered after %d failure(s)",
            self.where,
            req.table,
            req.address,
            req.count,
            self._request_failures[i],
        )
        self._request_failures[i] = 0
