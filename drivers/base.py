"""Contracts between drivers, the KPI core and the publisher.

* :class:`SampleBatch` is what every driver produces: columnar numpy arrays of
  equal length, one row per sample.
* :class:`SeriesTable` maps a series index (the ``series`` column) to its
  identity (site, area, device, channel, unit, source kind). It is built once
  from the site config at start-up; drivers receive the indexes they own.
* :class:`Driver` is the protocol every southbound driver implements, and
  :func:`register` / :func:`driver_class` form the registry by ``type`` name.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, Self, runtime_checkable

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from types import TracebackType

NO_TIMESTAMP = np.iinfo(np.int64).min
"""``ts_source`` of a sample whose source gives no timestamp."""
NO_SEQ = -1
"""``seq`` of a sample without a source sequence number."""

GOOD, UNCERTAIN, BAD = 0, 1, 2
"""Quality codes of the ``quality`` column."""

_COLUMNS: tuple[tuple[str, type[np.generic]], ...] = (
    ("series", np.int32),
    ("ts_source", np.int64),
    ("ts_receive", np.int64),
    ("value", np.float64),
    ("quality", np.uint8),
    ("seq", np.int64),
)


_new = object.__new__
_setattr = object.__setattr__


def now_ns() -> int:
    """Wall-clock time in ns since the epoch (the one clock every stamp uses)."""
    return time.time_ns()


@dataclass(frozen=True, slots=True)
class SampleBatch:
    """Columnar samples of one or more series; all arrays have the same length."""

    series: npt.NDArray[np.int32]
    ts_source: npt.NDArray[np.int64]
    ts_receive: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]
    seq: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        """Check dtypes and lengths once, so consumers never have to."""
        n = len(self.series)
        for name, dtype in _COLUMNS:
            column = getattr(self, name)
            if column.dtype != dtype or column.ndim != 1 or len(column) != n:
                msg = f"SampleBatch.{name}: want 1-d {np.dtype(dtype)} of length {n}"
                raise ValueError(msg)

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.series)

    @classmethod
    def trusted(
        cls,
        series: npt.NDArray[np.int32],
        ts_source: npt.NDArray[np.int64],
        ts_receive: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
        quality: npt.NDArray[np.uint8],
        seq: npt.NDArray[np.int64],
    ) -> SampleBatch:
        """A batch without the checks, for hot paths whose columns are right by construction.

        Only for drivers that allocate every column themselves with the dtypes and the
        length of ``_COLUMNS`` (their tests compare against the checked constructor);
        everything else uses ``SampleBatch(...)`` or :meth:`build`.
        """
        batch = _new(cls)
        # Frozen dataclass: bypass its __setattr__ guard exactly as the generated __init__ does.
        _setattr(batch, "series", series)
        _setattr(batch, "ts_source", ts_source)
        _setattr(batch, "ts_receive", ts_receive)
        _setattr(batch, "value", value)
        _setattr(batch, "quality", quality)
        _setattr(batch, "seq", seq)
        return batch

    @classmethod
    def empty(cls) -> SampleBatch:
        """A batch with no samples."""
        return cls(*(np.empty(0, dtype) for _, dtype in _COLUMNS))

    @classmethod
    def build(
        cls,
        series: npt.ArrayLike,
        value: npt.ArrayLike,
        *,
        ts_receive: npt.ArrayLike,
        ts_source: npt.ArrayLike = NO_TIMESTAMP,
        quality: npt.ArrayLike = GOOD,
        seq: npt.ArrayLike = NO_SEQ,
    ) -> SampleBatch:
        """Make a batch from array-likes; scalars are broadcast to the length of ``series``."""
        series_arr = np.asarray(series, dtype=np.int32).reshape(-1)
        n = len(series_arr)

        def col(x: npt.ArrayLike, dtype: type[np.generic]) -> npt.NDArray[np.generic]:
            arr = np.asarray(x, dtype=dtype)
            return np.full(n, arr, dtype=dtype) if arr.ndim == 0 else arr.reshape(-1)

        return cls(
            series=series_arr,
            ts_source=col(ts_source, np.int64),  # type: ignore[arg-type]
            ts_receive=col(ts_receive, np.int64),  # type: ignore[arg-type]
            value=col(value, np.float64),  # type: ignore[arg-type]
            quality=col(quality, np.uint8),  # type: ignore[arg-type]
            seq=col(seq, np.int64),  # type: ignore[arg-type]
        )

    @classmethod
    def concat(cls, batches: Sequence[SampleBatch]) -> SampleBatch:
        """Join batches in order."""
        batches = [b for b in batches if len(b)]
        if not batches:
            return cls.empty()
        if len(batches) == 1:
            return batches[0]
        return cls(*(np.concatenate([getattr(b, name) for b in batches]) for name, _ in _COLUMNS))

    def take(self, index: npt.NDArray[np.intp] | npt.NDArray[np.bool_] | slice) -> SampleBatch:
        """Rows selected by an index array, a mask or a slice."""
        return SampleBatch(*(getattr(self, name)[index] for name, _ in _COLUMNS))

    @property
    def nbytes(self) -> int:
        """Memory held by the columns (what bounded queues account)."""
        return sum(getattr(self, name).nbytes for name, _ in _COLUMNS)


SourceKind = Literal["modbus", "opcua", "mqtt", "probe"]


@dataclass(frozen=True, slots=True)
class SeriesKey:
    """Identity of one series: where it comes from and what it measures."""

    site: str
    area: str
    device: str
    channel: str
    unit: str
    kind: str
    codes: tuple[str, ...] | None = None
    """Names of the numeric codes of an enumeration (OCPP status, PackML state)."""


class SeriesTable:
    """Maps series indexes to :class:`SeriesKey`; indexes are dense and stable for a run."""

    def __init__(self, keys: Iterable[SeriesKey] = ()) -> None:
        """Start with the given keys, indexed in order."""
        self._keys: list[SeriesKey] = []
        self._index: dict[tuple[str, str, str], int] = {}
        for key in keys:
            self.add(key)

    def add(self, key: SeriesKey) -> int:
        """Add a series and return its index; a duplicate (device, channel) is an error."""
        ident = (key.area, key.device, key.channel)
        if ident in self._index:
            msg = f"duplicate series {key.area}/{key.device}/{key.channel}"
            raise ValueError(msg)
        self._index[ident] = len(self._keys)
        self._keys.append(key)
        return len(self._keys) - 1

    def index(self, area: str, device: str, channel: str) -> int:
        """Index of a series; KeyError when unknown."""
        return self._index[(area, device, channel)]

    def get(self, area: str, device: str, channel: str) -> int | None:
        """Index of a series, or None when unknown."""
        return self._index.get((area, device, channel))

    def __getitem__(self, index: int) -> SeriesKey:
        """The key of a series index."""
        return self._keys[index]

    def __len__(self) -> int:
        """Number of series."""
        return len(self._keys)

    def __iter__(self) -> Iterator[SeriesKey]:
        """Iterate over the keys in index order."""
        return iter(self._keys)

    def devices(self) -> list[tuple[str, str]]:
        """Distinct (area, device) pairs in first-seen order."""
        return list(dict.fromkeys((k.area, k.device) for k in self._keys))

    def of_device(self, area: str, device: str) -> list[int]:
        """Indexes of every series of one device."""
        return [i for i, k in enumerate(self._keys) if (k.area, k.device) == (area, device)]


class ChannelSpec(BaseModel):
    """What the series table needs to know about one channel of a source."""

    model_config = ConfigDict(frozen=True)

    device: str
    channel: str
    unit: str = ""
    codes: tuple[str, ...] | None = None


class SourceConfig(BaseModel):
    """Common fields of every source entry in a site file; drivers subclass it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    area: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    device: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    """The device name; for sources that carry many devices (MQTT field devices) a group name."""

    def channel_specs(self) -> list[ChannelSpec]:
        """Every (device, channel) this source produces; drivers override it."""
        raise NotImplementedError


