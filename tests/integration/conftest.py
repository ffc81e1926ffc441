"""Fixtures shared by the integration tests that kill their broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_binary

from .helpers import VolatileMosquitto


@pytest.fixture
def volatile_broker(tmp_path: Path) -> Iterator[VolatileMosquitto]:
    """A broker of this test alone that forgets everything when killed."""
    require_binary("mosquitto", "mosquitto")
    b = VolatileMosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()
