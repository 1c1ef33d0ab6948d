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

from mirotrain.commands.errors import reports_user_errors
from mirotrain.commands.recipe import config_parser, run_recipe


def build_parser(prog: str = "mirotrain dpo") -> argparse.ArgumentParser:
    p = config_parser(prog, __doc__)
    p.add_argument("--precompute-only", action="store_true",
                   help="compute and cache the reference log-probs, then exit without training")
    return p


@reports_user_errors("mirotrain dpo")
def main(argv: list[str]) -> int:
    from mirotrain.training.dpo import run_dpo

    args = build_parser().parse_args(argv)
    return run_recipe(args, lambda cfg: run_dpo(cfg, precompute_only=args.precompute_only))
