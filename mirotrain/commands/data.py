"""`mirotrain data demo --out DIR [--num-samples N] [--num-pairs M] [--seed S]`: write the demo data set.

Writes ``DIR/sft.jsonl`` (agent traces: multi-turn, tool calls and results, think blocks, long tool
outputs) and ``DIR/preference.jsonl`` (prompt + chosen/rejected); DIR may be any fsspec URL.
"""

from __future__ import annotations

import argparse
import sys

from mirotrain.commands.errors import add_debug_flag, reports_user_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirotrain data", description="Data utilities.")
    sub = p.add_subparsers(dest="action", required=True)
    demo = sub.add_parser("demo", help="write the demo agent-trace and preference sets")
    demo.add_argument("--out", required=True, help="output directory (local path or fsspec URL)")
    demo.add_argument("--num-samples", type=int, default=200, help="agent traces to write (default 200)")
    demo.add_argument("--num-pairs", type=int, default=None, help="preference pairs (default: --num-samples)")
    demo.add_argument("--seed", type=int, default=0)
    add_debug_flag(demo)
    return p


@reports_user_errors("mirotrain data")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "demo":
        from mirotrain.data.demo import write_demo

        if args.num_samples < 1 or (args.num_pairs is not None and args.num_pairs < 1):
            print("mirotrain data demo: --num-samples/--num-pairs must be >= 1", file=sys.stderr)
            return 2
        files = write_demo(args.out, args.num_samples, args.seed, args.num_pairs)
        for name, url in files.items():
            print(f"{name}: {url}")
        return 0
    return 2  # pragma: no cover
