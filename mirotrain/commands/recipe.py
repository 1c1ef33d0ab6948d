"""What `mirotrain sft` and `mirotrain dpo` share: the `--config X [key=value ...]` parser and the run wrapper.

Both load the config, run the recipe under the (possibly torchrun-launched) process group, report config
errors and a refused run lock (another training owns the output_dir) as exit code 2 with the command's name,
and always tear the process group down.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable


def config_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """``--config`` plus positional ``key=value`` overrides; add recipe flags to the returned parser."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys, YAML values; ~key deletes)")
    return p


def run_recipe(prog: str, args: argparse.Namespace, run: Callable[[dict], Any]) -> int:
    """Load ``args.config`` with ``args.overrides`` and call ``run(cfg)``; 2 on a config error or a locked
    output_dir, else 0."""
    from mirotrain.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        return 2
    from mirotrain.training.distributed import destroy_distributed
    from mirotrain.training.run_lock import RunLockedError

    try:
        run(cfg)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        return 2
    except RunLockedError as exc:
        if os.environ.get("RANK", "0") == "0":  # every rank stops; global rank 0 says why, once
            print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy_distributed()
    return 0
