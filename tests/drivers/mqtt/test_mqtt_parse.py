"""The driver's consumer side: payloads to rows, rejects, pseudonyms, sequence tracking."""

from __future__ import annotations

import logging
import re

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mqtt_helpers import SECRET, make_config, make_ctx, make_table

from drivers.mqtt.driver import MqttFieldDriver, SeqTracker, pseudonymise, scrub_id_tags
from edge.errors import ConfigError, ConnectError

T0 = "2026-06-21T12:00:00.000000Z"
NS0 = 1_782_043_200 * 10**9


def driver(**kw: object) -> tuple[MqttFieldDriver, list[tuple[str, bytes, str]]]:
    cfg = make_config(
        [
            {"id": "bench-01", "kind": "bench"},
            {"id": "cp-01", "kind": "charger"},
            {"id": "cp-02", "kind": "charger", "connectors": 2},
        ],
        **kw,
    )
    ctx, rec = make_ctx()
    return MqttFieldDriver(cfg, make_table(cfg), ctx), rec.letters


def bench(seq: int = 0, **patch: object) -> bytes:
    body = {
        "ts": T0, "seq": seq, "pv_w": 61.5, "pv_wh_total": 18342, "batt_v": 12.9,
        "batt_soc_pct": 78, "protect_mode": True, "usb_active": 1, "qi_active": 0,
        "sessions_today": 14, "occupancy": 2, "temp_c": 24.1, "rh_pct": 48, "pm2_5": 7.2,
        "noise_dba": 58.3, "rssi_dbm": -97,
    }  # fmt: skip
    return orjson.dumps({**body, **patch})


def rows(
    drv: MqttFieldDriver, items: list[tuple[str, bytes]]
) -> dict[tuple[str, str], list[float]]:
    batch = drv.parse([(t, p, NS0 + 5) for t, p in items])
    out: dict[tuple[str, str], list[float]] = {}
    for s, v in zip(batch.series, batch.value, strict=True):
        key = drv.series[int(s)]
        out.setdefault((key.device, key.channel), []).append(float(v))
    return out


def test_bench_message_to_rows() -> None:
    drv, letters = driver()
    batch = drv.parse([("field/bench/bench-01/telemetry", bench(seq=812), NS0 + 5)])
    assert len(batch) == 14
    assert not letters
    assert set(batch.ts_source) == {NS0}
    assert set(batch.ts_receive) == {NS0 + 5}
    assert set(batch.seq) == {812}
    assert set(batch.quality) == {0}
    got = {
        drv.series[int(s)].channel: float(v) for s, v in zip(batch.series, batch.value, strict=True)
    }
    assert got["protect_mode"] == 1.0
    assert got["pv_w"] == 61.5
    assert got["rssi_dbm"] == -97.0


def test_charger_session_16_with_connector_from_transaction_map() -> None:
    drv, letters = driver()
    tag = "04A2B3C4D5E6F7"
    got = rows(
        drv,
        [
            ("field/charger/cp-02/status", orjson.dumps({"ts": T0, "seq": 1, "connectorId": 2, "status": "Charging"})),
            ("field/charger/cp-02/transaction", orjson.dumps(
                {"ts": T0, "seq": 2, "event": "start", "connectorId": 2, "transactionId": 42,
                 "idTag": tag, "meterStart": "15230"})),
            ("field/charger/cp-02/transaction", orjson.dumps(
                {"ts": T0, "seq": 3, "event": "stop", "transactionId": 42, "idTag": tag,
                 "meterStop": 26230.5, "reason": "Local"})),
        ],
    )  # fmt: skip
    assert not letters
    assert got[("cp-02", "status_c2")] == [2.0]
    assert got[("cp-02", "transaction_active_c2")] == [1.0, 0.0]
    assert got[("cp-02", "energy_wh_c2")] == [15230.0, 26230.5]
    assert got[("cp-02", "session_energy_wh_c2")] == [11000.5]
    last = drv.last_transaction["cp-02"]
    assert last.id_pseudonym == pseudonymise(SECRET, tag)
    assert tag not in repr(drv.last_transaction) + repr(drv.transactions)


