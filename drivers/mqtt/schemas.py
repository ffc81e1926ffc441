"""Pydantic schemas of field-device payloads: bench telemetry and OCPP-style charger messages.

The models are strict (a string is not a number, 1 is not ``true``) and reject
NaN and infinity, so every rejection names the field and the reason. Unknown
extra fields are ignored: gateways add fields over time. OCPP 1.6 sends sampled
values as strings and 2.0.1 as numbers; :data:`OcppNumber` accepts both.

Timestamps (``ts`` and OCPP ``timestamp``) are ISO 8601 with a zone
(``2026-06-21T12:00:00.123456Z``) or a number of milliseconds since the epoch;
both become integer ns since the epoch.
"""

from __future__ import annotations

import math
import operator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NS_PER_US = 1000
_NS_PER_MS = 1_000_000


def parse_ts(value: Any) -> int:
    """An ISO 8601 string with zone, or epoch milliseconds, as integer ns since the epoch."""
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            msg = "not an ISO 8601 timestamp"
            raise ValueError(msg) from None
        if dt.tzinfo is None:
            msg = "timestamp has no time zone (add Z or an offset)"
            raise ValueError(msg)
        delta = dt - _EPOCH
        return (
            delta.days * 86_400 + delta.seconds
        ) * 1_000_000_000 + delta.microseconds * _NS_PER_US
    if isinstance(value, bool) or not isinstance(value, int | float):
        # A TypeError would escape pydantic; custom errors carry the type for the counters.
        raise PydanticCustomError(
            "timestamp_type", "timestamp must be an ISO 8601 string or epoch milliseconds"
        )
    if not math.isfinite(value):
        raise PydanticCustomError("finite_number", "timestamp is not a finite number")
    return int(value * _NS_PER_MS)


def format_ts(ts_ns: int) -> str:
    """ISO 8601 UTC with microseconds, the form the simulator sends (ns are truncated)."""
    sec, ns = divmod(ts_ns, 1_000_000_000)
    return datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ns // 1000:06d}Z"


_KILO_UNITS = frozenset({"kWh", "kW", "kvarh", "kvar", "kVA"})


def scale(value: float, unit: str | None, multiplier: int) -> float:
    """A sampled value in the channel unit (Wh, W, A, V): power-of-ten multiplier, k-prefix."""
    if multiplier:  # skipping x 10**0 changes nothing, not even the sign of -0.0
        value *= 10.0**multiplier
    if unit in _KILO_UNITS:
        value *= 1000.0
    return value


def _ocpp_number(value: Any) -> float:
    """OCPP 1.6 decimal string or 2.0.1 number, finite."""
    if isinstance(value, str):
        try:
            out = float(value)
        except ValueError:
            raise PydanticCustomError("float_parsing", "not a decimal number string") from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        out = float(value)
    else:
        raise PydanticCustomError("float_type", "must be a number or a decimal number string")
    if not math.isfinite(out):
        raise PydanticCustomError("finite_number", "Input should be a finite number")
    return out


TimestampNs = Annotated[int, BeforeValidator(parse_ts)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
OcppNumber = Annotated[float, BeforeValidator(_ocpp_number)]
Count = Annotated[int, Field(ge=0)]

_STRICT = ConfigDict(strict=True, extra="ignore", frozen=True)


class BenchTelemetry(BaseModel):
    """``field/bench/<id>/telemetry``: one reading of every bench sensor."""

    model_config = _STRICT

    ts: TimestampNs
    seq: Count
    pv_w: Finite
    pv_wh_total: Finite
    batt_v: Finite
    batt_soc_pct: Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)]
    protect_mode: bool
    usb_active: Count
    qi_active: Count
    sessions_today: Count
    occupancy: Count | None = None
    temp_c: Finite
    rh_pct: Finite
    pm2_5: Finite | None = None
    noise_dba: Finite | None = None
    rssi_dbm: Finite


