"""Typed validation of a resolved config: every problem reported with its key path, before any work.

This module holds the config rules; `validate`, `pack`, `sft`, `dpo` and the pipeline's validate task all run
them before they touch data or weights. Checks: unknown keys at every depth (with the closest valid name),
types and ranges (``schema.KEYS``, ``schema.SECTION_KEYS``, else the component's signature), component names,
files that must exist, mutually exclusive options, and the parallel layout.
"""

from __future__ import annotations

import difflib
import inspect
import os
import types
import typing
from collections.abc import Collection
from typing import Any, Callable

from mirotrain.config.loader import ConfigError
from mirotrain.config.registry import DEFAULT_COMPONENTS, resolve_component
from mirotrain.config.schema import (KEYS, LOCAL_FORMATS, SECTION_KEYS, DatasetConfig, Key, ModelConfig,
                                     OptimConfig, ParallelConfig, RunConfig, flat_name, key_fields)

# keys of a component section that the engine fills in itself (a config may still name them)
INJECTED_KEYS: dict[str, set[str]] = {
    "optimizer": {"params"},
    "lr_scheduler": {"optimizer", "num_training_steps", "last_epoch"},
}
PATH_KEYS = ("tokenizer.path", "checkpointer.checkpoint_dir", "ref_checkpointer.checkpoint_dir")
REQUIRED = ("output_dir", "model", "tokenizer", "optimizer")
DATA_SECTIONS = ("dataset", "dataset_val")
_PLAIN = (bool, int, float, str, dict, list)
# sections whose component takes **kwargs only to accept old keys (listed in SECTION_KEYS): any other key is refused
CLOSED_SECTIONS = ("tokenizer",)


def _type_names(types_: tuple[type, ...]) -> str:
    names = ["null" if t is type(None) else {"dict": "mapping", "str": "string"}.get(t.__name__, t.__name__) for t in types_]
    return " or ".join(names)


def _check_type(key: str, value: Any, types_: tuple[type, ...]) -> ConfigError | None:
    if isinstance(value, bool) and bool not in types_:
        return ConfigError(key, f"expected {_type_names(types_)}, got a boolean ({value})")
    if float in types_ and isinstance(value, int):
        return None
    if not isinstance(value, types_):
        return ConfigError(key, f"expected {_type_names(types_)}, got {type(value).__name__} ({value!r})")
    return None


