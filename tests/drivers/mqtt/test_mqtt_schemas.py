"""Payload schemas: OCPP 1.6 strings and 2.0.1 numbers, strictness, timestamps."""

from __future__ import annotations

import json
import math

import orjson
import pytest
from hypothesis import example, given, settings
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
    fast_meter,
    fast_status,
    format_ts,
    parse_transaction,
    parse_ts,
)
from sim.field import FieldDevice, FieldDeviceSpec

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


# -- fast paths of status and meter messages: a strict subset of the models, same output -----

# Field values: a few plausible ones per message type (so that accepted payloads are common
# and each check of the fast path is exercised), small signed ints, and anything else.
_METER_WORDS = st.sampled_from(
    ["12.5", "-3", "1e3", "NaN", "inf", "-Infinity", "1_0", " 7 ", "x", "Wh", "kWh", "kW", "A",
     "L1", "L1-N", "Energy.Active.Import.Register", "Power.Active.Import", "Voltage",
     "2026-03-02T09:15:00Z", "2026-03-02T09:15:00"]
)  # fmt: skip
_STATUS_WORDS = st.sampled_from(
    ["Charging", "Available", "Occupied", "Faulted", "Finishing", "Busy", "EVConnected", "Idle",
     "NoError", "2026-03-02T09:15:00Z", "2026-03-02T09:15:00"]
)  # fmt: skip
_OTHER_VALUES = st.one_of(
    _ANY_VALUE,
    st.integers(2**62, 2**64),
    st.just({"unit": "kWh"}),
    st.just({"unit": "W", "multiplier": 2}),
    st.just({"multiplier": "3"}),
    st.just({}),
    st.just([]),
)
_METER_VALUE = st.one_of(_METER_WORDS, st.integers(-2, 3), _OTHER_VALUES)
_STATUS_VALUE = st.one_of(_STATUS_WORDS, st.integers(-2, 3), _OTHER_VALUES)


def _patched(
    base: dict[str, object], patch: dict[str, object], drop: set[str]
) -> dict[str, object]:
    return {k: v for k, v in {**base, **patch}.items() if k not in drop}


METER_201 = {
    "ts": "2026-03-02T09:15:00.250000Z",
    "seq": 9,
    "evseId": 2,
    "transactionId": "tx-9",
    "meterValue": [
        {
            "timestamp": "2026-03-02T09:15:00Z",
            "sampledValue": [
                {"value": 15.23, "unitOfMeasure": {"unit": "kWh"}},
                {"value": 1098, "measurand": "Power.Active.Import",
                 "unitOfMeasure": {"unit": "W", "multiplier": 1}, "context": "Sample.Periodic"},
                {"value": 230.1, "measurand": "Voltage", "phase": "L1-N"},
            ],
        },
        {"timestamp": 1_772_442_960_000, "sampledValue": [{"value": "16.1", "unit": "kWh"}]},
    ],
}  # fmt: skip
_TOP = sorted({*METER_16, *METER_201, "evseId", "connectorId"})
_SV = ["value", "measurand", "phase", "unit", "unitOfMeasure", "context"]


def _meter_fields(m: ChargerMeter) -> tuple[int, int, int, list[tuple[int, list[object]]]]:
    groups = [
        (mv.timestamp, [(sv.measurand, sv.phase, sv.scaled()) for sv in mv.sampledValue])
        for mv in m.meterValue
    ]
    return m.ts, m.seq, m.connector, groups  # type: ignore[return-value]


@settings(max_examples=300)
@given(
    base=st.sampled_from([METER_16, METER_201]),
    top=st.dictionaries(st.sampled_from(_TOP), _METER_VALUE, max_size=3),
    top_drop=st.sets(st.sampled_from(_TOP), max_size=2),
    mv_patch=st.dictionaries(
        st.sampled_from(["timestamp", "sampledValue"]), _METER_VALUE, max_size=1
    ),
    sv_patch=st.dictionaries(st.sampled_from(_SV), _METER_VALUE, max_size=3),
    sv_drop=st.sets(st.sampled_from(_SV), max_size=2),
)
@example(METER_16, {"seq": -1}, set(), {}, {}, set())  # edges random search finds rarely
@example(METER_201, {"evseId": -1}, set(), {}, {}, set())
@example(METER_16, {}, set(), {}, {"value": "NaN"}, set())
@example(METER_16, {}, set(), {}, {"value": "-Infinity"}, set())
@example(METER_201, {}, set(), {"timestamp": "2026-03-02T09:15:00"}, {}, set())
@example(METER_16, {}, set(), {}, {"measurand": None}, set())
@example(METER_201, {}, set(), {}, {"unitOfMeasure": {"multiplier": "3"}}, set())
def test_fast_meter_accepts_only_what_the_model_accepts(
    base: dict[str, object],
    top: dict[str, object],
    top_drop: set[str],
    mv_patch: dict[str, object],
    sv_patch: dict[str, object],
    sv_drop: set[str],
) -> None:
    data = _patched(base, top, top_drop)
    mvs = data.get("meterValue")
    if isinstance(mvs, list) and mvs and isinstance(mvs[0], dict):
        first = _patched(mvs[0], mv_patch, set())
        svs = first.get("sampledValue")
        if isinstance(svs, list) and svs and isinstance(svs[0], dict):
            first["sampledValue"] = [_patched(svs[0], sv_patch, sv_drop), *svs[1:]]
        data["meterValue"] = [first, *mvs[1:]]
    payload = json.dumps(data).encode()  # orjson refuses ints beyond 64 bits
    fast = fast_meter(payload)
    if fast is None:
        return
    model = ChargerMeter.model_validate_json(payload)  # must not raise
    assert fast == _meter_fields(model)


