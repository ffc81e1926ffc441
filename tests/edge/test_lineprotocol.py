"""The vectorised line-protocol encoder against influxdb-client's Point and our parser."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from influxdb_client import Point

from edge import lineprotocol as lp
from edge.store import parse_line, parse_lines

# Characters the official client and InfluxDB agree on (the client rewrites tab, CR,
# LF and a trailing backslash, see the module docstring of edge.lineprotocol).
PLAIN = "abcXYZ019 ,=\"'._-/:#éß€😀\u00a0"
NAMES = st.text(alphabet=PLAIN, min_size=1, max_size=12)
MEASUREMENTS = NAMES.filter(lambda s: not s.startswith("#"))
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)
INTS = st.integers(-(2**63) + 1, 2**63 - 1)


def client_lines(
    measurement: str,
    tags: list[dict[str, str]],
    group: list[int],
    ts: list[int],
    floats: dict[str, list[float]],
    ints: dict[str, list[int | None]],
) -> bytes:
    """What influxdb-client writes for the same rows (NaN / None = no value)."""
    out = []
    for i, g in enumerate(group):
        p = Point(measurement)
        for k, v in tags[g].items():
            p.tag(k, v)
        for k, col in floats.items():
            if not math.isnan(col[i]):
                p.field(k, col[i])
        for k, icol in ints.items():
            if icol[i] is not None:
                p.field(k, icol[i])
        p.time(ts[i])
        line = p.to_line_protocol()
        if line:
            out.append(line + "\n")
    return "".join(out).encode()


def ours(
    measurement: str,
    tags: list[dict[str, str]],
    group: list[int],
    ts: list[int],
    floats: dict[str, list[float]],
    ints: dict[str, list[int | None]],
) -> lp.Encoded:
    return lp.encode(
        measurement,
        [lp.tag_set(t) for t in tags],
        np.array(group, dtype=np.int32),
        np.array(ts, dtype=np.int64),
        float_fields={k: np.array(v, dtype=np.float64) for k, v in floats.items()},
        int_fields={
            k: np.array([lp.INT64_MIN if x is None else x for x in v], dtype=np.int64)
            for k, v in ints.items()
        },
    )


# --- escaping --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain", "plain"),
        ("a b", r"a\ b"),
        ("a,b", r"a\,b"),
        ("a=b", r"a\=b"),
        (r"C:\temp", r"C:\temp"),  # a backslash before an ordinary character stays literal
        ("tab\there", "tab\there"),
        ("ünï€😀", "ünï€😀"),
    ],
)
def test_escape_tag(raw: str, escaped: str) -> None:
    assert lp.escape_tag(raw) == escaped


def test_escape_measurement_leaves_equals_sign() -> None:
    assert lp.escape_measurement("a=b c,d") == r"a=b\ c\,d"


@pytest.mark.parametrize(
    "bad", ["end\\", "a\\,b", "a\\ b", "a\\=b", "a\\\\b", 'a\\"', "a\nb", "a\rb"]
)
def test_unrepresentable_strings_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="cannot be written as line protocol"):
        lp.escape_tag(bad)
    with pytest.raises(ValueError, match="cannot be written"):
        lp.tag_set({"k": bad})


@pytest.mark.parametrize("bad", ["", "#comment"])
def test_bad_measurements(bad: str) -> None:
    with pytest.raises(ValueError, match="measurement"):
        lp.escape_measurement(bad)


def test_tag_set_sorts_and_skips_empty() -> None:
    assert lp.tag_set({"z": "1", "a": "x y", "m": "", "": "v"}) == r"a=x\ y,z=1"
    assert lp.tag_set({}) == ""


# --- encoding --------------------------------------------------------------------------


def test_encode_small_example() -> None:
    enc = lp.encode(
        "signal",
        [lp.tag_set({"site": "tpo", "device": "press 3"}), ""],
        np.array([0, 1, 0]),
        np.array([1, 2, -3], dtype=np.int64),
        float_fields={"value": np.array([1.5, np.nan, 21.0])},
        int_fields={"seq": np.array([7, lp.INT64_MIN, -(2**63) + 1], dtype=np.int64)},
    )
    assert enc.data == (
        b"signal,device=press\\ 3,site=tpo seq=7i,value=1.5 1\n"
        b"signal,device=press\\ 3,site=tpo seq=-9223372036854775807i,value=21 -3\n"
    )
    assert (enc.lines, enc.skipped, enc.nonfinite) == (2, 1, 0)


def test_inf_is_absent_and_counted() -> None:
    enc = lp.encode(
        "m",
        [""],
        np.zeros(3, dtype=np.int64),
        np.arange(3, dtype=np.int64),
        float_fields={"a": np.array([np.inf, -np.inf, 2.0]), "b": np.array([1.0, np.nan, 3.0])},
    )
    assert enc.data == b"m b=1 0\nm a=2,b=3 2\n"
    assert (enc.lines, enc.skipped, enc.nonfinite) == (2, 1, 2)


def test_custom_int_absent_lets_int64_min_through() -> None:
    enc = lp.encode(
        "m",
        [""],
        np.zeros(2, dtype=np.int64),
        np.array([5, 6], dtype=np.int64),
        int_fields={"n": np.array([-1, lp.INT64_MIN], dtype=np.int64)},
        int_absent=-1,
    )
    assert enc.data == b"m n=-9223372036854775808i 6\n"
    assert (enc.lines, enc.skipped) == (1, 1)


def test_empty_batch() -> None:
    enc = lp.encode("m", [], np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    assert enc == lp.Encoded(b"", 0, 0, 0)


def test_bad_arguments() -> None:
    ts = np.arange(2, dtype=np.int64)
    with pytest.raises(ValueError, match="group indexes"):
        lp.encode("m", ["a=b"], np.array([0, 1]), ts, float_fields={"v": np.ones(2)})
    with pytest.raises(ValueError, match="shape"):
        lp.encode("m", ["a=b"], np.array([0, 0]), ts, float_fields={"v": np.ones(3)})
    with pytest.raises(ValueError, match="both float and int"):
        lp.encode(
            "m",
            ["a=b"],
            np.array([0, 0]),
            ts,
            float_fields={"v": np.ones(2)},
            int_fields={"v": np.ones(2, dtype=np.int64)},
        )


@pytest.mark.parametrize(
    "value",
    [0.0, -0.0, 1.0, 0.1, 1e-4, 9.99e-5, 1e-5, 5e-324, 2.2250738585072014e-308, 1e15, 1e16,
     9007199254740993.0, 1.7976931348623157e308, -123456.789, 1234567890123456.8, 1e22, 1e-7],
)  # fmt: skip
def test_float_text_matches_client_and_round_trips(value: float) -> None:
    floats = {"v": [value]}
    enc = ours("m", [{}], [0], [1], floats, {})
    assert enc.data == client_lines("m", [{}], [0], [1], floats, {})
    parsed = parse_line(enc.data.decode().rstrip("\n")).fields["v"]
    assert struct.pack("<d", parsed) == struct.pack("<d", value)


def test_many_rows_across_chunks_match_client() -> None:
    rng = np.random.default_rng(7)
    n = 40_000  # more than two chunks
    x = rng.standard_normal(n) * 10.0 ** rng.integers(-12, 25, n)
    x[::4] = np.round(x[::4], 2)
    x[::11] = np.nan
    cnt = rng.integers(-(2**63) + 1, 2**63 - 1, n, dtype=np.int64)
    ints: list[int | None] = [None if i % 13 == 0 else int(v) for i, v in enumerate(cnt)]
    tags = [{"site": "tpo", "device": f"dev {i}", "channel": "a,b=c"} for i in range(5)]
    group = rng.integers(0, 5, n).tolist()
    ts = (1_764_000_000_000_000_000 + np.arange(n) * 1_000_003).tolist()
    enc = ours("signal", tags, group, ts, {"value": x.tolist()}, {"count": ints})
    assert enc.data == client_lines(
        "signal", tags, group, ts, {"value": x.tolist()}, {"count": ints}
    )
    assert enc.lines + enc.skipped == n


@st.composite
def batches(
    draw: st.DrawFn,
) -> tuple[
    str,
    list[dict[str, str]],
    list[int],
    list[int],
    dict[str, list[float]],
    dict[str, list[int | None]],
]:
    measurement = draw(MEASUREMENTS)
    tags = draw(st.lists(st.dictionaries(NAMES, NAMES, max_size=4), min_size=1, max_size=4))
    n = draw(st.integers(0, 30))
    group = draw(st.lists(st.integers(0, len(tags) - 1), min_size=n, max_size=n))
    ts = draw(st.lists(st.integers(-(2**63) + 1, 2**63 - 1), min_size=n, max_size=n))
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    split = draw(st.integers(0, len(names)))
    floats = {k: draw(st.lists(FLOATS, min_size=n, max_size=n)) for k in names[:split]}
    ints = {k: draw(st.lists(st.none() | INTS, min_size=n, max_size=n)) for k in names[split:]}
    return measurement, tags, group, ts, floats, ints


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_byte_identical_to_influxdb_client(batch) -> None:  # type: ignore[no-untyped-def]
    enc = ours(*batch)
    assert enc.data == client_lines(*batch)
    n = len(batch[2])
    assert enc.lines + enc.skipped == n
    assert enc.lines == enc.data.count(b"\n")
    assert enc.nonfinite == sum(math.isinf(v) for col in batch[4].values() for v in col)


@settings(max_examples=300, deadline=None)
@given(batches())
def test_parse_back_gives_the_same_points(batch) -> None:  # type: ignore[no-untyped-def]
    measurement, tags, group, ts, floats, ints = batch
    enc = ours(*batch)
    points, errors = parse_lines(enc.data)
    assert errors == []
    expected = []
    for i, g in enumerate(group):
        fields: dict[str, float | int] = {k: c[i] for k, c in floats.items() if math.isfinite(c[i])}
        fields |= {k: c[i] for k, c in ints.items() if c[i] is not None}
        if fields:
            expected.append(
                (measurement, {k: v for k, v in tags[g].items() if k and v}, fields, ts[i])
            )
    got = [(p.measurement, p.tags, p.fields, p.ts) for p in points]
    assert len(got) == len(expected)
    for (gm, gt, gf, gts), (em, et, ef, ets) in zip(got, expected, strict=True):
        assert (gm, gt, gts) == (em, et, ets)
        assert gf.keys() == ef.keys()
        for k, v in ef.items():
            assert type(gf[k]) is type(v)
            assert (
                struct.pack("<d", gf[k]) == struct.pack("<d", v)
                if isinstance(v, float)
                else gf[k] == v
            )


WILD = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",))
    | st.sampled_from('\\ ,="\t\n'),
    max_size=10,
)


@settings(max_examples=400, deadline=None)
@given(WILD, WILD, WILD)
def test_any_string_is_refused_or_read_back_unchanged(key: str, value: str, meas: str) -> None:
    """Backslashes, tabs, unicode: either ValueError, or the parser returns the original."""
    try:
        tags = lp.tag_set({key: value})
        enc = lp.encode(
            meas or "m",
            [tags],
            np.zeros(1, dtype=np.int64),
            np.ones(1, dtype=np.int64),
            float_fields={key or "f": np.array([1.0])},
        )
    except ValueError:
        return
    (point,), errors = parse_lines(enc.data)
    assert errors == []
    assert point.measurement == (meas or "m")
    assert point.tags == ({key: value} if key and value else {})
    assert point.fields == {key or "f": 1.0}


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 2**64 - 1))
def test_every_finite_bit_pattern_matches_repr(bits: int) -> None:
    value = struct.unpack("<d", struct.pack("<Q", bits))[0]
    if not math.isfinite(value):
        return
    enc = lp.encode(
        "m",
        [""],
        np.zeros(1, dtype=np.int64),
        np.zeros(1, dtype=np.int64),
        float_fields={"v": np.array([value])},
    )
    text = repr(value).removesuffix(".0")
    assert enc.data == f"m v={text} 0\n".encode()