STATUS_16 = Literal[
    "Available",
    "Preparing",
    "Charging",
    "SuspendedEVSE",
    "SuspendedEV",
    "Finishing",
    "Reserved",
    "Unavailable",
    "Faulted",
]
STATUS_201 = Literal["Available", "Occupied", "Reserved", "Unavailable", "Faulted"]
CHARGING_STATE = Literal["Idle", "EVConnected", "Charging", "SuspendedEV", "SuspendedEVSE"]


class ChargerStatus(BaseModel):
    """``field/charger/<id>/status``: 1.6 ``status`` or 2.0.1 ``connectorStatus`` (+ state)."""

    model_config = _STRICT

    ts: TimestampNs
    seq: Count
    connectorId: Annotated[int, Field(ge=0)] = 1  # noqa: N815 - OCPP field name
    evseId: Annotated[int, Field(ge=0)] | None = None  # noqa: N815
    status: STATUS_16 | None = None
    connectorStatus: STATUS_201 | None = None  # noqa: N815
    chargingState: CHARGING_STATE | None = None  # noqa: N815
    errorCode: str | None = None  # noqa: N815

    @model_validator(mode="after")
    def _one_status(self) -> ChargerStatus:
        if (self.status is None) == (self.connectorStatus is None):
            msg = "exactly one of status (OCPP 1.6) and connectorStatus (2.0.1) is required"
            raise ValueError(msg)
        return self

    @property
    def connector(self) -> int:
        """The connector the status is about (2.0.1: the EVSE id)."""
        return self.evseId if self.evseId is not None else self.connectorId


class UnitOfMeasure(BaseModel):
    """OCPP 2.0.1 unit with a power-of-ten multiplier."""

    model_config = _STRICT

    unit: str = "Wh"
    multiplier: int = 0


class SampledValue(BaseModel):
    """One measurand; ``value`` is a string in 1.6 and a number in 2.0.1."""

    model_config = _STRICT

    value: OcppNumber
    measurand: str = "Energy.Active.Import.Register"
    phase: str | None = None
    unit: str | None = None
    unitOfMeasure: UnitOfMeasure | None = None  # noqa: N815
    context: str | None = None

    def scaled(self) -> float:
        """Value in the channel unit (Wh, W, A, V): applies multiplier and k-prefixes."""
        uom = self.unitOfMeasure
        if uom is None:
            return scale(self.value, self.unit, 0)
        return scale(self.value, uom.unit, uom.multiplier)


class MeterValue(BaseModel):
    """A timestamped group of sampled values."""

    model_config = _STRICT

    timestamp: TimestampNs
    sampledValue: list[SampledValue] = Field(min_length=1)  # noqa: N815


class ChargerMeter(BaseModel):
    """``field/charger/<id>/meter``: MeterValues as a gateway forwards them."""

    model_config = _STRICT

    ts: TimestampNs
    seq: Count
    connectorId: Annotated[int, Field(ge=0)] = 1  # noqa: N815
    evseId: Annotated[int, Field(ge=0)] | None = None  # noqa: N815
    transactionId: int | str | None = None  # noqa: N815
    meterValue: list[MeterValue] = Field(min_length=1)  # noqa: N815

    @property
    def connector(self) -> int:
        """The connector the values are about (2.0.1: the EVSE id)."""
        return self.evseId if self.evseId is not None else self.connectorId


class TransactionStartV16(BaseModel):
    """OCPP 1.6 StartTransaction forwarded as ``{"event": "start", ...}``."""

    model_config = _STRICT

    ts: TimestampNs
    seq: Count
    event: Literal["start"]
    connectorId: Annotated[int, Field(ge=1)]  # noqa: N815 - OCPP field name
    transactionId: int | str  # noqa: N815
    idTag: str  # noqa: N815
    meterStart: OcppNumber  # noqa: N815


