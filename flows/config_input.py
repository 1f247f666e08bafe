"""What a user writes, before it is validated: a YAML file and `--set KEY=VALUE` overrides read into plain
data, and ConfigError, the one-line error that names the file, key or value to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config the user must fix; the message names the key, the value and what is allowed."""


def read_yaml_file(path: Path, what: str, error: type[ConfigError] = ConfigError) -> Any:
    """The YAML document in `path` (None if empty); `error` naming the file (as `what`) if it is missing,
    a directory, unreadable or not valid YAML (with the line and column)."""
    if not path.is_file():
        problem = "is a directory, not a YAML file" if path.is_dir() else "does not exist"
        raise error(f"{what} {str(path)!r} {problem}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{what} {str(path)!r} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{what} {str(path)!r} cannot be read: {exc}") from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`training.epochs=5`, `methods=[sngp]`: the value is parsed as YAML (so 5 is an int)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.epochs=5")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value