def test_charger_session_201() -> None:
    drv, letters = driver()

    def mv(v: float) -> list[dict[str, object]]:
        return [{"timestamp": T0, "sampledValue": [{"value": v, "unitOfMeasure": {"unit": "kWh"}}]}]

    got = rows(
        drv,
        [
            ("field/charger/cp-01/transaction", orjson.dumps(
                {"ts": T0, "seq": 10, "eventType": "Started",
                 "transactionInfo": {"transactionId": "t-1", "chargingState": "Charging"},
                 "idToken": {"idToken": "SECRETTOKEN", "type": "ISO14443"},
                 "evse": {"id": 1}, "meterValue": mv(100.0)})),
            ("field/charger/cp-01/transaction", orjson.dumps(
                {"ts": T0, "seq": 11, "eventType": "Updated", "transactionInfo": {"transactionId": "t-1"},
                 "meterValue": mv(105.0)})),
            ("field/charger/cp-01/transaction", orjson.dumps(
                {"ts": T0, "seq": 12, "eventType": "Ended",
                 "transactionInfo": {"transactionId": "t-1", "chargingState": "EVConnected"},
                 "evse": {"id": 1}, "meterValue": mv(111.5)})),
        ],
    )  # fmt: skip
    assert not letters
    assert got[("cp-01", "energy_wh")] == [100_000.0, 105_000.0, 111_500.0]
    assert got[("cp-01", "transaction_active")] == [1.0, 0.0]
    assert got[("cp-01", "session_energy_wh")] == [11_500.0]
    assert got[("cp-01", "charging_state")] == [2.0, 1.0]


def test_stop_without_start_gives_no_session_energy() -> None:
    drv, _ = driver()
    got = rows(drv, [("field/charger/cp-01/transaction", orjson.dumps(
        {"ts": T0, "seq": 1, "event": "stop", "transactionId": 5, "meterStop": 10}))])  # fmt: skip
    assert ("cp-01", "session_energy_wh") not in got
    assert drv.ctx.counters["mqtt_transaction_start_unknown"] == 1


@pytest.mark.parametrize(
    ("topic", "payload", "kind", "reason"),
    [
        ("field/bench/bench-01/telemetry", b"{not json", "not_json", "not JSON"),
        ("field/bench/bench-01/telemetry", b"[1,2]", "schema", "<root>: Input should be an object"),
        ("field/bench/bench-01/telemetry", bench(pv_w="x"), "wrong_type", "pv_w: Input should be a valid number"),
        ("field/bench/bench-01/telemetry", bench().replace(b'"batt_v":12.9', b'"batt_v":NaN'), "non_finite", "batt_v"),
        ("field/bench/bench-01/telemetry", bench().replace(b'"batt_v":12.9', b'"batt_v":1e999'), "non_finite", "batt_v"),
        ("field/bench/bench-01/telemetry", bench(pad="x" * 70_000), "oversized", "exceeds 65536"),
        ("field/bench/bench-99/telemetry", bench(), "unknown_device", "'bench-99' is not configured"),
        ("field/charger/bench-01/meter", bench(), "wrong_topic", "is a bench but published on a 'charger' topic"),
        ("field/bench/cp-01/telemetry", bench(), "wrong_topic", "is a charger but published"),
        ("field/bench/bench-01/status", bench(), "bad_topic", "not 'telemetry'"),
        ("field/charger/cp-01/firmware", b"{}", "bad_topic", "not status, meter or transaction"),
        ("field/bench/bench-01/telemetry", bench(seq=70_000), "seq_range", "not below seq_modulus"),
    ],
)  # fmt: skip
def test_rejects_are_dead_lettered_counted_and_precise(
    topic: str, payload: bytes, kind: str, reason: str
) -> None:
    drv, letters = driver()
    batch = drv.parse([(topic, payload, 1), ("field/bench/bench-01/telemetry", bench(seq=1), 2)])
    assert len(batch) == 14  # the good message after the bad one still arrives
    assert len(letters) == 1
    assert letters[0][0] == topic
    assert letters[0][2].startswith(f"{kind}: ")
    assert reason in letters[0][2]
    assert drv.ctx.counters[f"mqtt_invalid_{kind}"] == 1


def test_unknown_connector_rows_are_skipped_and_counted() -> None:
    drv, _ = driver()
    # The 1.6 stop names connector 3, which cp-01 does not have: its rows have no series.
    payload = orjson.dumps({"ts": T0, "seq": 1, "event": "stop", "transactionId": 1,
                            "connectorId": 3, "meterStop": 5})  # fmt: skip
    batch = drv.parse([("field/charger/cp-01/transaction", payload, 1)])
    assert len(batch) == 0
    assert drv.ctx.counters["mqtt_unknown_series"] == 2


