"""Install the independent protocol peers into .peers/ (called by scripts/test).

node-opcua (an OPC UA server not built on asyncua) comes from the npm registry;
the libmodbus server is compiled from tests/peers/modbus_server.c. Both are
cached, so a second run costs nothing.
"""

from __future__ import annotations

import sys

from tests.peers import libmodbus, nodeopcua


def main() -> int:
    """Build both peers; report which failed."""
    failed = []
    for name, step in (
        ("libmodbus server", libmodbus.build),
        ("node-opcua", nodeopcua.ensure_node_opcua),
    ):
        try:
            path = step()
        except Exception as exc:
            print(f"peers: {name} failed: {exc}", file=sys.stderr)
            failed.append(name)
        else:
            print(f"peers: {name} ready at {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
