"""Shared helpers of the MQTT driver tests (config, series table, a recording context)."""

from __future__ import annotations

from dataclasses import dataclass, field

from drivers.base import DriverContext, SeriesKey, SeriesTable
from drivers.mqtt.config import MqttFieldSource

SECRET = b"site-secret-for-tests"


def make_config(devices: list[dict[str, object]], **kw: object) -> MqttFieldSource:
    return MqttFieldSource.model_validate(
        {"type": "mqtt", "area": "street", "device": "street", "devices": devices, **kw}
    )


def make_table(cfg: MqttFieldSource, site: str = "tpo") -> SeriesTable:
    return SeriesTable(
        SeriesKey(site, cfg.area, s.device, s.channel, s.unit, "mqtt", s.codes)
        for s in cfg.channel_specs()
    )


@dataclass
class Recorder:
    letters: list[tuple[str, bytes, str]] = field(default_factory=list)

    def __call__(self, topic: str, payload: bytes, reason: str) -> None:
        self.letters.append((topic, payload, reason))


def make_ctx(secret: bytes = SECRET) -> tuple[DriverContext, Recorder]:
    rec = Recorder()
    return DriverContext(site="tpo", dead_letter=rec, secret=secret), rec
