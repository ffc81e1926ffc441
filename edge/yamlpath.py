"""Load YAML and validate it with pydantic, reporting errors by YAML path and line.

``sources[2].registers[0].type (line 41): Input should be 'ABCD', ...`` is what
an engineer needs to fix a site file; pydantic's own locations carry union tags
and no line numbers, so they are translated here against the parsed document.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from edge.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

M = TypeVar("M", bound=BaseModel)

Problem = tuple[str, int | None, str]


def _line_index(node: yaml.Node, path: str, lines: dict[str, int]) -> None:
    """Record the 1-based line of every mapping key and sequence item below ``node``."""
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            lines[child] = key_node.start_mark.line + 1
            _line_index(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = f"{path}[{i}]"
            lines[child] = item.start_mark.line + 1
            _line_index(item, child, lines)


def _duplicate_keys(node: yaml.Node, path: str, problems: list[Problem]) -> None:
    """YAML silently keeps the last of two equal keys; a site file must not."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append((child, line, f"duplicate key (first on line {seen[key]})"))
            seen.setdefault(key, line)
            _duplicate_keys(value_node, child, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, f"{path}[{i}]", problems)


def yaml_path(data: Any, loc: tuple[int | str, ...]) -> str:
    """Turn a pydantic error location into a YAML path, dropping union tags."""
    parts: list[str] = []
    current = data
    for element in loc:
        if isinstance(current, dict) and element in current:
            parts.append(f".{element}" if parts else str(element))
            current = current[element]
        elif isinstance(current, list) and isinstance(element, int) and element < len(current):
            parts.append(f"[{element}]")
            current = current[element]
        elif isinstance(current, dict) and element == current.get("type"):
            continue  # a discriminated-union tag pydantic inserted; it is not in the file
        else:
            # A missing field, or an extra one the model forbids: name it.
            parts.append(f".{element}" if parts else str(element))
            current = None
    return "".join(parts) or "(top level)"


def load_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """Parse a YAML file; returns the data and a map from YAML path to line."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [("(file)", None, exc.strerror or str(exc))]) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [("(syntax)", line, f"not valid YAML: {reason}")]) from exc
    lines: dict[str, int] = {}
    problems: list[Problem] = []
    if node is not None:
        _line_index(node, "", lines)
        _duplicate_keys(node, "", problems)
    if problems:
        raise ConfigError(source, problems)
    return data, lines


def validate(model: type[M], data: Any, lines: dict[str, int], source: str) -> M:
    """Validate parsed YAML against a model; raise ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(source, [("(top level)", 1, "expected a mapping of settings")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems: list[Problem] = []
        for err in exc.errors(include_url=False):
            where = yaml_path(data, tuple(err["loc"]))
            line = lines.get(where)
            probe = where
            while line is None and ("." in probe or "[" in probe):
                probe = probe[: max(probe.rfind("."), probe.rfind("["))]
                line = lines.get(probe)
            reason = err["msg"]
            if err["type"] == "extra_forbidden":
                reason = "unknown setting (check the spelling; see the sample site file)"
            problems.append((where, line, reason))
        raise ConfigError(source, problems) from exc


def load_model(model: type[M], path: Path) -> M:
    """Load and validate a YAML file into ``model``."""
    data, lines = load_yaml(path)
    return validate(model, data, lines, str(path))
