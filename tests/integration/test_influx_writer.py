"""The InfluxDB writers against the real influxd (1.6.7), and v2 through a forwarding shim.

Debian's influxd has no /api/v2, so the v2 writer talks to a small aiohttp server that
checks what a 2.x server would check (token, org, bucket, precision, gzip), can answer
429/503 on demand, and forwards the body to the real influxd's /write.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from edge import lineprotocol as lp
from edge.errors import SinkError, SinkRejectedError
from edge.influx import InfluxV1Writer, InfluxV2Writer, _Backoff, retry_after_s
from edge.services import Influxd, free_port

from .v2shim import TOKEN, Shim, v2_shim

pytestmark = pytest.mark.integration


def batch(n: int, seed: int = 1, devices: int = 10) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n) * 10.0 ** rng.integers(-200, 200, n)
    ts = 1_764_000_000_000_000_000 + np.arange(n, dtype=np.int64) * 1_000
    tags = [
        lp.tag_set({"site": "tpo", "device": f"press {i}", "channel": "t,1"})
        for i in range(devices)
    ]
    enc = lp.encode("signal", tags, np.arange(n) % devices, ts, float_fields={"value": values})
    assert enc.lines == n
    return enc.data, values, ts


def v1(server: Influxd, **kw: float) -> InfluxV1Writer:
    return InfluxV1Writer(server.url, server.database, backoff_min_s=0.05, **kw)  # type: ignore[arg-type]


async def test_write_count_bit_exact_and_idempotent(influxd: Influxd) -> None:
    n = 20_000
    data, values, ts = batch(n)
    async with v1(influxd) as w:
        await w.ensure_database()
        await w.write(data)
        assert await w.count("signal") == n
        await w.write(data)  # at-least-once delivery: a replay must not add points
        assert await w.count("signal") == n
        assert await w.count("signal", {"device": "press 3", "channel": "t,1"}) == n // 10
        assert await w.count("signal", "\"device\" = 'press 3' AND time >= 0") == n // 10
        series = await w.query('SELECT "value" FROM "signal" WHERE "device" = \'press 3\'')
    rows = series[0]["values"]
    assert [r[0] for r in rows] == ts[3::10].tolist()
    assert np.array([r[1] for r in rows]).tobytes() == values[3::10].tobytes()


async def test_field_type_conflict_is_rejected_at_once(influxd: Influxd) -> None:
    async with v1(influxd, max_retries=50) as w:
        await w.write(b"machine_kpi,device=m1 oee=0.5 1\n")
        started = time.monotonic()
        with pytest.raises(SinkRejectedError) as info:
            await w.write(b"machine_kpi,device=m1 oee=1i 2\nmachine_kpi,device=m1 other=1 3\n")
        assert time.monotonic() - started < 2.0  # not retried
    msg = str(info.value)
    assert "field type conflict" in msg
    assert "machine_kpi" in msg
    assert '"oee"' in msg
    assert "(400)" in msg


async def test_writer_works_without_async_with(influxd: Influxd) -> None:
    """The ingest service and the demo open the writer lazily and close() it at the end."""
    w = v1(influxd)
    try:
        await w.ensure_database()
        await w.write(b"agent,agent_id=a1 rss_mb=12.5 1\n")
        assert await w.count("agent", {"agent_id": "a1"}) == 1
    finally:
        await w.close()


async def test_unparsable_line_is_rejected(influxd: Influxd) -> None:
    async with v1(influxd) as w:
        with pytest.raises(SinkRejectedError, match="unable to parse"):
            await w.write(b"m v=oops 1\n")


async def test_query_error_names_the_query(influxd: Influxd) -> None:
    async with v1(influxd) as w:
        with pytest.raises(SinkError, match="SELEKT"):
            await w.query("SELEKT 1")


async def test_unreachable_server_gives_up_after_max_retries() -> None:
    w = InfluxV1Writer(
        f"http://127.0.0.1:{free_port()}", "tpo", max_retries=2, backoff_min_s=0.01, timeout_s=1
    )
    async with w:
        with pytest.raises(SinkError, match="gave up after 3 attempts") as info:
            await w.write(b"m v=1 1\n")
    assert not isinstance(info.value, SinkRejectedError)


@pytest.fixture
async def shim(influxd: Influxd) -> AsyncIterator[Shim]:
    async with v2_shim(influxd) as state:
        yield state


def v2(shim: Shim, token: str = TOKEN) -> InfluxV2Writer:
    return InfluxV2Writer(shim.url, "tpo-org", "tpo", token, backoff_min_s=0.05, max_retries=3)


async def test_v2_writer_honours_retry_after_and_lands_once(shim: Shim) -> None:
    n = 5_000
    data, values, _ = batch(n, seed=2)
    shim.answers = [(429, {"Retry-After": "1"}), (503, {})]
    async with v2(shim) as w:
        started = time.monotonic()
        await w.write(data)
        elapsed = time.monotonic() - started
        assert shim.seen == ["429", "503", "forward"]
        assert all(plain == len(data) and wire < plain / 2 for wire, plain in shim.sizes)  # gzip
        assert elapsed >= 1.0  # waited for Retry-After
        assert await w.count("signal") == n
        series = await w.query('SELECT "value" FROM "signal" WHERE "device" = \'press 0\'')
    assert shim.forwarded == 1
    assert np.array([r[1] for r in series[0]["values"]]).tobytes() == values[::10].tobytes()


async def test_v2_writer_rejects_bad_token_at_once(shim: Shim) -> None:
    async with v2(shim, token="wrong") as w:
        with pytest.raises(SinkRejectedError, match=r"\(401\).*bad token"):
            await w.write(b"m v=1 1\n")
    assert shim.seen == []


async def test_v2_writer_gives_up_after_max_retries(shim: Shim) -> None:
    shim.answers = [(503, {})] * 10
    async with v2(shim) as w:
        with pytest.raises(SinkError, match="gave up after 4 attempts"):
            await w.write(b"m v=1 1\n")
    assert shim.seen == ["503"] * 4


async def test_v2_field_type_conflict_reported(shim: Shim) -> None:
    async with v2(shim) as w:
        await w.write(b"link_kpi,cell=a rtt=1.5 1\n")
        with pytest.raises(SinkRejectedError, match=r"field type conflict.*rtt"):
            await w.write(b"link_kpi,cell=a rtt=2i 2\n")


def test_retry_after_parsing() -> None:
    assert retry_after_s("2", 30.0) == 2.0
    assert retry_after_s("999", 30.0) == 30.0
    assert retry_after_s(None, 30.0) is None
    assert retry_after_s("soon", 30.0) is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", 30.0) == 0.0  # in the past


def test_backoff_is_capped_jittered_and_never_zero() -> None:
    b = _Backoff("x", 10, 0.5, 30.0)
    delays = [b.delay(attempt, None) for attempt in range(12) for _ in range(20)]
    assert min(delays) >= 0.5
    assert max(delays) <= 30.0
    assert len(set(delays)) > 100  # jittered
    assert b.delay(3, 7.0) == 7.0
    with pytest.raises(ValueError, match="backoff"):
        _Backoff("x", 1, 0.0, 1.0)
