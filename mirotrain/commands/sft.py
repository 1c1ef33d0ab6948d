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

from mirotrain.commands.errors import reports_user_errors
from mirotrain.commands.recipe import config_parser, run_recipe


def build_parser(prog: str = "mirotrain sft") -> argparse.ArgumentParser:
    return config_parser(prog, __doc__)


@reports_user_errors("mirotrain sft")
def main(argv: list[str]) -> int:
    from mirotrain.training.sft import run_sft

    return run_recipe(build_parser().parse_args(argv), run_sft)
