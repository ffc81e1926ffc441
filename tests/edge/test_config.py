"""`tpo-edge check`: a valid site passes; each kind of error names its YAML path and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge.cli import app
from edge.config import load_site
from edge.errors import ConfigError

VALID = """\
site: tpo
agent:
  id: hall-a-edge
broker:
  host: 127.0.0.1
  port: 1883
database:
  kind: influxdb_v1
  url: http://127.0.0.1:8086
sources:
  - type: modbus
    area: hall-a
    device: meter-1
    host: 127.0.0.1
    port: 5020
    unit_id: 1
    registers:
      - {channel: voltage_l1, table: input, address: 0, type: float32, order: ABCD, unit: V}
      - {channel: voltage_l2, table: input, address: 2, type: float32, order: ABCD, unit: V}
"""

runner = CliRunner()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as info:
        load_site(write(tmp_path, text))
    return info.value.problems


def test_valid_site_loads_and_builds_the_series_table(tmp_path: Path) -> None:
    site = load_site(write(tmp_path, VALID))
    table = site.series_table()
    assert len(table) == 2
    assert table[1].channel == "voltage_l2"
    assert table[1].unit == "V"
    assert table[0].site == "tpo"


def test_check_exits_zero_on_a_valid_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check", str(write(tmp_path, VALID))])
    assert result.exit_code == 0, result.output
    assert "2 series" in result.output


def test_check_plan_shows_the_merged_request(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check", "--plan", str(write(tmp_path, VALID))])
    assert result.exit_code == 0, result.output
    assert "voltage_l1" in result.output
    assert "voltage_l2" in result.output


def test_unknown_key_names_path_and_line(tmp_path: Path) -> None:
    text = VALID.replace("  id: hall-a-edge\n", "  id: hall-a-edge\n  batch_size: 10\n")
    assert problems(tmp_path, text) == [
        ("agent.batch_size", 4, "unknown setting (check the spelling; see the sample site file)")
    ]


def test_wrong_enum_inside_a_source_names_the_register(tmp_path: Path) -> None:
    text = VALID.replace(
        "address: 2, type: float32, order: ABCD", "address: 2, type: float32, order: ACBD"
    )
    [(path, line, reason)] = problems(tmp_path, text)
    assert path == "sources[0].registers[1].order"
    assert line == 19
    assert "ABCD" in reason


def test_wrong_type_and_missing_field_are_both_listed(tmp_path: Path) -> None:
    text = VALID.replace("port: 5020", "port: fivethousand").replace(
        "    host: 127.0.0.1\n    port: five", "    port: five"
    )
    found = {p for p, _, _ in problems(tmp_path, text)}
    assert found == {"sources[0].host", "sources[0].port"}


def test_unknown_source_type(tmp_path: Path) -> None:
    text = VALID.replace("type: modbus", "type: profinet")
    [(path, line, reason)] = problems(tmp_path, text)
    assert path == "sources[0]"
    assert line == 11
    assert "profinet" in reason


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    text = VALID.replace("  port: 1883\n", "  port: 1883\n  port: 1884\n")
    assert problems(tmp_path, text) == [("broker.port", 7, "duplicate key (first on line 6)")]


def test_duplicate_channel_is_an_error_not_a_warning(tmp_path: Path) -> None:
    text = VALID.replace("channel: voltage_l2", "channel: voltage_l1")
    [(path, _, reason)] = problems(tmp_path, text)
    assert path.startswith("sources[0]")
    assert "voltage_l1" in reason


def test_same_device_in_two_sources_is_an_error(tmp_path: Path) -> None:
    second = VALID.split("sources:\n")[1]
    [(path, _, reason)] = problems(tmp_path, VALID + second)
    assert path == "(top level)"
    assert "meter-1" in reason
    assert "sources[0]" in reason


def test_names_that_would_break_topics_are_rejected(tmp_path: Path) -> None:
    text = VALID.replace("device: meter-1", "device: meter/1")
    [(path, line, _)] = problems(tmp_path, text)
    assert (path, line) == ("sources[0].device", 13)


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    text = VALID.replace("  id: hall-a-edge", "  id: [hall-a-edge")
    [(path, line, reason)] = problems(tmp_path, text)
    assert path == "(syntax)"
    assert line is not None
    assert "YAML" in reason


def test_empty_sources(tmp_path: Path) -> None:
    text = VALID.split("sources:", maxsplit=1)[0] + "sources: []\n"
    [(path, line, _)] = problems(tmp_path, text)
    assert (path, line) == ("sources", 10)


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_site(Path("/nonexistent/site.yaml"))
    assert info.value.problems[0][0] == "(file)"


def test_check_exits_nonzero_and_prints_every_error(tmp_path: Path) -> None:
    text = VALID.replace("kind: influxdb_v1", "kind: influx").replace("unit_id: 1", "unit_id: 300")
    result = runner.invoke(app, ["check", str(write(tmp_path, text))])
    assert result.exit_code == 2
    assert "database.kind (line 8)" in result.output
    assert "sources[0].unit_id (line 16)" in result.output
