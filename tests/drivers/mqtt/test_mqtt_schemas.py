"""Payload schemas: OCPP 1.6 strings and 2.0.1 numbers, strictness, timestamps."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from drivers.mqtt.config import BENCH_CHANNELS
from drivers.mqtt.schemas import (
    BenchTelemetry,
    ChargerMeter,
    ChargerStatus,
    TransactionStartV16,
    TransactionStopV16,
    TransactionV201,
    fast_bench,
    format_ts,
    parse_transaction,
    parse_ts,
)

BENCH = {
    "ts": "2026-06-21T12:00:00Z",
    "seq": 812,
    "pv_w": 61.5,
    "pv_wh_total": 18342,
    "batt_v": 12.9,
    "batt_soc_pct": 78,
    "protect_mode": False,
    "usb_active": 1,
    "qi_active": 0,
    "sessions_today": 14,
    "occupancy": 2,
    "temp_c": 24.1,
    "rh_pct": 48,
    "pm2_5": 7.2,
    "noise_dba": 58.3,
    "rssi_dbm": -97,
}


def test_devices_md_bench_example_is_valid() -> None:
    m = BenchTelemetry.model_validate(BENCH)
    assert m.ts == 1_782_043_200 * 10**9
    assert m.pv_wh_total == 18342.0
    assert m.protect_mode is False


def errors(model: type, data: dict[str, object]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return [(".".join(map(str, e["loc"])), e["type"]) for e in info.value.errors()]


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"pv_w": "61.5"}, ("pv_w", "float_type")),
        ({"protect_mode": 1}, ("protect_mode", "bool_type")),
        ({"batt_v": math.nan}, ("batt_v", "finite_number")),
        ({"temp_c": math.inf}, ("temp_c", "finite_number")),
        ({"batt_soc_pct": 101}, ("batt_soc_pct", "less_than_equal")),
        ({"seq": -1}, ("seq", "greater_than_equal")),
        ({"ts": "2026-06-21T12:00:00"}, ("ts", "value_error")),
        ({"ts": True}, ("ts", "timestamp_type")),
    ],
)
def test_bench_rejections_name_the_field(
    patch: dict[str, object], expected: tuple[str, str]
) -> None:
    assert expected in errors(BenchTelemetry, {**BENCH, **patch})


def test_bench_missing_field() -> None:
    data = {k: v for k, v in BENCH.items() if k != "pv_w"}
    assert errors(BenchTelemetry, data) == [("pv_w", "missing")]


def test_optional_sensors_and_extra_fields() -> None:
    data = {k: v for k, v in BENCH.items() if k not in {"pm2_5", "noise_dba", "occupancy"}}
    m = BenchTelemetry.model_validate({**data, "firmware": "1.2"})
    assert m.pm2_5 is None


def test_timestamps_iso_and_epoch_ms_round_trip() -> None:
    ns = 1_782_043_200_123_456_000
    assert parse_ts(format_ts(ns)) == ns
    assert parse_ts("2026-06-21T14:00:00.123456+02:00") == ns
    assert parse_ts(1_782_043_200_123) == 1_782_043_200_123_000_000


METER_16 = {
    "ts": "2026-03-02T09:15:00Z",
    "seq": 3,
    "connectorId": 1,
    "transactionId": 42,
    "meterValue": [
        {
            "timestamp": "2026-03-02T09:15:00Z",
            "sampledValue": [
                {"value": "15230", "measurand": "Energy.Active.Import.Register", "unit": "Wh"},
                {"value": "10980", "measurand": "Power.Active.Import", "unit": "W"},
                {"value": "15.9", "measurand": "Current.Import", "phase": "L1", "unit": "A"},
            ],
        }
    ],
}


def test_meter_16_strings_and_201_numbers() -> None:
    m16 = ChargerMeter.model_validate(METER_16)
    assert [sv.scaled() for sv in m16.meterValue[0].sampledValue] == [15230.0, 10980.0, 15.9]
    m201 = ChargerMeter.model_validate(
        {
            "ts": "2026-03-02T09:15:00Z",
            "seq": 4,
            "evseId": 2,
            "meterValue": [
                {
                    "timestamp": "2026-03-02T09:15:00Z",
                    "sampledValue": [
                        {"value": 15.23, "unitOfMeasure": {"unit": "kWh"}},
                        {
                            "value": 1098,
                            "measurand": "Power.Active.Import",
                            "unitOfMeasure": {"unit": "W", "multiplier": 1},
                        },
                    ],
                }
            ],
        }
    )
    assert m201.connector == 2
    assert [sv.scaled() for sv in m201.meterValue[0].sampledValue] == [15230.0, 10980.0]


@pytest.mark.parametrize(
    ("value", "kind"),
    [("NaN", "finite_number"), ("abc", "float_parsing"), ([1], "float_type"), (True, "float_type")],
)
def test_meter_value_rejections(value: object, kind: str) -> None:
    meter_value = {"timestamp": "2026-03-02T09:15:00Z", "sampledValue": [{"value": value}]}
    data = {**METER_16, "meterValue": [meter_value]}
    assert ("meterValue.0.sampledValue.0.value", kind) in errors(ChargerMeter, data)


def test_status_16_and_201() -> None:
    s16 = ChargerStatus.model_validate({"ts": 0, "seq": 0, "connectorId": 1, "status": "Charging"})
    assert s16.status == "Charging"
    s201 = ChargerStatus.model_validate(
        {"ts": 0, "seq": 0, "evseId": 1, "connectorStatus": "Occupied", "chargingState": "Charging"}
    )
    assert s201.connector == 1
    assert ("status", "literal_error") in errors(
        ChargerStatus, {"ts": 0, "seq": 0, "status": "Busy"}
    )
    both = {"ts": 0, "seq": 0, "status": "Available", "connectorStatus": "Available"}
    assert errors(ChargerStatus, both)[0][1] == "value_error"


def test_transactions_pick_version_by_marker() -> None:
    start = parse_transaction(
        {
            "ts": 0,
            "seq": 1,
            "event": "start",
            "connectorId": 1,
            "transactionId": 7,
            "idTag": "ABC",
            "meterStart": "100",
        }
    )
    assert isinstance(start, TransactionStartV16)
    assert start.meterStart == 100.0
    stop = parse_transaction(
        {"ts": 0, "seq": 2, "event": "stop", "transactionId": 7, "meterStop": 900}
    )
    assert isinstance(stop, TransactionStopV16)
    ended = parse_transaction(
        {"ts": 0, "seq": 3, "eventType": "Ended", "transactionInfo": {"transactionId": "7"}}
    )
    assert isinstance(ended, TransactionV201)
    with pytest.raises(ValidationError) as info:
        parse_transaction(
            {"ts": 0, "seq": 1, "event": "start", "connectorId": 1, "transactionId": 7}
        )
    missing = {e["loc"][0] for e in info.value.errors() if e["type"] == "missing"}
    assert missing == {"idTag", "meterStart"}


_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 200),
    st.floats(-1e6, 1e6, allow_nan=False),
    st.text(max_size=3),
    st.just([1]),
)


@given(
    patch=st.dictionaries(st.sampled_from(sorted(BENCH)), _ANY_VALUE),
    drop=st.sets(st.sampled_from(sorted(BENCH))),
)
def test_fast_path_accepts_only_what_the_model_accepts(
    patch: dict[str, object], drop: set[str]
) -> None:
    data = {k: v for k, v in {**BENCH, **patch}.items() if k not in drop}
    payload = orjson.dumps(data)
    names = tuple(c.name for c in BENCH_CHANNELS)
    fast = fast_bench(payload, names)
    if fast is None:
        return
    model = BenchTelemetry.model_validate_json(payload)  # must not raise
    assert fast[0] == model.ts
    assert fast[1] == model.seq
    assert fast[2] == [getattr(model, n) for n in names]
