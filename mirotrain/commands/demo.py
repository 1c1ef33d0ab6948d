"""`mirotrain demo [--workdir DIR]`: the embedded default, end to end, on a laptop CPU.

Runs the Prefect ``post_train`` flow in ephemeral mode (no server) on a tiny random Qwen3 with the real
Qwen3 tokenizer and the generated agent-trace and preference sets: download -> pack -> SFT -> pack
preference pairs -> DPO -> HF export, then loads the export with transformers and generates a reply.
Needs the ``pipeline`` extra (Prefect); the engine itself never imports Prefect.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mirotrain demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo-run", help="where data, checkpoints and exports go")
    ns = parser.parse_args(argv)
    try:
        from pipelines.demo import run_demo
    except ImportError as exc:
        print(f"mirotrain demo needs the pipeline extra: pip install -e '.[pipeline]' ({exc})", file=sys.stderr)
        return 1
    result = run_demo(ns.workdir)
    print(json.dumps(result, indent=2, default=str))
    return 0
