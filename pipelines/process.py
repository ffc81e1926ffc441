# Copyright 2026 tpo-edge contributors
# SPDX-License-Identifier: Apache-2.0
"""Process KPIs (shared/domain/KPIS.md): OEE, energy per part, charger and bench KPIs.

States and readings are step functions: a sample (t, value) holds until the next sample. A
window is [t0, t1) in ns; the value before the window comes from the last sample before t0 in
the arrays, or else from the ``before`` argument (carried over by the caller). Time before the
first known value is not attributed to any state. Counters may reset (device restart, daily
counters): a drop starts a new count from zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
Window = tuple[int, int]
"""[start_ns, end_ns)."""

NS_PER_S: Final = 1_000_000_000


# -- step functions and counters -----------------------------------------------------------


def _segments(
    t_ns: npt.ArrayLike, values: npt.ArrayLike, window: Window, before: float | None
) -> tuple[IntArray, FloatArray]:
    """Return (duration ns, value) of the constant pieces of the step function inside window."""
    t = np.asarray(t_ns, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    if t.shape != v.shape:
        raise ValueError("times and values differ in shape")
    start, end = window
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    prior = np.searchsorted(t, start, side="right")  # samples at or before the window start
    initial = float(v[prior - 1]) if prior else before
    inside = slice(prior, np.searchsorted(t, end, side="left"))
    edges = np.concatenate(([start], t[inside], [end]))
    levels = np.concatenate(([np.nan if initial is None else initial], v[inside]))
    durations = np.diff(edges)
    known = ~np.isnan(levels)
    return durations[known], levels[known]


def time_in_states(
    t_ns: npt.ArrayLike,
    codes: npt.ArrayLike,
    states: tuple[int, ...],
    window: Window,
    before: int | None = None,
) -> int:
    """Return the ns the state code spends in ``states`` during the window."""
    durations, levels = _segments(t_ns, codes, window, before)
    return int(durations[np.isin(levels, states)].sum())


def time_weighted_mean(
    t_ns: npt.ArrayLike, values: npt.ArrayLike, window: Window, before: float | None = None
) -> float | None:
    """Return the time-weighted mean of a held reading over the window (None: no value known)."""
    durations, levels = _segments(t_ns, values, window, before)
    total = int(durations.sum())
    return float(np.dot(durations, levels) / total) if total else None


def step_values_at(
    t_ns: npt.ArrayLike, values: npt.ArrayLike, at_ns: npt.ArrayLike, before: float | None = None
) -> FloatArray:
    """Return the held value at each time in ``at_ns`` (NaN where none is known)."""
    t = np.asarray(t_ns, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    index = np.searchsorted(t, np.asarray(at_ns, dtype=np.int64), side="right") - 1
    fallback = np.nan if before is None else before
    return np.where(index >= 0, v[np.maximum(index, 0)] if v.size else fallback, fallback)


def counter_increase(values: npt.ArrayLike, before: float | None = None) -> float:
    """Return how much a cumulative counter rose over the samples (resets restart from zero).

    ``before`` is the last reading before the window; without it the first sample is the base.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if before is not None:
        v = np.concatenate(([before], v))
    steps = np.diff(v)
    # After a reset the counter counted up from zero to the new reading.
    return float(np.where(steps >= 0, steps, v[1:]).sum())


def samples_in(t_ns: npt.ArrayLike, window: Window) -> int:
    """Return the number of events with a time in the window."""
    t = np.asarray(t_ns, dtype=np.int64)
    return int(np.count_nonzero((t >= window[0]) & (t < window[1])))


# -- OEE -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MachineModel:
    """Which state codes mean 'running' and which mode codes mean 'planned production'."""

    name: str
    running_states: tuple[int, ...]
    production_modes: tuple[int, ...]


