r"""Vectorised InfluxDB line-protocol encoder.

One line per row: ``measurement,<tag set> f1=1.5,f2=3i <ts>\n``. Every piece of
a line (measurement and tag set, field keys, digits, timestamp) is written as a
fixed-width block of bytes into a ``(rows, width)`` matrix next to a boolean
"keep" mask; the line protocol is then ``matrix[keep]``, because numpy's boolean
selection walks row by row. No Python object is made per point, except for
floats of magnitude below 1e-4 (see :func:`_float_blocks`).

Output is byte-identical to influxdb-client's ``Point.to_line_protocol()`` for
the same point (fields sorted by key, floats in Python's shortest ``repr`` with
a trailing ``.0`` dropped, ints with ``i``), except where that client changes
the value: it turns a tab or newline into a backslash and a letter and appends a
space to a trailing backslash. We leave tabs as they are and refuse what no
InfluxDB version reads back unchanged (see :func:`escape_tag`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

INT64_MIN = int(np.iinfo(np.int64).min)
"""Default marker of an absent int field value."""

_FLOAT_WIDTH = 24  # the longest repr of a double: -2.2250738585072014e-308
_CHUNK_ROWS = 16384  # keeps the byte matrix of one chunk (a few MB) in cache
_EMPTY: Mapping[str, npt.NDArray[np.float64]] = MappingProxyType({})
_EMPTY_INT: Mapping[str, npt.NDArray[np.int64]] = MappingProxyType({})

# InfluxDB 1.x/2.x treat a backslash as literal unless it stands before a character the
# parser escapes; such a backslash (or a trailing one) cannot be written so that it reads
# back unchanged (influxdata/telegraf#3004). Newlines end the line in every version.
_UNREPRESENTABLE = re.compile(r'\\(?:$|[\\, ="])|[\n\r]')


@dataclass(frozen=True, slots=True)
class Encoded:
    """Line protocol bytes and what went into them."""

    data: bytes
    lines: int
    skipped: int
    """Rows left out because none of their fields had a value."""
    nonfinite: int = 0
    """Float values left out because they were +-inf (line protocol has no inf)."""


def _check(s: str, what: str) -> None:
    if _UNREPRESENTABLE.search(s):
        msg = (
            f"{what} {s!r} cannot be written as line protocol: it has a newline, or a backslash"
            " at its end or before a backslash, comma, space, '=' or '\"'"
        )
        raise ValueError(msg)


def escape_measurement(s: str) -> str:
    """Escape a measurement name (commas and spaces); reject unrepresentable names."""
    if not s or s.startswith("#"):
        # A leading '#' turns the whole line into a comment: the data would vanish.
        raise ValueError(f"measurement {s!r} must be non-empty and not start with '#'")
    _check(s, "measurement")
    return s.replace(",", r"\,").replace(" ", r"\ ")


def escape_tag(s: str) -> str:
    """Escape a tag key, tag value or field key (commas, spaces, equals signs).

    Backslashes stay literal, as InfluxDB reads them; a string whose backslash would be
    read as an escape (at the end, or before a backslash, comma, space, '=' or '"') or
    that holds a newline raises ValueError rather than being stored altered.
    """
    _check(s, "tag or field key")
    return s.replace(",", r"\,").replace("=", r"\=").replace(" ", r"\ ")


def tag_set(tags: Mapping[str, str]) -> str:
    """The escaped tag set ``k1=v1,k2=v2`` sorted by key; empty keys or values are left out."""
    return ",".join(f"{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(tags.items()) if k and v)


# --- digits ---------------------------------------------------------------------------

_PAIRS = np.array([f"{i:02d}".encode() for i in range(100)], dtype="S2").view(np.uint16)
_POW10 = 10 ** np.arange(20, dtype=np.uint64)


def _digits(u: npt.NDArray[np.uint64], ndig: npt.NDArray[np.intp]) -> npt.NDArray[np.uint8]:
    """Decimal digits of ``u``, right-aligned and zero-padded to the widest ``ndig`` (even)."""
    width = int(ndig.max(initial=0) + 1) // 2 * 2
    pairs = np.empty((u.shape[0], width // 2), dtype=np.uint16)
    v = u.copy()
    hundred = np.uint64(100)
    for j in range(width // 2 - 1, -1, -1):
        q = v // hundred
        pairs[:, j] = _PAIRS[v - q * hundred]
        v = q
    return pairs.view(np.uint8)


def _ndigits(u: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
    """How many decimal digits ``u`` has (1 for zero)."""
    return np.searchsorted(_POW10[1:], u, side="right") + 1


class _Blocks:
    """The fixed-width byte blocks of one chunk of lines and their keep masks."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.data: list[npt.NDArray[np.uint8]] = []
        self.keep: list[npt.NDArray[np.bool_]] = []

    def const(self, text: bytes, present: npt.NDArray[np.bool_]) -> None:
        """The same bytes on every row where ``present``."""
        row = np.frombuffer(text, dtype=np.uint8)
        self.data.append(np.broadcast_to(row, (self.rows, row.size)))
        self.keep.append(np.broadcast_to(present[:, None], (self.rows, row.size)))

    def left(self, data: npt.NDArray[np.uint8], length: npt.NDArray[np.intp]) -> None:
        """Left-aligned bytes: the first ``length`` columns of each row."""
        self.data.append(data)
        self.keep.append(np.arange(data.shape[1]) < length[:, None])

    def right(self, data: npt.NDArray[np.uint8], length: npt.NDArray[np.intp]) -> None:
        """Right-aligned bytes: the last ``length`` columns of each row (0 = nothing)."""
        self.data.append(data)
        self.keep.append(np.arange(data.shape[1]) >= data.shape[1] - length[:, None])

    def join(self, row_kept: npt.NDArray[np.bool_]) -> bytes:
        """Concatenate the kept bytes, row by row, of the rows in ``row_kept``."""
        data = np.hstack(self.data)
        keep = np.hstack(self.keep)
        keep &= row_kept[:, None]
        return data[keep].tobytes()