@dataclass
class DriverContext:
    """What the agent hands every driver besides its config and the series table."""

    site: str
    dead_letter: Callable[[str, bytes, str], None] = lambda _topic, _payload, _reason: None
    """Called with (topic or device, raw payload, reason) for input that cannot be used."""
    counters: Counter[str] = field(default_factory=Counter)
    """Errors, drops and reconnects by reason; shown in self-metrics."""
    secret: bytes = b""
    """Site secret for pseudonymising personal data (charging idTags)."""


@runtime_checkable
class Driver(Protocol):
    """A southbound driver: an async context manager that yields SampleBatch objects.

    A polled driver sets ``polled = True`` and implements :meth:`read_batch`,
    which the agent calls every ``poll_interval``; a pushed driver implements
    :meth:`stream`. Library callbacks only ``put_nowait`` into a bounded queue.
    """

    polled: ClassVar[bool]
    config: SourceConfig

    async def connect(self) -> None:
        """Open the session; raise ConnectError naming the device on failure."""

    async def close(self) -> None:
        """Release everything, carrying on past failing steps."""

    async def read_batch(self) -> SampleBatch:
        """Read every channel once (polled drivers)."""

    def stream(self) -> AsyncIterator[SampleBatch]:
        """Yield batches as the source pushes them (pushed drivers)."""

    async def __aenter__(self) -> Self:
        """Connect."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close."""


DriverFactory = Callable[[SourceConfig, SeriesTable, DriverContext], Driver]

_REGISTRY: dict[str, DriverFactory] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator that registers a driver under its config ``type`` name."""

    def deco(cls: type) -> type:
        if name in _REGISTRY:
            msg = f"driver {name!r} registered twice"
            raise ValueError(msg)
        _REGISTRY[name] = cls
        return cls

    return deco


def driver_class(name: str) -> DriverFactory:
    """The driver registered for a source type; imports the built-in drivers on first use."""
    if name not in _REGISTRY:
        import drivers.builtin  # noqa: F401, PLC0415 - registers modbus, opcua, mqtt

    try:
        return _REGISTRY[name]
    except KeyError:
        msg = f"no driver registered for source type {name!r} (known: {sorted(_REGISTRY)})"
        raise KeyError(msg) from None


def registered() -> list[str]:
    """Names of the registered drivers."""
    import drivers.builtin  # noqa: F401, PLC0415

    return sorted(_REGISTRY)


class DriverBase:
    """Shared lifecycle plumbing: context-manager methods and the default stubs."""

    polled: ClassVar[bool] = True

    def __init__(self, config: SourceConfig, series: SeriesTable, ctx: DriverContext) -> None:
        """Keep config, series table and context."""
        self.config = config
        self.series = series
        self.ctx = ctx

    @property
    def name(self) -> str:
        """Short name for logs and task names: ``modbus:meter-1``."""
        return f"{self.config.type}:{self.config.device}"

    async def connect(self) -> None:
        """Open the session."""

    async def close(self) -> None:
        """Release everything."""

    async def read_batch(self) -> SampleBatch:
        """Polled drivers override this."""
        raise NotImplementedError

    def stream(self) -> AsyncIterator[SampleBatch]:
        """Pushed drivers override this."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        """Connect; on failure release what was taken."""
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close."""
        await self.close()
