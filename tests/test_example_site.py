"""The example TPO site and the simulated campus describe the same devices and channels."""

from __future__ import annotations

from edge.config import load_site
from edge.demo import example_scenario_path, example_site_path
from sim.campus import load_scenario
from sim.field import expected_channels


def test_every_site_channel_is_simulated_and_every_simulated_channel_is_read() -> None:
    site = load_site(example_site_path())
    scenario = load_scenario(example_scenario_path())
    configured = {(k.device, k.channel) for k in site.series_table()}
    simulated: set[tuple[str, str]] = set()
    for spec in scenario.modbus:
        simulated |= {(spec.name, r.channel) for r in spec.build().registers}
    for machine in scenario.opcua.machines:
        simulated |= {(machine.name, c.channel) for c in machine.channels()}
    for dev in scenario.field:
        simulated |= {(dev.id, ch) for ch in expected_channels(dev.kind, dev.connectors)}
    assert configured == simulated


def test_modbus_register_maps_match_the_simulated_devices() -> None:
    site = load_site(example_site_path())
    scenario = load_scenario(example_scenario_path())
    by_name = {s.name: s for s in scenario.modbus}
    for source in site.sources:
        if source.type != "modbus":
            continue
        device = by_name[source.device].build()
        assert source.unit_id == device.unit_id
        assert source.registers == device.registers, source.device
