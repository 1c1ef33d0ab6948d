"""Task ``validate_config``: check a training config with its overrides before anything is downloaded or trained.

Runs the engine's own validation (:func:`mirotrain.config.validation.validate_config`, the checks behind
`mirotrain validate`: unknown keys with the closest valid name, types, component arguments, paths that must
exist, packing rules) and checks that every data file the dataset sections name exists (globs, lists and
fsspec URLs too; a Hub dataset must exist when the Hub can be asked). All problems are reported at once, one
line per key, as a :class:`mirotrain.config.ConfigError`, which is never retried (``tasks/_retry.py``).

Some paths do not exist yet when a flow starts: the model directory that download or the previous stage
will produce. Their keys are passed as ``pending_keys``: their existence is not required, everything else
about them still is.

    python -m tasks.validate_config --config mirotrain/configs/tiny/dpo.yaml --overrides optimizer.lr=1e-5
"""

from __future__ import annotations

import math
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks._retry import retry_unless_permanent
from tasks._runtime import run_logger

DATA_SECTIONS = ("dataset", "dataset_val")


class ValidationResult(BaseModel):
    """The config that was checked and the keys whose paths the flow produces later."""

    config: str
    overrides: list[str]
    pending_keys: list[str]
    world_size: int


def _data_problems(cfg: dict[str, Any], known: set[str]) -> list[Any]:
    """A ConfigError per data file or Hub dataset that does not exist (sections whose data files or component
    the engine's validation already reported are skipped)."""
    from mirotrain.config import ConfigError
    from mirotrain.hub import SourceNotFound, hub_revision
    from tasks._data_inputs import data_stamps, is_hub_dataset, section_source

    problems = []
    for name in DATA_SECTIONS:
        section = cfg.get(name)
        key = f"{name}.data_files"
        if not isinstance(section, dict) or "_component_" not in section or {key, f"{name}._component_"} & known:
            continue
        spec = section_source(section)
        try:
            if is_hub_dataset(spec):
                hub_revision(spec.source, spec.load_kwargs.get("revision"), repo_type="dataset")
            else:
                data_stamps(spec)
        except (FileNotFoundError, SourceNotFound) as exc:
            problems.append(ConfigError(key if spec.data_files else f"{name}.source", str(exc)))
    return problems


def _layout_world_size(cfg: dict[str, Any]) -> int:
    """The smallest world size the config's parallel layout allows (used when the launch does not fix one)."""
    sizes = [cfg.get(k, 1) for k in ("ulysses_sequence_parallel_size", "moe_expert_parallel_size")]
    return math.lcm(*[s for s in sizes if isinstance(s, int) and s > 0] or [1])


@task(name="validate_config", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent,
      cache_policy=NO_CACHE)
def validate_config(config: str, overrides: list[str] | None = None, pending_keys: list[str] | None = None,
                    world_size: int | None = None) -> ValidationResult:
    """Validate a training config with its overrides; raises a ConfigError naming every bad key.

    Args:
        config: Training config YAML.
        overrides: key=value config overrides, as on the `mirotrain` command line.
        pending_keys: Path keys produced later in the flow (e.g. the downloaded model directory): not required to exist yet.
        world_size: Number of training processes, if already known (checks the parallel layout against it).
    """
    from mirotrain.config import ConfigError, load_config
    from mirotrain.config.validation import validate_config as engine_validate

    logger = run_logger()
    overrides, pending = list(overrides or []), set(pending_keys or [])
    cfg = load_config(config, overrides)
    size = world_size or _layout_world_size(cfg)
    errors = []
    for err in engine_validate(cfg, size, check_files=True):
        if err.key in pending and "path does not exist" in str(err):
            logger.info(f"{err.key}: not there yet, produced earlier in this flow")
            continue
        errors.append(err)
    errors += _data_problems(cfg, {e.key for e in errors})
    if errors:
        logger.error(f"overrides of {config}: {overrides}")
        raise ConfigError("", f"{len(errors)} error(s) in {config} with its overrides:\n  " + "\n  ".join(map(str, errors)))
    logger.info(f"config valid: {config} ({len(overrides)} overrides, world size {size})")
    return ValidationResult(config=config, overrides=overrides, pending_keys=sorted(pending), world_size=size)


def main(argv: list[str] | None = None) -> int:
    from tasks._cli import run_task_cli

    return run_task_cli(validate_config, argv, module="validate_config")


if __name__ == "__main__":
    raise SystemExit(main())
