"""Config model and channel table of the MQTT field source."""

from __future__ import annotations

import pytest
import yaml
from mqtt_helpers import make_config
from pydantic import ValidationError

from drivers.base import driver_class
from drivers.mqtt.config import CHARGER_STATUS_CODES, MqttFieldSource
from drivers.mqtt.driver import MqttFieldDriver
from sim.field import STATUS_CODES, expected_channels


def test_channel_specs_match_the_simulator() -> None:
    cfg = make_config(
        [
            {"id": "bench-01", "kind": "bench"},
            {"id": "cp-01", "kind": "charger"},
            {"id": "cp-02", "kind": "charger", "connectors": 2},
        ]
    )
    specs = cfg.channel_specs()
    by_dev: dict[str, list[str]] = {}
    for s in specs:
        by_dev.setdefault(s.device, []).append(s.channel)
    assert by_dev["bench-01"] == expected_channels("bench")
    assert by_dev["cp-01"] == expected_channels("charger")
    assert by_dev["cp-02"] == expected_channels("charger", connectors=2)
    assert "status_c2" in by_dev["cp-02"]
    status = next(s for s in specs if s.device == "cp-01" and s.channel == "status")
    assert status.codes == CHARGER_STATUS_CODES == STATUS_CODES
    units = {s.channel: s.unit for s in specs if s.device == "bench-01"}
    assert units["pv_w"] == "W"
    assert units["pv_wh_total"] == "Wh"


def test_defaults_and_registry() -> None:
    cfg = make_config([{"id": "b1", "kind": "bench"}])
    assert cfg.topics == ("field/bench/+/telemetry", "field/charger/+/#")
    assert cfg.seq_modulus == 65536
    assert cfg.max_payload_bytes == 65536
    assert driver_class("mqtt") is MqttFieldDriver


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        ({"devices": [{"id": "b1", "kind": "bench"}, {"id": "b1", "kind": "charger"}]}, "devices"),
        ({"devices": [{"id": "b 1", "kind": "bench"}]}, "devices.0.id"),
        ({"devices": [{"id": "b1", "kind": "bus"}]}, "devices.0.kind"),
        ({"devices": []}, "devices"),
        ({"broker": {"password": "hunter2"}}, "broker.password"),
        ({"broker": {"password_env": "not a name"}}, "broker.password_env"),
        ({"broker": {"clean_session": False}}, "broker"),
        ({"broker": {"tls": {"cert": "/x.pem"}}}, "broker.tls"),
        ({"topics": ["field/#/x"]}, "topics"),
        ({"seq_modulus": 1}, "seq_modulus"),
    ],
)
def test_invalid_config_names_the_field(patch: dict[str, object], where: str) -> None:
    data = {"type": "mqtt", "area": "street", "device": "street"}
    data["devices"] = [{"id": "b1", "kind": "bench"}]
    data.update(patch)
    with pytest.raises(ValidationError) as info:
        MqttFieldSource.model_validate(data)
    locs = {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}
    assert any(loc.startswith(where) for loc in locs), locs


def test_sample_yaml_is_valid() -> None:
    from pathlib import Path

    import drivers.mqtt

    path = Path(drivers.mqtt.__file__).parent / "sample.yaml"
    cfg = MqttFieldSource.model_validate(yaml.safe_load(path.read_text()))
    assert cfg.broker.password_env  # secrets come from the environment, never the file
    assert len(cfg.channel_specs()) == 2 * 14 + 3 * 14
