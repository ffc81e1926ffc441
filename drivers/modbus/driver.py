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

Every read has its own deadline of ``timeout_s``, enforced by :class:`_Deadline`:
one lazily armed loop timer per driver instead of an ``asyncio.timeout`` (a timer
handle, a heap push and a cancel) per request, which cost a quarter of the
driver's CPU per poll. Its expiry cancels the polling task exactly as
``asyncio.timeout`` does, and an outside cancellation still propagates.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
from typing import Any

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
from drivers.modbus.config import ModbusRegister, ModbusSource
from drivers.modbus.planner import ModbusRequest, plan
from edge.errors import ConnectError

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


class _Deadline:
    """Per-read deadlines for one driver's sequential reads, with at most one timer armed.

    ``start`` only stores the deadline of the read about to be awaited (and arms the
    timer if none is armed); the timer, when it fires, re-arms itself at the current
    read's deadline if that is later, disarms if no read is in flight, and otherwise
    cancels the polling task. So a read times out ``timeout`` after it started, as
    under ``asyncio.timeout``, while a run of fast reads costs no timer operations.
    """

    __slots__ = ("_cancelling", "_deadline", "_expired", "_handle", "_loop", "_reading", "_task")

    def __init__(self) -> None:
        """Idle: no read in flight, no timer armed."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._deadline = 0.0
        self._cancelling = 0
        self._reading = False
        self._expired = False

    def begin(self) -> None:
        """A poll starts in the current task (once per poll, not per read)."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - read_batch always runs in a task
            raise RuntimeError("Modbus reads must run inside a task")
        if self._reading:
            # The state is per driver: one poll at a time (as the agent and reader poll).
            raise RuntimeError("ModbusDriver.read_batch called while another poll is reading")
        if loop is not self._loop:
            # A handle of a previous (closed) loop never fires: arm afresh on this one.
            self._loop, self._handle = loop, None
        self._task = task
        self._cancelling = task.cancelling()

    def start(self, timeout: float) -> None:
        """A read is about to be awaited; it must end within ``timeout``."""
        loop = self._loop
        assert loop is not None
        self._deadline = loop.time() + timeout
        self._reading = True
        self._expired = False
        if self._handle is None:
            self._handle = loop.call_at(self._deadline, self._fire)

    def finish(self) -> bool:
        """The read ended (any way); True if its deadline cancelled it and nothing else did."""
        self._reading = False
        if not self._expired:
            return False
        self._expired = False
        # asyncio.timeout's rule: ours was the only cancel request, so it is a timeout.
        return self._task is not None and self._task.uncancel() <= self._cancelling

    def stop(self) -> None:
        """Disarm the timer (on close)."""
        handle, self._handle = self._handle, None
        self._reading = False
        if handle is not None:
            handle.cancel()

    def _fire(self) -> None:
        self._handle = None
        loop, task = self._loop, self._task
        if not self._reading or loop is None or task is None:
            return  # idle: the next read arms again
        if loop.time() < self._deadline:
            self._handle = loop.call_at(self._deadline, self._fire)
            return
        self._expired = True
        task.cancel()


