"""Ingest workers as real processes (``python -m edge ingest``) for the fault and scale-out tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import yaml

from edge.config import SiteConfig
from edge.services import Influxd


def write_site(site: SiteConfig, path: Path) -> Path:
    """The site as a YAML file for the CLI."""
    path.write_text(
        yaml.safe_dump(site.model_dump(mode="json", exclude_none=True), sort_keys=False)
    )
    return path


class IngestProc:
    """One ``tpo-edge ingest`` worker process."""

    def __init__(self, site_file: Path, client_id: str, log_dir: Path) -> None:
        """Settings only; :meth:`start` runs it."""
        self.site_file = site_file
        self.client_id = client_id
        self.log_dir = log_dir
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        """stderr of the current run."""
        return self.log_dir / f"ingest-{self.client_id}-{self.starts}.log"

    async def start(self, timeout_s: float = 20.0) -> None:
        """Start and wait for its "ready" log line (connected and subscribed)."""
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "edge",
                "ingest",
                "-c",
                str(self.site_file),
                "--client-id",
                self.client_id,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        async with asyncio.timeout(timeout_s):
            while "ready" not in self.log_path.read_text():
                if self.proc.returncode is not None:
                    raise RuntimeError(f"ingest exited early:\n{self.log_path.read_text()}")
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # SUBACK

    def kill(self) -> None:
        """SIGKILL: whatever it received and had not stored is only at the broker now."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: it reads nothing more; the broker queues what it would get."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    async def wait_killed(self) -> None:
        """Reap the killed process."""
        assert self.proc is not None
        await self.proc.wait()

    async def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (orderly: last batch written and acknowledged) and its exit code."""
        if self.proc is None or self.proc.returncode is not None:
            return 0 if self.proc is None else self.proc.returncode or 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout_s):
                return await self.proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            raise

    def log_text(self) -> str:
        """Every run's stderr."""
        return "\n".join(
            p.read_text() for p in sorted(self.log_dir.glob(f"ingest-{self.client_id}-*.log"))
        )


def query_ns(influxd: Influxd, q: str) -> list[dict[str, Any]]:
    """InfluxQL with epoch-ns timestamps; rows as dicts with tags merged in."""
    data = urllib.parse.urlencode({"q": q, "db": influxd.database, "epoch": "ns"}).encode()
    req = urllib.request.Request(f"{influxd.url}/query", data=data, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = orjson.loads(resp.read())
    out: list[dict[str, Any]] = []
    for series in body["results"][0].get("series", []):
        tags = series.get("tags") or {}
        out.extend(
            {**tags, **dict(zip(series["columns"], v, strict=True))} for v in series["values"]
        )
    return out


def signal_count(influxd: Influxd) -> int:
    """Points in ``signal`` (every one carries ``quality``)."""
    rows = query_ns(influxd, 'SELECT COUNT("quality") FROM "signal"')
    return int(rows[0]["count"]) if rows else 0


def link_merge_problems(influxd: Influxd) -> tuple[int, list[str]]:
    """Windows checked, and where a merged link KPI count differs from its devices' sum."""
    rows = query_ns(influxd, "SELECT * FROM link_kpi GROUP BY area, device, window")
    per: dict[tuple[str, int, str], Counter[str]] = {}
    merged: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["area"], r["device"], int(r["time"]), r["window"])
        if r["device"] in {"_area", "_campus"}:
            merged[key] = r
            continue
        for scope in (r["area"], "_campus"):
            c = per.setdefault((scope, int(r["time"]), r["window"]), Counter())
            for name in ("n_received", "n_expected", "n_lost", "duplicates"):
                c[name] += int(r.get(name) or 0)
            c["devices"] += 1
    names = ("n_received", "n_expected", "n_lost", "duplicates", "devices")
    problems = [
        f"{area} {t} {window} {name}: {r.get(name)} != {per.get((area, t, window), {})}"
        for (area, _device, t, window), r in merged.items()
        for name in names
        if int(r.get(name) or 0) != per.get((area, t, window), Counter())[name]
    ]
    return len(merged), problems
