"""Builds and runs the libmodbus peer server (tests/peers/modbus_server.c) for integration tests.

``python tests/peers/libmodbus.py`` compiles it into ``.peers/modbus_server`` (what
scripts/test can call up front); the fixtures call :func:`build` themselves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).resolve().with_name("modbus_server.c")
BINARY = ROOT / ".peers" / "modbus_server"


class PeerUnavailableError(RuntimeError):
    """gcc, pkg-config or libmodbus-dev is missing."""


def build() -> Path:
    """Compile the server if it is missing or older than its source; return the binary."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    gcc, pkg_config = shutil.which("gcc"), shutil.which("pkg-config")
    if gcc is None or pkg_config is None:
        raise PeerUnavailableError("gcc and pkg-config are needed (Debian: gcc pkg-config)")
    flags = subprocess.run(
        [pkg_config, "--cflags", "--libs", "libmodbus"],
        capture_output=True,
        text=True,
        check=False,
    )
    if flags.returncode != 0:
        raise PeerUnavailableError("libmodbus is not installed (Debian: libmodbus-dev)")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    tmp = BINARY.with_suffix(f".{os.getpid()}.tmp")
    subprocess.run(
        [gcc, "-std=c99", "-O2", "-Wall", "-o", str(tmp), str(SOURCE), *flags.stdout.split()],
        check=True,
    )
    tmp.replace(BINARY)  # atomic: parallel sessions never run a half-written binary
    return BINARY


def start(port: int = 0, timeout_s: float = 10.0) -> tuple[subprocess.Popen[str], int]:
    """Run the server on 127.0.0.1; return the process and the port it listens on."""
    proc = subprocess.Popen(
        [str(build()), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the server prints "ready PORT" once listening
    if not line.startswith("ready "):
        proc.kill()
        _out, err = proc.communicate(timeout=timeout_s)
        raise RuntimeError(f"libmodbus peer did not start: {line!r} {err!r}")
    return proc, int(line.split()[1])


def stop(proc: subprocess.Popen[str]) -> None:
    """Stop the server (it serves until killed)."""
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


if __name__ == "__main__":
    sys.stdout.write(f"{build()}\n")
