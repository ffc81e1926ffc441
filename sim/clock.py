"""Accelerated simulation clock.

Timestamps on the wire are always wall-clock ns (so latency is real); only the
*process* (machine cycles, battery charge, charging sessions) runs faster by
``speed``, so a ten-minute CI run covers hours of campus life.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class SimClock:
    """Maps elapsed wall time to simulated process time."""

    speed: float = 1.0
    _t0: float = field(default_factory=time.monotonic)

    def sim_seconds(self) -> float:
        """Simulated seconds elapsed since the clock started."""
        return (time.monotonic() - self._t0) * self.speed

    @staticmethod
    def wall_ns() -> int:
        """Wall-clock ns since the epoch, the stamp every message carries."""
        return time.time_ns()
