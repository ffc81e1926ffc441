"""Backbone topics and the versioned, columnar JSON payloads carried on them.

A ``tpo.samples/1`` message holds the samples of one device, columnar::

    {"schema": "tpo.samples/1", "site": "tpo", "area": "hall-a", "device": "meter-1",
     "agent": "hall-a-edge", "batch_seq": 17,
     "channels": [{"name": "voltage_l1", "unit": "V"}, ...],
     "ch": [0, 1, ...], "ts_source": [...], "ts_receive": [...],
     "value": [...], "quality": [...], "seq": [...]}

``ch`` indexes ``channels``. ``value`` null means NaN (a Bad sample keeps its
row). ``ts_source`` holds INT64_MIN where the source gives no timestamp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson

from edge.errors import DecodeError

if TYPE_CHECKING:
    from drivers.base import SampleBatch, SeriesTable

SAMPLES_SCHEMA = "tpo.samples/1"
STATUS_SCHEMA = "tpo.status/1"
METRICS_SCHEMA = "tpo.metrics/1"
DEADLETTER_SCHEMA = "tpo.deadletter/1"
PREFIX = "tpo/v1"

MAX_MESSAGE_BYTES = 8 * 2**20
"""Refuse to decode backbone messages larger than this."""


def device_topic(site: str, area: str, device: str, kind: str) -> str:
    """``tpo/v1/{site}/{area}/{device}/{data|kpi|status}``."""
    return f"{PREFIX}/{site}/{area}/{device}/{kind}"


def agent_topic(site: str, agent_id: str, kind: str) -> str:
    """``tpo/v1/{site}/_agent/{agent_id}/{status|metrics}``."""
    return f"{PREFIX}/{site}/_agent/{agent_id}/{kind}"


def deadletter_topic(site: str, agent_id: str, source: str) -> str:
    """``tpo/v1/{site}/_deadletter/{agent_id}/{source}``."""
    return f"{PREFIX}/{site}/_deadletter/{agent_id}/{source}"


def encode_samples(
    batch: SampleBatch, table: SeriesTable, *, agent_id: str, batch_seq: int
) -> bytes:
    """Encode the samples of ONE device (all rows share area and device)."""
    if not len(batch):
        msg = "refusing to encode an empty batch"
        raise ValueError(msg)
    first = table[int(batch.series[0])]
    present, ch = np.unique(batch.series, return_inverse=True)
    channels = []
    for s in present.tolist():
        key = table[s]
        if (key.area, key.device) != (first.area, first.device):
            msg = f"batch mixes devices {first.device!r} and {key.device!r}"
            raise ValueError(msg)
        entry: dict[str, Any] = {"name": key.channel, "unit": key.unit}
        if key.codes:
            entry["codes"] = list(key.codes)
        channels.append(entry)
    doc = {
        "schema": SAMPLES_SCHEMA,
        "site": first.site,
        "area": first.area,
        "device": first.device,
        "agent": agent_id,
        "batch_seq": batch_seq,
        "channels": channels,
        "ch": ch.astype(np.int32),
        "ts_source": batch.ts_source,
        "ts_receive": batch.ts_receive,
        "value": batch.value,
        "quality": batch.quality,
        "seq": batch.seq,
    }
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


@dataclass(frozen=True, slots=True)
class DecodedSamples:
    """A decoded ``tpo.samples/1`` message."""

    site: str
    area: str
    device: str
    agent: str
    batch_seq: int
    channels: tuple[str, ...]
    units: tuple[str, ...]
    ch: npt.NDArray[np.int32]
    ts_source: npt.NDArray[np.int64]
    ts_receive: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]
    seq: npt.NDArray[np.int64]

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.ch)


def _array(doc: dict[str, Any], key: str, dtype: type[np.generic], n: int) -> npt.NDArray[Any]:
    raw = doc.get(key)
    if not isinstance(raw, list):
        raise DecodeError(f"field {key!r} must be a list")
    try:
        arr = np.asarray(raw, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"field {key!r}: {exc}") from exc
    if arr.ndim != 1 or len(arr) != n:
        raise DecodeError(f"field {key!r} has {arr.size} entries, 'ch' has {n}")
    return arr


def decode_samples(payload: bytes) -> DecodedSamples:
    """Decode and check a ``tpo.samples/1`` message; raises DecodeError with the reason."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != SAMPLES_SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise DecodeError(f"schema is {got!r}, want {SAMPLES_SCHEMA!r}")
    try:
        channels = tuple(str(c["name"]) for c in doc["channels"])
        units = tuple(str(c.get("unit", "")) for c in doc["channels"])
        site, area, device = str(doc["site"]), str(doc["area"]), str(doc["device"])
        agent, batch_seq = str(doc["agent"]), int(doc["batch_seq"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodeError(f"header field missing or wrong: {exc!r}") from exc
    ch = _array(doc, "ch", np.int32, len(doc.get("ch") or []))
    n = len(ch)
    if n and (ch.min() < 0 or ch.max() >= len(channels)):
        raise DecodeError("'ch' indexes a channel that is not listed")
    value_raw = doc.get("value")
    if not isinstance(value_raw, list):
        raise DecodeError("field 'value' must be a list")
    try:
        value = np.array(value_raw, dtype=np.float64)  # null (a Bad sample) becomes NaN
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"field 'value': {exc}") from exc
    if len(value) != n:
        raise DecodeError(f"field 'value' has {len(value)} entries, 'ch' has {n}")
    return DecodedSamples(
        site=site,
        area=area,
        device=device,
        agent=agent,
        batch_seq=batch_seq,
        channels=channels,
        units=units,
        ch=ch,
        ts_source=_array(doc, "ts_source", np.int64, n),
        ts_receive=_array(doc, "ts_receive", np.int64, n),
        value=value,
        quality=_array(doc, "quality", np.uint8, n),
        seq=_array(doc, "seq", np.int64, n),
    )


def encode_json(doc: dict[str, Any]) -> bytes:
    """Encode a small JSON document (status, metrics, dead letters)."""
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
