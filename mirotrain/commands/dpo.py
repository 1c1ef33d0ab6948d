"""`mirotrain dpo --config X [key=value ...] [--precompute-only]`: direct preference optimisation.

    torchrun --nproc_per_node 8 -m mirotrain dpo --config mirotrain/configs/qwen3/8B_full_dpo.yaml
    mirotrain dpo --config mirotrain/configs/tiny/dpo.yaml                 # one process, CPU
    mirotrain dpo --config X --precompute-only                             # only the reference pass

With ``reference: precompute`` (default) the reference log-probs of every pair are computed once and cached
beside the packed shards (``--precompute-only`` does just that and exits; training reuses the cache). A
restart with the same command resumes from the newest complete step checkpoint when ``auto_resume: True``.
Exit codes: 0 done, 1 failed, 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import sys


def build_parser(prog: str = "mirotrain dpo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("--precompute-only", action="store_true",
                   help="compute and cache the reference log-probs, then exit without training")
    p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys, YAML values; ~key deletes)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from mirotrain.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"mirotrain dpo: {exc}", file=sys.stderr, flush=True)
        return 2
    from mirotrain.training.distributed import destroy_distributed
    from mirotrain.training.dpo import run_dpo

    try:
        run_dpo(cfg, precompute_only=args.precompute_only)
    except ConfigError as exc:
        print(f"mirotrain dpo: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy_distributed()
    return 0
