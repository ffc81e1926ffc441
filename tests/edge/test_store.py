"""The line-protocol parser and the SQLite fallback store."""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

import numpy as np
import pytest

from edge import lineprotocol as lp
from edge.errors import SinkRejectedError
from edge.store import ParsedPoint, SqliteStore, parse_line, parse_lines


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("m v=1 5", ParsedPoint("m", {}, {"v": 1.0}, 5)),
        ("m v=1", ParsedPoint("m", {}, {"v": 1.0}, None)),
        (
            r'my\ m\,x,t\ k=a\,b\=c\ d v=-1.5e-07,n=-3i,u=4u,b=t,B=FALSE,s="q\\\" x,y" -12',
            ParsedPoint(
                "my m,x",
                {"t k": "a,b=c d"},
                {"v": -1.5e-07, "n": -3, "u": 4, "b": True, "B": False, "s": 'q\\" x,y'},
                -12,
            ),
        ),
        (r"m,p=C:\temp v=1 1", ParsedPoint("m", {"p": r"C:\temp"}, {"v": 1.0}, 1)),
        ("m=x,t=a v=1 1", ParsedPoint("m=x", {"t": "a"}, {"v": 1.0}, 1)),
    ],
)
def test_parse_line(line: str, expected: ParsedPoint) -> None:
    assert parse_line(line) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "m",
        "m 1",
        "m v= 1",
        "m,t v=1 1",
        "m v=1 x",
        "m v=inf 1",
        "m v=abc 1",
        'm v="open 1',
        "m v=99999999999999999999i 1",
        "m v=-1u 1",
        "m  v=1 1",
    ],
)
def test_parse_line_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match=r"unable to parse|invalid|range"):
        parse_line(bad)


def test_parse_lines_skips_blank_and_comments_and_reports_bad() -> None:
    points, errors = parse_lines(b"# comment\n\nm v=1 1\r\nbroken\nm v=2 2\n")
    assert [p.fields["v"] for p in points] == [1.0, 2.0]
    assert len(errors) == 1
    assert errors[0].startswith("line 4:")


async def test_store_write_count_and_idempotence(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n = 2000
    values = rng.standard_normal(n) * 10.0 ** rng.integers(-300, 300, n)
    tags = [lp.tag_set({"site": "tpo", "device": f"d,{i} x=y"}) for i in range(4)]
    group = np.arange(n) % 4
    ts = 1_764_000_000_000_000_000 + np.arange(n, dtype=np.int64)
    enc = lp.encode("signal", tags, group, ts, float_fields={"value": values})
    async with SqliteStore(tmp_path / "s.sqlite") as store:
        await store.write(enc.data)
        await store.write(enc.data)  # a replay overwrites itself
        assert await store.count("signal") == n
        assert await store.count("signal", {"device": "d,1 x=y"}) == n // 4
        assert await store.count("signal", {"device": "d,1 x=y", "site": "other"}) == 0
        assert await store.count("nothing") == 0
        rows = await store.query_series("signal", {"device": "d,2 x=y"})
        assert [t for t, _ in rows] == ts[2::4].tolist()
        got = np.array([f["value"] for _, f in rows])
        assert got.tobytes() == values[2::4].tobytes()  # bit-exact
        assert {frozenset(s.items()) for s in await store.series("signal")} == {
            frozenset({"site": "tpo", "device": f"d,{i} x=y"}.items()) for i in range(4)
        }


async def test_store_merges_fields_of_the_same_point(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "s.sqlite") as store:
        await store.write(b"m,a=1 x=1,y=2i 10\n")
        await store.write(b'm,a=1 y=3i,z="s" 10\nm,a=1 x=5 11\n')
        assert await store.query_series("m") == [
            (10, {"x": 1.0, "y": 3, "z": "s"}),
            (11, {"x": 5.0}),
        ]
        assert await store.count("m", {"a": "1"}) == 2


async def test_store_partial_write(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(SinkRejectedError, match=r"partial write, 1 line\(s\) dropped: line 2"):
            await store.write(b"m v=1 1\nm v=oops 2\nm v=3 3\n")
        assert await store.count("m") == 2


async def test_store_uses_wal_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = SqliteStore(path)
    await store.write(b"m v=0.1 1\n")
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    async with SqliteStore(path) as again:
        ((ts, fields),) = await again.query_series("m")
        assert ts == 1
        assert struct.pack("<d", fields["v"]) == struct.pack("<d", 0.1)
