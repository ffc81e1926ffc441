# ruff: noqa: INP001 - a standalone script copied into the image, not a package module
"""Container health check of tpo-edge services, without credentials or extra packages.

``--connected PORT``: healthy while the process holds an ESTABLISHED TCP connection to a
remote PORT (the agent and ingest to the broker's 8883). ``--listening PORT``: healthy
while something listens on PORT (the simulator's Modbus gateway). Reads /proc/net/tcp{,6}
of the container's own network namespace.
"""

from __future__ import annotations

import sys
from pathlib import Path

ESTABLISHED = "01"
LISTEN = "0A"


def sockets() -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of every TCP socket in this network namespace."""
    out: list[tuple[int, int, str]] = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(name)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            local, remote, state = cols[1], cols[2], cols[3]
            out.append((int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state))
    return out


def healthy(mode: str, port: int) -> bool:
    """Whether the check of ``mode`` (--connected or --listening) passes for ``port``."""
    if mode == "--connected":
        return any(r == port and s == ESTABLISHED for _l, r, s in sockets())
    return any(lp == port and s == LISTEN for lp, _r, s in sockets())


def main(argv: list[str]) -> int:
    """Exit 0 when healthy, 1 when not, 2 on bad usage."""
    if len(argv) != 2 or argv[0] not in {"--connected", "--listening"} or not argv[1].isdigit():
        sys.stderr.write("usage: tpo-healthcheck --connected PORT | --listening PORT\n")
        return 2
    return 0 if healthy(argv[0], int(argv[1])) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
