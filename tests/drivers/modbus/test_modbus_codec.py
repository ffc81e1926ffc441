"""Codec: the four orders, round trips, and the vectorised decoder against the scalar twin."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus.codec import DATATYPE, BlockDecoder, decode, decode_value, encode, quantise
from drivers.modbus.config import ModbusRegister

ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")


@pytest.mark.parametrize(
    ("order", "words"),
    [
        ("ABCD", [0x47F1, 0x2000]),
        ("CDAB", [0x2000, 0x47F1]),
        ("BADC", [0xF147, 0x0020]),
        ("DCBA", [0x0020, 0xF147]),
    ],
)
def test_float32_orders_as_devices_md_spells_them(order: str, words: list[int]) -> None:
    assert encode(123456.0, "float32", order) == words
    assert decode(words, "float32", order) == 123456.0


def test_64_bit_orders() -> None:
    value = 0x0102030405060708
    assert encode(value, "uint64", "ABCD") == [0x0102, 0x0304, 0x0506, 0x0708]
    assert encode(value, "uint64", "CDAB") == [0x0708, 0x0506, 0x0304, 0x0102]
    assert encode(value, "uint64", "BADC") == [0x0201, 0x0403, 0x0605, 0x0807]
    assert encode(value, "uint64", "DCBA") == [0x0807, 0x0605, 0x0403, 0x0201]


def test_16_bit_types_only_see_byte_order() -> None:
    assert encode(0x1234, "uint16", "ABCD") == encode(0x1234, "uint16", "CDAB") == [0x1234]
    assert encode(0x1234, "uint16", "BADC") == encode(0x1234, "uint16", "DCBA") == [0x3412]
    assert decode([0xFFFE], "int16") == -2


def test_wrong_order_decodes_to_the_known_wrong_value() -> None:
    words = encode(123456.0, "float32", "CDAB")
    assert decode(words, "float32", "ABCD") == struct.unpack(">f", bytes.fromhex("200047f1"))[0]


def test_bits_and_strings() -> None:
    assert decode([0b10000], "bool", bit=4) is True
    assert decode([0b10000], "bool", bit=3) is False
    assert decode([0x0100], "bool", "BADC", bit=0) is True
    assert encode(True, "bool", bit=15) == [0x8000]
    words = encode("SDM630", "string", length=4)
    assert words == [0x5344, 0x4D36, 0x3330, 0x0000]
    assert decode(words, "string") == "SDM630"
    assert decode(encode("ab", "string", "BADC", length=1), "string", "BADC") == "ab"


def test_wrong_register_count_is_an_error() -> None:
    with pytest.raises(ValueError, match="needs 2 registers"):
        decode([1], "float32")


_INT_BOUNDS = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


@settings(max_examples=300)
@given(data=st.data(), type_=st.sampled_from(sorted(_INT_BOUNDS)), order=st.sampled_from(ORDERS))
def test_integer_round_trip(data: st.DataObject, type_: str, order: str) -> None:
    lo, hi = _INT_BOUNDS[type_]
    value = data.draw(st.integers(lo, hi))
    words = encode(value, type_, order)
    assert len(words) == DATATYPE[type_][1]
    assert all(0 <= w <= 0xFFFF for w in words)
    assert decode(words, type_, order) == value


@settings(max_examples=300)
@given(value=st.floats(allow_nan=False, width=32), order=st.sampled_from(ORDERS))
def test_float32_round_trip(value: float, order: str) -> None:
    assert decode(encode(value, "float32", order), "float32", order) == value


@settings(max_examples=300)
@given(value=st.floats(allow_nan=False), order=st.sampled_from(ORDERS))
def test_float64_round_trip(value: float, order: str) -> None:
    assert decode(encode(value, "float64", order), "float64", order) == value


@given(
    words=st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=2), order=st.sampled_from(ORDERS)
)
def test_decode_encode_is_identity_on_words(words: list[int], order: str) -> None:
    value = decode(words, "uint32", order)
    assert encode(value, "uint32", order) == words


def test_quantise_is_what_a_register_holds() -> None:
    assert quantise(0.1, "float32") == float(np.float32(0.1))
    assert quantise(0.1, "float32") != 0.1
    assert quantise(2.6, "uint16") == 3.0


_TYPES = ["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "bit"]


@st.composite
def _fields(draw: st.DrawFn) -> tuple[list[tuple[int, ModbusRegister]], list[int]]:
    """Random fields (possibly overlapping) over a random block of words."""
    n_words = draw(st.integers(4, 60))
    block = draw(st.lists(st.integers(0, 0xFFFF), min_size=n_words, max_size=n_words))
    fields = []
    for i in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(_TYPES))
        count = 1 if kind == "bit" else DATATYPE[kind][1]
        off = draw(st.integers(0, n_words - count))
        reg = ModbusRegister(
            channel=f"c{i}",
            table="holding",
            address=off,
            type="bool" if kind == "bit" else kind,  # type: ignore[arg-type]
            bit=draw(st.integers(0, 15)) if kind == "bit" else None,
            order=draw(st.sampled_from(ORDERS)),
            scale=draw(st.sampled_from([1.0, 0.1, 0.01, 1000.0])),
            offset=draw(st.sampled_from([0.0, -40.0, 273.15])),
        )
        fields.append((off, reg))
    return fields, block


@settings(max_examples=300)
@given(case=_fields())
def test_block_decoder_equals_scalar_decoder(
    case: tuple[list[tuple[int, ModbusRegister]], list[int]],
) -> None:
    fields, block = case
    values, bad = BlockDecoder(fields, bit_table=False).decode(block)
    assert bad is None
    for (off, reg), got in zip(fields, values, strict=True):
        want = decode_value(block[off : off + reg.count], reg)
        assert (math.isnan(got) and math.isnan(want)) or got == want, reg


def test_block_decoder_bits_and_strings() -> None:
    coil = ModbusRegister(channel="c", table="coil", address=0, type="bool", scale=2.0)
    values, _ = BlockDecoder([(0, coil), (3, coil)], bit_table=True).decode([1, 0, 0, 1, 0])
    assert values.tolist() == [2.0, 2.0]
    text = ModbusRegister(
        channel="s", table="holding", address=0, type="string", length=2, codes=("AB", "CD")
    )
    dec = BlockDecoder([(0, text), (2, text)], bit_table=False)
    values, bad = dec.decode(encode("CD", "string", length=2) + encode("XY", "string", length=2))
    assert values[0] == 1.0
    assert math.isnan(values[1])
    assert bad is not None
    assert bad.tolist() == [False, True]
