"""`mirotrain convert --checkpoint OUT/checkpoints/step_N --output DIR [--config X]`: step checkpoint -> HF.

Runs on one CPU process (no GPU, no torchrun), streaming one tensor at a time. The model architecture and
the tokenizer location come from the checkpoint's meta.json unless ``--config`` / ``--tokenizer`` say
otherwise. Exit codes: 0 converted, 1 failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirotrain convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a step checkpoint directory (OUT/checkpoints/step_N)")
    p.add_argument("--output", required=True, help="directory to write the HF model to (replaced if it exists)")
    p.add_argument("--config", default=None, help="training config to take the model architecture from")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="export dtype (default: the run's dtype)")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer files to copy (default: the run's)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for --config")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(levelname)s] %(message)s", datefmt="%H:%M:%S")
    from mirotrain.checkpoint.convert import convert_checkpoint

    try:
        out = convert_checkpoint(args.checkpoint, args.output, config_path=args.config, overrides=args.overrides,
                                 dtype=args.dtype, max_shard_size=args.max_shard_size, tokenizer_dir=args.tokenizer)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"mirotrain convert: {exc}", file=sys.stderr, flush=True)
        return 1
    print(out, flush=True)
    return 0
