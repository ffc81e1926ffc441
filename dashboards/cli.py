"""The ``tpo-edge dashboards`` commands (added to the main CLI as a sub-app)."""

from __future__ import annotations

from pathlib import Path  # noqa: TC003 - typer reads the annotations at runtime
from typing import Annotated

import typer

app = typer.Typer(help="Grafana dashboards as code.", no_args_is_help=True)


@app.command("build")
def build_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
) -> None:
    """Write the dashboard JSON and the Grafana provisioning files under OUT."""
    from dashboards.build import build  # noqa: PLC0415 - grafanalib only when building

    for path in build(out):
        typer.echo(path)