MACHINE_MODELS: Final = (
    MachineModel("opc40001", running_states=(3,), production_modes=(3,)),
    # MachineryItemState 3 Executing; MachineryOperationMode 3 Processing.
    MachineModel("packml", running_states=(6,), production_modes=(1,)),
    # StateCurrent 6 Execute; UnitMode 1 Production.
)
"""Companion-spec state models for OEE run time."""
OPC40001, PACKML = MACHINE_MODELS


@dataclass(frozen=True, slots=True)
class Oee:
    """Overall equipment effectiveness of one window: OEE = A x P x Q."""

    planned_s: float
    run_s: float
    total_count: float
    good_count: float
    ideal_cycle_s: float
    availability: float | None
    """Run time / planned time."""
    performance: float | None
    """Ideal cycle time x total count / run time."""
    quality: float | None
    """Good count / total count."""
    oee: float | None


def oee(
    planned_s: float, run_s: float, total_count: float, good_count: float, ideal_cycle_s: float
) -> Oee:
    """Return OEE from planned and run time, counts and the ideal cycle time."""
    availability = run_s / planned_s if planned_s > 0 else None
    performance = ideal_cycle_s * total_count / run_s if run_s > 0 else None
    quality = good_count / total_count if total_count > 0 else None
    product = None
    if availability is not None and performance is not None and quality is not None:
        product = availability * performance * quality
    elif availability == 0.0:  # planned but never ran: nothing was produced
        product = 0.0
    return Oee(
        planned_s=planned_s,
        run_s=run_s,
        total_count=total_count,
        good_count=good_count,
        ideal_cycle_s=ideal_cycle_s,
        availability=availability,
        performance=performance,
        quality=quality,
        oee=product,
    )


@dataclass(frozen=True, slots=True)
class StepSeries:
    """Samples of a state or reading, plus the value held before them (if known)."""

    t_ns: IntArray
    values: npt.NDArray[np.float64] | IntArray
    before: float | None = None


def run_time_ns(
    state: StepSeries, mode: StepSeries | None, model: MachineModel, window: Window
) -> tuple[int, int]:
    """Return (planned, run) ns: time in production mode, and running while in it."""
    if mode is None:
        planned = window[1] - window[0]
        return planned, time_in_states(
            state.t_ns, state.values, model.running_states, window, _code(state.before)
        )
    planned = time_in_states(
        mode.t_ns, mode.values, model.production_modes, window, _code(mode.before)
    )
    # Both step functions change only at their own sample times: evaluate both on the union.
    edges = np.union1d(np.asarray(state.t_ns), np.asarray(mode.t_ns))
    edges = np.concatenate(([window[0]], edges[(edges > window[0]) & (edges < window[1])]))
    states = step_values_at(state.t_ns, state.values, edges, state.before)
    modes = step_values_at(mode.t_ns, mode.values, edges, mode.before)
    running = np.isin(states, model.running_states) & np.isin(modes, model.production_modes)
    durations = np.diff(np.concatenate((edges, [window[1]])))
    return planned, int(durations[running].sum())


def _code(value: float | None) -> int | None:
    return None if value is None else int(value)


def machine_oee(
    window: Window,
    *,
    state: StepSeries,
    mode: StepSeries | None,
    total_counter: StepSeries,
    good_counter: StepSeries,
    ideal_cycle_s: float,
    model: MachineModel = OPC40001,
) -> Oee:
    """Return the OEE of one machine over the window from its state, mode and part counters."""
    planned, run = run_time_ns(state, mode, model, window)
    total = _counter_in(total_counter, window)
    good = _counter_in(good_counter, window)
    return oee(planned / NS_PER_S, run / NS_PER_S, total, good, ideal_cycle_s)


