"""The typed config: a tree of sections (:mod:`mirotrain.config.schema`) made once from a resolved config file.

    raw = load_config("sft.yaml", ["optimizer.lr=2e-5"])      # YAML, aliases, ${...}, overrides -> plain dict
    cfg = parse_config(raw, world_size=8, source="sft.yaml")  # every check, then the tree; or InvalidConfig
    cfg.optim.gradient_accumulation_steps, cfg.data.dataset.packed_seq_len, cfg.model.component

`validate`, `pack`, `sft`, `dpo` and the pipeline's validate task all go through :func:`parse_config`, so one
parse-and-check decides what a config means. ``to_dict`` gives back the flat form with the keys the file wrote
(plus any changed since), which is what the resume hash of a step checkpoint is computed over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from mirotrain.config.schema import (DataConfig, DatasetConfig, FLAT_KEYS, KEYS, SECTIONS, CheckpointConfig,
                                     DPOConfig, MetricsConfig, ModelConfig, OptimConfig, ParallelConfig, RunConfig,
                                     TokenizerConfig, flat_name, key_fields)
from mirotrain.config.compat import translate_and_report
from mirotrain.config.loader import load_config
from mirotrain.config.validation import raise_if_invalid

DATA_SECTIONS = ("dataset", "dataset_val")


@dataclass(frozen=True)
class TrainConfig:
    """One run's whole config, by section (see each section's docstring for its keys)."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # flat keys the file wrote: ``to_dict`` keeps exactly these (and any changed from their default)
    written: frozenset[str] = field(default=frozenset(), repr=False)

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        """The tree of an already checked flat config (no checks: use :func:`parse_config` for user input)."""
        values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for flat, value in raw.items():
            if flat not in FLAT_KEYS:
                raise KeyError(f"{flat!r} is not a config key (check configs with parse_config)")
            section, name, _ = FLAT_KEYS[flat]
            if flat in DATA_SECTIONS and value is not None:
                value = DatasetConfig.from_node(value)
            values[section][name] = value
        sections = {name: SECTIONS[name](**kwargs) for name, kwargs in values.items()}
        return cls(**sections, written=frozenset(raw))

    def to_dict(self) -> dict:
        """The flat config: the keys the file wrote plus those that differ from their default."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            node = getattr(self, name)
            for f in key_fields(type(node)):
                flat, value = flat_name(f), getattr(node, f.name)
                if isinstance(value, DatasetConfig):
                    value = _dataset_dict(value)
                if flat in self.written or value != KEYS[flat].default:
                    out[flat] = value
        return out


def _dataset_dict(ds: DatasetConfig) -> dict | list:
    """The section as written, with any engine key that was changed on the tree (on every part of a list)."""
    options = ds.engine_options()
    if not ds.parts:
        return {**ds.node, **options}
    written = DatasetConfig.from_node(list(ds.parts)).node  # the engine keys as the parts wrote them
    changed = {k: v for k, v in options.items() if k not in written or written[k] != v}
    return [{**part, **changed} for part in ds.parts]


def replace_section(cfg: TrainConfig, section: str, **changes: Any) -> TrainConfig:
    """``cfg`` with some keys of one section changed (the tree is immutable: nothing edits a config in place)."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def parse_config(raw: dict, *, world_size: int = 1, check_files: bool = True, scope: Collection[str] | None = None,
                 source: str | None = None) -> TrainConfig:
    """Translate MiroTrain keys that work differently (:mod:`mirotrain.config.compat`), check ``raw`` (every
    problem at once, as :class:`~mirotrain.config.validation.InvalidConfig` naming ``source``), then build its tree. ``scope`` limits the checks to the top-level keys a command reads."""
    raw = translate_and_report(raw, source)
    raise_if_invalid(raw, world_size=world_size, check_files=check_files, scope=scope, source=source)
    return TrainConfig.from_dict(raw)


def read_config(path: str, overrides: Sequence[str] = (), *, world_size: int = 1, check_files: bool = True,
                scope: Collection[str] | None = None) -> TrainConfig:
    """Load a config file with its ``key=value`` overrides, check it and build its tree: what every command
    and task runs first."""
    return parse_config(load_config(path, list(overrides)), world_size=world_size, check_files=check_files,
                        scope=scope, source=str(path))