class TransactionStopV16(BaseModel):
    """OCPP 1.6 StopTransaction forwarded as ``{"event": "stop", ...}`` (no connector in 1.6)."""

    model_config = _STRICT

    ts: TimestampNs
    seq: Count
    event: Literal["stop"]
    connectorId: Annotated[int, Field(ge=1)] | None = None  # noqa: N815
    transactionId: int | str  # noqa: N815
    idTag: str | None = None  # noqa: N815
    meterStop: OcppNumber  # noqa: N815
    reason: str | None = None


TransactionV16 = TransactionStartV16 | TransactionStopV16


class TransactionInfo(BaseModel):
    """OCPP 2.0.1 TransactionType."""

    model_config = _STRICT

    transactionId: str  # noqa: N815
    chargingState: CHARGING_STATE | None = None  # noqa: N815
    stoppedReason: str | None = None  # noqa: N815


class IdToken(BaseModel):
    """OCPP 2.0.1 IdTokenType (personal data: pseudonymised by the driver)."""

    model_config = _STRICT

    idToken: str  # noqa: N815
    type: str = "ISO14443"


class Evse(BaseModel):
    """OCPP 2.0.1 EVSEType."""

    model_config = _STRICT

    id: Annotated[int, Field(ge=1)]
    connectorId: Annotated[int, Field(ge=1)] | None = None  # noqa: N815


class TransactionV201(BaseModel):
    """OCPP 2.0.1 TransactionEvent (Started / Updated / Ended)."""

    model_config = _STRICT

    ts: TimestampNs
    seq: Count
    eventType: Literal["Started", "Updated", "Ended"]  # noqa: N815
    transactionInfo: TransactionInfo  # noqa: N815
    idToken: IdToken | None = None  # noqa: N815
    evse: Evse | None = None
    meterValue: list[MeterValue] | None = None  # noqa: N815

    @property
    def connector(self) -> int:
        """The EVSE id (connector-level channels are per EVSE)."""
        return self.evse.id if self.evse is not None else 1


def parse_transaction(
    data: dict[str, Any],
) -> TransactionStartV16 | TransactionStopV16 | TransactionV201:
    """Pick the model by marker field (``eventType``: 2.0.1, ``event``: 1.6), then validate."""
    if "eventType" in data:
        return TransactionV201.model_validate(data)
    if data.get("event") == "stop":
        return TransactionStopV16.model_validate(data)
    return TransactionStartV16.model_validate(data)


MEASURANDS: dict[tuple[str, str | None], str] = {
    ("Energy.Active.Import.Register", None): "energy_wh",
    ("Power.Active.Import", None): "power_w",
    ("Power.Offered", None): "power_offered_w",
    ("Current.Import", "L1"): "current_l1",
    ("Current.Import", "L2"): "current_l2",
    ("Current.Import", "L3"): "current_l3",
    ("Voltage", None): "voltage",
    ("Voltage", "L1"): "voltage",
    ("Voltage", "L1-N"): "voltage",
    ("Frequency", None): "frequency_hz",
    ("Temperature", None): "temperature_c",
    ("SoC", None): "soc",
}
"""(measurand, phase) -> channel; anything else is counted as ``mqtt_unmapped_measurand``."""


_NUM = (int, float)
_BENCH_TYPES: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("pv_w", _NUM),
    ("pv_wh_total", _NUM),
    ("batt_v", _NUM),
    ("batt_soc_pct", _NUM),
    ("protect_mode", (bool,)),
    ("usb_active", (int,)),
    ("qi_active", (int,)),
    ("sessions_today", (int,)),
    ("occupancy", (int, type(None))),
    ("temp_c", _NUM),
    ("rh_pct", _NUM),
    ("pm2_5", (*_NUM, type(None))),
    ("noise_dba", (*_NUM, type(None))),
    ("rssi_dbm", _NUM),
    ("seq", (int,)),
    ("ts", (str,)),
)
"""Exact JSON types the fast path takes per field (``type(v) in``: bool is not an int here)."""
_BENCH_FIELDS = tuple(name for name, _ in _BENCH_TYPES)
_BENCH_CHANNEL_FIELDS = _BENCH_FIELDS[:14]
_bench_values = operator.itemgetter(*_BENCH_FIELDS)
_good_signatures: set[tuple[type, ...]] = set()
_MAX_SIGNATURES = 256