def _int_blocks(
    b: _Blocks, v: npt.NDArray[np.int64], present: npt.NDArray[np.bool_], suffix: bytes
) -> None:
    """Signed decimal integers (``-12``) followed by ``suffix``, on rows where ``present``."""
    neg = v < 0
    # Two's complement negation in uint64 also handles INT64_MIN.
    u = np.where(neg, ~v.view(np.uint64) + np.uint64(1), v.view(np.uint64))
    ndig = np.where(present, _ndigits(u), 0)
    b.const(b"-", present & neg)
    b.right(_digits(u, ndig), ndig)
    if suffix:
        b.const(suffix, present)


def _float_blocks(b: _Blocks, x: npt.NDArray[np.float64], present: npt.NDArray[np.bool_]) -> None:
    """Floats exactly as influxdb-client writes them: Python's ``repr``, ``.0`` dropped.

    orjson prints the shortest text that reads back as the same double (like ``repr``)
    and, for ``abs(x) >= 1e-4``, in the same notation as ``repr``; it does a whole
    array in C. Below 1e-4 ``repr`` switches to ``1e-05`` style and orjson does not,
    so those few values go through ``float.__repr__``.
    """
    rows = x.shape[0]
    text = np.zeros((rows, _FLOAT_WIDTH), dtype=np.uint8)
    length = np.zeros(rows, dtype=np.intp)
    tiny = present & (np.abs(x) < 1e-4) & (x != 0)
    usual = np.flatnonzero(present & ~tiny)
    if usual.size:
        js = np.frombuffer(orjson.dumps(x[usual], option=orjson.OPT_SERIALIZE_NUMPY), np.uint8)
        ends = np.flatnonzero((js == ord(",")) | (js == ord("]")))  # js is "[a,b,...]"
        starts = np.empty_like(ends)
        starts[0] = 1
        starts[1:] = ends[:-1] + 1
        padded = np.concatenate((js, np.zeros(_FLOAT_WIDTH, dtype=np.uint8)))
        text[usual] = sliding_window_view(padded, _FLOAT_WIDTH)[starts]
        length[usual] = ends - starts
    some = np.flatnonzero(tiny)
    if some.size:
        s = np.array(list(map(float.__repr__, x[some].tolist())), dtype=f"S{_FLOAT_WIDTH}")
        text[some] = s.view(np.uint8).reshape(some.size, _FLOAT_WIDTH)
        length[some] = np.strings.str_len(s)
    idx = np.arange(rows)
    tail = np.maximum(length - 2, 0)
    dot0 = (text[idx, tail] == ord(".")) & (text[idx, tail + 1] == ord("0")) & (length > 2)
    length -= 2 * dot0
    b.left(text[:, : max(int(length.max(initial=0)), 1)], length)


