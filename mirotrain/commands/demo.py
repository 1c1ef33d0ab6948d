"""`mirotrain demo [--workdir DIR] [--resume-from RUN]`: the embedded default, end to end, on a laptop CPU.

Runs the Prefect ``post_train`` flow in ephemeral mode (no server) on a tiny random Qwen3 with the real
Qwen3 tokenizer and the generated agent-trace and preference sets: download -> pack -> SFT -> pack
preference pairs -> DPO -> HF export, then loads the export with transformers and generates a reply (which
is gibberish: the model is tiny and random). Each demo is a new run; ``--resume-from`` continues one.

The flow lives in ``pipelines/demo.py`` and needs the ``pipeline`` extra (Prefect). The engine never imports
the Prefect layer, so this command starts ``python -m pipelines.demo`` as a child process with the same
arguments and returns its exit code.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys


def main(argv: list[str]) -> int:
    if importlib.util.find_spec("prefect") is None:
        print("mirotrain demo needs the pipeline extra: pip install -e '.[pipeline]' (prefect is not installed)",
              file=sys.stderr)
        return 1
    return subprocess.call([sys.executable, "-m", "pipelines.demo", *argv])
