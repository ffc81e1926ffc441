"""Open the configured sink: InfluxDB v1, InfluxDB v2 or the local SQLite store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.config import env_secret

if TYPE_CHECKING:
    from edge.config import DatabaseConfig
    from edge.ingest import Sink


async def open_sink(cfg: DatabaseConfig) -> Sink:
    """A ready sink for ``cfg`` (the database is created when the API allows it)."""
    if cfg.kind == "sqlite":
        from edge.store import SqliteStore  # noqa: PLC0415

        return SqliteStore(cfg.path)
    if cfg.kind == "influxdb_v2":
        from edge.influx import InfluxV2Writer  # noqa: PLC0415

        token = env_secret(cfg.token_env, "database.token_env") or ""
        return InfluxV2Writer(url=cfg.url, org=cfg.org or "", bucket=cfg.bucket or "", token=token)
    from edge.influx import InfluxV1Writer  # noqa: PLC0415

    writer = InfluxV1Writer(
        url=cfg.url,
        database=cfg.database,
        username=cfg.username,
        password=env_secret(cfg.password_env, "database.password_env"),
        gzip=cfg.gzip,
    )
    await writer.ensure_database()
    return writer
