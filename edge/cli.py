"""The ``tpo-edge`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import orjson
import typer
from rich.console import Console

from edge import memory
from edge.errors import ConfigError, EdgeError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from edge.agent import Agent
    from edge.config import SiteConfig
    from edge.ingest import Ingest

app = typer.Typer(
    help="tpo-edge: 5G campus industrial IoT edge platform (agent, ingest, simulator, KPIs).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

SiteOption = Annotated[Path, typer.Option("--config", "-c", help="Site file (YAML).", exists=False)]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("asyncua", "pymodbus"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.INFO)


def _load(path: Path) -> SiteConfig:
    from edge.config import load_site  # noqa: PLC0415

    try:
        return load_site(path)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from exc


def _run(coro_factory: Callable[[], Awaitable[None]], *stoppers: Callable[[], object]) -> None:
    """Run a coroutine; SIGINT/SIGTERM call the stoppers for an orderly shutdown."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(coro_factory())
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, lambda: [s() for s in stoppers])
        await task

    asyncio.run(main())


def _stop_all(stoppable: list[Agent] | list[Ingest]) -> None:
    for item in stoppable:
        item.stop()


@app.command()
def check(
    site_file: Annotated[Path, typer.Argument(help="Site file (YAML) to validate.")],
    plan: Annotated[bool, typer.Option("--plan", help="Show the Modbus request plans.")] = False,
) -> None:
    """Validate a site file; list every error with its YAML path and line."""
    site = _load(site_file)
    table = site.series_table()
    print(
        f"{site_file}: ok: site {site.site}, agent {site.agent.id}, "
        f"{len(site.sources)} sources, {len(table)} series"
    )
    if plan:
        from drivers.modbus.config import ModbusSource  # noqa: PLC0415
        from drivers.modbus.planner import describe_plan  # noqa: PLC0415

        for source in site.sources:
            if isinstance(source, ModbusSource):
                print(
                    f"modbus {source.device} ({source.host}:{source.port} unit {source.unit_id}):"
                )
                for line in describe_plan(source):
                    print(f"  {line}")


