"""The error hierarchy of tpo-edge.

Every driver maps its protocol library's exceptions to these at its boundary
(``raise ReadError(...) from exc``), so the supervisor can decide what to do
without knowing asyncua, pymodbus or paho. Messages name the device, unit,
address or YAML path, because the reader of a log line needs exactly that.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base of every error tpo-edge raises on purpose."""


class ConfigError(EdgeError):
    """A site or scenario file is invalid; ``problems`` lists (path, line, reason)."""

    def __init__(self, source: str, problems: list[tuple[str, int | None, str]]) -> None:
        """Keep the file name and every problem found in it."""
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} error(s)"]
        for path, line, reason in problems:
            where = f"{path} (line {line})" if line is not None else path
            lines.append(f"  {where}: {reason}")
        super().__init__("\n".join(lines))


class SourceError(EdgeError):
    """A southbound source failed; the message names the device."""


class ConnectError(SourceError):
    """A source could not be reached or refused the session."""


class ReadError(SourceError):
    """A read or subscription failed (exception, timeout, bad reply)."""


class DecodeError(SourceError):
    """A reply or payload arrived but could not be turned into samples."""


class SinkError(EdgeError):
    """The backbone broker or the database rejected or lost a write."""


class SinkRejectedError(SinkError):
    """The database refused (part of) a write for good; sending the same lines again cannot help."""
