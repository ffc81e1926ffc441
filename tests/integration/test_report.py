"""`tpo-edge report`: a simulated campus run into influxd and the SQLite store, rendered in Chromium.

One run (module fixture): OPC UA machines (source timestamps), a Modbus meter (none), benches
and a charger over MQTT, with 1 s KPI windows. Ingest writes every batch to the test influxd
and to a SQLite store, so both report sources read the same points. Chromium (Debian's
``chromium``, headless) renders the HTML: the DOM must hold the plots with real geometry and
the screenshot must be a picture, not a blank page. The PNG is decoded with zlib and numpy.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.agent import Agent
from edge.config import SiteConfig, load_site
from edge.demo import example_site_path
from edge.errors import SinkError
from edge.influx import InfluxV1Writer
from edge.ingest import Ingest
from edge.report import (
    PALETTE,
    InfluxSource,
    Point,
    ReportData,
    collect,
    influx_source,
    message_lags_ms,
    render,
    sqlite_source,
    write_report,
)
from edge.services import Influxd, Mosquitto
from edge.store import SqliteStore
from sim.campus import Campus, OpcUaScenario, Scenario
from sim.field import FieldDeviceSpec
from sim.modbus import ModbusDeviceSpec
from sim.opcua import OpcUaMachineSpec
from sim.truth import GroundTruth
from tests.conftest import IN_CI
from tests.integration.helpers import make_site

DB = "tpo_report"  # its own database: the module fixture outlives the per-test `influxd` reset
DEADLINES = (10.0, 50.0)
STAMPED = {"mill-1", "packline-1", "bench-1", "bench-2", "cp-1"}
"""Devices whose samples carry a source timestamp (OPC UA, MQTT field devices)."""
RUN_S = 3.5


# -- PNG decoding without Pillow ------------------------------------------------------------


def png_pixels(data: bytes) -> np.ndarray:
    """RGB(A) pixels of an 8-bit truecolour PNG, (h, w, channels) uint8."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, bytearray()
    width = height = channels = 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, interlace) == (8, 0)
            channels = {2: 3, 6: 4}[colour]
        elif kind == b"IDAT":
            idat += body
    raw = np.frombuffer(zlib.decompress(bytes(idat)), np.uint8).reshape(height, -1)
    return unfilter(raw[:, 0], raw[:, 1:].reshape(height, width, channels))


def unfilter(kinds: np.ndarray, filtered: np.ndarray) -> np.ndarray:
    """Undo PNG row filters, one anti-diagonal at a time (every cell on it is independent)."""
    h, w, c = filtered.shape
    out = np.zeros((h + 1, w + 1, c), np.int32)  # row 0 and column 0: the zeros outside
    f = filtered.astype(np.int32)
    for d in range(h + w - 1):
        r = np.arange(max(0, d - w + 1), min(h, d + 1))
        x = d - r
        a, b, cc = out[r + 1, x], out[r, x + 1], out[r, x]
        k = kinds[r][:, None]
        p = a + b - cc
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - cc)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, cc))
        pred = np.select([k == 1, k == 2, k == 3, k == 4], [a, b, (a + b) // 2, paeth], 0)
        out[r + 1, x + 1] = (f[r, x] + pred) & 0xFF
    return out[1:, 1:].astype(np.uint8)


def png_filter(image: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """PNG-filter an image row by row (the encoder side, to test :func:`unfilter`)."""
    img = image.astype(np.int32)
    h, w, c = img.shape
    pad = np.zeros((h + 1, w + 1, c), np.int32)
    pad[1:, 1:] = img
    a, b, cc = pad[1:, :-1], pad[:-1, 1:], pad[:-1, :-1]
    p = a + b - cc
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - cc)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, cc))
    k = kinds[:, None, None]
    pred = np.select([k == 1, k == 2, k == 3, k == 4], [a, b, (a + b) // 2, paeth], 0)
    return ((img - pred) & 0xFF).astype(np.uint8)


def test_png_unfilter_inverts_every_filter_type() -> None:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (23, 17, 3), dtype=np.uint8)
    image[5:9] = 255  # flat runs too
    kinds = rng.integers(0, 5, 23).astype(np.uint8)
    assert set(kinds.tolist()) == {0, 1, 2, 3, 4}
    assert np.array_equal(unfilter(kinds, png_filter(image, kinds)), image)


def distinct_colours(pixels: np.ndarray) -> np.ndarray:
    rgb = pixels[..., :3].astype(np.uint32)
    return np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])


