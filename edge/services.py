"""Start the real servers (mosquitto, influxd) as child processes on free loopback ports.

Used by the test fixtures and by ``tpo-edge demo``. Each server gets a
temporary directory with its own config, so several can run side by side and
nothing touches system-wide state. Stopping is by PID; ``kill()`` sends SIGKILL
for fault tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self

log = logging.getLogger(__name__)

_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_binary(name: str) -> str | None:
    """Path of a server binary; also looks in sbin directories missing from a user's PATH."""
    found = shutil.which(name)
    if found:
        return found
    for folder in _SBIN:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    """Block until a TCP connect to host:port succeeds, or raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                msg = f"nothing listens on {host}:{port} after {timeout_s} s"
                raise TimeoutError(msg) from None
            time.sleep(0.02)


@dataclass
class BrokerTls:
    """TLS files for a mosquitto listener."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False


@dataclass
class Mosquitto:
    """A mosquitto broker in the foreground, on a free loopback port."""

    workdir: Path
    port: int = 0
    host: str = "127.0.0.1"
    password_file: Path | None = None
    acl_file: Path | None = None
    tls: BrokerTls | None = None
    extra_listener_port: int | None = None
    """An extra plain, anonymous listener (tests that compare TLS and plain)."""
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    def config_text(self) -> str:
        """The mosquitto.conf this broker runs with."""
        lines = ["persistence false", "per_listener_settings true", "log_type error"]
        lines.append("log_type warning")
        lines += ["max_inflight_messages 1000", "max_queued_messages 100000"]
        lines.append("set_tcp_nodelay true")  # no Nagle delay (up to 40 ms) per hop
        lines.append(f"listener {self.port} {self.host}")
        if self.password_file is None:
            lines.append("allow_anonymous true")
        else:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.cafile}",
                f"certfile {self.tls.certfile}",
                f"keyfile {self.tls.keyfile}",
            ]
            if self.tls.require_certificate:
                lines.append("require_certificate true")
        if self.extra_listener_port:
            lines += [f"listener {self.extra_listener_port} {self.host}", "allow_anonymous true"]
        return "\n".join(lines) + "\n"

    def start(self) -> Self:
        """Write the config, start mosquitto and wait until it accepts connections."""
        binary = find_binary("mosquitto")
        if binary is None:
            msg = "mosquitto not found (Debian package 'mosquitto')"
            raise FileNotFoundError(msg)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        self._log = (self.workdir / "mosquitto.log").open("ab")
        self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, our own config
            [binary, "-c", str(conf)], stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            wait_for_port(self.host, self.port)
        except TimeoutError:
            self.stop()
            raise
        log.debug("mosquitto pid %s on %s:%s", self._proc.pid, self.host, self.port)
        return self

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Terminate and wait."""
        _stop(self._proc)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
        self.stop()

    def restart(self) -> None:
        """Start again on the same port."""
        self.stop()
        self.start()


@dataclass
class Influxd:
    """An InfluxDB 1.x ``influxd`` on free loopback ports, with a fresh data directory."""

    workdir: Path
    port: int = 0
    host: str = "127.0.0.1"
    database: str = "tpo"
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)
    _rpc_port: int = 0

    @property
    def url(self) -> str:
        """Base URL of the HTTP API."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        """Write the config, start influxd, wait for /ping and create the database."""
        binary = find_binary("influxd")
        if binary is None:
            msg = "influxd not found (Debian package 'influxdb')"
            raise FileNotFoundError(msg)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        self._rpc_port = self._rpc_port or free_port(self.host)
        conf = self.workdir / "influxdb.conf"
        conf.write_text(
            f"""reporting-disabled = true
bind-address = "{self.host}:{self._rpc_port}"
[meta]
  dir = "{self.workdir}/meta"
[data]
  dir = "{self.workdir}/data"
  wal-dir = "{self.workdir}/wal"
  query-log-enabled = false
[http]
  bind-address = "{self.host}:{self.port}"
  log-enabled = false
  max-body-size = 0
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
"""
        )
        self._log = (self.workdir / "influxd.log").open("ab")
        self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, our own config
            [binary, "run", "-config", str(conf), "-pidfile", str(self.workdir / "influxd.pid")],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ping()
            self.query(f'CREATE DATABASE "{self.database}"')
        except Exception:
            self.stop()
            raise
        return self

    def _wait_ping(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                msg = f"influxd exited with {self._proc.returncode}; see {self.workdir}/influxd.log"
                raise RuntimeError(msg)
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as resp:  # noqa: S310
                    if resp.status == 204:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                msg = f"influxd did not answer /ping within {timeout_s} s"
                raise TimeoutError(msg)
            time.sleep(0.05)

    def query(self, q: str) -> list[dict[str, object]]:
        """Run InfluxQL synchronously (setup and test assertions); returns the series list."""
        import json  # noqa: PLC0415 - only the synchronous helper needs it

        data = urllib.parse.urlencode({"q": q, "db": self.database}).encode()
        req = urllib.request.Request(f"{self.url}/query", data=data, method="POST")  # noqa: S310
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            body = json.loads(resp.read())
        result = body["results"][0]
        if "error" in result:
            raise RuntimeError(f"InfluxQL {q!r}: {result['error']}")
        series: list[dict[str, object]] = result.get("series", [])
        return series

    def stop(self) -> None:
        """Terminate and wait."""
        _stop(self._proc)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
        self.stop()


def _stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("pid %s ignored SIGTERM for %s s; killing it", proc.pid, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
