"""Statistics, order and reproducibility of the in-process 5G link emulation."""

from __future__ import annotations

import numpy as np
import pytest

from sim.link import PROFILES, LinkEmulator, LinkProfile, profile

N = 400_000


@pytest.mark.parametrize("name", ["sa_nominal", "sa_uplink_loaded", "cell_edge"])
def test_mean_delay_jitter_and_loss_match_profile(name: str) -> None:
    prof = PROFILES[name]
    draw = LinkEmulator(prof, seed=42).draw(N)
    delay_ms = draw.delay_ns / 1e6
    # Clipping at zero lifts the mean slightly for cell_edge (15 +- 8 ms): stay within 2 %.
    assert delay_ms.mean() == pytest.approx(prof.delay_ms, rel=0.02)
    assert delay_ms.std() == pytest.approx(prof.jitter_ms, rel=0.05)
    # Loss: binomial-ish with bursts; allow 5 sigma of the burst-inflated standard error.
    sigma = np.sqrt(prof.loss * prof.burst_len * 2 / N)
    assert abs(draw.lost.mean() - prof.loss) < 5 * sigma + 1e-5


def test_pareto_normal_has_heavier_right_tail_than_normal() -> None:
    base = {"delay_ms": 10.0, "jitter_ms": 2.0}
    normal = LinkEmulator(LinkProfile(**base), seed=1).draw(N).delay_ns / 1e6
    heavy = LinkEmulator(LinkProfile(**base, distribution="pareto_normal"), seed=1).draw(N)
    heavy_ms = heavy.delay_ns / 1e6
    assert heavy_ms.mean() == pytest.approx(10.0, rel=0.01)
    assert np.percentile(heavy_ms, 99.99) > np.percentile(normal, 99.99) + 4.0
    assert np.median(heavy_ms) < np.median(normal)  # the tail is paid for by a lower body


def test_gilbert_elliott_parameters_hit_mean_loss_and_burst_length() -> None:
    prof = LinkProfile(delay_ms=1, loss=0.02, burst_len=5.0)
    assert prof.p_bad_to_good == pytest.approx(0.2)
    assert prof.loss_in_bad * prof.p_bad == pytest.approx(0.02)
    lost = LinkEmulator(prof, seed=3).draw(N).lost
    assert lost.mean() == pytest.approx(0.02, rel=0.1)
    # Mean run of consecutive losses ~ burst_len (loss_in_bad = 1).
    edges = np.diff(np.concatenate([[0], lost.astype(np.int8), [0]]))
    runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    assert runs.mean() == pytest.approx(5.0, rel=0.1)


def test_order_preserved_unless_reorder_requested() -> None:
    t_send = np.arange(20_000, dtype=np.int64) * 1_000_000  # 1 ms apart, jitter 8 ms
    prof = PROFILES["cell_edge"]
    delivered, t_deliver = LinkEmulator(prof, seed=5).transmit(t_send, 200)
    assert np.all(np.diff(t_deliver[delivered]) >= 0)
    assert np.all(t_deliver[delivered] >= t_send[delivered])
    _, free = LinkEmulator(prof, seed=5, reorder=True).transmit(t_send, 200)
    assert np.any(np.diff(free[delivered]) < 0)


def test_transit_per_message_equals_vectorised_transmit() -> None:
    t_send = np.cumsum(np.full(5000, 3_000_000, np.int64))
    prof = PROFILES["handover"].model_copy(update={"stall_rate_hz": 2.0, "rate_bps": 1e6})
    a = LinkEmulator(prof, seed=9)
    one = [a.transit(500, int(t)) for t in t_send]
    b = LinkEmulator(prof, seed=9)
    delivered, t_deliver = b.transmit(t_send[:1234], 500)
    d2, t2 = b.transmit(t_send[1234:], 500)
    assert [d for d, _ in one] == list(np.concatenate([delivered, d2]))
    both = np.concatenate([t_deliver, t2])
    ok = np.concatenate([delivered, d2])
    assert [t for d, t in one if d] == list(both[ok])


def test_reproducible_with_seed_and_different_across_seeds() -> None:
    prof = PROFILES["sa_uplink_loaded"]
    x, y = LinkEmulator(prof, seed=7).draw(10_000), LinkEmulator(prof, seed=7).draw(10_000)
    assert np.array_equal(x.delay_ns, y.delay_ns)
    assert np.array_equal(x.lost, y.lost)
    z = LinkEmulator(prof, seed=8).draw(10_000)
    assert not np.array_equal(x.delay_ns, z.delay_ns)


def test_handover_stalls_lose_the_expected_time_fraction() -> None:
    prof = PROFILES["handover"]
    t_send = np.arange(0, 2000 * 10**9, 10**7, dtype=np.int64)  # 2000 s at 100 msg/s
    delivered, _ = LinkEmulator(prof, seed=11).transmit(t_send)
    lost = 1 - delivered.mean()
    assert lost == pytest.approx(prof.stall_loss + prof.loss, rel=0.15)
    # Losses come in runs of 5-50 messages (50-500 ms at 10 ms spacing).
    edges = np.diff(np.concatenate([[0], (~delivered).astype(np.int8), [0]]))
    runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    assert np.mean(runs <= 51) > 0.98  # two stalls rarely fall within 10 ms of each other
    assert np.median(runs[runs > 1]) > 10


def test_rate_cap_serialises_messages() -> None:
    prof = LinkProfile(delay_ms=0.0, rate_bps=8_000_000)  # 1 MB/s
    t_send = np.zeros(100, np.int64)  # a burst of 100 x 10 kB at t=0
    delivered, t_deliver = LinkEmulator(prof, seed=1).transmit(t_send, 10_000)
    assert delivered.all()
    assert t_deliver[-1] == pytest.approx(1e9, rel=1e-6)  # 1 MB at 1 MB/s
    assert np.all(np.diff(t_deliver) == 10_000_000)


def test_profile_validation_and_lookup() -> None:
    with pytest.raises(ValueError, match="loss"):
        LinkProfile(delay_ms=1, loss=0.5, loss_in_bad=0.4)
    with pytest.raises(KeyError, match="sa_nominal"):
        profile("nope")
    assert profile("cell_edge").rate_bps == 20e6