# -- DOM parsing ----------------------------------------------------------------------------


@dataclass
class Svg:
    section: str
    width: float
    height: float
    polylines: list[int] = field(default_factory=list)
    """Vertex count of each polyline."""
    circles: int = 0
    markers: list[str] = field(default_factory=list)


class DomScan(HTMLParser):
    """Collects every <svg> with its section, polylines, circles and marker lines."""

    def __init__(self) -> None:
        super().__init__()
        self.section = ""
        self.svgs: list[Svg] = []
        self.current: Svg | None = None
        self.marker_text = False
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in {"script", "link", "img", "iframe", "object"} or "src" in a or "href" in a:
            self.external.append(f"<{tag} {a}>")
        if tag == "section":
            self.section = a.get("id", "")
        elif tag == "svg":
            self.current = Svg(self.section, float(a["width"]), float(a["height"]))
            self.svgs.append(self.current)
        elif self.current is not None and tag == "polyline":
            pts = re.findall(r"(-?[\d.]+),(-?[\d.]+)", a["points"])
            coords = [(float(x), float(y)) for x, y in pts]
            assert all(
                0 <= x <= self.current.width and 0 <= y <= self.current.height for x, y in coords
            ), coords[:5]
            self.current.polylines.append(len(coords))
        elif self.current is not None and tag == "circle":
            self.current.circles += 1
        elif self.current is not None and tag == "text" and a.get("class") == "marker-label":
            self.marker_text = True

    def handle_data(self, data: str) -> None:
        if self.marker_text and self.current is not None:
            self.current.markers.append(data)
            self.marker_text = False

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.current = None


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path is not None:
            return path
    reason = "chromium is not installed (Debian package 'chromium')"
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def render_in_chromium(page: Path, tmp: Path) -> tuple[str, bytes]:
    """(DOM after rendering, PNG screenshot) of a local page, headless, network off."""
    shot = tmp / "shot.png"
    cmd = [
        chromium_binary(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2400",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return proc.stdout.decode(), shot.read_bytes()


# -- one simulated campus run into influxd and a SQLite store -------------------------------


class Tee:
    """Ingest's sink: every write goes to InfluxDB and to the SQLite store."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = sinks

    async def write(self, lines: bytes) -> None:
        for sink in self.sinks:
            await sink.write(lines)

    async def close(self) -> None:
        for sink in self.sinks:
            await sink.close()


def campus_site(mosquitto: Mosquitto) -> SiteConfig:
    example = load_site(example_site_path())
    wanted = {"meter-hall-a", "mill-1", "packline-1"}
    sources: list[Any] = [s for s in example.sources if s.device in wanted]
    sources.append(
        {
            "type": "mqtt",
            "area": "street",
            "device": "street",
            "broker": {"host": mosquitto.host, "port": mosquitto.port},
            "devices": [
                {"id": "bench-1", "kind": "bench"},
                {"id": "bench-2", "kind": "bench"},
                {"id": "cp-1", "kind": "charger"},
            ],
        }
    )
    return make_site(
        sources,
        mosquitto.port,
        kpi={"windows_s": [1.0], "allowed_lateness_s": 0.5, "deadlines_ms": list(DEADLINES)},
    )


SCENARIO = Scenario(
    name="report-test",
    speed=600,
    modbus=(ModbusDeviceSpec(kind="sdm630", name="meter-hall-a", unit_id=1, seed=11),),
    opcua=OpcUaScenario(
        machines=(
            OpcUaMachineSpec(name="mill-1", kind="machine_tool", seed=21),
            OpcUaMachineSpec(name="packline-1", kind="packml_line", seed=23),
        )
    ),
    field=(
        FieldDeviceSpec(kind="bench", id="bench-1", interval_s=60, seed=1),
        FieldDeviceSpec(kind="bench", id="bench-2", interval_s=60, seed=2),
        FieldDeviceSpec(kind="charger", id="cp-1", interval_s=60, seed=3),
    ),
)


async def run_campus(mosquitto: Mosquitto, influxd: Influxd, sqlite: Path) -> SiteConfig:
    truth = GroundTruth()
    campus = Campus(SCENARIO, truth, broker=(mosquitto.host, mosquitto.port))
    await campus.start()
    try:
        base = campus_site(mosquitto)
        site = campus.patch_site(
            base, broker=(mosquitto.host, mosquitto.port), database=base.database
        )
        writer = InfluxV1Writer(url=influxd.url, database=DB)
        await writer.ensure_database()
        ingest = Ingest(site, Tee(writer, SqliteStore(sqlite)), client_id="it-report-ingest")
        ingest_task = asyncio.create_task(ingest.run())
        await asyncio.wait_for(ingest.ready.wait(), 10)
        agent = Agent(site)
        agent_task = asyncio.create_task(agent.run())
        await asyncio.wait_for(agent.started.wait(), 10)
        await asyncio.sleep(RUN_S)
        agent.stop()
        await asyncio.wait_for(agent_task, 30)
        published = agent.counters["samples_published"]
        async with asyncio.timeout(15):
            while ingest.stats.samples < published:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # the merged KPI windows and the last flush
        ingest.stop()
        await asyncio.wait_for(ingest_task, 30)
        await ingest.sink.close()
    finally:
        await campus.stop()
    return site


@dataclass
class CampusRun:
    site: SiteConfig
    influxd: Influxd
    sqlite: Path


@pytest.fixture(scope="module")
def campus_run(
    mosquitto: Mosquitto, influxd_server: Influxd, tmp_path_factory: pytest.TempPathFactory
) -> CampusRun:
    influxd_server.query(f'DROP DATABASE "{DB}"')
    sqlite = tmp_path_factory.mktemp("report") / "run.sqlite"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TPO_SITE_SECRET", "test-secret-not-for-production")  # charger idTag pseudonyms
        site = asyncio.run(run_campus(mosquitto, influxd_server, sqlite))
    return CampusRun(site, influxd_server, sqlite)


async def read_both(run: CampusRun) -> tuple[ReportData, ReportData]:
    influx = influx_source(run.influxd.url, DB)
    sqlite = sqlite_source(run.sqlite)
    try:
        from_influx = await collect(influx, since_s=600, deadlines_ms=DEADLINES)
        from_sqlite = await collect(sqlite, since_s=600, deadlines_ms=DEADLINES)
    finally:
        await influx.close()
        await sqlite.close()
    return from_influx, from_sqlite


# -- tests ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_influx_and_sqlite_reports_read_the_same_run(campus_run: CampusRun) -> None:
    influx, sqlite = asyncio.run(read_both(campus_run))
    for data in (influx, sqlite):
        assert data.window == "1s"
        assert {d for _, d in data.lags_ms} == STAMPED  # the Modbus meter has no source time
        assert all(lags.size >= 3 and lags[0] > 0 for lags in data.lags_ms.values())
        kinds = {k: {p.tags["device"] for p in pts} for k, pts in data.kpi.items()}
        assert {"mill-1", "packline-1"} <= kinds["machine"]
        assert kinds["charger"] == {"cp-1"}
        assert kinds["bench"] == {"bench-1", "bench-2"}
        assert {"_campus", "_area", *STAMPED} <= kinds["link"]
    # The same stored points through InfluxQL and through the SQLite store.
    assert influx.lags_ms.keys() == sqlite.lags_ms.keys()
    for key, lags in influx.lags_ms.items():
        np.testing.assert_array_equal(lags, sqlite.lags_ms[key])
    for kind in ("link", "machine", "charger", "bench"):
        by_key = {(p.ts, p.tags["area"], p.tags["device"]): p.fields for p in sqlite.kpi[kind]}
        assert len(by_key) == len(influx.kpi[kind])
        for p in influx.kpi[kind]:
            assert by_key[(p.ts, p.tags["area"], p.tags["device"])] == pytest.approx(p.fields)


@pytest.mark.integration
def test_report_plots_are_drawn_in_chromium(campus_run: CampusRun, tmp_path: Path) -> None:
    async def write() -> Path:
        source = influx_source(campus_run.influxd.url, DB)
        try:
            return await write_report(
                source,
                tmp_path / "report.html",
                since_s=600,
                deadlines_ms=DEADLINES,
                summary={"simulated": 1234, "stored": 1234, "lost": 0},
            )
        finally:
            await source.close()

    page = asyncio.run(write())
    text = page.read_text()
    # self-contained: no scripts, stylesheets, images or fonts to fetch (the source URL in
    # the header is text, not a reference)
    assert not re.search(r"<script|<link|<img|<iframe|\b(?:src|href)=|@import|url\((?!#)", text)

    dom, png = render_in_chromium(page, tmp_path)
    scan = DomScan()
    scan.feed(dom)
    assert scan.external == []
    by_section: dict[str, list[Svg]] = {}
    for svg in scan.svgs:
        assert svg.width >= 300, svg
        assert svg.height >= 150, svg
        by_section.setdefault(svg.section, []).append(svg)
    assert set(by_section) == {"latency", "link", "machines", "chargers", "benches"}

    (cdf,) = by_section["latency"]
    assert len(cdf.polylines) == len(STAMPED) + 1  # one per device and all devices together
    assert all(n > 10 for n in cdf.polylines)
    assert cdf.markers == [f"D = {d:g} ms" for d in DEADLINES]
    assert len(by_section["link"]) >= 4
    for section in ("link", "machines", "chargers", "benches"):
        drawn = [len(s.polylines) + s.circles for s in by_section[section]]
        assert all(n >= 1 for n in drawn), (section, drawn)
    link_lines = [n for s in by_section["link"] for n in s.polylines]
    assert max(link_lines) >= 3  # a time series over several windows

    pixels = png_pixels(png)
    assert pixels.shape[:2] == (2400, 1280)
    colours = distinct_colours(pixels)
    assert colours.size > 50, colours.size  # text antialiasing, lines, fills: not a blank page
    # the first device colours are drawn (lines and legend swatches), as are the deadlines
    rgb = pixels[..., :3].reshape(-1, 3)
    for hex_colour in (*PALETTE[:3], "#c0392b"):
        want = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], np.uint8)
        assert np.count_nonzero((rgb == want).all(axis=1)) >= 40, hex_colour


def test_lags_are_one_per_message_and_skip_sources_without_timestamps() -> None:
    def pt(device: str, ts: int, received: int, channel: str) -> Point:
        return Point(
            ts, {"area": "a", "device": device, "channel": channel}, {"received_ns": received}
        )

    points = [
        # a field device: two channels of one message, then a second message
        pt("bench", 1_000_000_000, 1_012_000_000, "pv_w"),
        pt("bench", 1_000_000_000, 1_012_000_000, "soc"),
        pt("bench", 2_000_000_000, 2_030_000_000, "pv_w"),
        # a Modbus device: ingest stored the receive time as the point time
        pt("meter", 5_000_000_000, 5_000_000_000, "v"),
    ]
    lags = message_lags_ms(points)
    assert list(lags) == [("a", "bench")]
    np.testing.assert_allclose(lags[("a", "bench")], [12.0, 30.0])


def test_render_without_data_says_so() -> None:
    data = ReportData(
        source="test",
        since_ns=None,
        generated_ns=0,
        deadlines_ms=(),
        kpi={"link": [], "machine": [], "charger": [], "bench": []},
        window=None,
        lags_ms={},
    )
    page = render(data)
    assert page.count('class="empty"') == 5
    assert "<svg" not in page


@pytest.mark.integration
async def test_report_of_an_unreachable_influxdb_fails_naming_it(tmp_path: Path) -> None:
    source: InfluxSource = influx_source("http://127.0.0.1:9", DB)
    try:
        with pytest.raises(SinkError, match=r"127\.0\.0\.1:9"):
            await write_report(source, tmp_path / "r.html")
    finally:
        await source.close()
    assert not (tmp_path / "r.html").exists()