def test_id_tags_scrubbed_from_dead_letters_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    drv, letters = driver()
    tag = "DEADBEEF1234"
    bad = [
        orjson.dumps({"ts": T0, "seq": 1, "event": "start", "connectorId": 1, "transactionId": 1,
                      "idTag": tag, "meterStart": {"x": 1}}),
        orjson.dumps({"ts": T0, "seq": 1, "event": "start", "idTag": tag})[:-3],
        orjson.dumps({"ts": T0, "seq": 1, "eventType": "Started", "transactionInfo": {},
                      "idToken": {"idToken": tag, "type": "ISO14443"}}),
        orjson.dumps({"ts": T0, "seq": 1, "event": "start", "idTag": tag, "pad": "y" * 70_000}),
        orjson.dumps({"ts": T0, "seq": 1, "event": "start", "connectorId": 1, "transactionId": 1,
                      "idTag": tag, "meterStart": 1}).replace(b"1}", b"NaN}"),
    ]  # fmt: skip
    drv.parse([("field/charger/cp-01/transaction", p, 1) for p in bad])
    drv.parse([("field/charger/cp-99/transaction", bad[0], 1)])
    assert len(letters) == len(bad) + 1
    pseudo = pseudonymise(SECRET, tag).encode()
    for _, payload, reason in letters:
        assert tag[:6].encode() not in payload  # not even the prefix of a cut-off value
        assert tag not in reason
        assert re.search(rb'"id(Tag|Token)":"[0-9a-f]{16}"', payload)
    assert sum(pseudo in p for _, p, _ in letters) == len(letters) - 1  # all but the cut-off one
    assert tag not in caplog.text


def test_scrub_walks_nested_json_and_regexes_the_rest() -> None:
    def p(s: str) -> str:
        return f"<{s.lower()}>"

    nested = orjson.dumps({"a": [{"IdTag": "X1"}, {"idToken": {"idToken": "X2", "type": "t"}}]})
    assert (
        scrub_id_tags(nested, p)
        == b'{"a":[{"IdTag":"<x1>"},{"idToken":{"idToken":"<x2>","type":"t"}}]}'
    )
    broken = b'{"idTag" : "X3", "parentIdTag":"X4", "x": '
    assert scrub_id_tags(broken, p) == b'{"idTag" : "<x3>", "parentIdTag":"<x4>", "x": '


def test_pseudonym_is_keyed_and_stable() -> None:
    a = pseudonymise(b"k1", "TAG")
    assert a == pseudonymise(b"k1", "TAG")
    assert a != pseudonymise(b"k2", "TAG")
    assert len(a) == 16
    assert int(a, 16) >= 0


def test_warning_once_per_device_and_reason_then_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="drivers.mqtt.driver")
    drv, _ = driver()
    drv.parse([("field/bench/bench-01/telemetry", b"x", 1)] * 3)
    drv.parse([("field/bench/bench-01/telemetry", bench(pv_w="x"), 1)] * 2)
    levels = [r.levelno for r in caplog.records if "rejected" in r.message]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG, logging.WARNING, logging.DEBUG]


def test_seq_gaps_duplicates_and_reordering_counted() -> None:
    drv, _ = driver(seq_modulus=256)
    order = [250, 251, 253, 253, 252, 254, 255, 0, 3, 1]
    batch = drv.parse([("field/bench/bench-01/telemetry", bench(seq=s), 1) for s in order])
    seqs = list(dict.fromkeys(int(s) for s in batch.seq))
    assert seqs == [250, 251, 253, 252, 254, 255, 256, 259, 257]
    c = drv.ctx.counters
    assert (c["mqtt_seq_gap"], c["mqtt_seq_duplicate"], c["mqtt_seq_reordered"]) == (3, 1, 2)


