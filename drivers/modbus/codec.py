"""Register words <-> values, in the four byte/word orders.

A value of ``n`` registers is first put into big-endian order (the "ABCD" of
the Modbus world), then read with :mod:`struct` / numpy dtypes:

* word order: ABCD and BADC keep the registers as sent (high word first),
  CDAB and DCBA reverse them (low word first);
* byte order: ABCD and CDAB keep the bytes of each register (high byte first,
  as the protocol sends them), BADC and DCBA swap them.

So for 16-bit types only the byte order matters (ABCD/CDAB = AB, BADC/DCBA =
BA), and for 64-bit types the same rule gives ABCDEFGH, GHEFCDAB, BADCFEHG and
HGFEDCBA. 123456.0 as float32 is 0x47F1 0x2000 (ABCD), 0x2000 0x47F1 (CDAB),
0xF147 0x0020 (BADC) and 0x0020 0xF147 (DCBA).

:class:`BlockDecoder` is the vectorised path the driver uses: compiled once per
request, it turns one reply into float64 values with one numpy gather per
(type, order) group. :func:`decode` is the scalar twin it is tested against.

The common case of a meter map (every field of a request has the same type and
order and starts on a multiple of its register count) skips the byte gather:
packing the registers little- instead of big-endian swaps the bytes of each
register, and reading the value little-endian reverses all its bytes (= word
swap plus byte swap), so the four orders are four (pack, dtype) endianness pairs
and ``np.frombuffer`` reads the values in place.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from collections.abc import Sequence

    from drivers.modbus.config import ModbusRegister

DATATYPE: dict[str, tuple[str, int]] = {
    "bool": ("H", 1),
    "int16": ("h", 1),
    "uint16": ("H", 1),
    "int32": ("i", 2),
    "uint32": ("I", 2),
    "float32": ("f", 2),
    "int64": ("q", 4),
    "uint64": ("Q", 4),
    "float64": ("d", 4),
}
"""Type name -> (struct code, register count); strings span their configured length."""

_WORD_SWAP = frozenset({"CDAB", "DCBA"})
_BYTE_SWAP = frozenset({"BADC", "DCBA"})


def _to_big_endian(words: Sequence[int], order: str) -> bytes:
    """Registers as sent -> the value's bytes, most significant first."""
    seq = list(words)
    if order in _WORD_SWAP:
        seq.reverse()
    raw = struct.pack(f">{len(seq)}H", *seq)
    if order in _BYTE_SWAP:
        swapped = bytearray(raw)
        swapped[0::2], swapped[1::2] = raw[1::2], raw[0::2]
        raw = bytes(swapped)
    return raw


def _from_big_endian(raw: bytes, order: str) -> list[int]:
    """The value's bytes, most significant first -> registers as sent (inverse of the above)."""
    if order in _BYTE_SWAP:
        swapped = bytearray(raw)
        swapped[0::2], swapped[1::2] = raw[1::2], raw[0::2]
        raw = bytes(swapped)
    words = list(struct.unpack(f">{len(raw) // 2}H", raw))
    if order in _WORD_SWAP:
        words.reverse()
    return words


def decode(
    words: Sequence[int],
    type_: str,
    order: str = "ABCD",
    *,
    bit: int | None = None,
) -> int | float | bool | str:
    """Decode one value from its registers (raw: no scale or offset)."""
    if type_ == "string":
        raw = _to_big_endian(words, "BADC" if order in _BYTE_SWAP else "ABCD")
        return raw.split(b"\0", 1)[0].decode("latin-1").rstrip(" ")
    code, count = DATATYPE[type_]
    if len(words) != count:
        raise ValueError(f"{type_} needs {count} registers, got {len(words)}")
    value: int | float = struct.unpack(f">{code}", _to_big_endian(words, order))[0]
    if type_ == "bool":
        return bool((int(value) >> (bit or 0)) & 1)
    return value


def encode(
    value: float | bool | str,
    type_: str,
    order: str = "ABCD",
    *,
    bit: int | None = None,
    length: int | None = None,
) -> list[int]:
    """Encode one value into registers as a device sends them (the simulator's writer).

    Integers are rounded and must fit the type; ``bool`` with ``bit`` sets only that
    bit; strings are padded with NUL to ``length`` registers.
    """
    if type_ == "string":
        if length is None:
            raise ValueError("string needs length")
        raw = str(value).encode("latin-1")[: 2 * length].ljust(2 * length, b"\0")
        return _from_big_endian(raw, "BADC" if order in _BYTE_SWAP else "ABCD")
    code, _count = DATATYPE[type_]
    if type_ == "bool":
        number: int | float = (1 << (bit or 0)) if value else 0
    elif code in "fd":
        number = float(value)
    else:
        number = round(float(value)) if isinstance(value, float) else int(value)
    return _from_big_endian(struct.pack(f">{code}", number), order)


