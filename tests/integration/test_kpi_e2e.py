"""Live KPIs end to end: field sim (seeded lossy links) -> agent -> mosquitto -> ingest -> influxd.

The stored ``link_kpi`` points must agree with the simulator's ground truth: message and loss
counts exactly, per-device latency percentiles exactly (the agent computes them from the sorted
window), merged area and campus percentiles within the histogram's relative error.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime
from typing import Any

import numpy as np
import pytest

from edge.kpi import AREA_DEVICE, CAMPUS
from edge.services import Influxd, Mosquitto
from pipelines.histogram import relative_error
from pipelines.link import PERCENTILES, order_statistic
from sim.clock import SimClock
from sim.field import FieldDeviceSpec, FieldSim
from sim.link import LinkProfile
from sim.truth import GroundTruth
from tests.integration.helpers import make_site, running_platform

pytestmark = pytest.mark.integration

NS = 1_000_000_000
WINDOW_S = 1.0
REL = relative_error(5)
AREAS = {"street": ("bench-a1", "bench-a2"), "north": ("bench-b1",)}


def field_source(broker: Mosquitto, area: str, devices: tuple[str, ...]) -> dict[str, Any]:
    return {
        "type": "mqtt",
        "area": area,
        "device": f"field-{area}",
        "broker": {"host": broker.host, "port": broker.port},
        "topics": [f"field/bench/{d}/telemetry" for d in devices],
        "devices": [{"id": d, "kind": "bench"} for d in devices],
    }


def rows(influxd: Influxd, q: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for series in influxd.query(q):
        tags: dict[str, Any] = series.get("tags") or {}  # type: ignore[assignment]
        columns: list[str] = series["columns"]  # type: ignore[assignment]
        values: list[list[Any]] = series["values"]  # type: ignore[assignment]
        out.extend({**tags, **dict(zip(columns, v, strict=True))} for v in values)
    return out


def epoch_ns(stamp: str) -> int:
    dt = datetime.fromisoformat(stamp)
    return round(dt.timestamp()) * NS  # windows are whole seconds


def window_of(received_ns: int) -> int:
    return received_ns // NS * NS


async def test_stored_link_kpis_match_ground_truth(mosquitto: Mosquitto, influxd: Influxd) -> None:
    lossy = LinkProfile(delay_ms=8, jitter_ms=3, loss=0.05, burst_len=3)
    specs = [
        FieldDeviceSpec(kind="bench", id=dev, interval_s=60, seed=21 + i, count=400, link=lossy)
        for i, dev in enumerate(d for devs in AREAS.values() for d in devs)
    ]
    site = make_site(
        [field_source(mosquitto, area, devs) for area, devs in AREAS.items()],
        mosquitto.port,
        # Generous lateness: on a loaded CI machine a batch may reach the engine a while
        # after receipt; a late sample would be counted late instead of in its window.
        kpi={"windows_s": [WINDOW_S], "allowed_lateness_s": 3.0, "deadlines_ms": [10.0, 50.0]},
    )
    truth = GroundTruth()
    sim = FieldSim(mosquitto.host, mosquitto.port, specs, truth, SimClock(speed=12000))
    async with running_platform(site, influxd) as (agent, _ingest):
        await sim.start()
        try:
            await sim.wait_done(timeout_s=20)
            delivered = truth.delivered_count()
            async with asyncio.timeout(10):
                while agent.counters["samples_read"] < delivered:
                    await asyncio.sleep(0.02)
        finally:
            await sim.stop()
    assert agent.kpi is not None
    assert agent.kpi.late_samples() == 0

    # Ground truth per device: send time of every message, and which ones the link dropped.
    sent: dict[str, dict[int, int]] = defaultdict(dict)
    dropped: dict[str, set[int]] = defaultdict(set)
    for r in truth.records():
        if r.channel == "pv_w":  # one record per message
            sent[r.device][r.seq] = r.ts_ns
            if r.dropped:
                dropped[r.device].add(r.seq)
    assert all(dropped[d] for d in sent), "the seeded links must lose messages"

    # Receive times as stored by ingest -> per-device, per-window exact delays.
    delays: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in rows(
        influxd, "SELECT received_ns, seq FROM signal WHERE channel = 'pv_w' GROUP BY device"
    ):
        seq, received = int(row["seq"]), int(row["received_ns"])
        delays[(row["device"], window_of(received))].append(
            (received - sent[row["device"]][seq]) / 1e6
        )

    stored = rows(influxd, "SELECT * FROM link_kpi GROUP BY area, device, window")
    assert {r["window"] for r in stored} == {"1s"}
    checked_percentiles = 0
    for area, devices in AREAS.items():
        for device in devices:
            points = [r for r in stored if r["device"] == device]
            assert points
            assert all(r["area"] == area for r in points)
            seqs = sent[device]
            got = [s for s in seqs if s not in dropped[device]]
            first, last = min(got), max(got)
            visible_lost = sum(1 for s in dropped[device] if first < s < last)
            assert sum(r["n_received"] for r in points) == len(got)
            assert sum(r["n_expected"] for r in points) == last - first + 1
            assert sum(r["n_lost"] for r in points) == visible_lost
            assert sum(r["duplicates"] for r in points) == 0
            for r in points:
                exact = np.sort(delays.get((device, epoch_ns(r["time"])), []))
                assert r["n_received"] == exact.size
                for p in PERCENTILES:
                    value = r.get(f"latency_{p.label}_ms")
                    if exact.size < p.min_samples:
                        assert value is None, (device, p.label)
                        continue
                    assert value == pytest.approx(order_statistic(exact, p.q), rel=1e-12)
                    checked_percentiles += 1
                if exact.size:
                    timely = np.count_nonzero(exact <= 10.0)
                    assert r["n_timely_10ms"] == timely
    assert checked_percentiles >= 6

    # Merged per area and for the campus: exact counts, percentiles within histogram error.
    merged = {(r["area"], r["device"], epoch_ns(r["time"])): r for r in stored}
    groups = {**{(a, AREA_DEVICE): devs for a, devs in AREAS.items()}}
    groups[(CAMPUS, CAMPUS)] = tuple(d for devs in AREAS.values() for d in devs)
    checked_merged = 0
    for (area, tag), devices in groups.items():
        windows = [w for (a, d, w) in merged if (a, d) == (area, tag)]
        assert windows, (area, tag)
        for w in windows:
            point = merged[(area, tag, w)]
            parts = [merged[(a, d, w)] for (a, d, ww) in merged if ww == w and d in devices]
            assert point["n_received"] == sum(p["n_received"] for p in parts)
            assert point["n_lost"] == sum(p["n_lost"] for p in parts)
            exact = np.sort(np.concatenate([delays.get((d, w), []) for d in devices]))
            assert point["n_latency"] == exact.size
            for p in PERCENTILES:
                value = point.get(f"latency_{p.label}_ms")
                if exact.size < p.min_samples:
                    assert value is None
                    continue
                truth_q = order_statistic(exact, p.q)
                assert abs(value - truth_q) <= REL * truth_q * (1 + 1e-9), (area, w, p.label)
                checked_merged += 1
            if point["n_sent"]:
                timely = sum(p["n_timely_50ms"] for p in parts)
                assert point["deadline_reliability_50ms"] == pytest.approx(timely / point["n_sent"])
    assert checked_merged >= 4
