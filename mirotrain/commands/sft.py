"""`mirotrain sft --config X [key=value ...]`: supervised fine-tuning.

    torchrun --nproc_per_node 8 -m mirotrain sft --config mirotrain/configs/qwen3/8B_full_sft.yaml
    torchrun --nnodes $WORKER_NUM --node_rank $ROLE_INDEX --master_addr $WORKER_0_HOST \\
             --master_port $WORKER_0_PORT --nproc_per_node $WORKER_GPU -m mirotrain sft --config X
    mirotrain sft --config mirotrain/configs/tiny/sft.yaml            # one process, CPU

A restart with the same command resumes from the newest complete step checkpoint when ``auto_resume: True``.
Exit codes: 0 trained, 1 failed, 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import sys


def build_parser(prog: str = "mirotrain sft") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys, YAML values; ~key deletes)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from mirotrain.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"mirotrain sft: {exc}", file=sys.stderr, flush=True)
        return 2
    from mirotrain.training.distributed import destroy_distributed
    from mirotrain.training.sft import run_sft

    try:
        run_sft(cfg)
    except ConfigError as exc:
        print(f"mirotrain sft: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy_distributed()
    return 0
