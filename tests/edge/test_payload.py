from __future__ import annotations

import numpy as np
import pytest

from drivers.base import BAD, NO_TIMESTAMP, SampleBatch, SeriesKey, SeriesTable
from edge.errors import DecodeError
from edge.payload import decode_samples, device_topic, encode_samples


def table() -> SeriesTable:
    return SeriesTable(
        [
            SeriesKey("tpo", "hall-a", "meter-1", "voltage_l1", "V", "modbus"),
            SeriesKey("tpo", "hall-a", "meter-1", "power", "W", "modbus"),
            SeriesKey(
                "tpo", "street", "charger-1", "status", "", "mqtt", codes=("Available", "Charging")
            ),
        ]
    )


def test_roundtrip_keeps_every_column_bit_exact() -> None:
    rng = np.random.default_rng(1)
    n = 50
    batch = SampleBatch.build(
        rng.integers(0, 2, n),
        rng.normal(230, 5, n),
        ts_receive=rng.integers(1, 2**62, n),
        ts_source=np.where(rng.random(n) < 0.5, NO_TIMESTAMP, rng.integers(1, 2**62, n)),
        quality=rng.integers(0, 3, n),
        seq=rng.integers(-1, 2**40, n),
    )
    batch.value[3] = np.nan
    decoded = decode_samples(encode_samples(batch, table(), agent_id="a1", batch_seq=7))
    assert (decoded.site, decoded.area, decoded.device, decoded.batch_seq) == (
        "tpo",
        "hall-a",
        "meter-1",
        7,
    )
    names = np.array(decoded.channels)[decoded.ch]
    expected = np.array(["voltage_l1", "power"])[batch.series]
    assert (names == expected).all()
    np.testing.assert_array_equal(decoded.value, batch.value)  # NaN == NaN here
    np.testing.assert_array_equal(decoded.ts_source, batch.ts_source)
    np.testing.assert_array_equal(decoded.ts_receive, batch.ts_receive)
    np.testing.assert_array_equal(decoded.quality, batch.quality)
    np.testing.assert_array_equal(decoded.seq, batch.seq)


def test_bad_sample_stays_bad_with_null_value() -> None:
    batch = SampleBatch.build([0], [np.nan], ts_receive=1, quality=BAD)
    raw = encode_samples(batch, table(), agent_id="a", batch_seq=1)
    assert b'"value":[null]' in raw
    decoded = decode_samples(raw)
    assert np.isnan(decoded.value[0])
    assert decoded.quality[0] == BAD


def test_encoding_refuses_mixed_devices() -> None:
    batch = SampleBatch.build([0, 2], [1.0, 1.0], ts_receive=1)
    with pytest.raises(ValueError, match="mixes devices"):
        encode_samples(batch, table(), agent_id="a", batch_seq=1)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not JSON"),
        (b'{"schema": "tpo.samples/2"}', "schema is 'tpo.samples/2'"),
        (b'{"schema": "tpo.samples/1", "site": "x"}', "header field"),
        (
            b'{"schema":"tpo.samples/1","site":"s","area":"a","device":"d","agent":"g","batch_seq":1,'
            b'"channels":[{"name":"c"}],"ch":[0,1],"ts_source":[1,1],"ts_receive":[1,1],'
            b'"value":[1,2],"quality":[0,0],"seq":[-1,-1]}',
            "indexes a channel",
        ),
        (
            b'{"schema":"tpo.samples/1","site":"s","area":"a","device":"d","agent":"g","batch_seq":1,'
            b'"channels":[{"name":"c"}],"ch":[0],"ts_source":[1],"ts_receive":[1],'
            b'"value":["x"],"quality":[0],"seq":[-1]}',
            "field 'value'",
        ),
        (
            b'{"schema":"tpo.samples/1","site":"s","area":"a","device":"d","agent":"g","batch_seq":1,'
            b'"channels":[{"name":"c"}],"ch":[0],"ts_source":[1,2],"ts_receive":[1],'
            b'"value":[1],"quality":[0],"seq":[-1]}',
            "'ts_source' has 2 entries",
        ),
    ],
)
def test_decode_errors_say_what_is_wrong(raw: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason.replace("(", r"\(")):
        decode_samples(raw)


def test_topics() -> None:
    assert device_topic("tpo", "hall-a", "meter-1", "data") == "tpo/v1/tpo/hall-a/meter-1/data"