def quantise(value: float, type_: str) -> float:
    """The value a register of ``type_`` can hold that is nearest ``value`` (float32 rounding)."""
    if type_ == "float32":
        return float(np.float32(value))
    if type_ in {"float64", "bool"}:
        return float(value)
    return float(round(value))


def _byte_permutation(count: int, order: str) -> npt.NDArray[np.intp]:
    """Indexes into the wire bytes of a value that yield its big-endian bytes."""
    wire = np.arange(2 * count, dtype=np.intp).reshape(count, 2)
    if order in _WORD_SWAP:
        wire = wire[::-1]
    if order in _BYTE_SWAP:
        wire = wire[:, ::-1]
    return wire.reshape(-1)


@dataclass(frozen=True, slots=True)
class _Group:
    """Fields of one request sharing (type, order): decoded by one gather."""

    positions: npt.NDArray[np.intp]
    byte_index: npt.NDArray[np.intp]
    dtype: np.dtype[np.generic]
    scale: npt.NDArray[np.float64]
    offset: npt.NDArray[np.float64]
    bits: npt.NDArray[np.uint16] | None
    identity: bool
    """Every scale is 1 and every offset 0: skip the arithmetic."""


@dataclass(frozen=True, slots=True)
class _Aligned:
    """Every field shares (type, order) and sits on a value boundary: frombuffer, no gather."""

    pack: struct.Struct
    """Packs exactly ``count`` registers in the endianness this order needs."""
    pack_code: str
    dtype: np.dtype[np.generic]
    items: int
    """Whole values in ``count`` registers (what frombuffer reads)."""
    index: npt.NDArray[np.intp] | None
    """Value index of each field, or None when the fields are exactly values 0..n-1."""
    scale: npt.NDArray[np.float64]
    offset: npt.NDArray[np.float64]
    identity: bool