def _loads_dict(payload: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return data if type(data) is dict else None


def _bench_ok(vals: list[Any]) -> bool:
    """Types (once per signature, then a set lookup) and value ranges of the fast path."""
    sig = tuple(map(type, vals))
    if sig not in _good_signatures:
        if not all(t in ok for t, (_, ok) in zip(sig, _BENCH_TYPES, strict=True)):
            return False
        if len(_good_signatures) < _MAX_SIGNATURES:
            _good_signatures.add(sig)
    occupancy = vals[8]
    return (
        0 <= vals[3] <= 100  # batt_soc_pct
        and min(vals[5], vals[6], vals[7], vals[14]) >= 0  # counts and seq
        and (occupancy is None or occupancy >= 0)
    )


def fast_bench(payload: bytes, names: tuple[str, ...]) -> tuple[int, int, list[Any]] | None:
    """(ts ns, seq, values in ``names`` order) of a well-formed telemetry payload, else None.

    The hot path: accepts a strict subset of what :class:`BenchTelemetry` accepts
    (a property test holds them together), so anything unusual, and every error,
    goes to the pydantic model, which gives the precise reason. orjson rejects
    NaN and infinity outright, so the values here are finite.
    """
    data = _loads_dict(payload)
    if data is None:
        return None
    get = data.get
    try:
        vals: list[Any] = list(_bench_values(data))  # one C call for all sixteen
    except KeyError:  # an optional sensor left out, or a required field missing
        vals = [get(name) for name in _BENCH_FIELDS]
    if not _bench_ok(vals):
        return None
    try:
        ts_ns = parse_ts(vals[15])
    except ValueError:
        return None
    if names == _BENCH_CHANNEL_FIELDS:
        return ts_ns, vals[14], vals[:14]
    return ts_ns, vals[14], [get(name) for name in names]


# -- fast paths of charger status and meter values --------------------------------------------
#
# Same contract as fast_bench: each accepts a strict subset of its pydantic model and returns
# exactly what the model would give (property tests in tests/drivers/mqtt hold them together);
# None sends the payload to the model, which accepts the unusual forms or names the error.

_STATUS_16_NAMES = frozenset(get_args(STATUS_16))
_STATUS_201_NAMES = frozenset(get_args(STATUS_201))
_CHARGING_STATES = frozenset(get_args(CHARGING_STATE))
_OPT_STR = (str, type(None))
_TX_ID = (int, str, type(None))
_DEFAULT_MEASURAND = "Energy.Active.Import.Register"
_MAX_MULTIPLIER = 300
"""|multiplier| the fast path takes; 10.0**309 overflows, and that is the model's business."""

MeterSample = tuple[str, str | None, float]
"""(measurand, phase, value scaled to the channel unit) of one sampled value."""
MeterGroup = tuple[int, list[MeterSample]]
"""(timestamp ns, samples) of one MeterValue."""
MeterFields = tuple[int, int, int, list[MeterGroup]]
"""(ts ns, seq, connector, meter value groups) of a meter message."""
StatusFields = tuple[int, int, int, str, str | None]
"""(ts ns, seq, connector, status name, charging state or None) of a status message."""


def _fast_ts(value: object) -> int | None:
    """parse_ts of an ISO string or integer epoch ms; None for anything else or a bad string."""
    if type(value) is str:
        try:
            return parse_ts(value)
        except ValueError:
            return None
    if type(value) is int:
        return parse_ts(value)
    return None


def _connector(get: Any) -> int | None:
    """``evseId`` if given, else ``connectorId`` (default 1); None when either is not a count."""
    connector = get("connectorId", 1)
    evse = get("evseId")
    if type(connector) is not int or connector < 0:
        return None
    if evse is None:
        return connector
    if type(evse) is not int or evse < 0:
        return None
    return evse


def fast_status(payload: bytes) -> StatusFields | None:  # noqa: PLR0911 - a return per bad shape
    """(ts ns, seq, connector, status name, charging state) of a plain status, else None.

    Equivalent to :class:`ChargerStatus` on what it accepts: the status name is the 1.6
    ``status`` or the 2.0.1 ``connectorStatus``, whichever was sent.
    """
    data = _loads_dict(payload)
    if data is None:
        return None
    get = data.get
    seq = get("seq")
    connector = _connector(get)
    status = get("status")
    connector_status = get("connectorStatus")
    state = get("chargingState")
    if type(seq) is not int or seq < 0 or connector is None:
        return None
    if type(get("errorCode")) not in _OPT_STR or type(state) not in _OPT_STR:
        return None
    if state is not None and state not in _CHARGING_STATES:
        return None
    if connector_status is None:
        if type(status) is not str or status not in _STATUS_16_NAMES:
            return None
        name = status
    elif status is None and type(connector_status) is str:
        if connector_status not in _STATUS_201_NAMES:
            return None
        name = connector_status
    else:
        return None
    ts = _fast_ts(get("ts"))
    if ts is None:
        return None
    return ts, seq, connector, name, state


def _fast_sample(sv: object) -> MeterSample | None:  # noqa: C901, PLR0911 - as above
    """One SampledValue: OCPP 1.6 string or 2.0.1 number, finite, scaled; None if unusual."""
    if type(sv) is not dict:
        return None
    get = sv.get
    raw: Any = get("value")
    kind = type(raw)
    if kind is float or kind is int:
        value = float(raw)
    elif kind is str:
        try:
            value = float(raw)
        except ValueError:
            return None
    else:
        return None
    if not math.isfinite(value):
        return None
    measurand = get("measurand", _DEFAULT_MEASURAND)
    phase = get("phase")
    unit = get("unit")
    if type(measurand) is not str or type(phase) not in _OPT_STR or type(unit) not in _OPT_STR:
        return None
    if type(get("context")) not in _OPT_STR:
        return None
    uom = get("unitOfMeasure")
    if uom is None:
        return measurand, phase, scale(value, unit, 0)
    if type(uom) is not dict:
        return None
    uom_unit = uom.get("unit", "Wh")
    multiplier = uom.get("multiplier", 0)
    if type(uom_unit) is not str or type(multiplier) is not int:
        return None
    if not -_MAX_MULTIPLIER <= multiplier <= _MAX_MULTIPLIER:
        return None
    return measurand, phase, scale(value, uom_unit, multiplier)


def fast_meter(payload: bytes) -> MeterFields | None:  # noqa: C901, PLR0911 - as above
    """(ts ns, seq, connector, meter value groups) of a plain meter message, else None.

    Equivalent to :class:`ChargerMeter` on what it accepts; each sample is
    (measurand, phase, :meth:`SampledValue.scaled`).
    """
    data = _loads_dict(payload)
    if data is None:
        return None
    get = data.get
    seq = get("seq")
    connector = _connector(get)
    meter_values = get("meterValue")
    if type(seq) is not int or seq < 0 or connector is None:
        return None
    if type(get("transactionId")) not in _TX_ID:
        return None
    if type(meter_values) is not list or not meter_values:
        return None
    groups: list[MeterGroup] = []
    for mv in meter_values:
        if type(mv) is not dict:
            return None
        sampled = mv.get("sampledValue")
        if type(sampled) is not list or not sampled:
            return None
        samples = [_fast_sample(sv) for sv in sampled]
        if None in samples:
            return None
        stamp = _fast_ts(mv.get("timestamp"))
        if stamp is None:
            return None
        groups.append((stamp, samples))  # type: ignore[arg-type]  # no None, checked above
    ts = _fast_ts(get("ts"))
    if ts is None:
        return None
    return ts, seq, connector, groups