STATUS_16_MSG = {"ts": "2026-03-02T09:15:00Z", "seq": 1, "connectorId": 2, "status": "Charging",
                 "errorCode": "NoError"}  # fmt: skip
STATUS_201_MSG = {"ts": "2026-03-02T09:15:00Z", "seq": 2, "evseId": 1, "connectorId": 1,
                  "connectorStatus": "Occupied", "chargingState": "EVConnected"}  # fmt: skip
_STATUS_KEYS = ["ts", "seq", "connectorId", "evseId", "status", "connectorStatus",
                "chargingState", "errorCode"]  # fmt: skip


@settings(max_examples=300)
@given(
    base=st.sampled_from([STATUS_16_MSG, STATUS_201_MSG]),
    patch=st.dictionaries(st.sampled_from(_STATUS_KEYS), _STATUS_VALUE, max_size=3),
    drop=st.sets(st.sampled_from(_STATUS_KEYS), max_size=2),
)
@example(STATUS_16_MSG, {"status": "Busy"}, set())
@example(STATUS_16_MSG, {"seq": -1}, set())
@example(STATUS_201_MSG, {"connectorStatus": "Charging"}, set())
@example(STATUS_201_MSG, {"chargingState": "Available"}, set())
@example(STATUS_201_MSG, {"status": "Available"}, set())
def test_fast_status_accepts_only_what_the_model_accepts(
    base: dict[str, object], patch: dict[str, object], drop: set[str]
) -> None:
    payload = json.dumps(_patched(base, patch, drop)).encode()
    fast = fast_status(payload)
    if fast is None:
        return
    model = ChargerStatus.model_validate_json(payload)  # must not raise
    name = model.status if model.status is not None else model.connectorStatus
    assert fast == (model.ts, model.seq, model.connector, name, model.chargingState)


@pytest.mark.parametrize("ocpp", ["1.6", "2.0.1"])
def test_simulator_messages_take_the_fast_paths(ocpp: str) -> None:
    # The fast paths are only worth having if what devices send goes through them.
    spec = FieldDeviceSpec(kind="charger", id="cp-x", interval_s=60, seed=3, ocpp=ocpp)
    dev = FieldDevice(spec, start_hour=10.0)
    seen = {"status": 0, "meter": 0}
    for _ in range(200):
        for m in dev.tick():
            leaf = m.topic.rsplit("/", 1)[-1]
            if leaf == "status":
                assert fast_status(m.payload) is not None, m.payload
            elif leaf == "meter":
                assert fast_meter(m.payload) is not None, m.payload
            seen[leaf] = seen.get(leaf, 0) + 1
    assert seen["status"] > 0
    assert seen["meter"] > 0
    bench = FieldDevice(FieldDeviceSpec(kind="bench", id="b-x", interval_s=60, seed=3), 10.0)
    names = tuple(c.name for c in BENCH_CHANNELS)
    for _ in range(20):
        for m in bench.tick():
            assert fast_bench(m.payload, names) is not None, m.payload


def test_fast_paths_leave_errors_to_the_models() -> None:
    good = orjson.dumps(METER_201)
    assert fast_meter(good) is not None
    for bad in (
        good.replace(b"15.23", b"NaN"),
        orjson.dumps({**METER_16, "meterValue": []}),
        orjson.dumps({**METER_16, "seq": -1}),
        orjson.dumps({**METER_16, "connectorId": None}),
        b"[1]",
        b"{",
    ):
        assert fast_meter(bad) is None
    status = {"ts": 0, "seq": 0, "status": "Available"}
    assert fast_status(orjson.dumps(status)) == (0, 0, 1, "Available", None)
    assert fast_status(orjson.dumps({**status, "connectorStatus": "Available"})) is None
    assert fast_status(orjson.dumps({**status, "status": ["Available"]})) is None
