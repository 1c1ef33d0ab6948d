"""Typed validation of a resolved config: every problem reported with its key path, before any work.

Checks: unknown keys (with the closest valid name), types, component names and their arguments (against
the component's signature), files that must exist, mutually exclusive options, and the parallel layout.
"""

from __future__ import annotations

import difflib
import inspect
import os
from typing import Any

from mirotrain.config.loader import ConfigError
from mirotrain.config.registry import resolve_component
from mirotrain.config.schema import KEYS

# keys of a component section that the engine consumes itself (not passed to the component)
ENGINE_SECTION_KEYS: dict[str, set[str]] = {
    "dataset": {"packed", "packed_seq_len", "streaming_pack", "output_dir", "num_workers", "on_bad_sample",
                "max_seq_len", "pack_workers"},
    "dataset_val": {"packed", "packed_seq_len", "streaming_pack", "output_dir", "num_workers", "on_bad_sample",
                    "max_seq_len", "pack_workers"},
    "optimizer": {"params"},
    "lr_scheduler": {"optimizer", "num_training_steps", "last_epoch"},
    "model": set(),
}
PATH_KEYS = ("tokenizer.path", "checkpointer.checkpoint_dir", "ref_checkpointer.checkpoint_dir")


def _type_names(types: tuple[type, ...]) -> str:
    names = ["null" if t is type(None) else {"dict": "mapping", "str": "string"}.get(t.__name__, t.__name__) for t in types]
    return " or ".join(names)


def _check_type(key: str, value: Any, types: tuple[type, ...]) -> ConfigError | None:
    if isinstance(value, bool) and bool not in types:
        return ConfigError(key, f"expected {_type_names(types)}, got a boolean ({value})")
    if float in types and isinstance(value, int):
        return None
    if not isinstance(value, types):
        return ConfigError(key, f"expected {_type_names(types)}, got {type(value).__name__} ({value!r})")
    return None


def _unknown(key: str, name: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(key, f"unknown key{hint}")


def _check_component(section: str, node: dict) -> list[ConfigError]:
    if "_component_" not in node:
        return [ConfigError(f"{section}._component_", "missing: this section must name a _component_")]
    try:
        target = resolve_component(node["_component_"])
    except ValueError as exc:
        return [ConfigError(f"{section}._component_", str(exc))]
    except ImportError as exc:
        return [ConfigError(f"{section}._component_", f"cannot import {node['_component_']}: {exc}")]
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    allowed = set(params) | ENGINE_SECTION_KEYS.get(section, set())
    errors = []
    for name in node:
        if name != "_component_" and name not in allowed:
            errors.append(_unknown(f"{section}.{name}", name, sorted(allowed)))
    return errors


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _check_paths(cfg: dict) -> list[ConfigError]:
    errors = []
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = (cfg.get(section) or {}).get(key)
        if isinstance(value, str) and _is_local(value) and not os.path.exists(value.removeprefix("file://")):
            errors.append(ConfigError(dotted, f"path does not exist: {value}"))
    dataset = cfg.get("dataset") or {}
    files = dataset.get("data_files")
    for f in [files] if isinstance(files, str) else (files or []) if isinstance(files, list) else []:
        if isinstance(f, str) and _is_local(f) and not any(c in f for c in "*?[") and not os.path.exists(f.removeprefix("file://")):
            errors.append(ConfigError("dataset.data_files", f"file does not exist: {f}"))
    return errors


def _check_rules(cfg: dict, world_size: int) -> list[ConfigError]:
    errors = []
    dataset = cfg.get("dataset") or {}
    packed, streaming = bool(dataset.get("packed")), bool(dataset.get("streaming_pack"))
    if packed and streaming:
        errors.append(ConfigError("dataset.streaming_pack", "dataset.packed and dataset.streaming_pack are mutually exclusive; set one of them to False"))
    if (packed or streaming) and cfg.get("batch_size", 1) != 1:
        errors.append(ConfigError("batch_size", f"must be 1 with packed/streaming_pack data (a packed row is the batch), got {cfg.get('batch_size')}"))
    seq = (cfg.get("tokenizer") or {}).get("max_seq_len")
    packed_len = dataset.get("packed_seq_len")
    if (packed or streaming) and packed_len is None:
        errors.append(ConfigError("dataset.packed_seq_len", "required with packed/streaming_pack data"))
    if isinstance(seq, int) and isinstance(packed_len, int) and packed_len < seq:
        errors.append(ConfigError("dataset.packed_seq_len", f"({packed_len}) must be >= tokenizer.max_seq_len ({seq})"))
    if cfg.get("dtype") == "fp16":
        errors.append(ConfigError("dtype", "fp16 is not supported; use bf16 (or fp32 on CPU)"))
    sp = cfg.get("ulysses_sequence_parallel_size", 1)
    ep = cfg.get("moe_expert_parallel_size", 1)
    if isinstance(sp, int) and (sp < 1 or world_size % sp):
        errors.append(ConfigError("ulysses_sequence_parallel_size", f"({sp}) must divide the world size ({world_size})"))
    if isinstance(ep, int) and (ep < 1 or world_size % ep):
        errors.append(ConfigError("moe_expert_parallel_size", f"({ep}) must divide the world size ({world_size})"))
    if cfg.get("enable_activation_offloading") and not cfg.get("enable_activation_checkpointing", True):
        errors.append(ConfigError("enable_activation_offloading", "requires enable_activation_checkpointing: True"))
    for key in ("gradient_accumulation_steps", "epochs", "log_every_n_steps", "checkpoint_steps_for_auto_resume", "keep_last_n_checkpoints"):
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            errors.append(ConfigError(key, f"must be >= 1, got {value}"))
    return errors


def validate_config(cfg: dict, world_size: int = 1, check_files: bool = True) -> list[ConfigError]:
    """All problems found in ``cfg`` (empty list = valid)."""
    errors: list[ConfigError] = []
    for key, value in cfg.items():
        spec = KEYS.get(key)
        if spec is None:
            errors.append(_unknown(key, key, sorted(KEYS)))
            continue
        err = _check_type(key, value, spec.types)
        if err:
            errors.append(err)
            continue
        if spec.only is not None and value not in spec.only:
            errors.append(ConfigError(key, f"value {value!r} is not supported: {spec.doc}"))
        if isinstance(value, dict) and "_component_" in value:
            errors.extend(_check_component(key, value))
    if "output_dir" not in cfg:
        errors.append(ConfigError("output_dir", "missing: where should checkpoints and outputs go?"))
    for section in ("model", "tokenizer", "optimizer"):
        if section not in cfg:
            errors.append(ConfigError(section, "missing required section"))
    if check_files:
        errors.extend(_check_paths(cfg))
    errors.extend(_check_rules(cfg, world_size))
    return errors


def raise_if_invalid(cfg: dict, world_size: int = 1, check_files: bool = True) -> None:
    errors = validate_config(cfg, world_size, check_files)
    if errors:
        raise ConfigError("", "invalid config:\n  " + "\n  ".join(str(e) for e in errors))