@given(
    start=st.integers(0, 10_000),
    steps=st.lists(st.integers(1, 20), min_size=1, max_size=300),
    modulus=st.sampled_from([16, 256, 65536]),
)
def test_seq_unwrap_matches_reference(start: int, steps: list[int], modulus: int) -> None:
    steps = [min(s, modulus // 2 - 1) for s in steps]
    truth = np.cumsum([start % modulus, *steps])
    tracker = SeqTracker(modulus)
    got = [tracker.update(int(u) % modulus)[0] for u in truth]
    assert got == list(truth)
    assert tracker.gaps == int(sum(s - 1 for s in steps))


async def test_secret_required_for_chargers() -> None:
    cfg = make_config([{"id": "cp-01", "kind": "charger"}])
    ctx, _ = make_ctx(secret=b"")
    with pytest.raises(ConfigError, match="secret"):
        async with MqttFieldDriver(cfg, make_table(cfg), ctx):
            pass


async def test_password_env_unset_is_a_connect_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TPO_TEST_MQTT_PW", raising=False)
    cfg = make_config(
        [{"id": "b1", "kind": "bench"}],
        broker={"username": "u", "password_env": "TPO_TEST_MQTT_PW"},
    )
    ctx, _ = make_ctx()
    with pytest.raises(ConnectError, match="TPO_TEST_MQTT_PW"):
        async with MqttFieldDriver(cfg, make_table(cfg), ctx):
            pass


async def test_unreachable_broker_is_a_connect_error_naming_it() -> None:
    from edge.services import free_port

    port = free_port()
    cfg = make_config(
        [{"id": "b1", "kind": "bench"}], broker={"port": port, "connect_timeout_s": 0.5}
    )
    ctx, _ = make_ctx()
    with pytest.raises(ConnectError, match=f"127.0.0.1:{port}"):
        async with MqttFieldDriver(cfg, make_table(cfg), ctx):
            pass


def _meter(ts: object, seq: int, connector: int) -> bytes:
    return orjson.dumps(
        {
            "ts": ts, "seq": seq, "connectorId": connector,
            "meterValue": [
                {"timestamp": T0, "sampledValue": [
                    {"value": "15230", "unit": "Wh"},
                    {"value": "7.4", "measurand": "Power.Active.Import", "unit": "kW"},
                    {"value": "1", "measurand": "Power.Reactive.Import"},
                ]},
                {"timestamp": "2026-06-21T12:00:10Z", "sampledValue": [
                    {"value": 15.25, "unitOfMeasure": {"unit": "kWh"}},
                    {"value": 2300, "measurand": "Voltage", "phase": "L1-N",
                     "unitOfMeasure": {"unit": "V", "multiplier": -1}},
                ]},
            ],
        }
    )  # fmt: skip


@pytest.mark.parametrize("ts", [T0, 1_782_043_200_000.0])  # the fast path, then the model
def test_meter_rows_per_meter_value_and_connector(ts: object) -> None:
    drv, letters = driver()
    batch = drv.parse([("field/charger/cp-02/meter", _meter(ts, 7, 2), NS0 + 5)])
    assert not letters
    got = [
        (drv.series[int(s)].channel, float(v), int(t), int(q))
        for s, v, t, q in zip(batch.series, batch.value, batch.ts_source, batch.seq, strict=True)
    ]
    assert got == [
        ("energy_wh_c2", 15230.0, NS0, 7),
        ("power_w_c2", 7400.0, NS0, 7),
        ("energy_wh_c2", 15250.0, NS0 + 10 * 10**9, 7),
        ("voltage_c2", 230.0, NS0 + 10 * 10**9, 7),
    ]
    assert set(batch.ts_receive) == {NS0 + 5}
    assert drv.ctx.counters["mqtt_unmapped_measurand"] == 1


@pytest.mark.parametrize("ts", [T0, 1_782_043_200_000.0])
def test_status_rows_both_paths(ts: object) -> None:
    drv, letters = driver()
    items = [
        ("field/charger/cp-01/status", orjson.dumps({"ts": ts, "seq": 1, "status": "Faulted"})),
        ("field/charger/cp-02/status", orjson.dumps(
            {"ts": ts, "seq": 1, "evseId": 2, "connectorStatus": "Occupied",
             "chargingState": "SuspendedEV"})),
        ("field/charger/cp-01/status", orjson.dumps(
            {"ts": ts, "seq": 2, "connectorId": 0, "status": "Available"})),
    ]  # fmt: skip
    assert rows(drv, items) == {
        ("cp-01", "status"): [8.0],
        ("cp-02", "status_c2"): [9.0],
        ("cp-02", "charging_state_c2"): [3.0],
    }
    assert not letters
    assert drv.ctx.counters["mqtt_status_connector0"] == 1


def test_topic_checks_hold_after_good_messages() -> None:
    # Good topics are remembered; that must not let a device publish under another kind.
    drv, letters = driver()
    good = ("field/bench/bench-01/telemetry", bench(seq=1), 1)
    drv.parse([good, good])
    drv.parse([("field/charger/bench-01/meter", bench(seq=2), 1), good])
    assert [reason.split(":")[0] for _, _, reason in letters] == ["wrong_topic"]
