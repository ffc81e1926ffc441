"""Grafana's InfluxQL macro and template-variable expansion, for running panel queries anywhere.

Grafana rewrites a raw InfluxQL target before sending it: ``$timeFilter`` becomes the time
range, ``$__interval`` / ``$interval`` the group-by interval, ``$__interval_ms`` the same in
milliseconds, ``$__from`` / ``$__to`` the range in epoch milliseconds, and every template
variable (``$name``, ``${name}``, ``[[name]]``) its value. A multi-value (or "All") variable
becomes ``(a|b)`` with regex metacharacters escaped, which is why panels use variables in their
regex form (``"device" =~ /^$device$/``). :func:`interpolate` does the same, so the tests (and
the HTML report) run exactly the queries a dashboard would.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

_VARIABLE: Final = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_REGEX_SPECIAL: Final = re.compile(r"[\\^$*+?.()|\[\]{}/]")


def format_interval(seconds: float) -> str:
    """A group-by interval as Grafana writes it: ``2s``, ``1m``, ``500ms``."""
    ms = round(seconds * 1000)
    if ms % 60_000 == 0:
        return f"{ms // 60_000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


def regex_value(values: Sequence[str]) -> str:
    """A multi-value variable as Grafana's InfluxDB datasource writes it: ``(a|b)``, escaped."""
    escaped = [_REGEX_SPECIAL.sub(lambda m: "\\" + m.group(0), v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def interpolate(
    query: str,
    variables: Mapping[str, str | Sequence[str]],
    *,
    start_ms: int,
    end_ms: int,
    interval_s: float,
) -> str:
    """The query Grafana would send for this time range, interval and variable values.

    ``variables`` maps a name to one value (substituted as is) or to a list of values
    (multi-value or "All": substituted in regex form). An unknown ``$name`` raises KeyError,
    so a typo in a dashboard fails its test instead of reaching InfluxDB.
    """
    builtins = {
        "timeFilter": f"time >= {start_ms}ms and time <= {end_ms}ms",
        "__timeFilter": f"time >= {start_ms}ms and time <= {end_ms}ms",
        "__interval": format_interval(interval_s),
        "interval": format_interval(interval_s),
        "__interval_ms": str(round(interval_s * 1000)),
        "__from": str(start_ms),
        "__to": str(end_ms),
    }

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group is not None)
        if name in builtins:
            return builtins[name]
        if name not in variables:
            msg = f"query uses ${name}, which is neither a Grafana macro nor a given variable"
            raise KeyError(msg)
        value = variables[name]
        return value if isinstance(value, str) else regex_value(value)

    return _VARIABLE.sub(replace, query)
