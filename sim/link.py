"""In-process 5G link emulation: delay, jitter, bursty loss, rate cap and handover stalls.

netem needs CAP_NET_ADMIN, so the simulated field devices run every message
through a :class:`LinkEmulator` instead: it decides whether the message is lost
and when it arrives. Draws come from a seeded numpy Generator, so a run (and its
ground truth) is reproducible.

Model, per message i sent at ``t_send[i]`` with ``size[i]`` bytes:

* loss: a Gilbert-Elliott chain (good state loses nothing, bad state loses with
  ``loss_in_bad``); the transition probabilities are derived from the mean loss
  and the mean burst length, so the stated ``loss`` is the long-run loss ratio.
* delay: ``delay_ms + jitter_ms * z``, clipped at zero; ``z`` is standard normal
  or "pareto-normal" (3/4 normal, 1/4 standardised Pareto: mean 0, sd 1, heavy
  right tail), so ``delay_ms`` is the mean one-way delay.
* rate cap: a FIFO serialiser of ``rate_bps``; a message waits for the ones
  before it, then takes ``8 * size / rate_bps`` seconds.
* handover stalls: exponential gaps of mean 1 / ``stall_rate_hz``; each stall lasts
  U(stall_min_ms, stall_max_ms) and loses every message sent during it.
* order: 5G (RLC AM / PDCP) delivers in order, so a message never overtakes an
  earlier delivered one: ``t_deliver[i] = max(t_deliver[i-1], t_send[i] + delay[i])``.
  ``reorder=True`` drops that rule (independent delays).

Per-message randomness is drawn in fixed blocks, so ``draw(5); draw(5)`` gives
the same numbers as ``draw(10)`` and ``transit`` called n times matches one
vectorised ``transmit`` of n messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

_BLOCK = 4096
_PARETO_ALPHA = 3.0
_PARETO_WEIGHT = 0.25
_NS_PER_MS = 1_000_000
_NS_PER_S = 1_000_000_000
_NEVER = np.iinfo(np.int64).min


class LinkProfile(BaseModel):
    """One direction of an emulated radio link (see shared/domain/DEVICES.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    delay_ms: float = Field(ge=0.0)
    """Mean one-way delay."""
    jitter_ms: float = Field(default=0.0, ge=0.0)
    """Standard deviation of the delay."""
    distribution: Literal["normal", "pareto_normal"] = "normal"
    loss: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Long-run loss ratio of the Gilbert-Elliott chain (stalls come on top)."""
    burst_len: float = Field(default=1.0, ge=1.0)
    """Mean number of consecutive messages in the bad state."""
    loss_in_bad: float = Field(default=1.0, gt=0.0, le=1.0)
    """Loss probability while in the bad state."""
    rate_bps: float | None = Field(default=None, gt=0.0)
    """Capacity in bit/s; None means no cap."""
    stall_rate_hz: float = Field(default=0.0, ge=0.0)
    """Handover rate: gaps between stalls are exponential with mean 1 / stall_rate_hz."""
    stall_min_ms: float = Field(default=50.0, ge=0.0)
    stall_max_ms: float = Field(default=500.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> LinkProfile:
        if self.loss >= self.loss_in_bad:
            msg = f"loss ({self.loss}) must be below loss_in_bad ({self.loss_in_bad})"
            raise ValueError(msg)
        if self.stall_max_ms < self.stall_min_ms:
            msg = "stall_max_ms must not be below stall_min_ms"
            raise ValueError(msg)
        return self

    @property
    def p_bad_to_good(self) -> float:
        """Gilbert-Elliott r: leaves the bad state after burst_len messages on average."""
        return 1.0 / self.burst_len

    @property
    def p_good_to_bad(self) -> float:
        """Gilbert-Elliott p, so that loss_in_bad * p / (p + r) equals ``loss``."""
        r = self.p_bad_to_good
        return self.loss * r / (self.loss_in_bad - self.loss)

    @property
    def p_bad(self) -> float:
        """Stationary probability of the bad state."""
        p, r = self.p_good_to_bad, self.p_bad_to_good
        return p / (p + r) if p > 0 else 0.0

    @property
    def stall_loss(self) -> float:
        """Long-run fraction of time spent in handover stalls (renewal: gap, then stall)."""
        busy = self.stall_rate_hz * (self.stall_min_ms + self.stall_max_ms) / 2 / 1000
        return busy / (1.0 + busy)


PROFILES: dict[str, LinkProfile] = {
    "ideal": LinkProfile(name="ideal", delay_ms=0.0),
    "sa_nominal": LinkProfile(
        name="sa_nominal", delay_ms=5.0, jitter_ms=1.5, distribution="pareto_normal", loss=1e-4
    ),
    "sa_uplink_loaded": LinkProfile(
        name="sa_uplink_loaded", delay_ms=9.0, jitter_ms=3.0, loss=5e-4, burst_len=3.0
    ),
    "cell_edge": LinkProfile(
        name="cell_edge",
        delay_ms=15.0,
        jitter_ms=8.0,
        distribution="pareto_normal",
        loss=5e-3,
        burst_len=4.0,
        rate_bps=20e6,
    ),
    "handover": LinkProfile(
        name="handover",
        delay_ms=5.0,
        jitter_ms=1.5,
        distribution="pareto_normal",
        loss=1e-4,
        stall_rate_hz=0.2,
    ),
}
"""The named profiles of DEVICES.md (plus ``ideal``: no delay, no loss)."""


def profile(name: str) -> LinkProfile:
    """A named profile; KeyError lists the known names."""
    try:
        return PROFILES[name]
    except KeyError:
        msg = f"unknown link profile {name!r} (known: {sorted(PROFILES)})"
        raise KeyError(msg) from None


@dataclass(frozen=True, slots=True)
class LinkDraw:
    """Per-message random draws before timing rules: Gilbert-Elliott loss and raw delay."""

    lost: npt.NDArray[np.bool_]
    delay_ns: npt.NDArray[np.int64]


class LinkEmulator:
    """Seeded emulation of one link direction (one per simulated device)."""

    def __init__(self, profile: LinkProfile, seed: int = 0, *, reorder: bool = False) -> None:
        """Start in a state drawn from the stationary distribution."""
        self.profile = profile
        self.reorder = reorder
        msg_seq, stall_seq = np.random.SeedSequence(seed).spawn(2)
        self._rng = np.random.default_rng(msg_seq)
        self._stall_rng = np.random.default_rng(stall_seq)
        self._bad = bool(self._rng.random() < profile.p_bad)
        self._run_left = 0  # messages left in the current Gilbert-Elliott state
        self._started = False
        self._lost_buf = np.empty(0, np.bool_)
        self._delay_buf = np.empty(0, np.int64)
        self._pos = 0
        self._last_deliver = _NEVER
        self._link_free = _NEVER
        self._stall_start = np.empty(0, np.int64)
        self._stall_end = np.empty(0, np.int64)
        self._stall_horizon: int | None = None

    # -- raw draws ---------------------------------------------------------------------------

    def _ge_block(self, n: int) -> npt.NDArray[np.bool_]:
        """Bad-state flags of the next n messages (a loop over runs, not messages)."""
        prof = self.profile
        p, r = prof.p_good_to_bad, prof.p_bad_to_good
        bad = np.zeros(n, np.bool_)
        if p == 0.0:
            return bad
        pos = 0
        while pos < n:
            if self._run_left == 0:
                # Sojourn times are geometric; the chain is memoryless, so a fresh run
                # drawn at start-up for the stationary initial state is exact too.
                if self._started:
                    self._bad = not self._bad
                self._started = True
                self._run_left = int(self._rng.geometric(r if self._bad else p))
            k = min(self._run_left, n - pos)
            bad[pos : pos + k] = self._bad
            pos += k
            self._run_left -= k
        return bad

    def _refill(self) -> None:
        prof = self.profile
        bad = self._ge_block(_BLOCK)
        lost = bad & (self._rng.random(_BLOCK) < prof.loss_in_bad)
        z = self._rng.standard_normal(_BLOCK)
        if prof.distribution == "pareto_normal":
            a = _PARETO_ALPHA
            mean, sd = 1.0 / (a - 1.0), math.sqrt(a / ((a - 1.0) ** 2 * (a - 2.0)))
            tail = (self._rng.pareto(a, _BLOCK) - mean) / sd
            use_tail = self._rng.random(_BLOCK) < _PARETO_WEIGHT
            z = np.where(use_tail, tail, z)
        delay = np.maximum(prof.delay_ms + prof.jitter_ms * z, 0.0) * _NS_PER_MS
        self._lost_buf = np.concatenate([self._lost_buf[self._pos :], lost])
        self._delay_buf = np.concatenate([self._delay_buf[self._pos :], delay.astype(np.int64)])
        self._pos = 0

    def draw(self, n: int) -> LinkDraw:
        """The next n messages' loss flags and raw delays (no stalls, rate cap or order)."""
        while len(self._lost_buf) - self._pos < n:
            self._refill()
        sl = slice(self._pos, self._pos + n)
        out = LinkDraw(self._lost_buf[sl].copy(), self._delay_buf[sl].copy())
        self._pos += n
        return out

    # -- timing rules ------------------------------------------------------------------------

    def _stalled(self, t_send: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Which send times fall inside a handover stall; stalls are drawn lazily in time."""
        prof = self.profile
        if prof.stall_rate_hz == 0.0 or len(t_send) == 0:
            return np.zeros(len(t_send), np.bool_)
        if self._stall_horizon is None:
            self._stall_horizon = int(t_send.min())
        t_max = int(t_send.max())
        starts, ends = [self._stall_start], [self._stall_end]
        while self._stall_horizon <= t_max:
            # Stalls do not overlap: the next handover can only start after this one ended.
            k = 64
            gaps = self._stall_rng.exponential(1.0 / prof.stall_rate_hz, k) * _NS_PER_S
            dur = self._stall_rng.uniform(prof.stall_min_ms, prof.stall_max_ms, k) * _NS_PER_MS
            gaps_ns, dur_ns = gaps.astype(np.int64), dur.astype(np.int64)
            s = self._stall_horizon + np.cumsum(gaps_ns) + np.cumsum(dur_ns) - dur_ns
            starts.append(s)
            ends.append(s + dur_ns)
            self._stall_horizon = int(s[-1] + dur_ns[-1])
        self._stall_start = np.concatenate(starts)
        self._stall_end = np.concatenate(ends)
        idx = np.searchsorted(self._stall_start, t_send, side="right") - 1
        ok = idx >= 0
        stalled = np.zeros(len(t_send), np.bool_)
        stalled[ok] = t_send[ok] < self._stall_end[idx[ok]]
        return stalled

    def transmit(
        self, t_send_ns: npt.ArrayLike, size_bytes: npt.ArrayLike = 0
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
        """Vectorised: (delivered, t_deliver_ns) for messages sent at non-decreasing times.

        A lost message's ``t_deliver_ns`` is its send time plus delay (meaningless, kept
        so the arrays stay aligned).
        """
        t_send = np.asarray(t_send_ns, np.int64).reshape(-1)
        n = len(t_send)
        raw = self.draw(n)
        delivered = ~(raw.lost | self._stalled(t_send))
        t_ready = t_send
        rate = self.profile.rate_bps
        if rate is not None:
            # FIFO serialiser: free_i = max(ready_i, free_{i-1}) + ser_i, as a max-plus scan.
            size = np.broadcast_to(np.asarray(size_bytes, np.float64), (n,))
            ser = (size * 8.0 / rate * _NS_PER_S).astype(np.int64)
            csum = np.cumsum(ser)
            prev = np.concatenate([[0], csum[:-1]])
            best = np.maximum(np.maximum.accumulate(t_send - prev), self._link_free)
            free = best + csum
            if n:
                self._link_free = int(free[-1])
            t_ready = free
        t_deliver = t_ready + raw.delay_ns
        if not self.reorder and n:
            gated = np.where(delivered, t_deliver, _NEVER)
            running = np.maximum.accumulate(np.concatenate([[self._last_deliver], gated]))[1:]
            t_deliver = np.where(delivered, running, t_deliver)
            self._last_deliver = int(running[-1])
        return delivered, t_deliver

    def transit(self, size_bytes: int, t_send_ns: int) -> tuple[bool, int]:
        """One message: (delivered, t_deliver_ns)."""
        delivered, t_deliver = self.transmit(np.array([t_send_ns], np.int64), size_bytes)
        return bool(delivered[0]), int(t_deliver[0])