@app.command()
def read(
    config: SiteOption,
    once: Annotated[
        bool, typer.Option("--once", help="Read every source once, then exit.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for pushed sources.")] = 5.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Print samples as JSON lines: the quickest check that a device is wired right."""
    _setup_logging(verbose)
    site = _load(config)
    from edge.reader import read_sources  # noqa: PLC0415

    stop = asyncio.Event()

    async def go() -> int:
        return await read_sources(site, once=once, timeout_s=timeout, stop=stop, out=sys.stdout)

    failures = asyncio.run(go())
    if failures:
        raise typer.Exit(1)


@app.command()
def agent(
    config: SiteOption,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the edge agent of a site file until Ctrl-C."""
    _setup_logging(verbose)
    site = _load(config)
    memory.tune_allocator()  # a service: keep its heap from creeping
    from edge.agent import Agent  # noqa: PLC0415

    holder: list[Agent] = []

    async def go() -> None:
        a = Agent(site)
        holder.append(a)
        await a.run()

    _run(go, lambda: _stop_all(holder))


@app.command()
def ingest(
    config: SiteOption,
    client_id: Annotated[str | None, typer.Option(help="MQTT client id (one per worker).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the ingest service: backbone messages into the database, acknowledged once stored."""
    _setup_logging(verbose)
    site = _load(config)
    memory.tune_allocator()  # a service: keep its heap from creeping
    from edge.ingest import Ingest  # noqa: PLC0415
    from edge.sinks import open_sink  # noqa: PLC0415

    holder: list[Ingest] = []

    async def go() -> None:
        sink = await open_sink(site.database)
        try:
            worker = Ingest(site, sink, client_id=client_id)
            holder.append(worker)
            await worker.run()
        finally:
            await sink.close()

    _run(go, lambda: _stop_all(holder))


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="Seconds to run (0: until Ctrl-C).")] = 30.0,
    summary_json: Annotated[Path | None, typer.Option(help="Write the stage counts here.")] = None,
    site_file: Annotated[Path | None, typer.Option("--site", help="Site file to run.")] = None,
    scenario: Annotated[Path | None, typer.Option(help="Simulator scenario file.")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Where servers keep their files.")] = None,
    live: Annotated[bool, typer.Option(help="Show the live table.")] = True,
    broker: Annotated[
        str, typer.Option(help="auto (mosquitto if installed), mosquitto or python.")
    ] = "auto",
    database: Annotated[
        str, typer.Option(help="auto (influxd if installed), influxd or sqlite.")
    ] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    report: Annotated[
        Path, typer.Option(help="HTML report of the run (see `tpo-edge report`).")
    ] = Path("tpo-demo-report.html"),
) -> None:
    """Run a simulated campus through the whole platform and count every sample per stage."""
    _setup_logging(verbose)
    from edge.demo import Demo  # noqa: PLC0415

    try:
        if broker not in {"auto", "mosquitto", "python"} or database not in {
            "auto",
            "influxd",
            "sqlite",
        }:
            console.print(
                "[red]--broker: auto|mosquitto|python, --database: auto|influxd|sqlite[/red]"
            )
            raise typer.Exit(2)
        runner = Demo(
            site_file=site_file,
            scenario=scenario,
            workdir=workdir,
            duration_s=duration,
            broker=broker,  # type: ignore[arg-type]
            database=database,  # type: ignore[arg-type]
            report=report,
        )
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from exc
    summary = {}

    async def go() -> None:
        summary.update(await runner.run(live=live and sys.stdout.isatty()))

    _run(go, runner.stop)
    text = orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if summary_json is not None:
        summary_json.write_text(text + "\n")
    if summary.get("lost", 1) != 0 or summary.get("simulated", 0) == 0:
        console.print(f"[red]{summary.get('lost')} simulated samples did not reach storage[/red]")
        raise typer.Exit(1)


@app.command()
def analyze(
    trace: Annotated[
        Path, typer.Argument(help="CSV or JSON-lines trace: seq,t_send_ns,t_recv_ns,size.")
    ],
    deadline: Annotated[float, typer.Option("--deadline", help="Deadline D in ms.")] = 10.0,
    survival_time: Annotated[
        float, typer.Option("--survival-time", help="Survival time in ms.")
    ] = 0.0,
    transfer_interval: Annotated[
        float | None,
        typer.Option("--transfer-interval", help="Transfer interval in ms (default: estimated)."),
    ] = None,
    window: Annotated[float, typer.Option("--window", help="Window length in s.")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Link KPIs (latency percentiles, jitter, loss, reliability, availability) of a trace."""
    from pipelines.trace import analyze_trace, load_trace, render_table  # noqa: PLC0415

    try:
        arrays = load_trace(trace)
    except (OSError, ValueError) as exc:
        console.print(f"[red]{trace}: {exc}[/red]")
        raise typer.Exit(2) from exc
    result = analyze_trace(
        arrays,
        deadline_ms=deadline,
        survival_time_ms=survival_time,
        transfer_interval_ms=transfer_interval,  # None: estimated from the trace
        window_s=window,
    )
    if as_json:
        print(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY).decode())
        return
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"Link KPIs of {trace.name}")
    table.add_column("KPI")
    table.add_column("value", justify="right")
    for name, value in render_table(result):
        table.add_row(name, value)
    Console().print(table)


def _wire_secrets_and_sim() -> None:
    """``secrets`` (edge/secrets.py) and ``sim`` (sim/cli.py) live in their own modules."""
    from edge.secrets import cli as secrets_cli  # noqa: PLC0415
    from sim.cli import sim_command  # noqa: PLC0415

    app.add_typer(secrets_cli, name="secrets")
    app.command("sim")(sim_command)


_wire_secrets_and_sim()


def _wire_dashboards() -> None:
    """``dashboards build`` lives in dashboards/cli.py (grafanalib is imported only to build)."""
    from dashboards.cli import app as dashboards_cli  # noqa: PLC0415

    app.add_typer(dashboards_cli, name="dashboards")


_wire_dashboards()


@app.command()
def report(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Site file: read its database.")
    ] = None,
    sqlite: Annotated[Path | None, typer.Option(help="Read this SQLite store.")] = None,
    influx_url: Annotated[str | None, typer.Option(help="Read this InfluxDB (v1 API).")] = None,
    database: Annotated[str, typer.Option(help="InfluxDB database (with --influx-url).")] = "tpo",
    since: Annotated[str, typer.Option(help="Look back: 90s, 30m, 1h, 7d or all.")] = "1h",
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path(
        "report.html"
    ),
    summary: Annotated[
        Path | None, typer.Option(help="Demo summary JSON: adds the stage counts.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Write one self-contained HTML report: latency CDF, link KPIs, OEE, chargers, benches."""
    _setup_logging(verbose)
    from edge.report import report_command  # noqa: PLC0415

    site = _load(config) if config is not None else None
    path = asyncio.run(
        report_command(
            site=site,
            sqlite=sqlite,
            influx_url=influx_url,
            database=database,
            since=since,
            out=out,
            summary_file=summary,
        )
    )
    print(path)


def main() -> None:
    """Entry point that turns project errors into a clean exit."""
    try:
        app()
    except EdgeError as exc:
        console.print(f"[red]{exc}[/red]")
        sys.exit(1)
