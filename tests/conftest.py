"""Shared fixtures: real mosquitto and influxd on free loopback ports.

In CI (``CI=true``) a missing server binary fails the test; elsewhere it skips,
so a laptop without Debian's packages can still run the unit tests.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.services import Influxd, Mosquitto, find_binary

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_binary(name: str, package: str) -> str:
    """Path of a server binary; fail in CI, skip elsewhere, when it is missing."""
    path = find_binary(name)
    if path is None:
        reason = f"{name} is not installed (Debian package {package!r})"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A plain, anonymous mosquitto for the whole test session."""
    require_binary("mosquitto", "mosquitto")
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield broker
    broker.stop()


@pytest.fixture
def fresh_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto of this test alone (for tests that kill or restart it)."""
    require_binary("mosquitto", "mosquitto")
    broker = Mosquitto(tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def influxd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Influxd]:
    """One influxd for the whole session."""
    require_binary("influxd", "influxdb")
    server = Influxd(tmp_path_factory.mktemp("influxd")).start()
    yield server
    server.stop()


@pytest.fixture
def influxd(influxd_server: Influxd) -> Iterator[Influxd]:
    """The session influxd with an empty ``tpo`` database for this test."""
    influxd_server.query(f'DROP DATABASE "{influxd_server.database}"')
    influxd_server.query(f'CREATE DATABASE "{influxd_server.database}"')
    yield influxd_server


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    """Fail a test that leaves non-daemon threads running (like pymodbus' own suite)."""
    before = set(threading.enumerate())
    yield
    left = [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and not t.daemon and t is not threading.main_thread()
    ]
    for t in left:
        t.join(timeout=2.0)
    still = [t.name for t in left if t.is_alive()]
    assert not still, f"test left threads running: {still}"