_Field = tuple[bytes, npt.NDArray[np.float64] | npt.NDArray[np.int64], bool]
"""Escaped ``key=``, the column, and whether it is a float column."""


def _encode_chunk(
    *,
    prefix: npt.NDArray[np.uint8],
    prefix_len: npt.NDArray[np.intp],
    group: npt.NDArray[np.intp],
    ts_ns: npt.NDArray[np.int64],
    fields: list[_Field],
    int_absent: int,
) -> tuple[bytes, int, int]:
    rows = ts_ns.shape[0]
    b = _Blocks(rows)
    b.left(prefix[group], prefix_len[group])
    any_before = np.zeros(rows, dtype=np.bool_)
    nonfinite = 0
    for key, values, is_float in fields:
        if is_float:
            present = np.isfinite(values)
            nonfinite += int(np.count_nonzero(np.isinf(values)))
        else:
            present = values != int_absent
        b.const(b",", present & any_before)
        b.const(key, present)
        if is_float:
            _float_blocks(b, values, present)  # type: ignore[arg-type]
        else:
            _int_blocks(b, values, present, b"i")  # type: ignore[arg-type]
        any_before |= present
    all_rows = np.ones(rows, dtype=np.bool_)
    b.const(b" ", all_rows)
    _int_blocks(b, ts_ns, all_rows, b"\n")
    return b.join(any_before), int(np.count_nonzero(any_before)), nonfinite


def encode(
    measurement: str,
    tag_sets: Sequence[str],
    group: npt.NDArray[np.integer[Any]],
    ts_ns: npt.NDArray[np.int64],
    *,
    float_fields: Mapping[str, npt.NDArray[np.float64]] = _EMPTY,
    int_fields: Mapping[str, npt.NDArray[np.int64]] = _EMPTY_INT,
    int_absent: int = INT64_MIN,
) -> Encoded:
    """Encode one line per row: ``measurement,<tag_sets[group[i]]> fields ts_ns[i]``.

    A NaN or +-inf float and an int equal to ``int_absent`` mean "no value" for that
    field in that row; a row without any value is skipped (counted in ``skipped``).
    ``tag_sets`` holds ready, escaped tag sets (see :func:`tag_set`).
    """
    n = int(ts_ns.shape[0])
    names = sorted([*float_fields, *int_fields])
    if len(set(names)) != len(names):
        raise ValueError(f"field names appear as both float and int: {names}")
    columns: list[_Field] = []
    for name in names:
        col: npt.NDArray[np.float64] | npt.NDArray[np.int64]
        if name in float_fields:
            col = np.asarray(float_fields[name], dtype=np.float64)
        else:
            col = np.asarray(int_fields[name], dtype=np.int64)
        if col.shape != (n,):
            raise ValueError(f"field {name!r} has shape {col.shape}, expected ({n},)")
        columns.append((f"{escape_tag(name)}=".encode(), col, name in float_fields))
    rows_group = np.asarray(group, dtype=np.intp)
    ts = np.asarray(ts_ns, dtype=np.int64)
    if rows_group.shape != (n,):
        raise ValueError(f"group has shape {rows_group.shape}, expected ({n},)")
    if n and (rows_group.min() < 0 or rows_group.max() >= len(tag_sets)):
        raise ValueError(f"group indexes outside 0..{len(tag_sets) - 1}")

    m = escape_measurement(measurement)
    heads = [(f"{m},{t} " if t else f"{m} ").encode() for t in tag_sets]
    width = max((len(h) for h in heads), default=1)
    prefix = np.array(heads, dtype=f"S{width}").view(np.uint8).reshape(len(heads), width)
    prefix_len = np.array([len(h) for h in heads], dtype=np.intp)

    parts: list[bytes] = []
    lines = nonfinite = 0
    for start in range(0, n, _CHUNK_ROWS):
        sl = slice(start, start + _CHUNK_ROWS)
        data, count, inf = _encode_chunk(
            prefix=prefix,
            prefix_len=prefix_len,
            group=rows_group[sl],
            ts_ns=ts[sl],
            fields=[(key, col[sl], is_float) for key, col, is_float in columns],
            int_absent=int_absent,
        )
        parts.append(data)
        lines += count
        nonfinite += inf
    return Encoded(b"".join(parts), lines, n - lines, nonfinite)
