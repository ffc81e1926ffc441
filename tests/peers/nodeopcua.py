"""node-opcua peer: installed once into .peers/node-opcua (git-ignored), started per test.

``ensure_node_opcua()`` is what ``scripts/test`` (or a fixture) calls; it runs
``npm install --no-audit --no-fund node-opcua@<pinned>`` only when the pinned
version is not already there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import ClassVar

REPO = Path(__file__).resolve().parents[2]
PEER_DIR = REPO / ".peers" / "node-opcua"
NODE_OPCUA_VERSION = "2.186.4"
SCRIPT = Path(__file__).with_name("opcua_server.mjs")


class PeerUnavailable(RuntimeError):  # noqa: N818 - reads as a state, like asyncio.QueueFull
    """node or npm is missing, or the install failed."""


def ensure_node_opcua() -> Path:
    """Install the pinned node-opcua into .peers/node-opcua unless it is there; return the dir."""
    installed = PEER_DIR / "node_modules" / "node-opcua" / "package.json"
    if installed.exists() and json.loads(installed.read_text())["version"] == NODE_OPCUA_VERSION:
        return PEER_DIR
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise PeerUnavailable(
            "node and npm are needed for the node-opcua peer (Debian: nodejs npm)"
        )
    PEER_DIR.mkdir(parents=True, exist_ok=True)
    package = PEER_DIR / "package.json"
    if not package.exists():
        package.write_text('{"name": "tpo-edge-peer-node-opcua", "private": true}\n')
    result = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", f"node-opcua@{NODE_OPCUA_VERSION}"],
        cwd=PEER_DIR,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise PeerUnavailable(f"npm install node-opcua failed:\n{result.stderr[-2000:]}")
    return PEER_DIR


class NodeOpcuaServer:
    """The peer server process (tests/peers/opcua_server.mjs) on a loopback port."""

    NAMESPACE = "urn:tpo-edge:peer"
    VALUES: ClassVar[dict[str, float]] = {
        "Pressure": 123.5,
        "Temperature": 42.25,
        "Running": 1.0,
        "StrokeCount": 4711.0,
        "State": 3.0,
    }
    """Known values served as Good; ``OilLevel`` is served BadSensorFailure, ``Ticks`` counts."""

    def __init__(self, port: int, workdir: Path) -> None:
        """Remember where to listen and where node-opcua may write its PKI."""
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[str] | None = None
        self.endpoint = f"opc.tcp://127.0.0.1:{port}/peer"

    def start(self, timeout_s: float = 60.0) -> NodeOpcuaServer:
        """Start and wait for the READY line."""
        peer = ensure_node_opcua()
        node = shutil.which("node")
        assert node is not None
        self.proc = subprocess.Popen(
            [node, str(SCRIPT), str(self.port), str(self.workdir / "pki")],
            env={**os.environ, "PEER_DIR": str(peer)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        lines: list[str] = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("READY"):
                return self
        self.stop()
        raise PeerUnavailable("node-opcua peer did not start:\n" + "".join(lines[-30:]))

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
