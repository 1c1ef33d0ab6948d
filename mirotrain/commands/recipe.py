"""What `mirotrain sft` and `mirotrain dpo` share: the `--config X [key=value ...]` parser and the run wrapper.

Both load the config and run the same checks as `mirotrain validate` (with the launch's world size) before the
recipe starts, then run it under the (possibly torchrun-launched) process group and always tear the group
down. Config, data and run-lock errors reach the user through ``commands.errors``: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any, Callable

from mirotrain.commands.errors import add_debug_flag

if TYPE_CHECKING:
    from mirotrain.config.tree import TrainConfig


def config_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """``--config`` plus positional ``key=value`` overrides; add recipe flags to the returned parser."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys, YAML values; ~key deletes)")
    return add_debug_flag(p)


def check_machine(cfg: TrainConfig) -> None:
    """Refuse ``device: cuda`` where no CUDA device is visible, naming the key (validate may run anywhere)."""
    from mirotrain.config import ConfigError

    if cfg.run.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device", "cuda, but this machine has no CUDA device; set device=cpu to train on CPU")


def run_recipe(args: argparse.Namespace, run: Callable[[TrainConfig], Any]) -> int:
    """Load ``args.config`` with ``args.overrides``, check it, and call ``run(cfg)``; 0 when it returns. The
    CUDA allocator gets expandable segments first, unless the environment configures it (``cuda_alloc.py``)."""
    from mirotrain.commands.cuda_alloc import alloc_conf_default

    alloc_conf_default()
    from mirotrain.config.tree import read_config

    cfg = read_config(args.config, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    check_machine(cfg)
    from mirotrain.training.distributed import destroy_distributed

    try:
        run(cfg)
    finally:
        destroy_distributed()
    return 0
