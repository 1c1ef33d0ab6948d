"""`mirotrain demo [--workdir DIR] [--resume-from RUN]`: the embedded default, end to end, on a laptop CPU.

Runs the Prefect ``post_train`` flow in ephemeral mode (no server) on a tiny random Qwen3 with the real
Qwen3 tokenizer and the generated agent-trace and preference sets: download -> pack -> SFT -> pack
preference pairs -> DPO -> HF export, then loads the export with transformers and generates a reply (which
is gibberish: the model is tiny and random). Each demo is a new run; ``--resume-from`` continues one.
Needs the ``pipeline`` extra (Prefect); the engine itself never imports Prefect.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    try:
        from pipelines import demo
    except ImportError as exc:
        print(f"mirotrain demo needs the pipeline extra: pip install -e '.[pipeline]' ({exc})", file=sys.stderr)
        return 1
    return demo.main(argv, prog="mirotrain demo")
