"""`mirotrain convert --checkpoint OUT[/checkpoints/step_N] --output DIR [--config X]`: step checkpoint -> HF.

Runs on one CPU process (no GPU, no torchrun), streaming one tensor at a time. ``--checkpoint`` names a step
checkpoint or a training output_dir; for a run directory its newest complete step checkpoint is converted,
which for a finished run is its final step. The model architecture and the tokenizer location come from the
checkpoint's meta.json unless ``--config`` / ``--tokenizer`` say otherwise. The export's files are mode 0644
and its directories 0755. Exit codes: 0 converted, 1 failed, 2 bad arguments (a missing or unusable
checkpoint, a config error, a bad shard size).
"""

from __future__ import annotations

import argparse
import logging
import sys

from mirotrain.commands.errors import add_debug_flag, reports_user_errors


def _shard_size(text: str) -> int:
    from mirotrain.models.hf_writer import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirotrain convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a step checkpoint (OUT/checkpoints/step_N) or a training output_dir (its newest complete "
                        "step)")
    p.add_argument("--output", required=True, help="directory to write the HF model to (replaced if it exists)")
    p.add_argument("--config", default=None, help="training config to take the model architecture from")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="export dtype (default: the run's dtype)")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer files to copy (default: the run's)")
    p.add_argument("--max-shard-size", default="5GB", type=_shard_size, help="safetensors shard size (default 5GB)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for --config")
    return add_debug_flag(p)


@reports_user_errors("mirotrain convert")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(levelname)s] %(message)s", datefmt="%H:%M:%S")
    from mirotrain.checkpoint.convert import convert_checkpoint
    from mirotrain.commands.errors import is_user_error

    try:
        out = convert_checkpoint(args.checkpoint, args.output, config_path=args.config, overrides=args.overrides,
                                 dtype=args.dtype, max_shard_size=args.max_shard_size, tokenizer_dir=args.tokenizer)
    except (OSError, ValueError, KeyError) as exc:
        if is_user_error(exc):  # a missing or unusable checkpoint, a config error: exit code 2
            raise
        print(f"mirotrain convert: {exc}", file=sys.stderr, flush=True)
        return 1
    print(out, flush=True)
    return 0