def _aligned_layout(fields: Sequence[tuple[int, ModbusRegister]], count: int) -> _Aligned | None:
    """The frombuffer plan of ``fields`` when one (type, order) covers them all, else None."""
    kinds = {(reg.type, reg.order, reg.bit) for _, reg in fields}
    if len(kinds) != 1:
        return None
    type_, order, bit = kinds.pop()
    if type_ in {"string", "bool"} or bit is not None:
        return None
    code, size = DATATYPE[type_]
    if any(off % size for off, _ in fields):
        return None
    word_swap = size > 1 and order in _WORD_SWAP
    byte_swap = order in _BYTE_SWAP
    pack_code = "<" if word_swap != byte_swap else ">"
    index = np.array([off // size for off, _ in fields], dtype=np.intp)
    scale = np.array([reg.scale for _, reg in fields], dtype=np.float64)
    offset = np.array([reg.offset for _, reg in fields], dtype=np.float64)
    return _Aligned(
        pack=struct.Struct(f"{pack_code}{count}H"),
        pack_code=pack_code,
        dtype=np.dtype(f"{'<' if word_swap else '>'}{code}"),
        items=count // size,
        index=None if np.array_equal(index, np.arange(len(fields))) else index,
        scale=scale,
        offset=offset,
        identity=bool((scale == 1.0).all() and (offset == 0.0).all()),
    )


@dataclass(frozen=True, slots=True)
class _StringField:
    position: int
    start: int
    length: int
    order: str
    codes: tuple[str, ...]


class BlockDecoder:
    """Decodes one reply (a block of registers or bits) into the float64 values of its fields.

    ``fields`` are (offset in the block, register definition); the output has one value
    per field, in the given order, with ``value = raw * scale + offset``. A string field's
    value is the index of the decoded text in its ``codes``; unknown text is NaN and
    reported in the returned mask.
    """

    def __init__(self, fields: Sequence[tuple[int, ModbusRegister]], *, bit_table: bool) -> None:
        """Compile the gathers for the given fields."""
        self.size = len(fields)
        self.bit_table = bit_table
        self.count = max((off + (1 if bit_table else r.count) for off, r in fields), default=0)
        """Registers (or bits) a reply must hold: the end of the last field."""
        self._bit_offsets = np.array([off for off, _ in fields], dtype=np.intp)
        self._bit_scale = np.array([r.scale for _, r in fields], dtype=np.float64)
        self._bit_offset = np.array([r.offset for _, r in fields], dtype=np.float64)
        self._groups: list[_Group] = []
        self._strings: list[_StringField] = []
        self._whole: _Group | None = None
        self._aligned: _Aligned | None = None
        if bit_table:
            return
        self._aligned = _aligned_layout(fields, self.count)
        by_kind: dict[tuple[str, str, bool], list[tuple[int, int, ModbusRegister]]] = {}
        for pos, (off, reg) in enumerate(fields):
            if reg.type == "string":
                assert reg.length is not None
                assert reg.codes is not None
                self._strings.append(_StringField(pos, off, reg.length, reg.order, reg.codes))
                continue
            # 16-bit types ignore the word order, so AB groups merge across orders.
            order: str = reg.order
            if DATATYPE[reg.type][1] == 1:
                order = "BADC" if order in _BYTE_SWAP else "ABCD"
            by_kind.setdefault((reg.type, order, reg.bit is not None), []).append((pos, off, reg))
        for (type_, order, is_bit), members in by_kind.items():
            code, count = DATATYPE[type_]
            perm = _byte_permutation(count, order)
            starts = np.array([2 * off for _, off, _ in members], dtype=np.intp)
            scale = np.array([r.scale for _, _, r in members], dtype=np.float64)
            offset = np.array([r.offset for _, _, r in members], dtype=np.float64)
            self._groups.append(
                _Group(
                    positions=np.array([pos for pos, _, _ in members], dtype=np.intp),
                    byte_index=starts[:, None] + perm[None, :],
                    dtype=np.dtype(f">{code}"),
                    scale=scale,
                    offset=offset,
                    identity=bool((scale == 1.0).all() and (offset == 0.0).all()),
                    bits=(
                        np.array([r.bit for _, _, r in members], dtype=np.uint16)
                        if is_bit
                        else None
                    ),
                )
            )
        # One group covering every field in order (a meter's float32 block): no scatter.
        if (
            len(self._groups) == 1
            and not self._strings
            and np.array_equal(self._groups[0].positions, np.arange(self.size))
        ):
            self._whole = self._groups[0]

    def decode(
        self, block: Sequence[int] | Sequence[bool]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_] | None]:
        """Values of every field from one reply; plus a mask of undecodable fields, or None."""
        if self._aligned is not None:
            return _aligned_values(self._aligned, block, self.count), None
        out = np.empty(self.size, dtype=np.float64)
        return out, self.decode_into(block, out)

    def decode_into(
        self, block: Sequence[int] | Sequence[bool], out: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.bool_] | None:
        """Write the values of every field into ``out`` (length ``size``); mask of undecodable."""
        if self._aligned is not None:
            out[:] = _aligned_values(self._aligned, block, self.count)
            return None
        if self.bit_table:
            bits = np.asarray(block, dtype=np.float64)
            out[:] = bits[self._bit_offsets] * self._bit_scale + self._bit_offset
            return None
        # struct.pack of the reply's ints is ~1.5x faster than np.array(..., dtype=">u2")
        wire = np.frombuffer(struct.pack(f">{len(block)}H", *block), dtype=np.uint8)
        if self._whole is not None:
            out[:] = _group_values(self._whole, wire)
            return None
        for group in self._groups:
            out[group.positions] = _group_values(group, wire)
        bad: npt.NDArray[np.bool_] | None = None
        for field in self._strings:
            text = decode(block[field.start : field.start + field.length], "string", field.order)
            try:
                out[field.position] = float(field.codes.index(str(text)))
            except ValueError:
                out[field.position] = math.nan
                if bad is None:
                    bad = np.zeros(self.size, dtype=np.bool_)
                bad[field.position] = True
        return bad


def _aligned_values(
    aligned: _Aligned, block: Sequence[int] | Sequence[bool], count: int
) -> npt.NDArray[np.float64]:
    """The driver's hot path: one pack, one frombuffer, at most a gather and the arithmetic."""
    if len(block) == count:
        packed = aligned.pack.pack(*block)
    else:
        packed = struct.pack(f"{aligned.pack_code}{len(block)}H", *block)
    raw = np.frombuffer(packed, dtype=aligned.dtype, count=aligned.items)
    if aligned.index is not None:
        raw = raw[aligned.index]
    if aligned.identity:
        return raw.astype(np.float64)
    # float64 scale promotes raw before the multiply: the same rounding as the scalar twin
    values: npt.NDArray[np.float64] = raw * aligned.scale
    values += aligned.offset
    return values


def _group_values(group: _Group, wire: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """The float64 values of one group from the reply's bytes."""
    raw = wire[group.byte_index].view(group.dtype)[:, 0]
    if group.bits is not None:
        raw = (raw >> group.bits) & 1
    # Registers may hold a signalling NaN (a wrong word order, an unset meter): widening it
    # to float64 raises the FPU's "invalid" flag, which is expected here, not an error.
    with np.errstate(invalid="ignore"):
        values = raw.astype(np.float64)
    if group.identity:
        return values
    return values * group.scale + group.offset


def decode_value(words: Sequence[int] | Sequence[bool], reg: ModbusRegister) -> float:
    """Scalar twin of :class:`BlockDecoder` for one field: its float64 value (NaN if unknown)."""
    if reg.table in {"coil", "discrete"}:
        return float(bool(words[0])) * reg.scale + reg.offset
    raw = decode([int(w) for w in words], reg.type, reg.order, bit=reg.bit)
    if isinstance(raw, str):
        assert reg.codes is not None
        return float(reg.codes.index(raw)) if raw in reg.codes else math.nan
    return float(raw) * reg.scale + reg.offset
