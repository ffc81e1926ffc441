"""An in-process MQTT 3.1.1 broker (amqtt) for ``tpo-edge demo`` where mosquitto is missing.

Only for the demo on a laptop: production and the tests use mosquitto (MQTT 5,
TLS, per-device accounts and ACLs).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from edge.services import free_port

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def start_python_broker(
    host: str = "127.0.0.1",
) -> tuple[str, int, Callable[[], Awaitable[None]]]:
    """Start amqtt on a free loopback port; returns (host, port, stop)."""
    from amqtt.broker import Broker  # noqa: PLC0415 - optional, heavy import

    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)
    port = free_port(host)
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    log.info("in-process MQTT 3.1.1 broker on %s:%d (mosquitto not installed)", host, port)

    async def stop() -> None:
        await broker.shutdown()

    return host, port, stop
