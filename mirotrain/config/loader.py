"""YAML configs with ``${key.path}`` interpolation and ``a.b=value`` command-line overrides.

Configs stay plain nested dicts/lists so every part of the engine can read them without a config
library; errors name the file and the dotted key path so a user can find the line to fix.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from mirotrain.config.compat import translate_and_report

_INTERP = re.compile(r"\$\{([^{}]+)\}")


class ConfigError(ValueError):
    """A problem with a config, naming the key path (``dataset.packed_seq_len``) it comes from."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key, self.detail, self.source = key, message, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config key '{key}': {message}" if key else f"{where}{message}")

    def __reduce__(self) -> tuple:
        # rebuilt from its parts when it crosses a process boundary (a rank's broadcast, a worker's result)
        return (type(self), (self.key, self.detail, self.source))

    def in_file(self, source: str) -> "ConfigError":
        """The same problem, naming the config file it was found in."""
        return ConfigError(self.key, self.detail, source=source)


def parse_value(text: str) -> Any:
    """Parse an override value with YAML scalar rules (``1e-5`` -> float, ``null`` -> None, ``[1,2]``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value):
        return float(value)  # YAML 1.1 reads "1e-5" as a string; users mean a number
    return value


def _fix_scientific(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_scientific(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_scientific(v) for v in node]
    if isinstance(node, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", node):
        return float(node)
    return node


def get_path(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(dotted)
    return node


def set_path(cfg: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"cannot set '{dotted}': this key holds a {type(child).__name__}, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (``~a.b`` deletes a key)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if item.startswith("~"):
            parts = item[1:].split(".")
            try:
                parent = get_path(cfg, ".".join(parts[:-1])) if len(parts) > 1 else cfg
                del parent[parts[-1]]
            except (KeyError, TypeError):
                raise ConfigError(item[1:], "cannot delete: no such key") from None
            continue
        if "=" not in item:
            raise ConfigError("", f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(key, f"override {item!r} has an empty key part")
        set_path(cfg, key.strip(), parse_value(text))
    return cfg


def resolve_interpolations(cfg: dict) -> dict:
    """Replace ``${a.b}`` (another key) and ``${env:NAME[,default]}`` everywhere.

    A string that is exactly one interpolation keeps the referenced value's type; otherwise the
    value is substituted as text. Cycles are reported with the chain of keys.
    """

    def lookup(ref: str, key: str, stack: tuple[str, ...]) -> Any:
        ref = ref.strip()
        if ref.startswith(("env:", "oc.env:")):
            name, _, default = ref.split(":", 1)[1].partition(",")
            value = os.environ.get(name.strip())
            if value is None:
                if not default:
                    raise ConfigError(key, f"environment variable {name.strip()!r} is not set")
                return parse_value(default.strip())
            return value
        if ref in stack:
            raise ConfigError(key, "interpolation cycle: " + " -> ".join(stack + (ref,)))
        try:
            target = get_path(cfg, ref)
        except KeyError:
            raise ConfigError(key, f"interpolation ${{{ref}}} refers to a missing key") from None
        return resolve(target, ref, stack + (ref,))

    def resolve(node: Any, key: str, stack: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: resolve(v, f"{key}.{k}" if key else str(k), stack) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, f"{key}.{i}", stack) for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            whole = _INTERP.fullmatch(node)
            if whole:
                return lookup(whole.group(1), key, stack)
            return _INTERP.sub(lambda m: str(lookup(m.group(1), key, stack)), node)
        return node

    return resolve(cfg, "", ())


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Read a YAML config, apply overrides, resolve interpolations and translate the MiroTrain keys that work
    differently here (:mod:`mirotrain.config.compat`, one warning each). Returns plain dicts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        if context is not None and (mark is None or context.line != mark.line):
            where += f" ({getattr(exc, 'context', 'started')} at line {context.line + 1})"
        raise ConfigError("", f"invalid YAML{where}: {getattr(exc, 'problem', exc)}", source=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError("", "the top level must be a mapping of keys to values", source=str(path))
    cfg = apply_overrides(_fix_scientific(raw), list(overrides))
    try:
        resolved = resolve_interpolations(cfg)
    except ConfigError as exc:
        raise exc.in_file(str(path)) from None
    return translate_and_report(resolved, str(path))
