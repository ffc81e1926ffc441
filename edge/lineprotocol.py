"""Vectorised InfluxDB line-protocol encoder.

One line per row: ``measurement,<tag set> f1=1.5,f2=3i <ts>\\n``. Every piece of
a line (measurement and tag set, field keys, digits, timestamp) is written as a
fixed-width block of bytes into a ``(rows, width)`` matrix next to a boolean
"keep" mask; the line protocol is then ``matrix[keep]``, because numpy's boolean
selection walks row by row. No Python object is made per point, except for
floats outside the fast decimal path (see :func:`_float_blocks`).

Output is byte-identical to influxdb-client's ``Point.to_line_protocol()`` for
the same point (fields sorted by key, floats in Python's shortest ``repr`` with
a trailing ``.0`` dropped, ints with ``i``), except where that client changes
the value: it turns a tab or newline into a backslash and a letter and appends a
space to a trailing backslash. We leave tabs as they are and refuse what no
InfluxDB version reads back unchanged (see :func:`escape_tag`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

INT64_MIN = int(np.iinfo(np.int64).min)
"""Default marker of an absent int field value."""

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
    return ",".join(
        f"{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(tags.items()) if k and v
    )


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
    """Floats exactly as influxdb-client writes them: shortest ``repr``, ``.0`` dropped.

    Fast path: a value x in [1e-4, 1e15) (or zero) that equals r / 10**k for an integer
    r < 1e15 and the smallest such k is written as r with the point k digits from the
    right. Division of two exact doubles is correctly rounded, so the text reads back as x;
    with at most 15 significant digits no other decimal of that length reads back as x, so
    it is also what ``repr`` prints. Everything else (exponent notation, 16-17 digits)
    goes through ``float.__repr__``.
    """
    a = np.abs(x)
    k = np.full(x.shape[0], -1, dtype=np.intp)
    r = np.zeros(x.shape[0], dtype=np.float64)
    idx = np.flatnonzero(present & (((a >= 1e-4) & (a < 1e15)) | (a == 0)))
    xa = a[idx]
    for kk in range(19):
        if idx.size == 0:
            break
        scale = 10.0**kk
        y = np.rint(xa * scale)
        small = y < 1e15
        ok = small & (y / scale == xa)
        k[idx[ok]] = kk
        r[idx[ok]] = y[ok]
        again = small & ~ok
        idx, xa = idx[again], xa[again]
    fast = k >= 0
    kf = np.where(fast, k, 0)
    ru = r.astype(np.uint64)
    div = _POW10[kf]
    ip, fp = ru // div, ru % div
    ip_ndig = np.where(fast, _ndigits(ip), 0)
    b.const(b"-", fast & np.signbit(x))
    b.right(_digits(ip, ip_ndig), ip_ndig)
    b.const(b".", fast & (kf > 0))
    b.right(_digits(fp, kf), kf)

    slow = np.flatnonzero(present & ~fast)
    if slow.size:
        text = np.zeros((x.shape[0], 24), dtype=np.uint8)  # repr of a double is <= 24 chars
        length = np.zeros(x.shape[0], dtype=np.intp)
        s = np.array(list(map(float.__repr__, x[slow].tolist())), dtype="S24")
        m = s.view(np.uint8).reshape(slow.size, 24)
        n = np.strings.str_len(s).astype(np.intp)
        rows = np.arange(slow.size)
        dot0 = (m[rows, n - 2] == ord(".")) & (m[rows, n - 1] == ord("0"))
        text[slow] = m
        length[slow] = n - 2 * dot0
        b.left(text, length)


def _encode_chunk(
    prefix: npt.NDArray[np.uint8],
    prefix_len: npt.NDArray[np.intp],
    group: npt.NDArray[np.intp],
    ts_ns: npt.NDArray[np.int64],
    fields: list[tuple[bytes, npt.NDArray[np.float64] | npt.NDArray[np.int64], bool]],
    int_absent: int,
) -> tuple[bytes, int, int]:
    rows = ts_ns.shape[0]
    b = _Blocks(rows)
    b.left(prefix[group], prefix_len[group])
    any_before = np.zeros(rows, dtype=np.bool_)
    nonfinite = 0
    for key, values, is_float in fields:
        if is_float:
            finite = np.isfinite(values)
            present = finite
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


def encode(  # noqa: PLR0913 - the columns of a batch
    measurement: str,
    tag_sets: Sequence[str],
    group: npt.NDArray[np.integer],
    ts_ns: npt.NDArray[np.int64],
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
    columns: list[tuple[str, npt.NDArray[np.float64] | npt.NDArray[np.int64], bool]] = []
    for name in names:
        is_float = name in float_fields
        col = float_fields[name] if is_float else int_fields[name]
        col = np.asarray(col, dtype=np.float64 if is_float else np.int64)
        if col.shape != (n,):
            raise ValueError(f"field {name!r} has shape {col.shape}, expected ({n},)")
        columns.append((name, col, is_float))
    group = np.asarray(group, dtype=np.intp)
    ts_ns = np.asarray(ts_ns, dtype=np.int64)
    if group.shape != (n,):
        raise ValueError(f"group has shape {group.shape}, expected ({n},)")
    if n and (group.min() < 0 or group.max() >= len(tag_sets)):
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
        fields = [(f"{escape_tag(k)}=".encode(), c[sl], f) for k, c, f in columns]
        data, count, inf = _encode_chunk(
            prefix, prefix_len, group[sl], ts_ns[sl], fields, int_absent
        )
        parts.append(data)
        lines += count
        nonfinite += inf
    return Encoded(b"".join(parts), lines, n - lines, nonfinite)