def _check_range(key: str, value: Any, spec: Key) -> ConfigError | None:
    if spec.choices is not None and value not in spec.choices:
        shown = ", ".join("null" if c is None else str(c) for c in spec.choices)
        return ConfigError(key, f"must be one of {shown}, got {value!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low):
        return ConfigError(key, f"must be {'>' if spec.low_open else '>='} {spec.low:g}, got {value}")
    if spec.high is not None and value > spec.high:
        return ConfigError(key, f"must be <= {spec.high:g}, got {value}")
    return None


def check_value(key: str, value: Any, spec: Key) -> list[ConfigError]:
    """Type, then range and allowed values, of one key."""
    err = _check_type(key, value, spec.types)
    if err is None and spec.only is not None and value not in spec.only:
        err = ConfigError(key, f"value {value!r} is not supported: {spec.doc}")
    if err is None:
        err = _check_range(key, value, spec)
    return [err] if err else []


def unknown_key(key: str, name: str, valid: Collection[str]) -> ConfigError:
    close = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(key, f"unknown key{hint}")


def _plain_types(annotation: Any) -> tuple[type, ...] | None:
    """The YAML types an annotation admits, or None when it is not made of plain types only (then unchecked)."""
    if annotation is type(None):
        return (type(None),)
    if annotation in _PLAIN:
        return (annotation,)
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return (list,)  # YAML sequences are lists
    if origin is dict:
        return (dict,)
    if origin in (typing.Union, types.UnionType):
        parts = [_plain_types(a) for a in typing.get_args(annotation)]
        return None if any(p is None for p in parts) else tuple(t for p in parts for t in p)  # type: ignore[union-attr]
    return None


def _signature(target: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    """A component's parameters and its resolvable type hints ({} when they cannot be resolved)."""
    params = dict(inspect.signature(target).parameters)
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # noqa: BLE001 - hints naming imports hidden behind TYPE_CHECKING: leave the arguments untyped
        hints = {}
    return params, hints


def _hub_dataset_keys() -> set[str] | None:
    """The keyword arguments of ``datasets.load_dataset`` (None when the library is not installed: unchecked)."""
    try:
        from datasets import load_dataset
    except ImportError:
        return None
    return set(inspect.signature(load_dataset).parameters) - {"path", "data_files", "split"}


def _check_keys(section: str, node: dict, keys: dict[str, Key]) -> list[ConfigError]:
    """A section without a component: only the engine's own keys."""
    errors = []
    for name, value in node.items():
        spec = keys.get(name)
        errors.extend(check_value(f"{section}.{name}", value, spec) if spec else [unknown_key(f"{section}.{name}", name, keys)])
    return errors


def _check_component(section: str, node: dict, where: str | None = None) -> list[ConfigError]:
    """The keys of one component node of ``section``; errors name ``where`` (``dataset.1`` for a list's part)."""
    where = where or section
    if "_component_" not in node and section in DEFAULT_COMPONENTS:
        node = {"_component_": DEFAULT_COMPONENTS[section], **node}
    if "_component_" not in node:
        if section in DATA_SECTIONS and "shard_dir" in node:  # read existing shards: nothing to build
            return _check_keys(where, node, SECTION_KEYS[section])
        return [ConfigError(f"{where}._component_", "missing: this section must name a _component_"
                            + (" (or shard_dir: an existing shard directory)" if section in DATA_SECTIONS else ""))]
    try:
        target = resolve_component(node["_component_"])
    except ValueError as exc:
        return [ConfigError(f"{where}._component_", str(exc))]
    except ImportError as exc:
        return [ConfigError(f"{where}._component_", f"cannot import {node['_component_']}: {exc}")]
    try:
        params, hints = _signature(target)
    except (TypeError, ValueError):
        return []
    own = SECTION_KEYS.get(section, {})
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and section not in CLOSED_SECTIONS
    if takes_any and section in DATA_SECTIONS:
        # the dataset builders forward leftover keys to datasets.load_dataset for Hub sources only
        hub_keys = set() if _source(node) in LOCAL_FORMATS else _hub_dataset_keys()
        extra = {"field"} | (hub_keys or set())
        takes_any = hub_keys is None
    else:
        extra = set()
    allowed = set(params) | set(own) | INJECTED_KEYS.get(section, set()) | extra
    errors = []
    for name, value in node.items():
        key = f"{where}.{name}"
        if name == "_component_":
            continue
        if name in own:
            errors.extend(check_value(key, value, own[name]))
        elif name in params:
            kinds = _plain_types(hints.get(name, Any))
            if kinds is not None:
                errors.extend(check_value(key, value, Key(kinds)))
        elif not takes_any and name not in allowed:
            errors.append(unknown_key(key, name, allowed))
    return errors


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _check_paths(cfg: dict, scope: Collection[str]) -> list[ConfigError]:
    errors = []
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = (cfg.get(section) or {}).get(key) if section in scope else None
        if isinstance(value, str) and _is_local(value) and not os.path.exists(value.removeprefix("file://")):
            errors.append(ConfigError(dotted, f"path does not exist: {value}"))
    for section in DATA_SECTIONS:
        for where, node in _builders(section, cfg.get(section)) if section in scope else ():
            files = node.get("data_files")
            for f in [files] if isinstance(files, str) else (files or []) if isinstance(files, list) else []:
                if isinstance(f, str) and _is_local(f) and not any(c in f for c in "*?[") and not os.path.exists(f.removeprefix("file://")):
                    errors.append(ConfigError(f"{where}.data_files", f"file does not exist: {f}"))
    return errors


def _builders(section: str, value: Any) -> list[tuple[str, dict]]:
    """The builder nodes of a dataset section with the key path naming each (``dataset``, or ``dataset.1`` for
    the parts of a list); nodes that are not mappings are left to the type check."""
    if isinstance(value, dict):
        return [(section, value)]
    if isinstance(value, list):
        return [(f"{section}.{i}", part) for i, part in enumerate(value) if isinstance(part, dict)]
    return []


def _check_dataset_list(section: str, parts: list) -> list[ConfigError]:
    """A dataset list: each part is a builder node, checked as a dataset section."""
    if not parts:
        return [ConfigError(section, "an empty list names no dataset")]
    errors = []
    for i, part in enumerate(parts):
        if isinstance(part, dict):
            errors.extend(_check_component(section, part, f"{section}.{i}"))
        else:
            errors.append(ConfigError(f"{section}.{i}", f"expected a mapping (a dataset builder), got {part!r}"))
    return errors


def _source(node: dict) -> str | None:
    """A dataset section's ``source``: its own, else its builder's default (None without a builder)."""
    if "source" in node or "_component_" not in node:
        return node.get("source")
    try:
        default = inspect.signature(resolve_component(node["_component_"])).parameters.get("source")
    except (ValueError, ImportError, TypeError):
        return None
    return None if default is None or default.default is inspect.Parameter.empty else default.default


def is_preference_builder(node: dict) -> bool:
    """Whether a dataset builder node makes DPO pairs (``preference_dataset``)."""
    try:
        return resolve_component(node.get("_component_", "")).__name__ == "preference_dataset"
    except (ValueError, ImportError):
        return False


def _invalid_keys(errors: list[ConfigError]) -> set[str]:
    return {e.key.split(".")[0] for e in errors}


def _check_sections(cfg: dict, world_size: int, scope: Collection[str] | None, bad: set[str]) -> list[ConfigError]:
    """The rules each section owns (schema: ``check``), run on sections whose keys passed the type checks."""
    errors: list[ConfigError] = []
    for name in DATA_SECTIONS:
        node = cfg.get(name)
        batch_key = "batch_size" if name == "dataset" else "batch_size_val"
        if (scope is None or name in scope) and isinstance(node, (dict, list)) and not {name, batch_key, "tokenizer"} & bad:
            section = DatasetConfig.from_node(node)
            errors.extend(section.check(
                name, batch_size=cfg.get(batch_key), batch_key=batch_key,
                max_seq_len=(cfg.get("tokenizer") or {}).get("max_seq_len"),
                kinds=[(_source(b), is_preference_builder(b)) for b in section.builders]))
    if scope is not None:
        return errors
    master_weights = cfg.get("master_weights", "fp32")
    device = cfg.get("device", RunConfig.device)
    for section_cls, extra in ((ParallelConfig, (world_size,)), (ModelConfig, (device,)),
                               (RunConfig, (cfg.get("fsdp_cpu_offload") is True,)),
                               (OptimConfig, (master_weights,))):
        names = {flat_name(f) for f in key_fields(section_cls)}
        if not names & bad:
            own = {f.name: cfg[flat_name(f)] for f in key_fields(section_cls) if flat_name(f) in cfg}
            errors.extend(section_cls(**own).check(*extra))
    return errors


def validate_config(cfg: dict, world_size: int = 1, check_files: bool = True,
                    scope: Collection[str] | None = None) -> list[ConfigError]:
    """All problems found in ``cfg`` (empty list = valid).

    ``scope`` limits the check to the top-level keys a command reads (`mirotrain pack` reads only
    ``tokenizer`` and the section it packs); those sections are then the required ones, and unknown top-level
    keys are still refused. None checks everything.
    """
    errors: list[ConfigError] = []
    for key, value in cfg.items():
        spec = KEYS.get(key)
        if spec is None:  # refused in any scope: every command reads the same config
            errors.append(unknown_key(key, key, KEYS))
            continue
        if scope is not None and key not in scope:
            continue
        found = check_value(key, value, spec)
        errors.extend(found)
        if not found and isinstance(value, dict) and (key in SECTION_KEYS or "_component_" in value):
            errors.extend(_check_component(key, value))
        elif not found and isinstance(value, list) and key in DATA_SECTIONS:
            errors.extend(_check_dataset_list(key, value))
    for key in REQUIRED if scope is None else scope:
        if key not in cfg:
            errors.append(ConfigError(key, "missing: where should checkpoints and outputs go?" if key == "output_dir"
                                      else "missing required section"))
    if check_files:
        errors.extend(_check_paths(cfg, KEYS if scope is None else scope))
    errors.extend(_check_sections(cfg, world_size, scope, _invalid_keys(errors)))
    return errors


class InvalidConfig(ConfigError):
    """Several config problems at once; ``errors`` holds one ConfigError per key."""

    def __init__(self, errors: list[ConfigError], source: str | None = None):
        self.errors = [e.in_file(source) for e in errors] if source else errors
        super().__init__("", "\n".join(str(e) for e in self.errors))

    def __reduce__(self) -> tuple:
        return (type(self), (self.errors,))


def raise_if_invalid(cfg: dict, world_size: int = 1, check_files: bool = True,
                     scope: Collection[str] | None = None, source: str | None = None) -> None:
    """Raise :class:`InvalidConfig` listing every problem :func:`validate_config` finds (``source``: the file)."""
    errors = validate_config(cfg, world_size, check_files, scope)
    if errors:
        raise InvalidConfig(errors, source)
