"""A stand-in InfluxDB 2.x front (``/api/v2/write``, ``/query``) that stores into the real influxd.

Debian's influxd 1.6 has no v2 API. The shim checks what a 2.x server checks (token, org,
bucket, precision, gzip), can answer 429/503 on demand, and forwards the body to the real
influxd's ``/write``, so the data really lands in a database the test can query.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from edge.services import Influxd, free_port

TOKEN = "test-token"  # a throwaway token of the shim
ORG = "tpo-org"


@dataclass
class Shim:
    """State of a running shim."""

    influxd: Influxd
    bucket: str = "tpo"
    url: str = ""
    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    """Status and headers to answer (instead of forwarding) for the next writes."""
    seen: list[str] = field(default_factory=list)
    forwarded: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)
    """(bytes on the wire, bytes of line protocol) per write."""


@asynccontextmanager
async def v2_shim(influxd: Influxd, bucket: str = "tpo") -> AsyncIterator[Shim]:
    """Run the shim on a free loopback port."""
    state = Shim(influxd, bucket)
    session = aiohttp.ClientSession()

    async def write(request: web.Request) -> web.Response:
        q = request.query
        problems = []
        if request.headers.get("Authorization") != f"Token {TOKEN}":
            return web.json_response({"code": "unauthorized", "message": "bad token"}, status=401)
        if q.get("org") != ORG or q.get("bucket") != bucket or q.get("precision") != "ns":
            problems.append(f"query {dict(q)}")
        if request.headers.get("Content-Encoding") != "gzip":
            problems.append("not gzip")
        if problems:
            return web.json_response(
                {"code": "invalid", "message": "; ".join(problems)}, status=400
            )
        body = await request.read()  # aiohttp has already undone the gzip Content-Encoding
        state.sizes.append((int(request.headers["Content-Length"]), len(body)))
        if state.answers:
            status, headers = state.answers.pop(0)
            state.seen.append(f"{status}")
            return web.json_response(
                {"code": "busy", "message": "try later"}, status=status, headers=headers
            )
        state.seen.append("forward")
        async with session.post(
            f"{influxd.url}/write", params={"db": influxd.database, "precision": "ns"}, data=body
        ) as r:
            state.forwarded += 1
            return web.Response(
                status=r.status, body=await r.read(), content_type="application/json"
            )

    async def query(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Token {TOKEN}":
            return web.json_response({"code": "unauthorized", "message": "bad token"}, status=401)
        form = await request.post()
        async with session.post(f"{influxd.url}/query", data=dict(form)) as r:
            return web.Response(
                status=r.status, body=await r.read(), content_type="application/json"
            )

    app = web.Application()
    app.router.add_post("/api/v2/write", write)
    app.router.add_post("/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()
        await session.close()
