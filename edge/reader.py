"""``tpo-edge read``: samples of every source as JSON lines, for wiring checks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import TYPE_CHECKING, TextIO

import orjson

from drivers.base import NO_TIMESTAMP, Driver, DriverContext, SampleBatch, SeriesTable, driver_class
from edge.errors import SourceError

if TYPE_CHECKING:
    from edge.config import SiteConfig

log = logging.getLogger(__name__)

QUALITY = ("good", "uncertain", "bad")


def sample_lines(batch: SampleBatch, table: SeriesTable) -> list[bytes]:
    """One JSON document per sample (device, channel, value, unit, quality, timestamps)."""
    out = []
    for i in range(len(batch)):
        key = table[int(batch.series[i])]
        value = float(batch.value[i])
        ts_source = int(batch.ts_source[i])
        doc = {
            "area": key.area,
            "device": key.device,
            "channel": key.channel,
            "value": None if math.isnan(value) else value,  # a Bad sample prints as null
            "unit": key.unit,
            "quality": QUALITY[min(int(batch.quality[i]), 2)],
            "ts_source": None if ts_source == NO_TIMESTAMP else ts_source,
            "ts_receive": int(batch.ts_receive[i]),
            "seq": int(batch.seq[i]) if batch.seq[i] >= 0 else None,
        }
        if key.codes and not math.isnan(value) and 0 <= int(value) < len(key.codes):
            doc["code"] = key.codes[int(value)]
        out.append(orjson.dumps(doc))
    return out


async def _read_one(
    driver: Driver, table: SeriesTable, once: bool, timeout_s: float, out: TextIO
) -> None:
    def emit(batch: SampleBatch) -> None:
        out.writelines(line.decode() + "\n" for line in sample_lines(batch, table))
        out.flush()

    async with driver:
        if driver.polled:
            while True:
                emit(await driver.read_batch())
                if once:
                    return
                await asyncio.sleep(float(getattr(driver.config, "poll_interval_s", 1.0)))
        stream = driver.stream()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s if once else None):
                async for batch in stream:
                    emit(batch)


async def read_sources(
    site: SiteConfig, *, once: bool, timeout_s: float, stop: asyncio.Event, out: TextIO
) -> int:
    """Read every source (once, or until stopped); returns the number of sources that failed."""
    del stop  # Ctrl-C cancels the whole run; nothing to flush here
    table = site.series_table()
    ctx = DriverContext(site=site.site, secret=site.secret())
    drivers = [driver_class(s.type)(s, table, ctx) for s in site.sources]
    results = await asyncio.gather(
        *(_read_one(d, table, once, timeout_s, out) for d in drivers), return_exceptions=True
    )
    failures = 0
    for driver, result in zip(drivers, results, strict=True):
        if isinstance(result, SourceError):
            log.error("%s:%s: %s", driver.config.type, driver.config.device, result)
            failures += 1
        elif isinstance(result, BaseException):
            log.error("%s:%s: unexpected %r", driver.config.type, driver.config.device, result)
            failures += 1
    return failures