@register("modbus")
class ModbusDriver(DriverBase):
    """Polls one Modbus TCP unit: one request per planned block, one sample per channel."""

    polled = True

    def __init__(self, config: SourceConfig, series: SeriesTable, ctx: DriverContext) -> None:
        """Plan the requests, compile their decoding and resolve every series index once."""
        if not isinstance(config, ModbusSource):
            raise TypeError(f"ModbusDriver needs a ModbusSource, got {type(config).__name__}")
        super().__init__(config, series, ctx)
        self.source: ModbusSource = config
        self.plan: tuple[ModbusRequest, ...] = plan(config)
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
        n = len(self._series)
        self._no_ts = np.full(n, NO_TIMESTAMP, dtype=np.int64)
        self._no_seq = np.full(n, NO_SEQ, dtype=np.int64)
        self._all_good = np.full(n, GOOD, dtype=np.uint8)
        self._request_of_field = np.repeat(
            np.arange(len(self.plan), dtype=np.intp), [len(req.fields) for req in self.plan]
        )
        self._compile_decoding()
        self._deadline = _Deadline()
        self._client: AsyncModbusTcpClient | None = None
        self._reads: list[Any] = []
        self._next_attempt = 0.0
        self._attempts = 0
        self._link_failures = 0
        self._request_failures = [0] * len(self.plan)
        self._rng = random.Random()

    def _compile_decoding(self) -> None:
        """One decoder for every register request of the poll, one per bit request.

        The poll's register replies are laid end to end (each starting on a multiple of
        4 registers, so 32/64-bit values stay aligned) and decoded in one go after the
        last reply: numpy is touched once per poll, not once per request. Right after a
        network wait its first calls run on cold caches and cost microseconds each.
        """
        fields: list[tuple[int, ModbusRegister]] = []
        # per request: words appended after its reply so the next one starts aligned
        self._pads: list[list[int]] = []
        self._bit_decoders: list[tuple[int, slice, BlockDecoder]] = []
        base = 0
        reg_first: int | None = None
        last = -1
        for i, req in enumerate(self.plan):
            if req.is_bits:
                self._pads.append([])
                self._bit_decoders.append(
                    (i, self._slices[i], BlockDecoder(req.fields, bit_table=True))
                )
                continue
            if reg_first is None:
                reg_first = self._slices[i].start
            fields.extend((base + off, reg) for off, reg in req.fields)
            last = i
            end = base + req.count
            base = -(-end // 4) * 4
            self._pads.append([0] * (base - end))
        if last >= 0:
            self._pads[last] = []  # the words end with the last field: the decoder's count
        # The planner orders bit tables before register tables, so register fields are a
        # tail of the batch: one slice, no scatter.
        self._reg_where = slice(len(self._series) if reg_first is None else reg_first, None)
        if any(self._slices[i].start >= self._reg_where.start for i, _, _ in self._bit_decoders):
            raise AssertionError("planner must order bit tables before register tables")
        self._reg_decoder = BlockDecoder(fields, bit_table=False) if fields else None
        # one register request and nothing else: its reply is the decoder's input as is
        self._single = len(self.plan) == 1 and fields != []
        # a failed request's stand-in reply: decodes to anything, then overwritten by NaN
        zeros = [[0] * req.count for req in self.plan]
        # what the per-request loop needs, unpacked once: (index, request, is_bits, count,
        # pad, stand-in)
        self._steps = tuple(
            (i, req, req.is_bits, req.count, self._pads[i], zeros[i])
            for i, req in enumerate(self.plan)
        )

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
        self._deadline.stop()
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
            await self._reconnect()
        # The loop over requests stays in plain Python (lists of ints); every column is
        # built once afterwards.
        words: list[int] = []
        bits: list[list[int] | list[bool]] = []
        stamps: list[int] = []
        failed: list[int] = []
        self._deadline.begin()
        for i, req, is_bits, count, pad, stand_in in self._steps:
            block: list[int] | list[bool]
            client = self._client
            if client is None or not client.connected:
                # Down (or dropped earlier in this poll): answer at once, spend no time.
                self.ctx.counters["modbus_not_connected"] += 1
                failed.append(i)
                block = stand_in
            else:
                try:
                    block = await self._execute(i, req, is_bits=is_bits)
                except _RequestFailedError as failure:
                    await self._request_failed(i, req, failure)
                    failed.append(i)
                    block = stand_in
                else:
                    if self._request_failures[i]:
                        self._request_recovered(i, req)
                    self._attempts = 0
            stamps.append(time.time_ns())
            if is_bits:
                bits.append(block)
            elif self._single and len(block) == count:
                words = block  # type: ignore[assignment]  # registers: list[int]
            else:
                words += block if len(block) == count else block[:count]
                words += pad
        return self._assemble(words, bits, stamps, failed)

    def _assemble(
        self,
        words: list[int],
        bits: list[list[int] | list[bool]],
        stamps: list[int],
        failed: list[int],
    ) -> SampleBatch:
        """The poll's batch from its replies; every column is allocated here, right-typed."""
        n = len(self._series)
        quality = self._all_good.copy()
        undecodable = None
        if not self._bit_decoders and self._reg_decoder is not None:
            # registers only (the usual meter): the decoder's output is the value column
            value, undecodable = self._reg_decoder.decode(words)
        else:
            value = np.empty(n, dtype=np.float64)
            for (_, where, decoder), block in zip(self._bit_decoders, bits, strict=True):
                decoder.decode_into(block, value[where])
            if self._reg_decoder is not None:
                undecodable = self._reg_decoder.decode_into(words, value[self._reg_where])
        if len(stamps) == 1:
            ts_receive = np.empty(n, dtype=np.int64)
            ts_receive.fill(stamps[0])
        else:
            ts_receive = np.array(stamps, dtype=np.int64)[self._request_of_field]
        for i in failed:
            # NaN, never the last good value: a stale number that looks fresh is the worst.
            value[self._slices[i]] = math.nan
            quality[self._slices[i]] = BAD
        if undecodable is not None:
            reg_quality = quality[self._reg_where]
            unknown = undecodable & (reg_quality == GOOD)
            reg_quality[unknown] = BAD
            self.ctx.counters["modbus_unknown_code"] += int(unknown.sum())
        # Right dtypes and length by construction above: skip SampleBatch's checks.
        return SampleBatch.trusted(
            self._series.copy(), self._no_ts.copy(), ts_receive, value, quality, self._no_seq.copy()
        )

    async def _execute(
        self, i: int, req: ModbusRequest, *, is_bits: bool
    ) -> list[int] | list[bool]:
        """Send one read and return its registers or bits; _RequestFailedError on any failure."""
        client = self._client
        if client is None:
            raise _RequestFailedError("not_connected", "not connected", fatal=True)
        s = self.source
        deadline = self._deadline
        deadline.start(s.timeout_s)
        try:
            try:
                reply: Any = await self._reads[i](req.address, count=req.count, device_id=s.unit_id)
            finally:
                timed_out = deadline.finish()
        except asyncio.CancelledError:
            if not timed_out:
                raise  # cancelled from outside: never swallowed
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
        block: list[int] | list[bool] = reply.bits if is_bits else reply.registers
        if len(block) < req.count:
            raise _RequestFailedError(
                "short_reply", f"reply holds {len(block)} of {req.count} values", fatal=True
            )
        return block

    async def _reconnect(self) -> None:
        detail = await self._open()
        if detail is None:
            self._link_up()
        else:
            self._link_down("connect_failed", detail)

    async def _request_failed(
        self, i: int, req: ModbusRequest, failure: _RequestFailedError
    ) -> None:
        """Count and log a failed request; a fatal failure drops the connection."""
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
        if failure.fatal:
            await self.close()
            self._schedule_reconnect()

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