def _counter_in(counter: StepSeries, window: Window) -> float:
    t = np.asarray(counter.t_ns, dtype=np.int64)
    v = np.asarray(counter.values, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    prior = int(np.searchsorted(t, window[0], side="left"))
    last = int(np.searchsorted(t, window[1], side="left"))
    before = float(v[prior - 1]) if prior else counter.before
    return counter_increase(v[prior:last], before)


def energy_per_part(window: Window, *, energy: StepSeries, parts: StepSeries) -> float | None:
    """Return energy meter delta / parts completed in the window (unit of energy per part)."""
    made = _counter_in(parts, window)
    return _counter_in(energy, window) / made if made > 0 else None


# -- chargers ------------------------------------------------------------------------------

CONNECTOR_STATUS: Final = {
    name: code
    for code, name in enumerate(
        (
            "Available", "Preparing", "Charging", "SuspendedEVSE", "SuspendedEV", "Finishing",
            "Reserved", "Unavailable", "Faulted", "Occupied",
        )
    )
}  # fmt: skip
"""OCPP 1.6 and 2.0.1 connector status names mapped to the codes the charger KPIs take."""
CHARGER_BUSY: Final = (CONNECTOR_STATUS["Charging"], CONNECTOR_STATUS["Occupied"])
CHARGER_OUT_OF_SERVICE: Final = (CONNECTOR_STATUS["Faulted"], CONNECTOR_STATUS["Unavailable"])


@dataclass(frozen=True, slots=True)
class ChargerKpis:
    """Charge point KPIs of one window."""

    utilisation: float
    """Time in Charging (or Occupied) / window."""
    energy_wh: float
    """Delta of Energy.Active.Import.Register."""
    sessions: int
    """Transactions completed (stopped) in the window."""
    availability: float
    """1 - time in Faulted or Unavailable / window."""


def charger_kpis(
    window: Window,
    *,
    status: StepSeries,
    energy_register_wh: StepSeries,
    stop_t_ns: npt.ArrayLike,
) -> ChargerKpis:
    """Return utilisation, energy, sessions and availability of one connector."""
    length = window[1] - window[0]
    before = _code(status.before)
    busy = time_in_states(status.t_ns, status.values, CHARGER_BUSY, window, before)
    down = time_in_states(status.t_ns, status.values, CHARGER_OUT_OF_SERVICE, window, before)
    return ChargerKpis(
        utilisation=busy / length,
        energy_wh=_counter_in(energy_register_wh, window),
        sessions=samples_in(stop_t_ns, window),
        availability=1.0 - down / length,
    )


# -- benches -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchKpis:
    """Smart bench KPIs of one window (counts only: no personal data)."""

    solar_yield_wh: float
    soc_min_pct: float | None
    soc_mean_pct: float | None
    """Time-weighted mean state of charge."""
    protection_s: float
    charging_sessions: float
    occupancy_mean: float | None
    """Time-weighted mean of the occupancy count."""
    occupancy_max: float | None


def bench_kpis(
    window: Window,
    *,
    pv_wh_total: StepSeries,
    soc_pct: StepSeries,
    protect_mode: StepSeries,
    sessions_counter: StepSeries,
    occupancy: StepSeries,
) -> BenchKpis:
    """Return solar yield, battery, protection mode, sessions and occupancy of one bench."""
    soc_durations, soc_levels = _segments(soc_pct.t_ns, soc_pct.values, window, soc_pct.before)
    occ_durations, occ_levels = _segments(
        occupancy.t_ns, occupancy.values, window, occupancy.before
    )
    protect = time_in_states(
        protect_mode.t_ns, protect_mode.values, (1,), window, _code(protect_mode.before)
    )
    return BenchKpis(
        solar_yield_wh=_counter_in(pv_wh_total, window),
        soc_min_pct=float(soc_levels[soc_durations > 0].min()) if soc_durations.any() else None,
        soc_mean_pct=time_weighted_mean(soc_pct.t_ns, soc_pct.values, window, soc_pct.before),
        protection_s=protect / NS_PER_S,
        charging_sessions=_counter_in(sessions_counter, window),
        occupancy_mean=time_weighted_mean(
            occupancy.t_ns, occupancy.values, window, occupancy.before
        ),
        occupancy_max=float(occ_levels[occ_durations > 0].max()) if occ_durations.any() else None,
    )
